//! The XStore fastpath host ("xs"): the VSP behind the posted 2021 `hv_xs_fastpath` driver,
//! over a real blob store.
//!
//! For each ioctl the guest driver sends one `VM_PKT_DATA_USING_GPA_DIRECT` packet naming the
//! pinned pages of three user buffers (data, request, response), with a small transaction id
//! from its requestor (1..=2340), and sleeps until a completion with that id brings a 12-byte
//! `VspResponse` (xs_fastpath.md §2.5, §3.3). What goes in the buffers is fakehost's own
//! XSR1/XSA1 format (docs/xs-protocol.md): GET, PUT, LIST, DELETE and STAT of blobs. The
//! pages are not in the packet; we read and write them with guest-memory frames on the same
//! channel stream (docs/bus-protocol.md, "Guest memory").
//!
//! Many requests are in flight at once (the driver's ioctls are synchronous, so in-flight =
//! calling threads). Each one is a task on this service's own tokio runtime (object_store is
//! async; the rest of fakehost is threads): [`exchange`] runs it, [`memory`] routes the
//! guest's DATA answers to it by (link, transaction id), [`store`] is the blob store. The bus
//! calls [`HostService::packet`] and [`HostService::memory`] on the channel's reader thread;
//! neither blocks: a packet spawns its task, a DATA frame is copied into the buffer of the
//! request that asked for it. Sends happen on the runtime's blocking pool (a WRITE stream can
//! wait for a slow guest without stalling store I/O). A detach aborts every task of that link.
//!
//! Files: [`exchange`] (one request), [`memory`] (guest pages), [`store`] (blobs),
//! [`faults`] (`fakehost xs`), [`command`] (control commands), [`cli`] (`fakehost xs` and
//! `fakehost blobs`).

pub mod cli;
pub mod command;
mod exchange;
pub mod faults;
mod memory;
pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::AbortHandle;
use vmbus::guest_memory::MemoryMessage;
use vmbus::guid::Guid;
use vmbus::packet::{packet_type, Packet};
use vmbus::xs_fastpath::parse_request_packet;
use vmbus::xs_fastpath::xstore::Status;

use crate::bus::ChannelLink;
use crate::service::{
    CommandContext, CommandError, HostService, InstanceGuid, Offer, ServiceClass, ServiceConfig,
    ServiceStatus,
};
use exchange::{Ctx, Job};
use faults::Fault;
use memory::GuestMemory;
use store::BlobStore;

/// How long the startup check of a remote store may take before it is reported as failing.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// The XStore host.
pub struct XsHost {
    shared: Arc<Shared>,
    /// `Option` only so that `Drop` can shut it down without waiting.
    runtime: Option<tokio::runtime::Runtime>,
}

/// What the request tasks share with the service.
struct Shared {
    store: BlobStore,
    memory: GuestMemory,
    step_timeout: Duration,
    fault: Mutex<Fault>,
    state: Mutex<State>,
    counters: Counters,
    health: Mutex<StoreHealth>,
}

#[derive(Default)]
struct State {
    links: HashMap<u64, ChannelLink>,
    /// Requests being served, by (link id, transaction id), with their task.
    in_flight: HashMap<(u64, u64), Option<AbortHandle>>,
}

#[derive(Default)]
struct Counters {
    served: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    abandoned: AtomicU64,
    ignored: AtomicU64,
}

/// What the store's last operation said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum StoreHealth {
    /// The startup check has not answered yet.
    Checking,
    /// The last operation reached the store.
    Ok,
    /// The last operation failed in the store (unreachable, refused, I/O error).
    Failing {
        /// The store's words.
        error: String,
    },
}

impl std::fmt::Display for StoreHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreHealth::Checking => f.write_str("checking"),
            StoreHealth::Ok => f.write_str("ok"),
            StoreHealth::Failing { error } => write!(f, "failing: {error}"),
        }
    }
}

/// The xs part of `fakehost status` (its `state`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XsStatus {
    /// The blob store's URL.
    pub store: String,
    /// Whether it answers.
    pub store_health: StoreHealth,
    /// Channel streams attached (0 or 1 with one guest).
    pub channels_attached: usize,
    /// Requests completed with status 0.
    pub served: u64,
    /// Requests completed with another status.
    pub failed: u64,
    /// Requests being served now.
    pub in_flight: u64,
    /// Requests taken and never answered (`fakehost xs --drop-responses`).
    pub dropped: u64,
    /// Requests whose channel went away before their answer.
    pub abandoned: u64,
    /// Packets that were not requests (wrong type, malformed, a duplicate id).
    pub ignored: u64,
    /// The fault in force.
    pub fault: Fault,
}

impl XsHost {
    /// A host over `store`, whose guest has `step_timeout` to answer each READ.
    pub fn with_store(store: BlobStore, step_timeout: Duration) -> Result<XsHost, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("xs-store")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the xs service's runtime: {e}"))?;
        let shared = Arc::new(Shared {
            store,
            memory: GuestMemory::default(),
            step_timeout,
            fault: Mutex::new(Fault::Normal),
            state: Mutex::new(State::default()),
            counters: Counters::default(),
            health: Mutex::new(StoreHealth::Checking),
        });
        let probe = Arc::clone(&shared);
        runtime.spawn(async move {
            let result = match tokio::time::timeout(PROBE_TIMEOUT, probe.store.probe()).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
            };
            match &result {
                Ok(()) => log::info!("xs: blob store {} answers", probe.store.url()),
                Err(e) => log::error!(
                    "xs: blob store {} does not answer: {e}; guest requests will fail with \
                     STORE_ERROR until it does",
                    probe.store.url()
                ),
            }
            probe.record_store(result.as_ref().map(drop).map_err(String::as_str));
        });
        Ok(XsHost {
            shared,
            runtime: Some(runtime),
        })
    }

    fn handle(&self) -> Option<&tokio::runtime::Handle> {
        self.runtime.as_ref().map(|r| r.handle())
    }

    /// Runs a future on the service's runtime from a thread outside it (a control
    /// connection's), waiting for its end.
    fn block_on<T>(&self, future: impl Future<Output = T>) -> Option<T> {
        self.handle().map(|h| h.block_on(future))
    }

    /// The blob store.
    pub fn store(&self) -> &BlobStore {
        &self.shared.store
    }

    /// The fault in force.
    pub fn fault(&self) -> Fault {
        *lock(&self.shared.fault)
    }

    /// Sets the fault for requests that arrive from now on.
    pub fn set_fault(&self, fault: Fault) {
        *lock(&self.shared.fault) = fault;
        log::info!("xs: fault injection: {fault}");
    }

    /// A snapshot for `fakehost status`.
    pub fn xs_status(&self) -> XsStatus {
        let state = lock(&self.shared.state);
        let c = &self.shared.counters;
        XsStatus {
            store: self.shared.store.url().to_owned(),
            store_health: lock(&self.shared.health).clone(),
            channels_attached: state.links.len(),
            served: c.served.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            in_flight: state.in_flight.len() as u64,
            dropped: c.dropped.load(Ordering::Relaxed),
            abandoned: c.abandoned.load(Ordering::Relaxed),
            ignored: c.ignored.load(Ordering::Relaxed),
            fault: self.fault(),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn record_store(&self, result: Result<(), &str>) {
        let mut health = lock(&self.health);
        match result {
            Ok(()) => *health = StoreHealth::Ok,
            Err(error) => {
                *health = StoreHealth::Failing {
                    error: error.to_owned(),
                }
            }
        }
    }

    fn ignore(&self, why: std::fmt::Arguments<'_>) {
        self.counters.ignored.fetch_add(1, Ordering::Relaxed);
        log::warn!("xs: {why}; ignored");
    }

    /// One request's task: serve it, then answer it unless its link went away.
    async fn serve(self: Arc<Shared>, job: Job) {
        let key = (job.link.id, job.packet.trans_id);
        let on_store = |result: Result<(), &str>| self.record_store(result);
        let ctx = Ctx {
            store: &self.store,
            memory: &self.memory,
            step_timeout: self.step_timeout,
            on_store: &on_store,
        };
        let reply = exchange::serve(&ctx, &job).await;
        // Out of the table before the completion leaves: the guest may reuse the id as soon
        // as it sees it. Not in the table: a detach dropped (and counted) it already.
        if lock(&self.state).in_flight.remove(&key).is_none() {
            return;
        }
        let Ok(reply) = reply else {
            self.counters.abandoned.fetch_add(1, Ordering::Relaxed);
            log::info!(
                "xs: trans_id {}: the channel went away; request dropped",
                key.1
            );
            return;
        };
        // Counted before it leaves, so that whoever sees the completion sees the count.
        let counter = if reply.status == Status::OK {
            &self.counters.served
        } else {
            &self.counters.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let link = job.link.clone();
        let sent = tokio::task::spawn_blocking(move || reply.send(&link)).await;
        if !matches!(sent, Ok(Ok(()))) {
            counter.fetch_sub(1, Ordering::Relaxed);
            self.counters.abandoned.fetch_add(1, Ordering::Relaxed);
            log::info!(
                "xs: trans_id {}: the answer could not be sent (channel gone)",
                key.1
            );
        }
    }
}

impl Drop for XsHost {
    fn drop(&mut self) {
        // Tasks may still wait for a guest; nothing needs them once the service is gone.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl ServiceClass for XsHost {
    const OFFER: Offer = Offer {
        name: "xs",
        summary: "Azure XStore fastpath (hv_xs_fastpath, /dev/azure_xs_fastpath) over a blob store",
        class: Guid::XS_FASTPATH,
        instance: InstanceGuid::PerOffer,
    };
    const OFFERED_BY_DEFAULT: bool = true;
    const CLI: Option<crate::service::ServiceCli> = Some(cli::CLI);

    fn new(config: &ServiceConfig) -> Result<XsHost, String> {
        let store =
            BlobStore::open(&cli::store_spec(&config.serve_args)).map_err(|e| e.to_string())?;
        log::info!("xs: blobs in {}", store.url());
        XsHost::with_store(store, config.step_timeout)
    }
}

impl HostService for XsHost {
    fn attached(&self, link: ChannelLink) {
        log::info!("xs: channel relid {} attached", link.relid);
        lock(&self.shared.state).links.insert(link.id, link);
    }

    fn packet(&self, link_id: u64, packet: &Packet<'_>) {
        let shared = &self.shared;
        if packet.ty != packet_type::DATA_USING_GPA_DIRECT {
            shared.ignore(format_args!(
                "a packet of type {:#x} (trans_id {}) is not a GPA-direct request",
                packet.ty, packet.trans_id
            ));
            return;
        }
        let parsed = match parse_request_packet(packet.bytes) {
            Ok(parsed) => parsed,
            Err(e) => {
                shared.ignore(format_args!(
                    "malformed request packet (trans_id {}): {e}",
                    packet.trans_id
                ));
                return;
            }
        };
        let fault = self.fault();
        let trans_id = parsed.trans_id;
        if fault == Fault::DropResponses {
            let n = shared.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            log::info!("xs: trans_id {trans_id} dropped (--drop-responses; {n} so far)");
            return;
        }
        let Some(handle) = self.handle() else {
            return;
        };
        let mut state = lock(&shared.state);
        let Some(link) = state.links.get(&link_id).cloned() else {
            drop(state);
            shared.ignore(format_args!(
                "trans_id {trans_id} on a channel that is not attached"
            ));
            return;
        };
        let key = (link_id, trans_id);
        if state.in_flight.contains_key(&key) {
            drop(state);
            shared.ignore(format_args!(
                "trans_id {trans_id} is already in flight on this channel (a duplicate id)"
            ));
            return;
        }
        let job = Job {
            link,
            packet: parsed,
            fault,
        };
        // Spawned under the lock: the task removes its entry, which it cannot do before the
        // entry holds its abort handle.
        let task = handle.spawn(Arc::clone(shared).serve(job));
        state.in_flight.insert(key, Some(task.abort_handle()));
    }

    fn memory(&self, link_id: u64, message: &MemoryMessage<'_>) {
        self.shared.memory.on_message(link_id, message);
    }

    fn detached(&self, link_id: u64) {
        let dropped: Vec<AbortHandle> = {
            let mut state = lock(&self.shared.state);
            state.links.remove(&link_id);
            let keys: Vec<(u64, u64)> = state
                .in_flight
                .keys()
                .filter(|(link, _)| *link == link_id)
                .copied()
                .collect();
            keys.iter()
                .filter_map(|key| state.in_flight.remove(key).flatten())
                .collect()
        };
        self.shared.memory.detach(link_id);
        for task in &dropped {
            task.abort();
        }
        let n = dropped.len() as u64;
        self.shared
            .counters
            .abandoned
            .fetch_add(n, Ordering::Relaxed);
        log::info!("xs: channel closed; {n} request(s) in flight dropped");
    }

    fn command(
        &self,
        command: serde_json::Value,
        ctx: CommandContext<'_>,
    ) -> Result<serde_json::Value, CommandError> {
        command::run(self, command, ctx)
    }

    fn status(&self) -> ServiceStatus {
        let s = self.xs_status();
        let summary = format!(
            "store {} ({}), channel {}, {} served, {} failed, {} in flight, {} dropped, fault: {}",
            s.store,
            s.store_health,
            if s.channels_attached > 0 {
                "attached"
            } else {
                "not attached"
            },
            s.served,
            s.failed,
            s.in_flight,
            s.dropped,
            s.fault
        );
        ServiceStatus {
            summary,
            state: serde_json::to_value(&s).unwrap_or(serde_json::Value::Null),
        }
    }
}

#[cfg(test)]
mod tests;
