//! Rows on /dev/azure_xs_fastpath with the C client `tests/c/xs-client.c` and fakehost's
//! XStore service: a client SIGKILLed in an ioctl the service holds, and a host that stops
//! answering (SIGSTOP) under both profiles: `reviewed` bounds the wait (the caller's timeout +
//! 5 s, then ETIMEDOUT: review point 17, ../shared/spec/xs_fastpath.md §4), `posted` has no
//! bound (`wait_for_completion`, the 2021 patch).

use std::time::{Duration, Instant};

use cusedev_tests::census::RowFigures;
use cusedev_tests::enter_private_mount_namespace;
use cusedev_tests::harness::Rig;
use cusedev_tests::xs_client::{run, seconds_after, Bits, Holder, Run, REVIEWED, XS_DEVICE};
use nix::sys::signal::Signal;

use super::{fakehost_ok, signal, stop, wait_all_served, ENDS};

/// The reviewed profile's grace past the caller's own timeout (review point 17).
const WAIT_GRACE: Duration = Duration::from_secs(5);

/// The rig: fakehost with a blob root of the test's, cusedev serving the node under a device
/// root of the test's.
struct Xs {
    rig: Rig,
    node: String,
}

impl Xs {
    fn start(test: &str, guest_args: &[&str]) -> Xs {
        enter_private_mount_namespace().expect("private mount namespace");
        let rig = Rig::builder(test)
            .host_dir_arg("--blob-root", "blobs")
            .guest_dir_arg("--dev-root", "dev")
            .guest_args(guest_args)
            .serves(XS_DEVICE)
            .start();
        wait_all_served(&rig, 0);
        let node = rig.dir.join("dev").join(XS_DEVICE).display().to_string();
        Xs { rig, node }
    }

    /// The rig after a first load run, and cusedev's baseline for row `row` then.
    fn warmed(test: &str, guest_args: &[&str], row: &str) -> (Xs, RowFigures) {
        let xs = Xs::start(test, guest_args);
        xs.load();
        let figures = RowFigures::baseline(row, xs.cusedev(), "a first load run");
        (xs, figures)
    }

    fn client(&self, args: &[&str]) -> Run {
        let mut all = vec!["--dev", self.node.as_str()];
        all.extend_from_slice(args);
        run(Bits::B64, &all)
    }

    /// 8 threads × 40 mixed requests, every answer checked against the client's model.
    fn load(&self) {
        let run = self.client(&["load", "--threads", "8", "--ops", "40"]);
        run.assert_success("load");
        assert!(run.stdout.contains("mismatches 0"), "{}", run.text());
    }

    /// `hold --delay-aware`: one GET with a 60 s timeout.
    fn holder(&self) -> Holder {
        Holder::start(&["--dev", &self.node, "hold", "--delay-aware"])
    }

    fn cusedev(&self) -> u32 {
        self.rig.guest.pid()
    }

    /// Waits until `fakehost status` says the XStore service has `count` requests in flight.
    fn wait_for_in_flight(&self, count: usize) {
        let want = format!(", {count} in flight,");
        let deadline = Instant::now() + ENDS;
        loop {
            let status = fakehost_ok(&self.rig, &["status"]);
            if status.contains(&want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the service never had {count} in flight: {status}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Row 2. A caller SIGKILLed in the ioctl: its request is the server's once cusedev has read
/// it, so the kernel's FUSE code keeps the dying caller in the call until cusedev answers
/// (fs/fuse/dev.c 6.1, `request_wait_answer`); the answer comes when the service does. After
/// it nothing of the caller is held: not by the service (0 in flight), not by cusedev (its
/// census), and the next client's requests all come back right.
#[test]
fn client_sigkilled_mid_ioctl_held_by_the_service_leaves_nothing_held_and_the_next_client_works() {
    let (xs, mut figures) = Xs::warmed("fm-xs-client-killed", &[], "xs client SIGKILLed mid-ioctl");
    fakehost_ok(&xs.rig, &["xs", "--delay", "3s"]);
    let mut holder = xs.holder();
    holder.wait_in_ioctl();
    xs.wait_for_in_flight(1);
    figures.sample();
    holder.kill();
    let (line, code) = holder.finish(ENDS);
    assert_eq!(code, None, "killed by the signal: {line}");
    xs.wait_for_in_flight(0);
    fakehost_ok(&xs.rig, &["xs", "--normal"]);
    xs.load();
    figures.back(ENDS);
}

/// Row 6 (xs, reviewed). While the host is stopped the request sits unread on the bus; the
/// reviewed driver ends the call after its timeout (1 ms) + 5 s with ETIMEDOUT. When the host
/// runs again it reads the stale request and asks for the caller's pages: the call is over,
/// so cusedev refuses (the caller's memory is never touched after its syscall), and the
/// request's slot, kept since the timeout, is freed by the late completion (docs/decisions.md
/// 38). The next client's requests all come back right.
#[test]
fn host_sigstopped_ends_a_reviewed_call_with_etimedout_after_its_timeout_plus_5_s_then_recovers() {
    let (xs, mut figures) = Xs::warmed(
        "fm-xs-host-stopped-reviewed",
        &["--profile", REVIEWED],
        "xs host SIGSTOPped, reviewed",
    );
    stop(xs.rig.host.pid());
    let held = xs.client(&["--timeout", "1", "hold"]);
    figures.sample();
    let line = held.stdout.lines().last().unwrap_or_default().to_string();
    assert!(line.contains("errno ETIMEDOUT"), "{}", held.text());
    let seconds = seconds_after(&line);
    assert!(
        seconds >= WAIT_GRACE.as_secs_f64() && seconds < (WAIT_GRACE + ENDS).as_secs_f64(),
        "the bound is the timeout (1 ms) + {WAIT_GRACE:?}; the call ended after {seconds} s"
    );
    let mark = xs.rig.guest.log_mark();
    signal(xs.rig.host.pid(), Signal::SIGCONT);
    xs.rig
        .guest
        .wait_for_log_from(mark, "which is not in flight");
    xs.wait_for_in_flight(0);
    eprintln!(
        "fault-matrix: xs host SIGSTOPped, reviewed: ETIMEDOUT after {seconds} s; the late \
         request was refused the caller's pages"
    );
    xs.load();
    figures.back(ENDS);
}

/// Row 6 (xs, posted). The posted driver has no bound: with the host stopped the call waits
/// (watched on /proc all along) past where reviewed ends a 1 ms call; when the host runs again
/// it answers the request, and the call returns with the host's answer. (The call's own
/// timeout is 60 s here: it travels to the host, which would answer TIMEOUT to a store
/// operation slower than 1 ms.)
#[test]
fn host_sigstopped_leaves_a_posted_call_waiting_past_the_reviewed_bound_and_sigcont_answers_it() {
    let (xs, mut figures) = Xs::warmed(
        "fm-xs-host-stopped-posted",
        &[],
        "xs host SIGSTOPped, posted",
    );
    stop(xs.rig.host.pid());
    let holder = xs.holder();
    let started = Instant::now();
    holder.wait_in_ioctl();
    figures.sample();
    while started.elapsed() < WAIT_GRACE + Duration::from_secs(2) {
        assert!(holder.in_ioctl(), "the posted call ended without an answer");
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(xs.rig.host.pid(), Signal::SIGCONT);
    let (line, code) = holder.finish(ENDS);
    assert_eq!(code, Some(0), "{line}");
    assert!(line.contains("ret 0 status 2 (NOT_FOUND)"), "{line}");
    eprintln!("fault-matrix: xs host SIGSTOPped, posted: {line}");
    xs.load();
    figures.back(ENDS);
}
