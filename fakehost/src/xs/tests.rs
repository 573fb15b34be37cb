//! The xs service against a scripted guest: the test plays the bus (it hands the service
//! packets and DATA frames as the channel reader would) and the guest driver (it lays out
//! the three buffers as the posted patch does, answers READs from them and applies WRITEs).
//! The host end of a `UnixStream::pair()` is the service's real `ChannelLink`.
//!
//! Synchronisation is by protocol order only: a READ, a WRITE or a completion arriving is
//! what the test waits for. The socket read timeout only turns a hang into a failure.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use vmbus::guest_memory::{MemoryMessage, MAX_CHUNK};
use vmbus::guid::Guid;
use vmbus::packet::{encode_inband, packet_type, parse_packet};
use vmbus::stream::kind;
use vmbus::xs_fastpath::xstore::{self, Op, Request, Status};
use vmbus::xs_fastpath::{
    encode_request_packet, pages_spanned, VspRequest, VspResponse, HV_PAGE_SIZE, OP_USER_REQUEST,
};
use zerocopy::little_endian::U32;

use super::faults::Fault;
use super::store::{BlobStore, StoreSpec};
use super::XsHost;
use crate::bus::frames::read_frame;
use crate::bus::ChannelLink;
use crate::service::HostService;
use crate::test_support::TempDir;

const LINK: u64 = 7;
const SAFETY_TIMEOUT: Duration = Duration::from_secs(30);

/// One call's pages, as the guest pinned them.
struct Pages {
    mem: Vec<u8>,
    response: (usize, usize),
    data: Option<(usize, usize)>,
}

/// What a call puts in its buffers.
struct Call {
    request: Vec<u8>,
    data: Vec<u8>,
    response_len: u32,
    timeout_ms: u32,
}

impl Call {
    fn new(request: Request, data_len: usize) -> Call {
        Call {
            request: request.encode(),
            data: vec![0; data_len],
            response_len: 4096,
            timeout_ms: 0,
        }
    }

    fn put(name: &str, contents: &[u8]) -> Call {
        let mut call = Call::new(req(Op::PUT, 0, contents.len() as u64, name), contents.len());
        call.data = contents.to_vec();
        call
    }

    fn get(name: &str, offset: u64, data_len: usize) -> Call {
        Call::new(req(Op::GET, offset, data_len as u64, name), data_len)
    }
}

fn req(op: Op, offset: u64, length: u64, name: &str) -> Request {
    Request {
        op,
        offset,
        length,
        name: name.into(),
    }
}

/// A completion as the guest's callback reads it, with the buffers after the call.
#[derive(Debug)]
struct Done {
    error: u32,
    response_len: u32,
    response: Vec<u8>,
    data: Vec<u8>,
}

impl Done {
    fn status(&self) -> Status {
        Status(self.error)
    }

    fn header(&self) -> xstore::ResponseHeader {
        xstore::parse_response_header(&self.response).expect("response header written")
    }
}

enum Event {
    Read {
        trans_id: u64,
        offset: u64,
        len: u32,
    },
    Write {
        len: usize,
    },
    Completion {
        trans_id: u64,
        response: VspResponse,
    },
}

struct Guest {
    _dir: TempDir,
    host: XsHost,
    stream: UnixStream,
    host_end: Arc<UnixStream>,
    calls: HashMap<u64, Pages>,
}

impl Guest {
    fn start(tag: &str) -> Guest {
        let _ = env_logger::builder().is_test(true).try_init();
        let dir = TempDir::new(tag);
        let store = BlobStore::open(&StoreSpec::Local(dir.path().join("blobs"))).unwrap();
        let host = XsHost::with_store(store, SAFETY_TIMEOUT).unwrap();
        let (guest, host_end) = UnixStream::pair().unwrap();
        guest.set_read_timeout(Some(SAFETY_TIMEOUT)).unwrap();
        let host_end = Arc::new(host_end);
        host.attached(ChannelLink::new(LINK, 1, Arc::clone(&host_end)));
        Guest {
            _dir: dir,
            host,
            stream: guest,
            host_end,
            calls: HashMap::new(),
        }
    }

    fn blob_root(&self) -> std::path::PathBuf {
        self._dir.path().join("blobs")
    }

    /// Lays out the buffers as the posted driver does (data pages, then request pages, then
    /// response pages, each buffer at its own in-page offset) and sends the packet.
    fn submit(&mut self, trans_id: u64, call: Call) {
        let page = HV_PAGE_SIZE as usize;
        let (data_in, req_in, resp_in) = (0x10, 0x20, 0x30);
        let data_pages = pages_spanned(data_in as u64, call.data.len() as u64, HV_PAGE_SIZE);
        let req_pages = pages_spanned(req_in as u64, call.request.len() as u64, HV_PAGE_SIZE);
        let resp_pages = pages_spanned(resp_in as u64, call.response_len.into(), HV_PAGE_SIZE);
        let pages = (data_pages + req_pages + resp_pages) as usize;
        let req_off = req_in + data_pages as usize * page;
        let resp_off = resp_in + (data_pages + req_pages) as usize * page;
        let mut mem = vec![0u8; pages * page];
        mem[req_off..req_off + call.request.len()].copy_from_slice(&call.request);
        mem[data_in..data_in + call.data.len()].copy_from_slice(&call.data);
        let has_data = !call.data.is_empty();
        let request = VspRequest {
            version: U32::new(0),
            timeout_ms: U32::new(call.timeout_ms),
            data_buffer_offset: U32::new(if has_data { data_in as u32 } else { 0 }),
            data_buffer_length: U32::new(call.data.len() as u32),
            data_buffer_valid: U32::new(has_data.into()),
            operation_type: U32::new(OP_USER_REQUEST),
            request_buffer_offset: U32::new(req_off as u32),
            request_buffer_length: U32::new(call.request.len() as u32),
            response_buffer_offset: U32::new(resp_off as u32),
            response_buffer_length: U32::new(call.response_len),
            transaction_id: Guid([trans_id as u8; 16]),
        };
        let pfns: Vec<u64> = (0..pages as u64).map(|p| 0x1000 + p).collect();
        let bytes = encode_request_packet(trans_id, &pfns, &request).unwrap();
        self.calls.insert(
            trans_id,
            Pages {
                mem,
                response: (resp_off, call.response_len as usize),
                data: has_data.then_some((data_in, call.data.len())),
            },
        );
        self.host.packet(LINK, &parse_packet(&bytes).unwrap());
    }

    /// The next thing the host sent; WRITEs are applied to the call's pages on the way.
    fn event(&mut self) -> Event {
        let frame = read_frame(&self.stream)
            .expect("guest read")
            .expect("host closed the channel");
        if frame.kind == kind::PACKET {
            let packet = parse_packet(&frame.body).unwrap();
            assert_eq!(packet.ty, packet_type::COMP, "only completions come back");
            return Event::Completion {
                trans_id: packet.trans_id,
                response: VspResponse::read_lenient(packet.payload),
            };
        }
        assert_eq!(frame.kind, kind::MEMORY);
        match MemoryMessage::parse(&frame.body).unwrap() {
            MemoryMessage::Read {
                trans_id,
                offset,
                len,
            } => Event::Read {
                trans_id,
                offset,
                len,
            },
            MemoryMessage::Write {
                trans_id,
                offset,
                bytes,
            } => {
                assert!(bytes.len() <= MAX_CHUNK);
                let pages = self
                    .calls
                    .get_mut(&trans_id)
                    .expect("WRITE for a live call");
                let at = offset as usize;
                pages.mem[at..at + bytes.len()].copy_from_slice(bytes);
                Event::Write { len: bytes.len() }
            }
            other => panic!("host sent {other:?}"),
        }
    }

    /// Answers a READ from the call's pages, in 64 KiB DATA chunks as the guest does.
    fn answer(&self, trans_id: u64, offset: u64, len: u32) {
        let pages = &self.calls[&trans_id];
        let bytes = &pages.mem[offset as usize..offset as usize + len as usize];
        for (i, chunk) in bytes.chunks(MAX_CHUNK).enumerate() {
            self.host.memory(
                LINK,
                &MemoryMessage::Data {
                    trans_id,
                    offset: offset + (i * MAX_CHUNK) as u64,
                    status: 0,
                    bytes: chunk,
                },
            );
        }
    }

    fn finish(&mut self, trans_id: u64, response: VspResponse) -> Done {
        let pages = self
            .calls
            .remove(&trans_id)
            .expect("completion for a live call");
        let (resp_off, resp_len) = pages.response;
        let data = pages
            .data
            .map(|(off, len)| pages.mem[off..off + len].to_vec())
            .unwrap_or_default();
        Done {
            error: response.error.get(),
            response_len: response.response_len.get(),
            response: pages.mem[resp_off..resp_off + resp_len].to_vec(),
            data,
        }
    }

    /// Answers every READ at once until the call with `trans_id` completes.
    fn complete(&mut self, trans_id: u64) -> Done {
        loop {
            match self.event() {
                Event::Read {
                    trans_id: t,
                    offset,
                    len,
                } => self.answer(t, offset, len),
                Event::Write { .. } => {}
                Event::Completion {
                    trans_id: t,
                    response,
                } => {
                    assert_eq!(t, trans_id, "completion for another call");
                    return self.finish(t, response);
                }
            }
        }
    }

    fn call(&mut self, trans_id: u64, call: Call) -> Done {
        self.submit(trans_id, call);
        self.complete(trans_id)
    }

    fn expect_read(&mut self) -> (u64, u64, u32) {
        match self.event() {
            Event::Read {
                trans_id,
                offset,
                len,
            } => (trans_id, offset, len),
            _ => panic!("expected a READ"),
        }
    }
}

#[test]
fn put_then_get_moves_the_bytes_through_the_guests_pages() {
    let mut g = Guest::start("xs-roundtrip");
    let contents: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
    let put = g.call(1, Call::put("dir/blob.bin", &contents));
    assert_eq!(put.status(), Status::OK);
    assert_eq!(put.response_len, 32);
    assert_eq!(put.header().count.get(), contents.len() as u64);
    assert_eq!(
        std::fs::read(g.blob_root().join("dir/blob.bin")).unwrap(),
        contents
    );

    // A GET: every WRITE of the data comes before the completion, in 64 KiB chunks at most.
    g.submit(2, Call::get("dir/blob.bin", 0, contents.len()));
    let mut written = 0;
    let done = loop {
        match g.event() {
            Event::Read {
                trans_id,
                offset,
                len,
            } => g.answer(trans_id, offset, len),
            Event::Write { len, .. } => written += len,
            Event::Completion { trans_id, response } => break g.finish(trans_id, response),
        }
    };
    assert_eq!(done.status(), Status::OK);
    assert_eq!(
        written,
        contents.len() + 32,
        "data, then the response header"
    );
    assert_eq!(done.data, contents);
    assert_eq!(done.header().count.get(), contents.len() as u64);
    assert_eq!(done.header().total.get(), contents.len() as u64);
}

#[test]
fn the_largest_get_the_driver_can_make_comes_back_whole() {
    let mut g = Guest::start("xs-32m");
    // 8192 pages in all: 8190 of data (at in-page offset 0x10), one request, one response.
    let len = (32usize << 20) - 3 * 4096;
    let big: Vec<u8> = (0..len as u32).map(|i| (i >> 12) as u8 ^ i as u8).collect();
    std::fs::write(g.blob_root().join("big"), &big).unwrap();
    let mut call = Call::get("big", 0, big.len());
    call.response_len = 64;
    let done = g.call(9, call);
    assert_eq!(done.status(), Status::OK);
    assert_eq!(done.header().count.get(), len as u64);
    assert!(done.data == big, "the data differ");
}

#[test]
fn get_reads_ranges_and_reports_not_found_and_range() {
    let mut g = Guest::start("xs-get");
    assert_eq!(
        g.call(1, Call::put("a", b"0123456789")).status(),
        Status::OK
    );
    let part = g.call(2, Call::get("a", 3, 4));
    assert_eq!(part.status(), Status::OK);
    assert_eq!(part.data, b"3456");
    assert_eq!(
        (part.header().count.get(), part.header().total.get()),
        (4, 10)
    );
    // length 100 is capped by the 5-byte data buffer.
    let mut capped = Call::get("a", 8, 5);
    capped.request = req(Op::GET, 8, 100, "a").encode();
    let capped = g.call(3, capped);
    assert_eq!(&capped.data[..2], b"89");
    assert_eq!(capped.header().count.get(), 2);
    let at_end = g.call(4, Call::get("a", 10, 4));
    assert_eq!(
        (at_end.status(), at_end.header().count.get()),
        (Status::OK, 0)
    );

    let missing = g.call(5, Call::get("nope", 0, 4));
    assert_eq!(missing.status(), Status::NOT_FOUND);
    assert_eq!(missing.header().status.get(), 2);
    assert_eq!(missing.response_len, 32, "only the header on an error");
    let past = g.call(6, Call::get("a", 11, 4));
    assert_eq!(past.status(), Status::RANGE);
}

#[test]
fn list_is_in_name_order_from_an_index_and_stops_where_the_response_ends() {
    let mut g = Guest::start("xs-list");
    for (i, name) in ["logs/b", "logs/a", "other", "logs/c"].iter().enumerate() {
        assert_eq!(
            g.call(i as u64 + 1, Call::put(name, b"x")).status(),
            Status::OK
        );
    }
    let all = g.call(10, Call::new(req(Op::LIST, 0, 0, "logs/"), 0));
    assert_eq!(all.status(), Status::OK);
    let h = all.header();
    assert_eq!((h.count.get(), h.total.get()), (3, 3));
    assert_eq!(
        xstore::parse_list(&all.response[32..], 3).unwrap(),
        ["logs/a", "logs/b", "logs/c"]
    );
    assert_eq!(all.response_len, 32 + 3 * 8);

    let mut small = Call::new(req(Op::LIST, 1, 0, ""), 0);
    small.response_len = 32 + 8 + 7; // room for "logs/b" (8) but not also "logs/c"
    let small = g.call(11, small);
    let h = small.header();
    assert_eq!((h.count.get(), h.total.get()), (1, 4));
    assert_eq!(
        xstore::parse_list(&small.response[32..], 1).unwrap(),
        ["logs/b"]
    );
}

#[test]
fn stat_and_delete() {
    let mut g = Guest::start("xs-stat");
    g.call(1, Call::put("s", b"12345"));
    let stat = g.call(2, Call::new(req(Op::STAT, 0, 0, "s"), 0));
    assert_eq!(
        (
            stat.status(),
            stat.header().count.get(),
            stat.header().total.get()
        ),
        (Status::OK, 5, 5)
    );
    assert_eq!(
        g.call(3, Call::new(req(Op::DELETE, 0, 0, "s"), 0)).status(),
        Status::OK
    );
    for (id, op) in [(4, Op::DELETE), (5, Op::STAT)] {
        assert_eq!(
            g.call(id, Call::new(req(op, 0, 0, "s"), 0)).status(),
            Status::NOT_FOUND
        );
    }
}

#[test]
fn request_buffer_errors_answer_their_status_in_the_header() {
    let mut g = Guest::start("xs-bad");
    let mut bad_magic = req(Op::STAT, 0, 0, "x").encode();
    bad_magic[0] = b'Y';
    let mut version = req(Op::STAT, 0, 0, "x").encode();
    version[4] = 2;
    for (id, request, status) in [
        (1, bad_magic, Status::BAD_REQUEST),
        (2, version, Status::UNSUPPORTED_VERSION),
        (3, req(Op(42), 0, 0, "x").encode(), Status::UNKNOWN_OP),
        (4, req(Op::STAT, 0, 0, "../x").encode(), Status::BAD_REQUEST),
        (5, req(Op::GET, 0, 10, "x").encode(), Status::TOO_SMALL),
    ] {
        let done = g.call(
            id,
            Call {
                request,
                data: Vec::new(),
                response_len: 64,
                timeout_ms: 0,
            },
        );
        assert_eq!(done.status(), status, "call {id}");
        assert_eq!(done.header().status.get(), status.0, "call {id}");
        assert_eq!(done.response_len, 32, "call {id}");
    }
}

#[test]
fn response_buffer_under_32_bytes_is_too_small_and_untouched() {
    let mut g = Guest::start("xs-small");
    let mut call = Call::new(req(Op::STAT, 0, 0, "x"), 0);
    call.response_len = 31;
    g.submit(1, call);
    // No READ either: the answer is known from the packet alone.
    match g.event() {
        Event::Completion { trans_id, response } => {
            let done = g.finish(trans_id, response);
            assert_eq!(done.status(), Status::TOO_SMALL);
            assert_eq!(done.response_len, 0);
            assert_eq!(done.response, vec![0; 31]);
        }
        _ => panic!("expected the completion at once"),
    }
}

#[test]
fn a_store_that_fails_answers_store_error() {
    let mut g = Guest::start("xs-store-error");
    // The root replaced by a file: every write below it fails with ENOTDIR.
    std::fs::remove_dir_all(g.blob_root()).unwrap();
    std::fs::write(g.blob_root(), b"not a directory").unwrap();
    let done = g.call(1, Call::put("x", b"abc"));
    assert_eq!(done.status(), Status::STORE_ERROR);
    assert_eq!(done.response_len, 32);
    let health = g.host.xs_status().store_health;
    assert!(
        matches!(health, super::StoreHealth::Failing { .. }),
        "{health:?}"
    );
}

#[test]
fn a_refused_read_answers_guest_memory_and_writes_nothing() {
    let mut g = Guest::start("xs-efault");
    g.submit(1, Call::put("x", &[1; 100_000]));
    let (t, offset, len) = g.expect_read();
    g.answer(t, offset, len); // the request buffer
    let (t, offset, _) = g.expect_read(); // the data buffer: the guest's page is gone
    g.host.memory(
        LINK,
        &MemoryMessage::Data {
            trans_id: t,
            offset,
            status: 14,
            bytes: &[],
        },
    );
    match g.event() {
        Event::Completion { trans_id, response } => {
            let done = g.finish(trans_id, response);
            assert_eq!(done.status(), Status::GUEST_MEMORY);
            assert_eq!(done.response_len, 0);
        }
        _ => panic!("expected the completion"),
    }
    assert!(!g.blob_root().join("x").exists(), "nothing stored");
}

#[test]
fn store_slower_than_timeout_ms_answers_timeout() {
    let mut g = Guest::start("xs-timeout");
    g.host.set_fault(Fault::Delay { ms: 500 });
    let mut call = Call::put("slow", b"abc");
    call.timeout_ms = 20;
    assert_eq!(g.call(1, call).status(), Status::TIMEOUT);
    // Without a timeout the same delay is only a delay.
    assert_eq!(g.call(2, Call::put("slow", b"abc")).status(), Status::OK);
}

#[test]
fn fail_status_answers_at_once_and_drop_responses_never_answers() {
    let mut g = Guest::start("xs-faults");
    g.host.set_fault(Fault::FailStatus { status: 5 });
    g.submit(1, Call::put("x", b"abc"));
    match g.event() {
        Event::Completion { trans_id, response } => {
            let done = g.finish(trans_id, response);
            assert_eq!((done.status(), done.response_len), (Status::STORE_ERROR, 0));
        }
        _ => panic!("a forced status reads nothing"),
    }

    g.host.set_fault(Fault::DropResponses);
    g.submit(2, Call::put("x", b"abc"));
    assert_eq!(g.host.xs_status().dropped, 1);
    g.host.set_fault(Fault::Normal);
    // The next frame belongs to call 3: call 2 sent nothing and never will.
    let done = g.call(3, Call::new(req(Op::STAT, 0, 0, "x"), 0));
    assert_eq!(done.status(), Status::NOT_FOUND);
    let status = g.host.xs_status();
    assert_eq!((status.dropped, status.in_flight), (1, 0));
    assert_eq!((status.served, status.failed), (0, 2));
}

#[test]
fn many_interleaved_requests_answered_out_of_order_are_each_answered_right() {
    let mut g = Guest::start("xs-many");
    const N: u64 = 64;
    let contents = |i: u64| -> Vec<u8> { (0..(i * 3000 + 1)).map(|b| (b + i) as u8).collect() };
    for i in 1..=N {
        g.submit(i, Call::put(&format!("blob/{i:03}"), &contents(i)));
    }
    // Hold every READ back, then answer them last first; repeat for the data READs.
    let mut completed = HashMap::new();
    while completed.len() < N as usize {
        let mut reads = Vec::new();
        while reads.len() + completed.len() < N as usize {
            match g.event() {
                Event::Read {
                    trans_id,
                    offset,
                    len,
                } => reads.push((trans_id, offset, len)),
                Event::Write { .. } => {}
                Event::Completion { trans_id, response } => {
                    completed.insert(trans_id, g.finish(trans_id, response));
                }
            }
        }
        for (t, offset, len) in reads.into_iter().rev() {
            g.answer(t, offset, len);
        }
    }
    for (i, done) in &completed {
        assert_eq!(done.status(), Status::OK, "call {i}");
        assert_eq!(done.header().count.get(), contents(*i).len() as u64);
    }
    // Now all of them back, interleaved the same way, each into its own pages.
    for i in 1..=N {
        g.submit(
            100 + i,
            Call::get(&format!("blob/{i:03}"), 0, contents(i).len()),
        );
    }
    let mut reads = Vec::new();
    for _ in 1..=N {
        reads.push(g.expect_read());
    }
    for (t, offset, len) in reads.into_iter().rev() {
        g.answer(t, offset, len);
    }
    let mut got = 0;
    while got < N {
        if let Event::Completion { trans_id, response } = g.event() {
            let done = g.finish(trans_id, response);
            assert_eq!(done.data, contents(trans_id - 100), "call {trans_id}");
            got += 1;
        }
    }
    assert_eq!(g.host.xs_status().served, 2 * N);
}

#[test]
fn data_for_nobody_and_hostile_packets_are_ignored() {
    let mut g = Guest::start("xs-hostile");
    // DATA for a transaction that does not exist, and for one with no READ outstanding.
    g.host.memory(
        LINK,
        &MemoryMessage::Data {
            trans_id: 999,
            offset: 0,
            status: 0,
            bytes: b"hi",
        },
    );
    g.host.memory(
        LINK,
        &MemoryMessage::Write {
            trans_id: 1,
            offset: 0,
            bytes: b"hi",
        },
    );
    // An inband packet, a cut GPA-direct one, and one whose page list is empty.
    g.host
        .packet(LINK, &parse_packet(&encode_inband(5, 1, &[0; 56])).unwrap());
    let mut cut = encode_request_packet(6, &[1], &vsp_for_test()).unwrap();
    cut[2] = 4; // dataoffset8 = 4: no PFNs at all
    g.host.packet(LINK, &parse_packet(&cut).unwrap());
    // A request whose buffers lie outside its one page.
    let mut outside = vsp_for_test();
    outside.response_buffer_offset = U32::new(4000);
    let bytes = encode_request_packet(7, &[1], &outside).unwrap();
    g.host.packet(LINK, &parse_packet(&bytes).unwrap());
    match g.event() {
        Event::Completion { trans_id, response } => {
            assert_eq!(trans_id, 7);
            assert_eq!(response.error.get(), Status::BAD_REQUEST.0);
            assert_eq!(response.response_len.get(), 0);
        }
        _ => panic!("expected BAD_REQUEST for call 7"),
    }
    assert_eq!(g.host.xs_status().ignored, 2);

    // A duplicate id while the first is in flight (held at its READ) is ignored.
    g.submit(8, Call::new(req(Op::STAT, 0, 0, "x"), 0));
    let (t, offset, len) = g.expect_read();
    let mut duplicate = vsp_for_test();
    duplicate.request_buffer_length = U32::new(1);
    let bytes = encode_request_packet(8, &[1], &duplicate).unwrap();
    g.host.packet(LINK, &parse_packet(&bytes).unwrap());
    assert_eq!(g.host.xs_status().ignored, 3);
    // A DATA at the wrong offset for that READ fails the call, not the host.
    g.host.memory(
        LINK,
        &MemoryMessage::Data {
            trans_id: t,
            offset: offset + 1,
            status: 0,
            bytes: &[0; 4],
        },
    );
    let _ = len;
    assert_eq!(g.complete(8).status(), Status::GUEST_MEMORY);
    // And the host still serves.
    assert_eq!(g.call(9, Call::put("still", b"ok")).status(), Status::OK);
}

fn vsp_for_test() -> VspRequest {
    VspRequest {
        version: U32::new(0),
        timeout_ms: U32::new(0),
        data_buffer_offset: U32::new(0),
        data_buffer_length: U32::new(0),
        data_buffer_valid: U32::new(0),
        operation_type: U32::new(OP_USER_REQUEST),
        request_buffer_offset: U32::new(0),
        request_buffer_length: U32::new(64),
        response_buffer_offset: U32::new(100),
        response_buffer_length: U32::new(200),
        transaction_id: Guid([0; 16]),
    }
}

#[test]
fn detach_mid_request_drops_it_and_sends_nothing_more() {
    let mut g = Guest::start("xs-detach");
    g.submit(1, Call::put("half", &[3; 1000]));
    let (t, offset, len) = g.expect_read();
    g.answer(t, offset, len);
    let (t, offset, len) = g.expect_read(); // held: the guest goes away now
    g.host.detached(LINK);
    let status = g.host.xs_status();
    assert_eq!(
        (status.in_flight, status.abandoned, status.channels_attached),
        (0, 1, 0)
    );
    // The late answer finds nobody.
    g.answer(t, offset, len);
    // Close the host's end: whatever the host sent is before the end of the stream, and it
    // is not a completion.
    g.host_end.shutdown(std::net::Shutdown::Write).unwrap();
    while let Some(frame) = read_frame(&g.stream).unwrap() {
        assert_ne!(frame.kind, kind::PACKET, "a completion after the detach");
    }
    assert!(!g.blob_root().join("half").exists());
    assert_eq!(g.host.xs_status().served, 0);
}
