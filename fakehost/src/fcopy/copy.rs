//! One file copy as the control connection sees it: wait for the channel, send
//! START_FILE_COPY, then wait for the packet path ([`super::machine`]) to finish the copy while
//! enforcing step deadlines and reporting progress; and the report.

use std::fmt;
use std::fs::File;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmbus::fcopy::{self as wire, op};
use vmbus::ic::{self, msgtype, status::HV_S_OK};

use super::machine::{Outcome, Phase, Run};
use super::{FcopyHost, VERSIONS};
use crate::service::ProgressSink;

/// Why a transaction got no status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxnError {
    /// The channel stream (or the whole guest) went away before the reply.
    #[error("guest went away (the fcopy channel closed)")]
    GuestGone,
    /// No reply within the step timeout.
    #[error("guest did not answer within {}", secs(*.0))]
    Timeout(Duration),
}

/// Why the channel is not ready for a copy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadyError {
    /// No guest has the fcopy channel open (after waiting this long, if asked to).
    #[error(
        "no guest has the fcopy channel open{}: is a guest (cusedev) connected to this host, \
         with its fcopy device up? (Hyper-V fails at once when the guest's service is not \
         running; `fakehost copy --wait SECS` waits for one)",
        if .0.is_zero() { String::new() } else { format!(" after waiting {}", secs(*.0)) }
    )]
    NoChannel(Duration),
    /// The channel is open but NEGOTIATE went unanswered.
    #[error(
        "the guest did not answer the fcopy version negotiation within {} (a 2014-style \
         driver answers only once hv_fcopy_daemon has registered)",
        secs(*.0)
    )]
    NegotiationUnanswered(Duration),
    /// The guest found no common version.
    #[error("the guest refused the fcopy version negotiation (we offer {})", VERSIONS.describe())]
    Refused,
}

/// "60 s", "0.5 s".
pub fn secs(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// What to copy, as the control socket received it.
#[derive(Debug)]
pub struct CopyRequest {
    /// The file name on the guest (no '/').
    pub file_name: String,
    /// The guest directory, with its trailing '/'.
    pub path_name: String,
    /// `OVER_WRITE` | `CREATE_PATH`.
    pub flags: u32,
    /// The source, opened by the client and passed to us.
    pub source: File,
    /// Bytes to copy (the source's size when the request arrived).
    pub size: u64,
    /// How long to wait for a guest to open the channel if none has (`--wait`); zero fails
    /// at once.
    pub wait_for_channel: Duration,
}

/// The step a copy was at; names as in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Step {
    /// Waiting for the channel to be opened and negotiated.
    ChannelSetup,
    /// START_FILE_COPY.
    StartFileCopy,
    /// WRITE_TO_FILE (including reading the source for it).
    WriteToFile,
    /// COMPLETE_FCOPY.
    CompleteFcopy,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::ChannelSetup => "CHANNEL_SETUP",
            Step::StartFileCopy => "START_FILE_COPY",
            Step::WriteToFile => "WRITE_TO_FILE",
            Step::CompleteFcopy => "COMPLETE_FCOPY",
        })
    }
}

/// The outcome of a copy, as sent to the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CopyReport {
    /// The guest accepted every step.
    pub ok: bool,
    /// The guest's status for the last step answered (the failed one on failure); `None` when
    /// the failure was not a guest answer (timeout, guest gone, source unreadable).
    pub hresult: Option<u32>,
    /// `vmbus::ic::status_meaning(hresult)`.
    pub meaning: Option<String>,
    /// The failed step (`None` on success).
    pub step: Option<Step>,
    /// Bytes the guest acknowledged.
    pub bytes: u64,
    /// Seconds from the request to the end.
    pub seconds: f64,
    /// What went wrong, in words (`None` on success).
    pub error: Option<String>,
}

/// Why a copy failed.
#[derive(Debug)]
pub(super) enum Failure {
    Status(u32),
    Txn(TxnError),
    Ready(ReadyError),
    /// Host-side trouble (source unreadable, encoding): the guest is fine and gets a CANCEL.
    Local(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Status(s) => write!(f, "{s:#010x} {}", ic::status_meaning(*s)),
            Failure::Txn(e) => e.fmt(f),
            Failure::Ready(e) => e.fmt(f),
            Failure::Local(e) => f.write_str(e),
        }
    }
}

/// Resets `copying` however the copy ends.
struct CopyingFlag<'a>(&'a FcopyHost);

impl Drop for CopyingFlag<'_> {
    fn drop(&mut self) {
        self.0.lock().copying = false;
    }
}

impl FcopyHost {
    /// Copies `req.source` into the guest. Copies are serialised: this waits for a running one.
    /// Progress goes to `progress` at its interval; when it reports the client gone, the copy
    /// is cancelled after the fragment in flight.
    pub fn copy(&self, req: CopyRequest, progress: &mut dyn ProgressSink) -> CopyReport {
        let _one_at_a_time = self.copy_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.lock().copying = true;
        let _flag = CopyingFlag(self);
        let started = Instant::now();
        log::info!(
            "copy {:?} into {:?}: {} bytes, flags {:#x}",
            req.file_name,
            req.path_name,
            req.size,
            req.flags
        );
        let file_name = req.file_name.clone();
        let (result, bytes) = self.run(req, progress);
        let seconds = started.elapsed().as_secs_f64();
        match result {
            Ok(()) => {
                log::info!(
                    "copy {file_name:?} done: {bytes} bytes in {seconds:.2} s, guest status \
                     0x00000000"
                );
                CopyReport {
                    ok: true,
                    hresult: Some(HV_S_OK),
                    meaning: Some(ic::status_meaning(HV_S_OK).to_owned()),
                    step: None,
                    bytes,
                    seconds,
                    error: None,
                }
            }
            Err((step, failure)) => {
                log::warn!("copy {file_name:?} failed at {step}: {failure}");
                let hresult = match failure {
                    Failure::Status(s) => Some(s),
                    _ => None,
                };
                CopyReport {
                    ok: false,
                    hresult,
                    meaning: hresult.map(|s| ic::status_meaning(s).to_owned()),
                    step: Some(step),
                    bytes,
                    seconds,
                    error: Some(match &failure {
                        Failure::Status(s) => format!(
                            "guest answered {step} with {s:#010x} ({})",
                            ic::status_meaning(*s)
                        ),
                        other => other.to_string(),
                    }),
                }
            }
        }
    }

    /// The copy; returns its outcome and the bytes the guest acknowledged.
    fn run(&self, req: CopyRequest, progress: &mut dyn ProgressSink) -> (Outcome, u64) {
        // Encode first: a bad name is an error before anything reaches the guest... except
        // the CANCEL that every host-side failure sends (the daemon ignores it when idle).
        let start = wire::encode_start(&req.file_name, &req.path_name, req.flags, req.size);
        let first = match start {
            Ok(start) => {
                if let Err(e) = self.wait_ready(req.wait_for_channel) {
                    return (Err((Step::ChannelSetup, Failure::Ready(e))), 0);
                }
                Ok(start)
            }
            Err(e) => Err(Failure::Local(format!("bad name: {e}"))),
        };
        let advance = {
            let mut state = self.lock();
            let link_id = state.link.as_ref().map_or(0, |l| l.link.id);
            state.run = Some(Run::new(link_id, req.source, req.size));
            match first {
                Ok(start) => {
                    let send = state.send_request(
                        Phase::Step(Step::StartFileCopy),
                        &start,
                        0,
                        self.step_timeout,
                    );
                    super::machine::Advance {
                        finished: send.is_none(),
                        send,
                    }
                }
                Err(failure) => state.fail(Step::StartFileCopy, failure, self.step_timeout),
            }
        };
        self.carry_out(advance);
        self.wait_for_end(progress)
    }

    /// Waits until the packet path ends the copy, a step deadline passes, or it is time for
    /// a progress line.
    fn wait_for_end(&self, progress: &mut dyn ProgressSink) -> (Outcome, u64) {
        let interval = progress.interval();
        let mut next_tick = Instant::now() + interval;
        let mut reported = 0u64;
        let mut state = self.lock();
        loop {
            let Some(run) = state.run.as_mut() else {
                // Cannot happen under the copy lock; say so rather than wait forever.
                return (
                    Err((Step::StartFileCopy, Failure::Txn(TxnError::GuestGone))),
                    0,
                );
            };
            if let Some(outcome) = run.outcome.take() {
                let bytes = run.acked;
                state.run = None;
                return (outcome, bytes);
            }
            let now = Instant::now();
            let deadline = run.pending.map_or(now, |p| p.deadline);
            if now >= deadline {
                let bytes = run.acked;
                let trans_id = run.pending.map(|p| p.trans_id);
                let phase = std::mem::replace(&mut run.phase, Phase::Done);
                state.run = None;
                if let Some(trans_id) = trans_id {
                    state.abandon(trans_id);
                }
                drop(state);
                let timeout = TxnError::Timeout(self.step_timeout);
                return match phase {
                    Phase::Step(step) => {
                        log::info!(
                            "copy: sending CANCEL_FCOPY without waiting (the guest is not \
                             answering)"
                        );
                        self.send_abandoned(&wire::encode_op(op::CANCEL_FCOPY));
                        (Err((step, Failure::Txn(timeout))), bytes)
                    }
                    Phase::Cancelling { step, failure } => {
                        log::warn!("copy: CANCEL_FCOPY not answered: {timeout}");
                        (Err((step, failure)), bytes)
                    }
                    Phase::Done => (Err((Step::StartFileCopy, Failure::Txn(timeout))), bytes),
                };
            }
            if now >= next_tick {
                next_tick = now + interval;
                if run.acked != reported {
                    let (done, total) = (run.acked, run.size());
                    reported = done;
                    drop(state);
                    let listening = progress.report(done, total);
                    // Counted from after the report, so the sink's own throttle (the same
                    // interval, from when it sent) never drops the next one.
                    next_tick = Instant::now() + interval;
                    state = self.lock();
                    if !listening {
                        if let Some(run) = state.run.as_mut() {
                            run.client_gone = true;
                        }
                    }
                    continue;
                }
            }
            let wake = deadline.min(next_tick);
            state = self
                .changed
                .wait_timeout(state, wake.saturating_duration_since(now))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until the channel is attached and negotiated: for a guest to open it at most
    /// `wait_for_channel` (none: fail at once), then for the negotiation at most one step
    /// timeout from when the channel was there.
    fn wait_ready(&self, wait_for_channel: Duration) -> Result<(), ReadyError> {
        use crate::ic::Negotiation;
        let timeout = self.step_timeout;
        let mut deadline = Instant::now() + wait_for_channel;
        let mut had_channel = false;
        let mut state = self.lock();
        loop {
            let negotiation = state.link.as_ref().map(|l| l.pipe.negotiation().clone());
            match negotiation {
                Some(Negotiation::Agreed { .. }) => return Ok(()),
                Some(Negotiation::Refused { .. }) => return Err(ReadyError::Refused),
                Some(_) if !had_channel => {
                    had_channel = true;
                    deadline = Instant::now() + timeout;
                }
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(match negotiation {
                    None => ReadyError::NoChannel(wait_for_channel),
                    Some(_) => ReadyError::NegotiationUnanswered(timeout),
                });
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Sends a request without waiting for its reply (CANCEL after a timeout: the guest is
    /// already not answering, so waiting another step timeout would only delay the report).
    fn send_abandoned(&self, body: &[u8]) {
        let (link, packet) = {
            let mut state = self.lock();
            let trans_id = state.take_trans_id();
            let Some(link) = state.link.as_ref() else {
                return;
            };
            let packet = link.pipe.request(msgtype::FCOPY, trans_id, body);
            let link = link.link.clone();
            state.abandon(trans_id);
            (link, packet)
        };
        let _ = link.send_packet(&packet);
    }
}
