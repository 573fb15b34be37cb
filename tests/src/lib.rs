//! Helpers for cusedev's end-to-end tests: real mounts, real syscalls, real daemons.

pub mod namespace;
pub mod thread_state;

pub use namespace::enter_private_mount_namespace;
pub use thread_state::{current_tid, wait_until_sleeping_in_syscall};
pub mod blocking;
pub mod dev;
pub mod fcopy_guest;
pub mod harness;
pub mod qemu;

/// Held while a test spawns a process and while it closes a device fd.
///
/// Between fork and exec a child holds a copy of every fd of this (multi-threaded) test
/// process. A device fd closed by another test in that window is not released until the
/// child execs, so an immediate reopen could see EBUSY from a single-open driver: a race of
/// the test harness, not of the driver. Spawns and closes therefore never overlap.
pub static SPAWN_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Takes [`SPAWN_LOCK`], tolerating a test that panicked while holding it.
pub fn spawn_guard() -> std::sync::MutexGuard<'static, ()> {
    SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
