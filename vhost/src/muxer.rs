//! The connection table: routes guest packets to connections, owns the host-side sockets and
//! their epoll set, allocates host ports, and decides what goes on the RX queue next.
//!
//! Host sockets live in this module's own epoll instance (level-triggered). The backend
//! registers that one epoll fd on vhost-user-backend's worker epoll under a single event id
//! ([`crate::backend::HOST_EVENT`]); when it fires, [`Muxer::handle_host_events`] drains it
//! with a zero timeout. Tokens inside this epoll are private u64s, so the number of
//! connections is not limited by the worker's u16 event ids.
//!
//! Interest is recomputed after every change: `IN` only while the connection may read
//! (guest credit and room in `to_guest`), `OUT` only while bytes wait for the host socket.
//! With neither, the fd is removed from the epoll set altogether — a Unix socket whose peer
//! hung up reports `EPOLLHUP` unconditionally, which would otherwise spin the loop while we
//! wait for guest credit.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use log::{debug, error, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::chain::TxPacket;
use crate::connection::{Connection, ResetReason, Verdict, DEFAULT_BUF_ALLOC, MAX_TO_GUEST};
use crate::host_side::{connect_nonblocking, ClientStep, PendingClient, Routes};
use crate::packet::{Header, Op, HOST_CID, TYPE_STREAM};
use crate::stats::Stats;

/// Most connections (plus host clients still typing their command) at once. Beyond it guest
/// requests are refused with RST and host clients are closed.
pub const MAX_CONNECTIONS: usize = 1024;

/// Most standalone RSTs waiting for RX buffers. While this many are queued the TX queue is
/// not consumed, so a guest that floods requests without posting RX buffers back-pressures
/// itself (Linux drivers/vhost/vsock.c `vhost_vsock_more_replies` does the same).
pub const MAX_PENDING_REPLIES: usize = 256;

/// First host port handed out for host-initiated connections (the IANA dynamic range; any
/// port works, vsock ports are 32-bit).
pub const FIRST_EPHEMERAL_PORT: u32 = 49152;

const LISTENER_TOKEN: u64 = 0;

/// Device configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// The guest's CID.
    pub guest_cid: u64,
    /// Routing of guest connections to host sockets.
    pub routes: Routes,
    /// Receive buffer advertised per connection.
    pub buf_alloc: u32,
}

impl DeviceConfig {
    /// A configuration with the default buffer size.
    pub fn new(
        guest_cid: u64,
        bus_socket: PathBuf,
        bus_port: u32,
        uds_path: Option<PathBuf>,
    ) -> Self {
        DeviceConfig {
            guest_cid,
            routes: Routes {
                bus_socket,
                bus_port,
                uds_path,
            },
            buf_alloc: DEFAULT_BUF_ALLOC,
        }
    }
}

/// (host port, guest port).
type Key = (u32, u32);

enum Slot {
    Client,
    Conn(Key),
}

struct Entry {
    conn: Connection,
    stream: UnixStream,
    token: u64,
    registered: Option<EventSet>,
    queued: bool,
    /// Bytes for the host socket that are not part of the stream (the `OK <port>\n` reply of
    /// the CONNECT handshake), written before anything else and not counted as credit.
    preamble: Vec<u8>,
}

/// The connection table and its host sockets.
pub struct Muxer {
    cfg: DeviceConfig,
    epoll: Epoll,
    listener: Option<UnixListener>,
    listener_registered: bool,
    conns: HashMap<Key, Entry>,
    clients: HashMap<u64, PendingClient>,
    tokens: HashMap<u64, Slot>,
    next_token: u64,
    next_port: u32,
    /// RSTs not tied to a live connection, sent before connection traffic.
    control: VecDeque<Header>,
    /// Connections that have something for RX, round-robin.
    ready: VecDeque<Key>,
    /// Connections that had something but the last RX buffer was too small for it.
    deferred: Vec<Key>,
    scratch: Vec<u8>,
    stats: Stats,
}

fn epoll_set(
    epoll: &Epoll,
    fd: RawFd,
    old: Option<EventSet>,
    new: Option<EventSet>,
    token: u64,
) -> io::Result<()> {
    match (old, new) {
        (None, None) => Ok(()),
        (Some(a), Some(b)) if a == b => Ok(()),
        (None, Some(ev)) => epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(ev, token)),
        (Some(_), Some(ev)) => epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(ev, token)),
        (Some(_), None) => epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default()),
    }
}

impl Muxer {
    /// An empty table. `listener` is the host-initiated `CONNECT` socket (`--uds-path`), if
    /// any; it must be non-blocking.
    pub fn new(cfg: DeviceConfig, listener: Option<UnixListener>) -> io::Result<Muxer> {
        let epoll = Epoll::new()?;
        let mut mux = Muxer {
            cfg,
            epoll,
            listener,
            listener_registered: false,
            conns: HashMap::new(),
            clients: HashMap::new(),
            tokens: HashMap::new(),
            next_token: LISTENER_TOKEN + 1,
            next_port: FIRST_EPHEMERAL_PORT,
            control: VecDeque::new(),
            ready: VecDeque::new(),
            deferred: Vec::new(),
            scratch: vec![0u8; MAX_TO_GUEST],
            stats: Stats::default(),
        };
        mux.register_listener();
        Ok(mux)
    }

    fn register_listener(&mut self) {
        if let Some(listener) = &self.listener {
            if !self.listener_registered {
                match self.epoll.ctl(
                    ControlOperation::Add,
                    listener.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
                ) {
                    Ok(()) => self.listener_registered = true,
                    Err(e) => error!("cannot watch the host connect socket: {e}"),
                }
            }
        }
    }

    /// The epoll fd to watch for host-side activity.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub(crate) fn stats_mut(&mut self) -> &mut Stats {
        &mut self.stats
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Drop every connection and pending client (VMM gone or guest driver reset): host
    /// sockets are closed, nothing is sent to the guest (it has forgotten them too).
    pub fn reset(&mut self) -> usize {
        let n = self.conns.len();
        for (_, entry) in self.conns.drain() {
            if entry.registered.is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    entry.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
        for (_, client) in self.clients.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                client.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.stats.closed += n as u64;
        self.tokens.clear();
        self.control.clear();
        self.ready.clear();
        self.deferred.clear();
        n
    }

    fn alloc_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    fn alloc_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS + 1 {
            let port = self.next_port;
            self.next_port = if port >= u32::MAX - 1 {
                FIRST_EPHEMERAL_PORT
            } else {
                port + 1
            };
            if port != self.cfg.routes.bus_port
                && !self.conns.keys().any(|(local, _)| *local == port)
            {
                return Some(port);
            }
        }
        None
    }

    fn push_reset(&mut self, hdr: Header) {
        self.stats.resets_sent += 1;
        self.control.push_back(hdr);
    }

    /// Whether so many replies wait for RX buffers that TX processing should pause.
    pub fn replies_backlogged(&self) -> bool {
        self.control.len() >= MAX_PENDING_REPLIES
    }

    // ---- guest → host ------------------------------------------------------------------

    /// Handle one well-formed TX packet.
    pub fn handle_guest_packet(&mut self, pkt: TxPacket) {
        let hdr = pkt.hdr;
        // Spec §5.10.6.2: the device must drop packets whose source is not the guest;
        // anything not addressed to the host has no route here.
        if hdr.src_cid != self.cfg.guest_cid || hdr.dst_cid != HOST_CID {
            self.stats.bad_cid += 1;
            warn!(
                "dropping packet from cid {} to cid {} (guest is {}; bad addresses so far: {})",
                hdr.src_cid, hdr.dst_cid, self.cfg.guest_cid, self.stats.bad_cid
            );
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            self.stats.bad_type += 1;
            warn!(
                "packet of socket type {} (only STREAM is supported; bad types so far: {})",
                hdr.type_, self.stats.bad_type
            );
            // Linux virtio_transport_recv_pkt answers an unsupported type with a reset so the
            // guest's connect() fails instead of hanging.
            if hdr.op() == Some(Op::Request) {
                self.push_reset(hdr.reset_reply());
            }
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        let Some(entry) = self.conns.get_mut(&key) else {
            match hdr.op() {
                Some(Op::Rst) => {}
                Some(Op::Request) => self.open_guest_connection(&hdr),
                _ => {
                    debug!(
                        "op {} for unknown connection host:{} guest:{}, answering RST",
                        hdr.op, hdr.dst_port, hdr.src_port
                    );
                    self.push_reset(hdr.reset_reply());
                }
            }
            return;
        };
        match entry.conn.on_guest_packet(&hdr, &pkt.data) {
            Verdict::Keep => {}
            Verdict::Established => {
                debug!("connection host:{} -> guest:{} established", key.0, key.1);
                entry.preamble = format!("OK {}\n", key.0).into_bytes();
            }
            Verdict::PeerReset => {
                self.stats.resets_received += 1;
                self.close(key, None, "reset by the guest");
                return;
            }
            Verdict::Reset(reason) => {
                if let ResetReason::Overrun { .. } = reason {
                    self.stats.overruns += 1;
                    warn!(
                        "connection host:{} guest:{}: {reason}; resetting (overruns so far: {})",
                        key.0, key.1, self.stats.overruns
                    );
                } else {
                    warn!(
                        "connection host:{} guest:{}: {reason}; resetting",
                        key.0, key.1
                    );
                }
                let rst = entry.conn.rst_header();
                self.close(key, Some(rst), "protocol error");
                return;
            }
            Verdict::Ignored(why) => {
                self.stats.ignored += 1;
                warn!(
                    "connection host:{} guest:{}: dropped packet: {why} (dropped so far: {})",
                    key.0, key.1, self.stats.ignored
                );
            }
        }
        self.service(key);
    }

    fn open_guest_connection(&mut self, req: &Header) {
        let port = req.dst_port;
        let refuse = |mux: &mut Muxer, why: String| {
            mux.stats.refused += 1;
            debug!("refusing guest:{} -> host:{port}: {why}", req.src_port);
            mux.push_reset(req.reset_reply());
        };
        if self.conns.len() + self.clients.len() >= MAX_CONNECTIONS {
            warn!("refusing guest connection to port {port}: {MAX_CONNECTIONS} connections open");
            return refuse(self, "too many connections".into());
        }
        let Some(path) = self.cfg.routes.route(port) else {
            return refuse(self, "no route for this port".into());
        };
        let stream = match connect_nonblocking(&path) {
            Ok(stream) => stream,
            Err(e) => {
                if port == self.cfg.routes.bus_port {
                    warn!("cannot reach the bus host at {}: {e}", path.display());
                }
                return refuse(self, format!("connect {}: {e}", path.display()));
            }
        };
        let key = (port, req.src_port);
        let token = self.alloc_token();
        self.tokens.insert(token, Slot::Conn(key));
        self.conns.insert(
            key,
            Entry {
                conn: Connection::accept_guest_request(req, self.cfg.buf_alloc),
                stream,
                token,
                registered: None,
                queued: false,
                preamble: Vec::new(),
            },
        );
        self.stats.opened += 1;
        debug!(
            "connection guest:{} -> host:{port} opened ({})",
            req.src_port,
            path.display()
        );
        self.service(key);
    }

    // ---- host side -------------------------------------------------------------------

    /// Process everything the host-side epoll reports, without blocking.
    pub fn handle_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("host epoll wait failed: {e}");
                    return;
                }
            };
            for event in events.iter().take(n) {
                self.dispatch(event.data(), event.event_set());
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn dispatch(&mut self, token: u64, evset: EventSet) {
        if token == LISTENER_TOKEN {
            self.accept_clients();
            return;
        }
        match self.tokens.get(&token) {
            Some(Slot::Client) => self.advance_client(token),
            Some(Slot::Conn(key)) => {
                let key = *key;
                self.host_io(key, evset);
            }
            None => {}
        }
    }

    fn accept_clients(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + self.clients.len() >= MAX_CONNECTIONS {
                        warn!("closing host client: {MAX_CONNECTIONS} connections open");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        warn!("host client: {e}");
                        continue;
                    }
                    let token = self.alloc_token();
                    if let Err(e) = self.epoll.ctl(
                        ControlOperation::Add,
                        stream.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, token),
                    ) {
                        warn!("host client: cannot watch it: {e}");
                        continue;
                    }
                    self.tokens.insert(token, Slot::Client);
                    self.clients.insert(token, PendingClient::new(stream));
                    // The command may already be there.
                    self.advance_client(token);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.kind() == io::ErrorKind::ConnectionAborted =>
                {
                    continue
                }
                Err(e) => {
                    // E.g. EMFILE: stop watching the listener (it would stay readable and
                    // spin); a connection closing re-arms it.
                    error!("accepting host clients failed: {e}; pausing until a connection closes");
                    if let Some(listener) = &self.listener {
                        let _ = self.epoll.ctl(
                            ControlOperation::Delete,
                            listener.as_raw_fd(),
                            EpollEvent::default(),
                        );
                    }
                    self.listener_registered = false;
                    return;
                }
            }
        }
    }

    fn drop_client(&mut self, token: u64) {
        if let Some(client) = self.clients.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                client.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.tokens.remove(&token);
    }

    fn advance_client(&mut self, token: u64) {
        let Some(client) = self.clients.get_mut(&token) else {
            return;
        };
        match client.advance() {
            ClientStep::NeedMore => {}
            ClientStep::Gone => self.drop_client(token),
            ClientStep::Bad(e) => {
                self.stats.bad_host_commands += 1;
                warn!(
                    "host client: {e}; closing it (bad commands so far: {})",
                    self.stats.bad_host_commands
                );
                self.drop_client(token);
            }
            ClientStep::Connect { port, leftover } => {
                let Some(client) = self.clients.remove(&token) else {
                    return;
                };
                let Some(local) = self.alloc_port() else {
                    warn!("host client: no free host port");
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        client.stream.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    self.tokens.remove(&token);
                    return;
                };
                let key = (local, port);
                let mut conn = Connection::connect_to_guest(
                    local,
                    port,
                    self.cfg.guest_cid,
                    self.cfg.buf_alloc,
                );
                conn.preload_to_guest(&leftover);
                self.tokens.insert(token, Slot::Conn(key));
                self.conns.insert(
                    key,
                    Entry {
                        conn,
                        stream: client.stream,
                        token,
                        // Still registered for IN from the handshake; service() fixes it.
                        registered: Some(EventSet::IN),
                        queued: false,
                        preamble: Vec::new(),
                    },
                );
                self.stats.opened += 1;
                debug!("connection host:{local} -> guest:{port} requested by a host client");
                self.service(key);
            }
        }
    }

    /// Read from / write to a connection's host socket as the event allows.
    fn host_io(&mut self, key: Key, evset: EventSet) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        let mut failure: Option<io::Error> = None;
        if evset
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR)
        {
            loop {
                let budget = entry.conn.host_read_budget().min(self.scratch.len());
                if budget == 0 {
                    break;
                }
                match entry.stream.read(&mut self.scratch[..budget]) {
                    Ok(0) => {
                        debug!("connection host:{} guest:{}: host EOF", key.0, key.1);
                        entry.conn.on_host_eof();
                        break;
                    }
                    Ok(n) => entry.conn.on_host_data(&self.scratch[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
        }
        if failure.is_none() && evset.contains(EventSet::ERROR) {
            if let Ok(Some(e)) = entry.stream.take_error() {
                failure = Some(e);
            }
        }
        if let Some(e) = failure {
            let rst = entry.conn.rst_header();
            self.close(key, Some(rst), &format!("host socket error: {e}"));
            return;
        }
        // service() flushes pending writes (EPOLLOUT) and recomputes everything.
        self.service(key);
    }

    fn flush(entry: &mut Entry) -> io::Result<()> {
        while !entry.preamble.is_empty() {
            match entry.stream.write(&entry.preamble) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    entry.preamble.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        loop {
            let front = entry.conn.to_host_front();
            if front.is_empty() {
                break;
            }
            match entry.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => entry.conn.on_host_written(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        if entry.conn.wants_host_write_shutdown() {
            match entry.stream.shutdown(Shutdown::Write) {
                Ok(()) => {}
                // The host already closed its end; nothing to tell it.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) => return Err(e),
            }
            entry.conn.on_host_write_shutdown();
        }
        Ok(())
    }

    /// After any change to a connection: flush to the host, reset it if finished, fix its
    /// epoll interest, and queue it for RX if it has something to send.
    fn service(&mut self, key: Key) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        if let Err(e) = Self::flush(entry) {
            let rst = entry.conn.rst_header();
            self.close(key, Some(rst), &format!("host socket error: {e}"));
            return;
        }
        if entry.conn.is_finished() {
            let rst = entry.conn.rst_header();
            self.close(key, Some(rst), "both directions shut down");
            return;
        }
        let mut want = EventSet::empty();
        if entry.conn.host_read_budget() > 0 {
            want |= EventSet::IN;
        }
        if !entry.preamble.is_empty() || entry.conn.to_host_len() > 0 {
            want |= EventSet::OUT;
        }
        let want = (!want.is_empty()).then_some(want);
        match epoll_set(
            &self.epoll,
            entry.stream.as_raw_fd(),
            entry.registered,
            want,
            entry.token,
        ) {
            Ok(()) => entry.registered = want,
            Err(e) => {
                let rst = entry.conn.rst_header();
                self.close(
                    key,
                    Some(rst),
                    &format!("cannot watch the host socket: {e}"),
                );
                return;
            }
        }
        if entry.conn.wants_rx() && !entry.queued {
            entry.queued = true;
            self.ready.push_back(key);
        }
    }

    /// Remove a connection, closing its host socket; queue `rst` for the guest if given.
    fn close(&mut self, key: Key, rst: Option<Header>, why: &str) {
        let Some(entry) = self.conns.remove(&key) else {
            return;
        };
        if entry.registered.is_some() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                entry.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.tokens.remove(&entry.token);
        self.stats.closed += 1;
        debug!(
            "connection host:{} guest:{} closed: {why} (sent {} bytes, forwarded {})",
            key.0,
            key.1,
            entry.conn.tx_cnt(),
            entry.conn.fwd_cnt()
        );
        if let Some(rst) = rst {
            self.push_reset(rst);
        }
        // A slot freed up: resume accepting if a resource error paused it.
        self.register_listener();
    }

    // ---- host → guest ------------------------------------------------------------------

    /// Whether anything may be waiting for an RX buffer.
    pub fn has_rx_work(&self) -> bool {
        !self.control.is_empty() || !self.ready.is_empty()
    }

    /// The next packet for the guest with at most `payload_room` payload bytes, or `None`
    /// if nothing fits.
    pub fn next_rx_packet(&mut self, payload_room: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(hdr) = self.control.pop_front() {
            return Some((hdr, Vec::new()));
        }
        while let Some(key) = self.ready.pop_front() {
            let Some(entry) = self.conns.get_mut(&key) else {
                continue;
            };
            entry.queued = false;
            match entry.conn.next_packet(payload_room) {
                Some(packet) => {
                    // Sending frees `to_guest` room (reading may resume), may complete a
                    // SHUTDOWN, and may leave more to send: service() handles all three.
                    self.service(key);
                    return Some(packet);
                }
                None => {
                    if entry.conn.wants_rx() {
                        // Only payload is pending and this buffer has no room for it.
                        entry.queued = true;
                        self.deferred.push(key);
                    }
                }
            }
        }
        None
    }

    /// End of an RX pass: connections skipped for lack of buffer room go back in line.
    pub fn end_rx_pass(&mut self) {
        self.ready.extend(self.deferred.drain(..));
    }
}
