//! The Azure XStore fastpath: its ioctl argument, the VSP request and response, and the
//! `VM_PKT_DATA_USING_GPA_DIRECT` packet that carries them (xs_fastpath.md §2, from the posted
//! 2021 patch "Drivers: hv: add XStore Fastpath driver" and include/linux/hyperv.h of 5.13).
//!
//! The driver pins three user buffers (data, request, response), sends one packet naming
//! every pinned page by frame number, and the VSP reads and writes the pages in place; only
//! the 12-byte response comes back in the ring. [`encode_request_packet`] builds that packet
//! to the byte, [`parse_request_packet`] is the host's reading of it.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::guid::Guid;
use crate::packet::{packet_type, FLAG_COMPLETION_REQUESTED};
use crate::WireError;

/// `IOCTL_XS_FASTPATH_DRIVER_USER_REQUEST` = `_IOWR('R', 10, struct xs_fastpath_request_sync)`.
pub const IOCTL_USER_REQUEST: u32 = 0xC040_520A;
/// `XS_FASTPATH_DRIVER_USER_REQUEST`, the only operation type the driver sends.
pub const OP_USER_REQUEST: u32 = 0x100;
/// `XS_FASTPATH_MAX_PAGES`: the cap on data + request + response pages of one call.
pub const MAX_PAGES: u64 = 8192;
/// The Hyper-V page size the PFNs and offsets are in.
pub const HV_PAGE_SIZE: u64 = 4096;
/// `xs_fastpath_ringbuffer_size`'s default: 128 KiB for each ring direction.
pub const RING_BYTES: usize = 128 << 10;
/// Size of [`VspRequest`] on the wire.
pub const VSP_REQUEST_LEN: usize = 56;
/// Size of [`VspResponse`] on the wire.
pub const VSP_RESPONSE_LEN: usize = 12;
/// The ioctl argument's size.
pub const REQUEST_SYNC_LEN: usize = 64;
/// Offset of `response.status` in the ioctl argument: one of the two words written back.
pub const STATUS_OFFSET: u64 = 56;
/// Offset of `response.response_len` in the ioctl argument.
pub const RESPONSE_LEN_OFFSET: u64 = 60;
/// The requestor's slot count: ring size / request size (`rqstor_size` in the patch's probe).
pub const REQUESTOR_SLOTS: u64 = RING_BYTES as u64 / VSP_REQUEST_LEN as u64;

/// `struct xs_fastpath_request_sync`, the ioctl argument (64 bytes, alignment 8).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct RequestSync {
    /// Copied verbatim into the VSP request's `transaction_id`.
    pub guid: Guid,
    /// Passed to the VSP as `timeout_ms`; the posted patch does not validate it.
    pub timeout: U32,
    /// Request buffer length; must be non-zero.
    pub request_len: U32,
    /// Response buffer length; must be non-zero.
    pub response_len: U32,
    /// Data buffer length; 0: no data buffer.
    pub data_len: U32,
    /// User address of the request buffer.
    pub request_buffer: U64,
    /// User address of the response buffer.
    pub response_buffer: U64,
    /// User address of the data buffer (ignored when `data_len` is 0).
    pub data_buffer: U64,
    /// Out: the VSP's `error`.
    pub status: U32,
    /// Out: the VSP's `response_len`.
    pub response_response_len: U32,
}

const _: () = assert!(core::mem::size_of::<RequestSync>() == REQUEST_SYNC_LEN);

/// `struct xs_fastpath_vsp_request` (56 bytes, packed), VSC → VSP.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct VspRequest {
    /// Always 0.
    pub version: U32,
    /// The caller's `timeout`.
    pub timeout_ms: U32,
    /// In-page offset of the data buffer (0 without one).
    pub data_buffer_offset: U32,
    /// `data_len` (0 without one).
    pub data_buffer_length: U32,
    /// 1 with a data buffer, else 0.
    pub data_buffer_valid: U32,
    /// [`OP_USER_REQUEST`].
    pub operation_type: U32,
    /// In-page offset of the request + data pages × page size: its byte offset in the range.
    pub request_buffer_offset: U32,
    /// `request_len`.
    pub request_buffer_length: U32,
    /// In-page offset of the response + (data + request pages) × page size.
    pub response_buffer_offset: U32,
    /// `response_len`.
    pub response_buffer_length: U32,
    /// The caller's GUID.
    pub transaction_id: Guid,
}

const _: () = assert!(core::mem::size_of::<VspRequest>() == VSP_REQUEST_LEN);

/// `struct xs_fastpath_vsp_response` (12 bytes, packed), VSP → VSC in a completion.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct VspResponse {
    /// Ignored by the driver.
    pub length: U32,
    /// Copied to the caller's `response.status`.
    pub error: U32,
    /// Copied to the caller's `response.response_len`.
    pub response_len: U32,
}

const _: () = assert!(core::mem::size_of::<VspResponse>() == VSP_RESPONSE_LEN);

impl VspResponse {
    /// Reads a completion payload as the driver's callback does: the first 12 bytes, with no
    /// size or type check in the posted patch; a shorter payload is read zero-extended (the
    /// kernel would read whatever followed in its receive buffer).
    pub fn read_lenient(payload: &[u8]) -> VspResponse {
        let mut bytes = [0u8; VSP_RESPONSE_LEN];
        let n = payload.len().min(VSP_RESPONSE_LEN);
        bytes[..n].copy_from_slice(&payload[..n]);
        VspResponse::read_from_bytes(&bytes).unwrap_or(VspResponse {
            length: U32::new(0),
            error: U32::new(0),
            response_len: U32::new(0),
        })
    }
}

/// `struct vmbus_packet_mpb_array` with one range, before its PFNs (32 bytes packed).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct MpbHeader {
    /// `VM_PKT_DATA_USING_GPA_DIRECT`.
    pub ty: U16,
    /// Descriptor size (32 + 8 × pages) in 8-byte units.
    pub dataoffset8: U16,
    /// Whole packet length in 8-byte units.
    pub length8: U16,
    /// `VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED`.
    pub flags: U16,
    /// The requestor id the completion echoes.
    pub transactionid: U64,
    /// 0.
    pub reserved: U32,
    /// 1.
    pub rangecount: U32,
    /// `total_pages × PAGE_SIZE`.
    pub range_len: U32,
    /// 0.
    pub range_offset: U32,
}

/// Size of [`MpbHeader`].
pub const MPB_HEADER_LEN: usize = 32;
const _: () = assert!(core::mem::size_of::<MpbHeader>() == MPB_HEADER_LEN);

/// The largest packet the driver can send: 8192 PFNs + the request, which fits the 128 KiB
/// ring. The bus's frame limit must hold it.
pub const MAX_REQUEST_PACKET: usize = MPB_HEADER_LEN + 8 * MAX_PAGES as usize + VSP_REQUEST_LEN;

/// The GPA-direct packet `vmbus_sendpacket_mpb_desc()` writes for one call: header, `pfns`,
/// the VSP request, zero padding to 8. Errors only when `pfns` is empty or over
/// [`MAX_PAGES`] (the driver checks both before it builds a packet).
pub fn encode_request_packet(
    trans_id: u64,
    pfns: &[u64],
    request: &VspRequest,
) -> Result<Vec<u8>, WireError> {
    if pfns.is_empty() || pfns.len() as u64 > MAX_PAGES {
        return Err(WireError::TooLong {
            what: "xs_fastpath page list",
            max: MAX_PAGES as usize,
            got: pfns.len(),
        });
    }
    let desc_size = MPB_HEADER_LEN + 8 * pfns.len();
    let total = (desc_size + VSP_REQUEST_LEN).div_ceil(8) * 8;
    // Bounded by MAX_REQUEST_PACKET (65624 bytes): both fit their u16 8-byte units.
    let header = MpbHeader {
        ty: U16::new(packet_type::DATA_USING_GPA_DIRECT),
        dataoffset8: U16::new((desc_size / 8) as u16),
        length8: U16::new((total / 8) as u16),
        flags: U16::new(FLAG_COMPLETION_REQUESTED),
        transactionid: U64::new(trans_id),
        reserved: U32::new(0),
        rangecount: U32::new(1),
        range_len: U32::new((pfns.len() as u64 * HV_PAGE_SIZE) as u32),
        range_offset: U32::new(0),
    };
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(header.as_bytes());
    for pfn in pfns {
        out.extend_from_slice(&pfn.to_le_bytes());
    }
    out.extend_from_slice(request.as_bytes());
    out.resize(total, 0);
    Ok(out)
}

/// A GPA-direct request packet as the host reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPacket {
    /// The requestor id to echo in the completion.
    pub trans_id: u64,
    /// The frame numbers of the range, in order (data, request, response pages).
    pub pfns: Vec<u64>,
    /// The range's byte length (`range.len`).
    pub range_len: u32,
    /// The VSP request after the descriptor.
    pub request: VspRequest,
}

impl RequestPacket {
    /// Bytes in the page range: what memory accesses may address.
    pub fn range_bytes(&self) -> u64 {
        self.pfns.len() as u64 * HV_PAGE_SIZE
    }
}

/// Parses a whole packet (`len8 * 8` bytes) as a GPA-direct request: type 9, one range whose
/// PFN count agrees with `dataoffset8`, at most [`MAX_PAGES`] PFNs, and a 56-byte request.
pub fn parse_request_packet(bytes: &[u8]) -> Result<RequestPacket, WireError> {
    let (header, _) = MpbHeader::read_from_prefix(bytes).map_err(|_| WireError::TooShort {
        what: "vmbus_packet_mpb_array",
        need: MPB_HEADER_LEN,
        got: bytes.len(),
    })?;
    if header.ty.get() != packet_type::DATA_USING_GPA_DIRECT {
        return Err(WireError::BadValue {
            what: "xs_fastpath packet type (want GPA direct, 9)",
            value: header.ty.get().into(),
        });
    }
    if header.rangecount.get() != 1 {
        return Err(WireError::BadValue {
            what: "xs_fastpath rangecount (want 1)",
            value: header.rangecount.get().into(),
        });
    }
    let desc_size = usize::from(header.dataoffset8.get()) * 8;
    let total = usize::from(header.length8.get()) * 8;
    if total != bytes.len() {
        return Err(WireError::LengthMismatch {
            what: "xs_fastpath packet (length8 * 8)",
            expected: total,
            got: bytes.len(),
        });
    }
    let pfn_bytes = desc_size
        .checked_sub(MPB_HEADER_LEN)
        .ok_or(WireError::BadValue {
            what: "xs_fastpath dataoffset8 (inside the header)",
            value: header.dataoffset8.get().into(),
        })?;
    let pages = pfn_bytes / 8;
    if pages == 0 || pages as u64 > MAX_PAGES {
        return Err(WireError::BadValue {
            what: "xs_fastpath page count",
            value: pages as u64,
        });
    }
    let pfn_area = bytes
        .get(MPB_HEADER_LEN..desc_size)
        .ok_or(WireError::TooShort {
            what: "xs_fastpath page list",
            need: desc_size,
            got: bytes.len(),
        })?;
    let pfns = pfn_area
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    let body = bytes.get(desc_size..).unwrap_or(&[]);
    let (request, _) = VspRequest::read_from_prefix(body).map_err(|_| WireError::TooShort {
        what: "xs_fastpath_vsp_request",
        need: VSP_REQUEST_LEN,
        got: body.len(),
    })?;
    Ok(RequestPacket {
        trans_id: header.transactionid.get(),
        pfns,
        range_len: header.range_len.get(),
        request,
    })
}

/// Pages a user buffer spans: from its in-page offset and length, as the patch counts the
/// pages `iov_iter_get_pages_alloc` returns. `page_size` is the guest's PAGE_SIZE.
pub fn pages_spanned(addr: u64, len: u64, page_size: u64) -> u64 {
    if len == 0 {
        return 0;
    }
    ((addr % page_size) + len).div_ceil(page_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn request_sync_layout_matches_the_compiled_patch() {
        assert_eq!(offset_of!(RequestSync, timeout), 16);
        assert_eq!(offset_of!(RequestSync, request_len), 20);
        assert_eq!(offset_of!(RequestSync, response_len), 24);
        assert_eq!(offset_of!(RequestSync, data_len), 28);
        assert_eq!(offset_of!(RequestSync, request_buffer), 32);
        assert_eq!(offset_of!(RequestSync, response_buffer), 40);
        assert_eq!(offset_of!(RequestSync, data_buffer), 48);
        assert_eq!(offset_of!(RequestSync, status) as u64, STATUS_OFFSET);
        assert_eq!(
            offset_of!(RequestSync, response_response_len) as u64,
            RESPONSE_LEN_OFFSET
        );
    }

    #[test]
    fn ioctl_number_is_iowr_r_10_of_64_bytes() {
        let iowr = (3u32 << 30) | ((REQUEST_SYNC_LEN as u32) << 16) | (0x52 << 8) | 10;
        assert_eq!(iowr, IOCTL_USER_REQUEST);
    }

    #[test]
    fn vsp_request_offsets_match_spec() {
        assert_eq!(offset_of!(VspRequest, timeout_ms), 4);
        assert_eq!(offset_of!(VspRequest, data_buffer_offset), 8);
        assert_eq!(offset_of!(VspRequest, data_buffer_valid), 16);
        assert_eq!(offset_of!(VspRequest, operation_type), 20);
        assert_eq!(offset_of!(VspRequest, request_buffer_offset), 24);
        assert_eq!(offset_of!(VspRequest, response_buffer_length), 36);
        assert_eq!(offset_of!(VspRequest, transaction_id), 40);
        assert_eq!(REQUESTOR_SLOTS, 2340);
    }

    fn request() -> VspRequest {
        VspRequest {
            version: U32::new(0),
            timeout_ms: U32::new(30),
            data_buffer_offset: U32::new(0),
            data_buffer_length: U32::new(0),
            data_buffer_valid: U32::new(0),
            operation_type: U32::new(OP_USER_REQUEST),
            request_buffer_offset: U32::new(16),
            request_buffer_length: U32::new(40),
            response_buffer_offset: U32::new(4096 + 8),
            response_buffer_length: U32::new(100),
            transaction_id: Guid([7; 16]),
        }
    }

    #[test]
    fn request_packet_round_trips_with_the_kernels_descriptor() {
        let bytes = encode_request_packet(5, &[0x1000, 0x2000], &request()).unwrap();
        // 32 + 16 + 56 = 104 bytes, already a multiple of 8.
        assert_eq!(bytes.len(), 104);
        assert_eq!(&bytes[0..8], &[9, 0, 6, 0, 13, 0, 1, 0]);
        assert_eq!(&bytes[24..32], &[0, 0x20, 0, 0, 0, 0, 0, 0]); // len 8192, offset 0
        let packet = parse_request_packet(&bytes).unwrap();
        assert_eq!(packet.trans_id, 5);
        assert_eq!(packet.pfns, vec![0x1000, 0x2000]);
        assert_eq!(packet.range_bytes(), 8192);
        assert_eq!(packet.request, request());
    }

    #[test]
    fn the_largest_packet_fits_one_ring() {
        let pfns = vec![1; MAX_PAGES as usize];
        let bytes = encode_request_packet(1, &pfns, &request()).unwrap();
        assert_eq!(bytes.len(), MAX_REQUEST_PACKET);
        assert!(bytes.len() < RING_BYTES);
        assert!(encode_request_packet(1, &vec![1; MAX_PAGES as usize + 1], &request()).is_err());
        assert!(encode_request_packet(1, &[], &request()).is_err());
    }

    #[test]
    fn hostile_packets_are_errors() {
        let good = encode_request_packet(5, &[1, 2], &request()).unwrap();
        let mut wrong_type = good.clone();
        wrong_type[0] = 6;
        assert!(parse_request_packet(&wrong_type).is_err());
        let mut short_desc = good.clone();
        short_desc[2] = 3; // dataoffset8 inside the header
        assert!(parse_request_packet(&short_desc).is_err());
        let mut no_request = good.clone();
        no_request[2] = 12; // descriptor runs over the request
        assert!(parse_request_packet(&no_request).is_err());
        assert!(parse_request_packet(&good[..good.len() - 8]).is_err());
        assert!(parse_request_packet(&[]).is_err());
    }

    #[test]
    fn page_arithmetic_counts_from_the_in_page_offset() {
        assert_eq!(pages_spanned(0x1000, 1, 4096), 1);
        assert_eq!(pages_spanned(0x1fff, 2, 4096), 2);
        assert_eq!(pages_spanned(0x1000, 4096, 4096), 1);
        assert_eq!(pages_spanned(0x1001, 4096, 4096), 2);
        assert_eq!(pages_spanned(0x1000, 32 << 20, 4096), 8192);
        assert_eq!(pages_spanned(0x1000, 0, 4096), 0);
        assert_eq!(pages_spanned(0x10000, 32 << 20, 65536), 512);
    }

    #[test]
    fn short_completion_reads_zero_extended() {
        let r = VspResponse::read_lenient(&[12, 0, 0, 0, 5, 0, 0, 0]);
        assert_eq!(r.error.get(), 5);
        assert_eq!(r.response_len.get(), 0);
    }
}
