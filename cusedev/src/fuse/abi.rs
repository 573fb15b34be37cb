//! The FUSE/CUSE wire protocol, as the kernel's `include/uapi/linux/fuse.h` (protocol 7.38,
//! Linux 6.1) lays it out.
//!
//! Every message is a plain `#[repr(C)]` struct with zerocopy derives and a compile-time size
//! check against the kernel's numbers; the kernel pads them all to 8 bytes so that a 32-bit
//! server works under a 64-bit kernel, which also means none of them has hidden padding.
//! Integers are native endian: the kernel and the server always share a machine.
//!
//! Opcodes are an "open enum" ([`Opcode`]): a request with an opcode this file has never heard
//! of is still representable (and answered ENOSYS), not a parse failure. Parsing a request body
//! goes through [`parse`], which returns a [`ParseError`] on short input and never indexes
//! past the end of what the kernel sent.

use std::fmt;
use std::mem::size_of;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The protocol major version we speak; an INIT with any other major is refused.
pub const KERNEL_VERSION: u32 = 7;
/// The newest minor version whose structs this file knows (Linux 6.1).
pub const KERNEL_MINOR_VERSION: u32 = 38;
/// Oldest minor we accept: 7.12 (Linux 2.6.29) fixed the sizes of read_in/write_in/attr_out
/// that the code below assumes; nothing older is still alive.
pub const MIN_KERNEL_MINOR_VERSION: u32 = 12;
/// The node id of the root directory of a FUSE mount.
pub const ROOT_ID: u64 = 1;
/// The kernel refuses a read buffer smaller than this (besides header + write_in + max_write).
pub const MIN_READ_BUFFER: usize = 8192;

/// A FUSE/CUSE request opcode (`enum fuse_opcode`), open: unknown values are kept as they are.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Opcode(pub u32);

impl Opcode {
    pub const LOOKUP: Opcode = Opcode(1);
    pub const FORGET: Opcode = Opcode(2);
    pub const GETATTR: Opcode = Opcode(3);
    pub const SETATTR: Opcode = Opcode(4);
    pub const READLINK: Opcode = Opcode(5);
    pub const SYMLINK: Opcode = Opcode(6);
    pub const MKNOD: Opcode = Opcode(8);
    pub const MKDIR: Opcode = Opcode(9);
    pub const UNLINK: Opcode = Opcode(10);
    pub const RMDIR: Opcode = Opcode(11);
    pub const RENAME: Opcode = Opcode(12);
    pub const LINK: Opcode = Opcode(13);
    pub const OPEN: Opcode = Opcode(14);
    pub const READ: Opcode = Opcode(15);
    pub const WRITE: Opcode = Opcode(16);
    pub const STATFS: Opcode = Opcode(17);
    pub const RELEASE: Opcode = Opcode(18);
    pub const FSYNC: Opcode = Opcode(20);
    pub const SETXATTR: Opcode = Opcode(21);
    pub const GETXATTR: Opcode = Opcode(22);
    pub const LISTXATTR: Opcode = Opcode(23);
    pub const REMOVEXATTR: Opcode = Opcode(24);
    pub const FLUSH: Opcode = Opcode(25);
    pub const INIT: Opcode = Opcode(26);
    pub const OPENDIR: Opcode = Opcode(27);
    pub const READDIR: Opcode = Opcode(28);
    pub const RELEASEDIR: Opcode = Opcode(29);
    pub const FSYNCDIR: Opcode = Opcode(30);
    pub const GETLK: Opcode = Opcode(31);
    pub const SETLK: Opcode = Opcode(32);
    pub const SETLKW: Opcode = Opcode(33);
    pub const ACCESS: Opcode = Opcode(34);
    pub const CREATE: Opcode = Opcode(35);
    pub const INTERRUPT: Opcode = Opcode(36);
    pub const BMAP: Opcode = Opcode(37);
    pub const DESTROY: Opcode = Opcode(38);
    pub const IOCTL: Opcode = Opcode(39);
    pub const POLL: Opcode = Opcode(40);
    pub const NOTIFY_REPLY: Opcode = Opcode(41);
    pub const BATCH_FORGET: Opcode = Opcode(42);
    pub const FALLOCATE: Opcode = Opcode(43);
    pub const READDIRPLUS: Opcode = Opcode(44);
    pub const RENAME2: Opcode = Opcode(45);
    pub const LSEEK: Opcode = Opcode(46);
    pub const COPY_FILE_RANGE: Opcode = Opcode(47);
    pub const SETUPMAPPING: Opcode = Opcode(48);
    pub const REMOVEMAPPING: Opcode = Opcode(49);
    pub const SYNCFS: Opcode = Opcode(50);
    pub const TMPFILE: Opcode = Opcode(51);
    /// The first request on `/dev/cuse`, in place of FUSE_INIT.
    pub const CUSE_INIT: Opcode = Opcode(4096);

    /// The kernel's name for the opcode, for log lines.
    pub fn name(self) -> &'static str {
        match self {
            Opcode::LOOKUP => "LOOKUP",
            Opcode::FORGET => "FORGET",
            Opcode::GETATTR => "GETATTR",
            Opcode::SETATTR => "SETATTR",
            Opcode::READLINK => "READLINK",
            Opcode::SYMLINK => "SYMLINK",
            Opcode::MKNOD => "MKNOD",
            Opcode::MKDIR => "MKDIR",
            Opcode::UNLINK => "UNLINK",
            Opcode::RMDIR => "RMDIR",
            Opcode::RENAME => "RENAME",
            Opcode::LINK => "LINK",
            Opcode::OPEN => "OPEN",
            Opcode::READ => "READ",
            Opcode::WRITE => "WRITE",
            Opcode::STATFS => "STATFS",
            Opcode::RELEASE => "RELEASE",
            Opcode::FSYNC => "FSYNC",
            Opcode::SETXATTR => "SETXATTR",
            Opcode::GETXATTR => "GETXATTR",
            Opcode::LISTXATTR => "LISTXATTR",
            Opcode::REMOVEXATTR => "REMOVEXATTR",
            Opcode::FLUSH => "FLUSH",
            Opcode::INIT => "INIT",
            Opcode::OPENDIR => "OPENDIR",
            Opcode::READDIR => "READDIR",
            Opcode::RELEASEDIR => "RELEASEDIR",
            Opcode::FSYNCDIR => "FSYNCDIR",
            Opcode::GETLK => "GETLK",
            Opcode::SETLK => "SETLK",
            Opcode::SETLKW => "SETLKW",
            Opcode::ACCESS => "ACCESS",
            Opcode::CREATE => "CREATE",
            Opcode::INTERRUPT => "INTERRUPT",
            Opcode::BMAP => "BMAP",
            Opcode::DESTROY => "DESTROY",
            Opcode::IOCTL => "IOCTL",
            Opcode::POLL => "POLL",
            Opcode::NOTIFY_REPLY => "NOTIFY_REPLY",
            Opcode::BATCH_FORGET => "BATCH_FORGET",
            Opcode::FALLOCATE => "FALLOCATE",
            Opcode::READDIRPLUS => "READDIRPLUS",
            Opcode::RENAME2 => "RENAME2",
            Opcode::LSEEK => "LSEEK",
            Opcode::COPY_FILE_RANGE => "COPY_FILE_RANGE",
            Opcode::SETUPMAPPING => "SETUPMAPPING",
            Opcode::REMOVEMAPPING => "REMOVEMAPPING",
            Opcode::SYNCFS => "SYNCFS",
            Opcode::TMPFILE => "TMPFILE",
            Opcode::CUSE_INIT => "CUSE_INIT",
            _ => "UNKNOWN",
        }
    }
}

impl fmt::Debug for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Notification codes (`enum fuse_notify_code`), sent in `OutHeader::error` with unique 0.
pub const FUSE_NOTIFY_POLL: i32 = 1;

/// INIT flags (`fuse_init_in.flags` / `fuse_init_out.flags`; the high half is `flags2`).
pub mod init_flags {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const POSIX_LOCKS: u32 = 1 << 1;
    pub const FILE_OPS: u32 = 1 << 2;
    pub const ATOMIC_O_TRUNC: u32 = 1 << 3;
    pub const EXPORT_SUPPORT: u32 = 1 << 4;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const DONT_MASK: u32 = 1 << 6;
    pub const SPLICE_WRITE: u32 = 1 << 7;
    pub const SPLICE_MOVE: u32 = 1 << 8;
    pub const SPLICE_READ: u32 = 1 << 9;
    pub const FLOCK_LOCKS: u32 = 1 << 10;
    pub const HAS_IOCTL_DIR: u32 = 1 << 11;
    pub const AUTO_INVAL_DATA: u32 = 1 << 12;
    pub const DO_READDIRPLUS: u32 = 1 << 13;
    pub const READDIRPLUS_AUTO: u32 = 1 << 14;
    pub const ASYNC_DIO: u32 = 1 << 15;
    pub const WRITEBACK_CACHE: u32 = 1 << 16;
    pub const NO_OPEN_SUPPORT: u32 = 1 << 17;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const HANDLE_KILLPRIV: u32 = 1 << 19;
    pub const POSIX_ACL: u32 = 1 << 20;
    pub const ABORT_ERROR: u32 = 1 << 21;
    pub const MAX_PAGES: u32 = 1 << 22;
    pub const CACHE_SYMLINKS: u32 = 1 << 23;
    pub const NO_OPENDIR_SUPPORT: u32 = 1 << 24;
    pub const EXPLICIT_INVAL_DATA: u32 = 1 << 25;
    pub const MAP_ALIGNMENT: u32 = 1 << 26;
    pub const SUBMOUNTS: u32 = 1 << 27;
    pub const HANDLE_KILLPRIV_V2: u32 = 1 << 28;
    pub const SETXATTR_EXT: u32 = 1 << 29;
    pub const INIT_EXT: u32 = 1 << 30;
    pub const INIT_RESERVED: u32 = 1 << 31;
}

/// CUSE_INIT flags (`cuse_init_in.flags` / `cuse_init_out.flags`).
pub const CUSE_UNRESTRICTED_IOCTL: u32 = 1 << 0;

/// `fuse_open_out.open_flags`.
pub mod fopen {
    /// Bypass the page cache: every read(2)/write(2) becomes one READ/WRITE request.
    pub const DIRECT_IO: u32 = 1 << 0;
    pub const KEEP_CACHE: u32 = 1 << 1;
    /// The file is not seekable: pread/pwrite fail with ESPIPE. Not for device models.
    pub const NONSEEKABLE: u32 = 1 << 2;
    pub const CACHE_DIR: u32 = 1 << 3;
    /// No file position at all: pread/pwrite fail with ESPIPE. Not for device models.
    pub const STREAM: u32 = 1 << 4;
    pub const NOFLUSH: u32 = 1 << 5;
    pub const PARALLEL_DIRECT_WRITES: u32 = 1 << 6;
}

/// `fuse_ioctl_in.flags` / `fuse_ioctl_out.flags`.
pub mod ioctl_flags {
    pub const COMPAT: u32 = 1 << 0;
    pub const UNRESTRICTED: u32 = 1 << 1;
    pub const RETRY: u32 = 1 << 2;
    pub const BIT32: u32 = 1 << 3;
    pub const DIR: u32 = 1 << 4;
    pub const COMPAT_X32: u32 = 1 << 5;
    /// At most this many in + out iovecs in a RETRY reply.
    pub const MAX_IOV: u32 = 256;
}

/// `fuse_poll_in.flags`: the kernel has a poller waiting; send FUSE_NOTIFY_POLL on change.
pub const FUSE_POLL_SCHEDULE_NOTIFY: u32 = 1 << 0;

/// `fuse_getattr_in.getattr_flags`: `fh` is valid.
pub const FUSE_GETATTR_FH: u32 = 1 << 0;

/// `fuse_setattr_in.valid` bits.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
    pub const LOCKOWNER: u32 = 1 << 9;
    pub const CTIME: u32 = 1 << 10;
    pub const KILL_SUIDGID: u32 = 1 << 11;
}

/// Directory entry types in `fuse_dirent.type` (the `DT_*` values, `st_mode >> 12`).
pub const DT_DIR: u32 = 4;
pub const DT_REG: u32 = 8;

/// `struct fuse_in_header`: starts every request.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// Length of extensions after the body, in 8-byte units.
    pub total_extlen: u16,
    pub padding: u16,
}
const _: () = assert!(size_of::<InHeader>() == 40);

/// `struct fuse_out_header`: starts every reply and notification.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct OutHeader {
    pub len: u32,
    /// `-errno` for a reply, a `FUSE_NOTIFY_*` code for a notification, else 0.
    pub error: i32,
    pub unique: u64,
}
const _: () = assert!(size_of::<OutHeader>() == 16);

/// `struct fuse_init_in` (7.36+; older kernels send only the first 16 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub flags2: u32,
    pub unused: [u32; 11],
}
const _: () = assert!(size_of::<InitIn>() == 64);
/// What kernels before 7.36 send of [`InitIn`].
pub const INIT_IN_COMPAT_SIZE: usize = 16;

/// `struct fuse_init_out`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct InitOut {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
    pub max_pages: u16,
    pub map_alignment: u16,
    pub flags2: u32,
    pub unused: [u32; 7],
}
const _: () = assert!(size_of::<InitOut>() == 64);
/// Reply sizes older kernels expect (`FUSE_COMPAT_INIT_OUT_SIZE`, `FUSE_COMPAT_22_INIT_OUT_SIZE`).
pub const INIT_OUT_COMPAT_SIZE: usize = 8;
pub const INIT_OUT_COMPAT_22_SIZE: usize = 24;

/// `struct cuse_init_in`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct CuseInitIn {
    pub major: u32,
    pub minor: u32,
    pub unused: u32,
    pub flags: u32,
}
const _: () = assert!(size_of::<CuseInitIn>() == 16);

/// `struct cuse_init_out`; followed in the reply by the device info strings
/// (`"DEVNAME=vmbus/hv_fcopy\0"`), at most `CUSE_INIT_INFO_MAX` bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct CuseInitOut {
    pub major: u32,
    pub minor: u32,
    pub unused: u32,
    pub flags: u32,
    pub max_read: u32,
    pub max_write: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub spare: [u32; 10],
}
const _: () = assert!(size_of::<CuseInitOut>() == 72);
pub const CUSE_INIT_INFO_MAX: usize = 4096;

/// `struct fuse_attr`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
    pub flags: u32,
}
const _: () = assert!(size_of::<Attr>() == 88);

/// `struct fuse_entry_out`: the LOOKUP reply.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct EntryOut {
    pub nodeid: u64,
    pub generation: u64,
    /// Seconds the kernel may cache the name → node binding.
    pub entry_valid: u64,
    /// Seconds the kernel may cache the attributes.
    pub attr_valid: u64,
    pub entry_valid_nsec: u32,
    pub attr_valid_nsec: u32,
    pub attr: Attr,
}
const _: () = assert!(size_of::<EntryOut>() == 128);

/// `struct fuse_attr_out`: the GETATTR/SETATTR reply.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct AttrOut {
    pub attr_valid: u64,
    pub attr_valid_nsec: u32,
    pub dummy: u32,
    pub attr: Attr,
}
const _: () = assert!(size_of::<AttrOut>() == 104);

/// `struct fuse_getattr_in`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct GetattrIn {
    pub getattr_flags: u32,
    pub dummy: u32,
    pub fh: u64,
}
const _: () = assert!(size_of::<GetattrIn>() == 16);

/// `struct fuse_setattr_in`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct SetattrIn {
    pub valid: u32,
    pub padding: u32,
    pub fh: u64,
    pub size: u64,
    pub lock_owner: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub unused4: u32,
    pub uid: u32,
    pub gid: u32,
    pub unused5: u32,
}
const _: () = assert!(size_of::<SetattrIn>() == 88);

/// `struct fuse_open_in` (OPEN and OPENDIR).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct OpenIn {
    /// The open(2) flags, less O_CREAT/O_EXCL/O_NOCTTY (and O_TRUNC without ATOMIC_O_TRUNC).
    pub flags: u32,
    pub open_flags: u32,
}
const _: () = assert!(size_of::<OpenIn>() == 8);

/// `struct fuse_open_out`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct OpenOut {
    pub fh: u64,
    pub open_flags: u32,
    pub padding: u32,
}
const _: () = assert!(size_of::<OpenOut>() == 16);

/// `struct fuse_release_in` (RELEASE and RELEASEDIR).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ReleaseIn {
    pub fh: u64,
    pub flags: u32,
    pub release_flags: u32,
    pub lock_owner: u64,
}
const _: () = assert!(size_of::<ReleaseIn>() == 24);

/// `struct fuse_flush_in`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct FlushIn {
    pub fh: u64,
    pub unused: u32,
    pub padding: u32,
    pub lock_owner: u64,
}
const _: () = assert!(size_of::<FlushIn>() == 24);

/// `struct fuse_read_in` (READ and READDIR).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ReadIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub read_flags: u32,
    pub lock_owner: u64,
    pub flags: u32,
    pub padding: u32,
}
const _: () = assert!(size_of::<ReadIn>() == 40);

/// `struct fuse_write_in`, followed by `size` bytes of data.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct WriteIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub write_flags: u32,
    pub lock_owner: u64,
    pub flags: u32,
    pub padding: u32,
}
const _: () = assert!(size_of::<WriteIn>() == 40);

/// `struct fuse_write_out`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct WriteOut {
    pub size: u32,
    pub padding: u32,
}
const _: () = assert!(size_of::<WriteOut>() == 8);

/// `struct fuse_interrupt_in`: the `unique` of the request to interrupt.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct InterruptIn {
    pub unique: u64,
}
const _: () = assert!(size_of::<InterruptIn>() == 8);

/// `struct fuse_ioctl_in`, followed by `in_size` bytes of input.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlIn {
    pub fh: u64,
    pub flags: u32,
    pub cmd: u32,
    pub arg: u64,
    pub in_size: u32,
    pub out_size: u32,
}
const _: () = assert!(size_of::<IoctlIn>() == 32);

/// `struct fuse_ioctl_iovec`: one caller buffer named in a RETRY reply (unrestricted ioctl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlIovec {
    pub base: u64,
    pub len: u64,
}
const _: () = assert!(size_of::<IoctlIovec>() == 16);

/// `struct fuse_ioctl_out`, followed by the output bytes (or, with RETRY, the iovecs).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlOut {
    pub result: i32,
    pub flags: u32,
    pub in_iovs: u32,
    pub out_iovs: u32,
}
const _: () = assert!(size_of::<IoctlOut>() == 16);

/// `struct fuse_poll_in`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct PollIn {
    pub fh: u64,
    /// The kernel's handle for this file's pollers, to name in FUSE_NOTIFY_POLL.
    pub kh: u64,
    pub flags: u32,
    pub events: u32,
}
const _: () = assert!(size_of::<PollIn>() == 24);

/// `struct fuse_poll_out`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct PollOut {
    pub revents: u32,
    pub padding: u32,
}
const _: () = assert!(size_of::<PollOut>() == 8);

/// `struct fuse_notify_poll_wakeup_out`: the body of FUSE_NOTIFY_POLL.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct NotifyPollWakeupOut {
    pub kh: u64,
}
const _: () = assert!(size_of::<NotifyPollWakeupOut>() == 8);

/// `struct fuse_forget_in`: drop `nlookup` references on the request's nodeid.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ForgetIn {
    pub nlookup: u64,
}
const _: () = assert!(size_of::<ForgetIn>() == 8);

/// `struct fuse_forget_one`: one entry of BATCH_FORGET.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ForgetOne {
    pub nodeid: u64,
    pub nlookup: u64,
}
const _: () = assert!(size_of::<ForgetOne>() == 16);

/// `struct fuse_batch_forget_in`, followed by `count` [`ForgetOne`]s.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct BatchForgetIn {
    pub count: u32,
    pub dummy: u32,
}
const _: () = assert!(size_of::<BatchForgetIn>() == 8);

/// `struct fuse_kstatfs` (the whole of `fuse_statfs_out`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct StatfsOut {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
    pub padding: u32,
    pub spare: [u32; 6],
}
const _: () = assert!(size_of::<StatfsOut>() == 80);

/// `struct fuse_dirent` without its name; [`push_dirent`] writes a whole record.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DirentHeader {
    pub ino: u64,
    /// The READDIR offset of the *next* entry.
    pub off: u64,
    pub namelen: u32,
    pub typ: u32,
}
const _: () = assert!(size_of::<DirentHeader>() == 24);

/// A request body that does not hold what its opcode promises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub what: &'static str,
    pub need: usize,
    pub got: usize,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "malformed {}: need {} bytes, got {}",
            self.what, self.need, self.got
        )
    }
}

impl std::error::Error for ParseError {}

/// Reads a `T` from the front of `body`, returning it and the bytes after it.
pub fn parse<T: FromBytes>(body: &[u8]) -> Result<(T, &[u8]), ParseError> {
    T::read_from_prefix(body).map_err(|_| ParseError {
        what: std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("body"),
        need: size_of::<T>(),
        got: body.len(),
    })
}

/// Reads a `T` that older kernels send shorter: at least `min_len` bytes must be there, the
/// missing tail reads as zeros (e.g. `fuse_init_in` before 7.36 has no `flags2`).
pub fn parse_padded<T: FromBytes + IntoBytes>(
    body: &[u8],
    min_len: usize,
) -> Result<T, ParseError> {
    if body.len() < min_len {
        return Err(ParseError {
            what: std::any::type_name::<T>()
                .rsplit("::")
                .next()
                .unwrap_or("body"),
            need: min_len,
            got: body.len(),
        });
    }
    let mut value = T::new_zeroed();
    let dst = value.as_mut_bytes();
    let n = dst.len().min(body.len());
    dst[..n].copy_from_slice(&body[..n]);
    Ok(value)
}

/// Reads the NUL-terminated name that LOOKUP (and friends) carry.
pub fn parse_name(body: &[u8]) -> Result<&[u8], ParseError> {
    match body.iter().position(|&b| b == 0) {
        Some(end) => Ok(&body[..end]),
        None => Err(ParseError {
            what: "NUL-terminated name",
            need: body.len() + 1,
            got: body.len(),
        }),
    }
}

/// Size of a dirent record for a name of `namelen` bytes (`FUSE_DIRENT_SIZE`).
pub fn dirent_size(namelen: usize) -> usize {
    (size_of::<DirentHeader>() + namelen + 7) & !7
}

/// Appends one dirent record to `buf` unless that would make it longer than `limit`.
/// Returns whether it fit.
pub fn push_dirent(
    buf: &mut Vec<u8>,
    limit: usize,
    ino: u64,
    off: u64,
    typ: u32,
    name: &[u8],
) -> bool {
    let size = dirent_size(name.len());
    if buf.len() + size > limit {
        return false;
    }
    let header = DirentHeader {
        ino,
        off,
        namelen: name.len() as u32,
        typ,
    };
    let start = buf.len();
    buf.extend_from_slice(header.as_bytes());
    buf.extend_from_slice(name);
    buf.resize(start + size, 0);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn struct_sizes_match_linux_6_1_uapi() {
        // The numbers are sizeof() of the structs in include/uapi/linux/fuse.h (7.38).
        assert_eq!(size_of::<InHeader>(), 40);
        assert_eq!(size_of::<OutHeader>(), 16);
        assert_eq!(size_of::<InitIn>(), 64);
        assert_eq!(size_of::<InitOut>(), 64);
        assert_eq!(size_of::<CuseInitIn>(), 16);
        assert_eq!(size_of::<CuseInitOut>(), 72);
        assert_eq!(size_of::<Attr>(), 88);
        assert_eq!(size_of::<EntryOut>(), 128);
        assert_eq!(size_of::<AttrOut>(), 104);
        assert_eq!(size_of::<GetattrIn>(), 16);
        assert_eq!(size_of::<SetattrIn>(), 88);
        assert_eq!(size_of::<OpenIn>(), 8);
        assert_eq!(size_of::<OpenOut>(), 16);
        assert_eq!(size_of::<ReleaseIn>(), 24);
        assert_eq!(size_of::<FlushIn>(), 24);
        assert_eq!(size_of::<ReadIn>(), 40);
        assert_eq!(size_of::<WriteIn>(), 40);
        assert_eq!(size_of::<WriteOut>(), 8);
        assert_eq!(size_of::<InterruptIn>(), 8);
        assert_eq!(size_of::<IoctlIn>(), 32);
        assert_eq!(size_of::<IoctlOut>(), 16);
        assert_eq!(size_of::<IoctlIovec>(), 16);
        assert_eq!(size_of::<PollIn>(), 24);
        assert_eq!(size_of::<PollOut>(), 8);
        assert_eq!(size_of::<NotifyPollWakeupOut>(), 8);
        assert_eq!(size_of::<ForgetIn>(), 8);
        assert_eq!(size_of::<ForgetOne>(), 16);
        assert_eq!(size_of::<BatchForgetIn>(), 8);
        assert_eq!(size_of::<StatfsOut>(), 80);
        assert_eq!(size_of::<DirentHeader>(), 24);
    }

    #[test]
    fn field_offsets_match_linux_6_1_uapi() {
        assert_eq!(offset_of!(InHeader, unique), 8);
        assert_eq!(offset_of!(InHeader, nodeid), 16);
        assert_eq!(offset_of!(InHeader, pid), 32);
        assert_eq!(offset_of!(InHeader, total_extlen), 36);
        assert_eq!(offset_of!(OutHeader, unique), 8);
        assert_eq!(offset_of!(InitOut, max_background), 16);
        assert_eq!(offset_of!(InitOut, max_write), 20);
        assert_eq!(offset_of!(InitOut, max_pages), 28);
        assert_eq!(offset_of!(InitOut, flags2), 32);
        assert_eq!(offset_of!(CuseInitOut, dev_major), 24);
        assert_eq!(offset_of!(Attr, atimensec), 48);
        assert_eq!(offset_of!(Attr, mode), 60);
        assert_eq!(offset_of!(Attr, blksize), 80);
        assert_eq!(offset_of!(EntryOut, attr), 40);
        assert_eq!(offset_of!(AttrOut, attr), 16);
        assert_eq!(offset_of!(SetattrIn, mode), 68);
        assert_eq!(offset_of!(ReadIn, size), 16);
        assert_eq!(offset_of!(WriteIn, size), 16);
        assert_eq!(offset_of!(IoctlIn, cmd), 12);
        assert_eq!(offset_of!(IoctlIn, in_size), 24);
        assert_eq!(offset_of!(PollIn, events), 20);
        assert_eq!(offset_of!(DirentHeader, typ), 20);
    }

    #[test]
    fn opcodes_match_linux_6_1_uapi() {
        assert_eq!(Opcode::LOOKUP.0, 1);
        assert_eq!(Opcode::OPEN.0, 14);
        assert_eq!(Opcode::INIT.0, 26);
        assert_eq!(Opcode::INTERRUPT.0, 36);
        assert_eq!(Opcode::IOCTL.0, 39);
        assert_eq!(Opcode::POLL.0, 40);
        assert_eq!(Opcode::BATCH_FORGET.0, 42);
        assert_eq!(Opcode::TMPFILE.0, 51);
        assert_eq!(Opcode::CUSE_INIT.0, 4096);
        assert_eq!(Opcode(9999).name(), "UNKNOWN");
        assert_eq!(format!("{}", Opcode::READ), "READ(15)");
    }

    #[test]
    fn short_body_is_a_parse_error_not_a_panic() {
        for len in 0..size_of::<WriteIn>() {
            let body = vec![0xa5u8; len];
            let err = parse::<WriteIn>(&body).unwrap_err();
            assert_eq!(err.need, 40);
            assert_eq!(err.got, len);
            assert!(err.to_string().contains("WriteIn"), "{err}");
        }
        assert!(parse::<InHeader>(&[]).is_err());
        assert!(parse::<IoctlIn>(&[1, 2, 3]).is_err());
    }

    #[test]
    fn garbage_body_of_the_right_size_parses_and_keeps_the_rest() {
        let mut body = vec![0xffu8; size_of::<ReadIn>()];
        body.extend_from_slice(b"tail");
        let (read_in, rest) = parse::<ReadIn>(&body).unwrap();
        assert_eq!(read_in.size, u32::MAX);
        assert_eq!(rest, b"tail");
    }

    #[test]
    fn old_init_in_is_padded_and_too_short_init_in_is_refused() {
        let mut body = Vec::new();
        for word in [7u32, 31, 65536, init_flags::MAX_PAGES] {
            body.extend_from_slice(&word.to_ne_bytes());
        }
        let init: InitIn = parse_padded(&body, INIT_IN_COMPAT_SIZE).unwrap();
        assert_eq!((init.major, init.minor, init.flags2), (7, 31, 0));
        assert_eq!(init.flags, init_flags::MAX_PAGES);
        assert!(parse_padded::<InitIn>(&body[..8], INIT_IN_COMPAT_SIZE).is_err());
        // More than the struct (a future kernel) is fine too.
        let long = vec![0u8; 200];
        assert!(parse_padded::<InitIn>(&long, INIT_IN_COMPAT_SIZE).is_ok());
    }

    #[test]
    fn name_without_nul_is_a_parse_error() {
        assert_eq!(parse_name(b"hv_fcopy\0").unwrap(), b"hv_fcopy");
        assert_eq!(parse_name(b"a\0garbage").unwrap(), b"a");
        assert!(parse_name(b"hv_fcopy").is_err());
        assert!(parse_name(b"").is_err());
    }

    #[test]
    fn dirents_are_padded_to_8_bytes_and_respect_the_limit() {
        let mut buf = Vec::new();
        assert!(push_dirent(&mut buf, 4096, 1, 1, DT_DIR, b"."));
        assert_eq!(buf.len(), 32);
        assert!(push_dirent(&mut buf, 4096, 5, 2, DT_REG, b"hv_fcopy"));
        assert_eq!(buf.len(), 64);
        let (header, rest) = parse::<DirentHeader>(&buf[32..]).unwrap();
        assert_eq!(
            (header.ino, header.off, header.namelen, header.typ),
            (5, 2, 8, DT_REG)
        );
        assert_eq!(&rest[..8], b"hv_fcopy");
        assert!(!push_dirent(&mut buf, 70, 6, 3, DT_REG, b"x"));
        assert_eq!(buf.len(), 64);
    }
}
