//! Reading and writing bus frames (`vmbus::stream`) on a byte stream.

use std::io::{self, Read, Write};

use vmbus::stream::{encode_frame, FrameHeader, FRAME_HEADER_LEN};

/// Why a stream stopped carrying frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed frame: {0}")]
    Wire(#[from] vmbus::WireError),
}

/// Reads one frame: `Ok(None)` at a clean end of stream (between frames).
pub fn read_frame(stream: &mut impl Read) -> Result<Option<(u16, Vec<u8>)>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut got = 0;
    while got < header.len() {
        match stream.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let header = FrameHeader::parse(&header)?;
    let mut body = vec![0u8; header.len as usize];
    stream.read_exact(&mut body)?;
    Ok(Some((header.kind, body)))
}

/// Writes one frame in a single `write_all`, so frames from several threads never interleave
/// as long as each writer holds the stream's lock.
pub fn write_frame(stream: &mut impl Write, kind: u16, body: &[u8]) -> io::Result<()> {
    stream.write_all(&encode_frame(kind, body))
}
