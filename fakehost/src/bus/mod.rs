//! The host side of the bus: VMBus channel management over byte streams
//! (`docs/bus-protocol.md`).
//!
//! A guest opens one control stream (version, offers, open/close, rescind) and one stream per
//! open channel. [`Bus`] holds what the host offers and the state of the one guest session;
//! [`listener`] accepts streams and routes them by their HELLO; [`session`] answers the control
//! stream; [`channel`] hands each channel stream to the [`ChannelService`] that serves it.
//!
//! Threads, not async: a handful of streams, each with one reader thread that blocks in
//! `read()`. Anyone may write (frames are locked whole), and anyone may shut a stream down to
//! wake its reader, which is how "the guest went away" reaches every waiter at once.

mod channel;
pub mod frames;
pub mod ids;
pub mod listener;
mod session;

use std::collections::BTreeSet;
use std::io;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use vmbus::channel_msg::ChannelMessage;
use vmbus::guid::Guid;
use vmbus::packet::Packet;

use crate::service::ServiceKind;
use frames::FrameWriter;
use ids::Ids;

/// A host service behind a channel (the fcopy host, ...).
///
/// The bus calls these from the channel stream's reader thread: `attached` once, then
/// `packet` for every packet, then `detached` once when the stream ends for any reason.
pub trait ChannelService: Send + Sync {
    /// A channel stream was attached: the service may start sending (e.g. NEGOTIATE).
    fn attached(&self, link: ChannelLink);
    /// A well-framed VMBus packet arrived on the link with this id.
    fn packet(&self, link_id: u64, packet: &Packet<'_>);
    /// The link's stream ended (closed, rescinded, guest gone): fail what waits on it.
    fn detached(&self, link_id: u64);
}

/// A service's handle on one attached channel stream.
#[derive(Debug, Clone)]
pub struct ChannelLink {
    /// Unique per attachment; replies and detach notices carry it.
    pub id: u64,
    /// The channel's child_relid.
    pub relid: u32,
    writer: Arc<FrameWriter>,
}

impl ChannelLink {
    /// A link over `stream` (the bus makes these; tests may too).
    pub fn new(id: u64, relid: u32, stream: Arc<UnixStream>) -> ChannelLink {
        ChannelLink {
            id,
            relid,
            writer: Arc::new(FrameWriter::new(stream)),
        }
    }

    /// Sends one encoded VMBus packet (descriptor + payload + padding) as a PACKET frame.
    pub fn send_packet(&self, packet: &[u8]) -> io::Result<()> {
        self.writer.send(vmbus::stream::kind::PACKET, packet)
    }
}

/// Why an offer or rescind request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// `offer` of a service that is offered already.
    #[error("{0} is already offered")]
    AlreadyOffered(ServiceKind),
    /// `rescind` of a service that is not offered.
    #[error("{0} is not offered (nothing to rescind)")]
    NotOffered(ServiceKind),
    /// Every relid is taken.
    #[error("no free child_relid left for a new offer")]
    NoRelid,
}

/// What the bus looks like, for `fakehost status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusStatus {
    /// A guest control stream is connected.
    pub guest_connected: bool,
    /// The VMBus version the guest asked for and we accepted ("5.3"), if any.
    pub vmbus_version: Option<String>,
    /// Services the host offers (and re-offers to every new guest).
    pub offered: Vec<ServiceKind>,
    /// Channels offered to the connected guest.
    pub channels: Vec<ChannelStatus>,
}

/// One offered channel, for `fakehost status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelStatus {
    /// The service.
    pub service: ServiceKind,
    /// Its child_relid.
    pub relid: u32,
    /// Its if_instance GUID.
    pub instance: String,
    /// "offered", "opened" (OPENCHANNEL answered, no stream yet) or "attached".
    pub state: String,
    /// RESCIND_CHANNELOFFER was sent; waiting for the guest's RELID_RELEASED.
    pub rescinded: bool,
}

/// The bus: what is offered and the guest session.
pub struct Bus {
    state: Mutex<BusState>,
    services: Vec<(ServiceKind, Arc<dyn ChannelService>)>,
}

struct BusState {
    /// What the host offers now; every new guest gets these.
    offered: BTreeSet<ServiceKind>,
    session: Option<Session>,
    ids: Ids,
}

/// The one guest connected on a control stream.
struct Session {
    id: u64,
    writer: Arc<FrameWriter>,
    /// The accepted VMBus version, once INITIATE_CONTACT succeeded.
    version: Option<u32>,
    /// REQUESTOFFERS was answered: later offers are sent at once (hot add).
    offers_requested: bool,
    channels: Vec<ChannelRecord>,
}

struct ChannelRecord {
    service: ServiceKind,
    relid: u32,
    instance: Guid,
    state: ChannelState,
    rescinded: bool,
}

enum ChannelState {
    Offered,
    Opened {
        open_id: u32,
    },
    Attached {
        link_id: u64,
        stream: Arc<UnixStream>,
    },
}

impl ChannelState {
    fn name(&self) -> &'static str {
        match self {
            ChannelState::Offered => "offered",
            ChannelState::Opened { .. } => "opened",
            ChannelState::Attached { .. } => "attached",
        }
    }

    /// Ends an attached stream (its reader then detaches the service).
    fn close_stream(&self) {
        if let ChannelState::Attached { stream, .. } = self {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

impl Session {
    fn send(&self, msg: &ChannelMessage) -> io::Result<()> {
        self.writer
            .send(vmbus::stream::kind::CONTROL, &msg.encode())
    }

    /// Offers `service` on this session with a fresh relid and instance.
    fn offer(&mut self, ids: &mut Ids, service: ServiceKind) -> Result<u32, BusError> {
        let relid = ids
            .relid(|r| self.channels.iter().any(|c| c.relid == r))
            .ok_or(BusError::NoRelid)?;
        let instance = ids.instance_guid();
        let msg = ChannelMessage::Offer {
            if_type: service.class_guid(),
            if_instance: instance,
            child_relid: relid,
            // The signalling connection id; nothing on our bus signals, so any value works.
            // Using the relid keeps it unique per channel, as on Hyper-V.
            connection_id: relid,
        };
        self.channels.push(ChannelRecord {
            service,
            relid,
            instance,
            state: ChannelState::Offered,
            rescinded: false,
        });
        log::info!("offered {service} to the guest: relid {relid}, instance {instance}");
        // A failed write shuts the control stream down; the session ends through its reader.
        let _ = self.send(&msg);
        Ok(relid)
    }
}

impl Bus {
    /// A bus offering `offered`, with the services that serve channels.
    pub fn new(
        offered: &[ServiceKind],
        services: Vec<(ServiceKind, Arc<dyn ChannelService>)>,
    ) -> Arc<Bus> {
        Arc::new(Bus {
            state: Mutex::new(BusState {
                offered: offered.iter().copied().collect(),
                session: None,
                ids: Ids::new(),
            }),
            services,
        })
    }

    fn lock(&self) -> MutexGuard<'_, BusState> {
        // A panic elsewhere must not take the whole host down with a poisoned lock.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn service(&self, kind: ServiceKind) -> Option<Arc<dyn ChannelService>> {
        self.services
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, s)| Arc::clone(s))
    }

    /// Whether `service` is offered (not rescinded).
    pub fn is_offered(&self, service: ServiceKind) -> bool {
        self.lock().offered.contains(&service)
    }

    /// Offers `service` again (after a rescind). Returns a sentence saying what happened.
    pub fn offer(&self, service: ServiceKind) -> Result<String, BusError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        if state.offered.contains(&service) {
            return Err(BusError::AlreadyOffered(service));
        }
        let message = match state.session.as_mut() {
            Some(session) if session.offers_requested => {
                let relid = session.offer(&mut state.ids, service)?;
                format!("offered {service} to the connected guest (relid {relid})")
            }
            _ => format!("{service} will be offered when a guest asks for offers"),
        };
        state.offered.insert(service);
        Ok(message)
    }

    /// Rescinds `service`: sends RESCIND_CHANNELOFFER for its channels, stops offering it.
    pub fn rescind(&self, service: ServiceKind) -> Result<String, BusError> {
        let mut state = self.lock();
        if !state.offered.remove(&service) {
            return Err(BusError::NotOffered(service));
        }
        let Some(session) = state.session.as_mut() else {
            return Ok(format!(
                "rescinded {service} (no guest connected; it will not be offered)"
            ));
        };
        let mut relids = Vec::new();
        for record in session.channels.iter_mut() {
            if record.service == service && !record.rescinded {
                record.rescinded = true;
                relids.push(record.relid);
            }
        }
        for &relid in &relids {
            log::info!("rescinding {service} (relid {relid})");
            let _ = session.send(&ChannelMessage::Rescind { child_relid: relid });
        }
        Ok(match relids.as_slice() {
            [] => format!("rescinded {service} (it had not been offered to the guest yet)"),
            _ => format!(
                "rescinded {service}: sent RESCIND_CHANNELOFFER for relid {}",
                relids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }

    /// A snapshot for `fakehost status`.
    pub fn status(&self) -> BusStatus {
        let state = self.lock();
        let session = state.session.as_ref();
        BusStatus {
            guest_connected: session.is_some(),
            vmbus_version: session.and_then(|s| s.version).map(version_string),
            offered: state.offered.iter().copied().collect(),
            channels: session
                .map(|s| {
                    s.channels
                        .iter()
                        .map(|c| ChannelStatus {
                            service: c.service,
                            relid: c.relid,
                            instance: c.instance.to_string(),
                            state: c.state.name().to_owned(),
                            rescinded: c.rescinded,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// "major.minor" of a VMBus version (`major << 16 | minor`).
pub fn version_string(version: u32) -> String {
    format!("{}.{}", version >> 16, version & 0xffff)
}
