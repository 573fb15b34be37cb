//! A syscall running on its own thread, so a test can see it block, signal it, and collect
//! what it returned.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Installs a do-nothing SIGUSR1 handler *without* SA_RESTART, so a signal ends a blocked
/// syscall with EINTR instead of restarting it (what a daemon with a plain handler sees).
pub fn install_sigusr1_without_restart() {
    extern "C" fn ignore(_: libc::c_int) {}
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(ignore),
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: the handler does nothing, so it is async-signal-safe.
    unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGUSR1, &action) }
        .expect("install SIGUSR1 handler");
}

/// A thread running one call.
pub struct Blocking<T> {
    tid: i32,
    pthread: libc::pthread_t,
    handle: JoinHandle<T>,
}

impl<T: Send + 'static> Blocking<T> {
    pub fn spawn(call: impl FnOnce() -> T + Send + 'static) -> Blocking<T> {
        let (ids_tx, ids_rx) = mpsc::channel();
        let handle = std::thread::spawn(move || {
            // SAFETY: gettid and pthread_self have no preconditions.
            let ids = unsafe { (libc::gettid(), libc::pthread_self()) };
            ids_tx.send(ids).expect("send thread ids");
            call()
        });
        let (tid, pthread) = ids_rx.recv().expect("thread ids");
        Blocking {
            tid,
            pthread,
            handle,
        }
    }

    /// Waits until the thread sleeps inside one of `syscalls` (x86_64 numbers).
    pub fn wait_blocked_in(&self, syscalls: &[i64]) {
        crate::thread_state::wait_until_sleeping_in_syscall(
            self.tid,
            syscalls,
            Duration::from_secs(30),
        );
    }

    /// Waits until the thread is blocked in read(2) or pread64(2).
    pub fn wait_blocked_in_read(&self) {
        self.wait_blocked_in(&[libc::SYS_read, libc::SYS_pread64]);
    }

    /// Sends SIGUSR1 to the thread.
    pub fn signal(&self) {
        // SAFETY: the pthread_t is of a thread we spawned that has not been joined yet.
        let rc = unsafe { libc::pthread_kill(self.pthread, libc::SIGUSR1) };
        assert_eq!(rc, 0, "pthread_kill");
    }

    pub fn join(self) -> T {
        self.handle.join().expect("blocking thread panicked")
    }
}
