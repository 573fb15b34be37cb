//! Rows with Debian's unmodified hv_fcopy_daemon on /dev/vmbus/hv_fcopy (Linux 6.1 profile):
//! the daemon SIGKILLed mid-copy, the daemon SIGSTOPped past the driver's timeout, fakehost
//! SIGKILLed mid-copy, fakehost SIGSTOPped mid-copy, the guest's disk full.
//!
//! The daemon says what happened to it only through syslog(3): `/dev/log` is a socket of the
//! test's (`cusedev_tests::kvp::Syslog`, on a shadow of `/dev` in the test's namespace), so a
//! row can wait for its own words ("pread failed: Bad file descriptor").
//!
//! Where the bytes stop: the daemon writes each fragment at its offset as it arrives
//! (spec fcopy.md §6.2), so a file it was writing is, at any moment, a prefix of the source.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cusedev_tests::census::RowFigures;
use cusedev_tests::dev::{Dev, Errno};
use cusedev_tests::enter_private_mount_namespace;
use cusedev_tests::harness::{
    mount_tmpfs, scratch_dir, sha256, write_pattern_file, Rig, Supervised, FCOPY_NODE,
    READY_TIMEOUT,
};
use cusedev_tests::kvp::Syslog;
use nix::sys::signal::Signal;

use super::{said, signal, stop, wait_all_served, ENDS};

/// `HV_UTIL_TIMEOUT` (drivers/hv/hyperv_vmbus.h, 6.1): how long the 6.1 driver gives the daemon
/// to answer a host message before it answers HV_E_FAIL itself (`fcopy_timeout_func`,
/// drivers/hv/hv_fcopy.c 6.1).
const DAEMON_TIMEOUT: Duration = Duration::from_secs(30);

/// Anything well under [`DAEMON_TIMEOUT`] shows a path that does not wait for it.
const AT_ONCE: Duration = Duration::from_secs(10);

/// The file the faults interrupt: big enough that a copy is still going when the test acts
/// (the fault is timed by stopping a process, not by racing the copy).
const MID_COPY_BYTES: u64 = 32 << 20;

/// A copy has got going once the guest file holds this much.
const GOING: u64 = 1 << 20;

/// A rig with the daemon, the syslog catcher, a source directory and a guest directory of
/// `guest_size` on tmpfs.
struct Scene {
    rig: Rig,
    syslog: Syslog,
    daemon: Supervised,
    src: PathBuf,
    guest: PathBuf,
}

/// The nodes cusedev makes directly under /dev (the FUSE frontend mounts over each).
const TOP_LEVEL_NODES: [&str; 3] = ["vmbus", "azure_xs_fastpath", "lguest"];

/// Catches syslog on a shadow of `/dev` (see `cusedev_tests::kvp::Syslog`) from which the
/// entries cusedev makes are taken out: the shadow binds every entry of the machine's /dev,
/// mounts included, and a cusedev running outside any test namespace (a demo, a soak) would
/// otherwise be found answering at /dev/azure_xs_fastpath, and ours could not serve it.
fn private_dev(test: &str) -> Syslog {
    let syslog = Syslog::capture(&scratch_dir(&format!("{test}-ns")));
    for name in TOP_LEVEL_NODES {
        let entry = Path::new("/dev").join(name);
        // Unmount whatever the machine had stacked there (in this namespace only), then the
        // shadow's own entry.
        while nix::mount::umount2(&entry, nix::mount::MntFlags::MNT_DETACH).is_ok() {}
        if entry.is_dir() {
            std::fs::remove_dir(&entry)
        } else {
            std::fs::remove_file(&entry)
        }
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Ok(()),
            _ => Err(e),
        })
        .unwrap_or_else(|e| panic!("take {} out of the shadow /dev: {e}", entry.display()));
    }
    syslog
}

fn scene(test: &str, guest_size: &str) -> Scene {
    enter_private_mount_namespace().expect("private mount namespace");
    // Before cusedev starts: it mounts /dev/vmbus on the shadow of /dev.
    let syslog = private_dev(test);
    let rig = Rig::start(test, "linux-6.1");
    let src = rig.dir.join("src");
    mount_tmpfs(&src, "64m");
    let guest = rig.dir.join("guest");
    mount_tmpfs(&guest, guest_size);
    wait_all_served(&rig, 0);
    let daemon = rig.start_daemon();
    Scene {
        rig,
        syslog,
        daemon,
        src,
        guest,
    }
}

/// The scene after a first copy, and cusedev's baseline for row `row` then (threads a
/// first copy starts belong to it).
fn warmed(test: &str, guest_size: &str, row: &str) -> (Scene, RowFigures) {
    let s = scene(test, guest_size);
    s.warm_up();
    let figures = RowFigures::baseline(row, s.cusedev(), "a first copy");
    (s, figures)
}

impl Scene {
    /// A source file of `len` bytes.
    fn source(&self, name: &str, len: u64, seed: u64) -> PathBuf {
        let file = self.src.join(name);
        write_pattern_file(&file, len, seed);
        file
    }

    /// `fakehost copy FILE GUEST_DIR EXTRA...` to the end.
    fn copy(&self, file: &Path, extra: &[&str]) -> std::process::Output {
        let mut args = vec!["copy", file.to_str().unwrap(), self.guest.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.rig.fakehost(&args)
    }

    /// A copy that must succeed and arrive identical.
    fn copy_intact(&self, file: &Path, extra: &[&str]) {
        let out = self.copy(file, extra);
        assert!(out.status.success(), "copy failed: {}", said(&out));
        let name = file.file_name().unwrap();
        assert_eq!(sha256(&self.guest.join(name)), sha256(file), "{name:?}");
    }

    /// A small copy, so the baseline has whatever a first copy starts.
    fn warm_up(&self) {
        let file = self.source("warm-up.bin", 100_000, 99);
        self.copy_intact(&file, &[]);
    }

    /// Starts copying `file` in the background and waits until the guest file has
    /// [`GOING`] bytes.
    fn copy_going(&self, file: &Path) -> std::process::Child {
        let copying = self.rig.fakehost_spawn(&[
            "copy",
            file.to_str().unwrap(),
            self.guest.to_str().unwrap(),
        ]);
        let target = self.guest.join(file.file_name().unwrap());
        let deadline = Instant::now() + READY_TIMEOUT;
        while len(&target) < GOING {
            assert!(Instant::now() < deadline, "the copy never got going");
            std::thread::sleep(Duration::from_millis(2));
        }
        copying
    }

    /// SIGSTOPs fakehost and waits until the daemon, which gets nothing more, sleeps in its
    /// pread.
    fn stop_host(&self) {
        stop(self.rig.host.pid());
        cusedev_tests::thread_state::wait_until_process_sleeps_in_syscall(
            i32::try_from(self.daemon.pid()).expect("pid fits i32"),
            &[libc::SYS_pread64],
            ENDS,
        );
    }

    fn cusedev(&self) -> u32 {
        self.rig.guest.pid()
    }
}

/// The size of `path`, 0 if it is not there.
fn len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Asserts `partial` holds exactly the first bytes of `source`, and fewer than all of them.
fn assert_prefix(partial: &Path, source: &Path) {
    let part = std::fs::read(partial).expect("read the partial file");
    let whole = std::fs::read(source).expect("read the source");
    assert!(
        !part.is_empty() && part.len() < whole.len(),
        "{} bytes of {}: not a partial file",
        part.len(),
        whole.len()
    );
    assert!(
        whole.starts_with(&part),
        "the partial file is not a prefix of the source"
    );
}

fn wait_output(child: std::process::Child) -> std::process::Output {
    child.wait_with_output().expect("fakehost copy exits")
}

/// Row 1. A SIGKILLed daemon closes its fd: the 6.1 transport's release resets the service
/// (`fcopy_on_reset`: the pending transaction's timer is cancelled and the host gets HV_E_FAIL
/// at once, drivers/hv/hv_fcopy.c 6.1). Nobody deletes the partial file: the daemon died
/// before its cancel routine, and the host's CANCEL reaches a driver with no daemon, which
/// answers HV_E_FAIL itself (docs/decisions.md 14). The next daemon registers and the copy
/// with OVER_WRITE replaces the partial file.
#[test]
fn daemon_sigkilled_mid_copy_fails_the_copy_at_once_and_the_next_daemon_completes_it() {
    let (mut s, mut figures) = warmed("fm-daemon-killed", "64m", "daemon SIGKILLed mid-copy");
    let file = s.source("mid.bin", MID_COPY_BYTES, 8);
    let copying = s.copy_going(&file);
    // Stopped, it writes nothing more: the partial file is what it is now.
    stop(s.daemon.pid());
    figures.sample();
    s.daemon.kill();
    let killed_at = Instant::now();
    let out = wait_output(copying);
    let took = killed_at.elapsed();
    assert!(
        took < AT_ONCE,
        "the copy took {took:?} to fail after the daemon died"
    );
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(said(&out).contains("0x80004005"), "{}", said(&out));
    let target = s.guest.join("mid.bin");
    assert_prefix(&target, &file);
    eprintln!("fault-matrix: daemon SIGKILLed mid-copy: the copy failed {took:?} after the kill");

    let _daemon = s.rig.start_daemon();
    s.copy_intact(&file, &["--overwrite"]);
    figures.back(ENDS);
}

/// Row 6 (fcopy). fcopy's only timeout is the daemon's: the 6.1 driver arms a 30 s timer
/// (`HV_UTIL_TIMEOUT`) when a host message arrives and answers HV_E_FAIL itself if the daemon
/// has not answered by then. A SIGSTOPped daemon is a daemon that stopped answering. Once it
/// runs again its late answer is refused (EINVAL, spec fcopy.md §5.3), or its interrupted
/// read fails, and the daemon goes to its reopen point: it deletes the partial file, reopens
/// the node and registers again (spec §6.4), so the next copy works with the same daemon.
#[test]
fn daemon_sigstopped_mid_copy_is_answered_hv_e_fail_by_the_drivers_30_s_timer_then_recovers() {
    let (s, mut figures) = warmed(
        "fm-daemon-stopped",
        "64m",
        "daemon SIGSTOPped past the driver's timeout",
    );
    let file = s.source("stalled.bin", MID_COPY_BYTES, 11);
    let copying = s.copy_going(&file);
    let guest_mark = s.rig.guest.log_mark();
    let syslog_mark = s.syslog.mark();
    stop(s.daemon.pid());
    let stopped_at = Instant::now();
    figures.sample();
    s.rig
        .guest
        .wait_for_log_from(guest_mark, "hv_fcopy: the daemon did not answer");
    let fired = stopped_at.elapsed();
    // The message the timer is for arrived at most moments before the stop.
    assert!(
        fired >= DAEMON_TIMEOUT - Duration::from_secs(1) && fired < DAEMON_TIMEOUT + AT_ONCE,
        "the timeout fired {fired:?} after the daemon stopped; the driver's is {DAEMON_TIMEOUT:?}"
    );
    assert!(len(&s.guest.join("stalled.bin")) < MID_COPY_BYTES);
    signal(s.daemon.pid(), Signal::SIGCONT);
    let out = wait_output(copying);
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(said(&out).contains("0x80004005"), "{}", said(&out));
    // Its late answer is refused ("pwrite failed: Invalid argument"), or, if the stop came
    // while it slept in pread, that read was interrupted ("pread failed: Interrupted system
    // call": a stop signal ends an interruptible wait, and FUSE answers the interrupt): either
    // way the daemon goes to its reopen point.
    let (line, _) = s.syslog.wait_for_from(syslog_mark, " failed: ", ENDS);
    eprintln!(
        "fault-matrix: daemon SIGSTOPped: HV_E_FAIL {fired:?} after the stop; the daemon, \
         continued, said {line:?}"
    );
    // The reopen point deleted the partial file; the daemon registers again by itself.
    s.rig.guest.wait_for_log_from(guest_mark, "registered");
    assert!(
        !s.guest.join("stalled.bin").exists(),
        "the partial file stayed"
    );
    s.copy_intact(&file, &[]);
    figures.back(ENDS);
}

/// Row 4. With the host gone every channel goes as if rescinded (docs/decisions.md 19): the
/// 6.1 transport's destroy wakes the daemon's blocked pread with EBADF (spec fcopy.md §5.5),
/// the daemon's reopen point deletes the partial file, the node goes once the daemon has
/// closed it, the daemon's reopen fails and it exits 1 (spec §6.4). A restarted fakehost
/// offers fcopy again; a new daemon registers and a new copy arrives intact.
#[test]
fn fakehost_sigkilled_mid_copy_wakes_the_daemon_with_ebadf_removes_the_node_and_a_new_host_brings_it_back(
) {
    let (mut s, mut figures) = warmed("fm-host-killed", "64m", "fakehost SIGKILLed mid-copy");
    let file = s.source("cut.bin", MID_COPY_BYTES, 12);
    let copying = s.copy_going(&file);
    s.stop_host();
    let guest_mark = s.rig.guest.log_mark();
    let syslog_mark = s.syslog.mark();
    s.rig.host.kill();
    let killed_at = Instant::now();
    s.syslog
        .wait_for_from(syslog_mark, "pread failed: Bad file descriptor", ENDS);
    let woke = killed_at.elapsed();
    assert!(
        woke < AT_ONCE,
        "the daemon's read woke {woke:?} after the host died"
    );
    figures.sample();
    assert_eq!(
        s.daemon.wait_exit().code(),
        Some(1),
        "the daemon exits when its node is gone"
    );
    s.syslog
        .wait_for_from(syslog_mark, "open /dev/vmbus/hv_fcopy failed", ENDS);
    s.rig
        .guest
        .wait_for_log_from(guest_mark, "removed device vmbus/hv_fcopy");
    assert_eq!(Dev::open(FCOPY_NODE).err(), Some(Errno::ENOENT));
    assert!(
        !s.guest.join("cut.bin").exists(),
        "the daemon's reopen point deletes the partial file"
    );
    let out = wait_output(copying);
    assert!(
        !out.status.success(),
        "a copy whose host died succeeded: {}",
        said(&out)
    );
    eprintln!(
        "fault-matrix: fakehost SIGKILLed mid-copy: the daemon's pread failed with EBADF {woke:?} \
         after the kill; the copy command exited {:?}",
        out.status.code()
    );

    let mark = s.rig.guest.log_mark();
    s.rig.restart_host();
    wait_all_served(&s.rig, mark);
    let _daemon = s.rig.start_daemon();
    s.copy_intact(&file, &[]);
    figures.back(ENDS);
}

/// Row 6 (fcopy's host). The driver has no timeout for a silent host: its timer is armed only
/// when a host message arrives, for the daemon's answer (drivers/hv/hv_fcopy.c 6.1,
/// `fcopy_timeout_work`). A SIGSTOPped fakehost leaves the daemon asleep in its pread; when
/// the host runs again the copy goes on where it was and arrives intact.
#[test]
fn fakehost_sigstopped_mid_copy_leaves_the_daemon_waiting_and_the_copy_completes_after_sigcont() {
    let (s, mut figures) = warmed("fm-host-stopped", "64m", "fakehost SIGSTOPped mid-copy");
    let file = s.source("paused.bin", MID_COPY_BYTES, 13);
    let mut copying = s.copy_going(&file);
    s.stop_host();
    figures.sample();
    assert!(
        copying.try_wait().unwrap().is_none(),
        "the copy ended while its host was stopped"
    );
    let target = s.guest.join("paused.bin");
    let at_stop = len(&target);
    assert!(at_stop < MID_COPY_BYTES);
    signal(s.rig.host.pid(), Signal::SIGCONT);
    let out = wait_output(copying);
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(sha256(&target), sha256(&file));
    eprintln!(
        "fault-matrix: fakehost SIGSTOPped mid-copy at {at_stop} of {MID_COPY_BYTES} bytes: \
         resumed and completed intact"
    );
    figures.back(ENDS);
}

/// Row 7. The daemon reports 0x80070070 only when pwrite() fails with ENOSPC; a *short*
/// pwrite leaves errno stale and gives 0x80004005 (tools/hv/hv_fcopy_daemon.c 6.1, spec
/// §6.2). So the tmpfs ends on a fragment boundary: 86 × 12288 bytes, a multiple of both 6144
/// (the fragment) and 4096 (the page tmpfs allocates). The host's CANCEL makes the daemon
/// delete the partial file; a copy that fits then works.
#[test]
fn disk_full_reports_0x80070070_to_the_host_and_the_partial_file_is_removed() {
    let (s, mut figures) = warmed("fm-disk-full", "1056768", "disk full in the guest");
    std::fs::remove_file(s.guest.join("warm-up.bin")).unwrap();
    let file = s.source("too_big.bin", 4 << 20, 9);
    let out = s.copy(&file, &[]);
    figures.sample();
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(said(&out).contains("0x80070070"), "{}", said(&out));
    assert!(said(&out).contains("disk full"), "{}", said(&out));
    assert!(
        !s.guest.join("too_big.bin").exists(),
        "CANCEL should have made the daemon delete the partial file"
    );
    let fits = s.source("fits.bin", 500_000, 10);
    s.copy_intact(&fits, &[]);
    figures.back(ENDS);
}
