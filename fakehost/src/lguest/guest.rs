//! One fake Guest: a thread that executes its script, making hypercalls and memory accesses
//! over the bus, and that runs only while the Launcher lets it.
//!
//! In Linux 3.x the Guest runs on the Launcher's own task, inside its `read(2)` of
//! /dev/lguest (drivers/lguest/core.c, `run_guest`): it executes until it makes a hypercall
//! the Host must answer for the Launcher (LHCALL_NOTIFY) or dies, and a halted Guest sleeps
//! inside that same read until an interrupt arrives. cusedev keeps the Host's half (the read,
//! the eventfds, the address checks) and tells us when the Guest may run: RUN. So this thread
//! waits for the first RUN, executes instructions until a `notify` (then waits for the next
//! RUN: the Launcher read again, or an eventfd took the notification and the same read goes
//! on), and waits in `wait-irq`, `halt` and `sleep` while "running", as a halted Guest does.
//!
//! Everything from the bus arrives as an [`Event`] on this Guest's channel, in stream order:
//! RUN, IRQ (the bus reader has already set the pending bit in the [`GuestView`]: counts are
//! exact even while we are busy), DATA answering our READ, DIED, STOP, and the channel going
//! away. Nothing from the bus can make this thread panic: what does not fit where it arrives
//! is logged and dropped, or kills the Guest with a reason that says what happened.
//!
//! A Guest spinning in a `goto` loop with nothing that waits sleeps 1 ms every
//! [`BUSY_STEPS`] instructions, so 64 of them cannot starve the others or the bus.
//! Next: [`super::console`], the virtio console driver.

use std::convert::Infallible;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use vmbus::guest_memory::{self, op, MAX_CHUNK};
use vmbus::lguest::{
    run_cause, Death, FromGuest, Start, PAGE_SIZE, SHUTDOWN_POWEROFF, SHUTDOWN_RESTART,
};
use vmbus::packet::encode_inband;
use zerocopy::IntoBytes;

use super::console::Console;
use super::lock;
use super::report::{GuestState, GuestView, LastRead, Taken, LAST_READ_SHOWN};
use super::script::{hex, show_duration, Expr, Name, Op, Script, Step};
use crate::bus::ChannelLink;

/// Instructions a Guest may execute without waiting before it sleeps for a millisecond.
pub const BUSY_STEPS: u32 = 1024;

/// Where the boot_params the Launcher wrote at gpa 0 keep the e820 entry count (u8).
const E820_ENTRIES: u64 = 0x1e8;
/// Where its e820 table starts: 20-byte entries {addr u64, size u64, type u32}.
const E820_TABLE: u64 = 0x2d0;
/// `E820MAX`: the table's room.
const E820_MAX: u8 = 128;
/// `E820_RAM`.
const E820_RAM: u32 = 1;

/// What reaches a Guest from the bus, in stream order.
#[derive(Debug)]
pub(super) enum Event {
    /// RUN with its cause ([`run_cause`]).
    Run {
        /// Why.
        cause: u32,
    },
    /// An IRQ arrived (its bit is already pending in the view).
    Irq,
    /// DIED: the Guest is dead.
    Died(Death),
    /// STOP: the Launcher's file was closed.
    Stop,
    /// A DATA chunk answering our READ.
    Data {
        /// Its guest-physical address.
        offset: u64,
        /// 0, or the errno that ended the answer.
        status: u32,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// The channel stream ended.
    Detached,
}

/// Why a Guest stopped executing for good.
#[derive(Debug)]
pub(super) enum Stop {
    /// DIED arrived.
    Died(Death),
    /// STOP arrived (the file was closed).
    Closed,
    /// The channel went away, or the service did.
    Detached,
    /// cusedev answered a READ with ENOENT: it knows no such Guest.
    Unknown,
}

/// The reason text status shows for a death.
pub(super) fn death_text(death: &Death) -> String {
    match death {
        Death::Reason(reason) => reason.clone(),
        Death::Restart => "restart requested".to_owned(),
    }
}

/// A Guest's machine: its script position, registers and devices.
pub(super) struct Guest {
    number: u32,
    link: ChannelLink,
    events: Receiver<Event>,
    view: Arc<Mutex<GuestView>>,
    script: Arc<Script>,
    start: Start,
    read_timeout: Duration,
    pc: usize,
    line: u32,
    counters: Vec<u64>,
    pub(super) scratch: u64,
    mem: Option<u64>,
    pub(super) console: Option<Console>,
    busy_steps: u32,
}

impl Guest {
    /// Guest `number` of `link`, to run `script`; its READs wait `read_timeout` for DATA.
    pub(super) fn new(
        number: u32,
        link: ChannelLink,
        events: Receiver<Event>,
        view: Arc<Mutex<GuestView>>,
        script: Arc<Script>,
        start: Start,
        read_timeout: Duration,
    ) -> Guest {
        Guest {
            number,
            link,
            events,
            view,
            counters: vec![0; script.repeat_slots],
            line: script.line_of(0),
            script,
            start,
            read_timeout,
            pc: 0,
            scratch: super::script::DEFAULT_SCRATCH,
            mem: None,
            console: None,
            busy_steps: 0,
        }
    }

    /// The thread's body: runs the script until the Guest stops, then records why.
    pub(super) fn run(mut self) {
        let Err(stop) = self.execute();
        let number = self.number;
        let text = match &stop {
            Stop::Died(death) => {
                let reason = death_text(death);
                self.set_state(GuestState::Dead {
                    reason: reason.clone(),
                });
                format!("dead: {reason}")
            }
            Stop::Closed => "its file was closed".to_owned(),
            Stop::Detached => "the channel went away".to_owned(),
            Stop::Unknown => {
                let reason =
                    format!("cusedev knows no Guest {number} (a read was answered ENOENT)");
                self.set_state(GuestState::Dead {
                    reason: reason.clone(),
                });
                reason
            }
        };
        log::info!("lguest: guest {number}: stopped: {text}");
    }

    fn execute(&mut self) -> Result<Infallible, Stop> {
        self.wait_run()?;
        let script = Arc::clone(&self.script);
        loop {
            self.poll()?;
            let Some(step) = script.program.get(self.pc) else {
                return self.idle();
            };
            self.line = step.line;
            self.set_state(GuestState::Running { line: step.line });
            self.throttle();
            self.pc += 1;
            self.step(step)?;
        }
    }

    /// Past the end of the script: halted for good, until DIED, STOP or the channel ends.
    fn idle(&mut self) -> Result<Infallible, Stop> {
        self.set_state(GuestState::Idle);
        log::info!(
            "lguest: guest {}: end of script {}: idle",
            self.number,
            self.script.name
        );
        loop {
            if let Some(event) = self.recv(None)? {
                self.stray(event);
            }
        }
    }

    fn step(&mut self, step: &Step) -> Result<(), Stop> {
        match &step.op {
            Op::Notify(addr) => {
                let addr = self.eval(addr)?;
                self.notify(addr)?;
            }
            Op::Print(text) => {
                let at = self.scratch;
                let mut bytes = text.clone();
                bytes.push(0);
                self.write(at, &bytes)?;
                self.notify(at)?;
            }
            Op::WaitIrq { irq, timeout } => {
                self.set_state(GuestState::WaitingForIrq {
                    irq: *irq,
                    line: self.line,
                });
                let deadline = timeout.map(|t| Instant::now() + t);
                if self.wait_irq(1 << irq, deadline)?.is_none() {
                    let t = show_duration(timeout.unwrap_or_default());
                    return Err(self.kill(format!(
                        "fake guest: line {}: no interrupt {irq} within {t}",
                        self.line
                    )));
                }
            }
            Op::Halt { timeout } => {
                self.set_state(GuestState::Halted { line: self.line });
                let deadline = timeout.map(|t| Instant::now() + t);
                if self.wait_irq(u32::MAX, deadline)?.is_none() {
                    let t = show_duration(timeout.unwrap_or_default());
                    return Err(self.kill(format!(
                        "fake guest: line {}: no interrupt within {t}",
                        self.line
                    )));
                }
            }
            Op::Sleep(duration) => {
                let deadline = Instant::now() + *duration;
                while let Some(event) = self.recv(Some(deadline))? {
                    self.stray(event);
                }
            }
            Op::Write { addr, values } => {
                let addr = self.eval(addr)?;
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.bytes()).collect();
                self.write(addr, &bytes)?;
            }
            Op::Expect { addr, values } => {
                let addr = self.eval(addr)?;
                let total: usize = values.iter().map(|v| v.len()).sum();
                // The parser caps `expect` at MAX_READ_LEN bytes: it fits the u32.
                let got = self.read(addr, total as u32)?;
                let mut at = 0;
                for value in values {
                    let (want, have) = (value.bytes(), &got[at..at + value.len()]);
                    if want != have {
                        return Err(self.kill(format!(
                            "fake guest: line {}: expect at {:#x}: wanted {value} got {}",
                            self.line,
                            addr.wrapping_add(at as u64),
                            value.show_like(have)
                        )));
                    }
                    at += value.len();
                }
            }
            Op::Read { addr, len } => {
                let addr = self.eval(addr)?;
                let got = self.read(addr, *len)?;
                let shown = hex(&got[..got.len().min(LAST_READ_SHOWN)]);
                log::info!(
                    "lguest: guest {}: line {}: read {len} bytes at {addr:#x}: {shown}{}",
                    self.number,
                    self.line,
                    if got.len() > LAST_READ_SHOWN {
                        "..."
                    } else {
                        ""
                    }
                );
                lock(&self.view).last_read = Some(LastRead {
                    addr,
                    len: *len,
                    hex: shown,
                });
            }
            Op::Console(text) => super::console::write(self, text)?,
            Op::Crash(message) => {
                let at = self.scratch;
                let mut bytes = message.clone();
                bytes.push(0);
                self.write(at, &bytes)?;
                let shown = String::from_utf8_lossy(message).into_owned();
                return Err(self.shutdown(SHUTDOWN_POWEROFF, format!("CRASH: {shown}")));
            }
            Op::Restart => {
                return Err(self.shutdown(SHUTDOWN_RESTART, "restart requested".to_owned()))
            }
            Op::Kill(reason) => return Err(self.kill(reason.clone())),
            Op::Goto(target) => self.pc = *target,
            Op::RepeatStart { slot, count, end } => {
                self.counters[*slot] = *count;
                if *count == 0 {
                    self.pc = *end;
                }
            }
            Op::RepeatEnd { slot, body } => {
                let left = &mut self.counters[*slot];
                if *left > 1 {
                    *left -= 1;
                    self.pc = *body;
                } else {
                    *left = 0;
                }
            }
            Op::Scratch(addr) => self.scratch = self.eval(addr)?,
        }
        Ok(())
    }

    /// The script line being executed.
    pub(super) fn line(&self) -> u32 {
        self.line
    }

    pub(super) fn set_state(&self, state: GuestState) {
        lock(&self.view).state = state;
    }

    /// An address expression's value.
    fn eval(&mut self, expr: &Expr) -> Result<u64, Stop> {
        expr.eval(|name| match name {
            Name::Mem => self.mem(),
            Name::Limit => Ok(self.start.pfn_limit.saturating_mul(PAGE_SIZE)),
            Name::Start => Ok(self.start.start),
            Name::Scratch => Ok(self.scratch),
        })
    }

    /// The end of RAM: the end of the highest RAM entry of the e820 map in the boot_params
    /// the Launcher put at gpa 0 (what the Guest kernel's max_pfn comes from; the device
    /// page is right after it). Read once.
    pub(super) fn mem(&mut self) -> Result<u64, Stop> {
        if let Some(mem) = self.mem {
            return Ok(mem);
        }
        let count = self.read(E820_ENTRIES, 1)?[0].min(E820_MAX);
        let table = if count == 0 {
            Vec::new()
        } else {
            self.read(E820_TABLE, u32::from(count) * 20)?
        };
        let end = table
            .chunks_exact(20)
            .filter(|e| u32::from_le_bytes([e[16], e[17], e[18], e[19]]) == E820_RAM)
            .map(|e| {
                let addr = u64::from_le_bytes(e[0..8].try_into().unwrap_or_default());
                let size = u64::from_le_bytes(e[8..16].try_into().unwrap_or_default());
                addr.saturating_add(size)
            })
            .max();
        match end {
            Some(mem) => {
                self.mem = Some(mem);
                Ok(mem)
            }
            None => Err(self.kill("fake guest: no RAM in the e820 map at gpa 0".to_owned())),
        }
    }

    /// Sleeps a little every [`BUSY_STEPS`] instructions that did not wait.
    fn throttle(&mut self) {
        self.busy_steps += 1;
        if self.busy_steps >= BUSY_STEPS {
            self.busy_steps = 0;
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The next event, waiting until `deadline` (None: forever); Ok(None) at the deadline.
    /// DIED, STOP and the end of the channel are the `Err`.
    fn recv(&mut self, deadline: Option<Instant>) -> Result<Option<Event>, Stop> {
        self.busy_steps = 0;
        let event = match deadline {
            None => self.events.recv().map_err(|_| Stop::Detached)?,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.events.recv_timeout(left) {
                    Ok(event) => event,
                    Err(RecvTimeoutError::Timeout) => return Ok(None),
                    Err(RecvTimeoutError::Disconnected) => return Err(Stop::Detached),
                }
            }
        };
        match event {
            Event::Died(death) => Err(Stop::Died(death)),
            Event::Stop => Err(Stop::Closed),
            Event::Detached => Err(Stop::Detached),
            event => Ok(Some(event)),
        }
    }

    /// Takes what has arrived without waiting (between instructions).
    fn poll(&mut self) -> Result<(), Stop> {
        loop {
            match self.events.try_recv() {
                Ok(Event::Died(death)) => return Err(Stop::Died(death)),
                Ok(Event::Stop) => return Err(Stop::Closed),
                Ok(Event::Detached) | Err(TryRecvError::Disconnected) => {
                    return Err(Stop::Detached)
                }
                Ok(event) => self.stray(event),
                Err(TryRecvError::Empty) => return Ok(()),
            }
        }
    }

    /// An event nobody waits for right now.
    fn stray(&mut self, event: Event) {
        match event {
            // Its bit is pending; whoever waits for it will see it.
            Event::Irq => {}
            Event::Run { cause } => {
                lock(&self.view).runs += 1;
                log::debug!(
                    "lguest: guest {}: RUN (cause {cause}) while running line {}; the Guest \
                     was not stopped at a notify, nothing to resume",
                    self.number,
                    self.line
                );
            }
            Event::Data { offset, bytes, .. } => log::warn!(
                "lguest: guest {}: DATA at {offset:#x} ({} bytes) but no read is outstanding; \
                 dropped",
                self.number,
                bytes.len()
            ),
            // recv and poll keep these.
            Event::Died(_) | Event::Stop | Event::Detached => {}
        }
    }

    /// Waits for a RUN; its cause.
    fn wait_run(&mut self) -> Result<u32, Stop> {
        loop {
            match self.recv(None)? {
                Some(Event::Run { cause }) => {
                    lock(&self.view).runs += 1;
                    return Ok(cause);
                }
                Some(event) => self.stray(event),
                None => {}
            }
        }
    }

    /// Takes the lowest pending interrupt in `mask`.
    pub(super) fn take_pending(&self, mask: u32) -> Option<u32> {
        let mut view = lock(&self.view);
        let hits = view.pending & mask;
        if hits == 0 {
            return None;
        }
        let irq = hits.trailing_zeros();
        view.pending &= !(1 << irq);
        Some(irq)
    }

    /// Waits until an interrupt in `mask` is pending, then takes it; None at the deadline.
    pub(super) fn wait_irq(
        &mut self,
        mask: u32,
        deadline: Option<Instant>,
    ) -> Result<Option<u32>, Stop> {
        loop {
            if let Some(irq) = self.take_pending(mask) {
                return Ok(Some(irq));
            }
            match self.recv(deadline)? {
                None => return Ok(self.take_pending(mask)),
                Some(Event::Irq) => {}
                Some(event) => self.stray(event),
            }
        }
    }

    fn send(&self, message: &FromGuest) -> Result<(), Stop> {
        let packet = encode_inband(0, 0, &message.encode(self.number));
        self.link.send_packet(&packet).map_err(|e| {
            log::info!("lguest: guest {}: cannot send ({e})", self.number);
            Stop::Detached
        })
    }

    /// LHCALL_NOTIFY(addr), then stopped until the next RUN: how it was taken.
    pub(super) fn notify(&mut self, addr: u64) -> Result<Taken, Stop> {
        // Recorded first: whoever sees the notification's effect sees it in status.
        {
            let mut view = lock(&self.view);
            view.notifies.notified(addr);
            view.state = GuestState::StoppedAtNotify {
                addr,
                line: self.line,
            };
        }
        self.send(&FromGuest::Notify { addr })?;
        let cause = self.wait_run()?;
        if cause != run_cause::READ && cause != run_cause::EVENTFD {
            log::warn!(
                "lguest: guest {}: RUN with unknown cause {cause}; counted as a read",
                self.number
            );
        }
        let taken = Taken::from_cause(cause);
        let mut view = lock(&self.view);
        view.notifies.taken(taken);
        view.state = GuestState::Running { line: self.line };
        Ok(taken)
    }

    /// Asks the host to kill the Guest with `reason`; waits for the death (the `Stop` to
    /// return).
    pub(super) fn kill(&mut self, reason: String) -> Stop {
        log::info!("lguest: guest {}: kill: {reason}", self.number);
        // Dead from here on, whatever the host answers (its DIED may say more).
        self.set_state(GuestState::Dead {
            reason: reason.clone(),
        });
        if let Err(stop) = self.send(&FromGuest::Kill { reason }) {
            return stop;
        }
        self.await_death()
    }

    /// LHCALL_SHUTDOWN(scratch, how); `expected` is the death status shows until DIED says.
    fn shutdown(&mut self, how: u32, expected: String) -> Stop {
        let message = self.scratch;
        self.set_state(GuestState::Dead { reason: expected });
        if let Err(stop) = self.send(&FromGuest::Shutdown { message, how }) {
            return stop;
        }
        self.await_death()
    }

    /// Dead on our side: nothing more runs; waits for DIED (or STOP, or the end).
    fn await_death(&mut self) -> Stop {
        loop {
            match self.recv(None) {
                Err(stop) => return stop,
                Ok(Some(event)) => self.stray(event),
                Ok(None) => {}
            }
        }
    }

    /// Reads `len` bytes at gpa `addr`: one READ, then its DATA chunks in order.
    pub(super) fn read(&mut self, addr: u64, len: u32) -> Result<Vec<u8>, Stop> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let header = guest_memory::header(op::READ, 0, u64::from(self.number), addr, len);
        self.link.send_memory(header.as_bytes()).map_err(|e| {
            log::info!("lguest: guest {}: cannot send a READ ({e})", self.number);
            Stop::Detached
        })?;
        let deadline = Instant::now() + self.read_timeout;
        let mut buf = Vec::with_capacity(len as usize);
        let mut next = addr;
        let line = self.line;
        let what = format!("a read of {len} bytes at {addr:#x}");
        loop {
            let Some(event) = self.recv(Some(deadline))? else {
                let t = show_duration(self.read_timeout);
                return Err(self.kill(format!(
                    "fake guest: line {line}: no answer to {what} within {t}"
                )));
            };
            let Event::Data {
                offset,
                status,
                bytes,
            } = event
            else {
                self.stray(event);
                continue;
            };
            let left = len as usize - buf.len();
            if status == Errno::EFAULT as u32 {
                // The host's address check refused it and killed the Guest; DIED follows
                // with the host's reason ("bad read address ...").
                log::info!(
                    "lguest: guest {}: line {line}: the host refused {what} (EFAULT)",
                    self.number
                );
                self.set_state(GuestState::Dead {
                    reason: format!("the host refused {what}"),
                });
                return Err(self.await_death());
            }
            if status == Errno::ENOENT as u32 {
                return Err(Stop::Unknown);
            }
            let problem = if status != 0 {
                Some(format!(
                    "the host answered {what} with errno {status} ({})",
                    i32::try_from(status).map_or("unknown", |e| Errno::from_raw(e).desc())
                ))
            } else if offset != next {
                Some(format!(
                    "the host answered {what} with bytes at {offset:#x} where {next:#x} was next"
                ))
            } else if bytes.len() > left {
                Some(format!(
                    "the host answered {what} with {} bytes at {offset:#x} where {left} were left",
                    bytes.len()
                ))
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(self.kill(format!("fake guest: line {line}: {problem}")));
            }
            buf.extend_from_slice(&bytes);
            next = next.wrapping_add(bytes.len() as u64);
            if buf.len() == len as usize {
                return Ok(buf);
            }
        }
    }

    /// Writes `bytes` at gpa `addr`: WRITE frames of at most [`MAX_CHUNK`] bytes (no
    /// answer; stream order puts them before whatever we send next).
    pub(super) fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), Stop> {
        for (i, chunk) in bytes.chunks(MAX_CHUNK).enumerate() {
            let at = addr.wrapping_add((i * MAX_CHUNK) as u64);
            // A chunk is at most MAX_CHUNK (64 KiB) bytes: it fits the u32.
            let header =
                guest_memory::header(op::WRITE, 0, u64::from(self.number), at, chunk.len() as u32);
            self.link
                .send_memory_parts(header.as_bytes(), chunk)
                .map_err(|e| {
                    log::info!("lguest: guest {}: cannot send a WRITE ({e})", self.number);
                    Stop::Detached
                })?;
        }
        Ok(())
    }
}
