//! The bus client against a host scripted frame by frame on a real Unix socket, with a table
//! of test rows: which offers get opened, probed and shown, and which are left alone.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Condvar;

use vmbus::ic::IcVersion;
use vmbus::negotiate::build_request_packet;

use super::*;
use crate::bus::channel::HostChannel;
use crate::devices::{fcopy, hv_util};
use crate::table::{ChannelDevice, ProbeError, Profile, ProfileSet, NO_SERVE_ARGS};

/// How long any step may take before the test fails instead of hanging.
const STEP: Duration = Duration::from_secs(20);

fn refuse(
    _: Arc<dyn HostChannel>,
    _: &Profile,
    _: &clap::ArgMatches,
) -> Result<Arc<dyn ChannelDevice>, ProbeError> {
    Err(ProbeError::Driver(
        "the test driver refuses every channel".into(),
    ))
}

/// A probe whose model names another node than its row: a table/model mismatch.
fn misnamed(
    channel: Arc<dyn HostChannel>,
    profile: &Profile,
    options: &clap::ArgMatches,
) -> Result<Arc<dyn ChannelDevice>, ProbeError> {
    fcopy::probe(channel, profile, options)
}

const ONE_PROFILE: ProfileSet = ProfileSet {
    profiles: &[Profile {
        name: "only",
        about: "the one version",
    }],
    default: "only",
    set_by_kernel_flag: false,
};

static TABLE: &[DriverRow] = &[
    DriverRow {
        name: "fcopy",
        node: fcopy::DEVICE_NAME,
        about: "the real fcopy row's model",
        class: BusClass::Vmbus(Guid::FCOPY),
        ring_bytes: hv_util::UTIL_RING_BYTES,
        profiles: hv_util::KERNEL_PROFILES,
        serve_args: NO_SERVE_ARGS,
        probe: fcopy::probe,
    },
    DriverRow {
        name: "refusing",
        node: "vmbus/refusing",
        about: "a driver whose probe fails",
        class: BusClass::Vmbus(Guid::KVP),
        ring_bytes: 4096,
        profiles: ONE_PROFILE,
        serve_args: NO_SERVE_ARGS,
        probe: refuse,
    },
    DriverRow {
        name: "misnamed",
        node: "vmbus/misnamed",
        about: "a driver whose model names another node",
        class: BusClass::Vmbus(Guid::VSS),
        ring_bytes: 4096,
        profiles: hv_util::KERNEL_PROFILES,
        serve_args: NO_SERVE_ARGS,
        probe: misnamed,
    },
];

/// The frontend's side, recorded: `add NAME` / `remove NAME`.
#[derive(Default)]
struct Nodes {
    refuse_adds: bool,
    events: Mutex<Vec<String>>,
    changed: Condvar,
}

impl Nodes {
    fn push(&self, event: String) {
        self.events.lock().unwrap().push(event);
        self.changed.notify_all();
    }

    fn wait_for(&self, event: &str) {
        let deadline = std::time::Instant::now() + STEP;
        let mut events = self.events.lock().unwrap();
        while !events.iter().any(|e| e == event) {
            let now = std::time::Instant::now();
            assert!(now < deadline, "no {event:?}; saw {events:?}");
            events = self.changed.wait_timeout(events, deadline - now).unwrap().0;
        }
    }

    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }
}

impl DeviceRegistry for Nodes {
    fn add_device(&self, device: Arc<dyn Device>) -> Result<(), String> {
        if self.refuse_adds {
            self.push(format!("refused {}", device.name()));
            return Err("the test frontend refuses every node".into());
        }
        self.push(format!("add {}", device.name()));
        Ok(())
    }

    fn remove_device(&self, name: &str) {
        self.push(format!("remove {name}"));
    }
}

fn read_control(stream: &mut UnixStream) -> ChannelMessage {
    match read_frame(stream) {
        Ok(Some((kind::CONTROL, body))) => ChannelMessage::parse(&body).expect("valid message"),
        other => panic!("expected a control frame from the guest, got {other:?}"),
    }
}

fn send_control(stream: &mut UnixStream, message: &ChannelMessage) {
    write_frame(stream, kind::CONTROL, &message.encode()).expect("send to the guest");
}

fn accept(listener: &UnixListener, role: Role) -> (UnixStream, Hello) {
    let (mut stream, _) = listener.accept().expect("the guest connects");
    stream.set_read_timeout(Some(STEP)).unwrap();
    let hello = match read_frame(&mut stream) {
        Ok(Some((kind::HELLO, body))) => Hello::parse(&body).expect("valid HELLO"),
        other => panic!("expected HELLO, got {other:?}"),
    };
    assert_eq!(hello.role, role);
    (stream, hello)
}

/// The host end: a negotiated control stream, channel streams by relid, and every control
/// message the guest sent.
struct Host {
    listener: UnixListener,
    control: UnixStream,
    channels: HashMap<u32, UnixStream>,
    seen: Vec<ChannelMessage>,
}

impl Host {
    fn negotiate(listener: UnixListener) -> Host {
        let (mut control, _) = accept(&listener, Role::Control);
        assert!(matches!(
            read_control(&mut control),
            ChannelMessage::InitiateContact { .. }
        ));
        send_control(
            &mut control,
            &ChannelMessage::VersionResponse {
                supported: true,
                conn_id: 4,
            },
        );
        assert!(matches!(
            read_control(&mut control),
            ChannelMessage::RequestOffers
        ));
        Host {
            listener,
            control,
            channels: HashMap::new(),
            seen: Vec::new(),
        }
    }

    fn offer(&mut self, class: Guid, child_relid: u32) {
        send_control(
            &mut self.control,
            &ChannelMessage::Offer {
                if_type: class,
                if_instance: Guid::from_fields(child_relid, 0, 0, [0; 8]),
                child_relid,
                connection_id: child_relid,
            },
        );
    }

    /// The guest's next control message. An OPENCHANNEL is granted on the way, and its
    /// channel stream accepted before anything else is read, so streams never cross.
    fn next(&mut self) -> ChannelMessage {
        let message = read_control(&mut self.control);
        if let ChannelMessage::OpenChannel {
            child_relid,
            open_id,
        } = message
        {
            send_control(
                &mut self.control,
                &ChannelMessage::OpenResult {
                    child_relid,
                    open_id,
                    status: 0,
                },
            );
            let (stream, hello) = accept(&self.listener, Role::Channel);
            assert_eq!((hello.child_relid, hello.open_id), (child_relid, open_id));
            self.channels.insert(child_relid, stream);
        }
        self.seen.push(message);
        message
    }

    /// Reads until the guest has sent `wanted`.
    fn expect(&mut self, wanted: &ChannelMessage) {
        while &self.next() != wanted {}
    }
}

/// Sends the host's fcopy NEGOTIATE (fw 3.0, fcopy 1.1) as transaction 42 on `channel`
/// and returns the reply packet's transaction id and payload.
fn negotiate(channel: &mut UnixStream) -> (u64, Vec<u8>) {
    let packet = build_request_packet(42, &[IcVersion::new(3, 0)], &[IcVersion::new(1, 1)]);
    write_frame(channel, kind::PACKET, &packet).unwrap();
    match read_frame(channel) {
        Ok(Some((kind::PACKET, body))) => {
            let packet = vmbus::packet::parse_packet(&body).expect("a valid packet");
            (packet.trans_id, packet.payload.to_vec())
        }
        other => panic!("expected the driver's reply, got {other:?}"),
    }
}

fn socket_path(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cusedev-unit-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("bus.sock")
}

/// Starts one client session against `path` on a thread of its own.
fn start_client(
    path: &std::path::Path,
    nodes: Arc<Nodes>,
) -> thread::JoinHandle<Result<(), BusError>> {
    let drivers = Drivers::with_defaults(TABLE).unwrap();
    let client = BusClient::new(BusAddress::Unix(path.to_owned()), drivers, nodes);
    thread::spawn(move || {
        let stream = client.connect()?;
        client.run_session(stream)
    })
}

#[test]
fn offers_bind_by_their_row_and_unknown_or_refused_ones_are_left_alone() {
    let path = socket_path("table");
    let listener = UnixListener::bind(&path).unwrap();
    let nodes = Arc::new(Nodes::default());
    let client = start_client(&path, nodes.clone());
    let mut host = Host::negotiate(listener);

    host.offer(Guid::HEARTBEAT, 1); // no row
    host.offer(Guid::KVP, 2); // probe fails
    host.offer(Guid::VSS, 3); // model names another node
    host.offer(Guid::FCOPY, 4); // binds
    send_control(&mut host.control, &ChannelMessage::AllOffersDelivered);

    // The two rows that cannot bind open their channel, then close it again: the host has
    // the offer back as offered (the relid is not released: only a rescind does that). The
    // fcopy row's channel is opened (and granted by `next`) in between, in any order.
    let mut closed = Vec::new();
    let mut fcopy_opened = false;
    while closed.len() < 2 || !fcopy_opened {
        match host.next() {
            ChannelMessage::CloseChannel { child_relid } => closed.push(child_relid),
            ChannelMessage::OpenChannel { child_relid: 4, .. } => fcopy_opened = true,
            _ => {}
        }
    }
    closed.sort();
    assert_eq!(closed, [2, 3]);
    nodes.wait_for("add vmbus/hv_fcopy");

    // The bound one works (its 6.1 model answers a NEGOTIATE) and a rescind takes it away.
    let channel = host.channels.get_mut(&4).expect("relid 4 was opened");
    let (trans_id, reply) = negotiate(channel);
    assert_eq!(trans_id, 42);
    assert_eq!(
        vmbus::negotiate::parse_response(&reply).expect("a NEGOTIATE response"),
        Some((IcVersion::new(3, 0), IcVersion::new(1, 1)))
    );
    send_control(
        &mut host.control,
        &ChannelMessage::Rescind { child_relid: 4 },
    );
    host.expect(&ChannelMessage::CloseChannel { child_relid: 4 });
    host.expect(&ChannelMessage::RelidReleased { child_relid: 4 });
    nodes.wait_for("remove vmbus/hv_fcopy");

    drop(host.control);
    client.join().unwrap().expect("the session ends cleanly");
    assert!(
        !host
            .seen
            .iter()
            .any(|m| matches!(m, ChannelMessage::OpenChannel { child_relid: 1, .. })),
        "the offer with no row was opened: {:?}",
        host.seen
    );
    assert!(
        !host
            .seen
            .iter()
            .any(|m| matches!(m, ChannelMessage::RelidReleased { child_relid: 2 | 3 })),
        "a refused offer was released: {:?}",
        host.seen
    );
    assert_eq!(
        nodes.events(),
        ["add vmbus/hv_fcopy", "remove vmbus/hv_fcopy"],
        "only the bound row's node came and went"
    );
}

#[test]
fn node_the_frontend_refuses_closes_the_channel_again() {
    let path = socket_path("refused-node");
    let listener = UnixListener::bind(&path).unwrap();
    let nodes = Arc::new(Nodes {
        refuse_adds: true,
        ..Nodes::default()
    });
    let client = start_client(&path, nodes.clone());
    let mut host = Host::negotiate(listener);

    host.offer(Guid::FCOPY, 9);
    host.expect(&ChannelMessage::CloseChannel { child_relid: 9 });
    assert_eq!(nodes.events(), ["refused vmbus/hv_fcopy"]);
    // The guest stopped reading the channel: its stream ends.
    let mut channel = host.channels.remove(&9).expect("the channel was opened");
    assert!(matches!(read_frame(&mut channel), Ok(None) | Err(_)));

    drop(host.control);
    client.join().unwrap().expect("the session ends cleanly");
    assert_eq!(
        nodes.events(),
        ["refused vmbus/hv_fcopy"],
        "no removal of a node never added"
    );
}
