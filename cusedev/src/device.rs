//! The seam between frontends and device models: `struct file_operations`, said in Rust.
//!
//! A kernel misc driver hands the VFS a table of functions (open, read, write, ioctl, poll,
//! release) and the VFS calls them on behalf of `current`, the process that made the syscall.
//! [`Device`] is that table. Every frontend (a FUSE mount today, CUSE next) turns a request
//! from `/dev/fuse` or `/dev/cuse` into one of these calls, with a [`Caller`] that carries what
//! the kernel would know as `current`.
//!
//! Each method has a default that returns what the VFS returns when a driver lacks that
//! operation (fs/read_write.c, fs/ioctl.c, fs/select.c of Linux 6.1), so a driver file only
//! writes the operations its kernel counterpart really has.

use std::sync::Arc;

pub use nix::errno::Errno;

pub use crate::caller::{Caller, CredentialIdentity};
pub use crate::reply::{Parked, Pending, WaitList};

/// Identifies one open file of a device (the driver's `struct file *`).
pub type Handle = u64;

/// poll(2) bits, as the kernel's `EPOLL*` values (identical to `POLL*` on x86).
pub mod poll_bits {
    pub const POLLIN: u32 = 0x0001;
    pub const POLLPRI: u32 = 0x0002;
    pub const POLLOUT: u32 = 0x0004;
    pub const POLLERR: u32 = 0x0008;
    pub const POLLHUP: u32 = 0x0010;
    pub const POLLRDNORM: u32 = 0x0040;
    pub const POLLWRNORM: u32 = 0x0100;
    /// What `vfs_poll` reports for a file whose driver has no `.poll`
    /// (`DEFAULT_POLLMASK`, include/linux/poll.h).
    pub const DEFAULT_POLLMASK: u32 = POLLIN | POLLOUT | POLLRDNORM | POLLWRNORM;
}

/// Something a frontend can poke when a device's poll readiness may have changed.
///
/// For a FUSE/CUSE frontend this sends FUSE_NOTIFY_POLL with the kernel's poll handle; the
/// kernel then polls again. Like a `poll_table` entry, one registration serves one wake-up.
pub trait PollNotify: Send + Sync {
    fn notify(&self);
}

/// A registration made by `poll()`: the device keeps it and calls [`PollWaker::wake`] when the
/// readiness may have changed (the kernel's `poll_wait()` + `wake_up_interruptible()`).
#[derive(Clone)]
pub struct PollWaker(pub Arc<dyn PollNotify>);

impl PollWaker {
    pub fn wake(&self) {
        self.0.notify();
    }
}

impl std::fmt::Debug for PollWaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PollWaker")
    }
}

/// One buffer in the caller's address space that an ioctl argument names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserBuffer {
    pub addr: u64,
    pub len: u64,
}

/// An `ioctl(2)` as it reaches the driver.
///
/// A kernel driver gets `cmd` and `arg` and calls `copy_from_user`/`copy_to_user` on whatever
/// `arg` points to. A userspace driver cannot reach the caller's memory by itself, so the
/// frontend fetches it:
/// - restricted ioctl (FUSE mounts): the kernel has already fetched `_IOC_SIZE(cmd)` bytes at
///   `arg` for `_IOC_WRITE` commands (`input`) and takes up to `out_size` bytes back to `arg`
///   for `_IOC_READ` commands;
/// - unrestricted ioctl (CUSE, `unrestricted == true`): the first call arrives with no input and
///   `out_size == 0`; the driver answers [`IoctlOutcome::Retry`] naming the buffers it would
///   `copy_from_user`/`copy_to_user`, and is called again with their contents. A struct that
///   carries pointers takes one more round: first the struct, then the buffers it names.
#[derive(Debug, Clone, Copy)]
pub struct IoctlCall<'a> {
    pub cmd: u32,
    pub arg: u64,
    /// The caller memory fetched for this call, concatenated in the order it was asked for.
    pub input: &'a [u8],
    /// How many bytes the answer may carry back (restricted: to `arg`; unrestricted: spread
    /// over the output buffers of the last retry, in order).
    pub out_size: u32,
    /// Whether the driver may ask for any caller buffers with [`IoctlOutcome::Retry`].
    pub unrestricted: bool,
    /// A 32-bit caller on a 64-bit kernel (FUSE_IOCTL_COMPAT): the kernel would call the
    /// driver's `.compat_ioctl`, and a driver without one gives ENOTTY (fs/ioctl.c,
    /// `compat_sys_ioctl`).
    pub compat: bool,
}

/// The answer to an ioctl: the return value of the syscall and bytes to copy back to the
/// caller (restricted: at most the size encoded in `cmd`; unrestricted: at most `out_size`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IoctlReply {
    pub result: i32,
    pub out: Vec<u8>,
}

/// What a driver's ioctl asks the frontend to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoctlOutcome {
    /// The syscall completes.
    Done(IoctlReply),
    /// Unrestricted ioctl only: fetch `input` from the caller, make room for `output`, and call
    /// again (FUSE_IOCTL_RETRY). A fault on any of them fails the syscall with EFAULT in the
    /// kernel, before the driver sees the retry, as `copy_from_user` would.
    Retry {
        input: Vec<UserBuffer>,
        output: Vec<UserBuffer>,
    },
}

impl From<IoctlReply> for IoctlOutcome {
    fn from(reply: IoctlReply) -> IoctlOutcome {
        IoctlOutcome::Done(reply)
    }
}

/// The answer to a read: the bytes (at most the count asked for).
pub type ReadReply = Pending<Vec<u8>>;
/// The answer to a write: the byte count the syscall returns.
pub type WriteReply = Pending<u32>;
/// The answer to an ioctl.
pub type IoctlAnswer = Pending<IoctlOutcome>;

/// One kernel character-device driver, as its `file_operations` table.
///
/// Which calls may sleep: `read`, `write` and `ioctl` may wait exactly where the kernel's would
/// (a `wait_event_interruptible`, a `down_interruptible`, a `wait_for_completion`), and they do
/// it by *parking their reply* ([`Pending::park_interruptible`], [`Pending::park`]), never by
/// blocking the thread they are called on: that thread is a frontend thread that has other
/// requests to read. Whoever has the answer later (a packet from the host, another caller's
/// write) claims the parked reply and answers it. `open`, `poll` and `release` must not sleep:
/// none of the drivers modelled here sleeps in them, and the frontends answer them in order.
///
/// Every call must return promptly; a call that has slow work to do (large copies) does it
/// before returning or on a thread of its own, with the reply moved there.
pub trait Device: Send + Sync {
    /// The misc device name, relative to `/dev` (`"vmbus/hv_fcopy"`).
    fn name(&self) -> &str;

    /// Permission bits of the node. Misc devices are created 0600 root:root unless the driver
    /// sets `miscdevice.mode` (drivers/char/misc.c).
    fn mode(&self) -> u32 {
        0o600
    }

    /// `open(2)`. `flags` are the open flags the kernel passed (O_RDWR, O_NONBLOCK, ...).
    fn open(&self, caller: &Caller, flags: i32) -> Result<Handle, Errno>;

    /// `read(2)`/`pread(2)` of `count` bytes. No `.read` in a driver: `vfs_read` returns EINVAL.
    fn read(&self, _handle: Handle, _count: u32, _offset: u64, _caller: &Caller, reply: ReadReply) {
        reply.err(Errno::EINVAL)
    }

    /// `write(2)`/`pwrite(2)`; answers the byte count the syscall returns. No `.write`:
    /// `vfs_write` returns EINVAL.
    fn write(
        &self,
        _handle: Handle,
        _data: &[u8],
        _offset: u64,
        _caller: &Caller,
        reply: WriteReply,
    ) {
        reply.err(Errno::EINVAL)
    }

    /// `ioctl(2)`: see [`IoctlCall`] for how the argument's memory arrives. No
    /// `.unlocked_ioctl`: ENOTTY.
    fn ioctl(&self, _handle: Handle, _call: &IoctlCall<'_>, _caller: &Caller, reply: IoctlAnswer) {
        reply.err(Errno::ENOTTY)
    }

    /// `poll(2)`: the current readiness, and if `waker` is given, a registration to wake when
    /// it may change. No `.poll`: always readable and writable.
    fn poll(&self, _handle: Handle, _waker: Option<PollWaker>) -> u32 {
        poll_bits::DEFAULT_POLLMASK
    }

    /// The last `close(2)` of the open file (`.release`). The kernel ignores its return value.
    fn release(&self, _handle: Handle) {}
}
