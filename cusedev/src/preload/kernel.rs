//! The kernel's half of CUSE, for the preload library: what fs/fuse/dev.c and cuse.c do
//! between the processes that call a device and the server that answers (Linux 6.1).
//!
//! One thread, one epoll set. It owns:
//! - the listening socket, where each open and each stat of a device path arrives;
//! - every *file socket* (one per open file, docs/preload.md): its requests come in here, each
//!   with the socket it is to be answered on; its end (the last descriptor of it closed,
//!   anywhere) is the kernel's last `fput`, and becomes RELEASE;
//! - every *call socket*: the caller's side of one request in flight, where an INTERRUPT (the
//!   caller got a signal), an ioctl retry or the caller's death arrives;
//! - one end of each device's socketpair, whose other end is a CUSE session of the engine:
//!   requests go down it with our `unique`s and the caller's credentials, replies and poll
//!   notifications come up.
//!
//! Like the kernel, this side decides *who* calls: pid, uid and gid come from the credentials
//! the kernel attached to the message (see [`super::wire`]), never from the message. And like
//! the kernel it holds a file open while a call on it runs, so a close racing a read cannot
//! release the file under it.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use zerocopy::{FromBytes, IntoBytes};

use super::wire::{self, Credentials, Received};
use crate::cuse::init::CUSE_MAX_IO;
use crate::fuse::abi::{
    ioctl_flags, Attr, AttrOut, EntryOut, InHeader, InterruptIn, IoctlIn, IoctlOut, Opcode, OpenIn,
    OutHeader, PollIn, ReadIn, ReleaseIn, WriteIn, FUSE_NOTIFY_POLL, FUSE_POLL_SCHEDULE_NOTIFY,
};
use crate::fuse::attr::BLKSIZE;

/// The largest message either side may send: a write of `max_write` with its headers.
pub const MAX_MESSAGE: usize = CUSE_MAX_IO as usize + 4096;

/// Pages an unrestricted ioctl may move each way on a CUSE connection: `fc->max_pages`, which
/// CUSE never negotiates (FUSE_DEFAULT_MAX_PAGES_PER_REQ, fs/fuse/fuse_i.h of Linux 6.1).
const IOCTL_MAX_BYTES: u32 = 32 * 4096;

/// The misc major: what `stat` shows a preloaded node's `st_rdev` under.
const MISC_MAJOR: u32 = 10;

/// The engine tells an interrupt's reply apart by this bit of `unique` (fs/fuse/dev.c).
const FUSE_INT_REQ_BIT: u64 = 1;

// What each epoll token names: the kind in the top byte, an id below.
const LISTENER: u64 = 1 << 56;
const WAKE: u64 = 2 << 56;
const CONN: u64 = 3 << 56;
const CALL: u64 = 4 << 56;
const CHANNEL: u64 = 5 << 56;
const WATCH: u64 = 6 << 56;
const KIND: u64 = 0xff << 56;

/// The identity the nodes have: the user cusedev runs as owns them.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// One device as this side knows it.
struct DeviceEntry {
    name: String,
    mode: u32,
    minor: u32,
    registered: (u64, u32),
    channel: OwnedFd,
    /// Requests the engine has not taken yet (its socket was full).
    outbox: VecDeque<Vec<u8>>,
    open_files: usize,
    releases_in_flight: usize,
    /// OPENs waiting for those releases, as a close(2) returns only after its release.
    deferred_opens: Vec<u64>,
    removed: bool,
    /// The engine's session, handed back to the frontend to stop once nothing uses it.
    session: Option<Box<dyn Send>>,
}

/// An accepted connection: first a would-be opener, then (once the OPEN succeeds) a file.
struct Conn {
    socket: OwnedFd,
    credentials: Option<Credentials>,
    file: Option<File>,
    /// An OPEN on its way: the device and the header the library sent.
    opening: Option<PendingOpen>,
    /// Its peer has gone.
    ended: bool,
}

#[derive(Clone, Copy)]
struct PendingOpen {
    device: u64,
    client_unique: u64,
    flags: u32,
    tid: u32,
}

struct File {
    device: u64,
    fh: u64,
    flags: u32,
    /// Calls on this file not answered yet: the file stays open for them.
    calls: usize,
}

/// One request in flight, from its first message to its last reply.
struct Call {
    socket: OwnedFd,
    conn: u64,
    device: u64,
    client_unique: u64,
    /// Our `unique` of the request the engine has now, if it has one.
    unique: Option<u64>,
    opcode: Opcode,
    credentials: Credentials,
    tid: u32,
    interrupted: bool,
    /// The caller has gone: its answer is dropped when it comes.
    orphan: bool,
    /// The caller asked to be told of poll changes.
    notify: bool,
}

/// What one of our `unique`s stands for.
enum InFlight {
    Open(u64),
    Call(u64),
    Release(u64),
}

#[derive(Default)]
struct State {
    devices: HashMap<u64, DeviceEntry>,
    by_name: HashMap<String, u64>,
    conns: HashMap<u64, Conn>,
    calls: HashMap<u64, Call>,
    in_flight: HashMap<u64, InFlight>,
    /// Poll registrations per file (our `kh` is the file's connection id).
    watches: HashMap<u64, Vec<u64>>,
    watch_sockets: HashMap<u64, (u64, OwnedFd)>,
    next_id: u64,
    next_unique: u64,
    stopping: bool,
}

impl State {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Even, so that `unique | 1` names its interrupt.
    fn unique(&mut self) -> u64 {
        self.next_unique += 2;
        self.next_unique
    }
}

/// The shared half: the frontend adds and removes devices, the thread serves them.
pub struct Kernel {
    state: Mutex<State>,
    epoll: Epoll,
    wake: EventFd,
    listener: OwnedFd,
    owner: Owner,
    retired: Retired,
}

/// Where sessions the thread no longer needs go, to be stopped off the thread.
pub type Retired = std::sync::mpsc::Sender<Box<dyn Send>>;

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn now() -> (u64, u32) {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (since.as_secs(), since.subsec_nanos())
}

fn header_of(bytes: &[u8]) -> Option<InHeader> {
    InHeader::read_from_prefix(bytes).ok().map(|(h, _)| h)
}

/// A reply message: `fuse_out_header` + body.
fn reply_bytes(unique: u64, error: i32, body: &[u8]) -> Vec<u8> {
    let header = OutHeader {
        len: (size_of::<OutHeader>() + body.len()) as u32,
        error,
        unique,
    };
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

fn error_reply(unique: u64, errno: Errno) -> Vec<u8> {
    reply_bytes(unique, -(errno as i32), &[])
}

/// A request message for the engine.
fn request_bytes(
    opcode: Opcode,
    unique: u64,
    caller: (Credentials, u32),
    body: &[&[u8]],
) -> Vec<u8> {
    let (credentials, tid) = caller;
    let len = size_of::<InHeader>() + body.iter().map(|b| b.len()).sum::<usize>();
    let header = InHeader {
        len: len as u32,
        opcode: opcode.0,
        unique,
        nodeid: 0,
        uid: credentials.uid,
        gid: credentials.gid,
        pid: tid,
        total_extlen: 0,
        padding: 0,
    };
    let mut out = header.as_bytes().to_vec();
    for part in body {
        out.extend_from_slice(part);
    }
    out
}

/// The thread that made the call, if `claimed` is a thread of the credentialed process;
/// else the process itself (docs/preload.md, "Credentials").
fn caller_tid(credentials: Credentials, claimed: u32) -> u32 {
    if claimed == credentials.pid || claimed == 0 {
        return credentials.pid;
    }
    let task = format!("/proc/{}/task/{claimed}", credentials.pid);
    if std::path::Path::new(&task).exists() {
        claimed
    } else {
        log::debug!(
            "preload: pid {} named thread {claimed}, which is not one of its threads; using \
             the process id",
            credentials.pid
        );
        credentials.pid
    }
}

/// Whether `may_open` (fs/namei.c) would let `who` open a node of `mode` owned by `owner`
/// with `flags`. Supplementary groups are not seen (the credentials carry only the gid).
fn may_open(mode: u32, owner: Owner, who: Credentials, flags: u32) -> bool {
    if who.uid == 0 {
        return true;
    }
    let bits = if who.uid == owner.uid {
        (mode >> 6) & 7
    } else if who.gid == owner.gid {
        (mode >> 3) & 7
    } else {
        mode & 7
    };
    let want = match flags as i32 & libc::O_ACCMODE {
        libc::O_RDONLY => 4,
        libc::O_WRONLY => 2,
        _ => 6,
    };
    bits & want == want
}

impl Kernel {
    /// Serves opens arriving on `listener` as the user `owner`.
    /// `listener`: a listening SOCK_SEQPACKET socket.
    pub fn new(listener: OwnedFd, owner: Owner, retired: Retired) -> Result<Kernel, Errno> {
        wire::set_nonblocking(&listener)?;
        wire::pass_credentials(listener.as_fd())?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        epoll.add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))?;
        epoll.add(&wake, EpollEvent::new(EpollFlags::EPOLLIN, WAKE))?;
        Ok(Kernel {
            state: Mutex::new(State::default()),
            epoll,
            wake,
            listener,
            owner,
            retired,
        })
    }

    /// Makes `name` openable; `channel` is our end of the socketpair whose other end the
    /// engine serves (CUSE_INIT already answered), `session` what to hand back once unused.
    pub fn add(
        &self,
        name: &str,
        mode: u32,
        channel: OwnedFd,
        session: Box<dyn Send>,
    ) -> Result<(), Errno> {
        wire::set_nonblocking(&channel)?;
        let mut state = lock(&self.state);
        let id = state.id();
        let minor = 127u32.saturating_sub((id % 128) as u32);
        self.epoll
            .add(&channel, EpollEvent::new(EpollFlags::EPOLLIN, CHANNEL | id))?;
        state.devices.insert(
            id,
            DeviceEntry {
                name: name.to_owned(),
                mode,
                minor,
                registered: now(),
                channel,
                outbox: VecDeque::new(),
                open_files: 0,
                releases_in_flight: 0,
                deferred_opens: Vec::new(),
                removed: false,
                session: Some(session),
            },
        );
        state.by_name.insert(name.to_owned(), id);
        Ok(())
    }

    /// `misc_deregister`: new opens get ENOENT; open files keep their device until closed.
    pub fn remove(&self, name: &str) {
        let mut state = lock(&self.state);
        let Some(id) = state.by_name.remove(name) else {
            return;
        };
        if let Some(device) = state.devices.get_mut(&id) {
            device.removed = true;
        }
        self.retire_if_unused(&mut state, id);
    }

    /// Ends the thread at its next turn.
    pub fn stop(&self) {
        lock(&self.state).stopping = true;
        let _ = self.wake.write(1);
    }

    /// The thread's loop; returns when stopped, handing every session back.
    pub fn run(&self) {
        let mut events = vec![EpollEvent::empty(); 64];
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let count = match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(count) => count,
                Err(Errno::EINTR) => continue,
                Err(errno) => {
                    log::error!("preload: epoll_wait failed: {errno}; the preload frontend stops");
                    break;
                }
            };
            let mut state = lock(&self.state);
            if state.stopping {
                break;
            }
            for event in &events[..count] {
                let token = event.data();
                let flags = event.events();
                let id = token & !KIND;
                match token & KIND {
                    LISTENER => self.accept(&mut state),
                    WAKE => {
                        let _ = self.wake.read();
                    }
                    CONN => self.on_conn(&mut state, id, &mut buf),
                    CALL => self.on_call(&mut state, id, &mut buf),
                    CHANNEL => {
                        if flags.contains(EpollFlags::EPOLLOUT) {
                            self.flush_outbox(&mut state, id);
                        }
                        if flags.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP) {
                            self.on_channel(&mut state, id, &mut buf);
                        }
                    }
                    WATCH => self.drop_watch(&mut state, id),
                    _ => {}
                }
            }
        }
        let mut state = lock(&self.state);
        let sessions: Vec<Box<dyn Send>> = state
            .devices
            .values_mut()
            .filter_map(|device| device.session.take())
            .collect();
        drop(state);
        // Stopping a session interrupts what it still has parked and releases its files;
        // only then do our ends of the sockets close (so no session reads a reset).
        drop(sessions);
        let mut state = lock(&self.state);
        state.devices.clear();
        state.conns.clear();
        state.calls.clear();
        state.watch_sockets.clear();
    }

    fn accept(&self, state: &mut State) {
        loop {
            let socket = match nix::sys::socket::accept4(
                self.listener.as_raw_fd(),
                nix::sys::socket::SockFlag::SOCK_CLOEXEC
                    | nix::sys::socket::SockFlag::SOCK_NONBLOCK,
            ) {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                Ok(raw) => unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) },
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return,
                Err(errno) => {
                    // ENFILE, EMFILE, ENOMEM: the opener waits; its connection stays queued.
                    log::warn!("preload: cannot accept an open: {errno}");
                    return;
                }
            };
            if let Err(errno) = wire::pass_credentials(socket.as_fd()) {
                log::warn!("preload: SO_PASSCRED on an accepted socket: {errno}; refused");
                continue;
            }
            // The opener's credentials at connect(2): what an OPEN sent before we set
            // SO_PASSCRED would lack otherwise.
            let credentials =
                nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::PeerCredentials)
                    .ok()
                    .map(Credentials::from);
            let id = state.id();
            let interest = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
            if let Err(errno) = self
                .epoll
                .add(&socket, EpollEvent::new(interest, CONN | id))
            {
                log::warn!("preload: cannot watch an accepted socket: {errno}; refused");
                continue;
            }
            state.conns.insert(
                id,
                Conn {
                    socket,
                    credentials,
                    file: None,
                    opening: None,
                    ended: false,
                },
            );
        }
    }

    /// Something on a connection: requests, or its end.
    fn on_conn(&self, state: &mut State, id: u64, buf: &mut [u8]) {
        loop {
            let Some(conn) = state.conns.get(&id) else {
                return;
            };
            if conn.ended {
                return;
            }
            match wire::receive(conn.socket.as_fd(), buf) {
                Ok(Received::Nothing) => return,
                Ok(Received::Message(message)) => {
                    // Only an OPEN may have been sent before we set SO_PASSCRED (it can
                    // arrive before accept); it is the connecting process's, which
                    // SO_PEERCRED names. Every later message carries its own.
                    let credentials = if conn.file.is_some() {
                        message.credentials
                    } else {
                        message.credentials.or(conn.credentials)
                    };
                    if message.truncated {
                        log::warn!("preload: a message longer than {MAX_MESSAGE} bytes; refused");
                        continue;
                    }
                    let bytes = buf[..message.len].to_vec();
                    self.on_request(state, id, &bytes, credentials, message.fd);
                }
                Ok(Received::End) | Err(_) => {
                    self.on_conn_end(state, id);
                    return;
                }
            }
        }
    }

    fn on_request(
        &self,
        state: &mut State,
        conn_id: u64,
        bytes: &[u8],
        credentials: Option<Credentials>,
        reply_socket: Option<OwnedFd>,
    ) {
        let Some(header) = header_of(bytes).filter(|h| h.len as usize == bytes.len()) else {
            log::warn!(
                "preload: a malformed request ({} bytes); ignored",
                bytes.len()
            );
            return;
        };
        let body = &bytes[size_of::<InHeader>()..];
        let opcode = Opcode(header.opcode);
        let Some(conn) = state.conns.get(&conn_id) else {
            return;
        };
        let is_file = conn.file.is_some();
        // Where the answer goes: a call's own socket, or (OPEN, LOOKUP) the connection.
        let answer = |socket: &OwnedFd, errno: Errno| {
            let _ = wire::send(socket.as_fd(), &[&error_reply(header.unique, errno)]);
        };
        let Some(credentials) = credentials.filter(|c| c.pid != 0) else {
            log::warn!("preload: a request without credentials, or from a process cusedev cannot see; EPERM");
            match &reply_socket {
                Some(socket) => answer(socket, Errno::EPERM),
                None => answer(&conn.socket, Errno::EPERM),
            }
            return;
        };
        let tid = caller_tid(credentials, header.pid);
        if !is_file {
            match opcode {
                Opcode::OPEN if conn.opening.is_none() => {
                    self.open(state, conn_id, &header, body, credentials, tid)
                }
                Opcode::LOOKUP => {
                    let reply = self.lookup(state, header.unique, body);
                    if let Some(conn) = state.conns.get(&conn_id) {
                        let _ = wire::send(conn.socket.as_fd(), &[&reply]);
                    }
                }
                _ => answer(&conn.socket, Errno::EINVAL),
            }
            return;
        }
        let Some(socket) = reply_socket else {
            log::warn!(
                "preload: pid {}: {opcode} without its reply socket; ignored",
                credentials.pid
            );
            return;
        };
        wire::widen_send_buffer(socket.as_fd());
        let Some(file) = conn.file.as_ref() else {
            return;
        };
        let (device, fh) = (file.device, file.fh);
        if opcode == Opcode::GETATTR {
            let reply = match state.devices.get(&device) {
                Some(entry) => {
                    let out = AttrOut {
                        attr: self.attr(device, entry),
                        ..AttrOut::default()
                    };
                    reply_bytes(header.unique, 0, out.as_bytes())
                }
                None => error_reply(header.unique, Errno::ENODEV),
            };
            let _ = wire::send(socket.as_fd(), &[&reply]);
            return;
        }
        let body = match check_body(opcode, body, fh, conn_id) {
            Ok(body) => body,
            Err(errno) => {
                log::debug!(
                    "preload: pid {}: {opcode} refused: {errno}",
                    credentials.pid
                );
                answer(&socket, errno);
                return;
            }
        };
        let call_id = state.id();
        let unique = state.unique();
        let notify = opcode == Opcode::POLL
            && PollIn::read_from_prefix(&body)
                .map(|(p, _)| p.flags & FUSE_POLL_SCHEDULE_NOTIFY != 0)
                .unwrap_or(false);
        if let Err(errno) = self.epoll.add(
            &socket,
            EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, CALL | call_id),
        ) {
            answer(&socket, errno);
            return;
        }
        if let Some(file) = state.conns.get_mut(&conn_id).and_then(|c| c.file.as_mut()) {
            file.calls += 1;
        }
        state.calls.insert(
            call_id,
            Call {
                socket,
                conn: conn_id,
                device,
                client_unique: header.unique,
                unique: Some(unique),
                opcode,
                credentials,
                tid,
                interrupted: false,
                orphan: false,
                notify,
            },
        );
        state.in_flight.insert(unique, InFlight::Call(call_id));
        let request = request_bytes(opcode, unique, (credentials, tid), &[&body]);
        self.send_to_engine(state, device, request);
    }

    /// OPEN from a connection: the device by name, the mode check, then the engine's OPEN.
    #[allow(clippy::too_many_arguments)]
    fn open(
        &self,
        state: &mut State,
        conn_id: u64,
        header: &InHeader,
        body: &[u8],
        credentials: Credentials,
        tid: u32,
    ) {
        let refuse = |state: &mut State, errno: Errno| {
            if let Some(conn) = state.conns.get(&conn_id) {
                let _ = wire::send(conn.socket.as_fd(), &[&error_reply(header.unique, errno)]);
            }
        };
        let Ok((open_in, name)) = OpenIn::read_from_prefix(body) else {
            return refuse(state, Errno::EINVAL);
        };
        let Some(name) = device_name(name) else {
            return refuse(state, Errno::EINVAL);
        };
        let Some(&device) = state.by_name.get(name) else {
            return refuse(state, Errno::ENOENT);
        };
        let Some(entry) = state.devices.get(&device) else {
            return refuse(state, Errno::ENOENT);
        };
        if !may_open(entry.mode, self.owner, credentials, open_in.flags) {
            return refuse(state, Errno::EACCES);
        }
        // do_dentry_open drops these from f_flags; O_CLOEXEC is the descriptor's, not the
        // file's (fs/open.c, 6.1).
        let flags = open_in.flags
            & !((libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_TRUNC | libc::O_CLOEXEC)
                as u32);
        if let Some(conn) = state.conns.get_mut(&conn_id) {
            conn.credentials = Some(credentials);
            conn.opening = Some(PendingOpen {
                device,
                client_unique: header.unique,
                flags,
                tid,
            });
        }
        // A close(2) of this device's last file returns only after its release: an open
        // that follows it must not overtake that release.
        self.reap_ended_files(state, device);
        let waiting = state
            .devices
            .get(&device)
            .is_some_and(|d| d.releases_in_flight > 0);
        if waiting {
            if let Some(entry) = state.devices.get_mut(&device) {
                entry.deferred_opens.push(conn_id);
            }
            return;
        }
        self.send_open(state, conn_id);
    }

    fn send_open(&self, state: &mut State, conn_id: u64) {
        let Some(conn) = state.conns.get(&conn_id) else {
            return;
        };
        let (Some(open), Some(credentials)) = (conn.opening, conn.credentials) else {
            return;
        };
        let unique = state.unique();
        state.in_flight.insert(unique, InFlight::Open(conn_id));
        let open_in = OpenIn {
            flags: open.flags,
            open_flags: 0,
        };
        let request = request_bytes(
            Opcode::OPEN,
            unique,
            (credentials, open.tid),
            &[open_in.as_bytes()],
        );
        self.send_to_engine(state, open.device, request);
    }

    /// Files of `device` whose last descriptor is already closed but whose end we have not
    /// read yet: release them now (see `open`).
    fn reap_ended_files(&self, state: &mut State, device: u64) {
        let ended: Vec<u64> = state
            .conns
            .iter()
            .filter(|(_, c)| c.file.as_ref().is_some_and(|f| f.device == device) && !c.ended)
            .filter(|(_, c)| peer_gone(&c.socket))
            .map(|(&id, _)| id)
            .collect();
        for id in ended {
            self.on_conn_end(state, id);
        }
    }

    /// LOOKUP: what stat(2) of a device path shows.
    fn lookup(&self, state: &State, unique: u64, body: &[u8]) -> Vec<u8> {
        let Some(name) = device_name(body) else {
            return error_reply(unique, Errno::EINVAL);
        };
        match state
            .by_name
            .get(name)
            .and_then(|id| state.devices.get(id).map(|d| (*id, d)))
        {
            Some((id, entry)) => {
                let out = EntryOut {
                    nodeid: id,
                    attr: self.attr(id, entry),
                    ..EntryOut::default()
                };
                reply_bytes(unique, 0, out.as_bytes())
            }
            None => error_reply(unique, Errno::ENOENT),
        }
    }

    fn attr(&self, id: u64, entry: &DeviceEntry) -> Attr {
        let (secs, nsecs) = entry.registered;
        Attr {
            ino: id,
            mode: libc::S_IFCHR | (entry.mode & 0o7777),
            nlink: 1,
            uid: self.owner.uid,
            gid: self.owner.gid,
            rdev: libc::makedev(MISC_MAJOR, entry.minor) as u32,
            blksize: BLKSIZE,
            atime: secs,
            mtime: secs,
            ctime: secs,
            atimensec: nsecs,
            mtimensec: nsecs,
            ctimensec: nsecs,
            ..Attr::default()
        }
    }

    /// The last descriptor of a connection is closed (or it broke).
    fn on_conn_end(&self, state: &mut State, id: u64) {
        let Some(conn) = state.conns.get_mut(&id) else {
            return;
        };
        conn.ended = true;
        let _ = self.epoll.delete(&conn.socket);
        let release = match &conn.file {
            Some(file) if file.calls == 0 => Some((file.device, file.fh, file.flags)),
            Some(_) => None, // released when its last call ends
            None => {
                // Not a file yet. An OPEN in flight becomes a file whose release follows
                // at once, when its answer comes.
                if conn.opening.is_none() {
                    state.conns.remove(&id);
                }
                return;
            }
        };
        if let Some((device, fh, flags)) = release {
            self.release(state, id, device, fh, flags);
        }
    }

    /// RELEASE, as the kernel's last `fput` sends it; an OPEN of the device waits for it.
    fn release(&self, state: &mut State, conn_id: u64, device: u64, fh: u64, flags: u32) {
        if let Some(watches) = state.watches.remove(&conn_id) {
            for watch in watches {
                if let Some((_, socket)) = state.watch_sockets.remove(&watch) {
                    let _ = self.epoll.delete(&socket);
                }
            }
        }
        state.conns.remove(&conn_id);
        // The releasing task is whoever closed last; the engine does not look.
        let nobody = Credentials {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let unique = state.unique();
        state.in_flight.insert(unique, InFlight::Release(device));
        if let Some(entry) = state.devices.get_mut(&device) {
            entry.releases_in_flight += 1;
        }
        let release_in = ReleaseIn {
            fh,
            flags,
            release_flags: 0,
            lock_owner: 0,
        };
        let request = request_bytes(
            Opcode::RELEASE,
            unique,
            (nobody, 0),
            &[release_in.as_bytes()],
        );
        self.send_to_engine(state, device, request);
    }

    /// Something on a call's socket: an INTERRUPT, an ioctl retry, or the caller's end.
    fn on_call(&self, state: &mut State, id: u64, buf: &mut [u8]) {
        loop {
            let Some(call) = state.calls.get(&id) else {
                return;
            };
            if call.orphan {
                return;
            }
            match wire::receive(call.socket.as_fd(), buf) {
                Ok(Received::Nothing) => return,
                Ok(Received::Message(message)) if !message.truncated => {
                    let bytes = buf[..message.len].to_vec();
                    self.on_call_message(state, id, &bytes, message.credentials);
                }
                Ok(Received::Message(_)) => {
                    log::warn!("preload: an oversized message on a call; ignored");
                }
                Ok(Received::End) | Err(_) => {
                    self.on_caller_gone(state, id);
                    return;
                }
            }
        }
    }

    fn on_call_message(
        &self,
        state: &mut State,
        id: u64,
        bytes: &[u8],
        credentials: Option<Credentials>,
    ) {
        let Some(header) = header_of(bytes).filter(|h| h.len as usize == bytes.len()) else {
            return;
        };
        let body = &bytes[size_of::<InHeader>()..];
        let Some(call) = state.calls.get_mut(&id) else {
            return;
        };
        match Opcode(header.opcode) {
            Opcode::INTERRUPT => {
                if InterruptIn::read_from_prefix(body)
                    .is_ok_and(|(i, _)| i.unique == call.client_unique)
                {
                    self.interrupt(state, id);
                }
            }
            Opcode::IOCTL if call.opcode == Opcode::IOCTL && call.unique.is_none() => {
                // The retry of an unrestricted ioctl, with the buffers the device asked for.
                if credentials.is_some_and(|c| c.pid != call.credentials.pid) {
                    let _ = wire::send(
                        call.socket.as_fd(),
                        &[&error_reply(header.unique, Errno::EPERM)],
                    );
                    return;
                }
                call.client_unique = header.unique;
                let (device, conn, caller) = (call.device, call.conn, (call.credentials, call.tid));
                let fh = state
                    .conns
                    .get(&conn)
                    .and_then(|c| c.file.as_ref())
                    .map_or(0, |f| f.fh);
                match check_body(Opcode::IOCTL, body, fh, conn) {
                    Ok(body) => {
                        let unique = state.unique();
                        if let Some(call) = state.calls.get_mut(&id) {
                            call.unique = Some(unique);
                        }
                        state.in_flight.insert(unique, InFlight::Call(id));
                        let request = request_bytes(Opcode::IOCTL, unique, caller, &[&body]);
                        self.send_to_engine(state, device, request);
                    }
                    Err(errno) => {
                        if let Some(call) = state.calls.get(&id) {
                            let _ = wire::send(
                                call.socket.as_fd(),
                                &[&error_reply(header.unique, errno)],
                            );
                        }
                        self.end_call(state, id);
                    }
                }
            }
            other => log::debug!("preload: {other} on a call socket; ignored"),
        }
    }

    /// The caller got a signal: FUSE_INTERRUPT for the request the engine has.
    fn interrupt(&self, state: &mut State, id: u64) {
        let Some(call) = state.calls.get_mut(&id) else {
            return;
        };
        let Some(unique) = call.unique else {
            return;
        };
        if call.interrupted {
            return;
        }
        call.interrupted = true;
        let (device, caller) = (call.device, (call.credentials, call.tid));
        self.send_interrupt(state, device, unique, caller);
    }

    fn send_interrupt(
        &self,
        state: &mut State,
        device: u64,
        unique: u64,
        caller: (Credentials, u32),
    ) {
        let interrupt = InterruptIn { unique };
        let request = request_bytes(
            Opcode::INTERRUPT,
            unique | FUSE_INT_REQ_BIT,
            caller,
            &[interrupt.as_bytes()],
        );
        self.send_to_engine(state, device, request);
    }

    /// The caller has gone (killed): as `request_wait_answer` does for a fatal signal, the
    /// request is interrupted and its answer, when it comes, dropped.
    fn on_caller_gone(&self, state: &mut State, id: u64) {
        let Some(call) = state.calls.get_mut(&id) else {
            return;
        };
        let _ = self.epoll.delete(&call.socket);
        if call.unique.is_none() {
            // Between an ioctl's retry answer and its retry: nothing in the engine.
            self.end_call(state, id);
            return;
        }
        call.orphan = true;
        self.interrupt(state, id);
    }

    /// A call is over: its socket closes, and its file may now be released.
    fn end_call(&self, state: &mut State, id: u64) {
        let Some(call) = state.calls.remove(&id) else {
            return;
        };
        let _ = self.epoll.delete(&call.socket);
        self.call_left_file(state, call.conn);
    }

    /// One call on the file of connection `conn_id` is over: a file whose last descriptor
    /// closed while calls ran is released after the last of them, as the kernel's `fput`
    /// of the syscall's reference would.
    fn call_left_file(&self, state: &mut State, conn_id: u64) {
        let mut release = None;
        if let Some(conn) = state.conns.get_mut(&conn_id) {
            if let Some(file) = conn.file.as_mut() {
                file.calls = file.calls.saturating_sub(1);
                if file.calls == 0 && conn.ended {
                    release = Some((file.device, file.fh, file.flags));
                }
            }
        }
        if let Some((device, fh, flags)) = release {
            self.release(state, conn_id, device, fh, flags);
        }
    }

    /// Replies and notifications from a device's engine.
    fn on_channel(&self, state: &mut State, device: u64, buf: &mut [u8]) {
        loop {
            let Some(entry) = state.devices.get(&device) else {
                return;
            };
            match wire::receive(entry.channel.as_fd(), buf) {
                Ok(Received::Nothing) => return,
                Ok(Received::Message(message)) => {
                    let bytes = buf[..message.len].to_vec();
                    self.on_engine_message(state, device, &bytes);
                }
                Ok(Received::End) | Err(_) => {
                    log::warn!(
                        "preload: the engine of /dev/{} has stopped",
                        state.devices.get(&device).map_or("?", |d| d.name.as_str())
                    );
                    if let Some(entry) = state.devices.get(&device) {
                        let _ = self.epoll.delete(&entry.channel);
                    }
                    return;
                }
            }
        }
    }

    fn on_engine_message(&self, state: &mut State, device: u64, bytes: &[u8]) {
        let Ok((header, body)) = OutHeader::read_from_prefix(bytes) else {
            return;
        };
        if header.unique == 0 {
            if header.error == FUSE_NOTIFY_POLL {
                if let Ok((kh, _)) = u64::read_from_prefix(body) {
                    self.notify_pollers(state, kh);
                }
            }
            return;
        }
        if header.unique & FUSE_INT_REQ_BIT != 0 {
            // An interrupt the engine could not place yet: the kernel queues it again.
            let original = header.unique & !FUSE_INT_REQ_BIT;
            if header.error == -(Errno::EAGAIN as i32) {
                if let Some(InFlight::Call(id)) = state.in_flight.get(&original) {
                    if let Some(call) = state.calls.get(id) {
                        let caller = (call.credentials, call.tid);
                        self.send_interrupt(state, device, original, caller);
                    }
                }
            }
            return;
        }
        match state.in_flight.remove(&header.unique) {
            Some(InFlight::Open(conn_id)) => self.on_open_reply(state, conn_id, &header, body),
            Some(InFlight::Release(device)) => {
                if let Some(entry) = state.devices.get_mut(&device) {
                    entry.open_files = entry.open_files.saturating_sub(1);
                    entry.releases_in_flight = entry.releases_in_flight.saturating_sub(1);
                    if entry.releases_in_flight == 0 {
                        let deferred = std::mem::take(&mut entry.deferred_opens);
                        for conn_id in deferred {
                            self.send_open(state, conn_id);
                        }
                    }
                }
                self.retire_if_unused(state, device);
            }
            Some(InFlight::Call(id)) => self.on_call_reply(state, id, &header, body),
            None => log::debug!(
                "preload: an answer to unknown request {}; dropped",
                header.unique
            ),
        }
    }

    fn on_open_reply(&self, state: &mut State, conn_id: u64, header: &OutHeader, body: &[u8]) {
        let Some(conn) = state.conns.get_mut(&conn_id) else {
            return;
        };
        let Some(open) = conn.opening.take() else {
            return;
        };
        let fh = crate::fuse::abi::OpenOut::read_from_prefix(body).map(|(o, _)| o.fh);
        match (header.error, fh) {
            (0, Ok(fh)) => {
                conn.file = Some(File {
                    device: open.device,
                    fh,
                    flags: open.flags,
                    calls: 0,
                });
                let _ = wire::send(
                    conn.socket.as_fd(),
                    &[&reply_bytes(open.client_unique, 0, body)],
                );
                if let Some(entry) = state.devices.get_mut(&open.device) {
                    entry.open_files += 1;
                }
                let ended = conn.ended || peer_gone(&conn.socket);
                if ended {
                    // The opener went away while its open ran: the kernel would release
                    // the file it had just made.
                    self.on_conn_end(state, conn_id);
                }
            }
            (error, _) => {
                let error = if error < 0 {
                    error
                } else {
                    -(Errno::EIO as i32)
                };
                let _ = wire::send(
                    conn.socket.as_fd(),
                    &[&reply_bytes(open.client_unique, error, &[])],
                );
                if conn.ended {
                    state.conns.remove(&conn_id);
                }
            }
        }
    }

    fn on_call_reply(&self, state: &mut State, id: u64, header: &OutHeader, body: &[u8]) {
        let Some(call) = state.calls.get_mut(&id) else {
            return;
        };
        call.unique = None;
        call.interrupted = false;
        if call.orphan {
            self.end_call(state, id);
            return;
        }
        let reply = reply_bytes(call.client_unique, header.error, body);
        if let Err(errno) = wire::send(call.socket.as_fd(), &[&reply]) {
            log::debug!("preload: an answer could not reach its caller: {errno}");
        }
        let retry = call.opcode == Opcode::IOCTL
            && header.error == 0
            && IoctlOut::read_from_prefix(body)
                .is_ok_and(|(o, _)| o.flags & ioctl_flags::RETRY != 0);
        if retry {
            return; // the call goes on with the retry
        }
        if call.opcode == Opcode::POLL && call.notify && header.error == 0 {
            // The caller waits for a change: its socket becomes a registration.
            let Some(call) = state.calls.remove(&id) else {
                return;
            };
            let _ = self.epoll.delete(&call.socket);
            let watch = state.id();
            if self
                .epoll
                .add(
                    &call.socket,
                    EpollEvent::new(EpollFlags::EPOLLRDHUP, WATCH | watch),
                )
                .is_ok()
            {
                state.watches.entry(call.conn).or_default().push(watch);
                state.watch_sockets.insert(watch, (call.conn, call.socket));
            }
            self.call_left_file(state, call.conn);
            return;
        }
        self.end_call(state, id);
    }

    /// FUSE_NOTIFY_POLL for file `kh`: every poller of it polls again.
    fn notify_pollers(&self, state: &mut State, kh: u64) {
        let Some(watches) = state.watches.remove(&kh) else {
            return;
        };
        let wakeup = reply_bytes(0, FUSE_NOTIFY_POLL, &kh.to_ne_bytes());
        for watch in watches {
            if let Some((_, socket)) = state.watch_sockets.remove(&watch) {
                let _ = self.epoll.delete(&socket);
                let _ = wire::send(socket.as_fd(), &[&wakeup]);
            }
        }
    }

    /// A poller went away without being woken.
    fn drop_watch(&self, state: &mut State, watch: u64) {
        if let Some((conn, socket)) = state.watch_sockets.remove(&watch) {
            let _ = self.epoll.delete(&socket);
            if let Some(list) = state.watches.get_mut(&conn) {
                list.retain(|&w| w != watch);
            }
        }
    }

    fn send_to_engine(&self, state: &mut State, device: u64, request: Vec<u8>) {
        let Some(entry) = state.devices.get_mut(&device) else {
            return;
        };
        if entry.outbox.is_empty() {
            match wire::send(entry.channel.as_fd(), &[&request]) {
                Ok(()) => return,
                Err(Errno::EAGAIN) => {}
                Err(errno) => {
                    log::warn!(
                        "preload: /dev/{}: the engine cannot take a request: {errno}",
                        entry.name
                    );
                    return;
                }
            }
        }
        entry.outbox.push_back(request);
        let _ = self.epoll.modify(
            &entry.channel,
            &mut EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT, CHANNEL | device),
        );
    }

    fn flush_outbox(&self, state: &mut State, device: u64) {
        let Some(entry) = state.devices.get_mut(&device) else {
            return;
        };
        while let Some(request) = entry.outbox.front() {
            match wire::send(entry.channel.as_fd(), &[request]) {
                Ok(()) => {
                    entry.outbox.pop_front();
                }
                Err(Errno::EAGAIN) => return,
                Err(_) => {
                    entry.outbox.clear();
                }
            }
        }
        let _ = self.epoll.modify(
            &entry.channel,
            &mut EpollEvent::new(EpollFlags::EPOLLIN, CHANNEL | device),
        );
    }

    /// A removed device whose last file is released: its session can go.
    fn retire_if_unused(&self, state: &mut State, device: u64) {
        let unused = state
            .devices
            .get(&device)
            .is_some_and(|d| d.removed && d.open_files == 0 && d.releases_in_flight == 0);
        if !unused {
            return;
        }
        if let Some(mut entry) = state.devices.remove(&device) {
            let _ = self.epoll.delete(&entry.channel);
            if let Some(session) = entry.session.take() {
                let _ = self.retired.send(session);
            }
        }
    }
}

/// Whether the other end of a connected socket is closed everywhere.
fn peer_gone(socket: &OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(socket.as_fd(), PollFlags::empty())];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(1))
        && fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP))
}

/// The device name a request carries: NUL-terminated UTF-8.
fn device_name(body: &[u8]) -> Option<&str> {
    let end = body.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&body[..end])
        .ok()
        .filter(|n| !n.is_empty())
}

/// Checks a file request's body against what the kernel would send, and puts in our `fh`
/// (and, for POLL, our `kh`: the file's connection id).
fn check_body(opcode: Opcode, body: &[u8], fh: u64, kh: u64) -> Result<Vec<u8>, Errno> {
    let mut body = body.to_vec();
    match opcode {
        Opcode::READ => {
            let (mut read_in, rest) = ReadIn::read_from_prefix(&body).map_err(|_| Errno::EINVAL)?;
            if !rest.is_empty() || read_in.size > CUSE_MAX_IO {
                return Err(Errno::EINVAL);
            }
            read_in.fh = fh;
            read_in.offset = 0;
            body = read_in.as_bytes().to_vec();
        }
        Opcode::WRITE => {
            let (mut write_in, rest) =
                WriteIn::read_from_prefix(&body).map_err(|_| Errno::EINVAL)?;
            if rest.len() != write_in.size as usize || write_in.size > CUSE_MAX_IO {
                return Err(Errno::EINVAL);
            }
            write_in.fh = fh;
            write_in.offset = 0;
            body[..size_of::<WriteIn>()].copy_from_slice(write_in.as_bytes());
        }
        Opcode::IOCTL => {
            let (mut ioctl_in, rest) =
                IoctlIn::read_from_prefix(&body).map_err(|_| Errno::EINVAL)?;
            if rest.len() != ioctl_in.in_size as usize
                || ioctl_in.in_size > IOCTL_MAX_BYTES
                || ioctl_in.out_size > IOCTL_MAX_BYTES
            {
                return Err(Errno::EINVAL);
            }
            ioctl_in.fh = fh;
            // CUSE's ioctls are always unrestricted; a 32-bit caller says COMPAT.
            ioctl_in.flags = ioctl_flags::UNRESTRICTED | (ioctl_in.flags & ioctl_flags::COMPAT);
            body[..size_of::<IoctlIn>()].copy_from_slice(ioctl_in.as_bytes());
        }
        Opcode::POLL => {
            let (mut poll_in, rest) = PollIn::read_from_prefix(&body).map_err(|_| Errno::EINVAL)?;
            if !rest.is_empty() {
                return Err(Errno::EINVAL);
            }
            poll_in.fh = fh;
            poll_in.kh = kh;
            poll_in.flags &= FUSE_POLL_SCHEDULE_NOTIFY;
            body = poll_in.as_bytes().to_vec();
        }
        _ => return Err(Errno::ENOSYS),
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: Owner = Owner {
        uid: 1000,
        gid: 1000,
    };

    fn who(uid: u32, gid: u32) -> Credentials {
        Credentials { pid: 1, uid, gid }
    }

    #[test]
    fn may_open_follows_the_mode_bits() {
        let rdwr = libc::O_RDWR as u32;
        assert!(may_open(0o600, OWNER, who(1000, 1000), rdwr));
        assert!(!may_open(0o600, OWNER, who(1001, 1000), rdwr));
        assert!(
            may_open(0o600, OWNER, who(0, 0), rdwr),
            "root opens anything"
        );
        assert!(!may_open(0o640, OWNER, who(1001, 1000), rdwr));
        assert!(may_open(
            0o640,
            OWNER,
            who(1001, 1000),
            libc::O_RDONLY as u32
        ));
        assert!(may_open(0o602, OWNER, who(7, 7), libc::O_WRONLY as u32));
    }

    #[test]
    fn a_claimed_thread_of_another_process_is_not_believed() {
        let me = std::process::id();
        let creds = Credentials {
            pid: me,
            uid: 0,
            gid: 0,
        };
        assert_eq!(caller_tid(creds, me), me);
        assert_eq!(caller_tid(creds, 0), me);
        // pid 1 is never one of our threads.
        assert_eq!(caller_tid(creds, 1), me);
        let tid = nix::unistd::gettid().as_raw() as u32;
        assert_eq!(caller_tid(creds, tid), tid);
    }

    #[test]
    fn check_body_puts_in_our_handles_and_refuses_what_the_kernel_never_sends() {
        let read_in = ReadIn {
            fh: 99,
            offset: 5,
            size: 10,
            ..ReadIn::default()
        };
        let body = check_body(Opcode::READ, read_in.as_bytes(), 7, 3).unwrap();
        let (checked, _) = ReadIn::read_from_prefix(&body).unwrap();
        assert_eq!((checked.fh, checked.offset, checked.size), (7, 0, 10));
        let too_big = ReadIn {
            size: CUSE_MAX_IO + 1,
            ..ReadIn::default()
        };
        assert_eq!(
            check_body(Opcode::READ, too_big.as_bytes(), 7, 3),
            Err(Errno::EINVAL)
        );
        let write_in = WriteIn {
            size: 4,
            ..WriteIn::default()
        };
        let mut short = write_in.as_bytes().to_vec();
        short.extend_from_slice(&[1, 2, 3]);
        assert_eq!(check_body(Opcode::WRITE, &short, 7, 3), Err(Errno::EINVAL));
        let ioctl_in = IoctlIn {
            flags: ioctl_flags::RETRY | ioctl_flags::COMPAT,
            ..IoctlIn::default()
        };
        let body = check_body(Opcode::IOCTL, ioctl_in.as_bytes(), 7, 3).unwrap();
        let (checked, _) = IoctlIn::read_from_prefix(&body).unwrap();
        assert_eq!(
            checked.flags,
            ioctl_flags::UNRESTRICTED | ioctl_flags::COMPAT
        );
        let poll_in = PollIn {
            flags: 0xff,
            ..PollIn::default()
        };
        let body = check_body(Opcode::POLL, poll_in.as_bytes(), 7, 3).unwrap();
        let (checked, _) = PollIn::read_from_prefix(&body).unwrap();
        assert_eq!(
            (checked.fh, checked.kh, checked.flags),
            (7, 3, FUSE_POLL_SCHEDULE_NOTIFY)
        );
        assert_eq!(check_body(Opcode::FLUSH, &[], 7, 3), Err(Errno::ENOSYS));
    }

    #[test]
    fn device_names_are_nul_terminated_utf8() {
        assert_eq!(device_name(b"vmbus/hv_fcopy\0"), Some("vmbus/hv_fcopy"));
        assert_eq!(device_name(b"no terminator"), None);
        assert_eq!(device_name(b"\0"), None);
        assert_eq!(device_name(b"\xff\0"), None);
    }
}
