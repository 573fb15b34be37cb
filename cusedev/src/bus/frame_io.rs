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

/// Bodies up to this size are copied behind their header and sent in one syscall; larger ones
/// (guest memory chunks, page lists) go out as header then body, so a 32 MiB buffer is not
/// copied once more on its way to the socket.
const COALESCE_LIMIT: usize = 4096;

/// Writes one frame. Frames from several threads never interleave as long as each writer holds
/// the stream's lock across the call.
pub fn write_frame(stream: &mut impl Write, kind: u16, body: &[u8]) -> io::Result<()> {
    if body.len() <= COALESCE_LIMIT {
        return stream.write_all(&encode_frame(kind, body));
    }
    let header = FrameHeader {
        len: u32::try_from(body.len()).unwrap_or(u32::MAX),
        kind,
    };
    stream.write_all(&header.encode())?;
    stream.write_all(body)
}
