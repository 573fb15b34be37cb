//! Knowing, without sleeping, that another thread is blocked inside a given syscall.
//!
//! `/proc/self/task/<tid>/stat` gives the thread's scheduler state ('S' = interruptible
//! sleep) and `/proc/self/task/<tid>/syscall` the number of the syscall it is in (or
//! "running"). Both together say "blocked in read(2)", which is what a test needs before it
//! sends a signal or wakes the sleeper from another thread.

use std::fs;
use std::time::{Duration, Instant};

/// The calling thread's kernel thread id.
pub fn current_tid() -> i32 {
    nix::unistd::gettid().as_raw()
}

/// The state letter of a thread (third field of `stat`, after the parenthesised comm).
fn thread_state(tid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.trim_start().chars().next()
}

/// The syscall number a thread is in, if it is in one.
fn thread_syscall(tid: i32) -> Option<i64> {
    let syscall = fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).ok()?;
    syscall.split_whitespace().next()?.parse().ok()
}

/// Waits until thread `tid` of this process sleeps interruptibly inside one of the syscalls
/// `nrs` (`libc::SYS_read`; `[libc::SYS_poll, libc::SYS_ppoll]` since libc may implement
/// poll(3) with either). Polls /proc in a bounded loop; panics after `limit`, so a test fails
/// instead of hanging.
pub fn wait_until_sleeping_in_syscall(tid: i32, nrs: &[i64], limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let in_syscall = thread_syscall(tid).is_some_and(|nr| nrs.contains(&nr));
        if in_syscall && thread_state(tid) == Some('S') {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "thread {tid} did not block in syscall {nrs:?} within {limit:?} (state {:?}, syscall {:?})",
            thread_state(tid),
            thread_syscall(tid)
        );
        std::thread::yield_now();
    }
}
