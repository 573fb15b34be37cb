//! hv_vss 6.1 driven from both sides: a scripted host on a [`TestChannel`] (requests built
//! with the `vmbus::vss` encoders) and a daemon doing what `hv_vss_daemon` 6.1 does.

use std::sync::Arc;
use std::time::Duration;

use vmbus::ic::{build_ic_message, IcVersion};
use vmbus::negotiate::parse_response;
use vmbus::vss::{encode_request, op, parse_reply, VssMsg, ICMSGTYPE_VSS};

use super::*;
use crate::device::{poll_bits, Device, Handle};
use crate::devices::fcopy::testing::{
    caller, expected_reply, negotiate, read_at, reply_to, write_at, RigDevice, TestChannel, E_FAIL,
};
use crate::devices::hv_util::{KERNEL_PROFILES, UTIL_RING_BYTES};
use crate::devices::hvutil_transport::wait_for;
use crate::devices::DRIVER_TABLE;
use crate::table::BusClass;

type Rig = crate::devices::fcopy::testing::Rig<Vss61>;

impl RigDevice for Vss61 {
    const DAEMON_TIMEOUT: Duration = DAEMON_TIMEOUT;
    /// The 6.1 daemon reads 12 bytes (4 during its handshake, which it checks).
    const READ_LEN: u32 = MSG_LEN as u32;

    fn create(channel: Arc<dyn HostChannel>, timeout: Duration) -> Arc<Vss61> {
        Vss61::new(channel, timeout, FREEZE_TIMEOUT).unwrap()
    }

    fn sleeping_readers(&self) -> usize {
        self.hvt.sleeping_readers()
    }
}

const FW_3_0: IcVersion = IcVersion::new(3, 0);
const SRV_5_0: IcVersion = IcVersion::new(5, 0);

/// A host VSS message: `operation` and `flags`.
fn vss(operation: u8, flags: u32) -> Vec<u8> {
    build_ic_message(
        ICMSGTYPE_VSS,
        FW_3_0,
        SRV_5_0,
        0,
        &encode_request(operation, flags),
    )
}

/// The 6.1 daemon's registration: byte 0 = 0x81, the other 11 bytes uninitialised stack.
fn register_msg(operation: u8) -> Vec<u8> {
    let mut msg = vec![0x5a; MSG_LEN];
    msg[0] = operation;
    msg
}

impl Rig {
    fn write(&self, h: Handle, data: &[u8]) -> Result<u32, Errno> {
        write_at(&*self.dev, h, data, 0)
    }

    /// Opens and registers the way hv_vss_daemon 6.1 does: op 129, then a read of exactly
    /// 4 bytes holding 129.
    fn daemon(&self) -> Handle {
        let h = self.open();
        assert_eq!(self.write(h, &register_msg(op::REGISTER1)), Ok(12));
        assert_eq!(self.read(h).unwrap(), 129u32.to_le_bytes());
        assert!(self.dev.state() >= State::Ready);
        h
    }

    /// The daemon reads its next 12-byte message.
    fn daemon_read(&self, h: Handle) -> VssMsg {
        let bytes = self.read(h).unwrap();
        assert_eq!(bytes.len(), MSG_LEN);
        VssMsg::from_prefix(&bytes).unwrap()
    }

    /// The daemon answers in the same buffer with `status` over bytes 0–3.
    fn daemon_answer(&self, h: Handle, mut msg: VssMsg, status: u32) -> Result<u32, Errno> {
        msg.set_error(status);
        self.write(h, &msg.to_vec())
    }
}

// ---- the row and the probe -----------------------------------------------------------------

#[test]
fn vss_row_binds_the_vss_class_with_util_ring_and_kernel_profiles() {
    let row = DRIVER_TABLE.iter().find(|r| r.name == "vss").unwrap();
    assert_eq!(row.node, "vmbus/hv_vss");
    assert_eq!(row.class, BusClass::Vmbus(vmbus::guid::Guid::VSS));
    assert_eq!(row.ring_bytes, UTIL_RING_BYTES);
    assert_eq!(row.profiles, KERNEL_PROFILES);
    let dev = (row.probe)(
        TestChannel::new(),
        KERNEL_PROFILES.get("linux-6.1").unwrap(),
        &clap::ArgMatches::default(),
    )
    .unwrap();
    assert_eq!((dev.name(), dev.mode()), ("vmbus/hv_vss", 0o600));
}

#[test]
fn probe_refuses_linux_3_14_with_the_way_out() {
    let err = probe(
        TestChannel::new(),
        KERNEL_PROFILES.get("linux-3.14").unwrap(),
        &clap::ArgMatches::default(),
    )
    .err()
    .unwrap();
    assert_eq!(
        err.to_string(),
        "hv_vss of Linux 3.14 is not modelled; use --profile vss=linux-6.1"
    );
}

#[test]
fn timeouts_are_900_s_for_freeze_and_30_s_otherwise() {
    assert_eq!(FREEZE_TIMEOUT, Duration::from_secs(900));
    assert_eq!(DAEMON_TIMEOUT, Duration::from_secs(30));
}

// ---- the transport, through the vss device --------------------------------------------------

#[test]
fn second_open_is_ebusy() {
    let rig = Rig::new();
    rig.open();
    assert_eq!(rig.dev.open(&caller(), libc::O_RDWR), Err(Errno::EBUSY));
}

#[test]
fn registration_answer_is_4_bytes_and_a_3_byte_read_is_einval() {
    let rig = Rig::new();
    let h = rig.open();
    rig.write(h, &register_msg(op::REGISTER1)).unwrap();
    assert_eq!(
        rig.dev.poll(h, None),
        poll_bits::POLLIN | poll_bits::POLLRDNORM
    );
    assert_eq!(read_at(&*rig.dev, h, 3, 0), Err(Errno::EINVAL));
    assert_eq!(rig.dev.state(), State::DeviceInit);
    assert_eq!(read_at(&*rig.dev, h, 12, 0).unwrap(), vec![129, 0, 0, 0]);
    assert_eq!(rig.dev.state(), State::Ready);
    assert_eq!(rig.dev.poll(h, None), 0);
}

#[test]
fn read_blocks_until_interrupted() {
    let rig = Rig::new();
    let h = rig.daemon();
    rig.assert_read_blocks_until_interrupted(h);
}

#[test]
fn read_after_rescind_returns_ebadf_and_rescind_waits_for_close() {
    let rig = Rig::new();
    let h = rig.daemon();
    let reader = rig.blocked_read(h, &caller());
    let remover = {
        let dev = rig.dev.clone();
        std::thread::spawn(move || dev.on_rescind())
    };
    assert_eq!(reader.join().unwrap(), Err(Errno::EBADF));
    wait_for("rescind to wait for the close", || {
        rig.dev.hvt.destroy_waiting()
    });
    assert!(!remover.is_finished());
    rig.dev.release(h);
    remover.join().unwrap();
    assert_eq!(rig.dev.open(&caller(), libc::O_RDWR), Err(Errno::ENODEV));
}

// ---- on_msg (§5 table) ----------------------------------------------------------------------

#[test]
fn write_of_other_than_12_bytes_is_einval() {
    let rig = Rig::new();
    let h = rig.open();
    for len in [0, 4, 11, 13, 7432] {
        let mut msg = register_msg(op::REGISTER1);
        msg.resize(len, 0);
        assert_eq!(rig.write(h, &msg), Err(Errno::EINVAL), "{len} bytes");
    }
    assert_eq!(rig.dev.poll(h, None), 0);
}

#[test]
fn legacy_register_128_is_accepted_without_answer_and_stays_device_init() {
    let rig = Rig::new();
    let h = rig.open();
    assert_eq!(rig.write(h, &register_msg(op::REGISTER)), Ok(12));
    assert_eq!(rig.dev.poll(h, None), 0);
    assert_eq!(rig.dev.state(), State::DeviceInit);
    assert_eq!(rig.dev.hvt.lock().svc.dm_reg_value, Some(op::REGISTER));
    let freeze = vss(op::FREEZE, 0);
    rig.host(1, &freeze);
    assert_eq!(rig.chan.sent(), vec![reply_to(1, &freeze, E_FAIL)]);
}

#[test]
fn second_register1_before_reading_is_efault() {
    let rig = Rig::new();
    let h = rig.open();
    assert_eq!(rig.write(h, &register_msg(op::REGISTER1)), Ok(12));
    assert_eq!(
        rig.write(h, &register_msg(op::REGISTER1)),
        Err(Errno::EFAULT)
    );
    // A legacy registration needs no slot.
    assert_eq!(rig.write(h, &register_msg(op::REGISTER)), Ok(12));
}

#[test]
fn registration_during_a_transaction_is_einval() {
    let rig = Rig::new();
    let h = rig.daemon();
    rig.host(1, &vss(op::THAW, 0));
    assert_eq!(rig.dev.state(), State::UserspaceReq);
    assert_eq!(
        rig.write(h, &register_msg(op::REGISTER1)),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        rig.write(h, &register_msg(op::REGISTER)),
        Err(Errno::EINVAL)
    );
}

#[test]
fn reregistration_when_ready_is_answered_again() {
    let rig = Rig::new();
    let h = rig.daemon();
    assert_eq!(rig.write(h, &register_msg(op::REGISTER1)), Ok(12));
    assert_eq!(rig.read(h).unwrap(), vec![129, 0, 0, 0]);
}

#[test]
fn answer_without_a_pending_request_is_einval() {
    let rig = Rig::new();
    let h = rig.daemon();
    assert_eq!(rig.write(h, &[0; 12]), Err(Errno::EINVAL));
    assert_eq!(
        rig.write(h, &encode_request(op::FREEZE, 0)),
        Err(Errno::EINVAL)
    );
    let h2 = Rig::new();
    let hh = h2.open();
    assert_eq!(h2.write(hh, &[5; 12]), Err(Errno::EINVAL));
}

// ---- host requests (§5 handle-request) ------------------------------------------------------

#[test]
fn freeze_goes_to_the_daemon_as_a_zeroed_12_byte_message_and_its_status_is_echoed() {
    let rig = Rig::new();
    let h = rig.daemon();
    let freeze = vss(op::FREEZE, 0x77);
    rig.host(4, &freeze);
    assert_eq!(rig.dev.state(), State::UserspaceReq);
    let msg = rig.daemon_read(h);
    assert_eq!(msg.to_vec(), vec![5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(rig.daemon_answer(h, msg, 0), Ok(12));
    assert_eq!(rig.chan.wait_sent(1), vec![reply_to(4, &freeze, 0)]);
    assert_eq!(rig.dev.state(), State::Ready);
    // A failed THAW: HV_E_FAIL is the status.
    let thaw = vss(op::THAW, 0);
    rig.host(5, &thaw);
    let msg = rig.daemon_read(h);
    assert_eq!(msg.hdr.operation, op::THAW);
    rig.daemon_answer(h, msg, E_FAIL).unwrap();
    assert_eq!(rig.chan.wait_sent(2)[1], reply_to(5, &thaw, E_FAIL));
}

#[test]
fn freeze_waits_longer_than_the_30_s_timeout_of_thaw() {
    let chan = TestChannel::new();
    let dev = Vss61::new(
        chan.clone(),
        Duration::from_millis(20),
        Duration::from_secs(3600),
    )
    .unwrap();
    let rig = Rig { dev, chan };
    let h = rig.daemon();
    rig.host(1, &vss(op::FREEZE, 0));
    std::thread::sleep(Duration::from_millis(80));
    assert!(rig.chan.sent().is_empty());
    assert!(rig.dev.timer.is_pending());
    let msg = rig.daemon_read(h);
    rig.daemon_answer(h, msg, 0).unwrap();
    let thaw = vss(op::THAW, 0);
    rig.host(2, &thaw);
    assert_eq!(rig.chan.wait_sent(2)[1], reply_to(2, &thaw, E_FAIL));
}

#[test]
fn hot_backup_flags_come_back_as_the_host_sent_them_through_the_6_1_daemon() {
    let rig = Rig::new();
    let h = rig.daemon();
    let check = vss(op::HOT_BACKUP, 0x1234);
    rig.host(1, &check);
    let msg = rig.daemon_read(h);
    assert_eq!(msg.hdr.operation, op::HOT_BACKUP);
    assert_eq!(msg.flags.get(), 0, "only the op goes to the daemon");
    // The daemon writes status 0 over byte 0, so the reply's op byte is 0, not 2.
    rig.daemon_answer(h, msg, 0).unwrap();
    let reply = parse_reply(&rig.chan.wait_sent(1)[0].payload).unwrap();
    assert_eq!((reply.status, reply.flags), (0, 0x1234));
}

#[test]
fn hot_backup_reply_with_op_byte_2_sets_no_auto_recovery() {
    let rig = Rig::new();
    let h = rig.daemon();
    rig.host(1, &vss(op::HOT_BACKUP, 0));
    let _ = rig.daemon_read(h);
    // A daemon that leaves the op in byte 0: the int at offset 0 (2) is also the status.
    assert_eq!(rig.write(h, &encode_request(op::HOT_BACKUP, 0)), Ok(12));
    let reply = parse_reply(&rig.chan.wait_sent(1)[0].payload).unwrap();
    assert_eq!((reply.status, reply.flags), (2, VSS_HBU_NO_AUTO_RECOVERY));
}

#[test]
fn get_dm_info_is_answered_with_flags_0_without_the_daemon() {
    let rig = Rig::new();
    let request = vss(op::GET_DM_INFO, 0xffff_ffff);
    rig.host(3, &request);
    let sent = rig.chan.sent();
    assert_eq!(sent.len(), 1);
    let reply = parse_reply(&sent[0].payload).unwrap();
    assert_eq!((reply.status, reply.dm_info_flags()), (0, 0));
    assert_eq!(sent[0].payload.len(), 40);
}

#[test]
fn other_operations_are_answered_0_without_the_daemon() {
    let rig = Rig::new();
    let h = rig.daemon();
    for (i, operation) in [
        op::CREATE,
        op::DELETE,
        op::BU_COMPLETE,
        op::AUTO_RECOVER,
        42,
    ]
    .into_iter()
    .enumerate()
    {
        let request = vss(operation, 9);
        rig.host(i as u64, &request);
        assert_eq!(rig.chan.sent()[i], reply_to(i as u64, &request, 0));
    }
    assert_eq!(rig.dev.poll(h, None), 0, "the daemon was not asked");
    assert_eq!(rig.dev.state(), State::Ready);
}

#[test]
fn freeze_thaw_hot_backup_without_daemon_fail_at_once() {
    let rig = Rig::new();
    for (i, operation) in [op::FREEZE, op::THAW, op::HOT_BACKUP]
        .into_iter()
        .enumerate()
    {
        let request = vss(operation, 0);
        rig.host(i as u64, &request);
        assert_eq!(rig.chan.sent()[i], reply_to(i as u64, &request, E_FAIL));
    }
    assert_eq!(rig.dev.state(), State::DeviceInit);
}

#[test]
fn an_answered_create_forces_ready_and_an_unregistered_daemon_then_gets_freeze() {
    // vss_handle_request() ends with hv_poll_channel(vss_poll_wrapper) for the operations it
    // answers itself, and the wrapper sets READY unconditionally (hv_snapshot.c 6.1).
    let rig = Rig::new();
    let h = rig.open();
    rig.host(1, &vss(op::CREATE, 0));
    assert_eq!(rig.dev.state(), State::Ready);
    rig.host(2, &vss(op::FREEZE, 0));
    assert_eq!(rig.daemon_read(h).hdr.operation, op::FREEZE);
    // With nobody holding the device the send fails instead: HV_E_FAIL, READY.
    let rig = Rig::new();
    rig.host(1, &vss(op::GET_DM_INFO, 0));
    let freeze = vss(op::FREEZE, 0);
    rig.host(2, &freeze);
    assert_eq!(rig.chan.sent()[1], reply_to(2, &freeze, E_FAIL));
    assert_eq!(rig.dev.state(), State::Ready);
}

#[test]
fn negotiate_is_answered_before_any_daemon_with_3_0_and_5_0() {
    let rig = Rig::new();
    rig.host(1, &negotiate(&[FW_3_0], &[SRV_5_0, IcVersion::new(4, 0)]));
    let sent = rig.chan.sent();
    assert_eq!(
        parse_response(&sent[0].payload).unwrap(),
        Some((FW_3_0, SRV_5_0))
    );
    assert_eq!(rig.dev.state(), State::DeviceInit);
    rig.host(2, &negotiate(&[FW_3_0], &[IcVersion::new(4, 0)]));
    assert_eq!(parse_response(&rig.chan.sent()[1].payload).unwrap(), None);
}

#[test]
fn short_vss_messages_are_dropped_but_padding_counts() {
    let rig = Rig::new();
    // 28 + 4 = 32 bytes < 40: dropped.
    rig.host(
        1,
        &build_ic_message(ICMSGTYPE_VSS, FW_3_0, SRV_5_0, 0, &[3, 0, 0, 0]),
    );
    assert!(rig.chan.sent().is_empty());
    // 28 + 8 = 36, padded to 40 by the ring: taken (flags read from the padding).
    let request = build_ic_message(ICMSGTYPE_VSS, FW_3_0, SRV_5_0, 0, &[op::CREATE; 1]);
    let request = [request, vec![0; 7]].concat();
    rig.host(2, &request);
    assert_eq!(rig.chan.sent(), vec![reply_to(2, &request, 0)]);
    assert_eq!(expected_reply(&request, 0).len(), 40);
}

#[test]
fn malformed_packets_are_dropped_without_reply() {
    let rig = Rig::new();
    rig.chan.push_raw(1, vec![0; 16]);
    rig.dev.on_channel_callback();
    rig.chan.push_raw(2, Vec::new());
    rig.dev.on_channel_callback();
    rig.host(3, &build_ic_message(2, FW_3_0, SRV_5_0, 0, &[0; 12]));
    assert!(rig.chan.sent().is_empty());
}

#[test]
fn request_during_a_transaction_waits_in_the_ring_until_the_answer() {
    let rig = Rig::new();
    let h = rig.daemon();
    rig.host(1, &vss(op::FREEZE, 0));
    rig.host(2, &vss(op::THAW, 0));
    assert!(rig.chan.has_pending());
    let msg = rig.daemon_read(h);
    rig.daemon_answer(h, msg, 0).unwrap();
    assert!(!rig.chan.has_pending());
    assert_eq!(rig.daemon_read(h).hdr.operation, op::THAW);
}

#[test]
fn answered_operations_repoll_the_ring_at_once() {
    let rig = Rig::new();
    rig.chan.push(1, &vss(op::CREATE, 0));
    rig.chan.push(2, &vss(op::GET_DM_INFO, 0));
    rig.chan.push(3, &vss(op::DELETE, 0));
    rig.dev.on_channel_callback();
    assert_eq!(rig.chan.sent().len(), 3);
}

// ---- timeout and close ----------------------------------------------------------------------

#[test]
fn timeout_replies_hv_e_fail_and_the_late_answer_is_einval() {
    let rig = Rig::with_timeout(Duration::from_millis(20));
    let h = rig.daemon();
    let thaw = vss(op::THAW, 0);
    rig.host(1, &thaw);
    assert_eq!(rig.chan.wait_sent(1), vec![reply_to(1, &thaw, E_FAIL)]);
    wait_for("READY after the timeout", || {
        rig.dev.state() == State::Ready
    });
    let msg = rig.daemon_read(h);
    assert_eq!(rig.daemon_answer(h, msg, 0), Err(Errno::EINVAL));
}

#[test]
fn close_with_a_pending_freeze_replies_hv_e_fail_at_once() {
    let rig = Rig::new();
    let h = rig.daemon();
    let freeze = vss(op::FREEZE, 0);
    rig.host(1, &freeze);
    rig.dev.release(h);
    assert_eq!(rig.chan.sent(), vec![reply_to(1, &freeze, E_FAIL)]);
    assert!(!rig.dev.timer.is_pending());
    assert_eq!(rig.dev.state(), State::DeviceInit);
}

#[test]
fn full_daemon_cycle_check_freeze_thaw() {
    let rig = Rig::new();
    let h = rig.daemon();
    for (i, operation) in [op::HOT_BACKUP, op::FREEZE, op::THAW]
        .into_iter()
        .enumerate()
    {
        rig.host(10 + i as u64, &vss(operation, 0));
        let msg = rig.daemon_read(h);
        assert_eq!(msg.hdr.operation, operation);
        rig.daemon_answer(h, msg, 0).unwrap();
        let reply = parse_reply(&rig.chan.wait_sent(i + 1)[i].payload).unwrap();
        assert_eq!((reply.status, reply.operation), (0, operation));
    }
}
