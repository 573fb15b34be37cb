//! The model against a scripted host, with the test process itself as the caller: its real
//! memory is what the host reads and writes, through process_vm_readv/writev.

use std::sync::mpsc::Receiver;
use std::sync::Mutex;

use vmbus::guest_memory::MemoryMessage;
use vmbus::xs_fastpath::parse_request_packet;
use zerocopy::little_endian::U64;

use super::*;
use crate::bus::channel::{InboundPacket, InboundRing, RecvError};
use crate::reply::testing::pending;

/// A host that records what the driver sends and feeds it completions.
#[derive(Default)]
struct ScriptedHost {
    ring: Option<InboundRing>,
    packets: Mutex<Vec<Vec<u8>>>,
    memory: Mutex<Vec<Vec<u8>>>,
}

impl ScriptedHost {
    fn new() -> Arc<ScriptedHost> {
        Arc::new(ScriptedHost {
            ring: Some(InboundRing::new(vmbus::xs_fastpath::RING_BYTES)),
            ..ScriptedHost::default()
        })
    }

    fn complete(&self, device: &XsFastpath, trans_id: u64, error: u32, response_len: u32) {
        let response = VspResponse {
            length: U32::new(12),
            error: U32::new(error),
            response_len: U32::new(response_len),
        };
        self.ring.as_ref().unwrap().push(InboundPacket {
            trans_id,
            payload: response.as_bytes().to_vec(),
        });
        device.on_channel_callback();
    }

    fn last_packet(&self) -> vmbus::xs_fastpath::RequestPacket {
        parse_request_packet(self.packets.lock().unwrap().last().unwrap()).unwrap()
    }

    fn take_memory(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.memory.lock().unwrap())
    }
}

impl HostChannel for ScriptedHost {
    fn recv(&self, buf_limit: usize) -> Result<Option<InboundPacket>, RecvError> {
        self.ring.as_ref().unwrap().recv(buf_limit)
    }

    fn send_inband(&self, _trans_id: u64, _payload: &[u8]) {
        panic!("xs_fastpath sends no inband packets");
    }

    fn send_packet(&self, packet: &[u8]) -> std::io::Result<()> {
        self.packets.lock().unwrap().push(packet.to_vec());
        Ok(())
    }

    fn send_memory(&self, body: &[u8]) -> std::io::Result<()> {
        self.memory.lock().unwrap().push(body.to_vec());
        Ok(())
    }
}

fn me() -> Caller {
    Caller::detached(nix::unistd::gettid().as_raw() as u32)
}

fn device(rules: Rules) -> (Arc<ScriptedHost>, Arc<XsFastpath>) {
    let host = ScriptedHost::new();
    let device = XsFastpath::new(host.clone(), rules).unwrap();
    (host, device)
}

/// The caller's side of one call: its struct and buffers, in this process's memory.
struct Call {
    sync: Box<RequestSync>,
    request: Vec<u8>,
    response: Vec<u8>,
    data: Vec<u8>,
}

impl Call {
    fn new(data_len: usize) -> Call {
        let request: Vec<u8> = (0..100u8).collect();
        let response = vec![0u8; 64];
        let data = vec![0x5a; data_len];
        let sync = Box::new(RequestSync {
            guid: vmbus::guid::Guid([0x11; 16]),
            timeout: U32::new(1000),
            request_len: U32::new(request.len() as u32),
            response_len: U32::new(response.len() as u32),
            data_len: U32::new(data_len as u32),
            request_buffer: U64::new(request.as_ptr() as u64),
            response_buffer: U64::new(response.as_ptr() as u64),
            data_buffer: U64::new(data.as_ptr() as u64),
            status: U32::new(0xdead),
            response_response_len: U32::new(0xbeef),
        });
        Call {
            sync,
            request,
            response,
            data,
        }
    }

    fn arg(&self) -> u64 {
        &*self.sync as *const RequestSync as u64
    }

    fn ioctl(
        &self,
        device: &XsFastpath,
        handle: Handle,
        cmd: u32,
    ) -> Receiver<Result<IoctlOutcome, Errno>> {
        self.ioctl_as(device, handle, cmd, &me(), false)
    }

    fn ioctl_as(
        &self,
        device: &XsFastpath,
        handle: Handle,
        cmd: u32,
        caller: &Caller,
        compat: bool,
    ) -> Receiver<Result<IoctlOutcome, Errno>> {
        let call = IoctlCall {
            cmd,
            arg: self.arg(),
            input: &[],
            out_size: 0,
            unrestricted: true,
            compat,
        };
        let (reply, answers) = pending(&caller.interrupt);
        device.ioctl(handle, &call, caller, reply);
        answers
    }
}

fn done(result: i32) -> Result<IoctlOutcome, Errno> {
    Ok(IoctlOutcome::Done(IoctlReply {
        result,
        out: Vec::new(),
    }))
}

#[test]
fn a_call_is_the_patchs_packet_its_pages_are_reached_in_place_and_two_words_come_back() {
    let (host, device) = device(POSTED);
    let handle = device.open(&me(), 0).unwrap();
    let call = Call::new(10_000);
    let answers = call.ioctl(&device, handle, IOCTL_USER_REQUEST);
    assert!(answers.try_recv().is_err(), "the call waits for the host");

    let packet = host.last_packet();
    assert_eq!(packet.trans_id, 1);
    let page_count = |addr: u64, len: u64| pages_spanned(addr, len, 4096);
    let data_pages = page_count(call.data.as_ptr() as u64, 10_000);
    let request_pages = page_count(call.request.as_ptr() as u64, 100);
    let response_pages = page_count(call.response.as_ptr() as u64, 64);
    assert_eq!(
        packet.pfns.len() as u64,
        data_pages + request_pages + response_pages
    );
    assert_eq!(packet.pfns[0], call.data.as_ptr() as u64 / 4096);
    let vsp = packet.request;
    assert_eq!(vsp.operation_type.get(), OP_USER_REQUEST);
    assert_eq!(vsp.timeout_ms.get(), 1000);
    assert_eq!(vsp.data_buffer_valid.get(), 1);
    assert_eq!(vsp.data_buffer_length.get(), 10_000);
    assert_eq!(
        vsp.data_buffer_offset.get() as u64,
        call.data.as_ptr() as u64 % 4096
    );
    assert_eq!(
        vsp.request_buffer_offset.get() as u64,
        data_pages * 4096 + call.request.as_ptr() as u64 % 4096
    );
    assert_eq!(
        vsp.response_buffer_offset.get() as u64,
        (data_pages + request_pages) * 4096 + call.response.as_ptr() as u64 % 4096
    );
    assert_eq!(vsp.transaction_id, vmbus::guid::Guid([0x11; 16]));

    // The host reads the request where the caller keeps it.
    device.on_memory(MemoryMessage::Read {
        trans_id: 1,
        offset: vsp.request_buffer_offset.get().into(),
        len: 100,
    });
    let frames = host.take_memory();
    assert_eq!(frames.len(), 1);
    match MemoryMessage::parse(&frames[0]).unwrap() {
        MemoryMessage::Data { status, bytes, .. } => {
            assert_eq!(status, 0);
            assert_eq!(bytes, &call.request[..]);
        }
        other => panic!("{other:?}"),
    }
    // ... writes the response and the data in place ...
    device.on_memory(MemoryMessage::Write {
        trans_id: 1,
        offset: vsp.response_buffer_offset.get().into(),
        bytes: b"answer",
    });
    device.on_memory(MemoryMessage::Write {
        trans_id: 1,
        offset: u64::from(vsp.data_buffer_offset.get()) + 9_000,
        bytes: &[1; 1000],
    });
    assert_eq!(&call.response[..6], b"answer");
    assert_eq!(&call.data[9_000..], &[1; 1000][..]);
    assert_eq!(call.data[8_999], 0x5a);

    // ... and completes: 0 although the host reports an error; the two words are set.
    host.complete(&device, 1, 7, 6);
    assert_eq!(answers.recv().unwrap(), done(0));
    assert_eq!(call.sync.status.get(), 7);
    assert_eq!(call.sync.response_response_len.get(), 6);
    assert_eq!(
        call.sync.timeout.get(),
        1000,
        "nothing else is written back"
    );

    // The call is over: its pages cannot be reached any more.
    device.on_memory(MemoryMessage::Read {
        trans_id: 1,
        offset: 0,
        len: 4,
    });
    match MemoryMessage::parse(&host.take_memory()[0]).unwrap() {
        MemoryMessage::Data { status, bytes, .. } => {
            assert_eq!(status, Errno::ENOENT as u32);
            assert!(bytes.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_large_read_comes_in_64k_chunks_and_reads_outside_the_pages_are_refused() {
    let (host, device) = device(POSTED);
    let handle = device.open(&me(), 0).unwrap();
    let mut call = Call::new(200_000);
    for (i, b) in call.data.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let answers = call.ioctl(&device, handle, IOCTL_USER_REQUEST);
    let vsp = host.last_packet().request;
    device.on_memory(MemoryMessage::Read {
        trans_id: 1,
        offset: vsp.data_buffer_offset.get().into(),
        len: 200_000,
    });
    let mut got = Vec::new();
    for frame in host.take_memory() {
        match MemoryMessage::parse(&frame).unwrap() {
            MemoryMessage::Data {
                status: 0,
                bytes,
                offset,
                ..
            } => {
                assert_eq!(
                    offset,
                    u64::from(vsp.data_buffer_offset.get()) + got.len() as u64
                );
                assert!(bytes.len() <= 64 << 10);
                got.extend_from_slice(bytes);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, call.data);
    let range = host.last_packet().range_bytes();
    device.on_memory(MemoryMessage::Read {
        trans_id: 1,
        offset: range - 2,
        len: 4,
    });
    match MemoryMessage::parse(&host.take_memory()[0]).unwrap() {
        MemoryMessage::Data { status, .. } => assert_eq!(status, Errno::EINVAL as u32),
        other => panic!("{other:?}"),
    }
    host.complete(&device, 1, 0, 0);
    assert_eq!(answers.recv().unwrap(), done(0));
}

#[test]
fn checks_come_in_the_patchs_order_with_its_errnos() {
    let (_host, device) = device(POSTED);
    let handle = device.open(&me(), 0).unwrap();
    let expect = |call: &Call, cmd: u32, errno: Errno| {
        assert_eq!(
            call.ioctl(&device, handle, cmd).recv().unwrap(),
            Err(errno),
            "cmd {cmd:#x}"
        );
    };
    let call = Call::new(0);
    expect(&call, 0xC048_520A, Errno::EIO);
    let compat = call
        .ioctl_as(&device, handle, IOCTL_USER_REQUEST, &me(), true)
        .recv()
        .unwrap();
    assert_eq!(compat, Err(Errno::ENOTTY), "no compat_ioctl");
    let mut zero = Call::new(0);
    zero.sync.request_len = U32::new(0);
    zero.sync.request_buffer = U64::new(0);
    expect(&zero, IOCTL_USER_REQUEST, Errno::EINVAL);
    let mut unmapped = Call::new(0);
    unmapped.sync.response_buffer = U64::new(8);
    expect(&unmapped, IOCTL_USER_REQUEST, Errno::EFAULT);
    let mut read_only = Call::new(0);
    static RODATA: [u8; 100] = [1; 100];
    read_only.sync.request_buffer = U64::new(RODATA.as_ptr() as u64);
    expect(&read_only, IOCTL_USER_REQUEST, Errno::EFAULT);
    // Posted pins first: a 4 GiB-1 data buffer at an unmapped address is EFAULT, not EINVAL.
    let mut huge = Call::new(0);
    huge.sync.data_len = U32::new(u32::MAX);
    huge.sync.data_buffer = U64::new(0x1000);
    expect(&huge, IOCTL_USER_REQUEST, Errno::EFAULT);
    // A file opened by a caller whose credentials could not be read: EACCES for every call.
    let stranger = device.open(&Caller::detached(u32::MAX - 1), 0).unwrap();
    assert_eq!(
        call.ioctl(&device, stranger, IOCTL_USER_REQUEST)
            .recv()
            .unwrap(),
        Err(Errno::EACCES)
    );
}

#[test]
fn reviewed_validates_before_pinning_and_says_enotty() {
    let (_host, device) = device(REVIEWED);
    let handle = device.open(&me(), 0).unwrap();
    let call = Call::new(0);
    assert_eq!(
        call.ioctl(&device, handle, 0xC048_520A).recv().unwrap(),
        Err(Errno::ENOTTY)
    );
    let mut huge = Call::new(0);
    huge.sync.data_len = U32::new(u32::MAX);
    huge.sync.data_buffer = U64::new(0x1000);
    assert_eq!(
        huge.ioctl(&device, handle, IOCTL_USER_REQUEST)
            .recv()
            .unwrap(),
        Err(Errno::EINVAL)
    );
    let mut no_timeout = Call::new(0);
    no_timeout.sync.timeout = U32::new(0);
    assert_eq!(
        no_timeout
            .ioctl(&device, handle, IOCTL_USER_REQUEST)
            .recv()
            .unwrap(),
        Err(Errno::EINVAL)
    );
}

#[test]
fn reviewed_removal_ends_calls_in_flight_with_enodev_and_refuses_new_ones() {
    let (host, device) = device(REVIEWED);
    let handle = device.open(&me(), 0).unwrap();
    let call = Call::new(0);
    let answers = call.ioctl(&device, handle, IOCTL_USER_REQUEST);
    assert_eq!(host.packets.lock().unwrap().len(), 1);
    device.on_rescind();
    assert_eq!(answers.recv().unwrap(), Err(Errno::ENODEV));
    assert_eq!(device.open(&me(), 0), Err(Errno::ENODEV));
    assert_eq!(
        call.ioctl(&device, handle, IOCTL_USER_REQUEST)
            .recv()
            .unwrap(),
        Err(Errno::ENODEV)
    );
}

#[test]
fn completions_for_ids_not_in_flight_are_skipped_and_ids_are_reused() {
    let (host, device) = device(POSTED);
    let handle = device.open(&me(), 0).unwrap();
    let first = Call::new(0);
    let second = Call::new(0);
    let a = first.ioctl(&device, handle, IOCTL_USER_REQUEST);
    let b = second.ioctl(&device, handle, IOCTL_USER_REQUEST);
    host.complete(&device, 99, 1, 1);
    assert!(a.try_recv().is_err() && b.try_recv().is_err());
    // Out of order: the second first; each gets its own words.
    host.complete(&device, 2, 22, 2);
    host.complete(&device, 1, 11, 1);
    assert_eq!(b.recv().unwrap(), done(0));
    assert_eq!(a.recv().unwrap(), done(0));
    assert_eq!(first.sync.status.get(), 11);
    assert_eq!(second.sync.status.get(), 22);
    // A duplicate completion finds nothing.
    host.complete(&device, 1, 5, 5);
    assert_eq!(first.sync.status.get(), 11);
    let third = Call::new(0);
    let _c = third.ioctl(&device, handle, IOCTL_USER_REQUEST);
    assert_eq!(
        host.last_packet().trans_id,
        1,
        "the last id released is reused first"
    );
}

#[test]
fn pinned_pages_follow_the_patchs_offsets() {
    let mut pages = PinnedPages::default();
    // data: 2 pages from 0x10_0800 (offset 0x800, 6000 bytes: 0x800 + 6000 < 8192)
    assert_eq!(pages.push(0x10_0800, 6000), 0x800);
    // request: 100 bytes at 0x20_0010, after the 2 data pages
    assert_eq!(pages.push(0x20_0010, 100), 2 * 4096 + 0x10);
    // response: 4096 bytes at 0x30_0ff0: 2 pages, after 3
    assert_eq!(pages.push(0x30_0ff0, 4096), 3 * 4096 + 0xff0);
    assert_eq!(pages.pages(), 5);
    assert_eq!(pages.pfns(), vec![0x100, 0x101, 0x200, 0x300, 0x301]);
    assert_eq!(
        pages.resolve(2 * 4096 + 0x10, 100),
        Ok(vec![(0x20_0010, 100)])
    );
    // A read across the request/response boundary splits.
    assert_eq!(
        pages.resolve(3 * 4096 - 4, 8),
        Ok(vec![(0x20_0ffc, 4), (0x30_0000, 4)])
    );
    assert_eq!(pages.resolve(5 * 4096 - 1, 2), Err(Errno::EINVAL));
    assert_eq!(pages.resolve(u64::MAX, 2), Err(Errno::EINVAL));
}

#[test]
fn access_ok_is_the_x86_64_user_limit() {
    assert!(access_ok(0x1000, 64));
    assert!(!access_ok(crate::caller::TASK_SIZE_MAX - 63, 64));
    assert!(!access_ok(u64::MAX - 10, 64));
}
