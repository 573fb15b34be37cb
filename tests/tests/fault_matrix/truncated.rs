//! Row 5: the bus stream cut in the middle of a frame, by a host the test scripts
//! (`cusedev_tests::scripted_host`) on the socket fakehost was serving until it was killed.

use cusedev_tests::census::RowFigures;
use cusedev_tests::dev::{Dev, Errno};
use cusedev_tests::enter_private_mount_namespace;
use cusedev_tests::harness::{Rig, FCOPY_DEVICE};
use cusedev_tests::scripted_host::ScriptedHost;
use vmbus::channel_msg::ChannelMessage;
use vmbus::guid::Guid;
use vmbus::ic::IcVersion;
use vmbus::negotiate::build_request_packet;
use vmbus::stream::{encode_frame, kind, FRAME_HEADER_LEN};

use super::{wait_all_served, ENDS};

/// What cusedev logs when a node goes (the FUSE frontend's removal).
const FCOPY_REMOVED: &str = "removed device vmbus/hv_fcopy";

/// Row 5. A channel stream cut mid-frame loses framing for good: cusedev logs it, removes the
/// device as if rescinded and tells the host the relid is released (docs/decisions.md 20). A
/// control stream cut mid-frame ends the session: everything that host offered goes, and
/// cusedev reconnects. When a good host (fakehost) listens again, its offers are served again
/// and cusedev is back at the census it had with fakehost before.
#[test]
fn a_bus_stream_cut_mid_frame_drops_what_that_host_offered_and_a_good_host_is_served_again() {
    enter_private_mount_namespace().expect("private mount namespace");
    // Under a device root of the test's: without the real daemon nothing needs /dev itself.
    let mut rig = Rig::builder("fm-truncated")
        .guest_args(&["--kernel", "linux-6.1"])
        .guest_dir_arg("--dev-root", "dev")
        .serves(FCOPY_DEVICE)
        .start();
    wait_all_served(&rig, 0);
    let node = rig.dir.join("dev").join(FCOPY_DEVICE).display().to_string();
    let mut figures = RowFigures::baseline(
        "bus stream cut mid-frame",
        rig.guest.pid(),
        "fakehost's offers served",
    );
    let mark = rig.guest.log_mark();
    rig.host.kill();
    rig.guest.wait_for_log_from(mark, FCOPY_REMOVED);
    let mut session = ScriptedHost::bind(&rig.dir.join("bus.sock")).session();

    // The channel stream: a NEGOTIATE frame's header and 10 bytes of its body, then the end.
    let mark = rig.guest.log_mark();
    let channel = session.offer(Guid::FCOPY, 21);
    rig.wait_for_device_from(mark, FCOPY_DEVICE);
    figures.sample();
    let negotiate = encode_frame(
        kind::PACKET,
        &build_request_packet(1, &[IcVersion::new(3, 0)], &[IcVersion::new(1, 1)]),
    );
    channel.send_part_and_close(&negotiate, FRAME_HEADER_LEN + 10);
    rig.guest.wait_for_log_from(
        mark,
        "relid 21: channel stream broken (the stream ended in the middle of a frame (18 of",
    );
    assert!(matches!(
        session.control.control(),
        ChannelMessage::CloseChannel { child_relid: 21 }
    ));
    assert!(matches!(
        session.control.control(),
        ChannelMessage::RelidReleased { child_relid: 21 }
    ));
    rig.guest.wait_for_log_from(mark, FCOPY_REMOVED);
    assert_eq!(Dev::open(&node).err(), Some(Errno::ENOENT));

    // The control stream: half an OFFER frame, then the end (and nobody listening).
    let mark = rig.guest.log_mark();
    let _channel = session.offer(Guid::FCOPY, 22);
    rig.wait_for_device_from(mark, FCOPY_DEVICE);
    figures.sample();
    let offer = encode_frame(
        kind::CONTROL,
        &ChannelMessage::Offer {
            if_type: Guid::FCOPY,
            if_instance: Guid::from_fields(23, 2, 3, [4; 8]),
            child_relid: 23,
            connection_id: 23,
        }
        .encode(),
    );
    session
        .stop_listening()
        .send_part_and_close(&offer, offer.len() / 2);
    rig.guest.wait_for_log_from(
        mark,
        "ended: control stream: the stream ended in the middle of a frame",
    );
    rig.guest.wait_for_log_from(mark, FCOPY_REMOVED);
    assert_eq!(Dev::open(&node).err(), Some(Errno::ENOENT));

    let mark = rig.guest.log_mark();
    rig.restart_host();
    wait_all_served(&rig, mark);
    drop(Dev::open(&node).expect("the good host's fcopy node opens"));
    assert!(rig.guest.try_exit().is_none(), "cusedev must keep running");
    figures.back(ENDS);
}
