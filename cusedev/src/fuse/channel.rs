//! The open `/dev/fuse` (or `/dev/cuse`) descriptor: whole requests in, whole replies out.
//!
//! The kernel's rules for this file are few and strict: one read(2) returns exactly one request
//! (and fails with EINVAL if the buffer could not hold the largest one), and one write(2)
//! delivers exactly one reply, header and body together. So replies go out as a single
//! writev(2) of the out header plus the body pieces, never as two writes.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use zerocopy::IntoBytes;

use super::abi::{NotifyPollWakeupOut, OutHeader, FUSE_NOTIFY_POLL};

/// One FUSE/CUSE connection's device descriptor, shared by the reader and the workers.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    pub fn new(fd: OwnedFd) -> Channel {
        Channel { fd }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Reads one request into `buf`; returns its length.
    pub fn read_request(&self, buf: &mut [u8]) -> Result<usize, Errno> {
        nix::unistd::read(self.fd.as_raw_fd(), buf)
    }

    /// Sends a reply to request `unique`: `error` is 0 or a negative errno, `body` the pieces
    /// of the reply body (ignored by the kernel for an error reply, so pass none).
    pub fn reply(&self, unique: u64, error: i32, body: &[&[u8]]) -> Result<(), Errno> {
        self.send(unique, error, body)
    }

    /// Tells the kernel that the pollers behind `kh` should poll again (FUSE_NOTIFY_POLL).
    pub fn notify_poll(&self, kh: u64) -> Result<(), Errno> {
        let wakeup = NotifyPollWakeupOut { kh };
        self.send(0, FUSE_NOTIFY_POLL, &[wakeup.as_bytes()])
    }

    fn send(&self, unique: u64, error: i32, body: &[&[u8]]) -> Result<(), Errno> {
        let body_len: usize = body.iter().map(|part| part.len()).sum();
        let len = size_of::<OutHeader>() + body_len;
        let header = OutHeader {
            len: u32::try_from(len).map_err(|_| Errno::E2BIG)?,
            error,
            unique,
        };
        let mut iov = Vec::with_capacity(body.len() + 1);
        iov.push(IoSlice::new(header.as_bytes()));
        iov.extend(
            body.iter()
                .filter(|part| !part.is_empty())
                .map(|part| IoSlice::new(part)),
        );
        loop {
            match nix::sys::uio::writev(self.fd.as_fd(), &iov) {
                Ok(written) if written == len => return Ok(()),
                // The kernel takes a reply whole or not at all; a short count would be a
                // kernel bug, but say so rather than pretend it went out.
                Ok(_) => return Err(Errno::EIO),
                Err(Errno::EINTR) => continue,
                Err(err) => return Err(err),
            }
        }
    }
}
