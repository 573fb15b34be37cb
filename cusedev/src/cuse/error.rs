//! What can go wrong when the CUSE frontend registers or removes a device, said so that the
//! person reading the log knows what to do about it.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CuseError {
    #[error(
        "cannot open /dev/cuse: {0} (the kernel needs the cuse module: `modprobe cuse`; \
         without it use --frontend fuse)"
    )]
    OpenCuse(#[source] io::Error),

    #[error("cannot start the CUSE session for {name}: {source}")]
    Session {
        name: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "the kernel did not register /dev/{name} within {seconds} s of CUSE_INIT (is the name \
         already taken by another character device?)"
    )]
    KernelRefused { name: String, seconds: u64 },

    #[error("cannot make the device node {path}: {source}")]
    Node {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("invalid device name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },

    #[error("device {name} is already registered")]
    AlreadyRegistered { name: String },

    #[error("device {name} is not registered")]
    NotRegistered { name: String },

    #[error("the CUSE frontend has been shut down")]
    ShutDown,
}
