//! [`Caller`] against real processes: this test process, a second thread of it, forked
//! children and an exec'ing shell. Needs root for `setgroups` (as the server does for
//! `process_vm_*` and `pidfd_getfd` on other users' processes).
//!
//! A forked child of this multi-threaded test binary may not allocate or take a lock (another
//! thread may have held it at the fork), so [`Child`] runs a loop of raw syscalls on its stack
//! and answers one-byte commands over pipes; the pipes also sequence every step, with no sleep.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, gettid, pipe2, ForkResult, Pid};

use crate::caller::{Abi, Caller, CredentialIdentity, SyscallKind, TASK_SIZE_MAX};

const PAGE: usize = 4096;

fn me() -> Caller {
    Caller::detached(std::process::id())
}

fn this_thread() -> Caller {
    Caller::detached(gettid().as_raw() as u32)
}

/// Runs `f` with the tid of a second thread of this process, alive until `f` returns.
fn with_other_thread<R>(f: impl FnOnce(u32) -> R) -> R {
    let (tid_tx, tid_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        s.spawn(move || {
            tid_tx.send(gettid().as_raw() as u32).unwrap();
            let _ = done_rx.recv();
        });
        let tid = tid_rx.recv().unwrap();
        let result = f(tid);
        drop(done_tx);
        result
    })
}

/// Anonymous pages of this process, unmapped on drop.
struct Pages {
    addr: *mut u8,
    len: usize,
}

impl Pages {
    fn map(pages: usize, prot: libc::c_int) -> Pages {
        let len = pages * PAGE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks overlaps nothing.
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, -1, 0) };
        assert_ne!(addr, libc::MAP_FAILED, "mmap: {}", Errno::last());
        Pages {
            addr: addr.cast(),
            len,
        }
    }

    fn page(&self, index: usize) -> u64 {
        self.addr as u64 + (index * PAGE) as u64
    }

    fn unmap_page(&self, index: usize) {
        // SAFETY: the page is ours and nothing refers to it; Drop's munmap of the whole range
        // copes with the hole.
        let ret = unsafe { libc::munmap(self.page(index) as *mut _, PAGE) };
        assert_eq!(ret, 0);
    }

    fn protect_page(&self, index: usize, prot: libc::c_int) {
        // SAFETY: the page is ours and no Rust reference points into it.
        let ret = unsafe { libc::mprotect(self.page(index) as *mut _, PAGE, prot) };
        assert_eq!(ret, 0);
    }

    fn fill(&self, byte: u8) {
        // SAFETY: the mapping is `len` bytes, writable when this is called, and ours alone.
        unsafe { std::ptr::write_bytes(self.addr, byte, self.len) };
    }

    fn bytes(&self, index: usize) -> Vec<u8> {
        // SAFETY: the page is mapped readable when this is called and nothing writes to it.
        unsafe { std::slice::from_raw_parts(self.page(index) as *const u8, PAGE) }.to_vec()
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by us; nothing refers to it any more.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// A forked copy of this process that answers one-byte commands, killed and reaped on drop.
struct Child {
    pid: Pid,
    cmd: std::fs::File,
    ack: std::fs::File,
}

/// Child commands.
const SEND_REGION: u8 = b'b';
const SETGID_SAME: u8 = b'g';
const SETGROUPS_4242: u8 = b's';
const MAKE_PIPE: u8 = b'p';
const READ_PIPE5: u8 = b'r';

impl Child {
    /// Forks; the child can send back its copy of `region` (SEND_REGION).
    fn fork(region: &[u8]) -> Child {
        let (cmd_r, cmd_w) = pipe2(OFlag::O_CLOEXEC).unwrap();
        let (ack_r, ack_w) = pipe2(OFlag::O_CLOEXEC).unwrap();
        // SAFETY: the child runs only `child_loop`: raw syscalls on its stack and on its own
        // copy of `region`, no allocation or lock another thread may have held at the fork.
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => child_loop(cmd_r.as_raw_fd(), ack_w.as_raw_fd(), region),
            ForkResult::Parent { child } => Child {
                pid: child,
                cmd: cmd_w.into(),
                ack: ack_r.into(),
            },
        }
    }

    fn caller(&self) -> Caller {
        Caller::detached(self.pid.as_raw() as u32)
    }

    fn ask(&mut self, cmd: u8, answer_len: usize) -> Vec<u8> {
        self.cmd.write_all(&[cmd]).unwrap();
        let mut answer = vec![0; answer_len];
        self.ack.read_exact(&mut answer).unwrap();
        answer
    }

    /// Runs a command that answers a status byte (0 or an errno) and checks it is 0.
    fn run(&mut self, cmd: u8) {
        assert_eq!(self.ask(cmd, 1), [0], "child command {}", cmd as char);
    }

    /// Kills and reaps the child: after this its pid names no process.
    fn end(self) -> Caller {
        self.caller()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = kill(self.pid, Signal::SIGKILL);
        let _ = waitpid(self.pid, None);
    }
}

/// The child's side: never returns, never allocates.
fn child_loop(cmd: RawFd, ack: RawFd, region: &[u8]) -> ! {
    close_all_but(cmd, ack);
    let mut pipe_fds: [RawFd; 2] = [-1, -1];
    loop {
        let mut c = [0u8];
        if raw_read(cmd, &mut c) != 1 {
            exit(0);
        }
        match c[0] {
            SEND_REGION => raw_write(ack, region),
            SETGID_SAME => {
                // SAFETY: getgid and setgid take and return integers only.
                let ret = unsafe { libc::syscall(libc::SYS_setgid, libc::getgid()) };
                raw_write(ack, &[status(ret)]);
            }
            SETGROUPS_4242 => {
                let groups: [libc::gid_t; 1] = [4242];
                // SAFETY: the kernel reads one gid_t from `groups`, which lives across the call.
                let ret = unsafe { libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()) };
                raw_write(ack, &[status(ret)]);
            }
            MAKE_PIPE => {
                // SAFETY: the kernel writes two ints into `pipe_fds`.
                let ret = unsafe { libc::pipe2(pipe_fds.as_mut_ptr(), libc::O_CLOEXEC) };
                let mut answer = [0u8; 9];
                answer[0] = status(ret.into());
                answer[1..5].copy_from_slice(&pipe_fds[0].to_ne_bytes());
                answer[5..9].copy_from_slice(&pipe_fds[1].to_ne_bytes());
                raw_write(ack, &answer);
            }
            READ_PIPE5 => {
                let mut got = [0u8; 5];
                raw_read(pipe_fds[0], &mut got);
                raw_write(ack, &got);
            }
            _ => exit(1),
        }
    }
}

fn status(ret: libc::c_long) -> u8 {
    if ret < 0 {
        Errno::last_raw() as u8
    } else {
        0
    }
}

fn raw_read(fd: RawFd, buf: &mut [u8]) -> isize {
    // SAFETY: the kernel writes at most buf.len() bytes into buf.
    unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) }
}

fn raw_write(fd: RawFd, buf: &[u8]) {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the kernel reads at most the rest of buf.
        let n = unsafe { libc::write(fd, buf[done..].as_ptr().cast(), buf.len() - done) };
        if n <= 0 {
            exit(2);
        }
        done += n as usize;
    }
}

fn exit(code: i32) -> ! {
    // SAFETY: _exit ends the process at once, running nothing of the parent's copied state.
    unsafe { libc::_exit(code) }
}

/// Closes every descriptor above 2 but `a` and `b`, so the child holds no copy of another
/// test's pipe or socket (which would keep that test from seeing EOF).
fn close_all_but(a: RawFd, b: RawFd) {
    let (low, high) = (a.min(b) as u32, a.max(b) as u32);
    let close_range = |first: u32, last: u32| {
        if first <= last {
            // SAFETY: close_range takes integers; the descriptors it closes are owned by
            // nothing in this child that runs again.
            unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
        }
    };
    close_range(3, low.wrapping_sub(1).max(2));
    close_range(low + 1, high - 1);
    close_range(high + 1, u32::MAX);
}

// ---- memory --------------------------------------------------------------------------------

#[test]
fn read_and_write_own_memory_through_the_pid_and_through_a_thread_tid() {
    let source: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
    let mut copy = vec![0u8; source.len()];
    me().read_memory(source.as_ptr() as u64, &mut copy).unwrap();
    assert_eq!(copy, source);

    with_other_thread(|tid| {
        let thread = Caller::detached(tid);
        let mut copy = vec![0u8; source.len()];
        thread
            .read_memory(source.as_ptr() as u64, &mut copy)
            .unwrap();
        assert_eq!(copy, source);
        let mut target = vec![0u8; 100];
        thread
            .write_memory(target.as_mut_ptr() as u64, &source[..100])
            .unwrap();
        assert_eq!(std::hint::black_box(&target)[..], source[..100]);
    });
}

#[test]
fn read_and_write_reach_a_forked_childs_memory_not_ours() {
    let mut region = vec![0xaa_u8; PAGE];
    let addr = region.as_ptr() as u64;
    let mut child = Child::fork(&region);
    region.fill(0xbb);

    let mut seen = vec![0u8; PAGE];
    child.caller().read_memory(addr, &mut seen).unwrap();
    assert!(
        seen.iter().all(|&b| b == 0xaa),
        "read our copy, not the child's"
    );

    child.caller().write_memory(addr, &[0xcc; PAGE]).unwrap();
    assert!(child.ask(SEND_REGION, PAGE).iter().all(|&b| b == 0xcc));
    assert!(std::hint::black_box(&region).iter().all(|&b| b == 0xbb));
}

#[test]
fn read_across_an_unmapped_middle_page_is_efault_with_the_rest_zeroed() {
    let pages = Pages::map(3, libc::PROT_READ | libc::PROT_WRITE);
    pages.fill(0x11);
    pages.unmap_page(1);

    let mut buf = vec![0xff_u8; 3 * PAGE];
    assert_eq!(
        me().read_memory(pages.page(0), &mut buf),
        Err(Errno::EFAULT)
    );
    // copy_from_user keeps what it copied before the fault and zeroes the rest.
    assert!(buf[..PAGE].iter().all(|&b| b == 0x11));
    assert!(buf[PAGE..].iter().all(|&b| b == 0));

    let mut one = vec![0u8; PAGE];
    me().read_memory(pages.page(2), &mut one).unwrap();
    assert!(one.iter().all(|&b| b == 0x11));
    assert_eq!(
        me().read_memory(pages.page(1) + 100, &mut one[..10]),
        Err(Errno::EFAULT)
    );
}

#[test]
fn write_across_an_unmapped_middle_page_is_efault_after_writing_up_to_it() {
    let pages = Pages::map(3, libc::PROT_READ | libc::PROT_WRITE);
    pages.fill(0x11);
    pages.unmap_page(1);
    assert_eq!(
        me().write_memory(pages.page(0), &vec![0x22; 3 * PAGE]),
        Err(Errno::EFAULT)
    );
    // As copy_to_user: the bytes before the fault are written, those after it are not.
    assert!(pages.bytes(0).iter().all(|&b| b == 0x22));
    assert!(pages.bytes(2).iter().all(|&b| b == 0x11));
}

#[test]
fn write_to_a_read_only_page_is_efault() {
    let pages = Pages::map(1, libc::PROT_READ);
    assert_eq!(
        me().write_memory(pages.page(0), &[1, 2, 3]),
        Err(Errno::EFAULT)
    );
    assert!(pages.bytes(0).iter().all(|&b| b == 0));
}

#[test]
fn address_zero_is_efault() {
    let mut buf = [0u8; 8];
    assert_eq!(me().read_memory(0, &mut buf), Err(Errno::EFAULT));
    assert_eq!(me().write_memory(0, &buf), Err(Errno::EFAULT));
}

#[test]
fn addresses_from_task_size_max_up_are_efault() {
    let mut buf = [0u8; 8];
    // The last user page, the vsyscall page, the kernel's direct map.
    for addr in [TASK_SIZE_MAX, 0xffff_ffff_ff60_0000, 0xffff_8880_0000_0000] {
        assert_eq!(me().read_memory(addr, &mut buf), Err(Errno::EFAULT));
        assert_eq!(me().write_memory(addr, &buf), Err(Errno::EFAULT));
    }
    // Ending past the limit.
    assert_eq!(
        me().read_memory(TASK_SIZE_MAX - 4, &mut buf),
        Err(Errno::EFAULT)
    );
}

#[test]
fn a_range_wrapping_past_the_top_is_efault() {
    let mut buf = [0u8; 100];
    assert_eq!(
        me().read_memory(u64::MAX - 10, &mut buf),
        Err(Errno::EFAULT)
    );
    assert_eq!(me().write_memory(u64::MAX, &buf[..1]), Err(Errno::EFAULT));
}

#[test]
fn zero_bytes_succeed_at_any_address() {
    assert_eq!(me().read_memory(0, &mut []), Ok(()));
    assert_eq!(me().read_memory(u64::MAX, &mut []), Ok(()));
    assert_eq!(me().write_memory(0, &[]), Ok(()));
    assert_eq!(me().write_memory(u64::MAX, &[]), Ok(()));
    assert_eq!(me().check_writable_range(u64::MAX, 0), Ok(()));
}

#[test]
fn a_32_mib_round_trip_compares_equal() {
    let source: Vec<u8> = (0..32u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let mut copy = vec![0u8; source.len()];
    this_thread()
        .read_memory(source.as_ptr() as u64, &mut copy)
        .unwrap();
    let mut back = vec![0u8; source.len()];
    this_thread()
        .write_memory(back.as_mut_ptr() as u64, &copy)
        .unwrap();
    assert!(std::hint::black_box(&back) == &source);
}

#[test]
fn a_caller_that_has_exited_gets_efault_and_ebadf() {
    let region = [7u8; 16];
    let gone = Child::fork(&region).end();
    let mut buf = [0u8; 16];
    assert_eq!(
        gone.read_memory(region.as_ptr() as u64, &mut buf),
        Err(Errno::EFAULT)
    );
    assert_eq!(
        gone.write_memory(region.as_ptr() as u64, &buf),
        Err(Errno::EFAULT)
    );
    assert_eq!(
        gone.check_writable_range(region.as_ptr() as u64, 16),
        Err(Errno::EFAULT)
    );
    assert_eq!(gone.get_fd(0).unwrap_err(), Errno::EBADF);
    assert_eq!(gone.credentials(), Err(Errno::ESRCH));
}

// ---- check_writable_range ------------------------------------------------------------------

#[test]
fn writable_range_is_ok_on_heap_and_rw_mmap() {
    let heap = vec![0u8; 3 * PAGE];
    assert_eq!(
        me().check_writable_range(heap.as_ptr() as u64, heap.len() as u64),
        Ok(())
    );
    let pages = Pages::map(3, libc::PROT_READ | libc::PROT_WRITE);
    // Unaligned, crossing into the third page.
    assert_eq!(
        this_thread().check_writable_range(pages.page(0) + 100, 2 * PAGE as u64 + 1),
        Ok(())
    );
}

#[test]
fn writable_range_is_efault_on_a_read_only_mapping() {
    let pages = Pages::map(1, libc::PROT_READ);
    assert_eq!(
        me().check_writable_range(pages.page(0), 8),
        Err(Errno::EFAULT)
    );
    let none = Pages::map(1, libc::PROT_NONE);
    assert_eq!(
        me().check_writable_range(none.page(0), 8),
        Err(Errno::EFAULT)
    );
}

#[test]
fn writable_range_is_efault_on_a_string_literal_in_rodata() {
    let literal: &'static str = "a string literal that lives in .rodata";
    assert_eq!(
        me().check_writable_range(literal.as_ptr() as u64, literal.len() as u64),
        Err(Errno::EFAULT)
    );
}

#[test]
fn writable_range_is_efault_on_an_unmapped_hole() {
    let pages = Pages::map(3, libc::PROT_READ | libc::PROT_WRITE);
    pages.unmap_page(1);
    let check = |addr, len| me().check_writable_range(addr, len);
    assert_eq!(check(pages.page(0), PAGE as u64), Ok(()));
    assert_eq!(check(pages.page(1) + 10, 10), Err(Errno::EFAULT));
    assert_eq!(check(pages.page(0), 3 * PAGE as u64), Err(Errno::EFAULT));
    // The last byte of page 0 alone pins page 0 only; one more byte reaches the hole.
    assert_eq!(check(pages.page(1) - 1, 1), Ok(()));
    assert_eq!(check(pages.page(1) - 1, 2), Err(Errno::EFAULT));
}

#[test]
fn writable_range_straddling_rw_and_ro_mappings_is_efault() {
    let pages = Pages::map(2, libc::PROT_READ | libc::PROT_WRITE);
    pages.protect_page(1, libc::PROT_READ);
    let check = |addr, len| me().check_writable_range(addr, len);
    assert_eq!(check(pages.page(0), PAGE as u64), Ok(()));
    assert_eq!(check(pages.page(0) + 8, PAGE as u64), Err(Errno::EFAULT));
}

#[test]
fn writable_range_is_ok_on_a_shared_memfd_mapping_read_through_smaps() {
    // SAFETY: memfd_create reads the NUL-terminated name; it lives across the call.
    let fd = unsafe { libc::memfd_create(c"caller-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is a new descriptor that nothing else owns.
    let memfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let file = std::fs::File::from(memfd);
    file.set_len(PAGE as u64).unwrap();
    let (rw, shared) = (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED);
    // SAFETY: a fresh shared mapping of our memfd at an address the kernel picks.
    let addr = unsafe { libc::mmap(std::ptr::null_mut(), PAGE, rw, shared, fd, 0) };
    assert_ne!(addr, libc::MAP_FAILED);
    let result = me().check_writable_range(addr as u64, PAGE as u64);
    // SAFETY: our mapping; nothing refers to it.
    unsafe { libc::munmap(addr, PAGE) };
    assert_eq!(result, Ok(()));
}

#[test]
fn writable_range_is_efault_on_secretmem_and_vdso() {
    // SAFETY: memfd_secret takes an integer flag.
    let fd = unsafe { libc::syscall(libc::SYS_memfd_secret, libc::O_CLOEXEC) };
    if fd >= 0 {
        // SAFETY: fd is a new descriptor that nothing else owns.
        let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as RawFd) };
        let file = std::fs::File::from(owned);
        file.set_len(PAGE as u64).unwrap();
        let (rw, shared) = (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED);
        let fd = file.as_raw_fd();
        // SAFETY: a fresh shared mapping of our secretmem fd at an address the kernel picks.
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), PAGE, rw, shared, fd, 0) };
        if addr != libc::MAP_FAILED {
            let result = me().check_writable_range(addr as u64, 8);
            // SAFETY: our mapping; nothing refers to it.
            unsafe { libc::munmap(addr, PAGE) };
            assert_eq!(result, Err(Errno::EFAULT));
        }
    } else {
        eprintln!(
            "memfd_secret: {} (secretmem off here): part skipped",
            Errno::last()
        );
    }
    // SAFETY: getauxval reads a value the loader stored.
    let vdso = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
    assert_ne!(vdso, 0);
    assert_eq!(me().check_writable_range(vdso, 8), Err(Errno::EFAULT));
}

#[test]
fn writable_range_reads_the_callers_maps_not_ours() {
    let pages = Pages::map(1, libc::PROT_READ | libc::PROT_WRITE);
    let child = Child::fork(&[]);
    pages.protect_page(0, libc::PROT_READ);
    assert_eq!(
        me().check_writable_range(pages.page(0), 8),
        Err(Errno::EFAULT)
    );
    assert_eq!(
        child.caller().check_writable_range(pages.page(0), 8),
        Ok(())
    );
}

#[test]
fn writable_range_beyond_the_user_limit_is_efault() {
    assert_eq!(
        me().check_writable_range(TASK_SIZE_MAX - 1, 2),
        Err(Errno::EFAULT)
    );
    assert_eq!(
        me().check_writable_range(u64::MAX - 1, 4),
        Err(Errno::EFAULT)
    );
}

// ---- descriptors ---------------------------------------------------------------------------

#[test]
fn get_fd_from_a_thread_tid_gives_a_working_dup_of_our_pipe() {
    let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC).unwrap();
    let dup = with_other_thread(|tid| Caller::detached(tid).get_fd(write_end.as_raw_fd())).unwrap();
    assert_ne!(dup.as_raw_fd(), write_end.as_raw_fd());
    std::fs::File::from(dup).write_all(b"hello").unwrap();
    let mut got = [0u8; 5];
    std::fs::File::from(read_end).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
}

#[test]
fn get_fd_fetches_the_childs_descriptor() {
    let mut child = Child::fork(&[]);
    let answer = child.ask(MAKE_PIPE, 9);
    assert_eq!(answer[0], 0);
    let write_end = i32::from_ne_bytes(answer[5..9].try_into().unwrap());
    let dup = child.caller().get_fd(write_end).unwrap();
    std::fs::File::from(dup).write_all(b"howdy").unwrap();
    assert_eq!(child.ask(READ_PIPE5, 5), b"howdy");
}

#[test]
fn get_fd_of_a_descriptor_not_open_in_the_caller_is_ebadf() {
    // The child closed everything above 2 but its two command pipes.
    let child = Child::fork(&[]);
    for fd in [100, -1, i32::MAX] {
        assert_eq!(child.caller().get_fd(fd).unwrap_err(), Errno::EBADF);
    }
}

// ---- identity ------------------------------------------------------------------------------

#[test]
fn tid_is_the_header_pid_and_tgid_is_the_process() {
    with_other_thread(|tid| {
        let thread = Caller::detached(tid);
        assert_eq!(thread.tid(), tid);
        assert_ne!(tid, std::process::id());
        assert_eq!(thread.tgid(), Ok(std::process::id()));
    });
    assert_eq!(me().tgid(), Ok(std::process::id()));
}

#[test]
fn credentials_of_one_thread_twice_are_equal() {
    let first = this_thread().credentials().unwrap();
    assert_eq!(this_thread().credentials().unwrap(), first);
}

#[test]
fn credentials_of_two_threads_of_one_process_are_equal() {
    let ours = this_thread().credentials().unwrap();
    let other = with_other_thread(|tid| Caller::detached(tid).credentials()).unwrap();
    assert_eq!(other, ours);
    assert_eq!(me().credentials().unwrap(), ours);
}

#[test]
fn credentials_of_a_forked_child_differ_from_the_parents() {
    let child = Child::fork(&[]);
    assert_ne!(
        child.caller().credentials().unwrap(),
        me().credentials().unwrap()
    );
}

/// A child's identity before and after it runs `cmd`.
fn identity_around(cmd: u8) -> (CredentialIdentity, CredentialIdentity) {
    let mut child = Child::fork(&[]);
    let before = child.caller().credentials().unwrap();
    child.run(cmd);
    (before, child.caller().credentials().unwrap())
}

/// The known difference: the kernel's `setgid` commits a new cred (another pointer) even when
/// the value stays; nothing userspace can see changes.
#[test]
fn setgid_to_the_same_gid_keeps_the_identity_unlike_the_kernels_pointer() {
    let (before, after) = identity_around(SETGID_SAME);
    assert_eq!(after, before);
}

#[test]
fn setgroups_to_another_list_changes_the_identity() {
    let (before, after) = identity_around(SETGROUPS_4242);
    assert_ne!(after, before);
}

#[test]
fn exec_changes_the_identity() {
    let mut shell = Command::new("/bin/sh")
        .args(["-c", "echo one; read x; exec /bin/sh -c 'echo two; read y'"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let caller = Caller::detached(shell.id());
    let mut stdin = shell.stdin.take().unwrap();
    let mut stdout = std::io::BufReader::new(shell.stdout.take().unwrap());
    let mut line = String::new();
    let mut next_line = |line: &mut String| {
        line.clear();
        std::io::BufRead::read_line(&mut stdout, line).unwrap();
        line.trim().to_string()
    };

    assert_eq!(next_line(&mut line), "one");
    let before = caller.credentials().unwrap();
    assert_eq!(caller.credentials().unwrap(), before);
    stdin.write_all(b"\n").unwrap();
    assert_eq!(next_line(&mut line), "two");
    let after = caller.credentials().unwrap();
    assert_ne!(after, before);

    // EOF ends `read y` (with status 1) and the shell.
    drop(stdin);
    shell.wait().unwrap();
}

#[test]
fn abi_of_this_test_binary_is_x86_64_and_of_a_gone_thread_esrch() {
    assert_eq!(me().abi(), Ok(Abi::X86_64));
    assert_eq!(Abi::X86_64.word_bytes(), 8);
    assert_eq!(Abi::I386.word_bytes(), 4);
    assert_eq!(Caller::detached(0).abi(), Err(Errno::ESRCH));
}

#[test]
fn blocked_syscall_shows_the_buffer_of_a_thread_blocked_in_read() {
    let (reader, writer) = pipe2(OFlag::O_CLOEXEC).unwrap();
    let mut buf = vec![0u8; 64];
    let buf_addr = buf.as_mut_ptr() as u64;
    let (tid_tx, tid_rx) = mpsc::channel();
    std::thread::scope(|s| {
        let reader = &reader;
        let buf = &mut buf;
        s.spawn(move || {
            tid_tx.send(gettid().as_raw() as u32).unwrap();
            raw_read(reader.as_raw_fd(), &mut buf[..]);
        });
        let tid = tid_rx.recv().unwrap();
        let caller = Caller::detached(tid);
        // The thread reaches its read soon after it sent its tid: poll /proc until it is
        // there (an event of the kernel's, not a sleep).
        let blocked = loop {
            match caller.blocked_syscall(Abi::X86_64) {
                Some(view) if view.call == SyscallKind::Read => break view,
                _ => std::thread::yield_now(),
            }
        };
        assert_eq!(blocked.args[0], reader.as_raw_fd() as u64);
        assert_eq!(blocked.buffer(), Some(buf_addr));
        assert_eq!(blocked.args[2], 64);
        raw_write(writer.as_raw_fd(), b"x");
    });
    // A thread that has gone has no view.
    assert_eq!(Caller::detached(0).blocked_syscall(Abi::X86_64), None);
}
