//! A device node opened by the test itself, which plays the daemon through plain syscalls.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub use nix::errno::Errno;

/// An open device file.
pub struct Dev(Option<OwnedFd>);

fn check(rc: isize) -> Result<usize, Errno> {
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(rc as usize)
    }
}

impl Dev {
    /// `open(path, O_RDWR)`, as the daemons do, plus O_CLOEXEC: the tests spawn helper
    /// processes that must not inherit the device (an inherited fd keeps the file open, so
    /// closing ours would not reach the driver's release).
    pub fn open(path: &str) -> Result<Dev, Errno> {
        let path = CString::new(path).expect("path without NUL");
        // SAFETY: path is a valid NUL-terminated string; the fd returned is owned by us.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(Errno::last());
        }
        // SAFETY: fd was just returned by open() and is not owned elsewhere.
        Ok(Dev(Some(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    pub fn raw(&self) -> RawFd {
        self.0.as_ref().map_or(-1, |fd| fd.as_raw_fd())
    }

    pub fn write(&self, bytes: &[u8]) -> Result<usize, Errno> {
        // SAFETY: bytes is a valid buffer of bytes.len() bytes for the duration of the call.
        check(unsafe { libc::write(self.raw(), bytes.as_ptr().cast(), bytes.len()) })
    }

    pub fn write_u32(&self, value: u32) -> Result<usize, Errno> {
        self.write(&value.to_ne_bytes())
    }

    /// `pread(fd, buf, count, 0)` as the fcopy daemon reads.
    pub fn pread(&self, count: usize) -> Result<Vec<u8>, Errno> {
        let mut buf = vec![0u8; count];
        // SAFETY: buf is a valid writable buffer of `count` bytes.
        let n = check(unsafe { libc::pread(self.raw(), buf.as_mut_ptr().cast(), count, 0) })?;
        buf.truncate(n);
        Ok(buf)
    }

    /// `read(fd, buf, count)`.
    pub fn read(&self, count: usize) -> Result<Vec<u8>, Errno> {
        let mut buf = vec![0u8; count];
        // SAFETY: buf is a valid writable buffer of `count` bytes.
        let n = check(unsafe { libc::read(self.raw(), buf.as_mut_ptr().cast(), count) })?;
        buf.truncate(n);
        Ok(buf)
    }

    /// poll(2) for POLLIN|POLLOUT; returns revents (0 on timeout).
    pub fn poll(&self, timeout_ms: i32) -> Result<u32, Errno> {
        let mut pfd = libc::pollfd {
            fd: self.raw(),
            events: libc::POLLIN | libc::POLLOUT | libc::POLLRDNORM | libc::POLLWRNORM,
            revents: 0,
        };
        // SAFETY: pfd is one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 {
            return Err(Errno::last());
        }
        Ok(pfd.revents as u16 as u32)
    }

    /// ioctl(fd, cmd, arg) with an integer argument.
    pub fn ioctl(&self, cmd: u64, arg: u64) -> Result<i32, Errno> {
        // SAFETY: the commands used in tests take no pointer the kernel would dereference
        // in our address space other than `arg`, which the tests pass as plain integers.
        let rc = unsafe { libc::ioctl(self.raw(), cmd as _, arg) };
        if rc < 0 {
            Err(Errno::last())
        } else {
            Ok(rc)
        }
    }
}

/// The u32 at `offset` of a message, native-endian as the daemons read it.
pub fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"))
}

/// The NUL-terminated string at `offset` (at most `max` bytes).
pub fn cstr_at(bytes: &[u8], offset: usize, max: usize) -> String {
    let field = &bytes[offset..offset + max];
    let end = field.iter().position(|&b| b == 0).unwrap_or(max);
    String::from_utf8_lossy(&field[..end]).into_owned()
}

impl Drop for Dev {
    /// close(2), never while another test is between fork and exec (see `SPAWN_LOCK`).
    fn drop(&mut self) {
        let _guard = crate::spawn_guard();
        drop(self.0.take());
    }
}
