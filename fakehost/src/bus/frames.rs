//! Reading and writing bus frames (`vmbus::stream`) on a Unix stream.
//!
//! One stream is read by exactly one thread (its connection thread) and written by whoever has
//! something to say (the session, a service, the control socket), so writes go through a small
//! lock that keeps each frame contiguous. The stream itself is shared as `Arc<UnixStream>`:
//! `&UnixStream` reads and writes, and `shutdown()` needs no lock, which is how any thread can
//! end a stream whose reader is blocked.

use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vmbus::stream::{self, FrameHeader, FRAME_HEADER_LEN, MAX_FRAME_BODY};
use vmbus::WireError;

/// How long a write may block on a guest that does not read before we give up on the stream.
/// Frames are small (one fcopy fragment is ~6 KiB) and one transaction is in flight at a time,
/// so a full socket buffer means the guest is stuck, not slow.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed (reset, timeout, ...).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The header is not a valid frame header.
    #[error("bad frame header: {0}")]
    Header(WireError),
    /// The header announces more than the bus allows.
    #[error("frame of {len} bytes exceeds the bus limit of {max}")]
    TooLong {
        /// Announced body length.
        len: u32,
        /// [`MAX_FRAME_BODY`].
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended in the middle of a frame ({got} of {need} bytes)")]
    Truncated {
        /// Bytes expected.
        need: usize,
        /// Bytes received before the end.
        got: usize,
    },
}

/// One frame: its kind (`vmbus::stream::kind`) and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// HELLO, CONTROL or PACKET.
    pub kind: u16,
    /// The body (without the 8-byte frame header).
    pub body: Vec<u8>,
}

/// Reads one frame. `Ok(None)` is a clean end of stream at a frame boundary.
pub fn read_frame(mut reader: impl Read) -> Result<Option<Frame>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let got = read_full(&mut reader, &mut header)?;
    if got == 0 {
        return Ok(None);
    }
    if got < header.len() {
        return Err(FrameError::Truncated {
            need: header.len(),
            got,
        });
    }
    let header = FrameHeader::parse(&header).map_err(FrameError::Header)?;
    let len = usize::try_from(header.len).unwrap_or(usize::MAX);
    if len > MAX_FRAME_BODY {
        return Err(FrameError::TooLong {
            len: header.len,
            max: MAX_FRAME_BODY,
        });
    }
    let mut body = vec![0u8; len];
    let got = read_full(&mut reader, &mut body)?;
    if got < len {
        return Err(FrameError::Truncated { need: len, got });
    }
    Ok(Some(Frame {
        kind: header.kind,
        body,
    }))
}

/// Reads until `buf` is full or the stream ends; returns how many bytes were read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The read buffer of a bus stream's reader: room for the largest fcopy packet and a few
/// small ones, so one `read()` usually brings a whole frame, header and body.
const READ_BUFFER: usize = 64 * 1024;

/// The reading half of a bus stream for its long-lived reader thread: buffered, and asleep in
/// `poll(POLLIN)` rather than in `read()` while nothing has arrived.
///
/// Why poll first: this thread also writes on the same socket (fcopy sends the next fragment
/// from here), and every time the guest consumes data we wrote, the kernel frees our skb and
/// calls `unix_write_space()` (net/unix/af_unix.c, 6.1 through 6.18), which wakes the socket's
/// wait queue with an EPOLLOUT key. A thread sleeping in `read()` waits there through
/// `unix_stream_data_wait()` with the default wake function, which ignores the key: it wakes,
/// finds no data and sleeps again, two context switches per fragment for nothing. A `poll()`
/// sleeper is woken through `pollwake()` (fs/select.c), which drops wake-ups whose key does
/// not intersect the events it waits for, so POLLIN sleeps through write-space wake-ups.
///
/// Only for streams without a read timeout (`poll(-1)` ignores SO_RCVTIMEO): the HELLO read,
/// which has one, stays a plain read.
pub struct StreamReader<'a> {
    inner: BufReader<PollFirst<'a>>,
}

impl<'a> StreamReader<'a> {
    /// A reader over `stream`.
    pub fn new(stream: &'a UnixStream) -> StreamReader<'a> {
        StreamReader {
            inner: BufReader::with_capacity(READ_BUFFER, PollFirst(stream)),
        }
    }
}

impl Read for StreamReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

/// `poll(POLLIN)`, then `read()`.
struct PollFirst<'a>(&'a UnixStream);

impl Read for PollFirst<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                // Readable, or POLLHUP/POLLERR: either way read() says which.
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        (&*self.0).read(buf)
    }
}

/// Bodies up to this size are sent behind their header in one syscall.
const COALESCE_LIMIT: usize = 4096;

/// The writing half of a bus stream, shared by everyone who sends on it.
#[derive(Debug)]
pub struct FrameWriter {
    stream: Arc<UnixStream>,
    write_lock: Mutex<()>,
}

impl FrameWriter {
    /// Wraps a stream; sets its write timeout to [`WRITE_TIMEOUT`].
    pub fn new(stream: Arc<UnixStream>) -> FrameWriter {
        if let Err(e) = stream.set_write_timeout(Some(WRITE_TIMEOUT)) {
            log::warn!("cannot set a write timeout on a bus stream: {e}");
        }
        FrameWriter {
            stream,
            write_lock: Mutex::new(()),
        }
    }

    /// Sends one frame. On failure the stream is shut down, so its reader ends too and the
    /// owner learns that the peer is gone in one place.
    pub fn send(&self, kind: u16, body: &[u8]) -> io::Result<()> {
        let result = {
            let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
            if body.len() <= COALESCE_LIMIT {
                (&*self.stream).write_all(&stream::encode_frame(kind, body))
            } else {
                // Header then body: a large chunk is not copied once more on its way out.
                let header = FrameHeader {
                    len: u32::try_from(body.len()).unwrap_or(u32::MAX),
                    kind,
                };
                (&*self.stream)
                    .write_all(&header.encode())
                    .and_then(|()| (&*self.stream).write_all(body))
            }
        };
        if let Err(e) = &result {
            log::warn!("bus write failed ({e}); closing that stream");
            self.shutdown();
        }
        result
    }

    /// Sends one frame whose body is `parts` laid end to end, in one `writev` where the
    /// socket takes it: a guest-memory WRITE goes out as its 32-byte header and a slice of the
    /// host's buffer, never copied into a frame of its own. Same failure rule as [`send`].
    ///
    /// [`send`]: FrameWriter::send
    pub fn send_parts(&self, kind: u16, parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let header = FrameHeader {
            len: u32::try_from(len).unwrap_or(u32::MAX),
            kind,
        }
        .encode();
        let mut all = Vec::with_capacity(parts.len() + 1);
        all.push(&header[..]);
        all.extend_from_slice(parts);
        let result = {
            let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
            write_all_vectored(&self.stream, &mut all)
        };
        if let Err(e) = &result {
            log::warn!("bus write failed ({e}); closing that stream");
            self.shutdown();
        }
        result
    }

    /// Ends the stream in both directions (wakes its blocked reader).
    pub fn shutdown(&self) {
        // NotConnected just means the peer already went; nothing else to do either way.
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// `write_all` over several buffers: `writev` until every byte is out (a short write moves
/// the start forward; `IoSlice::advance_slices` needs a newer Rust than the workspace's).
fn write_all_vectored(mut stream: &UnixStream, parts: &mut [&[u8]]) -> io::Result<()> {
    let mut first = 0;
    while first < parts.len() {
        let slices: Vec<IoSlice<'_>> = parts[first..].iter().map(|p| IoSlice::new(p)).collect();
        let mut written = match stream.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while first < parts.len() && written >= parts[first].len() {
            written -= parts[first].len();
            first += 1;
        }
        if let Some(part) = parts.get_mut(first) {
            *part = part.get(written..).unwrap_or_default();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trips_through_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let writer = FrameWriter::new(Arc::new(a));
        writer.send(stream::kind::CONTROL, b"hello").unwrap();
        let frame = read_frame(&b).unwrap().unwrap();
        assert_eq!(frame.kind, stream::kind::CONTROL);
        assert_eq!(frame.body, b"hello");
    }

    #[test]
    fn stream_reader_reads_frames_back_to_back_and_the_end() {
        let (a, b) = UnixStream::pair().unwrap();
        let writer = FrameWriter::new(Arc::new(a));
        writer.send(stream::kind::CONTROL, b"one").unwrap();
        writer.send(stream::kind::PACKET, &[9; 7000]).unwrap();
        let mut reader = StreamReader::new(&b);
        assert_eq!(read_frame(&mut reader).unwrap().unwrap().body, b"one");
        assert_eq!(
            read_frame(&mut reader).unwrap().unwrap().body,
            vec![9; 7000]
        );
        writer.shutdown();
        assert!(read_frame(&mut reader).unwrap().is_none());
    }

    #[test]
    fn parts_arrive_as_one_frame_even_through_short_writes() {
        let (a, b) = UnixStream::pair().unwrap();
        // A small send buffer forces writev to come back short many times.
        nix::sys::socket::setsockopt(&a, nix::sys::socket::sockopt::SndBuf, &4096).unwrap();
        let writer = FrameWriter::new(Arc::new(a));
        let head = [7u8; 32];
        let body: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let reader = std::thread::spawn(move || read_frame(&b).unwrap().unwrap());
        writer
            .send_parts(stream::kind::MEMORY, &[&head, &body[..65536]])
            .unwrap();
        let frame = reader.join().unwrap();
        assert_eq!(frame.kind, stream::kind::MEMORY);
        assert_eq!(frame.body.len(), 32 + 65536);
        assert_eq!(&frame.body[..32], &head);
        assert_eq!(&frame.body[32..], &body[..65536]);
    }

    #[test]
    fn clean_end_is_none_and_a_cut_header_is_truncated() {
        assert!(read_frame(&[][..]).unwrap().is_none());
        assert!(matches!(
            read_frame(&[1, 0, 0][..]),
            Err(FrameError::Truncated { need: 8, got: 3 })
        ));
    }

    #[test]
    fn cut_body_is_truncated() {
        let mut bytes = stream::encode_frame(stream::kind::CONTROL, &[7; 16]);
        bytes.truncate(bytes.len() - 4);
        assert!(matches!(
            read_frame(&bytes[..]),
            Err(FrameError::Truncated { need: 16, got: 12 })
        ));
    }

    #[test]
    fn oversized_frame_is_refused_before_allocating() {
        let mut bytes = (u32::MAX).to_le_bytes().to_vec();
        bytes.extend_from_slice(&stream::kind::PACKET.to_le_bytes());
        bytes.extend_from_slice(&[0, 0]);
        assert!(matches!(
            read_frame(&bytes[..]),
            Err(FrameError::Header(_) | FrameError::TooLong { .. })
        ));
    }
}
