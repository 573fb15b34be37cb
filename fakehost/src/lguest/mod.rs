//! The fake lguest Guest ("lguest"): fakehost plays the Guests that Launchers run through
//! cusedev's `/dev/lguest`.
//!
//! In Linux 3.x (drivers/lguest/, the pre-4.1 Launcher interface) the Host kernel runs the
//! Guest on the Launcher's task: `read(2)` of /dev/lguest enters the Guest and returns when
//! it NOTIFYs an address the Launcher must handle, and the Guest's hypercalls and memory are
//! the Host's business. Here the roles are mirrored: cusedev plays the Host kernel (the
//! bounds checks, the eventfds, the blocking read, the death reasons) and this service plays
//! the Guest: it executes a script ([`script`], docs/lguest-guest.md) and makes the
//! hypercalls (NOTIFY, SHUTDOWN, KILL) and memory accesses a Guest kernel would, over the bus
//! (vmbus::lguest: the messages; guest memory frames whose transaction id is the guest number
//! and whose offset is the guest-physical address).
//!
//! One channel carries every Guest; each launcher `open` + LHREQ_INITIALIZE is a START with
//! a new guest number, and every message names its Guest. Each Guest is a thread of its own
//! ([`guest`]) with a queue of [`guest::Event`]s: the bus reader (`packet`, `memory`) only
//! routes, never waits. A Guest runs the script that was current when it started (the
//! `--lguest-guest` file of `fakehost serve`, the built-in `console-hello` without one, or
//! what `fakehost lguest script` set since).
//!
//! Files: [`script`] (the language), [`guest`] (one Guest), [`console`] (the virtio console
//! driver), [`report`] (what status shows), [`command`] (control commands), [`cli`]
//! (`fakehost lguest`).

pub mod cli;
pub mod command;
mod console;
mod guest;
pub mod report;
pub mod script;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vmbus::guest_memory::MemoryMessage;
use vmbus::guid::Guid;
use vmbus::lguest::{FromGuest, Start, ToGuest, LGUEST_IRQS};
use vmbus::packet::{encode_inband, packet_type, Packet};

use crate::bus::ChannelLink;
use crate::service::{
    CommandContext, CommandError, HostService, InstanceGuid, Offer, ServiceClass, ServiceConfig,
    ServiceStatus,
};
use guest::{Event, Guest};
use report::{GuestState, GuestView, IrqsReport, NotifiesReport, StatusReport};
use script::Script;

/// How many ended Guests status keeps.
pub const ENDED_KEPT: usize = 32;

/// The fake lguest Guest service.
pub struct LguestHost {
    shared: Arc<Shared>,
}

struct Shared {
    script: Mutex<Arc<Script>>,
    read_timeout: Duration,
    state: Mutex<Registry>,
    ignored: AtomicU64,
}

#[derive(Default)]
struct Registry {
    links: HashMap<u64, ChannelLink>,
    /// Guests whose file is open, by (link id, guest number).
    guests: BTreeMap<(u64, u32), Handle>,
    /// The last [`ENDED_KEPT`] Guests that ended, oldest first.
    ended: VecDeque<Arc<Mutex<GuestView>>>,
    started: u64,
}

impl Registry {
    fn end(&mut self, handle: Handle, why: &str) {
        lock(&handle.view).ended = Some(why.to_owned());
        self.ended.push_back(handle.view);
        while self.ended.len() > ENDED_KEPT {
            self.ended.pop_front();
        }
    }
}

#[derive(Clone)]
struct Handle {
    events: Sender<Event>,
    view: Arc<Mutex<GuestView>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads and parses the script file of `--lguest-guest`: `FILE:LINE: reason` if it is bad.
pub fn load_script(path: &Path) -> Result<Script, String> {
    let name = path.display().to_string();
    let text = std::fs::read(path)
        .map_err(|e| format!("{name}: cannot read it: {}", crate::cli::os_reason(&e)))?;
    let text = String::from_utf8(text).map_err(|e| {
        let line = text_line_of(&e.as_bytes()[..e.utf8_error().valid_up_to()]);
        format!("{name}:{line}: the script is not UTF-8 text")
    })?;
    Script::parse(&name, &text).map_err(|e| e.in_file(&name))
}

fn text_line_of(before: &[u8]) -> usize {
    before.iter().filter(|&&b| b == b'\n').count() + 1
}

impl LguestHost {
    /// A service whose Guests run `script`, waiting `read_timeout` for each memory read.
    pub fn with_script(script: Script, read_timeout: Duration) -> LguestHost {
        LguestHost {
            shared: Arc::new(Shared {
                script: Mutex::new(Arc::new(script)),
                read_timeout,
                state: Mutex::new(Registry::default()),
                ignored: AtomicU64::new(0),
            }),
        }
    }

    /// The script Guests started from now on run.
    pub fn script(&self) -> Arc<Script> {
        Arc::clone(&lock(&self.shared.script))
    }

    /// Sets the script for Guests started from now on (running ones keep theirs); the name
    /// of the one it replaces.
    pub fn set_script(&self, script: Script) -> String {
        log::info!(
            "lguest: new Guests run {} ({} instructions)",
            script.name,
            script.program.len()
        );
        let old = std::mem::replace(&mut *lock(&self.shared.script), Arc::new(script));
        old.name.clone()
    }

    /// Live Guests (by link and number), then the ended ones (oldest first).
    fn views(&self) -> Vec<Arc<Mutex<GuestView>>> {
        let registry = lock(&self.shared.state);
        registry
            .guests
            .values()
            .map(|h| Arc::clone(&h.view))
            .chain(registry.ended.iter().cloned())
            .collect()
    }

    /// `fakehost lguest status`.
    pub fn lguest_status(&self) -> StatusReport {
        let (channels_attached, started) = {
            let registry = lock(&self.shared.state);
            (registry.links.len(), registry.started)
        };
        StatusReport {
            script: self.script().name.clone(),
            guests: self.views().iter().map(|v| lock(v).status()).collect(),
            channels_attached,
            started,
            ignored: self.shared.ignored.load(Ordering::Relaxed),
        }
    }

    /// `fakehost lguest irqs`.
    pub fn irqs(&self) -> IrqsReport {
        IrqsReport {
            guests: self.views().iter().map(|v| lock(v).irqs()).collect(),
        }
    }

    /// `fakehost lguest notifies [--guest N]`.
    pub fn notifies(&self, guest: Option<u32>) -> NotifiesReport {
        NotifiesReport {
            guests: self
                .views()
                .iter()
                .map(|v| lock(v))
                .filter(|v| guest.is_none_or(|n| v.guest == n))
                .map(|v| v.notifies())
                .collect(),
        }
    }

    fn ignore(&self, why: std::fmt::Arguments<'_>) {
        self.shared.ignored.fetch_add(1, Ordering::Relaxed);
        log::warn!("lguest: {why}; ignored");
    }

    fn handle(&self, link_id: u64, guest: u32) -> Option<Handle> {
        lock(&self.shared.state)
            .guests
            .get(&(link_id, guest))
            .cloned()
    }

    /// Hands `event` to Guest `guest` of `link_id`.
    fn deliver(&self, link_id: u64, guest: u32, what: &str, event: Event) {
        let Some(handle) = self.handle(link_id, guest) else {
            self.ignore(format_args!(
                "{what} for guest {guest}, which is not started on this channel"
            ));
            return;
        };
        if handle.events.send(event).is_err() {
            log::debug!("lguest: guest {guest}: {what} after it stopped; dropped");
        }
    }

    fn start(&self, link_id: u64, number: u32, start: Start) {
        let mut registry = lock(&self.shared.state);
        let Some(link) = registry.links.get(&link_id).cloned() else {
            drop(registry);
            self.ignore(format_args!(
                "START of guest {number} on a channel that is not attached"
            ));
            return;
        };
        if registry.guests.contains_key(&(link_id, number)) {
            drop(registry);
            self.ignore(format_args!(
                "START of guest {number}, which is already started on this channel"
            ));
            return;
        }
        let script = self.script();
        let view = Arc::new(Mutex::new(GuestView::new(
            number,
            link_id,
            start,
            &script.name,
        )));
        let (events, queue) = mpsc::channel();
        log::info!(
            "lguest: guest {number} started (launcher pid {}, W {}, pfn_limit {:#x}, start \
             {:#x}); it runs {}",
            start.launcher_pid,
            start.word,
            start.pfn_limit,
            start.start,
            script.name
        );
        let guest = Guest::new(
            number,
            link.clone(),
            queue,
            Arc::clone(&view),
            script,
            start,
            self.shared.read_timeout,
        );
        let spawned = std::thread::Builder::new()
            .name(format!("lguest-guest-{number}"))
            .spawn(move || guest.run());
        if let Err(e) = spawned {
            let reason = format!("fake guest: cannot start a thread for it: {e}");
            log::error!("lguest: guest {number}: {reason}");
            lock(&view).state = GuestState::Dead {
                reason: reason.clone(),
            };
            let _ = link.send_packet(&encode_inband(
                0,
                0,
                &FromGuest::Kill { reason }.encode(number),
            ));
        }
        registry.started += 1;
        registry
            .guests
            .insert((link_id, number), Handle { events, view });
    }

    fn irq(&self, link_id: u64, guest: u32, irq: u32) {
        if irq >= LGUEST_IRQS {
            self.ignore(format_args!(
                "IRQ {irq} for guest {guest}: LHREQ_IRQ takes 0..{}",
                LGUEST_IRQS - 1
            ));
            return;
        }
        let Some(handle) = self.handle(link_id, guest) else {
            self.ignore(format_args!(
                "IRQ {irq} for guest {guest}, which is not started on this channel"
            ));
            return;
        };
        {
            let mut view = lock(&handle.view);
            view.pending |= 1 << irq;
            view.raised[irq as usize] += 1;
        }
        // A Guest that stopped counts interrupts all the same.
        let _ = handle.events.send(Event::Irq);
    }

    fn stop(&self, link_id: u64, guest: u32) {
        let mut registry = lock(&self.shared.state);
        let Some(handle) = registry.guests.remove(&(link_id, guest)) else {
            drop(registry);
            self.ignore(format_args!(
                "STOP for guest {guest}, which is not started on this channel"
            ));
            return;
        };
        log::info!("lguest: guest {guest}: its file was closed");
        let _ = handle.events.send(Event::Stop);
        registry.end(handle, "closed");
    }
}

impl ServiceClass for LguestHost {
    const OFFER: Offer = Offer {
        name: "lguest",
        summary: "lguest Guest for /dev/lguest launchers (fake Guest running a script)",
        class: Guid::LGUEST_GUEST,
        instance: InstanceGuid::PerOffer,
    };
    const OFFERED_BY_DEFAULT: bool = true;
    const CLI: Option<crate::service::ServiceCli> = Some(cli::CLI);

    fn new(config: &ServiceConfig) -> Result<LguestHost, String> {
        let script = match cli::script_path(&config.serve_args) {
            Some(path) => load_script(&path)?,
            None => Script::default_script(),
        };
        log::info!("lguest: Guests run {}", script.name);
        Ok(LguestHost::with_script(script, config.step_timeout))
    }
}

impl HostService for LguestHost {
    fn attached(&self, link: ChannelLink) {
        log::info!("lguest: channel relid {} attached", link.relid);
        lock(&self.shared.state).links.insert(link.id, link);
    }

    fn packet(&self, link_id: u64, packet: &Packet<'_>) {
        if packet.ty != packet_type::DATA_INBAND {
            self.ignore(format_args!(
                "a packet of type {:#x} is not an inband lguest message",
                packet.ty
            ));
            return;
        }
        let (guest, message) = match ToGuest::parse(packet.payload) {
            Ok(parsed) => parsed,
            Err(e) => {
                self.ignore(format_args!("malformed lguest message: {e}"));
                return;
            }
        };
        match message {
            ToGuest::Start(start) => self.start(link_id, guest, start),
            ToGuest::Run { cause } => self.deliver(link_id, guest, "RUN", Event::Run { cause }),
            ToGuest::Irq { irq } => self.irq(link_id, guest, irq),
            ToGuest::Died(death) => {
                log::info!("lguest: guest {guest}: died: {}", guest::death_text(&death));
                self.deliver(link_id, guest, "DIED", Event::Died(death))
            }
            ToGuest::Stop => self.stop(link_id, guest),
        }
    }

    fn memory(&self, link_id: u64, message: &MemoryMessage<'_>) {
        let MemoryMessage::Data {
            trans_id,
            offset,
            status,
            bytes,
        } = *message
        else {
            self.ignore(format_args!(
                "the host sent a memory message only the Guest's side may send ({message:?})"
            ));
            return;
        };
        let Ok(guest) = u32::try_from(trans_id) else {
            self.ignore(format_args!(
                "DATA for transaction {trans_id}, which is no guest number"
            ));
            return;
        };
        self.deliver(
            link_id,
            guest,
            "DATA",
            Event::Data {
                offset,
                status,
                bytes: bytes.to_vec(),
            },
        );
    }

    fn detached(&self, link_id: u64) {
        let mut registry = lock(&self.shared.state);
        registry.links.remove(&link_id);
        let keys: Vec<(u64, u32)> = registry
            .guests
            .keys()
            .filter(|(link, _)| *link == link_id)
            .copied()
            .collect();
        for key in &keys {
            if let Some(handle) = registry.guests.remove(key) {
                let _ = handle.events.send(Event::Detached);
                registry.end(handle, "the channel went away");
            }
        }
        log::info!(
            "lguest: channel closed; {} Guest(s) on it ended",
            keys.len()
        );
    }

    fn command(
        &self,
        command: serde_json::Value,
        ctx: CommandContext<'_>,
    ) -> Result<serde_json::Value, CommandError> {
        command::run(self, command, ctx)
    }

    fn status(&self) -> ServiceStatus {
        let s = self.lguest_status();
        let live: Vec<_> = s.guests.iter().filter(|g| g.ended.is_none()).collect();
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for g in &live {
            let kind = match g.state {
                GuestState::WaitingForFirstRead => "waiting for first read",
                GuestState::Running { .. } => "running",
                GuestState::WaitingForIrq { .. } => "waiting for an irq",
                GuestState::Halted { .. } => "halted",
                GuestState::StoppedAtNotify { .. } => "stopped at notify",
                GuestState::Dead { .. } => "dead",
                GuestState::Idle => "idle",
            };
            *kinds.entry(kind).or_default() += 1;
        }
        let breakdown = if kinds.is_empty() {
            String::new()
        } else {
            format!(
                " ({})",
                kinds
                    .iter()
                    .map(|(k, n)| format!("{n} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let summary = format!(
            "channel {}, {} Guest{}{breakdown}, {} started in all; new Guests run {}",
            if s.channels_attached > 0 {
                "attached"
            } else {
                "not attached"
            },
            live.len(),
            if live.len() == 1 { "" } else { "s" },
            s.started,
            s.script
        );
        ServiceStatus {
            summary,
            state: serde_json::to_value(&s).unwrap_or(serde_json::Value::Null),
        }
    }
}

#[cfg(test)]
mod tests;
