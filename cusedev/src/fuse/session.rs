//! The engine: one FUSE or CUSE connection, from the kernel's requests to device calls.
//!
//! A [`Session`] owns an open `/dev/fuse` (or `/dev/cuse`) descriptor and a few reader threads,
//! all blocked in `read(2)` on it at once, as libfuse's multi-threaded loop is: the kernel hands
//! each request to one of them (its wait is exclusive), so a request costs one wake-up however
//! many readers there are. A reader that takes the last idle place starts another, up to
//! [`MAX_READERS`], so a slow call never keeps the next request from being read.
//!
//! Each request is served on the thread that read it:
//!
//! - the file operations (OPEN, RELEASE, FLUSH, POLL) call the [`Device`] behind the handle;
//! - READ, WRITE and IOCTL call the device with a [`Pending`] reply. A device that can answer
//!   at once does so on this thread; one that must wait as the kernel's driver would (a
//!   daemon's read(2) waiting for the host) parks the reply and returns, and whoever has the
//!   answer later sends it. A sleeping request costs a table entry, not a thread: ten thousand
//!   of them cost no more threads than one;
//! - everything about names and nodes (LOOKUP, GETATTR, READDIR, FORGET, ...) and the INIT
//!   handshake goes to a [`RequestHandler`]: the "personality" that says what the connection
//!   looks like. A FUSE mount is a directory of devices ([`super::dir::DeviceDir`]); a CUSE
//!   connection is one character device with no directory at all. The engine assumes neither.
//!
//! Order: with several readers, two requests read one after the other may be served in either
//! order. Only one pair matters to a driver: close(2) on a FUSE mount queues RELEASE without
//! waiting for it (FLUSH is the synchronous part of close), and a daemon that opens the device
//! again at once queues OPEN right behind it. A single-open device would then see the OPEN
//! first and answer EBUSY. So an OPEN that gets EBUSY while a file of the same device has been
//! flushed and not yet released waits for that RELEASE (bounded by [`RELEASE_WAIT`]) and tries
//! again; any later request on the flushed file shows it is still open (a dup), and the EBUSY
//! stands. CUSE releases synchronously (fs/fuse/cuse.c, `cuse_release`), so there the question
//! never comes up.
//!
//! Signals: when a process blocked in a request gets a signal, the kernel sends FUSE_INTERRUPT
//! naming the request. Each READ/WRITE/IOCTL carries an [`Interrupt`] registered under its
//! `unique` before the device sees it; FUSE_INTERRUPT fires it, and a reply parked
//! interruptibly is answered -EINTR. An INTERRUPT for a request no reader has registered yet
//! (it is read by one thread while its request is still on its way through another) is
//! answered EAGAIN, which makes the kernel queue it again (fs/fuse/dev.c, `fuse_dev_do_write`);
//! one for a request already answered is dropped by the kernel the same way.
//!
//! Read next: [`crate::reply`] (parked replies), then [`super::dir`] or [`crate::cuse`].

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::thread::JoinHandleExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use zerocopy::{Immutable, IntoBytes};

use super::abi::{
    fopen, ioctl_flags, parse, FlushIn, InHeader, InterruptIn, IoctlIn, Opcode, OpenIn, OpenOut,
    PollIn, PollOut, ReadIn, ReleaseIn, WriteIn, WriteOut, FUSE_POLL_SCHEDULE_NOTIFY,
};
use super::channel::Channel;
use super::init::{negotiate, REQUEST_BUFFER_SIZE};
use super::ioctl;
use crate::device::{Caller, Device, Handle, IoctlOutcome, Pending, PollNotify, PollWaker};
use crate::wait::Interrupt;

#[doc(hidden)]
pub mod fuzzing;

/// Most reader threads one session runs. Readers only ever wait in `read(2)` on the device
/// (sleeping requests are parked, not threads), so this bounds how many *slow* calls can run
/// at once before the next request waits for one of them.
pub const MAX_READERS: usize = 8;

/// How long an OPEN that got EBUSY waits for the RELEASE of a file of the same device that was
/// flushed (closed) just before it. Only a file that is still open through a dup of the closed
/// descriptor, with nothing done on it since, makes an honest EBUSY wait this long.
pub const RELEASE_WAIT: Duration = Duration::from_secs(1);

/// How the engine tells the kernel "no such request any more" apart from other write errors.
const FUSE_INT_REQ_BIT: u64 = 1;

/// One request as the handler sees it: the header and the body after it (extensions removed).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub header: &'a InHeader,
    pub opcode: Opcode,
    pub body: &'a [u8],
}

/// A handler's answer.
#[derive(Debug)]
pub enum Reply {
    /// Success, with this reply body.
    Data(Vec<u8>),
    /// Failure: the kernel returns this errno to the syscall.
    Error(Errno),
    /// No reply at all (FORGET and BATCH_FORGET, which the kernel never waits for).
    None,
}

impl Reply {
    /// A successful reply made of one wire struct.
    pub fn of<T: IntoBytes + Immutable>(value: &T) -> Reply {
        Reply::Data(value.as_bytes().to_vec())
    }
}

impl From<Result<Vec<u8>, Errno>> for Reply {
    fn from(result: Result<Vec<u8>, Errno>) -> Reply {
        match result {
            Ok(body) => Reply::Data(body),
            Err(errno) => Reply::Error(errno),
        }
    }
}

/// What a connection looks like, apart from its devices' file operations.
///
/// Calls may come from several reader threads at once. Requests the kernel sends only after
/// another's answer (the OPEN after its LOOKUP) still arrive in that order.
pub trait RequestHandler: Send + Sync + 'static {
    /// FUSE_INIT or CUSE_INIT (`req.opcode` says which), after the engine has checked the
    /// major version; `minor` is the protocol minor both sides speak. The reply body is the
    /// `fuse_init_out` / `cuse_init_out` (+ device info) for that minor.
    fn init(&self, req: &Request<'_>, minor: u32) -> Reply;

    /// Called once the INIT answer has been written to the kernel; `accepted` is false when it
    /// was an error or the kernel refused to take it. For CUSE the kernel registers the
    /// character device while taking the answer, so the node exists once this is called.
    fn init_sent(&self, _accepted: bool) {}

    /// The device that an OPEN of `nodeid` opens (FUSE: a file in the directory; CUSE: the one
    /// device, nodeid 0). The error is what open(2) returns.
    fn device_for_open(&self, nodeid: u64) -> Result<Arc<dyn Device>, Errno>;

    /// `fuse_open_out.open_flags` for every OPEN. The default, direct I/O and nothing else,
    /// is what a device needs: no page cache, so every read(2)/write(2) reaches the device
    /// with the caller's count and offset. Never FOPEN_NONSEEKABLE or FOPEN_STREAM: those make
    /// pread/pwrite fail with ESPIPE, and daemons such as hv_fcopy_daemon pwrite to the device
    /// (a char device accepts any offset and the driver ignores it).
    fn open_flags(&self) -> u32 {
        fopen::DIRECT_IO
    }

    /// Every request that is neither INIT, INTERRUPT, DESTROY nor a file operation on an open
    /// device: LOOKUP, GETATTR, SETATTR, OPENDIR, READDIR, RELEASEDIR, STATFS, FORGET, ...
    /// FORGET and BATCH_FORGET are never answered, whatever this returns.
    fn node_request(&self, _req: &Request<'_>) -> Reply {
        Reply::Error(Errno::ENOSYS)
    }
}

/// An open file: the device and the driver's handle for it (the kernel's `struct file`).
#[derive(Clone)]
struct OpenFile {
    device: Arc<dyn Device>,
    handle: Handle,
}

/// The reader threads of a session.
#[derive(Default)]
struct Readers {
    /// Started and not yet finished.
    running: usize,
    handles: Vec<JoinHandle<()>>,
    /// The session's last reader has wound it down.
    wound_down: bool,
}

/// What the readers (and the replies parked in devices, weakly) share.
struct Shared {
    label: String,
    channel: Arc<Channel>,
    handler: Arc<dyn RequestHandler>,
    /// fh → open file. The fh is ours, handed to the kernel in the OPEN reply.
    files: RwLock<HashMap<u64, OpenFile>>,
    next_fh: AtomicU64,
    /// unique → interrupt, for every READ/WRITE/IOCTL that has not been answered yet.
    in_flight: Mutex<HashMap<u64, Interrupt>>,
    /// Files flushed (closed once) and not released since, with their devices; see the module
    /// docs on order. An entry goes only after the device has run its release.
    flushed: Mutex<HashMap<u64, Arc<dyn Device>>>,
    /// How many entries `flushed` has, so the hot path skips its lock when it is empty.
    flushed_count: AtomicUsize,
    /// Signalled at every RELEASE.
    released: Condvar,
    stopping: AtomicBool,
    max_readers: usize,
    readers: Mutex<Readers>,
    /// Readers blocked in `read(2)` (or about to be) right now. An atomic, not under the
    /// `readers` lock: every request changes it twice, and readers must not queue for a lock
    /// to say so.
    idle: AtomicUsize,
    /// Signalled when a reader finishes.
    reader_done: Condvar,
}

impl Shared {
    fn new(
        fd: OwnedFd,
        handler: Arc<dyn RequestHandler>,
        label: &str,
        max_readers: usize,
    ) -> Shared {
        Shared {
            label: label.to_owned(),
            channel: Arc::new(Channel::new(fd)),
            handler,
            files: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            in_flight: Mutex::new(HashMap::new()),
            flushed: Mutex::new(HashMap::new()),
            flushed_count: AtomicUsize::new(0),
            released: Condvar::new(),
            stopping: AtomicBool::new(false),
            max_readers: max_readers.max(1),
            readers: Mutex::new(Readers::default()),
            idle: AtomicUsize::new(0),
            reader_done: Condvar::new(),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// A running connection. Dropping it stops it (see [`Session::stop`]).
pub struct Session {
    label: String,
    shared: Option<Arc<Shared>>,
}

impl Session {
    /// Starts serving the connection on `fd` (an open `/dev/fuse` already mounted, or an open
    /// `/dev/cuse`) with up to [`MAX_READERS`] reader threads. `label` names the session in
    /// thread names and log lines (the mount path or the device name).
    pub fn start(
        fd: OwnedFd,
        handler: Arc<dyn RequestHandler>,
        label: &str,
    ) -> io::Result<Session> {
        Session::start_with_readers(fd, handler, label, MAX_READERS)
    }

    /// Like [`Session::start`] with at most `max_readers` reader threads (at least one). With
    /// one, requests are served strictly in the order they are read.
    pub fn start_with_readers(
        fd: OwnedFd,
        handler: Arc<dyn RequestHandler>,
        label: &str,
        max_readers: usize,
    ) -> io::Result<Session> {
        install_wake_signal()?;
        let shared = Arc::new(Shared::new(fd, handler, label, max_readers));
        spawn_reader(&shared)?;
        log::debug!("{label}: FUSE session started");
        Ok(Session {
            label: label.to_owned(),
            shared: Some(shared),
        })
    }

    /// Whether every reader has stopped (unmounted, DESTROY, a fatal error, or
    /// [`Session::stop`]).
    pub fn is_finished(&self) -> bool {
        match &self.shared {
            Some(shared) => lock(&shared.readers).running == 0,
            None => true,
        }
    }

    /// How many reader threads the session runs now.
    pub fn reader_threads(&self) -> usize {
        self.shared
            .as_ref()
            .map_or(0, |shared| lock(&shared.readers).running)
    }

    /// Stops the session and waits for it: the readers stop taking requests, every request
    /// still parked interruptibly in a device is interrupted (it gets EINTR), every file still
    /// open is released in its device, and the descriptor is closed. Closing it aborts the
    /// connection if the kernel still had one: whatever is left of the mount then fails with
    /// ENOTCONN. Idempotent.
    pub fn stop(&mut self) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        shared.stopping.store(true, Ordering::SeqCst);
        wake_readers_until_done(&shared);
        let handles = std::mem::take(&mut lock(&shared.readers).handles);
        for handle in handles {
            if handle.join().is_err() {
                log::error!("{}: a FUSE reader thread panicked", self.label);
            }
        }
        wind_down(&shared);
        // The last strong reference: the descriptor closes here (parked replies hold the
        // session weakly and are dropped quietly from now on).
        drop(shared);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The signal that takes a reader out of `read(2)` when the session stops. A real-time signal
/// nobody else here uses, with a handler that does nothing and no SA_RESTART, so the read
/// returns EINTR and the reader sees the stop flag.
fn wake_signal() -> libc::c_int {
    libc::SIGRTMIN() + 5
}

extern "C" fn on_wake_signal(_: libc::c_int) {}

fn install_wake_signal() -> io::Result<()> {
    static INSTALLED: OnceLock<i32> = OnceLock::new();
    let errno = *INSTALLED.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler is
        // an async-signal-safe function that does nothing.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_wake_signal as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(wake_signal(), &action, std::ptr::null_mut())
        };
        if rc == 0 {
            0
        } else {
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL)
        }
    });
    match errno {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Signals every reader until all have finished. A reader that has just checked the stop flag
/// and is on its way into `read(2)` misses one signal, so the signal is repeated.
fn wake_readers_until_done(shared: &Shared) {
    let give_up = Instant::now() + Duration::from_secs(10);
    let mut readers = lock(&shared.readers);
    while readers.running > 0 {
        for handle in &readers.handles {
            if !handle.is_finished() {
                // SAFETY: the pthread_t of a thread that has not been joined (we hold its
                // JoinHandle), so it is a valid thread id; the signal's handler does nothing.
                unsafe { libc::pthread_kill(handle.as_pthread_t(), wake_signal()) };
            }
        }
        if Instant::now() >= give_up {
            log::error!(
                "{}: {} reader(s) do not stop (a device call that never returns?); leaving them",
                shared.label,
                readers.running
            );
            return;
        }
        readers = shared
            .reader_done
            .wait_timeout(readers, Duration::from_millis(5))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Starts one more reader unless the session runs [`Shared::max_readers`] already. The
/// check and the start are one step under the lock: two readers that both find themselves
/// the last idle one must not both start a thread past the cap.
fn spawn_reader_if_room(shared: &Arc<Shared>) -> io::Result<()> {
    let mut readers = lock(&shared.readers);
    if readers.running >= shared.max_readers {
        return Ok(());
    }
    start_reader(shared, &mut readers)
}

/// Starts one more reader.
fn spawn_reader(shared: &Arc<Shared>) -> io::Result<()> {
    let mut readers = lock(&shared.readers);
    start_reader(shared, &mut readers)
}

fn start_reader(shared: &Arc<Shared>, readers: &mut Readers) -> io::Result<()> {
    let for_thread = shared.clone();
    let handle = thread::Builder::new()
        .name("cusedev-fuse".to_owned())
        .spawn(move || reader(for_thread))?;
    readers.running += 1;
    shared.idle.fetch_add(1, Ordering::SeqCst);
    readers.handles.push(handle);
    Ok(())
}

/// A reader thread: read a request, serve it, again.
fn reader(shared: Arc<Shared>) {
    // The wake signal must reach us even if the thread that started the session blocked it.
    let mut mask = nix::sys::signal::SigSet::empty();
    if let Ok(signal) = nix::sys::signal::Signal::try_from(wake_signal()) {
        mask.add(signal);
    }
    let _ = mask.thread_unblock();
    let label = shared.label.clone();
    let mut buf = vec![0u8; REQUEST_BUFFER_SIZE];
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let result = shared.channel.read_request(&mut buf);
        let last_idle = shared.idle.fetch_sub(1, Ordering::SeqCst) == 1;
        let ended = match result {
            // /dev/fuse never returns 0; a socket standing in for it does when its peer closes.
            Ok(0) => {
                log::info!("{label}: end of the request stream");
                true
            }
            Ok(len) => {
                if last_idle && !shared.stopping.load(Ordering::SeqCst) {
                    // Nobody is left in read(2): start a reader before serving this request,
                    // in case it is slow.
                    if let Err(err) = spawn_reader_if_room(&shared) {
                        log::warn!("{label}: cannot start another reader: {err}");
                    }
                }
                let flow = catch_unwind(AssertUnwindSafe(|| dispatch(&shared, &buf[..len])));
                match flow {
                    Ok(Flow::Continue) => false,
                    Ok(Flow::Stop) => true,
                    Err(_) => {
                        log::error!("{label}: a request handler panicked; answering EIO");
                        answer_after_panic(&shared, &buf[..len]);
                        false
                    }
                }
            }
            Err(Errno::ENODEV) => {
                log::info!("{label}: the kernel closed the FUSE connection (unmounted)");
                true
            }
            // A signal (the stop signal among them), nothing there after all, or a request
            // aborted between the kernel's wake-up and our read.
            Err(Errno::EINTR | Errno::EAGAIN | Errno::ENOENT) => false,
            Err(err) => {
                log::error!("{label}: cannot read from the FUSE device: {err}; stopping");
                true
            }
        };
        if ended {
            shared.stopping.store(true, Ordering::SeqCst);
            break;
        }
        shared.idle.fetch_add(1, Ordering::SeqCst);
    }
    let last = {
        let mut readers = lock(&shared.readers);
        readers.running -= 1;
        let last = readers.running == 0 && !readers.wound_down;
        if last {
            readers.wound_down = true;
        }
        last
    };
    if last {
        // The connection is over: wind down now rather than when someone calls stop().
        wind_down(&shared);
        log::debug!("{label}: FUSE session stopped");
    }
    shared.reader_done.notify_all();
}

/// Answers EIO to a request whose handler panicked, so its caller does not wait forever (if
/// the handler had answered already, the kernel refuses the second answer with ENOENT).
/// READ, WRITE and IOCTL need nothing here: their reply object answered EIO when the panic
/// dropped it.
fn answer_after_panic(shared: &Shared, message: &[u8]) {
    if let Ok((header, _)) = parse::<InHeader>(message) {
        let opcode = Opcode(header.opcode);
        if !matches!(
            opcode,
            Opcode::FORGET
                | Opcode::BATCH_FORGET
                | Opcode::INTERRUPT
                | Opcode::READ
                | Opcode::WRITE
                | Opcode::IOCTL
        ) {
            shared.reply_error(header.unique, opcode, Errno::EIO);
        }
    }
}

/// Ends what the session still has going: interrupt parked requests, release files. Runs
/// once the readers are gone; running it twice finds nothing left the second time.
fn wind_down(shared: &Shared) {
    let sleepers: Vec<Interrupt> = lock(&shared.in_flight).values().cloned().collect();
    if !sleepers.is_empty() {
        log::debug!(
            "{}: interrupting {} request(s) still in devices",
            shared.label,
            sleepers.len()
        );
    }
    for interrupt in sleepers {
        interrupt.fire();
    }
    let files: Vec<OpenFile> = write(&shared.files).drain().map(|(_, file)| file).collect();
    if !files.is_empty() {
        log::info!(
            "{}: releasing {} file(s) still open when the session ended",
            shared.label,
            files.len()
        );
    }
    for file in files {
        file.device.release(file.handle);
    }
}

enum Flow {
    Continue,
    Stop,
}

fn dispatch(shared: &Arc<Shared>, message: &[u8]) -> Flow {
    let (header, _) = match parse::<InHeader>(message) {
        Ok(parsed) => parsed,
        Err(err) => {
            log::warn!(
                "{}: dropping a request shorter than its header: {err}",
                shared.label
            );
            return Flow::Continue;
        }
    };
    let opcode = Opcode(header.opcode);
    let unique = header.unique;
    let declared = header.len as usize;
    let extensions = usize::from(header.total_extlen) * 8;
    let header_len = size_of::<InHeader>();
    if declared != message.len() || declared < header_len + extensions {
        log::warn!(
            "{}: {opcode} unique={unique}: header says {declared} bytes with {extensions} bytes of \
             extensions, read {}; answering EIO",
            shared.label,
            message.len()
        );
        if !matches!(
            opcode,
            Opcode::FORGET | Opcode::BATCH_FORGET | Opcode::INTERRUPT
        ) {
            shared.reply_error(unique, opcode, Errno::EIO);
        }
        return Flow::Continue;
    }
    let req = Request {
        header: &header,
        opcode,
        body: &message[header_len..declared - extensions],
    };
    log::trace!(
        "{}: {opcode} unique={unique} nodeid={} pid={} uid={} len={}",
        shared.label,
        header.nodeid,
        header.pid,
        header.uid,
        req.body.len()
    );

    match opcode {
        Opcode::INIT | Opcode::CUSE_INIT => {
            let reply = match negotiate(req.body) {
                Ok((kernel, minor)) => {
                    log::info!(
                        "{}: {opcode}: kernel protocol {}.{}, speaking 7.{minor}",
                        shared.label,
                        kernel.major,
                        kernel.minor
                    );
                    shared.handler.init(&req, minor)
                }
                Err(errno) => Reply::Error(errno),
            };
            let answered = matches!(reply, Reply::Data(_));
            let delivered = shared.send(unique, opcode, reply);
            shared.handler.init_sent(answered && delivered);
        }
        Opcode::DESTROY => {
            log::info!(
                "{}: DESTROY: the kernel is tearing the connection down",
                shared.label
            );
            shared.send(unique, opcode, Reply::Data(Vec::new()));
            return Flow::Stop;
        }
        Opcode::INTERRUPT => interrupt(shared, &req),
        Opcode::FORGET | Opcode::BATCH_FORGET => {
            // The kernel never waits for an answer to these, and must never get one.
            let _ = shared.handler.node_request(&req);
        }
        Opcode::OPEN => open(shared, &req),
        Opcode::RELEASE => {
            let reply = release(shared, &req);
            shared.send(unique, opcode, reply);
        }
        Opcode::FLUSH => {
            // Called at every close(2). Misc drivers have no .flush, so there is nothing to do
            // but check the request is well-formed and note the close (see "Order").
            let reply = match parse::<FlushIn>(req.body) {
                Ok((flush_in, _)) => {
                    let device = read(&shared.files)
                        .get(&flush_in.fh)
                        .map(|file| file.device.clone());
                    if let Some(device) = device {
                        if lock(&shared.flushed).insert(flush_in.fh, device).is_none() {
                            shared.flushed_count.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Reply::Data(Vec::new())
                }
                Err(err) => shared.malformed(&req, err),
            };
            shared.send(unique, opcode, reply);
        }
        // vfs_fsync_range() on a file without .fsync: EINVAL (ENOSYS here would make the
        // kernel turn every later fsync into a silent success).
        Opcode::FSYNC => {
            shared.reply_error(unique, opcode, Errno::EINVAL);
        }
        Opcode::POLL => {
            let reply = poll(shared, &req);
            shared.send(unique, opcode, reply);
        }
        Opcode::READ | Opcode::WRITE | Opcode::IOCTL => {
            if let Err(reply) = file_io(shared, &req) {
                shared.send(unique, opcode, reply);
            }
        }
        _ => {
            let reply = shared.handler.node_request(&req);
            shared.send(unique, opcode, reply);
        }
    }
    Flow::Continue
}

impl Shared {
    fn caller(&self, header: &InHeader, interrupt: Interrupt) -> Caller {
        Caller {
            pid: header.pid,
            uid: header.uid,
            gid: header.gid,
            interrupt,
        }
    }

    fn file(&self, fh: u64) -> Result<OpenFile, Errno> {
        read(&self.files).get(&fh).cloned().ok_or(Errno::EBADF)
    }

    /// A request on `fh` after its FLUSH: the file is still open (a dup of the closed
    /// descriptor), so no RELEASE is on its way for it.
    fn note_activity(&self, fh: u64) {
        if self.flushed_count.load(Ordering::SeqCst) != 0 {
            self.forget_flush(fh);
        }
    }

    fn forget_flush(&self, fh: u64) {
        if self.flushed_count.load(Ordering::SeqCst) != 0
            && lock(&self.flushed).remove(&fh).is_some()
        {
            self.flushed_count.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Whether a file of `device` has been flushed (closed) and not released yet.
    fn has_flushed_file(&self, device: &Arc<dyn Device>) -> bool {
        self.flushed_count.load(Ordering::SeqCst) != 0
            && lock(&self.flushed)
                .values()
                .any(|flushed| Arc::ptr_eq(flushed, device))
    }

    /// An OPEN of `device` got EBUSY while a file of the same device had been flushed and not
    /// released: its RELEASE is probably being served by another reader right now. Waits
    /// until no such file is left, at most [`RELEASE_WAIT`].
    fn wait_for_pending_release(&self, device: &Arc<dyn Device>) {
        let deadline = Instant::now() + RELEASE_WAIT;
        let mut flushed = lock(&self.flushed);
        while flushed.values().any(|flushed| Arc::ptr_eq(flushed, device)) {
            let now = Instant::now();
            if now >= deadline {
                log::debug!(
                    "{}: OPEN of {}: a closed file's RELEASE did not come within {:?}; EBUSY",
                    self.label,
                    device.name(),
                    RELEASE_WAIT
                );
                return;
            }
            flushed = self
                .released
                .wait_timeout(flushed, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Logs a request whose body does not hold what its opcode needs; answers EINVAL.
    fn malformed(&self, req: &Request<'_>, err: impl std::fmt::Display) -> Reply {
        log::warn!(
            "{}: {} unique={}: {err}; answering EINVAL",
            self.label,
            req.opcode,
            req.header.unique
        );
        Reply::Error(Errno::EINVAL)
    }

    fn send(&self, unique: u64, opcode: Opcode, reply: Reply) -> bool {
        match reply {
            Reply::Data(body) => self.reply_ok(unique, opcode, &[&body]),
            Reply::Error(errno) => self.reply_error(unique, opcode, errno),
            Reply::None => true,
        }
    }

    fn reply_ok(&self, unique: u64, opcode: Opcode, body: &[&[u8]]) -> bool {
        let result = self.channel.reply(unique, 0, body);
        self.log_send_result(unique, opcode, result)
    }

    fn reply_error(&self, unique: u64, opcode: Opcode, errno: Errno) -> bool {
        log::trace!("{}: {opcode} unique={unique} -> {errno}", self.label);
        let result = self.channel.reply(unique, -(errno as i32), &[]);
        self.log_send_result(unique, opcode, result)
    }

    /// Whether the kernel took the reply.
    fn log_send_result(&self, unique: u64, opcode: Opcode, result: Result<(), Errno>) -> bool {
        match result {
            Ok(()) => true,
            // The kernel has dropped the request (its caller was killed, or the connection
            // was aborted): expected, nobody is waiting for this answer any more.
            Err(Errno::ENOENT) => {
                log::debug!(
                    "{}: {opcode} unique={unique}: reply not delivered, the kernel no longer waits for it",
                    self.label
                );
                false
            }
            Err(err) => {
                log::warn!(
                    "{}: {opcode} unique={unique}: cannot send the reply: {err}",
                    self.label
                );
                false
            }
        }
    }
}

fn interrupt(shared: &Shared, req: &Request<'_>) {
    let target = match parse::<InterruptIn>(req.body) {
        Ok((interrupt_in, _)) => interrupt_in.unique,
        Err(err) => {
            log::warn!("{}: INTERRUPT: {err}; ignored", shared.label);
            return;
        }
    };
    let found = lock(&shared.in_flight).get(&target).cloned();
    match found {
        Some(interrupt) => {
            log::debug!("{}: INTERRUPT for unique={target}: waking it", shared.label);
            interrupt.fire();
        }
        None => {
            // Not registered: either still on its way through another reader, or answered
            // already. EAGAIN makes the kernel queue the INTERRUPT again in the first case
            // and is refused with ENOENT in the second (fs/fuse/dev.c, fuse_dev_do_write).
            log::debug!(
                "{}: INTERRUPT for unique={target}, which is not in flight; answering EAGAIN",
                shared.label
            );
            let result = shared.channel.reply(
                req.header.unique | FUSE_INT_REQ_BIT,
                -(Errno::EAGAIN as i32),
                &[],
            );
            if let Err(err) = result {
                log::debug!("{}: INTERRUPT EAGAIN not taken: {err}", shared.label);
            }
        }
    }
}

fn open(shared: &Shared, req: &Request<'_>) {
    let unique = req.header.unique;
    let result = (|| {
        let (open_in, _) = parse::<OpenIn>(req.body).map_err(|err| shared.malformed(req, err))?;
        let device = shared
            .handler
            .device_for_open(req.header.nodeid)
            .map_err(Reply::Error)?;
        // open() has no interruptible sleep in the drivers we model.
        let caller = shared.caller(req.header, Interrupt::new());
        // Looked at before the open: the FLUSH of a close(2) is answered before close returns,
        // so it is in the table by the time the OPEN that follows the close comes in.
        let release_may_be_on_its_way = shared.has_flushed_file(&device);
        let mut opened = device.open(&caller, open_in.flags as i32);
        if opened == Err(Errno::EBUSY) && release_may_be_on_its_way {
            shared.wait_for_pending_release(&device);
            opened = device.open(&caller, open_in.flags as i32);
        }
        let handle = opened.map_err(Reply::Error)?;
        Ok::<_, Reply>((device, handle))
    })();
    let (device, handle) = match result {
        Ok(opened) => opened,
        Err(reply) => {
            shared.send(unique, req.opcode, reply);
            return;
        }
    };
    let fh = shared.next_fh.fetch_add(1, Ordering::Relaxed);
    write(&shared.files).insert(
        fh,
        OpenFile {
            device: device.clone(),
            handle,
        },
    );
    let out = OpenOut {
        fh,
        open_flags: shared.handler.open_flags(),
        padding: 0,
    };
    log::debug!(
        "{}: OPEN {} by pid {} -> fh {fh}",
        shared.label,
        device.name(),
        req.header.pid
    );
    if !shared.reply_ok(unique, req.opcode, &[out.as_bytes()]) {
        // The kernel will never send RELEASE for a handle it never saw: close it here, or a
        // single-open device would stay busy forever.
        write(&shared.files).remove(&fh);
        device.release(handle);
    }
}

fn release(shared: &Shared, req: &Request<'_>) -> Reply {
    let release_in = match parse::<ReleaseIn>(req.body) {
        Ok((release_in, _)) => release_in,
        Err(err) => return shared.malformed(req, err),
    };
    let file = write(&shared.files).remove(&release_in.fh);
    match file {
        Some(file) => {
            log::debug!(
                "{}: RELEASE fh {} ({})",
                shared.label,
                release_in.fh,
                file.device.name()
            );
            file.device.release(file.handle);
            // Only now, with the device released, may a waiting OPEN try again. Removed under
            // the lock it waits with, so it cannot miss the wake-up.
            shared.forget_flush(release_in.fh);
            shared.released.notify_all();
        }
        None => log::warn!(
            "{}: RELEASE of fh {}, which is not open; ignored",
            shared.label,
            release_in.fh
        ),
    }
    Reply::Data(Vec::new())
}

/// The PollNotify a device keeps from a POLL with FUSE_POLL_SCHEDULE_NOTIFY: waking it sends
/// FUSE_NOTIFY_POLL for the kernel's poll handle. Holds the channel weakly, so a device that
/// keeps stale registrations does not keep a finished connection open.
struct FusePollNotify {
    channel: Weak<Channel>,
    kh: u64,
}

impl PollNotify for FusePollNotify {
    fn notify(&self) {
        let Some(channel) = self.channel.upgrade() else {
            return;
        };
        if let Err(err) = channel.notify_poll(self.kh) {
            log::debug!("FUSE_NOTIFY_POLL for kh {} not delivered: {err}", self.kh);
        }
    }
}

fn poll(shared: &Shared, req: &Request<'_>) -> Reply {
    let poll_in = match parse::<PollIn>(req.body) {
        Ok((poll_in, _)) => poll_in,
        Err(err) => return shared.malformed(req, err),
    };
    shared.note_activity(poll_in.fh);
    let file = match shared.file(poll_in.fh) {
        Ok(file) => file,
        Err(errno) => return Reply::Error(errno),
    };
    // The kernel asks for a notification only when a poller will actually sleep on the answer.
    let waker = (poll_in.flags & FUSE_POLL_SCHEDULE_NOTIFY != 0).then(|| {
        PollWaker(Arc::new(FusePollNotify {
            channel: Arc::downgrade(&shared.channel),
            kh: poll_in.kh,
        }))
    });
    let revents = file.device.poll(file.handle, waker);
    Reply::of(&PollOut {
        revents,
        padding: 0,
    })
}

/// READ, WRITE and IOCTL: parse, register the request for INTERRUPT, and hand the device a
/// reply that sends itself whenever it is answered. Returns the reply to send at once if the
/// request never reaches the device.
fn file_io(shared: &Arc<Shared>, req: &Request<'_>) -> Result<(), Reply> {
    let unique = req.header.unique;
    let opcode = req.opcode;
    match opcode {
        Opcode::READ => {
            let (read_in, _) =
                parse::<ReadIn>(req.body).map_err(|err| shared.malformed(req, err))?;
            let (file, caller) = shared.start_file_op(read_in.fh, req.header)?;
            let size = read_in.size as usize;
            let reply = shared.pending(unique, opcode, &caller, move |shared, result| {
                result.map(|mut data: Vec<u8>| {
                    if data.len() > size {
                        log::warn!(
                            "{}: a device returned {} bytes for a {size}-byte read; truncated",
                            shared.label,
                            data.len()
                        );
                        data.truncate(size);
                    }
                    Reply::Data(data)
                })
            });
            file.device
                .read(file.handle, read_in.size, read_in.offset, &caller, reply);
        }
        Opcode::WRITE => {
            let (write_in, data) =
                parse::<WriteIn>(req.body).map_err(|err| shared.malformed(req, err))?;
            let data = data.get(..write_in.size as usize).ok_or_else(|| {
                let got = data.len();
                shared.malformed(
                    req,
                    format_args!("{} bytes of data announced, {got} sent", write_in.size),
                )
            })?;
            let (file, caller) = shared.start_file_op(write_in.fh, req.header)?;
            let reply = shared.pending(unique, opcode, &caller, |_, result| {
                result.map(|size| Reply::of(&WriteOut { size, padding: 0 }))
            });
            file.device
                .write(file.handle, data, write_in.offset, &caller, reply);
        }
        Opcode::IOCTL => {
            let (ioctl_in, input) =
                parse::<IoctlIn>(req.body).map_err(|err| shared.malformed(req, err))?;
            let input = input.get(..ioctl_in.in_size as usize).ok_or_else(|| {
                let got = input.len();
                shared.malformed(
                    req,
                    format_args!("{} bytes of input announced, {got} sent", ioctl_in.in_size),
                )
            })?;
            // Directory ioctls are only sent with FUSE_HAS_IOCTL_DIR, which we never offer.
            if ioctl_in.flags & ioctl_flags::DIR != 0 {
                return Err(Reply::Error(Errno::ENOTTY));
            }
            let (file, caller) = shared.start_file_op(ioctl_in.fh, req.header)?;
            let name = file.device.name().to_owned();
            let reply = shared.pending(unique, opcode, &caller, move |shared, result| {
                result.map(|outcome: IoctlOutcome| ioctl_reply(shared, &name, &ioctl_in, outcome))
            });
            file.device
                .ioctl(file.handle, &ioctl::call(&ioctl_in, input), &caller, reply);
        }
        _ => return Err(Reply::Error(Errno::ENOSYS)),
    }
    Ok(())
}

fn ioctl_reply(shared: &Shared, device: &str, ioctl_in: &IoctlIn, outcome: IoctlOutcome) -> Reply {
    let truncated = |len| {
        log::warn!(
            "{}: device {device} returned {len} bytes for ioctl {:#x} with room for {}; truncated",
            shared.label,
            ioctl_in.cmd,
            ioctl_in.out_size
        );
    };
    ioctl::reply(ioctl_in, outcome, truncated).unwrap_or_else(|err| {
        log::error!(
            "{}: device {device}, ioctl {:#x}: {err}; the caller gets EIO",
            shared.label,
            ioctl_in.cmd
        );
        Reply::Error(Errno::EIO)
    })
}

impl Shared {
    /// The open file behind `fh` and the caller of a READ/WRITE/IOCTL on it, registered under
    /// the request's `unique` for INTERRUPT before the device can see the request.
    fn start_file_op(&self, fh: u64, header: &InHeader) -> Result<(OpenFile, Caller), Reply> {
        self.note_activity(fh);
        let file = self.file(fh).map_err(Reply::Error)?;
        let interrupt = Interrupt::new();
        lock(&self.in_flight).insert(header.unique, interrupt.clone());
        Ok((file, self.caller(header, interrupt)))
    }

    /// The reply object for request `unique`: `encode` turns the device's answer into the
    /// wire reply. It holds the session weakly: an answer that comes after the session has
    /// stopped goes nowhere.
    fn pending<T: Send + 'static>(
        self: &Arc<Self>,
        unique: u64,
        opcode: Opcode,
        caller: &Caller,
        encode: impl FnOnce(&Shared, Result<T, Errno>) -> Result<Reply, Errno> + Send + 'static,
    ) -> Pending<T> {
        let session: Weak<Shared> = Arc::downgrade(self);
        Pending::new(caller.interrupt.clone(), move |result| {
            let Some(shared) = session.upgrade() else {
                log::debug!("{opcode} unique={unique}: answered after its session ended");
                return;
            };
            // Out of the map before the reply goes out: an INTERRUPT that follows the reply
            // finds nothing, and the kernel drops our EAGAIN for it.
            lock(&shared.in_flight).remove(&unique);
            let reply = encode(&shared, result).unwrap_or_else(Reply::Error);
            shared.send(unique, opcode, reply);
        })
    }
}
