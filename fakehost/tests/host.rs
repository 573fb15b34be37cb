//! The whole host over real Unix sockets, against a small scripted guest built from the
//! `vmbus` encoders: connect, HELLO, INITIATE_CONTACT, REQUESTOFFERS, OPENCHANNEL, channel
//! HELLO, answer NEGOTIATE, then answer fcopy requests with chosen statuses.
//!
//! Synchronisation is by protocol order only (a reply proves its request was handled); the
//! socket read timeouts below only turn a bug into a failure instead of a hang.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use common::TempDir;

use fakehost::control::client::{self, Client};
use fakehost::control::proto::{Request, Response};
use fakehost::fcopy::cli::result_line;
use fakehost::fcopy::{CopyReport, FcopyCommand, Step};
use fakehost::serve::{HostConfig, RunningHost};
use vmbus::address::BusAddress;
use vmbus::channel_msg::{ChannelMessage, VERSION_WIN10_V5_3, VERSION_WIN8_1};
use vmbus::fcopy::{self as wire, op, StartFcopy, CREATE_PATH, DATA_FRAGMENT, OVER_WRITE};
use vmbus::guid::Guid;
use vmbus::ic::{self, icflags, msgtype, IcVersion};
use vmbus::negotiate::{prep_negotiate_resp, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS};
use vmbus::packet::{encode_inband, parse_packet};
use vmbus::stream::{encode_frame, kind, FrameHeader, Hello, FRAME_HEADER_LEN};

const SAFETY_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Test fixtures

struct Fixture {
    dir: TempDir,
    host: Option<RunningHost>,
    bus: PathBuf,
    control: PathBuf,
}

impl Fixture {
    fn start(tag: &str, step_timeout: Duration) -> Fixture {
        let _ = env_logger::builder().is_test(true).try_init();
        let dir = TempDir::new(tag);
        let bus = dir.0.join("run/bus.sock");
        let control = dir.0.join("run/fakehost.ctl");
        let host = RunningHost::start(&HostConfig {
            listen: BusAddress::Unix(bus.clone()),
            control: control.clone(),
            offers: vec!["fcopy".into()],
            step_timeout,
            serve_args: fakehost::serve::parse_serve_options(&[
                "--blob-root",
                dir.0.join("blobs").to_str().unwrap(),
            ])
            .unwrap(),
        })
        .unwrap();
        Fixture {
            dir,
            host: Some(host),
            bus,
            control,
        }
    }

    fn source(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.dir.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// A copy that does not wait for a guest (`fakehost copy` without `--wait`).
    fn copy_no_wait(&self, src: &Path) -> Response {
        let file = File::open(src).unwrap();
        let request = FcopyCommand::Copy {
            file_name: "a".into(),
            guest_dir: "/srv/".into(),
            overwrite: false,
            create_path: false,
            wait_secs: 0,
        }
        .into_request();
        let mut client = Client::connect(&self.control).unwrap();
        client.send(&request, Some(file.as_fd())).unwrap();
        drop(file);
        client.final_response().unwrap()
    }

    /// Runs a copy through the control socket in a thread; join it for the final answer.
    fn copy(
        &self,
        src: &Path,
        file_name: &str,
        guest_dir: &str,
        overwrite: bool,
        create_path: bool,
    ) -> thread::JoinHandle<Response> {
        let control = self.control.clone();
        let file = File::open(src).unwrap();
        let request = FcopyCommand::Copy {
            file_name: file_name.into(),
            guest_dir: guest_dir.into(),
            overwrite,
            create_path,
            // Some tests connect their guest after asking for the copy.
            wait_secs: 30,
        }
        .into_request();
        thread::spawn(move || {
            let mut client = Client::connect(&control).unwrap();
            client.send(&request, Some(file.as_fd())).unwrap();
            drop(file);
            client.final_response().unwrap()
        })
    }

    fn request(&self, request: &Request) -> Response {
        client::request(&self.control, request).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(host) = self.host.take() {
            host.shutdown();
        }
    }
}

fn report(response: Response) -> CopyReport {
    match response {
        Response::Result { result } => serde_json::from_value(result).unwrap(),
        other => panic!("expected a copy result, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The scripted guest

fn connect(path: &Path) -> UnixStream {
    let stream = UnixStream::connect(path).unwrap();
    stream.set_read_timeout(Some(SAFETY_TIMEOUT)).unwrap();
    stream
}

fn send_frame(mut stream: &UnixStream, kind: u16, body: &[u8]) {
    stream.write_all(&encode_frame(kind, body)).unwrap();
}

/// The next frame, or `None` when the host closed the stream.
fn read_frame(mut stream: &UnixStream) -> Option<(u16, Vec<u8>)> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match stream.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
        Err(e) => panic!("guest read failed: {e}"),
    }
    let header = FrameHeader::parse(&header).unwrap();
    let mut body = vec![0u8; header.len as usize];
    stream.read_exact(&mut body).unwrap();
    Some((header.kind, body))
}

fn assert_closed_by_host(stream: &UnixStream) {
    assert_eq!(
        read_frame(stream),
        None,
        "host should have closed this stream"
    );
}

struct Guest {
    control: UnixStream,
    channel: Option<UnixStream>,
    relid: u32,
    instance: Guid,
}

impl Guest {
    fn send(&self, msg: &ChannelMessage) {
        send_frame(&self.control, kind::CONTROL, &msg.encode());
    }

    fn recv(&self) -> ChannelMessage {
        let (k, body) = read_frame(&self.control).expect("control stream closed");
        assert_eq!(k, kind::CONTROL);
        ChannelMessage::parse(&body).unwrap()
    }

    /// Control stream up to ALLOFFERS_DELIVERED, with one fcopy offer.
    fn connect_offered(bus: &Path) -> Guest {
        Guest::connect_offered_with(bus, &[VERSION_WIN10_V5_3])
    }

    /// Like [`Guest::connect_offered`], trying `versions` in turn as the Linux guest does;
    /// every one but the last must be refused.
    fn connect_offered_with(bus: &Path, versions: &[u32]) -> Guest {
        let control = connect(bus);
        send_frame(&control, kind::HELLO, &Hello::control().encode());
        let mut guest = Guest {
            control,
            channel: None,
            relid: 0,
            instance: Guid::NIL,
        };
        for (i, &version) in versions.iter().enumerate() {
            guest.send(&ChannelMessage::InitiateContact { version });
            match guest.recv() {
                ChannelMessage::VersionResponse { supported, .. } => {
                    assert_eq!(supported, i + 1 == versions.len(), "version {version:#x}")
                }
                other => panic!("expected VERSION_RESPONSE, got {other:?}"),
            }
        }
        guest.send(&ChannelMessage::RequestOffers);
        match guest.recv() {
            ChannelMessage::Offer {
                if_type,
                if_instance,
                child_relid,
                ..
            } => {
                assert_eq!(if_type, Guid::FCOPY);
                guest.relid = child_relid;
                guest.instance = if_instance;
            }
            other => panic!("expected OFFERCHANNEL, got {other:?}"),
        }
        assert_eq!(guest.recv(), ChannelMessage::AllOffersDelivered);
        guest
    }

    /// OPENCHANNEL, channel stream, NEGOTIATE answered (6.1 rule).
    fn open_fcopy(&mut self) {
        self.open_fcopy_with(FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS);
    }

    /// Like [`Guest::open_fcopy`] with the guest's version lists given.
    fn open_fcopy_with(&mut self, fw: &[IcVersion], srv: &[IcVersion]) {
        let open_id = 7;
        self.send(&ChannelMessage::OpenChannel {
            child_relid: self.relid,
            open_id,
        });
        assert_eq!(
            self.recv(),
            ChannelMessage::OpenResult {
                child_relid: self.relid,
                open_id,
                status: 0
            }
        );
        let channel = connect(&self.control_path_peer());
        send_frame(
            &channel,
            kind::HELLO,
            &Hello::channel(self.relid, open_id).encode(),
        );
        self.channel = Some(channel);
        let (trans_id, mut payload) = self.recv_packet().expect("NEGOTIATE");
        let hdr = ic::ic_header(&payload).unwrap();
        assert_eq!(hdr.icmsgtype.get(), msgtype::NEGOTIATE);
        assert_eq!(hdr.icflags, icflags::TRANSACTION | icflags::REQUEST);
        let agreed = prep_negotiate_resp(&mut payload, fw, srv);
        assert_eq!(
            agreed.is_some(),
            fw == FCOPY_FW_VERSIONS && srv == FCOPY_SRV_VERSIONS
        );
        ic::set_response_flags(&mut payload).unwrap();
        self.send_packet(trans_id, &payload);
    }

    fn control_path_peer(&self) -> PathBuf {
        let addr = self.control.peer_addr().unwrap();
        addr.as_pathname().unwrap().to_owned()
    }

    fn channel(&self) -> &UnixStream {
        self.channel.as_ref().expect("channel not open")
    }

    /// The next packet's trans_id and payload (recvlen bytes, padding included).
    fn recv_packet(&self) -> Option<(u64, Vec<u8>)> {
        let (k, body) = read_frame(self.channel())?;
        assert_eq!(k, kind::PACKET);
        let packet = parse_packet(&body).unwrap();
        Some((packet.trans_id, packet.payload.to_vec()))
    }

    fn send_packet(&self, trans_id: u64, payload: &[u8]) {
        send_frame(
            self.channel(),
            kind::PACKET,
            &encode_inband(trans_id, 0, payload),
        );
    }

    /// The next fcopy request: (trans_id, operation, whole payload).
    fn recv_fcopy(&self) -> (u64, u32, Vec<u8>) {
        let (trans_id, payload) = self.recv_packet().expect("channel closed");
        let hdr = ic::ic_header(&payload).unwrap();
        assert_eq!(hdr.icmsgtype.get(), msgtype::FCOPY);
        assert_eq!(hdr.icflags, icflags::TRANSACTION | icflags::REQUEST);
        let operation = wire::operation(&payload[ic::ICMSG_HDR_LEN..]).unwrap();
        (trans_id, operation, payload)
    }

    /// Answers like the 6.1 driver: the same buffer, status set, icflags 0x05.
    fn reply(&self, trans_id: u64, mut payload: Vec<u8>, status: u32) {
        ic::set_reply(&mut payload, status).unwrap();
        self.send_packet(trans_id, &payload);
    }
}

/// What the guest saw of one successful copy.
struct Received {
    start: StartFcopy,
    start_len: usize,
    data: BTreeMap<u64, Vec<u8>>,
    complete_len: usize,
}

/// Answers START, every WRITE and COMPLETE with success.
fn serve_one_copy(guest: &Guest) -> Received {
    let (trans_id, operation, payload) = guest.recv_fcopy();
    assert_eq!(operation, op::START_FILE_COPY);
    let start = wire::parse_start(&payload[ic::ICMSG_HDR_LEN..]).unwrap();
    let start_len = payload.len();
    guest.reply(trans_id, payload, 0);
    let mut data = BTreeMap::new();
    loop {
        let (trans_id, operation, payload) = guest.recv_fcopy();
        match operation {
            op::WRITE_TO_FILE => {
                let write = wire::parse_write(&payload[ic::ICMSG_HDR_LEN..]).unwrap();
                let size = write.size.get() as usize;
                data.insert(write.offset.get(), write.data[..size].to_vec());
                guest.reply(trans_id, payload, 0);
            }
            op::COMPLETE_FCOPY => {
                let complete_len = payload.len();
                guest.reply(trans_id, payload, 0);
                return Received {
                    start,
                    start_len,
                    data,
                    complete_len,
                };
            }
            other => panic!("unexpected fcopy operation {other}"),
        }
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn copy_succeeds_with_utf16_names_flags_fragments_and_complete() {
    let fx = Fixture::start("ok", Duration::from_secs(20));
    let contents = pattern(2 * DATA_FRAGMENT + 100);
    let src = fx.source("source.bin", &contents);
    let mut guest = Guest::connect_offered(&fx.bus);
    guest.open_fcopy();

    let copy = fx.copy(&src, "bïg €.iso", "/srv/incoming", true, true);
    let received = serve_one_copy(&guest);
    let report = report(copy.join().unwrap());

    assert!(report.ok, "{report:?}");
    assert_eq!(report.hresult, Some(0));
    assert_eq!(report.bytes, contents.len() as u64);
    // START: UTF-16LE names, the trailing '/' added, both flags, the size. 28 + 1088 = 1116
    // bytes, padded to 1120 in the packet (the guest's recvlen).
    assert_eq!(
        StartFcopy::utf16_name(&received.start.file_name),
        "bïg €.iso"
    );
    assert_eq!(
        StartFcopy::utf16_name(&received.start.path_name),
        "/srv/incoming/"
    );
    let units = vmbus::utf16::units_from_le_bytes(&received.start.file_name);
    assert_eq!(
        &units[..9],
        &"bïg €.iso".encode_utf16().collect::<Vec<_>>()[..]
    );
    assert_eq!(units[9], 0);
    assert_eq!(received.start.copy_flags.get(), OVER_WRITE | CREATE_PATH);
    assert_eq!(received.start.file_size.get(), contents.len() as u64);
    assert_eq!(received.start_len, 1120);
    // Fragments of 6144 bytes at the right offsets, reassembling the file.
    let offsets: Vec<u64> = received.data.keys().copied().collect();
    assert_eq!(offsets, vec![0, 6144, 12288]);
    let sizes: Vec<usize> = received.data.values().map(Vec::len).collect();
    assert_eq!(sizes, vec![6144, 6144, 100]);
    let joined: Vec<u8> = received.data.into_values().flatten().collect();
    assert_eq!(joined, contents);
    // COMPLETE: the 36-byte header only (28 + 36 = 64, already a multiple of 8).
    assert_eq!(received.complete_len, 64);
    assert!(result_line("bïg €.iso", "/srv/incoming/", &report)
        .starts_with("copied bïg €.iso (12388 bytes) to /srv/incoming/: 0x00000000 success in "));
}

#[test]
fn empty_file_is_start_then_complete() {
    let fx = Fixture::start("empty", Duration::from_secs(20));
    let src = fx.source("empty", b"");
    let mut guest = Guest::connect_offered(&fx.bus);
    guest.open_fcopy();
    let copy = fx.copy(&src, "empty", "/tmp/", false, false);
    let received = serve_one_copy(&guest);
    let report = report(copy.join().unwrap());
    assert!(report.ok, "{report:?}");
    assert!(received.data.is_empty());
    assert_eq!(received.start.copy_flags.get(), 0);
}

#[test]
fn start_answered_file_exists_sends_cancel_and_reports_it() {
    let fx = Fixture::start("exists", Duration::from_secs(20));
    let src = fx.source("a.txt", b"hello");
    let mut guest = Guest::connect_offered(&fx.bus);
    guest.open_fcopy();

    let copy = fx.copy(&src, "a.txt", "/srv/", false, false);
    let (trans_id, operation, payload) = guest.recv_fcopy();
    assert_eq!(operation, op::START_FILE_COPY);
    guest.reply(trans_id, payload, ic::status::HV_ERROR_ALREADY_EXISTS);
    let (trans_id, operation, payload) = guest.recv_fcopy();
    assert_eq!(
        operation,
        op::CANCEL_FCOPY,
        "a failed START must be followed by CANCEL"
    );
    guest.reply(trans_id, payload, 0);

    let report = report(copy.join().unwrap());
    assert!(!report.ok);
    assert_eq!(report.hresult, Some(0x8007_0050));
    assert_eq!(report.meaning.as_deref(), Some("file exists"));
    assert_eq!(report.step, Some(Step::StartFileCopy));
    assert_eq!(report.bytes, 0);
    assert_eq!(
        result_line("a.txt", "/srv/", &report),
        "copy failed at START_FILE_COPY: 0x80070050 file exists"
    );
}

#[test]
fn failed_write_sends_cancel_and_reports_disk_full() {
    let fx = Fixture::start("full", Duration::from_secs(20));
    let src = fx.source("big", &pattern(3 * DATA_FRAGMENT));
    let mut guest = Guest::connect_offered(&fx.bus);
    guest.open_fcopy();

    let copy = fx.copy(&src, "big", "/srv/", false, false);
    let (t, _, p) = guest.recv_fcopy();
    guest.reply(t, p, 0);
    let (t, _, p) = guest.recv_fcopy();
    guest.reply(t, p, 0);
    let (t, operation, p) = guest.recv_fcopy();
    assert_eq!(operation, op::WRITE_TO_FILE);
    guest.reply(t, p, ic::status::HV_ERROR_DISK_FULL);
    let (t, operation, p) = guest.recv_fcopy();
    assert_eq!(operation, op::CANCEL_FCOPY);
    guest.reply(t, p, 0);

    let report = report(copy.join().unwrap());
    assert_eq!(report.hresult, Some(0x8007_0070));
    assert_eq!(report.meaning.as_deref(), Some("disk full"));
    assert_eq!(report.step, Some(Step::WriteToFile));
    assert_eq!(report.bytes, DATA_FRAGMENT as u64);
}

#[test]
fn guest_disconnecting_mid_copy_fails_the_copy_at_once() {
    // A long step timeout: if the failure waited for it, the test would take a minute.
    let fx = Fixture::start("gone", Duration::from_secs(300));
    let src = fx.source("big", &pattern(4 * DATA_FRAGMENT));
    let mut guest = Guest::connect_offered(&fx.bus);
    guest.open_fcopy();

    let copy = fx.copy(&src, "big", "/srv/", false, false);
    let (t, _, p) = guest.recv_fcopy();
    guest.reply(t, p, 0);
    let (_, operation, _) = guest.recv_fcopy();
    assert_eq!(operation, op::WRITE_TO_FILE);
    drop(guest);

    let report = report(copy.join().unwrap());
    assert!(!report.ok);
    assert_eq!(report.step, Some(Step::WriteToFile));
    assert_eq!(report.hresult, None);
    let error = report.error.unwrap();
    assert!(error.contains("guest went away"), "{error}");
    assert!(report.seconds < 30.0, "took {} s", report.seconds);
}

#[test]
fn control_stream_gone_fails_the_copy_although_the_channel_stream_is_open() {
    let fx = Fixture::start("control-gone", Duration::from_secs(300));
    let src = fx.source("big", &pattern(2 * DATA_FRAGMENT));
    let mut guest = Guest::connect_offered(&fx.bus);
    guest.open_fcopy();

    let copy = fx.copy(&src, "big", "/srv/", false, false);
    let (_, operation, _) = guest.recv_fcopy();
    assert_eq!(operation, op::START_FILE_COPY);
    // Only the control stream goes; the host must end the channel streams itself.
    let Guest {
        control, channel, ..
    } = guest;
    drop(control);
    let channel = channel.unwrap();
    assert_closed_by_host(&channel);

    let report = report(copy.join().unwrap());
    assert_eq!(report.step, Some(Step::StartFileCopy));
    assert!(
        report.error.as_deref().unwrap().contains("guest went away"),
        "{report:?}"
    );
}

#[test]
fn with_no_guest_a_copy_fails_at_once_and_with_wait_it_waits_for_one() {
    // A step timeout long enough that waiting for it would show.
    let fx = Fixture::start("noguest", Duration::from_secs(120));
    let src = fx.source("a", b"abc");
    let started = std::time::Instant::now();
    let failed = report(fx.copy_no_wait(&src));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(failed.step, Some(Step::ChannelSetup));
    let error = failed.error.unwrap();
    assert!(
        error.starts_with("no guest has the fcopy channel open:") && error.contains("--wait"),
        "{error}"
    );
    // With --wait the copy waits for the guest that comes along.
    let copy = fx.copy(&src, "a", "/srv/", false, false);
    let mut guest = Guest::connect_offered(&fx.bus);
    guest.open_fcopy();
    serve_one_copy(&guest);
    let done = report(copy.join().unwrap());
    assert!(done.ok, "{done:?}");
}

#[test]
fn refused_negotiation_fails_the_copy_without_waiting() {
    let fx = Fixture::start("refused", Duration::from_secs(300));
    let src = fx.source("a", b"x");
    let mut guest = Guest::connect_offered(&fx.bus);
    // A guest that only knows framework 1.0 answers with zero counts.
    guest.open_fcopy_with(&[IcVersion::new(1, 0)], FCOPY_SRV_VERSIONS);

    let report = report(fx.copy(&src, "a", "/srv/", false, false).join().unwrap());
    assert_eq!(report.step, Some(Step::ChannelSetup));
    assert!(
        report.error.as_deref().unwrap().contains("refused"),
        "{report:?}"
    );
    assert!(report.seconds < 30.0);
}

#[test]
fn unanswered_step_times_out_and_sends_cancel() {
    let fx = Fixture::start("timeout", Duration::from_millis(300));
    let src = fx.source("a", b"abc");
    let mut guest = Guest::connect_offered(&fx.bus);
    guest.open_fcopy();

    let copy = fx.copy(&src, "a", "/srv/", false, false);
    let (t_start, operation, p_start) = guest.recv_fcopy();
    assert_eq!(operation, op::START_FILE_COPY);
    // Say nothing: the host gives up, then sends CANCEL without waiting for it.
    let report = report(copy.join().unwrap());
    assert_eq!(report.step, Some(Step::StartFileCopy));
    assert_eq!(
        report.error.as_deref(),
        Some("guest did not answer within 0.3 s")
    );
    let (_, operation, _) = guest.recv_fcopy();
    assert_eq!(operation, op::CANCEL_FCOPY);
    // A late answer to the abandoned START is ignored, and the host keeps working.
    guest.reply(t_start, p_start, 0);
    assert!(matches!(
        fx.request(&Request::Status {}),
        Response::Status(_)
    ));
}

#[test]
fn malformed_and_unexpected_replies_are_ignored_while_waiting() {
    let fx = Fixture::start("ignore", Duration::from_secs(20));
    let src = fx.source("a", b"abc");
    let mut guest = Guest::connect_offered(&fx.bus);
    guest.open_fcopy();

    let copy = fx.copy(&src, "a", "/srv/", false, false);
    let (t, operation, payload) = guest.recv_fcopy();
    assert_eq!(operation, op::START_FILE_COPY);
    // Too short for an IC header; a reply with a wrong trans_id; a copy of the request that
    // is not marked as a response; then the real answer.
    guest.send_packet(t, &[0u8; 8]);
    let mut wrong = payload.clone();
    ic::set_reply(&mut wrong, 0).unwrap();
    guest.send_packet(t + 1000, &wrong);
    guest.send_packet(t, &payload);
    guest.reply(t, payload, 0);
    let (t, operation, p) = guest.recv_fcopy();
    assert_eq!(operation, op::WRITE_TO_FILE);
    guest.reply(t, p, 0);
    let (t, operation, p) = guest.recv_fcopy();
    assert_eq!(operation, op::COMPLETE_FCOPY);
    guest.reply(t, p, 0);
    let report = report(copy.join().unwrap());
    assert!(report.ok, "{report:?}");
}

#[test]
fn rescind_sends_rescind_and_reoffer_makes_a_new_device() {
    let fx = Fixture::start("rescind", Duration::from_secs(20));
    let mut guest = Guest::connect_offered(&fx.bus);
    guest.open_fcopy();
    let old_relid = guest.relid;

    let Response::Outcome { ok: true, message } = fx.request(&Request::Rescind {
        service: "fcopy".into(),
    }) else {
        panic!("rescind failed");
    };
    assert!(message.contains(&format!("relid {old_relid}")), "{message}");
    assert_eq!(
        guest.recv(),
        ChannelMessage::Rescind {
            child_relid: old_relid
        }
    );
    // While rescinded: copies are refused, a second rescind is an error.
    let src = fx.source("a", b"x");
    match fx.copy(&src, "a", "/srv/", false, false).join().unwrap() {
        Response::Error { error } => assert!(error.contains("not offered"), "{error}"),
        other => panic!("copy while rescinded: {other:?}"),
    }
    assert!(matches!(
        fx.request(&Request::Rescind {
            service: "fcopy".into()
        }),
        Response::Outcome { ok: false, .. }
    ));

    // The guest tears down as its driver would.
    guest.channel = None;
    guest.send(&ChannelMessage::CloseChannel {
        child_relid: old_relid,
    });
    guest.send(&ChannelMessage::RelidReleased {
        child_relid: old_relid,
    });
    // An OPENCHANNEL for the released relid is refused; its answer also proves the two
    // messages before it were handled.
    guest.send(&ChannelMessage::OpenChannel {
        child_relid: old_relid,
        open_id: 8,
    });
    assert!(matches!(
        guest.recv(),
        ChannelMessage::OpenResult { status, .. } if status != 0
    ));
    let Response::Status(status) = fx.request(&Request::Status {}) else {
        panic!("status failed");
    };
    assert!(status.bus.offered.is_empty());
    assert!(status.bus.channels.is_empty());

    // Re-offer: a new OFFERCHANNEL with a new relid and instance; offering twice is an error.
    assert!(matches!(
        fx.request(&Request::Offer {
            service: "fcopy".into()
        }),
        Response::Outcome { ok: true, .. }
    ));
    let old_instance = guest.instance;
    match guest.recv() {
        ChannelMessage::Offer {
            if_type,
            if_instance,
            child_relid,
            ..
        } => {
            assert_eq!(if_type, Guid::FCOPY);
            assert_ne!(child_relid, old_relid);
            assert_ne!(if_instance, old_instance);
            guest.relid = child_relid;
        }
        other => panic!("expected a new OFFERCHANNEL, got {other:?}"),
    }
    assert!(matches!(
        fx.request(&Request::Offer {
            service: "fcopy".into()
        }),
        Response::Outcome { ok: false, .. }
    ));
    // And the new channel copies.
    guest.open_fcopy();
    let copy = fx.copy(&src, "a", "/srv/", false, false);
    serve_one_copy(&guest);
    assert!(report(copy.join().unwrap()).ok);
}

#[test]
fn malformed_guest_streams_are_closed_and_the_host_survives() {
    let fx = Fixture::start("malformed", Duration::from_secs(20));

    // A first frame that is not a HELLO.
    let s = connect(&fx.bus);
    send_frame(&s, kind::CONTROL, &ChannelMessage::RequestOffers.encode());
    assert_closed_by_host(&s);
    // A HELLO with a bad magic.
    let s = connect(&fx.bus);
    send_frame(&s, kind::HELLO, &[0xAB; 24]);
    assert_closed_by_host(&s);
    // A frame header announcing more than the bus allows.
    let s = connect(&fx.bus);
    let mut huge = (1u32 << 20).to_le_bytes().to_vec();
    huge.extend_from_slice(&kind::HELLO.to_le_bytes());
    huge.extend_from_slice(&[0, 0]);
    (&s).write_all(&huge).unwrap();
    assert_closed_by_host(&s);
    // An unparsable channel message on a control stream.
    let s = connect(&fx.bus);
    send_frame(&s, kind::HELLO, &Hello::control().encode());
    send_frame(&s, kind::CONTROL, &[0xff; 12]);
    assert_closed_by_host(&s);
    // A PACKET frame on a control stream.
    let s = connect(&fx.bus);
    send_frame(&s, kind::HELLO, &Hello::control().encode());
    send_frame(&s, kind::PACKET, &encode_inband(1, 0, &[0; 8]));
    assert_closed_by_host(&s);
    // REQUESTOFFERS before INITIATE_CONTACT.
    let s = connect(&fx.bus);
    send_frame(&s, kind::HELLO, &Hello::control().encode());
    send_frame(&s, kind::CONTROL, &ChannelMessage::RequestOffers.encode());
    assert_closed_by_host(&s);
    // A channel stream for a channel nobody opened.
    let s = connect(&fx.bus);
    send_frame(&s, kind::HELLO, &Hello::channel(99, 1).encode());
    assert_closed_by_host(&s);

    // A real guest still works; an old VMBus version is refused, not fatal (the guest then
    // retries a newer one on the same stream).
    let mut guest = Guest::connect_offered_with(&fx.bus, &[VERSION_WIN8_1, VERSION_WIN10_V5_3]);
    // One guest at a time: a second control stream is closed.
    let second = connect(&fx.bus);
    send_frame(&second, kind::HELLO, &Hello::control().encode());
    assert_closed_by_host(&second);

    guest.open_fcopy();
    // A packet whose length disagrees with its descriptor closes the channel stream.
    let mut bad = encode_inband(1, 0, &[0u8; 64]);
    bad.truncate(bad.len() - 8);
    send_frame(guest.channel(), kind::PACKET, &bad);
    assert_closed_by_host(guest.channel());
    guest.send(&ChannelMessage::CloseChannel {
        child_relid: guest.relid,
    });
    // Open again and copy: the host is fine.
    guest.open_fcopy();
    let src = fx.source("a", b"still alive");
    let copy = fx.copy(&src, "a", "/srv/", false, false);
    let received = serve_one_copy(&guest);
    assert_eq!(
        received.data.get(&0).map(Vec::as_slice),
        Some(&b"still alive"[..])
    );
    assert!(report(copy.join().unwrap()).ok);
}

#[test]
fn status_reports_guest_channel_and_versions() {
    let fx = Fixture::start("status", Duration::from_secs(20));
    let Response::Status(before) = fx.request(&Request::Status {}) else {
        panic!("status failed");
    };
    assert!(!before.bus.guest_connected);
    assert_eq!(before.bus.offered, vec!["fcopy".to_owned()]);

    let mut guest = Guest::connect_offered(&fx.bus);
    guest.open_fcopy();
    // A copy of an empty file proves the negotiation answer was processed.
    let src = fx.source("e", b"");
    let copy = fx.copy(&src, "e", "/srv/", false, false);
    serve_one_copy(&guest);
    assert!(report(copy.join().unwrap()).ok);

    let Response::Status(after) = fx.request(&Request::Status {}) else {
        panic!("status failed");
    };
    assert!(after.bus.guest_connected);
    assert_eq!(after.bus.vmbus_version.as_deref(), Some("5.3"));
    assert_eq!(after.bus.channels.len(), 1);
    assert_eq!(after.bus.channels[0].relid, guest.relid);
    assert_eq!(after.bus.channels[0].state, "attached");
    assert_eq!(after.bus.channels[0].instance, guest.instance.to_string());
    let fcopy = &after.services["fcopy"];
    assert_eq!(fcopy.state["negotiation"], "agreed");
    assert_eq!(fcopy.state["framework_version"], "3.0");
    assert_eq!(fcopy.state["message_version"], "1.1");
    assert_eq!(fcopy.state["channel_attached"], true);
    assert_eq!(
        fcopy.summary,
        "channel attached, negotiation agreed (framework 3.0, fcopy 1.1), idle"
    );
}

#[test]
fn copy_request_without_descriptor_is_refused() {
    let fx = Fixture::start("nofd", Duration::from_secs(20));
    let response = fx.request(
        &FcopyCommand::Copy {
            file_name: "a".into(),
            guest_dir: "/srv".into(),
            overwrite: false,
            create_path: false,
            wait_secs: 0,
        }
        .into_request(),
    );
    match response {
        Response::Error { error } => assert!(error.contains("descriptor"), "{error}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn second_host_on_the_same_socket_is_refused_and_vsock_points_to_the_vhost_backend() {
    let fx = Fixture::start("twice", Duration::from_secs(20));
    let err = RunningHost::start(&HostConfig {
        listen: BusAddress::Unix(fx.bus.clone()),
        control: fx.dir.0.join("other.ctl"),
        offers: vec!["fcopy".into()],
        step_timeout: Duration::from_secs(1),
        serve_args: fakehost::serve::parse_serve_options(&[
            "--blob-root",
            fx.dir.0.join("blobs").to_str().unwrap(),
        ])
        .unwrap(),
    })
    .err()
    .expect("second host started");
    assert!(
        err.to_string()
            .contains("another fakehost is already listening on"),
        "{err}"
    );
    let err = RunningHost::start(&HostConfig {
        listen: "vsock:2:5000".parse().unwrap(),
        control: fx.dir.0.join("other.ctl"),
        offers: vec![],
        step_timeout: Duration::from_secs(1),
        serve_args: fakehost::serve::parse_serve_options(&[
            "--blob-root",
            fx.dir.0.join("blobs").to_str().unwrap(),
        ])
        .unwrap(),
    })
    .err()
    .expect("vsock host started");
    assert!(err.to_string().contains("vhost --host unix:"), "{err}");
}

#[test]
fn shutdown_removes_both_socket_files() {
    let mut fx = Fixture::start("shutdown", Duration::from_secs(20));
    assert!(fx.bus.exists() && fx.control.exists());
    fx.host.take().unwrap().shutdown();
    assert!(!fx.bus.exists());
    assert!(!fx.control.exists());
}

#[test]
fn unknown_service_names_are_errors_that_list_the_table() {
    let fx = Fixture::start("unknown", Duration::from_secs(20));
    let known = fakehost::serve::service_names().join(", ");
    for request in [
        Request::Offer {
            service: "teleport".into(),
        },
        Request::Rescind {
            service: "teleport".into(),
        },
        Request::Service {
            service: "teleport".into(),
            command: serde_json::json!({"op": "beam"}),
        },
    ] {
        match fx.request(&request) {
            Response::Error { error } => assert_eq!(
                error,
                format!("unknown service \"teleport\": fakehost serves {known}")
            ),
            other => panic!("{request:?}: {other:?}"),
        }
    }
    // The host is unchanged: fcopy still offered.
    let Response::Status(status) = fx.request(&Request::Status {}) else {
        panic!("status failed");
    };
    assert_eq!(status.bus.offered, vec!["fcopy".to_owned()]);
}

#[test]
fn status_reports_every_service_in_the_table() {
    let fx = Fixture::start("status-all", Duration::from_secs(20));
    let Response::Status(status) = fx.request(&Request::Status {}) else {
        panic!("status failed");
    };
    let names: Vec<&str> = status.services.keys().map(String::as_str).collect();
    let mut table = fakehost::serve::service_names();
    table.sort_unstable();
    assert_eq!(names, table);
    for (name, service) in &status.services {
        assert!(!service.summary.is_empty(), "{name}");
        assert!(service.state.is_object(), "{name}");
    }
    let fcopy = &status.services["fcopy"];
    assert_eq!(fcopy.state["channel_attached"], false);
    assert_eq!(fcopy.state["negotiation"], "none");
}

#[test]
fn malformed_service_commands_are_refused_with_the_reason() {
    let fx = Fixture::start("badcmd", Duration::from_secs(20));
    for command in [
        serde_json::json!({"op": "format_disk"}),
        serde_json::json!({"op": "copy", "guest_dir": "/x"}),
        serde_json::json!("copy"),
    ] {
        match fx.request(&Request::Service {
            service: "fcopy".into(),
            command: command.clone(),
        }) {
            Response::Error { error } => {
                assert!(
                    error.starts_with("malformed command: "),
                    "{command}: {error}"
                )
            }
            other => panic!("{command}: {other:?}"),
        }
    }
}

#[test]
fn second_copy_waits_for_the_first_and_never_interleaves() {
    let fx = Fixture::start("two", Duration::from_secs(20));
    let first_src = fx.source("first", &pattern(3 * DATA_FRAGMENT));
    let second_src = fx.source("second", &pattern(DATA_FRAGMENT + 1));
    let mut guest = Guest::connect_offered(&fx.bus);
    guest.open_fcopy();

    let first = fx.copy(&first_src, "first", "/srv/", false, false);
    let (t, operation, p) = guest.recv_fcopy();
    assert_eq!(operation, op::START_FILE_COPY);
    let second = fx.copy(&second_src, "second", "/srv/", false, false);
    guest.reply(t, p, 0);
    // The rest of the first copy, with nothing of the second in between...
    let mut writes = 0;
    loop {
        let (t, operation, p) = guest.recv_fcopy();
        guest.reply(t, p, 0);
        match operation {
            op::WRITE_TO_FILE => writes += 1,
            op::COMPLETE_FCOPY => break,
            other => panic!("operation {other} inside the first copy"),
        }
    }
    assert_eq!(writes, 3);
    assert!(report(first.join().unwrap()).ok);
    // ...then the second one, whole.
    let received = serve_one_copy(&guest);
    assert_eq!(StartFcopy::utf16_name(&received.start.file_name), "second");
    assert_eq!(received.data.len(), 2);
    assert!(report(second.join().unwrap()).ok);
}

#[test]
fn client_going_away_cancels_the_copy_between_fragments() {
    let fx = Fixture::start("client-gone", Duration::from_secs(20));
    // Long enough that the copy outlives the first progress tick (100 ms) by far: sparse.
    let src = fx.dir.0.join("sparse");
    File::create(&src)
        .unwrap()
        .set_len(256 * 1024 * 1024)
        .unwrap();
    let mut guest = Guest::connect_offered(&fx.bus);
    guest.open_fcopy();

    let file = File::open(&src).unwrap();
    let client = Client::connect(&fx.control).unwrap();
    client
        .send(
            &FcopyCommand::Copy {
                file_name: "sparse".into(),
                guest_dir: "/srv/".into(),
                overwrite: false,
                create_path: false,
                wait_secs: 0,
            }
            .into_request(),
            Some(file.as_fd()),
        )
        .unwrap();
    drop(file);
    // The START arriving proves the request was read; then the client leaves.
    let (t, operation, p) = guest.recv_fcopy();
    assert_eq!(operation, op::START_FILE_COPY);
    drop(client);
    guest.reply(t, p, 0);
    let mut writes = 0u64;
    loop {
        let (t, operation, p) = guest.recv_fcopy();
        guest.reply(t, p, 0);
        match operation {
            op::WRITE_TO_FILE => writes += 1,
            op::CANCEL_FCOPY => break,
            other => panic!("expected WRITE or CANCEL, got operation {other}"),
        }
    }
    assert!(writes >= 1);
    assert!(
        writes < 256 * 1024 * 1024 / DATA_FRAGMENT as u64,
        "the copy ran to the end"
    );
    // The host is idle again and takes the next copy.
    let small = fx.source("small", b"next");
    let copy = fx.copy(&small, "small", "/srv/", false, false);
    serve_one_copy(&guest);
    assert!(report(copy.join().unwrap()).ok);
}
