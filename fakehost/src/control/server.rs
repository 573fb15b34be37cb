//! Answering control requests inside `fakehost serve`.
//!
//! Generic: `offer`, `rescind` and `status` go to the bus and to every service in the table;
//! a `service` request goes to the service it names, which answers with its own JSON. The
//! server names no service.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fdpass::recv_line;
use super::proto::{Request, Response, StatusReport, MAX_REQUEST_LEN};
use crate::bus::Bus;
use crate::service::{CommandContext, ProgressSink};

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write to a client may block (a client that stops reading is treated as gone).
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one progress line per this interval (~10 per second).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// What the control server acts on: the bus, which holds the service table.
pub struct Control {
    /// The bus (offers, rescinds, guest state, the services).
    pub bus: Arc<Bus>,
}

/// Accepts control clients until `stop` is set (then one more connect wakes the loop).
pub fn run(control: Arc<Control>, listener: UnixListener, stop: Arc<AtomicBool>) {
    crate::sockets::accept_loop(listener, stop, "control", move |stream, n| {
        serve_client(&control, stream, n)
    });
}

/// Answers one client: one request, its responses, then the connection closes.
pub fn serve_client(control: &Control, stream: UnixStream, n: u64) {
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT));
    let (line, fds) = match recv_line(&stream, MAX_REQUEST_LEN) {
        Ok(got) => got,
        Err(e) => {
            log::warn!("control client #{n}: {e}");
            let _ = send(
                &stream,
                &Response::Error {
                    error: e.to_string(),
                },
            );
            return;
        }
    };
    let request = match serde_json::from_slice::<Request>(&line) {
        Ok(request) => request,
        Err(e) => {
            log::warn!("control client #{n}: malformed request: {e}");
            let error = format!("malformed request: {e}");
            let _ = send(&stream, &Response::Error { error });
            return;
        }
    };
    log::debug!("control client #{n}: {request:?}");
    let bus = &control.bus;
    let response = match request {
        Request::Rescind { service } => outcome(bus.rescind(&service)),
        Request::Offer { service } => outcome(bus.offer(&service)),
        Request::Status {} => Response::Status(StatusReport {
            bus: bus.status(),
            services: bus
                .services()
                .iter()
                .map(|r| (r.offer.name.to_owned(), r.service.status()))
                .collect(),
        }),
        Request::Service { service, command } => match bus.find(&service) {
            Err(e) => Response::Error {
                error: e.to_string(),
            },
            Ok(id) => {
                let mut progress = ClientProgress {
                    stream: &stream,
                    last: None,
                };
                let ctx = CommandContext {
                    offered: bus.is_offered(id),
                    fds,
                    progress: &mut progress,
                };
                let row = &bus.services()[id];
                match row.service.command(command, ctx) {
                    Ok(result) => Response::Result { result },
                    Err(e) => {
                        log::warn!("control client #{n}: {service} command refused: {e}");
                        Response::Error {
                            error: e.to_string(),
                        }
                    }
                }
            }
        },
    };
    if let Err(e) = send(&stream, &response) {
        log::info!("control client #{n} left before the answer: {e}");
    }
}

fn outcome(result: Result<String, crate::bus::BusError>) -> Response {
    match result {
        Ok(message) => {
            log::info!("{message}");
            Response::Outcome { ok: true, message }
        }
        // An unknown name is a usage error, not a "no" from the bus.
        Err(crate::bus::BusError::Unknown(e)) => Response::Error {
            error: e.to_string(),
        },
        Err(e) => Response::Outcome {
            ok: false,
            message: e.to_string(),
        },
    }
}

/// Progress lines to the client, throttled; a client that stops listening is gone.
struct ClientProgress<'a> {
    stream: &'a UnixStream,
    last: Option<Instant>,
}

impl ProgressSink for ClientProgress<'_> {
    fn interval(&self) -> Duration {
        PROGRESS_INTERVAL
    }

    fn report(&mut self, done: u64, total: u64) -> bool {
        if self.last.is_some_and(|t| t.elapsed() < PROGRESS_INTERVAL) {
            return true;
        }
        self.last = Some(Instant::now());
        match send(self.stream, &Response::Progress { done, total }) {
            Ok(()) => true,
            Err(e) => {
                log::info!("the control client went away ({e}); cancelling its command");
                false
            }
        }
    }
}

fn send(mut stream: &UnixStream, response: &Response) -> std::io::Result<()> {
    stream.write_all(&response.to_line())
}
