//! VMBus ring packets: `struct vmpacket_descriptor` and the inband packets util drivers use.
//!
//! In a real ring a packet is a 16-byte descriptor, the payload, zero padding to a multiple of
//! 8, and an 8-byte trailer. Our channel streams carry exactly the first three (the trailer
//! only matters to the ring's reader), so [`parse_packet`] and [`encode_inband`] deal with
//! `len8 * 8` bytes. Layout and semantics: icmsg-vmbus.md §1, from include/linux/hyperv.h and
//! drivers/hv/ring_buffer.c.

use zerocopy::little_endian::{U16, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::WireError;

/// `struct vmpacket_descriptor` (16 bytes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct PacketDescriptor {
    /// `enum vmbus_packet_type`, see [`packet_type`].
    pub ty: U16,
    /// Payload offset from the descriptor start, in 8-byte units (2 for a plain inband packet).
    pub offset8: U16,
    /// Whole packet length (descriptor + payload + padding), in 8-byte units.
    pub len8: U16,
    /// [`FLAG_COMPLETION_REQUESTED`] or 0.
    pub flags: U16,
    /// Transaction id; a reply carries the request's id.
    pub trans_id: U64,
}

const _: () = assert!(core::mem::size_of::<PacketDescriptor>() == 16);

/// Size of [`PacketDescriptor`] in bytes.
pub const DESCRIPTOR_LEN: usize = 16;

/// The largest payload [`encode_inband`] can describe: `len8` is a u16, so a packet is at most
/// 65535 × 8 bytes, 16 of which are the descriptor.
pub const MAX_INBAND_PAYLOAD: usize = u16::MAX as usize * 8 - DESCRIPTOR_LEN;

/// `enum vmbus_packet_type` (include/linux/hyperv.h).
pub mod packet_type {
    /// `VM_PKT_INVALID`.
    pub const INVALID: u16 = 0x0;
    /// `VM_PKT_SYNCH`.
    pub const SYNCH: u16 = 0x1;
    /// `VM_PKT_ADD_XFER_PAGESET`.
    pub const ADD_XFER_PAGESET: u16 = 0x2;
    /// `VM_PKT_RM_XFER_PAGESET`.
    pub const RM_XFER_PAGESET: u16 = 0x3;
    /// `VM_PKT_ESTABLISH_GPADL`.
    pub const ESTABLISH_GPADL: u16 = 0x4;
    /// `VM_PKT_TEARDOWN_GPADL`.
    pub const TEARDOWN_GPADL: u16 = 0x5;
    /// `VM_PKT_DATA_INBAND`: the only type the util services send.
    pub const DATA_INBAND: u16 = 0x6;
    /// `VM_PKT_DATA_USING_XFER_PAGES`.
    pub const DATA_USING_XFER_PAGES: u16 = 0x7;
    /// `VM_PKT_DATA_USING_GPADL`.
    pub const DATA_USING_GPADL: u16 = 0x8;
    /// `VM_PKT_DATA_USING_GPA_DIRECT` (the xs_fastpath multi-page descriptor).
    pub const DATA_USING_GPA_DIRECT: u16 = 0x9;
    /// `VM_PKT_CANCEL_REQUEST`.
    pub const CANCEL_REQUEST: u16 = 0xa;
    /// `VM_PKT_COMP`: a completion.
    pub const COMP: u16 = 0xb;
    /// `VM_PKT_DATA_USING_ADDITIONAL_PKT`.
    pub const DATA_USING_ADDITIONAL_PKT: u16 = 0xc;
    /// `VM_PKT_ADDITIONAL_DATA`.
    pub const ADDITIONAL_DATA: u16 = 0xd;
}

/// `VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED`.
pub const FLAG_COMPLETION_REQUESTED: u16 = 1;

/// Builds a `VM_PKT_DATA_INBAND` packet as `vmbus_sendpacket()` lays it out in the ring:
/// descriptor with offset8 = 2 and len8 = ceil((16 + len) / 8), the payload, zero padding.
///
/// Never panics. A payload over [`MAX_INBAND_PAYLOAD`] cannot be described by a u16 `len8`;
/// it is still copied but `len8` saturates, so the receiver's [`parse_packet`] rejects the
/// packet with a length mismatch instead of misreading it.
pub fn encode_inband(trans_id: u64, flags: u16, payload: &[u8]) -> Vec<u8> {
    encode_packet(packet_type::DATA_INBAND, trans_id, flags, payload)
}

/// Builds a `VM_PKT_COMP` completion for the request with `trans_id`: the layout of an inband
/// packet (offset8 = 2, no flags) with type 0xb, as a host answers a packet that had
/// [`FLAG_COMPLETION_REQUESTED`] (storvsc and xs_fastpath match it by `trans_id`).
pub fn encode_completion(trans_id: u64, payload: &[u8]) -> Vec<u8> {
    encode_packet(packet_type::COMP, trans_id, 0, payload)
}

/// Builds a packet of type `ty` with the plain 16-byte descriptor (offset8 = 2): what
/// [`encode_inband`] and [`encode_completion`] share. Same limits as [`encode_inband`].
pub fn encode_packet(ty: u16, trans_id: u64, flags: u16, payload: &[u8]) -> Vec<u8> {
    let total = (DESCRIPTOR_LEN + payload.len()).div_ceil(8) * 8;
    let len8 = u16::try_from(total / 8).unwrap_or(u16::MAX);
    let descriptor = PacketDescriptor {
        ty: U16::new(ty),
        offset8: U16::new((DESCRIPTOR_LEN / 8) as u16),
        len8: U16::new(len8),
        flags: U16::new(flags),
        trans_id: U64::new(trans_id),
    };
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(descriptor.as_bytes());
    out.extend_from_slice(payload);
    out.resize(total, 0);
    out
}

/// One packet, as the receiving side of a ring sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// The descriptor's packet type ([`packet_type`]).
    pub ty: u16,
    /// The descriptor's flags.
    pub flags: u16,
    /// The descriptor's transaction id.
    pub trans_id: u64,
    /// `bytes[offset8*8 .. len8*8]`: the payload *including* its padding to 8 bytes. That is
    /// what `hv_ringbuffer_read` hands a util driver, and its length is the driver's `recvlen`
    /// (drivers/hv/ring_buffer.c, 5.x/6.x), which the driver then echoes back whole.
    pub payload: &'a [u8],
    /// The whole packet, descriptor included: a packet with a larger descriptor (GPA direct's
    /// page list) is read from here.
    pub bytes: &'a [u8],
}

/// Parses one whole packet (no ring trailer).
///
/// `bytes.len()` must be exactly `len8 * 8` (on our streams a packet is a frame of its own, so
/// any difference is a framing error), and `16 <= offset8 * 8 <= len8 * 8`.
pub fn parse_packet(bytes: &[u8]) -> Result<Packet<'_>, WireError> {
    let (descriptor, _) =
        PacketDescriptor::read_from_prefix(bytes).map_err(|_| WireError::TooShort {
            what: "vmpacket_descriptor",
            need: DESCRIPTOR_LEN,
            got: bytes.len(),
        })?;
    let len = usize::from(descriptor.len8.get()) * 8;
    let offset = usize::from(descriptor.offset8.get()) * 8;
    if len != bytes.len() {
        return Err(WireError::LengthMismatch {
            what: "vmbus packet (len8 * 8)",
            expected: len,
            got: bytes.len(),
        });
    }
    if offset < DESCRIPTOR_LEN {
        return Err(WireError::BadValue {
            what: "vmbus packet offset8 (inside the descriptor)",
            value: descriptor.offset8.get().into(),
        });
    }
    let payload = bytes.get(offset..len).ok_or(WireError::BadValue {
        what: "vmbus packet offset8 (beyond len8)",
        value: descriptor.offset8.get().into(),
    })?;
    Ok(Packet {
        ty: descriptor.ty.get(),
        flags: descriptor.flags.get(),
        trans_id: descriptor.trans_id.get(),
        payload,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn descriptor_offsets_match_spec() {
        assert_eq!(core::mem::size_of::<PacketDescriptor>(), 16);
        assert_eq!(offset_of!(PacketDescriptor, ty), 0);
        assert_eq!(offset_of!(PacketDescriptor, offset8), 2);
        assert_eq!(offset_of!(PacketDescriptor, len8), 4);
        assert_eq!(offset_of!(PacketDescriptor, flags), 6);
        assert_eq!(offset_of!(PacketDescriptor, trans_id), 8);
    }

    #[test]
    fn encode_inband_pads_to_8_and_sets_descriptor() {
        let bytes = encode_inband(
            0x1122_3344_5566_7788,
            FLAG_COMPLETION_REQUESTED,
            &[0xaa; 13],
        );
        // 16 + 13 = 29 -> 32 bytes, len8 = 4.
        assert_eq!(bytes.len(), 32);
        assert_eq!(
            &bytes[..16],
            &[6, 0, 2, 0, 4, 0, 1, 0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
        assert_eq!(&bytes[16..29], &[0xaa; 13]);
        assert_eq!(&bytes[29..], &[0, 0, 0]);
    }

    #[test]
    fn completion_is_type_0xb_with_the_requests_id_and_padded_payload() {
        // A 12-byte xs_fastpath VspResponse: 16 + 12 = 28 -> 32 bytes, len8 = 4.
        let bytes = encode_completion(2340, &[12, 0, 0, 0, 2, 0, 0, 0, 32, 0, 0, 0]);
        assert_eq!(bytes.len(), 32);
        assert_eq!(&bytes[..8], &[0x0b, 0, 2, 0, 4, 0, 0, 0]);
        let packet = parse_packet(&bytes).unwrap();
        assert_eq!(packet.ty, packet_type::COMP);
        assert_eq!(packet.flags, 0);
        assert_eq!(packet.trans_id, 2340);
        assert_eq!(
            &packet.payload[..12],
            &[12, 0, 0, 0, 2, 0, 0, 0, 32, 0, 0, 0]
        );
        assert_eq!(&packet.payload[12..], &[0; 4]);
    }

    #[test]
    fn encode_inband_empty_payload_is_descriptor_only() {
        let bytes = encode_inband(1, 0, &[]);
        assert_eq!(bytes.len(), 16);
        let packet = parse_packet(&bytes).unwrap();
        assert!(packet.payload.is_empty());
    }

    #[test]
    fn parse_packet_payload_includes_padding_like_recvlen() {
        let bytes = encode_inband(7, 0, &[1; 1116]); // a START: 28 + 1088
        let packet = parse_packet(&bytes).unwrap();
        assert_eq!(packet.ty, packet_type::DATA_INBAND);
        assert_eq!(packet.flags, 0);
        assert_eq!(packet.trans_id, 7);
        assert_eq!(packet.payload.len(), 1120);
        assert_eq!(&packet.payload[..1116], &[1; 1116][..]);
        assert_eq!(&packet.payload[1116..], &[0; 4]);
    }

    #[test]
    fn parse_packet_honours_larger_offset8() {
        let mut bytes = encode_inband(
            7,
            0,
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
        );
        bytes[2] = 3; // offset8 = 3: the first 8 payload bytes belong to the header area
        let packet = parse_packet(&bytes).unwrap();
        assert_eq!(packet.payload, &[9, 10, 11, 12, 13, 14, 15, 16]);
    }

    #[test]
    fn parse_packet_offset8_equal_len8_gives_empty_payload() {
        let mut bytes = encode_inband(7, 0, &[0; 8]);
        bytes[2] = 3;
        assert_eq!(parse_packet(&bytes).unwrap().payload, &[] as &[u8]);
    }

    #[test]
    fn parse_packet_short_input_is_too_short() {
        for len in [0, 1, 8, 15] {
            assert_eq!(
                parse_packet(&vec![0; len]),
                Err(WireError::TooShort {
                    what: "vmpacket_descriptor",
                    need: 16,
                    got: len
                })
            );
        }
    }

    #[test]
    fn parse_packet_len8_times_8_not_bytes_len_is_mismatch() {
        let bytes = encode_inband(7, 0, &[0; 16]);
        // One byte missing.
        assert!(matches!(
            parse_packet(&bytes[..31]),
            Err(WireError::LengthMismatch {
                expected: 32,
                got: 31,
                ..
            })
        ));
        // Oversized: trailing bytes after the packet (e.g. a ring trailer).
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0; 8]);
        assert!(matches!(
            parse_packet(&longer),
            Err(WireError::LengthMismatch {
                expected: 32,
                got: 40,
                ..
            })
        ));
        // len8 = 0 with a whole descriptor present.
        let mut zero = bytes[..16].to_vec();
        zero[4] = 0;
        assert!(matches!(
            parse_packet(&zero),
            Err(WireError::LengthMismatch {
                expected: 0,
                got: 16,
                ..
            })
        ));
    }

    #[test]
    fn parse_packet_len8_smaller_than_offset8_is_bad_value() {
        let mut bytes = encode_inband(7, 0, &[0; 8]); // len8 = 3
        bytes[2] = 4; // offset8 = 4 > len8
        assert!(matches!(
            parse_packet(&bytes),
            Err(WireError::BadValue { value: 4, .. })
        ));
        bytes[2] = 0xff;
        bytes[3] = 0xff;
        assert!(matches!(
            parse_packet(&bytes),
            Err(WireError::BadValue { value: 0xffff, .. })
        ));
    }

    #[test]
    fn parse_packet_offset8_inside_descriptor_is_bad_value() {
        for offset8 in [0u8, 1] {
            let mut bytes = encode_inband(7, 0, &[0; 8]);
            bytes[2] = offset8;
            assert!(matches!(
                parse_packet(&bytes),
                Err(WireError::BadValue { value, .. }) if value == u64::from(offset8)
            ));
        }
    }

    #[test]
    fn parse_packet_garbage_never_panics() {
        // A cheap deterministic byte soup of many lengths; only errors or Ok are allowed.
        let mut state = 0x1234_5678u32;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (state >> 16) as u8
                })
                .collect();
            let _ = parse_packet(&bytes);
        }
    }

    #[test]
    fn encode_inband_oversized_payload_saturates_and_is_rejected() {
        let payload = vec![0u8; MAX_INBAND_PAYLOAD + 1];
        let bytes = encode_inband(1, 0, &payload);
        assert_eq!(&bytes[4..6], &[0xff, 0xff]);
        assert!(matches!(
            parse_packet(&bytes),
            Err(WireError::LengthMismatch { .. })
        ));
        let max = encode_inband(1, 0, &vec![0u8; MAX_INBAND_PAYLOAD]);
        assert_eq!(
            parse_packet(&max).unwrap().payload.len(),
            MAX_INBAND_PAYLOAD
        );
    }
}
