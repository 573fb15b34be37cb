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

/// fakehost's XStore request format, version 1 (docs/xs-protocol.md): what a client puts in
/// the request buffer ("XSR1"), what fakehost's VSP writes back in the response buffer
/// ("XSA1"), and the status codes both carry.
///
/// The posted driver never looks inside these buffers (it only pins them), and what the real
/// Azure XStore service expects there is not public, so this format is fakehost's own. It is
/// here, beside the driver's structs, so that the host and any client or test build the same
/// bytes. Pure functions: decoding answers a [`Status`] a host can send back, never a panic.
pub mod xstore {
    use core::fmt;

    use zerocopy::little_endian::{U16, U32, U64};
    use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

    use crate::WireError;

    /// First word of a request buffer: "XSR1" in little-endian.
    pub const REQUEST_MAGIC: u32 = 0x3152_5358;
    /// First word of a response buffer: "XSA1" in little-endian.
    pub const RESPONSE_MAGIC: u32 = 0x3141_5358;
    /// The format version this module speaks.
    pub const VERSION: u16 = 1;
    /// Size of [`RequestHeader`] and of [`ResponseHeader`].
    pub const HEADER_LEN: usize = 32;
    /// The longest blob name (and LIST prefix), in bytes.
    pub const MAX_NAME_LEN: usize = 1024;
    /// The most request-buffer bytes a host needs to read: the header and the longest name.
    pub const MAX_REQUEST_READ: usize = HEADER_LEN + MAX_NAME_LEN;
    /// Size of a LIST entry's length prefix.
    pub const LIST_ENTRY_HEADER: usize = 2;

    /// The request buffer's header; the name follows it.
    #[derive(
        Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
    )]
    #[repr(C, packed)]
    pub struct RequestHeader {
        /// [`REQUEST_MAGIC`].
        pub magic: U32,
        /// [`VERSION`].
        pub version: U16,
        /// [`Op`].
        pub op: U16,
        /// GET: first byte; LIST: index of the first name; else 0.
        pub offset: U64,
        /// GET: most bytes wanted; PUT: bytes taken from the data buffer; else 0.
        pub length: U64,
        /// Bytes of name after the header.
        pub name_len: U16,
        /// 0.
        pub reserved: [u8; 6],
    }

    const _: () = assert!(core::mem::size_of::<RequestHeader>() == HEADER_LEN);

    /// The response buffer's header; LIST entries follow it.
    #[derive(
        Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
    )]
    #[repr(C, packed)]
    pub struct ResponseHeader {
        /// [`RESPONSE_MAGIC`].
        pub magic: U32,
        /// A [`Status`], the same value as the VSP `error`.
        pub status: U32,
        /// GET: bytes written to the data buffer; PUT: bytes stored; LIST: names in this
        /// response; STAT: the blob's size; DELETE: 0.
        pub count: U64,
        /// GET and STAT: the blob's size; LIST: names matching the prefix; else 0.
        pub total: U64,
        /// 0.
        pub reserved: U64,
    }

    const _: () = assert!(core::mem::size_of::<ResponseHeader>() == HEADER_LEN);

    /// Declares an open enum (STYLE.md): a newtype over the wire integer with a named
    /// constant per value, so an unknown value from the wire stays representable; names,
    /// meanings and `Debug` come from the one list.
    macro_rules! open_enum {
        (
            $(#[$meta:meta])*
            pub struct $name:ident($int:ty);
            $( $(#[$cmeta:meta])* $constant:ident = $value:expr, $meaning:literal; )*
        ) => {
            $(#[$meta])*
            #[derive(Clone, Copy, PartialEq, Eq, Hash)]
            pub struct $name(pub $int);

            impl $name {
                $( $(#[$cmeta])* pub const $constant: $name = $name($value); )*

                const TABLE: &'static [($name, &'static str, &'static str)] =
                    &[$(($name::$constant, stringify!($constant), $meaning)),*];

                fn entry(self) -> Option<&'static (Self, &'static str, &'static str)> {
                    Self::TABLE.iter().find(|(value, _, _)| *value == self)
                }

                /// The value's name ("NOT_FOUND"), if it is one of the table's.
                pub fn name(self) -> Option<&'static str> {
                    self.entry().map(|(_, name, _)| *name)
                }

                /// What the value means, in words, if it is one of the table's.
                pub fn describe(self) -> Option<&'static str> {
                    self.entry().map(|(_, _, meaning)| *meaning)
                }
            }

            impl fmt::Debug for $name {
                fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    match self.name() {
                        Some(name) => f.write_str(name),
                        None => write!(f, "{}({})", stringify!($name), self.0),
                    }
                }
            }
        };
    }

    open_enum! {
        /// An operation code (answered [`Status::UNKNOWN_OP`] when not in the table).
        pub struct Op(u16);
        /// Read a byte range of a blob into the data buffer.
        GET = 1, "read a byte range of a blob";
        /// Replace a blob with bytes of the data buffer.
        PUT = 2, "replace a blob";
        /// List names that start with a prefix.
        LIST = 3, "list names that start with a prefix";
        /// Delete a blob.
        DELETE = 4, "delete a blob";
        /// A blob's size.
        STAT = 5, "a blob's size";
    }

    impl fmt::Display for Op {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self.name() {
                Some(name) => f.write_str(name),
                None => write!(f, "unknown op {}", self.0),
            }
        }
    }

    open_enum! {
        /// A status code (response `status` and VSP `error`).
        pub struct Status(u32);
        /// Done.
        OK = 0, "done";
        /// The request buffer or the VSP request is not a valid request.
        BAD_REQUEST = 1, "not a valid request";
        /// No blob with that name.
        NOT_FOUND = 2, "no blob with that name";
        /// GET offset beyond the blob's end.
        RANGE = 3, "offset beyond the blob's end";
        /// Response buffer under 32 bytes, or no data buffer where one is needed.
        TOO_SMALL = 4, "a buffer is too small or missing";
        /// The blob store failed.
        STORE_ERROR = 5, "the blob store failed";
        /// Request version other than [`VERSION`].
        UNSUPPORTED_VERSION = 6, "request format version not supported";
        /// An op not in the table.
        UNKNOWN_OP = 7, "unknown operation";
        /// The store took longer than `timeout_ms`.
        TIMEOUT = 8, "the store took longer than timeout_ms";
        /// The guest did not deliver the pages the host read (a DATA with an errno, out of
        /// order, or no answer in time).
        GUEST_MEMORY = 9, "the guest did not deliver its pages";
    }

    impl Status {
        /// What it means, in words ("no blob with that name").
        pub fn meaning(self) -> &'static str {
            self.describe().unwrap_or("unknown status")
        }
    }

    impl fmt::Display for Status {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self.name() {
                Some(name) => write!(f, "{} {name}", self.0),
                None => write!(f, "{} (unknown status)", self.0),
            }
        }
    }

    /// A decoded request.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Request {
        /// One of the table's ops (decoding refuses the others).
        pub op: Op,
        /// GET: first byte; LIST: index of the first name; else 0.
        pub offset: u64,
        /// GET: most bytes wanted; PUT: bytes to store; else 0.
        pub length: u64,
        /// The blob name, or for LIST the prefix (may be empty).
        pub name: String,
    }

    impl Request {
        /// The request buffer's bytes for this request (a client's side).
        pub fn encode(&self) -> Vec<u8> {
            let header = RequestHeader {
                magic: U32::new(REQUEST_MAGIC),
                version: U16::new(VERSION),
                op: U16::new(self.op.0),
                offset: U64::new(self.offset),
                length: U64::new(self.length),
                // A longer name is cut to what the field can say; the host then refuses it.
                name_len: U16::new(u16::try_from(self.name.len()).unwrap_or(u16::MAX)),
                reserved: [0; 6],
            };
            let mut out = Vec::with_capacity(HEADER_LEN + self.name.len());
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(self.name.as_bytes());
            out
        }
    }

    /// Decodes a request buffer. `bytes` is what the host read of it (the whole buffer or at
    /// least its first [`MAX_REQUEST_READ`] bytes); `data_len` is the call's data buffer
    /// length (0: none). The error is the status to answer, checked in this order: magic
    /// (BAD_REQUEST), version (UNSUPPORTED_VERSION), reserved bytes (BAD_REQUEST), op
    /// (UNKNOWN_OP), name (BAD_REQUEST), fields the op does not use must be 0 (BAD_REQUEST),
    /// then the data buffer: missing where needed (TOO_SMALL), PUT `length` over `data_len`
    /// (BAD_REQUEST).
    pub fn parse_request(bytes: &[u8], data_len: u32) -> Result<Request, Status> {
        let (header, rest) =
            RequestHeader::read_from_prefix(bytes).map_err(|_| Status::BAD_REQUEST)?;
        if header.magic.get() != REQUEST_MAGIC {
            return Err(Status::BAD_REQUEST);
        }
        if header.version.get() != VERSION {
            return Err(Status::UNSUPPORTED_VERSION);
        }
        if header.reserved != [0; 6] {
            return Err(Status::BAD_REQUEST);
        }
        let op = Op(header.op.get());
        if op.name().is_none() {
            return Err(Status::UNKNOWN_OP);
        }
        let name = rest
            .get(..usize::from(header.name_len.get()))
            .ok_or(Status::BAD_REQUEST)?;
        let name = core::str::from_utf8(name).map_err(|_| Status::BAD_REQUEST)?;
        let checked = if op == Op::LIST {
            check_prefix(name)
        } else {
            check_name(name)
        };
        checked.map_err(|_| Status::BAD_REQUEST)?;
        let (offset, length) = (header.offset.get(), header.length.get());
        let unused_fields_zero = match op {
            Op::GET => true,
            Op::PUT => offset == 0,
            Op::LIST => length == 0,
            _ => offset == 0 && length == 0,
        };
        if !unused_fields_zero {
            return Err(Status::BAD_REQUEST);
        }
        let needs_data = op == Op::GET || (op == Op::PUT && length > 0);
        if needs_data && data_len == 0 {
            return Err(Status::TOO_SMALL);
        }
        if op == Op::PUT && length > u64::from(data_len) {
            return Err(Status::BAD_REQUEST);
        }
        Ok(Request {
            op,
            offset,
            length,
            name: name.to_owned(),
        })
    }

    /// Why a name is not a blob name.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
    pub enum NameError {
        /// Empty (only a LIST prefix may be).
        #[error("the name is empty")]
        Empty,
        /// Over [`MAX_NAME_LEN`] bytes.
        #[error("the name is longer than {MAX_NAME_LEN} bytes")]
        TooLong,
        /// An ASCII control character (NUL included).
        #[error("the name contains a control character")]
        ControlCharacter,
        /// Starts or ends with '/'.
        #[error("the name starts or ends with '/'")]
        EdgeSlash,
        /// An empty, `.` or `..` segment.
        #[error("the name has an empty, '.' or '..' segment")]
        BadSegment,
        /// The last segment ends in `#` and digits: the local store's names for puts in
        /// progress (object_store's LocalFileSystem stages `NAME#N`, then renames).
        #[error("the name ends in '#' and digits (reserved for puts in progress)")]
        StagingSuffix,
    }

    /// Checks a blob name: UTF-8 (a `&str` already is), 1 to [`MAX_NAME_LEN`] bytes, no
    /// ASCII control character, no leading or trailing '/', no empty, `.` or `..` segment,
    /// and a last segment that does not end in `#` followed by digits.
    pub fn check_name(name: &str) -> Result<(), NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        check_prefix(name)?;
        if name.starts_with('/') || name.ends_with('/') {
            return Err(NameError::EdgeSlash);
        }
        if name
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return Err(NameError::BadSegment);
        }
        let last = name.rsplit('/').next().unwrap_or(name);
        if let Some((_, suffix)) = last.rsplit_once('#') {
            if !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit()) {
                return Err(NameError::StagingSuffix);
            }
        }
        Ok(())
    }

    /// Checks a LIST prefix: at most [`MAX_NAME_LEN`] bytes and no ASCII control character;
    /// it may be empty and need not be a whole name ("logs/2024-").
    pub fn check_prefix(prefix: &str) -> Result<(), NameError> {
        if prefix.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        if prefix.chars().any(|c| c.is_ascii_control()) {
            return Err(NameError::ControlCharacter);
        }
        Ok(())
    }

    /// The response buffer's header.
    pub fn encode_response_header(status: Status, count: u64, total: u64) -> [u8; HEADER_LEN] {
        let header = ResponseHeader {
            magic: U32::new(RESPONSE_MAGIC),
            status: U32::new(status.0),
            count: U64::new(count),
            total: U64::new(total),
            reserved: U64::new(0),
        };
        let mut out = [0u8; HEADER_LEN];
        out.copy_from_slice(header.as_bytes());
        out
    }

    /// Reads a response buffer's header (a client's side).
    pub fn parse_response_header(bytes: &[u8]) -> Result<ResponseHeader, WireError> {
        let (header, _) =
            ResponseHeader::read_from_prefix(bytes).map_err(|_| WireError::TooShort {
                what: "XSA1 response header",
                need: HEADER_LEN,
                got: bytes.len(),
            })?;
        if header.magic.get() != RESPONSE_MAGIC {
            return Err(WireError::BadValue {
                what: "XSA1 response magic",
                value: header.magic.get().into(),
            });
        }
        Ok(header)
    }

    /// LIST entries (u16 length + name bytes each) for as many of `names` as fit in `room`
    /// bytes, in the order given. Returns the bytes and how many names they hold. A name over
    /// [`MAX_NAME_LEN`] (none is ever stored) ends the list.
    pub fn encode_list<'a>(
        names: impl IntoIterator<Item = &'a str>,
        room: usize,
    ) -> (Vec<u8>, u64) {
        let mut out = Vec::new();
        let mut count = 0;
        for name in names {
            let Ok(len) = u16::try_from(name.len()) else {
                break;
            };
            if name.len() > MAX_NAME_LEN || out.len() + LIST_ENTRY_HEADER + name.len() > room {
                break;
            }
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            count += 1;
        }
        (out, count)
    }

    /// Reads `count` LIST entries from the bytes after the response header (a client's side).
    pub fn parse_list(mut bytes: &[u8], count: u64) -> Result<Vec<String>, WireError> {
        let mut names = Vec::new();
        for _ in 0..count {
            let (len, rest) =
                bytes
                    .split_first_chunk::<LIST_ENTRY_HEADER>()
                    .ok_or(WireError::TooShort {
                        what: "XSA1 list entry length",
                        need: LIST_ENTRY_HEADER,
                        got: bytes.len(),
                    })?;
            let len = usize::from(u16::from_le_bytes(*len));
            let name = rest.get(..len).ok_or(WireError::TooShort {
                what: "XSA1 list entry name",
                need: len,
                got: rest.len(),
            })?;
            let name = core::str::from_utf8(name).map_err(|_| WireError::BadSyntax {
                what: "XSA1 list entry name (UTF-8)",
                input: String::from_utf8_lossy(name).into_owned(),
            })?;
            names.push(name.to_owned());
            bytes = rest.get(len..).unwrap_or_default();
        }
        Ok(names)
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use core::mem::offset_of;

        fn request(op: Op, offset: u64, length: u64, name: &str) -> Request {
            Request {
                op,
                offset,
                length,
                name: name.into(),
            }
        }

        #[test]
        fn header_offsets_match_the_protocol_doc() {
            assert_eq!(offset_of!(RequestHeader, version), 4);
            assert_eq!(offset_of!(RequestHeader, op), 6);
            assert_eq!(offset_of!(RequestHeader, offset), 8);
            assert_eq!(offset_of!(RequestHeader, length), 16);
            assert_eq!(offset_of!(RequestHeader, name_len), 24);
            assert_eq!(offset_of!(RequestHeader, reserved), 26);
            assert_eq!(offset_of!(ResponseHeader, status), 4);
            assert_eq!(offset_of!(ResponseHeader, count), 8);
            assert_eq!(offset_of!(ResponseHeader, total), 16);
            assert_eq!(offset_of!(ResponseHeader, reserved), 24);
            assert_eq!(&REQUEST_MAGIC.to_le_bytes(), b"XSR1");
            assert_eq!(&RESPONSE_MAGIC.to_le_bytes(), b"XSA1");
        }

        #[test]
        fn every_op_round_trips() {
            for (req, data_len) in [
                (request(Op::GET, 4096, 100, "a/b.bin"), 100),
                (request(Op::PUT, 0, 7, "x"), 7),
                (request(Op::PUT, 0, 0, "empty"), 0),
                (request(Op::LIST, 3, 0, ""), 0),
                (request(Op::LIST, 0, 0, "logs/2024-"), 0),
                (request(Op::DELETE, 0, 0, "x"), 0),
                (request(Op::STAT, 0, 0, "x"), 0),
            ] {
                let bytes = req.encode();
                assert_eq!(bytes.len(), HEADER_LEN + req.name.len());
                assert_eq!(parse_request(&bytes, data_len), Ok(req));
            }
        }

        #[test]
        fn trailing_bytes_of_a_larger_request_buffer_are_ignored() {
            let mut bytes = request(Op::STAT, 0, 0, "x").encode();
            bytes.resize(4096, 0xee);
            assert_eq!(parse_request(&bytes, 0).unwrap().name, "x");
        }

        fn status_of(bytes: &[u8], data_len: u32) -> Status {
            parse_request(bytes, data_len).unwrap_err()
        }

        #[test]
        fn short_buffer_bad_magic_and_reserved_bytes_are_bad_request() {
            let good = request(Op::GET, 0, 1, "x").encode();
            assert_eq!(status_of(&good[..31], 1), Status::BAD_REQUEST);
            assert_eq!(status_of(&[], 1), Status::BAD_REQUEST);
            let mut magic = good.clone();
            magic[3] = b'2';
            assert_eq!(status_of(&magic, 1), Status::BAD_REQUEST);
            let mut reserved = good.clone();
            reserved[31] = 1;
            assert_eq!(status_of(&reserved, 1), Status::BAD_REQUEST);
        }

        #[test]
        fn version_2_is_unsupported_even_with_an_unknown_op() {
            let mut bytes = request(Op(77), 0, 0, "x").encode();
            bytes[4] = 2;
            assert_eq!(status_of(&bytes, 0), Status::UNSUPPORTED_VERSION);
        }

        #[test]
        fn unknown_op_is_unknown_op() {
            for op in [0, 6, 0xffff] {
                let bytes = request(Op(op), 0, 0, "x").encode();
                assert_eq!(status_of(&bytes, 0), Status::UNKNOWN_OP, "op {op}");
            }
        }

        #[test]
        fn name_running_past_the_buffer_or_not_utf8_is_bad_request() {
            let mut bytes = request(Op::STAT, 0, 0, "abc").encode();
            bytes.truncate(bytes.len() - 1);
            assert_eq!(status_of(&bytes, 0), Status::BAD_REQUEST);
            let mut bytes = request(Op::STAT, 0, 0, "abc").encode();
            bytes[HEADER_LEN] = 0xff;
            assert_eq!(status_of(&bytes, 0), Status::BAD_REQUEST);
        }

        #[test]
        fn invalid_names_are_bad_request() {
            let long = "n".repeat(MAX_NAME_LEN + 1);
            for name in [
                "", "/a", "a/", "a//b", "./a", "a/..", "nul\0", "tab\t", "x#1", "d/y#42", &long,
            ] {
                let bytes = request(Op::GET, 0, 1, name).encode();
                assert_eq!(status_of(&bytes, 1), Status::BAD_REQUEST, "{name:?}");
            }
            for name in ["a", "a/b/c", "x#", "x#y1", "#1/x", "é", "a b%20c"] {
                assert_eq!(check_name(name), Ok(()), "{name:?}");
            }
            assert_eq!(check_name(&"n".repeat(MAX_NAME_LEN)), Ok(()));
        }

        #[test]
        fn list_prefix_may_be_empty_or_partial_but_not_control() {
            assert!(parse_request(&request(Op::LIST, 0, 0, "").encode(), 0).is_ok());
            assert!(parse_request(&request(Op::LIST, 0, 0, "a/").encode(), 0).is_ok());
            let bytes = request(Op::LIST, 0, 0, "a\nb").encode();
            assert_eq!(status_of(&bytes, 0), Status::BAD_REQUEST);
        }

        #[test]
        fn fields_an_op_does_not_use_must_be_zero() {
            for req in [
                request(Op::PUT, 1, 1, "x"),
                request(Op::LIST, 0, 1, ""),
                request(Op::DELETE, 1, 0, "x"),
                request(Op::STAT, 0, 1, "x"),
            ] {
                assert_eq!(status_of(&req.encode(), 8), Status::BAD_REQUEST, "{req:?}");
            }
        }

        #[test]
        fn missing_data_buffer_is_too_small_and_put_over_it_is_bad_request() {
            let get = request(Op::GET, 0, 0, "x").encode();
            assert_eq!(status_of(&get, 0), Status::TOO_SMALL);
            let put = request(Op::PUT, 0, 10, "x").encode();
            assert_eq!(status_of(&put, 0), Status::TOO_SMALL);
            assert_eq!(status_of(&put, 9), Status::BAD_REQUEST);
            assert!(parse_request(&put, 10).is_ok());
        }

        #[test]
        fn response_header_round_trips_and_checks_magic() {
            let bytes = encode_response_header(Status::NOT_FOUND, 5, 9);
            let header = parse_response_header(&bytes).unwrap();
            assert_eq!(header.status.get(), 2);
            assert_eq!(header.count.get(), 5);
            assert_eq!(header.total.get(), 9);
            assert!(parse_response_header(&bytes[..31]).is_err());
            assert!(parse_response_header(&[0; 32]).is_err());
        }

        #[test]
        fn list_entries_stop_where_the_room_ends() {
            let names = ["a", "bb", "ccc"];
            let (bytes, count) = encode_list(names, 2 + 1 + 2 + 2 + 2);
            assert_eq!(count, 2);
            assert_eq!(bytes, [1, 0, b'a', 2, 0, b'b', b'b']);
            assert_eq!(parse_list(&bytes, count).unwrap(), ["a", "bb"]);
            assert_eq!(encode_list(names, 0), (Vec::new(), 0));
            assert!(parse_list(&bytes, 3).is_err());
            assert!(parse_list(&[5, 0, b'a'], 1).is_err());
        }

        #[test]
        fn statuses_and_ops_have_names_and_unknown_values_print() {
            assert_eq!(Status::TIMEOUT.to_string(), "8 TIMEOUT");
            assert_eq!(Status(42).to_string(), "42 (unknown status)");
            assert_eq!(
                Status::GUEST_MEMORY.meaning(),
                "the guest did not deliver its pages"
            );
            assert_eq!(Op::LIST.to_string(), "LIST");
            assert_eq!(Op(9).to_string(), "unknown op 9");
            assert_eq!(format!("{:?} {:?}", Op::PUT, Status(42)), "PUT Status(42)");
            assert_eq!(Op::STAT.describe(), Some("a blob's size"));
        }
    }
}
