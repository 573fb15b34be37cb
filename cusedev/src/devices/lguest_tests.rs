//! The lguest model called directly, with this test process as the Launcher (its memory is
//! the Guest's) and a recording channel as the fake Guest. The same paths through real
//! syscalls are in tests/tests/lguest.rs.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use std::os::fd::FromRawFd;

use nix::unistd::gettid;
use vmbus::guest_memory::{self, MemoryMessage};
use vmbus::lguest::{Death, FromGuest, ToGuest};
use vmbus::packet::{encode_inband, parse_packet};
use zerocopy::IntoBytes;

use super::*;
use crate::bus::channel::{InboundPacket, InboundRing, RecvError};
use crate::reply::testing::{answered_now, Answers};

/// What the model sent: a lguest message or a memory frame.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sent {
    Message(u32, ToGuest),
    Data {
        status: u32,
        offset: u64,
        bytes: Vec<u8>,
    },
}

struct FakeGuest {
    ring: InboundRing,
    sent: Mutex<Vec<Sent>>,
    changed: Condvar,
}

impl FakeGuest {
    fn new() -> Arc<FakeGuest> {
        Arc::new(FakeGuest {
            ring: InboundRing::new(1 << 20),
            sent: Mutex::new(Vec::new()),
            changed: Condvar::new(),
        })
    }

    fn push(&self, guest: u32, message: FromGuest) {
        let bytes = encode_inband(0, 0, &message.encode(guest));
        let packet = parse_packet(&bytes).unwrap();
        assert!(self.ring.push(InboundPacket {
            trans_id: 0,
            payload: packet.payload.to_vec(),
        }));
    }

    /// A payload as the ring would hold it, whatever it is.
    fn push_raw(&self, payload: Vec<u8>) {
        assert!(self.ring.push(InboundPacket {
            trans_id: 0,
            payload
        }));
    }

    fn wait_sent(&self, count: usize) -> Vec<Sent> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut sent = self.sent.lock().unwrap();
        while sent.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "waited for {count} messages: {sent:?}");
            sent = self.changed.wait_timeout(sent, left).unwrap().0;
        }
        sent.clone()
    }

    fn record(&self, sent: Sent) {
        self.sent.lock().unwrap().push(sent);
        self.changed.notify_all();
    }
}

impl HostChannel for FakeGuest {
    fn recv(&self, buf_limit: usize) -> Result<Option<InboundPacket>, RecvError> {
        self.ring.recv(buf_limit)
    }

    fn send_inband(&self, _trans_id: u64, payload: &[u8]) {
        let (guest, message) = ToGuest::parse(payload).expect("the model sends what parses");
        self.record(Sent::Message(guest, message));
    }

    fn send_memory(&self, body: &[u8]) -> std::io::Result<()> {
        match MemoryMessage::parse(body).expect("the model sends what parses") {
            MemoryMessage::Data {
                status,
                offset,
                bytes,
                ..
            } => self.record(Sent::Data {
                status,
                offset,
                bytes: bytes.to_vec(),
            }),
            other => panic!("the model sent {other:?}"),
        }
        Ok(())
    }
}

fn launcher() -> Caller {
    Caller::detached(gettid().as_raw() as u32)
}

fn words(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn write(dev: &Lguest, h: Handle, values: &[u64], offset: u64) -> Result<u32, Errno> {
    let caller = launcher();
    let (now, _) = answered_now(&caller.interrupt, |reply| {
        dev.write(h, &words(values), offset, &caller, reply)
    });
    now.expect("writes answer at once")
}

/// A read's answer if it came at once, and where it comes later.
type ReadNow = (Option<Result<Vec<u8>, Errno>>, Answers<Vec<u8>>);

fn read(dev: &Lguest, h: Handle, count: u32, caller: &Caller) -> ReadNow {
    answered_now(&caller.interrupt, |reply| {
        dev.read(h, count, 0, caller, reply)
    })
}

/// A model with one initialized Guest over `memory` (64 KiB of this process, 16 pages).
fn initialized(memory: &[u8]) -> (Arc<FakeGuest>, Lguest, Handle) {
    let channel = FakeGuest::new();
    let dev = Lguest::new(channel.clone(), None);
    let h = dev.open(&launcher(), libc::O_RDWR).unwrap();
    let base = memory.as_ptr() as u64;
    assert_eq!(
        write(&dev, h, &[lhreq::INITIALIZE, base, 16, 0x1000], 0),
        Ok(24)
    );
    (channel, dev, h)
}

#[test]
fn requests_before_initialize_are_einval_and_a_second_initialize_ebusy() {
    let channel = FakeGuest::new();
    let dev = Lguest::new(channel.clone(), None);
    let h = dev.open(&launcher(), libc::O_RDWR).unwrap();
    for req in [lhreq::IRQ, lhreq::EVENTFD, lhreq::GETDMA, lhreq::BREAK, 5] {
        assert_eq!(
            write(&dev, h, &[req, 1, 1], 0),
            Err(Errno::EINVAL),
            "req {req}"
        );
    }
    assert_eq!(read(&dev, h, 8, &launcher()).0, Some(Err(Errno::EINVAL)));
    let memory = vec![0u8; 16 * 4096];
    assert_eq!(
        write(
            &dev,
            h,
            &[lhreq::INITIALIZE, memory.as_ptr() as u64, 16, 7],
            3
        ),
        Ok(24),
        "INITIALIZE checks no cpu"
    );
    assert_eq!(
        write(&dev, h, &[lhreq::INITIALIZE, 0, 0, 0], 0),
        Err(Errno::EBUSY)
    );
    assert_eq!(write(&dev, h, &[lhreq::IRQ, 32], 0), Err(Errno::EINVAL));
    assert_eq!(write(&dev, h, &[lhreq::IRQ, 31], 0), Ok(0));
    assert_eq!(
        write(&dev, h, &[lhreq::EVENTFD, 0, 0], 0),
        Err(Errno::EINVAL)
    );
    let sent = channel.wait_sent(2);
    assert!(matches!(
        sent[0],
        Sent::Message(
            1,
            ToGuest::Start(Start {
                word: 8,
                pfn_limit: 16,
                start: 7,
                ..
            })
        )
    ));
    assert_eq!(sent[1], Sent::Message(1, ToGuest::Irq { irq: 31 }));
}

#[test]
fn a_read_runs_the_guest_until_it_notifies_and_only_for_the_owner_thread() {
    let memory = vec![0u8; 16 * 4096];
    let (channel, dev, h) = initialized(&memory);
    let other = std::thread::scope(|s| s.spawn(|| read(&dev, h, 8, &launcher()).0).join().unwrap());
    assert_eq!(other, Some(Err(Errno::EPERM)));
    let me = launcher();
    let (now, answer) = read(&dev, h, 8, &me);
    assert_eq!(now, None, "the read waits for the Guest");
    assert_eq!(
        channel.wait_sent(2)[1],
        Sent::Message(
            1,
            ToGuest::Run {
                cause: run_cause::READ
            }
        )
    );
    channel.push(1, FromGuest::Notify { addr: 0x1234 });
    dev.on_channel_callback();
    assert_eq!(answer.recv().unwrap(), Ok(0x1234u64.to_le_bytes().to_vec()));
}

#[test]
fn guest_memory_is_bounds_checked_as_lgread_and_a_bad_read_kills_with_the_reason() {
    let mut memory = vec![0u8; 16 * 4096];
    memory[0x100..0x104].copy_from_slice(b"abcd");
    let (channel, dev, h) = initialized(&memory);
    let me = launcher();
    let (_, answer) = read(&dev, h, 8, &me);
    dev.on_memory(MemoryMessage::Read {
        trans_id: 1,
        offset: 0x100,
        len: 4,
    });
    let header = guest_memory::header(guest_memory::op::WRITE, 0, 1, 0x200, 2);
    let mut frame = header.as_bytes().to_vec();
    frame.extend_from_slice(b"zz");
    dev.on_memory(MemoryMessage::parse(&frame).unwrap());
    assert_eq!(&memory[0x200..0x202], b"zz");
    // 16 pages: the 3.x check refuses an access that ends at the limit.
    dev.on_memory(MemoryMessage::Read {
        trans_id: 1,
        offset: 15 * 4096,
        len: 4096,
    });
    assert_eq!(answer.recv().unwrap(), Err(Errno::ENOENT));
    let sent = channel.wait_sent(5);
    assert_eq!(
        sent[2],
        Sent::Data {
            status: 0,
            offset: 0x100,
            bytes: b"abcd".to_vec()
        }
    );
    assert_eq!(
        sent[3],
        Sent::Message(
            1,
            ToGuest::Died(Death::Reason("bad read address 0xf000 len 4096".into()))
        )
    );
    assert!(matches!(sent[4], Sent::Data { status, .. } if status == Errno::EFAULT as u32));
    let (now, _) = read(&dev, h, 1023, &me);
    assert_eq!(
        now,
        Some(Ok(b"bad read address 0xf000 len 4096\0".to_vec()))
    );
    let (now, _) = read(&dev, h, 4, &me);
    assert_eq!(now, Some(Ok(b"bad ".to_vec())));
    assert_eq!(write(&dev, h, &[lhreq::IRQ, 1], 0), Err(Errno::ENOENT));
    assert_eq!(
        write(&dev, h, &[lhreq::INITIALIZE, 0, 0, 0], 0),
        Err(Errno::EBUSY)
    );
}

#[test]
fn shutdown_reads_the_message_and_a_restart_replaces_the_reason() {
    let mut memory = vec![0u8; 16 * 4096];
    memory[0x300..0x30b].copy_from_slice(b"Power down\0");
    let (channel, dev, h) = initialized(&memory);
    let me = launcher();
    let (_, answer) = read(&dev, h, 8, &me);
    channel.push(
        1,
        FromGuest::Shutdown {
            message: 0x300,
            how: vmbus::lguest::SHUTDOWN_POWEROFF,
        },
    );
    dev.on_channel_callback();
    assert_eq!(answer.recv().unwrap(), Err(Errno::ENOENT));
    assert_eq!(
        read(&dev, h, 1023, &me).0,
        Some(Ok(b"CRASH: Power down\0".to_vec()))
    );

    // A restart whose message is out of bounds still restarts.
    let (channel, dev, h) = initialized(&memory);
    let (_, answer) = read(&dev, h, 8, &me);
    channel.push(
        1,
        FromGuest::Shutdown {
            message: 1 << 40,
            how: SHUTDOWN_RESTART,
        },
    );
    dev.on_channel_callback();
    assert_eq!(answer.recv().unwrap(), Err(ERESTART));
    assert_eq!(read(&dev, h, 1023, &me).0, Some(Err(ERESTART)));
}

#[test]
fn a_death_while_no_read_runs_the_guest_is_what_the_next_read_reports() {
    let memory = vec![0u8; 16 * 4096];
    let (channel, dev, h) = initialized(&memory);
    channel.push(
        1,
        FromGuest::Kill {
            reason: "fake guest: expect failed".into(),
        },
    );
    channel.push(
        1,
        FromGuest::Kill {
            reason: "second".into(),
        },
    );
    dev.on_channel_callback();
    let me = launcher();
    assert_eq!(read(&dev, h, 8, &me).0, Some(Err(Errno::ENOENT)));
    assert_eq!(
        read(&dev, h, 100, &me).0,
        Some(Ok(b"fake guest: expect failed\0".to_vec())),
        "the first reason wins"
    );
}

#[test]
fn eventfds_take_their_notifications_and_the_read_goes_on() {
    let memory = vec![0u8; 16 * 4096];
    let (channel, dev, h) = initialized(&memory);
    // SAFETY: eventfd(2) takes two integers; a success is a new descriptor we own.
    let efd = unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC)) };
    let (pipe_r, _pipe_w) = nix::unistd::pipe().unwrap();
    let fd = efd.as_raw_fd() as u64;
    assert_eq!(write(&dev, h, &[lhreq::EVENTFD, 0x5000, fd], 0), Ok(0));
    assert_eq!(
        write(
            &dev,
            h,
            &[lhreq::EVENTFD, 0x6000, pipe_r.as_raw_fd() as u64],
            0
        ),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        write(&dev, h, &[lhreq::EVENTFD, 0x6000, 100_000], 0),
        Err(Errno::EBADF)
    );
    assert_eq!(
        write(&dev, h, &[lhreq::EVENTFD, 0x6000, u64::MAX], 0),
        Err(Errno::EBADF)
    );
    let me = launcher();
    let (_, answer) = read(&dev, h, 8, &me);
    channel.push(1, FromGuest::Notify { addr: 0x5000 });
    channel.push(1, FromGuest::Notify { addr: 0x5000 });
    dev.on_channel_callback();
    let mut count = [0u8; 8];
    assert_eq!(nix::unistd::read(efd.as_raw_fd(), &mut count), Ok(8));
    assert_eq!(u64::from_ne_bytes(count), 2);
    assert!(answer.try_recv().is_err(), "the read goes on");
    let sent = channel.wait_sent(4);
    assert_eq!(
        sent[2],
        Sent::Message(
            1,
            ToGuest::Run {
                cause: run_cause::EVENTFD
            }
        )
    );
    dev.release(h);
    assert_eq!(
        answer.recv().unwrap(),
        Err(Errno::EIO),
        "a read cannot outlive its file"
    );
    assert_eq!(channel.wait_sent(5)[4], Sent::Message(1, ToGuest::Stop));
}

#[test]
fn malformed_and_misdirected_guest_messages_are_dropped_and_the_guest_keeps_running() {
    let memory = vec![0u8; 16 * 4096];
    let (channel, dev, h) = initialized(&memory);
    let me = launcher();
    let (_, answer) = read(&dev, h, 8, &me);
    // Too short, an unknown op, a guest that does not exist, DATA (only this side sends it),
    // memory for a guest number that does not fit.
    channel.push_raw(vec![1, 2, 3]);
    channel.push_raw([99u32.to_le_bytes(), 1u32.to_le_bytes()].concat());
    channel.push(7, FromGuest::Notify { addr: 0x1000 });
    dev.on_channel_callback();
    let data = guest_memory::header(guest_memory::op::DATA, 0, 1, 0, 0);
    dev.on_memory(MemoryMessage::parse(data.as_bytes()).unwrap());
    dev.on_memory(MemoryMessage::Read {
        trans_id: 1 << 40,
        offset: 0,
        len: 4,
    });
    assert!(answer.try_recv().is_err(), "nothing reached the read");
    channel.push(1, FromGuest::Notify { addr: 0x2000 });
    dev.on_channel_callback();
    assert_eq!(answer.recv().unwrap(), Ok(0x2000u64.to_le_bytes().to_vec()));
}
