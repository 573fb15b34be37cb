//! A request line with an open file descriptor attached (SCM_RIGHTS).
//!
//! The CLI opens the source file itself, with the user's own permissions, and hands us the open
//! descriptor in the same message as the copy request. The host (root) therefore never opens a
//! path on the user's behalf: no confused deputy, no race between a check and an open.

use std::io::{self, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// The kernel's limit on descriptors in one SCM_RIGHTS message (`SCM_MAX_FD`). Room for all
/// of them means MSG_CTRUNC cannot hide descriptors from us (which would leak them).
const SCM_MAX_FD: usize = 253;

/// Why a request could not be received.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The socket failed.
    #[error("cannot read the request: {0}")]
    Io(#[from] io::Error),
    /// The peer closed before a whole line.
    #[error("the request ended before its newline")]
    Truncated,
    /// The line is longer than allowed.
    #[error("the request is longer than {0} bytes")]
    TooLong(usize),
    /// Ancillary data was cut off: descriptors may have been lost.
    #[error("the request's ancillary data was truncated")]
    ControlTruncated,
}

/// Sends `line` with `fd` (if any) attached to its first byte.
pub fn send_line(sock: &UnixStream, line: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let raw: Vec<RawFd> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    let sent = loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(line)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => break n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    // The descriptor went with the first chunk; a short send just needs the rest of the bytes.
    (&*sock).write_all(line.get(sent..).unwrap_or_default())
}

/// Receives one line (up to and including '\n', which is stripped) and every descriptor that
/// came with it. Bytes after the newline are discarded: a connection carries one request.
pub fn recv_line(sock: &UnixStream, max: usize) -> Result<(Vec<u8>, Vec<OwnedFd>), RecvError> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
        let mut iov = [IoSliceMut::new(&mut chunk)];
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => msg,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(RecvError::Io(e.into())),
        };
        let n = msg.bytes;
        let Ok(cmsgs) = msg.cmsgs() else {
            return Err(RecvError::ControlTruncated);
        };
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(received) = c {
                for raw in received {
                    // SAFETY: the kernel has just installed `raw` in our descriptor table for
                    // this SCM_RIGHTS message; nothing else in the process knows or owns it, so
                    // taking sole ownership (closing it on drop) is sound.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
        if n == 0 {
            return Err(RecvError::Truncated);
        }
        let data = chunk.get(..n).unwrap_or_default();
        if let Some(end) = data.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(data.get(..end).unwrap_or_default());
            if line.len() > max {
                return Err(RecvError::TooLong(max));
            }
            return Ok((line, fds));
        }
        line.extend_from_slice(data);
        if line.len() > max {
            return Err(RecvError::TooLong(max));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Read;
    use std::os::fd::AsFd;

    #[test]
    fn line_and_descriptor_arrive_together() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = File::open("/proc/self/exe").unwrap();
        send_line(&a, b"{\"op\":\"status\"}\n", Some(file.as_fd())).unwrap();
        let (line, fds) = recv_line(&b, 1024).unwrap();
        assert_eq!(line, b"{\"op\":\"status\"}");
        assert_eq!(fds.len(), 1);
        let mut head = [0u8; 4];
        File::from(fds.into_iter().next().unwrap())
            .read_exact(&mut head)
            .unwrap();
        assert_eq!(&head, b"\x7fELF");
    }

    #[test]
    fn line_without_descriptor_is_fine() {
        let (a, b) = UnixStream::pair().unwrap();
        send_line(&a, b"x\n", None).unwrap();
        let (line, fds) = recv_line(&b, 1024).unwrap();
        assert_eq!(line, b"x");
        assert!(fds.is_empty());
    }

    #[test]
    fn unterminated_or_oversized_lines_are_errors() {
        let (a, b) = UnixStream::pair().unwrap();
        send_line(&a, b"no newline", None).unwrap();
        drop(a);
        assert!(matches!(recv_line(&b, 1024), Err(RecvError::Truncated)));

        let (a, b) = UnixStream::pair().unwrap();
        send_line(&a, &[b'x'; 100], None).unwrap();
        assert!(matches!(recv_line(&b, 10), Err(RecvError::TooLong(10))));
    }
}
