//! Small syscall helpers the real-FUSE tests share.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::errno::Errno;

/// The errno of an OS error.
pub fn errno(err: io::Error) -> Errno {
    Errno::from_raw(err.raw_os_error().expect("an OS error"))
}

/// ioctl(2) with an 8-byte in/out buffer.
pub fn ioctl_rw(file: &File, cmd: u32, buf: &mut [u8; 8]) -> Result<i32, Errno> {
    // SAFETY: `buf` is a valid, writable 8-byte buffer, which is the size `cmd` encodes, so
    // the kernel reads and writes only inside it.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), cmd as libc::c_ulong, buf.as_mut_ptr()) };
    Errno::result(ret)
}

/// How many mounts the calling thread's mount namespace has at `path`.
pub fn mounts_at(path: &Path) -> usize {
    // thread-self: a test thread has its own mount namespace, the process leader does not.
    let mountinfo = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
    let wanted = path.to_str().unwrap();
    mountinfo
        .lines()
        .filter(|line| line.split_whitespace().nth(4) == Some(wanted))
        .count()
}
