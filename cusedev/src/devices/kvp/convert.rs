//! What hv_kvp does to the bytes between host and daemon (Linux 6.1 drivers/hv/hv_kvp.c):
//! `kvp_send_key()` + `process_ib_ipinfo()` build the daemon's UTF-8 message from the host's
//! UTF-16 request, `kvp_respond_to_host()` + `process_ob_ipinfo()` patch the daemon's answer
//! back into the host's buffer (kvp-vss.md §3.3, §3.5).
//!
//! Both work on the driver's whole receive buffer, as the kernel does: the host request is
//! read in place (fields past `recvlen` read what the buffer held from earlier packets, as in
//! the kernel), and the answer is written in place before the first `recvlen` bytes are
//! echoed. No offset here comes from the host unchecked: every read and write is clipped at
//! the buffer's end, where the kernel would run past its 16 KiB allocation.
//!
//! Kernel behaviours reproduced on purpose, each cited where it happens:
//!
//! * the host's `key_size`/`value_size` (bytes) are passed to `utf16s_to_utf8s()` as the
//!   *unit* count, so up to twice the field is read (stopping at a NUL unit);
//! * REG_U32/REG_U64 become decimal text and `value_type` is not forwarded;
//! * a GET answer's value is read from the daemon's reply at the *enumerate* layout (offset
//!   532), while the 6.1 daemon writes it at the get layout (528): the first 4 bytes of a GET
//!   value are lost on the way to the host;
//! * the UTF-16 written back has no terminator (the host's own bytes stay after it), and a
//!   conversion error still leaves the sizes as `2 * (-EINVAL + 1)`;
//! * operations the driver does not know (≥ 6) are answered through the ENUMERATE path.

use vmbus::ic::ICMSG_HDR_LEN;
use vmbus::kvp::{
    op, utf8s_to_utf16s, KvpMsg, HV_E_FAIL, MAX_ADAPTER_ID_SIZE, MAX_GATEWAY_SIZE,
    MAX_IP_ADDR_SIZE, MAX_KEY_SIZE, MAX_VALUE_SIZE, REG_SZ, REG_U32, REG_U64,
};
use vmbus::utf16::{units_from_le_bytes, utf16s_to_utf8s, Overflow};
use zerocopy::little_endian::U32;
use zerocopy::IntoBytes;

/// How `utf16s_to_utf8s()` treats a character that does not fit: skipped (v6.1.0
/// fs/nls/nls_base.c; the Nov-2025 "stop" fix is unverified for Debian's 6.1.y, as for fcopy).
pub(crate) const OVERFLOW: Overflow = Overflow::Skip;

// Offsets in the receive buffer (pipe + IC headers, then the host's hv_kvp_msg).
/// `hv_kvp_hdr.operation`.
pub(crate) const OP_AT: usize = ICMSG_HDR_LEN;
/// `hv_kvp_hdr.pool`.
const POOL_AT: usize = ICMSG_HDR_LEN + 1;
/// `body.kvp_get.data` / `body.kvp_set.data`.
const GET_DATA_AT: usize = ICMSG_HDR_LEN + 4;
/// `body.kvp_enum_data.index`.
const ENUM_INDEX_AT: usize = ICMSG_HDR_LEN + 4;
/// `body.kvp_enum_data.data`.
const ENUM_DATA_AT: usize = ICMSG_HDR_LEN + 8;
/// `body.kvp_delete.key_size` (key 4 bytes later).
const DELETE_AT: usize = ICMSG_HDR_LEN + 4;
/// `hv_kvp_ip_msg.kvp_ip_val` (the host's IP layout: value right after op and pool).
const HOST_IP_AT: usize = ICMSG_HDR_LEN + 2;

// Offsets inside `hv_kvp_exchg_msg_value`.
const VALUE_TYPE: usize = 0;
const KEY_SIZE: usize = 4;
const VALUE_SIZE: usize = 8;
const KEY: usize = 12;
const VALUE: usize = 524;

// Offsets inside `hv_kvp_ipaddr_value`.
const ADAPTER_ID: usize = 0;
const ADDR_FAMILY: usize = 256;
const DHCP_ENABLED: usize = 257;
const IP_ADDR: usize = 258;
const SUB_NET: usize = 2306;
const GATE_WAY: usize = 4354;
const DNS_ADDR: usize = 5378;

// Offsets in the daemon's reply (a whole hv_kvp_msg).
/// `body.kvp_enum_data.data.key`: where the kernel reads an ENUMERATE key.
const REPLY_ENUM_KEY: usize = 4 + 4 + KEY;
/// `body.kvp_enum_data.data.value`: where the kernel reads ENUMERATE *and* GET values.
const REPLY_ENUM_VALUE: usize = 4 + 4 + VALUE;
/// `body.kvp_ip_val`.
const REPLY_IP: usize = 4;

fn byte_at(buf: &[u8], at: usize) -> u8 {
    buf.get(at).copied().unwrap_or(0)
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let b = |i: usize| byte_at(buf, at.saturating_add(i));
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from(u32_at(buf, at)) | u64::from(u32_at(buf, at.saturating_add(4))) << 32
}

/// Writes `bytes` at `at`, dropping what falls past the end.
fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = buf.get_mut(at..) {
        for (slot, byte) in dst.iter_mut().zip(bytes) {
            *slot = *byte;
        }
    }
}

fn put_u32(buf: &mut [u8], at: usize, value: u32) {
    put(buf, at, &value.to_le_bytes());
}

/// `utf16s_to_utf8s((wchar_t *)&host[at], inlen, UTF16_LITTLE_ENDIAN, out, max_out)`: the
/// bytes it produces. `inlen` is an `int` in the kernel; a host size ≥ 2³¹ is negative there
/// and converts nothing. Units past the receive buffer are taken as the end of the input.
fn utf16_in(host: &[u8], at: usize, inlen: u32, max_out: usize) -> Vec<u8> {
    // A negative int converts nothing: `while (inlen > 0 && ...)`.
    let inlen = usize::try_from(i32::try_from(inlen).unwrap_or(-1)).unwrap_or(0);
    let start = at.min(host.len());
    let end = start
        .saturating_add(inlen.saturating_mul(2))
        .min(host.len());
    let units = units_from_le_bytes(host.get(start..end).unwrap_or(&[]));
    utf16s_to_utf8s(&units, max_out, OVERFLOW)
}

/// `kvp_send_key()`: the daemon's 7432-byte message for the host request in `host` (the
/// receive buffer). A zeroed message with operation and pool copied, then per operation
/// (hv_kvp.c 6.1, kvp-vss.md §3.3).
pub(crate) fn daemon_message(host: &[u8]) -> KvpMsg {
    let operation = byte_at(host, OP_AT);
    let mut msg = KvpMsg::with_op(operation, byte_at(host, POOL_AT));
    match operation {
        op::SET_IP_INFO => ib_ipinfo(host, &mut msg, true),
        // "We only need to pass on the info of operation, adapter_id and addr_family to the
        // userland kvp daemon."
        op::GET_IP_INFO => ib_ipinfo(host, &mut msg, false),
        op::SET => {
            let value_type = u32_at(host, GET_DATA_AT + VALUE_TYPE);
            let data = &mut msg.exchange_mut().data;
            match value_type {
                REG_SZ => {
                    let utf8 = utf16_in(
                        host,
                        GET_DATA_AT + VALUE,
                        u32_at(host, GET_DATA_AT + VALUE_SIZE),
                        MAX_VALUE_SIZE - 1,
                    );
                    put(&mut data.value, 0, &utf8);
                    data.value_size = U32::new(utf8.len() as u32 + 1);
                }
                // "The value is a 32 bit scalar. We save this as a utf8 string."
                REG_U32 => {
                    let text = u32_at(host, GET_DATA_AT + VALUE).to_string();
                    put(&mut data.value, 0, text.as_bytes());
                    data.value_size = U32::new(text.len() as u32 + 1);
                }
                REG_U64 => {
                    let text = u64_at(host, GET_DATA_AT + VALUE).to_string();
                    put(&mut data.value, 0, text.as_bytes());
                    data.value_size = U32::new(text.len() as u32 + 1);
                }
                // Any other type: no value at all (the switch has no default).
                _ => {}
            }
            // value_type itself is not copied: the daemon sees 0 (hv_kvp.c 6.1).
            set_key(host, GET_DATA_AT, &mut data.key, &mut data.key_size);
        }
        op::GET => {
            let data = &mut msg.exchange_mut().data;
            set_key(host, GET_DATA_AT, &mut data.key, &mut data.key_size);
        }
        op::DELETE => {
            let del = msg.delete_mut();
            let utf8 = utf16_in(
                host,
                DELETE_AT + 4,
                u32_at(host, DELETE_AT),
                MAX_KEY_SIZE - 1,
            );
            put(&mut del.key, 0, &utf8);
            del.key_size = U32::new(utf8.len() as u32 + 1);
        }
        op::ENUMERATE => {
            msg.enumerate_mut().index = U32::new(u32_at(host, ENUM_INDEX_AT));
        }
        // Only op and pool.
        _ => {}
    }
    msg
}

/// The key of a get/set: at most 511 UTF-8 bytes, `key_size` = bytes + 1.
fn set_key(host: &[u8], data_at: usize, key: &mut [u8], key_size: &mut U32) {
    let utf8 = utf16_in(
        host,
        data_at + KEY,
        u32_at(host, data_at + KEY_SIZE),
        MAX_KEY_SIZE - 1,
    );
    put(key, 0, &utf8);
    *key_size = U32::new(utf8.len() as u32 + 1);
}

/// `process_ib_ipinfo()`: the IP fields from the host's `hv_kvp_ip_msg` (value at offset 2)
/// into the daemon's `body.kvp_ip_val` (offset 4), UTF-16 → UTF-8 into the same fields seen
/// as bytes, with the unit counts as both input length and output budget.
fn ib_ipinfo(host: &[u8], msg: &mut KvpMsg, set: bool) {
    let ip = &mut msg.ip_value_mut().ip;
    let field = |at: usize, units: usize| utf16_in(host, HOST_IP_AT + at, units as u32, units);
    if set {
        put(&mut ip.ip_addr, 0, &field(IP_ADDR, MAX_IP_ADDR_SIZE));
        put(&mut ip.sub_net, 0, &field(SUB_NET, MAX_IP_ADDR_SIZE));
        put(&mut ip.gate_way, 0, &field(GATE_WAY, MAX_GATEWAY_SIZE));
        put(&mut ip.dns_addr, 0, &field(DNS_ADDR, MAX_IP_ADDR_SIZE));
        ip.dhcp_enabled = byte_at(host, HOST_IP_AT + DHCP_ENABLED);
    }
    // fallthrough to KVP_OP_GET_IP_INFO
    put(
        &mut ip.adapter_id,
        0,
        &field(ADAPTER_ID, MAX_ADAPTER_ID_SIZE),
    );
    ip.addr_family = byte_at(host, HOST_IP_AT + ADDR_FAMILY);
}

/// `strlen()` of the string at `at` in the daemon's reply, bounded by the reply's end (the
/// kernel's would run on into the heap).
fn c_str(reply: &[u8], at: usize) -> &[u8] {
    let rest = reply.get(at..).unwrap_or(&[]);
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    rest.get(..end).unwrap_or(&[])
}

/// `utf8s_to_utf16s(src, strlen(src), UTF16_HOST_ENDIAN, &host[at], max_out)`: writes the
/// units (no terminator) and returns the kernel's return value.
fn utf16_out(host: &mut [u8], at: usize, src: &[u8], max_out: usize) -> i32 {
    let conv = utf8s_to_utf16s(src, max_out);
    put(host, at, conv.units.as_bytes());
    conv.ret()
}

/// `kvp_respond_to_host(msg_to_host, error)` minus the send: patches the answer into the
/// receive buffer `host` and returns the status for the IC header. `reply` is the daemon's
/// whole write (at least 7432 bytes), or `None` for a reply the kernel makes itself
/// (timeout, no daemon: `error` is then non-zero).
///
/// "If the error parameter is set, terminate the host's enumeration on this pool": a non-zero
/// `error` leaves the buffer as the host sent it.
pub(crate) fn respond(host: &mut [u8], reply: Option<&[u8]>, error: u32) -> u32 {
    let Some(reply) = reply.filter(|_| error == 0) else {
        return error;
    };
    let mut status = error;
    match byte_at(host, OP_AT) {
        op::GET_IP_INFO => {
            if ob_ipinfo(reply, host).is_err() {
                status = HV_E_FAIL;
            }
        }
        op::SET_IP_INFO | op::SET | op::DELETE => {}
        op::GET => {
            // kvp_data = &kvp_msg->body.kvp_get.data; goto copy_value: the key stays, the
            // value comes from msg_to_host->body.kvp_enum_data.data.value (offset 532), not
            // from the get layout the daemon wrote (528) (hv_kvp.c 6.1, as written).
            let valuelen = copy_value(host, GET_DATA_AT, reply);
            if valuelen < 0 {
                status = HV_E_FAIL;
            }
            put_u32(host, GET_DATA_AT + VALUE_TYPE, REG_SZ);
        }
        // ENUMERATE, and any operation the switch does not list ("default: break;").
        _ => {
            let keylen = utf16_out(
                host,
                ENUM_DATA_AT + KEY,
                c_str(reply, REPLY_ENUM_KEY),
                MAX_KEY_SIZE / 2 - 2,
            );
            put_u32(
                host,
                ENUM_DATA_AT + KEY_SIZE,
                keylen.wrapping_add(1).wrapping_mul(2) as u32,
            );
            let valuelen = copy_value(host, ENUM_DATA_AT, reply);
            if keylen < 0 || valuelen < 0 {
                status = HV_E_FAIL;
            }
            // "all our values are strings"
            put_u32(host, ENUM_DATA_AT + VALUE_TYPE, REG_SZ);
        }
    }
    status
}

/// `copy_value:` the daemon's value (enumerate layout) as at most 1022 UTF-16 units into the
/// host's data at `data_at`, `value_size` := 2 × (ret + 1).
fn copy_value(host: &mut [u8], data_at: usize, reply: &[u8]) -> i32 {
    let valuelen = utf16_out(
        host,
        data_at + VALUE,
        c_str(reply, REPLY_ENUM_VALUE),
        MAX_VALUE_SIZE / 2 - 2,
    );
    put_u32(
        host,
        data_at + VALUE_SIZE,
        valuelen.wrapping_add(1).wrapping_mul(2) as u32,
    );
    valuelen
}

/// `process_ob_ipinfo(..., KVP_OP_GET_IP_INFO)`: the daemon's UTF-8 IP fields to UTF-16 in
/// the host's `hv_kvp_ip_msg`, each with its field's unit count as budget (no terminator);
/// the first invalid string stops it (fields before it are already written), and only a
/// complete conversion copies dhcp_enabled and addr_family.
fn ob_ipinfo(reply: &[u8], host: &mut [u8]) -> Result<(), ()> {
    for (at, units) in [
        (IP_ADDR, MAX_IP_ADDR_SIZE),
        (SUB_NET, MAX_IP_ADDR_SIZE),
        (GATE_WAY, MAX_GATEWAY_SIZE),
        (DNS_ADDR, MAX_IP_ADDR_SIZE),
        (ADAPTER_ID, MAX_ADAPTER_ID_SIZE),
    ] {
        if utf16_out(host, HOST_IP_AT + at, c_str(reply, REPLY_IP + at), units) < 0 {
            return Err(());
        }
    }
    put(
        host,
        HOST_IP_AT + DHCP_ENABLED,
        &[byte_at(reply, REPLY_IP + DHCP_ENABLED)],
    );
    put(
        host,
        HOST_IP_AT + ADDR_FAMILY,
        &[byte_at(reply, REPLY_IP + ADDR_FAMILY)],
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmbus::kvp::{
        encode_delete, encode_enumerate, encode_get, encode_get_ip_info, encode_set,
        encode_set_ip_info, parse_reply, pool, put_utf8, utf8_field, IpInfo, KvpValue,
        ADDR_FAMILY_IPV4, MSG_LEN,
    };
    use vmbus::utf16::units_to_le_bytes;

    /// A receive buffer holding the host request `body` (IC headers, then body).
    fn host_buf(body: &[u8]) -> Vec<u8> {
        let mut buf = vmbus::ic::build_ic_message(
            vmbus::kvp::ICMSGTYPE_KVPEXCHANGE,
            vmbus::ic::IcVersion::new(3, 0),
            vmbus::ic::IcVersion::new(4, 0),
            0,
            body,
        );
        buf.resize(16384, 0);
        buf
    }

    fn reply_of(host: &[u8], status: u32) -> vmbus::kvp::KvpReply {
        let mut payload = host[..ICMSG_HDR_LEN + MSG_LEN].to_vec();
        vmbus::ic::set_reply(&mut payload, status).unwrap();
        parse_reply(&payload).unwrap()
    }

    #[test]
    fn get_sends_utf8_key_with_size_and_zeroed_rest() {
        let host = host_buf(&encode_get(pool::GUEST, "clé").unwrap());
        let msg = daemon_message(&host);
        assert_eq!((msg.hdr.operation, msg.hdr.pool), (op::GET, pool::GUEST));
        let data = msg.exchange().data;
        assert_eq!(utf8_field(&data.key), "clé");
        assert_eq!(data.key_size.get(), 5); // 4 bytes + 1
        assert_eq!(data.value_type.get(), 0);
        assert!(msg.to_vec()[16 + 4..].iter().all(|&b| b == 0));
    }

    #[test]
    fn set_reg_sz_converts_value_and_does_not_forward_value_type() {
        let host = host_buf(&encode_set(pool::EXTERNAL, "k", &KvpValue::Sz("v€".into())).unwrap());
        let data = daemon_message(&host).exchange().data;
        assert_eq!(utf8_field(&data.value), "v€");
        assert_eq!(data.value_size.get(), 5);
        assert_eq!(data.value_type.get(), 0);
        assert_eq!(
            (utf8_field(&data.key).as_str(), data.key_size.get()),
            ("k", 2)
        );
    }

    #[test]
    fn set_reg_u32_and_u64_become_decimal_text() {
        let host = host_buf(&encode_set(0, "n", &KvpValue::U32(4_000_000_000)).unwrap());
        let data = daemon_message(&host).exchange().data;
        assert_eq!(utf8_field(&data.value), "4000000000");
        assert_eq!(data.value_size.get(), 11);
        let host = host_buf(&encode_set(0, "n", &KvpValue::U64(u64::MAX)).unwrap());
        let data = daemon_message(&host).exchange().data;
        assert_eq!(utf8_field(&data.value), "18446744073709551615");
        assert_eq!(data.value_size.get(), 21);
    }

    #[test]
    fn set_with_unknown_value_type_sends_no_value() {
        let mut host = host_buf(&encode_set(0, "n", &KvpValue::Sz("x".into())).unwrap());
        put_u32(&mut host, GET_DATA_AT, 7);
        let data = daemon_message(&host).exchange().data;
        assert_eq!((data.value_size.get(), data.value[0]), (0, 0));
        assert_eq!(utf8_field(&data.key), "n");
    }

    #[test]
    fn key_size_is_taken_as_a_unit_count_and_limited_to_511_bytes() {
        // key_size 4 (bytes: one unit + NUL) lets the kernel read 4 units; a NUL stops it.
        let mut host = host_buf(&encode_get(0, "a").unwrap());
        put(
            &mut host,
            GET_DATA_AT + KEY,
            &units_to_le_bytes(&[0x61, 0x62, 0x63, 0x64, 0x65]),
        );
        let data = daemon_message(&host).exchange().data;
        assert_eq!(utf8_field(&data.key), "abcd");
        // A full 255-unit "é" key (510 bytes of UTF-8 would need 510 ≤ 511: fits); 256 units
        // of "é" read through the value field: capped at 511 bytes → 255 characters.
        let mut host = host_buf(&encode_get(0, "k").unwrap());
        put(
            &mut host,
            GET_DATA_AT + KEY,
            &units_to_le_bytes(&[0xe9; 300]),
        );
        put_u32(&mut host, GET_DATA_AT + KEY_SIZE, 600);
        let data = daemon_message(&host).exchange().data;
        assert_eq!(data.key_size.get(), 511);
        assert_eq!(data.key[510], 0);
        // A size ≥ 2^31 is a negative int: nothing converted.
        put_u32(&mut host, GET_DATA_AT + KEY_SIZE, 0x8000_0000);
        assert_eq!(daemon_message(&host).exchange().data.key_size.get(), 1);
    }

    #[test]
    fn delete_and_enumerate_messages() {
        let host = host_buf(&encode_delete(pool::GUEST, "gone").unwrap());
        let msg = daemon_message(&host);
        let del = msg.delete();
        assert_eq!(
            (utf8_field(&del.key).as_str(), del.key_size.get()),
            ("gone", 5)
        );
        let host = host_buf(&encode_enumerate(pool::AUTO, 9));
        let msg = daemon_message(&host);
        assert_eq!(msg.enumerate().index.get(), 9);
        assert_eq!(msg.hdr.pool, pool::AUTO);
    }

    #[test]
    fn ip_info_requests_move_from_offset_2_to_offset_4() {
        let host = host_buf(&encode_get_ip_info("00:15:5D:00:00:01", ADDR_FAMILY_IPV4).unwrap());
        let msg = daemon_message(&host);
        let ip = IpInfo::from_utf8(&msg.ip_value().ip);
        assert_eq!(ip.adapter_id, "00:15:5D:00:00:01");
        assert_eq!(ip.addr_family, ADDR_FAMILY_IPV4);
        let info = IpInfo {
            adapter_id: "{a}".into(),
            addr_family: 1,
            dhcp_enabled: 1,
            ip_addr: "10.0.0.2;10.0.0.3".into(),
            sub_net: "255.0.0.0".into(),
            gate_way: "10.0.0.1".into(),
            dns_addr: "1.1.1.1".into(),
        };
        let host = host_buf(&encode_set_ip_info(&info).unwrap());
        let msg = daemon_message(&host);
        assert_eq!(IpInfo::from_utf8(&msg.ip_value().ip), info);
        // GET_IP_INFO passes only adapter and family.
        let mut host = host_buf(&encode_set_ip_info(&info).unwrap());
        host[OP_AT] = op::GET_IP_INFO;
        let ip = IpInfo::from_utf8(&daemon_message(&host).ip_value().ip);
        assert_eq!((ip.ip_addr.as_str(), ip.dhcp_enabled), ("", 0));
    }

    fn daemon_reply<R>(f: impl FnOnce(&mut KvpMsg) -> R) -> Vec<u8> {
        let mut msg = KvpMsg::with_op(0, 0);
        f(&mut msg);
        msg.set_error(0);
        msg.to_vec()
    }

    #[test]
    fn enumerate_answer_is_utf16_with_byte_sizes_and_reg_sz() {
        let mut host = host_buf(&encode_enumerate(pool::AUTO, 5));
        let reply = daemon_reply(|m| {
            let d = &mut m.enumerate_mut().data;
            put_utf8(&mut d.key, "OSName");
            put_utf8(&mut d.value, "Debian GNU/Linux");
        });
        assert_eq!(respond(&mut host, Some(&reply), 0), 0);
        let r = reply_of(&host, 0);
        assert_eq!(
            (r.key.as_str(), r.value.as_str()),
            ("OSName", "Debian GNU/Linux")
        );
        assert_eq!((r.key_size, r.value_size, r.value_type), (14, 34, REG_SZ));
    }

    #[test]
    fn get_answer_loses_the_first_four_value_bytes() {
        let mut host = host_buf(&encode_get(pool::GUEST, "key").unwrap());
        // The 6.1 daemon writes the value at the get layout (528)...
        let reply = daemon_reply(|m| put_utf8(&mut m.exchange_mut().data.value, "abcdefgh"));
        respond(&mut host, Some(&reply), 0);
        let r = reply_of(&host, 0);
        // ...the kernel reads it at 532: "efgh". The key is the host's own.
        assert_eq!((r.key.as_str(), r.value.as_str()), ("key", "efgh"));
        assert_eq!((r.value_size, r.value_type), (10, REG_SZ));
    }

    #[test]
    fn answer_caps_units_and_writes_no_terminator() {
        let mut host = host_buf(&encode_enumerate(pool::AUTO, 0));
        put(&mut host, ENUM_DATA_AT + KEY, &[0xff; MAX_KEY_SIZE]);
        let reply = daemon_reply(|m| {
            let d = &mut m.enumerate_mut().data;
            put_utf8(&mut d.key, &"k".repeat(300));
            put_utf8(&mut d.value, &"v".repeat(2000));
        });
        respond(&mut host, Some(&reply), 0);
        let r = reply_of(&host, 0);
        assert_eq!((r.key_size, r.value_size), (2 * 255, 2 * 1023));
        assert_eq!(r.value.len(), 1022);
        // The unit after the 254 written is the host's own 0xffff, not a NUL.
        assert_eq!(
            &host[ENUM_DATA_AT + KEY + 508..ENUM_DATA_AT + KEY + 510],
            &[0xff, 0xff]
        );
    }

    #[test]
    fn invalid_utf8_from_the_daemon_is_hv_e_fail_with_negative_sizes() {
        let mut host = host_buf(&encode_enumerate(pool::AUTO, 0));
        let reply = daemon_reply(|m| {
            let d = &mut m.enumerate_mut().data;
            put(&mut d.key, 0, b"ok\xff");
            put_utf8(&mut d.value, "fine");
        });
        assert_eq!(respond(&mut host, Some(&reply), 0), HV_E_FAIL);
        let r = reply_of(&host, HV_E_FAIL);
        assert_eq!(r.key_size, 0xffff_ffd6); // 2 * (-EINVAL + 1)
        assert_eq!((r.value.as_str(), r.value_type), ("fine", REG_SZ));
    }

    #[test]
    fn error_echoes_the_host_buffer() {
        let body = encode_enumerate(pool::GUEST, 3);
        let mut host = host_buf(&body);
        let before = host.clone();
        let reply = daemon_reply(|_| {});
        assert_eq!(
            respond(&mut host, Some(&reply), vmbus::kvp::HV_S_CONT),
            vmbus::kvp::HV_S_CONT
        );
        assert_eq!(host, before);
        assert_eq!(respond(&mut host, None, HV_E_FAIL), HV_E_FAIL);
        assert_eq!(host, before);
    }

    #[test]
    fn set_and_delete_answers_are_echo_only() {
        for body in [
            encode_set(0, "k", &KvpValue::Sz("v".into())).unwrap(),
            encode_delete(0, "k").unwrap(),
        ] {
            let mut host = host_buf(&body);
            let before = host.clone();
            let reply = daemon_reply(|m| put_utf8(&mut m.enumerate_mut().data.value, "junk"));
            assert_eq!(respond(&mut host, Some(&reply), 0), 0);
            assert_eq!(host, before);
        }
    }

    #[test]
    fn get_ip_info_answer_fills_utf16_fields() {
        let mut host = host_buf(&encode_get_ip_info("mac", ADDR_FAMILY_IPV4).unwrap());
        let info = IpInfo {
            adapter_id: "eth0-mac".into(),
            addr_family: 1,
            dhcp_enabled: 1,
            ip_addr: "192.168.0.2".into(),
            sub_net: "255.255.255.0".into(),
            gate_way: "192.168.0.1".into(),
            dns_addr: "192.168.0.53".into(),
        };
        let reply = daemon_reply(|m| info.to_utf8(&mut m.ip_value_mut().ip));
        assert_eq!(respond(&mut host, Some(&reply), 0), 0);
        let mut payload = host[..ICMSG_HDR_LEN + vmbus::kvp::IP_MSG_LEN].to_vec();
        vmbus::ic::set_reply(&mut payload, 0).unwrap();
        assert_eq!(parse_reply(&payload).unwrap().ip, Some(info));
    }

    #[test]
    fn get_ip_info_invalid_field_stops_before_family_and_dhcp() {
        let mut host = host_buf(&encode_get_ip_info("mac", 0).unwrap());
        let reply = daemon_reply(|m| {
            let ip = &mut m.ip_value_mut().ip;
            put_utf8(&mut ip.ip_addr, "1.2.3.4");
            put(&mut ip.gate_way, 0, b"\xc0\x80");
            ip.addr_family = 2;
            ip.dhcp_enabled = 1;
        });
        assert_eq!(respond(&mut host, Some(&reply), 0), HV_E_FAIL);
        let mut payload = host[..ICMSG_HDR_LEN + vmbus::kvp::IP_MSG_LEN].to_vec();
        vmbus::ic::set_reply(&mut payload, 0).unwrap();
        let ip = parse_reply(&payload).unwrap().ip.unwrap();
        assert_eq!(
            (ip.ip_addr.as_str(), ip.addr_family, ip.dhcp_enabled),
            ("1.2.3.4", 0, 0)
        );
        // The adapter id after the failing field is still the host's.
        assert_eq!(ip.adapter_id, "mac");
    }

    #[test]
    fn unknown_operation_is_answered_through_the_enumerate_path() {
        let mut body = encode_enumerate(0, 0);
        body[0] = 42;
        let mut host = host_buf(&body);
        let reply = daemon_reply(|_| {});
        assert_eq!(respond(&mut host, Some(&reply), 0), 0);
        assert_eq!(u32_at(&host, ENUM_DATA_AT + KEY_SIZE), 2);
        assert_eq!(u32_at(&host, ENUM_DATA_AT + VALUE_SIZE), 2);
        assert_eq!(u32_at(&host, ENUM_DATA_AT + VALUE_TYPE), REG_SZ);
        // And the daemon got only op and pool.
        assert!(daemon_message(&host).to_vec()[1..].iter().all(|&b| b == 0));
    }

    #[test]
    fn conversions_never_read_or_write_past_the_buffer() {
        let mut short = vec![0u8; 40];
        short[OP_AT] = op::SET;
        put_u32(&mut short, GET_DATA_AT + KEY_SIZE, u32::MAX / 4);
        let _ = daemon_message(&short);
        short[OP_AT] = op::SET_IP_INFO;
        let _ = daemon_message(&short);
        let reply = daemon_reply(|m| put_utf8(&mut m.enumerate_mut().data.value, "x"));
        for operation in 0..8 {
            short[OP_AT] = operation;
            let _ = respond(&mut short, Some(&reply), 0);
            let _ = respond(&mut short, Some(&reply[..10]), 0);
        }
        assert_eq!(short.len(), 40);
    }
}
