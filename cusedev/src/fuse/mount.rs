//! Putting a FUSE connection on a path: `/dev/fuse`, mount(2), umount2(2). What must be at
//! the path first (a directory, or a file for a top-level device) is [`super::mount_point`]'s.
//!
//! The mount looks to a daemon as much like device nodes as FUSE allows:
//! `allow_other` so any process may reach it (the kernel's own 0600 root:root modes still
//! apply, because `default_permissions` makes the kernel check them, as for a real node),
//! `nosuid,nodev,noexec` because it holds nothing to execute.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use super::error::FrontendError;

/// The FUSE device.
pub const FUSE_DEVICE: &str = "/dev/fuse";
/// What `/proc/mounts` shows as the mount's source and type.
pub const MOUNT_SOURCE: &str = "cusedev";
pub const MOUNT_FSTYPE: &str = "fuse.cusedev";

/// Opens `/dev/fuse` for one connection.
pub fn open_fuse_device() -> Result<OwnedFd, FrontendError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(FUSE_DEVICE)
        .map_err(FrontendError::OpenFuse)?;
    Ok(OwnedFd::from(file))
}

/// The root of a directory mount: `S_IFDIR`. `rootmode` is the root's mode only until the
/// first GETATTR answers, which gives the directory its 0755.
pub const DIRECTORY_ROOT: u32 = libc::S_IFDIR;

/// The mount options for a connection on descriptor `fd` whose root has mode `root_mode`.
/// rootmode is octal: 40000 is S_IFDIR, 100600 a regular file 0600 (a top-level device). The
/// kernel refuses a mount whose root type differs from the mount point's (ENOTDIR), which is
/// why a top-level device needs a regular file to mount on. user_id/group_id name the mount's
/// owner (root).
pub fn mount_options(fd: BorrowedFd<'_>, root_mode: u32) -> String {
    format!(
        "fd={},rootmode={root_mode:o},user_id=0,group_id=0,allow_other,default_permissions",
        fd.as_raw_fd()
    )
}

/// Mounts the FUSE connection open on `fd` at `path`, its root node of mode `root_mode`. The
/// kernel queues FUSE_INIT at once; syscalls on the mount wait until the session answers it.
pub fn mount_fuse(fd: BorrowedFd<'_>, path: &Path, root_mode: u32) -> Result<(), FrontendError> {
    let options = mount_options(fd, root_mode);
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
