//! A session served one request at a time on the caller's thread, for the fuzz targets
//! (fuzz/src/engine.rs, docs/fuzzing.md). Not part of the engine's API.
//!
//! [`SteppedSession::serve_one`] is what a reader thread does for one request (read it from
//! the descriptor, dispatch it) without the thread: no spawn per input, and every reply a
//! request causes is on the socket by the time the call returns, so a fuzz target can tell
//! "no reply" from "not yet" without waiting. Unlike a reader it does not catch a panic, so a
//! panic in the engine reaches libFuzzer as a crash instead of an EIO.
//!
//! Never used with a device that sleeps in `open` or a handler that waits: those would block
//! the only thread there is (the engine itself waits only in an OPEN that got EBUSY after a
//! FLUSH, for up to [`super::RELEASE_WAIT`]).

use std::os::fd::OwnedFd;
use std::sync::Arc;

use nix::errno::Errno;

use super::{dispatch, wind_down, Flow, RequestHandler, Shared};

/// A session with no reader threads; the caller serves each request with [`Self::serve_one`].
pub struct SteppedSession {
    shared: Arc<Shared>,
}

/// What [`SteppedSession::serve_one`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// One request was read and served; the session goes on.
    Served,
    /// The session ended (DESTROY, end of the stream, a read error), as a reader would stop.
    Stopped,
    /// `read(2)` was interrupted or found nothing; a reader would read again.
    Nothing,
}

impl SteppedSession {
    /// A session on `fd` (one end of a SOCK_SEQPACKET pair, or an open `/dev/fuse`).
    pub fn new(fd: OwnedFd, handler: Arc<dyn RequestHandler>, label: &str) -> SteppedSession {
        SteppedSession {
            shared: Arc::new(Shared::new(fd, handler, label, 1)),
        }
    }

    /// Reads one request into `buf` and serves it. `buf` should be
    /// [`crate::fuse::init::REQUEST_BUFFER_SIZE`] bytes, as a reader's is.
    pub fn serve_one(&self, buf: &mut [u8]) -> Step {
        match self.shared.channel.read_request(buf) {
            Ok(0) => Step::Stopped,
            Ok(len) => match dispatch(&self.shared, &buf[..len]) {
                Flow::Continue => Step::Served,
                Flow::Stop => Step::Stopped,
            },
            Err(Errno::EINTR | Errno::EAGAIN | Errno::ENOENT) => Step::Nothing,
            Err(_) => Step::Stopped,
        }
    }
}

impl Drop for SteppedSession {
    /// What the last reader does when a session ends: interrupt the parked requests (they are
    /// answered EINTR on the socket, if it is still open) and release the open files.
    fn drop(&mut self) {
        wind_down(&self.shared);
    }
}
