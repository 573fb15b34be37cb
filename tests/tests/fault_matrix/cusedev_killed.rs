//! Row "cusedev SIGKILLed" (FUSE frontend): the mount goes away by itself (cusedev's unmount
//! guard, `cusedev/src/fuse/unmount_guard/`), calls blocked in it end with an error, a restarted
//! cusedev serves again, and no stale mount is left. The CUSE side of the row is in
//! `tests/tests/qemu_cuse_lifetime.rs` (the kernel removes the node itself).
//!
//! Also the guard's own faults: a guard killed first leaves the stale mount to the next
//! cusedev's peeling, and a guard that wakes up late never takes a newer cusedev's mount.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cusedev_tests::blocking::Blocking;
use cusedev_tests::census::Census;
use cusedev_tests::dev::{Dev, Errno};
use cusedev_tests::enter_private_mount_namespace;
use cusedev_tests::harness::{
    mount_tmpfs, sha256, workspace_binary, write_pattern_file, Rig, Supervised, FCOPY_DEVICE,
};
use cusedev_tests::kvp::{KVP_DEVICE, KVP_MSG_LEN, KVP_NODE};
use cusedev_tests::syscalls::mounts_at;
use cusedev_tests::thread_state::wait_until_process_sleeps_in_syscall;

/// The directory mount both devices live in.
const VMBUS: &str = "/dev/vmbus";
/// How long anything here may take before the test fails (bounded waits, not sleeps).
const LIMIT: Duration = Duration::from_secs(20);
/// fcopy for the daemon, kvp for a reader of the test's own; nothing top-level, so nothing is
/// made in the /dev all tests share.
const OFFERS: &[&str] = &["--offer", "fcopy", "--offer", "kvp"];

/// cusedev serving this rig's host again, with the arguments the rig started it with.
fn restart_cusedev(rig: &Rig) -> Supervised {
    let guest = Supervised::spawn(
        "cusedev",
        Command::new(workspace_binary("cusedev"))
            .arg("serve")
            .arg("--host")
            .arg(format!("unix:{}", rig.dir.join("bus.sock").display()))
            .args(["--frontend", "fuse", "--kernel", "linux-6.1"])
            .env("RUST_LOG", "info"),
    );
    guest.wait_for_device_from(0, FCOPY_DEVICE);
    guest.wait_for_device_from(0, KVP_DEVICE);
    guest
}

fn start_rig(test: &str) -> Rig {
    enter_private_mount_namespace().expect("private mount namespace");
    assert_eq!(mounts_at(Path::new(VMBUS)), 0, "{VMBUS} is mounted already");
    Rig::builder(test)
        .guest_args(&["--kernel", "linux-6.1"])
        .host_args(OFFERS)
        .serves(FCOPY_DEVICE)
        .serves(KVP_DEVICE)
        .start()
}

/// Waits (bounded, on /proc) until `what` holds; returns how long it took.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < LIMIT, "{what}: not within {LIMIT:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

/// The pid of cusedev `parent`'s unmount guard (its child running `unmount-guard`).
fn guard_of(parent: u32) -> i32 {
    let is_guard = |pid: &str| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        ppid == Some(parent) && cmdline.split(|&b| b == 0).any(|a| a == b"unmount-guard")
    };
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find(|pid| is_guard(pid))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("cusedev {parent} has no unmount guard"))
}

/// Whether process `pid` has exited (gone, or a zombie nobody reaped yet).
fn has_exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

fn signal(pid: i32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("kill");
}

/// `census` with each channel thread's relid taken out of its name (`chan-3` is `chan-N`):
/// the same host gives a restarted cusedev's channels new relids.
fn without_relids(census: Census) -> Census {
    let mut threads = std::collections::BTreeMap::new();
    for (name, count) in census.threads {
        let name = match name.strip_prefix("chan-") {
            Some(relid) if relid.bytes().all(|b| b.is_ascii_digit()) => "chan-N".to_owned(),
            _ => name,
        };
        *threads.entry(name).or_insert(0) += count;
    }
    Census { threads, ..census }
}

/// Waits (bounded) until `pid`'s census, relids aside, is back at `baseline`; returns it.
fn wait_for_census(pid: u32, baseline: &Census) -> Census {
    let baseline = without_relids(baseline.clone());
    let mut now = without_relids(Census::of(pid));
    let start = Instant::now();
    while !now.is_back_at(&baseline) {
        assert!(
            start.elapsed() < LIMIT,
            "cusedev {pid} is not at the first one's census:\nnow   {now:?}\nfirst {baseline:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
        now = without_relids(Census::of(pid));
    }
    now
}

/// A source and a guest directory on tmpfs, and a copy through the daemon checked by sha256.
struct Copies {
    src: PathBuf,
    guest: PathBuf,
}

impl Copies {
    fn new(rig: &Rig) -> Copies {
        let (src, guest) = (rig.dir.join("src"), rig.dir.join("guest"));
        mount_tmpfs(&src, "16m");
        mount_tmpfs(&guest, "16m");
        Copies { src, guest }
    }

    fn arrives_intact(&self, rig: &Rig, name: &str, seed: u64) {
        let file = self.src.join(name);
        write_pattern_file(&file, 1_000_000, seed);
        let out = rig.fakehost(&["copy", file.to_str().unwrap(), self.guest.to_str().unwrap()]);
        assert!(out.status.success(), "copy of {name} failed");
        assert_eq!(sha256(&self.guest.join(name)), sha256(&file), "{name}");
    }
}

#[test]
fn cusedev_sigkilled_its_mount_goes_blocked_calls_fail_and_a_restarted_cusedev_serves_the_same() {
    let mut rig = start_rig("cusedev-killed");
    let copies = Copies::new(&rig);
    let mut daemon = rig.start_daemon();
    copies.arrives_intact(&rig, "before.bin", 1);
    let first = Census::of(rig.guest.pid());

    // A reader of our own, asleep in read(2) on the same mount, and the daemon in its pread.
    let dev = Dev::open(KVP_NODE).expect("open hv_kvp");
    let (read_tx, read_rx) = mpsc::channel();
    let reader = Blocking::spawn(move || {
        let first = dev.read(KVP_MSG_LEN).map(|b| b.len());
        let again = dev.read(KVP_MSG_LEN).map(|b| b.len());
        let _ = read_tx.send((first, again));
    });
    reader.wait_blocked_in_read();
    let daemon_pid = daemon.pid() as i32;
    let in_read = [libc::SYS_read, libc::SYS_pread64];
    wait_until_process_sleeps_in_syscall(daemon_pid, &in_read, LIMIT);

    rig.guest.kill();
    let unmounted_in = wait_until("the dead cusedev's mount goes", || {
        mounts_at(Path::new(VMBUS)) == 0
    });
    let (read, read_again) = read_rx.recv_timeout(LIMIT).expect("the blocked read ended");
    reader.join();
    // Linux aborts the connection when the server's /dev/fuse closes (fuse_abort_conn,
    // fs/fuse/dev.c): the request in flight ends ECONNABORTED, every later one ENOTCONN.
    assert_eq!(read, Err(Errno::ECONNABORTED), "the blocked read");
    assert_eq!(read_again, Err(Errno::ENOTCONN), "a read after it");
    let reopen = Dev::open(KVP_NODE).err();
    assert_eq!(
        reopen,
        Some(Errno::ENOENT),
        "an open once the mount is gone"
    );
    // The daemon's pread failed too; it reopens the node, finds nothing and exits (#49).
    let daemon_exit = daemon.wait_exit();
    assert!(!daemon_exit.success(), "the daemon: {daemon_exit}");

    rig.guest = restart_cusedev(&rig);
    assert!(
        !rig.guest.log_contains("stale FUSE mount"),
        "the restarted cusedev found a stale mount to peel"
    );
    assert_eq!(
        mounts_at(Path::new(VMBUS)),
        1,
        "the restarted cusedev's mount, alone"
    );
    let _daemon = rig.start_daemon();
    copies.arrives_intact(&rig, "after.bin", 2);
    let second = wait_for_census(rig.guest.pid(), &first);
    println!(
        "fault-matrix: cusedev killed: mount gone {unmounted_in:?} after the kill was reaped; \
         blocked read {read:?} then {read_again:?}, open {reopen:?}; daemon {daemon_exit}; \
         census first {:?}, restarted {second:?}",
        without_relids(first)
    );

    let Rig { guest, .. } = rig;
    drop(guest);
    assert_eq!(
        mounts_at(Path::new(VMBUS)),
        0,
        "left mounted after a clean stop"
    );
}

#[test]
fn a_guard_killed_first_leaves_the_stale_mount_to_the_next_cusedev_which_peels_it() {
    let mut rig = start_rig("guard-killed");
    let guard = guard_of(rig.guest.pid());
    signal(guard, nix::sys::signal::Signal::SIGKILL);
    wait_until("the guard dies", || has_exited(guard));

    rig.guest.kill();
    // Nobody is left to unmount it: the mount is stale.
    assert_eq!(mounts_at(Path::new(VMBUS)), 1);
    let stat = std::fs::metadata(VMBUS).map_err(|e| e.raw_os_error());
    assert_eq!(
        stat.err(),
        Some(Some(libc::ENOTCONN)),
        "stat of the stale mount"
    );

    rig.guest = restart_cusedev(&rig);
    assert!(
        rig.guest.log_contains("stale FUSE mount"),
        "no peeling logged"
    );
    assert_eq!(mounts_at(Path::new(VMBUS)), 1, "the new mount, alone");
    let _daemon = rig.start_daemon();
}

#[test]
fn a_guard_that_wakes_up_late_never_unmounts_the_restarted_cusedevs_mount() {
    let mut rig = start_rig("guard-late");
    let guard = guard_of(rig.guest.pid());
    signal(guard, nix::sys::signal::Signal::SIGSTOP);
    rig.guest.kill();

    // The next cusedev peels the dead mount off and mounts its own on the same path...
    let restarted = restart_cusedev(&rig);
    let first = std::mem::replace(&mut rig.guest, restarted);
    assert!(
        rig.guest.log_contains("stale FUSE mount"),
        "no peeling logged"
    );
    // ...and then the old guard reads its end of file.
    signal(guard, nix::sys::signal::Signal::SIGCONT);
    wait_until("the old guard exits", || has_exited(guard));
    assert_eq!(mounts_at(Path::new(VMBUS)), 1, "the new cusedev's mount");
    let _daemon = rig.start_daemon();
    first.wait_for_log("cusedev's mount is gone already");
}
