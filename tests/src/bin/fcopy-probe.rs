//! `fcopy-probe [NODE]`: the errno paths of the Linux 6.1 hv_fcopy driver, checked through
//! real syscalls on a served `/dev/vmbus/hv_fcopy`.
//!
//! Runs inside a QEMU guest against the CUSE character device (the host-side tests check the
//! same paths on a FUSE mount). It plays the daemon, so no daemon may hold the device while it
//! runs, and no copy may be under way. One line per check, `PROBE ok NAME` or
//! `PROBE FAIL NAME: what happened`, then `PROBE done failures=N`; the exit status is 1 if any
//! check failed, so a caller can assert on each line and on the whole.
//!
//! The expectations are the driver's (drivers/hv/hv_fcopy.c and hv_utils_transport.c, Linux
//! 6.1; spec/fcopy.md §4).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::process::ExitCode;
use std::sync::Arc;

use cusedev_tests::blocking::{install_sigusr1_without_restart, Blocking};
use cusedev_tests::dev::{u32_at, Dev};
use nix::errno::Errno;

const DEFAULT_NODE: &str = "/dev/vmbus/hv_fcopy";
const POLLIN: u32 = libc::POLLIN as u32;
/// An ioctl command the driver does not know (it has no .unlocked_ioctl at all).
const SOME_IOCTL: u64 = 0x4008_4d01;

/// One check: Ok, or what went wrong.
type Check = fn(&Probe) -> Result<(), String>;

struct Probe {
    node: String,
    failures: usize,
}

impl Probe {
    fn check(&mut self, name: &str, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => println!("PROBE ok {name}"),
            Err(why) => {
                self.failures += 1;
                println!("PROBE FAIL {name}: {why}");
            }
        }
    }

    fn open(&self) -> Result<Dev, String> {
        Dev::open(&self.node).map_err(|e| format!("open {}: {e}", self.node))
    }
}

fn expect<T: std::fmt::Debug + PartialEq>(what: &str, got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

/// The numbers the kernel gave the CUSE device, from sysfs.
fn sysfs_numbers(node: &str) -> Result<(u64, u64), String> {
    let name = node.strip_prefix("/dev/").unwrap_or(node).replace('/', "!");
    let path = format!("/sys/class/cuse/{name}/dev");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let (major, minor) = text
        .trim()
        .split_once(':')
        .ok_or_else(|| format!("{path}: {text:?}"))?;
    Ok((
        major.parse().map_err(|_| format!("{path}: {text:?}"))?,
        minor.parse().map_err(|_| format!("{path}: {text:?}"))?,
    ))
}

fn node_is_a_char_device_0600_root(probe: &Probe) -> Result<(), String> {
    let meta = std::fs::metadata(&probe.node).map_err(|e| format!("stat: {e}"))?;
    if !meta.file_type().is_char_device() {
        return Err(format!("not a character device: {:?}", meta.file_type()));
    }
    expect("mode", meta.mode() & 0o7777, 0o600)?;
    expect("owner", (meta.uid(), meta.gid()), (0, 0))?;
    let (major, minor) = sysfs_numbers(&probe.node)?;
    expect("rdev", meta.rdev(), nix::sys::stat::makedev(major, minor))
}

fn second_open_is_ebusy(probe: &Probe) -> Result<(), String> {
    let _first = probe.open()?;
    expect(
        "second open",
        Dev::open(&probe.node).err(),
        Some(Errno::EBUSY),
    )
}

fn writes_of_the_wrong_size_are_einval_before_the_handshake(probe: &Probe) -> Result<(), String> {
    let dev = probe.open()?;
    expect("3-byte write", dev.write(&[1, 0, 0]), Err(Errno::EINVAL))?;
    expect(
        "5-byte write",
        dev.write(&[1, 0, 0, 0, 0]),
        Err(Errno::EINVAL),
    )?;
    expect("unknown version 7", dev.write_u32(7), Err(Errno::EINVAL))
}

/// The handshake reply comes back at offset 0 whatever offset the daemon's pread names (CUSE
/// never passes file offsets; the driver ignores them).
fn handshake_is_answered_with_version_1(probe: &Probe) -> Result<(), String> {
    let dev = probe.open()?;
    expect("poll before the handshake", dev.poll(0), Ok(0))?;
    expect("version write", dev.write_u32(1), Ok(4))?;
    expect(
        "poll with the reply queued",
        dev.poll(0).map(|r| r & POLLIN),
        Ok(POLLIN),
    )?;
    expect("short read", dev.pread(2).err(), Some(Errno::EINVAL))?;
    let reply = dev.pread(4).map_err(|e| format!("pread 4: {e}"))?;
    expect("reply length", reply.len(), 4)?;
    expect("reply version", u32_at(&reply, 0), 1)?;
    expect("poll after the reply", dev.poll(0), Ok(0))
}

fn blocked_read_interrupted_by_a_signal_is_eintr(probe: &Probe) -> Result<(), String> {
    let dev = Arc::new(probe.open()?);
    expect("version write", dev.write_u32(1), Ok(4))?;
    dev.pread(4).map_err(|e| format!("pread 4: {e}"))?;
    let reader = {
        let dev = dev.clone();
        Blocking::spawn(move || dev.pread(8192))
    };
    // Asleep in the driver: in read/pread64 on a CUSE or FUSE node, in poll(2) inside the
    // preload library, which waits there for the device's answer (docs/preload.md).
    reader.wait_blocked_in(&[
        libc::SYS_read,
        libc::SYS_pread64,
        libc::SYS_poll,
        libc::SYS_ppoll,
    ]);
    reader.signal();
    expect("interrupted read", reader.join(), Err(Errno::EINTR))
}

/// With a valid argument buffer: a FUSE mount would copy it in before asking the driver (and
/// say EFAULT for a bad one); the driver itself has no ioctl at all.
/// A poll that sleeps is woken when a message is queued (FUSE_NOTIFY_POLL from the server,
/// the driver's `wake_up_interruptible(&hvt->outmsg_q)`): here the handshake reply.
fn sleeping_poll_is_woken_by_the_handshake_reply(probe: &Probe) -> Result<(), String> {
    let dev = Arc::new(probe.open()?);
    let poller = {
        let dev = dev.clone();
        Blocking::spawn(move || dev.poll(-1))
    };
    poller.wait_blocked_in(&[libc::SYS_poll, libc::SYS_ppoll]);
    expect("version write", dev.write_u32(1), Ok(4))?;
    expect("woken poll", poller.join().map(|r| r & POLLIN), Ok(POLLIN))
}

fn ioctl_is_enotty(probe: &Probe) -> Result<(), String> {
    let dev = probe.open()?;
    let mut arg = [0u8; 8];
    let result = dev.ioctl(SOME_IOCTL, arg.as_mut_ptr() as u64);
    expect("ioctl", result, Err(Errno::ENOTTY))
}

/// `hvt_op_release` resets the transport: a new open starts with a new handshake.
fn close_resets_the_handshake(probe: &Probe) -> Result<(), String> {
    {
        let dev = probe.open()?;
        expect("first version write", dev.write_u32(1), Ok(4))?;
    }
    let dev = probe.open()?;
    expect("version write after reopen", dev.write_u32(1), Ok(4))?;
    let reply = dev.pread(4).map_err(|e| format!("pread 4: {e}"))?;
    expect("reply length", reply.len(), 4)?;
    expect("reply version", u32_at(&reply, 0), 1)
}

fn main() -> ExitCode {
    let node = std::env::args()
        .nth(1)
        .unwrap_or_else(|| DEFAULT_NODE.to_owned());
    install_sigusr1_without_restart();
    let mut probe = Probe { node, failures: 0 };
    let checks: [(&str, Check); 8] = [
        (
            "node_is_a_char_device_0600_root",
            node_is_a_char_device_0600_root,
        ),
        ("second_open_is_ebusy", second_open_is_ebusy),
        (
            "writes_of_the_wrong_size_are_einval_before_the_handshake",
            writes_of_the_wrong_size_are_einval_before_the_handshake,
        ),
        (
            "handshake_is_answered_with_version_1",
            handshake_is_answered_with_version_1,
        ),
        (
            "blocked_read_interrupted_by_a_signal_is_eintr",
            blocked_read_interrupted_by_a_signal_is_eintr,
        ),
        (
            "sleeping_poll_is_woken_by_the_handshake_reply",
            sleeping_poll_is_woken_by_the_handshake_reply,
        ),
        ("ioctl_is_enotty", ioctl_is_enotty),
        ("close_resets_the_handshake", close_resets_the_handshake),
    ];
    for (name, check) in checks {
        let outcome = check(&probe);
        probe.check(name, outcome);
    }
    println!("PROBE done failures={}", probe.failures);
    if probe.failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
