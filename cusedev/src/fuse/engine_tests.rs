//! The engine driven by a fake kernel: a SOCK_SEQPACKET socket pair stands in for `/dev/fuse`
//! (one read = one whole request, one writev = one whole reply, like the real thing), so the
//! tests can send requests no real kernel would send (short bodies, lying headers, interrupts
//! for unknown requests) and see exactly what the engine answers. No root needed.
//!
//! The handler is a single-device personality with no directory at all (nodeid 0 opens the
//! device, as under CUSE): the engine must not care.
//!
//! "No reply" is checked without sleeping: with one reader thread, requests are answered in
//! the order they are read, so after a request that must not be answered we send one that
//! must, and the next reply has to be for that one. Tests of what several readers do start
//! the session with [`MAX_READERS`].

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use zerocopy::IntoBytes;

use super::abi::*;
use super::init::fuse_init_reply;
use super::session::{Reply, Request, RequestHandler, Session, MAX_READERS};
use crate::device::{
    poll_bits, Caller, Device, Handle, IoctlAnswer, IoctlCall, IoctlOutcome, IoctlReply, PollWaker,
    ReadReply, UserBuffer, WaitList, WriteReply,
};
use crate::wait::WaitState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    ReaderSleeping,
}

#[derive(Default)]
struct PipeState {
    open: bool,
    queued: VecDeque<u8>,
    /// (pid, uid, gid) of the last caller of read/write.
    last_caller: Option<(u32, u32, u32)>,
    /// Make the next open or read panic (a device model bug).
    panic_next: bool,
    /// Reads waiting for data, with their counts.
    readers: WaitList<u32, Vec<u8>>,
}

/// Single-open; read sleeps until data; poll registers its waker.
struct Pipe {
    state: Arc<WaitState<PipeState>>,
    events: Mutex<Sender<Event>>,
}

impl Device for Pipe {
    fn name(&self) -> &str {
        "test/pipe"
    }

    fn open(&self, _caller: &Caller, _flags: i32) -> Result<Handle, Errno> {
        let mut state = self.state.lock();
        if std::mem::take(&mut state.panic_next) {
            drop(state);
            panic!("open: a device model bug");
        }
        if state.open {
            return Err(Errno::EBUSY);
        }
        state.open = true;
        Ok(99)
    }

    fn read(&self, handle: Handle, count: u32, _offset: u64, caller: &Caller, reply: ReadReply) {
        assert_eq!(handle, 99);
        let mut state = self.state.lock();
        if std::mem::take(&mut state.panic_next) {
            drop(state);
            panic!("read: a device model bug");
        }
        state.last_caller = Some((caller.pid, caller.uid, caller.gid));
        if state.queued.is_empty() {
            state.readers.park_interruptible(count, reply);
            let _ = self.events.lock().unwrap().send(Event::ReaderSleeping);
            return;
        }
        let n = state.queued.len().min(count as usize);
        reply.ok(state.queued.drain(..n).collect());
    }

    fn write(
        &self,
        _handle: Handle,
        data: &[u8],
        _offset: u64,
        caller: &Caller,
        reply: WriteReply,
    ) {
        let mut state = self.state.lock();
        state.last_caller = Some((caller.pid, caller.uid, caller.gid));
        state.queued.extend(data);
        // Each sleeper takes what it has room for, in the order they went to sleep.
        while !state.queued.is_empty() {
            let Some((count, sleeper)) = state.readers.wake_one() else {
                break;
            };
            let n = state.queued.len().min(count as usize);
            sleeper.ok(state.queued.drain(..n).collect());
        }
        drop(state);
        self.state.wake_all();
        reply.ok(data.len() as u32);
    }

    fn poll(&self, _handle: Handle, waker: Option<PollWaker>) -> u32 {
        let state = self.state.lock();
        if !state.queued.is_empty() {
            return poll_bits::POLLIN | poll_bits::POLLOUT;
        }
        if let Some(waker) = waker {
            self.state.add_poller(waker);
        }
        poll_bits::POLLOUT
    }

    fn release(&self, _handle: Handle) {
        self.state.lock().open = false;
    }
}

/// A personality with one device and no nodes.
struct OneDevice(Arc<dyn Device>);

impl RequestHandler for OneDevice {
    fn init(&self, req: &Request<'_>, minor: u32) -> Reply {
        fuse_init_reply(req.body, minor).into()
    }

    fn device_for_open(&self, nodeid: u64) -> Result<Arc<dyn Device>, Errno> {
        match nodeid {
            0 => Ok(self.0.clone()),
            _ => Err(Errno::ENOENT),
        }
    }
}

/// The next message the engine sent on `sock`: (unique, error, body).
fn recv_on(sock: &OwnedFd) -> (u64, i32, Vec<u8>) {
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
    let ready = nix::poll::poll(&mut fds, PollTimeout::try_from(LIMIT).unwrap()).unwrap();
    assert_eq!(ready, 1, "no reply from the engine");
    let mut buf = vec![0u8; 1 << 21];
    let n = nix::unistd::read(sock.as_raw_fd(), &mut buf).unwrap();
    let (header, body) = parse::<OutHeader>(&buf[..n]).unwrap();
    assert_eq!(header.len as usize, n);
    (header.unique, header.error, body.to_vec())
}

struct FakeKernel {
    sock: OwnedFd,
    session: Session,
    pipe: Arc<Pipe>,
    events: Receiver<Event>,
}

const LIMIT: Duration = Duration::from_secs(30);

impl FakeKernel {
    fn start() -> FakeKernel {
        FakeKernel::start_serving(None)
    }

    /// A fake kernel whose node 0 is `device` instead of the pipe.
    fn start_with(device: Arc<dyn Device>) -> FakeKernel {
        FakeKernel::start_serving(Some(device))
    }

    /// A fake kernel served by up to [`MAX_READERS`] reader threads.
    fn start_with_readers() -> FakeKernel {
        FakeKernel::start_serving_with(None, MAX_READERS)
    }

    fn start_serving(device: Option<Arc<dyn Device>>) -> FakeKernel {
        FakeKernel::start_serving_with(device, 1)
    }

    fn start_serving_with(device: Option<Arc<dyn Device>>, readers: usize) -> FakeKernel {
        let (kernel_end, server_end) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (tx, events) = mpsc::channel();
        let pipe = Arc::new(Pipe {
            state: WaitState::new(PipeState::default()),
            events: Mutex::new(tx),
        });
        let device = device.unwrap_or_else(|| pipe.clone());
        let session =
            Session::start_with_readers(server_end, Arc::new(OneDevice(device)), "fake", readers)
                .unwrap();
        FakeKernel {
            sock: kernel_end,
            session,
            pipe,
            events,
        }
    }

    fn send_raw(&self, bytes: &[u8]) {
        assert_eq!(nix::unistd::write(&self.sock, bytes).unwrap(), bytes.len());
    }

    fn send(&self, opcode: Opcode, unique: u64, nodeid: u64, body: &[u8]) {
        let header = InHeader {
            len: (size_of::<InHeader>() + body.len()) as u32,
            opcode: opcode.0,
            unique,
            nodeid,
            uid: 1000,
            gid: 100,
            pid: 4242,
            ..InHeader::default()
        };
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend_from_slice(body);
        self.send_raw(&bytes);
    }

    /// The next message from the engine: (unique, error, body).
    fn recv(&self) -> (u64, i32, Vec<u8>) {
        recv_on(&self.sock)
    }

    fn expect_error(&self, unique: u64, errno: Errno) {
        let (got_unique, error, _) = self.recv();
        assert_eq!((got_unique, error), (unique, -(errno as i32)));
    }

    fn expect_ok(&self, unique: u64) -> Vec<u8> {
        let (got_unique, error, body) = self.recv();
        assert_eq!(
            (got_unique, error),
            (unique, 0),
            "{:?}",
            Errno::from_raw(-error)
        );
        body
    }

    fn init(&self) {
        let init = InitIn {
            major: 7,
            minor: 45,
            flags: init_flags::MAX_PAGES,
            ..InitIn::default()
        };
        self.send(Opcode::INIT, 1, 0, init.as_bytes());
        let body = self.expect_ok(1);
        let (out, _) = parse::<InitOut>(&body).unwrap();
        assert_eq!((out.major, out.minor, out.max_write), (7, 38, 1 << 20));
    }

    fn open(&self, unique: u64) -> u64 {
        self.send(Opcode::OPEN, unique, 0, OpenIn::default().as_bytes());
        let body = self.expect_ok(unique);
        let (out, _) = parse::<OpenOut>(&body).unwrap();
        assert_eq!(out.open_flags, fopen::DIRECT_IO);
        out.fh
    }

    fn read_request(&self, unique: u64, fh: u64, size: u32) {
        let read_in = ReadIn {
            fh,
            size,
            ..ReadIn::default()
        };
        self.send(Opcode::READ, unique, 0, read_in.as_bytes());
    }

    fn write_request(&self, unique: u64, fh: u64, data: &[u8]) {
        let write_in = WriteIn {
            fh,
            size: data.len() as u32,
            ..WriteIn::default()
        };
        let mut body = write_in.as_bytes().to_vec();
        body.extend_from_slice(data);
        self.send(Opcode::WRITE, unique, 0, &body);
    }

    /// A request that is always answered (ENOSYS), to prove nothing came before it.
    fn barrier(&self, unique: u64) {
        self.send(Opcode::SYMLINK, unique, 0, b"");
        self.expect_error(unique, Errno::ENOSYS);
    }
}

#[test]
fn init_with_another_major_is_eproto() {
    let kernel = FakeKernel::start();
    let init = InitIn {
        major: 8,
        minor: 0,
        ..InitIn::default()
    };
    kernel.send(Opcode::INIT, 1, 0, init.as_bytes());
    kernel.expect_error(1, Errno::EPROTO);
}

#[test]
fn malformed_bodies_are_einval_and_the_session_goes_on() {
    let kernel = FakeKernel::start();
    kernel.init();
    for (unique, opcode) in [
        (2, Opcode::OPEN),
        (3, Opcode::READ),
        (4, Opcode::WRITE),
        (5, Opcode::IOCTL),
        (6, Opcode::POLL),
        (7, Opcode::RELEASE),
        (8, Opcode::FLUSH),
    ] {
        kernel.send(opcode, unique, 0, &[1, 2, 3]);
        kernel.expect_error(unique, Errno::EINVAL);
    }
    // A WRITE announcing more data than it carries.
    let write_in = WriteIn {
        fh: 1,
        size: 100,
        ..WriteIn::default()
    };
    let mut body = write_in.as_bytes().to_vec();
    body.extend_from_slice(b"short");
    kernel.send(Opcode::WRITE, 9, 0, &body);
    kernel.expect_error(9, Errno::EINVAL);
    kernel.open(10);
}

#[test]
fn lying_or_truncated_headers_do_not_kill_the_session() {
    let kernel = FakeKernel::start();
    kernel.init();
    // Shorter than a header: nothing to answer to.
    kernel.send_raw(&[0xff; 12]);
    // A header that claims more bytes than were sent.
    let header = InHeader {
        len: 4096,
        opcode: Opcode::GETATTR.0,
        unique: 3,
        ..InHeader::default()
    };
    kernel.send_raw(header.as_bytes());
    kernel.expect_error(3, Errno::EIO);
    // Extensions longer than the request.
    let header = InHeader {
        len: 40,
        opcode: Opcode::GETATTR.0,
        unique: 4,
        total_extlen: 3,
        ..InHeader::default()
    };
    kernel.send_raw(header.as_bytes());
    kernel.expect_error(4, Errno::EIO);
    kernel.barrier(5);
}

#[test]
fn unknown_opcode_is_enosys_and_fsync_is_einval() {
    let kernel = FakeKernel::start();
    kernel.init();
    kernel.send(Opcode(777), 2, 0, b"whatever");
    kernel.expect_error(2, Errno::ENOSYS);
    kernel.send(Opcode::FSYNC, 3, 0, &[0; 16]);
    kernel.expect_error(3, Errno::EINVAL);
}

#[test]
fn file_ops_on_an_unknown_fh_are_ebadf() {
    let kernel = FakeKernel::start();
    kernel.init();
    kernel.read_request(2, 12345, 10);
    kernel.expect_error(2, Errno::EBADF);
    kernel.write_request(3, 12345, b"x");
    kernel.expect_error(3, Errno::EBADF);
    kernel.send(Opcode::OPEN, 4, 77, OpenIn::default().as_bytes());
    kernel.expect_error(4, Errno::ENOENT);
}

#[test]
fn forget_and_malformed_interrupts_are_never_answered() {
    let kernel = FakeKernel::start();
    kernel.init();
    kernel.send(Opcode::INTERRUPT, 3, 0, b"x");
    kernel.send(Opcode::FORGET, 4, 5, ForgetIn { nlookup: 1 }.as_bytes());
    kernel.send(Opcode::BATCH_FORGET, 5, 0, b"");
    kernel.barrier(6);
}

#[test]
fn interrupt_for_a_request_not_in_flight_is_answered_eagain() {
    // fs/fuse/dev.c: EAGAIN queues the INTERRUPT again if its request still waits (it may be
    // on its way through another reader); for one answered already the kernel drops it.
    let kernel = FakeKernel::start();
    kernel.init();
    kernel.send(
        Opcode::INTERRUPT,
        2 | 1,
        0,
        InterruptIn { unique: 999 }.as_bytes(),
    );
    kernel.expect_error(2 | 1, Errno::EAGAIN);
}

#[test]
fn interrupt_ends_a_sleeping_read_with_eintr_and_a_write_still_flows() {
    let kernel = FakeKernel::start();
    kernel.init();
    let fh = kernel.open(2);
    kernel.read_request(10, fh, 64);
    assert_eq!(
        kernel.events.recv_timeout(LIMIT).unwrap(),
        Event::ReaderSleeping
    );

    // The read sleeps in the device; a write is served meanwhile...
    kernel.read_request(11, fh, 64);
    assert_eq!(
        kernel.events.recv_timeout(LIMIT).unwrap(),
        Event::ReaderSleeping
    );
    kernel.send(
        Opcode::INTERRUPT,
        12 | 1,
        0,
        InterruptIn { unique: 10 }.as_bytes(),
    );
    kernel.expect_error(10, Errno::EINTR);

    // ...and the other sleeper gets the data.
    kernel.write_request(13, fh, b"data");
    let mut replies = [kernel.recv(), kernel.recv()];
    replies.sort();
    assert_eq!(replies[0], (11, 0, b"data".to_vec()));
    let (unique, error, body) = &replies[1];
    assert_eq!((*unique, *error), (13, 0));
    assert_eq!(parse::<WriteOut>(body).unwrap().0.size, 4);
    assert_eq!(
        kernel.pipe.state.lock().last_caller,
        Some((4242, 1000, 100))
    );

    // An interrupt for the finished request gets EAGAIN, which the kernel drops.
    kernel.send(
        Opcode::INTERRUPT,
        14 | 1,
        0,
        InterruptIn { unique: 10 }.as_bytes(),
    );
    kernel.expect_error(14 | 1, Errno::EAGAIN);
}

#[test]
fn release_is_served_before_the_open_that_follows_it() {
    let kernel = FakeKernel::start();
    kernel.init();
    let fh = kernel.open(2);
    kernel.send(Opcode::OPEN, 3, 0, OpenIn::default().as_bytes());
    kernel.expect_error(3, Errno::EBUSY);
    let release = ReleaseIn {
        fh,
        ..ReleaseIn::default()
    };
    // Sent back to back, as the kernel queues an async RELEASE and the next OPEN.
    kernel.send(Opcode::RELEASE, 4, 0, release.as_bytes());
    kernel.send(Opcode::OPEN, 5, 0, OpenIn::default().as_bytes());
    kernel.expect_ok(4);
    kernel.expect_ok(5);
}

/// close(2) on a FUSE mount: FLUSH (answered before close returns), then RELEASE queued
/// without waiting, then the daemon's next OPEN right behind it. With several readers the OPEN
/// may be served first; it must still not see EBUSY.
#[test]
fn close_then_open_never_sees_ebusy_with_several_readers() {
    let kernel = FakeKernel::start_with_readers();
    kernel.init();
    let mut unique = 2;
    let mut fh = kernel.open(unique);
    for _ in 0..500 {
        let flush = FlushIn {
            fh,
            ..FlushIn::default()
        };
        kernel.send(Opcode::FLUSH, unique + 2, 0, flush.as_bytes());
        kernel.expect_ok(unique + 2);
        let release = ReleaseIn {
            fh,
            ..ReleaseIn::default()
        };
        kernel.send(Opcode::RELEASE, unique + 4, 0, release.as_bytes());
        kernel.send(Opcode::OPEN, unique + 6, 0, OpenIn::default().as_bytes());
        let mut replies = [kernel.recv(), kernel.recv()];
        replies.sort_by_key(|reply| reply.0);
        assert_eq!((replies[0].0, replies[0].1), (unique + 4, 0));
        assert_eq!(
            (replies[1].0, replies[1].1),
            (unique + 6, 0),
            "OPEN after close: {:?}",
            Errno::from_raw(-replies[1].1)
        );
        fh = parse::<OpenOut>(&replies[1].2).unwrap().0.fh;
        unique += 6;
    }
}

/// An open file that was flushed once but is still open through a dup keeps its device
/// busy: the EBUSY stands (after the engine has looked for a RELEASE that never comes).
#[test]
fn open_while_a_dup_of_a_closed_fd_is_still_open_is_ebusy() {
    let kernel = FakeKernel::start_with_readers();
    kernel.init();
    let fh = kernel.open(2);
    let flush = FlushIn {
        fh,
        ..FlushIn::default()
    };
    kernel.send(Opcode::FLUSH, 4, 0, flush.as_bytes());
    kernel.expect_ok(4);
    kernel.send(Opcode::OPEN, 6, 0, OpenIn::default().as_bytes());
    kernel.expect_error(6, Errno::EBUSY);
    // A request on the file shows it is alive: no more waiting for its RELEASE.
    kernel.write_request(8, fh, b"x");
    kernel.expect_ok(8);
    kernel.send(Opcode::OPEN, 10, 0, OpenIn::default().as_bytes());
    kernel.expect_error(10, Errno::EBUSY);
}

/// Ten thousand reads asleep in a device cost the session no more threads than one, and one
/// write wakes every one of them.
#[test]
fn ten_thousand_sleeping_reads_cost_no_threads_and_a_write_wakes_them_all() {
    const SLEEPERS: u64 = 10_000;
    let kernel = FakeKernel::start_with_readers();
    kernel.init();
    let fh = kernel.open(2);
    kernel.read_request(4, fh, 1);
    assert_eq!(
        kernel.events.recv_timeout(LIMIT).unwrap(),
        Event::ReaderSleeping
    );
    let threads_for_one = kernel.session.reader_threads();
    for i in 1..SLEEPERS {
        kernel.read_request(4 + 2 * i, fh, 1);
    }
    for _ in 1..SLEEPERS {
        assert_eq!(
            kernel.events.recv_timeout(LIMIT).unwrap(),
            Event::ReaderSleeping
        );
    }
    assert_eq!(
        kernel.pipe.state.lock().readers.waiting(),
        SLEEPERS as usize
    );
    // Readers are added only while every one of them is busy reading or serving, never for a
    // sleeper: what the flood of READs cost is bounded by the cap, as one sleeper's is.
    let threads_for_all = kernel.session.reader_threads();
    // INIT, OPEN and the READ may each be read by the last idle reader, which starts one
    // more: up to four readers for one sleeper, depending on how fast each answer went out.
    assert!(
        threads_for_one <= 4,
        "{threads_for_one} readers for one sleeper"
    );
    assert!(
        threads_for_all <= MAX_READERS,
        "{threads_for_all} readers for {SLEEPERS} sleepers"
    );

    let data = vec![7u8; SLEEPERS as usize];
    let write_unique = 4 + 2 * SLEEPERS;
    kernel.write_request(write_unique, fh, &data);
    let mut answered = std::collections::HashSet::new();
    for _ in 0..=SLEEPERS {
        let (unique, error, body) = kernel.recv();
        assert_eq!(error, 0, "unique {unique}");
        if unique != write_unique {
            assert_eq!(body, vec![7]);
        }
        assert!(answered.insert(unique), "unique {unique} answered twice");
    }
    assert_eq!(answered.len() as u64, SLEEPERS + 1);
}

#[test]
fn poll_with_schedule_notify_sends_a_notification_on_wakeup() {
    let kernel = FakeKernel::start();
    kernel.init();
    let fh = kernel.open(2);
    let poll_in = PollIn {
        fh,
        kh: 0xabcd,
        flags: FUSE_POLL_SCHEDULE_NOTIFY,
        events: poll_bits::POLLIN,
    };
    kernel.send(Opcode::POLL, 3, 0, poll_in.as_bytes());
    let body = kernel.expect_ok(3);
    assert_eq!(
        parse::<PollOut>(&body).unwrap().0.revents,
        poll_bits::POLLOUT
    );

    kernel.write_request(4, fh, b"x");
    let mut messages = [kernel.recv(), kernel.recv()];
    messages.sort();
    let (unique, code, body) = &messages[0];
    assert_eq!((*unique, *code), (0, FUSE_NOTIFY_POLL));
    assert_eq!(parse::<NotifyPollWakeupOut>(body).unwrap().0.kh, 0xabcd);
    assert_eq!(messages[1].0, 4);
}

#[test]
fn ioctl_without_driver_support_is_enotty() {
    let kernel = FakeKernel::start();
    kernel.init();
    let fh = kernel.open(2);
    let ioctl_in = IoctlIn {
        fh,
        cmd: 0x4008_4d01,
        in_size: 4,
        out_size: 8,
        ..IoctlIn::default()
    };
    let mut body = ioctl_in.as_bytes().to_vec();
    body.extend_from_slice(b"1234");
    kernel.send(Opcode::IOCTL, 3, 0, &body);
    kernel.expect_error(3, Errno::ENOTTY);
}

#[test]
fn destroy_is_answered_and_ends_the_session_releasing_open_files() {
    let kernel = FakeKernel::start();
    kernel.init();
    kernel.open(2);
    kernel.send(Opcode::DESTROY, 3, 0, b"");
    kernel.expect_ok(3);
    let FakeKernel {
        mut session, pipe, ..
    } = kernel;
    session.stop();
    assert!(session.is_finished());
    assert!(!pipe.state.lock().open);
}

#[test]
fn stopping_interrupts_a_sleeping_read() {
    let kernel = FakeKernel::start();
    kernel.init();
    let fh = kernel.open(2);
    kernel.read_request(3, fh, 64);
    assert_eq!(
        kernel.events.recv_timeout(LIMIT).unwrap(),
        Event::ReaderSleeping
    );
    let FakeKernel {
        sock, mut session, ..
    } = kernel;
    session.stop();
    let (unique, error, _) = recv_on(&sock);
    assert_eq!((unique, error), (3, -(Errno::EINTR as i32)));
}

#[test]
fn a_panicking_device_gets_eio_and_the_session_goes_on() {
    let kernel = FakeKernel::start();
    kernel.init();
    kernel.pipe.state.lock().panic_next = true;
    kernel.send(Opcode::OPEN, 2, 0, OpenIn::default().as_bytes());
    kernel.expect_error(2, Errno::EIO);
    let fh = kernel.open(3);
    kernel.pipe.state.lock().panic_next = true;
    kernel.read_request(4, fh, 8);
    kernel.expect_error(4, Errno::EIO);
    kernel.write_request(5, fh, b"ok");
    kernel.expect_ok(5);
    kernel.read_request(6, fh, 8);
    assert_eq!(kernel.expect_ok(6), b"ok");
}

/// A driver whose ioctl answers are scripted; it records what every call brought.
struct ScriptedIoctl {
    answers: Mutex<VecDeque<IoctlOutcome>>,
    seen: Mutex<Vec<(Vec<u8>, u32, bool)>>,
}

impl ScriptedIoctl {
    fn new(answers: Vec<IoctlOutcome>) -> Arc<ScriptedIoctl> {
        Arc::new(ScriptedIoctl {
            answers: Mutex::new(answers.into()),
            seen: Mutex::new(Vec::new()),
        })
    }
}

impl Device for ScriptedIoctl {
    fn name(&self) -> &str {
        "test/ioctl"
    }

    fn open(&self, _caller: &Caller, _flags: i32) -> Result<Handle, Errno> {
        Ok(1)
    }

    fn ioctl(&self, _handle: Handle, call: &IoctlCall<'_>, _caller: &Caller, reply: IoctlAnswer) {
        self.seen
            .lock()
            .unwrap()
            .push((call.input.to_vec(), call.out_size, call.unrestricted));
        reply.answer(
            self.answers
                .lock()
                .unwrap()
                .pop_front()
                .ok_or(Errno::ENOTTY),
        );
    }
}

const SOME_IOCTL: u32 = 0xc010_7001;

fn ioctl_request(
    kernel: &FakeKernel,
    unique: u64,
    fh: u64,
    flags: u32,
    input: &[u8],
    out_size: u32,
) {
    let ioctl_in = IoctlIn {
        fh,
        flags,
        cmd: SOME_IOCTL,
        arg: 0x7ffd_1000,
        in_size: input.len() as u32,
        out_size,
    };
    let mut body = ioctl_in.as_bytes().to_vec();
    body.extend_from_slice(input);
    kernel.send(Opcode::IOCTL, unique, 0, &body);
}

fn iovecs(bytes: &[u8]) -> Vec<(u64, u64)> {
    bytes
        .chunks(16)
        .map(|c| {
            let (iov, _) = parse::<IoctlIovec>(c).unwrap();
            (iov.base, iov.len)
        })
        .collect()
}

/// The rounds of a pointer-carrying ioctl under CUSE: the struct first, then the buffer it
/// names. Each retry reply lists input iovecs then output iovecs; each retried request's data
/// reaches the driver; the final data goes back after the fuse_ioctl_out.
#[test]
fn unrestricted_ioctl_retries_reach_the_driver_and_the_kernel_in_order() {
    let header = UserBuffer {
        addr: 0x7ffd_1000,
        len: 16,
    };
    let buffer = UserBuffer {
        addr: 0x5000,
        len: 5,
    };
    let driver = ScriptedIoctl::new(vec![
        IoctlOutcome::Retry {
            input: vec![header],
            output: vec![],
        },
        IoctlOutcome::Retry {
            input: vec![header, buffer],
            output: vec![buffer],
        },
        IoctlReply {
            result: 5,
            out: b"olleh".to_vec(),
        }
        .into(),
    ]);
    let kernel = FakeKernel::start_with(driver.clone());
    kernel.init();
    let fh = kernel.open(2);
    let unrestricted = ioctl_flags::UNRESTRICTED;

    ioctl_request(&kernel, 3, fh, unrestricted, &[], 0);
    let body = kernel.expect_ok(3);
    let (out, rest) = parse::<IoctlOut>(&body).unwrap();
    assert_eq!(
        (out.flags, out.in_iovs, out.out_iovs),
        (ioctl_flags::RETRY, 1, 0)
    );
    assert_eq!(iovecs(rest), vec![(0x7ffd_1000, 16)]);

    let struct_bytes = [7u8; 16];
    ioctl_request(&kernel, 4, fh, unrestricted, &struct_bytes, 0);
    let body = kernel.expect_ok(4);
    let (out, rest) = parse::<IoctlOut>(&body).unwrap();
    assert_eq!(
        (out.flags, out.in_iovs, out.out_iovs),
        (ioctl_flags::RETRY, 2, 1)
    );
    assert_eq!(
        iovecs(rest),
        vec![(0x7ffd_1000, 16), (0x5000, 5), (0x5000, 5)]
    );

    let mut everything = struct_bytes.to_vec();
    everything.extend_from_slice(b"hello");
    ioctl_request(&kernel, 5, fh, unrestricted, &everything, 5);
    let body = kernel.expect_ok(5);
    let (out, data) = parse::<IoctlOut>(&body).unwrap();
    assert_eq!((out.result, out.flags), (5, 0));
    assert_eq!(data, b"olleh");

    let seen = driver.seen.lock().unwrap();
    assert_eq!(
        *seen,
        vec![
            (vec![], 0, true),
            (struct_bytes.to_vec(), 0, true),
            (everything, 5, true)
        ]
    );
}

#[test]
fn a_retry_on_a_restricted_ioctl_is_eio() {
    let retry = || IoctlOutcome::Retry {
        input: vec![UserBuffer {
            addr: 0x7ffd_1000,
            len: 8,
        }],
        output: vec![],
    };
    let kernel = FakeKernel::start_with(ScriptedIoctl::new(vec![retry(), retry()]));
    kernel.init();
    let fh = kernel.open(2);
    ioctl_request(&kernel, 3, fh, 0, &[], 0);
    kernel.expect_error(3, Errno::EIO);
    // The same answer under CUSE is a retry.
    ioctl_request(&kernel, 4, fh, ioctl_flags::UNRESTRICTED, &[], 0);
    let body = kernel.expect_ok(4);
    assert_eq!(
        parse::<IoctlOut>(&body).unwrap().0.flags,
        ioctl_flags::RETRY
    );
}
