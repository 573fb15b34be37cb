//! The virtio-vsock packet header (virtio spec 1.2 §5.10.6 "Device Operation"): layout, the
//! operation and flag values, and a bounds-checked little-endian codec.
//!
//! `virtio_vsock::packet::VsockPacket` is not used: it insists on the header living in the
//! first descriptor and the payload in (at most) one more, and rejects guest memory that is
//! fragmented across regions. The spec does not promise either (§2.7.4 "Message Framing": the
//! device must not make assumptions about the particular arrangement of descriptors), so the
//! header is decoded here from plain bytes that [`crate::chain`] gathers from any layout.

/// Size of `struct virtio_vsock_hdr` on the wire (packed, little-endian).
pub const HDR_LEN: usize = 44;

/// The host's CID as seen from the guest (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type this device implements (no SEQPACKET:
/// `VIRTIO_VSOCK_F_SEQPACKET` is not offered).
pub const TYPE_STREAM: u16 = 1;

/// Largest payload accepted in one TX packet or produced in one RX packet. Linux never sends
/// more than `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE` (64 KiB) per packet
/// (include/linux/virtio_vsock.h); anything larger is a malformed packet, not a big one.
pub const MAX_PKT_DATA: usize = 64 * 1024;

/// `VIRTIO_VSOCK_SHUTDOWN_RCV`: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_SEND`: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// `enum virtio_vsock_op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Connection request.
    Request,
    /// Connection accepted.
    Response,
    /// Connection reset / refused.
    Rst,
    /// Half or full close; `flags` carries [`SHUTDOWN_RCV`] / [`SHUTDOWN_SEND`].
    Shutdown,
    /// Payload.
    Rw,
    /// Unsolicited credit information (`buf_alloc`, `fwd_cnt`).
    CreditUpdate,
    /// Please send a `CreditUpdate`.
    CreditRequest,
}

impl Op {
    /// The wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
        }
    }

    /// Decode a wire value; `None` for `VIRTIO_VSOCK_OP_INVALID` (0) and unknown values.
    pub fn from_u16(value: u16) -> Option<Op> {
        Some(match value {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// A decoded `struct virtio_vsock_hdr`. Fields are kept raw (`op` and `type_` as their wire
/// values) so that a header with an unknown op can still be answered with an RST that echoes
/// it, as Linux does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length in bytes (only meaningful for `Rw`).
    pub len: u32,
    /// Socket type (`TYPE_STREAM`).
    pub type_: u16,
    /// Operation (see [`Op`]).
    pub op: u16,
    /// Op-specific flags (shutdown bits).
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

/// Why a byte string is not a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer than [`HDR_LEN`] bytes.
    #[error("header is {0} bytes, shorter than the {HDR_LEN}-byte virtio_vsock_hdr")]
    Short(usize),
}

fn le_u16(bytes: &[u8; HDR_LEN], at: usize) -> u16 {
    let mut raw = [0u8; 2];
    raw.copy_from_slice(&bytes[at..at + 2]);
    u16::from_le_bytes(raw)
}

fn le_u32(bytes: &[u8; HDR_LEN], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(raw)
}

fn le_u64(bytes: &[u8; HDR_LEN], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}

// Field offsets inside the packed header (include/uapi/linux/virtio_vsock.h).
const OFF_SRC_CID: usize = 0;
const OFF_DST_CID: usize = 8;
const OFF_SRC_PORT: usize = 16;
const OFF_DST_PORT: usize = 20;
const OFF_LEN: usize = 24;
const OFF_TYPE: usize = 28;
const OFF_OP: usize = 30;
const OFF_FLAGS: usize = 32;
const OFF_BUF_ALLOC: usize = 36;
const OFF_FWD_CNT: usize = 40;

impl Header {
    /// Decode the first [`HDR_LEN`] bytes of `bytes` (extra bytes are ignored).
    pub fn decode(bytes: &[u8]) -> Result<Header, HeaderError> {
        let fixed: &[u8; HDR_LEN] = bytes
            .get(..HDR_LEN)
            .and_then(|head| head.try_into().ok())
            .ok_or(HeaderError::Short(bytes.len()))?;
        // The fixed-size array makes every offset below statically in bounds.
        Ok(Header {
            src_cid: le_u64(fixed, OFF_SRC_CID),
            dst_cid: le_u64(fixed, OFF_DST_CID),
            src_port: le_u32(fixed, OFF_SRC_PORT),
            dst_port: le_u32(fixed, OFF_DST_PORT),
            len: le_u32(fixed, OFF_LEN),
            type_: le_u16(fixed, OFF_TYPE),
            op: le_u16(fixed, OFF_OP),
            flags: le_u32(fixed, OFF_FLAGS),
            buf_alloc: le_u32(fixed, OFF_BUF_ALLOC),
            fwd_cnt: le_u32(fixed, OFF_FWD_CNT),
        })
    }

    /// Encode to the wire form.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut out = [0u8; HDR_LEN];
        out[OFF_SRC_CID..OFF_SRC_CID + 8].copy_from_slice(&self.src_cid.to_le_bytes());
        out[OFF_DST_CID..OFF_DST_CID + 8].copy_from_slice(&self.dst_cid.to_le_bytes());
        out[OFF_SRC_PORT..OFF_SRC_PORT + 4].copy_from_slice(&self.src_port.to_le_bytes());
        out[OFF_DST_PORT..OFF_DST_PORT + 4].copy_from_slice(&self.dst_port.to_le_bytes());
        out[OFF_LEN..OFF_LEN + 4].copy_from_slice(&self.len.to_le_bytes());
        out[OFF_TYPE..OFF_TYPE + 2].copy_from_slice(&self.type_.to_le_bytes());
        out[OFF_OP..OFF_OP + 2].copy_from_slice(&self.op.to_le_bytes());
        out[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&self.flags.to_le_bytes());
        out[OFF_BUF_ALLOC..OFF_BUF_ALLOC + 4].copy_from_slice(&self.buf_alloc.to_le_bytes());
        out[OFF_FWD_CNT..OFF_FWD_CNT + 4].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        out
    }

    /// The decoded op, if it is a known one.
    pub fn op(&self) -> Option<Op> {
        Op::from_u16(self.op)
    }

    /// The RST that answers this packet (Linux `virtio_transport_reset_no_sock`): addresses and
    /// ports swapped, the type echoed, no credit information.
    pub fn reset_reply(&self) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            len: 0,
            type_: self.type_,
            op: Op::Rst.to_u16(),
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1234_5678,
            dst_port: 5000,
            len: 17,
            type_: TYPE_STREAM,
            op: Op::Rw.to_u16(),
            flags: SHUTDOWN_SEND,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0xdead_beef,
        }
    }

    #[test]
    fn header_round_trips() {
        let hdr = sample();
        let wire = hdr.encode();
        assert_eq!(Header::decode(&wire), Ok(hdr));
    }

    #[test]
    fn header_layout_is_the_linux_one() {
        let wire = sample().encode();
        // src_cid at 0 (le64), dst_cid at 8, src_port at 16, dst_port at 20, len at 24,
        // type at 28, op at 30, flags at 32, buf_alloc at 36, fwd_cnt at 40.
        assert_eq!(&wire[0..8], &3u64.to_le_bytes());
        assert_eq!(&wire[8..16], &2u64.to_le_bytes());
        assert_eq!(&wire[16..20], &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(&wire[20..24], &5000u32.to_le_bytes());
        assert_eq!(&wire[24..28], &17u32.to_le_bytes());
        assert_eq!(&wire[28..30], &[1, 0]);
        assert_eq!(&wire[30..32], &[5, 0]);
        assert_eq!(&wire[32..36], &[2, 0, 0, 0]);
        assert_eq!(&wire[36..40], &(256u32 * 1024).to_le_bytes());
        assert_eq!(&wire[40..44], &[0xef, 0xbe, 0xad, 0xde]);
    }

    #[test]
    fn short_input_is_rejected_at_every_length() {
        let wire = sample().encode();
        for n in 0..HDR_LEN {
            assert_eq!(Header::decode(&wire[..n]), Err(HeaderError::Short(n)));
        }
    }

    #[test]
    fn trailing_bytes_are_ignored() {
        let mut bytes = sample().encode().to_vec();
        bytes.extend_from_slice(b"payload");
        assert_eq!(Header::decode(&bytes), Ok(sample()));
    }

    #[test]
    fn garbage_decodes_without_panicking_and_unknown_ops_are_none() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..1000 {
            let mut bytes = [0u8; HDR_LEN];
            for byte in bytes.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *byte = seed as u8;
            }
            let hdr = Header::decode(&bytes).unwrap();
            assert_eq!(hdr.encode(), bytes);
            assert_eq!(hdr.op().is_some(), (1..=7).contains(&hdr.op));
        }
        assert_eq!(Op::from_u16(0), None);
        assert_eq!(Op::from_u16(8), None);
        for v in 1..=7u16 {
            assert_eq!(Op::from_u16(v).map(Op::to_u16), Some(v));
        }
    }

    #[test]
    fn reset_reply_swaps_the_endpoints() {
        let rst = sample().reset_reply();
        assert_eq!((rst.src_cid, rst.dst_cid), (HOST_CID, 3));
        assert_eq!((rst.src_port, rst.dst_port), (5000, 0x1234_5678));
        assert_eq!(rst.op(), Some(Op::Rst));
        assert_eq!(rst.type_, TYPE_STREAM);
        assert_eq!(rst.len, 0);
    }
}
