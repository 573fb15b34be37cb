//! hv_vss messages: the host's snapshot requests (freeze / thaw the guest's file systems), as
//! the host sends them and as `hv_vss_daemon` reads them from `/dev/vmbus/hv_vss`.
//!
//! One 12-byte struct on both sides (kvp-vss.md §1.2, UAPI-6.1): `union { hv_vss_hdr; int
//! error; }` (8 bytes) then `union { vss_cf; dm_info; }` (one u32 of flags). The host's
//! message follows the 28 IC header bytes of an `ICMSGTYPE_VSS` packet; the guest answers by
//! patching status (and, for GET_DM_INFO, the flags) and echoing the buffer. Real FREEZE
//! packets from Hyper-V carry LUN information up to 6260 bytes (AUTO_RECOVER up to 12500);
//! that is not modelled: our host sends the 12 bytes the guest reads.

use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::ic::{msgtype, IcVersion, ICMSG_HDR_LEN};
use crate::WireError;

pub use crate::ic::status::{HV_E_FAIL, HV_S_OK};

/// `ICMSGTYPE_VSS`.
pub const ICMSGTYPE_VSS: u16 = msgtype::VSS;

/// VSS operations (`enum hv_vss_op`, the `operation` byte of [`VssHdr`]).
pub mod op {
    /// `VSS_OP_CREATE`.
    pub const CREATE: u8 = 0;
    /// `VSS_OP_DELETE`.
    pub const DELETE: u8 = 1;
    /// `VSS_OP_HOT_BACKUP`: "can you do a hot backup?" (check feature).
    pub const HOT_BACKUP: u8 = 2;
    /// `VSS_OP_GET_DM_INFO`.
    pub const GET_DM_INFO: u8 = 3;
    /// `VSS_OP_BU_COMPLETE`: backup complete.
    pub const BU_COMPLETE: u8 = 4;
    /// `VSS_OP_FREEZE`: freeze the file systems.
    pub const FREEZE: u8 = 5;
    /// `VSS_OP_THAW`: thaw them.
    pub const THAW: u8 = 6;
    /// `VSS_OP_AUTO_RECOVER`.
    pub const AUTO_RECOVER: u8 = 7;
    /// `VSS_OP_COUNT`.
    pub const COUNT: u8 = 8;
    /// `VSS_OP_REGISTER`: legacy daemon registration.
    pub const REGISTER: u8 = 128;
    /// `VSS_OP_REGISTER1`: daemon registration of the 6.1 daemon (answered with the u32 129).
    pub const REGISTER1: u8 = 129;
}

/// `VSS_HBU_NO_AUTO_RECOVERY`: the HOT_BACKUP flags the kernel would set (see the quirk in
/// kvp-vss.md §5).
pub const VSS_HBU_NO_AUTO_RECOVERY: u32 = 0x5;

/// Size of [`VssMsg`]: every daemon read and write, and the host body.
pub const MSG_LEN: usize = 12;
/// Size of the registration answer the 6.1 kernel queues for the daemon (a u32).
pub const REGISTER_REPLY_LEN: usize = 4;

/// `struct hv_vss_hdr` (8 bytes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct VssHdr {
    /// [`op`].
    pub operation: u8,
    /// Reserved.
    pub reserved: [u8; 7],
}

const _: () = assert!(core::mem::size_of::<VssHdr>() == 8);

/// `struct hv_vss_msg` (12 bytes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct VssMsg {
    /// Header (its first 4 bytes double as `int error` in a daemon reply).
    pub hdr: VssHdr,
    /// `vss_cf.flags` / `dm_info.flags`.
    pub flags: U32,
}

const _: () = assert!(core::mem::size_of::<VssMsg>() == MSG_LEN);

impl VssMsg {
    /// A zeroed message carrying only `operation`: what the kernel hands its daemon for
    /// FREEZE / THAW / HOT_BACKUP (hv_snapshot.c `vss_send_op`, 6.1).
    pub fn with_op(operation: u8) -> VssMsg {
        let mut msg = VssMsg::new_zeroed();
        msg.hdr.operation = operation;
        msg
    }

    /// The message at the front of `bytes`.
    pub fn from_prefix(bytes: &[u8]) -> Result<VssMsg, WireError> {
        VssMsg::read_from_prefix(bytes)
            .map(|(msg, _)| msg)
            .map_err(|_| WireError::TooShort {
                what: "hv_vss_msg",
                need: MSG_LEN,
                got: bytes.len(),
            })
    }

    /// `error`: the int in the first 4 header bytes (a daemon reply's status).
    pub fn error(&self) -> u32 {
        let b = &self.hdr.as_bytes()[..4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Writes `error` over the first 4 header bytes (what the daemon does before replying).
    pub fn set_error(&mut self, status: u32) {
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&status.to_le_bytes());
        bytes[4..].copy_from_slice(&self.hdr.reserved[3..]);
        self.hdr = VssHdr::read_from_bytes(&bytes[..]).unwrap_or(self.hdr);
    }

    /// The 12 bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
}

/// Host side: a VSS request body (12 bytes): `operation` and the flags word.
pub fn encode_request(operation: u8, flags: u32) -> Vec<u8> {
    let mut msg = VssMsg::with_op(operation);
    msg.flags = U32::new(flags);
    msg.to_vec()
}

/// The IC versions a host puts in the header of a VSS request: framework 3.0, service 5.0
/// (the only pair the 6.1 guest offers).
pub const REQUEST_VERSIONS: (IcVersion, IcVersion) = (IcVersion::new(3, 0), IcVersion::new(5, 0));

/// Host side: a whole ICMSGTYPE_VSS inband packet (descriptor, IC headers with
/// [`REQUEST_VERSIONS`], `body`).
pub fn build_request_packet(trans_id: u64, ic_trans: u8, body: &[u8]) -> Vec<u8> {
    let message = crate::ic::build_ic_message(
        ICMSGTYPE_VSS,
        REQUEST_VERSIONS.0,
        REQUEST_VERSIONS.1,
        ic_trans,
        body,
    );
    crate::packet::encode_inband(trans_id, 0, &message)
}

/// The guest's answer to a VSS request, as the host reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VssReply {
    /// The IC header's status ([`HV_S_OK`], [`HV_E_FAIL`], ...).
    pub status: u32,
    /// The operation (echoed).
    pub operation: u8,
    /// The flags word: `vss_cf.flags` for HOT_BACKUP, `dm_info.flags` for GET_DM_INFO (the
    /// same 4 bytes).
    pub flags: u32,
}

impl VssReply {
    /// `dm_info.flags` (the guest writes 0 for GET_DM_INFO).
    pub fn dm_info_flags(&self) -> u32 {
        self.flags
    }
}

/// Host side: reads the guest's reply, `payload` being the whole packet payload (pipe and IC
/// headers, then the echoed 12 bytes; padding ignored).
pub fn parse_reply(payload: &[u8]) -> Result<VssReply, WireError> {
    let hdr = crate::ic::ic_header(payload)?;
    if hdr.icmsgtype.get() != ICMSGTYPE_VSS {
        return Err(WireError::BadValue {
            what: "vss reply icmsgtype",
            value: hdr.icmsgtype.get().into(),
        });
    }
    let body = payload.get(ICMSG_HDR_LEN..).unwrap_or(&[]);
    let msg = VssMsg::from_prefix(body)?;
    Ok(VssReply {
        status: hdr.status.get(),
        operation: msg.hdr.operation,
        flags: msg.flags.get(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn vss_sizes_and_offsets_match_uapi_6_1() {
        assert_eq!(size_of::<VssHdr>(), 8);
        assert_eq!(size_of::<VssMsg>(), 12);
        assert_eq!(offset_of!(VssHdr, operation), 0);
        assert_eq!(offset_of!(VssHdr, reserved), 1);
        assert_eq!(offset_of!(VssMsg, hdr), 0);
        assert_eq!(offset_of!(VssMsg, flags), 8);
    }

    #[test]
    fn vss_constants_match_uapi_6_1() {
        assert_eq!(
            [
                op::CREATE,
                op::DELETE,
                op::HOT_BACKUP,
                op::GET_DM_INFO,
                op::BU_COMPLETE,
                op::FREEZE,
                op::THAW,
                op::AUTO_RECOVER,
                op::COUNT
            ],
            [0, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!((op::REGISTER, op::REGISTER1), (128, 129));
        assert_eq!(VSS_HBU_NO_AUTO_RECOVERY, 5);
        assert_eq!(ICMSGTYPE_VSS, 5);
        assert_eq!(MSG_LEN, 12);
    }

    #[test]
    fn encode_request_lays_out_op_and_flags() {
        let body = encode_request(op::HOT_BACKUP, 0x0102_0304);
        assert_eq!(body, [2, 0, 0, 0, 0, 0, 0, 0, 4, 3, 2, 1]);
    }

    #[test]
    fn error_overwrites_the_first_four_bytes_only() {
        let mut msg = VssMsg::with_op(op::FREEZE);
        msg.hdr.reserved = [1, 2, 3, 4, 5, 6, 7];
        msg.flags = U32::new(9);
        msg.set_error(HV_E_FAIL);
        assert_eq!(
            msg.to_vec(),
            [0x05, 0x40, 0x00, 0x80, 4, 5, 6, 7, 9, 0, 0, 0]
        );
        assert_eq!(msg.error(), HV_E_FAIL);
        // The 6.1 daemon's status lands on the op byte: 0x00 or 0x05, never 2 (§5 quirk).
        assert_eq!(msg.hdr.operation, 0x05);
    }

    #[test]
    fn parse_reply_round_trips() {
        let packet = build_request_packet(3, 0, &encode_request(op::GET_DM_INFO, 7));
        let parsed = crate::packet::parse_packet(&packet).unwrap();
        let mut payload = parsed.payload.to_vec();
        crate::ic::set_reply(&mut payload, HV_S_OK).unwrap();
        let reply = parse_reply(&payload).unwrap();
        assert_eq!(
            reply,
            VssReply {
                status: 0,
                operation: op::GET_DM_INFO,
                flags: 7
            }
        );
        assert_eq!(reply.dm_info_flags(), 7);
    }

    #[test]
    fn parse_reply_rejects_short_or_foreign() {
        let payload = crate::ic::build_ic_message(
            ICMSGTYPE_VSS,
            IcVersion::new(3, 0),
            IcVersion::new(5, 0),
            0,
            &[0; 11],
        );
        assert!(matches!(
            parse_reply(&payload),
            Err(WireError::TooShort { need: 12, .. })
        ));
        let payload = crate::ic::build_ic_message(
            msgtype::KVPEXCHANGE,
            IcVersion::new(3, 0),
            IcVersion::new(5, 0),
            0,
            &[0; 12],
        );
        assert!(matches!(
            parse_reply(&payload),
            Err(WireError::BadValue { .. })
        ));
        assert!(VssMsg::from_prefix(&[0; 12]).is_ok());
    }
}
