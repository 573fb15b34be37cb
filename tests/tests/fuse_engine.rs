//! The FUSE engine against real syscalls on a real FUSE mount.
//!
//! Each test enters a private mount namespace, mounts a toy device with `FuseFrontend` under a
//! temporary device root, and drives it with open/read/write/poll/ioctl/close from threads
//! (and one child process) of its own, checking what the kernel's driver would return. The
//! tests need root and /dev/fuse; without them they fail, they do not skip.
//!
//! Synchronisation is by channels and by watching /proc for a thread asleep in a syscall,
//! never by sleeping; the timeouts below only turn a hang into a failure.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread;
use std::time::Duration;

use cusedev::device::{
    poll_bits, Caller, Device, Errno, Handle, IoctlAnswer, IoctlCall, IoctlReply, PollWaker,
    ReadReply, WaitList, WriteReply,
};
use cusedev::fuse::{FrontendError, FuseFrontend};
use cusedev::wait::WaitState;
use cusedev_tests::syscalls::{errno, ioctl_rw, mounts_at};
use cusedev_tests::{current_tid, enter_private_mount_namespace, wait_until_sleeping_in_syscall};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// Upper bound for anything a test waits for; reaching it is a failure, not a synchronisation.
const LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Toy devices

/// What the mailbox tells the test about its insides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// A read found no data and is about to sleep (the driver lock is still held, so a write
    /// made after this event is seen by the sleeper).
    ReaderSleeping,
    /// A poll found no data and registered its waker.
    PollerRegistered,
}

#[derive(Default)]
struct MailboxState {
    open: bool,
    queued: VecDeque<u8>,
    last_write_offset: Option<u64>,
    last_read_offset: Option<u64>,
    /// Reads waiting for bytes, with their counts.
    readers: WaitList<u32, Vec<u8>>,
}

/// A single-open device: write queues bytes and wakes readers; read sleeps (interruptibly)
/// until bytes are queued and returns up to `count` of them; poll says POLLIN when bytes are
/// queued. No ioctl (ENOTTY).
struct Mailbox {
    name: String,
    state: Arc<WaitState<MailboxState>>,
    events: Sender<Event>,
}

impl Mailbox {
    fn new(name: &str) -> (Arc<Mailbox>, Receiver<Event>) {
        let (events, receiver) = mpsc::channel();
        let mailbox = Mailbox {
            name: name.to_owned(),
            state: WaitState::new(MailboxState::default()),
            events,
        };
        (Arc::new(mailbox), receiver)
    }
}

impl Device for Mailbox {
    fn name(&self) -> &str {
        &self.name
    }

    fn open(&self, _caller: &Caller, _flags: i32) -> Result<Handle, Errno> {
        let mut state = self.state.lock();
        if state.open {
            return Err(Errno::EBUSY);
        }
        state.open = true;
        Ok(1)
    }

    fn read(&self, _handle: Handle, count: u32, offset: u64, _caller: &Caller, reply: ReadReply) {
        let mut state = self.state.lock();
        state.last_read_offset = Some(offset);
        if state.queued.is_empty() {
            state.readers.park_interruptible(count, reply);
            let _ = self.events.send(Event::ReaderSleeping);
            return;
        }
        let n = state.queued.len().min(count as usize);
        reply.ok(state.queued.drain(..n).collect());
    }

    fn write(
        &self,
        _handle: Handle,
        data: &[u8],
        offset: u64,
        _caller: &Caller,
        reply: WriteReply,
    ) {
        let mut state = self.state.lock();
        state.queued.extend(data);
        state.last_write_offset = Some(offset);
        // Sleepers take what they have room for, in the order they went to sleep.
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
        let mut mask = poll_bits::POLLOUT | poll_bits::POLLWRNORM;
        if !state.queued.is_empty() {
            mask |= poll_bits::POLLIN | poll_bits::POLLRDNORM;
        } else if let Some(waker) = waker {
            self.state.add_poller(waker);
            let _ = self.events.send(Event::PollerRegistered);
        }
        mask
    }

    fn release(&self, _handle: Handle) {
        self.state.lock().open = false;
    }
}

/// `_IOWR('M', 1, [u8; 8])`: the echo device answers with the input reversed and result 42.
const ECHO_REVERSE: u32 = nix::request_code_readwrite!(b'M', 1, 8) as u32;

/// A multi-open device with one ioctl.
struct Echo;

impl Device for Echo {
    fn name(&self) -> &str {
        "vmbus/echo"
    }

    fn open(&self, _caller: &Caller, _flags: i32) -> Result<Handle, Errno> {
        Ok(7)
    }

    fn ioctl(&self, _handle: Handle, call: &IoctlCall<'_>, _caller: &Caller, reply: IoctlAnswer) {
        if call.cmd != ECHO_REVERSE {
            return reply.err(Errno::ENOTTY);
        }
        assert_eq!(call.out_size, 8);
        reply.ok(IoctlReply {
            result: 42,
            out: call.input.iter().rev().copied().collect(),
        }
        .into());
    }
}

// ---------------------------------------------------------------------------------------------
// Fixture

/// Spawning a child process copies every descriptor of this (multi-threaded) test process into
/// the child until it execs, including other tests' open device files and /dev/fuse
/// descriptors. A close(2) in another test during that window does not reach the device (the
/// child still holds the file), so its immediate reopen would see EBUSY, exactly as it would
/// with a kernel driver. Tests that spawn children therefore run alone: they take this lock
/// exclusively, all others share it.
static SPAWN_LOCK: RwLock<()> = RwLock::new(());

enum SpawnGuard {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

/// A mailbox mounted as `<dev_root>/vmbus/mailbox` in a private mount namespace.
struct Fixture {
    frontend: FuseFrontend,
    dev_root: PathBuf,
    mailbox: Arc<Mailbox>,
    events: Receiver<Event>,
    /// Dropped last, after the frontend is shut down.
    _spawn_guard: SpawnGuard,
}

impl Fixture {
    fn new(test: &str) -> Fixture {
        let guard = SPAWN_LOCK.read().unwrap_or_else(|e| e.into_inner());
        Fixture::with_guard(test, SpawnGuard::Shared(guard))
    }

    /// For a test that spawns child processes (see [`SPAWN_LOCK`]).
    fn new_spawning(test: &str) -> Fixture {
        let guard = SPAWN_LOCK.write().unwrap_or_else(|e| e.into_inner());
        Fixture::with_guard(test, SpawnGuard::Exclusive(guard))
    }

    fn with_guard(test: &str, spawn_guard: SpawnGuard) -> Fixture {
        let _ = env_logger::builder().is_test(true).try_init();
        enter_private_mount_namespace().expect("cannot enter a private mount namespace");
        let dev_root =
            std::env::temp_dir().join(format!("cusedev-fuse-engine-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&dev_root);
        fs::create_dir_all(&dev_root).unwrap();
        let frontend = FuseFrontend::new(&dev_root);
        let (mailbox, events) = Mailbox::new("vmbus/mailbox");
        frontend
            .add_device(mailbox.clone())
            .expect("cannot mount the mailbox (is /dev/fuse there, are we root?)");
        Fixture {
            frontend,
            dev_root,
            mailbox,
            events,
            _spawn_guard: spawn_guard,
        }
    }

    fn path(&self) -> PathBuf {
        self.dev_root.join("vmbus/mailbox")
    }

    fn open(&self) -> io::Result<File> {
        open_rw(&self.path())
    }

    /// Waits for `wanted`, skipping other events.
    fn expect(&self, wanted: Event) {
        loop {
            match self.events.recv_timeout(LIMIT) {
                Ok(event) if event == wanted => return,
                Ok(_) => continue,
                Err(err) => panic!("no {wanted:?} from the mailbox: {err}"),
            }
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.frontend.shutdown();
        let _ = fs::remove_dir_all(&self.dev_root);
    }
}

fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

/// read(2) once, without the EINTR retry some std helpers do.
fn read_once(file: &File, count: usize) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; count];
    let n = nix::unistd::read(file.as_raw_fd(), &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Runs `f` on a new thread that first reports its kernel tid.
fn spawn_with_tid<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> (thread::JoinHandle<()>, i32, Receiver<T>) {
    let (tid_tx, tid_rx) = mpsc::channel();
    let (result_tx, result_rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        tid_tx.send(current_tid()).unwrap();
        let _ = result_tx.send(f());
    });
    let tid = tid_rx.recv_timeout(LIMIT).unwrap();
    (handle, tid, result_rx)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn second_open_is_ebusy() {
    let fx = Fixture::new("second_open");
    let _first = fx.open().unwrap();
    assert_eq!(errno(fx.open().unwrap_err()), Errno::EBUSY);
}

#[test]
fn blocked_read_is_woken_by_a_write_from_another_thread() {
    let fx = Fixture::new("blocked_read");
    let file = fx.open().unwrap();
    let reader_file = file.try_clone().unwrap();
    let (reader, tid, result) = spawn_with_tid(move || read_once(&reader_file, 64));

    fx.expect(Event::ReaderSleeping);
    wait_until_sleeping_in_syscall(tid, &[libc::SYS_read], LIMIT);
    // The reader sleeps in the device; the write must still get through. pwrite, not write:
    // on a FUSE *regular file* read(2) and write(2) through one open file description
    // serialise on the kernel's f_pos_lock (FMODE_ATOMIC_POS), which a character device does
    // not have. pread/pwrite (what hv_fcopy_daemon uses) take no such lock.
    assert_eq!(file.write_at(b"hello", 0).unwrap(), 5);

    assert_eq!(result.recv_timeout(LIMIT).unwrap().unwrap(), b"hello");
    reader.join().unwrap();
}

#[test]
fn several_sleeping_reads_are_all_served() {
    let fx = Fixture::new("several_reads");
    let file = fx.open().unwrap();
    let (tx, rx) = mpsc::channel();
    let mut readers = Vec::new();
    for _ in 0..4 {
        let reader_file = file.try_clone().unwrap();
        let tx = tx.clone();
        // pread: concurrent read(2)s on one open file would queue on f_pos_lock in the kernel
        // (see blocked_read_is_woken_by_a_write_from_another_thread).
        readers.push(thread::spawn(move || {
            let mut byte = [0u8; 1];
            let n = reader_file.read_at(&mut byte, 0).map_err(errno);
            tx.send(n.map(|n| byte[..n].to_vec())).unwrap()
        }));
        fx.expect(Event::ReaderSleeping);
    }
    assert_eq!(file.write_at(b"abcd", 0).unwrap(), 4);
    let mut got: Vec<u8> = (0..4)
        .map(|_| {
            let data = rx.recv_timeout(LIMIT).unwrap().unwrap();
            assert_eq!(data.len(), 1);
            data[0]
        })
        .collect();
    got.sort();
    assert_eq!(got, b"abcd");
    for reader in readers {
        reader.join().unwrap();
    }
}

/// Threads of this process the FUSE engine runs (named `cusedev-fuse...`).
fn engine_threads() -> usize {
    fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("cusedev-fuse"))
        .count()
}

/// Two hundred callers asleep in pread(2) on a real FUSE mount are parked requests in the
/// engine, not threads of it; one write wakes every one of them.
#[test]
fn two_hundred_sleeping_preads_cost_the_server_no_thread_each() {
    const SLEEPERS: usize = 200;
    let fx = Fixture::new("many_sleepers");
    let file = Arc::new(fx.open().unwrap());
    let (tx, rx) = mpsc::channel();
    let mut readers = Vec::new();
    for _ in 0..SLEEPERS {
        let reader_file = file.clone();
        let tx = tx.clone();
        let reader = thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || {
                let mut byte = [0u8; 1];
                let n = reader_file.read_at(&mut byte, 0).map_err(errno);
                tx.send(n.map(|n| byte[..n].to_vec())).unwrap()
            })
            .unwrap();
        readers.push(reader);
    }
    for _ in 0..SLEEPERS {
        fx.expect(Event::ReaderSleeping);
    }
    // Every session of this test binary (tests run in parallel) has at most MAX_READERS
    // readers; a thread per sleeper would be two hundred of them.
    let threads = engine_threads();
    assert!(
        threads < SLEEPERS / 4,
        "{threads} engine threads for {SLEEPERS} sleeping calls"
    );
    let data = vec![b'x'; SLEEPERS];
    assert_eq!(file.write_at(&data, 0).unwrap(), SLEEPERS);
    for _ in 0..SLEEPERS {
        assert_eq!(rx.recv_timeout(LIMIT).unwrap().unwrap(), b"x");
    }
    for reader in readers {
        reader.join().unwrap();
    }
}

extern "C" fn ignore_signal(_: libc::c_int) {}

#[test]
fn signal_interrupts_a_blocked_read_with_eintr() {
    let fx = Fixture::new("signal_eintr");
    // No SA_RESTART: an interrupted read(2) returns EINTR instead of being restarted.
    let action = SigAction::new(
        SigHandler::Handler(ignore_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler does nothing, so it is async-signal-safe; installing it for
    // SIGUSR1 affects no other code in this test binary.
    unsafe { signal::sigaction(Signal::SIGUSR1, &action) }.unwrap();

    let file = fx.open().unwrap();
    let reader_file = file.try_clone().unwrap();
    let (reader, tid, result) = spawn_with_tid(move || read_once(&reader_file, 64));
    fx.expect(Event::ReaderSleeping);
    wait_until_sleeping_in_syscall(tid, &[libc::SYS_read], LIMIT);

    nix::sys::pthread::pthread_kill(reader.as_pthread_t(), Signal::SIGUSR1).unwrap();

    assert_eq!(result.recv_timeout(LIMIT).unwrap(), Err(Errno::EINTR));
    reader.join().unwrap();
    // The interrupted read took nothing: the next write is read whole.
    (&file).write_all(b"after").unwrap();
    assert_eq!(read_once(&file, 64).unwrap(), b"after");
}

#[test]
fn sigkilled_reader_releases_the_device() {
    let fx = Fixture::new_spawning("sigkill");
    let mut child = Command::new("dd")
        .arg(format!("if={}", fx.path().display()))
        .args(["of=/dev/null", "bs=16", "count=1", "status=none"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    fx.expect(Event::ReaderSleeping);
    assert_eq!(errno(fx.open().unwrap_err()), Errno::EBUSY);

    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());

    // The kernel interrupted the read, we answered EINTR, the process died and closed the
    // device; the RELEASE is queued before the reopen and served first.
    let file = fx.open().unwrap();
    (&file).write_all(b"x").unwrap();
    assert_eq!(read_once(&file, 1).unwrap(), b"x");
}

#[test]
fn poll_wakes_when_another_thread_writes() {
    let fx = Fixture::new("poll_wake");
    let file = fx.open().unwrap();
    let poller_file = file.try_clone().unwrap();
    let (poller, tid, result) = spawn_with_tid(move || {
        let mut fds = [PollFd::new(poller_file.as_fd(), PollFlags::POLLIN)];
        nix::poll::poll(&mut fds, PollTimeout::NONE).map(|n| (n, fds[0].revents()))
    });

    fx.expect(Event::PollerRegistered);
    wait_until_sleeping_in_syscall(tid, &[libc::SYS_poll, libc::SYS_ppoll], LIMIT);
    (&file).write_all(b"!").unwrap();

    let (ready, revents) = result.recv_timeout(LIMIT).unwrap().unwrap();
    assert_eq!(ready, 1);
    assert!(revents.unwrap().contains(PollFlags::POLLIN), "{revents:?}");
    poller.join().unwrap();
}

#[test]
fn poll_reports_readiness_without_waiting() {
    let fx = Fixture::new("poll_ready");
    let file = fx.open().unwrap();
    let mut fds = [PollFd::new(
        file.as_fd(),
        PollFlags::POLLIN | PollFlags::POLLOUT,
    )];
    assert_eq!(nix::poll::poll(&mut fds, PollTimeout::ZERO).unwrap(), 1);
    assert_eq!(fds[0].revents(), Some(PollFlags::POLLOUT));
    (&file).write_all(b"data").unwrap();
    assert_eq!(nix::poll::poll(&mut fds, PollTimeout::ZERO).unwrap(), 1);
    assert_eq!(
        fds[0].revents(),
        Some(PollFlags::POLLIN | PollFlags::POLLOUT)
    );
}

#[test]
fn ioctl_without_driver_support_is_enotty() {
    let fx = Fixture::new("ioctl_enotty");
    let file = fx.open().unwrap();
    let mut buf = *b"12345678";
    assert_eq!(ioctl_rw(&file, ECHO_REVERSE, &mut buf), Err(Errno::ENOTTY));
}

#[test]
fn ioctl_input_and_output_reach_the_device() {
    let fx = Fixture::new("ioctl_echo");
    fx.frontend.add_device(Arc::new(Echo)).unwrap();
    let file = open_rw(&fx.dev_root.join("vmbus/echo")).unwrap();
    let mut buf = *b"12345678";
    assert_eq!(ioctl_rw(&file, ECHO_REVERSE, &mut buf), Ok(42));
    assert_eq!(&buf, b"87654321");
    let other = nix::request_code_readwrite!(b'M', 2, 8) as u32;
    assert_eq!(ioctl_rw(&file, other, &mut buf), Err(Errno::ENOTTY));
}

#[test]
fn pread_and_pwrite_at_an_offset_work_and_reach_the_device() {
    let fx = Fixture::new("pread_offset");
    let file = fx.open().unwrap();
    assert_eq!(file.write_at(b"abc", 100).unwrap(), 3);
    let mut buf = [0u8; 16];
    let n = file.read_at(&mut buf, 4096).unwrap();
    assert_eq!(&buf[..n], b"abc");
    let state = fx.mailbox.state.lock();
    assert_eq!(state.last_write_offset, Some(100));
    assert_eq!(state.last_read_offset, Some(4096));
}

#[test]
fn large_write_and_short_read_pass_through() {
    let fx = Fixture::new("large_write");
    let file = fx.open().unwrap();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
    assert_eq!((&file).write(&data).unwrap(), data.len());
    // A read asking for more than is queued returns what is there (a short read).
    let mut got = Vec::new();
    while got.len() < data.len() {
        let chunk = read_once(&file, 2 << 20).unwrap();
        assert!(!chunk.is_empty());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, data);
}

#[test]
fn stat_shows_a_regular_file_with_mode_0600_owned_by_root() {
    let fx = Fixture::new("stat");
    let meta = fs::metadata(fx.path()).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!(
        (meta.uid(), meta.gid(), meta.len(), meta.nlink()),
        (0, 0, 0, 1)
    );
    let dir = fs::metadata(fx.dev_root.join("vmbus")).unwrap();
    assert!(dir.is_dir());
    assert_eq!(dir.mode() & 0o7777, 0o755);
    assert_eq!((dir.uid(), dir.gid()), (0, 0));
}

#[test]
fn readdir_lists_the_devices_of_the_directory() {
    let fx = Fixture::new("readdir");
    fx.frontend.add_device(Arc::new(Echo)).unwrap();
    let mut names: Vec<String> = fs::read_dir(fx.dev_root.join("vmbus"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["echo", "mailbox"]);
    // Both devices share one mount.
    assert_eq!(fx.frontend.mount_points(), [fx.dev_root.join("vmbus")]);
}

#[test]
fn removed_device_is_enoent_for_new_opens_but_open_files_keep_working() {
    let fx = Fixture::new("remove");
    let file = fx.open().unwrap();
    fx.frontend.remove_device("vmbus/mailbox").unwrap();

    assert_eq!(errno(fx.open().unwrap_err()), Errno::ENOENT);
    assert_eq!(errno(fs::metadata(fx.path()).unwrap_err()), Errno::ENOENT);
    (&file).write_all(b"still here").unwrap();
    assert_eq!(read_once(&file, 64).unwrap(), b"still here");
    assert!(file.metadata().unwrap().is_file());

    // Registering the name again gives a new device that opens.
    drop(file);
    let (again, _events) = Mailbox::new("vmbus/mailbox");
    fx.frontend.add_device(again).unwrap();
    fx.open().unwrap();
    assert!(matches!(
        fx.frontend.remove_device("vmbus/nothing"),
        Err(FrontendError::NotRegistered { .. })
    ));
}

#[test]
fn close_then_immediate_reopen_succeeds() {
    let fx = Fixture::new("reopen");
    for i in 0..200 {
        let file = fx
            .open()
            .unwrap_or_else(|err| panic!("open #{i} after close: {err}"));
        drop(file);
    }
}

#[test]
fn duplicate_device_name_is_refused() {
    let fx = Fixture::new("duplicate");
    let (twin, _events) = Mailbox::new("vmbus/mailbox");
    assert!(matches!(
        fx.frontend.add_device(twin),
        Err(FrontendError::AlreadyRegistered { .. })
    ));
}

#[test]
fn stale_mount_is_replaced() {
    let fx = Fixture::new("stale");
    // A FUSE mount whose server is gone: mount, then close the connection's descriptor.
    let stale = fx.dev_root.join("stale");
    fs::create_dir_all(&stale).unwrap();
    let fuse = open_rw(Path::new("/dev/fuse")).unwrap();
    nix::mount::mount(
        Some("cusedev"),
        &stale,
        Some("fuse.cusedev"),
        nix::mount::MsFlags::empty(),
        Some(
            format!(
                "fd={},rootmode=40000,user_id=0,group_id=0",
                fuse.as_raw_fd()
            )
            .as_str(),
        ),
    )
    .unwrap();
    drop(fuse);
    assert_eq!(errno(fs::metadata(&stale).unwrap_err()), Errno::ENOTCONN);

    let (boxed, _events) = Mailbox::new("stale/box");
    fx.frontend.add_device(boxed).unwrap();
    let file = open_rw(&stale.join("box")).unwrap();
    (&file).write_all(b"fresh").unwrap();
    assert_eq!(read_once(&file, 64).unwrap(), b"fresh");
}

#[test]
fn shutdown_unmounts_and_ends_open_files() {
    let fx = Fixture::new("shutdown");
    let file = fx.open().unwrap();
    let mount_point = fx.dev_root.join("vmbus");
    assert_eq!(mounts_at(&mount_point), 1);
    fx.frontend.shutdown();
    assert_eq!(mounts_at(&mount_point), 0);
    // The session is gone: the still-open file's connection was aborted.
    assert_eq!(errno((&file).write(b"x").unwrap_err()), Errno::ENOTCONN);
    // And the device was told the file is closed.
    assert!(!fx.mailbox.state.lock().open);
    let (late, _events) = Mailbox::new("vmbus/late");
    assert!(matches!(
        fx.frontend.add_device(late),
        Err(FrontendError::ShutDown)
    ));
}

#[test]
fn shutdown_interrupts_a_read_sleeping_in_the_device() {
    let fx = Fixture::new("shutdown_sleeper");
    let file = fx.open().unwrap();
    let reader_file = file.try_clone().unwrap();
    let (reader, _tid, result) = spawn_with_tid(move || read_once(&reader_file, 64));
    fx.expect(Event::ReaderSleeping);
    fx.frontend.shutdown();
    // The device saw the interrupt; the kernel had the connection aborted under the caller.
    let err = result.recv_timeout(LIMIT).unwrap().unwrap_err();
    assert!(
        matches!(err, Errno::EINTR | Errno::ENOTCONN | Errno::ECONNABORTED),
        "{err}"
    );
    reader.join().unwrap();
}

#[test]
fn write_from_a_child_process_with_o_trunc_reaches_the_device() {
    // dd opens with O_WRONLY|O_CREAT|O_TRUNC: the truncation arrives as a SETATTR, which a
    // device node ignores; the file is then closed by another process, and the device free.
    let fx = Fixture::new_spawning("child_close");
    let status = Command::new("dd")
        .arg(format!("of={}", fx.path().display()))
        .args(["bs=5", "count=1", "status=none"])
        .stdin(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(b"child")?;
            child.wait()
        })
        .unwrap();
    assert!(status.success());
    let file = fx.open().unwrap();
    let mut buf = [0u8; 5];
    (&file).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"child");
}
