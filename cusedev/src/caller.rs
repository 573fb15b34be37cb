//! Reaching the calling process.
//!
//! A kernel driver runs *in* the caller; a userspace driver is another process, and all it
//! knows of the caller is what the kernel wrote into the request header. [`Caller`] is that.
//!
//! Read next: `device.rs` (the `Device` trait every method of which gets a `Caller`).

use crate::wait::Interrupt;

/// The process a request came from, as the kernel put it in the request header.
///
/// The pid is the one the kernel wrote into the FUSE/CUSE request, never a value taken from
/// user data: anything that touches the caller's memory or descriptors must go through it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The kernel's `current->pid`: the id of the calling *thread* (equal to the process id
    /// for a single-threaded daemon). Valid for `process_vm_readv` and `/proc/<pid>`.
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Fired when the kernel sends FUSE_INTERRUPT for this request (the caller got a signal).
    pub interrupt: Interrupt,
}

impl Caller {
    /// A caller for unit tests and internal calls that can never be interrupted from outside.
    pub fn detached(pid: u32) -> Caller {
        Caller {
            pid,
            uid: 0,
            gid: 0,
            interrupt: Interrupt::new(),
        }
    }
}
