//! The CUSE frontend: each device is a real character device, registered by the kernel's
//! `cuse` module and served over its own `/dev/cuse` connection.
//!
//! CUSE is FUSE without a filesystem: the server opens `/dev/cuse`, answers CUSE_INIT with the
//! device's name (`DEVNAME=vmbus/hv_fcopy`), and the kernel registers a character device with a
//! dynamically allocated major number; devtmpfs makes its node in `/dev`. From then on the
//! kernel sends OPEN, READ, WRITE, IOCTL, POLL and RELEASE exactly as for a FUSE file, with
//! two differences that matter to device models (fs/fuse/cuse.c, Linux 6.1):
//! - READ and WRITE always carry offset 0 (`cuse_read_iter` passes a local `pos = 0`), so a
//!   device keeps its stream state itself, as the kernel drivers do;
//! - ioctls are unrestricted: the kernel does not decode `cmd`, the server asks for the
//!   caller's buffers with FUSE_IOCTL_RETRY (see [`crate::fuse::ioctl`]).
//!
//! The wire engine is the FUSE one ([`crate::fuse::Session`]); this module adds the CUSE
//! personality ([`handler`]), the node in `/dev` ([`node`]) and the lifetime rules
//! ([`frontend`]).

pub mod error;
pub mod frontend;
pub mod handler;
pub mod init;
pub mod node;

pub use error::CuseError;
pub use frontend::CuseFrontend;
