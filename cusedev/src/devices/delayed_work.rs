//! Deferred work for device models: the kernel's `struct delayed_work`, one thread per item.
//!
//! Kernel drivers put off work in two ways that matter to the util services: a timeout
//! (`schedule_delayed_work(&fcopy_timeout_work, 30 * HZ)`, drivers/hv/hv_fcopy.c 6.1) and a
//! "run this soon, elsewhere" poke (`tasklet_schedule(&channel->callback_event)` when a driver
//! re-polls its channel). Both are a [`DelayedWork`]: a function, a thread that runs it, and at
//! most one pending expiry. A zero delay makes it a tasklet.
//!
//! The semantics are the workqueue's, because the drivers' behaviour hangs on them:
//!
//! * [`DelayedWork::schedule`] does nothing and returns false when the work is already pending
//!   (the old expiry stands), like `schedule_delayed_work()`;
//! * [`DelayedWork::cancel`] returns whether it took a *pending* expiry away. Once the expiry
//!   has passed and the function has started, it is no longer pending: a cancel then returns
//!   false and the function runs to its end. That window is real in the kernel (hv_fcopy's
//!   `cancel_delayed_work_sync()` returning false while the timeout work is running) and the
//!   drivers' "the timer already fired" branches exist because of it;
//! * [`DelayedWork::cancel_sync`] also waits for a running function to finish, like
//!   `cancel_delayed_work_sync()`. It must not be called while holding a lock the function
//!   takes: device models call it only from teardown, with no lock held. [`cancel`] never
//!   blocks and is safe under the driver lock.
//!
//! No busy loops: the thread sleeps on a condition variable until the expiry or a change.
//!
//! [`cancel`]: DelayedWork::cancel

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle, ThreadId};
use std::time::{Duration, Instant};

/// One deferred function and the thread that runs it. Dropping it stops the thread (after a
/// running function returns); a pending expiry is then never run.
pub struct DelayedWork {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default, Clone, Copy)]
enum Sleep {
    /// Running the work or checking the state: it looks at `expires` before sleeping again.
    #[default]
    Awake,
    /// Nothing scheduled: only a notify wakes it.
    Indefinitely,
    /// Until this instant, when it re-checks `expires` anyway.
    Until(Instant),
}

#[derive(Default)]
struct State {
    /// `Some` while pending: when to run.
    expires: Option<Instant>,
    /// The function is running right now.
    running: bool,
    shutdown: bool,
    /// The thread that runs the function (so that `cancel_sync` from inside it does not wait
    /// for itself).
    worker: Option<ThreadId>,
    /// How the work thread sleeps right now. A timer that is re-armed and cancelled on every
    /// transaction (the 30 s daemon timeout) must not cost two thread wake-ups each time: the
    /// thread is only woken when a new expiry comes before the one it already sleeps until.
    sleep: Sleep,
    /// Test hook: stop a firing between "no longer pending" and "function runs".
    #[cfg(test)]
    hold: bool,
    #[cfg(test)]
    held: bool,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).unwrap_or_else(|e| e.into_inner())
    }
}

/// The function a work thread runs, handed to it once it is running ([`Unbound::bind`]).
type WorkFn = Box<dyn Fn() + Send>;

/// A work thread that runs, but has no function yet: the half of [`DelayedWork`] that can
/// fail. A driver built inside `Arc::new_cyclic` starts its threads first, where a refusal
/// can still be returned, and binds them to itself (its `Weak`) inside, where nothing fails.
/// Dropped unbound, the thread ends.
pub struct Unbound {
    inner: Arc<Inner>,
    work: mpsc::SyncSender<WorkFn>,
}

impl Unbound {
    /// Gives the thread its function: the work item is ready to be scheduled.
    pub fn bind(self, work: impl Fn() + Send + 'static) -> DelayedWork {
        // The thread waits on the other end until this arrives or we are dropped; it can
        // only be gone if it panicked, and then `run` never starts: the item never fires,
        // which is logged there.
        let _ = self.work.send(Box::new(work));
        DelayedWork { inner: self.inner }
    }

    /// A work item that calls `work` on the driver `owner` points to, while it still
    /// exists. Drivers own their work items, so the item holds them weakly: a strong
    /// reference would keep a driver alive through its own timer.
    pub fn bind_driver<T: Send + Sync + 'static>(
        self,
        owner: std::sync::Weak<T>,
        work: fn(&T),
    ) -> DelayedWork {
        self.bind(move || {
            if let Some(owner) = owner.upgrade() {
                work(&owner);
            }
        })
    }
}

impl DelayedWork {
    /// Starts the thread of a work item (named `name`), to be given its function with
    /// [`Unbound::bind`]. Fails when the system refuses a thread (`pthread_create`'s
    /// EAGAIN: a pids cgroup limit, `threads-max`, no memory); the error names the thread.
    pub fn spawn(name: &str) -> io::Result<Unbound> {
        let inner = Arc::new(Inner {
            name: name.to_owned(),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let thread_inner = inner.clone();
        // A rendezvous channel: the function arrives once, before anything can schedule it.
        let (work_tx, work_rx) = mpsc::sync_channel::<WorkFn>(1);
        let handle = spawn_named(name, move || {
            if let Ok(work) = work_rx.recv() {
                run(&thread_inner, &*work);
            }
        })?;
        inner.lock().worker = Some(handle.thread().id());
        Ok(Unbound {
            inner,
            work: work_tx,
        })
    }

    /// Creates the work item and its thread (named `name`): [`DelayedWork::spawn`] and
    /// [`Unbound::bind`] at once. `work` runs on that thread, with no lock of this module
    /// held; it may take the driver lock.
    pub fn new(name: &str, work: impl Fn() + Send + 'static) -> io::Result<DelayedWork> {
        Ok(DelayedWork::spawn(name)?.bind(work))
    }

    /// `schedule_delayed_work(work, delay)`: runs the function once `delay` has passed, unless
    /// it is already pending, in which case nothing changes and false is returned. A function
    /// that is running does not count as pending: it will run again.
    pub fn schedule(&self, delay: Duration) -> bool {
        let mut state = self.inner.lock();
        if state.shutdown || state.expires.is_some() {
            return false;
        }
        let expires = Instant::now() + delay;
        state.expires = Some(expires);
        let wakes_in_time = match state.sleep {
            Sleep::Awake => true,
            Sleep::Indefinitely => false,
            Sleep::Until(wake) => wake <= expires,
        };
        if !wakes_in_time {
            self.inner.changed.notify_all();
        }
        true
    }

    /// `cancel_delayed_work()`: takes a pending expiry away and says whether there was one.
    /// Does not wait for a running function. Never blocks: safe under the driver lock.
    pub fn cancel(&self) -> bool {
        let mut state = self.inner.lock();
        // No wake-up: a thread sleeping until the old expiry finds nothing due and sleeps on.
        state.expires.take().is_some()
    }

    /// `cancel_delayed_work_sync()`: [`DelayedWork::cancel`], then waits until a running
    /// function has returned. Call it with no lock held that the function takes.
    pub fn cancel_sync(&self) -> bool {
        let mut state = self.inner.lock();
        let was_pending = state.expires.take().is_some();
        self.inner.changed.notify_all();
        if state.worker == Some(thread::current().id()) {
            // Called from the function itself: it is "running" but cannot be waited for.
            return was_pending;
        }
        while state.running {
            state = self.inner.wait(state);
        }
        was_pending
    }

    /// `delayed_work_pending()`.
    pub fn is_pending(&self) -> bool {
        self.inner.lock().expires.is_some()
    }

    /// Stops the thread: a pending expiry is dropped, a running function finishes, later
    /// `schedule` calls do nothing. Used when the device goes away.
    pub fn shutdown(&self) {
        let mut state = self.inner.lock();
        state.shutdown = true;
        state.expires = None;
        self.inner.changed.notify_all();
    }

    /// Test hook: the next firing stops after it stopped being pending and before the function
    /// runs, until [`DelayedWork::release_hold`]. That is the kernel's window in which
    /// `cancel_delayed_work_sync()` returns false because the work is already running.
    /// Test hook: waits until the work thread sleeps with a deadline (not merely started).
    #[cfg(test)]
    pub(crate) fn wait_until_sleeping_with_deadline(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(self.inner.lock().sleep, Sleep::Until(_)) {
            assert!(
                Instant::now() < deadline,
                "the work thread never went to sleep"
            );
            thread::yield_now();
        }
    }

    #[cfg(test)]
    pub(crate) fn hold_next_firing(&self) {
        self.inner.lock().hold = true;
    }

    /// Test hook: waits until a firing is stopped by [`DelayedWork::hold_next_firing`].
    #[cfg(test)]
    pub(crate) fn wait_until_held(&self) {
        let mut state = self.inner.lock();
        while !state.held {
            state = self.inner.wait(state);
        }
    }

    /// Test hook: lets a held firing run its function.
    #[cfg(test)]
    pub(crate) fn release_hold(&self) {
        let mut state = self.inner.lock();
        state.hold = false;
        self.inner.changed.notify_all();
    }
}

impl Drop for DelayedWork {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for DelayedWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.inner.lock();
        f.debug_struct("DelayedWork")
            .field("name", &self.inner.name)
            .field("pending", &state.expires.is_some())
            .field("running", &state.running)
            .finish()
    }
}

/// Starts a thread of a device model: `thread::Builder::spawn`, with an error that names
/// the thread, and which unit tests can make fail on their own thread
/// ([`testing::refuse_spawns`]) as a pids limit makes it fail for real.
pub(crate) fn spawn_named(
    name: &str,
    f: impl FnOnce() + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    #[cfg(test)]
    let refused = testing::take_refusal().then(|| io::Error::from_raw_os_error(libc::EAGAIN));
    #[cfg(not(test))]
    let refused = None;
    match refused {
        Some(e) => Err(e),
        None => thread::Builder::new().name(name.to_owned()).spawn(f),
    }
    .map_err(|e| io::Error::new(e.kind(), format!("cannot start the thread {name}: {e}")))
}

/// Test hook: thread creation refused, as `pthread_create` refuses it (EAGAIN).
#[cfg(test)]
pub(crate) mod testing {
    use std::cell::Cell;

    thread_local! {
        /// Spawns to let through before refusing, and how many to refuse then.
        static PLAN: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    }

    /// On this thread, the next `allowed` work threads start and the `refused` after them
    /// fail with EAGAIN. Per thread, so tests running in parallel are not affected.
    pub(crate) fn refuse_spawns(allowed: usize, refused: usize) {
        PLAN.with(|plan| plan.set((allowed, refused)));
    }

    pub(super) fn take_refusal() -> bool {
        PLAN.with(|plan| match plan.get() {
            (0, 0) => false,
            (0, refused) => {
                plan.set((0, refused - 1));
                true
            }
            (allowed, refused) => {
                plan.set((allowed - 1, refused));
                false
            }
        })
    }
}

/// The work thread: sleep until an expiry passes, run the function, repeat until shutdown.
fn run(inner: &Inner, work: &dyn Fn()) {
    let mut state = inner.lock();
    loop {
        if state.shutdown {
            return;
        }
        let Some(expires) = state.expires else {
            state.sleep = Sleep::Indefinitely;
            state = inner.wait(state);
            state.sleep = Sleep::Awake;
            continue;
        };
        let now = Instant::now();
        if now < expires {
            state.sleep = Sleep::Until(expires);
            state = inner
                .changed
                .wait_timeout(state, expires - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            state.sleep = Sleep::Awake;
            continue;
        }
        // From here on the work is running, not pending: a cancel returns false.
        state.expires = None;
        state.running = true;
        #[cfg(test)]
        {
            while state.hold && !state.shutdown {
                state.held = true;
                inner.changed.notify_all();
                state = inner.wait(state);
            }
            state.held = false;
        }
        drop(state);
        if catch_unwind(AssertUnwindSafe(work)).is_err() {
            log::error!("work item {} panicked; it stays usable", inner.name);
        }
        state = inner.lock();
        state.running = false;
        inner.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn counter_work(name: &str) -> (DelayedWork, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let work = DelayedWork::new(name, move || {
            let _ = tx.lock().unwrap().send(());
        })
        .unwrap();
        (work, rx)
    }

    #[test]
    fn cancelled_then_rearmed_earlier_work_runs_at_the_earlier_expiry() {
        // The thread sleeps until the hour is up; the new, earlier expiry must wake it.
        let (work, ran) = counter_work("dw-test-earlier");
        assert!(work.schedule(Duration::from_secs(3600)));
        work.wait_until_sleeping_with_deadline();
        assert!(work.cancel());
        assert!(work.schedule(Duration::from_millis(10)));
        ran.recv_timeout(Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn cancelled_then_rearmed_later_work_runs_once_at_the_later_expiry() {
        // The thread wakes at the first expiry, finds the later one and sleeps on.
        let (work, ran) = counter_work("dw-test-later");
        assert!(work.schedule(Duration::from_millis(20)));
        work.wait_until_sleeping_with_deadline();
        assert!(work.cancel());
        let rearmed = Instant::now();
        assert!(work.schedule(Duration::from_millis(120)));
        ran.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(rearmed.elapsed() >= Duration::from_millis(120));
        assert!(ran.recv_timeout(Duration::from_millis(50)).is_err());
    }

    #[test]
    fn scheduled_work_runs_once_after_its_delay() {
        let (work, ran) = counter_work("dw-test-run");
        assert!(work.schedule(Duration::from_millis(10)));
        ran.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(!work.is_pending());
        assert!(ran.recv_timeout(Duration::from_millis(50)).is_err());
    }

    #[test]
    fn scheduling_pending_work_again_returns_false_and_keeps_the_expiry() {
        let (work, _ran) = counter_work("dw-test-twice");
        assert!(work.schedule(Duration::from_secs(3600)));
        assert!(!work.schedule(Duration::ZERO));
        assert!(work.is_pending());
    }

    #[test]
    fn cancel_of_pending_work_returns_true_and_it_never_runs() {
        let (work, ran) = counter_work("dw-test-cancel");
        assert!(work.schedule(Duration::from_millis(200)));
        assert!(work.cancel());
        assert!(!work.cancel());
        assert!(ran.recv_timeout(Duration::from_millis(400)).is_err());
    }

    #[test]
    fn cancel_of_a_firing_work_returns_false_and_the_work_still_runs() {
        let (work, ran) = counter_work("dw-test-firing");
        work.hold_next_firing();
        assert!(work.schedule(Duration::ZERO));
        work.wait_until_held();
        assert!(!work.cancel());
        work.release_hold();
        ran.recv_timeout(Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn cancel_sync_waits_for_a_running_work() {
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let (finish_tx, finish_rx) = mpsc::channel::<()>();
        let (started_tx, finish_rx) = (Mutex::new(started_tx), Mutex::new(finish_rx));
        let done = Arc::new(Mutex::new(false));
        let done_in_work = done.clone();
        let work = DelayedWork::new("dw-test-sync", move || {
            let _ = started_tx.lock().unwrap().send(());
            let _ = finish_rx.lock().unwrap().recv();
            *done_in_work.lock().unwrap() = true;
        })
        .unwrap();
        work.schedule(Duration::ZERO);
        started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        finish_tx.send(()).unwrap();
        assert!(!work.cancel_sync());
        assert!(*done.lock().unwrap());
    }

    #[test]
    fn work_can_be_rescheduled_from_inside_itself() {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let slot: Arc<Mutex<Option<Arc<DelayedWork>>>> = Arc::new(Mutex::new(None));
        let slot_in_work = slot.clone();
        let runs = Arc::new(Mutex::new(0));
        let runs_in_work = runs.clone();
        let work = Arc::new(
            DelayedWork::new("dw-test-resched", move || {
                let mut runs = runs_in_work.lock().unwrap();
                *runs += 1;
                if *runs < 3 {
                    if let Some(me) = slot_in_work.lock().unwrap().as_ref() {
                        assert!(me.schedule(Duration::ZERO));
                    }
                } else {
                    let _ = tx.lock().unwrap().send(());
                }
            })
            .unwrap(),
        );
        *slot.lock().unwrap() = Some(work.clone());
        work.schedule(Duration::ZERO);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(*runs.lock().unwrap(), 3);
        slot.lock().unwrap().take();
    }

    /// Threads of this process named `name` (the kernel's comm, 15 bytes at most).
    fn threads_named(name: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.trim_end() == name)
            .count()
    }

    fn wait_for_threads_named(name: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while threads_named(name) != count {
            assert!(Instant::now() < deadline, "{name}: never {count} threads");
            thread::yield_now();
        }
    }

    #[test]
    fn new_fails_with_eagain_naming_the_thread_when_no_thread_can_be_started() {
        testing::refuse_spawns(0, 1);
        let e = DelayedWork::new("dw-test-refused", || {}).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(e.raw_os_error(), None, "the message is ours: {e}");
        assert!(
            e.to_string()
                .starts_with("cannot start the thread dw-test-refused: "),
            "{e}"
        );
        assert_eq!(threads_named("dw-test-refused"), 0);
        // One refusal only: the next one starts.
        let (work, ran) = counter_work("dw-test-refused");
        assert!(work.schedule(Duration::ZERO));
        ran.recv_timeout(Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn unbound_work_dropped_ends_its_thread() {
        let unbound = DelayedWork::spawn("dw-test-unbnd").unwrap();
        wait_for_threads_named("dw-test-unbnd", 1);
        drop(unbound);
        wait_for_threads_named("dw-test-unbnd", 0);
    }

    /// A driver in miniature: its work item records which thread ran it.
    struct Recorder {
        ran_on: Mutex<Option<String>>,
        ran: Mutex<mpsc::Sender<()>>,
        timer: DelayedWork,
    }

    impl Recorder {
        fn timeout_work(&self) {
            *self.ran_on.lock().unwrap() = thread::current().name().map(str::to_owned);
            let _ = self.ran.lock().unwrap().send(());
        }
    }

    #[test]
    fn work_bound_inside_new_cyclic_runs_on_the_thread_spawned_before() {
        // The drivers' pattern: the thread first (fallible), the binding inside new_cyclic.
        let unbound = DelayedWork::spawn("dw-test-bound").unwrap();
        let (tx, rx) = mpsc::channel();
        let driver = Arc::new_cyclic(|me| Recorder {
            ran_on: Mutex::new(None),
            ran: Mutex::new(tx),
            timer: unbound.bind_driver(me.clone(), Recorder::timeout_work),
        });
        assert!(driver.timer.schedule(Duration::ZERO));
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(
            driver.ran_on.lock().unwrap().as_deref(),
            Some("dw-test-bound")
        );
    }

    #[test]
    fn shutdown_drops_pending_work() {
        let (work, ran) = counter_work("dw-test-shutdown");
        work.schedule(Duration::from_millis(200));
        work.shutdown();
        assert!(!work.schedule(Duration::ZERO));
        assert!(ran.recv_timeout(Duration::from_millis(400)).is_err());
    }
}
