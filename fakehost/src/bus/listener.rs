//! Accepting bus streams and routing them by their HELLO.

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use vmbus::stream::{kind, Hello, Role};

use super::frames::read_frame;
use super::{channel, session, Bus};

/// How long a new stream may take to send its HELLO. Without a bound, a connection that never
/// speaks would hold a thread forever.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts streams until `stop` is set (then one more connect wakes the loop).
pub fn run(bus: Arc<Bus>, listener: UnixListener, stop: Arc<AtomicBool>) {
    crate::sockets::accept_loop(listener, stop, "bus", move |stream, conn| {
        serve_stream(&bus, stream, conn)
    });
}

/// Reads the HELLO and hands the stream to the session or to a channel.
pub fn serve_stream(bus: &Bus, stream: UnixStream, conn: u64) {
    let stream = Arc::new(stream);
    let _ = stream.set_read_timeout(Some(HELLO_TIMEOUT));
    let hello = match read_frame(&*stream) {
        Ok(Some(frame)) if frame.kind == kind::HELLO => match Hello::parse(&frame.body) {
            Ok(hello) => hello,
            Err(e) => {
                log::warn!("bus connection #{conn}: bad HELLO ({e}); closing it");
                return;
            }
        },
        Ok(Some(frame)) => {
            log::warn!(
                "bus connection #{conn}: first frame has kind {}, not HELLO; closing it",
                frame.kind
            );
            return;
        }
        Ok(None) => {
            log::debug!("bus connection #{conn}: closed before its HELLO");
            return;
        }
        Err(e) => {
            log::warn!("bus connection #{conn}: no valid HELLO ({e}); closing it");
            return;
        }
    };
    if let Err(e) = stream.set_read_timeout(None) {
        log::warn!("bus connection #{conn}: cannot clear the HELLO timeout ({e}); closing it");
        return;
    }
    match hello.role {
        Role::Control => session::run(bus, stream, conn),
        Role::Channel => channel::run(bus, stream, &hello, conn),
    }
}
