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
