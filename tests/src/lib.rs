//! Helpers for cusedev's end-to-end tests: real mounts, real syscalls, real daemons.

pub mod namespace;
pub mod thread_state;

pub use namespace::enter_private_mount_namespace;
pub use thread_state::{current_tid, wait_until_sleeping_in_syscall};
pub mod blocking;
pub mod dev;
pub mod harness;
