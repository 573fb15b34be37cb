//! What a VMBus util driver sees of its channel: a ring of host packets to read, a way to send.
//!
//! In the kernel a util driver (hv_fcopy, hv_kvp, hv_snapshot) is woken by a channel callback,
//! reads one packet at a time with `vmbus_recvpacket()` into a fixed receive buffer, and answers
//! with `vmbus_sendpacket(..., VM_PKT_DATA_INBAND, 0)`. A packet it does not read stays in the
//! ring: the 6.1 fcopy driver relies on that to hold back host requests while a transaction is
//! in flight (drivers/hv/hv_fcopy.c, 6.1: the callback returns early when state > READY).
//!
//! [`InboundRing`] is that ring on our side of a bus stream: the stream reader pushes packets
//! in, the driver pulls them out when it is willing. [`HostChannel`] is the driver's view.

use std::collections::VecDeque;
use std::io;
use std::sync::{Condvar, Mutex};

use vmbus::guest_memory::MemoryMessage;

/// One packet as `vmbus_recvpacket()` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundPacket {
    /// The descriptor's transaction id; util drivers echo it in their reply.
    pub trans_id: u64,
    /// `len8 * 8 - offset8 * 8` bytes: the payload including its padding to 8 bytes. Its
    /// length is the kernel's `recvlen`.
    pub payload: Vec<u8>,
}

/// `vmbus_recvpacket()` failures a driver can see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    /// The next packet is larger than the driver's buffer. The kernel returns -ENOBUFS and
    /// leaves the packet in the ring (drivers/hv/ring_buffer.c, 6.1): the util drivers only log
    /// it, so such a packet wedges the channel. We reproduce that, loudly.
    #[error(
        "host packet of {needed} bytes does not fit the driver's {limit}-byte buffer (ENOBUFS)"
    )]
    NoBufs { needed: usize, limit: usize },
}

/// The driver's view of its channel.
pub trait HostChannel: Send + Sync {
    /// Takes the next host packet if it fits `buf_limit` bytes; `Ok(None)` when the ring is empty.
    fn recv(&self, buf_limit: usize) -> Result<Option<InboundPacket>, RecvError>;
    /// Sends an inband packet with `trans_id` to the host. A host that has gone away is logged
    /// by the transport; like `vmbus_sendpacket()` on a rescinded channel, the driver carries on.
    fn send_inband(&self, trans_id: u64, payload: &[u8]);
    /// Whether a host packet is waiting in the ring. A driver may skip re-polling an empty
    /// ring: the transport runs the callback after every packet it adds. `true` is always a
    /// safe answer.
    fn has_pending(&self) -> bool {
        true
    }
    /// Sends a whole packet the driver built, descriptor included (xs_fastpath's GPA-direct
    /// request, `vmbus_sendpacket_mpb_desc()`). An error: the host is gone.
    fn send_packet(&self, packet: &[u8]) -> io::Result<()> {
        let _ = packet;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this channel sends inband packets only",
        ))
    }
    /// Sends a guest memory message body ([`vmbus::guest_memory`]): the answer to a host's
    /// READ of pages a packet named.
    fn send_memory(&self, body: &[u8]) -> io::Result<()> {
        let _ = body;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this channel carries no guest memory",
        ))
    }
}

/// What the bus calls on a driver bound to a channel.
pub trait ChannelDriver: Send + Sync {
    /// The channel callback: one or more packets may be waiting (or none: callbacks can be
    /// spurious). The driver reads as many as its state allows.
    fn on_channel_callback(&self);
    /// The host rescinded the channel: the driver's `util_remove` → service deinit. Blocks as
    /// the kernel's does (the 6.1 hvutil transport waits until the daemon closes its fd).
    fn on_rescind(&self);
    /// The host reads or writes pages a packet of this driver named (DMA, on our bus). Called
    /// on the channel's reader thread, in stream order with the packets: a WRITE sent before a
    /// completion is applied before the completion is seen. Drivers that send no page lists
    /// get none; one that arrives anyway is the host's mistake.
    fn on_memory(&self, message: MemoryMessage<'_>) {
        log::warn!("host sent a guest memory message to a driver that names no pages: {message:?}; dropped");
    }
}

/// Host packets waiting to be read by the driver, bounded like the real ring.
pub struct InboundRing {
    capacity_bytes: usize,
    inner: Mutex<RingState>,
    space: Condvar,
}

struct RingState {
    packets: VecDeque<InboundPacket>,
    bytes: usize,
    closed: bool,
    /// A pusher waits for room: only then does taking a packet need a wake-up.
    pusher_waiting: bool,
}

impl InboundRing {
    /// `capacity_bytes` is the ring's data area (util rings in 6.1: 3 pages each way).
    pub fn new(capacity_bytes: usize) -> InboundRing {
        InboundRing {
            capacity_bytes,
            inner: Mutex::new(RingState {
                packets: VecDeque::new(),
                bytes: 0,
                closed: false,
                pusher_waiting: false,
            }),
            space: Condvar::new(),
        }
    }

    /// Adds a packet from the host, waiting while the ring is full (back-pressure on the
    /// stream, as a full ring makes a real host wait). Returns false once the ring is closed.
    pub fn push(&self, packet: InboundPacket) -> bool {
        let cost = packet.payload.len() + 16;
        let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // A packet larger than the whole ring is let in alone, so it can be refused by the
        // driver (ENOBUFS) instead of blocking the stream forever.
        while !state.closed && state.bytes > 0 && state.bytes + cost > self.capacity_bytes {
            state.pusher_waiting = true;
            state = self.space.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.pusher_waiting = false;
        if state.closed {
            return false;
        }
        state.bytes += cost;
        state.packets.push_back(packet);
        true
    }

    /// `vmbus_recvpacket()` semantics on the ring.
    pub fn recv(&self, buf_limit: usize) -> Result<Option<InboundPacket>, RecvError> {
        let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let needed = match state.packets.front() {
            None => return Ok(None),
            Some(packet) => packet.payload.len(),
        };
        if needed > buf_limit {
            return Err(RecvError::NoBufs {
                needed,
                limit: buf_limit,
            });
        }
        let packet = state.packets.pop_front();
        if let Some(p) = &packet {
            state.bytes -= p.payload.len() + 16;
        }
        if state.pusher_waiting {
            self.space.notify_all();
        }
        Ok(packet)
    }

    /// Whether a packet is waiting.
    pub fn has_pending(&self) -> bool {
        !self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .packets
            .is_empty()
    }

    /// Drops every packet and refuses new ones (channel closed or rescinded).
    pub fn close(&self) {
        let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        state.closed = true;
        state.packets.clear();
        state.bytes = 0;
        self.space.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(id: u64, len: usize) -> InboundPacket {
        InboundPacket {
            trans_id: id,
            payload: vec![0; len],
        }
    }

    #[test]
    fn oversized_packet_stays_in_the_ring_with_enobufs() {
        let ring = InboundRing::new(16384);
        assert!(ring.push(packet(1, 9000)));
        assert_eq!(
            ring.recv(8192),
            Err(RecvError::NoBufs {
                needed: 9000,
                limit: 8192
            })
        );
        assert_eq!(ring.recv(16384).unwrap().unwrap().trans_id, 1);
        assert_eq!(ring.recv(16384), Ok(None));
    }

    #[test]
    fn packets_come_out_in_order() {
        let ring = InboundRing::new(16384);
        ring.push(packet(1, 64));
        ring.push(packet(2, 64));
        assert_eq!(ring.recv(8192).unwrap().unwrap().trans_id, 1);
        assert_eq!(ring.recv(8192).unwrap().unwrap().trans_id, 2);
    }

    #[test]
    fn closed_ring_refuses_packets() {
        let ring = InboundRing::new(16384);
        ring.close();
        assert!(!ring.push(packet(1, 64)));
        assert_eq!(ring.recv(8192), Ok(None));
    }
}
