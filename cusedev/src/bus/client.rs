//! The guest end of the bus: what `vmbus_drv` and `hv_utils` do when a host offers channels.
//!
//! The client keeps one control stream to the host. It negotiates a VMBus version, asks for
//! the offers, and looks every offered class up in the driver table ([`Drivers`]). For an
//! offer with a row it opens the channel (a stream of its own) with the row's ring size, runs
//! the row's probe to build the model, and shows its device node through the frontend; an
//! offer with no row, or whose probe fails, is left alone (logged, the channel closed again).
//! A rescind undoes a binding in the kernel's order: the driver's deinit (which for the 6.1
//! hvutil transport waits until the daemon closes its fd), then the node goes, then the
//! channel is closed and the relid released.
//!
//! If the host goes away, every channel is treated as rescinded and the client reconnects:
//! the node disappears while there is no host, as it would in a guest whose VMBus went away.
//!
//! Read next: [`super::channel`] (what a driver sees of its channel), then the models behind
//! the rows ([`crate::devices`]); the frontends are behind [`DeviceRegistry`].

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use log::{debug, error, info, warn};
use vmbus::address::BusAddress;

use super::socket::{BusStream, PolledReader};
use vmbus::channel_msg::ChannelMessage;
use vmbus::guid::Guid;
use vmbus::stream::{kind, Hello, Role};

use super::channel::{ChannelDriver, HostChannel, InboundPacket, InboundRing};
use super::first_offers::FirstOffers;
use super::frame_io::{read_frame, write_frame, FrameError};
use crate::device::Device;
use crate::table::{BusClass, DriverRow, Drivers, ProbeError, Profile};

/// VMBus versions the guest asks for, newest first (drivers/hv/connection.c tries each until
/// the host accepts one).
const VMBUS_VERSIONS: [u32; 6] = [
    5 << 16 | 3,
    5 << 16 | 2,
    5 << 16 | 1,
    5 << 16,
    4 << 16 | 1,
    4 << 16,
];

/// Where device nodes come and go: implemented by each frontend.
pub trait DeviceRegistry: Send + Sync {
    /// Makes the device's node appear (misc_register).
    fn add_device(&self, device: Arc<dyn Device>) -> Result<(), String>;
    /// Makes the node disappear (misc_deregister); open files keep working.
    fn remove_device(&self, name: &str);
}

/// Why the client could not talk to the host.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to the host at {addr}: {source}")]
    Connect { addr: BusAddress, source: io::Error },
    #[error("the host at {addr} refused every VMBus version we offered")]
    NoVersion { addr: BusAddress },
    #[error("control stream: {0}")]
    Frame(#[from] FrameError),
    #[error("host sent {0} where the protocol does not allow it")]
    Protocol(String),
}

/// Why an offer with a row in the table was not bound. The offer is left alone.
#[derive(Debug, thiserror::Error)]
enum BindError {
    #[error("sending OPENCHANNEL: {0}")]
    SendOpen(io::Error),
    #[error("the host did not answer OPENCHANNEL within {0:?}")]
    OpenTimeout(Duration),
    #[error("the host refused to open the channel (status {0:#x})")]
    OpenRefused(u32),
    #[error("{what}: {source}")]
    Stream {
        what: &'static str,
        source: io::Error,
    },
    #[error("the driver's probe failed: {0}")]
    Probe(#[from] ProbeError),
    #[error(
        "the model calls its node {model:?} but its row says {row:?} (the driver table and the \
         model disagree)"
    )]
    WrongNode { model: String, row: &'static str },
    #[error("the frontend cannot add the node: {0}")]
    Register(String),
}

/// How long the host has to answer OPENCHANNEL.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// The guest side of the bus.
pub struct BusClient {
    addr: BusAddress,
    drivers: Arc<Drivers>,
    registry: Arc<dyn DeviceRegistry>,
    first_offers: Arc<FirstOffers>,
}

/// A bound channel: its row, its driver, its node name, its stream.
struct BoundChannel {
    row: &'static DriverRow,
    driver: Arc<dyn ChannelDriver>,
    device_name: String,
    ring: Arc<InboundRing>,
    stream: BusStream,
}

/// A channel the host has opened for us, not yet bound to a driver.
struct OpenedChannel {
    link: Arc<StreamChannel>,
    stream: BusStream,
}

/// State shared by the control loop and the threads that open and tear down channels.
struct Session {
    addr: BusAddress,
    drivers: Arc<Drivers>,
    registry: Arc<dyn DeviceRegistry>,
    first_offers: Arc<FirstOffers>,
    control: Mutex<BusStream>,
    pending_opens: Mutex<HashMap<u32, mpsc::Sender<u32>>>,
    channels: Mutex<HashMap<u32, BoundChannel>>,
    next_open_id: AtomicU32,
}

impl BusClient {
    /// A client that binds the offers `drivers` has rows for and shows their nodes through
    /// `registry`.
    pub fn new(addr: BusAddress, drivers: Drivers, registry: Arc<dyn DeviceRegistry>) -> BusClient {
        BusClient {
            addr,
            drivers: Arc::new(drivers),
            registry,
            first_offers: Arc::default(),
        }
    }

    /// Says when the host's first offers are bound (`cusedev run` waits for it).
    pub fn first_offers(&self) -> Arc<FirstOffers> {
        self.first_offers.clone()
    }

    /// Serves the bus for as long as the process lives: connects (waiting for the host if it
    /// is not up yet), runs the session, and after the host goes away starts again.
    pub fn run(&self) -> Result<(), BusError> {
        let mut delay = Duration::from_millis(100);
        let mut announced_wait = false;
        loop {
            let stream = match self.connect() {
                Ok(stream) => stream,
                Err(BusError::Connect { source, .. })
                    if matches!(
                        source.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    if !announced_wait {
                        info!(
                            "waiting for the host at {} ({source}); is `fakehost serve` running?",
                            self.addr
                        );
                        announced_wait = true;
                    }
                    thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(2));
                    continue;
                }
                Err(e) => return Err(e),
            };
            delay = Duration::from_millis(100);
            announced_wait = false;
            match self.run_session(stream) {
                Ok(()) => warn!("the host at {} closed the bus", self.addr),
                Err(BusError::NoVersion { addr }) => return Err(BusError::NoVersion { addr }),
                Err(e) => warn!("bus session with {} ended: {e}", self.addr),
            }
            info!("reconnecting to {}", self.addr);
        }
    }

    /// One session on a connected control stream, until the host goes away; every channel
    /// of it is gone (as if rescinded) when this returns.
    fn run_session(&self, stream: BusStream) -> Result<(), BusError> {
        let session = Arc::new(Session {
            addr: self.addr.clone(),
            drivers: self.drivers.clone(),
            registry: self.registry.clone(),
            first_offers: self.first_offers.clone(),
            control: Mutex::new(stream.try_clone().map_err(|source| BusError::Connect {
                addr: self.addr.clone(),
                source,
            })?),
            pending_opens: Mutex::new(HashMap::new()),
            channels: Mutex::new(HashMap::new()),
            next_open_id: AtomicU32::new(1),
        });
        let result = session.run(stream);
        session.rescind_all();
        result
    }

    fn connect(&self) -> Result<BusStream, BusError> {
        let mut stream = BusStream::connect(&self.addr).map_err(|source| BusError::Connect {
            addr: self.addr.clone(),
            source,
        })?;
        let hello = Hello {
            role: Role::Control,
            child_relid: 0,
            open_id: 0,
        };
        write_frame(&mut stream, kind::HELLO, &hello.encode()).map_err(|source| {
            BusError::Connect {
                addr: self.addr.clone(),
                source,
            }
        })?;
        Ok(stream)
    }
}

impl Session {
    fn send_control(&self, message: &ChannelMessage) -> io::Result<()> {
        let mut control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        write_frame(&mut *control, kind::CONTROL, &message.encode())
    }

    fn run(self: &Arc<Self>, mut stream: BusStream) -> Result<(), BusError> {
        self.negotiate_version(&mut stream)?;
        self.send_control(&ChannelMessage::RequestOffers)
            .map_err(FrameError::from)?;
        loop {
            let message = match read_control(&mut stream)? {
                Some(message) => message,
                None => return Ok(()),
            };
            match message {
                ChannelMessage::Offer {
                    if_type,
                    if_instance,
                    child_relid,
                    ..
                } => self.on_offer(if_type, if_instance, child_relid),
                ChannelMessage::AllOffersDelivered => {
                    debug!("host: all offers delivered");
                    self.first_offers.all_delivered();
                }
                ChannelMessage::OpenResult {
                    child_relid,
                    status,
                    ..
                } => {
                    let waiter = self
                        .pending_opens
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&child_relid);
                    match waiter {
                        Some(waiter) => {
                            let _ = waiter.send(status);
                        }
                        None => warn!("host answered an open of relid {child_relid} nobody asked for; ignored"),
                    }
                }
                ChannelMessage::Rescind { child_relid } => self.on_rescind(child_relid),
                other => warn!("host sent {other:?} on the control stream; ignored"),
            }
        }
    }

    fn negotiate_version(&self, stream: &mut BusStream) -> Result<(), BusError> {
        for version in VMBUS_VERSIONS {
            self.send_control(&ChannelMessage::InitiateContact { version })
                .map_err(FrameError::from)?;
            match read_control(stream)? {
                Some(ChannelMessage::VersionResponse {
                    supported: true, ..
                }) => {
                    info!(
                        "connected to the host at {}: VMBus {}.{}",
                        self.addr,
                        version >> 16,
                        version & 0xffff
                    );
                    return Ok(());
                }
                Some(ChannelMessage::VersionResponse {
                    supported: false, ..
                }) => continue,
                Some(other) => {
                    return Err(BusError::Protocol(format!(
                        "{other:?} before VERSION_RESPONSE"
                    )))
                }
                None => {
                    return Err(BusError::Protocol(
                        "end of stream before VERSION_RESPONSE".into(),
                    ))
                }
            }
        }
        Err(BusError::NoVersion {
            addr: self.addr.clone(),
        })
    }

    fn on_offer(self: &Arc<Self>, if_type: Guid, if_instance: Guid, child_relid: u32) {
        let class = BusClass::of_offer(if_type);
        let Some((row, profile)) = self.drivers.for_class(class) else {
            info!(
                "host offers {} ({class}), relid {child_relid}: no driver for it here, left alone",
                if_type.service_name().unwrap_or("an unknown service")
            );
            return;
        };
        info!(
            "host offers {} ({class}, instance {if_instance}), relid {child_relid}",
            row.name
        );
        // Opening waits for OPENCHANNEL_RESULT, which this thread's caller (the control loop)
        // delivers: do it on a thread of its own.
        let session = self.clone();
        self.first_offers.bind_started();
        let spawned = thread::Builder::new()
            .name(format!("bind-{child_relid}"))
            .spawn(move || {
                if let Err(e) = session.bind(row, profile, child_relid) {
                    error!(
                        "cannot bind {} on relid {child_relid}: {e}; the offer is left alone",
                        row.name
                    );
                }
                session.first_offers.bind_ended();
            });
        if let Err(e) = spawned {
            self.first_offers.bind_ended();
            // Nothing is open yet, so nothing to undo: the offer stays unbound, as a channel
            // whose probe failed stays in the kernel; a rescind and a new offer try again.
            error!(
                "cannot bind {} on relid {child_relid}: out of resources: cannot start a thread \
                 to open the channel: {e}; the offer is left alone",
                row.name
            );
        }
    }

    /// RESCIND_CHANNELOFFER from the control loop. The teardown may wait for the daemon to
    /// close its file (the 6.1 drivers' destroy), so it runs on a thread of its own; with no
    /// thread to be had it runs here, and the control loop waits with it rather than leave a
    /// rescinded device in place.
    fn on_rescind(self: &Arc<Self>, child_relid: u32) {
        let session = self.clone();
        let spawned = thread::Builder::new()
            .name(format!("rescind-{child_relid}"))
            .spawn(move || session.rescind(child_relid));
        if let Err(e) = spawned {
            warn!(
                "relid {child_relid}: cannot start a thread for the rescind ({e}); tearing down \
                 on the control loop, which waits until the device's files are closed"
            );
            self.rescind(child_relid);
        }
    }

    /// The kernel's `vmbus_probe()` → driver probe → `misc_register()`, for one offer: open
    /// the channel with the row's ring, build the model, show its node, start its callbacks.
    /// On failure nothing of the binding is left, and the host has its channel back closed.
    fn bind(
        self: &Arc<Self>,
        row: &'static DriverRow,
        profile: &'static Profile,
        child_relid: u32,
    ) -> Result<(), BindError> {
        let opened = self.open_channel(child_relid, row.ring_bytes)?;
        let device = match (row.probe)(opened.link.clone(), profile, self.drivers.options()) {
            Ok(device) if device.name() == row.node => device,
            Ok(device) => {
                let model = device.name().to_string();
                drop(device);
                self.close_unbound(child_relid, &opened.link.ring, &opened.stream);
                return Err(BindError::WrongNode {
                    model,
                    row: row.node,
                });
            }
            Err(e) => {
                self.close_unbound(child_relid, &opened.link.ring, &opened.stream);
                return Err(e.into());
            }
        };
        let ring = opened.link.ring.clone();
        let stream = opened.stream;
        let reader = match stream.try_clone() {
            Ok(reader) => reader,
            Err(source) => {
                self.close_unbound(child_relid, &ring, &stream);
                return Err(BindError::Stream {
                    what: "cloning the channel stream",
                    source,
                });
            }
        };
        let driver: Arc<dyn ChannelDriver> = device.clone();
        let device_name = row.node.to_string();
        self.channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                child_relid,
                BoundChannel {
                    row,
                    driver: driver.clone(),
                    device_name: device_name.clone(),
                    ring: ring.clone(),
                    stream,
                },
            );
        let device: Arc<dyn Device> = device;
        if let Err(e) = self.registry.add_device(device) {
            // No node, so nobody can reach the driver: unbind as if the probe had failed,
            // unless a rescind already took the channel.
            let bound = self
                .channels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&child_relid);
            if let Some(bound) = bound {
                self.close_unbound(child_relid, &bound.ring, &bound.stream);
            }
            return Err(BindError::Register(e));
        }
        let session = self.clone();
        let pump_ring = ring.clone();
        let spawned = thread::Builder::new()
            .name(format!("chan-{child_relid}"))
            .spawn(move || {
                if let Err(e) = pump_channel(reader, pump_ring, driver, child_relid) {
                    // Framing is lost: nothing more can be read from this channel. Leaving
                    // the node would leave a device nobody answers, so it goes as if
                    // rescinded, and the host learns the relid is released.
                    error!(
                        "relid {child_relid}: channel stream broken ({e}); removing the device \
                         as if rescinded, the host must offer it again"
                    );
                    session.rescind(child_relid);
                }
            });
        if let Err(source) = spawned {
            // A device whose channel is never read cannot work: the same as a broken stream.
            error!("relid {child_relid}: cannot start the channel reader ({source})");
            self.rescind(child_relid);
            return Err(BindError::Stream {
                what: "starting the channel reader",
                source,
            });
        }
        info!(
            "serving /dev/{device_name} ({}, profile {}, relid {child_relid})",
            row.name, profile.name
        );
        Ok(())
    }

    /// OPENCHANNEL, its answer, and the channel's stream: `vmbus_open()`.
    fn open_channel(
        self: &Arc<Self>,
        child_relid: u32,
        ring_bytes: usize,
    ) -> Result<OpenedChannel, BindError> {
        let open_id = self.next_open_id.fetch_add(1, Ordering::Relaxed);
        let (answer_tx, answer_rx) = mpsc::channel();
        self.pending_opens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(child_relid, answer_tx);
        self.send_control(&ChannelMessage::OpenChannel {
            child_relid,
            open_id,
        })
        .map_err(BindError::SendOpen)?;
        let status = answer_rx
            .recv_timeout(OPEN_TIMEOUT)
            .map_err(|_| BindError::OpenTimeout(OPEN_TIMEOUT))?;
        if status != 0 {
            return Err(BindError::OpenRefused(status));
        }

        match self.connect_channel(child_relid, open_id, ring_bytes) {
            Ok(opened) => Ok(opened),
            Err(e) => {
                // The host has the channel open: give it back.
                if let Err(e) = self.send_control(&ChannelMessage::CloseChannel { child_relid }) {
                    debug!("could not tell the host relid {child_relid} is closed: {e}");
                }
                Err(e)
            }
        }
    }

    /// The stream of a channel the host has just opened: HELLO with its open id.
    fn connect_channel(
        &self,
        child_relid: u32,
        open_id: u32,
        ring_bytes: usize,
    ) -> Result<OpenedChannel, BindError> {
        let stream_error = |what| move |source| BindError::Stream { what, source };
        let mut stream = BusStream::connect(&self.addr)
            .map_err(stream_error("connecting the channel stream"))?;
        let hello = Hello {
            role: Role::Channel,
            child_relid,
            open_id,
        };
        write_frame(&mut stream, kind::HELLO, &hello.encode())
            .map_err(stream_error("sending the channel HELLO"))?;
        let writer = stream
            .try_clone()
            .map_err(stream_error("cloning the channel stream"))?;
        let link = Arc::new(StreamChannel {
            ring: Arc::new(InboundRing::new(ring_bytes)),
            writer: Mutex::new(writer),
            child_relid,
        });
        Ok(OpenedChannel { link, stream })
    }

    /// Undoes [`Session::open_channel`] for a channel no driver took: `vmbus_close()`. The
    /// offer stays offered; the relid is not released (only a rescind releases it).
    fn close_unbound(&self, child_relid: u32, ring: &InboundRing, stream: &BusStream) {
        ring.close();
        let _ = stream.shutdown(std::net::Shutdown::Both);
        if let Err(e) = self.send_control(&ChannelMessage::CloseChannel { child_relid }) {
            debug!("could not tell the host relid {child_relid} is closed: {e}");
        }
    }

    /// RESCIND_CHANNELOFFER: the kernel's util_remove, in its order.
    fn rescind(self: &Arc<Self>, child_relid: u32) {
        let bound = self
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&child_relid);
        let Some(bound) = bound else {
            warn!("host rescinded relid {child_relid}, which is not open here; ignored");
            return;
        };
        info!(
            "host rescinded relid {child_relid} ({}, /dev/{})",
            bound.row.name, bound.device_name
        );
        let name = bound.device_name.clone();
        teardown(bound, &*self.registry);
        info!("/dev/{name} removed, relid {child_relid} released");
        for message in [
            ChannelMessage::CloseChannel { child_relid },
            ChannelMessage::RelidReleased { child_relid },
        ] {
            if let Err(e) = self.send_control(&message) {
                debug!("could not tell the host relid {child_relid} is released: {e}");
            }
        }
    }

    /// The host is gone: every channel goes as if rescinded.
    fn rescind_all(&self) {
        let channels: Vec<_> = self
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        for (relid, bound) in channels {
            info!(
                "relid {relid} ({}, /dev/{}) is gone with the host",
                bound.row.name, bound.device_name
            );
            teardown(bound, &*self.registry);
        }
    }
}

/// Deinit (may wait for the daemon to close), node removal, channel close.
fn teardown(bound: BoundChannel, registry: &dyn DeviceRegistry) {
    bound.driver.on_rescind();
    registry.remove_device(&bound.device_name);
    bound.ring.close();
    let _ = bound.stream.shutdown(std::net::Shutdown::Both);
}

fn read_control(stream: &mut BusStream) -> Result<Option<ChannelMessage>, BusError> {
    match read_frame(stream)? {
        None => Ok(None),
        Some((kind::CONTROL, body)) => Ok(Some(
            ChannelMessage::parse(&body).map_err(FrameError::from)?,
        )),
        Some((other, _)) => Err(BusError::Protocol(format!(
            "a frame of kind {other} on the control stream"
        ))),
    }
}

/// Moves packets from a channel stream into the driver's ring and runs its callback, until
/// the stream ends (`Ok`) or breaks (`Err`).
fn pump_channel(
    stream: BusStream,
    ring: Arc<InboundRing>,
    driver: Arc<dyn ChannelDriver>,
    child_relid: u32,
) -> Result<(), FrameError> {
    let mut stream = PolledReader::new(stream);
    loop {
        let body = match read_frame(&mut stream)? {
            Some((kind::PACKET, body)) => body,
            Some((kind::MEMORY, body)) => {
                match vmbus::guest_memory::MemoryMessage::parse(&body) {
                    Ok(message) => driver.on_memory(message),
                    Err(e) => warn!("relid {child_relid}: malformed guest memory message from the host ({e}); dropped"),
                }
                continue;
            }
            Some((other, _)) => {
                warn!("relid {child_relid}: host sent a frame of kind {other} on a channel stream; dropped");
                continue;
            }
            None => {
                debug!("relid {child_relid}: channel stream closed");
                return Ok(());
            }
        };
        let packet = match vmbus::packet::parse_packet(&body) {
            Ok(packet) => InboundPacket {
                trans_id: packet.trans_id,
                payload: packet.payload.to_vec(),
            },
            Err(e) => {
                warn!("relid {child_relid}: malformed packet from the host ({e}); dropped");
                continue;
            }
        };
        if !ring.push(packet) {
            return Ok(());
        }
        driver.on_channel_callback();
    }
}

/// A channel whose ring is fed from a stream and whose sends go back on it.
struct StreamChannel {
    ring: Arc<InboundRing>,
    writer: Mutex<BusStream>,
    child_relid: u32,
}

impl HostChannel for StreamChannel {
    fn recv(&self, buf_limit: usize) -> Result<Option<InboundPacket>, super::channel::RecvError> {
        self.ring.recv(buf_limit)
    }

    fn has_pending(&self) -> bool {
        self.ring.has_pending()
    }

    fn send_inband(&self, trans_id: u64, payload: &[u8]) {
        let packet = vmbus::packet::encode_inband(trans_id, 0, payload);
        if let Err(e) = self.send_packet(&packet) {
            warn!(
                "relid {}: reply {trans_id} not delivered, the host is gone ({e})",
                self.child_relid
            );
        }
    }

    fn send_packet(&self, packet: &[u8]) -> io::Result<()> {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        write_frame(&mut *writer, kind::PACKET, packet)
    }

    fn send_memory(&self, body: &[u8]) -> io::Result<()> {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        write_frame(&mut *writer, kind::MEMORY, body)
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
