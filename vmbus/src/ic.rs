//! IC ("integration component") message framing inside an inband packet's payload.
//!
//! Every util service message is `vmbuspipe_hdr` (8 bytes) + `icmsg_hdr` (20 bytes) + the
//! service's own message at offset [`ICMSG_HDR_LEN`] = 28. The Linux util drivers never build
//! a message from scratch: they answer by patching `status` and `icflags` in the buffer they
//! received and sending the whole buffer back (icmsg-vmbus.md §2, include/linux/hyperv.h).

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::WireError;

/// `struct vmbuspipe_hdr` (8 bytes). Linux echoes it untouched.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct PipeHeader {
    /// Pipe flags (0 from our host).
    pub flags: U32,
    /// Bytes after this header (20 + the service message).
    pub msgsize: U32,
}

const _: () = assert!(core::mem::size_of::<PipeHeader>() == 8);

/// `struct ic_version` as stored on the wire (4 bytes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct IcVersionLe {
    /// Major version.
    pub major: U16,
    /// Minor version.
    pub minor: U16,
}

const _: () = assert!(core::mem::size_of::<IcVersionLe>() == 4);

/// `struct icmsg_hdr` (20 bytes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct IcMsgHdr {
    /// Framework version of this message.
    pub icverframe: IcVersionLe,
    /// [`msgtype`].
    pub icmsgtype: U16,
    /// Service message version.
    pub icvermsg: IcVersionLe,
    /// Size of the service message after the 28 header bytes (the negotiate reply sets 0x10).
    pub icmsgsize: U16,
    /// HRESULT; the guest writes its result here ([`status`]).
    pub status: U32,
    /// Transaction id of the IC layer (not the VMBus one).
    pub ictransaction_id: u8,
    /// [`icflags`].
    pub icflags: u8,
    /// Reserved.
    pub reserved: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<IcMsgHdr>() == 20);

/// Size of [`PipeHeader`].
pub const PIPE_HDR_LEN: usize = 8;
/// `ICMSG_HDR`: pipe header + IC header; the service message starts here.
pub const ICMSG_HDR_LEN: usize = 28;

/// `ICMSGTYPE_*`: what the service message is.
pub mod msgtype {
    /// Version negotiation (every service).
    pub const NEGOTIATE: u16 = 0;
    /// Heartbeat.
    pub const HEARTBEAT: u16 = 1;
    /// KVP exchange.
    pub const KVPEXCHANGE: u16 = 2;
    /// Shutdown.
    pub const SHUTDOWN: u16 = 3;
    /// Time sync.
    pub const TIMESYNC: u16 = 4;
    /// VSS.
    pub const VSS: u16 = 5;
    /// File copy.
    pub const FCOPY: u16 = 7;
}

/// `ICMSGHDRFLAG_*`.
pub mod icflags {
    /// Part of a transaction.
    pub const TRANSACTION: u8 = 0x1;
    /// A request (host → guest).
    pub const REQUEST: u8 = 0x2;
    /// A response (guest → host).
    pub const RESPONSE: u8 = 0x4;
}

/// HRESULT status codes of the util services (UAPI-6.1 `include/uapi/linux/hyperv.h`,
/// icmsg-vmbus.md §3).
pub mod status {
    /// Success.
    pub const HV_S_OK: u32 = 0x0000_0000;
    /// Generic failure (timeouts, no daemon, daemon failure).
    pub const HV_E_FAIL: u32 = 0x8000_4005;
    /// kvp: "no more items" (also used as a failure).
    pub const HV_S_CONT: u32 = 0x8007_0103;
    /// Not supported.
    pub const HV_ERROR_NOT_SUPPORTED: u32 = 0x8007_0032;
    /// Machine locked.
    pub const HV_ERROR_MACHINE_LOCKED: u32 = 0x8007_04F7;
    /// Device not connected.
    pub const HV_ERROR_DEVICE_NOT_CONNECTED: u32 = 0x8007_048F;
    /// Invalid argument.
    pub const HV_INVALIDARG: u32 = 0x8007_0057;
    /// kvp SET_IP_INFO: adapter not found.
    pub const HV_GUID_NOTFOUND: u32 = 0x8004_1002;
    /// fcopy: target file exists and OVER_WRITE was not set.
    pub const HV_ERROR_ALREADY_EXISTS: u32 = 0x8007_0050;
    /// fcopy: no space left (6.1 daemon only).
    pub const HV_ERROR_DISK_FULL: u32 = 0x8007_0070;
}

/// A short human meaning of a status code, for logs and the host CLI.
pub fn status_meaning(code: u32) -> &'static str {
    match code {
        status::HV_S_OK => "success",
        status::HV_E_FAIL => "failure",
        status::HV_S_CONT => "no more items",
        status::HV_ERROR_NOT_SUPPORTED => "not supported",
        status::HV_ERROR_MACHINE_LOCKED => "machine locked",
        status::HV_ERROR_DEVICE_NOT_CONNECTED => "device not connected",
        status::HV_INVALIDARG => "invalid argument",
        status::HV_GUID_NOTFOUND => "not found",
        status::HV_ERROR_ALREADY_EXISTS => "file exists",
        status::HV_ERROR_DISK_FULL => "disk full",
        _ => "unknown status",
    }
}

/// An IC version (`major.minor`). The kernel's version tables encode it as
/// `major << 16 | minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct IcVersion {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
}

impl IcVersion {
    /// `major.minor`.
    pub const fn new(major: u16, minor: u16) -> IcVersion {
        IcVersion { major, minor }
    }

    /// `major << 16 | minor`, as in the kernel's `fw_versions[]` tables.
    pub const fn to_u32(self) -> u32 {
        (self.major as u32) << 16 | self.minor as u32
    }

    /// Inverse of [`IcVersion::to_u32`].
    pub const fn from_u32(value: u32) -> IcVersion {
        IcVersion {
            major: (value >> 16) as u16,
            minor: (value & 0xffff) as u16,
        }
    }
}

impl core::fmt::Display for IcVersion {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl From<IcVersionLe> for IcVersion {
    fn from(v: IcVersionLe) -> IcVersion {
        IcVersion::new(v.major.get(), v.minor.get())
    }
}

impl From<IcVersion> for IcVersionLe {
    fn from(v: IcVersion) -> IcVersionLe {
        IcVersionLe {
            major: U16::new(v.major),
            minor: U16::new(v.minor),
        }
    }
}

fn too_short_for_ic(payload: &[u8]) -> WireError {
    WireError::TooShort {
        what: "IC message (pipe + icmsg_hdr)",
        need: ICMSG_HDR_LEN,
        got: payload.len(),
    }
}

/// The pipe header at the start of a payload.
pub fn pipe_header(payload: &[u8]) -> Result<PipeHeader, WireError> {
    PipeHeader::read_from_prefix(payload)
        .map(|(hdr, _)| hdr)
        .map_err(|_| WireError::TooShort {
            what: "vmbuspipe_hdr",
            need: PIPE_HDR_LEN,
            got: payload.len(),
        })
}

/// The IC header of a payload (pipe header + IC header + ...); needs at least 28 bytes.
pub fn ic_header(payload: &[u8]) -> Result<IcMsgHdr, WireError> {
    payload
        .get(PIPE_HDR_LEN..)
        .and_then(|rest| IcMsgHdr::read_from_prefix(rest).ok())
        .map(|(hdr, _)| hdr)
        .ok_or_else(|| too_short_for_ic(payload))
}

/// Mutable view of the IC header inside a payload.
pub fn ic_header_mut(payload: &mut [u8]) -> Result<&mut IcMsgHdr, WireError> {
    let err = too_short_for_ic(payload);
    payload
        .get_mut(PIPE_HDR_LEN..ICMSG_HDR_LEN)
        .and_then(|bytes| IcMsgHdr::mut_from_bytes(bytes).ok())
        .ok_or(err)
}

/// Turns a received IC message into the guest's reply, in place: `status := status`,
/// `icflags := TRANSACTION | RESPONSE` (0x05, overwriting the host's flags). Every Linux util
/// driver does exactly this before echoing the buffer (hv_fcopy.c, hv_kvp.c, hv_snapshot.c,
/// hv_util.c, 6.1).
pub fn set_reply(payload: &mut [u8], status: u32) -> Result<(), WireError> {
    let hdr = ic_header_mut(payload)?;
    hdr.status = U32::new(status);
    hdr.icflags = icflags::TRANSACTION | icflags::RESPONSE;
    Ok(())
}

/// Like [`set_reply`] but leaves `status` as the host sent it: the negotiate reply does that
/// (channel_mgmt.c / the util callbacks never write status for ICMSGTYPE_NEGOTIATE, 6.1).
pub fn set_response_flags(payload: &mut [u8]) -> Result<(), WireError> {
    ic_header_mut(payload)?.icflags = icflags::TRANSACTION | icflags::RESPONSE;
    Ok(())
}

/// Builds a host request: pipe header `{flags 0, msgsize 20 + body.len()}`, IC header with
/// `icflags = TRANSACTION | REQUEST`, `icmsgsize = body.len()`, status 0, then `body`.
///
/// Never panics: a body too large for the u16 `icmsgsize` (or u32 `msgsize`) saturates that
/// field. Linux util drivers do not read either field, and such a message could not fit a
/// util receive buffer anyway.
pub fn build_ic_message(
    icmsgtype: u16,
    fw: IcVersion,
    msg: IcVersion,
    trans: u8,
    body: &[u8],
) -> Vec<u8> {
    let pipe = PipeHeader {
        flags: U32::new(0),
        msgsize: U32::new(
            u32::try_from(core::mem::size_of::<IcMsgHdr>() + body.len()).unwrap_or(u32::MAX),
        ),
    };
    let hdr = IcMsgHdr {
        icverframe: fw.into(),
        icmsgtype: U16::new(icmsgtype),
        icvermsg: msg.into(),
        icmsgsize: U16::new(u16::try_from(body.len()).unwrap_or(u16::MAX)),
        status: U32::new(status::HV_S_OK),
        ictransaction_id: trans,
        icflags: icflags::TRANSACTION | icflags::REQUEST,
        reserved: [0; 2],
    };
    let mut out = Vec::with_capacity(ICMSG_HDR_LEN + body.len());
    out.extend_from_slice(pipe.as_bytes());
    out.extend_from_slice(hdr.as_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn pipe_header_offsets_match_spec() {
        assert_eq!(offset_of!(PipeHeader, flags), 0);
        assert_eq!(offset_of!(PipeHeader, msgsize), 4);
    }

    #[test]
    fn icmsg_hdr_offsets_match_spec() {
        assert_eq!(core::mem::size_of::<IcMsgHdr>(), 20);
        assert_eq!(offset_of!(IcMsgHdr, icverframe), 0);
        assert_eq!(offset_of!(IcMsgHdr, icmsgtype), 4);
        assert_eq!(offset_of!(IcMsgHdr, icvermsg), 6);
        assert_eq!(offset_of!(IcMsgHdr, icmsgsize), 10);
        assert_eq!(offset_of!(IcMsgHdr, status), 12);
        assert_eq!(offset_of!(IcMsgHdr, ictransaction_id), 16);
        assert_eq!(offset_of!(IcMsgHdr, icflags), 17);
        assert_eq!(offset_of!(IcMsgHdr, reserved), 18);
        assert_eq!(offset_of!(IcVersionLe, major), 0);
        assert_eq!(offset_of!(IcVersionLe, minor), 2);
        assert_eq!(
            PIPE_HDR_LEN + core::mem::size_of::<IcMsgHdr>(),
            ICMSG_HDR_LEN
        );
    }

    #[test]
    fn ic_version_u32_encoding_is_major_shl_16_or_minor() {
        assert_eq!(IcVersion::new(3, 0).to_u32(), 0x0003_0000);
        assert_eq!(IcVersion::new(1, 1).to_u32(), 0x0001_0001);
        assert_eq!(IcVersion::from_u32(0x0005_0002), IcVersion::new(5, 2));
        assert_eq!(IcVersion::new(3, 2).to_string(), "3.2");
    }

    #[test]
    fn build_ic_message_lays_out_headers() {
        let msg = build_ic_message(
            msgtype::FCOPY,
            IcVersion::new(3, 0),
            IcVersion::new(1, 1),
            9,
            &[0xab; 36],
        );
        assert_eq!(msg.len(), 28 + 36);
        assert_eq!(&msg[0..8], &[0, 0, 0, 0, 56, 0, 0, 0]);
        assert_eq!(
            &msg[8..28],
            &[3, 0, 0, 0, 7, 0, 1, 0, 1, 0, 36, 0, 0, 0, 0, 0, 9, 0x03, 0, 0]
        );
        let hdr = ic_header(&msg).unwrap();
        assert_eq!(hdr.icmsgtype.get(), msgtype::FCOPY);
        assert_eq!(IcVersion::from(hdr.icverframe), IcVersion::new(3, 0));
        assert_eq!(IcVersion::from(hdr.icvermsg), IcVersion::new(1, 1));
        assert_eq!(pipe_header(&msg).unwrap().msgsize.get(), 56);
    }

    #[test]
    fn set_reply_writes_status_and_flags_0x05_only() {
        let mut msg = build_ic_message(
            msgtype::FCOPY,
            IcVersion::new(3, 0),
            IcVersion::new(1, 1),
            9,
            &[0xab; 36],
        );
        let before = msg.clone();
        set_reply(&mut msg, status::HV_ERROR_ALREADY_EXISTS).unwrap();
        assert_eq!(&msg[20..24], &[0x50, 0x00, 0x07, 0x80]);
        assert_eq!(msg[25], 0x05);
        // Nothing else changed.
        let changed: Vec<usize> = (0..msg.len()).filter(|&i| msg[i] != before[i]).collect();
        assert_eq!(changed, vec![20, 22, 23, 25]);
    }

    #[test]
    fn set_response_flags_keeps_status() {
        let mut msg = build_ic_message(0, IcVersion::new(3, 0), IcVersion::new(1, 1), 0, &[]);
        msg[20] = 0x42;
        set_response_flags(&mut msg).unwrap();
        assert_eq!(ic_header(&msg).unwrap().status.get(), 0x42);
        assert_eq!(msg[25], 0x05);
    }

    #[test]
    fn ic_header_short_payload_is_too_short() {
        for len in [0, 8, 27] {
            let expected = Err(WireError::TooShort {
                what: "IC message (pipe + icmsg_hdr)",
                need: 28,
                got: len,
            });
            assert_eq!(ic_header(&vec![0; len]), expected);
            assert_eq!(
                set_reply(&mut vec![0; len], 0),
                expected.clone().map(|_| ())
            );
            assert_eq!(
                set_response_flags(&mut vec![0; len]),
                expected.clone().map(|_| ())
            );
        }
        assert!(pipe_header(&[0; 7]).is_err());
        assert!(ic_header(&[0; 28]).is_ok());
    }

    #[test]
    fn status_meaning_names_fcopy_results() {
        assert_eq!(status_meaning(status::HV_S_OK), "success");
        assert_eq!(status_meaning(status::HV_E_FAIL), "failure");
        assert_eq!(
            status_meaning(status::HV_ERROR_ALREADY_EXISTS),
            "file exists"
        );
        assert_eq!(status_meaning(status::HV_ERROR_DISK_FULL), "disk full");
        assert_eq!(status_meaning(0x1234_5678), "unknown status");
    }

    #[test]
    fn status_values_match_uapi_6_1() {
        assert_eq!(status::HV_S_CONT, 0x80070103);
        assert_eq!(status::HV_ERROR_NOT_SUPPORTED, 0x80070032);
        assert_eq!(status::HV_ERROR_MACHINE_LOCKED, 0x800704F7);
        assert_eq!(status::HV_ERROR_DEVICE_NOT_CONNECTED, 0x8007048F);
        assert_eq!(status::HV_INVALIDARG, 0x80070057);
        assert_eq!(status::HV_GUID_NOTFOUND, 0x80041002);
    }
}
