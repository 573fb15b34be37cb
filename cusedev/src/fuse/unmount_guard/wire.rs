//! What cusedev tells its unmount guard, one datagram per message on a `SOCK_SEQPACKET`
//! socketpair: `watch KEY PATH` with the mount's root attached as an `O_PATH` descriptor
//! (SCM_RIGHTS), and `forget KEY` when cusedev is about to unmount it itself.
//!
//! A seqpacket socket keeps each message whole (no framing to get wrong) and, like a pipe,
//! reads end-of-file once the last copy of the other end is closed, however its process died.
//! Only a socket can carry a descriptor, which is what makes the guard exact (`mod.rs`).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// The longest message: the verb, a key and a path of up to PATH_MAX bytes.
const MAX_MESSAGE: usize = 64 + libc::PATH_MAX as usize;

/// One message from cusedev to its guard.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    /// Watch the mount whose root is the attached descriptor, known by `key` from now on;
    /// `path` is where it was mounted, for the log.
    Watch { key: u64, path: PathBuf },
    /// cusedev unmounts `key` itself: let go of it.
    Forget { key: u64 },
}

impl Message {
    fn encode(&self) -> Vec<u8> {
        match self {
            Message::Watch { key, path } => {
                let mut bytes = format!("watch {key} ").into_bytes();
                bytes.extend_from_slice(path.as_os_str().as_bytes());
                bytes
            }
            Message::Forget { key } => format!("forget {key}").into_bytes(),
        }
    }

    /// The message in `bytes`, or `None` when it is not one.
    fn decode(bytes: &[u8]) -> Option<Message> {
        let mut parts = bytes.splitn(3, |&b| b == b' ');
        let verb = parts.next()?;
        let key = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
        match (verb, parts.next()) {
            (b"watch", Some(path)) if !path.is_empty() => Some(Message::Watch {
                key,
                path: PathBuf::from(std::ffi::OsStr::from_bytes(path)),
            }),
            (b"forget", None) => Some(Message::Forget { key }),
            _ => None,
        }
    }
}

/// Sends `message` with `fd` attached, without waiting: a guard that does not read (stopped,
/// or gone) must never stall a mount. EAGAIN says it is not reading, EPIPE that it is gone.
pub fn send(
    socket: BorrowedFd<'_>,
    message: &Message,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), Errno> {
    let bytes = message.encode();
    let raw: Vec<RawFd> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    loop {
        match sendmsg::<()>(
            socket.as_raw_fd(),
            &[IoSlice::new(&bytes)],
            cmsgs,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            // A seqpacket send is all or nothing.
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(err) => return Err(err),
        }
    }
}

/// What one receive brought.
#[derive(Debug)]
pub enum Received {
    /// A message, and the descriptor that came with it.
    Message(Message, Option<OwnedFd>),
    /// Something that is not a message (any descriptor that came with it is closed).
    Garbled,
    /// End of file: every copy of cusedev's end is closed.
    Closed,
}

/// Receives the next message, blocking.
pub fn recv(socket: BorrowedFd<'_>) -> Result<Received, Errno> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        // Room for one descriptor: a message with more is garbled, and the kernel closes what
        // does not fit (MSG_CTRUNC), so nothing leaks.
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => msg,
            Err(Errno::EINTR) => continue,
            Err(err) => return Err(err),
        };
        let truncated = msg
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        let mut fds = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(received) = c {
                    // SAFETY: the kernel has just installed these descriptors in our table for
                    // this message; nothing else in the process knows them, so taking sole
                    // ownership (closing them on drop) is sound.
                    fds.extend(
                        received
                            .into_iter()
                            .map(|raw| unsafe { OwnedFd::from_raw_fd(raw) }),
                    );
                }
            }
        }
        let n = msg.bytes;
        if n == 0 && fds.is_empty() && !truncated && peer_is_gone(socket) {
            return Ok(Received::Closed);
        }
        let message = buf.get(..n).and_then(Message::decode);
        return Ok(match message {
            Some(message) if !truncated && fds.len() <= 1 => Received::Message(message, fds.pop()),
            _ => Received::Garbled,
        });
    }
}

/// Whether the other end has closed or shut down writing: a zero-byte receive on a seqpacket
/// socket is also what an empty message gives, and only this tells them apart (`unix_poll`,
/// net/unix/af_unix.c, 6.1: RCV_SHUTDOWN gives POLLRDHUP, a closed peer POLLHUP).
/// (nix's `PollFlags` has no POLLRDHUP, hence libc.)
fn peer_is_gone(socket: BorrowedFd<'_>) -> bool {
    let mut fd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call; a zero timeout.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) };
    ready == 1 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Read;
    use std::os::fd::AsFd;

    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    #[test]
    fn messages_round_trip_with_their_descriptor() {
        let (a, b) = pair();
        let watch = Message::Watch {
            key: 7,
            path: PathBuf::from("/dev/with space/vmbus"),
        };
        let file = File::open("/proc/self/exe").unwrap();
        send(a.as_fd(), &watch, Some(file.as_fd())).unwrap();
        send(a.as_fd(), &Message::Forget { key: 7 }, None).unwrap();
        let Received::Message(got, Some(fd)) = recv(b.as_fd()).unwrap() else {
            panic!("no watch with a descriptor");
        };
        assert_eq!(got, watch);
        let mut head = [0u8; 4];
        File::from(fd).read_exact(&mut head).unwrap();
        assert_eq!(&head, b"\x7fELF");
        assert!(matches!(
            recv(b.as_fd()).unwrap(),
            Received::Message(Message::Forget { key: 7 }, None)
        ));
        drop(a);
        assert!(matches!(recv(b.as_fd()).unwrap(), Received::Closed));
    }

    #[test]
    fn anything_else_is_garbled_not_a_panic() {
        for bad in [
            &b"watch 1"[..],
            b"watch x /dev/vmbus",
            b"watch 1 ",
            b"forget",
            b"forget 1 extra",
            b"unmount 1 /",
            b"\xff\xfe",
        ] {
            assert_eq!(Message::decode(bad), None, "{bad:?}");
        }
        let (a, b) = pair();
        nix::sys::socket::send(
            a.as_raw_fd(),
            b"forget 99999999999999999999",
            MsgFlags::empty(),
        )
        .unwrap();
        assert!(matches!(recv(b.as_fd()).unwrap(), Received::Garbled));
        // An empty message is not the end of the file.
        nix::sys::socket::send(a.as_raw_fd(), b"", MsgFlags::empty()).unwrap();
        assert!(matches!(recv(b.as_fd()).unwrap(), Received::Garbled));
        nix::sys::socket::shutdown(a.as_raw_fd(), nix::sys::socket::Shutdown::Write).unwrap();
        assert!(matches!(recv(b.as_fd()).unwrap(), Received::Closed));
    }

    #[test]
    fn a_guard_that_does_not_read_never_stalls_the_sender() {
        let (a, _b) = pair();
        let forget = Message::Forget { key: 1 };
        let err = (0..1_000_000)
            .find_map(|_| send(a.as_fd(), &forget, None).err())
            .unwrap();
        assert_eq!(err, Errno::EAGAIN);
        let (a, b) = pair();
        drop(b);
        assert_eq!(send(a.as_fd(), &forget, None), Err(Errno::EPIPE));
    }
}
