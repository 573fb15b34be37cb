//! The fault matrix (issue #11, item 3; docs/fault-matrix.md has the table): each row injects
//! one fault into real processes (Debian's hv_fcopy_daemon, the C xs client and Launcher,
//! fakehost, cusedev, a host scripted by the test) through real syscalls on real FUSE mounts,
//! and asserts that nothing is lost and nothing hangs. Every row counts cusedev's descriptors
//! and threads at a baseline and waits for them to come back to it
//! (`cusedev_tests::census::RowFigures`), and prints one line
//!
//! ```text
//! fault-matrix: <row>: cusedev fds A -> B, threads C -> D (baseline after ...; during the fault up to ...)
//! ```
//!
//! on stderr (`cargo test -p cusedev-tests --test fault_matrix -- --nocapture` shows them).
//!
//! Each test runs in its own private mount namespace. Row modules: `fcopy` (the real daemon:
//! killed, stopped, its host killed or stopped, the disk full), `xs` (a client killed
//! mid-ioctl, the host stopped), `lguest` (a Launcher killed mid-read), `truncated` (a
//! scripted host cutting a frame in half), `single_open` (1,000 opens at once), and
//! `cusedev_killed`.

use std::process::Output;
use std::time::Duration;

use nix::sys::signal::Signal;

mod cusedev_killed;
mod fcopy;
mod lguest;
mod single_open;
mod truncated;
mod xs;

/// How long anything that should end (a call, a process, a return to the baseline) may take.
const ENDS: Duration = Duration::from_secs(30);

/// Every device fakehost offers by default, as cusedev's driver table names them.
const ALL_DEVICES: [&str; 5] = [
    "vmbus/hv_fcopy",
    "vmbus/hv_kvp",
    "vmbus/hv_vss",
    "azure_xs_fastpath",
    "lguest",
];

/// Waits until cusedev serves every device of [`ALL_DEVICES`], counting from log line `from`:
/// a baseline taken earlier would miss the threads and descriptors of those still binding.
fn wait_all_served(rig: &cusedev_tests::harness::Rig, from: usize) {
    for device in ALL_DEVICES {
        rig.wait_for_device_from(from, device);
    }
}

/// Sends `signal` to process `pid`.
fn signal(pid: u32, signal: Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits i32"));
    nix::sys::signal::kill(pid, signal).unwrap_or_else(|e| panic!("kill {pid} {signal}: {e}"));
}

/// SIGSTOPs `pid` and waits until it is stopped ('T' in /proc): from then on it does nothing.
fn stop(pid: u32) {
    signal(pid, Signal::SIGSTOP);
    cusedev_tests::thread_state::wait_until_process_in_state(
        i32::try_from(pid).expect("pid fits i32"),
        'T',
        ENDS,
    );
}

/// A command's stdout and stderr, for assertions and their messages.
fn said(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `fakehost ARGS` against `rig`'s host; must succeed; returns what it said.
fn fakehost_ok(rig: &cusedev_tests::harness::Rig, args: &[&str]) -> String {
    let out = rig.fakehost(args);
    assert!(out.status.success(), "fakehost {args:?}: {}", said(&out));
    said(&out)
}
