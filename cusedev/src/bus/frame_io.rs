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
    /// A host that died or cut the connection mid-frame (std's read_exact would only say
    /// "failed to fill whole buffer", which names neither the frame nor how much came).
    #[error("the stream ended in the middle of a frame ({got} of {len} bytes)")]
    Truncated { got: usize, len: usize },
}

/// Reads one frame: `Ok(None)` at a clean end of stream (between frames).
pub fn read_frame(stream: &mut impl Read) -> Result<Option<(u16, Vec<u8>)>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match fill(stream, &mut header)? {
        0 => return Ok(None),
        FRAME_HEADER_LEN => {}
        got => {
            return Err(FrameError::Truncated {
                got,
                len: FRAME_HEADER_LEN,
            })
        }
    }
    let header = FrameHeader::parse(&header)?;
    let mut body = vec![0u8; header.len as usize];
    let got = fill(stream, &mut body)?;
    if got < body.len() {
        return Err(FrameError::Truncated {
            got: FRAME_HEADER_LEN + got,
            len: FRAME_HEADER_LEN + body.len(),
        });
    }
    Ok(Some((header.kind, body)))
}

/// Reads into `buf` until it is full or the stream ends; how many bytes came.
fn fill(stream: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_cut_short_says_how_much_of_it_came() {
        let frame = encode_frame(3, &[7; 16]);
        for (keep, got, len) in [(5, 5, FRAME_HEADER_LEN), (FRAME_HEADER_LEN + 10, 18, 24)] {
            let err = read_frame(&mut &frame[..keep]).unwrap_err();
            assert!(
                matches!(err, FrameError::Truncated { got: g, len: l } if (g, l) == (got, len)),
                "{keep} bytes: {err}"
            );
        }
        assert!(read_frame(&mut &frame[..0]).unwrap().is_none());
        assert_eq!(read_frame(&mut &frame[..]).unwrap(), Some((3, vec![7; 16])));
    }
}
