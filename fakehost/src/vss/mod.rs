//! The VSS host service: what a Hyper-V host does around a live backup (checkpoint) of a Linux
//! guest (`/dev/vmbus/hv_vss` and `hv_vss_daemon` on the guest).
//!
//! When the guest attaches the channel we negotiate framework 3.0, VSS 5.0 (the only pair the
//! 6.1 driver knows, kvp-vss.md §5; it answers at once, daemon or not). Then, one at a time
//! ([`crate::kvp::channel::IcChannel`]):
//!
//! * FREEZE: the daemon FIFREEZEs every writable block-device filesystem of its machine. The
//!   guest driver waits up to 900 s for it (VSS_FREEZE_TIMEOUT), so we wait 910 s by default:
//!   its own HV_E_FAIL comes first. A freeze of the machine fakehost runs on is refused unless
//!   forced ([`peer`]).
//! * THAW: the daemon FITHAWs them. Always allowed.
//! * HOT_BACKUP (`check`): "can you do a live backup?" The daemon answers 0. Always allowed.
//!
//! Without a registered daemon the driver answers HV_E_FAIL at once (§5). Status shows whether
//! we left the guest frozen.
//!
//! Files: [`peer`] (where the guest is), [`command`] (control commands), [`cli`] (`fakehost
//! vss`).

pub mod cli;
pub mod command;
pub mod peer;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmbus::guid::Guid;
use vmbus::ic::msgtype;
use vmbus::ic::status::{HV_E_FAIL, HV_S_OK};
use vmbus::negotiate::{VSS_FW_VERSIONS, VSS_SRV_VERSIONS};
use vmbus::packet::Packet;
use vmbus::vss::{self as wire, op};

use crate::bus::ChannelLink;
use crate::ic::IcVersions;
use crate::kvp::channel::{secs, ChannelConfig, ChannelView, IcChannel, TxnError};
use crate::service::{
    CommandContext, CommandError, HostService, InstanceGuid, Offer, ServiceClass, ServiceConfig,
    ServiceStatus,
};
use peer::{GuestPlace, ProcRoot};

pub use command::{VssCommand, VssOp, VssReport};

/// The versions we offer: the 6.1 driver's (kvp-vss.md §5).
pub const VERSIONS: IcVersions = IcVersions {
    label: "vss",
    framework: VSS_FW_VERSIONS,
    service: VSS_SRV_VERSIONS,
};

/// The VSS channel.
pub const CHANNEL: ChannelConfig = ChannelConfig {
    versions: VERSIONS,
    msgtype: msgtype::VSS,
    unanswered_hint: "the guest's hv_vss driver has not answered",
    unanswered_why: "the 6.1 driver answers at once, daemon or not",
};

/// The guest driver's own limit for a FREEZE (`VSS_FREEZE_TIMEOUT`, hv_snapshot.c).
pub const DRIVER_FREEZE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// How long we wait for a FREEZE by default: the driver's limit and 10 s, so that the
/// driver's own answer (HV_E_FAIL on its timeout) arrives before we give up.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(15 * 60 + 10);

/// The VSS host.
pub struct VssHost {
    channel: Arc<IcChannel>,
    step_timeout: Duration,
    proc_root: ProcRoot,
    record: Mutex<History>,
}

/// Whether we left the guest's filesystems frozen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "frozen", rename_all = "snake_case")]
pub enum Frozen {
    /// Not frozen by this host (never, or thawed since).
    No,
    /// FREEZE succeeded and no THAW since.
    Yes {
        /// Seconds since the FREEZE answer.
        secs: u64,
    },
    /// We cannot tell.
    Unknown {
        /// Why.
        why: String,
    },
}

#[derive(Debug)]
enum FrozenAt {
    No,
    Yes(Instant),
    Unknown(String),
}

impl FrozenAt {
    fn view(&self) -> Frozen {
        match self {
            FrozenAt::No => Frozen::No,
            FrozenAt::Yes(at) => Frozen::Yes {
                secs: at.elapsed().as_secs(),
            },
            FrozenAt::Unknown(why) => Frozen::Unknown { why: why.clone() },
        }
    }
}

struct History {
    frozen: FrozenAt,
    last: Option<(String, Instant)>,
}

/// The VSS part of `fakehost status` (its `state`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VssStatus {
    /// The channel.
    #[serde(flatten)]
    pub channel: ChannelView,
    /// Whether we left the guest frozen.
    pub guest: Frozen,
    /// The last operation's result, in words.
    pub last: Option<String>,
    /// Seconds since it.
    pub last_secs_ago: Option<u64>,
}

/// What a guest VSS status means.
pub fn status_message(code: u32) -> String {
    match code {
        HV_S_OK => "success".to_owned(),
        HV_E_FAIL => "the guest's VSS daemon failed: see its log (or no hv_vss_daemon is \
                      registered, or it did not answer its driver in time)"
            .to_owned(),
        other => vmbus::ic::status_meaning(other).to_owned(),
    }
}

impl VssHost {
    /// A host whose guest has `step_timeout` to answer a THAW or HOT_BACKUP.
    pub fn new(step_timeout: Duration) -> VssHost {
        VssHost::with_proc_root(step_timeout, ProcRoot::default())
    }

    /// Like [`VssHost::new`], looking at another `/proc` (tests).
    pub fn with_proc_root(step_timeout: Duration, proc_root: ProcRoot) -> VssHost {
        VssHost {
            channel: IcChannel::new(CHANNEL, false),
            step_timeout,
            proc_root,
            record: Mutex::new(History {
                frozen: FrozenAt::No,
                last: None,
            }),
        }
    }

    fn history(&self) -> MutexGuard<'_, History> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the guest of `link` is.
    pub fn locate(&self, link: &ChannelLink) -> GuestPlace {
        peer::locate(link.peer.as_ref(), &self.proc_root)
    }

    /// A snapshot for `fakehost status`.
    pub fn vss_status(&self) -> VssStatus {
        let history = self.history();
        VssStatus {
            channel: self.channel.view(),
            guest: history.frozen.view(),
            last: history.last.as_ref().map(|(s, _)| s.clone()),
            last_secs_ago: history.last.as_ref().map(|(_, t)| t.elapsed().as_secs()),
        }
    }

    /// Sends `what` and waits for the answer (up to `timeout`, or the default for the
    /// operation). `Err` is a refusal before anything was sent: a FREEZE of this machine
    /// without `force`.
    pub fn run(
        &self,
        what: VssOp,
        force: bool,
        timeout: Option<Duration>,
    ) -> Result<VssReport, String> {
        let operation = what.wire();
        let timeout = timeout.unwrap_or(match what {
            VssOp::Freeze => FREEZE_TIMEOUT,
            VssOp::Thaw | VssOp::Check => self.step_timeout,
        });
        let started = Instant::now();
        let slot = self.channel.acquire();
        let link = match self.channel.wait_ready(self.step_timeout) {
            Ok(link) => link,
            Err(e) => {
                return Ok(self.finish(what, started, Failure::Txn(TxnError::Ready(e)), None));
            }
        };
        let place = self.locate(&link);
        if what == VssOp::Freeze {
            if place.is_this_machine() && !force {
                let message = refusal(&place);
                log::warn!("vss: {message}");
                return Err(message);
            }
            log::info!(
                "vss: FREEZE ({}; waiting up to {})",
                if place.is_this_machine() {
                    format!("forced although {}", place.describe())
                } else {
                    place.describe()
                },
                secs(timeout)
            );
        } else {
            log::info!("vss: {} (waiting up to {})", what.name(), secs(timeout));
        }
        let body = wire::encode_request(operation, 0);
        let outcome = match self.channel.transact(&slot, &link, &body, timeout) {
            Ok(reply) => match wire::parse_reply(&reply.payload) {
                Ok(parsed) if parsed.operation != operation => Failure::Malformed(format!(
                    "operation {} in the answer to {}",
                    parsed.operation,
                    what.name()
                )),
                Ok(parsed) if parsed.status == HV_S_OK => Failure::None(parsed.flags),
                Ok(parsed) => Failure::Status(parsed.status, parsed.flags),
                Err(e) => Failure::Malformed(e.to_string()),
            },
            Err(e) => Failure::Txn(e),
        };
        drop(slot);
        Ok(self.finish(what, started, outcome, Some(place)))
    }

    /// Records the outcome, updates the frozen state, builds the report.
    fn finish(
        &self,
        what: VssOp,
        started: Instant,
        outcome: Failure,
        place: Option<GuestPlace>,
    ) -> VssReport {
        let seconds = started.elapsed().as_secs_f64();
        let (ok, hresult, flags, error) = match &outcome {
            Failure::None(flags) => (true, Some(HV_S_OK), Some(*flags), None),
            Failure::Status(status, flags) => (
                false,
                Some(*status),
                Some(*flags),
                Some(format!(
                    "{}: the guest answered {status:#010x}: {}",
                    what.name(),
                    status_message(*status)
                )),
            ),
            Failure::Txn(e) => (false, None, None, Some(format!("{}: {e}", what.name()))),
            Failure::Malformed(e) => (
                false,
                None,
                None,
                Some(format!(
                    "{}: the guest's answer is malformed: {e}",
                    what.name()
                )),
            ),
        };
        let answered = hresult.is_some();
        // Nothing reached the guest: nothing changed there.
        let sent = !matches!(outcome, Failure::Txn(TxnError::Ready(_)));
        let mut history = self.history();
        let frozen = std::mem::replace(&mut history.frozen, FrozenAt::No);
        history.frozen = match (what, ok, answered) {
            _ if !sent => frozen,
            (VssOp::Freeze, true, _) => FrozenAt::Yes(Instant::now()),
            // The daemon thaws after a failed freeze, so a guest that was not frozen is not
            // now; one that was (or may have been) keeps that answer, since an HV_E_FAIL may
            // also come from the driver without any daemon having acted.
            (VssOp::Freeze, false, true) => frozen,
            (VssOp::Freeze, false, false) => {
                FrozenAt::Unknown("a FREEZE went unanswered: run `fakehost vss thaw`".to_owned())
            }
            (VssOp::Thaw, true, _) => FrozenAt::No,
            (VssOp::Thaw, false, _) => match frozen {
                FrozenAt::No => FrozenAt::No,
                _ => FrozenAt::Unknown("the THAW failed: try `fakehost vss thaw` again".to_owned()),
            },
            (VssOp::Check, _, _) => frozen,
        };
        let line = match &error {
            None => format!("{} {:#010x} success", what.name(), HV_S_OK),
            Some(e) => e.clone(),
        };
        history.last = Some((line.clone(), Instant::now()));
        let guest = history.frozen.view();
        drop(history);
        if ok {
            log::info!("vss: {line} in {seconds:.2} s");
        } else {
            log::warn!("vss: {line}");
        }
        VssReport {
            ok,
            operation: what.name().to_owned(),
            hresult,
            meaning: hresult.map(status_message),
            error,
            flags,
            seconds,
            guest,
            place: place.map(|p| p.describe()),
        }
    }
}

/// Why a FREEZE of this machine is refused, with what to do.
pub fn refusal(place: &GuestPlace) -> String {
    format!(
        "refusing to FREEZE: {}. hv_vss_daemon freezes (FIFREEZE) every writable \
         block-device filesystem of the machine it runs on, / included, so this would freeze \
         this machine — the shell you typed this in too. Add --force if the guest side \
         really is a throw-away VM or namespace (and keep `fakehost vss thaw` at hand)",
        place.describe()
    )
}

/// How an operation ended.
enum Failure {
    /// Success, with the flags word echoed.
    None(u32),
    /// The guest's status and flags.
    Status(u32, u32),
    Txn(TxnError),
    Malformed(String),
}

impl ServiceClass for VssHost {
    const OFFER: Offer = Offer {
        name: "vss",
        summary: "live backup (hv_vss: freeze, thaw and check the guest's filesystems)",
        class: Guid::VSS,
        instance: InstanceGuid::PerOffer,
    };
    const OFFERED_BY_DEFAULT: bool = true;
    const CLI: Option<crate::service::ServiceCli> = Some(cli::CLI);

    fn new(config: &ServiceConfig) -> Result<VssHost, String> {
        Ok(VssHost::new(config.step_timeout))
    }
}

impl HostService for VssHost {
    fn attached(&self, link: ChannelLink) {
        log::info!("vss: {}", self.locate(&link).describe());
        self.channel.attached(link);
    }

    fn packet(&self, link_id: u64, packet: &Packet<'_>) {
        let _ = self.channel.on_packet(link_id, packet);
    }

    fn detached(&self, link_id: u64) {
        let was_current = self.channel.is_current(link_id);
        self.channel.detached(link_id);
        if was_current {
            let mut history = self.history();
            if let FrozenAt::Yes(_) = history.frozen {
                history.frozen = FrozenAt::Unknown(
                    "the channel closed while the guest was frozen (hv_vss_daemon thaws when it \
                     reopens its device)"
                        .to_owned(),
                );
            }
        }
    }

    fn command(
        &self,
        command: serde_json::Value,
        ctx: CommandContext<'_>,
    ) -> Result<serde_json::Value, CommandError> {
        command::run(self, command, ctx)
    }

    fn status(&self) -> ServiceStatus {
        let status = self.vss_status();
        let mut summary = status.channel.summary(&CHANNEL);
        summary.push_str(&match &status.guest {
            Frozen::No => ", guest not frozen".to_owned(),
            Frozen::Yes { secs } => format!(", guest FROZEN for {secs} s"),
            Frozen::Unknown { why } => format!(", guest maybe frozen ({why})"),
        });
        if status.channel.request_in_flight {
            summary.push_str(", a request is in flight");
        }
        if let (Some(last), Some(ago)) = (&status.last, status.last_secs_ago) {
            summary.push_str(&format!("; last: {last} ({ago} s ago)"));
        }
        ServiceStatus {
            summary,
            state: serde_json::to_value(&status).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// The wire op of each command.
impl VssOp {
    /// Its `VSS_OP_*`.
    pub fn wire(self) -> u8 {
        match self {
            VssOp::Freeze => op::FREEZE,
            VssOp::Thaw => op::THAW,
            VssOp::Check => op::HOT_BACKUP,
        }
    }

    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            VssOp::Freeze => "FREEZE",
            VssOp::Thaw => "THAW",
            VssOp::Check => "HOT_BACKUP",
        }
    }
}
