//! Reaching the calling process: its memory, its descriptors, its identity.
//!
//! A kernel driver runs *in* the caller: `copy_from_user` reads `current`'s memory, `fget(fd)`
//! looks in `current`'s descriptor table, `current_cred()` is one pointer away. A userspace
//! driver is another process, so each of those becomes a syscall on the caller's pid:
//! `process_vm_readv`/`process_vm_writev` for memory, `pidfd_getfd` for descriptors, and
//! `/proc/<tid>` for what the kernel would read from `struct task_struct` and `struct cred`.
//! [`Caller`] wraps them so that a device model keeps the kernel's errnos: EFAULT for memory
//! whatever the reason underneath, EBADF for a descriptor that is not there.
//!
//! Every method acts on [`Caller::pid`], the thread id the kernel wrote into the request
//! header: user data only says *which* address or descriptor number, never whose.
//! The server must see the caller's pid namespace through its own `/proc` (FUSE translates
//! the header pid into the server's namespace and writes 0 for a caller it cannot see,
//! fs/fuse/dev.c of Linux 6.1; a pid of 0 is treated here as a caller that has gone).
//!
//! What can go wrong that the kernel never sees: a caller killed while its request is pending
//! (FUSE waits killably, fs/fuse/dev.c `request_wait_answer`) is gone, and its pid may be
//! reused by an unrelated process before the model acts on it. Nothing here can tell: the
//! request header carries no start time. [`CredentialIdentity`] guards a file's later calls
//! against that reuse (it includes the start time); memory and descriptor access do not.
//!
//! Read next: `device.rs` (the `Device` trait every method of which gets a `Caller`).

use std::fs;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

use nix::errno::Errno;
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;

use crate::wait::Interrupt;

/// The highest user address + 1 that `access_ok()` accepts on x86_64 with 4-level paging:
/// `(1 << 47) - PAGE_SIZE` (`TASK_SIZE_MAX`, arch/x86/include/asm/page_64_types.h of Linux
/// 6.1). The last page below 2^47 is left out on purpose: code there could make SYSRET return
/// to a non-canonical address (the comment there tells the story). With 5-level paging a
/// process that asks for it may map above 2^47; such addresses get EFAULT here.
pub const TASK_SIZE_MAX: u64 = 0x7fff_ffff_f000;

/// x86_64 base page size; `get_user_pages` pins whole pages.
const PAGE_SIZE: u64 = 4096;

/// The process a request came from, as the kernel put it in the request header.
///
/// The pid is the one the kernel wrote into the FUSE/CUSE request, never a value taken from
/// user data: anything that touches the caller's memory or descriptors must go through it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The kernel's `current->pid`: the id of the calling *thread* (equal to the process id
    /// for a single-threaded daemon). Valid for `process_vm_readv` and `/proc/<pid>`.
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Fired when the kernel sends FUSE_INTERRUPT for this request (the caller got a signal).
    pub interrupt: Interrupt,
}

impl Caller {
    /// A caller for unit tests and internal calls that can never be interrupted from outside.
    pub fn detached(pid: u32) -> Caller {
        Caller {
            pid,
            uid: 0,
            gid: 0,
            interrupt: Interrupt::new(),
        }
    }

    /// The calling thread's id (`current->pid`), as the request header gave it.
    pub fn tid(&self) -> u32 {
        self.pid
    }

    /// The calling process's id (`current->tgid`), from `/proc/<tid>/status`. ESRCH when the
    /// thread has gone.
    pub fn tgid(&self) -> Result<u32, Errno> {
        let status = read_proc(self.pid, "status")?;
        parse_status(&status).map(|s| s.tgid).ok_or(Errno::EIO)
    }

    /// `copy_from_user(buf, addr, buf.len())`: all of `buf` from the caller's memory, or
    /// EFAULT.
    ///
    /// Like `copy_from_user` (include/linux/uaccess.h `_copy_from_user`, Linux 6.1), a range
    /// that faults part-way leaves the bytes before the fault copied and zeroes the rest of
    /// `buf`. A range beyond [`TASK_SIZE_MAX`] or wrapping around fails before any syscall,
    /// as `access_ok()` would. A caller that has exited gets EFAULT too (logged at debug).
    pub fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.read_memory_with(addr, buf, process_vm_readv)
    }

    /// `copy_to_user(addr, data, data.len())`: all of `data` into the caller's memory, or
    /// EFAULT. As in the kernel, the bytes before a fault stay written.
    pub fn write_memory(&self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        self.write_memory_with(addr, data, process_vm_writev)
    }

    /// [`Caller::read_memory`] with the syscall passed in, so a test can count the calls.
    fn read_memory_with(
        &self,
        addr: u64,
        buf: &mut [u8],
        mut readv: impl FnMut(Pid, &mut [IoSliceMut<'_>], &[RemoteIoVec]) -> nix::Result<usize>,
    ) -> Result<(), Errno> {
        if buf.is_empty() {
            return Ok(());
        }
        let remote = user_range(addr, buf.len()).ok_or(Errno::EFAULT)?;
        let pid = self
            .target()
            .ok_or_else(|| self.fault("read", Errno::ESRCH))?;
        let len = buf.len();
        // One iovec for the whole rest: the kernel walks it in page batches itself
        // (mm/process_vm_access.c, `process_vm_rw_single_vec`), so 32 MiB is one syscall.
        let moved = copy_all(len, |done| {
            let rest = &mut buf[done..];
            let remote = RemoteIoVec {
                base: remote + done,
                len: rest.len(),
            };
            readv(pid, &mut [IoSliceMut::new(rest)], &[remote])
        });
        moved.map_err(|fault| {
            buf[fault.done..].fill(0);
            self.fault("read", fault.cause)
        })
    }

    /// [`Caller::write_memory`] with the syscall passed in.
    fn write_memory_with(
        &self,
        addr: u64,
        data: &[u8],
        mut writev: impl FnMut(Pid, &[IoSlice<'_>], &[RemoteIoVec]) -> nix::Result<usize>,
    ) -> Result<(), Errno> {
        if data.is_empty() {
            return Ok(());
        }
        let remote = user_range(addr, data.len()).ok_or(Errno::EFAULT)?;
        let pid = self
            .target()
            .ok_or_else(|| self.fault("write", Errno::ESRCH))?;
        copy_all(data.len(), |done| {
            let rest = &data[done..];
            let remote = RemoteIoVec {
                base: remote + done,
                len: rest.len(),
            };
            writev(pid, &[IoSlice::new(rest)], &[remote])
        })
        .map_err(|fault| self.fault("write", fault.cause))
    }

    /// Whether `get_user_pages(FOLL_WRITE)` would pin `[addr, addr + len)` of the caller: every
    /// page of `[addr & !4095, round_up(addr + len, 4096))` in a mapping with write permission
    /// that is not `VM_IO`/`VM_PFNMAP`, not secretmem and not a special mapping (`[vvar]`,
    /// `[vdso]`, `[vsyscall]`), as `check_vma_flags` in mm/gup.c of Linux 6.1 demands. This is
    /// what a driver that pins a user buffer for a device to write into
    /// (`iov_iter_get_pages_alloc` on a READ iterator) would accept. EFAULT otherwise.
    ///
    /// A check, not a pin: nothing is held afterwards, so the caller's other threads may
    /// unmap or mprotect the range the moment this returns, where a kernel pin would keep the
    /// pages. `/proc/<tid>/maps` is also read in several pieces, so a mapping changed during
    /// the read may be seen half old, half new. Permissions come from `/proc/<tid>/maps`;
    /// `VM_IO`/`VM_PFNMAP` are only in `/proc/<tid>/smaps` (`VmFlags: io`, `pf`), which costs a
    /// page-table walk of every mapping, so it is read only when the range lies in a
    /// file-backed mapping (anonymous memory is never `VM_IO`/`VM_PFNMAP`). Not seen: a
    /// protection key that forbids the caller's writes (x86 PKRU is per thread, not in /proc).
    pub fn check_writable_range(&self, addr: u64, len: u64) -> Result<(), Errno> {
        self.check_writable_ranges(&[(addr, len)])
            .map_err(|(_, errno)| errno)
    }

    /// [`Caller::check_writable_range`] for several ranges, in order, from one reading of
    /// the caller's maps (a driver pins its buffers one after another; reading maps once for
    /// all of them keeps a small ioctl cheap). The error names the first range that fails.
    pub fn check_writable_ranges(&self, ranges: &[(u64, u64)]) -> Result<(), (usize, Errno)> {
        let mut maps: Option<String> = None;
        let mut smaps: Option<String> = None;
        for (i, &(addr, len)) in ranges.iter().enumerate() {
            if len == 0 {
                continue;
            }
            if !access_ok(addr, len) {
                return Err((i, Errno::EFAULT));
            }
            // The pages a pin would take. (Mappings are page aligned, so checking the
            // unrounded range would give the same answer; this is the range the kernel walks.)
            // access_ok keeps addr + len <= TASK_SIZE_MAX, a page multiple: the round-up
            // cannot overflow.
            let start = addr & !(PAGE_SIZE - 1);
            let end = (addr + len).next_multiple_of(PAGE_SIZE);
            if maps.is_none() {
                maps =
                    Some(read_proc(self.pid, "maps").map_err(|e| (i, self.fault("pin check", e)))?);
            }
            let text = maps.as_deref().unwrap_or_default();
            match pin_verdict(&parse_maps(text), start, end) {
                PinVerdict::Pinnable => {}
                PinVerdict::NotPinnable => return Err((i, Errno::EFAULT)),
                PinVerdict::NeedVmFlags => {
                    if smaps.is_none() {
                        smaps = Some(
                            read_proc(self.pid, "smaps")
                                .map_err(|e| (i, self.fault("pin check", e)))?,
                        );
                    }
                    let text = smaps.as_deref().unwrap_or_default();
                    match pin_verdict(&parse_maps(text), start, end) {
                        PinVerdict::Pinnable => {}
                        // NeedVmFlags again: smaps without VmFlags; refuse what we cannot see.
                        PinVerdict::NotPinnable | PinVerdict::NeedVmFlags => {
                            return Err((i, Errno::EFAULT))
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The caller's descriptor `fd`, duplicated into this process (`fget(fd)` in a driver):
    /// `pidfd_open(tgid)` + `pidfd_getfd` (Linux 5.6+). The new descriptor shares the open
    /// file description with the caller's, and is close-on-exec. EBADF when `fd` is not open
    /// in the caller (what `pidfd_getfd` returns) and when the caller has gone (logged at
    /// debug); EPERM if this process may not ptrace the caller.
    ///
    /// The thread group id, not the thread id: `pidfd_open` of a thread that is not the group
    /// leader fails with EINVAL before Linux 6.9 (kernel/pid.c), and the descriptor table
    /// belongs to the whole group anyway (unless the caller used `unshare(CLONE_FILES)` in a
    /// thread, the one case where a thread's table differs from its leader's).
    pub fn get_fd(&self, fd: RawFd) -> Result<OwnedFd, Errno> {
        let gone = |e: Errno| {
            if e == Errno::ESRCH {
                log::debug!("caller {}: gone before its fd {fd} was fetched", self.pid);
                Errno::EBADF
            } else {
                e
            }
        };
        let tgid = self.tgid().map_err(gone)?;
        let tgid = libc::pid_t::try_from(tgid).map_err(|_| Errno::EBADF)?;
        let pidfd = pidfd_open(tgid).map_err(gone)?;
        pidfd_getfd(pidfd.as_fd(), fd).map_err(gone)
    }

    /// The ABI the caller's program was built for: [`Abi::I386`] for a 32-bit ELF, else
    /// [`Abi::X86_64`], from the class byte of `/proc/<tid>/exe`. A driver whose interface is
    /// in `unsigned long` words (lguest's) needs it: the kernel's own word was the caller's
    /// when both were 32-bit, and a 64-bit kernel gives an ia32 task its compat syscalls.
    /// ESRCH when the thread has gone.
    pub fn abi(&self) -> Result<Abi, Errno> {
        if self.pid == 0 {
            return Err(Errno::ESRCH);
        }
        let mut file = fs::File::open(format!("/proc/{}/exe", self.pid)).map_err(io_errno)?;
        let mut ident = [0u8; 5];
        std::io::Read::read_exact(&mut file, &mut ident).map_err(|_| Errno::ENOEXEC)?;
        match ident {
            [0x7f, b'E', b'L', b'F', 1] => Ok(Abi::I386),
            [0x7f, b'E', b'L', b'F', 2] => Ok(Abi::X86_64),
            _ => Err(Errno::ENOEXEC),
        }
    }

    /// The syscall the calling thread is blocked in, from `/proc/<tid>/syscall` (its number
    /// and six arguments, as the kernel saved them on entry). A frontend request is made from
    /// inside a syscall that waits for our answer, so this is the caller's own `write(2)` with
    /// its buffer pointer: what a driver that ignores `count` and reads the user pointer
    /// itself (lguest's `write`) needs and a FUSE request does not carry. `abi` says how to
    /// read the numbers (an ia32 task shows its compat syscall). Needs ptrace access to the
    /// caller, as every other call here. None when the thread has gone, or is not in a
    /// syscall.
    ///
    /// The request reaches us before its caller has gone to sleep: FUSE queues it, wakes the
    /// server and only then schedules the caller out (fs/fuse/dev.c `request_wait_answer`),
    /// and meanwhile the file says `running`. The caller cannot get past its syscall without
    /// our answer, so it is asleep within moments; this waits for that, backing off from
    /// 10 µs, for at most about a second (a thread that stays runnable that long is not
    /// waiting for us).
    pub fn blocked_syscall(&self, abi: Abi) -> Option<BlockedSyscall> {
        let mut pause = std::time::Duration::from_micros(10);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            let text = read_proc(self.pid, "syscall").ok()?;
            if !text.starts_with("running") {
                return parse_syscall_line(&text, abi);
            }
            if std::time::Instant::now() >= deadline {
                log::debug!(
                    "caller {}: still running after 1 s; no syscall view",
                    self.pid
                );
                return None;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(10));
        }
    }

    /// What userspace can see of the calling thread's `current_cred()`: equal for two calls
    /// where the kernel's pointer would be equal, as far as /proc shows it. See
    /// [`CredentialIdentity`] for where it cannot match. ESRCH when the thread has gone.
    pub fn credentials(&self) -> Result<CredentialIdentity, Errno> {
        let status = parse_status(&read_proc(self.pid, "status")?).ok_or(Errno::EIO)?;
        let own = parse_stat(&read_proc(self.pid, "stat")?).ok_or(Errno::EIO)?;
        // The group's start time, not the thread's: two threads of a process share a cred.
        let group_start = if status.tgid == self.pid {
            own.start_time
        } else {
            let leader = read_proc(status.tgid, "stat")?;
            parse_stat(&leader).ok_or(Errno::EIO)?.start_time
        };
        let user_ns = fs::metadata(format!("/proc/{}/ns/user", self.pid))
            .map_err(io_errno)?
            .ino();
        Ok(CredentialIdentity {
            tgid: status.tgid,
            group_start,
            image: own.image,
            creds: status.creds,
            user_ns,
        })
    }

    /// The pid for process_vm_*: None for 0 (a caller outside our pid namespace) and for
    /// values no kernel pid takes.
    fn target(&self) -> Option<Pid> {
        match libc::pid_t::try_from(self.pid) {
            Ok(pid) if pid > 0 => Some(Pid::from_raw(pid)),
            _ => None,
        }
    }

    /// The EFAULT a memory access answers, whatever went wrong, with a log line for causes
    /// other than a plain fault: ESRCH is a caller that has exited (expected, debug), anything
    /// else (EPERM: we may not ptrace it; ENOMEM) is ours to fix (warn).
    fn fault(&self, what: &str, cause: Errno) -> Errno {
        match cause {
            Errno::EFAULT => {}
            Errno::ESRCH => log::debug!("caller {}: gone before the {what}", self.pid),
            other => log::warn!(
                "caller {}: {what} of its memory failed with {other}, answered EFAULT",
                self.pid
            ),
        }
        Errno::EFAULT
    }
}

/// Who the caller is, as far as the kernel's `file->f_cred != current_cred()` pointer compare
/// can be seen from userspace.
///
/// A driver that captures `f_cred` at open and refuses a later ioctl from another cred (the
/// Azure XStore fastpath driver answers EACCES) compares pointers. In Linux 6.1 that pointer
/// changes when (kernel/cred.c, fs/exec.c): a process is forked without `CLONE_THREAD`
/// (`copy_creds` makes a new cred even with identical values); a process execs
/// (`prepare_exec_creds` + `commit_creds`); any `set*id`, `setgroups`, `capset`, securebits,
/// ambient-capability or user-namespace change commits (a new cred even when no value
/// changes). Threads made with `CLONE_THREAD` share their creator's cred.
///
/// So the identity is: the thread group id and its start time (`/proc/<tgid>/stat` field 22;
/// a fork gives a new group, and a reused pid a new start time); an exec fingerprint, the
/// addresses a new image places under ASLR (`/proc/<tid>/stat` fields 26–28 start_code,
/// end_code, start_stack, and 47–51 start_brk, arg_start, arg_end, env_start, env_end, see
/// proc(5)); the thread's credential values from `/proc/<tid>/status` (Uid, Gid, Groups,
/// CapInh, CapPrm, CapEff, CapBnd, CapAmb); and its user namespace (`/proc/<tid>/ns/user`).
///
/// Where it cannot match the pointer compare:
/// - A commit that leaves every visible value unchanged (`setgid(getgid())`, `setgroups` with
///   the same list, `capset` with the same sets, or a change and its undo) makes a new cred
///   for the kernel and the same identity here: we let through what the driver refuses.
/// - After a process-wide `setuid` and friends (glibc runs the syscall in every thread), each
///   thread holds its own new cred: the kernel then refuses a call from a thread other than
///   the opener's; here all threads still look alike.
/// - A thread keyring (`KEY_SPEC_THREAD_KEYRING`) makes `copy_creds` give a new thread its own
///   cred even with `CLONE_THREAD`; joining or creating a session or process keyring commits a
///   new cred too. Keyrings are not in /proc: the same identity here.
/// - LSM labels and securebits are not read: a change to them alone is missed.
/// - ASLR disabled (`randomize_va_space = 0`, `setarch -R`, `ADDR_NO_RANDOMIZE`) makes the
///   exec fingerprint blind: re-exec of the same program with arguments and environment of
///   the same sizes looks like no exec.
/// - The other way round: `prctl(PR_SET_MM, ...)` (CAP_SYS_RESOURCE) moves the fingerprint's
///   addresses without touching the cred, and we refuse what the driver allows.
/// - `NoNewPrivs` is left out on purpose: `PR_SET_NO_NEW_PRIVS` sets a task flag
///   (`task_set_no_new_privs`, kernel/sys.c) and keeps the cred, so including it would refuse
///   a daemon that sets it between open and ioctl, which the driver allows.
/// - /proc shows `real_cred`; `current_cred()` differs from it only inside the kernel's own
///   `override_creds` sections, never at an ioctl's entry.
/// - The files are read one after another: a cred change during the reads can give a mix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialIdentity {
    tgid: u32,
    /// Start of the thread group, in clock ticks since boot.
    group_start: u64,
    image: ExecImage,
    creds: CredValues,
    /// Inode of the user namespace (nsfs).
    user_ns: u64,
}

/// Addresses an exec places, randomised under ASLR (stat fields 26–28, 47–51).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ExecImage {
    start_code: u64,
    end_code: u64,
    start_stack: u64,
    start_brk: u64,
    arg_start: u64,
    arg_end: u64,
    env_start: u64,
    env_end: u64,
}

/// The values of a `struct cred` that `/proc/<tid>/status` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CredValues {
    /// Real, effective, saved, filesystem.
    uid: [u32; 4],
    gid: [u32; 4],
    /// Supplementary groups, sorted by the kernel (`groups_sort`).
    groups: Vec<u32>,
    cap_inh: u64,
    cap_prm: u64,
    cap_eff: u64,
    cap_bnd: u64,
    cap_amb: u64,
}

/// `access_ok(addr, len)` of include/asm-generic/access_ok.h (Linux 6.1), with x86_64's
/// limit: the whole range below [`TASK_SIZE_MAX`], no wrap-around.
fn access_ok(addr: u64, len: u64) -> bool {
    len <= TASK_SIZE_MAX && addr <= TASK_SIZE_MAX - len
}

/// The remote base address for process_vm_*, if the range passes `access_ok`.
fn user_range(addr: u64, len: usize) -> Option<usize> {
    let len = u64::try_from(len).ok()?;
    if !access_ok(addr, len) {
        return None;
    }
    usize::try_from(addr).ok()
}

/// Where a copy stopped: `done` bytes moved, then `cause`.
#[derive(Debug, PartialEq, Eq)]
struct Fault {
    done: usize,
    cause: Errno,
}

/// Which syscall ABI a process uses: what its ELF class says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abi {
    /// A 32-bit x86 program: `unsigned long` is 4 bytes; int 0x80 syscall numbers.
    I386,
    /// A 64-bit x86 program: `unsigned long` is 8 bytes.
    X86_64,
}

impl Abi {
    /// `sizeof(unsigned long)`.
    pub fn word_bytes(self) -> usize {
        match self {
            Abi::I386 => 4,
            Abi::X86_64 => 8,
        }
    }
}

/// A syscall a thread is blocked in, as `/proc/<tid>/syscall` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockedSyscall {
    /// What the syscall is, as far as a driver's read or write path cares.
    pub call: SyscallKind,
    /// The six argument registers.
    pub args: [u64; 6],
}

/// The syscalls that reach a driver's `.read`/`.write` with one user buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyscallKind {
    /// `read(fd, buf, count)`.
    Read,
    /// `write(fd, buf, count)`.
    Write,
    /// `pread64(fd, buf, count, pos)`.
    Pread,
    /// `pwrite64(fd, buf, count, pos)`.
    Pwrite,
    /// Anything else (readv, io_uring, ...): no single buffer to name.
    Other(u64),
}

impl BlockedSyscall {
    /// The user buffer of a read, write, pread or pwrite; None for other syscalls.
    pub fn buffer(&self) -> Option<u64> {
        match self.call {
            SyscallKind::Read | SyscallKind::Write | SyscallKind::Pread | SyscallKind::Pwrite => {
                Some(self.args[1])
            }
            SyscallKind::Other(_) => None,
        }
    }
}

/// `NR arg1 … arg6 sp pc` in hex (fs/proc/base.c `proc_pid_syscall`); `running` or `-1 sp pc`
/// (not in a syscall) give None.
fn parse_syscall_line(text: &str, abi: Abi) -> Option<BlockedSyscall> {
    let mut fields = text.split_whitespace();
    let nr: u64 = fields.next()?.parse().ok()?;
    let mut args = [0u64; 6];
    for arg in &mut args {
        *arg = u64::from_str_radix(fields.next()?.trim_start_matches("0x"), 16).ok()?;
    }
    // asm/unistd_32.h and asm/unistd_64.h.
    let call = match (abi, nr) {
        (Abi::X86_64, 0) | (Abi::I386, 3) => SyscallKind::Read,
        (Abi::X86_64, 1) | (Abi::I386, 4) => SyscallKind::Write,
        (Abi::X86_64, 17) | (Abi::I386, 180) => SyscallKind::Pread,
        (Abi::X86_64, 18) | (Abi::I386, 181) => SyscallKind::Pwrite,
        (_, other) => SyscallKind::Other(other),
    };
    Some(BlockedSyscall { call, args })
}

/// Runs `step(done)` until `len` bytes have moved. process_vm_readv/writev stop at the first
/// page they cannot reach and return the count moved so far (mm/process_vm_access.c, Linux
/// 6.1), and cap one call at MAX_RW_COUNT (just under 2 GiB); so a short count is followed by
/// a call from there, which either moves more or reports the fault. No progress is a fault.
fn copy_all(len: usize, mut step: impl FnMut(usize) -> nix::Result<usize>) -> Result<(), Fault> {
    let mut done = 0;
    while done < len {
        match step(done) {
            Ok(0) => {
                return Err(Fault {
                    done,
                    cause: Errno::EFAULT,
                })
            }
            Ok(moved) => done += moved.min(len - done),
            Err(Errno::EINTR) => {}
            Err(cause) => return Err(Fault { done, cause }),
        }
    }
    Ok(())
}

/// `/proc/<pid>/<file>` as text (lossy: a mapped file's name need not be UTF-8). ESRCH when
/// the process has gone.
fn read_proc(pid: u32, file: &str) -> Result<String, Errno> {
    if pid == 0 {
        return Err(Errno::ESRCH);
    }
    // One large buffer: a seq_file fills as much of a read as it can, so a whole maps file
    // comes in a read or two (fs::read would start from a size hint of 0 and probe upwards
    // in many small reads).
    let mut file = fs::File::open(format!("/proc/{pid}/{file}")).map_err(io_errno)?;
    let mut bytes = Vec::with_capacity(64 << 10);
    std::io::Read::read_to_end(&mut file, &mut bytes).map_err(io_errno)?;
    Ok(String::from_utf8(bytes)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

fn io_errno(e: std::io::Error) -> Errno {
    match e.kind() {
        std::io::ErrorKind::NotFound => Errno::ESRCH,
        _ => e.raw_os_error().map_or(Errno::EIO, Errno::from_raw),
    }
}

/// A pidfd for `pid` (a thread group leader on kernels before 6.9).
fn pidfd_open(pid: libc::pid_t) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes two integers and reads no memory of ours; a success returns
    // a new descriptor that nothing else owns, which `owned_fd` takes.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::c_long::from(pid), 0) };
    owned_fd(ret)
}

/// A duplicate of descriptor `fd` of the process behind `pidfd`.
fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: RawFd) -> Result<OwnedFd, Errno> {
    let (pidfd, fd) = (
        libc::c_long::from(pidfd.as_raw_fd()),
        libc::c_long::from(fd),
    );
    // SAFETY: pidfd_getfd takes three integers and reads no memory of ours; `pidfd` is open
    // for the duration (borrowed); a success returns a new descriptor owned by no one else.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) };
    owned_fd(ret)
}

/// A syscall's return value as the new descriptor it is, or the errno.
fn owned_fd(ret: libc::c_long) -> Result<OwnedFd, Errno> {
    if ret < 0 {
        return Err(Errno::last());
    }
    let fd = RawFd::try_from(ret).map_err(|_| Errno::EBADF)?;
    // SAFETY: the kernel has just returned `fd` as a new descriptor of ours that nothing else
    // owns; the OwnedFd closes it once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One line of `/proc/<pid>/maps` (or a header line of `smaps`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Vma<'a> {
    start: u64,
    end: u64,
    writable: bool,
    name: &'a str,
    /// From smaps `VmFlags` (`io` or `pf`); None when read from maps, which does not say.
    io_or_pfnmap: Option<bool>,
}

/// What backs a mapping, as far as its name tells.
#[derive(Debug, PartialEq, Eq)]
enum Backing {
    /// Anonymous memory (heap, stacks, named anonymous regions): never VM_IO/VM_PFNMAP.
    Anonymous,
    /// A mapping gup refuses whatever its flags: special mappings installed by the kernel
    /// (`[vvar]`, `[vdso]`, `[vsyscall]`, `[uprobes]`) and secretmem (`vma_is_secretmem` in
    /// `check_vma_flags`, mm/gup.c of Linux 6.1).
    Refused,
    /// A file (or a pseudo-file: memfd, SysV shm, an anon inode): may be VM_IO/VM_PFNMAP.
    File,
}

fn backing(name: &str) -> Backing {
    if name.is_empty()
        || name == "[heap]"
        || name == "[stack]"
        // Thread stacks were named so before Linux 4.5; named anonymous memory since 5.17.
        || name.starts_with("[stack:")
        || name.starts_with("[anon:")
        || name.starts_with("[anon_shmem:")
    {
        Backing::Anonymous
    } else if name.starts_with('[') || name == "/secretmem (deleted)" {
        Backing::Refused
    } else {
        Backing::File
    }
}

/// A maps line: `start-end perms offset dev inode   name`; None for anything else (smaps'
/// `Key: value` lines among them).
fn parse_maps_line(line: &str) -> Option<Vma<'_>> {
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?.as_bytes();
    let offset = fields.next()?;
    let dev = fields.next()?;
    let inode = fields.next()?;
    let name = fields.next().unwrap_or("").trim_start();
    let valid = perms.len() == 4
        && u64::from_str_radix(offset, 16).is_ok()
        && dev.contains(':')
        && inode.parse::<u64>().is_ok();
    valid.then_some(())?;
    Some(Vma {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        writable: perms[1] == b'w',
        name,
        io_or_pfnmap: None,
    })
}

/// The mappings of a `maps` or `smaps` file, in the kernel's (ascending) order; smaps'
/// `VmFlags:` line fills in the mapping above it.
fn parse_maps(text: &str) -> Vec<Vma<'_>> {
    let mut vmas: Vec<Vma<'_>> = Vec::new();
    for line in text.lines() {
        if let Some(vma) = parse_maps_line(line) {
            vmas.push(vma);
        } else if let (Some(flags), Some(last)) = (line.strip_prefix("VmFlags:"), vmas.last_mut()) {
            let io_or_pfnmap = flags
                .split_ascii_whitespace()
                .any(|f| f == "io" || f == "pf");
            last.io_or_pfnmap = Some(io_or_pfnmap);
        }
    }
    vmas
}

#[derive(Debug, PartialEq, Eq)]
enum PinVerdict {
    Pinnable,
    NotPinnable,
    /// Writable and covered, but a file-backed mapping's VM_IO/VM_PFNMAP is not known yet.
    NeedVmFlags,
}

/// Whether every page of `[start, end)` (page aligned) lies in mappings gup would pin for
/// write.
fn pin_verdict(vmas: &[Vma<'_>], start: u64, end: u64) -> PinVerdict {
    let mut at = start;
    let mut need_flags = false;
    for vma in vmas {
        if at >= end {
            break;
        }
        if vma.end <= at {
            continue;
        }
        if vma.start > at || !vma.writable {
            return PinVerdict::NotPinnable;
        }
        match (backing(vma.name), vma.io_or_pfnmap) {
            (Backing::Refused, _) | (Backing::File, Some(true)) => return PinVerdict::NotPinnable,
            (Backing::File, None) => need_flags = true,
            (Backing::Anonymous, _) | (Backing::File, Some(false)) => {}
        }
        at = vma.end;
    }
    if at < end {
        PinVerdict::NotPinnable
    } else if need_flags {
        PinVerdict::NeedVmFlags
    } else {
        PinVerdict::Pinnable
    }
}

/// What we read of `/proc/<tid>/status`.
#[derive(Debug, PartialEq, Eq)]
struct Status {
    tgid: u32,
    creds: CredValues,
}

/// `/proc/<tid>/status`: `Key:\tvalue` lines (fs/proc/array.c, Linux 6.1). The name line
/// cannot fake another key: `proc_task_name` escapes a newline in the command name.
fn parse_status(text: &str) -> Option<Status> {
    let mut tgid = None;
    let (mut uid, mut gid, mut groups) = (None, None, None);
    let mut caps = [None; 5];
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "Tgid" => tgid = value.parse().ok(),
            "Uid" => uid = four_ids(value),
            "Gid" => gid = four_ids(value),
            "Groups" => groups = decimal_list(value),
            "CapInh" => caps[0] = u64::from_str_radix(value, 16).ok(),
            "CapPrm" => caps[1] = u64::from_str_radix(value, 16).ok(),
            "CapEff" => caps[2] = u64::from_str_radix(value, 16).ok(),
            "CapBnd" => caps[3] = u64::from_str_radix(value, 16).ok(),
            "CapAmb" => caps[4] = u64::from_str_radix(value, 16).ok(),
            _ => {}
        }
    }
    Some(Status {
        tgid: tgid?,
        creds: CredValues {
            uid: uid?,
            gid: gid?,
            groups: groups?,
            cap_inh: caps[0]?,
            cap_prm: caps[1]?,
            cap_eff: caps[2]?,
            cap_bnd: caps[3]?,
            cap_amb: caps[4]?,
        },
    })
}

fn decimal_list(value: &str) -> Option<Vec<u32>> {
    value
        .split_ascii_whitespace()
        .map(|v| v.parse().ok())
        .collect()
}

fn four_ids(value: &str) -> Option<[u32; 4]> {
    decimal_list(value)?.try_into().ok()
}

/// What we read of `/proc/<tid>/stat`.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    start_time: u64,
    image: ExecImage,
}

/// `/proc/<tid>/stat`: `pid (comm) state ...`. The command name may hold spaces and `)`, so
/// the fields are counted from the *last* `)`: what follows it is field 3 (proc(5) numbers
/// from 1). Fields shown as 0 to a reader without ptrace access are read as they are.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n.checked_sub(3)?)?.parse().ok() };
    Some(Stat {
        start_time: field(22)?,
        image: ExecImage {
            start_code: field(26)?,
            end_code: field(27)?,
            start_stack: field(28)?,
            start_brk: field(47)?,
            arg_start: field(48)?,
            arg_end: field(49)?,
            env_start: field(50)?,
            env_end: field(51)?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscall_lines_read_as_the_kernel_prints_them() {
        let write = "1 0x5 0x7ffd1000 0x4 0x0 0x0 0x0 0x7ffd0ff8 0x7f00aa\n";
        let view = parse_syscall_line(write, Abi::X86_64).unwrap();
        assert_eq!(view.call, SyscallKind::Write);
        assert_eq!(view.buffer(), Some(0x7ffd_1000));
        // An ia32 task shows its compat numbers: 181 is pwrite64 there, a socket call on x86_64.
        let pwrite = "181 0x4 0xffd0 0x8 0x1 0x0 0x0 0xffc0 0xf7f0";
        assert_eq!(
            parse_syscall_line(pwrite, Abi::I386).map(|v| v.call),
            Some(SyscallKind::Pwrite)
        );
        assert_eq!(
            parse_syscall_line(pwrite, Abi::X86_64).map(|v| v.call),
            Some(SyscallKind::Other(181))
        );
        assert_eq!(
            parse_syscall_line("20 0x4 0x1 0x2 0 0 0 0 0", Abi::X86_64)
                .unwrap()
                .buffer(),
            None
        );
        for not_blocked in ["running\n", "-1 0x7ffd0ff8 0x7f00aa\n", "", "1 0x5"] {
            assert_eq!(
                parse_syscall_line(not_blocked, Abi::X86_64),
                None,
                "{not_blocked:?}"
            );
        }
    }

    const STAT: &str = "4242 (a) b)  c) S 1 4242 4242 0 -1 4194560 1051 0 0 0 2 3 0 0 20 0 1 0 \
        987654 8679424 1234 18446744073709551615 94000000000000 94000000100000 140720000000000 \
        0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0 94000000200000 94000000210000 94000001000000 \
        140720000001000 140720000001100 140720000001100 140720000002000 0\n";

    #[test]
    fn stat_fields_count_from_the_last_paren_of_comm() {
        let stat = parse_stat(STAT).unwrap();
        assert_eq!(stat.start_time, 987654);
        assert_eq!(
            stat.image,
            ExecImage {
                start_code: 94000000000000,
                end_code: 94000000100000,
                start_stack: 140720000000000,
                start_brk: 94000001000000,
                arg_start: 140720000001000,
                arg_end: 140720000001100,
                env_start: 140720000001100,
                env_end: 140720000002000,
            }
        );
    }

    #[test]
    fn stat_truncated_or_garbled_is_none() {
        assert_eq!(parse_stat("4242 (no paren S 1 2"), None);
        let cut = &STAT[..STAT.len() - 20];
        assert_eq!(parse_stat(cut), None);
        assert_eq!(parse_stat(&STAT.replace("987654", "x")), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn stat_of_this_thread_parses() {
        let stat =
            parse_stat(&read_proc(nix::unistd::gettid().as_raw() as u32, "stat").unwrap()).unwrap();
        assert_ne!(stat.image.start_stack, 0);
        assert!(stat.image.arg_start < stat.image.arg_end);
    }

    const STATUS: &str = "Name:\tfoo: Tgid: 1\nUmask:\t0022\nState:\tS (sleeping)\n\
        Tgid:\t4242\nNgid:\t0\nPid:\t4243\nPPid:\t1\nTracerPid:\t0\n\
        Uid:\t1000\t1001\t1002\t1003\nGid:\t100\t101\t102\t103\nFDSize:\t64\n\
        Groups:\t4 24 1000 \nNStgid:\t4242\nCapInh:\t0000000000000000\n\
        CapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\n\
        CapAmb:\t0000000000000001\nNoNewPrivs:\t0\nSeccomp:\t0\n";

    #[test]
    fn status_gives_tgid_and_cred_values() {
        let status = parse_status(STATUS).unwrap();
        assert_eq!(status.tgid, 4242);
        assert_eq!(
            status.creds,
            CredValues {
                uid: [1000, 1001, 1002, 1003],
                gid: [100, 101, 102, 103],
                groups: vec![4, 24, 1000],
                cap_inh: 0,
                cap_prm: 0x1ff_ffff_ffff,
                cap_eff: 0x1ff_ffff_ffff,
                cap_bnd: 0x1ff_ffff_ffff,
                cap_amb: 1,
            }
        );
    }

    #[test]
    fn status_with_no_groups_and_missing_keys() {
        let none = STATUS.replace("Groups:\t4 24 1000 ", "Groups:\t");
        assert_eq!(parse_status(&none).unwrap().creds.groups, Vec::<u32>::new());
        assert_eq!(parse_status(&STATUS.replace("CapAmb", "CapXyz")), None);
        assert_eq!(parse_status(&STATUS.replace("\t1003", "")), None);
        assert_eq!(
            parse_status(&STATUS.replace("Tgid:\t4242", "Tgid:\t-1")),
            None
        );
    }

    const MAPS: &str = "\
5600000000-5600001000 r--p 00000000 fe:00 10010741                   /usr/bin/my prog\n\
5600001000-5600002000 rw-p 00001000 fe:00 10010741                   /usr/bin/my prog\n\
5600002000-5600005000 rw-p 00000000 00:00 0                          [heap]\n\
7f0000000000-7f0000001000 rw-p 00000000 00:00 0 \n\
7f0000001000-7f0000002000 rw-s 00000000 00:01 77                     /memfd:buf (deleted)\n\
7f0000003000-7f0000004000 rw-s 00000000 00:0e 169436                 /secretmem (deleted)\n\
7f0000004000-7f0000006000 r--p 00000000 00:00 0                      [vvar]\n\
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                      [stack]\n\
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0              [vsyscall]\n";

    #[test]
    fn maps_lines_parse_with_names_holding_spaces() {
        let vmas = parse_maps(MAPS);
        assert_eq!(vmas.len(), 9);
        assert_eq!(
            vmas[1],
            Vma {
                start: 0x5600001000,
                end: 0x5600002000,
                writable: true,
                name: "/usr/bin/my prog",
                io_or_pfnmap: None,
            }
        );
        assert_eq!(vmas[3].name, "");
        assert!(!vmas[0].writable);
        assert_eq!(vmas[8].start, 0xffffffffff600000);
    }

    #[test]
    fn pin_verdict_follows_perms_holes_and_backing() {
        let vmas = parse_maps(MAPS);
        let v = |start, end| pin_verdict(&vmas, start, end);
        // Heap, and the heap continued by nothing: a hole.
        assert_eq!(v(0x5600002000, 0x5600005000), PinVerdict::Pinnable);
        assert_eq!(v(0x5600004000, 0x5600006000), PinVerdict::NotPinnable);
        // Read-only text, and writable data + heap back to back.
        assert_eq!(v(0x5600000000, 0x5600001000), PinVerdict::NotPinnable);
        assert_eq!(v(0x5600001000, 0x5600003000), PinVerdict::NeedVmFlags);
        // Anonymous then memfd (file-backed: flags needed), then a hole before secretmem.
        assert_eq!(v(0x7f0000000000, 0x7f0000002000), PinVerdict::NeedVmFlags);
        assert_eq!(v(0x7f0000000000, 0x7f0000004000), PinVerdict::NotPinnable);
        assert_eq!(v(0x7f0000003000, 0x7f0000004000), PinVerdict::NotPinnable);
        assert_eq!(v(0x7f0000004000, 0x7f0000005000), PinVerdict::NotPinnable);
        assert_eq!(v(0x7ffd00000000, 0x7ffd00021000), PinVerdict::Pinnable);
        // Below everything, between mappings, above everything.
        assert_eq!(v(0x1000, 0x2000), PinVerdict::NotPinnable);
        assert_eq!(v(0x7f0000010000, 0x7f0000011000), PinVerdict::NotPinnable);
        assert_eq!(v(0x7fff00000000, 0x7fff00001000), PinVerdict::NotPinnable);
    }

    #[test]
    fn pin_verdict_reads_io_and_pfnmap_from_smaps_vmflags() {
        let smaps = "\
7f0000000000-7f0000001000 rw-s 00000000 00:05 12                         /dev/uio0\n\
Size:                  4 kB\n\
VmFlags: rd wr sh mr mw me ms io pf dc de dd sd \n\
7f0000001000-7f0000002000 rw-s 00000000 00:01 77                         /memfd:buf (deleted)\n\
Size:                  4 kB\n\
VmFlags: rd wr sh mr mw me ms sd \n\
7f0000002000-7f0000003000 rw-s 00000000 00:0f 9                          anon_inode:[io_uring]\n\
VmFlags: rd wr sh mr mw me ms pf dc de dd sd \n\
7f0000003000-7f0000004000 rw-s 00000000 00:01 78                         /memfd:nf (deleted)\n";
        let vmas = parse_maps(smaps);
        assert_eq!(vmas.len(), 4);
        let v = |start, end| pin_verdict(&vmas, start, end);
        assert_eq!(v(0x7f0000000000, 0x7f0000001000), PinVerdict::NotPinnable);
        assert_eq!(v(0x7f0000001000, 0x7f0000002000), PinVerdict::Pinnable);
        assert_eq!(v(0x7f0000002000, 0x7f0000003000), PinVerdict::NotPinnable);
        // No VmFlags line: still unknown.
        assert_eq!(v(0x7f0000003000, 0x7f0000004000), PinVerdict::NeedVmFlags);
    }

    #[test]
    fn access_ok_is_the_kernels_range_check() {
        assert!(access_ok(0, 0));
        assert!(access_ok(TASK_SIZE_MAX - 1, 1));
        assert!(access_ok(TASK_SIZE_MAX, 0));
        assert!(!access_ok(TASK_SIZE_MAX, 1));
        assert!(!access_ok(TASK_SIZE_MAX - 1, 2));
        assert!(!access_ok(1, TASK_SIZE_MAX));
        assert!(!access_ok(u64::MAX, 1));
        assert!(!access_ok(u64::MAX - 10, 100));
        assert!(!access_ok(4096, u64::MAX));
    }

    #[test]
    fn copy_all_resumes_after_short_counts_and_stops_at_the_fault() {
        // The kernel moves 10, then 5, then faults at 15.
        let mut calls = vec![];
        let result = copy_all(100, |done| {
            calls.push(done);
            match done {
                0 => Ok(10),
                10 => Ok(5),
                _ => Err(Errno::EFAULT),
            }
        });
        assert_eq!(
            result,
            Err(Fault {
                done: 15,
                cause: Errno::EFAULT
            })
        );
        assert_eq!(calls, [0, 10, 15]);
        // No progress is a fault too; EINTR is retried; an over-count cannot overrun.
        let mut calls = 0;
        let stalled = copy_all(8, |_| {
            calls += 1;
            Ok(if calls == 1 { 0 } else { 8 })
        });
        assert_eq!(stalled.unwrap_err().done, 0);
        let mut interrupted = false;
        let retried = copy_all(8, |_| {
            if interrupted {
                Ok(8)
            } else {
                interrupted = true;
                Err(Errno::EINTR)
            }
        });
        assert_eq!(retried, Ok(()));
        assert_eq!(copy_all(8, |_| Ok(1000)), Ok(()));
    }

    #[test]
    fn read_memory_zeroes_what_it_could_not_copy() {
        let me = Caller::detached(std::process::id());
        let mut buf = [0xaa_u8; 16];
        let fake = |_: Pid, _: &mut [IoSliceMut<'_>], _: &[RemoteIoVec]| Err(Errno::EFAULT);
        assert_eq!(
            me.read_memory_with(0x10000, &mut buf, fake),
            Err(Errno::EFAULT)
        );
        assert_eq!(buf, [0; 16]);
    }

    #[test]
    fn a_32_mib_copy_takes_one_syscall_each_way() {
        let me = Caller::detached(nix::unistd::gettid().as_raw() as u32);
        let source: Vec<u8> = (0..32 << 20).map(|i: u32| (i % 251) as u8).collect();
        let mut copy = vec![0u8; source.len()];
        let mut reads = 0;
        let readv = |pid: Pid, local: &mut [IoSliceMut<'_>], remote: &[RemoteIoVec]| {
            reads += 1;
            process_vm_readv(pid, local, remote)
        };
        me.read_memory_with(source.as_ptr() as u64, &mut copy, readv)
            .unwrap();
        assert_eq!(reads, 1);
        assert!(copy == source);

        let mut back = vec![0u8; source.len()];
        let mut writes = 0;
        let writev = |pid: Pid, local: &[IoSlice<'_>], remote: &[RemoteIoVec]| {
            writes += 1;
            process_vm_writev(pid, local, remote)
        };
        me.write_memory_with(back.as_mut_ptr() as u64, &source, writev)
            .unwrap();
        assert_eq!(writes, 1);
        assert!(back == source);
    }

    #[test]
    fn a_caller_with_pid_0_reaches_nothing() {
        let nobody = Caller::detached(0);
        let mut buf = [0u8; 4];
        assert_eq!(nobody.read_memory(0x10000, &mut buf), Err(Errno::EFAULT));
        assert_eq!(nobody.write_memory(0x10000, &buf), Err(Errno::EFAULT));
        assert_eq!(nobody.check_writable_range(0x10000, 4), Err(Errno::EFAULT));
        assert_eq!(nobody.get_fd(0).unwrap_err(), Errno::EBADF);
        assert_eq!(nobody.tgid(), Err(Errno::ESRCH));
        assert_eq!(nobody.credentials(), Err(Errno::ESRCH));
    }
}
