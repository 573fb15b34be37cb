//! What must be at a path before a FUSE mount goes on it, and what is left after it goes.
//!
//! A directory of devices (`/dev/vmbus`) mounts on a directory, made if missing and never
//! removed (other things may live in it once we are gone). A top-level device (`/dev/lguest`)
//! mounts on a regular file we make for it, with the device's mode, and delete again when the
//! device goes: devtmpfs shows no node for a device that is not registered, and neither do we.
//!
//! Both find, now and then, what a cusedev that was killed left behind: a mount whose server is
//! gone (every stat(2) on it fails with ENOTCONN), which is unmounted lazily, and for a top-level
//! device the empty file it was mounted on, which is removed. Anything else at a device's path is
//! not ours, and is left alone: a real character device there means the kernel's own driver (or
//! CUSE) has the node, and deleting it would break the very thing we stand in for.

use std::fs::{self, DirBuilder, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::errno::Errno;

use super::error::FrontendError;
use super::mount::unmount;

/// How many stale mounts stacked on one path we peel off before giving up.
const MAX_STALE_MOUNTS: usize = 8;

/// What stat says is at `path` once every dead FUSE mount stacked there is unmounted (lazily,
/// so a process still holding a file of the dead mount does not keep us from mounting).
/// `stat` is `fs::metadata` (follows symlinks) or `fs::symlink_metadata` (does not).
fn peel_stale_mounts(
    path: &Path,
    stat: fn(&Path) -> io::Result<Metadata>,
) -> Result<Option<Metadata>, FrontendError> {
    for _ in 0..MAX_STALE_MOUNTS {
        match stat(path) {
            Ok(meta) => return Ok(Some(meta)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
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

fn mount_point_error(path: &Path) -> impl FnOnce(io::Error) -> FrontendError + '_ {
    move |source| FrontendError::MountPoint {
        path: path.to_owned(),
        source,
    }
}

/// Makes sure `path` is a directory that can be mounted on: creates it (and its parents,
/// 0755) when missing, after taking away a stale FUSE mount left there.
pub fn prepare_dir(path: &Path) -> Result<(), FrontendError> {
    match peel_stale_mounts(path, |p| fs::metadata(p))? {
        Some(meta) if meta.is_dir() => Ok(()),
        Some(_) => Err(FrontendError::NotADirectory {
            path: path.to_owned(),
        }),
        None => {
            DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(path)
                .map_err(mount_point_error(path))?;
            log::info!("created directory {}", path.display());
            Ok(())
        }
    }
}

/// Whether `meta` (of a path not mounted on) is a file this module made: a regular file, empty,
/// with no other name. A cusedev never writes to the file it mounts on, so an empty file is
/// all one can leave behind, and an empty file in /dev holds nothing anybody could lose.
fn is_our_leftover(meta: &Metadata) -> bool {
    meta.file_type().is_file() && meta.len() == 0 && meta.nlink() == 1
}

/// What a thing that is not ours is, for the error that refuses it.
fn describe(meta: &Metadata) -> &'static str {
    let kind = meta.file_type();
    if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_symlink() {
        "a symbolic link"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if meta.len() != 0 {
        "a regular file with contents"
    } else {
        "a regular file with other hard links"
    }
}

/// Whether something is mounted at `path` right now (and answers): the file a mount shows has
/// another device number than the directory it sits in.
fn is_mounted_on(path: &Path, meta: &Metadata) -> Result<bool, FrontendError> {
    let Some(parent) = path.parent() else {
        return Ok(true);
    };
    let parent_meta = fs::metadata(parent).map_err(mount_point_error(path))?;
    Ok(parent_meta.dev() != meta.dev())
}

/// Makes a fresh regular file at `path` with permissions `mode` to mount a top-level device
/// on: removes what a killed cusedev left there first (a dead mount, the empty file under it)
/// and refuses anything else: a live mount (another server has the node), a character device
/// (the real driver has it), any file that is not empty.
pub fn prepare_file(path: &Path, mode: u32) -> Result<(), FrontendError> {
    if let Some(meta) = peel_stale_mounts(path, |p| fs::symlink_metadata(p))? {
        if is_mounted_on(path, &meta)? {
            return Err(FrontendError::AlreadyMounted {
                path: path.to_owned(),
            });
        }
        if !is_our_leftover(&meta) {
            return Err(FrontendError::NotOurs {
                path: path.to_owned(),
                what: describe(&meta),
            });
        }
        log::warn!(
            "{}: empty file left by an earlier cusedev; removing it",
            path.display()
        );
        fs::remove_file(path).map_err(mount_point_error(path))?;
    }
    // The directory is the device root (/dev), there already. create_new: anything that
    // appeared at the path since we looked is not ours either.
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(mount_point_error(path))?;
    // The umask may have taken bits away; the node's mode is the device's, exactly.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(mount_point_error(path))?;
    log::info!("created mount point {} (mode {mode:04o})", path.display());
    Ok(())
}

/// Deletes the file [`prepare_file`] made at `path`, once nothing is mounted on it. Leaves
/// alone (with a warning) whatever else may have taken its place.
pub fn remove_file(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(meta) if is_our_leftover(&meta) => match fs::remove_file(path) {
            Ok(()) => log::info!("removed mount point {}", path.display()),
            Err(err) => log::warn!("cannot remove mount point {}: {err}", path.display()),
        },
        Ok(meta) => log::warn!(
            "{}: is {} now, not the mount point we made; left alone",
            path.display(),
            describe(&meta)
        ),
        Err(err) => log::warn!("cannot remove mount point {}: {err}", path.display()),
    }
}
