//! The client side of the control socket, used by the CLI (and by tests).

use std::io::{self, BufRead, BufReader};
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use super::fdpass::send_line;
use super::proto::{Request, Response};

/// Why talking to fakehost failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing to connect to.
    #[error("cannot reach fakehost at {path}: {reason} — is `fakehost serve` running?")]
    Connect {
        /// The control socket path.
        path: PathBuf,
        /// The OS error, in words.
        reason: String,
    },
    /// The connection broke.
    #[error("lost the connection to fakehost at {path}: {source}")]
    Io {
        /// The control socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A line that is not a response.
    #[error(
        "fakehost sent an unreadable answer ({0}); are the CLI and the server the same version?"
    )]
    BadResponse(String),
    /// The connection closed before the final answer.
    #[error("fakehost closed the connection without an answer (see its log)")]
    NoAnswer,
}

/// A connection to the control socket, carrying one request.
pub struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    path: PathBuf,
}

/// The OS error's text without Rust's " (os error N)" suffix.
fn os_reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => Errno::from_raw(code).desc().to_owned(),
        None => e.to_string(),
    }
}

impl Client {
    /// Connects to the control socket at `path`.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|e| ClientError::Connect {
            path: path.to_owned(),
            reason: os_reason(&e),
        })?;
        let reader = stream.try_clone().map_err(|source| ClientError::Io {
            path: path.to_owned(),
            source,
        })?;
        Ok(Client {
            stream,
            reader: BufReader::new(reader),
            path: path.to_owned(),
        })
    }

    /// Sends the request, with `fd` attached if given.
    pub fn send(&self, request: &Request, fd: Option<BorrowedFd<'_>>) -> Result<(), ClientError> {
        send_line(&self.stream, &request.to_line(), fd).map_err(|source| ClientError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// The next response line; `None` once the host closed the connection.
    pub fn next_response(&mut self) -> Result<Option<Response>, ClientError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Ok(None);
        }
        serde_json::from_str(line.trim_end())
            .map(Some)
            .map_err(|e| ClientError::BadResponse(e.to_string()))
    }

    /// The final response, skipping progress lines.
    pub fn final_response(&mut self) -> Result<Response, ClientError> {
        loop {
            match self.next_response()? {
                Some(Response::Progress { .. }) => continue,
                Some(other) => return Ok(other),
                None => return Err(ClientError::NoAnswer),
            }
        }
    }
}

/// One request without a descriptor and its final answer (status, rescind, offer).
pub fn request(path: &Path, request: &Request) -> Result<Response, ClientError> {
    let mut client = Client::connect(path)?;
    client.send(request, None)?;
    client.final_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_socket_names_path_and_hints_at_serve() {
        let Err(err) = Client::connect(Path::new("/nonexistent/fakehost.ctl")) else {
            panic!("connected to a missing socket");
        };
        assert_eq!(
            err.to_string(),
            "cannot reach fakehost at /nonexistent/fakehost.ctl: No such file or directory — \
             is `fakehost serve` running?"
        );
    }
}
