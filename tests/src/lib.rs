//! Helpers for cusedev's end-to-end tests: real mounts, real syscalls, real daemons.

pub mod namespace;
pub mod thread_state;

pub use namespace::enter_private_mount_namespace;
pub use thread_state::{current_tid, wait_until_sleeping_in_syscall};
pub mod blocking;
pub mod census;
pub mod dev;
pub mod fcopy_guest;
pub mod harness;
pub mod kvp;
pub mod lguest_launcher;
pub mod preload;
pub mod qemu;
pub mod scripted_host;
pub mod syscalls;
pub mod xs_client;

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

/// Spawns `command` under [`SPAWN_LOCK`] such that the child holds none of this process's
/// descriptors above stderr by the time `spawn` returns.
///
/// O_CLOEXEC alone is not enough: std may spawn with vfork semantics, which lets the parent go
/// on as soon as the child starts exec, before exec has closed the child's copies. A device fd
/// a test closes right after such a spawn would then have its last reference in the child, and
/// the FUSE RELEASE would come later than the test's next open (EBUSY from a single-open
/// driver: a race of the harness, not of the driver). Closing everything in the child before
/// exec, and returning to user mode once (which runs the deferred final fput), means the
/// release of any such file is queued before the parent learns that the child started.
pub fn spawn_isolated(command: &mut std::process::Command) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe close_range(2) system call.
    unsafe {
        command.pre_exec(|| {
            if libc::close_range(3, libc::c_uint::MAX, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let _guard = spawn_guard();
    command.spawn()
}
