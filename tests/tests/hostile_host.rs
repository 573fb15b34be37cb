//! A host that sends garbage: cusedev logs what was wrong, keeps running, and keeps serving.
//! The host here is scripted by the test on a real Unix socket, frame by frame, with the
//! `vmbus` encoders, so it can say things fakehost never would.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::time::Duration;

use cusedev_tests::enter_private_mount_namespace;
use cusedev_tests::harness::{scratch_dir, workspace_binary, Supervised, FCOPY_NODE};
use vmbus::channel_msg::ChannelMessage;
use vmbus::guid::Guid;
use vmbus::ic::IcVersion;
use vmbus::negotiate::{build_request_packet, parse_response};
use vmbus::stream::{encode_frame, kind, FrameHeader, Hello, Role, FRAME_HEADER_LEN};

/// Reads one frame (kind, body), bounded in time so a silent guest fails the test.
fn read_frame(stream: &mut UnixStream) -> (u16, Vec<u8>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut header = [0u8; FRAME_HEADER_LEN];
    stream.read_exact(&mut header).expect("frame header");
    let header = FrameHeader::parse(&header).expect("valid frame header from cusedev");
    let mut body = vec![0u8; header.len as usize];
    stream.read_exact(&mut body).expect("frame body");
    (header.kind, body)
}

fn read_control(stream: &mut UnixStream) -> ChannelMessage {
    let (k, body) = read_frame(stream);
    assert_eq!(k, kind::CONTROL);
    ChannelMessage::parse(&body).expect("valid channel message from cusedev")
}

fn send_control(stream: &mut UnixStream, message: &ChannelMessage) {
    stream
        .write_all(&encode_frame(kind::CONTROL, &message.encode()))
        .unwrap();
}

/// Accepts a stream and checks its HELLO.
fn accept(listener: &UnixListener, role: Role) -> (UnixStream, Hello) {
    let (mut stream, _) = listener.accept().expect("cusedev connects");
    let (k, body) = read_frame(&mut stream);
    assert_eq!(k, kind::HELLO);
    let hello = Hello::parse(&body).expect("valid HELLO");
    assert_eq!(hello.role, role);
    (stream, hello)
}

/// A NEGOTIATE request packet for the fcopy channel.
fn negotiate_packet(trans_id: u64) -> Vec<u8> {
    let packet = build_request_packet(trans_id, &[IcVersion::new(3, 0)], &[IcVersion::new(1, 1)]);
    encode_frame(kind::PACKET, &packet)
}

#[test]
fn garbage_from_the_host_is_logged_and_survived() {
    enter_private_mount_namespace().expect("private mount namespace");
    let dir = scratch_dir("hostile");
    let bus = dir.join("bus.sock");
    let listener = UnixListener::bind(&bus).unwrap();
    let guest = Supervised::spawn(
        "cusedev",
        Command::new(workspace_binary("cusedev"))
            .args(["serve", "--frontend", "fuse", "--host"])
            .arg(format!("unix:{}", bus.display()))
            .env("RUST_LOG", "info"),
    );

    // 1. A frame header that announces 4 GiB on the control stream: the session ends with a
    //    clear error and the guest connects again.
    let (mut control, _) = accept(&listener, Role::Control);
    assert!(matches!(
        read_control(&mut control),
        ChannelMessage::InitiateContact { .. }
    ));
    control
        .write_all(&[0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0])
        .unwrap();
    guest.wait_for_log("malformed frame");
    drop(control);

    // 2. A well-behaved session, then garbage on the channel.
    let (mut control, _) = accept(&listener, Role::Control);
    let ChannelMessage::InitiateContact { version } = read_control(&mut control) else {
        panic!("expected INITIATE_CONTACT");
    };
    send_control(
        &mut control,
        &ChannelMessage::VersionResponse {
            supported: true,
            conn_id: 4,
        },
    );
    assert!(version >= 4 << 16);
    assert!(matches!(
        read_control(&mut control),
        ChannelMessage::RequestOffers
    ));
    send_control(
        &mut control,
        &ChannelMessage::Offer {
            if_type: Guid::FCOPY,
            if_instance: Guid::from_fields(1, 2, 3, [4; 8]),
            child_relid: 7,
            connection_id: 7,
        },
    );
    send_control(&mut control, &ChannelMessage::AllOffersDelivered);
    let ChannelMessage::OpenChannel {
        child_relid,
        open_id,
    } = read_control(&mut control)
    else {
        panic!("expected OPENCHANNEL");
    };
    assert_eq!(child_relid, 7);
    send_control(
        &mut control,
        &ChannelMessage::OpenResult {
            child_relid,
            open_id,
            status: 0,
        },
    );
    let (mut channel, hello) = accept(&listener, Role::Channel);
    assert_eq!((hello.child_relid, hello.open_id), (7, open_id));
    guest.wait_for_log(&format!("serving {FCOPY_NODE}"));

    // A PACKET whose descriptor says 64 bytes in a 24-byte frame.
    let mut bad = vmbus::packet::encode_inband(1, 0, &[0u8; 8]);
    bad[4] = 8; // len8 = 8 → 64 bytes, but the frame carries 24
    channel
        .write_all(&encode_frame(kind::PACKET, &bad))
        .unwrap();
    guest.wait_for_log("malformed packet from the host");
    // Guest-memory frames: a body shorter than its header, a chunk longer than its length
    // says, and a well-formed READ to a driver that names no pages. Each is logged and
    // dropped; the channel stays up.
    let read = vmbus::guest_memory::MemoryMessage::Read {
        trans_id: 1,
        offset: 0,
        len: u32::MAX,
    }
    .encode();
    channel
        .write_all(&encode_frame(kind::MEMORY, &read[..20]))
        .unwrap();
    guest.wait_for_log("malformed guest memory message from the host");
    let mut lying = vmbus::guest_memory::MemoryMessage::Write {
        trans_id: 1,
        offset: 0,
        bytes: &[7; 16],
    }
    .encode();
    lying[24] = 200; // len 200, 16 bytes follow
    channel
        .write_all(&encode_frame(kind::MEMORY, &lying))
        .unwrap();
    channel
        .write_all(&encode_frame(kind::MEMORY, &read))
        .unwrap();
    guest.wait_for_log("to a driver that names no pages");
    // Still alive: a valid NEGOTIATE is answered as the 6.1 driver does (fw 3.0, fcopy 1.1).
    channel.write_all(&negotiate_packet(42)).unwrap();
    let (k, body) = read_frame(&mut channel);
    assert_eq!(k, kind::PACKET);
    let packet = vmbus::packet::parse_packet(&body).expect("valid reply packet");
    assert_eq!(packet.trans_id, 42);
    assert_eq!(
        parse_response(packet.payload).expect("negotiate response"),
        Some((IcVersion::new(3, 0), IcVersion::new(1, 1)))
    );
    assert!(std::path::Path::new(FCOPY_NODE).exists());

    // 3. A frame of an unknown kind on the channel: framing is lost, so the device goes as if
    //    rescinded and the host is told the relid is released; cusedev itself carries on.
    channel.write_all(&encode_frame(9, &[1, 2, 3])).unwrap();
    guest.wait_for_log("removing the device as if rescinded");
    assert!(matches!(
        read_control(&mut control),
        ChannelMessage::CloseChannel { child_relid: 7 }
    ));
    assert!(matches!(
        read_control(&mut control),
        ChannelMessage::RelidReleased { child_relid: 7 }
    ));
    assert!(!std::path::Path::new(FCOPY_NODE).exists());
    let mut guest = guest;
    assert!(guest.try_exit().is_none(), "cusedev must keep running");
}
