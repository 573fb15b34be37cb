//! The char-device half of the Hyper-V util services: drivers/hv/hv_utils_transport.c.
//!
//! Since Linux 4.x the fcopy, kvp and vss drivers do not implement `file_operations`
//! themselves. They hand two callbacks to "hvutil transport" (`on_msg` for what the daemon
//! writes, `on_reset` for when it goes away) and get back a misc device with one outbound
//! message slot: the driver queues a message with `hvutil_transport_send()`, the daemon
//! `read()`s it whole, and every `write()` goes straight to `on_msg`. This module is that
//! transport, as in Linux 6.1 (the same since 4.16 apart from `POLLERR` → `EPOLLERR`
//! spellings), so that each service file only contains the service. Spec: fcopy.md §5.2.
//!
//! What the transport does that a daemon notices (every row of fcopy.md §5.2):
//!
//! * one opener at a time (`EBUSY`), and `EBADF` for everything once the device is being
//!   destroyed;
//! * `read` always blocks until a message is queued, `O_NONBLOCK` or not, and returns the
//!   whole message or `EINVAL` *keeping it queued* when the buffer is too small;
//! * `poll` reports `POLLIN|POLLRDNORM` for a queued message, `POLLERR|POLLHUP` once
//!   destroyed, and never `POLLOUT`, although `write` never blocks;
//! * file offsets are ignored (`pread`/`pwrite` behave like `read`/`write`);
//! * closing the device drops an unread message and tells the service (`on_reset`);
//! * destroying the device (channel rescind) wakes readers and pollers and then *waits until
//!   the daemon closes its fd* before the device disappears.
//!
//! The netlink mode of the transport (old daemons talking over the connector) is kept as a
//! state for fidelity of the open path, but cusedev has no connector: nothing enters it.
//!
//! Locking: the kernel has `hvt->lock` for the transport and none for fcopy. Here the
//! transport state and the service state live under one driver lock ([`WaitState`]), which
//! the service's own work items (channel callback, timeout) take too. The service callbacks
//! run under it and may queue a message ([`Transport::send`]), arm or cancel a work item and
//! send on the channel, but must never block.
//!
//! Sleeping readers are parked replies in a [`WaitList`], not threads. `wake_up_interruptible`
//! in `hvutil_transport_send()` becomes "serve the parked readers", done when whoever queued
//! the message lets go of the driver lock ([`Locked`]'s drop): the reader runs after the waker
//! in the kernel too, and the message's on-read callback needs the service, which the sender
//! may be in the middle of. Readers are served in the order they went to sleep, one message
//! each; a reader whose buffer is too small gets EINVAL and the next one is tried.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard};

use crate::device::{
    poll_bits, Caller, Device, Errno, Handle, PollWaker, ReadReply, WaitList, WriteReply,
};
use crate::wait::WaitState;

/// `KMALLOC_MAX_SIZE` on x86_64 6.1 (`1 << (MAX_ORDER + PAGE_SHIFT - 1)` = 4 MiB): the largest
/// write `memdup_user()` can copy; anything larger fails with ENOMEM before `on_msg`.
pub const KMALLOC_MAX_SIZE: usize = 1 << 22;

/// `enum hvutil_transport_mode` (drivers/hv/hv_utils_transport.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Nobody has the device open (`HVUTIL_TRANSPORT_INIT`).
    Init,
    /// A daemon talks over the netlink connector (`HVUTIL_TRANSPORT_NETLINK`). Never entered
    /// in cusedev.
    Netlink,
    /// A daemon has the char device open (`HVUTIL_TRANSPORT_CHARDEV`).
    Chardev,
    /// The device is going away (`HVUTIL_TRANSPORT_DESTROY`).
    Destroy,
}

/// `enum hvutil_device_state` (drivers/hv/hyperv_vmbus.h), shared by fcopy, kvp and vss.
/// The order matters: drivers compare with `<` and `>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HvutilDeviceState {
    /// No daemon registered (`HVUTIL_DEVICE_INIT`).
    DeviceInit = 0,
    /// Daemon registered, no transaction (`HVUTIL_READY`).
    Ready = 1,
    /// A host message is being prepared for the daemon (`HVUTIL_HOSTMSG_RECEIVED`).
    HostmsgReceived = 2,
    /// The daemon has been given the message (`HVUTIL_USERSPACE_REQ`).
    UserspaceReq = 3,
    /// The daemon's answer is being forwarded (`HVUTIL_USERSPACE_RECV`).
    UserspaceRecv = 4,
    /// The device is being removed (`HVUTIL_DEVICE_DYING`).
    DeviceDying = 5,
}

/// The on-read callback of a queued message (`hvutil_transport_send(..., on_read_cb)`): runs
/// once, under the driver lock, right after the daemon has read the message.
pub type OnRead<S> = Box<dyn FnOnce(&mut S) + Send>;

/// A util service plugged into the transport: the kernel's `on_msg` / `on_reset` pair.
pub trait HvutilService: Send + Sized + 'static {
    /// The daemon wrote `msg` (`hvt_op_write` → `hvt->on_msg(inmsg, count)`). `Ok` makes the
    /// write return its count, `Err` its errno. May queue a message on `hvt`.
    fn on_msg(&mut self, hvt: &mut Transport<Self>, msg: &[u8]) -> Result<(), Errno>;
    /// The daemon closed the device (`hvt_reset` → `hvt->on_reset()`), after the transport
    /// dropped any unread message.
    fn on_reset(&mut self);
}

/// The transport's own state (`struct hvutil_transport` minus the service).
pub struct Transport<S> {
    mode: Mode,
    /// `outmsg`/`outmsg_len`. `Some(empty)` is possible, as `kzalloc(0)` is non-NULL: such a
    /// message blocks the slot without waking readers, exactly as in the kernel.
    outmsg: Option<Vec<u8>>,
    on_read: Option<OnRead<S>>,
    /// Wakes the wait queue and pollers (`wake_up_interruptible(&hvt->outmsg_q)`).
    wake: Option<Box<dyn Fn() + Send>>,
    /// `complete(&hvt->release)`: the fd that was open at destroy time has been released.
    release_done: bool,
    /// The destroyer is waiting for that release (test visibility).
    destroy_waiting: bool,
    /// The misc device is deregistered: a stale node opens with ENODEV (drivers/char/misc.c).
    deregistered: bool,
    /// Readers inside the interruptible wait, with the size of their buffers.
    readers: WaitList<u32, Vec<u8>>,
    /// The wait condition may have become true: serve the readers when the lock is let go.
    readers_to_wake: bool,
}

impl<S> Transport<S> {
    fn new() -> Transport<S> {
        Transport {
            mode: Mode::Init,
            outmsg: None,
            on_read: None,
            wake: None,
            release_done: false,
            destroy_waiting: false,
            deregistered: false,
            readers: WaitList::new(),
            readers_to_wake: false,
        }
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether a message is waiting to be read.
    pub fn has_message(&self) -> bool {
        self.outmsg.is_some()
    }

    /// `wake_up_interruptible(&hvt->outmsg_q)`: pollers now, parked readers when the driver
    /// lock is let go.
    fn wake(&mut self) {
        self.readers_to_wake = true;
        if let Some(wake) = &self.wake {
            wake();
        }
    }

    /// The condition of hvt_op_read's `wait_event_interruptible`.
    fn read_can_go_on(&self) -> bool {
        self.outmsg.as_ref().is_some_and(|m| !m.is_empty()) || self.mode != Mode::Chardev
    }

    /// `hvutil_transport_send()`: queues `msg` for the daemon and wakes readers and pollers.
    ///
    /// EINVAL when nobody has the device open (mode INIT) or it is being destroyed; EFAULT
    /// (sic, hv_utils_transport.c) when the previous message has not been read yet; ENOMEM
    /// where `kzalloc` would fail.
    pub fn send(&mut self, msg: &[u8], on_read: Option<OnRead<S>>) -> Result<(), Errno> {
        match self.mode {
            Mode::Init | Mode::Destroy => return Err(Errno::EINVAL),
            // The kernel would cn_netlink_send() here; with no connector in userspace there
            // is never a listener, which netlink reports as ESRCH.
            Mode::Netlink => return Err(Errno::ESRCH),
            Mode::Chardev => {}
        }
        if self.outmsg.is_some() {
            // "Previous message wasn't received" (hv_utils_transport.c): EFAULT, not EBUSY.
            return Err(Errno::EFAULT);
        }
        if msg.len() > KMALLOC_MAX_SIZE {
            return Err(Errno::ENOMEM);
        }
        self.outmsg = Some(msg.to_vec());
        self.on_read = on_read;
        self.wake();
        Ok(())
    }

    /// `hvt_reset()` minus the service callback: drops the unread message.
    fn drop_message(&mut self) {
        self.outmsg = None;
        self.on_read = None;
    }
}

/// The driver state under the driver lock: transport and service together.
pub struct Shared<S> {
    /// The transport half.
    pub hvt: Transport<S>,
    /// The service half (fcopy, kvp, vss).
    pub svc: S,
}

/// A driver whose char device is this transport and nothing else: the 6.1 fcopy, kvp and vss.
/// Their `file_operations` are the transport's (`hvt_op_*`); all a driver adds is a re-poll of
/// its channel after a read or a write, when the service asked for one (`hv_poll_channel()`
/// in the on-read callback of the registration answer, or after the daemon's answer ended a
/// transaction, so that a host request already in the ring reaches the daemon before its
/// write returns). [`Device`] is implemented once, here, for every such driver.
pub(crate) trait HvutilDriver: Send + Sync {
    /// The service behind the transport.
    type Service: HvutilService;
    /// The misc device name (`"vmbus/hv_kvp"`).
    const NODE: &'static str;
    /// The transport.
    fn transport(&self) -> &HvutilTransport<Self::Service>;
    /// Runs the channel callback again if the service asked for it.
    fn repoll_if_asked(&self);
}

impl<D: HvutilDriver> Device for D {
    fn name(&self) -> &str {
        D::NODE
    }

    /// O_NONBLOCK and every other flag are ignored (`hvt_op_open` does not look).
    fn open(&self, _caller: &Caller, _flags: i32) -> Result<Handle, Errno> {
        self.transport().open()
    }

    fn read(&self, handle: Handle, count: u32, _offset: u64, _caller: &Caller, reply: ReadReply) {
        self.transport().read(handle, count, reply);
        self.repoll_if_asked();
    }

    fn write(
        &self,
        handle: Handle,
        data: &[u8],
        _offset: u64,
        _caller: &Caller,
        reply: WriteReply,
    ) {
        let result = self.transport().write(handle, data);
        self.repoll_if_asked();
        reply.answer(result)
    }

    fn poll(&self, handle: Handle, waker: Option<PollWaker>) -> u32 {
        self.transport().poll(handle, waker)
    }

    fn release(&self, handle: Handle) {
        self.transport().release(handle)
    }
}

/// The transport with its service: the misc device's `file_operations` plus the kernel-side
/// calls (`hvutil_transport_send` through [`HvutilTransport::lock`], `..._destroy`).
pub struct HvutilTransport<S> {
    ws: Arc<WaitState<Shared<S>>>,
    next_handle: AtomicU64,
}

impl<S: HvutilService> HvutilTransport<S> {
    /// `hvutil_transport_init()` with the service's callbacks: mode INIT, no message.
    pub fn new(svc: S) -> HvutilTransport<S> {
        let ws = WaitState::new(Shared {
            hvt: Transport::new(),
            svc,
        });
        let weak = Arc::downgrade(&ws);
        ws.lock().hvt.wake = Some(Box::new(move || {
            if let Some(ws) = weak.upgrade() {
                ws.wake_all();
            }
        }));
        HvutilTransport {
            ws,
            next_handle: AtomicU64::new(1),
        }
    }

    /// Takes the driver lock: the service's channel callback and work items run under it.
    /// Readers a message was queued for are served when it is let go.
    pub fn lock(&self) -> Locked<'_, S> {
        Locked {
            guard: self.ws.lock(),
        }
    }

    /// `hvt_op_open`.
    pub fn open(&self) -> Result<Handle, Errno> {
        let mut guard = self.lock();
        let shared = &mut *guard;
        if shared.hvt.deregistered {
            // misc_deregister() has run: misc_open() finds no such minor.
            return Err(Errno::ENODEV);
        }
        match shared.hvt.mode {
            Mode::Destroy => return Err(Errno::EBADF),
            Mode::Init => shared.hvt.mode = Mode::Chardev,
            Mode::Netlink => {
                // "We're switching from netlink communication to using char device. Issue
                // the reset first."
                shared.hvt.drop_message();
                shared.svc.on_reset();
                shared.hvt.mode = Mode::Chardev;
            }
            Mode::Chardev => return Err(Errno::EBUSY),
        }
        Ok(self.next_handle.fetch_add(1, Ordering::Relaxed))
    }

    /// `hvt_op_read`. Waits (interruptibly) until a message is queued or the device leaves
    /// CHARDEV mode, whatever `O_NONBLOCK` says; the offset is ignored. The wait parks the
    /// reply; the read completes when a message comes ([`Locked`]).
    pub fn read(&self, _handle: Handle, count: u32, reply: ReadReply) {
        let mut guard = self.lock();
        if guard.hvt.read_can_go_on() {
            let result = read_message(&mut guard, count);
            drop(guard);
            reply.answer(result);
        } else {
            // The kernel returns -EINTR itself on a signal, not -ERESTARTSYS: SA_RESTART does
            // not restart this read (hv_utils_transport.c).
            guard.hvt.readers.park_interruptible(count, reply);
        }
    }

    /// `hvt_op_write`: the whole buffer goes to the service's `on_msg`; the offset is ignored.
    pub fn write(&self, _handle: Handle, data: &[u8]) -> Result<u32, Errno> {
        // memdup_user() comes first: a buffer that cannot be copied fails with EFAULT (in the
        // frontend, before we see it) and one kmalloc cannot hold with ENOMEM.
        if data.len() > KMALLOC_MAX_SIZE {
            return Err(Errno::ENOMEM);
        }
        let mut guard = self.lock();
        let shared = &mut *guard;
        if shared.hvt.mode == Mode::Destroy {
            return Err(Errno::EBADF);
        }
        shared.svc.on_msg(&mut shared.hvt, data)?;
        // A write is at most FUSE's max_write long; the count always fits.
        Ok(u32::try_from(data.len()).unwrap_or(u32::MAX))
    }

    /// `hvt_op_poll`. Never reports POLLOUT.
    pub fn poll(&self, _handle: Handle, waker: Option<PollWaker>) -> u32 {
        let guard = self.ws.lock();
        // poll_wait() first, then look at the state.
        if let Some(waker) = waker {
            self.ws.add_poller(waker);
        }
        if guard.hvt.mode == Mode::Destroy {
            return poll_bits::POLLERR | poll_bits::POLLHUP;
        }
        if guard.hvt.outmsg.as_ref().is_some_and(|m| !m.is_empty()) {
            return poll_bits::POLLIN | poll_bits::POLLRDNORM;
        }
        0
    }

    /// `hvt_op_release`: back to INIT (unless being destroyed), drop the unread message, tell
    /// the service, and let a waiting destroyer go on.
    pub fn release(&self, _handle: Handle) {
        let mut guard = self.lock();
        let shared = &mut *guard;
        let mode_old = shared.hvt.mode;
        if mode_old != Mode::Destroy {
            shared.hvt.mode = Mode::Init;
        }
        // "Cleanup message buffers to avoid spurious messages when the daemon connects back."
        shared.hvt.drop_message();
        shared.svc.on_reset();
        if mode_old == Mode::Destroy {
            shared.hvt.release_done = true;
            self.ws.wake_all();
        }
    }

    /// `hvutil_transport_destroy()`: mode DESTROY, wake readers (they return EBADF) and
    /// pollers (POLLERR|POLLHUP); if the device was open, wait until the daemon closes it;
    /// then deregister the device.
    pub fn destroy(&self) {
        let mut guard = self.ws.lock();
        let mode_old = guard.hvt.mode;
        guard.hvt.mode = Mode::Destroy;
        // Parked readers get EBADF now: nothing they wait for can come any more.
        wake_readers(&mut guard);
        self.ws.wake_all();
        if mode_old == Mode::Chardev {
            // wait_for_completion(&hvt->release): uninterruptible, as long as the daemon
            // keeps its fd.
            guard.hvt.destroy_waiting = true;
            guard = self.ws.wait_until(guard, None, |s| s.hvt.release_done).0;
            guard.hvt.destroy_waiting = false;
        }
        // hvt_transport_free(): misc_deregister() and kfree(outmsg).
        guard.hvt.deregistered = true;
        guard.hvt.drop_message();
    }

    /// Test visibility: readers waiting in `read`.
    #[cfg(test)]
    pub(crate) fn sleeping_readers(&self) -> usize {
        self.ws.lock().hvt.readers.waiting()
    }

    /// Test visibility: a `destroy` is waiting for the daemon to close.
    #[cfg(test)]
    pub(crate) fn destroy_waiting(&self) -> bool {
        self.ws.lock().hvt.destroy_waiting
    }
}

/// The driver lock, held. Letting it go serves the readers a message was queued for (or the
/// device's removal woke), as the kernel's woken readers run once the waker is done.
pub struct Locked<'a, S: HvutilService> {
    guard: MutexGuard<'a, Shared<S>>,
}

impl<S: HvutilService> Deref for Locked<'_, S> {
    type Target = Shared<S>;
    fn deref(&self) -> &Shared<S> {
        &self.guard
    }
}

impl<S: HvutilService> DerefMut for Locked<'_, S> {
    fn deref_mut(&mut self) -> &mut Shared<S> {
        &mut self.guard
    }
}

impl<S: HvutilService> Drop for Locked<'_, S> {
    fn drop(&mut self) {
        if self.guard.hvt.readers_to_wake {
            wake_readers(&mut self.guard);
        }
    }
}

/// Serves parked readers for as long as the wait condition holds: each takes what
/// `hvt_op_read` would give it after its wait.
fn wake_readers<S: HvutilService>(shared: &mut Shared<S>) {
    shared.hvt.readers_to_wake = false;
    while shared.hvt.read_can_go_on() {
        let Some((count, reply)) = shared.hvt.readers.wake_one() else {
            break;
        };
        let result = read_message(shared, count);
        reply.answer(result);
    }
}

/// The part of `hvt_op_read` after the wait, under `hvt->lock`.
fn read_message<S: HvutilService>(shared: &mut Shared<S>, count: u32) -> Result<Vec<u8>, Errno> {
    if shared.hvt.mode == Mode::Destroy {
        return Err(Errno::EBADF);
    }
    // In the kernel the wait condition is checked without hvt->lock; a second reader of the
    // same file woken by the same message can find it gone and gets EAGAIN. Parked readers
    // are served one message at a time, so here the second keeps waiting instead, which is
    // the kernel's other possible outcome of that race (docs/decisions.md).
    let Some(len) = shared.hvt.outmsg.as_ref().map(Vec::len) else {
        return Err(Errno::EAGAIN);
    };
    if (count as usize) < len {
        // Too small a buffer: EINVAL, and the message stays queued for the next read.
        return Err(Errno::EINVAL);
    }
    let msg = shared.hvt.outmsg.take().unwrap_or_default();
    // If copying to the caller faults (EFAULT, in the frontend/kernel), the message is gone
    // anyway and the on-read callback has run: the same as the kernel, which frees the
    // message and calls on_read whether copy_to_user() worked or not.
    if let Some(on_read) = shared.hvt.on_read.take() {
        on_read(&mut shared.svc);
    }
    Ok(msg)
}

impl<S> std::fmt::Debug for HvutilTransport<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HvutilTransport")
    }
}

/// Test helper: waits (yielding, bounded) until `cond` holds. Used to know that another
/// thread has reached a blocking point, through a counter the code under test keeps.
#[cfg(test)]
pub(crate) fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Caller;
    use crate::device::PollNotify;
    use crate::reply::testing::answer_of;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;
    use std::thread;

    /// A service that records what the daemon wrote and how often it was reset, and answers
    /// writes with a configurable result.
    #[derive(Default)]
    struct Recorder {
        msgs: Vec<Vec<u8>>,
        resets: usize,
        reads_seen: usize,
        answer: Option<Errno>,
        /// Queue this as a reply on every write.
        echo: bool,
    }

    impl HvutilService for Recorder {
        fn on_msg(&mut self, hvt: &mut Transport<Self>, msg: &[u8]) -> Result<(), Errno> {
            self.msgs.push(msg.to_vec());
            if self.echo {
                hvt.send(
                    msg,
                    Some(Box::new(|svc: &mut Recorder| svc.reads_seen += 1)),
                )?;
            }
            match self.answer {
                Some(errno) => Err(errno),
                None => Ok(()),
            }
        }
        fn on_reset(&mut self) {
            self.resets += 1;
        }
    }

    type Hvt = Arc<HvutilTransport<Recorder>>;

    fn transport() -> Hvt {
        Arc::new(HvutilTransport::new(Recorder::default()))
    }

    fn caller() -> Caller {
        Caller::detached(100)
    }

    /// A read that waits for its answer.
    fn read(hvt: &Hvt, h: Handle, count: u32, caller: &Caller) -> Result<Vec<u8>, Errno> {
        answer_of(&caller.interrupt, |reply| hvt.read(h, count, reply))
    }

    fn send(hvt: &Hvt, msg: &[u8]) -> Result<(), Errno> {
        hvt.lock().hvt.send(msg, None)
    }

    /// Starts a blocking read on another thread and waits until it sleeps.
    fn blocked_read(
        hvt: &Hvt,
        count: u32,
        caller: &Caller,
    ) -> thread::JoinHandle<Result<Vec<u8>, Errno>> {
        let before = hvt.sleeping_readers();
        let reader = {
            let hvt = hvt.clone();
            let caller = caller.clone();
            thread::spawn(move || read(&hvt, 1, count, &caller))
        };
        wait_for("the reader to sleep", || hvt.sleeping_readers() > before);
        reader
    }

    /// Starts `destroy()` on another thread.
    fn destroy_in_background(hvt: &Hvt) -> thread::JoinHandle<()> {
        let hvt = hvt.clone();
        thread::spawn(move || hvt.destroy())
    }

    /// Starts `destroy()` on another thread and waits until it waits for the daemon's close.
    fn destroy_waiting_for_close(hvt: &Hvt) -> thread::JoinHandle<()> {
        let destroyer = destroy_in_background(hvt);
        wait_for("destroy to wait for the close", || hvt.destroy_waiting());
        destroyer
    }

    /// The daemon closes `h`, which lets the waiting `destroyer` return.
    fn close_and_join(hvt: &Hvt, h: Handle, destroyer: thread::JoinHandle<()>) {
        hvt.release(h);
        destroyer.join().unwrap();
    }

    #[derive(Default)]
    struct CountingNotify(AtomicUsize);
    impl PollNotify for CountingNotify {
        fn notify(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn first_open_switches_to_chardev() {
        let hvt = transport();
        assert_eq!(hvt.lock().hvt.mode(), Mode::Init);
        hvt.open().unwrap();
        assert_eq!(hvt.lock().hvt.mode(), Mode::Chardev);
    }

    #[test]
    fn second_open_is_ebusy() {
        let hvt = transport();
        hvt.open().unwrap();
        assert_eq!(hvt.open(), Err(Errno::EBUSY));
    }

    #[test]
    fn open_after_release_succeeds_again() {
        let hvt = transport();
        let h = hvt.open().unwrap();
        hvt.release(h);
        assert_eq!(hvt.lock().hvt.mode(), Mode::Init);
        hvt.open().unwrap();
    }

    #[test]
    fn open_in_netlink_mode_resets_and_switches_to_chardev() {
        let hvt = transport();
        {
            let mut g = hvt.lock();
            g.hvt.mode = Mode::Netlink;
            g.hvt.outmsg = Some(vec![1, 2, 3]);
        }
        hvt.open().unwrap();
        let g = hvt.lock();
        assert_eq!(g.hvt.mode(), Mode::Chardev);
        assert!(!g.hvt.has_message());
        assert_eq!(g.svc.resets, 1);
    }

    #[test]
    fn open_while_destroy_waits_is_ebadf_and_enodev_once_destroyed() {
        let hvt = transport();
        let h = hvt.open().unwrap();
        let destroyer = destroy_waiting_for_close(&hvt);
        assert_eq!(hvt.open(), Err(Errno::EBADF));
        close_and_join(&hvt, h, destroyer);
        assert_eq!(hvt.open(), Err(Errno::ENODEV));
    }

    #[test]
    fn open_after_destroy_without_opener_is_enodev() {
        let hvt = transport();
        hvt.destroy();
        assert_eq!(hvt.open(), Err(Errno::ENODEV));
    }

    #[test]
    fn interrupted_read_returns_eintr() {
        let hvt = transport();
        let h = hvt.open().unwrap();
        let caller = caller();
        let reader = blocked_read(&hvt, 100, &caller);
        caller.interrupt.fire();
        assert_eq!(reader.join().unwrap(), Err(Errno::EINTR));
        // Nothing was consumed: a message queued now is read normally.
        send(&hvt, b"abcd").unwrap();
        assert_eq!(read(&hvt, h, 100, &Caller::detached(1)).unwrap(), b"abcd");
    }

    #[test]
    fn blocked_read_returns_ebadf_on_destroy() {
        let hvt = transport();
        let h = hvt.open().unwrap();
        let reader = blocked_read(&hvt, 100, &caller());
        let destroyer = destroy_in_background(&hvt);
        assert_eq!(reader.join().unwrap(), Err(Errno::EBADF));
        // The destroyer still waits for the daemon's close.
        wait_for("destroy to wait for the close", || hvt.destroy_waiting());
        assert!(!destroyer.is_finished());
        close_and_join(&hvt, h, destroyer);
    }

    #[test]
    fn two_sleeping_readers_and_one_message_the_first_gets_it_the_second_sleeps_on() {
        // Two readers of one file: in the kernel both are woken and the second may find the
        // slot empty (EAGAIN) or go back to sleep, depending on the race; parked readers are
        // served one message at a time, so the second sleeps on (docs/decisions.md).
        let hvt = transport();
        let h = hvt.open().unwrap();
        let first = blocked_read(&hvt, 100, &caller());
        let second_caller = caller();
        let second = blocked_read(&hvt, 100, &second_caller);
        send(&hvt, b"only one").unwrap();
        assert_eq!(first.join().unwrap().unwrap(), b"only one");
        assert_eq!(hvt.sleeping_readers(), 1);
        send(&hvt, b"the next").unwrap();
        assert_eq!(second.join().unwrap().unwrap(), b"the next");
        let _ = h;
    }

    #[test]
    fn a_sleeper_with_a_small_buffer_gets_einval_and_the_next_gets_the_message() {
        let hvt = transport();
        let h = hvt.open().unwrap();
        let small = blocked_read(&hvt, 4, &caller());
        let large = blocked_read(&hvt, 100, &caller());
        send(&hvt, b"too long for four").unwrap();
        assert_eq!(small.join().unwrap(), Err(Errno::EINVAL));
        assert_eq!(large.join().unwrap().unwrap(), b"too long for four");
        let _ = h;
    }

    #[test]
    fn short_read_returns_einval_and_keeps_message() {
        let hvt = transport();
        let h = hvt.open().unwrap();
        send(&hvt, &[7; 10]).unwrap();
        assert_eq!(read(&hvt, h, 9, &caller()), Err(Errno::EINVAL));
        assert!(hvt.lock().hvt.has_message());
        assert_eq!(read(&hvt, h, 10, &caller()).unwrap(), vec![7; 10]);
    }

    #[test]
    fn read_returns_exact_message_frees_slot_and_runs_on_read_once() {
        let hvt = transport();
        let h = hvt.open().unwrap();
        hvt.lock().svc.echo = true;
        assert_eq!(hvt.write(h, b"ping"), Ok(4));
        assert_eq!(read(&hvt, h, 4096, &caller()).unwrap(), b"ping");
        {
            let g = hvt.lock();
            assert!(!g.hvt.has_message());
            assert_eq!(g.svc.reads_seen, 1);
        }
        // A message queued without a callback does not run the old one again.
        send(&hvt, b"pong").unwrap();
        assert_eq!(read(&hvt, h, 4096, &caller()).unwrap(), b"pong");
        assert_eq!(hvt.lock().svc.reads_seen, 1);
    }

    #[test]
    fn nonblocking_open_still_blocks_in_read() {
        // O_NONBLOCK is not looked at: the transport has no such check (hvt_op_read), and the
        // open flags never reach it.
        let hvt = transport();
        let h = hvt.open().unwrap();
        let reader = blocked_read(&hvt, 100, &caller());
        send(&hvt, b"late").unwrap();
        assert_eq!(reader.join().unwrap().unwrap(), b"late");
        let _ = h;
    }

    #[test]
    fn empty_message_blocks_the_slot_without_waking_readers() {
        // kzalloc(0) is ZERO_SIZE_PTR, not NULL: outmsg is set with outmsg_len 0.
        let hvt = transport();
        let h = hvt.open().unwrap();
        send(&hvt, b"").unwrap();
        assert_eq!(hvt.poll(h, None), 0);
        assert_eq!(send(&hvt, b"x"), Err(Errno::EFAULT));
    }

    #[test]
    fn absurdly_large_write_is_enomem() {
        let hvt = transport();
        let h = hvt.open().unwrap();
        let big = vec![0u8; KMALLOC_MAX_SIZE + 1];
        assert_eq!(hvt.write(h, &big), Err(Errno::ENOMEM));
        assert!(hvt.lock().svc.msgs.is_empty());
    }

    #[test]
    fn write_after_destroy_is_ebadf() {
        let hvt = transport();
        let h = hvt.open().unwrap();
        let destroyer = destroy_waiting_for_close(&hvt);
        assert_eq!(hvt.write(h, b"abcd"), Err(Errno::EBADF));
        assert!(hvt.lock().svc.msgs.is_empty());
        close_and_join(&hvt, h, destroyer);
    }

    #[test]
    fn write_passes_whole_buffer_to_service_and_returns_count() {
        let hvt = transport();
        let h = hvt.open().unwrap();
        assert_eq!(hvt.write(h, b"hello"), Ok(5));
        assert_eq!(hvt.lock().svc.msgs, vec![b"hello".to_vec()]);
    }

    #[test]
    fn write_returns_the_services_errno() {
        let hvt = transport();
        let h = hvt.open().unwrap();
        hvt.lock().svc.answer = Some(Errno::EINVAL);
        assert_eq!(hvt.write(h, b"hello"), Err(Errno::EINVAL));
    }

    #[test]
    fn poll_with_message_reports_in_rdnorm_and_never_pollout() {
        let hvt = transport();
        let h = hvt.open().unwrap();
        assert_eq!(hvt.poll(h, None), 0);
        send(&hvt, b"abcd").unwrap();
        assert_eq!(hvt.poll(h, None), poll_bits::POLLIN | poll_bits::POLLRDNORM);
    }

    #[test]
    fn poll_after_destroy_reports_err_hup() {
        let hvt = transport();
        let h = hvt.open().unwrap();
        send(&hvt, b"abcd").unwrap();
        let destroyer = destroy_waiting_for_close(&hvt);
        assert_eq!(hvt.poll(h, None), poll_bits::POLLERR | poll_bits::POLLHUP);
        close_and_join(&hvt, h, destroyer);
    }

    #[test]
    fn poll_waker_is_woken_by_send_and_by_destroy() {
        let hvt = transport();
        let h = hvt.open().unwrap();
        let notify = Arc::new(CountingNotify::default());
        assert_eq!(hvt.poll(h, Some(PollWaker(notify.clone()))), 0);
        send(&hvt, b"abcd").unwrap();
        assert_eq!(notify.0.load(Ordering::SeqCst), 1);
        read(&hvt, h, 4, &caller()).unwrap();
        assert_eq!(hvt.poll(h, Some(PollWaker(notify.clone()))), 0);
        let destroyer = destroy_waiting_for_close(&hvt);
        assert_eq!(notify.0.load(Ordering::SeqCst), 2);
        close_and_join(&hvt, h, destroyer);
    }

    #[test]
    fn release_drops_message_and_resets_service() {
        let hvt = transport();
        let h = hvt.open().unwrap();
        send(&hvt, b"unread").unwrap();
        hvt.release(h);
        let g = hvt.lock();
        assert_eq!(g.hvt.mode(), Mode::Init);
        assert!(!g.hvt.has_message());
        assert_eq!(g.svc.resets, 1);
    }

    #[test]
    fn destroy_waits_for_release_then_returns() {
        let hvt = transport();
        let h = hvt.open().unwrap();
        let destroyed = Arc::new(Mutex::new(false));
        let destroyer = {
            let hvt = hvt.clone();
            let destroyed = destroyed.clone();
            thread::spawn(move || {
                hvt.destroy();
                *destroyed.lock().unwrap() = true;
            })
        };
        wait_for("destroy to wait for the close", || hvt.destroy_waiting());
        assert!(!*destroyed.lock().unwrap());
        close_and_join(&hvt, h, destroyer);
        let g = hvt.lock();
        // Release in DESTROY keeps the mode and still resets the service.
        assert_eq!(g.hvt.mode(), Mode::Destroy);
        assert_eq!(g.svc.resets, 1);
    }

    #[test]
    fn destroy_without_open_fd_returns_at_once() {
        let hvt = transport();
        hvt.destroy();
        assert_eq!(hvt.lock().hvt.mode(), Mode::Destroy);
    }

    #[test]
    fn send_without_reader_is_einval() {
        let hvt = transport();
        assert_eq!(send(&hvt, b"x"), Err(Errno::EINVAL));
    }

    #[test]
    fn send_after_destroy_is_einval() {
        let hvt = transport();
        hvt.destroy();
        assert_eq!(send(&hvt, b"x"), Err(Errno::EINVAL));
    }

    #[test]
    fn send_with_unread_message_is_efault() {
        let hvt = transport();
        hvt.open().unwrap();
        send(&hvt, b"first").unwrap();
        assert_eq!(send(&hvt, b"second"), Err(Errno::EFAULT));
    }
}
