//! The fcopy host service: what Hyper-V does for `Copy-VMFile -FileSource Host`.
//!
//! When the guest attaches the fcopy channel we send NEGOTIATE and remember its answer. A copy
//! ([`copy`]) then runs START_FILE_COPY, WRITE_TO_FILE fragments of 6144 bytes and
//! COMPLETE_FCOPY, strictly one transaction at a time (the guest driver has one message slot and
//! leaves further packets in the ring while one is in flight, fcopy.md §5.4), reporting the
//! guest's status code. After a failed step it sends CANCEL_FCOPY so the daemon deletes the
//! partial file.
//!
//! Version choice (the contents a real Windows host sends are UNVERIFIED, fcopy.md §8.1): we
//! offer exactly what the guest drivers accept, framework [3.0] and fcopy message [1.1]. Both the
//! 2014 driver and the 6.1 one list only those, so anything else would only fail negotiation;
//! a framework 1.0 fallback would be dead weight. The NEGOTIATE message's own header carries
//! the same 3.0 / 1.1 (the guest does not read it).
//!
//! Threads: replies arrive on the channel's reader thread ([`ChannelService::packet`]) and are
//! put in the one outstanding-transaction slot; the copying thread waits on a condvar with a
//! deadline. A detach (stream gone) fills the slot with "guest went away" at once.

mod copy;
mod txn;

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmbus::ic::{self, icflags, msgtype, IcVersion};
use vmbus::negotiate::{FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS};
use vmbus::packet::{encode_inband, packet_type, Packet};

use crate::bus::{ChannelLink, ChannelService};

pub use copy::{CopyReport, CopyRequest, Progress, Step};

/// Default time the guest has to answer one step.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// VMBus packet flags on our requests. Linux util drivers never look at them and always answer
/// with an inband echo rather than a completion packet, so we do not ask for a completion.
/// (What a Windows host sets is UNVERIFIED.)
const REQUEST_PACKET_FLAGS: u16 = 0;

/// How many abandoned transaction ids we remember, to log their late replies quietly.
const ABANDONED_MEMORY: usize = 16;

/// The fcopy host.
pub struct FcopyHost {
    state: Mutex<State>,
    changed: Condvar,
    /// Serialises copies: a second `fakehost copy` waits for the first to finish.
    copy_lock: Mutex<()>,
    step_timeout: Duration,
}

#[derive(Default)]
struct State {
    link: Option<Link>,
    next_trans_id: u64,
    outstanding: Option<Outstanding>,
    /// Transactions we stopped waiting for (timed out; CANCEL after a timeout).
    abandoned: VecDeque<u64>,
    copying: bool,
}

struct Link {
    link: ChannelLink,
    negotiation: Negotiation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Negotiation {
    Pending {
        trans_id: u64,
    },
    Agreed {
        framework: IcVersion,
        message: IcVersion,
    },
    Refused,
}

struct Outstanding {
    link_id: u64,
    trans_id: u64,
    reply: Option<Reply>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    /// The guest answered with this status (icmsg_hdr.status).
    Status(u32),
    /// The channel stream ended before the answer.
    GuestGone,
}

/// The fcopy side of `fakehost status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FcopyStatus {
    /// The fcopy channel stream is attached.
    pub channel_attached: bool,
    /// "none" (no channel), "pending", "agreed" or "refused".
    pub negotiation: String,
    /// The agreed framework version ("3.0"), once agreed.
    pub framework_version: Option<String>,
    /// The agreed fcopy message version ("1.1"), once agreed.
    pub message_version: Option<String>,
    /// A copy is running.
    pub copy_in_progress: bool,
}

impl FcopyHost {
    /// A host whose guest has `step_timeout` to answer each step.
    pub fn new(step_timeout: Duration) -> FcopyHost {
        FcopyHost {
            state: Mutex::new(State {
                next_trans_id: 1,
                ..State::default()
            }),
            changed: Condvar::new(),
            copy_lock: Mutex::new(()),
            step_timeout,
        }
    }

    /// The per-step timeout.
    pub fn step_timeout(&self) -> Duration {
        self.step_timeout
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A snapshot for `fakehost status`.
    pub fn status(&self) -> FcopyStatus {
        let state = self.lock();
        let negotiation = state.link.as_ref().map(|l| l.negotiation);
        let (framework, message) = match negotiation {
            Some(Negotiation::Agreed { framework, message }) => {
                (Some(framework.to_string()), Some(message.to_string()))
            }
            _ => (None, None),
        };
        FcopyStatus {
            channel_attached: state.link.is_some(),
            negotiation: match negotiation {
                None => "none",
                Some(Negotiation::Pending { .. }) => "pending",
                Some(Negotiation::Agreed { .. }) => "agreed",
                Some(Negotiation::Refused) => "refused",
            }
            .to_owned(),
            framework_version: framework,
            message_version: message,
            copy_in_progress: state.copying,
        }
    }
}

impl State {
    fn take_trans_id(&mut self) -> u64 {
        let id = self.next_trans_id;
        self.next_trans_id = self.next_trans_id.wrapping_add(1).max(1);
        id
    }

    fn abandon(&mut self, trans_id: u64) {
        if self.abandoned.len() >= ABANDONED_MEMORY {
            self.abandoned.pop_front();
        }
        self.abandoned.push_back(trans_id);
    }
}

/// The IC message for `body`, sent as one inband packet with `trans_id`.
fn request_packet(icmsgtype: u16, trans_id: u64, body: &[u8]) -> Vec<u8> {
    let (fw, msg) = (FCOPY_FW_VERSIONS[0], FCOPY_SRV_VERSIONS[0]);
    // The IC header has an 8-bit transaction id of its own; Linux ignores it (it echoes the
    // VMBus trans_id), so its low byte is as good as anything.
    let payload = ic::build_ic_message(icmsgtype, fw, msg, trans_id as u8, body);
    encode_inband(trans_id, REQUEST_PACKET_FLAGS, &payload)
}

impl ChannelService for FcopyHost {
    fn attached(&self, link: ChannelLink) {
        let packet;
        {
            let mut state = self.lock();
            let trans_id = state.take_trans_id();
            if let Some(old) = &state.link {
                log::info!(
                    "fcopy: channel relid {} replaces relid {}",
                    link.relid,
                    old.link.relid
                );
            }
            state.link = Some(Link {
                link: link.clone(),
                negotiation: Negotiation::Pending { trans_id },
            });
            let body = vmbus::negotiate::build_request_body(FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS);
            packet = request_packet(msgtype::NEGOTIATE, trans_id, &body);
        }
        self.changed.notify_all();
        log::info!(
            "fcopy: sending NEGOTIATE on relid {} (framework 3.0, fcopy 1.1)",
            link.relid
        );
        // A failed send shuts the stream down; the detach that follows cleans up.
        let _ = link.send_packet(&packet);
    }

    fn packet(&self, link_id: u64, packet: &Packet<'_>) {
        if packet.ty != packet_type::DATA_INBAND {
            log::warn!(
                "fcopy: ignoring a VMBus packet of type {:#x} (expected inband data)",
                packet.ty
            );
            return;
        }
        let hdr = match ic::ic_header(packet.payload) {
            Ok(hdr) => hdr,
            Err(e) => {
                log::warn!("fcopy: ignoring a malformed reply: {e}");
                return;
            }
        };
        if hdr.icflags & icflags::RESPONSE == 0 {
            log::warn!(
                "fcopy: ignoring a packet that is not a response (icflags {:#x}, trans_id {})",
                hdr.icflags,
                packet.trans_id
            );
            return;
        }
        let mut state = self.lock();
        let state = &mut *state;
        let Some(link) = state.link.as_mut().filter(|l| l.link.id == link_id) else {
            log::debug!("fcopy: reply on a channel that is no longer current; ignored");
            return;
        };
        if let Negotiation::Pending { trans_id } = link.negotiation {
            if trans_id == packet.trans_id {
                match vmbus::negotiate::parse_response(packet.payload) {
                    Ok(agreed) => {
                        link.negotiation = negotiation_result(agreed);
                        self.changed.notify_all();
                    }
                    Err(e) => log::warn!("fcopy: ignoring a malformed NEGOTIATE reply: {e}"),
                }
                return;
            }
        }
        match state.outstanding.as_mut() {
            Some(o)
                if o.link_id == link_id && o.trans_id == packet.trans_id && o.reply.is_none() =>
            {
                if hdr.icmsgtype.get() != msgtype::FCOPY {
                    log::warn!(
                        "fcopy: ignoring a reply with icmsgtype {} (expected {})",
                        hdr.icmsgtype.get(),
                        msgtype::FCOPY
                    );
                    return;
                }
                o.reply = Some(Reply::Status(hdr.status.get()));
                self.changed.notify_all();
            }
            _ if state.abandoned.contains(&packet.trans_id) => log::info!(
                "fcopy: late reply to abandoned transaction {}: {:#010x} ({})",
                packet.trans_id,
                hdr.status.get(),
                ic::status_meaning(hdr.status.get())
            ),
            _ => log::warn!(
                "fcopy: ignoring a reply with unexpected trans_id {}",
                packet.trans_id
            ),
        }
    }

    fn detached(&self, link_id: u64) {
        let mut state = self.lock();
        if state.link.as_ref().map(|l| l.link.id) == Some(link_id) {
            log::info!("fcopy: channel closed");
            state.link = None;
        }
        if let Some(o) = state.outstanding.as_mut() {
            if o.link_id == link_id && o.reply.is_none() {
                o.reply = Some(Reply::GuestGone);
            }
        }
        drop(state);
        self.changed.notify_all();
    }
}

/// Interprets the guest's negotiate answer: only the versions we offered count as agreed.
fn negotiation_result(agreed: Option<(IcVersion, IcVersion)>) -> Negotiation {
    match agreed {
        Some((framework, message))
            if FCOPY_FW_VERSIONS.contains(&framework) && FCOPY_SRV_VERSIONS.contains(&message) =>
        {
            log::info!("fcopy: negotiated framework {framework}, fcopy message {message}");
            Negotiation::Agreed { framework, message }
        }
        Some((framework, message)) => {
            log::warn!(
                "fcopy: guest chose framework {framework}, message {message}, which we did not \
                 offer; treating the negotiation as failed"
            );
            Negotiation::Refused
        }
        None => {
            log::warn!("fcopy: guest found no common version (framework 3.0, fcopy 1.1 offered)");
            Negotiation::Refused
        }
    }
}
