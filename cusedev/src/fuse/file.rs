//! The FUSE personality of a top-level device such as `/dev/lguest`: a mount whose root node is
//! the device itself.
//!
//! A misc device with no directory in its name lives right in /dev. Mounting a directory over
//! /dev would hide every other node, but FUSE can mount a *regular file* over a regular file
//! (`rootmode=100600`, see [`super::mount`]): the mount's root (node 1) is then the device, a
//! file with the device's mode, and there are no names at all, so no LOOKUP, FORGET or READDIR.
//! Open, read, write, ioctl, poll and release are the engine's ([`super::session`]), exactly as
//! for a file in a directory mount ([`super::dir`]); only what the root node is differs.
//!
//! Removal (`misc_deregister`) is the frontend's: it unmounts lazily and deletes the file. A
//! file already open keeps working until it is closed, as in a directory; an open that had
//! walked the path before the device went away gets ENODEV, what misc_open() says for a minor
//! that is no longer registered (drivers/char/misc.c).
//!
//! # Offsets: what the kernel does between pread/pwrite and our READ/WRITE
//!
//! lguest's launcher pwrite()s to /dev/lguest with the CPU number as the offset, so the offset
//! must reach [`Device::write`] as the caller gave it. On a FUSE regular file it does for
//! synchronous calls, but the kernel treats it as a file position, not as a char device's
//! `*ppos`. Read in fs/fuse/file.c and fs/read_write.c of Linux 6.1 and 6.18, for a file opened
//! with FOPEN_DIRECT_IO (which [`super::session::RequestHandler::open_flags`] always sets), and
//! pinned by tests/tests/fuse_toplevel.rs on 6.18:
//!
//! - `rw_verify_area()` (fs/read_write.c), before any file system code: a negative offset, or
//!   one where `offset + count` overflows `loff_t`, is EINVAL, as on a char device without
//!   FMODE_UNSIGNED_OFFSET. pread/pwrite need FMODE_PREAD/PWRITE, which a regular file has
//!   (only FOPEN_STREAM or FOPEN_NONSEEKABLE, never set here, would make them ESPIPE).
//! - Synchronous read: `fuse_direct_read_iter()` → `__fuse_direct_read()` →
//!   `fuse_direct_io()` has no i_size check; READ carries the offset unchanged, 12345 or 1<<40
//!   on a file whose size is 0.
//! - Write: `fuse_direct_write_iter()` calls `generic_write_checks()` first. That leaves the
//!   offset alone unless the file is O_APPEND, which puts every write at the kernel's i_size;
//!   it refuses a write at or past RLIMIT_FSIZE (SIGXFSZ, EFBIG) or past `s_maxbytes`
//!   (MAX_LFS_FILESIZE for FUSE, fs/fuse/inode.c; 2 GiB for a caller without O_LARGEFILE,
//!   which 64-bit open() always adds). None of that happens on a char device. WRITE then
//!   carries the offset unchanged, and `fuse_write_update_attr()` raises the kernel's i_size to
//!   `offset + written` until the next GETATTR says 0 again (so the next O_APPEND write lands
//!   there). The write holds the inode lock exclusively (we never set
//!   FOPEN_PARALLEL_DIRECT_WRITES), so a write sleeping in a device holds up other writes to
//!   the same node.
//! - read(2)/write(2) without an offset use the file position, which `fuse_direct_io()`
//!   advances by what was transferred, where most misc drivers leave `*ppos` alone. The
//!   daemons we serve use pread/pwrite, or do not look at the offset.
//! - Asynchronous reads (io_submit, io_uring) go to `fuse_direct_IO()`, which returns 0 (end
//!   of file) for a read at or past i_size without sending READ. In 6.1 only O_DIRECT files
//!   take that path (`!is_sync_kiocb(iocb) && iocb->ki_flags & IOCB_DIRECT`); a later change
//!   dropped the IOCB_DIRECT test, and on 6.18 an io_submit() read of a device at any offset
//!   returns 0 and never reaches it (tried on this project's test machine). Reporting a size
//!   other than 0 would turn O_APPEND writes into EFBIG instead, so the size stays 0 and
//!   this stays a known difference from a char device, in directory mounts as well.
//!
//! Read next: [`super::mount_point`] (the file we mount on), then [`super::frontend`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::errno::Errno;

use super::abi::{Attr, Opcode, ROOT_ID};
use super::attr::{attr_reply, device_attr, setattr_reply, statfs_reply};
use super::init::fuse_mount_init;
use super::session::{Reply, Request, RequestHandler};
use crate::device::Device;

/// One device as the root of its own mount.
pub struct DeviceFile {
    path: PathBuf,
    device: Arc<dyn Device>,
    attr: Attr,
    registered: AtomicBool,
}

impl DeviceFile {
    /// `device` as the root of a mount at `path` (for log lines).
    pub fn new(path: &Path, device: Arc<dyn Device>) -> DeviceFile {
        DeviceFile {
            path: path.to_owned(),
            attr: device_attr(ROOT_ID, device.as_ref()),
            device,
            registered: AtomicBool::new(true),
        }
    }

    /// Where the file is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The root's mode, for the mount's `rootmode` (S_IFREG | the device's permissions).
    pub fn root_mode(&self) -> u32 {
        self.attr.mode
    }

    /// `misc_deregister`: opens from now on fail with ENODEV; files already open go on.
    pub fn deregister(&self) {
        self.registered.store(false, Ordering::SeqCst);
    }

    fn attr_of(&self, nodeid: u64) -> Result<Attr, Errno> {
        if nodeid == ROOT_ID {
            Ok(self.attr)
        } else {
            Err(Errno::ENOENT)
        }
    }
}

impl RequestHandler for DeviceFile {
    fn init(&self, req: &Request<'_>, minor: u32) -> Reply {
        fuse_mount_init(&self.path, req, minor)
    }

    fn device_for_open(&self, nodeid: u64) -> Result<Arc<dyn Device>, Errno> {
        self.attr_of(nodeid)?;
        if self.registered.load(Ordering::SeqCst) {
            Ok(self.device.clone())
        } else {
            Err(Errno::ENODEV)
        }
    }

    fn node_request(&self, req: &Request<'_>) -> Reply {
        match req.opcode {
            Opcode::GETATTR => attr_reply(self.attr_of(req.header.nodeid)),
            Opcode::SETATTR => setattr_reply(&self.path, req, |nodeid| self.attr_of(nodeid)),
            Opcode::STATFS => statfs_reply(1),
            // The root is never looked up, so never forgotten; nothing to count.
            Opcode::FORGET | Opcode::BATCH_FORGET => Reply::None,
            // The kernel checks the root's type before it sends any of these; should one come
            // anyway, the answer is the one for a path through a file.
            Opcode::LOOKUP
            | Opcode::OPENDIR
            | Opcode::READDIR
            | Opcode::MKNOD
            | Opcode::MKDIR
            | Opcode::CREATE
            | Opcode::UNLINK
            | Opcode::RMDIR => Reply::Error(Errno::ENOTDIR),
            _ => Reply::Error(Errno::ENOSYS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuse::abi::{fattr, parse, AttrOut, SetattrIn};
    use crate::fuse::testing::{node_request, Null};
    use zerocopy::IntoBytes;

    fn file() -> DeviceFile {
        DeviceFile::new(Path::new("/dev/lguest"), Null::device())
    }

    #[test]
    fn root_is_a_regular_file_with_the_device_mode_and_no_caching() {
        let file = file();
        assert_eq!(file.root_mode(), libc::S_IFREG | 0o600);
        let Reply::Data(data) = node_request(&file, Opcode::GETATTR, ROOT_ID, &[0; 16]) else {
            panic!("GETATTR failed");
        };
        let (out, _) = parse::<AttrOut>(&data).unwrap();
        assert_eq!(out.attr.mode, libc::S_IFREG | 0o600);
        assert_eq!((out.attr.ino, out.attr.uid, out.attr.gid), (ROOT_ID, 0, 0));
        assert_eq!((out.attr.size, out.attr.nlink, out.attr_valid), (0, 1, 0));
    }

    #[test]
    fn deregistered_device_is_enodev_for_opens() {
        let file = file();
        assert!(file.device_for_open(ROOT_ID).is_ok());
        assert_eq!(file.device_for_open(2).err(), Some(Errno::ENOENT));
        file.deregister();
        assert_eq!(file.device_for_open(ROOT_ID).err(), Some(Errno::ENODEV));
    }

    #[test]
    fn names_are_enotdir_chmod_is_eperm_and_truncation_changes_nothing() {
        let file = file();
        let lookup = node_request(&file, Opcode::LOOKUP, ROOT_ID, b"x\0");
        assert!(matches!(lookup, Reply::Error(Errno::ENOTDIR)));
        let setattr = |valid| {
            let body = SetattrIn {
                valid,
                ..SetattrIn::default()
            };
            node_request(&file, Opcode::SETATTR, ROOT_ID, body.as_bytes())
        };
        assert!(matches!(setattr(fattr::MODE), Reply::Error(Errno::EPERM)));
        assert!(matches!(setattr(fattr::SIZE), Reply::Data(_)));
        let forget = node_request(&file, Opcode::FORGET, ROOT_ID, &1u64.to_ne_bytes());
        assert!(matches!(forget, Reply::None));
    }
}
