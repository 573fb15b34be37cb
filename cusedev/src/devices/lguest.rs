//! `/dev/lguest`: the launcher interface of lguest before Linux 4.1 (drivers/lguest/lguest_user.c
//! of 3.x; facts and their sources: ../shared/spec/lguest.md §3).
//!
//! In Linux 3.x the Guest ran inside the host kernel, and `/dev/lguest` was how the Launcher
//! drove it: one `write` to INITIALIZE (where its memory is, how far it reaches, where it
//! starts), writes to raise interrupts and to attach eventfds, and a `read` that *runs the
//! Guest* until it has something for the Launcher (a notification, or its death). Here the
//! roles are mirrored: this model keeps what the host kernel kept (the registration, the
//! death reason, the eventfd table, the bounds of Guest memory, the blocked `read`), and
//! fakehost plays the Guest over the bus, one channel for every Guest (vmbus::lguest).
//!
//! Guest memory is the Launcher's own memory from `base` up, as it was for the kernel: the
//! fake Guest's loads and stores arrive as guest memory frames and are done here with
//! [`Caller`] memory access on the initializing task's address space, each checked as the
//! kernel's `lgread`/`lgwrite` checked them. An access outside kills the Guest with the
//! kernel's reason.
//!
//! What the bus changes, and how it is kept invisible:
//! - The Guest runs only while the Launcher is in `read` (RUN starts it, a NOTIFY stops it).
//!   A read interrupted by a signal cannot stop the Guest at once; whatever the Guest does
//!   next (a notification, its death) is kept and is what the next read finds, as if the
//!   Guest had done it at the start of that read.
//! - The kernel ignores `write`'s count and fetches the words from the user pointer. A FUSE
//!   request carries `count` bytes and no pointer, so a write shorter than its request's words
//!   takes the pointer from the caller's blocked syscall (`/proc/<tid>/syscall`) and reads the
//!   words there, as the kernel would (docs/decisions.md #40 for what cannot match).
//! - W, the kernel's `unsigned long`, is the Launcher's: 4 for the upstream i386 Launcher, 8 for
//!   a 64-bit one, from the ELF class of the process that opens the file, unless
//!   `--lguest-word` says.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, info, warn};
use vmbus::guest_memory::{self, MemoryMessage, MEMORY_HEADER_LEN};
use vmbus::lguest::{
    address_ok, lhreq, run_cause, Death, FromGuest, Start, ToGuest, LGUEST_IRQS,
    SHUTDOWN_MESSAGE_LEN, SHUTDOWN_RESTART,
};
use zerocopy::IntoBytes;

use crate::bus::channel::{ChannelDriver, HostChannel};
use crate::caller::{Abi, SyscallKind};
use crate::device::{Caller, Device, Errno, Handle, Parked, ReadReply, WriteReply};
use crate::table::{ProbeError, Profile, ProfileSet};

/// The misc device name (`lguest_dev.name`).
pub const DEVICE_NAME: &str = "lguest";

/// The one profile: the interface every 3.x kernel has (it changed completely in 4.1).
pub const PROFILES: ProfileSet = ProfileSet {
    profiles: &[Profile {
        name: "linux-3.x",
        about: "the pre-4.1 launcher interface (LHREQ_INITIALIZE, IRQ, EVENTFD) that every \
                Linux 3.x Launcher uses",
    }],
    default: "linux-3.x",
    set_by_kernel_flag: false,
};

/// `ERESTART`: the Guest asked to be restarted.
const ERESTART: Errno = Errno::ERESTART;
/// Only CPU 0 exists: `nr_cpus` becomes 1 at INITIALIZE.
const NR_CPUS: u64 = 1;
/// The most a receive takes from the ring: the longest message is a KILL with its reason.
const RECV_LIMIT: usize = 4096;
/// The reason every Guest dies with when the bus takes its host away. The kernel has no such
/// path (its Guests lived in the kernel); a Launcher reads it like any other reason.
const HOST_GONE: &str = "fake Guest lost: the host side of the bus went away";

/// `--lguest-word`, added to `cusedev serve` by the driver table's row.
pub fn serve_args(serve: clap::Command) -> clap::Command {
    serve.arg(
        clap::Arg::new("lguest-word")
            .long("lguest-word")
            .value_name("4|8")
            .value_parser(["4", "8"])
            .help(
                "W, the size of /dev/lguest's words (the kernel's unsigned long). Default: \
                 the ELF class of the process that opens the device (4 for the upstream \
                 32-bit Launcher, 8 for a 64-bit one)",
            ),
    )
}

/// The driver's probe.
pub fn probe(
    channel: Arc<dyn HostChannel>,
    profile: &Profile,
    options: &clap::ArgMatches,
) -> Result<Arc<dyn crate::table::ChannelDevice>, ProbeError> {
    if profile.name != "linux-3.x" {
        return Err(ProbeError::UnknownProfile {
            profile: profile.name.to_string(),
        });
    }
    let forced_word = options
        .try_get_one::<String>("lguest-word")
        .ok()
        .flatten()
        .and_then(|w| w.parse::<usize>().ok());
    Ok(Arc::new(Lguest::new(channel, forced_word)))
}

/// The device: every open file, and the Guests of those that initialized.
pub struct Lguest {
    channel: Arc<dyn HostChannel>,
    forced_word: Option<usize>,
    state: Mutex<State>,
}

struct State {
    files: HashMap<Handle, OpenFile>,
    next_handle: Handle,
    /// The Guests by number, for the messages from the bus.
    guests: HashMap<u32, Arc<Guest>>,
    next_guest: u32,
    /// The host rescinded the channel: a new Guest is born dead.
    host_gone: bool,
}

/// One open file (`file->private_data`, NULL until INITIALIZE).
struct OpenFile {
    /// The opener's ABI: how to read a caller's blocked syscall.
    abi: Abi,
    /// W for this file.
    word: usize,
    guest: Option<Arc<Guest>>,
}

/// One Guest: `struct lguest` and its only `struct lg_cpu`.
struct Guest {
    number: u32,
    word: usize,
    /// `cpu->tsk`: only this thread may run the Guest.
    owner_tid: u32,
    /// `lg->mem_base`'s address space: the initializing task's process.
    memory: Caller,
    base: u64,
    pfn_limit: u64,
    inner: Mutex<GuestState>,
}

struct GuestState {
    /// `lg->dead`: the first reason wins; a restart request overrides it.
    death: Option<Death>,
    /// The Guest died while no read ran it: the next read reports the death (ENOENT or
    /// ERESTART) before it returns the reason, as if it had happened in that read.
    death_unreported: bool,
    /// `lg->eventfds`: address → our own reference to the Launcher's eventfd.
    eventfds: Vec<(u64, OwnedFd)>,
    /// The read that runs the Guest now, and its count.
    reader: Option<(Parked<Vec<u8>>, u32)>,
    /// A notification the Guest made while no read was running it.
    queued_notify: Option<u64>,
    /// The Guest is stopped (before its first run, or at a notification) until a RUN.
    waits_for_run: bool,
    /// The file was closed.
    closed: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The CPU a read or write names: its file offset (`*off`). pread/pwrite carry it exactly.
/// A plain read/write on the FUSE frontend arrives at the file position, which the FUSE
/// kernel advances by every result (lguest's handlers never touch it, so in the kernel it
/// stays where lseek put it): the era Launcher's `write(fd, args, 4·W)` would otherwise make
/// its next write CPU 12. So a plain read/write is taken as CPU 0 (decision #41). CUSE passes
/// offset 0 for everything (fs/fuse/cuse.c), which is CPU 0 too.
fn cpu_of(offset: u64, caller: &Caller, abi: Abi) -> u64 {
    if offset == 0 {
        return 0;
    }
    match caller.blocked_syscall(abi).map(|view| view.call) {
        Some(SyscallKind::Read | SyscallKind::Write) => 0,
        _ => offset,
    }
}

/// The death reason of a refused read, as `lgread()` words it (drivers/lguest/core.c v3.10).
fn bad_read(addr: u64, len: u64) -> String {
    format!("bad read address {} len {}", c_hex(addr), len)
}

/// `%#lx`: C prints 0 without the prefix.
fn c_hex(value: u64) -> String {
    if value == 0 {
        "0".to_string()
    } else {
        format!("{value:#x}")
    }
}

/// What a read that returns a notification writes: the address as one W-sized word. (The
/// kernel's put_user writes all W bytes whatever the count; a FUSE reply cannot be longer
/// than the count, so a shorter read gets the first bytes: decision #40.)
fn word_bytes(addr: u64, word: usize, count: u32) -> Vec<u8> {
    let mut bytes = addr.to_le_bytes()[..word].to_vec();
    bytes.truncate(count as usize);
    bytes
}

/// The errno of the read during which the Guest died.
fn death_errno(death: &Death) -> Errno {
    match death {
        Death::Reason(_) => Errno::ENOENT,
        Death::Restart => ERESTART,
    }
}

/// The request words of one write, fetched as the kernel's `get_user` does: from the bytes
/// the frontend delivered while they last, then from the caller's own buffer.
struct Words<'a> {
    data: &'a [u8],
    word: usize,
    abi: Abi,
    caller: &'a Caller,
    /// The caller's buffer pointer, found on first need.
    pointer: Option<Option<u64>>,
}

impl Words<'_> {
    /// Word `i`, or EFAULT as `get_user` would give.
    fn get(&mut self, i: usize) -> Result<u64, Errno> {
        let at = i * self.word;
        let mut raw = [0u8; 8];
        if let Some(bytes) = self.data.get(at..at + self.word) {
            raw[..self.word].copy_from_slice(bytes);
            return Ok(u64::from_le_bytes(raw));
        }
        let pointer = *self.pointer.get_or_insert_with(|| {
            let view = self.caller.blocked_syscall(self.abi);
            view.and_then(|v| v.buffer())
        });
        let Some(pointer) = pointer else {
            // No single user buffer to read (writev, io_uring): the words are not there.
            debug!(
                "lguest: write of {} bytes from pid {} has no word {i} and no buffer pointer",
                self.data.len(),
                self.caller.pid
            );
            return Err(Errno::EFAULT);
        };
        let addr = pointer.checked_add(at as u64).ok_or(Errno::EFAULT)?;
        self.caller.read_memory(addr, &mut raw[..self.word])?;
        Ok(u64::from_le_bytes(raw))
    }
}

impl Lguest {
    fn new(channel: Arc<dyn HostChannel>, forced_word: Option<usize>) -> Lguest {
        Lguest {
            channel,
            forced_word,
            state: Mutex::new(State {
                files: HashMap::new(),
                next_handle: 1,
                guests: HashMap::new(),
                next_guest: 1,
                host_gone: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn send(&self, guest: u32, message: &ToGuest) {
        self.channel.send_inband(0, &message.encode(guest));
    }

    fn guest(&self, number: u32) -> Option<Arc<Guest>> {
        self.lock().guests.get(&number).cloned()
    }

    /// `kill_guest()`: the first reason wins. Ends the read that runs the Guest, or leaves
    /// the death for the next read, and tells the fake Guest.
    fn kill(&self, guest: &Guest, reason: String) {
        let mut state = lock(&guest.inner);
        if state.death.is_some() {
            debug!(
                "lguest: Guest {} already dead; later reason {reason:?} ignored",
                guest.number
            );
            return;
        }
        info!("lguest: Guest {} killed: {reason}", guest.number);
        state.death = Some(Death::Reason(reason));
        self.report_death(guest, state);
    }

    /// The Guest has just died (`state.death` is set): the read running it fails, and the
    /// fake Guest hears the final reason.
    fn report_death(&self, guest: &Guest, mut state: MutexGuard<'_, GuestState>) {
        let Some(death) = state.death.clone() else {
            return;
        };
        let reader = state.reader.take().and_then(|(parked, _)| parked.claim());
        match reader {
            Some(reply) => {
                state.death_unreported = false;
                drop(state);
                reply.err(death_errno(&death));
            }
            None => {
                state.death_unreported = true;
                drop(state);
            }
        }
        self.send(guest.number, &ToGuest::Died(death));
    }

    /// `__lgread()` without its `kill_guest`: `buf.len()` bytes at guest-physical `addr`, or
    /// the kernel's reason for refusing them (and the bytes zeroed).
    fn read_guest(&self, guest: &Guest, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        let len = buf.len() as u64;
        let fetched = match guest.base.checked_add(addr) {
            Some(at) if address_ok(guest.pfn_limit, addr, len) => guest.memory.read_memory(at, buf),
            _ => Err(Errno::EFAULT),
        };
        fetched.map_err(|_| {
            buf.fill(0);
            bad_read(addr, len)
        })
    }

    /// `lgread()`: as [`Lguest::read_guest`], and a refused read kills the Guest.
    fn guest_read(&self, guest: &Guest, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.read_guest(guest, addr, buf).map_err(|reason| {
            self.kill(guest, reason);
            Errno::EFAULT
        })
    }

    /// `lgwrite()`: a refused write kills the Guest.
    fn guest_write(&self, guest: &Guest, addr: u64, bytes: &[u8]) -> Result<(), Errno> {
        let len = bytes.len() as u64;
        let stored = match guest.base.checked_add(addr) {
            Some(at) if address_ok(guest.pfn_limit, addr, len) => {
                guest.memory.write_memory(at, bytes)
            }
            _ => Err(Errno::EFAULT),
        };
        if stored.is_err() {
            self.kill(
                guest,
                format!("bad write address {} len {}", c_hex(addr), len),
            );
        }
        stored
    }

    /// `initialize()`: the Guest's registration. 3·W on success.
    fn initialize(
        &self,
        handle: Handle,
        words: &mut Words<'_>,
        caller: &Caller,
    ) -> Result<u32, Errno> {
        let word = words.word;
        {
            let state = self.lock();
            let file = state.files.get(&handle).ok_or(Errno::EBADF)?;
            if file.guest.is_some() {
                return Err(Errno::EBUSY);
            }
        }
        // copy_from_user of the three words: nothing is recorded if any of them faults.
        let (base, pfn_limit, start) = (words.get(1)?, words.get(2)?, words.get(3)?);
        let tgid = caller.tgid().map_err(|_| Errno::ESRCH)?;
        let mut state = self.lock();
        let host_gone = state.host_gone;
        let number = state.next_guest;
        let file = state.files.get_mut(&handle).ok_or(Errno::EBADF)?;
        // Checked again under the lock: two threads may INITIALIZE one file at once.
        if file.guest.is_some() {
            return Err(Errno::EBUSY);
        }
        let guest = Arc::new(Guest {
            number,
            word,
            owner_tid: caller.tid(),
            memory: Caller::detached(tgid),
            base,
            pfn_limit,
            inner: Mutex::new(GuestState {
                death: host_gone.then(|| Death::Reason(HOST_GONE.to_string())),
                death_unreported: host_gone,
                eventfds: Vec::new(),
                reader: None,
                queued_notify: None,
                waits_for_run: true,
                closed: false,
            }),
        });
        file.guest = Some(guest.clone());
        state.next_guest = state.next_guest.wrapping_add(1).max(1);
        state.guests.insert(number, guest);
        drop(state);
        info!(
            "lguest: Guest {number} initialized by pid {tgid} (thread {}): W {word}, base \
             {base:#x}, {pfn_limit:#x} pages, start {start:#x}",
            caller.tid()
        );
        if !host_gone {
            self.send(
                number,
                &ToGuest::Start(Start {
                    word: word as u32,
                    launcher_pid: tgid,
                    base,
                    pfn_limit,
                    start,
                }),
            );
        }
        Ok(3 * word as u32)
    }

    /// `attach_eventfd()` / `add_eventfd()`.
    fn attach_eventfd(
        &self,
        guest: &Guest,
        words: &mut Words<'_>,
        caller: &Caller,
    ) -> Result<u32, Errno> {
        let addr = words.get(1)?;
        let fd = words.get(2)?;
        // "Don't allow notifications on value 0 anyway (pending_notify)."
        if addr == 0 {
            return Err(Errno::EINVAL);
        }
        // eventfd_ctx_fdget(int fd): the word is cut to an int, so -1 is EBADF like any
        // descriptor that is not open. The caller's own table (`current->files`), which for
        // the Launcher's clone()d service processes is not the initializer's.
        let fd = fd as u32 as i32;
        if fd < 0 {
            return Err(Errno::EBADF);
        }
        let ours = caller.get_fd(fd)?;
        if !is_eventfd(&ours) {
            return Err(Errno::EINVAL);
        }
        let mut state = lock(&guest.inner);
        debug!(
            "lguest: Guest {}: eventfd (pid {} fd {fd}) for {addr:#x}",
            guest.number, caller.pid
        );
        state.eventfds.push((addr, ours));
        Ok(0)
    }

    /// LHCALL_NOTIFY from the Guest: to an eventfd if one is registered for `addr`
    /// (`send_notify_to_eventfd`, and the Guest goes on), else the read returns it.
    fn notify(&self, guest: &Guest, addr: u64) {
        let mut state = lock(&guest.inner);
        if state.death.is_some() || state.closed {
            debug!(
                "lguest: Guest {}: notify {addr:#x} after its end; dropped",
                guest.number
            );
            return;
        }
        state.waits_for_run = true;
        if let Some((_, fd)) = state.eventfds.iter().find(|(a, _)| *a == addr) {
            signal_eventfd(fd);
            let read_goes_on = state
                .reader
                .as_ref()
                .is_some_and(|(parked, _)| parked.is_waiting());
            if read_goes_on {
                state.waits_for_run = false;
                drop(state);
                self.send(
                    guest.number,
                    &ToGuest::Run {
                        cause: run_cause::EVENTFD,
                    },
                );
            }
            return;
        }
        let reader = state
            .reader
            .take()
            .and_then(|(parked, count)| parked.claim().map(|reply| (reply, count)));
        match reader {
            Some((reply, count)) => {
                drop(state);
                reply.ok(word_bytes(addr, guest.word, count));
            }
            None => state.queued_notify = Some(addr),
        }
    }

    /// LHCALL_SHUTDOWN (hypercalls.c, 3.x): `__lgread` of the 128-byte message (a bad
    /// address kills the Guest with that reason first), then `kill_guest("CRASH: %s")`, then
    /// for a restart `lg->dead = ERR_PTR(-ERESTART)`, unconditionally: a restart replaces
    /// whatever reason there was, and the read running the Guest returns ERESTART.
    fn shutdown(&self, guest: &Guest, message: u64, how: u32) {
        let mut text = [0u8; SHUTDOWN_MESSAGE_LEN];
        let reason = match self.read_guest(guest, message, &mut text) {
            Ok(()) => {
                text[SHUTDOWN_MESSAGE_LEN - 1] = 0;
                let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
                format!("CRASH: {}", String::from_utf8_lossy(&text[..end]))
            }
            Err(bad_read) => bad_read,
        };
        let mut state = lock(&guest.inner);
        let reported = state.death.is_some() && !state.death_unreported;
        match (how == SHUTDOWN_RESTART, state.death.is_some()) {
            // kill_guest: the first reason wins.
            (false, true) => debug!(
                "lguest: Guest {} already dead; shutdown {reason:?} ignored",
                guest.number
            ),
            (false, false) => {
                info!("lguest: Guest {} shut down: {reason}", guest.number);
                state.death = Some(Death::Reason(reason));
                self.report_death(guest, state);
            }
            (true, _) => {
                info!("lguest: Guest {} asks for a restart", guest.number);
                state.death = Some(Death::Restart);
                if reported {
                    // The read that saw the death has returned: later reads get ERESTART.
                    drop(state);
                    self.send(guest.number, &ToGuest::Died(Death::Restart));
                } else {
                    self.report_death(guest, state);
                }
            }
        }
    }

    fn guest_message(&self, payload: &[u8]) {
        let (number, message) = match FromGuest::parse(payload) {
            Ok(parsed) => parsed,
            Err(e) => {
                warn!("lguest: malformed message from the fake Guest ({e}); dropped");
                return;
            }
        };
        let Some(guest) = self.guest(number) else {
            debug!("lguest: message for Guest {number}, which is gone: {message:?}; dropped");
            return;
        };
        match message {
            FromGuest::Notify { addr } => self.notify(&guest, addr),
            FromGuest::Shutdown { message, how } => self.shutdown(&guest, message, how),
            FromGuest::Kill { reason } => self.kill(&guest, reason),
        }
    }

    /// The fake Guest reads its memory.
    fn host_reads(&self, number: u32, addr: u64, len: u32) {
        let data = |offset: u64, status: u32, bytes: &[u8]| {
            let mut frame = Vec::with_capacity(MEMORY_HEADER_LEN + bytes.len());
            let header = guest_memory::header(
                guest_memory::op::DATA,
                status,
                number.into(),
                offset,
                bytes.len() as u32,
            );
            frame.extend_from_slice(header.as_bytes());
            frame.extend_from_slice(bytes);
            if let Err(e) = self.channel.send_memory(&frame) {
                debug!("lguest: DATA for Guest {number} not sent ({e})");
            }
        };
        let guest = match self.guest(number) {
            Some(guest) if lock(&guest.inner).death.is_none() => guest,
            _ => return data(addr, Errno::ENOENT as u32, &[]),
        };
        // `len` is the host's: refuse a range outside the Guest's memory before allocating
        // anything for it, and a range the system has no memory for with ENOMEM, instead of
        // aborting on a failed allocation.
        if !address_ok(guest.pfn_limit, addr, u64::from(len)) {
            self.kill(&guest, bad_read(addr, u64::from(len)));
            return data(addr, Errno::EFAULT as u32, &[]);
        }
        let mut buf = Vec::new();
        if buf.try_reserve_exact(len as usize).is_err() {
            warn!("lguest: Guest {number} reads {len} bytes, no memory for them: ENOMEM");
            return data(addr, Errno::ENOMEM as u32, &[]);
        }
        buf.resize(len as usize, 0);
        if self.guest_read(&guest, addr, &mut buf).is_err() {
            return data(addr, Errno::EFAULT as u32, &[]);
        }
        for (i, chunk) in buf.chunks(guest_memory::MAX_CHUNK).enumerate() {
            data(addr + (i * guest_memory::MAX_CHUNK) as u64, 0, chunk);
        }
    }

    /// The fake Guest stores into its memory.
    fn host_writes(&self, number: u32, addr: u64, bytes: &[u8]) {
        match self.guest(number) {
            Some(guest) if lock(&guest.inner).death.is_none() => {
                let _ = self.guest_write(&guest, addr, bytes);
            }
            _ => debug!("lguest: write for Guest {number}, which is not alive; dropped"),
        }
    }
}

/// Whether `fd` is an eventfd (`eventfd_ctx_fileget`: `file->f_op == &eventfd_fops`).
fn is_eventfd(fd: &OwnedFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventfd]")
}

/// `eventfd_signal(ctx, 1)`: adds one, or nothing when the counter is full (the kernel
/// saturates; a write(2) would block the bus reader instead, so a full counter is seen
/// with a poll first).
fn signal_eventfd(fd: &OwnedFd) {
    let mut fds = [nix::poll::PollFd::new(
        fd.as_fd(),
        nix::poll::PollFlags::POLLOUT,
    )];
    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) {
        Ok(1) => {
            if let Err(e) = nix::unistd::write(fd, &1u64.to_ne_bytes()) {
                warn!("lguest: signalling an eventfd failed ({e})");
            }
        }
        Ok(_) => debug!("lguest: eventfd counter full; the signal saturates it"),
        Err(e) => warn!("lguest: polling an eventfd failed ({e})"),
    }
}

impl Device for Lguest {
    fn name(&self) -> &str {
        DEVICE_NAME
    }

    /// No `.open` in the fops: misc's open always succeeds, and each file is a Guest of its
    /// own once it INITIALIZEs.
    fn open(&self, caller: &Caller, _flags: i32) -> Result<Handle, Errno> {
        let abi = caller.abi().unwrap_or_else(|e| {
            warn!(
                "lguest: cannot read the ELF class of pid {} ({e}); taking it as 64-bit",
                caller.pid
            );
            Abi::X86_64
        });
        let word = self.forced_word.unwrap_or(abi.word_bytes());
        let mut state = self.lock();
        let handle = state.next_handle;
        state.next_handle += 1;
        state.files.insert(
            handle,
            OpenFile {
                abi,
                word,
                guest: None,
            },
        );
        Ok(handle)
    }

    /// `read()`: runs the Guest (lguest_user.c, 3.x; the order of its checks).
    fn read(&self, handle: Handle, count: u32, offset: u64, caller: &Caller, reply: ReadReply) {
        let (abi, guest) = match self.lock().files.get(&handle) {
            Some(file) => (file.abi, file.guest.clone()),
            None => return reply.err(Errno::EBADF),
        };
        let Some(guest) = guest else {
            return reply.err(Errno::EINVAL);
        };
        if cpu_of(offset, caller, abi) >= NR_CPUS {
            return reply.err(Errno::EINVAL);
        }
        // "If you're not the task which owns the Guest, go away." A thread is a task.
        if caller.tid() != guest.owner_tid {
            return reply.err(Errno::EPERM);
        }
        let mut state = lock(&guest.inner);
        if let Some(death) = state.death.clone() {
            if std::mem::take(&mut state.death_unreported) {
                return reply.err(death_errno(&death));
            }
            return match death {
                Death::Restart => reply.err(ERESTART),
                Death::Reason(reason) => {
                    let mut bytes = reason.into_bytes();
                    bytes.push(0);
                    bytes.truncate(count as usize);
                    reply.ok(bytes)
                }
            };
        }
        if let Some(addr) = state.queued_notify.take() {
            drop(state);
            return reply.ok(word_bytes(addr, guest.word, count));
        }
        let Some(parked) = reply.park_interruptible() else {
            return;
        };
        state.reader = Some((parked, count));
        let start = std::mem::take(&mut state.waits_for_run);
        drop(state);
        if start {
            self.send(
                guest.number,
                &ToGuest::Run {
                    cause: run_cause::READ,
                },
            );
        }
    }

    /// `write()`: the first word is the request (lguest_user.c, 3.x).
    fn write(&self, handle: Handle, data: &[u8], offset: u64, caller: &Caller, reply: WriteReply) {
        let (abi, word, guest) = match self.lock().files.get(&handle) {
            Some(file) => (file.abi, file.word, file.guest.clone()),
            None => return reply.err(Errno::EBADF),
        };
        let mut words = Words {
            data,
            word,
            abi,
            caller,
            pointer: None,
        };
        let result = (|| {
            let req = words.get(0)?;
            if req == lhreq::INITIALIZE {
                return self.initialize(handle, &mut words, caller);
            }
            let guest = match guest {
                Some(guest) if cpu_of(offset, caller, abi) < NR_CPUS => guest,
                _ => return Err(Errno::EINVAL),
            };
            if lock(&guest.inner).death.is_some() {
                return Err(Errno::ENOENT);
            }
            match req {
                lhreq::IRQ => {
                    let irq = words.get(1)?;
                    if irq >= u64::from(LGUEST_IRQS) {
                        return Err(Errno::EINVAL);
                    }
                    self.send(guest.number, &ToGuest::Irq { irq: irq as u32 });
                    Ok(0)
                }
                lhreq::EVENTFD => self.attach_eventfd(&guest, &mut words, caller),
                _ => Err(Errno::EINVAL),
            }
        })();
        reply.answer(result);
    }

    /// `close()`: everything of the Guest goes, its eventfd references with it.
    fn release(&self, handle: Handle) {
        let guest = {
            let mut state = self.lock();
            let guest = state.files.remove(&handle).and_then(|f| f.guest);
            if let Some(guest) = &guest {
                state.guests.remove(&guest.number);
            }
            guest
        };
        let Some(guest) = guest else { return };
        {
            let mut state = lock(&guest.inner);
            state.closed = true;
            state.eventfds.clear();
            state.reader = None;
        }
        info!("lguest: Guest {} closed", guest.number);
        if !self.lock().host_gone {
            self.send(guest.number, &ToGuest::Stop);
        }
    }
}

impl ChannelDriver for Lguest {
    fn on_channel_callback(&self) {
        loop {
            match self.channel.recv(RECV_LIMIT) {
                Ok(Some(packet)) => self.guest_message(&packet.payload),
                Ok(None) => return,
                Err(e) => {
                    warn!("lguest: {e}; the channel is stuck");
                    return;
                }
            }
        }
    }

    /// The bus took the fake Guest's host away. The kernel has no such path (its Guests
    /// lived in it); here every Guest dies with [`HOST_GONE`], so blocked Launchers wake with
    /// ENOENT and read why. Nothing waits: open files keep answering as dead Guests do.
    fn on_rescind(&self) {
        let guests: Vec<Arc<Guest>> = {
            let mut state = self.lock();
            state.host_gone = true;
            state.guests.values().cloned().collect()
        };
        for guest in guests {
            self.kill(&guest, HOST_GONE.to_string());
        }
    }

    fn on_memory(&self, message: MemoryMessage<'_>) {
        let guest_number = |trans_id: u64| u32::try_from(trans_id).ok();
        match message {
            MemoryMessage::Read {
                trans_id,
                offset,
                len,
            } => match guest_number(trans_id) {
                Some(number) => self.host_reads(number, offset, len),
                None => warn!("lguest: memory read for guest {trans_id}, not a guest number"),
            },
            MemoryMessage::Write {
                trans_id,
                offset,
                bytes,
            } => match guest_number(trans_id) {
                Some(number) => self.host_writes(number, offset, bytes),
                None => warn!("lguest: memory write for guest {trans_id}, not a guest number"),
            },
            MemoryMessage::Data { trans_id, .. } => {
                warn!("lguest: the fake Guest sent DATA for {trans_id}; only this side does");
            }
        }
    }
}

#[cfg(test)]
#[path = "lguest_tests.rs"]
mod tests;
