//! A copy as a state machine, advanced by the guest's replies on the packet path.
//!
//! START_FILE_COPY → WRITE_TO_FILE × n → COMPLETE_FCOPY, one transaction in flight. Each reply
//! arrives on the channel stream's reader thread, which decides the next message and sends it
//! right away: before this, the reader woke a waiting copy thread through a condition
//! variable and that thread sent the fragment, two threads woken per fragment instead of one.
//!
//! What the reader cannot do is notice silence: it sleeps in poll until the guest speaks. So
//! every pending request carries a deadline, and the control thread waiting for the copy
//! ([`super::copy`]) enforces it.
//!
//! After a failed step (a guest status other than success, or trouble on our side) the
//! machine sends CANCEL_FCOPY and waits for its answer before reporting, as the copy thread
//! did: the daemon then closes and deletes the partial file (fcopy.md §6.1).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use vmbus::fcopy::{self as wire, op, DATA_FRAGMENT};
use vmbus::ic::{self, msgtype, status::HV_S_OK};

use super::copy::{Failure, Step, TxnError};
use super::{FcopyHost, State};
use crate::bus::ChannelLink;

/// The result of a copy: `Ok` or the failed step and why.
pub(super) type Outcome = Result<(), (Step, Failure)>;

/// One copy in flight.
pub(super) struct Run {
    /// The channel attachment the copy runs on; replies from another are not ours.
    link_id: u64,
    source: File,
    size: u64,
    /// Bytes the guest acknowledged.
    pub(super) acked: u64,
    pub(super) phase: Phase,
    /// The request in flight (`None` once finished).
    pub(super) pending: Option<Pending>,
    /// The client that asked for the copy went away: stop at the next fragment boundary.
    pub(super) client_gone: bool,
    /// Set when the copy ended; the waiting thread takes it.
    pub(super) outcome: Option<Outcome>,
    buf: Vec<u8>,
}

/// What the pending request is.
pub(super) enum Phase {
    /// A copy step.
    Step(Step),
    /// CANCEL_FCOPY after `step` failed with `failure`, which is the copy's outcome.
    Cancelling { step: Step, failure: Failure },
    /// Finished (the outcome is set).
    Done,
}

/// The request in flight.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pending {
    pub(super) trans_id: u64,
    pub(super) deadline: Instant,
    /// Data bytes a WRITE_TO_FILE carries (0 for other messages).
    len: u64,
}

/// A packet to send once the state lock is released, on the link it belongs to.
pub(super) type Send = Option<(ChannelLink, Vec<u8>)>;

/// What an event did: something to send, and whether the copy just ended.
pub(super) struct Advance {
    pub(super) send: Send,
    pub(super) finished: bool,
}

impl Run {
    /// A run that has sent nothing yet.
    pub(super) fn new(link_id: u64, source: File, size: u64) -> Run {
        Run {
            link_id,
            source,
            size,
            acked: 0,
            phase: Phase::Done,
            pending: None,
            client_gone: false,
            outcome: None,
            buf: vec![0u8; DATA_FRAGMENT],
        }
    }

    /// The copy's size.
    pub(super) fn size(&self) -> u64 {
        self.size
    }

    /// Whether a reply with `trans_id` on `link_id` is the one this run waits for.
    pub(super) fn awaits(&self, link_id: u64, trans_id: u64) -> bool {
        self.link_id == link_id && self.pending.is_some_and(|p| p.trans_id == trans_id)
    }
}

impl State {
    /// Sends `body` (carrying `len` bytes of file data) as the run's next request, in
    /// `phase`, or ends the copy if the channel is gone.
    pub(super) fn send_request(
        &mut self,
        phase: Phase,
        body: &[u8],
        len: u64,
        timeout: Duration,
    ) -> Send {
        let trans_id = self.take_trans_id();
        let link = self.link.as_ref();
        let run = self.run.as_mut()?;
        let Some(link) = link.filter(|l| l.link.id == run.link_id) else {
            let step = match phase {
                Phase::Step(step) | Phase::Cancelling { step, .. } => step,
                Phase::Done => return None,
            };
            let outcome = match phase {
                Phase::Cancelling { failure, .. } => Err((step, failure)),
                _ => Err((step, Failure::Txn(TxnError::GuestGone))),
            };
            finish(run, outcome);
            return None;
        };
        run.phase = phase;
        run.pending = Some(Pending {
            trans_id,
            deadline: Instant::now() + timeout,
            len,
        });
        let packet = link.pipe.request(msgtype::FCOPY, trans_id, body);
        Some((link.link.clone(), packet))
    }

    /// The guest answered the pending request with `status`.
    pub(super) fn on_copy_reply(&mut self, status: u32, timeout: Duration) -> Advance {
        let Some(run) = self.run.as_mut() else {
            return nothing();
        };
        let Some(pending) = run.pending.take() else {
            return nothing();
        };
        match std::mem::replace(&mut run.phase, Phase::Done) {
            Phase::Step(step) if status == HV_S_OK => {
                if step == Step::WriteToFile {
                    run.acked += pending.len;
                }
                match step {
                    Step::CompleteFcopy => {
                        finish(run, Ok(()));
                        finished()
                    }
                    _ => self.next_after_ack(step, timeout),
                }
            }
            Phase::Step(step) => self.fail(step, Failure::Status(status), timeout),
            Phase::Cancelling { step, failure } => {
                log::info!(
                    "copy: CANCEL_FCOPY answered {status:#010x} ({})",
                    ic::status_meaning(status)
                );
                finish(run, Err((step, failure)));
                finished()
            }
            Phase::Done => nothing(),
        }
    }

    /// `step` succeeded: the next fragment, or COMPLETE after the last.
    fn next_after_ack(&mut self, step: Step, timeout: Duration) -> Advance {
        let Some(run) = self.run.as_mut() else {
            return nothing();
        };
        // As before: a client that went away is noticed between fragments.
        if step == Step::WriteToFile && run.client_gone {
            return self.fail(
                Step::WriteToFile,
                Failure::Local("cancelled: the client that asked for the copy went away".into()),
                timeout,
            );
        }
        if run.acked >= run.size {
            let complete = wire::encode_op(op::COMPLETE_FCOPY);
            return sending(self.send_request(
                Phase::Step(Step::CompleteFcopy),
                &complete,
                0,
                timeout,
            ));
        }
        let offset = run.acked;
        let want = usize::try_from(run.size - offset)
            .unwrap_or(usize::MAX)
            .min(DATA_FRAGMENT);
        // Read here, under the state lock: a 6 KiB pread is usually a page-cache copy, and
        // holding the lock keeps "which fragment is next" in one place. Only `status` and the
        // waiting control thread's ticks contend for it.
        let data = run.buf.get_mut(..want).unwrap_or_default();
        let message = read_exact_at(&run.source, data, offset, run.size)
            .and_then(|()| wire::encode_write(offset, data).map_err(|e| e.to_string()));
        match message {
            Ok(message) => sending(self.send_request(
                Phase::Step(Step::WriteToFile),
                &message,
                want as u64,
                timeout,
            )),
            Err(e) => self.fail(Step::WriteToFile, Failure::Local(e), timeout),
        }
    }

    /// `step` failed: CANCEL_FCOPY if the guest can still hear it, else the end.
    pub(super) fn fail(&mut self, step: Step, failure: Failure, timeout: Duration) -> Advance {
        match failure {
            Failure::Status(_) | Failure::Local(_) => {
                let cancel = wire::encode_op(op::CANCEL_FCOPY);
                let send =
                    self.send_request(Phase::Cancelling { step, failure }, &cancel, 0, timeout);
                let finished = !matches!(&self.run, Some(r) if r.outcome.is_none());
                if finished {
                    log::warn!("copy: CANCEL_FCOPY not answered: {}", TxnError::GuestGone);
                }
                Advance { send, finished }
            }
            // The guest is gone, or never was ready: nobody to cancel. (A timeout is the
            // waiting thread's business: it sends CANCEL without waiting.)
            Failure::Txn(_) | Failure::Ready(_) => {
                if let Some(run) = self.run.as_mut() {
                    finish(run, Err((step, failure)));
                }
                finished()
            }
        }
    }

    /// The channel `link_id` ended: a copy on it ends now.
    pub(super) fn guest_gone(&mut self, link_id: u64) {
        let Some(run) = self.run.as_mut().filter(|r| r.link_id == link_id) else {
            return;
        };
        if run.outcome.is_some() {
            return;
        }
        run.pending = None;
        let outcome = match std::mem::replace(&mut run.phase, Phase::Done) {
            Phase::Step(step) => Err((step, Failure::Txn(TxnError::GuestGone))),
            Phase::Cancelling { step, failure } => {
                log::warn!("copy: CANCEL_FCOPY not answered: {}", TxnError::GuestGone);
                Err((step, failure))
            }
            Phase::Done => return,
        };
        finish(run, outcome);
    }
}

impl FcopyHost {
    /// Sends what an event produced (without the state lock: a send may block on a full
    /// socket for up to the write timeout) and wakes the waiting thread if the copy ended.
    pub(super) fn carry_out(&self, advance: Advance) {
        if let Some((link, packet)) = advance.send {
            // A failed send shuts the stream down; its detach ends the copy ("guest went
            // away"), exactly as a guest vanishing mid-step would.
            let _ = link.send_packet(&packet);
        }
        if advance.finished {
            self.changed.notify_all();
        }
    }
}

fn finish(run: &mut Run, outcome: Outcome) {
    run.phase = Phase::Done;
    run.pending = None;
    run.outcome = Some(outcome);
}

fn nothing() -> Advance {
    Advance {
        send: None,
        finished: false,
    }
}

fn finished() -> Advance {
    Advance {
        send: None,
        finished: true,
    }
}

/// A send that may have ended the copy instead (channel gone).
fn sending(send: Send) -> Advance {
    Advance {
        finished: send.is_none(),
        send,
    }
}

/// Fills `buf` from `file` at `offset`, or says why not (the file shrank, a read error).
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64, size: u64) -> Result<(), String> {
    let mut filled = 0;
    while filled < buf.len() {
        let at = offset + filled as u64;
        match file.read_at(&mut buf[filled..], at) {
            Ok(0) => {
                return Err(format!(
                    "the source file shrank while copying (ended at {at} of {size} bytes)"
                ))
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("cannot read the source file at offset {at}: {e}")),
        }
    }
    Ok(())
}
