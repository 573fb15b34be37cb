//! The KVP host service: what Hyper-V does with a guest's key-value pair exchange
//! (`/dev/vmbus/hv_kvp` and `hv_kvp_daemon` on the guest; `Msvm_KvpExchangeComponent`,
//! `Get-VMNetworkAdapter ... IPAddresses` on a Windows host).
//!
//! When the guest attaches the KVP channel we send NEGOTIATE (framework 3.0/1.0, KVP
//! 4.0/3.0/1.0; the guest picks) and wait, as long as it takes: the 6.1 guest driver does not
//! even read its ring until a daemon has registered (kvp-vss.md §3.4), so an unanswered
//! negotiation only means "no daemon yet". An operation arriving meanwhile waits up to the
//! step timeout, then fails with "waiting for the guest's KVP daemon to register".
//!
//! Once the negotiation is answered (a daemon is there), we push this host's own items into
//! pool 3 (KVP_POOL_AUTO_EXTERNAL) with sixteen SETs, as Hyper-V does on every VM
//! ([`host_items`]); operations asked for meanwhile wait until the push is done, so a `list
//! --pool 3` right after registration sees all of them. A failure is logged and shown in
//! `fakehost status`, never fatal.
//!
//! Operations ([`ops`]), one request at a time ([`channel::IcChannel`], shared with VSS): GET,
//! SET (REG_SZ / REG_U32 / REG_U64), DELETE, ENUMERATE (and `list`: ENUMERATE 0, 1, 2, … until
//! the daemon answers HV_S_CONT), GET_IP_INFO (with adapter discovery when the guest is this
//! machine). Each waits for its answer for the step timeout.
//!
//! Files: [`channel`] (the one-at-a-time IC channel), [`ops`] (the operations),
//! [`host_items`] (the pool-3 items), [`report`] (results, messages), [`command`] (control
//! commands), [`cli`] (`fakehost kvp`).

pub mod channel;
pub mod cli;
pub mod command;
pub mod host_items;
mod ops;
pub mod report;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmbus::guid::Guid;
use vmbus::ic::msgtype;
use vmbus::negotiate::{KVP_FW_VERSIONS, KVP_SRV_VERSIONS};
use vmbus::packet::Packet;

use crate::bus::ChannelLink;
use crate::ic::{IcVersions, Negotiation};
use crate::service::{
    CommandContext, CommandError, HostService, InstanceGuid, Offer, ServiceClass, ServiceConfig,
    ServiceStatus,
};
use crate::vss::peer::ProcRoot;
use channel::{ChannelConfig, ChannelView, Event, IcChannel, Slot};

pub use command::KvpCommand;
pub use report::KvpReport;

/// The versions we offer: the 6.1 driver's lists (kvp-vss.md §3.1); the guest picks.
pub const VERSIONS: IcVersions = IcVersions {
    label: "kvp",
    framework: KVP_FW_VERSIONS,
    service: KVP_SRV_VERSIONS,
};

/// The KVP channel.
pub const CHANNEL: ChannelConfig = ChannelConfig {
    versions: VERSIONS,
    msgtype: msgtype::KVPEXCHANGE,
    unanswered_hint: "waiting for the guest's KVP daemon to register",
    unanswered_why: "the hv_kvp driver answers NEGOTIATE only once hv_kvp_daemon has opened \
                     /dev/vmbus/hv_kvp",
};

/// Where the guest's network adapters are listed when the guest is this machine.
pub const NET_ROOT: &str = "/sys/class/net";

/// The KVP host.
pub struct KvpHost {
    inner: Arc<Inner>,
}

/// What the push thread shares with the service.
struct Inner {
    channel: Arc<IcChannel>,
    step_timeout: Duration,
    /// Pool-3 items, in push order.
    host_items: Vec<(String, String)>,
    /// `/proc` and `/sys/class/net` (tests: fake trees).
    proc_root: ProcRoot,
    net_root: PathBuf,
    record: Mutex<History>,
}

/// What status shows besides the channel.
#[derive(Default)]
struct History {
    push: PushState,
    last: Option<(String, Instant)>,
}

/// The pool-3 push, for status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushState {
    /// "not yet" (no daemon yet), "running", "done" or "failed".
    pub state: String,
    /// Items the guest accepted.
    pub pushed: usize,
    /// Items in all.
    pub total: usize,
    /// Each failure, in words.
    pub failures: Vec<String>,
}

/// The KVP part of `fakehost status` (its `state`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvpStatus {
    /// The channel.
    #[serde(flatten)]
    pub channel: ChannelView,
    /// The pool-3 push of the host's items.
    pub host_items: PushState,
    /// The VirtualMachineId pushed.
    pub virtual_machine_id: String,
    /// The last operation, in words, and how long ago.
    pub last: Option<String>,
    /// Seconds since the last operation.
    pub last_secs_ago: Option<u64>,
}

impl KvpHost {
    /// A host whose guest has `step_timeout` to answer each request and that pushes
    /// `host_items` into pool 3.
    pub fn new(step_timeout: Duration, host_items: Vec<(String, String)>) -> KvpHost {
        KvpHost::with_roots(
            step_timeout,
            host_items,
            ProcRoot::default(),
            PathBuf::from(NET_ROOT),
        )
    }

    /// Like [`KvpHost::new`], looking at another `/proc` and `/sys/class/net` (tests).
    pub fn with_roots(
        step_timeout: Duration,
        host_items: Vec<(String, String)>,
        proc_root: ProcRoot,
        net_root: PathBuf,
    ) -> KvpHost {
        let total = host_items.len();
        KvpHost {
            inner: Arc::new(Inner {
                channel: IcChannel::new(CHANNEL, true),
                step_timeout,
                host_items,
                proc_root,
                net_root,
                record: Mutex::new(History {
                    push: PushState {
                        state: "not yet".to_owned(),
                        total,
                        ..PushState::default()
                    },
                    last: None,
                }),
            }),
        }
    }

    /// The per-request timeout.
    pub fn step_timeout(&self) -> Duration {
        self.inner.step_timeout
    }

    /// A snapshot for `fakehost status`.
    pub fn kvp_status(&self) -> KvpStatus {
        let history = self.inner.history();
        let vm_id = self
            .inner
            .host_items
            .iter()
            .find(|(k, _)| k == "VirtualMachineId")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        KvpStatus {
            channel: self.inner.channel.view(),
            host_items: history.push.clone(),
            virtual_machine_id: vm_id,
            last: history.last.as_ref().map(|(s, _)| s.clone()),
            last_secs_ago: history.last.as_ref().map(|(_, t)| t.elapsed().as_secs()),
        }
    }
}

impl Inner {
    fn history(&self) -> MutexGuard<'_, History> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers the last operation for status.
    fn remember(&self, what: String) {
        self.history().last = Some((what, Instant::now()));
    }

    /// Pushes the host items into pool 3 over `link`, holding `slot` throughout.
    fn push_host_items(&self, slot: Slot, link: ChannelLink) {
        let total = self.host_items.len();
        log::info!(
            "kvp: the guest's daemon is up; pushing {total} host items into pool 3 \
             (KVP_POOL_AUTO_EXTERNAL)"
        );
        {
            let mut history = self.history();
            history.push = PushState {
                state: "running".to_owned(),
                total,
                ..PushState::default()
            };
        }
        let mut pushed = 0;
        let mut failures = Vec::new();
        for (asked, (key, value)) in self.host_items.iter().enumerate() {
            match self.push_one(&slot, &link, key, value) {
                Ok(()) => pushed += 1,
                Err((message, go_on)) => {
                    log::warn!("kvp: pool 3 item {key}: {message}");
                    failures.push(format!("{key}: {message}"));
                    // A guest that does not answer (or is gone) will not answer the rest
                    // either: stop, so nobody waits 16 step timeouts behind us.
                    if !go_on {
                        failures.push(format!("stopped after {} of {total} items", asked + 1));
                        break;
                    }
                }
            }
            self.history().push.pushed = pushed;
        }
        drop(slot);
        if failures.is_empty() {
            log::info!("kvp: pushed all {total} host items into pool 3");
        } else {
            log::warn!(
                "kvp: pushed {pushed} of {total} host items into pool 3: {}",
                failures.join("; ")
            );
        }
        let mut history = self.history();
        history.push = PushState {
            state: if failures.is_empty() {
                "done"
            } else {
                "failed"
            }
            .to_owned(),
            pushed,
            total,
            failures,
        };
    }
}

impl ServiceClass for KvpHost {
    const OFFER: Offer = Offer {
        name: "kvp",
        summary: "key-value pair exchange (hv_kvp, Hyper-V KVP items and guest IP addresses)",
        class: Guid::KVP,
        instance: InstanceGuid::PerOffer,
    };
    const OFFERED_BY_DEFAULT: bool = true;
    const CLI: Option<crate::service::ServiceCli> = Some(cli::CLI);

    fn new(config: &ServiceConfig) -> Result<KvpHost, String> {
        let host_name = host_items::host_name();
        let fqdn =
            host_items::fully_qualified(&host_name, std::path::Path::new("/etc/resolv.conf"));
        let vm_name = cli::vm_name(&config.serve_args);
        let vm_id = host_items::new_vm_id();
        log::debug!("kvp: this run's VirtualMachineId is {vm_id}, VirtualMachineName {vm_name}");
        Ok(KvpHost::new(
            config.step_timeout,
            host_items::items(&host_name, &fqdn, &vm_id, &vm_name),
        ))
    }
}

impl HostService for KvpHost {
    fn attached(&self, link: ChannelLink) {
        {
            let mut history = self.inner.history();
            if history.push.state != "running" {
                history.push.state = "not yet".to_owned();
            }
        }
        self.inner.channel.attached(link);
    }

    fn packet(&self, link_id: u64, packet: &Packet<'_>) {
        let Event::Settled {
            link,
            negotiation,
            slot,
        } = self.inner.channel.on_packet(link_id, packet)
        else {
            return;
        };
        let Negotiation::Agreed { .. } = negotiation else {
            return;
        };
        let Some(slot) = slot else {
            return;
        };
        let inner = Arc::clone(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("kvp-host-items".to_owned())
            .spawn(move || inner.push_host_items(slot, link));
        if let Err(e) = spawned {
            // The slot went down with the closure: nothing waits on it.
            log::warn!("kvp: cannot start the pool-3 push: {e}");
            let mut history = self.inner.history();
            history.push.state = "failed".to_owned();
            history.push.failures = vec![format!("cannot start a thread: {e}")];
        }
    }

    fn detached(&self, link_id: u64) {
        self.inner.channel.detached(link_id);
    }

    fn command(
        &self,
        command: serde_json::Value,
        ctx: CommandContext<'_>,
    ) -> Result<serde_json::Value, CommandError> {
        command::run(self, command, ctx)
    }

    fn status(&self) -> ServiceStatus {
        let status = self.kvp_status();
        let push = &status.host_items;
        let mut summary = status.channel.summary(&CHANNEL);
        summary.push_str(&match push.state.as_str() {
            "running" => format!(
                ", pushing host items into pool 3 ({} of {})",
                push.pushed, push.total
            ),
            "done" => format!(
                ", host items pushed into pool 3 ({} of {})",
                push.pushed, push.total
            ),
            "failed" => format!(
                ", host items push failed ({} of {}: {})",
                push.pushed,
                push.total,
                push.failures.first().map_or("", String::as_str)
            ),
            _ => String::new(),
        });
        summary.push_str(if status.channel.request_in_flight {
            ", a request is in flight"
        } else {
            ", idle"
        });
        if let (Some(last), Some(ago)) = (&status.last, status.last_secs_ago) {
            summary.push_str(&format!("; last: {last} ({ago} s ago)"));
        }
        ServiceStatus {
            summary,
            state: serde_json::to_value(&status).unwrap_or(serde_json::Value::Null),
        }
    }
}
