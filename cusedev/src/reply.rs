//! Answers that may come later: how a device call sleeps without holding a thread.
//!
//! In the kernel a driver's `read` that must wait puts `current` on a wait queue and sleeps; the
//! task is parked, not the CPU. Here the "task" is a FUSE/CUSE request, and parking it must not
//! park a server thread either: an lguest Launcher sleeps in `read(2)` by design, and a thousand
//! of them must not need a thousand threads. So every `read`, `write` and `ioctl` of a
//! [`crate::device::Device`] gets a [`Pending`] reply object, as fuser hands its handlers a
//! `ReplyData`:
//!
//! - answered at once with [`Pending::answer`] (or `ok` / `err`) on the thread that read the
//!   request, which is the common case;
//! - or parked: [`Pending::park_interruptible`] (the kernel's `wait_event_interruptible`) or
//!   [`Pending::park`] (`wait_for_completion`: signals do not end it) gives a [`Parked`] that
//!   the device keeps with its state, usually in a [`WaitList`]. Whoever later has the answer
//!   (the host's packet, another process's write) takes it back with [`Parked::claim`] and
//!   answers it, on its own thread.
//!
//! The reply is sent exactly once. A parked interruptible request whose caller gets a signal
//! (FUSE_INTERRUPT) is answered EINTR by the interrupt itself, and a later `claim` finds nothing:
//! whatever the device was about to hand that request (a queued message) stays with the device,
//! as it does in the kernel when `wait_event_interruptible` returns -ERESTARTSYS. A reply that is
//! dropped without an answer (a device bug, a panic unwinding through the device) answers EIO
//! and says so in the log, so a caller never waits forever for a request nobody holds.
//!
//! Read next: [`crate::device`] (which calls get a `Pending`), then
//! [`crate::devices::hvutil_transport`] (a wait list in use), then [`crate::fuse::session`]
//! (where the replies go).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::device::Errno;
use crate::wait::Interrupt;

/// Where an answer goes: the frontend's writer for one request.
pub type Sink<T> = Box<dyn FnOnce(Result<T, Errno>) + Send>;

/// A request waiting for its answer. Answer it once; parking it hands it to the device.
#[must_use = "a request must be answered or parked; dropping it answers EIO"]
pub struct Pending<T: 'static> {
    sink: Option<Sink<T>>,
    interrupt: Interrupt,
}

/// A parked request: kept by the device until it has the answer (see [`Parked::claim`]).
pub struct Parked<T: 'static> {
    slot: Arc<Mutex<Option<Sink<T>>>>,
    interrupt: Interrupt,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: Send + 'static> Pending<T> {
    /// A request whose answer goes to `sink`; `interrupt` fires when its caller gets a signal.
    pub fn new(interrupt: Interrupt, sink: impl FnOnce(Result<T, Errno>) + Send + 'static) -> Self {
        Pending {
            sink: Some(Box::new(sink)),
            interrupt,
        }
    }

    /// Sends the answer.
    pub fn answer(mut self, result: Result<T, Errno>) {
        if let Some(sink) = self.sink.take() {
            sink(result);
        }
    }

    /// Answers with a value.
    pub fn ok(self, value: T) {
        self.answer(Ok(value));
    }

    /// Answers with an errno.
    pub fn err(self, errno: Errno) {
        self.answer(Err(errno));
    }

    /// The caller's signal flag (the same one [`crate::device::Caller::interrupt`] carries).
    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    /// `wait_event_interruptible`: parks the request; a signal ends it with EINTR. Returns
    /// `None` when the caller was interrupted already (the EINTR has been sent), as the
    /// kernel's wait returns at once when a signal is pending and the condition is false.
    pub fn park_interruptible(mut self) -> Option<Parked<T>> {
        let sink = self.sink.take()?;
        let slot = Arc::new(Mutex::new(Some(sink)));
        let weak = Arc::downgrade(&slot);
        let interrupt = self.interrupt.clone();
        let armed = interrupt.on_fire(Box::new(move || {
            // Whoever takes the sink answers: either this EINTR or the device's claim.
            let sink = weak.upgrade().and_then(|slot| lock(&slot).take());
            if let Some(sink) = sink {
                sink(Err(Errno::EINTR));
            }
        }));
        let parked = Parked { slot, interrupt };
        if armed {
            Some(parked)
        } else {
            // Fired before we could arm it: the hook has run already and sent EINTR.
            None
        }
    }

    /// `wait_for_completion`: parks the request; signals do not end it.
    pub fn park(mut self) -> Parked<T> {
        Parked {
            slot: Arc::new(Mutex::new(self.sink.take())),
            interrupt: self.interrupt.clone(),
        }
    }
}

impl<T: 'static> Drop for Pending<T> {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take() {
            log::error!("a device dropped a request without answering it; answering EIO");
            sink(Err(Errno::EIO));
        }
    }
}

impl<T: Send + 'static> Parked<T> {
    /// Takes the request back to answer it, or `None` if it was answered meanwhile (its
    /// caller was interrupted). Between `claim` and the answer nothing else can answer it.
    pub fn claim(self) -> Option<Pending<T>> {
        let sink = lock(&self.slot).take()?;
        Some(Pending {
            sink: Some(sink),
            interrupt: self.interrupt.clone(),
        })
    }

    /// Whether the request still waits (has not been interrupted or claimed).
    pub fn is_waiting(&self) -> bool {
        lock(&self.slot).is_some()
    }
}

impl<T: 'static> Drop for Parked<T> {
    fn drop(&mut self) {
        let sink = lock(&self.slot).take();
        if let Some(sink) = sink {
            log::error!("a device dropped a parked request without answering it; answering EIO");
            sink(Err(Errno::EIO));
        }
    }
}

/// A wait queue of parked requests, each with what it needs once woken (a read's count, ...).
///
/// Woken in the order they went to sleep. Interrupted requests leave a dead entry behind,
/// which is skipped on wake-up and swept from time to time, so a queue of sleepers that keep
/// being interrupted does not grow without bound.
pub struct WaitList<A, T: 'static> {
    waiters: VecDeque<(A, Parked<T>)>,
    /// Sweep dead entries once the queue reaches this length.
    sweep_at: usize,
}

impl<A, T: Send + 'static> Default for WaitList<A, T> {
    fn default() -> Self {
        WaitList {
            waiters: VecDeque::new(),
            sweep_at: 16,
        }
    }
}

impl<A, T: Send + 'static> WaitList<A, T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// `wait_event_interruptible` for `reply`, remembering `args` for when it is woken.
    pub fn park_interruptible(&mut self, args: A, reply: Pending<T>) {
        if let Some(parked) = reply.park_interruptible() {
            self.push(args, parked);
        }
    }

    /// An uninterruptible wait for `reply`.
    pub fn park(&mut self, args: A, reply: Pending<T>) {
        let parked = reply.park();
        self.push(args, parked);
    }

    fn push(&mut self, args: A, parked: Parked<T>) {
        if self.waiters.len() >= self.sweep_at {
            self.waiters.retain(|(_, parked)| parked.is_waiting());
            // Amortised: the next sweep comes after as many new sleepers as are left.
            self.sweep_at = (self.waiters.len() * 2).max(16);
        }
        self.waiters.push_back((args, parked));
    }

    /// Wakes the longest sleeper still waiting: its arguments and its request, to answer.
    pub fn wake_one(&mut self) -> Option<(A, Pending<T>)> {
        while let Some((args, parked)) = self.waiters.pop_front() {
            if let Some(reply) = parked.claim() {
                return Some((args, reply));
            }
        }
        None
    }

    /// How many requests wait (interrupted ones not counted).
    pub fn waiting(&self) -> usize {
        self.waiters.iter().filter(|(_, p)| p.is_waiting()).count()
    }

    /// Whether nobody waits.
    pub fn is_empty(&self) -> bool {
        self.waiting() == 0
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A blocking view of a `Pending` for unit tests that call device methods directly.

    use super::*;
    use std::sync::mpsc;

    /// Where a test's answer arrives.
    pub(crate) type Answers<T> = mpsc::Receiver<Result<T, Errno>>;

    /// A request for `interrupt` and the receiving end of its answer.
    pub(crate) fn pending<T: Send + 'static>(interrupt: &Interrupt) -> (Pending<T>, Answers<T>) {
        let (tx, rx) = mpsc::channel();
        let reply = Pending::new(interrupt.clone(), move |result| {
            let _ = tx.send(result);
        });
        (reply, rx)
    }

    /// Calls `call` with a fresh request and waits for its answer, however it comes.
    pub(crate) fn answer_of<T: Send + 'static>(
        interrupt: &Interrupt,
        call: impl FnOnce(Pending<T>),
    ) -> Result<T, Errno> {
        let (reply, rx) = pending(interrupt);
        call(reply);
        rx.recv().unwrap_or(Err(Errno::EIO))
    }

    /// The answer if it was given during `call`, `None` if the request was parked.
    pub(crate) fn answered_now<T: Send + 'static>(
        interrupt: &Interrupt,
        call: impl FnOnce(Pending<T>),
    ) -> (Option<Result<T, Errno>>, Answers<T>) {
        let (reply, rx) = pending(interrupt);
        call(reply);
        (rx.try_recv().ok(), rx)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn an_answer_is_delivered_once() {
        let interrupt = Interrupt::new();
        let (reply, rx) = pending::<u32>(&interrupt);
        reply.ok(7);
        assert_eq!(rx.recv().unwrap(), Ok(7));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_dropped_request_answers_eio() {
        let interrupt = Interrupt::new();
        let (reply, rx) = pending::<u32>(&interrupt);
        drop(reply);
        assert_eq!(rx.recv().unwrap(), Err(Errno::EIO));
        let (reply, rx) = pending::<u32>(&interrupt);
        drop(reply.park());
        assert_eq!(rx.recv().unwrap(), Err(Errno::EIO));
    }

    #[test]
    fn interrupting_a_parked_request_answers_eintr_and_claim_finds_nothing() {
        let interrupt = Interrupt::new();
        let (reply, rx) = pending::<u32>(&interrupt);
        let parked = reply.park_interruptible().unwrap();
        interrupt.fire();
        assert_eq!(rx.recv().unwrap(), Err(Errno::EINTR));
        assert!(!parked.is_waiting());
        assert!(parked.claim().is_none());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn parking_an_interrupted_request_answers_eintr_at_once() {
        let interrupt = Interrupt::new();
        interrupt.fire();
        let (reply, rx) = pending::<u32>(&interrupt);
        assert!(reply.park_interruptible().is_none());
        assert_eq!(rx.recv().unwrap(), Err(Errno::EINTR));
    }

    #[test]
    fn an_uninterruptible_park_ignores_the_signal() {
        let interrupt = Interrupt::new();
        let (reply, rx) = pending::<u32>(&interrupt);
        let parked = reply.park();
        interrupt.fire();
        assert!(rx.try_recv().is_err());
        parked.claim().unwrap().ok(3);
        assert_eq!(rx.recv().unwrap(), Ok(3));
    }

    #[test]
    fn a_claimed_request_is_not_answered_by_a_later_interrupt() {
        let interrupt = Interrupt::new();
        let (reply, rx) = pending::<u32>(&interrupt);
        let parked = reply.park_interruptible().unwrap();
        let claimed = parked.claim().unwrap();
        interrupt.fire();
        assert!(rx.try_recv().is_err());
        claimed.ok(9);
        assert_eq!(rx.recv().unwrap(), Ok(9));
    }

    #[test]
    fn wait_list_wakes_in_order_and_skips_the_interrupted() {
        let mut list = WaitList::<u32, u32>::new();
        let mut receivers = Vec::new();
        let mut interrupts = Vec::new();
        for i in 0..3 {
            let interrupt = Interrupt::new();
            let (reply, rx) = pending::<u32>(&interrupt);
            list.park_interruptible(i, reply);
            receivers.push(rx);
            interrupts.push(interrupt);
        }
        interrupts[0].fire();
        assert_eq!(list.waiting(), 2);
        let (args, reply) = list.wake_one().unwrap();
        assert_eq!(args, 1);
        reply.ok(10);
        assert_eq!(receivers[0].recv().unwrap(), Err(Errno::EINTR));
        assert_eq!(receivers[1].recv().unwrap(), Ok(10));
        assert_eq!(list.waiting(), 1);
    }

    #[test]
    fn wait_list_sweeps_interrupted_sleepers() {
        let mut list = WaitList::<(), u32>::new();
        for _ in 0..10_000 {
            let interrupt = Interrupt::new();
            let (reply, _rx) = pending::<u32>(&interrupt);
            list.park_interruptible((), reply);
            interrupt.fire();
        }
        assert!(
            list.waiters.len() <= 32,
            "{} entries kept",
            list.waiters.len()
        );
        assert!(list.is_empty());
    }
}
