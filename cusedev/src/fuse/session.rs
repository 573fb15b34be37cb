//! The engine: one FUSE or CUSE connection, from the kernel's requests to device calls.
//!
//! A [`Session`] owns an open `/dev/fuse` (or `/dev/cuse`) descriptor and one reader thread.
//! The reader takes requests off the descriptor one at a time and
//!
//! - answers the file operations (OPEN, RELEASE, FLUSH, POLL) itself, in the order the kernel
//!   sent them, by calling the [`Device`] behind the file handle;
//! - hands READ, WRITE and IOCTL to a worker pool, because those may sleep inside the device
//!   for as long as the kernel's driver would (a daemon's read(2) waiting for the host), and a
//!   sleeping read must not keep a write from being served;
//! - passes everything about names and nodes (LOOKUP, GETATTR, READDIR, FORGET, ...) and the
//!   INIT handshake to a [`RequestHandler`]: the "personality" that says what the connection
//!   looks like. A FUSE mount is a directory of devices ([`super::dir::DeviceDir`]); a CUSE
//!   connection is one character device with no directory at all. The engine assumes neither.
//!
//! Order matters for the inline part. When a daemon calls close(2), the kernel queues RELEASE
//! without waiting for it; if the daemon opens the device again at once, the OPEN is queued
//! right behind it. Serving both in the reader thread, in order, means that OPEN sees the
//! release done, as it would with the kernel's driver, instead of a spurious EBUSY from a
//! single-open device.
//!
//! Signals: when a process blocked in a request gets a signal, the kernel sends FUSE_INTERRUPT
//! naming the request. Each request on the pool carries an [`Interrupt`] registered under its
//! `unique` before it is dispatched; FUSE_INTERRUPT fires it, a device sleeping in
//! `WaitState::wait_interruptible` returns EINTR, and the original request is answered -EINTR.
//! The INTERRUPT request itself is never answered.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::{self, JoinHandle};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use zerocopy::{Immutable, IntoBytes};

use super::abi::{
    fopen, ioctl_flags, parse, FlushIn, InHeader, InterruptIn, IoctlIn, Opcode, OpenIn, OpenOut,
    PollIn, PollOut, ReadIn, ReleaseIn, WriteIn, WriteOut, FUSE_POLL_SCHEDULE_NOTIFY,
};
use super::channel::Channel;
use super::init::{negotiate, REQUEST_BUFFER_SIZE};
use super::ioctl;
use super::pool::Pool;
use crate::device::{Caller, Device, Handle, PollNotify, PollWaker};
use crate::wait::Interrupt;

/// Most worker threads one session runs; beyond that, requests queue for a free worker.
pub const MAX_WORKERS: usize = 64;

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
/// All calls come from the session's reader thread, in the kernel's order, so an
/// implementation may rely on, say, a LOOKUP being answered before the OPEN that follows it.
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

/// What the reader and the workers share.
struct Shared {
    label: String,
    channel: Arc<Channel>,
    handler: Arc<dyn RequestHandler>,
    /// fh → open file. The fh is ours, handed to the kernel in the OPEN reply.
    files: Mutex<HashMap<u64, OpenFile>>,
    next_fh: AtomicU64,
    /// unique → interrupt, for every request on the pool that has not been answered yet.
    in_flight: Mutex<HashMap<u64, Interrupt>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running connection. Dropping it stops it (see [`Session::stop`]).
pub struct Session {
    label: String,
    stop: Option<OwnedFd>,
    reader: Option<JoinHandle<()>>,
}

impl Session {
    /// Starts serving the connection on `fd` (an open `/dev/fuse` already mounted, or an open
    /// `/dev/cuse`). `label` names the session in thread names and log lines (the mount path
    /// or the device name).
    pub fn start(
        fd: OwnedFd,
        handler: Arc<dyn RequestHandler>,
        label: &str,
    ) -> io::Result<Session> {
        let (stop_rx, stop_tx) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let shared = Arc::new(Shared {
            label: label.to_owned(),
            channel: Arc::new(Channel::new(fd)),
            handler,
            files: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            in_flight: Mutex::new(HashMap::new()),
        });
        let reader = thread::Builder::new()
            .name("cusedev-fuse".to_owned())
            .spawn(move || run(shared, stop_rx))?;
        Ok(Session {
            label: label.to_owned(),
            stop: Some(stop_tx),
            reader: Some(reader),
        })
    }

    /// Whether the reader has stopped (unmounted, DESTROY, a fatal error, or [`Session::stop`]).
    pub fn is_finished(&self) -> bool {
        match &self.reader {
            Some(reader) => reader.is_finished(),
            None => true,
        }
    }

    /// Stops the session and waits for it: the reader stops taking requests, every request
    /// still sleeping in a device is interrupted (it gets EINTR), the workers finish, every
    /// file still open is released in its device, and the descriptor is closed. Closing it
    /// aborts the connection if the kernel still had one: whatever is left of the mount then
    /// fails with ENOTCONN. Idempotent. A device call that sleeps without honouring its
    /// [`Interrupt`] keeps this waiting, as it would keep a kernel module from unloading.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The reader polls the other end; any byte (or the close itself) wakes it.
            let _ = nix::unistd::write(&stop, &[1]);
            drop(stop);
        }
        if let Some(reader) = self.reader.take() {
            if reader.join().is_err() {
                log::error!("{}: the FUSE reader thread panicked", self.label);
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Why the reader woke up.
enum Wake {
    Request,
    Stop,
}

fn wait_for_request(channel: &Channel, stop: &OwnedFd) -> Result<Wake, Errno> {
    loop {
        let mut fds = [
            PollFd::new(channel.fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(err) => return Err(err),
        }
        if fds[1].any().unwrap_or(true) {
            return Ok(Wake::Stop);
        }
        // POLLIN: a request; POLLERR: the connection is gone and read() will say ENODEV.
        if fds[0].any().unwrap_or(true) {
            return Ok(Wake::Request);
        }
    }
}

/// The reader thread.
fn run(shared: Arc<Shared>, stop: OwnedFd) {
    let label = shared.label.clone();
    let pool = Pool::new("cusedev-fuse", MAX_WORKERS);
    let mut buf = vec![0u8; REQUEST_BUFFER_SIZE];
    log::debug!("{label}: FUSE session started");
    loop {
        match wait_for_request(&shared.channel, &stop) {
            Ok(Wake::Request) => {}
            Ok(Wake::Stop) => {
                log::debug!("{label}: FUSE session asked to stop");
                break;
            }
            Err(err) => {
                log::error!("{label}: cannot wait for FUSE requests: {err}; stopping the session");
                break;
            }
        }
        let len = match shared.channel.read_request(&mut buf) {
            // /dev/fuse never returns 0; a socket standing in for it does when its peer closes.
            Ok(0) => {
                log::info!("{label}: end of the request stream");
                break;
            }
            Ok(len) => len,
            Err(Errno::ENODEV) => {
                log::info!("{label}: the kernel closed the FUSE connection (unmounted)");
                break;
            }
            // Interrupted, nothing there after all, or a request aborted between poll and read.
            Err(Errno::EINTR | Errno::EAGAIN | Errno::ENOENT) => continue,
            Err(err) => {
                log::error!(
                    "{label}: cannot read from the FUSE device: {err}; stopping the session"
                );
                break;
            }
        };
        let flow = catch_unwind(AssertUnwindSafe(|| dispatch(&shared, &pool, &buf[..len])));
        match flow {
            Ok(Flow::Continue) => {}
            Ok(Flow::Stop) => break,
            Err(_) => {
                log::error!("{label}: a request handler panicked; answering EIO");
                answer_after_panic(&shared, &buf[..len]);
            }
        }
    }
    wind_down(&shared, &pool);
    log::debug!("{label}: FUSE session stopped");
}

/// Answers EIO to a request whose handler panicked, so its caller does not wait forever (if
/// the handler had answered already, the kernel refuses the second answer with ENOENT).
fn answer_after_panic(shared: &Shared, message: &[u8]) {
    if let Ok((header, _)) = parse::<InHeader>(message) {
        let opcode = Opcode(header.opcode);
        if !matches!(
            opcode,
            Opcode::FORGET | Opcode::BATCH_FORGET | Opcode::INTERRUPT
        ) {
            shared.reply_error(header.unique, opcode, Errno::EIO);
        }
    }
}

/// Ends what the session still has going: wake sleepers, finish workers, release files.
fn wind_down(shared: &Shared, pool: &Pool) {
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
    pool.shutdown();
    let files: Vec<OpenFile> = lock(&shared.files).drain().map(|(_, file)| file).collect();
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

/// The part of a request that a worker needs, parsed (and checked) in the reader thread.
enum PoolOp {
    Read(ReadIn),
    Write(WriteIn, Vec<u8>),
    Ioctl(IoctlIn, Vec<u8>),
}

fn dispatch(shared: &Arc<Shared>, pool: &Pool, message: &[u8]) -> Flow {
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
            // but check the request is well-formed.
            let reply = match parse::<FlushIn>(req.body) {
                Ok(_) => Reply::Data(Vec::new()),
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
            if let Err(reply) = submit(shared, pool, &req) {
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
        lock(&self.files).get(&fh).cloned().ok_or(Errno::EBADF)
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
        None => log::debug!(
            "{}: INTERRUPT for unique={target}, which is no longer in flight; ignored",
            shared.label
        ),
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
        // open() has no interruptible sleep in the drivers we model; the reader thread would
        // not see an INTERRUPT before it returned anyway.
        let caller = shared.caller(req.header, Interrupt::new());
        let handle = device
            .open(&caller, open_in.flags as i32)
            .map_err(Reply::Error)?;
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
    lock(&shared.files).insert(
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
        lock(&shared.files).remove(&fh);
        device.release(handle);
    }
}

fn release(shared: &Shared, req: &Request<'_>) -> Reply {
    let release_in = match parse::<ReleaseIn>(req.body) {
        Ok((release_in, _)) => release_in,
        Err(err) => return shared.malformed(req, err),
    };
    let file = lock(&shared.files).remove(&release_in.fh);
    match file {
        Some(file) => {
            log::debug!(
                "{}: RELEASE fh {} ({})",
                shared.label,
                release_in.fh,
                file.device.name()
            );
            file.device.release(file.handle);
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

/// Parses a READ/WRITE/IOCTL in the reader thread and queues it for a worker. Returns the
/// reply to send at once if the request cannot even be queued.
fn submit(shared: &Arc<Shared>, pool: &Pool, req: &Request<'_>) -> Result<(), Reply> {
    let (fh, op) = match req.opcode {
        Opcode::READ => {
            let (read_in, _) =
                parse::<ReadIn>(req.body).map_err(|err| shared.malformed(req, err))?;
            (read_in.fh, PoolOp::Read(read_in))
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
            (write_in.fh, PoolOp::Write(write_in, data.to_vec()))
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
            (ioctl_in.fh, PoolOp::Ioctl(ioctl_in, input.to_vec()))
        }
        _ => return Err(Reply::Error(Errno::ENOSYS)),
    };
    let file = shared.file(fh).map_err(Reply::Error)?;

    let unique = req.header.unique;
    let opcode = req.opcode;
    let interrupt = Interrupt::new();
    // Registered before the job can run (and before the reader can read the INTERRUPT that
    // names this request): an interrupt can never arrive for a request we do not know yet.
    lock(&shared.in_flight).insert(unique, interrupt.clone());
    let caller = shared.caller(req.header, interrupt);
    let shared = shared.clone();
    pool.submit(move || {
        let result = catch_unwind(AssertUnwindSafe(|| {
            run_pool_op(&shared, &file, op, &caller)
        }));
        // Out of the map before the reply goes out: an INTERRUPT that follows the reply finds
        // nothing and is ignored, as the kernel expects.
        lock(&shared.in_flight).remove(&unique);
        let reply = result.unwrap_or_else(|_| {
            log::error!(
                "{}: {opcode} unique={unique}: device {} panicked; answering EIO",
                shared.label,
                file.device.name()
            );
            Reply::Error(Errno::EIO)
        });
        shared.send(unique, opcode, reply);
    });
    Ok(())
}

fn run_pool_op(shared: &Shared, file: &OpenFile, op: PoolOp, caller: &Caller) -> Reply {
    let device = &*file.device;
    match op {
        PoolOp::Read(read_in) => {
            match device.read(file.handle, read_in.size, read_in.offset, caller) {
                Ok(mut data) => {
                    if data.len() > read_in.size as usize {
                        log::warn!(
                            "{}: device {} returned {} bytes for a {}-byte read; truncated",
                            shared.label,
                            device.name(),
                            data.len(),
                            read_in.size
                        );
                        data.truncate(read_in.size as usize);
                    }
                    Reply::Data(data)
                }
                Err(errno) => Reply::Error(errno),
            }
        }
        PoolOp::Write(write_in, data) => {
            match device.write(file.handle, &data, write_in.offset, caller) {
                Ok(size) => Reply::of(&WriteOut { size, padding: 0 }),
                Err(errno) => Reply::Error(errno),
            }
        }
        PoolOp::Ioctl(ioctl_in, input) => {
            // Directory ioctls are only sent with FUSE_HAS_IOCTL_DIR, which we never offer.
            if ioctl_in.flags & ioctl_flags::DIR != 0 {
                return Reply::Error(Errno::ENOTTY);
            }
            let outcome = match device.ioctl(file.handle, &ioctl::call(&ioctl_in, &input), caller) {
                Ok(outcome) => outcome,
                Err(errno) => return Reply::Error(errno),
            };
            let truncated = |len| {
                log::warn!(
                    "{}: device {} returned {len} bytes for ioctl {:#x} with room for {}; truncated",
                    shared.label,
                    device.name(),
                    ioctl_in.cmd,
                    ioctl_in.out_size
                );
            };
            ioctl::reply(&ioctl_in, outcome, truncated).unwrap_or_else(|err| {
                log::error!(
                    "{}: device {}, ioctl {:#x}: {err}; the caller gets EIO",
                    shared.label,
                    device.name(),
                    ioctl_in.cmd
                );
                Reply::Error(Errno::EIO)
            })
        }
    }
}
