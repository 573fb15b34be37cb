//! The preload frontend's kernel half, driven the way the preload library drives it (the
//! wire protocol of docs/preload.md, spoken here in Rust over real Unix sockets) with a toy
//! device behind a real engine session. The library itself and the real clients are tested
//! end to end in tests/tests/preload.rs; these pin down the server's side of each rule.

use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    connect, recvmsg, sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
    UnixAddr,
};
use zerocopy::{FromBytes, IntoBytes};

use super::wire;
use super::PreloadFrontend;
use crate::device::{
    poll_bits, Caller, Device, Handle, IoctlAnswer, IoctlCall, IoctlOutcome, IoctlReply, PollWaker,
    ReadReply, UserBuffer, WaitList, WriteReply,
};
use crate::fuse::abi::*;

const WAIT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct ToyState {
    open_files: usize,
    exclusive: bool,
    queued: VecDeque<u8>,
    readers: WaitList<u32, Vec<u8>>,
    pollers: Vec<PollWaker>,
    last_caller: Option<(u32, u32, u32)>,
    releases: usize,
}

/// Reads sleep until data; writes queue data and wake readers and pollers; an ioctl asks for
/// 4 bytes at `arg` in and out, and answers them plus one.
#[derive(Default)]
struct Toy {
    state: Mutex<ToyState>,
    changed: Condvar,
}

impl Toy {
    fn wait_until(&self, what: impl Fn(&ToyState) -> bool) -> bool {
        let deadline = Instant::now() + WAIT;
        let mut state = self.state.lock().unwrap();
        while !what(&state) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            state = self.changed.wait_timeout(state, left).unwrap().0;
        }
        true
    }
}

impl Device for Toy {
    fn name(&self) -> &str {
        "test/toy"
    }
    fn open(&self, _caller: &Caller, _flags: i32) -> Result<Handle, Errno> {
        let mut state = self.state.lock().unwrap();
        if state.exclusive && state.open_files > 0 {
            return Err(Errno::EBUSY);
        }
        state.open_files += 1;
        Ok(1)
    }
    fn read(&self, _h: Handle, count: u32, _o: u64, caller: &Caller, reply: ReadReply) {
        let mut state = self.state.lock().unwrap();
        state.last_caller = Some((caller.pid, caller.uid, caller.gid));
        if state.queued.is_empty() {
            state.readers.park_interruptible(count, reply);
        } else {
            let n = state.queued.len().min(count as usize);
            reply.ok(state.queued.drain(..n).collect());
        }
        self.changed.notify_all();
    }
    fn write(&self, _h: Handle, data: &[u8], _o: u64, _c: &Caller, reply: WriteReply) {
        let mut state = self.state.lock().unwrap();
        state.queued.extend(data);
        while !state.queued.is_empty() {
            let Some((count, sleeper)) = state.readers.wake_one() else {
                break;
            };
            let n = state.queued.len().min(count as usize);
            sleeper.ok(state.queued.drain(..n).collect());
        }
        for poller in state.pollers.drain(..) {
            poller.wake();
        }
        reply.ok(data.len() as u32);
    }
    fn ioctl(&self, _h: Handle, call: &IoctlCall<'_>, _c: &Caller, reply: IoctlAnswer) {
        let buffer = UserBuffer {
            addr: call.arg,
            len: 4,
        };
        if call.input.is_empty() {
            reply.ok(IoctlOutcome::Retry {
                input: vec![buffer],
                output: vec![buffer],
            });
            return;
        }
        let value = u32::from_ne_bytes(call.input[..4].try_into().unwrap());
        reply.ok(IoctlOutcome::Done(IoctlReply {
            result: 7,
            out: (value + 1).to_ne_bytes().to_vec(),
        }));
    }
    fn poll(&self, _h: Handle, waker: Option<PollWaker>) -> u32 {
        let mut state = self.state.lock().unwrap();
        if !state.queued.is_empty() {
            return poll_bits::POLLIN | poll_bits::POLLOUT;
        }
        state.pollers.extend(waker);
        poll_bits::POLLOUT
    }
    fn release(&self, _h: Handle) {
        let mut state = self.state.lock().unwrap();
        state.open_files -= 1;
        state.releases += 1;
        self.changed.notify_all();
    }
}

struct Rig {
    frontend: PreloadFrontend,
    toy: Arc<Toy>,
    dir: PathBuf,
}

impl Rig {
    fn new(test: &str) -> Rig {
        let dir =
            std::env::temp_dir().join(format!("cusedev-preload-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let frontend = PreloadFrontend::start(std::path::Path::new("/dev"), Some(&dir)).unwrap();
        let toy = Arc::new(Toy::default());
        frontend.add_device(toy.clone()).unwrap();
        Rig { frontend, toy, dir }
    }

    fn connect(&self) -> OwnedFd {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        wire::pass_credentials(fd.as_fd()).unwrap();
        connect(
            fd.as_raw_fd(),
            &UnixAddr::new(&self.dir.join("preload.sock")).unwrap(),
        )
        .unwrap();
        fd
    }

    /// The library's open: the file socket, or the errno.
    fn open(&self, name: &str) -> Result<OwnedFd, Errno> {
        let fd = self.connect();
        let open_in = OpenIn {
            flags: libc::O_RDWR as u32,
            open_flags: 0,
        };
        let mut body = open_in.as_bytes().to_vec();
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        send_request(&fd, Opcode::OPEN, 1, &body, None);
        let (error, _) = receive_reply(&fd);
        if error < 0 {
            return Err(Errno::from_raw(-error));
        }
        Ok(fd)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.frontend.shutdown();
    }
}

fn request(opcode: Opcode, unique: u64, body: &[u8], pid: u32) -> Vec<u8> {
    let header = InHeader {
        len: (size_of::<InHeader>() + body.len()) as u32,
        opcode: opcode.0,
        unique,
        // What the library sends; uid and gid are lies that must not be believed.
        uid: 4242,
        gid: 4343,
        pid,
        ..InHeader::default()
    };
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

fn send_request(fd: &OwnedFd, opcode: Opcode, unique: u64, body: &[u8], reply: Option<&OwnedFd>) {
    let tid = nix::unistd::gettid().as_raw() as u32;
    let bytes = request(opcode, unique, body, tid);
    let fds: Vec<i32> = reply.iter().map(|r| r.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    sendmsg::<UnixAddr>(
        fd.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .unwrap();
}

/// Waits for one reply: (error, body).
fn receive_reply(fd: &OwnedFd) -> (i32, Vec<u8>) {
    assert!(readable(fd, WAIT), "no reply within {WAIT:?}");
    let mut buf = vec![0u8; 256 * 1024];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let n = recvmsg::<UnixAddr>(fd.as_raw_fd(), &mut iov, None, MsgFlags::empty())
        .unwrap()
        .bytes;
    assert!(n >= size_of::<OutHeader>(), "a reply of {n} bytes");
    let (header, body) = OutHeader::read_from_prefix(&buf[..n]).unwrap();
    assert_eq!(header.len as usize, n);
    (header.error, body.to_vec())
}

fn readable(fd: &OwnedFd, within: Duration) -> bool {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(within).unwrap();
    poll(&mut fds, timeout).unwrap() == 1
}

/// One call: the request goes on the file socket with `b`, the reply comes on `a`.
fn start_call(file: &OwnedFd, opcode: Opcode, unique: u64, body: &[u8]) -> OwnedFd {
    let (a, b) = wire::seqpacket_pair(false).unwrap();
    wire::pass_credentials(a.as_fd()).unwrap();
    send_request(file, opcode, unique, body, Some(&b));
    a
}

fn call(file: &OwnedFd, opcode: Opcode, body: &[u8]) -> (i32, Vec<u8>) {
    let a = start_call(file, opcode, 5, body);
    receive_reply(&a)
}

fn read_in(size: u32) -> Vec<u8> {
    ReadIn {
        fh: 12345, // the library's value, replaced by the server's own
        size,
        ..ReadIn::default()
    }
    .as_bytes()
    .to_vec()
}

fn write_in(data: &[u8]) -> Vec<u8> {
    let mut body = WriteIn {
        size: data.len() as u32,
        ..WriteIn::default()
    }
    .as_bytes()
    .to_vec();
    body.extend_from_slice(data);
    body
}

#[test]
fn open_finds_devices_by_name_and_says_enoent_for_others() {
    let rig = Rig::new("open");
    assert_eq!(rig.open("test/none").err(), Some(Errno::ENOENT));
    let file = rig.open("test/toy").expect("open");
    assert_eq!(rig.toy.state.lock().unwrap().open_files, 1);
    drop(file);
    assert!(
        rig.toy.wait_until(|s| s.releases == 1),
        "the last close releases"
    );
}

#[test]
fn a_read_sleeps_until_a_write_and_the_caller_is_who_the_kernel_says() {
    let rig = Rig::new("rw");
    let reader = rig.open("test/toy").unwrap();
    let writer = rig.open("test/toy").unwrap();
    let a = start_call(&reader, Opcode::READ, 9, &read_in(100));
    assert!(rig.toy.wait_until(|s| s.readers.waiting() == 1));
    assert!(!readable(&a, Duration::ZERO), "the read sleeps");
    let (error, body) = call(&writer, Opcode::WRITE, &write_in(b"hello"));
    assert_eq!(error, 0);
    assert_eq!(WriteOut::read_from_prefix(&body).unwrap().0.size, 5);
    assert_eq!(receive_reply(&a), (0, b"hello".to_vec()));
    let me = std::process::id();
    let tid = nix::unistd::gettid().as_raw() as u32;
    let (pid, uid, gid) = rig.toy.state.lock().unwrap().last_caller.unwrap();
    assert_eq!(pid, tid, "a thread of the sender is believed");
    assert_ne!(pid, 1);
    assert_eq!(
        (uid, gid),
        (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw()
        )
    );
    let _ = me;
}

#[test]
fn a_thread_id_not_of_the_sender_becomes_the_senders_pid() {
    let rig = Rig::new("tid");
    let file = rig.open("test/toy").unwrap();
    rig.toy.state.lock().unwrap().queued.extend(b"x");
    let (a, b) = wire::seqpacket_pair(false).unwrap();
    let bytes = request(Opcode::READ, 3, &read_in(1), 1);
    let fds = [b.as_raw_fd()];
    sendmsg::<UnixAddr>(
        file.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    assert_eq!(receive_reply(&a).0, 0);
    let (pid, ..) = rig.toy.state.lock().unwrap().last_caller.unwrap();
    assert_eq!(pid, std::process::id(), "pid 1 is not our thread");
}

#[test]
fn an_interrupt_ends_a_sleeping_read_with_eintr() {
    let rig = Rig::new("eintr");
    let file = rig.open("test/toy").unwrap();
    let a = start_call(&file, Opcode::READ, 9, &read_in(10));
    assert!(rig.toy.wait_until(|s| s.readers.waiting() == 1));
    let interrupt = InterruptIn { unique: 9 };
    send_request(&a, Opcode::INTERRUPT, 10, interrupt.as_bytes(), None);
    assert_eq!(receive_reply(&a).0, -(Errno::EINTR as i32));
}

#[test]
fn a_caller_that_dies_has_its_request_interrupted_and_its_file_stays_open_for_it() {
    let rig = Rig::new("orphan");
    let file = rig.open("test/toy").unwrap();
    let a = start_call(&file, Opcode::READ, 9, &read_in(10));
    assert!(rig.toy.wait_until(|s| s.readers.waiting() == 1));
    // The file's last descriptor goes while the read sleeps: no release yet.
    drop(file);
    drop(a);
    assert!(
        rig.toy.wait_until(|s| s.readers.waiting() == 0),
        "the read is interrupted"
    );
    assert!(
        rig.toy.wait_until(|s| s.releases == 1),
        "then the file is released"
    );
}

#[test]
fn an_open_after_a_close_waits_for_the_release() {
    let rig = Rig::new("busy");
    rig.toy.state.lock().unwrap().exclusive = true;
    for _ in 0..50 {
        let file = rig.open("test/toy").expect("open after the last close");
        assert_eq!(rig.open("test/toy").err(), Some(Errno::EBUSY));
        drop(file);
    }
}

#[test]
fn poll_registers_and_a_change_sends_the_notification() {
    let rig = Rig::new("poll");
    let file = rig.open("test/toy").unwrap();
    let poll_in = PollIn {
        flags: FUSE_POLL_SCHEDULE_NOTIFY,
        events: libc::POLLIN as u32,
        ..PollIn::default()
    };
    let a = start_call(&file, Opcode::POLL, 4, poll_in.as_bytes());
    let (error, body) = receive_reply(&a);
    assert_eq!(error, 0);
    assert_eq!(
        PollOut::read_from_prefix(&body).unwrap().0.revents,
        poll_bits::POLLOUT
    );
    assert!(!readable(&a, Duration::ZERO));
    let writer = rig.open("test/toy").unwrap();
    assert_eq!(call(&writer, Opcode::WRITE, &write_in(b"x")).0, 0);
    let (code, _) = receive_reply(&a);
    assert_eq!(code, FUSE_NOTIFY_POLL, "the poller is told to poll again");
    let (_, body) = call(&file, Opcode::POLL, poll_in.as_bytes());
    let revents = PollOut::read_from_prefix(&body).unwrap().0.revents;
    assert_eq!(revents & poll_bits::POLLIN, poll_bits::POLLIN);
}

#[test]
fn an_unrestricted_ioctl_takes_its_retry_on_the_same_call() {
    let rig = Rig::new("ioctl");
    let file = rig.open("test/toy").unwrap();
    let ioctl_in = IoctlIn {
        flags: 0, // the server makes it unrestricted, as CUSE's are
        cmd: 0x1234,
        arg: 0x1000,
        ..IoctlIn::default()
    };
    let a = start_call(&file, Opcode::IOCTL, 6, ioctl_in.as_bytes());
    let (error, body) = receive_reply(&a);
    assert_eq!(error, 0);
    let (out, iovs) = IoctlOut::read_from_prefix(&body).unwrap();
    assert_eq!(out.flags & ioctl_flags::RETRY, ioctl_flags::RETRY);
    assert_eq!((out.in_iovs, out.out_iovs), (1, 1));
    assert_eq!(iovs.len(), 2 * size_of::<IoctlIovec>());
    let retry = IoctlIn {
        in_size: 4,
        out_size: 4,
        ..ioctl_in
    };
    let mut body = retry.as_bytes().to_vec();
    body.extend_from_slice(&41u32.to_ne_bytes());
    send_request(&a, Opcode::IOCTL, 7, &body, None);
    let (error, body) = receive_reply(&a);
    assert_eq!(error, 0);
    let (out, data) = IoctlOut::read_from_prefix(&body).unwrap();
    assert_eq!(out.result, 7);
    assert_eq!(data, 42u32.to_ne_bytes());
}

#[test]
fn requests_the_kernel_never_sends_are_refused() {
    let rig = Rig::new("bad");
    let file = rig.open("test/toy").unwrap();
    let mut short = write_in(b"abcd");
    short.pop();
    assert_eq!(
        call(&file, Opcode::WRITE, &short).0,
        -(Errno::EINVAL as i32)
    );
    assert_eq!(
        call(&file, Opcode::READ, &read_in(1 << 20)).0,
        -(Errno::EINVAL as i32)
    );
    assert_eq!(
        call(&file, Opcode::FLUSH, &[0; 24]).0,
        -(Errno::ENOSYS as i32)
    );
    // A header whose length lies is dropped; the file still works.
    let (a, b) = wire::seqpacket_pair(false).unwrap();
    let mut bytes = request(Opcode::READ, 3, &read_in(1), 0);
    bytes[0] = 200;
    let fds = [b.as_raw_fd()];
    sendmsg::<UnixAddr>(
        file.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    drop(b);
    let _ = a;
    rig.toy.state.lock().unwrap().queued.extend(b"ok");
    assert_eq!(call(&file, Opcode::READ, &read_in(2)), (0, b"ok".to_vec()));
}

#[test]
fn stat_and_fstat_show_a_character_device_of_the_user() {
    let rig = Rig::new("stat");
    let fd = rig.connect();
    send_request(&fd, Opcode::LOOKUP, 1, b"test/toy\0", None);
    let (error, body) = receive_reply(&fd);
    assert_eq!(error, 0);
    let attr = EntryOut::read_from_prefix(&body).unwrap().0.attr;
    assert_eq!(attr.mode, libc::S_IFCHR | 0o600);
    assert_eq!(attr.uid, nix::unistd::geteuid().as_raw());
    let fd = rig.connect();
    send_request(&fd, Opcode::LOOKUP, 1, b"test/none\0", None);
    assert_eq!(receive_reply(&fd).0, -(Errno::ENOENT as i32));
    let file = rig.open("test/toy").unwrap();
    let (error, body) = call(&file, Opcode::GETATTR, GetattrIn::default().as_bytes());
    assert_eq!(error, 0);
    assert_eq!(AttrOut::read_from_prefix(&body).unwrap().0.attr, attr);
}

#[test]
fn a_removed_device_keeps_its_open_files_until_their_last_close() {
    let rig = Rig::new("removed");
    let file = rig.open("test/toy").unwrap();
    rig.frontend.remove_device("test/toy");
    assert_eq!(rig.open("test/toy").err(), Some(Errno::ENOENT));
    rig.toy.state.lock().unwrap().queued.extend(b"still");
    assert_eq!(
        call(&file, Opcode::READ, &read_in(5)),
        (0, b"still".to_vec())
    );
    drop(file);
    assert!(rig.toy.wait_until(|s| s.releases == 1));
}

#[test]
fn a_file_shared_with_a_forked_child_is_released_after_both_close() {
    let rig = Rig::new("shared");
    let file = rig.open("test/toy").unwrap();
    // A dup is what fork and SCM_RIGHTS make too: the same socket, another descriptor.
    let dup = file.try_clone().unwrap();
    drop(file);
    rig.toy.state.lock().unwrap().queued.extend(b"d");
    assert_eq!(call(&dup, Opcode::READ, &read_in(1)), (0, b"d".to_vec()));
    assert_eq!(rig.toy.state.lock().unwrap().releases, 0);
    drop(dup);
    assert!(rig.toy.wait_until(|s| s.releases == 1));
    let _ = UnixStream::pair();
}

#[test]
fn garbage_short_and_oversized_messages_are_refused_and_lose_nothing() {
    let rig = Rig::new("garbage");
    // Too short for a header, on a connection that is not a file yet: ignored.
    let fd = rig.connect();
    sendmsg::<UnixAddr>(
        fd.as_raw_fd(),
        &[IoSlice::new(&[1, 2, 3])],
        &[],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    // A well-formed header with an opcode no open starts with: EINVAL.
    send_request(&fd, Opcode::READ, 8, &read_in(1), None);
    assert_eq!(receive_reply(&fd).0, -(Errno::EINVAL as i32));
    // An OPEN whose name has no terminator: EINVAL.
    let fd = rig.connect();
    let mut body = OpenIn::default().as_bytes().to_vec();
    body.extend_from_slice(b"test/toy");
    send_request(&fd, Opcode::OPEN, 1, &body, None);
    assert_eq!(receive_reply(&fd).0, -(Errno::EINVAL as i32));

    let file = rig.open("test/toy").unwrap();
    // Longer than any request the kernel sends: refused; its call socket is closed unanswered.
    let (a, b) = wire::seqpacket_pair(false).unwrap();
    let oversized = request(
        Opcode::WRITE,
        3,
        &vec![0u8; super::kernel::MAX_MESSAGE + 4096],
        0,
    );
    let fds = [b.as_raw_fd()];
    sendmsg::<UnixAddr>(
        file.as_raw_fd(),
        &[IoSlice::new(&oversized)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    drop(b);
    assert!(readable(&a, WAIT));
    let mut byte = [0u8; 1];
    assert_eq!(
        nix::unistd::read(a.as_raw_fd(), &mut byte),
        Ok(0),
        "closed, not answered"
    );
    // Garbage on a call socket while its read sleeps: ignored; the read is still answered.
    let sleeper = start_call(&file, Opcode::READ, 9, &read_in(4));
    assert!(rig.toy.wait_until(|s| s.readers.waiting() == 1));
    sendmsg::<UnixAddr>(
        sleeper.as_raw_fd(),
        &[IoSlice::new(&[0xff; 7])],
        &[],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    let writer = rig.open("test/toy").unwrap();
    assert_eq!(call(&writer, Opcode::WRITE, &write_in(b"safe")).0, 0);
    assert_eq!(receive_reply(&sleeper), (0, b"safe".to_vec()));
}
