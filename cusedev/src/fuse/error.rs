//! What can go wrong when the FUSE frontend sets up or changes a mount, said so that the person
//! reading the log knows what to do about it.

use std::io;
use std::path::PathBuf;

use nix::errno::Errno;

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("cannot open /dev/fuse: {0} (is the fuse module loaded, and are we running as root?)")]
    OpenFuse(#[source] io::Error),

    #[error("cannot create the mount point {path}: {source}")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot use {path} as a mount point: it exists and is not a directory")]
    NotADirectory { path: PathBuf },

    #[error(
        "refusing to use {path} as a device's mount point: it is {what}, which cusedev did not \
         make (a character device there means the kernel's driver or CUSE serves the node \
         already); it is left alone, remove it by hand if it is a leftover"
    )]
    NotOurs { path: PathBuf, what: &'static str },

    #[error("cannot mount on {path}: something is mounted there and answers (another cusedev serving this device?)")]
    AlreadyMounted { path: PathBuf },

    #[error("cannot remove the stale FUSE mount at {path}: {source} (try `umount -l {}`)", path.display())]
    StaleMount {
        path: PathBuf,
        #[source]
        source: Errno,
    },

    #[error("cannot mount FUSE on {path}: {source} (mounting needs root / CAP_SYS_ADMIN in the mount namespace)")]
    Mount {
        path: PathBuf,
        #[source]
        source: Errno,
    },

    #[error("cannot start the FUSE session for {path}: {source}")]
    Session {
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

    #[error("the FUSE frontend has been shut down")]
    ShutDown,
}
