//! hv_kvp 6.1 driven from both sides: a scripted host on a [`TestChannel`] (requests built
//! with the `vmbus::kvp` encoders, as fakehost builds them) and a daemon doing what
//! `hv_kvp_daemon` 6.1 does through the [`Device`] trait.

use std::sync::Arc;
use std::time::Duration;

use vmbus::ic::{build_ic_message, IcVersion};
use vmbus::kvp::{
    self as wire, encode_delete, encode_enumerate, encode_get, encode_get_ip_info, encode_set,
    encode_set_ip_info, op, parse_reply, pool, put_utf8, utf8_field, IpInfo, KvpMsg, KvpValue,
    ADDR_FAMILY_IPV4, HV_GUID_NOTFOUND, HV_S_CONT, MSG_LEN, REG_SZ,
};
use vmbus::negotiate::parse_response;

use super::*;
use crate::device::{poll_bits, Device, Handle};
use crate::devices::fcopy::testing::{
    caller, negotiate, read_at, reply_to, status_of, write_at, RigDevice, TestChannel, E_FAIL,
};
use crate::devices::hv_util::{KERNEL_PROFILES, UTIL_RING_BYTES};
use crate::devices::hvutil_transport::wait_for;
use crate::devices::DRIVER_TABLE;
use crate::table::BusClass;

type Rig = crate::devices::fcopy::testing::Rig<Kvp61>;

impl RigDevice for Kvp61 {
    const DAEMON_TIMEOUT: Duration = DAEMON_TIMEOUT;
    /// The 6.1 daemon reads and writes 0x1d08 bytes.
    const READ_LEN: u32 = MSG_LEN as u32;

    fn create(channel: Arc<dyn HostChannel>, timeout: Duration) -> Arc<Kvp61> {
        Kvp61::new(channel, timeout, NEGO_TIMEOUT).unwrap()
    }

    fn sleeping_readers(&self) -> usize {
        self.hvt.sleeping_readers()
    }
}

const FW_3_0: IcVersion = IcVersion::new(3, 0);
const SRV_4_0: IcVersion = IcVersion::new(4, 0);

/// A host KVPEXCHANGE message with `body` after the IC header.
fn kvp(body: &[u8]) -> Vec<u8> {
    build_ic_message(wire::ICMSGTYPE_KVPEXCHANGE, FW_3_0, SRV_4_0, 0, body)
}

/// The 6.1 daemon's registration: 7432 bytes, byte 0 = 100, the rest leftover buffer content.
fn register_msg(operation: u8) -> Vec<u8> {
    let mut msg = vec![0xaa; MSG_LEN];
    msg[0] = operation;
    msg
}

impl Rig {
    fn write(&self, h: Handle, data: &[u8]) -> Result<u32, Errno> {
        write_at(&*self.dev, h, data, 0)
    }

    /// Opens and registers a daemon the way hv_kvp_daemon 6.1 does (op 100, then reads the
    /// kernel's answer).
    fn daemon(&self) -> Handle {
        self.daemon_with(op::REGISTER1)
    }

    fn daemon_with(&self, operation: u8) -> Handle {
        let h = self.open();
        assert_eq!(self.write(h, &register_msg(operation)), Ok(MSG_LEN as u32));
        let answer = KvpMsg::from_prefix(&self.read(h).unwrap()).unwrap();
        assert_eq!(answer.hdr.operation, operation);
        assert_eq!(answer.version(), "3.1");
        // READY, or further on if the re-poll found a request waiting.
        assert!(self.dev.state() >= State::Ready);
        h
    }

    /// The daemon reads the next message.
    fn daemon_read(&self, h: Handle) -> KvpMsg {
        let bytes = self.read(h).unwrap();
        assert_eq!(bytes.len(), MSG_LEN);
        KvpMsg::from_prefix(&bytes).unwrap()
    }

    /// The daemon answers in its buffer `msg` with `status` over the header, as the 6.1
    /// daemon does.
    fn daemon_answer(&self, h: Handle, mut msg: KvpMsg, status: u32) -> Result<u32, Errno> {
        msg.set_error(status);
        self.write(h, &msg.to_vec())
    }

    /// The host's reply `i` (waiting for it), parsed.
    fn reply(&self, i: usize) -> wire::KvpReply {
        parse_reply(&self.chan.wait_sent(i + 1)[i].payload).unwrap()
    }
}

// ---- the row and the probe -----------------------------------------------------------------

#[test]
fn kvp_row_binds_the_kvp_class_with_util_ring_and_kernel_profiles() {
    let row = DRIVER_TABLE.iter().find(|r| r.name == "kvp").unwrap();
    assert_eq!(row.node, "vmbus/hv_kvp");
    assert_eq!(row.class, BusClass::Vmbus(vmbus::guid::Guid::KVP));
    assert_eq!(row.ring_bytes, UTIL_RING_BYTES);
    assert_eq!(row.profiles, KERNEL_PROFILES);
    let dev = (row.probe)(
        TestChannel::new(),
        KERNEL_PROFILES.get("linux-6.1").unwrap(),
        &clap::ArgMatches::default(),
    )
    .unwrap();
    assert_eq!((dev.name(), dev.mode()), ("vmbus/hv_kvp", 0o600));
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
    assert!(matches!(err, ProbeError::Driver(_)));
    assert_eq!(
        err.to_string(),
        "hv_kvp of Linux 3.14 is not modelled; use --profile kvp=linux-6.1"
    );
    let other = Profile {
        name: "posted",
        about: "",
    };
    assert!(matches!(
        probe(TestChannel::new(), &other, &clap::ArgMatches::default()),
        Err(ProbeError::UnknownProfile { .. })
    ));
}

#[test]
fn a_full_size_request_fits_the_util_ring() {
    // descriptor 16 + IC 28 + 7432, padded to 8: one packet fits the 8 KiB data area.
    let len = vmbus::packet::encode_inband(1, 0, &kvp(&encode_enumerate(0, 0))).len();
    assert_eq!(len, 7480);
    assert!(len <= UTIL_RING_BYTES);
    assert!(len <= RECV_LIMIT);
}

// ---- the transport, through the kvp device --------------------------------------------------

#[test]
fn second_open_is_ebusy() {
    let rig = Rig::new();
    rig.open();
    assert_eq!(rig.dev.open(&caller(), libc::O_RDWR), Err(Errno::EBUSY));
}

#[test]
fn short_read_returns_einval_and_keeps_the_registration_answer() {
    let rig = Rig::new();
    let h = rig.open();
    rig.write(h, &register_msg(op::REGISTER1)).unwrap();
    assert_eq!(
        rig.dev.poll(h, None),
        poll_bits::POLLIN | poll_bits::POLLRDNORM
    );
    assert_eq!(read_at(&*rig.dev, h, 7431, 0), Err(Errno::EINVAL));
    assert_eq!(rig.dev.state(), State::DeviceInit);
    assert_eq!(read_at(&*rig.dev, h, 8000, 0).unwrap().len(), MSG_LEN);
    assert_eq!(rig.dev.state(), State::Ready);
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
    assert_eq!(
        rig.dev.poll(h, None),
        poll_bits::POLLERR | poll_bits::POLLHUP
    );
    assert!(!remover.is_finished());
    rig.dev.release(h);
    remover.join().unwrap();
    assert_eq!(rig.dev.open(&caller(), libc::O_RDWR), Err(Errno::ENODEV));
}

// ---- registration (§3.2) --------------------------------------------------------------------

#[test]
fn register1_answer_is_7432_bytes_op_100_version_3_1_and_ready_only_after_read() {
    let rig = Rig::new();
    let h = rig.open();
    assert_eq!(rig.write(h, &register_msg(100)), Ok(7432));
    assert_eq!(rig.dev.state(), State::DeviceInit);
    let answer = rig.read(h).unwrap();
    assert_eq!(answer.len(), 7432);
    assert_eq!(answer[0], 100);
    assert_eq!(&answer[4..8], b"3.1\0");
    assert!(answer[1..4].iter().chain(&answer[8..]).all(|&b| b == 0));
    assert_eq!(rig.dev.state(), State::Ready);
    assert_eq!(rig.dev.hvt.lock().svc.dm_reg_value, Some(op::REGISTER1));
}

#[test]
fn legacy_register_4_is_answered_with_op_4() {
    let rig = Rig::new();
    rig.daemon_with(op::REGISTER);
    assert_eq!(rig.dev.hvt.lock().svc.dm_reg_value, Some(op::REGISTER));
}

#[test]
fn registration_shorter_than_7432_is_einval_and_longer_is_accepted() {
    let rig = Rig::new();
    let h = rig.open();
    assert_eq!(rig.write(h, &register_msg(100)[..7431]), Err(Errno::EINVAL));
    assert_eq!(rig.write(h, &[100, 0, 0, 0]), Err(Errno::EINVAL));
    let mut long = register_msg(100);
    long.resize(8000, 0);
    assert_eq!(rig.write(h, &long), Ok(8000));
}

#[test]
fn registration_with_another_op_is_einval() {
    let rig = Rig::new();
    let h = rig.open();
    for operation in [0, 3, 5, 99, 101, 255] {
        assert_eq!(rig.write(h, &register_msg(operation)), Err(Errno::EINVAL));
    }
    assert_eq!(rig.dev.poll(h, None), 0);
}

#[test]
fn second_registration_before_reading_is_accepted_and_its_answer_lost() {
    // kvp_register() ignores hvutil_transport_send()'s EFAULT (hv_kvp.c 6.1).
    let rig = Rig::new();
    let h = rig.open();
    assert_eq!(rig.write(h, &register_msg(100)), Ok(7432));
    assert_eq!(rig.write(h, &register_msg(op::REGISTER)), Ok(7432));
    // The first answer is the one queued; the second daemon version is remembered.
    assert_eq!(rig.read(h).unwrap()[0], 100);
    assert_eq!(rig.dev.hvt.lock().svc.dm_reg_value, Some(op::REGISTER));
    assert_eq!(rig.dev.poll(h, None), 0);
}

#[test]
fn write_when_ready_without_request_is_einval() {
    let rig = Rig::new();
    let h = rig.daemon();
    assert_eq!(rig.write(h, &register_msg(100)), Err(Errno::EINVAL));
    assert_eq!(rig.write(h, &[0; MSG_LEN]), Err(Errno::EINVAL));
    assert!(rig.chan.sent().is_empty());
}

// ---- the negotiation quirk (§3.4) -----------------------------------------------------------

#[test]
fn negotiate_waits_in_the_ring_until_a_daemon_registers() {
    let rig = Rig::new();
    rig.host(1, &negotiate(&[FW_3_0], &[SRV_4_0, IcVersion::new(3, 0)]));
    // Not read at all: nothing sent, still in the ring, the 55 s re-poll armed.
    assert!(rig.chan.sent().is_empty());
    assert!(rig.chan.has_pending());
    assert!(rig.dev.handshake_timer.is_pending());
    assert_eq!(rig.dev.hvt.lock().svc.nego, Nego::InProgress);
    // A daemon opens but has not registered: still nothing.
    let h = rig.open();
    rig.dev.on_channel_callback();
    assert!(rig.chan.sent().is_empty());
    // Registering is not enough either: READY comes with the read of the answer...
    rig.write(h, &register_msg(100)).unwrap();
    rig.dev.on_channel_callback();
    assert!(rig.chan.sent().is_empty());
    // ...which cancels the re-poll timer and polls the channel: NEGOTIATE answered.
    rig.read(h).unwrap();
    let sent = rig.chan.wait_sent(1);
    assert_eq!(sent[0].trans_id, 1);
    assert_eq!(
        parse_response(&sent[0].payload).unwrap(),
        Some((FW_3_0, SRV_4_0))
    );
    assert!(!rig.dev.handshake_timer.is_pending());
    assert_eq!(rig.dev.hvt.lock().svc.nego, Nego::Finished);
    assert_eq!(rig.dev.state(), State::Ready);
}

#[test]
fn negotiate_and_a_request_both_waiting_go_through_once_a_daemon_registers() {
    // The NEGOTIATE answer ends with hv_poll_channel(): the request behind it is read next.
    let rig = Rig::new();
    rig.host(1, &negotiate(&[FW_3_0], &[SRV_4_0]));
    rig.host(2, &kvp(&encode_enumerate(pool::AUTO, 4)));
    assert!(rig.chan.sent().is_empty());
    let h = rig.daemon();
    assert_eq!(rig.chan.sent().len(), 1);
    assert_eq!(rig.dev.state(), State::UserspaceReq);
    assert_eq!(rig.daemon_read(h).enumerate().index.get(), 4);
}

#[test]
fn negotiation_repoll_timer_only_reruns_the_callback_and_is_armed_once() {
    let chan = TestChannel::new();
    let dev = Kvp61::new(chan.clone(), DAEMON_TIMEOUT, Duration::from_millis(10)).unwrap();
    chan.push(1, &negotiate(&[FW_3_0], &[SRV_4_0]));
    dev.on_channel_callback();
    assert!(dev.handshake_timer.is_pending());
    wait_for("the re-poll to fire", || !dev.handshake_timer.is_pending());
    std::thread::sleep(Duration::from_millis(30));
    // The callback ran again and returned: nothing answered, not re-armed.
    assert!(chan.sent().is_empty());
    assert!(chan.has_pending());
    assert!(!dev.handshake_timer.is_pending());
    dev.on_channel_callback();
    assert!(!dev.handshake_timer.is_pending());
}

#[test]
fn negotiate_without_common_version_is_answered_with_zero_counts() {
    let rig = Rig::new();
    rig.daemon();
    rig.host(2, &negotiate(&[FW_3_0], &[IcVersion::new(9, 9)]));
    assert_eq!(
        parse_response(&rig.chan.wait_sent(1)[0].payload).unwrap(),
        None
    );
    assert_eq!(rig.dev.state(), State::Ready);
}

#[test]
fn request_without_daemon_waits_in_the_ring_for_the_next_daemon() {
    // The spec's "no daemon → HV_E_FAIL at once" branch is dead in 6.1: the callback does
    // not read the ring below READY. A request after the daemon left waits for the next one.
    let rig = Rig::new();
    let h = rig.daemon();
    rig.dev.release(h);
    assert_eq!(rig.dev.state(), State::DeviceInit);
    rig.host(5, &kvp(&encode_enumerate(pool::AUTO, 0)));
    assert!(rig.chan.sent().is_empty());
    assert!(rig.chan.has_pending());
    let h = rig.daemon();
    let msg = rig.daemon_read(h);
    assert_eq!(
        (msg.hdr.operation, msg.hdr.pool),
        (op::ENUMERATE, pool::AUTO)
    );
}

// ---- host ⇄ daemon conversions (§3.3, §3.5) ---------------------------------------------------

#[test]
fn get_goes_to_the_daemon_as_utf8_and_its_value_comes_back_utf16_minus_4_bytes() {
    let rig = Rig::new();
    let h = rig.daemon();
    rig.host(7, &kvp(&encode_get(pool::GUEST, "HostName").unwrap()));
    assert_eq!(rig.dev.state(), State::UserspaceReq);
    let mut msg = rig.daemon_read(h);
    let data = msg.exchange().data;
    assert_eq!((msg.hdr.operation, msg.hdr.pool), (op::GET, pool::GUEST));
    assert_eq!(
        (utf8_field(&data.key).as_str(), data.key_size.get()),
        ("HostName", 9)
    );
    // The 6.1 daemon writes the value where it read the key (kvp_get layout, 528)...
    put_utf8(&mut msg.exchange_mut().data.value, "1234guest-1");
    assert_eq!(rig.daemon_answer(h, msg, 0), Ok(7432));
    let reply = rig.reply(0);
    // ...and the kernel reads it at the enumerate layout (532).
    assert_eq!(reply.status, 0);
    assert_eq!(
        (reply.key.as_str(), reply.value.as_str()),
        ("HostName", "guest-1")
    );
    assert_eq!((reply.value_size, reply.value_type), (16, REG_SZ));
    assert_eq!(rig.chan.sent()[0].trans_id, 7);
    assert_eq!(rig.chan.sent()[0].payload[25], 0x05);
    assert_eq!(rig.dev.state(), State::Ready);
}

#[test]
fn set_reg_sz_u32_u64_reach_the_daemon_as_text_and_are_echoed() {
    let rig = Rig::new();
    let h = rig.daemon();
    let cases = [
        (KvpValue::Sz("hello wörld".into()), "hello wörld"),
        (KvpValue::U32(4_294_967_295), "4294967295"),
        (KvpValue::U64(1 << 40), "1099511627776"),
    ];
    for (i, (value, text)) in cases.into_iter().enumerate() {
        let request = kvp(&encode_set(pool::EXTERNAL, "key", &value).unwrap());
        rig.host(i as u64, &request);
        let msg = rig.daemon_read(h);
        let data = msg.exchange().data;
        assert_eq!(utf8_field(&data.value), text);
        assert_eq!(data.value_size.get() as usize, text.len() + 1);
        assert_eq!(data.value_type.get(), 0, "value_type is not forwarded");
        rig.daemon_answer(h, msg, 0).unwrap();
        assert_eq!(
            rig.chan.wait_sent(i + 1)[i],
            reply_to(i as u64, &request, 0)
        );
    }
}

#[test]
fn delete_reaches_the_daemon_and_its_failure_is_echoed() {
    let rig = Rig::new();
    let h = rig.daemon();
    let request = kvp(&encode_delete(pool::GUEST, "gone").unwrap());
    rig.host(3, &request);
    let msg = rig.daemon_read(h);
    assert_eq!(msg.hdr.operation, op::DELETE);
    assert_eq!(utf8_field(&msg.delete().key), "gone");
    assert_eq!(msg.delete().key_size.get(), 5);
    rig.daemon_answer(h, msg, HV_S_CONT).unwrap();
    assert_eq!(
        rig.chan.wait_sent(1),
        vec![reply_to(3, &request, HV_S_CONT)]
    );
}

#[test]
fn enumerate_answer_becomes_utf16_key_and_value() {
    let rig = Rig::new();
    let h = rig.daemon();
    rig.host(4, &kvp(&encode_enumerate(pool::AUTO, 5)));
    let mut msg = rig.daemon_read(h);
    assert_eq!(msg.enumerate().index.get(), 5);
    let data = &mut msg.enumerate_mut().data;
    put_utf8(&mut data.key, "OSName");
    put_utf8(&mut data.value, "Debian GNU/Linux");
    rig.daemon_answer(h, msg, 0).unwrap();
    let reply = rig.reply(0);
    assert_eq!((reply.status, reply.index), (0, 5));
    assert_eq!(
        (reply.key.as_str(), reply.value.as_str()),
        ("OSName", "Debian GNU/Linux")
    );
    assert_eq!(
        (reply.key_size, reply.value_size, reply.value_type),
        (14, 34, REG_SZ)
    );
}

#[test]
fn end_of_enumeration_is_hv_s_cont_with_the_request_echoed() {
    let rig = Rig::new();
    let h = rig.daemon();
    let request = kvp(&encode_enumerate(pool::AUTO, 10));
    rig.host(4, &request);
    let msg = rig.daemon_read(h);
    rig.daemon_answer(h, msg, HV_S_CONT).unwrap();
    assert_eq!(
        rig.chan.wait_sent(1),
        vec![reply_to(4, &request, HV_S_CONT)]
    );
}

#[test]
fn legacy_daemon_signals_errors_with_an_empty_key() {
    let rig = Rig::new();
    let h = rig.daemon_with(op::REGISTER);
    rig.host(1, &kvp(&encode_enumerate(pool::AUTO, 0)));
    let msg = rig.daemon_read(h);
    // Empty key: HV_S_CONT, whatever the header says.
    rig.daemon_answer(h, msg, 0).unwrap();
    assert_eq!(rig.reply(0).status, HV_S_CONT);
    rig.host(2, &kvp(&encode_enumerate(pool::AUTO, 0)));
    let mut msg = rig.daemon_read(h);
    put_utf8(&mut msg.enumerate_mut().data.key, "k");
    // A non-empty key: success, even with a failure in the header.
    rig.daemon_answer(h, msg, E_FAIL).unwrap();
    assert_eq!(rig.reply(1).status, 0);
}

#[test]
fn get_ip_info_both_ways() {
    let rig = Rig::new();
    let h = rig.daemon();
    rig.host(
        9,
        &kvp(&encode_get_ip_info("00:15:5D:01:02:03", ADDR_FAMILY_IPV4).unwrap()),
    );
    let mut msg = rig.daemon_read(h);
    assert_eq!(msg.hdr.operation, op::GET_IP_INFO);
    let asked = IpInfo::from_utf8(&msg.ip_value().ip);
    assert_eq!(
        (asked.adapter_id.as_str(), asked.addr_family),
        ("00:15:5D:01:02:03", 1)
    );
    let info = IpInfo {
        adapter_id: "00:15:5D:01:02:03".into(),
        addr_family: ADDR_FAMILY_IPV4,
        dhcp_enabled: 1,
        ip_addr: "10.0.0.2".into(),
        sub_net: "255.255.255.0".into(),
        gate_way: "10.0.0.1".into(),
        dns_addr: "10.0.0.53".into(),
    };
    info.to_utf8(&mut msg.ip_value_mut().ip);
    rig.daemon_answer(h, msg, 0).unwrap();
    let reply = rig.reply(0);
    assert_eq!((reply.status, reply.ip), (0, Some(info)));
    assert_eq!(rig.chan.sent()[0].payload.len(), 28 + 7428);
}

#[test]
fn set_ip_info_reaches_the_daemon_and_guid_not_found_is_echoed() {
    let rig = Rig::new();
    let h = rig.daemon();
    let info = IpInfo {
        adapter_id: "{6E3F3B00-0000-0000-0000-000000000001}".into(),
        addr_family: ADDR_FAMILY_IPV4,
        dhcp_enabled: 0,
        ip_addr: "10.0.0.9".into(),
        sub_net: "255.0.0.0".into(),
        gate_way: "10.0.0.1".into(),
        dns_addr: "8.8.8.8".into(),
    };
    let request = kvp(&encode_set_ip_info(&info).unwrap());
    rig.host(2, &request);
    let msg = rig.daemon_read(h);
    assert_eq!(IpInfo::from_utf8(&msg.ip_value().ip), info);
    rig.daemon_answer(h, msg, HV_GUID_NOTFOUND).unwrap();
    assert_eq!(
        rig.chan.wait_sent(1),
        vec![reply_to(2, &request, HV_GUID_NOTFOUND)]
    );
}

// ---- timeout, close, the ring -----------------------------------------------------------------

#[test]
fn timeout_replies_hv_e_fail_and_the_late_answer_is_einval() {
    let rig = Rig::with_timeout(Duration::from_millis(20));
    let h = rig.daemon();
    let request = kvp(&encode_enumerate(pool::AUTO, 0));
    rig.host(1, &request);
    assert_eq!(rig.chan.wait_sent(1), vec![reply_to(1, &request, E_FAIL)]);
    wait_for("READY after the timeout", || {
        rig.dev.state() == State::Ready
    });
    // The message is still queued; the daemon reads it and its answer is spurious.
    let msg = rig.daemon_read(h);
    assert_eq!(rig.daemon_answer(h, msg, 0), Err(Errno::EINVAL));
    assert_eq!(rig.chan.sent().len(), 1);
}

#[test]
fn request_while_a_timed_out_message_is_unread_fails_at_once() {
    let rig = Rig::with_timeout(Duration::from_millis(20));
    let h = rig.daemon();
    rig.host(1, &kvp(&encode_enumerate(pool::AUTO, 0)));
    rig.chan.wait_sent(1);
    wait_for("READY after the timeout", || {
        rig.dev.state() == State::Ready
    });
    // The slot is taken (EFAULT in kvp_send_key): HV_E_FAIL at once, back to READY.
    let second = kvp(&encode_enumerate(pool::AUTO, 1));
    rig.host(2, &second);
    assert_eq!(rig.chan.sent()[1], reply_to(2, &second, E_FAIL));
    assert_eq!(rig.dev.state(), State::Ready);
    // The daemon still gets the first message.
    assert_eq!(rig.daemon_read(h).enumerate().index.get(), 0);
}

#[test]
fn close_with_a_pending_request_replies_hv_e_fail_at_once_and_unregisters() {
    let rig = Rig::new();
    let h = rig.daemon();
    let request = kvp(&encode_get(0, "k").unwrap());
    rig.host(6, &request);
    rig.dev.release(h);
    assert_eq!(rig.chan.sent(), vec![reply_to(6, &request, E_FAIL)]);
    assert!(!rig.dev.timer.is_pending());
    assert_eq!(rig.dev.state(), State::DeviceInit);
    // Open again: a new registration is needed.
    let h = rig.open();
    assert_eq!(rig.write(h, &[0; MSG_LEN]), Err(Errno::EINVAL));
}

#[test]
fn close_without_request_sends_nothing() {
    let rig = Rig::new();
    let h = rig.daemon();
    rig.dev.release(h);
    assert!(rig.chan.sent().is_empty());
    assert_eq!(rig.dev.state(), State::DeviceInit);
}

#[test]
fn request_during_a_transaction_waits_in_the_ring_until_the_answer() {
    let rig = Rig::new();
    let h = rig.daemon();
    rig.host(1, &kvp(&encode_enumerate(pool::AUTO, 0)));
    rig.host(2, &kvp(&encode_enumerate(pool::AUTO, 1)));
    assert!(rig.chan.has_pending());
    let msg = rig.daemon_read(h);
    rig.daemon_answer(h, msg, HV_S_CONT).unwrap();
    // The answer re-polled: request 2 is the daemon's now.
    assert!(!rig.chan.has_pending());
    assert_eq!(rig.daemon_read(h).enumerate().index.get(), 1);
    assert_eq!(rig.chan.sent().len(), 1);
}

#[test]
fn malformed_packets_are_dropped_without_reply() {
    let rig = Rig::new();
    rig.daemon();
    rig.chan.push_raw(1, vec![0; 24]);
    rig.dev.on_channel_callback();
    rig.chan.push_raw(2, Vec::new());
    rig.dev.on_channel_callback();
    rig.host(3, &build_ic_message(9, FW_3_0, SRV_4_0, 0, &[0; 64]));
    assert!(rig.chan.sent().is_empty());
    assert_eq!(rig.dev.state(), State::Ready);
}

#[test]
fn short_kvp_request_is_taken_and_answered_with_the_kernels_bytes() {
    // No size check beyond the IC header: a 40-byte GET is converted from whatever the
    // receive buffer holds and answered with 40 bytes (patched in place).
    let rig = Rig::new();
    let h = rig.daemon();
    let full = kvp(&encode_get(0, "k").unwrap());
    rig.host(1, &full[..40]);
    let msg = rig.daemon_read(h);
    assert_eq!(msg.hdr.operation, op::GET);
    rig.daemon_answer(h, msg, 0).unwrap();
    let sent = rig.chan.wait_sent(1);
    assert_eq!(sent[0].payload.len(), 40);
    assert_eq!(status_of(&sent[0].payload), 0);
}

#[test]
fn rescind_with_a_pending_request_sends_no_reply() {
    let rig = Rig::new();
    let h = rig.daemon();
    rig.host(3, &kvp(&encode_enumerate(0, 0)));
    let remover = {
        let dev = rig.dev.clone();
        std::thread::spawn(move || dev.on_rescind())
    };
    wait_for("rescind to wait for the close", || {
        rig.dev.hvt.destroy_waiting()
    });
    rig.dev.release(h);
    remover.join().unwrap();
    assert!(rig.chan.sent().is_empty());
}
