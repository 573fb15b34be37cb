//! The byte stream a bus connection runs on: a Unix stream socket on one machine, an AF_VSOCK
//! stream socket from a QEMU guest to its host (CID 2), where the `vhost` backend hands it to
//! fakehost's Unix listener. Both are plain stream sockets, so one type carries both.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType, VsockAddr};
use vmbus::address::BusAddress;

/// A connected bus stream.
#[derive(Debug)]
pub struct BusStream(OwnedFd);

impl BusStream {
    /// Connects to the host at `addr`.
    pub fn connect(addr: &BusAddress) -> io::Result<BusStream> {
        match addr {
            BusAddress::Unix(path) => Ok(BusStream(UnixStream::connect(path)?.into())),
            BusAddress::Vsock { cid, port } => {
                let fd = socket::socket(
                    AddressFamily::Vsock,
                    SockType::Stream,
                    SockFlag::SOCK_CLOEXEC,
                    None,
                )
                .map_err(|err| {
                    io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!("cannot make an AF_VSOCK socket: {err} (is the vsock transport module loaded?)"),
                    )
                })?;
                socket::connect(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    &VsockAddr::new(*cid, *port),
                )?;
                Ok(BusStream(fd))
            }
        }
    }

    /// A second handle on the same connection (one thread reads while another writes).
    pub fn try_clone(&self) -> io::Result<BusStream> {
        Ok(BusStream(self.0.try_clone()?))
    }

    /// shutdown(2): wakes a reader blocked on this connection in another thread.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let how = match how {
            Shutdown::Read => socket::Shutdown::Read,
            Shutdown::Write => socket::Shutdown::Write,
            Shutdown::Both => socket::Shutdown::Both,
        };
        Ok(socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.0),
            how,
        )?)
    }
}

impl AsFd for BusStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Read for BusStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&self.0), buf) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => return Ok(other?),
            }
        }
    }
}

/// The reading end of a channel stream, for a thread that only reads while others write.
///
/// A thread asleep in read(2) on a Unix stream socket is woken every time the peer consumes
/// data *we* wrote (`unix_write_space` wakes the socket's whole wait queue with EPOLLOUT, and a
/// reader's wait entry has no key to filter it: net/unix/af_unix.c), only to find nothing and
/// sleep again; with replies going out on the same socket from other threads that is one
/// useless wake-up per reply. A poll(2) sleeper registered for POLLIN only is filtered by the
/// key and stays asleep. So this reader polls for POLLIN before every read, and reads into a
/// buffer large enough for whole frames, which keeps it at two syscalls per frame (as
/// header-then-body reads were).
pub struct PolledReader(io::BufReader<PollFirst>);

/// A stream whose reads wait in poll(POLLIN) first.
pub struct PollFirst(BusStream);

/// Room for a whole channel packet frame and then some.
const READ_BUFFER: usize = 64 << 10;

impl PolledReader {
    pub fn new(stream: BusStream) -> PolledReader {
        PolledReader(io::BufReader::with_capacity(READ_BUFFER, PollFirst(stream)))
    }
}

impl Read for PolledReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Read for PollFirst {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut fds = [nix::poll::PollFd::new(
                self.0.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(err) => return Err(err.into()),
            }
        }
        // Readable, at the end of the stream, or broken: read(2) says which.
        self.0.read(buf)
    }
}

impl Write for BusStream {
    /// send(2) with MSG_NOSIGNAL: a host that went away is an EPIPE error for the caller to
    /// handle, not a SIGPIPE that kills the server.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match socket::send(
                std::os::fd::AsRawFd::as_raw_fd(&self.0),
                buf,
                MsgFlags::MSG_NOSIGNAL,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => return Ok(other?),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_stream_round_trip_and_shutdown_wakes_reader() {
        let dir = std::env::temp_dir().join(format!("cusedev-bus-socket-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut client = BusStream::connect(&BusAddress::Unix(path.clone())).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").unwrap();
        let mut reader = client.try_clone().unwrap();
        reader.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
        client.shutdown(Shutdown::Both).unwrap();
        assert_eq!(reader.read(&mut buf).unwrap(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_to_a_closed_peer_is_epipe_not_sigpipe() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut stream = BusStream(a.into());
        let err = stream.write_all(b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn vsock_connect_failure_is_an_error() {
        // No vsock transport on a CI machine, or nobody listening on CID 1 port 1.
        assert!(BusStream::connect(&BusAddress::Vsock { cid: 1, port: 1 }).is_err());
    }
}
