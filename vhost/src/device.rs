//! The virtio-vsock device proper: moves packets between the guest's virtqueues and the
//! [`Muxer`]. Works on plain `virtio_queue::Queue`s and guest memory, so tests drive it with
//! `virtio_queue::mock::MockSplitQueue` exactly as the backend drives it with vhost-user
//! vrings.
//!
//! Notification suppression (spec §2.7.7 / §2.7.10, `VIRTIO_RING_F_EVENT_IDX`): TX uses the
//! usual "disable, drain, re-enable, re-check" loop so no kick is lost. RX buffers are only
//! interesting when we have something to send, so RX notifications are (re-)enabled only when
//! we run out of buffers with work pending; `enable_notification` returning true means
//! buffers arrived in the meantime and we go on.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;

use log::{error, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use crate::chain::{read_tx, Mem, RxBuffer};
use crate::muxer::{DeviceConfig, Muxer};
use crate::stats::Stats;

/// Queue indices (spec §5.10.2).
pub const RX_QUEUE: usize = 0;
/// Driver → device.
pub const TX_QUEUE: usize = 1;
/// Device → driver events (transport reset); never used by this device.
pub const EVENT_QUEUE: usize = 2;
/// Number of queues.
pub const NUM_QUEUES: usize = 3;

/// The device state for one VMM connection.
pub struct VsockDevice {
    muxer: Muxer,
    tx_deferred: bool,
}

impl VsockDevice {
    /// A device with no connections.
    pub fn new(cfg: DeviceConfig, listener: Option<UnixListener>) -> io::Result<VsockDevice> {
        Ok(VsockDevice {
            muxer: Muxer::new(cfg, listener)?,
            tx_deferred: false,
        })
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        self.muxer.stats()
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// The epoll fd that becomes readable when a host socket needs attention.
    pub fn host_epoll_fd(&self) -> RawFd {
        self.muxer.epoll_fd()
    }

    /// Service host sockets (never blocks). Follow with [`Self::process_rx`].
    pub fn handle_host_events(&mut self) {
        self.muxer.handle_host_events();
    }

    /// Drop all connections (guest driver reset, VMM disconnect). Returns how many.
    pub fn reset(&mut self) -> usize {
        self.tx_deferred = false;
        self.muxer.reset()
    }

    /// TX processing stopped early because replies are backlogged; call
    /// [`Self::process_tx`] again once [`Self::process_rx`] made progress.
    pub fn tx_deferred(&self) -> bool {
        self.tx_deferred
    }

    /// Whether a deferred TX pass can resume.
    pub fn tx_can_resume(&self) -> bool {
        self.tx_deferred && !self.muxer.replies_backlogged()
    }

    /// Consume the TX queue. Every chain, good or bad, goes back to the used ring with length
    /// 0 (the device writes nothing into TX buffers). Returns whether any chain was used.
    pub fn process_tx(&mut self, mem: &Mem, queue: &mut Queue) -> bool {
        self.tx_deferred = false;
        if !queue.ready() {
            return false;
        }
        let mut used = false;
        let mut empty_rounds = 0;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                error!("TX queue: {e}");
            }
            let mut popped = false;
            loop {
                if self.muxer.replies_backlogged() {
                    self.tx_deferred = true;
                    return used;
                }
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                popped = true;
                let head = chain.head_index();
                match read_tx(chain, mem) {
                    Ok(pkt) => self.muxer.handle_guest_packet(pkt),
                    Err(e) => {
                        let stats = self.muxer.stats_mut();
                        stats.malformed_tx += 1;
                        warn!(
                            "dropping malformed TX chain (head {head}): {e} (malformed TX chains so far: {})",
                            stats.malformed_tx
                        );
                    }
                }
                if let Err(e) = queue.add_used(mem, head, 0) {
                    error!("TX queue: cannot return chain {head}: {e}");
                }
                used = true;
            }
            match queue.enable_notification(mem) {
                Ok(true) if !spin_guard(&mut empty_rounds, popped) => {
                    error!("TX queue: the available index runs more than a queue ahead; ignored until the next kick");
                    break;
                }
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    error!("TX queue: {e}");
                    break;
                }
            }
        }
        used
    }

    /// Fill RX buffers with whatever is pending. Returns whether any chain was used.
    pub fn process_rx(&mut self, mem: &Mem, queue: &mut Queue) -> bool {
        if !queue.ready() {
            return false;
        }
        let mut used = false;
        let mut empty_rounds = 0;
        'refill: loop {
            let mut popped = false;
            while self.muxer.has_rx_work() {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                popped = true;
                let head = chain.head_index();
                let len = match RxBuffer::new(chain, mem) {
                    Err(e) => {
                        let stats = self.muxer.stats_mut();
                        stats.malformed_rx += 1;
                        warn!(
                            "returning malformed RX chain (head {head}) unused: {e} (malformed RX chains so far: {})",
                            stats.malformed_rx
                        );
                        0
                    }
                    Ok(buf) => match self.muxer.next_rx_packet(buf.payload_room()) {
                        None => {
                            // Nothing fits this buffer after all: leave it for later.
                            queue.go_to_previous_position();
                            break 'refill;
                        }
                        Some((hdr, data)) => match buf.write(&hdr, &data) {
                            Ok(len) => len,
                            Err(e) => {
                                let stats = self.muxer.stats_mut();
                                stats.malformed_rx += 1;
                                warn!(
                                    "RX chain (head {head}): {e}; a packet was lost (malformed RX chains so far: {})",
                                    stats.malformed_rx
                                );
                                0
                            }
                        },
                    },
                };
                if let Err(e) = queue.add_used(mem, head, len) {
                    error!("RX queue: cannot return chain {head}: {e}");
                }
                used = true;
            }
            if !self.muxer.has_rx_work() {
                break;
            }
            // Work pending but no buffers: ask for a kick when the driver adds some.
            match queue.enable_notification(mem) {
                Ok(true) if !spin_guard(&mut empty_rounds, popped) => {
                    error!("RX queue: the available index runs more than a queue ahead; ignored until the next kick");
                    break;
                }
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    error!("RX queue: {e}");
                    break;
                }
            }
        }
        self.muxer.end_rx_pass();
        used
    }
}

/// Whether to go round again after `enable_notification` said buffers arrived. It also says
/// so when the driver's available index is more than a queue ahead of ours, which
/// `pop_descriptor_chain` refuses (virtio-queue's `InvalidAvailRingIndex`) without a chain:
/// going round on that would spin for ever (found by the `vsock_device` fuzz target). One
/// round that pops nothing is the honest race (buffers added between the last pop and the
/// re-enable); a second in a row is the bad index.
fn spin_guard(empty_rounds: &mut u32, popped: bool) -> bool {
    if popped {
        *empty_rounds = 0;
        return true;
    }
    *empty_rounds += 1;
    *empty_rounds < 2
}
