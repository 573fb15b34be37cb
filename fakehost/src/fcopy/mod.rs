//! The fcopy host service: what Hyper-V does for `Copy-VMFile -FileSource Host`.
//!
//! When the guest attaches the fcopy channel we negotiate through the shared IC helper
//! ([`crate::ic`]). A copy ([`copy`]) then runs START_FILE_COPY, WRITE_TO_FILE fragments of
//! 6144 bytes and COMPLETE_FCOPY, strictly one transaction at a time (the guest driver has one
//! message slot and leaves further packets in the ring while one is in flight, fcopy.md §5.4),
//! reporting the guest's status code. After a failed step it sends CANCEL_FCOPY so the daemon
//! deletes the partial file.
//!
//! Version choice (the contents a real Windows host sends are UNVERIFIED, fcopy.md §8.1): we
//! offer exactly what the guest drivers accept, framework [3.0] and fcopy message [1.1]. Both the
//! 2014 driver and the 6.1 one list only those, so anything else would only fail negotiation;
//! a framework 1.0 fallback would be dead weight.
//!
//! Threads: a copy is a state machine ([`machine`]) driven from the packet path. The channel
//! stream's reader thread gets the guest's reply in [`HostService::packet`] and sends the next
//! fragment itself, so a fragment costs one wake-up of one thread. The control connection's
//! thread that asked for the copy sends START_FILE_COPY, then only waits: for the end, for a
//! step deadline (the reader cannot time out while it sleeps in poll), and for its progress
//! tick. A detach (stream gone) ends the copy with "guest went away" at once.
//!
//! Files: [`copy`] (request, report, the waiting side), [`machine`] (the packet side),
//! [`command`] (the control command), [`cli`] (`fakehost copy`), [`names`] (file names).

pub mod cli;
pub mod command;
mod copy;
mod machine;
pub mod names;

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmbus::guid::Guid;
use vmbus::ic::{self, msgtype};
use vmbus::negotiate::{FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS};
use vmbus::packet::Packet;

use crate::bus::ChannelLink;
use crate::ic::{Answer, IcPipe, IcReply, IcVersions, NegotiationStatus};
use crate::service::{
    CommandContext, CommandError, HostService, InstanceGuid, Offer, ServiceClass, ServiceConfig,
    ServiceStatus,
};

pub use command::FcopyCommand;
pub use copy::{CopyReport, CopyRequest, ReadyError, Step, TxnError};

/// Default time the guest has to answer one step.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// The versions we offer (see the module docs).
pub const VERSIONS: IcVersions = IcVersions {
    label: "fcopy",
    framework: FCOPY_FW_VERSIONS,
    service: FCOPY_SRV_VERSIONS,
};

/// How many abandoned transaction ids we remember, to log their late replies quietly.
const ABANDONED_MEMORY: usize = 16;

/// The fcopy host.
pub struct FcopyHost {
    state: Mutex<State>,
    /// Negotiation settled, channel attached or gone, a copy finished.
    changed: Condvar,
    /// Serialises copies: a second `fakehost copy` waits for the first to finish.
    copy_lock: Mutex<()>,
    step_timeout: Duration,
}

#[derive(Default)]
struct State {
    link: Option<Link>,
    next_trans_id: u64,
    /// Transactions we stopped waiting for (timed out; CANCEL after a timeout).
    abandoned: VecDeque<u64>,
    copying: bool,
    /// The copy in flight, once START was sent.
    run: Option<machine::Run>,
}

struct Link {
    link: ChannelLink,
    pipe: IcPipe,
}

/// The fcopy part of `fakehost status` (its `state`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FcopyStatus {
    /// The fcopy channel stream is attached.
    pub channel_attached: bool,
    /// The channel's version negotiation.
    #[serde(flatten)]
    pub negotiation: NegotiationStatus,
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
    pub fn fcopy_status(&self) -> FcopyStatus {
        let state = self.lock();
        FcopyStatus {
            channel_attached: state.link.is_some(),
            negotiation: state
                .link
                .as_ref()
                .map_or_else(NegotiationStatus::none, |l| l.pipe.status()),
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

impl ServiceClass for FcopyHost {
    const OFFER: Offer = Offer {
        name: "fcopy",
        summary: "guest file copy (hv_fcopy, Copy-VMFile -FileSource Host)",
        class: Guid::FCOPY,
        instance: InstanceGuid::PerOffer,
    };
    const OFFERED_BY_DEFAULT: bool = true;
    const CLI: Option<crate::service::ServiceCli> = Some(cli::CLI);

    fn new(config: &ServiceConfig) -> Result<FcopyHost, String> {
        Ok(FcopyHost::new(config.step_timeout))
    }
}

impl HostService for FcopyHost {
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
            let (pipe, negotiate) = IcPipe::negotiate(VERSIONS, trans_id);
            packet = negotiate;
            state.link = Some(Link {
                link: link.clone(),
                pipe,
            });
        }
        self.changed.notify_all();
        log::info!(
            "fcopy: sending NEGOTIATE on relid {} ({})",
            link.relid,
            VERSIONS.describe()
        );
        // A failed send shuts the stream down; the detach that follows cleans up.
        let _ = link.send_packet(&packet);
    }

    fn packet(&self, link_id: u64, packet: &Packet<'_>) {
        let reply = match IcReply::parse(packet) {
            Ok(reply) => reply,
            Err(e) => {
                log::warn!("fcopy: ignoring {e}");
                return;
            }
        };
        let advance = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let Some(link) = state.link.as_mut().filter(|l| l.link.id == link_id) else {
                log::debug!("fcopy: reply on a channel that is no longer current; ignored");
                return;
            };
            match link.pipe.on_reply(&reply) {
                Answer::Settled => {
                    drop(guard);
                    self.changed.notify_all();
                    return;
                }
                Answer::Malformed(_) => return,
                Answer::NotNegotiation => {}
            }
            if state
                .run
                .as_ref()
                .is_some_and(|run| run.awaits(link_id, reply.trans_id))
            {
                if reply.msgtype() != msgtype::FCOPY {
                    log::warn!(
                        "fcopy: ignoring a reply with icmsgtype {} (expected {})",
                        reply.msgtype(),
                        msgtype::FCOPY
                    );
                    return;
                }
                state.on_copy_reply(reply.status(), self.step_timeout)
            } else {
                if state.abandoned.contains(&reply.trans_id) {
                    log::info!(
                        "fcopy: late reply to abandoned transaction {}: {:#010x} ({})",
                        reply.trans_id,
                        reply.status(),
                        ic::status_meaning(reply.status())
                    );
                } else {
                    log::warn!(
                        "fcopy: ignoring a reply with unexpected trans_id {}",
                        reply.trans_id
                    );
                }
                return;
            }
        };
        self.carry_out(advance);
    }

    fn detached(&self, link_id: u64) {
        let mut state = self.lock();
        if state.link.as_ref().map(|l| l.link.id) == Some(link_id) {
            log::info!("fcopy: channel closed");
            state.link = None;
        }
        state.guest_gone(link_id);
        drop(state);
        self.changed.notify_all();
    }

    fn command(
        &self,
        command: serde_json::Value,
        ctx: CommandContext<'_>,
    ) -> Result<serde_json::Value, CommandError> {
        command::run(self, command, ctx)
    }

    fn status(&self) -> ServiceStatus {
        let status = self.fcopy_status();
        let summary = format!(
            "channel {}, {}, {}",
            if status.channel_attached {
                "attached"
            } else {
                "not attached"
            },
            status.negotiation.summary(VERSIONS.label),
            if status.copy_in_progress {
                "a copy is running"
            } else {
                "idle"
            }
        );
        ServiceStatus {
            summary,
            state: serde_json::to_value(&status).unwrap_or(serde_json::Value::Null),
        }
    }
}
