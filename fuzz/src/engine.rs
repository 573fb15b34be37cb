//! The engine targets: whole FUSE or CUSE requests fed to a `cusedev` session over a
//! SOCK_SEQPACKET socket pair (the fake kernel of `cusedev/src/fuse/engine_tests.rs`: one
//! message per request, one per reply), with [`toy::Toy`] as the device.
//!
//! The input is read structurally: an INIT (FUSE_INIT or CUSE_INIT, well-formed or not, or
//! none), then a script of requests with arbitrary header fields and bodies that may be cut,
//! padded, or announced with a lying `len` or `total_extlen`, some of them raw bytes. The
//! harness plays the kernel: it gives each request a fresh even `unique` (as the kernel's
//! `fuse_get_unique` does; a raw request gets one written over its bytes 8..16), remembers
//! the file handles the engine hands out and the requests that sleep, sends INTERRUPTs for
//! them, and follows FUSE_IOCTL_RETRY answers with the retried request.
//!
//! Properties checked after every request, from what the device logged and the header alone
//! (no model of the engine's decisions): every request that takes an answer gets exactly one,
//! with its `unique`, unless the device parked it; a woken or interrupted sleeper gets exactly
//! one (EINTR for an interrupt); FORGET, BATCH_FORGET, a message shorter than a header and an
//! INTERRUPT of a sleeper that cannot be interrupted get none; an INTERRUPT of a request not
//! in flight gets the EAGAIN the kernel re-queues on (`unique | 1`, fs/fuse/dev.c 6.1,
//! `fuse_dev_do_write`); every reply's `len` is the bytes written, its error 0 or a negative
//! errno, each FUSE_NOTIFY_POLL names a kh the kernel gave with FUSE_POLL_SCHEDULE_NOTIFY;
//! successful OPEN/READ/WRITE/POLL/IOCTL replies have their shapes (a fresh fh, at most `size`
//! bytes, a RETRY only for an unrestricted ioctl and with at most FUSE_IOCTL_MAX_IOV
//! non-wrapping iovecs, no more than `out_size` bytes back). At the end the session still
//! answers a well-formed request, and ending it answers EINTR to every interruptible sleeper.
//!
//! Two ways to serve: [`Mode::Stepped`] (what the fuzz targets run) serves each request on the
//! caller's thread with `cusedev::fuse::session::fuzzing::SteppedSession`, so every reply is on
//! the socket when the call returns and "no reply" is exact; [`Mode::Threaded`] runs the real
//! `Session` with one reader thread and a barrier request after each one (what the corpus
//! replay also runs). docs/fuzzing.md has the measurements behind the choice.

pub mod toy;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arbitrary::{Arbitrary, Result as ArbResult, Unstructured};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use zerocopy::{FromBytes, IntoBytes};

use cusedev::cuse::handler::CuseHandler;
use cusedev::fuse::abi::*;
use cusedev::fuse::init::REQUEST_BUFFER_SIZE;
use cusedev::fuse::session::fuzzing::{Step, SteppedSession};
use cusedev::fuse::{DeviceDir, RequestHandler, Session};

use toy::{Event, Toy};

/// Requests per input (retries included): enough for open/park/interrupt/wake sequences, few
/// enough that the replies of one request always fit in the socket's send buffer.
const MAX_REQUESTS: usize = 40;
/// How long the threaded mode waits for a reply before it calls the session hung.
const REPLY_WAIT: Duration = Duration::from_secs(10);
/// Largest errno a reply may carry (the kernel refuses others: fs/fuse/dev.c, `-512 < err`;
/// anything past MAX_ERRNO is no errno at all).
const MAX_ERRNO: i32 = 4095;
const HDR: usize = size_of::<InHeader>();

/// Which personality the session has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Personality {
    /// A FUSE mount: a directory (`DeviceDir`) holding the toy device.
    Fuse,
    /// CUSE: the toy as the one device, nodeid 0.
    Cuse,
}

/// How requests are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// On the caller's thread, one request per step.
    Stepped,
    /// By the real session's reader thread.
    Threaded,
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum NodeSel {
    Root,
    Device,
    Other(u64),
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum FhSel {
    Open(u8),
    Any(u64),
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum UniqueSel {
    Sleeping(u8),
    Sent(u8),
    Any(u64),
}

/// How the header and body are mangled (mostly not at all).
#[derive(Debug, Clone, Arbitrary)]
struct Mangle {
    uid: u32,
    gid: u32,
    pid: u32,
    how: MangleHow,
}

#[derive(Debug, Clone, Arbitrary)]
enum MangleHow {
    None,
    Cut(u8),
    Pad(Vec<u8>),
    LenDelta(i16),
    ExtLen(u16),
}

#[derive(Debug, Clone, Arbitrary)]
enum Op {
    Lookup(NodeSel, Vec<u8>),
    Getattr(NodeSel, u32, FhSel),
    Open(NodeSel, u32),
    Read(FhSel, u16, u64),
    Write(FhSel, u64, Vec<u8>, Option<u32>),
    Ioctl {
        fh: FhSel,
        flags: u8,
        cmd: u32,
        arg: u64,
        input: Vec<u8>,
        in_size: Option<u32>,
        out_size: u16,
        follow_retry: bool,
    },
    Poll(FhSel, u64, bool, u32),
    Interrupt(UniqueSel),
    Flush(FhSel),
    Release(FhSel, u32),
    Forget(NodeSel, u64),
    BatchForget(Vec<(NodeSel, u64)>, Option<u32>),
    Destroy,
    Other(u32, NodeSel, Vec<u8>),
    Raw(Vec<u8>),
}

#[derive(Debug, Clone, Arbitrary)]
enum InitChoice {
    Proper {
        minor: u8,
        flags: u32,
    },
    Skipped,
    Odd {
        major: u32,
        minor: u32,
        flags: u32,
        cut: u8,
    },
}

/// What the harness remembers of a request it sent.
#[derive(Debug, Clone, Copy)]
struct Sent {
    opcode: Opcode,
    size: u32,
    ioctl: Option<IoctlIn>,
    follow_retry: bool,
}

/// A reply read from the socket.
#[derive(Debug)]
struct Msg {
    unique: u64,
    error: i32,
    body: Vec<u8>,
}

/// The two ways of serving, behind one "send this, get its replies" step.
enum Server {
    Stepped(SteppedSession),
    Threaded(Session),
}

struct Kernel {
    sock: OwnedFd,
    server: Option<Server>,
    toy: Arc<Toy>,
    personality: Personality,
    next_unique: u64,
    sent: HashMap<u64, Sent>,
    sent_order: Vec<u64>,
    /// Sleeper seq → unique, and whether it is interruptible, for every sleeper not answered.
    sleeping: HashMap<u64, (u64, bool)>,
    /// unique → seq of the sleepers above.
    sleeping_by_unique: HashMap<u64, u64>,
    open_fhs: Vec<u64>,
    all_fhs: HashSet<u64>,
    notify_khs: HashSet<u64>,
    /// Uniques answered with error 0.
    succeeded: HashSet<u64>,
    requests: usize,
    stopped: bool,
    device_ino: u64,
}

thread_local! {
    /// One request buffer per thread, as big as a reader's, reused by every input (a fresh
    /// megabyte per input would cost more than the input).
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; REQUEST_BUFFER_SIZE]);
}

impl Kernel {
    fn start(personality: Personality, mode: Mode) -> Kernel {
        let (sock, server_end) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let toy = Toy::new();
        let (handler, device_ino): (Arc<dyn RequestHandler>, u64) = match personality {
            Personality::Fuse => {
                let dir = DeviceDir::new(Path::new("/fuzz"));
                let ino = dir.add("toy", toy.clone()).expect("add the toy");
                (Arc::new(dir), ino)
            }
            Personality::Cuse => (Arc::new(CuseHandler::new(toy.clone())), 0),
        };
        let server = match mode {
            Mode::Stepped => Server::Stepped(SteppedSession::new(server_end, handler, "fuzz")),
            Mode::Threaded => Server::Threaded(
                Session::start_with_readers(server_end, handler, "fuzz", 1).expect("session"),
            ),
        };
        Kernel {
            sock,
            server: Some(server),
            toy,
            personality,
            next_unique: 2,
            sent: HashMap::new(),
            sent_order: Vec::new(),
            sleeping: HashMap::new(),
            sleeping_by_unique: HashMap::new(),
            open_fhs: Vec::new(),
            all_fhs: HashSet::new(),
            notify_khs: HashSet::new(),
            succeeded: HashSet::new(),
            requests: 0,
            stopped: false,
            device_ino,
        }
    }

    fn fresh_unique(&mut self) -> u64 {
        let unique = self.next_unique;
        self.next_unique += 2;
        unique
    }

    fn nodeid(&self, sel: NodeSel) -> u64 {
        match (self.personality, sel) {
            (Personality::Cuse, NodeSel::Root | NodeSel::Device) => 0,
            (Personality::Fuse, NodeSel::Root) => ROOT_ID,
            (Personality::Fuse, NodeSel::Device) => self.device_ino,
            (_, NodeSel::Other(n)) => n,
        }
    }

    fn fh(&self, sel: FhSel) -> u64 {
        match sel {
            FhSel::Open(i) if !self.open_fhs.is_empty() => {
                self.open_fhs[usize::from(i) % self.open_fhs.len()]
            }
            FhSel::Open(i) => u64::from(i),
            FhSel::Any(fh) => fh,
        }
    }

    fn target(&self, sel: UniqueSel) -> u64 {
        match sel {
            UniqueSel::Sleeping(i) if !self.sleeping_by_unique.is_empty() => {
                let mut uniques: Vec<u64> = self.sleeping_by_unique.keys().copied().collect();
                uniques.sort_unstable();
                uniques[usize::from(i) % uniques.len()]
            }
            UniqueSel::Sent(i) if !self.sent_order.is_empty() => {
                self.sent_order[usize::from(i) % self.sent_order.len()]
            }
            UniqueSel::Sleeping(i) | UniqueSel::Sent(i) => u64::from(i) * 2,
            UniqueSel::Any(unique) => unique,
        }
    }

    /// Header + body, mangled, with a fresh unique. Returns the message and its unique.
    fn message(&mut self, opcode: Opcode, nodeid: u64, body: &[u8], m: &Mangle) -> (Vec<u8>, u64) {
        let unique = self.fresh_unique();
        let mut body = body.to_vec();
        let mut header = InHeader {
            len: 0,
            opcode: opcode.0,
            unique,
            nodeid,
            uid: m.uid,
            gid: m.gid,
            pid: m.pid,
            total_extlen: 0,
            padding: 0,
        };
        match &m.how {
            MangleHow::Cut(n) => body.truncate(body.len().saturating_sub(usize::from(*n))),
            MangleHow::Pad(extra) => body.extend_from_slice(extra),
            MangleHow::ExtLen(n) => header.total_extlen = *n % 8,
            _ => {}
        }
        header.len = (HDR + body.len()) as u32;
        if let MangleHow::LenDelta(d) = m.how {
            header.len = header.len.wrapping_add_signed(i32::from(d));
        }
        let mut msg = header.as_bytes().to_vec();
        msg.extend_from_slice(&body);
        (msg, unique)
    }

    /// Sends `msg` and checks what comes back. `sent` says what the request was (None for raw
    /// bytes: read from its header, if it has one).
    fn request(&mut self, msg: &[u8], follow_retry: bool) {
        // An empty message is no request: /dev/fuse never reads 0 bytes, a socket standing in
        // for it reads 0 only at its end, and the engine stops there.
        if self.stopped || self.requests >= MAX_REQUESTS || msg.is_empty() {
            return;
        }
        self.requests += 1;
        let header = InHeader::read_from_prefix(msg).ok().map(|(h, _)| h);
        let valid = header.filter(|h| {
            h.len as usize == msg.len() && msg.len() >= HDR + usize::from(h.total_extlen) * 8
        });
        let unique = header.map(|h| h.unique);
        let opcode = header.map(|h| Opcode(h.opcode));
        if let (Some(h), Some(unique)) = (valid, unique) {
            let body = &msg[HDR..msg.len() - usize::from(h.total_extlen) * 8];
            let ioctl = (Opcode(h.opcode) == Opcode::IOCTL)
                .then(|| IoctlIn::read_from_prefix(body).ok().map(|(i, _)| i))
                .flatten();
            let size = match Opcode(h.opcode) {
                Opcode::READ => ReadIn::read_from_prefix(body).map_or(0, |(r, _)| r.size),
                _ => 0,
            };
            self.sent.insert(
                unique,
                Sent {
                    opcode: Opcode(h.opcode),
                    size,
                    ioctl,
                    follow_retry,
                },
            );
            self.sent_order.push(unique);
        }

        let (replies, stopped) =
            self.exchange(msg, valid.is_some() && opcode == Some(Opcode::DESTROY));
        let events = self.toy.take_log();

        // What must have come back.
        let mut expected: Vec<u64> = Vec::new();
        let mut parked_now = false;
        let mut notifies = 0;
        for event in &events {
            match *event {
                Event::Parked { seq, interruptible } => {
                    let unique = unique.expect("a parked request has a header");
                    parked_now = true;
                    self.sleeping.insert(seq, (unique, interruptible));
                    self.sleeping_by_unique.insert(unique, seq);
                }
                Event::Woke { seq } => {
                    let (woken, _) = self.sleeping.remove(&seq).expect("a known sleeper woke");
                    self.sleeping_by_unique.remove(&woken);
                    expected.push(woken);
                }
                Event::Notified(n) => notifies += n,
            }
        }
        let mut eintr = None;
        let mut eagain = None;
        match (header, valid, opcode) {
            (None, _, _) => {}
            (Some(_), None, Some(Opcode::FORGET | Opcode::BATCH_FORGET | Opcode::INTERRUPT)) => {}
            (Some(h), None, _) => expected.push(h.unique),
            (Some(h), Some(_), Some(Opcode::INTERRUPT)) => {
                let body = &msg[HDR..msg.len() - usize::from(h.total_extlen) * 8];
                if let Ok((target, _)) = InterruptIn::read_from_prefix(body) {
                    let target = target.unique;
                    match self.sleeping_by_unique.get(&target).copied() {
                        Some(seq) => {
                            if self.sleeping[&seq].1 {
                                self.sleeping.remove(&seq);
                                self.sleeping_by_unique.remove(&target);
                                expected.push(target);
                                eintr = Some(target);
                            }
                        }
                        None => {
                            expected.push(h.unique | 1);
                            eagain = Some(h.unique | 1);
                        }
                    }
                }
            }
            (Some(_), Some(_), Some(Opcode::FORGET | Opcode::BATCH_FORGET)) => {}
            (Some(h), Some(_), _) if !parked_now => expected.push(h.unique),
            _ => {}
        }

        let mut got: Vec<u64> = Vec::new();
        let mut retry = None;
        for reply in &replies {
            if reply.unique == 0 {
                assert_eq!(
                    reply.error, FUSE_NOTIFY_POLL,
                    "unique 0 is only a notification"
                );
                let (wakeup, rest) = NotifyPollWakeupOut::read_from_prefix(&reply.body)
                    .expect("FUSE_NOTIFY_POLL body");
                assert!(rest.is_empty());
                assert!(
                    self.notify_khs.contains(&wakeup.kh),
                    "notification for kh {}",
                    wakeup.kh
                );
                notifies = notifies.checked_sub(1).expect("a notification nobody woke");
                continue;
            }
            assert!(
                reply.error == 0 || (-MAX_ERRNO..0).contains(&reply.error),
                "error {} for unique {}",
                reply.error,
                reply.unique
            );
            if Some(reply.unique) == eintr {
                assert_eq!(
                    reply.error,
                    -libc::EINTR,
                    "an interrupted sleeper gets EINTR"
                );
            }
            if Some(reply.unique) == eagain {
                assert_eq!(
                    reply.error,
                    -libc::EAGAIN,
                    "an INTERRUPT of nothing gets EAGAIN"
                );
                assert!(reply.body.is_empty());
            }
            got.push(reply.unique);
            if reply.error == 0 {
                self.succeeded.insert(reply.unique);
                if let Some(r) = self.check_success(reply) {
                    retry = Some(r);
                }
            }
        }
        assert_eq!(
            notifies, 0,
            "woken poll registrations without a notification"
        );
        expected.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, expected, "replies for {opcode:?} (events {events:?})");
        if stopped {
            self.stopped = true;
        }
        if let Some((ioctl_in, inputs, outputs)) = retry {
            self.send_retry(ioctl_in, &inputs, &outputs);
        }
    }

    /// Checks a successful reply's shape; returns the retry to send for a followed RETRY.
    #[allow(clippy::type_complexity)]
    fn check_success(
        &mut self,
        reply: &Msg,
    ) -> Option<(IoctlIn, Vec<IoctlIovec>, Vec<IoctlIovec>)> {
        let sent = *self.sent.get(&reply.unique)?;
        let body = &reply.body[..];
        match sent.opcode {
            Opcode::OPEN => {
                let (out, rest) = OpenOut::read_from_prefix(body).expect("OpenOut");
                assert!(rest.is_empty());
                assert!(
                    self.all_fhs.insert(out.fh),
                    "fh {} handed out twice",
                    out.fh
                );
                self.open_fhs.push(out.fh);
            }
            Opcode::READ => assert!(body.len() <= sent.size as usize, "READ answer too long"),
            Opcode::WRITE => assert_eq!(body.len(), size_of::<WriteOut>()),
            Opcode::POLL => assert_eq!(body.len(), size_of::<PollOut>()),
            Opcode::RELEASE | Opcode::FLUSH => assert!(body.is_empty()),
            Opcode::IOCTL => {
                let ioctl_in = sent.ioctl.expect("an answered IOCTL had a fuse_ioctl_in");
                let (out, rest) = IoctlOut::read_from_prefix(body).expect("IoctlOut");
                if out.flags & ioctl_flags::RETRY == 0 {
                    assert!(
                        rest.len() <= ioctl_in.out_size as usize,
                        "ioctl answer past out_size"
                    );
                    return None;
                }
                assert_ne!(
                    ioctl_in.flags & ioctl_flags::UNRESTRICTED,
                    0,
                    "RETRY when restricted"
                );
                let count = out.in_iovs as usize + out.out_iovs as usize;
                assert!(count <= ioctl_flags::MAX_IOV as usize);
                assert_eq!(rest.len(), count * size_of::<IoctlIovec>());
                let iovs: Vec<IoctlIovec> = rest
                    .chunks_exact(size_of::<IoctlIovec>())
                    .map(|c| IoctlIovec::read_from_bytes(c).expect("iovec"))
                    .collect();
                for iov in &iovs {
                    assert!(iov.base.checked_add(iov.len).is_some(), "iovec wraps");
                }
                if sent.follow_retry {
                    let (inputs, outputs) = iovs.split_at(out.in_iovs as usize);
                    return Some((ioctl_in, inputs.to_vec(), outputs.to_vec()));
                }
            }
            _ => {}
        }
        None
    }

    /// The kernel's second round of an unrestricted ioctl: the input buffers' bytes, room for
    /// the output ones (fs/fuse/ioctl.c, `fuse_do_ioctl`, 6.1). Buffers beyond what the
    /// kernel would take (`max_pages` pages each way) are not retried: it fails the syscall.
    fn send_retry(&mut self, first: IoctlIn, inputs: &[IoctlIovec], outputs: &[IoctlIovec]) {
        const LIMIT: u64 = 16 * 4096;
        let in_len: u64 = inputs.iter().map(|i| i.len).fold(0, u64::saturating_add);
        let out_len: u64 = outputs.iter().map(|i| i.len).fold(0, u64::saturating_add);
        if in_len > LIMIT || out_len > LIMIT {
            return;
        }
        let retried = IoctlIn {
            in_size: in_len as u32,
            out_size: out_len as u32,
            ..first
        };
        let mut body = retried.as_bytes().to_vec();
        body.extend((0..in_len).map(|i| i as u8));
        let none = Mangle {
            uid: 0,
            gid: 0,
            pid: 1,
            how: MangleHow::None,
        };
        let (msg, _) = self.message(Opcode::IOCTL, 0, &body, &none);
        self.request(&msg, false);
    }

    /// Sends one message and returns the replies it caused, and whether the session stopped.
    fn exchange(&mut self, msg: &[u8], destroy: bool) -> (Vec<Msg>, bool) {
        assert_eq!(
            nix::unistd::write(&self.sock, msg).expect("send"),
            msg.len()
        );
        match self.server.as_ref().expect("a running server") {
            Server::Stepped(session) => {
                let step = BUF.with(|buf| session.serve_one(&mut buf.borrow_mut()));
                (self.drain(), step == Step::Stopped)
            }
            Server::Threaded(session) => {
                if destroy {
                    let reply = self.recv_within(REPLY_WAIT).expect("DESTROY answered");
                    let deadline = std::time::Instant::now() + REPLY_WAIT;
                    while !session.is_finished() {
                        assert!(
                            std::time::Instant::now() < deadline,
                            "DESTROY did not stop it"
                        );
                        std::thread::yield_now();
                    }
                    return (vec![reply], true);
                }
                // A barrier: an unknown opcode, always answered ENOSYS, served after `msg`.
                let barrier = u64::MAX - 1;
                let header = InHeader {
                    len: HDR as u32,
                    opcode: 0x7777,
                    unique: barrier,
                    ..InHeader::default()
                };
                assert_eq!(
                    nix::unistd::write(&self.sock, header.as_bytes()).expect("send"),
                    HDR
                );
                let mut replies = Vec::new();
                loop {
                    let reply = self.recv_within(REPLY_WAIT).expect("the session hangs");
                    if reply.unique == barrier {
                        assert_eq!(reply.error, -libc::ENOSYS);
                        return (replies, false);
                    }
                    replies.push(reply);
                }
            }
        }
    }

    /// Everything on the socket now (the stepped server has written all it will).
    fn drain(&self) -> Vec<Msg> {
        std::iter::from_fn(|| self.recv_within(Duration::ZERO)).collect()
    }

    fn recv_within(&self, wait: Duration) -> Option<Msg> {
        // libFuzzer's -timeout is a SIGALRM every second or so: a poll it interrupts is asked
        // again for what is left of the wait, not counted as a crash of the engine.
        let deadline = std::time::Instant::now() + wait;
        loop {
            let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            match nix::poll::poll(&mut fds, timeout) {
                Ok(0) => return None,
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => panic!("poll: {e}"),
            }
        }
        let mut buf = vec![0u8; 1 << 18];
        let n = recv(
            self.sock.as_raw_fd(),
            &mut buf,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC,
        )
        .ok()?;
        if n == 0 {
            return None;
        }
        assert!(n <= buf.len(), "a reply of {n} bytes");
        let (header, body) = OutHeader::read_from_prefix(&buf[..n]).expect("a whole reply header");
        assert_eq!(header.len as usize, n, "reply len is what was written");
        Some(Msg {
            unique: header.unique,
            error: header.error,
            body: body.to_vec(),
        })
    }

    /// The end of an input: a well-formed request is still answered, and ending the session
    /// interrupts every interruptible sleeper.
    fn finish(mut self) {
        if !self.stopped {
            self.requests = 0;
            let none = Mangle {
                uid: 0,
                gid: 0,
                pid: 1,
                how: MangleHow::None,
            };
            let (opcode, nodeid) = match self.personality {
                Personality::Fuse => (Opcode::GETATTR, ROOT_ID),
                Personality::Cuse => (Opcode::OPEN, 0),
            };
            let body = match self.personality {
                Personality::Fuse => GetattrIn::default().as_bytes().to_vec(),
                Personality::Cuse => OpenIn::default().as_bytes().to_vec(),
            };
            let (msg, unique) = self.message(opcode, nodeid, &body, &none);
            // request() checks it got exactly one reply; it must be a success.
            self.request(&msg, false);
            assert!(
                self.succeeded.contains(&unique),
                "the final {opcode:?} failed"
            );
        }
        let interruptible: Vec<u64> = {
            let mut v: Vec<u64> = self
                .sleeping
                .values()
                .filter(|(_, interruptible)| *interruptible)
                .map(|(unique, _)| *unique)
                .collect();
            v.sort_unstable();
            v
        };
        drop(self.server.take());
        let mut got: Vec<u64> = std::iter::from_fn(|| self.recv_within(Duration::ZERO))
            .map(|reply| {
                assert_eq!(reply.error, -libc::EINTR, "a sleeper at the end gets EINTR");
                reply.unique
            })
            .collect();
        got.sort_unstable();
        assert_eq!(
            got, interruptible,
            "sleepers interrupted when the session ends"
        );
    }
}

fn init(k: &mut Kernel, u: &mut Unstructured<'_>) -> ArbResult<()> {
    let choice = InitChoice::arbitrary(u)?;
    let opcode = match k.personality {
        Personality::Fuse => Opcode::INIT,
        Personality::Cuse => Opcode::CUSE_INIT,
    };
    let none = Mangle {
        uid: 0,
        gid: 0,
        pid: 0,
        how: MangleHow::None,
    };
    let body = match choice {
        InitChoice::Skipped => return Ok(()),
        InitChoice::Proper { minor, flags } => {
            init_body(k.personality, 7, 12 + u32::from(minor) % 40, flags)
        }
        InitChoice::Odd {
            major,
            minor,
            flags,
            cut,
        } => {
            let mut body = init_body(k.personality, major, minor, flags);
            body.truncate(body.len().saturating_sub(usize::from(cut) % 24));
            body
        }
    };
    let (msg, _) = k.message(opcode, 0, &body, &none);
    k.request(&msg, false);
    Ok(())
}

fn init_body(personality: Personality, major: u32, minor: u32, flags: u32) -> Vec<u8> {
    match personality {
        Personality::Fuse => InitIn {
            major,
            minor,
            max_readahead: 65536,
            flags,
            ..InitIn::default()
        }
        .as_bytes()
        .to_vec(),
        Personality::Cuse => CuseInitIn {
            major,
            minor,
            unused: 0,
            flags,
        }
        .as_bytes()
        .to_vec(),
    }
}

fn op(k: &mut Kernel, u: &mut Unstructured<'_>) -> ArbResult<()> {
    let op = Op::arbitrary(u)?;
    let m = Mangle::arbitrary(u)?;
    let mut follow = false;
    let (opcode, nodeid, body): (Opcode, u64, Vec<u8>) = match op {
        Op::Lookup(node, mut name) => {
            name.truncate(64);
            (Opcode::LOOKUP, k.nodeid(node), name)
        }
        Op::Getattr(node, flags, fh) => {
            let body = GetattrIn {
                getattr_flags: flags,
                dummy: 0,
                fh: k.fh(fh),
            };
            (Opcode::GETATTR, k.nodeid(node), body.as_bytes().to_vec())
        }
        Op::Open(node, flags) => {
            let body = OpenIn {
                flags,
                open_flags: 0,
            };
            (Opcode::OPEN, k.nodeid(node), body.as_bytes().to_vec())
        }
        Op::Read(fh, size, offset) => {
            let body = ReadIn {
                fh: k.fh(fh),
                offset,
                size: u32::from(size),
                ..ReadIn::default()
            };
            (Opcode::READ, 0, body.as_bytes().to_vec())
        }
        Op::Write(fh, offset, mut data, size) => {
            data.truncate(1024);
            let body = WriteIn {
                fh: k.fh(fh),
                offset,
                size: size.unwrap_or(data.len() as u32),
                ..WriteIn::default()
            };
            let mut body = body.as_bytes().to_vec();
            body.extend_from_slice(&data);
            (Opcode::WRITE, 0, body)
        }
        Op::Ioctl {
            fh,
            flags,
            cmd,
            arg,
            mut input,
            in_size,
            out_size,
            follow_retry,
        } => {
            input.truncate(1024);
            follow = follow_retry;
            // Mostly what each personality's kernel sends: CUSE unrestricted, FUSE restricted.
            let base = match k.personality {
                Personality::Cuse => ioctl_flags::UNRESTRICTED,
                Personality::Fuse => 0,
            };
            let flags = if flags & 0x80 != 0 {
                u32::from(flags & 0x3f)
            } else {
                base | u32::from(flags & ioctl_flags::COMPAT as u8)
            };
            let body = IoctlIn {
                fh: k.fh(fh),
                flags,
                cmd,
                arg,
                in_size: in_size.unwrap_or(input.len() as u32),
                out_size: u32::from(out_size),
            };
            let mut body = body.as_bytes().to_vec();
            body.extend_from_slice(&input);
            (Opcode::IOCTL, 0, body)
        }
        Op::Poll(fh, kh, notify, events) => {
            if notify {
                k.notify_khs.insert(kh);
            }
            let body = PollIn {
                fh: k.fh(fh),
                kh,
                flags: if notify { FUSE_POLL_SCHEDULE_NOTIFY } else { 0 },
                events,
            };
            (Opcode::POLL, 0, body.as_bytes().to_vec())
        }
        Op::Interrupt(target) => {
            let body = InterruptIn {
                unique: k.target(target),
            };
            (Opcode::INTERRUPT, 0, body.as_bytes().to_vec())
        }
        Op::Flush(fh) => {
            let body = FlushIn {
                fh: k.fh(fh),
                ..FlushIn::default()
            };
            (Opcode::FLUSH, 0, body.as_bytes().to_vec())
        }
        Op::Release(fh, flags) => {
            let fh = k.fh(fh);
            k.open_fhs.retain(|open| *open != fh);
            let body = ReleaseIn {
                fh,
                flags,
                ..ReleaseIn::default()
            };
            (Opcode::RELEASE, 0, body.as_bytes().to_vec())
        }
        Op::Forget(node, nlookup) => (
            Opcode::FORGET,
            k.nodeid(node),
            ForgetIn { nlookup }.as_bytes().to_vec(),
        ),
        Op::BatchForget(mut entries, count) => {
            entries.truncate(16);
            let mut body = BatchForgetIn {
                count: count.unwrap_or(entries.len() as u32),
                dummy: 0,
            }
            .as_bytes()
            .to_vec();
            for (node, nlookup) in entries {
                let one = ForgetOne {
                    nodeid: k.nodeid(node),
                    nlookup,
                };
                body.extend_from_slice(one.as_bytes());
            }
            (Opcode::BATCH_FORGET, 0, body)
        }
        Op::Destroy => (Opcode::DESTROY, 0, Vec::new()),
        Op::Other(opcode, node, mut body) => {
            body.truncate(256);
            (Opcode(opcode), k.nodeid(node), body)
        }
        Op::Raw(mut bytes) => {
            bytes.truncate(2048);
            if bytes.len() >= 16 {
                let unique = k.fresh_unique();
                bytes[8..16].copy_from_slice(&unique.to_ne_bytes());
            }
            k.request(&bytes, false);
            return Ok(());
        }
    };
    let (msg, _) = k.message(opcode, nodeid, &body, &m);
    k.request(&msg, follow);
    Ok(())
}

/// The body of `fuse_engine` and `cuse_engine`.
pub fn run(data: &[u8], personality: Personality, mode: Mode) {
    let mut k = Kernel::start(personality, mode);
    let mut u = Unstructured::new(data);
    let _ = init(&mut k, &mut u);
    while !u.is_empty() && !k.stopped && k.requests < MAX_REQUESTS {
        if op(&mut k, &mut u).is_err() {
            break;
        }
    }
    k.finish();
}
