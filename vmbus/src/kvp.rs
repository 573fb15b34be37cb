//! hv_kvp messages: the key-value exchange between a Hyper-V host, the guest driver and
//! `hv_kvp_daemon`.
//!
//! Two encodings of the same structs travel on the two sides of the guest driver
//! (kvp-vss.md §1.1, UAPI-6.1 `include/uapi/linux/hyperv.h`, compiled sizes):
//!
//! * **host side** (after the 28 IC header bytes of a `ICMSGTYPE_KVPEXCHANGE` packet): a
//!   [`KvpMsg`] for GET/SET/DELETE/ENUMERATE and a [`KvpIpMsg`] for GET_IP_INFO/SET_IP_INFO,
//!   strings in UTF-16LE with sizes in *bytes* including the terminating NUL unit. The guest
//!   answers by patching the buffer it received and echoing it whole, so a host request must
//!   already be full size ([`encode_get`] and friends build it; [`parse_reply`] reads the
//!   answer);
//! * **daemon side** (what `read`/`write` on `/dev/vmbus/hv_kvp` carry): always exactly
//!   [`MSG_LEN`] = 7432 bytes of [`KvpMsg`], strings in NUL-terminated UTF-8, and the first 4
//!   bytes of a reply hold the daemon's status (`union { hv_kvp_hdr; int error; }`).
//!
//! The body is a C union; [`KvpMsg`] keeps it as bytes and offers one full-size view per
//! member ([`KvpMsgExchange`], [`KvpMsgEnumerate`], [`KvpMsgDelete`], [`KvpMsgRegister`],
//! [`KvpMsgIpValue`]), converted without copying or failing (`zerocopy::transmute_ref!`).
//!
//! The kernel's UTF-8 → UTF-16 direction is [`utf8s_to_utf16s`] (fs/nls/nls_base.c); the other
//! direction is [`crate::utf16::utf16s_to_utf8s`].

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::ic::{msgtype, IcVersion, ICMSG_HDR_LEN};
use crate::utf16::units_from_le_bytes;
use crate::WireError;

pub use crate::ic::status::{HV_E_FAIL, HV_GUID_NOTFOUND, HV_S_CONT, HV_S_OK};

/// `ICMSGTYPE_KVPEXCHANGE`.
pub const ICMSGTYPE_KVPEXCHANGE: u16 = msgtype::KVPEXCHANGE;

/// KVP operations (`enum hv_kvp_exchg_op`, the `operation` byte of [`KvpHdr`]).
pub mod op {
    /// `KVP_OP_GET`: read one key of a pool.
    pub const GET: u8 = 0;
    /// `KVP_OP_SET`: write one key of a pool.
    pub const SET: u8 = 1;
    /// `KVP_OP_DELETE`: remove one key of a pool.
    pub const DELETE: u8 = 2;
    /// `KVP_OP_ENUMERATE`: the `index`-th record of a pool.
    pub const ENUMERATE: u8 = 3;
    /// `KVP_OP_GET_IP_INFO`: addresses of one adapter.
    pub const GET_IP_INFO: u8 = 4;
    /// `KVP_OP_SET_IP_INFO`: configure one adapter.
    pub const SET_IP_INFO: u8 = 5;
    /// `KVP_OP_COUNT`.
    pub const COUNT: u8 = 6;
    /// `KVP_OP_REGISTER`: legacy daemon registration; collides with [`GET_IP_INFO`].
    pub const REGISTER: u8 = 4;
    /// `KVP_OP_REGISTER1`: daemon registration of the 6.1 daemon.
    pub const REGISTER1: u8 = 100;
}

/// KVP pools (`enum hv_kvp_exchg_pool`).
pub mod pool {
    /// `KVP_POOL_EXTERNAL`: written by the host.
    pub const EXTERNAL: u8 = 0;
    /// `KVP_POOL_GUEST`: written by the guest.
    pub const GUEST: u8 = 1;
    /// `KVP_POOL_AUTO`: the daemon's built-in values (OS name, FQDN, ...).
    pub const AUTO: u8 = 2;
    /// `KVP_POOL_AUTO_EXTERNAL`.
    pub const AUTO_EXTERNAL: u8 = 3;
    /// `KVP_POOL_AUTO_INTERNAL`.
    pub const AUTO_INTERNAL: u8 = 4;
    /// `KVP_POOL_COUNT`.
    pub const COUNT: u8 = 5;
}

/// `REG_SZ`: the value is a string (UTF-16LE from the host).
pub const REG_SZ: u32 = 1;
/// `REG_U32`: the value is a little-endian u32 at the start of the value field.
pub const REG_U32: u32 = 4;
/// `REG_U64`: the value is a little-endian u64 at the start of the value field.
pub const REG_U64: u32 = 8;

/// `ADDR_FAMILY_NONE`.
pub const ADDR_FAMILY_NONE: u8 = 0x00;
/// `ADDR_FAMILY_IPV4`.
pub const ADDR_FAMILY_IPV4: u8 = 0x01;
/// `ADDR_FAMILY_IPV6`.
pub const ADDR_FAMILY_IPV6: u8 = 0x02;

/// `HV_KVP_EXCHANGE_MAX_KEY_SIZE`: bytes of a key field.
pub const MAX_KEY_SIZE: usize = 512;
/// `HV_KVP_EXCHANGE_MAX_VALUE_SIZE`: bytes of a value field.
pub const MAX_VALUE_SIZE: usize = 2048;
/// `MAX_ADAPTER_ID_SIZE`: UTF-16 units of `adapter_id`.
pub const MAX_ADAPTER_ID_SIZE: usize = 128;
/// `MAX_IP_ADDR_SIZE`: UTF-16 units of `ip_addr`, `sub_net` and `dns_addr`.
pub const MAX_IP_ADDR_SIZE: usize = 1024;
/// `MAX_GATEWAY_SIZE`: UTF-16 units of `gate_way`.
pub const MAX_GATEWAY_SIZE: usize = 512;

/// Size of [`KvpMsg`]: every daemon read and write (0x1d08 in the 6.1 daemon binary).
pub const MSG_LEN: usize = 7432;
/// Size of [`KvpIpMsg`]: a host GET_IP_INFO / SET_IP_INFO request.
pub const IP_MSG_LEN: usize = 7428;
/// Size of [`KvpHdr`].
pub const HDR_LEN: usize = 4;
/// Size of the body union of [`KvpMsg`] (7426 bytes of members, 4-byte aligned, kvp-vss.md
/// §1.1).
pub const BODY_LEN: usize = 7428;
/// Size of [`ExchgMsgValue`].
pub const EXCHG_VALUE_LEN: usize = 2572;
/// Size of [`IpAddrValue`].
pub const IPADDR_VALUE_LEN: usize = 7426;

/// The version string the 6.1 kernel answers a registration with (`HV_DRV_VERSION`).
pub const DRV_VERSION: &str = "3.1";

/// `struct hv_kvp_hdr` (4 bytes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct KvpHdr {
    /// [`op`].
    pub operation: u8,
    /// [`pool`].
    pub pool: u8,
    /// Padding.
    pub pad: U16,
}

const _: () = assert!(core::mem::size_of::<KvpHdr>() == HDR_LEN);

/// `struct hv_kvp_exchg_msg_value` (2572 bytes).
///
/// `key`/`value` are bytes because they hold UTF-16LE on the host side and UTF-8 on the daemon
/// side; `value` also holds the `value_u32`/`value_u64` union members.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct ExchgMsgValue {
    /// [`REG_SZ`], [`REG_U32`] or [`REG_U64`].
    pub value_type: U32,
    /// Bytes of `key` in use, terminator included.
    pub key_size: U32,
    /// Bytes of `value` in use, terminator included.
    pub value_size: U32,
    /// The key.
    pub key: [u8; MAX_KEY_SIZE],
    /// The value (or `value_u32` / `value_u64` at its start).
    pub value: [u8; MAX_VALUE_SIZE],
}

const _: () = assert!(core::mem::size_of::<ExchgMsgValue>() == EXCHG_VALUE_LEN);

impl ExchgMsgValue {
    /// `value_u32` (the first 4 bytes of `value`).
    pub fn value_u32(&self) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.value[..4]);
        u32::from_le_bytes(b)
    }

    /// `value_u64` (the first 8 bytes of `value`).
    pub fn value_u64(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.value[..8]);
        u64::from_le_bytes(b)
    }
}

/// `struct hv_kvp_ipaddr_value` (7426 bytes).
///
/// The string fields are bytes: UTF-16LE on the host side, and on the daemon side UTF-8
/// written into the same (twice as large) fields reinterpreted as bytes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct IpAddrValue {
    /// `adapter_id[128]` (u16 units).
    pub adapter_id: [u8; 2 * MAX_ADAPTER_ID_SIZE],
    /// [`ADDR_FAMILY_IPV4`] | [`ADDR_FAMILY_IPV6`].
    pub addr_family: u8,
    /// Whether DHCP is on.
    pub dhcp_enabled: u8,
    /// `ip_addr[1024]`: addresses separated by `;`.
    pub ip_addr: [u8; 2 * MAX_IP_ADDR_SIZE],
    /// `sub_net[1024]`.
    pub sub_net: [u8; 2 * MAX_IP_ADDR_SIZE],
    /// `gate_way[512]`.
    pub gate_way: [u8; 2 * MAX_GATEWAY_SIZE],
    /// `dns_addr[1024]`.
    pub dns_addr: [u8; 2 * MAX_IP_ADDR_SIZE],
}

const _: () = assert!(core::mem::size_of::<IpAddrValue>() == IPADDR_VALUE_LEN);

/// `struct hv_kvp_msg` (7432 bytes): header (or, in a daemon reply, `int error`) and the body
/// union as bytes. Use the views ([`KvpMsg::exchange`], ...) to read a member.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct KvpMsg {
    /// `kvp_hdr` (shares its 4 bytes with `error`).
    pub hdr: KvpHdr,
    /// The body union.
    pub body: [u8; BODY_LEN],
}

const _: () = assert!(core::mem::size_of::<KvpMsg>() == MSG_LEN);

/// [`KvpMsg`] seen as `body.kvp_get` / `body.kvp_set`: data at body offset 0.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct KvpMsgExchange {
    /// Header.
    pub hdr: KvpHdr,
    /// `body.kvp_get.data` / `body.kvp_set.data`.
    pub data: ExchgMsgValue,
    /// The rest of the union.
    pub tail: [u8; BODY_LEN - EXCHG_VALUE_LEN],
}

const _: () = assert!(core::mem::size_of::<KvpMsgExchange>() == MSG_LEN);

/// [`KvpMsg`] seen as `body.kvp_enum_data`: index, then data.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct KvpMsgEnumerate {
    /// Header.
    pub hdr: KvpHdr,
    /// `body.kvp_enum_data.index`.
    pub index: U32,
    /// `body.kvp_enum_data.data`.
    pub data: ExchgMsgValue,
    /// The rest of the union.
    pub tail: [u8; BODY_LEN - 4 - EXCHG_VALUE_LEN],
}

const _: () = assert!(core::mem::size_of::<KvpMsgEnumerate>() == MSG_LEN);

/// [`KvpMsg`] seen as `body.kvp_delete`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct KvpMsgDelete {
    /// Header.
    pub hdr: KvpHdr,
    /// `body.kvp_delete.key_size`.
    pub key_size: U32,
    /// `body.kvp_delete.key`.
    pub key: [u8; MAX_KEY_SIZE],
    /// The rest of the union.
    pub tail: [u8; BODY_LEN - 4 - MAX_KEY_SIZE],
}

const _: () = assert!(core::mem::size_of::<KvpMsgDelete>() == MSG_LEN);

/// [`KvpMsg`] seen as `body.kvp_register`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct KvpMsgRegister {
    /// Header.
    pub hdr: KvpHdr,
    /// `body.kvp_register.version`: NUL-terminated text.
    pub version: [u8; MAX_KEY_SIZE],
    /// The rest of the union.
    pub tail: [u8; BODY_LEN - MAX_KEY_SIZE],
}

const _: () = assert!(core::mem::size_of::<KvpMsgRegister>() == MSG_LEN);

/// [`KvpMsg`] seen as `body.kvp_ip_val` (the daemon side of the IP ops: value at offset 4).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct KvpMsgIpValue {
    /// Header.
    pub hdr: KvpHdr,
    /// `body.kvp_ip_val`.
    pub ip: IpAddrValue,
    /// The union's tail padding.
    pub tail: [u8; BODY_LEN - IPADDR_VALUE_LEN],
}

const _: () = assert!(core::mem::size_of::<KvpMsgIpValue>() == MSG_LEN);

/// `struct hv_kvp_ip_msg` (7428 bytes): the host-side layout of GET_IP_INFO / SET_IP_INFO,
/// value at offset 2 (right after operation and pool, no padding).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct KvpIpMsg {
    /// [`op::GET_IP_INFO`] or [`op::SET_IP_INFO`].
    pub operation: u8,
    /// Pool (unused by these ops).
    pub pool: u8,
    /// The addresses.
    pub kvp_ip_val: IpAddrValue,
}

const _: () = assert!(core::mem::size_of::<KvpIpMsg>() == IP_MSG_LEN);

impl KvpMsg {
    /// A zeroed message carrying `operation` and `pool`: how the kernel starts every message
    /// for the daemon (hv_kvp.c `kvp_send_key`, 6.1: `kzalloc`, then op and pool copied).
    pub fn with_op(operation: u8, pool: u8) -> KvpMsg {
        let mut msg = KvpMsg::new_zeroed();
        msg.hdr.operation = operation;
        msg.hdr.pool = pool;
        msg
    }

    /// A registration message: `operation` (100 or legacy 4) and `version` as NUL-terminated
    /// text at body offset 0 (cut to 511 bytes). The kernel answers a daemon's registration
    /// with `(op, "3.1")` ([`DRV_VERSION`]); the daemon's own registration has op 100.
    pub fn register(operation: u8, version: &str) -> KvpMsg {
        let mut msg = KvpMsg::with_op(operation, 0);
        put_utf8(&mut msg.register_mut().version, version);
        msg
    }

    /// The message at the front of `bytes` (a daemon write is exactly [`MSG_LEN`] bytes).
    pub fn from_prefix(bytes: &[u8]) -> Result<KvpMsg, WireError> {
        KvpMsg::read_from_prefix(bytes)
            .map(|(msg, _)| msg)
            .map_err(|_| WireError::TooShort {
                what: "hv_kvp_msg",
                need: MSG_LEN,
                got: bytes.len(),
            })
    }

    /// `error`: the int sharing the header's 4 bytes (a daemon reply's status).
    pub fn error(&self) -> u32 {
        let b = self.hdr.as_bytes();
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Writes `error` over the header (what the daemon does before replying).
    pub fn set_error(&mut self, status: u32) {
        self.hdr = KvpHdr::read_from_bytes(&status.to_le_bytes()).unwrap_or(self.hdr);
    }

    /// The whole 7432 bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }

    /// The `kvp_get` / `kvp_set` member.
    pub fn exchange(&self) -> &KvpMsgExchange {
        zerocopy::transmute_ref!(self)
    }

    /// Mutable [`KvpMsg::exchange`].
    pub fn exchange_mut(&mut self) -> &mut KvpMsgExchange {
        zerocopy::transmute_mut!(self)
    }

    /// The `kvp_enum_data` member.
    pub fn enumerate(&self) -> &KvpMsgEnumerate {
        zerocopy::transmute_ref!(self)
    }

    /// Mutable [`KvpMsg::enumerate`].
    pub fn enumerate_mut(&mut self) -> &mut KvpMsgEnumerate {
        zerocopy::transmute_mut!(self)
    }

    /// The `kvp_delete` member.
    pub fn delete(&self) -> &KvpMsgDelete {
        zerocopy::transmute_ref!(self)
    }

    /// Mutable [`KvpMsg::delete`].
    pub fn delete_mut(&mut self) -> &mut KvpMsgDelete {
        zerocopy::transmute_mut!(self)
    }

    /// The `kvp_register` member.
    pub fn register_view(&self) -> &KvpMsgRegister {
        zerocopy::transmute_ref!(self)
    }

    /// Mutable [`KvpMsg::register_view`].
    pub fn register_mut(&mut self) -> &mut KvpMsgRegister {
        zerocopy::transmute_mut!(self)
    }

    /// The `kvp_ip_val` member.
    pub fn ip_value(&self) -> &KvpMsgIpValue {
        zerocopy::transmute_ref!(self)
    }

    /// Mutable [`KvpMsg::ip_value`].
    pub fn ip_value_mut(&mut self) -> &mut KvpMsgIpValue {
        zerocopy::transmute_mut!(self)
    }

    /// The registration's version text (up to its NUL).
    pub fn version(&self) -> String {
        utf8_field(&self.register_view().version)
    }
}

/// A NUL-terminated UTF-8 field as text, up to its first NUL (the whole field if none);
/// invalid UTF-8 becomes U+FFFD. The daemon-side view of a key, value or IP field.
pub fn utf8_field(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(field.get(..end).unwrap_or(&[])).into_owned()
}

/// Writes `s` as UTF-8 into `field`, cut so that at least one NUL byte stays at the end (the
/// rest of `field` is zeroed); returns the bytes written. Daemon-side builder.
pub fn put_utf8(field: &mut [u8], s: &str) -> usize {
    let n = s.len().min(field.len().saturating_sub(1));
    field.fill(0);
    for (slot, byte) in field.iter_mut().zip(s.as_bytes().iter().take(n)) {
        *slot = *byte;
    }
    n
}

/// A UTF-16LE field as text: at most `max_units` units, up to the first NUL unit; broken
/// surrogates become U+FFFD. The host-side view of a key, value or IP field.
pub fn utf16_field(field: &[u8], max_units: usize) -> String {
    let units = units_from_le_bytes(field);
    let units = units.get(..max_units).unwrap_or(&units);
    let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
    String::from_utf16_lossy(units.get(..end).unwrap_or(&[]))
}

/// Writes `s` as UTF-16LE into `field` (rest zeroed) and returns the size in bytes including
/// the NUL unit. Errors when `s` contains NUL or does not fit with its terminator.
fn put_utf16(field: &mut [u8], s: &str, what: &'static str) -> Result<u32, WireError> {
    if s.contains('\0') {
        return Err(WireError::ContainsNul { what });
    }
    let units: Vec<u16> = s.encode_utf16().collect();
    let max = field.len() / 2 - 1;
    if units.len() > max {
        return Err(WireError::TooLong {
            what,
            max,
            got: units.len(),
        });
    }
    field.fill(0);
    for (slot, unit) in field.chunks_exact_mut(2).zip(&units) {
        slot.copy_from_slice(&unit.to_le_bytes());
    }
    // `units.len() < field.len() / 2`, far below u32::MAX.
    Ok(2 * (units.len() as u32 + 1))
}

/// The result of the kernel's `utf8s_to_utf16s()`: the units written and whether it stopped
/// at an invalid UTF-8 sequence (then it returns `-EINVAL`, after having written the units
/// before it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Utf16Conversion {
    /// Units written (host endian = little endian on x86).
    pub units: Vec<u16>,
    /// The input held an invalid sequence before the output was full.
    pub invalid: bool,
}

impl Utf16Conversion {
    /// The kernel's return value: the unit count, or `-EINVAL` (-22).
    pub fn ret(&self) -> i32 {
        if self.invalid {
            -22
        } else {
            // At most `max_out` units, which callers keep small.
            i32::try_from(self.units.len()).unwrap_or(i32::MAX)
        }
    }
}

/// `utf8s_to_utf16s(s, strlen(s), UTF16_HOST_ENDIAN, out, max_out)` of fs/nls/nls_base.c
/// (6.1): stops at a NUL byte, at the end of input or when `max_out` units are written; a
/// character outside the BMP needs two units and ends the conversion when only one is left;
/// an invalid sequence (`utf8_to_utf32` < 0: bad lead or continuation byte, truncated,
/// overlong, surrogate, > U+10FFFF) ends it with `-EINVAL`. No terminator is written.
pub fn utf8s_to_utf16s(s: &[u8], max_out: usize) -> Utf16Conversion {
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
    let s = s.get(..end).unwrap_or(&[]);
    let (valid, invalid_tail) = match core::str::from_utf8(s) {
        Ok(text) => (text, false),
        Err(e) => (
            core::str::from_utf8(s.get(..e.valid_up_to()).unwrap_or(&[])).unwrap_or(""),
            true,
        ),
    };
    let mut units = Vec::new();
    for c in valid.chars() {
        let mut buf = [0u16; 2];
        let enc = c.encode_utf16(&mut buf);
        if units.len() + enc.len() > max_out {
            // `maxout > 0` but a pair does not fit: `break`; maxout == 0 ends the loop.
            return Utf16Conversion {
                units,
                invalid: false,
            };
        }
        units.extend_from_slice(enc);
    }
    // The loop reaches the invalid sequence only with room left.
    let invalid = invalid_tail && units.len() < max_out;
    Utf16Conversion { units, invalid }
}

/// A value of a host SET request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvpValue {
    /// [`REG_SZ`]: a string (at most 1023 UTF-16 units, no NUL).
    Sz(String),
    /// [`REG_U32`].
    U32(u32),
    /// [`REG_U64`].
    U64(u64),
}

/// IP configuration of one adapter: the fields of [`IpAddrValue`] as text (host view of a
/// GET_IP_INFO reply, or the input of a SET_IP_INFO request).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpInfo {
    /// Adapter id (the MAC address for GET, the adapter GUID for SET); ≤ 127 units.
    pub adapter_id: String,
    /// [`ADDR_FAMILY_IPV4`] | [`ADDR_FAMILY_IPV6`].
    pub addr_family: u8,
    /// DHCP on (1) or off (0).
    pub dhcp_enabled: u8,
    /// Addresses, `;`-separated; ≤ 1023 units.
    pub ip_addr: String,
    /// Subnet masks; ≤ 1023 units.
    pub sub_net: String,
    /// Gateways; ≤ 511 units.
    pub gate_way: String,
    /// DNS servers; ≤ 1023 units.
    pub dns_addr: String,
}

impl IpInfo {
    /// Host view of an [`IpAddrValue`] (UTF-16LE fields).
    pub fn from_utf16(v: &IpAddrValue) -> IpInfo {
        IpInfo {
            adapter_id: utf16_field(&v.adapter_id, MAX_ADAPTER_ID_SIZE),
            addr_family: v.addr_family,
            dhcp_enabled: v.dhcp_enabled,
            ip_addr: utf16_field(&v.ip_addr, MAX_IP_ADDR_SIZE),
            sub_net: utf16_field(&v.sub_net, MAX_IP_ADDR_SIZE),
            gate_way: utf16_field(&v.gate_way, MAX_GATEWAY_SIZE),
            dns_addr: utf16_field(&v.dns_addr, MAX_IP_ADDR_SIZE),
        }
    }

    /// Daemon view of an [`IpAddrValue`] (UTF-8 fields).
    pub fn from_utf8(v: &IpAddrValue) -> IpInfo {
        IpInfo {
            adapter_id: utf8_field(&v.adapter_id),
            addr_family: v.addr_family,
            dhcp_enabled: v.dhcp_enabled,
            ip_addr: utf8_field(&v.ip_addr),
            sub_net: utf8_field(&v.sub_net),
            gate_way: utf8_field(&v.gate_way),
            dns_addr: utf8_field(&v.dns_addr),
        }
    }

    /// Writes the fields as UTF-16LE (host side). Errors when one does not fit or holds NUL.
    pub fn to_utf16(&self, v: &mut IpAddrValue) -> Result<(), WireError> {
        put_utf16(&mut v.adapter_id, &self.adapter_id, "kvp adapter_id")?;
        put_utf16(&mut v.ip_addr, &self.ip_addr, "kvp ip_addr")?;
        put_utf16(&mut v.sub_net, &self.sub_net, "kvp sub_net")?;
        put_utf16(&mut v.gate_way, &self.gate_way, "kvp gate_way")?;
        put_utf16(&mut v.dns_addr, &self.dns_addr, "kvp dns_addr")?;
        v.addr_family = self.addr_family;
        v.dhcp_enabled = self.dhcp_enabled;
        Ok(())
    }

    /// Writes the fields as NUL-terminated UTF-8 (daemon side; each cut to its field).
    pub fn to_utf8(&self, v: &mut IpAddrValue) {
        put_utf8(&mut v.adapter_id, &self.adapter_id);
        put_utf8(&mut v.ip_addr, &self.ip_addr);
        put_utf8(&mut v.sub_net, &self.sub_net);
        put_utf8(&mut v.gate_way, &self.gate_way);
        put_utf8(&mut v.dns_addr, &self.dns_addr);
        v.addr_family = self.addr_family;
        v.dhcp_enabled = self.dhcp_enabled;
    }
}

/// The full length of a host request body for `operation`: [`IP_MSG_LEN`] for the two IP ops,
/// [`MSG_LEN`] otherwise. The guest echoes exactly what it received, so this is also the
/// length of the reply body.
pub fn request_len(operation: u8) -> usize {
    match operation {
        op::GET_IP_INFO | op::SET_IP_INFO => IP_MSG_LEN,
        _ => MSG_LEN,
    }
}

/// Host side: a GET request body (7432 bytes): `key` as UTF-16LE in `kvp_get.data.key`,
/// `key_size` in bytes with the NUL unit. Errors when `key` needs more than 255 units or
/// contains NUL.
pub fn encode_get(pool: u8, key: &str) -> Result<Vec<u8>, WireError> {
    let mut msg = KvpMsg::with_op(op::GET, pool);
    let data = &mut msg.exchange_mut().data;
    data.key_size = U32::new(put_utf16(&mut data.key, key, "kvp key")?);
    Ok(msg.to_vec())
}

/// Host side: a SET request body (7432 bytes): key as for [`encode_get`], `value_type` and
/// the value (REG_SZ as UTF-16LE with `value_size` in bytes incl. the NUL unit, at most 1023
/// units; REG_U32 / REG_U64 little endian with `value_size` 4 / 8).
pub fn encode_set(pool: u8, key: &str, value: &KvpValue) -> Result<Vec<u8>, WireError> {
    let mut msg = KvpMsg::with_op(op::SET, pool);
    let data = &mut msg.exchange_mut().data;
    data.key_size = U32::new(put_utf16(&mut data.key, key, "kvp key")?);
    match value {
        KvpValue::Sz(s) => {
            data.value_type = U32::new(REG_SZ);
            data.value_size = U32::new(put_utf16(&mut data.value, s, "kvp value")?);
        }
        KvpValue::U32(v) => {
            data.value_type = U32::new(REG_U32);
            data.value_size = U32::new(4);
            data.value[..4].copy_from_slice(U32::new(*v).as_bytes());
        }
        KvpValue::U64(v) => {
            data.value_type = U32::new(REG_U64);
            data.value_size = U32::new(8);
            data.value[..8].copy_from_slice(U64::new(*v).as_bytes());
        }
    }
    Ok(msg.to_vec())
}

/// Host side: a DELETE request body (7432 bytes): key in `kvp_delete`.
pub fn encode_delete(pool: u8, key: &str) -> Result<Vec<u8>, WireError> {
    let mut msg = KvpMsg::with_op(op::DELETE, pool);
    let del = msg.delete_mut();
    del.key_size = U32::new(put_utf16(&mut del.key, key, "kvp key")?);
    Ok(msg.to_vec())
}

/// Host side: an ENUMERATE request body (7432 bytes) for record `index` of `pool`.
pub fn encode_enumerate(pool: u8, index: u32) -> Vec<u8> {
    let mut msg = KvpMsg::with_op(op::ENUMERATE, pool);
    msg.enumerate_mut().index = U32::new(index);
    msg.to_vec()
}

/// Host side: a GET_IP_INFO request body ([`IP_MSG_LEN`] = 7428 bytes, `hv_kvp_ip_msg`
/// layout, pool 0) asking for `adapter_id` (at most 127 units) and `addr_family`.
pub fn encode_get_ip_info(adapter_id: &str, addr_family: u8) -> Result<Vec<u8>, WireError> {
    let mut msg = KvpIpMsg::new_zeroed();
    msg.operation = op::GET_IP_INFO;
    put_utf16(&mut msg.kvp_ip_val.adapter_id, adapter_id, "kvp adapter_id")?;
    msg.kvp_ip_val.addr_family = addr_family;
    Ok(msg.as_bytes().to_vec())
}

/// Host side: a SET_IP_INFO request body (7428 bytes, `hv_kvp_ip_msg` layout, pool 0).
pub fn encode_set_ip_info(info: &IpInfo) -> Result<Vec<u8>, WireError> {
    let mut msg = KvpIpMsg::new_zeroed();
    msg.operation = op::SET_IP_INFO;
    info.to_utf16(&mut msg.kvp_ip_val)?;
    Ok(msg.as_bytes().to_vec())
}

/// The IC versions a host puts in the header of a KVP request: framework 3.0, service 4.0
/// (the newest pair the 6.1 guest offers; the guest does not read them).
pub const REQUEST_VERSIONS: (IcVersion, IcVersion) = (IcVersion::new(3, 0), IcVersion::new(4, 0));

/// Host side: a whole KVPEXCHANGE inband packet (descriptor, IC headers with
/// [`REQUEST_VERSIONS`], `body` from one of the `encode_*` functions).
pub fn build_request_packet(trans_id: u64, ic_trans: u8, body: &[u8]) -> Vec<u8> {
    let message = crate::ic::build_ic_message(
        ICMSGTYPE_KVPEXCHANGE,
        REQUEST_VERSIONS.0,
        REQUEST_VERSIONS.1,
        ic_trans,
        body,
    );
    crate::packet::encode_inband(trans_id, 0, &message)
}

/// The guest's answer to a KVP request, as the host reads it.
///
/// Fields that the operation does not use are zero / empty. Strings are decoded from UTF-16LE
/// up to `size / 2` units (capped at the field) and the first NUL unit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KvpReply {
    /// The IC header's status ([`HV_S_OK`], [`HV_E_FAIL`], [`HV_S_CONT`], ...).
    pub status: u32,
    /// The operation (the guest echoes the host's).
    pub operation: u8,
    /// The pool.
    pub pool: u8,
    /// ENUMERATE: the index.
    pub index: u32,
    /// GET/SET/ENUMERATE: `value_type` ([`REG_SZ`] after a successful GET or ENUMERATE).
    pub value_type: u32,
    /// GET/SET/ENUMERATE/DELETE: `key_size` in bytes.
    pub key_size: u32,
    /// GET/SET/ENUMERATE: `value_size` in bytes.
    pub value_size: u32,
    /// GET/SET/ENUMERATE/DELETE: the key.
    pub key: String,
    /// GET/SET/ENUMERATE: the value as text (REG_SZ view; see [`KvpReply::raw`] for others).
    pub value: String,
    /// GET_IP_INFO / SET_IP_INFO: the address fields.
    pub ip: Option<IpInfo>,
    /// GET/SET/ENUMERATE: the raw `data` member, for REG_U32/REG_U64 values and byte checks.
    pub raw: Option<ExchgMsgValue>,
}

fn size_units(size: u32, field_bytes: usize) -> usize {
    (size as usize / 2).min(field_bytes / 2)
}

fn reply_from_data(reply: &mut KvpReply, data: &ExchgMsgValue) {
    reply.value_type = data.value_type.get();
    reply.key_size = data.key_size.get();
    reply.value_size = data.value_size.get();
    reply.key = utf16_field(&data.key, size_units(reply.key_size, MAX_KEY_SIZE));
    reply.value = utf16_field(&data.value, size_units(reply.value_size, MAX_VALUE_SIZE));
    reply.raw = Some(*data);
}

/// Host side: reads the guest's reply, `payload` being the whole packet payload (pipe and IC
/// headers, then the echoed body; padding after it is ignored).
///
/// Errors: too short for the IC headers or for the operation's body, or not a KVPEXCHANGE
/// message.
pub fn parse_reply(payload: &[u8]) -> Result<KvpReply, WireError> {
    let hdr = crate::ic::ic_header(payload)?;
    if hdr.icmsgtype.get() != ICMSGTYPE_KVPEXCHANGE {
        return Err(WireError::BadValue {
            what: "kvp reply icmsgtype",
            value: hdr.icmsgtype.get().into(),
        });
    }
    let body = payload.get(ICMSG_HDR_LEN..).unwrap_or(&[]);
    let too_short = |what: &'static str, need: usize| WireError::TooShort {
        what,
        need,
        got: body.len(),
    };
    let (kvp_hdr, _) = KvpHdr::read_from_prefix(body).map_err(|_| too_short("hv_kvp_hdr", 4))?;
    let mut reply = KvpReply {
        status: hdr.status.get(),
        operation: kvp_hdr.operation,
        pool: kvp_hdr.pool,
        ..KvpReply::default()
    };
    let rest = body.get(HDR_LEN..).unwrap_or(&[]);
    match kvp_hdr.operation {
        op::GET | op::SET => {
            let (data, _) = ExchgMsgValue::read_from_prefix(rest)
                .map_err(|_| too_short("hv_kvp_msg_get/set", HDR_LEN + EXCHG_VALUE_LEN))?;
            reply_from_data(&mut reply, &data);
        }
        op::ENUMERATE => {
            let (index, rest) = U32::read_from_prefix(rest)
                .map_err(|_| too_short("hv_kvp_msg_enumerate", HDR_LEN + 4 + EXCHG_VALUE_LEN))?;
            let (data, _) = ExchgMsgValue::read_from_prefix(rest)
                .map_err(|_| too_short("hv_kvp_msg_enumerate", HDR_LEN + 4 + EXCHG_VALUE_LEN))?;
            reply.index = index.get();
            reply_from_data(&mut reply, &data);
        }
        op::DELETE => {
            let (key_size, rest) = U32::read_from_prefix(rest)
                .map_err(|_| too_short("hv_kvp_msg_delete", HDR_LEN + 4 + MAX_KEY_SIZE))?;
            let (key, _) = <[u8; MAX_KEY_SIZE]>::read_from_prefix(rest)
                .map_err(|_| too_short("hv_kvp_msg_delete", HDR_LEN + 4 + MAX_KEY_SIZE))?;
            reply.key_size = key_size.get();
            reply.key = utf16_field(&key, size_units(reply.key_size, MAX_KEY_SIZE));
        }
        op::GET_IP_INFO | op::SET_IP_INFO => {
            let (ip, _) = KvpIpMsg::read_from_prefix(body)
                .map_err(|_| too_short("hv_kvp_ip_msg", IP_MSG_LEN))?;
            reply.ip = Some(IpInfo::from_utf16(&ip.kvp_ip_val));
        }
        _ => {}
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn kvp_struct_sizes_match_uapi_6_1() {
        assert_eq!(size_of::<KvpHdr>(), 4);
        assert_eq!(size_of::<ExchgMsgValue>(), 2572);
        assert_eq!(size_of::<IpAddrValue>(), 7426);
        assert_eq!(size_of::<KvpMsg>(), 7432);
        assert_eq!(size_of::<KvpIpMsg>(), 7428);
        assert_eq!(MSG_LEN, 0x1d08);
    }

    #[test]
    fn kvp_field_offsets_match_spec_tables() {
        assert_eq!(offset_of!(KvpHdr, operation), 0);
        assert_eq!(offset_of!(KvpHdr, pool), 1);
        assert_eq!(offset_of!(KvpHdr, pad), 2);
        assert_eq!(offset_of!(ExchgMsgValue, value_type), 0);
        assert_eq!(offset_of!(ExchgMsgValue, key_size), 4);
        assert_eq!(offset_of!(ExchgMsgValue, value_size), 8);
        assert_eq!(offset_of!(ExchgMsgValue, key), 12);
        assert_eq!(offset_of!(ExchgMsgValue, value), 524);
        assert_eq!(offset_of!(IpAddrValue, adapter_id), 0);
        assert_eq!(offset_of!(IpAddrValue, addr_family), 256);
        assert_eq!(offset_of!(IpAddrValue, dhcp_enabled), 257);
        assert_eq!(offset_of!(IpAddrValue, ip_addr), 258);
        assert_eq!(offset_of!(IpAddrValue, sub_net), 2306);
        assert_eq!(offset_of!(IpAddrValue, gate_way), 4354);
        assert_eq!(offset_of!(IpAddrValue, dns_addr), 5378);
        assert_eq!(offset_of!(KvpIpMsg, operation), 0);
        assert_eq!(offset_of!(KvpIpMsg, pool), 1);
        assert_eq!(offset_of!(KvpIpMsg, kvp_ip_val), 2);
    }

    #[test]
    fn kvp_body_offsets_inside_hv_kvp_msg_match_spec() {
        // enumerate index @4, data.value_type @8, key_size @12, value_size @16, key @20,
        // value @532.
        assert_eq!(offset_of!(KvpMsgEnumerate, index), 4);
        assert_eq!(offset_of!(KvpMsgEnumerate, data), 8);
        assert_eq!(8 + offset_of!(ExchgMsgValue, key), 20);
        assert_eq!(8 + offset_of!(ExchgMsgValue, value), 532);
        // get/set: value_type @4, key_size @8, value_size @12, key @16, value @528.
        assert_eq!(offset_of!(KvpMsgExchange, data), 4);
        assert_eq!(4 + offset_of!(ExchgMsgValue, key), 16);
        assert_eq!(4 + offset_of!(ExchgMsgValue, value), 528);
        // delete: key_size @4, key @8; register version @4; ip value @4.
        assert_eq!(offset_of!(KvpMsgDelete, key_size), 4);
        assert_eq!(offset_of!(KvpMsgDelete, key), 8);
        assert_eq!(offset_of!(KvpMsgRegister, version), 4);
        assert_eq!(offset_of!(KvpMsgIpValue, ip), 4);
        assert_eq!(offset_of!(KvpMsg, body), 4);
    }

    #[test]
    fn kvp_constants_match_uapi_6_1() {
        assert_eq!((op::GET, op::SET, op::DELETE, op::ENUMERATE), (0, 1, 2, 3));
        assert_eq!((op::GET_IP_INFO, op::SET_IP_INFO, op::COUNT), (4, 5, 6));
        assert_eq!((op::REGISTER, op::REGISTER1), (4, 100));
        assert_eq!(
            (
                pool::EXTERNAL,
                pool::GUEST,
                pool::AUTO,
                pool::AUTO_EXTERNAL,
                pool::AUTO_INTERNAL
            ),
            (0, 1, 2, 3, 4)
        );
        assert_eq!((REG_SZ, REG_U32, REG_U64), (1, 4, 8));
        assert_eq!(
            (ADDR_FAMILY_NONE, ADDR_FAMILY_IPV4, ADDR_FAMILY_IPV6),
            (0, 1, 2)
        );
        assert_eq!((MAX_KEY_SIZE, MAX_VALUE_SIZE), (512, 2048));
        assert_eq!(ICMSGTYPE_KVPEXCHANGE, 2);
        assert_eq!(HV_E_FAIL, 0x8000_4005);
        assert_eq!(HV_S_CONT, 0x8007_0103);
        assert_eq!(HV_GUID_NOTFOUND, 0x8004_1002);
    }

    #[test]
    fn register_message_carries_op_and_version_at_offset_4() {
        let msg = KvpMsg::register(op::REGISTER1, DRV_VERSION);
        let bytes = msg.to_vec();
        assert_eq!(bytes.len(), MSG_LEN);
        assert_eq!(bytes[0], 100);
        assert_eq!(&bytes[4..8], b"3.1\0");
        assert!(bytes[8..].iter().all(|&b| b == 0));
        assert_eq!(KvpMsg::from_prefix(&bytes).unwrap().version(), "3.1");
    }

    #[test]
    fn error_shares_the_header_bytes() {
        let mut msg = KvpMsg::with_op(op::GET, pool::AUTO);
        assert_eq!(msg.error(), 0x0200);
        msg.set_error(HV_S_CONT);
        assert_eq!(&msg.to_vec()[..4], &[0x03, 0x01, 0x07, 0x80]);
        assert_eq!(msg.error(), HV_S_CONT);
    }

    #[test]
    fn from_prefix_rejects_short_daemon_writes() {
        assert_eq!(
            KvpMsg::from_prefix(&[0; 7431]),
            Err(WireError::TooShort {
                what: "hv_kvp_msg",
                need: 7432,
                got: 7431
            })
        );
    }

    #[test]
    fn encode_get_lays_out_utf16_key_with_byte_size() {
        let body = encode_get(pool::GUEST, "ké").unwrap();
        assert_eq!(body.len(), MSG_LEN);
        assert_eq!(&body[..2], &[op::GET, pool::GUEST]);
        assert_eq!(&body[8..12], &[6, 0, 0, 0]); // 2 units + NUL, in bytes
        assert_eq!(&body[16..22], &[b'k', 0, 0xe9, 0, 0, 0]);
        assert_eq!(request_len(op::GET), MSG_LEN);
    }

    #[test]
    fn encode_set_reg_sz_u32_u64() {
        let body = encode_set(pool::EXTERNAL, "a", &KvpValue::Sz("xy".into())).unwrap();
        assert_eq!(&body[4..8], &[1, 0, 0, 0]);
        assert_eq!(&body[8..12], &[4, 0, 0, 0]);
        assert_eq!(&body[12..16], &[6, 0, 0, 0]);
        assert_eq!(&body[528..534], &[b'x', 0, b'y', 0, 0, 0]);
        let body = encode_set(pool::EXTERNAL, "a", &KvpValue::U32(0xdead_beef)).unwrap();
        assert_eq!(&body[4..8], &[4, 0, 0, 0]);
        assert_eq!(&body[12..16], &[4, 0, 0, 0]);
        assert_eq!(&body[528..532], &[0xef, 0xbe, 0xad, 0xde]);
        let body = encode_set(pool::EXTERNAL, "a", &KvpValue::U64(u64::MAX - 1)).unwrap();
        assert_eq!(&body[4..8], &[8, 0, 0, 0]);
        assert_eq!(&body[12..16], &[8, 0, 0, 0]);
        let msg = KvpMsg::from_prefix(&body).unwrap();
        assert_eq!(msg.exchange().data.value_u64(), u64::MAX - 1);
    }

    #[test]
    fn encode_delete_and_enumerate_layouts() {
        let body = encode_delete(pool::GUEST, "key").unwrap();
        assert_eq!(body[0], op::DELETE);
        assert_eq!(&body[4..8], &[8, 0, 0, 0]);
        assert_eq!(&body[8..14], &[b'k', 0, b'e', 0, b'y', 0]);
        let body = encode_enumerate(pool::AUTO, 7);
        assert_eq!(body.len(), MSG_LEN);
        assert_eq!(&body[..2], &[op::ENUMERATE, pool::AUTO]);
        assert_eq!(&body[4..8], &[7, 0, 0, 0]);
        assert!(body[8..].iter().all(|&b| b == 0));
    }

    #[test]
    fn encode_ip_info_uses_hv_kvp_ip_msg_layout() {
        let body = encode_get_ip_info("00:15:5D", ADDR_FAMILY_IPV4).unwrap();
        assert_eq!(body.len(), IP_MSG_LEN);
        assert_eq!(request_len(op::GET_IP_INFO), IP_MSG_LEN);
        assert_eq!(body[0], op::GET_IP_INFO);
        assert_eq!(&body[2..6], &[b'0', 0, b'0', 0]);
        assert_eq!(body[2 + 256], ADDR_FAMILY_IPV4);
        let info = IpInfo {
            adapter_id: "{guid}".into(),
            addr_family: ADDR_FAMILY_IPV4,
            dhcp_enabled: 1,
            ip_addr: "10.0.0.2".into(),
            sub_net: "255.0.0.0".into(),
            gate_way: "10.0.0.1".into(),
            dns_addr: "10.0.0.53".into(),
        };
        let body = encode_set_ip_info(&info).unwrap();
        assert_eq!(body[0], op::SET_IP_INFO);
        assert_eq!(body[2 + 257], 1);
        assert_eq!(&body[2 + 258..2 + 262], &[b'1', 0, b'0', 0]);
        assert_eq!(&body[2 + 4354..2 + 4358], &[b'1', 0, b'0', 0]);
        let (msg, _) = KvpIpMsg::read_from_prefix(&body[..]).unwrap();
        assert_eq!(IpInfo::from_utf16(&msg.kvp_ip_val), info);
    }

    #[test]
    fn encoders_reject_long_or_nul_strings() {
        assert!(matches!(
            encode_get(0, &"k".repeat(256)),
            Err(WireError::TooLong { max: 255, .. })
        ));
        assert!(encode_get(0, &"k".repeat(255)).is_ok());
        assert!(matches!(
            encode_set(0, "k", &KvpValue::Sz("v".repeat(1024))),
            Err(WireError::TooLong { max: 1023, .. })
        ));
        assert!(matches!(
            encode_delete(0, "a\0b"),
            Err(WireError::ContainsNul { .. })
        ));
        assert!(matches!(
            encode_get_ip_info(&"a".repeat(128), 1),
            Err(WireError::TooLong { max: 127, .. })
        ));
    }

    fn reply_payload(body: &[u8], status: u32) -> Vec<u8> {
        let mut payload = crate::ic::build_ic_message(
            ICMSGTYPE_KVPEXCHANGE,
            IcVersion::new(3, 0),
            IcVersion::new(4, 0),
            0,
            body,
        );
        crate::ic::set_reply(&mut payload, status).unwrap();
        payload.extend_from_slice(&[0; 4]); // ring padding
        payload
    }

    #[test]
    fn parse_reply_round_trips_each_op() {
        let body = encode_set(pool::GUEST, "key", &KvpValue::Sz("val".into())).unwrap();
        let reply = parse_reply(&reply_payload(&body, HV_S_OK)).unwrap();
        assert_eq!(
            (reply.status, reply.operation, reply.pool),
            (0, op::SET, pool::GUEST)
        );
        assert_eq!((reply.key.as_str(), reply.value.as_str()), ("key", "val"));
        assert_eq!(
            (reply.key_size, reply.value_size, reply.value_type),
            (8, 8, 1)
        );

        let body = encode_enumerate(pool::AUTO, 3);
        let reply = parse_reply(&reply_payload(&body, HV_S_CONT)).unwrap();
        assert_eq!((reply.status, reply.index), (HV_S_CONT, 3));

        let body = encode_delete(pool::GUEST, "gone").unwrap();
        let reply = parse_reply(&reply_payload(&body, HV_S_OK)).unwrap();
        assert_eq!((reply.key.as_str(), reply.key_size), ("gone", 10));

        let body = encode_get_ip_info("mac", ADDR_FAMILY_IPV6).unwrap();
        let reply = parse_reply(&reply_payload(&body, HV_E_FAIL)).unwrap();
        let ip = reply.ip.unwrap();
        assert_eq!((ip.adapter_id.as_str(), ip.addr_family), ("mac", 2));
        assert_eq!(reply.status, HV_E_FAIL);
    }

    #[test]
    fn parse_reply_value_stops_at_size_and_nul() {
        let mut msg = KvpMsg::with_op(op::ENUMERATE, pool::AUTO);
        let data = &mut msg.enumerate_mut().data;
        for (i, u) in "abcdef".encode_utf16().enumerate() {
            data.value[2 * i..2 * i + 2].copy_from_slice(&u.to_le_bytes());
        }
        data.value_size = U32::new(6); // "ab" + NUL unit
        data.key_size = U32::new(0xffff_ffd6); // 2 * (-EINVAL + 1): capped at the field
        let reply = parse_reply(&reply_payload(&msg.to_vec(), 0)).unwrap();
        assert_eq!(reply.value, "abc");
        assert_eq!(reply.key, "");
    }

    #[test]
    fn parse_reply_rejects_short_or_foreign_messages() {
        assert!(parse_reply(&[0; 27]).is_err());
        let body = encode_get(0, "k").unwrap();
        let payload = reply_payload(&body[..100], 0);
        assert!(matches!(
            parse_reply(&payload),
            Err(WireError::TooShort { need: 2576, .. })
        ));
        let payload = crate::ic::build_ic_message(
            msgtype::VSS,
            IcVersion::new(3, 0),
            IcVersion::new(5, 0),
            0,
            &body,
        );
        assert!(matches!(
            parse_reply(&payload),
            Err(WireError::BadValue { .. })
        ));
        let ip = encode_get_ip_info("m", 1).unwrap();
        assert!(parse_reply(&reply_payload(&ip[..7000], 0)).is_err());
    }

    #[test]
    fn build_request_packet_wraps_body_in_ic_and_packet_headers() {
        let body = encode_enumerate(pool::AUTO, 0);
        let packet = build_request_packet(5, 1, &body);
        let parsed = crate::packet::parse_packet(&packet).unwrap();
        assert_eq!(parsed.trans_id, 5);
        let hdr = crate::ic::ic_header(parsed.payload).unwrap();
        assert_eq!(hdr.icmsgtype.get(), ICMSGTYPE_KVPEXCHANGE);
        assert_eq!(&parsed.payload[28..28 + MSG_LEN], &body[..]);
    }

    #[test]
    fn utf8s_to_utf16s_follows_nls_base_rules() {
        let c = utf8s_to_utf16s("a€😀".as_bytes(), 10);
        assert_eq!(c.units, vec![0x61, 0x20ac, 0xd83d, 0xde00]);
        assert_eq!(c.ret(), 4);
        // Stops at NUL and at max_out; a pair that does not fit ends the conversion.
        assert_eq!(utf8s_to_utf16s(b"ab\0cd", 10).units, vec![0x61, 0x62]);
        assert_eq!(utf8s_to_utf16s(b"abcd", 2).units, vec![0x61, 0x62]);
        let c = utf8s_to_utf16s("a😀b".as_bytes(), 2);
        assert_eq!((c.units, c.invalid), (vec![0x61], false));
        // Invalid input: -EINVAL after the units before it.
        let c = utf8s_to_utf16s(b"ab\xffcd", 10);
        assert_eq!((c.units.clone(), c.ret()), (vec![0x61, 0x62], -22));
        // Overlong, surrogate and truncated sequences are invalid too.
        assert!(utf8s_to_utf16s(b"\xc0\x80", 10).invalid);
        assert!(utf8s_to_utf16s(b"\xed\xa0\x80", 10).invalid);
        assert!(utf8s_to_utf16s(b"x\xe2\x82", 10).invalid);
        // ... unless the output filled up first.
        assert!(!utf8s_to_utf16s(b"ab\xff", 2).invalid);
    }

    #[test]
    fn utf8_helpers_cut_and_terminate() {
        let mut field = [0xffu8; 4];
        assert_eq!(put_utf8(&mut field, "abcdef"), 3);
        assert_eq!(field, *b"abc\0");
        assert_eq!(utf8_field(&field), "abc");
        assert_eq!(utf8_field(b"xyz"), "xyz");
        let mut v = IpAddrValue::new_zeroed();
        let info = IpInfo {
            adapter_id: "eth0".into(),
            ip_addr: "1.2.3.4".into(),
            ..IpInfo::default()
        };
        info.to_utf8(&mut v);
        assert_eq!(IpInfo::from_utf8(&v), info);
    }
}
