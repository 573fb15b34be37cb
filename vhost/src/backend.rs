//! The vhost-user-backend glue: features, config space, and event dispatch.
//!
//! Threads: vhost-user-backend runs one thread reading the frontend's vhost-user messages and
//! one vring worker thread (all three queues are mapped to worker 0). Everything that touches
//! connections runs in that worker, inside [`VsockBackend::handle_event`] with the backend
//! lock held, so the device itself needs no locking.
//!
//! Worker epoll ids: 0 RX kick, 1 TX kick, 2 event-queue kick (ignored: the event queue is
//! never used), 3 reserved by the library (exit / vring-enable), [`HOST_EVENT`] = 4 the
//! device's own epoll fd with all host sockets in it (see [`crate::muxer`]).

use std::io;
use std::os::fd::RawFd;

use log::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::chain::Mem;
use crate::device::{VsockDevice, EVENT_QUEUE, NUM_QUEUES, RX_QUEUE, TX_QUEUE};
use crate::stats::Stats;

/// Worker epoll id of the device's host-socket epoll fd (ids 0..=NUM_QUEUES are reserved).
pub const HOST_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// Largest queue size accepted (QEMU's vhost-user-vsock uses 128).
pub const MAX_QUEUE_SIZE: usize = 1024;

/// The vring type of this backend.
pub type Vring = VringRwLock<GuestMemoryAtomic<Mem>>;

/// Upper bound on TX/RX alternations per event when replies are backlogged, so one event
/// cannot monopolise the worker.
const MAX_ROUNDS: usize = 64;

/// The backend for one VMM connection.
pub struct VsockBackend {
    guest_cid: u64,
    device: VsockDevice,
    mem: Option<GuestMemoryAtomic<Mem>>,
    event_idx: bool,
    /// A ring was stopped (GET_VRING_BASE); see [`Self::detect_driver_reset`].
    rings_stopped: bool,
}

impl VsockBackend {
    /// A backend serving `device` to the guest with CID `guest_cid`.
    pub fn new(guest_cid: u64, device: VsockDevice) -> Self {
        VsockBackend {
            guest_cid,
            device,
            mem: None,
            event_idx: false,
            rings_stopped: false,
        }
    }

    /// The device's host-socket epoll fd, to register under [`HOST_EVENT`].
    pub fn host_epoll_fd(&self) -> RawFd {
        self.device.host_epoll_fd()
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        self.device.stats()
    }

    /// Drop all connections (the VMM is gone).
    pub fn disconnect(&mut self) -> usize {
        self.device.reset()
    }

    /// After the rings were stopped, a restart whose TX and RX rings both begin at index 0 is
    /// a fresh driver (virtio reset zeroes the rings' indices; a VM pause/resume restores
    /// them): the guest has forgotten every connection, so we drop ours.
    fn detect_driver_reset(&mut self, vrings: &[Vring]) {
        if !self.rings_stopped {
            return;
        }
        let (Some(rx), Some(tx)) = (vrings.get(RX_QUEUE), vrings.get(TX_QUEUE)) else {
            return;
        };
        let running = |v: &Vring| {
            let state = v.get_ref();
            state.is_enabled() && state.get_queue().ready()
        };
        if !running(rx) || !running(tx) {
            return;
        }
        self.rings_stopped = false;
        if rx.queue_next_avail() == 0 && tx.queue_next_avail() == 0 {
            let n = self.device.reset();
            if n > 0 {
                info!("guest driver reset: dropped {n} connections");
            }
        }
    }

    /// Run `f` on a vring's queue if it is running, then notify the guest if needed.
    fn with_queue(
        vring: &Vring,
        mem: &Mem,
        event_idx: bool,
        f: impl FnOnce(&mut Queue) -> bool,
    ) -> io::Result<()> {
        let mut state = vring.get_mut();
        if !state.is_enabled() || !state.get_queue().ready() {
            return Ok(());
        }
        let queue = state.get_queue_mut();
        if !f(queue) {
            return Ok(());
        }
        let notify = if event_idx {
            queue.needs_notification(mem).unwrap_or(true)
        } else {
            true
        };
        if notify {
            state.signal_used_queue()?;
        }
        Ok(())
    }

    fn run_queues(&mut self, vrings: &[Vring], tx_kick: bool) -> io::Result<()> {
        self.detect_driver_reset(vrings);
        let Some(atomic) = self.mem.clone() else {
            return Ok(());
        };
        let guard = atomic.memory();
        let mem: &Mem = &guard;
        let (Some(rx), Some(tx)) = (vrings.get(RX_QUEUE), vrings.get(TX_QUEUE)) else {
            return Ok(());
        };
        let event_idx = self.event_idx;
        let mut do_tx = tx_kick || self.device.tx_can_resume();
        for _ in 0..MAX_ROUNDS {
            if do_tx {
                Self::with_queue(tx, mem, event_idx, |q| self.device.process_tx(mem, q))?;
            }
            Self::with_queue(rx, mem, event_idx, |q| self.device.process_rx(mem, q))?;
            do_tx = self.device.tx_can_resume();
            if !do_tx {
                break;
            }
        }
        Ok(())
    }
}

impl VhostUserBackendMut for VsockBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG: QEMU reads guest_cid through GET_CONFIG. MQ: QEMU asks for the queue count.
        // REPLY_ACK is added by the vhost crate itself.
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // struct virtio_vsock_config { le64 guest_cid; } (spec §5.10.4)
        let config = self.guest_cid.to_le_bytes();
        let start = offset as usize;
        match start
            .checked_add(size as usize)
            .and_then(|end| config.get(start..end))
        {
            Some(bytes) => bytes.to_vec(),
            None => {
                warn!("GET_CONFIG offset {offset} size {size} is outside the 8-byte config space");
                Vec::new()
            }
        }
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn reset_device(&mut self) {
        let n = self.device.reset();
        info!("device reset by the VMM: dropped {n} connections");
    }

    fn stop_vring(&mut self, queue_index: u32) -> io::Result<()> {
        debug!("vring {queue_index} stopped");
        self.rings_stopped = true;
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one, the worker thread could not be told to exit and dropping the daemon
        // would hang joining it.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        match device_event as usize {
            RX_QUEUE => self.run_queues(vrings, false),
            TX_QUEUE => self.run_queues(vrings, true),
            // The event queue's buffers are only ever needed for TRANSPORT_RESET after
            // migration, which this device does not support; leave them available.
            EVENT_QUEUE => Ok(()),
            _ if device_event == HOST_EVENT => {
                self.device.handle_host_events();
                self.run_queues(vrings, false)
            }
            other => {
                warn!("unexpected worker event id {other}");
                Ok(())
            }
        }
    }
}
