//! A driver's lock and wait queue, and the signal flag of a request.
//!
//! A kernel driver keeps its state under a lock and sleeps on a wait queue until a condition
//! holds or a signal arrives. Device calls here never sleep on a thread: they park their reply
//! ([`crate::reply`]), and the "signal" is a FUSE_INTERRUPT from the kernel for that request,
//! delivered through the request's [`Interrupt`], which answers a reply parked interruptibly
//! with EINTR.
//!
//! [`WaitState`] is the lock and the wait queue in one: a `Mutex<T>` plus a `Condvar` for the
//! work items that do run on threads (a timer, a removal waiting for the last close), plus the
//! poll registrations that a wake-up must also reach (`wake_up_interruptible` wakes both
//! sleepers and pollers in the kernel).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crate::device::PollWaker;

/// What firing an interrupt runs: answering a parked request with EINTR.
type FireHook = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct InterruptInner {
    fired: AtomicBool,
    /// Run once when the interrupt fires (a request parked interruptibly, crate::reply).
    hook: Mutex<Option<FireHook>>,
}

/// The "signal pending" flag of one request.
///
/// The frontend fires it when the kernel sends FUSE_INTERRUPT; a request sleeping in
/// [`WaitState::wait_interruptible`] then returns EINTR, one that never sleeps is unaffected
/// (as in the kernel, where `signal_pending()` only matters inside an interruptible wait).
#[derive(Clone, Default)]
pub struct Interrupt(Arc<InterruptInner>);

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Interrupt(fired={})", self.is_fired())
    }
}

impl Interrupt {
    pub fn new() -> Interrupt {
        Interrupt::default()
    }

    pub fn is_fired(&self) -> bool {
        self.0.fired.load(Ordering::SeqCst)
    }

    /// Marks the request interrupted and, if it is parked interruptibly, answers it EINTR.
    pub fn fire(&self) {
        self.0.fired.store(true, Ordering::SeqCst);
        let hook = self.0.hook.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(hook) = hook {
            hook();
        }
    }

    /// Arranges for `hook` to run when the interrupt fires. Returns false, having run `hook`
    /// already, when it has fired before: the caller must treat its request as interrupted.
    /// One hook at a time (one request, one park): a second replaces the first.
    pub fn on_fire(&self, hook: FireHook) -> bool {
        let mut slot = self.0.hook.lock().unwrap_or_else(|e| e.into_inner());
        // Checked under the hook lock, and fire() sets the flag before it takes the lock:
        // either fire() finds the hook installed here, or we see the flag and run it.
        if self.is_fired() {
            drop(slot);
            hook();
            return false;
        }
        *slot = Some(hook);
        true
    }
}

/// A driver's state, its lock and its wait queue.
pub struct WaitState<T> {
    state: Mutex<T>,
    queue: Condvar,
    /// Threads waiting on `queue`: a wake-up with nobody there costs no futex call.
    sleepers: AtomicUsize,
    pollers: Mutex<Vec<PollWaker>>,
}

impl<T: Send + 'static> WaitState<T> {
    pub fn new(state: T) -> Arc<WaitState<T>> {
        Arc::new(WaitState {
            state: Mutex::new(state),
            queue: Condvar::new(),
            sleepers: AtomicUsize::new(0),
            pollers: Mutex::new(Vec::new()),
        })
    }

    /// Takes the driver lock. A panic while holding it must not wedge the device forever,
    /// so a poisoned lock is taken over as it is (the state machines never leave a
    /// half-written state across an operation that could panic).
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps until `done` holds or `deadline` passes (no interruption: used by work items
    /// such as the driver's timeout timer). Returns the guard and whether `done` held.
    pub fn wait_until<'a>(
        &'a self,
        mut guard: MutexGuard<'a, T>,
        deadline: Option<Instant>,
        mut done: impl FnMut(&mut T) -> bool,
    ) -> (MutexGuard<'a, T>, bool) {
        loop {
            if done(&mut guard) {
                return (guard, true);
            }
            // Counted under the lock, before the wait releases it: a waker that changes the
            // state under the lock afterwards sees the count.
            self.sleepers.fetch_add(1, Ordering::SeqCst);
            match deadline {
                None => guard = self.queue.wait(guard).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        self.sleepers.fetch_sub(1, Ordering::SeqCst);
                        return (guard, false);
                    }
                    guard = self
                        .queue
                        .wait_timeout(guard, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
            self.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Keeps a poll registration until the next [`WaitState::wake_all`].
    pub fn add_poller(&self, waker: PollWaker) {
        self.pollers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(waker);
    }

    /// `wake_up_interruptible(&queue)`: wakes every sleeper and every poller. Call it with
    /// the driver lock held or just after changing the state under it.
    pub fn wake_all(&self) {
        if self.sleepers.load(Ordering::SeqCst) != 0 {
            self.queue.notify_all();
        }
        let pollers = std::mem::take(&mut *self.pollers.lock().unwrap_or_else(|e| e.into_inner()));
        for poller in pollers {
            poller.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn wake_all_ends_a_wait_whose_condition_now_holds() {
        let ws = WaitState::new(0u32);
        let waiter = {
            let ws = ws.clone();
            thread::spawn(move || {
                let guard = ws.lock();
                let (guard, done) = ws.wait_until(guard, None, |n| *n == 7);
                (*guard, done)
            })
        };
        // Only once it sleeps: a wake-up with nobody counted sends nothing.
        while ws.sleepers.load(Ordering::SeqCst) == 0 {
            thread::yield_now();
        }
        *ws.lock() = 7;
        ws.wake_all();
        assert_eq!(waiter.join().unwrap(), (7, true));
    }

    #[test]
    fn a_wait_with_a_deadline_gives_up_and_leaves_no_sleeper_counted() {
        let ws = WaitState::new(false);
        let guard = ws.lock();
        let deadline = Instant::now() + Duration::from_millis(1);
        let (_guard, done) = ws.wait_until(guard, Some(deadline), |ready| *ready);
        assert!(!done);
        assert_eq!(ws.sleepers.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn firing_runs_the_hook_once_and_a_late_hook_runs_at_once() {
        let interrupt = Interrupt::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let counter = runs.clone();
        assert!(interrupt.on_fire(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        })));
        interrupt.fire();
        interrupt.fire();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let counter = runs.clone();
        assert!(!interrupt.on_fire(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        })));
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }
}
