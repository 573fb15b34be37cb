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

/// The state letter of a task (third field of `stat`, after the parenthesised comm); `task`
/// is a /proc directory: `/proc/self/task/TID` or `/proc/PID`.
fn task_state(task: &str) -> Option<char> {
    let stat = fs::read_to_string(format!("{task}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.trim_start().chars().next()
}

/// The syscall number a task is in, if it is in one.
fn task_syscall(task: &str) -> Option<i64> {
    let syscall = fs::read_to_string(format!("{task}/syscall")).ok()?;
    syscall.split_whitespace().next()?.parse().ok()
}

fn thread_state(tid: i32) -> Option<char> {
    task_state(&format!("/proc/self/task/{tid}"))
}

fn thread_syscall(tid: i32) -> Option<i64> {
    task_syscall(&format!("/proc/self/task/{tid}"))
}

/// Whether process `pid` (its main thread) sleeps inside one of the syscalls `nrs`, in
/// either kind of sleep: 'S', or 'D' (a FUSE request the server has already read waits
/// uninterruptibly once a fatal signal came).
pub fn process_sleeps_in_syscall(pid: i32, nrs: &[i64]) -> bool {
    let task = format!("/proc/{pid}");
    task_syscall(&task).is_some_and(|nr| nrs.contains(&nr))
        && matches!(task_state(&task), Some('S' | 'D'))
}

/// Waits until process `pid` sleeps inside one of `nrs` (see [`process_sleeps_in_syscall`]);
/// panics after `limit`.
pub fn wait_until_process_sleeps_in_syscall(pid: i32, nrs: &[i64], limit: Duration) {
    let deadline = Instant::now() + limit;
    let task = format!("/proc/{pid}");
    while !process_sleeps_in_syscall(pid, nrs) {
        assert!(
            Instant::now() < deadline,
            "process {pid} did not sleep in syscall {nrs:?} within {limit:?} (state {:?}, \
             syscall {:?})",
            task_state(&task),
            task_syscall(&task)
        );
        std::thread::yield_now();
    }
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

/// Waits until process `pid` is in scheduler state `state` ('D': uninterruptible sleep);
/// panics after `limit`.
pub fn wait_until_process_in_state(pid: i32, state: char, limit: Duration) {
    let deadline = Instant::now() + limit;
    let task = format!("/proc/{pid}");
    while task_state(&task) != Some(state) {
        assert!(
            Instant::now() < deadline,
            "process {pid} did not reach state {state:?} within {limit:?} (state {:?})",
            task_state(&task)
        );
        std::thread::yield_now();
    }
}
