//! `cuse-ioctl-toy serve | probe`: unrestricted ioctl through a real kernel's CUSE.
//!
//! `serve` registers `/dev/cusedev-ioctl-toy` through cusedev's CUSE frontend: a device whose
//! one ioctl, REVERSE, takes a pointer to `struct { u64 buf; u64 len; }` and reverses the `len`
//! bytes at `buf` in place, returning `len`. A pointer-carrying argument: the kernel cannot
//! know what to copy, so the device asks for it with FUSE_IOCTL_RETRY, twice (the struct, then
//! the buffer it names). It prints `TOY ready` once the node exists and serves until killed.
//!
//! `probe` calls it through real ioctl(2) syscalls and prints `PROBE ok NAME` / `PROBE FAIL
//! NAME: why` per check, then `PROBE done failures=N` (exit 1 on any failure). Runs in the
//! QEMU guest; the host kernel here has no CUSE.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use cusedev::cuse::CuseFrontend;
use cusedev::device::{
    Caller, Device, Errno, Handle, IoctlAnswer, IoctlCall, IoctlOutcome, IoctlReply, UserBuffer,
};
use cusedev_tests::dev::Dev;

const NAME: &str = "cusedev-ioctl-toy";
/// `_IOWR('c', 1, 16)`.
const REVERSE: u32 = 0xc010_6301;
/// The most the toy reverses in one call (a driver bounds what it copies from user space).
const MAX_LEN: u64 = 1 << 16;

struct Reverser;

impl Device for Reverser {
    fn name(&self) -> &str {
        NAME
    }

    fn open(&self, _caller: &Caller, _flags: i32) -> Result<Handle, Errno> {
        Ok(1)
    }

    fn ioctl(&self, _handle: Handle, call: &IoctlCall<'_>, _caller: &Caller, reply: IoctlAnswer) {
        reply.answer(reverse_in_place(call));
    }
}

/// The toy's one ioctl: reverses the caller's buffer in place, in two retry rounds.
fn reverse_in_place(call: &IoctlCall<'_>) -> Result<IoctlOutcome, Errno> {
    if call.cmd != REVERSE {
        return Err(Errno::ENOTTY);
    }
    if !call.unrestricted {
        return Err(Errno::EINVAL);
    }
    let header = UserBuffer {
        addr: call.arg,
        len: 16,
    };
    let Some(fields) = call.input.get(..16) else {
        return Ok(IoctlOutcome::Retry {
            input: vec![header],
            output: vec![],
        });
    };
    let word = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&fields[at..at + 8]);
        u64::from_ne_bytes(bytes)
    };
    let (buf, len) = (word(0), word(8));
    if len > MAX_LEN {
        return Err(Errno::EINVAL);
    }
    let target = UserBuffer { addr: buf, len };
    let Some(data) = call.input.get(16..16 + len as usize) else {
        return Ok(IoctlOutcome::Retry {
            input: vec![header, target],
            output: vec![target],
        });
    };
    Ok(IoctlReply {
        result: len as i32,
        out: data.iter().rev().copied().collect(),
    }
    .into())
}

fn serve() -> ExitCode {
    let frontend = CuseFrontend::new(Path::new("/dev"));
    if let Err(err) = frontend.add_device(Arc::new(Reverser)) {
        eprintln!("cuse-ioctl-toy: {err}");
        return ExitCode::FAILURE;
    }
    println!("TOY ready");
    loop {
        std::thread::park();
    }
}

#[repr(C)]
struct ReverseArg {
    buf: u64,
    len: u64,
}

fn reverse(dev: &Dev, arg: u64) -> Result<i32, Errno> {
    dev.ioctl(u64::from(REVERSE), arg)
}

fn probe() -> ExitCode {
    let mut failures = 0;
    let mut check = |name: &str, outcome: Result<(), String>| match outcome {
        Ok(()) => println!("PROBE ok {name}"),
        Err(why) => {
            failures += 1;
            println!("PROBE FAIL {name}: {why}");
        }
    };
    let dev = match Dev::open(&format!("/dev/{NAME}")) {
        Ok(dev) => dev,
        Err(err) => {
            println!("PROBE FAIL open: {err}");
            return ExitCode::FAILURE;
        }
    };

    let mut text = *b"hello, cuse";
    let arg = ReverseArg {
        buf: text.as_mut_ptr() as u64,
        len: text.len() as u64,
    };
    let result = reverse(&dev, &arg as *const ReverseArg as u64);
    check(
        "pointer_carrying_ioctl_reads_and_writes_caller_memory",
        if result == Ok(text.len() as i32) && &text == b"esuc ,olleh" {
            Ok(())
        } else {
            Err(format!(
                "got {result:?} and {:?}",
                String::from_utf8_lossy(&text)
            ))
        },
    );

    let bad = ReverseArg { buf: 16, len: 8 };
    let result = reverse(&dev, &bad as *const ReverseArg as u64);
    check(
        "unmapped_buffer_in_the_struct_is_efault",
        if result == Err(Errno::EFAULT) {
            Ok(())
        } else {
            Err(format!("got {result:?}"))
        },
    );

    let result = reverse(&dev, 0);
    check(
        "null_argument_is_efault",
        if result == Err(Errno::EFAULT) {
            Ok(())
        } else {
            Err(format!("got {result:?}"))
        },
    );

    let huge = ReverseArg {
        buf: text.as_mut_ptr() as u64,
        len: MAX_LEN + 1,
    };
    let result = reverse(&dev, &huge as *const ReverseArg as u64);
    check(
        "driver_errno_reaches_the_caller",
        if result == Err(Errno::EINVAL) {
            Ok(())
        } else {
            Err(format!("got {result:?}"))
        },
    );

    let result = dev.ioctl(0x6302, 0);
    check(
        "unknown_command_is_enotty",
        if result == Err(Errno::ENOTTY) {
            Ok(())
        } else {
            Err(format!("got {result:?}"))
        },
    );

    println!("PROBE done failures={failures}");
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("serve") => serve(),
        Some("probe") => probe(),
        _ => {
            eprintln!("usage: cuse-ioctl-toy serve | probe");
            ExitCode::from(2)
        }
    }
}
