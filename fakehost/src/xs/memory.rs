//! The host's hands on guest pages: READ a byte range of a request's pages and wait for the
//! guest's DATA answers, WRITE bytes into them (docs/bus-protocol.md, "Guest memory").
//!
//! Reads are routed by (link, transaction id): each request has at most one READ outstanding,
//! and the DATA frames that answer it go straight into that request's buffer, in order, on
//! the channel's reader thread. That buffer is then the only copy: it becomes the PUT's
//! payload as it is. A DATA that nobody asked for, one out of order, or one with an errno
//! ends nothing but what it names (and is logged); a detach fails every read of the link.

use std::collections::HashMap;
use std::io;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use vmbus::guest_memory::{self, op, MemoryMessage, MAX_CHUNK};
use zerocopy::IntoBytes;

use crate::bus::ChannelLink;

/// Why a READ brought back no bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The guest ended the answer with an errno.
    #[error("the guest answered with errno {errno} ({}) at offset {offset}", errno_name(*.errno))]
    Refused {
        /// Its errno (ENOENT, EINVAL, EFAULT, ...).
        errno: u32,
        /// Where.
        offset: u64,
    },
    /// A DATA for another part of the range than the next one.
    #[error("the guest sent bytes for offset {got} where offset {expected} was next")]
    OutOfOrder {
        /// The next offset we wanted.
        expected: u64,
        /// The one it sent.
        got: u64,
    },
    /// More bytes than were asked for.
    #[error("the guest sent {got} bytes at offset {offset}, but only {left} were left to read")]
    TooMuch {
        /// Where.
        offset: u64,
        /// Bytes in the frame.
        got: usize,
        /// Bytes still wanted.
        left: u64,
    },
    /// No (complete) answer in time.
    #[error("the guest did not answer within {} s", .0.as_secs_f64())]
    Timeout(Duration),
    /// The channel stream ended (or could not be written to).
    #[error("the channel went away")]
    Gone,
}

fn errno_name(errno: u32) -> &'static str {
    i32::try_from(errno).map_or("unknown", |e| nix::errno::Errno::from_raw(e).desc())
}

struct PendingRead {
    next: u64,
    end: u64,
    buf: Vec<u8>,
    done: oneshot::Sender<Result<Vec<u8>, ReadError>>,
}

/// The READs in flight, by (link id, transaction id).
#[derive(Default)]
pub struct GuestMemory {
    reads: Mutex<HashMap<(u64, u64), PendingRead>>,
}

impl GuestMemory {
    fn lock(&self) -> MutexGuard<'_, HashMap<(u64, u64), PendingRead>> {
        self.reads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads `len` bytes at `offset` of transaction `trans_id`'s pages: one READ, then the
    /// DATA answers collected into one buffer. The caller has at most one read in flight per
    /// transaction.
    pub async fn read(
        &self,
        link: &ChannelLink,
        trans_id: u64,
        offset: u64,
        len: u32,
        timeout: Duration,
    ) -> Result<Vec<u8>, ReadError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let key = (link.id, trans_id);
        let (done, answer) = oneshot::channel();
        let pending = PendingRead {
            next: offset,
            end: offset + u64::from(len),
            buf: Vec::with_capacity(len as usize),
            done,
        };
        if let Some(old) = self.lock().insert(key, pending) {
            // Not reachable from our own request code; say so if it ever is.
            log::error!("xs: trans_id {trans_id}: a second READ while one was in flight");
            let _ = old.done.send(Err(ReadError::Gone));
        }
        let body = MemoryMessage::Read {
            trans_id,
            offset,
            len,
        }
        .encode();
        let sender = link.clone();
        // A send may wait for the stream's write lock behind another request's WRITEs: not on
        // a runtime worker.
        let sent = tokio::task::spawn_blocking(move || sender.send_memory(&body)).await;
        if !matches!(sent, Ok(Ok(()))) {
            self.lock().remove(&key);
            return Err(ReadError::Gone);
        }
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            // The sender was dropped: the link detached.
            Ok(Err(_)) => Err(ReadError::Gone),
            Err(_) => {
                self.lock().remove(&key);
                Err(ReadError::Timeout(timeout))
            }
        }
    }

    /// A memory message from the guest on `link_id` (the channel reader's thread).
    pub fn on_message(&self, link_id: u64, message: &MemoryMessage<'_>) {
        let MemoryMessage::Data {
            trans_id,
            offset,
            status,
            bytes,
        } = *message
        else {
            log::warn!("xs: the guest sent a host-only memory message ({message:?}); dropped");
            return;
        };
        let key = (link_id, trans_id);
        let mut reads = self.lock();
        let Some(pending) = reads.get_mut(&key) else {
            drop(reads);
            log::warn!(
                "xs: DATA for trans_id {trans_id} at offset {offset} ({} bytes), but no READ of \
                 that transaction is outstanding; dropped",
                bytes.len()
            );
            return;
        };
        let left = pending.end - pending.next;
        let failed = if status != 0 {
            Some(ReadError::Refused {
                errno: status,
                offset,
            })
        } else if offset != pending.next {
            Some(ReadError::OutOfOrder {
                expected: pending.next,
                got: offset,
            })
        } else if bytes.len() as u64 > left {
            Some(ReadError::TooMuch {
                offset,
                got: bytes.len(),
                left,
            })
        } else {
            pending.buf.extend_from_slice(bytes);
            pending.next += bytes.len() as u64;
            None
        };
        if failed.is_none() && pending.next < pending.end {
            return;
        }
        let Some(pending) = reads.remove(&key) else {
            return;
        };
        drop(reads);
        let result = match failed {
            Some(e) => Err(e),
            None => Ok(pending.buf),
        };
        // The request may have been dropped meanwhile (timeout): nobody to tell.
        let _ = pending.done.send(result);
    }

    /// The link's stream ended: every read on it fails with [`ReadError::Gone`].
    pub fn detach(&self, link_id: u64) {
        self.lock().retain(|(link, _), _| *link != link_id);
    }
}

/// Writes `bytes` at `offset` of transaction `trans_id`'s pages: WRITE frames of at most
/// [`MAX_CHUNK`] bytes, each sent as its header and a slice of `bytes` (no copy). Blocking.
pub fn write(link: &ChannelLink, trans_id: u64, offset: u64, bytes: &[u8]) -> io::Result<()> {
    for (i, chunk) in bytes.chunks(MAX_CHUNK).enumerate() {
        let at = offset + (i * MAX_CHUNK) as u64;
        // A chunk is at most MAX_CHUNK (64 KiB) bytes: it fits the u32.
        let header = guest_memory::header(op::WRITE, 0, trans_id, at, chunk.len() as u32);
        link.send_memory_parts(header.as_bytes(), chunk)?;
    }
    Ok(())
}
