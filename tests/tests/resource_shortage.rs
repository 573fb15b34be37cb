//! cusedev under a thread shortage, for real: the `cusedev serve` process is moved into a pids
//! cgroup of the test's own whose `pids.max` leaves it no thread (or just one, or two) to
//! start, and fakehost offers a device. The offer is refused with a log line naming what
//! could not be had, cusedev stays up and holds no more threads or descriptors than before,
//! and once `pids.max` is raised the same device is offered again and serves a real copy.
//!
//! `RLIMIT_NPROC` does not bind root, so the limit is the pids controller's: cgroup v2 where
//! it is there, else the v1 pids hierarchy (this machine kind has only v1's). A machine with
//! neither fails the test, saying so: a test skipped is not a test passed.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cusedev_tests::census::{wait_for_baseline, Census};
use cusedev_tests::dev::{Dev, Errno};
use cusedev_tests::enter_private_mount_namespace;
use cusedev_tests::harness::{sha256, write_pattern_file, Rig, FCOPY_DEVICE, FCOPY_NODE};

const KVP_DEVICE: &str = "vmbus/hv_kvp";

/// How long cusedev may take to let go of the threads and fds of a refused offer.
const SETTLE: Duration = Duration::from_secs(20);

/// A pids cgroup of this test's own. Dropping it lifts the limit, moves its processes back
/// to the parent and removes it.
struct PidsCgroup {
    dir: PathBuf,
    parent: PathBuf,
}

impl PidsCgroup {
    fn create(name: &str) -> PidsCgroup {
        let parent = pids_hierarchy();
        let dir = parent.join(format!("cusedev-test-{}-{name}", std::process::id()));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        PidsCgroup { dir, parent }
    }

    /// Moves process `pid` (every thread of it) in.
    fn adopt(&self, pid: u32) {
        write(&self.dir.join("cgroup.procs"), &pid.to_string());
    }

    /// Tasks (threads) in the cgroup now.
    fn current(&self) -> usize {
        let text = fs::read_to_string(self.dir.join("pids.current")).expect("pids.current");
        text.trim().parse().expect("pids.current is a number")
    }

    /// `pids.max`: `Some(n)` tasks at most, `None` for no limit.
    fn limit(&self, max: Option<usize>) {
        let value = max.map_or("max".to_string(), |n| n.to_string());
        write(&self.dir.join("pids.max"), &value);
    }

    /// Room for exactly `more` new threads, counted from now.
    fn allow_more(&self, more: usize) {
        self.limit(Some(self.current() + more));
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        self.limit(None);
        let procs = fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let _ = fs::write(self.parent.join("cgroup.procs"), pid);
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

fn write(path: &Path, value: &str) {
    fs::write(path, value).unwrap_or_else(|e| panic!("write {value} to {}: {e}", path.display()));
}

/// The root of a hierarchy with the pids controller: a cgroup2 mount that has it (enabled for
/// its children), else a v1 mount of it.
fn pids_hierarchy() -> PathBuf {
    let mounts = fs::read_to_string("/proc/self/mounts").expect("/proc/self/mounts");
    let mut v1 = None;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, dir, fstype, options, ..] = fields[..] else {
            continue;
        };
        let dir = PathBuf::from(dir);
        match fstype {
            "cgroup2" => {
                let controllers =
                    fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
                if controllers.split_whitespace().any(|c| c == "pids")
                    && fs::write(dir.join("cgroup.subtree_control"), "+pids").is_ok()
                {
                    return dir;
                }
            }
            "cgroup" if options.split(',').any(|o| o == "pids") => v1 = Some(dir),
            _ => {}
        }
    }
    v1.unwrap_or_else(|| {
        panic!(
            "no cgroup hierarchy with the pids controller here (neither cgroup2 nor v1 in \
             /proc/self/mounts): this test needs one to refuse cusedev a thread"
        )
    })
}

/// Names of the threads cusedev starts for one offer or rescind (`bind-RELID`,
/// `rescind-RELID`): none may be running when a limit is computed.
fn wait_until_no_bus_work(pid: u32) {
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let census = Census::of(pid);
        let busy: Vec<_> = census
            .threads
            .keys()
            .filter(|name| name.starts_with("bind-") || name.starts_with("rescind-"))
            .collect();
        if busy.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cusedev still runs {busy:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn fakehost_ok(rig: &Rig, args: &[&str]) {
    let out = rig.fakehost(args);
    assert!(out.status.success(), "fakehost {args:?} failed");
}

/// Rescinds `service` and waits until cusedev has dealt with it (`rescind-N` gone).
fn rescind(rig: &Rig, service: &str, needle: &str) {
    let mark = rig.guest.log_mark();
    fakehost_ok(rig, &["rescind", service]);
    rig.guest.wait_for_log_from(mark, needle);
    wait_until_no_bus_work(rig.guest.pid());
}

/// Offers `service` and waits for a cusedev log line containing `needle`.
fn offer_and_expect(rig: &Rig, service: &str, needle: &str) {
    let mark = rig.guest.log_mark();
    fakehost_ok(rig, &["offer", service]);
    rig.guest.wait_for_log_from(mark, needle);
}

/// What `Display` of `pthread_create`'s EAGAIN says, as cusedev logs it.
const EAGAIN: &str = "Resource temporarily unavailable (os error 11)";

fn assert_alive(rig: &mut Rig) {
    assert_eq!(rig.guest.try_exit(), None, "cusedev died");
}

/// A rig whose host offers only `service`, rescinded again once served (so the next offer
/// is the test's), with cusedev's census at rest and cusedev moved into a pids cgroup (no
/// limit yet).
fn rescinded_rig_in_a_cgroup(service: &str, device: &str) -> (Rig, Census, PidsCgroup) {
    enter_private_mount_namespace().expect("private mount namespace");
    let rig = Rig::builder(&format!("shortage-{service}"))
        .guest_args(&["--kernel", "linux-6.1"])
        .host_args(&["--offer", service])
        .serves(device)
        .start();
    rescind(&rig, service, &format!("/dev/{device} removed"));
    // The rescinded channel's thread (`chan-<relid>`) ends a moment after cusedev logs the
    // release; a baseline taken before would count it, and the refused offer would then seem
    // to have lost a thread and two fds.
    let pid = rig.guest.pid();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Census::of(pid)
        .threads
        .keys()
        .any(|name| name.starts_with("chan-"))
    {
        assert!(
            Instant::now() < deadline,
            "the rescinded channel's thread never ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let baseline = Census::settled(pid, Duration::from_secs(10));
    let cgroup = PidsCgroup::create(service);
    cgroup.adopt(rig.guest.pid());
    (rig, baseline, cgroup)
}

/// With room for `more` new threads, an offer of `service` is refused because of `what`
/// could not be started; cusedev lives on and is back at `baseline`.
fn offer_is_refused(
    rig: &mut Rig,
    cgroup: &PidsCgroup,
    baseline: &Census,
    more: usize,
    service: &str,
    what: &str,
) {
    cgroup.allow_more(more);
    offer_and_expect(
        rig,
        service,
        &format!("out of resources: {what}: {EAGAIN}; the offer is left alone"),
    );
    assert_alive(rig);
    wait_for_baseline(rig.guest.pid(), baseline, SETTLE);
}

#[test]
fn fcopy_offer_without_threads_is_refused_and_served_once_threads_are_back() {
    let (mut rig, baseline, cgroup) = rescinded_rig_in_a_cgroup("fcopy", FCOPY_DEVICE);

    // No thread at all: not even the one that opens the channel.
    let what = "cannot start a thread to open the channel";
    offer_is_refused(&mut rig, &cgroup, &baseline, 0, "fcopy", what);
    assert_eq!(Dev::open(FCOPY_NODE).err(), Some(Errno::ENOENT));

    // Its rescind finds no thread either: it runs on the control loop.
    rescind(&rig, "fcopy", "which is not open here; ignored");
    assert!(rig
        .guest
        .log_contains("cannot start a thread for the rescind"));

    // One thread: the channel opens, the driver's timer thread cannot start.
    let what = "cannot start the thread hv_fcopy-timer";
    offer_is_refused(&mut rig, &cgroup, &baseline, 1, "fcopy", what);
    assert_eq!(Dev::open(FCOPY_NODE).err(), Some(Errno::ENOENT));

    // Threads again: the next offer is served, and a real copy goes through.
    cgroup.limit(None);
    rescind(&rig, "fcopy", "which is not open here; ignored");
    offer_and_expect(&rig, "fcopy", "serving /dev/vmbus/hv_fcopy");
    let daemon = rig.start_daemon();
    let src = rig.dir.join("src.bin");
    write_pattern_file(&src, 1 << 20, 57);
    let guest_dir = rig.dir.join("guest");
    fs::create_dir_all(&guest_dir).expect("guest dir");
    fakehost_ok(
        &rig,
        &[
            "copy",
            src.to_str().expect("utf-8 path"),
            guest_dir.to_str().expect("utf-8 path"),
        ],
    );
    assert_eq!(sha256(&guest_dir.join("src.bin")), sha256(&src));
    drop(daemon);
    assert_alive(&mut rig);
}

#[test]
fn kvp_offer_refused_at_its_second_timer_leaves_no_thread_behind() {
    let (mut rig, baseline, cgroup) = rescinded_rig_in_a_cgroup("kvp", KVP_DEVICE);

    // The bind thread and the first of kvp's two timers start; the second cannot, and the
    // first must end with the refused driver (the baseline counts threads by name).
    let what = "cannot start the thread hv_kvp-nego";
    offer_is_refused(&mut rig, &cgroup, &baseline, 2, "kvp", what);

    cgroup.limit(None);
    rescind(&rig, "kvp", "which is not open here; ignored");
    offer_and_expect(&rig, "kvp", "serving /dev/vmbus/hv_kvp");
    assert_alive(&mut rig);
}
