//! Sleeping the way a driver sleeps: `wait_event_interruptible` for userspace threads.
//!
//! A kernel driver keeps its state under a lock and sleeps on a wait queue until a condition
//! holds or a signal arrives. Here the "signal" is a FUSE_INTERRUPT from the kernel for the
//! request being served, delivered through the request's [`Interrupt`]. Device calls do not
//! sleep on threads any more (they park their reply, [`crate::reply`]); [`WaitState`] remains the
//! driver lock and the wait queue of the work items (timers, removal) that do run on threads.
//!
//! [`WaitState`] is the lock and the wait queue in one: a `Mutex<T>` plus a `Condvar` plus the
//! poll registrations that a wake-up must also reach (`wake_up_interruptible` wakes both
//! sleeping readers and pollers in the kernel).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crate::device::{Errno, PollWaker};

/// Something an interrupt can kick awake. Implemented by [`WaitState`]; kept as a trait
/// object so an [`Interrupt`] does not need to know the state type.
trait Kick: Send + Sync {
    fn kick(&self);
}

/// What firing an interrupt runs: answering a parked request with EINTR.
type FireHook = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct InterruptInner {
    fired: AtomicBool,
    /// The wait queue the request is sleeping on right now, if any.
    sleeping_on: Mutex<Option<Arc<dyn Kick>>>,
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

    /// Marks the request interrupted and wakes it if it sleeps.
    pub fn fire(&self) {
        // Order matters: the flag is set before we look for a sleeper. A sleeper registers
        // itself before it checks the flag, so either we see its registration and kick it
        // (the kick takes its lock, so it cannot be between check and sleep), or it sees
        // the flag before it sleeps.
        self.0.fired.store(true, Ordering::SeqCst);
        let sleeper = self
            .0
            .sleeping_on
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(queue) = sleeper {
            queue.kick();
        }
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

    fn set_sleeping_on(&self, queue: Option<Arc<dyn Kick>>) {
        *self.0.sleeping_on.lock().unwrap_or_else(|e| e.into_inner()) = queue;
    }
}

/// A driver's state, its lock and its wait queue.
pub struct WaitState<T> {
    state: Mutex<T>,
    queue: Condvar,
    pollers: Mutex<Vec<PollWaker>>,
}

impl<T: Send + 'static> WaitState<T> {
    pub fn new(state: T) -> Arc<WaitState<T>> {
        Arc::new(WaitState {
            state: Mutex::new(state),
            queue: Condvar::new(),
            pollers: Mutex::new(Vec::new()),
        })
    }

    /// Takes the driver lock. A panic while holding it must not wedge the device forever,
    /// so a poisoned lock is taken over as it is (the state machines never leave a
    /// half-written state across an operation that could panic).
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `wait_event_interruptible(queue, done(state))`: sleeps until `done` holds, or returns
    /// EINTR when the caller's request is interrupted first.
    pub fn wait_interruptible<'a>(
        self: &'a Arc<Self>,
        mut guard: MutexGuard<'a, T>,
        interrupt: &Interrupt,
        mut done: impl FnMut(&mut T) -> bool,
    ) -> Result<MutexGuard<'a, T>, Errno> {
        if done(&mut guard) {
            return Ok(guard);
        }
        interrupt.set_sleeping_on(Some(self.clone() as Arc<dyn Kick>));
        let result = loop {
            if done(&mut guard) {
                break Ok(());
            }
            if interrupt.is_fired() {
                break Err(Errno::EINTR);
            }
            guard = self.queue.wait(guard).unwrap_or_else(|e| e.into_inner());
        };
        interrupt.set_sleeping_on(None);
        result.map(|()| guard)
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
            match deadline {
                None => guard = self.queue.wait(guard).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return (guard, false);
                    }
                    guard = self
                        .queue
                        .wait_timeout(guard, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
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
        self.queue.notify_all();
        let pollers = std::mem::take(&mut *self.pollers.lock().unwrap_or_else(|e| e.into_inner()));
        for poller in pollers {
            poller.wake();
        }
    }
}

impl<T: Send> Kick for WaitState<T> {
    fn kick(&self) {
        // Taking the lock orders this wake-up after the sleeper's flag check (see fire()).
        drop(self.state.lock().unwrap_or_else(|e| e.into_inner()));
        self.queue.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn interrupted_wait_returns_eintr() {
        let ws = WaitState::new(false);
        let interrupt = Interrupt::new();
        let waiter = {
            let ws = ws.clone();
            let interrupt = interrupt.clone();
            thread::spawn(move || {
                let guard = ws.lock();
                ws.wait_interruptible(guard, &interrupt, |ready| *ready)
                    .map(|_| ())
            })
        };
        interrupt.fire();
        assert_eq!(waiter.join().unwrap(), Err(Errno::EINTR));
    }

    #[test]
    fn satisfied_wait_ignores_a_fired_interrupt() {
        let ws = WaitState::new(true);
        let interrupt = Interrupt::new();
        interrupt.fire();
        let guard = ws.lock();
        assert!(ws
            .wait_interruptible(guard, &interrupt, |ready| *ready)
            .is_ok());
    }

    #[test]
    fn wake_all_ends_a_wait_whose_condition_now_holds() {
        let ws = WaitState::new(0u32);
        let waiter = {
            let ws = ws.clone();
            thread::spawn(move || {
                let guard = ws.lock();
                let guard = ws
                    .wait_interruptible(guard, &Interrupt::new(), |n| *n == 7)
                    .unwrap();
                *guard
            })
        };
        *ws.lock() = 7;
        ws.wake_all();
        assert_eq!(waiter.join().unwrap(), 7);
    }
}
