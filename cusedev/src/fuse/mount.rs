//! Putting a FUSE connection on a directory: `/dev/fuse`, mount(2), umount2(2).
//!
//! The mount looks to a daemon as much like a directory of device nodes as FUSE allows:
//! `allow_other` so any process may reach it (the kernel's own 0600 root:root modes still
//! apply, because `default_permissions` makes the kernel check them, as for a real node),
//! `nosuid,nodev,noexec` because it holds nothing to execute.

use std::fs::{DirBuilder, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use super::error::FrontendError;

/// The FUSE device.
pub const FUSE_DEVICE: &str = "/dev/fuse";
/// What `/proc/mounts` shows as the mount's source and type.
pub const MOUNT_SOURCE: &str = "cusedev";
pub const MOUNT_FSTYPE: &str = "fuse.cusedev";

/// How many stale mounts stacked on one directory we peel off before giving up.
const MAX_STALE_MOUNTS: usize = 8;

/// Opens `/dev/fuse` for one connection.
pub fn open_fuse_device() -> Result<OwnedFd, FrontendError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(FUSE_DEVICE)
        .map_err(FrontendError::OpenFuse)?;
    Ok(OwnedFd::from(file))
}

/// Makes sure `path` is a directory that can be mounted on: creates it (and its parents,
/// 0755) when missing, and lazily unmounts a stale FUSE mount left there by a server that is
/// gone (stat(2) on it fails with ENOTCONN).
pub fn prepare_mount_point(path: &Path) -> Result<(), FrontendError> {
    for _ in 0..MAX_STALE_MOUNTS {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => return Ok(()),
            Ok(_) => {
                return Err(FrontendError::NotADirectory {
                    path: path.to_owned(),
                })
            }
            Err(err) if err.raw_os_error() == Some(libc::ENOTCONN) => {
                log::warn!(
                    "{}: stale FUSE mount (its server is gone); unmounting it lazily",
                    path.display()
                );
                unmount(path).map_err(|source| FrontendError::StaleMount {
                    path: path.to_owned(),
                    source,
                })?;
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(path)
                    .map_err(|source| FrontendError::MountPoint {
                        path: path.to_owned(),
                        source,
                    })?;
                log::info!("created directory {}", path.display());
                return Ok(());
            }
            Err(source) => {
                return Err(FrontendError::MountPoint {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
    Err(FrontendError::StaleMount {
        path: path.to_owned(),
        source: Errno::ENOTCONN,
    })
}

/// The mount options for a connection on descriptor `fd`.
pub fn mount_options(fd: BorrowedFd<'_>) -> String {
    // rootmode is octal: 40000 = S_IFDIR. user_id/group_id name the mount's owner (root).
    format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions",
        fd.as_raw_fd()
    )
}

/// Mounts the FUSE connection open on `fd` at `path`. The kernel queues FUSE_INIT at once;
/// syscalls on the mount wait until the session answers it.
pub fn mount_fuse(fd: BorrowedFd<'_>, path: &Path) -> Result<(), FrontendError> {
    let options = mount_options(fd);
    nix::mount::mount(
        Some(MOUNT_SOURCE),
        path,
        Some(MOUNT_FSTYPE),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(options.as_str()),
    )
    .map_err(|source| FrontendError::Mount {
        path: path.to_owned(),
        source,
    })
}

/// Detaches the mount at `path` now; the kernel finishes it when the last user lets go.
pub fn unmount(path: &Path) -> Result<(), Errno> {
    nix::mount::umount2(path, MntFlags::MNT_DETACH)
}
