//! One xs_fastpath request, from its GPA-direct packet to its completion: where its three
//! buffers lie in the packet's page range, reading the request (and a PUT's data) from the
//! guest, the store operation under the request's `timeout_ms`, and what is written back.
//!
//! Order on the wire for one request: READ request buffer → DATA…; for a PUT, READ data
//! buffer → DATA…; then WRITE data (GET), WRITE response buffer, and the completion last, so
//! the guest has every byte in place when it sees the completion (frames on a stream are
//! delivered in order). Statuses and what is written for each: docs/xs-protocol.md.

use std::future::Future;
use std::io;
use std::time::Duration;

use bytes::Bytes;
use vmbus::packet::encode_completion;
use vmbus::xs_fastpath::xstore::{self, Op, Request, Status};
use vmbus::xs_fastpath::{RequestPacket, VspResponse, OP_USER_REQUEST, VSP_RESPONSE_LEN};
use zerocopy::little_endian::U32;
use zerocopy::IntoBytes;

use super::faults::Fault;
use super::memory::{self, GuestMemory, ReadError};
use super::store::{BlobStore, StoreFailure};
use crate::bus::ChannelLink;

/// A request taken off the channel.
pub struct Job {
    /// The channel it came on (and its answer goes back on).
    pub link: ChannelLink,
    /// The parsed packet.
    pub packet: RequestPacket,
    /// The fault in force when it arrived.
    pub fault: Fault,
}

impl Job {
    fn trans_id(&self) -> u64 {
        self.packet.trans_id
    }
}

/// What a request needs from the service.
pub struct Ctx<'a> {
    /// The blobs.
    pub store: &'a BlobStore,
    /// The reads in flight.
    pub memory: &'a GuestMemory,
    /// How long the guest has to answer a READ.
    pub step_timeout: Duration,
    /// Told the outcome of every store operation (for `fakehost status`).
    pub on_store: &'a (dyn Fn(Result<(), &str>) + Sync),
}

/// The answer to one request: what to write into its pages, then its completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The request's transaction id.
    pub trans_id: u64,
    /// The status (VSP `error`).
    pub status: Status,
    /// Bytes for the data buffer (a GET's), at this range offset.
    pub data: Option<(u64, Bytes)>,
    /// Bytes for the response buffer at this range offset; empty: nothing is written.
    pub response: (u64, Vec<u8>),
}

impl Reply {
    /// An answer that writes nothing: only the completion carries `status`.
    fn bare(trans_id: u64, status: Status) -> Reply {
        Reply {
            trans_id,
            status,
            data: None,
            response: (0, Vec::new()),
        }
    }

    /// The `VM_PKT_COMP` packet: a VspResponse with `length` = its own size, `error` = the
    /// status and `response_len` = the response bytes written.
    pub fn completion(&self) -> Vec<u8> {
        let response = VspResponse {
            length: U32::new(VSP_RESPONSE_LEN as u32),
            error: U32::new(self.status.0),
            // At most the response buffer's u32 length.
            response_len: U32::new(self.response.1.len() as u32),
        };
        encode_completion(self.trans_id, response.as_bytes())
    }

    /// Sends it all on `link`, in order: data, response, completion. Blocking.
    pub fn send(&self, link: &ChannelLink) -> io::Result<()> {
        if let Some((offset, bytes)) = &self.data {
            memory::write(link, self.trans_id, *offset, bytes)?;
        }
        let (offset, response) = &self.response;
        if !response.is_empty() {
            memory::write(link, self.trans_id, *offset, response)?;
        }
        link.send_packet(&self.completion())
    }
}

/// A buffer's place in the packet's page range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    offset: u64,
    len: u32,
}

/// The three buffers of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    request: Span,
    response: Span,
    data: Option<Span>,
}

impl Layout {
    /// Checks what the VSP request says about the buffers against the packet's range.
    fn of(packet: &RequestPacket) -> Result<Layout, String> {
        let r = &packet.request;
        if r.version.get() != 0 {
            return Err(format!("VSP request version {} (want 0)", r.version.get()));
        }
        if r.operation_type.get() != OP_USER_REQUEST {
            return Err(format!(
                "operation type {:#x} (want USER_REQUEST {OP_USER_REQUEST:#x})",
                r.operation_type.get()
            ));
        }
        let range = packet.range_bytes();
        let span = |what: &str, offset: u32, len: u32| {
            let end = u64::from(offset) + u64::from(len);
            if len == 0 || end > range {
                Err(format!(
                    "{what} buffer {offset}+{len} is empty or outside the {range}-byte page range"
                ))
            } else {
                Ok(Span {
                    offset: offset.into(),
                    len,
                })
            }
        };
        let data = match (r.data_buffer_valid.get(), r.data_buffer_length.get()) {
            (0, _) | (_, 0) => None,
            (_, len) => Some(span("data", r.data_buffer_offset.get(), len)?),
        };
        Ok(Layout {
            request: span(
                "request",
                r.request_buffer_offset.get(),
                r.request_buffer_length.get(),
            )?,
            response: span(
                "response",
                r.response_buffer_offset.get(),
                r.response_buffer_length.get(),
            )?,
            data,
        })
    }
}

/// Why a request gets no answer at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Abandoned {
    /// Its channel went away while it ran.
    Gone,
}

/// How a step of a request ended early.
enum Fail {
    /// Answer this status (the response header says it too).
    Status(Status),
    /// Answer this (a failed guest read: nothing is written).
    Reply(Reply),
    /// Nobody is left to answer.
    Gone,
}

impl From<Status> for Fail {
    fn from(status: Status) -> Fail {
        Fail::Status(status)
    }
}

/// Serves one request. `Err` only when nobody is left to answer.
pub async fn serve(ctx: &Ctx<'_>, job: &Job) -> Result<Reply, Abandoned> {
    let trans_id = job.trans_id();
    if let Fault::FailStatus { status } = job.fault {
        return Ok(Reply::bare(trans_id, Status(status)));
    }
    let layout = match Layout::of(&job.packet) {
        Ok(layout) => layout,
        Err(reason) => {
            log::warn!(
                "xs: trans_id {trans_id}: {reason}; answering {}",
                Status::BAD_REQUEST
            );
            return Ok(Reply::bare(trans_id, Status::BAD_REQUEST));
        }
    };
    if (layout.response.len as usize) < xstore::HEADER_LEN {
        log::debug!(
            "xs: trans_id {trans_id}: response buffer of {} bytes; answering {}",
            layout.response.len,
            Status::TOO_SMALL
        );
        return Ok(Reply::bare(trans_id, Status::TOO_SMALL));
    }
    let (request, outcome) = match decode(ctx, job, &layout).await {
        Ok(request) => {
            let outcome = run(ctx, job, &layout, &request).await;
            (Some(request), outcome)
        }
        Err(fail) => (None, Err(fail)),
    };
    let reply = match outcome {
        Ok(done) => {
            let mut reply = respond(trans_id, &layout, Status::OK, done.count, done.total);
            reply.response.1.extend_from_slice(&done.entries);
            reply.data = done.data;
            reply
        }
        Err(Fail::Status(status)) => respond(trans_id, &layout, status, 0, 0),
        Err(Fail::Reply(reply)) => reply,
        Err(Fail::Gone) => return Err(Abandoned::Gone),
    };
    if let Some(request) = request {
        log::debug!(
            "xs: trans_id {trans_id}: {} {:?}: {}",
            request.op,
            request.name,
            reply.status
        );
    }
    Ok(reply)
}

/// Reads and decodes the request buffer.
async fn decode(ctx: &Ctx<'_>, job: &Job, layout: &Layout) -> Result<Request, Fail> {
    let wanted = layout.request.len.min(xstore::MAX_REQUEST_READ as u32);
    let bytes = read(ctx, job, "request", layout.request.offset, wanted).await?;
    let data_len = layout.data.map_or(0, |d| d.len);
    xstore::parse_request(&bytes, data_len).map_err(|status| {
        log::debug!(
            "xs: trans_id {}: request buffer refused: {status}",
            job.trans_id()
        );
        Fail::Status(status)
    })
}

/// The operation itself.
async fn run(ctx: &Ctx<'_>, job: &Job, layout: &Layout, request: &Request) -> Result<Done, Fail> {
    let name = &request.name;
    match request.op {
        Op::GET => get(ctx, job, layout, request).await,
        Op::PUT => put(ctx, job, layout, request).await,
        Op::LIST => list(ctx, job, layout, request).await,
        Op::DELETE => Ok(timed(ctx, job, ctx.store.delete(name))
            .await
            .map(|()| Done::counts(0, 0))?),
        _ => Ok(timed(ctx, job, ctx.store.stat(name))
            .await
            .map(|size| Done::counts(size, size))?),
    }
}

/// A successful operation's results.
struct Done {
    count: u64,
    total: u64,
    entries: Vec<u8>,
    data: Option<(u64, Bytes)>,
}

impl Done {
    fn counts(count: u64, total: u64) -> Done {
        Done {
            count,
            total,
            entries: Vec::new(),
            data: None,
        }
    }
}

/// A reply whose response buffer gets the 32-byte header.
fn respond(trans_id: u64, layout: &Layout, status: Status, count: u64, total: u64) -> Reply {
    Reply {
        trans_id,
        status,
        data: None,
        response: (
            layout.response.offset,
            xstore::encode_response_header(status, count, total).to_vec(),
        ),
    }
}

/// Reads guest bytes; a failed read becomes the GUEST_MEMORY answer.
async fn read(
    ctx: &Ctx<'_>,
    job: &Job,
    what: &str,
    offset: u64,
    len: u32,
) -> Result<Vec<u8>, Fail> {
    let trans_id = job.trans_id();
    match ctx
        .memory
        .read(&job.link, trans_id, offset, len, ctx.step_timeout)
        .await
    {
        Ok(bytes) => Ok(bytes),
        Err(ReadError::Gone) => Err(Fail::Gone),
        Err(e) => {
            log::warn!(
                "xs: trans_id {trans_id}: reading the {what} buffer ({len} bytes at range offset \
                 {offset}) failed: {e}; answering {}",
                Status::GUEST_MEMORY
            );
            Err(Fail::Reply(Reply::bare(trans_id, Status::GUEST_MEMORY)))
        }
    }
}

/// Runs a store operation after the fault's delay, under the request's `timeout_ms`.
async fn timed<T>(
    ctx: &Ctx<'_>,
    job: &Job,
    operation: impl Future<Output = Result<T, StoreFailure>>,
) -> Result<T, Status> {
    let trans_id = job.trans_id();
    let delay = job.fault.delay();
    let delayed = async {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        operation.await
    };
    let timeout_ms = job.packet.request.timeout_ms.get();
    let result = if timeout_ms == 0 {
        delayed.await
    } else {
        let limit = Duration::from_millis(timeout_ms.into());
        match tokio::time::timeout(limit, delayed).await {
            Ok(result) => result,
            Err(_) => {
                log::info!(
                    "xs: trans_id {trans_id}: the store took longer than timeout_ms {timeout_ms}; \
                     answering {}",
                    Status::TIMEOUT
                );
                return Err(Status::TIMEOUT);
            }
        }
    };
    let failure = match result {
        Ok(value) => {
            (ctx.on_store)(Ok(()));
            return Ok(value);
        }
        Err(failure) => failure,
    };
    let status = match &failure {
        StoreFailure::NotFound(_) => Status::NOT_FOUND,
        StoreFailure::Range { .. } => Status::RANGE,
        StoreFailure::Store(message) => {
            log::warn!(
                "xs: trans_id {trans_id}: the blob store {} failed: {message}; answering {}",
                ctx.store.url(),
                Status::STORE_ERROR
            );
            (ctx.on_store)(Err(message));
            return Err(Status::STORE_ERROR);
        }
    };
    (ctx.on_store)(Ok(()));
    log::debug!("xs: trans_id {trans_id}: {failure}");
    Err(status)
}

async fn get(ctx: &Ctx<'_>, job: &Job, layout: &Layout, request: &Request) -> Result<Done, Fail> {
    // parse_request answered TOO_SMALL for a GET without a data buffer.
    let data = layout.data.ok_or(Status::TOO_SMALL)?;
    let max = request.length.min(data.len.into());
    let got = timed(ctx, job, ctx.store.get(&request.name, request.offset, max)).await?;
    let count = got.bytes.len() as u64;
    Ok(Done {
        data: (count > 0).then_some((data.offset, got.bytes)),
        ..Done::counts(count, got.size)
    })
}

async fn put(ctx: &Ctx<'_>, job: &Job, layout: &Layout, request: &Request) -> Result<Done, Fail> {
    let bytes = match layout.data {
        // parse_request checked length <= data_len, a u32.
        Some(data) if request.length > 0 => {
            read(ctx, job, "data", data.offset, request.length as u32).await?
        }
        _ => Vec::new(),
    };
    // The buffer the DATA frames were assembled in is the payload, as it is.
    timed(ctx, job, ctx.store.put(&request.name, Bytes::from(bytes))).await?;
    Ok(Done::counts(request.length, 0))
}

async fn list(ctx: &Ctx<'_>, job: &Job, layout: &Layout, request: &Request) -> Result<Done, Fail> {
    let listed = timed(ctx, job, ctx.store.list(&request.name)).await?;
    let total = listed.len() as u64;
    let skip = usize::try_from(request.offset)
        .unwrap_or(usize::MAX)
        .min(listed.len());
    let room = (layout.response.len as usize).saturating_sub(xstore::HEADER_LEN);
    let (entries, count) =
        xstore::encode_list(listed[skip..].iter().map(|l| l.name.as_str()), room);
    Ok(Done {
        entries,
        ..Done::counts(count, total)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmbus::guid::Guid;
    use vmbus::xs_fastpath::VspRequest;

    fn packet(pages: usize, request: VspRequest) -> RequestPacket {
        RequestPacket {
            trans_id: 1,
            pfns: vec![0; pages],
            range_len: (pages * 4096) as u32,
            request,
        }
    }

    pub(crate) fn vsp(req: (u32, u32), resp: (u32, u32), data: Option<(u32, u32)>) -> VspRequest {
        let (data_offset, data_len) = data.unwrap_or((0, 0));
        VspRequest {
            version: U32::new(0),
            timeout_ms: U32::new(0),
            data_buffer_offset: U32::new(data_offset),
            data_buffer_length: U32::new(data_len),
            data_buffer_valid: U32::new(data.is_some().into()),
            operation_type: U32::new(OP_USER_REQUEST),
            request_buffer_offset: U32::new(req.0),
            request_buffer_length: U32::new(req.1),
            response_buffer_offset: U32::new(resp.0),
            response_buffer_length: U32::new(resp.1),
            transaction_id: Guid([1; 16]),
        }
    }

    #[test]
    fn layout_takes_the_buffers_where_the_driver_put_them() {
        let layout = Layout::of(&packet(3, vsp((4096 + 16, 40), (8192, 64), Some((8, 100)))));
        assert_eq!(
            layout,
            Ok(Layout {
                request: Span {
                    offset: 4112,
                    len: 40
                },
                response: Span {
                    offset: 8192,
                    len: 64
                },
                data: Some(Span {
                    offset: 8,
                    len: 100
                }),
            })
        );
        let no_data = Layout::of(&packet(1, vsp((0, 40), (100, 64), None))).unwrap();
        assert_eq!(no_data.data, None);
    }

    #[test]
    fn buffers_outside_the_range_or_other_operations_are_refused() {
        for (request, says) in [
            (vsp((4090, 40), (0, 64), None), "request buffer 4090+40"),
            (vsp((0, 40), (0, 0), None), "response buffer 0+0"),
            (
                vsp((0, 40), (0, 64), Some((4000, 97))),
                "data buffer 4000+97",
            ),
            (
                VspRequest {
                    operation_type: U32::new(0x101),
                    ..vsp((0, 40), (0, 64), None)
                },
                "operation type 0x101",
            ),
            (
                VspRequest {
                    version: U32::new(1),
                    ..vsp((0, 40), (0, 64), None)
                },
                "version 1",
            ),
        ] {
            let err = Layout::of(&packet(1, request)).unwrap_err();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn completion_carries_status_and_bytes_written() {
        let reply = Reply {
            trans_id: 77,
            status: Status::NOT_FOUND,
            data: None,
            response: (0, vec![0; 32]),
        };
        let bytes = reply.completion();
        let packet = vmbus::packet::parse_packet(&bytes).unwrap();
        assert_eq!(packet.ty, vmbus::packet::packet_type::COMP);
        assert_eq!(packet.trans_id, 77);
        let response = VspResponse::read_lenient(packet.payload);
        assert_eq!(response.length.get(), 12);
        assert_eq!(response.error.get(), 2);
        assert_eq!(response.response_len.get(), 32);
    }
}
