//! `preload-check MODE ...`: small checks of an open device file that the frontend tests run
//! the same way on every frontend (tests/tests/preload.rs), each printing `CHECK ok NAME` or
//! `CHECK FAIL NAME: what happened`, then `CHECK done failures=N` (exit status 1 if any
//! failed). Lines starting `INFO` say how, and differ between runs.
//!
//! - `open-errno PATH`: `open PATH: ok` or `open PATH: errno ENAME` (exit 0 either way); the
//!   tests ask it whether an unprivileged user can open /dev/fuse.
//! - `fork NODE`: on /dev/vmbus/hv_fcopy (Linux 6.1 profile, no daemon registered): a file
//!   opened before fork(2) is the child's too. The child makes a device call on it, the parent
//!   closes its copy, and the child's next call still works; the file stays open (a second
//!   open is EBUSY) until its last descriptor goes, and then the device is released (a new
//!   open succeeds), as the kernel's last fput releases it.
//! - `eintr NODE`: on the same node, a signal to a thread blocked in a device read ends the
//!   read with EINTR, and the device still answers afterwards.
//!
//! The expectations are the driver's (drivers/hv/hv_utils_transport.c, Linux 6.1: one open at
//! a time, `hvt_op_release` frees it; spec/fcopy.md §4).

use std::os::fd::RawFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cusedev_tests::blocking::{install_sigusr1_without_restart, Blocking};
use cusedev_tests::dev::{u32_at, Dev};
use nix::errno::Errno;

/// How long the release of a closed file may take to reach the device.
const RELEASE_LIMIT: Duration = Duration::from_secs(10);

struct Checks {
    failures: usize,
}

impl Checks {
    fn report(&mut self, name: &str, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => println!("CHECK ok {name}"),
            Err(why) => {
                self.failures += 1;
                println!("CHECK FAIL {name}: {why}");
            }
        }
    }

    fn finish(self) -> ExitCode {
        println!("CHECK done failures={}", self.failures);
        if self.failures == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

fn expect<T: std::fmt::Debug + PartialEq>(what: &str, got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

/// What a call returned, in a form that crosses a pipe: the count, or minus the errno.
fn encode(result: Result<usize, Errno>) -> i64 {
    match result {
        Ok(n) => n as i64,
        Err(e) => -(e as i64),
    }
}

fn decode(value: i64) -> Result<usize, Errno> {
    if value < 0 {
        Err(Errno::from_raw(-value as i32))
    } else {
        Ok(value as usize)
    }
}

fn pipe() -> (RawFd, RawFd) {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints for pipe(2) to fill.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", Errno::last());
    (fds[0], fds[1])
}

fn send(fd: RawFd, value: i64) {
    let bytes = value.to_ne_bytes();
    // SAFETY: bytes is a valid 8-byte buffer.
    let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    assert_eq!(n, 8, "pipe write: {}", Errno::last());
}

/// The next value from the other process, or None when it closed its end.
fn receive(fd: RawFd) -> Option<i64> {
    let mut bytes = [0u8; 8];
    // SAFETY: bytes is a valid, writable 8-byte buffer.
    let n = unsafe { libc::read(fd, bytes.as_mut_ptr().cast(), bytes.len()) };
    (n == 8).then(|| i64::from_ne_bytes(bytes))
}

/// `open(path, O_RDWR)` as the daemons open it (not O_CLOEXEC: the fork check wants the
/// child to have it, and this process execs nothing).
fn open_plain(path: &str) -> Result<RawFd, Errno> {
    let c = std::ffi::CString::new(path).map_err(|_| Errno::EINVAL)?;
    // SAFETY: c is a valid NUL-terminated string.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR) };
    if fd < 0 {
        Err(Errno::last())
    } else {
        Ok(fd)
    }
}

fn close(fd: RawFd) -> Result<(), Errno> {
    // SAFETY: fd is a descriptor this process opened and closes once.
    Errno::result(unsafe { libc::close(fd) }).map(drop)
}

fn write_u32(fd: RawFd, value: u32) -> Result<usize, Errno> {
    let bytes = value.to_ne_bytes();
    // SAFETY: bytes is a valid 4-byte buffer.
    let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    Errno::result(n).map(|n| n as usize)
}

/// `pread(fd, 4 bytes, 0)`: the handshake reply's length, or the version when it is 4 bytes
/// (encoded as 4 + version << 8, so one number says both).
fn pread_reply(fd: RawFd) -> Result<usize, Errno> {
    let mut buf = [0u8; 4];
    // SAFETY: buf is a valid, writable 4-byte buffer.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = Errno::result(n)? as usize;
    Ok(if n == 4 {
        4 + ((u32_at(&buf, 0) as usize) << 8)
    } else {
        n
    })
}

/// The reply to a version-1 handshake as [`pread_reply`] encodes it.
const VERSION_1_REPLY: usize = 4 + (1 << 8);

/// Opens `node` until it stops saying EBUSY (the last close's release may still be on its way
/// to the device), at most [`RELEASE_LIMIT`]; returns the open and how many EBUSY came first.
fn open_after_release(node: &str) -> (Result<RawFd, Errno>, usize) {
    let deadline = Instant::now() + RELEASE_LIMIT;
    let mut busy = 0;
    loop {
        match open_plain(node) {
            Err(Errno::EBUSY) if Instant::now() < deadline => {
                busy += 1;
                std::thread::yield_now();
            }
            other => return (other, busy),
        }
    }
}

fn fork_check(node: &str) -> ExitCode {
    let mut checks = Checks { failures: 0 };
    let fd = match open_plain(node) {
        Ok(fd) => fd,
        Err(e) => {
            checks.report("parent_opens", Err(format!("open {node}: {e}")));
            return checks.finish();
        }
    };
    checks.report("parent_opens", Ok(()));
    let (to_child_r, to_child_w) = pipe();
    let (to_parent_r, to_parent_w) = pipe();
    // SAFETY: this program is single-threaded here, so the child may do anything the parent
    // could; it ends with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", Errno::last());
    if pid == 0 {
        // The child: a device call on the inherited file, then (once the parent has closed
        // its copy) the next one, then its own close.
        send(to_parent_w, encode(write_u32(fd, 1)));
        let go = receive(to_child_r);
        let reply = if go.is_some() {
            encode(pread_reply(fd))
        } else {
            -(Errno::EPIPE as i64)
        };
        send(to_parent_w, reply);
        send(to_parent_w, encode(close(fd).map(|()| 0)));
        // SAFETY: _exit ends the forked child without running the parent's atexit handlers.
        unsafe { libc::_exit(0) };
    }
    let _ = close(to_child_r);
    let _ = close(to_parent_w);
    let handshake = receive(to_parent_r).map(decode);
    checks.report(
        "child_calls_the_device_on_the_inherited_file",
        expect("child's version write", handshake, Some(Ok(4))),
    );
    checks.report("parent_closes_its_copy", expect("close", close(fd), Ok(())));
    // The child still holds the file: it is open, so the single-open driver says EBUSY.
    let second = open_plain(node);
    checks.report(
        "open_while_the_child_holds_it_is_ebusy",
        expect("open", second.map(|_| ()), Err(Errno::EBUSY)),
    );
    if let Ok(extra) = second {
        let _ = close(extra);
    }
    send(to_child_w, 1);
    let reply = receive(to_parent_r).map(decode);
    checks.report(
        "child_call_after_the_parent_closed_works",
        expect(
            "child's pread of the reply (4 + version << 8)",
            reply,
            Some(Ok(VERSION_1_REPLY)),
        ),
    );
    let child_close = receive(to_parent_r).map(decode);
    checks.report(
        "child_closes_the_last_copy",
        expect("child's close", child_close, Some(Ok(0))),
    );
    let mut status = 0;
    // SAFETY: pid is our child; status is a valid int.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    checks.report(
        "child_exits_0",
        expect("waitpid", (waited, status), (pid, 0)),
    );
    // Both copies closed: the device was released and opens again, with a new handshake.
    let (reopened, busy) = open_after_release(node);
    println!("INFO reopen after the last close saw EBUSY {busy} times first");
    checks.report(
        "open_after_the_last_close_succeeds",
        expect("open", reopened.map(|_| ()), Ok(())),
    );
    if let Ok(fd) = reopened {
        checks.report(
            "the_released_file_starts_a_new_handshake",
            expect("version write", write_u32(fd, 1), Ok(4))
                .and_then(|()| expect("reply", pread_reply(fd), Ok(VERSION_1_REPLY))),
        );
        let _ = close(fd);
    }
    checks.finish()
}

/// What libc's read, pread and poll can sleep in: the FUSE and CUSE frontends' read sleeps in
/// pread64 itself; the preload library's waits for its reply in poll(2) (docs/preload.md, "A
/// call"), which glibc makes with ppoll on some builds.
const READ_SLEEPS: [i64; 4] = [
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

fn eintr_check(node: &str) -> ExitCode {
    let mut checks = Checks { failures: 0 };
    install_sigusr1_without_restart();
    let dev = match Dev::open(node) {
        Ok(dev) => Arc::new(dev),
        Err(e) => {
            checks.report("opens", Err(format!("open {node}: {e}")));
            return checks.finish();
        }
    };
    let handshake = expect("version write", dev.write_u32(1), Ok(4)).and_then(|()| {
        let reply = dev.pread(4).map_err(|e| format!("pread 4: {e}"))?;
        expect("reply", (reply.len(), u32_at(&reply, 0)), (4, 1))
    });
    checks.report("handshake", handshake);
    let reader = {
        let dev = dev.clone();
        Blocking::spawn(move || dev.pread(8192))
    };
    reader.wait_blocked_in(&READ_SLEEPS);
    reader.signal();
    checks.report(
        "blocked_read_interrupted_by_a_signal_is_eintr",
        expect("interrupted read", reader.join(), Err(Errno::EINTR)),
    );
    // The interrupted read took nothing and broke nothing: no message queued, and a
    // wrong-size write is still the driver's EINVAL.
    checks.report(
        "the_device_answers_after_the_interrupt",
        expect("poll", dev.poll(0), Ok(0))
            .and_then(|()| expect("3-byte write", dev.write(&[1, 0, 0]), Err(Errno::EINVAL))),
    );
    checks.finish()
}

fn open_errno(path: &str) -> ExitCode {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => println!("open {path}: ok"),
        Err(e) => {
            let errno = Errno::from_raw(e.raw_os_error().unwrap_or(0));
            println!("open {path}: errno {errno:?}");
        }
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["open-errno", path] => open_errno(path),
        ["fork", node] => fork_check(node),
        ["eintr", node] => eintr_check(node),
        _ => {
            eprintln!("usage: preload-check open-errno PATH | fork NODE | eintr NODE");
            ExitCode::from(2)
        }
    }
}
