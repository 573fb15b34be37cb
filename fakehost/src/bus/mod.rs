//! The host side of the bus: VMBus channel management over byte streams
//! (`docs/bus-protocol.md`).
//!
//! A guest opens one control stream (version, offers, open/close, rescind) and one stream per
//! open channel. [`Bus`] holds what the host offers and the state of the one guest session;
//! [`listener`] accepts streams and routes them by their HELLO; [`session`] answers the control
//! stream; [`channel`] hands each channel stream to the [`HostService`] that serves it.
//!
//! The bus names no service: it gets the table's rows ([`Registered`]: an offer and its
//! service) and refers to them by their index in that table.
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

use crate::service::{HostService, InstanceGuid, Offer, UnknownService};
use frames::FrameWriter;
use ids::Ids;

/// One row of the service table as the bus sees it: what to offer, and who serves it.
#[derive(Clone)]
pub struct Registered {
    /// The offer.
    pub offer: Offer,
    /// The service behind its channels.
    pub service: Arc<dyn HostService>,
}

/// A service's handle on one attached channel stream.
#[derive(Debug, Clone)]
pub struct ChannelLink {
    /// Unique per attachment; replies and detach notices carry it.
    pub id: u64,
    /// The channel's child_relid.
    pub relid: u32,
    /// Who is on the guest's end of the stream (SO_PEERCRED when it was attached): cusedev
    /// itself on a bare machine, the vhost-user-vsock backend for a guest in a VM. `None` if
    /// the socket could not tell. VSS uses it to refuse freezing the machine it runs on.
    pub peer: Option<PeerCred>,
    writer: Arc<FrameWriter>,
}

/// The credentials of the process on the other end of a Unix stream (SO_PEERCRED), as the
/// kernel recorded them at connect time. `pid` is 0 when that process is in a PID namespace
/// ours cannot see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Its process id, in our PID namespace.
    pub pid: i32,
    /// Its user id.
    pub uid: u32,
    /// Its group id.
    pub gid: u32,
}

impl PeerCred {
    /// The peer of `stream`, if the socket tells.
    pub fn of(stream: &UnixStream) -> Option<PeerCred> {
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        getsockopt(stream, PeerCredentials)
            .ok()
            .map(|cred| PeerCred {
                pid: cred.pid(),
                uid: cred.uid(),
                gid: cred.gid(),
            })
    }
}

impl ChannelLink {
    /// A link over `stream` (the bus makes these; tests may too).
    pub fn new(id: u64, relid: u32, stream: Arc<UnixStream>) -> ChannelLink {
        ChannelLink {
            id,
            relid,
            peer: PeerCred::of(&stream),
            writer: Arc::new(FrameWriter::new(stream)),
        }
    }

    /// Sends one encoded VMBus packet (descriptor + payload + padding) as a PACKET frame.
    pub fn send_packet(&self, packet: &[u8]) -> io::Result<()> {
        self.writer.send(vmbus::stream::kind::PACKET, packet)
    }

    /// Sends one guest memory message body ([`vmbus::guest_memory`]): a READ or WRITE of the
    /// pages a guest packet named.
    pub fn send_memory(&self, body: &[u8]) -> io::Result<()> {
        self.writer.send(vmbus::stream::kind::MEMORY, body)
    }

    /// Sends one guest memory message given as its header and its bytes, without joining
    /// them first (a 64 KiB WRITE chunk goes out straight from the host's buffer).
    pub fn send_memory_parts(&self, header: &[u8], bytes: &[u8]) -> io::Result<()> {
        self.writer
            .send_parts(vmbus::stream::kind::MEMORY, &[header, bytes])
    }
}

/// Why an offer or rescind request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// A name that is not in the service table.
    #[error("{0}")]
    Unknown(UnknownService),
    /// `offer` of a service that is offered already.
    #[error("{0} is already offered")]
    AlreadyOffered(&'static str),
    /// `rescind` of a service that is not offered.
    #[error("{0} is not offered (nothing to rescind)")]
    NotOffered(&'static str),
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
    /// Services the host offers (and re-offers to every new guest), by name.
    pub offered: Vec<String>,
    /// Channels offered to the connected guest.
    pub channels: Vec<ChannelStatus>,
}

/// One offered channel, for `fakehost status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelStatus {
    /// The service's name.
    pub service: String,
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
    /// The service table, in offer order; a service is its index here.
    services: Vec<Registered>,
}

struct BusState {
    /// What the host offers now (indices into `services`); every new guest gets these.
    offered: BTreeSet<usize>,
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
    /// Index of the service in the table.
    service: usize,
    /// Its name, for logs.
    name: &'static str,
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

    /// Offers service `service` (described by `offer`) on this session with a fresh relid.
    fn offer(&mut self, ids: &mut Ids, service: usize, offer: &Offer) -> Result<u32, BusError> {
        let relid = ids
            .relid(|r| self.channels.iter().any(|c| c.relid == r))
            .ok_or(BusError::NoRelid)?;
        let instance = match offer.instance {
            InstanceGuid::PerOffer => ids.instance_guid(),
            InstanceGuid::Fixed(guid) => guid,
        };
        let name = offer.name;
        let msg = ChannelMessage::Offer {
            if_type: offer.class,
            if_instance: instance,
            child_relid: relid,
            // The signalling connection id; nothing on our bus signals, so any value works.
            // Using the relid keeps it unique per channel, as on Hyper-V.
            connection_id: relid,
        };
        self.channels.push(ChannelRecord {
            service,
            name,
            relid,
            instance,
            state: ChannelState::Offered,
            rescinded: false,
        });
        log::info!("offered {name} to the guest: relid {relid}, instance {instance}");
        // A failed write shuts the control stream down; the session ends through its reader.
        let _ = self.send(&msg);
        Ok(relid)
    }
}

impl Bus {
    /// A bus over the service table `services`, offering the rows at indices `offered`.
    pub fn new(offered: &[usize], services: Vec<Registered>) -> Arc<Bus> {
        Arc::new(Bus {
            state: Mutex::new(BusState {
                offered: offered
                    .iter()
                    .copied()
                    .filter(|&i| i < services.len())
                    .collect(),
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

    /// The services, in table order.
    pub fn services(&self) -> &[Registered] {
        &self.services
    }

    /// The index of the service called `name`, or an error listing the known names.
    pub fn find(&self, name: &str) -> Result<usize, UnknownService> {
        self.services
            .iter()
            .position(|r| r.offer.name == name)
            .ok_or_else(|| UnknownService {
                name: name.to_owned(),
                known: self.services.iter().map(|r| r.offer.name).collect(),
            })
    }

    fn service(&self, id: usize) -> Option<&Registered> {
        self.services.get(id)
    }

    fn name(&self, id: usize) -> &'static str {
        self.service(id).map_or("?", |r| r.offer.name)
    }

    /// Whether the service at `id` is offered (not rescinded).
    pub fn is_offered(&self, id: usize) -> bool {
        self.lock().offered.contains(&id)
    }

    /// Offers service `name` again (after a rescind). Returns a sentence saying what happened.
    pub fn offer(&self, name: &str) -> Result<String, BusError> {
        let id = self.find(name).map_err(BusError::Unknown)?;
        let Some(row) = self.service(id) else {
            return Err(BusError::Unknown(UnknownService {
                name: name.to_owned(),
                known: Vec::new(),
            }));
        };
        let service = row.offer.name;
        let mut guard = self.lock();
        let state = &mut *guard;
        if state.offered.contains(&id) {
            return Err(BusError::AlreadyOffered(service));
        }
        let message = match state.session.as_mut() {
            Some(session) if session.offers_requested => {
                let relid = session.offer(&mut state.ids, id, &row.offer)?;
                format!("offered {service} to the connected guest (relid {relid})")
            }
            _ => format!("{service} will be offered when a guest asks for offers"),
        };
        state.offered.insert(id);
        Ok(message)
    }

    /// Rescinds service `name`: sends RESCIND_CHANNELOFFER for its channels, stops offering it.
    pub fn rescind(&self, name: &str) -> Result<String, BusError> {
        let id = self.find(name).map_err(BusError::Unknown)?;
        let service = self.name(id);
        let mut state = self.lock();
        if !state.offered.remove(&id) {
            return Err(BusError::NotOffered(service));
        }
        let Some(session) = state.session.as_mut() else {
            return Ok(format!(
                "rescinded {service} (no guest connected; it will not be offered)"
            ));
        };
        let mut relids = Vec::new();
        for record in session.channels.iter_mut() {
            if record.service == id && !record.rescinded {
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
            offered: state
                .offered
                .iter()
                .map(|&id| self.name(id).to_owned())
                .collect(),
            channels: session
                .map(|s| {
                    s.channels
                        .iter()
                        .map(|c| ChannelStatus {
                            service: c.name.to_owned(),
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
