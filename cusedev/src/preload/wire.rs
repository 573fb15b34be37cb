//! Messages on the preload frontend's sockets: whole SOCK_SEQPACKET messages in, with the
//! credentials the kernel attached and at most one descriptor; whole messages out.
//!
//! The credentials are the point: they are what `struct cred` and `current->tgid` are to a
//! kernel driver, and the kernel vouches for them (`scm_check_creds`, net/core/scm.c of Linux
//! 6.1). Nothing in the message body is ever taken as an identity.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr,
    UnixCredentials,
};

/// Who sent a message, as the kernel says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// The sender's process id (tgid) in cusedev's pid namespace; 0 when cusedev cannot see
    /// the sender.
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

impl From<UnixCredentials> for Credentials {
    fn from(creds: UnixCredentials) -> Credentials {
        Credentials {
            pid: u32::try_from(creds.pid()).unwrap_or(0),
            uid: creds.uid(),
            gid: creds.gid(),
        }
    }
}

/// One message as it arrived.
#[derive(Debug)]
pub struct Message {
    pub len: usize,
    pub credentials: Option<Credentials>,
    /// The one descriptor a call carries (its reply socket). Extra descriptors are closed.
    pub fd: Option<OwnedFd>,
    /// The message was longer than the buffer (it is cut; the caller refuses it).
    pub truncated: bool,
}

/// What a receive found.
#[derive(Debug)]
pub enum Received {
    Message(Message),
    /// The peer has gone: every descriptor of the other end is closed.
    End,
    /// Nothing to read now (the socket is non-blocking).
    Nothing,
}

/// Asks the kernel to attach the sender's credentials to every message this socket receives.
pub fn pass_credentials(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    setsockopt(&fd, sockopt::PassCred, &true)
}

/// Best effort: room for the largest message (a 128 KiB READ reply plus headers) even where
/// the default is smaller. An unprivileged process is held to `net.core.wmem_max`.
pub fn widen_send_buffer(fd: BorrowedFd<'_>) {
    let _ = setsockopt(&fd, sockopt::SndBuf, &(1 << 20));
}

/// Receives one message into `buf` without blocking.
pub fn receive(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Received, Errno> {
    let mut space = nix::cmsg_space!(libc::ucred, [RawFd; 1]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<UnixAddr>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => break msg,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok(Received::Nothing),
            // A stream reset by a dying peer reads as its end.
            Err(Errno::ECONNRESET) => return Ok(Received::End),
            Err(errno) => return Err(errno),
        }
    };
    let mut credentials = None;
    let mut fd_received = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for cmsg in cmsgs {
            match cmsg {
                ControlMessageOwned::ScmCredentials(creds) => credentials = Some(creds.into()),
                ControlMessageOwned::ScmRights(fds) => {
                    for raw in fds {
                        // SAFETY: the kernel has just installed `raw` in our table for us
                        // (SCM_RIGHTS); nothing else owns it.
                        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                        if fd_received.is_none() {
                            fd_received = Some(owned);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
    let len = msg.bytes;
    if len == 0 && credentials.is_none() && fd_received.is_none() && !truncated {
        return Ok(Received::End);
    }
    Ok(Received::Message(Message {
        len,
        credentials,
        fd: fd_received,
        truncated,
    }))
}

/// Sends one message made of `parts` without blocking. EAGAIN means the peer's queue is full.
pub fn send(fd: BorrowedFd<'_>, parts: &[&[u8]]) -> Result<(), Errno> {
    let iov: Vec<IoSlice<'_>> = parts.iter().map(|part| IoSlice::new(part)).collect();
    let no_cmsgs: [ControlMessage<'_>; 0] = [];
    loop {
        match sendmsg::<UnixAddr>(
            fd.as_raw_fd(),
            &iov,
            &no_cmsgs,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(errno),
        }
    }
}

/// A SOCK_SEQPACKET socketpair, both ends close-on-exec and non-blocking as asked.
pub fn seqpacket_pair(nonblocking: bool) -> Result<(OwnedFd, OwnedFd), Errno> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let mut flags = SockFlag::SOCK_CLOEXEC;
    if nonblocking {
        flags |= SockFlag::SOCK_NONBLOCK;
    }
    socketpair(AddressFamily::Unix, SockType::SeqPacket, None, flags)
}

/// Makes `fd` non-blocking.
pub fn set_nonblocking(fd: impl AsFd) -> Result<(), Errno> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let fd = fd.as_fd();
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

/// A listening SOCK_SEQPACKET socket at `path`, close-on-exec.
pub fn listen(path: &std::path::Path) -> Result<OwnedFd, Errno> {
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType};
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    listen(&fd, Backlog::MAXCONN)?;
    Ok(fd)
}
