//! The device behind the engine targets: every operation the engine can route, answering at
//! once or parking its reply depending on fields the fuzzer chooses, and a log of what it did
//! so the harness knows which requests sleep and which sleeping ones a call woke.
//!
//! What decides (so that one input always behaves the same):
//! - READ, by `offset % 4`: 0 answers at once (sometimes more than asked, which the engine
//!   must cut), 1 parks interruptibly, 2 parks uninterruptibly, 3 fails with EAGAIN;
//! - WRITE, by `offset % 4`: 0 wakes every sleeper and every poll registration, then answers
//!   the byte count; 1 and 2 park as READ does; 3 fails with ENOSPC;
//! - IOCTL, by `cmd % 8`: 0 echoes the input with `arg` as the result, 1 asks for caller
//!   buffers (FUSE_IOCTL_RETRY) when it got no input and answers once it has some, 2 and 3
//!   park, 4 is ENOTTY, 5 answers more than `out_size`, 6 drops the reply unanswered (the
//!   engine answers EIO for it), 7 is ENOTTY for compat callers and 0 otherwise;
//! - OPEN fails with EINVAL for O_ACCMODE 3 and never with EBUSY (an EBUSY after a FLUSH makes
//!   the engine wait up to a second for a RELEASE, and a stepped session has nobody to send
//!   it); POLL keeps the waker it is given and reports POLLIN while a read sleeps.

use std::sync::{Arc, Mutex, MutexGuard};

use cusedev::device::{
    poll_bits, Caller, Device, Errno, Handle, IoctlAnswer, IoctlCall, IoctlOutcome, IoctlReply,
    Parked, Pending, PollWaker, ReadReply, UserBuffer, WriteReply,
};

/// Most bytes one READ answer carries: replies are drained after each request, and a burst of
/// them must stay below the socket's send buffer.
pub const MAX_READ_ANSWER: usize = 512;

/// What the device did, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The current request's reply was parked as sleeper `seq`.
    Parked { seq: u64, interruptible: bool },
    /// Sleeper `seq` was answered.
    Woke { seq: u64 },
    /// This many poll registrations were woken (each one FUSE_NOTIFY_POLL).
    Notified(usize),
}

enum Sleeper {
    Read(u32, Parked<Vec<u8>>),
    Write(u32, Parked<u32>),
    Ioctl(Parked<IoctlOutcome>),
}

#[derive(Default)]
struct State {
    next_handle: Handle,
    next_seq: u64,
    sleepers: Vec<(u64, Sleeper)>,
    wakers: Vec<PollWaker>,
    log: Vec<Event>,
}

/// The fuzz targets' device.
#[derive(Default)]
pub struct Toy {
    state: Mutex<State>,
}

impl Toy {
    pub fn new() -> Arc<Toy> {
        Arc::new(Toy::default())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What happened since the last call.
    pub fn take_log(&self) -> Vec<Event> {
        std::mem::take(&mut self.lock().log)
    }

    fn park(&self, interruptible: bool, make: impl FnOnce(bool) -> Option<Sleeper>) {
        let mut state = self.lock();
        let seq = state.next_seq;
        if let Some(sleeper) = make(interruptible) {
            state.next_seq += 1;
            state.sleepers.push((seq, sleeper));
            state.log.push(Event::Parked { seq, interruptible });
        }
    }

    /// Answers every sleeper still waiting (reads get a prefix of `data`) and every poller.
    fn wake_all(&self, data: &[u8]) {
        let (sleepers, wakers) = {
            let mut state = self.lock();
            (
                std::mem::take(&mut state.sleepers),
                std::mem::take(&mut state.wakers),
            )
        };
        let mut woke = Vec::new();
        for (seq, sleeper) in sleepers {
            let answered = match sleeper {
                Sleeper::Read(count, parked) => parked.claim().map(|reply| {
                    reply.ok(data[..data.len().min(count as usize)].to_vec());
                }),
                Sleeper::Write(count, parked) => parked.claim().map(|reply| reply.ok(count)),
                Sleeper::Ioctl(parked) => parked.claim().map(|reply| {
                    reply.ok(IoctlOutcome::Done(IoctlReply {
                        result: data.len() as i32,
                        out: Vec::new(),
                    }))
                }),
            };
            if answered.is_some() {
                woke.push(Event::Woke { seq });
            }
        }
        let notified = wakers.len();
        for waker in wakers {
            waker.wake();
        }
        let mut state = self.lock();
        state.log.extend(woke);
        if notified > 0 {
            state.log.push(Event::Notified(notified));
        }
    }
}

/// A parked reply: one an INTERRUPT can answer, or one it cannot.
fn park<T: Send + 'static>(reply: Pending<T>, interruptible: bool) -> Option<Parked<T>> {
    if interruptible {
        reply.park_interruptible()
    } else {
        Some(reply.park())
    }
}

/// `n` buffers of `len` bytes from `base` on, one after the other (wrapping, so that the
/// engine's overflow check gets its chance).
fn buffers(n: u32, base: u64, len: u64) -> Vec<UserBuffer> {
    (0..u64::from(n))
        .map(|i| UserBuffer {
            addr: base.wrapping_add(i.wrapping_mul(len)),
            len,
        })
        .collect()
}

impl Device for Toy {
    fn name(&self) -> &str {
        "fuzz/toy"
    }

    fn open(&self, _caller: &Caller, flags: i32) -> Result<Handle, Errno> {
        if flags & libc::O_ACCMODE == 3 {
            return Err(Errno::EINVAL);
        }
        let mut state = self.lock();
        state.next_handle += 1;
        Ok(state.next_handle)
    }

    fn read(&self, _handle: Handle, count: u32, offset: u64, _caller: &Caller, reply: ReadReply) {
        match offset % 4 {
            0 => {
                let extra = (offset >> 2) as usize % 16;
                let n = (count as usize + extra).min(MAX_READ_ANSWER);
                reply.ok(vec![0x5a; n]);
            }
            1 | 2 => self.park(offset % 4 == 1, |interruptible| {
                Some(Sleeper::Read(count, park(reply, interruptible)?))
            }),
            _ => reply.err(Errno::EAGAIN),
        }
    }

    fn write(
        &self,
        _handle: Handle,
        data: &[u8],
        offset: u64,
        _caller: &Caller,
        reply: WriteReply,
    ) {
        let count = data.len() as u32;
        match offset % 4 {
            0 => {
                self.wake_all(&data[..data.len().min(MAX_READ_ANSWER)]);
                reply.ok(count);
            }
            1 | 2 => self.park(offset % 4 == 1, |interruptible| {
                Some(Sleeper::Write(count, park(reply, interruptible)?))
            }),
            _ => reply.err(Errno::ENOSPC),
        }
    }

    fn ioctl(&self, _handle: Handle, call: &IoctlCall<'_>, _caller: &Caller, reply: IoctlAnswer) {
        let done = |result: i32, out: Vec<u8>| IoctlOutcome::Done(IoctlReply { result, out });
        match call.cmd % 8 {
            0 => reply.ok(done(call.arg as i32, call.input.to_vec())),
            1 if call.input.is_empty() => reply.ok(IoctlOutcome::Retry {
                input: buffers((call.cmd >> 3) % 8, call.arg, u64::from(call.cmd >> 24)),
                output: buffers((call.cmd >> 6) % 8, call.arg, u64::from(call.cmd >> 24)),
            }),
            1 => reply.ok(done(0, call.input.iter().rev().copied().collect())),
            2 | 3 => self.park(call.cmd % 8 == 2, |interruptible| {
                Some(Sleeper::Ioctl(park(reply, interruptible)?))
            }),
            4 => reply.err(Errno::ENOTTY),
            5 => reply.ok(done(1, vec![0xa5; call.out_size as usize % 4096 + 9])),
            6 => drop(reply),
            _ if call.compat => reply.err(Errno::ENOTTY),
            _ => reply.ok(done(0, Vec::new())),
        }
    }

    fn poll(&self, _handle: Handle, waker: Option<PollWaker>) -> u32 {
        let mut state = self.lock();
        if let Some(waker) = waker {
            state.wakers.push(waker);
        }
        let reading = state
            .sleepers
            .iter()
            .any(|(_, s)| matches!(s, Sleeper::Read(_, p) if p.is_waiting()));
        poll_bits::POLLOUT | if reading { poll_bits::POLLIN } else { 0 }
    }
}
