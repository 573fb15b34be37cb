//! The host end of connections: where a guest connection to host port P goes, the
//! non-blocking Unix connect, and the `CONNECT <port>\n` handshake of host clients that want
//! to reach a guest port.
//!
//! The "hybrid vsock" convention (Firecracker's vsock device, rust-vmm's vhost-device-vsock):
//! a guest connection to host port P is forwarded to the Unix socket `<uds_path>_P`; a host
//! process connects to `<uds_path>` itself, writes `CONNECT <port>\n`, and on success reads
//! `OK <host_port>\n` before the stream turns into raw bytes. Keeping the same convention lets
//! the same host tools (e.g. `socat - UNIX-CONNECT:/path`) talk to either backend.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};

/// Longest `CONNECT` line accepted, newline included ("CONNECT 4294967294\n" is 19 bytes).
pub const MAX_COMMAND_LINE: usize = 64;

/// Where a guest connection to a host port is forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routes {
    /// The bus host's Unix socket (fakehost's listener).
    pub bus_socket: PathBuf,
    /// The host port that reaches `bus_socket`.
    pub bus_port: u32,
    /// The hybrid-vsock base path, if any.
    pub uds_path: Option<PathBuf>,
}

impl Routes {
    /// The Unix socket path for a guest connection to host `port`, or `None` (refuse).
    pub fn route(&self, port: u32) -> Option<PathBuf> {
        if port == self.bus_port {
            return Some(self.bus_socket.clone());
        }
        self.uds_path.as_deref().map(|base| hybrid_path(base, port))
    }
}

/// `<base>_<port>`, the per-port socket of the hybrid convention.
pub fn hybrid_path(base: &Path, port: u32) -> PathBuf {
    let mut name = base.as_os_str().to_owned();
    name.push(format!("_{port}"));
    PathBuf::from(name)
}

/// Connect to a Unix stream socket without ever blocking the event loop: a full listen
/// backlog yields `EAGAIN` (refused) instead of a wait. The returned stream is non-blocking.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)?;
    Ok(UnixStream::from(fd))
}

/// Why a host client's command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Not `CONNECT <decimal port>`.
    #[error("expected `CONNECT <port>`, got {0:?}")]
    Syntax(String),
    /// No newline within [`MAX_COMMAND_LINE`] bytes.
    #[error("no newline within {MAX_COMMAND_LINE} bytes")]
    TooLong,
}

/// Parse one command line (without its newline). A trailing `\r` and surrounding blanks are
/// tolerated; the port must be plain decimal and not `VMADDR_PORT_ANY` (u32::MAX).
pub fn parse_command(line: &[u8]) -> Result<u32, CommandError> {
    let bad = || CommandError::Syntax(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let text = text.trim_matches(|c: char| c == ' ' || c == '\t' || c == '\r');
    let (verb, port) = text.split_once(' ').ok_or_else(bad)?;
    let port = port.trim_start_matches(' ');
    if verb != "CONNECT" || port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match port.parse::<u32>() {
        Ok(p) if p != u32::MAX => Ok(p),
        _ => Err(bad()),
    }
}

/// A host client that connected to `<uds_path>` and has not finished its command line.
#[derive(Debug)]
pub struct PendingClient {
    /// The client's (non-blocking) socket.
    pub stream: UnixStream,
    line: Vec<u8>,
}

/// Progress of a [`PendingClient`].
#[derive(Debug, PartialEq, Eq)]
pub enum ClientStep {
    /// No complete line yet; wait for more.
    NeedMore,
    /// A valid command; `leftover` are bytes the client sent after the newline (payload for
    /// the guest once connected).
    Connect {
        /// Guest port.
        port: u32,
        /// Bytes after the newline.
        leftover: Vec<u8>,
    },
    /// A bad command; drop the client.
    Bad(CommandError),
    /// The client hung up or failed before finishing its line.
    Gone,
}

impl PendingClient {
    /// Wrap an accepted client.
    pub fn new(stream: UnixStream) -> Self {
        PendingClient {
            stream,
            line: Vec::new(),
        }
    }

    /// Read what is available and report progress. Reads at most up to the line limit, so a
    /// client cannot make us buffer more than [`MAX_COMMAND_LINE`] bytes.
    pub fn advance(&mut self) -> ClientStep {
        loop {
            let room = MAX_COMMAND_LINE.saturating_sub(self.line.len());
            if room == 0 {
                return ClientStep::Bad(CommandError::TooLong);
            }
            let mut buf = [0u8; MAX_COMMAND_LINE];
            let n = match self.stream.read(&mut buf[..room]) {
                Ok(0) => return ClientStep::Gone,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ClientStep::NeedMore,
                Err(_) => return ClientStep::Gone,
            };
            self.line.extend_from_slice(&buf[..n]);
            if let Some(nl) = self.line.iter().position(|&b| b == b'\n') {
                let leftover = self.line.split_off(nl + 1);
                self.line.truncate(nl);
                return match parse_command(&self.line) {
                    Ok(port) => ClientStep::Connect { port, leftover },
                    Err(e) => ClientStep::Bad(e),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn routes_bus_port_then_hybrid_then_nothing() {
        let mut routes = Routes {
            bus_socket: PathBuf::from("/run/cusedev/bus.sock"),
            bus_port: 5000,
            uds_path: None,
        };
        assert_eq!(
            routes.route(5000),
            Some(PathBuf::from("/run/cusedev/bus.sock"))
        );
        assert_eq!(routes.route(5001), None);
        routes.uds_path = Some(PathBuf::from("/tmp/v.sock"));
        assert_eq!(
            routes.route(5000),
            Some(PathBuf::from("/run/cusedev/bus.sock"))
        );
        assert_eq!(routes.route(1234), Some(PathBuf::from("/tmp/v.sock_1234")));
    }

    #[test]
    fn command_parsing() {
        assert_eq!(parse_command(b"CONNECT 1234"), Ok(1234));
        assert_eq!(parse_command(b"CONNECT 1234\r"), Ok(1234));
        assert_eq!(parse_command(b"CONNECT 0"), Ok(0));
        assert_eq!(parse_command(b"CONNECT 4294967294"), Ok(u32::MAX - 1));
        for bad in [
            &b""[..],
            b"CONNECT",
            b"CONNECT ",
            b"connect 1",
            b"CONNECT +1",
            b"CONNECT -1",
            b"CONNECT 1x",
            b"CONNECT 4294967295",
            b"CONNECT 4294967296",
            b"LISTEN 1",
            b"CONNECT 1 2",
            b"\xff\xfe",
        ] {
            assert!(
                matches!(parse_command(bad), Err(CommandError::Syntax(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn pending_client_handles_split_lines_and_leftover() {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut client = PendingClient::new(a);
        assert_eq!(client.advance(), ClientStep::NeedMore);
        b.write_all(b"CONNE").unwrap();
        assert_eq!(client.advance(), ClientStep::NeedMore);
        b.write_all(b"CT 52\nhello").unwrap();
        assert_eq!(
            client.advance(),
            ClientStep::Connect {
                port: 52,
                leftover: b"hello".to_vec()
            }
        );
    }

    #[test]
    fn pending_client_limits_the_line() {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut client = PendingClient::new(a);
        b.write_all(&[b'A'; 200]).unwrap();
        assert_eq!(client.advance(), ClientStep::Bad(CommandError::TooLong));
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut client = PendingClient::new(a);
        drop(b);
        assert_eq!(client.advance(), ClientStep::Gone);
    }

    #[test]
    fn nonblocking_connect_reports_missing_listener() {
        let dir = std::env::temp_dir().join(format!("vhost-vsock-hs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("none.sock");
        assert!(connect_nonblocking(&path).is_err());
        let listener = std::os::unix::net::UnixListener::bind(dir.join("l.sock")).unwrap();
        let stream = connect_nonblocking(&dir.join("l.sock")).unwrap();
        let (_peer, _) = listener.accept().unwrap();
        drop(stream);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
