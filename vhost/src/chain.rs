//! Guest descriptor chains in and out: gather a TX packet from a driver→device chain, and
//! scatter an RX packet into a device→driver chain. Everything the guest controls (descriptor
//! directions, addresses, lengths, the header's `len`) is checked here and reported as a
//! [`ChainError`]; the caller counts it, logs it and returns the chain with used length 0
//! (virtio spec 1.2 §2.7.8: the device must still hand the buffer back, or the driver stalls).
//!
//! The header and payload may be laid out in any way across descriptors — one descriptor for
//! both (Linux ≥ 6.2 TX), header and payload in separate descriptors (older Linux), or a header
//! split across descriptors — because `virtio_queue::{Reader, Writer}` present the chain as
//! one byte stream. Indirect descriptors (`VIRTIO_RING_F_INDIRECT_DESC`) are resolved by
//! `virtio_queue::DescriptorChain` itself.

use std::io::{Read, Write};
use std::ops::Deref;

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::{GuestMemory, GuestMemoryMmap};

use crate::packet::{Header, HDR_LEN, MAX_PKT_DATA};

/// The guest memory type of this backend (no dirty-page bitmap: live migration is not
/// supported).
pub type Mem = GuestMemoryMmap<()>;

/// What is wrong with a descriptor chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The chain yields no descriptor at all (bad head index or descriptor table).
    #[error("the chain has no readable descriptor table entry")]
    Empty,
    /// A device-writable descriptor on the TX queue (spec §5.10.6: TX buffers are read-only).
    #[error("descriptor {0} of a TX chain is device-writable")]
    WritableOnTx(usize),
    /// A device-readable descriptor on the RX queue (spec §5.10.6: RX buffers are write-only).
    #[error("descriptor {0} of an RX chain is device-readable")]
    ReadOnlyOnRx(usize),
    /// A descriptor's address range is not (entirely) guest RAM.
    #[error("a descriptor points outside guest memory")]
    OutOfBounds,
    /// The chain holds fewer bytes than a header.
    #[error("the chain holds {0} bytes, fewer than the {HDR_LEN}-byte header")]
    ShortHeader(usize),
    /// The header's `len` is larger than any packet may be.
    #[error("header len {0} exceeds the {MAX_PKT_DATA}-byte packet cap")]
    LenOverCap(u32),
    /// The header's `len` is larger than the payload actually present.
    #[error("header len {len} but the chain holds only {have} payload bytes")]
    LenBeyondChain {
        /// The header's claim.
        len: u32,
        /// Bytes after the header.
        have: usize,
    },
    /// The RX buffer cannot hold even a header.
    #[error("RX buffer of {0} bytes cannot hold the {HDR_LEN}-byte header")]
    RxTooSmall(usize),
    /// Copying from or to guest memory failed after validation (should not happen).
    #[error("guest memory access failed: {0}")]
    Access(String),
}

/// A packet the driver put on the TX queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxPacket {
    /// The decoded header.
    pub hdr: Header,
    /// Exactly `hdr.len` payload bytes.
    pub data: Vec<u8>,
}

/// Check every descriptor's direction. `want_writable` is the direction the queue requires.
fn check_directions<M>(chain: &DescriptorChain<M>, want_writable: bool) -> Result<(), ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let mut count = 0usize;
    for (index, desc) in chain.clone().enumerate() {
        count += 1;
        if desc.is_write_only() != want_writable {
            return Err(if want_writable {
                ChainError::ReadOnlyOnRx(index)
            } else {
                ChainError::WritableOnTx(index)
            });
        }
    }
    if count == 0 {
        return Err(ChainError::Empty);
    }
    Ok(())
}

/// Gather one TX packet. Bytes after the header's `len` (a driver may post a bigger buffer)
/// are ignored; a `len` beyond the chain or beyond [`MAX_PKT_DATA`] is an error.
pub fn read_tx<'a>(chain: DescriptorChain<&'a Mem>, mem: &'a Mem) -> Result<TxPacket, ChainError> {
    check_directions(&chain, false)?;
    // Reader::new maps every descriptor through GuestMemory::get_slices and fails if any byte
    // is outside a memory region.
    let mut reader: Reader<'a> = chain.reader(mem).map_err(|_| ChainError::OutOfBounds)?;
    let total = reader.available_bytes();
    if total < HDR_LEN {
        return Err(ChainError::ShortHeader(total));
    }
    let mut raw = [0u8; HDR_LEN];
    reader
        .read_exact(&mut raw)
        .map_err(|e| ChainError::Access(e.to_string()))?;
    let hdr = Header::decode(&raw).map_err(|_| ChainError::ShortHeader(total))?;
    if hdr.len as usize > MAX_PKT_DATA {
        return Err(ChainError::LenOverCap(hdr.len));
    }
    let have = total - HDR_LEN;
    if hdr.len as usize > have {
        return Err(ChainError::LenBeyondChain { len: hdr.len, have });
    }
    let mut data = vec![0u8; hdr.len as usize];
    reader
        .read_exact(&mut data)
        .map_err(|e| ChainError::Access(e.to_string()))?;
    Ok(TxPacket { hdr, data })
}

/// A validated RX buffer: all descriptors writable, all inside guest memory, room for at
/// least a header.
pub struct RxBuffer<'a> {
    writer: Writer<'a>,
}

impl<'a> RxBuffer<'a> {
    /// Validate an RX chain.
    pub fn new(chain: DescriptorChain<&'a Mem>, mem: &'a Mem) -> Result<RxBuffer<'a>, ChainError> {
        check_directions(&chain, true)?;
        let writer: Writer<'a> = chain.writer(mem).map_err(|_| ChainError::OutOfBounds)?;
        let room = writer.available_bytes();
        if room < HDR_LEN {
            return Err(ChainError::RxTooSmall(room));
        }
        Ok(RxBuffer { writer })
    }

    /// Payload bytes that fit after the header (capped at [`MAX_PKT_DATA`]).
    pub fn payload_room(&self) -> usize {
        (self.writer.available_bytes() - HDR_LEN).min(MAX_PKT_DATA)
    }

    /// Write header and payload; returns the used length. `hdr.len` must equal `data.len()`
    /// and `data.len() <= payload_room()` (the caller sized it from [`Self::payload_room`]).
    pub fn write(mut self, hdr: &Header, data: &[u8]) -> Result<u32, ChainError> {
        debug_assert_eq!(hdr.len as usize, data.len());
        if data.len() > self.payload_room() {
            return Err(ChainError::Access(format!(
                "{} payload bytes do not fit in {}",
                data.len(),
                self.payload_room()
            )));
        }
        self.writer
            .write_all(&hdr.encode())
            .and_then(|()| self.writer.write_all(data))
            .map_err(|e| ChainError::Access(e.to_string()))?;
        // Both are bounded by HDR_LEN + MAX_PKT_DATA, far below u32::MAX.
        Ok((HDR_LEN + data.len()) as u32)
    }
}
