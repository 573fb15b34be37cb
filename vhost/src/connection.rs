//! One vsock stream connection between the guest and a host-side Unix socket: its state,
//! both directions' credit accounting and the bytes in flight. Pure logic — no sockets, no
//! queues — so every rule below is unit-tested directly; [`crate::muxer`] does the I/O.
//!
//! Credit (virtio spec 1.2 §5.10.6.3 "Flow Control"): each side advertises `buf_alloc` (its
//! receive buffer) and `fwd_cnt` (bytes it has consumed from that buffer, wrapping u32) in
//! every header. A sender may have at most `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes
//! outstanding. Here "consumed" means "written to the host socket", so the buffer we advertise
//! is exactly [`Connection::to_host`]'s capacity and a guest that sends more than it was
//! allowed is detected precisely (an overrun), instead of growing a buffer.
//!
//! Close (spec §5.10.6.5, Linux net/vmw_vsock/virtio_transport_common.c): SHUTDOWN carries
//! RCV/SEND bits; once both directions are finished the connection is reset (RST) and its port
//! freed. Linux answers a peer's full SHUTDOWN with RST once its receive queue is drained
//! (`virtio_transport_recv_connected`); we do the same once the bytes reached the host socket.

use std::collections::VecDeque;
use std::num::Wrapping;

use crate::packet::{Header, Op, HOST_CID, MAX_PKT_DATA, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Receive buffer we advertise per connection (bytes from the guest not yet written to the
/// host socket).
pub const DEFAULT_BUF_ALLOC: u32 = 256 * 1024;

/// Most bytes read from the host socket that may wait for an RX buffer. Reading stops at this
/// point (and at the guest's credit), which is what back-pressures the host socket.
pub const MAX_TO_GUEST: usize = MAX_PKT_DATA;

/// Connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE.
    Connecting,
    /// Data may flow (subject to the shutdown bits).
    Established,
}

/// What the caller must do after [`Connection::on_guest_packet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing beyond the usual bookkeeping (flush, reschedule).
    Keep,
    /// The guest accepted our (host-initiated) REQUEST.
    Established,
    /// The guest reset the connection: close the host socket, send nothing.
    PeerReset,
    /// Protocol violation: send RST, close the host socket.
    Reset(ResetReason),
    /// The packet makes no sense in this state; it was dropped (Linux drops these too).
    Ignored(&'static str),
}

/// Why we reset a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// The guest sent more payload than the credit we granted.
    Overrun {
        /// Bytes already buffered.
        buffered: usize,
        /// Bytes in the offending packet.
        len: usize,
        /// Our advertised buffer.
        buf_alloc: u32,
    },
    /// An op that is not allowed while connecting.
    Unexpected(&'static str),
}

impl std::fmt::Display for ResetReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResetReason::Overrun {
                buffered,
                len,
                buf_alloc,
            } => write!(
                f,
                "guest overran its credit: {len} bytes on top of {buffered} buffered, buf_alloc {buf_alloc}"
            ),
            ResetReason::Unexpected(what) => f.write_str(what),
        }
    }
}

/// One connection. `local_port` is the host-side (CID 2) port, `peer_port` the guest's.
#[derive(Debug)]
pub struct Connection {
    local_port: u32,
    peer_port: u32,
    guest_cid: u64,
    state: State,

    // Our receive side (guest → host).
    buf_alloc: u32,
    /// Bytes the guest sent us, ever.
    rx_cnt: Wrapping<u32>,
    /// Bytes written to the host socket, ever: what we advertise as `fwd_cnt`.
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` in the last header we emitted.
    last_adv_fwd_cnt: Wrapping<u32>,
    to_host: VecDeque<u8>,

    // The guest's receive side (host → guest).
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Payload bytes we put on RX, ever.
    tx_cnt: Wrapping<u32>,
    to_guest: VecDeque<u8>,

    // Shutdown bits.
    peer_shut_rcv: bool,
    peer_shut_send: bool,
    host_eof: bool,
    shutdown_sent: bool,
    host_write_shut: bool,

    // Control packets owed to the guest.
    need_request: bool,
    need_response: bool,
    need_credit_update: bool,
    need_credit_request: bool,
    credit_request_outstanding: bool,
}

impl Connection {
    fn blank(
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
        buf_alloc: u32,
        state: State,
    ) -> Self {
        Connection {
            local_port,
            peer_port,
            guest_cid,
            state,
            buf_alloc,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_adv_fwd_cnt: Wrapping(0),
            to_host: VecDeque::new(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            to_guest: VecDeque::new(),
            peer_shut_rcv: false,
            peer_shut_send: false,
            host_eof: false,
            shutdown_sent: false,
            host_write_shut: false,
            need_request: false,
            need_response: false,
            need_credit_update: false,
            need_credit_request: false,
            credit_request_outstanding: false,
        }
    }

    /// A connection the guest asked for with `request` (already routed to a host socket):
    /// established at once, RESPONSE owed.
    pub fn accept_guest_request(request: &Header, buf_alloc: u32) -> Self {
        let mut conn = Connection::blank(
            request.dst_port,
            request.src_port,
            request.src_cid,
            buf_alloc,
            State::Established,
        );
        conn.update_peer_credit(request);
        conn.need_response = true;
        conn
    }

    /// A connection a host client asked for: REQUEST owed, waiting for RESPONSE.
    pub fn connect_to_guest(
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
        buf_alloc: u32,
    ) -> Self {
        let mut conn = Connection::blank(
            local_port,
            peer_port,
            guest_cid,
            buf_alloc,
            State::Connecting,
        );
        conn.need_request = true;
        conn
    }

    /// Host-side port.
    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    /// Guest-side port.
    pub fn peer_port(&self) -> u32 {
        self.peer_port
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Bytes we may still send to the guest: `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`.
    /// Saturating, so a guest claiming to have consumed more than we sent gets no credit
    /// rather than 4 GiB of it.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Our `fwd_cnt`: bytes written to the host socket.
    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt.0
    }

    /// Payload bytes sent to the guest.
    pub fn tx_cnt(&self) -> u32 {
        self.tx_cnt.0
    }

    fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_request_outstanding = false;
        }
    }

    /// Account for a packet from the guest addressed to this connection (addresses, type and
    /// chain shape were validated by the caller). Every header refreshes the peer's credit
    /// (Linux `virtio_transport_space_update` runs for every received packet).
    pub fn on_guest_packet(&mut self, hdr: &Header, data: &[u8]) -> Verdict {
        self.update_peer_credit(hdr);
        let Some(op) = hdr.op() else {
            return match self.state {
                State::Connecting => {
                    Verdict::Reset(ResetReason::Unexpected("unknown op while connecting"))
                }
                State::Established => Verdict::Ignored("unknown op"),
            };
        };
        if op == Op::Rst {
            return Verdict::PeerReset;
        }
        match self.state {
            // Linux virtio_transport_recv_connecting: anything but RESPONSE/RST destroys the
            // socket with a reset.
            State::Connecting => match op {
                Op::Response => {
                    self.state = State::Established;
                    self.need_request = false;
                    Verdict::Established
                }
                _ => Verdict::Reset(ResetReason::Unexpected(
                    "op other than RESPONSE while connecting",
                )),
            },
            State::Established => match op {
                Op::Rw => self.on_guest_payload(data),
                Op::CreditUpdate => Verdict::Keep,
                Op::CreditRequest => {
                    self.need_credit_update = true;
                    Verdict::Keep
                }
                Op::Shutdown => {
                    if hdr.flags & SHUTDOWN_RCV != 0 {
                        self.peer_shut_rcv = true;
                        // Nobody will read these; Linux fails further sends with EPIPE.
                        self.to_guest.clear();
                        self.need_credit_request = false;
                    }
                    if hdr.flags & SHUTDOWN_SEND != 0 {
                        self.peer_shut_send = true;
                    }
                    Verdict::Keep
                }
                Op::Request => Verdict::Ignored("REQUEST on an existing connection"),
                Op::Response => Verdict::Ignored("RESPONSE on an established connection"),
                Op::Rst => Verdict::PeerReset,
            },
        }
    }

    fn on_guest_payload(&mut self, data: &[u8]) -> Verdict {
        if self.peer_shut_send {
            return Verdict::Ignored("payload after SHUTDOWN(SEND)");
        }
        // What is buffered is exactly what the guest has sent but we have not forwarded
        // (rx_cnt - fwd_cnt); the guest may never exceed buf_alloc of it.
        if self.to_host.len() + data.len() > self.buf_alloc as usize {
            return Verdict::Reset(ResetReason::Overrun {
                buffered: self.to_host.len(),
                len: data.len(),
                buf_alloc: self.buf_alloc,
            });
        }
        self.to_host.extend(data);
        // data.len() <= MAX_PKT_DATA, so this fits u32.
        self.rx_cnt += Wrapping(data.len() as u32);
        Verdict::Keep
    }

    /// Bytes the host socket may be read for right now: bounded by the guest's credit and by
    /// [`MAX_TO_GUEST`], minus what already waits for RX. Zero means "stop reading".
    pub fn host_read_budget(&self) -> usize {
        if self.state != State::Established || self.host_eof || self.peer_shut_rcv {
            return 0;
        }
        let credit = self.peer_credit() as usize;
        credit
            .saturating_sub(self.to_guest.len())
            .min(MAX_TO_GUEST.saturating_sub(self.to_guest.len()))
    }

    /// Bytes read from the host socket (at most [`Self::host_read_budget`]).
    pub fn on_host_data(&mut self, bytes: &[u8]) {
        self.to_guest.extend(bytes);
    }

    /// Bytes that arrived with the `CONNECT` line before the connection exists; sent once the
    /// guest accepts. Bounded by the caller's line limit.
    pub fn preload_to_guest(&mut self, bytes: &[u8]) {
        self.to_guest.extend(bytes);
    }

    /// The host socket reached end-of-file: SHUTDOWN(SEND) is owed once `to_guest` drains.
    pub fn on_host_eof(&mut self) {
        self.host_eof = true;
    }

    /// Whether the host side reached EOF.
    pub fn host_eof(&self) -> bool {
        self.host_eof
    }

    /// The next contiguous run of bytes waiting for the host socket.
    pub fn to_host_front(&self) -> &[u8] {
        self.to_host.as_slices().0
    }

    /// Bytes waiting for the host socket.
    pub fn to_host_len(&self) -> usize {
        self.to_host.len()
    }

    /// `n` bytes of [`Self::to_host_front`] were written to the host socket. Frees credit, and
    /// owes a CREDIT_UPDATE once a quarter of our buffer was freed since we last told the guest
    /// (without it a guest that only sends would stall on a stale `fwd_cnt`).
    pub fn on_host_written(&mut self, n: usize) {
        let n = n.min(self.to_host.len());
        self.to_host.drain(..n);
        // n <= buf_alloc <= u32::MAX.
        self.fwd_cnt += Wrapping(n as u32);
        let unadvertised = (self.fwd_cnt - self.last_adv_fwd_cnt).0;
        if unadvertised >= (self.buf_alloc / 4).max(1) {
            self.need_credit_update = true;
        }
    }

    /// The guest will send nothing more and everything it sent was written: time for
    /// `shutdown(Write)` on the host socket.
    pub fn wants_host_write_shutdown(&self) -> bool {
        self.peer_shut_send && self.to_host.is_empty() && !self.host_write_shut
    }

    /// The caller shut the host socket's write side.
    pub fn on_host_write_shutdown(&mut self) {
        self.host_write_shut = true;
    }

    /// Both directions are finished: the guest→host stream was SHUTDOWN(SEND) and written
    /// out, and the host→guest stream either reached EOF and was delivered with a
    /// SHUTDOWN(SEND) or the guest will not receive anymore. The caller resets and frees it.
    pub fn is_finished(&self) -> bool {
        let inbound_done = self.peer_shut_send && self.to_host.is_empty();
        let outbound_done = self.peer_shut_rcv || (self.host_eof && self.shutdown_sent);
        self.state == State::Established && inbound_done && outbound_done
    }

    /// Whether [`Self::next_packet`] has something to put on RX (given room for payload).
    pub fn wants_rx(&self) -> bool {
        self.need_request
            || self.need_response
            || self.need_credit_update
            || self.need_credit_request
            || self.wants_to_send_data()
            || self.wants_to_send_shutdown()
    }

    fn wants_to_send_data(&self) -> bool {
        self.state == State::Established
            && !self.peer_shut_rcv
            && !self.to_guest.is_empty()
            && self.peer_credit() > 0
    }

    fn wants_to_send_shutdown(&self) -> bool {
        self.state == State::Established
            && self.host_eof
            && self.to_guest.is_empty()
            && !self.shutdown_sent
    }

    fn header(&mut self, op: Op, flags: u32, len: usize) -> Header {
        // Every header carries our credit, so it doubles as a credit update.
        self.last_adv_fwd_cnt = self.fwd_cnt;
        self.need_credit_update = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            // len <= MAX_PKT_DATA.
            len: len as u32,
            type_: TYPE_STREAM,
            op: op.to_u16(),
            flags,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest, with at most `payload_room` payload bytes. Order:
    /// REQUEST/RESPONSE first, then payload (within the guest's credit), then SHUTDOWN once the
    /// payload drained, then pure credit messages.
    pub fn next_packet(&mut self, payload_room: usize) -> Option<(Header, Vec<u8>)> {
        if self.need_request && self.state == State::Connecting {
            self.need_request = false;
            return Some((self.header(Op::Request, 0, 0), Vec::new()));
        }
        if self.need_response {
            self.need_response = false;
            return Some((self.header(Op::Response, 0, 0), Vec::new()));
        }
        if self.wants_to_send_data() && payload_room > 0 {
            let n = self
                .to_guest
                .len()
                .min(self.peer_credit() as usize)
                .min(payload_room)
                .min(MAX_PKT_DATA);
            let data: Vec<u8> = self.to_guest.drain(..n).collect();
            // n <= MAX_PKT_DATA.
            self.tx_cnt += Wrapping(n as u32);
            if self.peer_credit() == 0 && !self.credit_request_outstanding {
                // Window exhausted: stop reading the host socket (host_read_budget is now 0)
                // and ask the guest to tell us when it has room.
                self.need_credit_request = true;
            }
            return Some((self.header(Op::Rw, 0, n), data));
        }
        if self.wants_to_send_shutdown() {
            self.shutdown_sent = true;
            self.need_credit_request = false;
            return Some((self.header(Op::Shutdown, SHUTDOWN_SEND, 0), Vec::new()));
        }
        if self.need_credit_update {
            return Some((self.header(Op::CreditUpdate, 0, 0), Vec::new()));
        }
        if self.need_credit_request {
            self.need_credit_request = false;
            if self.peer_credit() == 0 {
                self.credit_request_outstanding = true;
                return Some((self.header(Op::CreditRequest, 0, 0), Vec::new()));
            }
        }
        None
    }

    /// The RST that ends this connection.
    pub fn rst_header(&self) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op: Op::Rst.to_u16(),
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: u64 = 3;

    fn guest_hdr(op: Op, len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: 40000,
            dst_port: 5000,
            len,
            type_: TYPE_STREAM,
            op: op.to_u16(),
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn established(buf_alloc: u32, peer_buf_alloc: u32) -> Connection {
        let mut conn = Connection::accept_guest_request(
            &guest_hdr(Op::Request, 0, peer_buf_alloc, 0),
            buf_alloc,
        );
        let (resp, _) = conn.next_packet(0).unwrap();
        assert_eq!(resp.op(), Some(Op::Response));
        conn
    }

    fn drain(conn: &mut Connection, room: usize) -> Vec<(Header, Vec<u8>)> {
        std::iter::from_fn(|| conn.next_packet(room)).collect()
    }

    #[test]
    fn guest_request_is_answered_with_response_carrying_our_credit() {
        let mut conn = Connection::accept_guest_request(
            &guest_hdr(Op::Request, 0, 4096, 0),
            DEFAULT_BUF_ALLOC,
        );
        assert_eq!((conn.local_port(), conn.peer_port()), (5000, 40000));
        assert!(conn.wants_rx());
        let (hdr, data) = conn.next_packet(4096).unwrap();
        assert!(data.is_empty());
        assert_eq!(hdr.op(), Some(Op::Response));
        assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, GUEST));
        assert_eq!((hdr.src_port, hdr.dst_port), (5000, 40000));
        assert_eq!(hdr.buf_alloc, DEFAULT_BUF_ALLOC);
        assert_eq!(hdr.fwd_cnt, 0);
        assert!(!conn.wants_rx());
        assert_eq!(conn.next_packet(4096), None);
    }

    #[test]
    fn sending_stops_exactly_at_the_peer_window() {
        let mut conn = established(DEFAULT_BUF_ALLOC, 1000);
        assert_eq!(conn.host_read_budget(), 1000);
        conn.on_host_data(&[7u8; 1000]);
        assert_eq!(
            conn.host_read_budget(),
            0,
            "window full: stop reading the host"
        );
        let (hdr, data) = conn.next_packet(600).unwrap();
        assert_eq!((hdr.op(), hdr.len, data.len()), (Some(Op::Rw), 600, 600));
        let (hdr, data) = conn.next_packet(600).unwrap();
        assert_eq!((hdr.op(), data.len()), (Some(Op::Rw), 400));
        assert_eq!(conn.peer_credit(), 0);
        assert_eq!(conn.tx_cnt(), 1000);
        // Credit exhausted: a CREDIT_REQUEST follows, exactly once.
        let (hdr, _) = conn.next_packet(600).unwrap();
        assert_eq!(hdr.op(), Some(Op::CreditRequest));
        assert_eq!(conn.next_packet(600), None);
        assert_eq!(conn.host_read_budget(), 0);

        // The guest consumed 300 bytes: exactly 300 more may go.
        assert_eq!(
            conn.on_guest_packet(&guest_hdr(Op::CreditUpdate, 0, 1000, 300), &[]),
            Verdict::Keep
        );
        assert_eq!(conn.peer_credit(), 300);
        assert_eq!(conn.host_read_budget(), 300);
        conn.on_host_data(&[8u8; 300]);
        let (hdr, data) = conn.next_packet(4096).unwrap();
        assert_eq!((hdr.op(), data.len()), (Some(Op::Rw), 300));
        assert_eq!(conn.peer_credit(), 0);
    }

    #[test]
    fn data_beyond_credit_waits_in_to_guest() {
        let mut conn = established(DEFAULT_BUF_ALLOC, 100);
        // Simulate bytes that arrived before the credit shrank (e.g. the CONNECT leftover).
        conn.preload_to_guest(&[1u8; 250]);
        let (_, data) = conn.next_packet(4096).unwrap();
        assert_eq!(data.len(), 100);
        let (hdr, _) = conn.next_packet(4096).unwrap();
        assert_eq!(hdr.op(), Some(Op::CreditRequest));
        assert_eq!(conn.next_packet(4096), None, "no RW without credit");
        conn.on_guest_packet(&guest_hdr(Op::CreditUpdate, 0, 100, 100), &[]);
        let (_, data) = conn.next_packet(4096).unwrap();
        assert_eq!(data.len(), 100);
    }

    #[test]
    fn lying_peer_fwd_cnt_gives_no_credit() {
        let mut conn = established(DEFAULT_BUF_ALLOC, 1000);
        conn.on_guest_packet(&guest_hdr(Op::CreditUpdate, 0, 1000, 5), &[]);
        assert_eq!(conn.peer_credit(), 0);
        assert_eq!(conn.host_read_budget(), 0);
    }

    #[test]
    fn credit_accounting_wraps_around_u32() {
        let mut conn = established(DEFAULT_BUF_ALLOC, 1000);
        conn.tx_cnt = Wrapping(u32::MAX - 10);
        conn.peer_fwd_cnt = Wrapping(u32::MAX - 10);
        assert_eq!(conn.peer_credit(), 1000);
        conn.on_host_data(&[0u8; 100]);
        let (_, data) = conn.next_packet(4096).unwrap();
        assert_eq!(data.len(), 100);
        assert_eq!(conn.tx_cnt(), 89);
        assert_eq!(conn.peer_credit(), 900);
    }

    #[test]
    fn credit_request_is_answered_with_credit_update() {
        let mut conn = established(DEFAULT_BUF_ALLOC, 4096);
        assert_eq!(
            conn.on_guest_packet(&guest_hdr(Op::Rw, 10, 4096, 0), &[1u8; 10]),
            Verdict::Keep
        );
        conn.on_host_written(10);
        assert_eq!(
            conn.next_packet(4096),
            None,
            "10 bytes freed is not worth an update"
        );
        conn.on_guest_packet(&guest_hdr(Op::CreditRequest, 0, 4096, 0), &[]);
        let (hdr, _) = conn.next_packet(4096).unwrap();
        assert_eq!(hdr.op(), Some(Op::CreditUpdate));
        assert_eq!(hdr.buf_alloc, DEFAULT_BUF_ALLOC);
        assert_eq!(hdr.fwd_cnt, 10);
        assert_eq!(conn.next_packet(4096), None);
    }

    #[test]
    fn freeing_a_quarter_of_the_buffer_sends_an_unsolicited_credit_update() {
        let mut conn = established(4000, 4096);
        conn.on_guest_packet(&guest_hdr(Op::Rw, 999, 4096, 0), &[0u8; 999]);
        conn.on_host_written(999);
        assert!(!conn.wants_rx());
        conn.on_guest_packet(&guest_hdr(Op::Rw, 1, 4096, 0), &[0u8; 1]);
        conn.on_host_written(1);
        let (hdr, _) = conn.next_packet(4096).unwrap();
        assert_eq!((hdr.op(), hdr.fwd_cnt), (Some(Op::CreditUpdate), 1000));
    }

    #[test]
    fn any_packet_we_send_carries_fwd_cnt_and_clears_a_pending_update() {
        let mut conn = established(4000, 4096);
        conn.on_guest_packet(&guest_hdr(Op::Rw, 1000, 4096, 0), &[0u8; 1000]);
        conn.on_host_written(1000);
        conn.on_host_data(b"reply");
        let (hdr, data) = conn.next_packet(4096).unwrap();
        assert_eq!(
            (hdr.op(), hdr.fwd_cnt, data.as_slice()),
            (Some(Op::Rw), 1000, &b"reply"[..])
        );
        assert_eq!(conn.next_packet(4096), None);
    }

    #[test]
    fn overrun_is_detected_exactly_at_buf_alloc() {
        let mut conn = established(1000, 4096);
        assert_eq!(
            conn.on_guest_packet(&guest_hdr(Op::Rw, 600, 4096, 0), &[0u8; 600]),
            Verdict::Keep
        );
        assert_eq!(
            conn.on_guest_packet(&guest_hdr(Op::Rw, 400, 4096, 0), &[0u8; 400]),
            Verdict::Keep,
            "exactly buf_alloc is allowed"
        );
        assert_eq!(
            conn.on_guest_packet(&guest_hdr(Op::Rw, 1, 4096, 0), &[0u8; 1]),
            Verdict::Reset(ResetReason::Overrun {
                buffered: 1000,
                len: 1,
                buf_alloc: 1000
            })
        );
        // Once written out, the room comes back.
        let mut conn = established(1000, 4096);
        conn.on_guest_packet(&guest_hdr(Op::Rw, 1000, 4096, 0), &[0u8; 1000]);
        conn.on_host_written(400);
        assert_eq!(
            conn.on_guest_packet(&guest_hdr(Op::Rw, 400, 4096, 0), &[0u8; 400]),
            Verdict::Keep
        );
        assert_eq!(conn.to_host_len(), 1000);
    }

    #[test]
    fn guest_bytes_reach_to_host_in_order() {
        let mut conn = established(DEFAULT_BUF_ALLOC, 4096);
        conn.on_guest_packet(&guest_hdr(Op::Rw, 5, 4096, 0), b"hello");
        conn.on_guest_packet(&guest_hdr(Op::Rw, 6, 4096, 0), b" world");
        let mut out = Vec::new();
        while conn.to_host_len() > 0 {
            let chunk = conn
                .to_host_front()
                .iter()
                .take(3)
                .copied()
                .collect::<Vec<_>>();
            out.extend_from_slice(&chunk);
            conn.on_host_written(chunk.len());
        }
        assert_eq!(out, b"hello world");
        assert_eq!(conn.fwd_cnt(), 11);
    }

    #[test]
    fn host_initiated_connect_sends_request_then_waits_for_response() {
        let mut conn = Connection::connect_to_guest(1024, 8000, GUEST, DEFAULT_BUF_ALLOC);
        assert_eq!(conn.state(), State::Connecting);
        conn.preload_to_guest(b"early");
        assert_eq!(
            conn.host_read_budget(),
            0,
            "no reading before the guest accepts"
        );
        let (hdr, _) = conn.next_packet(4096).unwrap();
        assert_eq!(hdr.op(), Some(Op::Request));
        assert_eq!((hdr.src_port, hdr.dst_port), (1024, 8000));
        assert_eq!(conn.next_packet(4096), None, "no data before RESPONSE");
        let mut resp = guest_hdr(Op::Response, 0, 4096, 0);
        resp.src_port = 8000;
        resp.dst_port = 1024;
        assert_eq!(conn.on_guest_packet(&resp, &[]), Verdict::Established);
        assert_eq!(conn.state(), State::Established);
        let (hdr, data) = conn.next_packet(4096).unwrap();
        assert_eq!((hdr.op(), data.as_slice()), (Some(Op::Rw), &b"early"[..]));
    }

    #[test]
    fn connecting_rejects_anything_but_response_or_rst() {
        let mut conn = Connection::connect_to_guest(1024, 8000, GUEST, DEFAULT_BUF_ALLOC);
        assert!(matches!(
            conn.on_guest_packet(&guest_hdr(Op::Rw, 1, 4096, 0), &[0]),
            Verdict::Reset(ResetReason::Unexpected(_))
        ));
        let mut conn = Connection::connect_to_guest(1024, 8000, GUEST, DEFAULT_BUF_ALLOC);
        assert_eq!(
            conn.on_guest_packet(&guest_hdr(Op::Rst, 0, 0, 0), &[]),
            Verdict::PeerReset
        );
    }

    #[test]
    fn established_ignores_stray_requests_and_responses() {
        let mut conn = established(DEFAULT_BUF_ALLOC, 4096);
        assert!(matches!(
            conn.on_guest_packet(&guest_hdr(Op::Request, 0, 4096, 0), &[]),
            Verdict::Ignored(_)
        ));
        assert!(matches!(
            conn.on_guest_packet(&guest_hdr(Op::Response, 0, 4096, 0), &[]),
            Verdict::Ignored(_)
        ));
        let mut unknown = guest_hdr(Op::Rw, 0, 4096, 0);
        unknown.op = 99;
        assert!(matches!(
            conn.on_guest_packet(&unknown, &[]),
            Verdict::Ignored(_)
        ));
        assert_eq!(
            conn.on_guest_packet(&guest_hdr(Op::Rst, 0, 4096, 0), &[]),
            Verdict::PeerReset
        );
    }

    #[test]
    fn guest_shutdown_send_waits_for_the_flush_then_shuts_the_host_write_side() {
        let mut conn = established(DEFAULT_BUF_ALLOC, 4096);
        conn.on_guest_packet(&guest_hdr(Op::Rw, 3, 4096, 0), b"abc");
        let mut shut = guest_hdr(Op::Shutdown, 0, 4096, 0);
        shut.flags = SHUTDOWN_SEND;
        assert_eq!(conn.on_guest_packet(&shut, &[]), Verdict::Keep);
        assert!(!conn.wants_host_write_shutdown(), "3 bytes still buffered");
        conn.on_host_written(3);
        assert!(conn.wants_host_write_shutdown());
        conn.on_host_write_shutdown();
        assert!(!conn.wants_host_write_shutdown());
        assert!(!conn.is_finished(), "host→guest still open");
        // Payload after SHUTDOWN(SEND) is a protocol error that is dropped.
        assert!(matches!(
            conn.on_guest_packet(&guest_hdr(Op::Rw, 1, 4096, 0), b"x"),
            Verdict::Ignored(_)
        ));
        // Host replies and closes: data, then SHUTDOWN(SEND), then finished.
        conn.on_host_data(b"bye");
        conn.on_host_eof();
        assert_eq!(conn.host_read_budget(), 0);
        let packets = drain(&mut conn, 4096);
        let ops: Vec<_> = packets.iter().map(|(h, _)| h.op().unwrap()).collect();
        assert_eq!(ops, vec![Op::Rw, Op::Shutdown]);
        assert_eq!(packets[1].0.flags, SHUTDOWN_SEND);
        assert!(conn.is_finished());
    }

    #[test]
    fn host_eof_sends_shutdown_only_after_pending_data() {
        let mut conn = established(DEFAULT_BUF_ALLOC, 4);
        conn.on_host_data(b"abcdef"[..4].as_ref());
        conn.on_host_eof();
        // Credit of 4: the payload goes, then SHUTDOWN (no CREDIT_REQUEST: nothing more
        // will come from the host).
        let packets = drain(&mut conn, 4096);
        let ops: Vec<_> = packets.iter().map(|(h, _)| h.op().unwrap()).collect();
        assert_eq!(ops, vec![Op::Rw, Op::Shutdown]);
        assert!(!conn.is_finished(), "the guest may still send");
    }

    #[test]
    fn full_shutdown_from_guest_finishes_after_flush() {
        let mut conn = established(DEFAULT_BUF_ALLOC, 4096);
        conn.on_host_data(b"unsent");
        conn.on_guest_packet(&guest_hdr(Op::Rw, 2, 4096, 0), b"hi");
        let mut shut = guest_hdr(Op::Shutdown, 0, 4096, 0);
        shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        conn.on_guest_packet(&shut, &[]);
        assert!(!conn.is_finished(), "2 bytes not yet written to the host");
        assert_eq!(conn.host_read_budget(), 0, "the guest will not receive");
        assert!(
            !conn.wants_rx(),
            "pending host data is discarded after SHUTDOWN(RCV)"
        );
        conn.on_host_written(2);
        assert!(conn.is_finished());
        let rst = conn.rst_header();
        assert_eq!(
            (rst.op(), rst.src_port, rst.dst_port),
            (Some(Op::Rst), 5000, 40000)
        );
    }
}
