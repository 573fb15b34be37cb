//! The FUSE wire engine and the FUSE mount frontend.
//!
//! - [`abi`]: the wire structs of `/dev/fuse` and `/dev/cuse` (protocol 7.38).
//! - [`channel`]: the open device descriptor: whole requests in, whole replies out.
//! - [`init`]: the INIT handshake and the connection's limits.
//! - [`session`]: the engine: reader threads, parked replies, file handles, interrupts, poll
//!   notifications; it routes file operations to [`crate::device::Device`] and everything
//!   else to a [`session::RequestHandler`].
//! - [`attr`]: what a mount says about a device node (GETATTR, SETATTR, STATFS).
//! - [`dir`]: the FUSE personality of a directory of devices (`/dev/vmbus`);
//!   [`file`]: that of a top-level device, the mount's root being the device (`/dev/lguest`).
//! - [`name`]: which device names are accepted, and where their nodes go.
//! - [`mount_point`], [`mount`], [`frontend`]: what must be at the path, mounting there under
//!   `/dev`, and which mount serves which device; [`unmount_guard`]: the process that takes
//!   the mounts away if cusedev is killed.
//!
//! A CUSE frontend reuses `abi`, `channel`, `init` and `session` with a handler of its own
//! (CUSE_INIT, one device, no nodes).

pub mod abi;
pub mod attr;
pub mod channel;
pub mod dir;
#[cfg(test)]
mod engine_tests;
pub mod error;
pub mod file;
pub mod frontend;
pub mod init;
pub mod ioctl;
pub mod mount;
pub mod mount_point;
pub mod name;
pub mod session;
#[cfg(test)]
mod testing;
pub mod unmount_guard;

pub use dir::DeviceDir;
pub use error::FrontendError;
pub use file::DeviceFile;
pub use frontend::FuseFrontend;
pub use session::{Reply, Request, RequestHandler, Session};
