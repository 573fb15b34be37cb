//! What a FUSE mount says about a device node, whatever the mount's root is: its attributes,
//! GETATTR and SETATTR answers, STATFS. A directory of devices ([`super::dir`]) and a mount
//! whose root is the device itself ([`super::file`]) answer these the same way, so that a
//! device looks alike in `/dev/vmbus/hv_fcopy` and in `/dev/lguest`.
//!
//! Nothing is cached by the kernel (attribute timeouts are 0): every stat(2) asks again, as
//! it would find devtmpfs' inode.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;

use super::abi::{fattr, parse, Attr, AttrOut, SetattrIn, StatfsOut};
use super::session::{Reply, Request};
use crate::device::Device;

/// `st_blksize` the kernel reports for a character device (PAGE_SIZE).
pub const BLKSIZE: u32 = 4096;
/// Longest file name (NAME_MAX).
pub const NAME_MAX: usize = 255;

/// Seconds and nanoseconds since the epoch, as `fuse_attr` carries times.
fn now() -> (u64, u32) {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (since_epoch.as_secs(), since_epoch.subsec_nanos())
}

/// Attributes of node `ino`, owned by root, with every time set to now.
pub fn timed_attr(ino: u64, mode: u32, nlink: u32) -> Attr {
    let (secs, nsecs) = now();
    Attr {
        ino,
        mode,
        nlink,
        uid: 0,
        gid: 0,
        blksize: BLKSIZE,
        atime: secs,
        mtime: secs,
        ctime: secs,
        atimensec: nsecs,
        mtimensec: nsecs,
        ctimensec: nsecs,
        ..Attr::default()
    }
}

/// The node of `device`: a regular file (FUSE cannot make a character device) with the mode
/// `misc_register()` gives the real node (0600 root:root for a misc device), size 0.
pub fn device_attr(ino: u64, device: &dyn Device) -> Attr {
    timed_attr(ino, libc::S_IFREG | (device.mode() & 0o7777), 1)
}

/// The GETATTR/SETATTR answer for a node's attributes (which the kernel may not cache), or
/// the errno of a node that is not there.
pub fn attr_reply(attr: Result<Attr, Errno>) -> Reply {
    match attr {
        Ok(attr) => Reply::of(&AttrOut {
            attr_valid: 0,
            attr_valid_nsec: 0,
            dummy: 0,
            attr,
        }),
        Err(errno) => Reply::Error(errno),
    }
}

/// SETATTR: what reaches a device node's inode. Truncation (open with O_TRUNC) and time
/// updates are accepted and change nothing, as for a character device; a change of owner or
/// mode is refused, since it would not survive the next lookup. `attr_of` finds the node.
pub fn setattr_reply(
    label: &Path,
    req: &Request<'_>,
    attr_of: impl FnOnce(u64) -> Result<Attr, Errno>,
) -> Reply {
    let (setattr, _) = match parse::<SetattrIn>(req.body) {
        Ok(parsed) => parsed,
        Err(err) => return malformed(label, req, err),
    };
    if setattr.valid & (fattr::MODE | fattr::UID | fattr::GID) != 0 {
        return Reply::Error(Errno::EPERM);
    }
    attr_reply(attr_of(req.header.nodeid))
}

/// STATFS of a mount holding `files` nodes (the root among them): no blocks, no free space.
pub fn statfs_reply(files: u64) -> Reply {
    Reply::of(&StatfsOut {
        bsize: BLKSIZE,
        frsize: BLKSIZE,
        namelen: NAME_MAX as u32,
        files,
        ..StatfsOut::default()
    })
}

/// Logs a node request whose body does not hold what its opcode needs; answers EINVAL.
pub fn malformed(label: &Path, req: &Request<'_>, err: impl std::fmt::Display) -> Reply {
    log::warn!(
        "{}: {} unique={}: {err}; answering EINVAL",
        label.display(),
        req.opcode,
        req.header.unique
    );
    Reply::Error(Errno::EINVAL)
}
