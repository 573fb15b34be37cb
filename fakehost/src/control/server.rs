//! Answering control requests inside `fakehost serve`.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbus::fcopy::{CREATE_PATH, OVER_WRITE};

use super::fdpass::recv_line;
use super::proto::{Request, Response, StatusReport, MAX_REQUEST_LEN};
use crate::bus::Bus;
use crate::fcopy::{CopyRequest, FcopyHost};
use crate::names;
use crate::service::ServiceKind;

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write to a client may block (a client that stops reading is treated as gone).
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one progress line per this interval (~10 per second).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// What the control server acts on.
pub struct Control {
    /// The bus (offers, rescinds, guest state).
    pub bus: Arc<Bus>,
    /// The fcopy host.
    pub fcopy: Arc<FcopyHost>,
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
    let response = match request {
        Request::Copy {
            file_name,
            guest_dir,
            overwrite,
            create_path,
        } => {
            let flags =
                if overwrite { OVER_WRITE } else { 0 } | if create_path { CREATE_PATH } else { 0 };
            match prepare_copy(control, fds, file_name, &guest_dir, flags) {
                Ok(request) => Response::Result(run_copy(control, &stream, request)),
                Err(error) => {
                    log::warn!("control client #{n}: copy refused: {error}");
                    Response::Error { error }
                }
            }
        }
        Request::Rescind { service } => outcome(control.bus.rescind(service)),
        Request::Offer { service } => outcome(control.bus.offer(service)),
        Request::Status {} => Response::Status(StatusReport {
            bus: control.bus.status(),
            fcopy: control.fcopy.status(),
        }),
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
        Err(e) => Response::Outcome {
            ok: false,
            message: e.to_string(),
        },
    }
}

/// Checks a copy request before anything is sent to the guest.
fn prepare_copy(
    control: &Control,
    fds: Vec<OwnedFd>,
    file_name: String,
    guest_dir: &str,
    flags: u32,
) -> Result<CopyRequest, String> {
    let mut fds = fds.into_iter();
    let (Some(fd), None) = (fds.next(), fds.next()) else {
        return Err(
            "a copy request needs exactly one open file descriptor attached \
                    (SCM_RIGHTS): the source file"
                .into(),
        );
    };
    let source = File::from(fd);
    let meta = source
        .metadata()
        .map_err(|e| format!("cannot stat the source file: {e}"))?;
    if !meta.is_file() {
        return Err("the source is not a regular file".into());
    }
    names::check_file_name(&file_name).map_err(|e| e.to_string())?;
    let path_name = names::guest_path_name(guest_dir).map_err(|e| e.to_string())?;
    if !control.bus.is_offered(ServiceKind::Fcopy) {
        return Err(
            "fcopy is not offered (it was rescinded); run `fakehost offer fcopy` first".into(),
        );
    }
    Ok(CopyRequest {
        file_name,
        path_name,
        flags,
        source,
        size: meta.len(),
    })
}

/// Runs the copy, streaming progress lines; a client that stops listening cancels the copy.
fn run_copy(
    control: &Control,
    stream: &UnixStream,
    request: CopyRequest,
) -> crate::fcopy::CopyReport {
    let mut last: Option<Instant> = None;
    let mut progress = |done: u64, total: u64| {
        if last.is_some_and(|t| t.elapsed() < PROGRESS_INTERVAL) {
            return true;
        }
        last = Some(Instant::now());
        match send(stream, &Response::Progress { done, total }) {
            Ok(()) => true,
            Err(e) => {
                log::info!("copy: the control client went away ({e}); cancelling");
                false
            }
        }
    };
    control.fcopy.copy(request, &mut progress)
}

fn send(mut stream: &UnixStream, response: &Response) -> std::io::Result<()> {
    stream.write_all(&response.to_line())
}
