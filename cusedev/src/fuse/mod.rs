//! The FUSE wire engine and the FUSE mount frontend.
//!
//! - [`abi`]: the wire structs of `/dev/fuse` and `/dev/cuse` (protocol 7.38).
//! - [`channel`]: the open device descriptor: whole requests in, whole replies out.
//! - [`init`]: the INIT handshake and the connection's limits.
//! - [`session`]: the engine: reader threads, parked replies, file handles, interrupts, poll
//!   notifications; it routes file operations to [`crate::device::Device`] and everything
//!   else to a [`session::RequestHandler`].
//! - [`dir`]: the FUSE personality, a directory of devices.
//! - [`mount`], [`frontend`]: mounting such directories under `/dev`.
//!
//! A CUSE frontend reuses `abi`, `channel`, `init` and `session` with a handler of its own
//! (CUSE_INIT, one device, no nodes).

pub mod abi;
pub mod channel;
pub mod dir;
#[cfg(test)]
mod engine_tests;
pub mod error;
pub mod frontend;
pub mod init;
pub mod ioctl;
pub mod mount;
pub mod session;

pub use dir::DeviceDir;
pub use error::FrontendError;
pub use frontend::FuseFrontend;
pub use session::{Reply, Request, RequestHandler, Session};
