//! One transaction at a time: send a request, wait (bounded) for its reply.

use std::time::{Duration, Instant};

use vmbus::ic::msgtype;

use super::{request_packet, FcopyHost, Negotiation, Outstanding, Reply};

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
    /// No guest opened the fcopy channel in time.
    #[error(
        "the fcopy channel was not opened within {}: is a guest (cusedev) connected to this \
         host and its fcopy device up?",
        secs(*.0)
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
    #[error("the guest refused the fcopy version negotiation (we offer framework 3.0, fcopy 1.1)")]
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

impl FcopyHost {
    /// Waits until the channel is attached and negotiated, at most one step timeout.
    pub(super) fn wait_ready(&self) -> Result<(), ReadyError> {
        let timeout = self.step_timeout;
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            let negotiation = state.link.as_ref().map(|l| l.negotiation);
            match negotiation {
                Some(Negotiation::Agreed { .. }) => return Ok(()),
                Some(Negotiation::Refused) => return Err(ReadyError::Refused),
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(match negotiation {
                    None => ReadyError::NoChannel(timeout),
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

    /// Sends one fcopy message and waits for the guest's status.
    pub(super) fn transact(&self, body: &[u8]) -> Result<u32, TxnError> {
        let (link, trans_id) = {
            let mut state = self.lock();
            let Some(link) = state
                .link
                .as_ref()
                .filter(|l| matches!(l.negotiation, Negotiation::Agreed { .. }))
                .map(|l| l.link.clone())
            else {
                return Err(TxnError::GuestGone);
            };
            let trans_id = state.take_trans_id();
            state.outstanding = Some(Outstanding {
                link_id: link.id,
                trans_id,
                reply: None,
            });
            (link, trans_id)
        };
        // Sent without the lock: the reader may store the reply before we wait, which is fine,
        // the slot keeps it.
        if link
            .send_packet(&request_packet(msgtype::FCOPY, trans_id, body))
            .is_err()
        {
            self.lock().outstanding = None;
            return Err(TxnError::GuestGone);
        }
        let deadline = Instant::now() + self.step_timeout;
        let mut state = self.lock();
        loop {
            let reply = match state.outstanding.as_ref() {
                Some(o) if o.trans_id == trans_id => o.reply,
                // Someone else replaced our slot: cannot happen under the copy lock.
                _ => Some(Reply::GuestGone),
            };
            match reply {
                Some(reply) => {
                    state.outstanding = None;
                    return match reply {
                        Reply::Status(status) => Ok(status),
                        Reply::GuestGone => Err(TxnError::GuestGone),
                    };
                }
                None => {
                    let now = Instant::now();
                    if now >= deadline {
                        state.outstanding = None;
                        state.abandon(trans_id);
                        return Err(TxnError::Timeout(self.step_timeout));
                    }
                    state = self
                        .changed
                        .wait_timeout(state, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// Sends a request without waiting for its reply (CANCEL after a timeout: the guest is
    /// already not answering, so waiting another step timeout would only delay the report).
    pub(super) fn send_abandoned(&self, body: &[u8]) {
        let (link, trans_id) = {
            let mut state = self.lock();
            let Some(link) = state.link.as_ref().map(|l| l.link.clone()) else {
                return;
            };
            let trans_id = state.take_trans_id();
            state.abandon(trans_id);
            (link, trans_id)
        };
        let _ = link.send_packet(&request_packet(msgtype::FCOPY, trans_id, body));
    }
}
