//! Host access to guest pages a packet names: the bus's stand-in for DMA (docs/bus-protocol.md,
//! "Guest memory").
//!
//! A real VSP reads and writes the guest pages of a GPA-direct packet in place, through the
//! hypervisor. Our host and guest share no memory, so the host asks: a READ names a byte range
//! of the packet's page range and the guest answers with DATA frames; a WRITE carries bytes the
//! guest stores. Offsets are into the packet's range: byte `k × 4096 + i` is byte `i` of the
//! page the packet's `k`-th PFN names. The guest resolves them against its own record of the
//! pages it pinned, never against anything the host sends.
//!
//! One frame of kind [`crate::stream::kind::MEMORY`] per message: a 32-byte header, then
//! bytes (DATA and WRITE only), at most [`MAX_CHUNK`] of them.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::WireError;

/// Size of [`MemoryHeader`].
pub const MEMORY_HEADER_LEN: usize = 32;
/// The most bytes one DATA or WRITE frame carries.
pub const MAX_CHUNK: usize = 64 << 10;

/// Message kinds.
pub mod op {
    /// Host → guest: send me `len` bytes at `offset`.
    pub const READ: u32 = 1;
    /// Guest → host: bytes at `offset` (or, with a non-zero status, the READ failed).
    pub const DATA: u32 = 2;
    /// Host → guest: store these bytes at `offset`.
    pub const WRITE: u32 = 3;
}

/// The header of a memory message.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct MemoryHeader {
    /// [`op`].
    pub op: U32,
    /// DATA: 0, or the errno why the READ failed (ENOENT: no such transaction in flight,
    /// EINVAL: outside the packet's range, EFAULT: the caller's page is gone). Else 0.
    pub status: U32,
    /// The transaction id of the GPA-direct packet whose pages are meant.
    pub trans_id: U64,
    /// Byte offset in the packet's page range.
    pub offset: U64,
    /// READ: bytes asked for. DATA, WRITE: bytes that follow the header.
    pub len: U32,
    /// 0.
    pub reserved: U32,
}

const _: () = assert!(core::mem::size_of::<MemoryHeader>() == MEMORY_HEADER_LEN);

/// A memory message, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryMessage<'a> {
    /// Host asks for `len` bytes at `offset`.
    Read {
        /// Transaction id.
        trans_id: u64,
        /// Range offset.
        offset: u64,
        /// Bytes wanted (any size: answered in chunks).
        len: u32,
    },
    /// Guest answers a READ, one chunk.
    Data {
        /// Transaction id.
        trans_id: u64,
        /// Range offset of `bytes`.
        offset: u64,
        /// 0, or the errno that ended the answer.
        status: u32,
        /// The chunk.
        bytes: &'a [u8],
    },
    /// Host stores bytes.
    Write {
        /// Transaction id.
        trans_id: u64,
        /// Range offset of `bytes`.
        offset: u64,
        /// The chunk.
        bytes: &'a [u8],
    },
}

impl MemoryMessage<'_> {
    /// Parses one frame body. The byte count must equal `len` for DATA and WRITE and be at
    /// most [`MAX_CHUNK`]; a READ carries no bytes.
    pub fn parse(body: &[u8]) -> Result<MemoryMessage<'_>, WireError> {
        let (header, rest) =
            MemoryHeader::read_from_prefix(body).map_err(|_| WireError::TooShort {
                what: "guest memory header",
                need: MEMORY_HEADER_LEN,
                got: body.len(),
            })?;
        if header.reserved.get() != 0 {
            return Err(WireError::BadValue {
                what: "guest memory reserved field",
                value: header.reserved.get().into(),
            });
        }
        let (trans_id, offset, len) =
            (header.trans_id.get(), header.offset.get(), header.len.get());
        let bytes_ok = |rest: &[u8]| {
            if rest.len() != len as usize {
                Err(WireError::LengthMismatch {
                    what: "guest memory chunk",
                    expected: len as usize,
                    got: rest.len(),
                })
            } else if rest.len() > MAX_CHUNK {
                Err(WireError::TooLong {
                    what: "guest memory chunk",
                    max: MAX_CHUNK,
                    got: rest.len(),
                })
            } else {
                Ok(())
            }
        };
        match header.op.get() {
            op::READ if rest.is_empty() => Ok(MemoryMessage::Read {
                trans_id,
                offset,
                len,
            }),
            op::READ => Err(WireError::LengthMismatch {
                what: "guest memory READ (carries no bytes)",
                expected: 0,
                got: rest.len(),
            }),
            op::DATA => bytes_ok(rest).map(|()| MemoryMessage::Data {
                trans_id,
                offset,
                status: header.status.get(),
                bytes: rest,
            }),
            op::WRITE => bytes_ok(rest).map(|()| MemoryMessage::Write {
                trans_id,
                offset,
                bytes: rest,
            }),
            other => Err(WireError::BadValue {
                what: "guest memory op",
                value: other.into(),
            }),
        }
    }

    /// The frame body.
    pub fn encode(&self) -> Vec<u8> {
        let (op, status, trans_id, offset, len, bytes): (u32, u32, u64, u64, u32, &[u8]) =
            match *self {
                MemoryMessage::Read {
                    trans_id,
                    offset,
                    len,
                } => (op::READ, 0, trans_id, offset, len, &[]),
                MemoryMessage::Data {
                    trans_id,
                    offset,
                    status,
                    bytes,
                } => (
                    op::DATA,
                    status,
                    trans_id,
                    offset,
                    bytes.len() as u32,
                    bytes,
                ),
                MemoryMessage::Write {
                    trans_id,
                    offset,
                    bytes,
                } => (op::WRITE, 0, trans_id, offset, bytes.len() as u32, bytes),
            };
        let mut out = Vec::with_capacity(MEMORY_HEADER_LEN + bytes.len());
        out.extend_from_slice(header(op, status, trans_id, offset, len).as_bytes());
        out.extend_from_slice(bytes);
        out
    }
}

/// A header on its own, for a sender that fills the bytes after it in place (the guest reads
/// the caller's memory straight into the frame buffer).
pub fn header(op: u32, status: u32, trans_id: u64, offset: u64, len: u32) -> MemoryHeader {
    MemoryHeader {
        op: U32::new(op),
        status: U32::new(status),
        trans_id: U64::new(trans_id),
        offset: U64::new(offset),
        len: U32::new(len),
        reserved: U32::new(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let data = [1u8, 2, 3];
        for message in [
            MemoryMessage::Read {
                trans_id: 9,
                offset: 4096,
                len: 1 << 25,
            },
            MemoryMessage::Data {
                trans_id: 9,
                offset: 4096,
                status: 0,
                bytes: &data,
            },
            MemoryMessage::Data {
                trans_id: 9,
                offset: 0,
                status: 14,
                bytes: &[],
            },
            MemoryMessage::Write {
                trans_id: 1,
                offset: 7,
                bytes: &data,
            },
        ] {
            let body = message.encode();
            assert_eq!(MemoryMessage::parse(&body).unwrap(), message);
        }
    }

    #[test]
    fn hostile_bodies_are_errors() {
        let write = MemoryMessage::Write {
            trans_id: 1,
            offset: 0,
            bytes: &[1, 2, 3, 4],
        }
        .encode();
        assert!(MemoryMessage::parse(&write[..write.len() - 1]).is_err());
        assert!(MemoryMessage::parse(&write[..16]).is_err());
        let mut bad_op = write.clone();
        bad_op[0] = 9;
        assert!(MemoryMessage::parse(&bad_op).is_err());
        let mut reserved = write.clone();
        reserved[28] = 1;
        assert!(MemoryMessage::parse(&reserved).is_err());
        let mut read_with_bytes = write;
        read_with_bytes[0] = op::READ as u8;
        assert!(MemoryMessage::parse(&read_with_bytes).is_err());
        let big = vec![0u8; MAX_CHUNK + 1];
        let too_big = MemoryMessage::Write {
            trans_id: 1,
            offset: 0,
            bytes: &big,
        }
        .encode();
        assert!(MemoryMessage::parse(&too_big).is_err());
    }
}
