//! The preload frontend: devices for processes started with the preload library, where
//! neither CUSE nor FUSE can run (no /dev/fuse, no CAP_SYS_ADMIN, no root). docs/preload.md
//! has the whole design and the wire protocol.
//!
//! - [`wire`]: whole messages with the kernel-attached credentials;
//! - [`kernel`]: the kernel's half of CUSE (fs/fuse/dev.c's part), one epoll thread;
//! - [`frontend`]: one CUSE session of the engine per device, and the listening socket;
//! - [`library`]: the preload library (cusedev/preload/, built by build.rs), embedded here and
//!   installed into the run directory; [`run_dir`]: that directory.

pub mod command;
pub mod frontend;
pub mod kernel;
pub mod library;
pub mod run_dir;
pub mod wire;

#[cfg(test)]
mod kernel_tests;

pub use frontend::PreloadFrontend;
