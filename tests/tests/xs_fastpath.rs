//! /dev/azure_xs_fastpath on a FUSE mount, driven by the C client `tests/c/xs-client.c`
//! through real syscalls, against fakehost's XStore host with a blob root in the test's
//! scratch directory.
//!
//! The errno paths (../shared/spec/xs_fastpath.md §3.2) are the client's `errno` case list,
//! once per profile: `posted` (the 2021 patch exactly) and `reviewed` (the reviewer's points:
//! ENOTTY for unknown commands, validated timeout, lengths before pinning, a bounded wait,
//! ENODEV for calls in flight at a rescind). The rest: a 64-thread load checked against the
//! client's model of every blob, the bytes as fakehost's own CLI sees them, fault injection
//! (`fakehost xs`), a client killed mid-request, and rescinds with calls in flight.
//!
//! What a FUSE mount lets us check of "waits forever, uninterruptible": the caller stays in
//! ioctl(2); once SIGKILLed it sleeps in 'D' (the kernel's FUSE code waits out a request the
//! server has read, fs/fuse/dev.c request_wait_answer) and is still there after the host has
//! answered later requests; only cusedev's exit (which aborts the FUSE connection) ends it.
//! "Forever" itself is not checkable; "after everything that could have released it" is.

use std::time::Duration;

use cusedev_tests::census::{wait_for_baseline, Census};
use cusedev_tests::dev::{Dev, Errno};
use cusedev_tests::enter_private_mount_namespace;
use cusedev_tests::harness::{write_pattern_file, Rig};
use cusedev_tests::xs_client::{
    assert_all_cases_pass, run, seconds_after, Bits, Holder, Run, BIG_FIT, REVIEWED, XS_DEVICE,
    XS_NODE,
};

#[path = "../../fakehost/tests/common/azurite.rs"]
mod azurite;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Profile {
    Posted,
    Reviewed,
}

/// How long a call that should end at once may take to end.
const ENDS: Duration = Duration::from_secs(30);

/// The rig of one test, with the node under a device root of its own (see
/// `RigBuilder::guest_dir_arg`): fakehost with a blob root in the scratch directory, cusedev
/// serving the node.
struct Xs {
    rig: Rig,
    node: String,
}

impl std::ops::Deref for Xs {
    type Target = Rig;
    fn deref(&self) -> &Rig {
        &self.rig
    }
}

impl std::ops::DerefMut for Xs {
    fn deref_mut(&mut self) -> &mut Rig {
        &mut self.rig
    }
}

impl Xs {
    /// `xs-client --dev NODE ARGS` (64-bit).
    fn client(&self, args: &[&str]) -> Run {
        self.client_bits(Bits::B64, args)
    }

    fn client_bits(&self, bits: Bits, args: &[&str]) -> Run {
        let mut all = vec!["--dev", self.node.as_str()];
        all.extend_from_slice(args);
        run(bits, &all)
    }

    /// `hold --delay-aware`: a request with a 60 s timeout.
    fn holder(&self) -> Holder {
        Holder::start(&["--dev", &self.node, "hold", "--delay-aware"])
    }

    /// `hold` with a 1 ms timeout: the reviewed profile would end it after 5 s.
    fn short_holder(&self) -> Holder {
        Holder::start(&["--dev", &self.node, "--timeout", "1", "hold"])
    }

    fn open(&self) -> Result<Dev, Errno> {
        Dev::open(&self.node)
    }
}

fn rig(test: &str, profile: Profile) -> Xs {
    enter_private_mount_namespace().expect("private mount namespace");
    start_rig(test, profile)
}

fn start_rig(test: &str, profile: Profile) -> Xs {
    start_rig_over(
        profile,
        Rig::builder(test).host_dir_arg("--blob-root", "blobs"),
    )
}

/// The rig with the blob store `builder` names.
fn start_rig_over(profile: Profile, builder: cusedev_tests::harness::RigBuilder) -> Xs {
    let builder = builder.guest_dir_arg("--dev-root", "dev").serves(XS_DEVICE);
    let rig = match profile {
        Profile::Posted => builder,
        Profile::Reviewed => builder.guest_args(&["--profile", REVIEWED]),
    }
    .start();
    let node = rig.dir.join("dev").join(XS_DEVICE).display().to_string();
    Xs { rig, node }
}

/// `fakehost ARGS` against the rig's host; must succeed.
fn fakehost_ok(rig: &Xs, args: &[&str]) -> String {
    let out = rig.fakehost(args);
    assert!(
        out.status.success(),
        "fakehost {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Cases whose absence from a run means the list itself lost them.
const CORE_CASES: [&str; 12] = [
    "read_is_einval",
    "hundred_concurrent_opens_all_succeed",
    "arg_straddling_into_an_unmapped_page_is_efault",
    "request_len_0_is_einval_even_with_null_buffers",
    "request_buffer_in_rodata_is_efault",
    "data_len_0_with_a_garbage_data_buffer_is_ignored",
    "page_cap_32MiB_data_plus_request_plus_response_8194_pages_is_einval",
    "page_cap_exactly_8192_pages_succeeds",
    "only_offsets_56_and_60_are_written_back",
    "get_of_a_missing_blob_is_ret_0_status_not_found",
    "fd_inherited_across_exec_is_eacces",
    "fd_after_setgroups_is_eacces",
];

// ---------------------------------------------------------------- errno paths

/// The client's case list for `profile`, with the cases that tell the profiles apart.
fn errno_paths_hold(test: &str, profile: Profile, name: &str, distinct: [&str; 2]) {
    let rig = rig(test, profile);
    let run = rig.client(&["errno", "--profile", name]);
    assert_all_cases_pass(&run, 40, &CORE_CASES);
    assert_all_cases_pass(&run, 40, &distinct);
}

#[test]
fn errno_paths_of_the_posted_patch_hold_through_real_syscalls() {
    errno_paths_hold(
        "xs-errno-posted",
        Profile::Posted,
        "posted",
        [
            "data_len_4GiB_minus_1_unmapped_is_efault_pinning_first",
            "timeout_0_is_not_validated",
        ],
    );
}

#[test]
fn errno_paths_of_the_reviewed_profile_hold_through_real_syscalls() {
    errno_paths_hold(
        "xs-errno-reviewed",
        Profile::Reviewed,
        "reviewed",
        [
            "data_len_4GiB_minus_1_unmapped_is_einval_before_pinning",
            "timeout_0_is_einval",
        ],
    );
}

#[test]
fn every_ioctl_from_a_32_bit_process_is_enotty_in_both_profiles() {
    enter_private_mount_namespace().expect("private mount namespace");
    for (profile, name) in [
        (Profile::Posted, "xs-compat-posted"),
        (Profile::Reviewed, "xs-compat-reviewed"),
    ] {
        let rig = start_rig(name, profile);
        let run = rig.client_bits(Bits::B32, &["errno32"]);
        assert_all_cases_pass(
            &run,
            7,
            &[
                "open_from_a_32_bit_process_works",
                "user_request_from_32_bit_is_enotty",
                "unknown_cmd_IO_R_1",
            ],
        );
        drop(rig);
    }
}

// ---------------------------------------------------------------- data

#[test]
fn sixty_four_threads_of_mixed_requests_match_the_clients_model() {
    let rig = rig("xs-load", Profile::Posted);
    let run = rig.client(&["load", "--threads", "64", "--ops", "1000", "--seed", "7"]);
    run.assert_success("load");
    assert!(run.stdout.contains("mismatches 0"), "{}", run.text());
}

#[test]
fn a_32_mib_class_blob_goes_through_one_call_each_way() {
    let rig = rig("xs-big", Profile::Posted);
    let bytes = BIG_FIT.to_string();
    let run = rig.client(&["big", "--bytes", &bytes]);
    run.assert_success("big");
    assert!(run.stdout.contains(", equal"), "{}", run.text());
}

#[test]
fn blobs_put_through_the_device_are_what_fakehost_stores_and_back() {
    let rig = rig("xs-interop", Profile::Posted);
    let sent = rig.dir.join("sent.bin");
    write_pattern_file(&sent, 300_000, 5);
    let sent_path = sent.to_str().unwrap();
    rig.client(&["put", "interop/from-client", sent_path])
        .assert_success("client put");
    let seen = rig.dir.join("seen-by-fakehost.bin");
    fakehost_ok(
        &rig,
        &[
            "blobs",
            "get",
            "interop/from-client",
            seen.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read(&seen).unwrap(),
        std::fs::read(&sent).unwrap(),
        "fakehost's copy differs from what the client put"
    );

    let stored = rig.dir.join("stored.bin");
    write_pattern_file(&stored, 70_001, 6);
    fakehost_ok(
        &rig,
        &[
            "blobs",
            "put",
            "interop/from-host",
            stored.to_str().unwrap(),
        ],
    );
    let got = rig.dir.join("got-by-client.bin");
    rig.client(&["get", "interop/from-host", got.to_str().unwrap()])
        .assert_success("client get");
    assert_eq!(
        std::fs::read(&got).unwrap(),
        std::fs::read(&stored).unwrap(),
        "the client got other bytes than fakehost stored"
    );

    let listed = rig.client(&["ls", "interop"]);
    listed.assert_success("client ls");
    assert_eq!(
        listed.stdout,
        "interop/from-client\ninterop/from-host\n",
        "{}",
        listed.text()
    );
    rig.client(&["rm", "interop/from-client"])
        .assert_success("client rm");
    let host_list = fakehost_ok(&rig, &["blobs", "ls"]);
    assert!(
        !host_list.contains("interop/from-client") && host_list.contains("interop/from-host"),
        "fakehost still lists the removed blob or lost the other: {host_list}"
    );
}

// ---------------------------------------------------------------- fault injection

#[test]
fn host_status_reaches_the_caller_as_ret_0_with_the_status_word() {
    let rig = rig("xs-fail-status", Profile::Posted);
    fakehost_ok(&rig, &["xs", "--fail-status", "5"]);
    let run = rig.client(&["stat", "anything"]);
    assert_eq!(run.code, Some(1), "{}", run.text());
    assert!(
        run.stderr.contains("ret 0 status 5 (STORE_ERROR)"),
        "the call must return 0 and carry the host's status: {}",
        run.text()
    );
    fakehost_ok(&rig, &["xs", "--normal"]);
    let run = rig.client(&["stat", "anything"]);
    assert!(
        run.stderr.contains("ret 0 status 2 (NOT_FOUND)"),
        "{}",
        run.text()
    );
}

#[test]
fn host_delay_is_seen_by_the_caller() {
    let rig = rig("xs-delay", Profile::Posted);
    fakehost_ok(&rig, &["xs", "--delay", "200ms"]);
    let (line, code) = rig.holder().finish(ENDS);
    assert_eq!(code, Some(0), "{line}");
    assert!(line.contains("ret 0 status 2 (NOT_FOUND)"), "{line}");
    let seconds = seconds_after(&line);
    assert!(
        seconds >= 0.2,
        "answered after {seconds} s, before the delay"
    );
}

#[test]
fn dropped_response_is_etimedout_after_timeout_plus_5_s_with_reviewed() {
    let rig = rig("xs-drop-reviewed", Profile::Reviewed);
    fakehost_ok(&rig, &["xs", "--drop-responses"]);
    let run = rig.client(&["--timeout", "1", "hold"]);
    let line = run.stdout.lines().last().unwrap_or_default().to_string();
    assert!(line.contains("errno ETIMEDOUT"), "{}", run.text());
    let seconds = seconds_after(&line);
    assert!(
        (5.0..15.0).contains(&seconds),
        "the bound is timeout (1 ms) + 5 s; the call ended after {seconds} s"
    );
    // The driver is fine afterwards.
    fakehost_ok(&rig, &["xs", "--normal"]);
    assert!(rig
        .client(&["stat", "x"])
        .stderr
        .contains("ret 0 status 2 (NOT_FOUND)"));
}

/// Waits until the host has dropped `count` requests (`fakehost xs` says so).
fn wait_until_host_dropped(rig: &Xs, count: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = fakehost_ok(rig, &["xs"]);
        let dropped = out
            .lines()
            .find_map(|l| l.strip_prefix("requests dropped so far: "))
            .and_then(|n| n.trim().parse::<u64>().ok());
        if dropped.is_some_and(|n| n >= count) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the host did not drop {count} requests in 30 s: {out}"
        );
        std::thread::yield_now();
    }
}

/// Past reviewed's bound for a 1 ms timeout (timeout + 5 s), with a margin.
const PAST_THE_REVIEWED_BOUND: Duration = Duration::from_secs(7);

#[test]
fn dropped_response_leaves_the_posted_caller_in_the_ioctl_even_killed_until_cusedev_stops() {
    let mut rig = rig("xs-drop-posted", Profile::Posted);
    fakehost_ok(&rig, &["xs", "--drop-responses"]);
    let started = std::time::Instant::now();
    let waiting = rig.short_holder();
    waiting.wait_in_ioctl();
    wait_until_host_dropped(&rig, 1);
    let mut killed = rig.short_holder();
    killed.wait_in_ioctl();
    // In ioctl(2) is not yet in the driver: a request the server has not read is still the
    // kernel's, and SIGKILL takes it back. Once the host has it, cusedev has read it.
    wait_until_host_dropped(&rig, 2);
    killed.kill();
    // The kernel's FUSE code waits out a request the server has read: 'D', still in ioctl.
    cusedev_tests::thread_state::wait_until_process_in_state(
        killed.pid,
        'D',
        Duration::from_secs(30),
    );

    // The host answers again; a new request completes; the dropped ones stay dropped.
    fakehost_ok(&rig, &["xs", "--normal"]);
    let run = rig.client(&["stat", "later"]);
    assert!(
        run.stderr.contains("ret 0 status 2 (NOT_FOUND)"),
        "{}",
        run.text()
    );
    // "Forever" cannot be checked; past the point where the reviewed profile would have
    // ended both calls (1 ms + 5 s) can. Watched on /proc all along, not slept through.
    while started.elapsed() < PAST_THE_REVIEWED_BOUND {
        assert!(
            waiting.in_ioctl(),
            "the posted call ended without an answer"
        );
        assert!(
            killed.in_ioctl() && !killed.exited(),
            "SIGKILL ended a posted call"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Only cusedev's end (the FUSE connection aborts) ends them.
    rig.guest.kill();
    let (line, _) = waiting.finish(ENDS);
    assert!(line.contains("ret -1 errno"), "{line}");
    killed.finish(ENDS);
}

// ---------------------------------------------------------------- a client killed mid-request

/// One round: a client killed in the middle of a request the host delays, then a load run
/// that must see every answer right.
fn kill_a_client_mid_request_then_load(rig: &Xs) {
    fakehost_ok(rig, &["xs", "--delay", "2s"]);
    let mut holder = rig.holder();
    holder.wait_in_ioctl();
    holder.kill();
    // It ends once cusedev has answered or abandoned its request.
    holder.finish(ENDS);
    fakehost_ok(rig, &["xs", "--normal"]);
    let run = rig.client(&["load", "--threads", "8", "--ops", "40"]);
    run.assert_success("load after the kill");
    assert!(run.stdout.contains("mismatches 0"), "{}", run.text());
}

/// The baseline is taken after a first round (threads a profile starts once, such as
/// reviewed's timeout thread, are in it); two more rounds must bring cusedev back to it:
/// the same fds, the same threads but for the engine's readers, which stay within their cap.
fn killed_client_leaves_cusedev_healthy(test: &str, profile: Profile) {
    let rig = rig(test, profile);
    kill_a_client_mid_request_then_load(&rig);
    let cusedev = rig.guest.pid();
    let baseline = Census::of(cusedev);
    for _ in 0..2 {
        kill_a_client_mid_request_then_load(&rig);
        wait_for_baseline(cusedev, &baseline, ENDS);
    }
}

#[test]
fn client_killed_mid_request_leaves_cusedev_healthy_and_at_baseline_with_posted() {
    killed_client_leaves_cusedev_healthy("xs-kill-posted", Profile::Posted);
}

#[test]
fn client_killed_mid_request_leaves_cusedev_healthy_and_at_baseline_with_reviewed() {
    killed_client_leaves_cusedev_healthy("xs-kill-reviewed", Profile::Reviewed);
}

// ---------------------------------------------------------------- rescind

/// `fakehost rescind xs`, then waits until a new open says ENODEV (the driver's `removing`).
fn rescind_and_wait_for_enodev(rig: &Xs) {
    fakehost_ok(rig, &["rescind", "xs"]);
    let deadline = std::time::Instant::now() + ENDS;
    loop {
        match rig.open() {
            Err(Errno::ENODEV) => return,
            other => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "open after the rescind: {:?}, not ENODEV",
                    other.err()
                );
                drop(other);
                std::thread::yield_now();
            }
        }
    }
}

fn removed_line() -> String {
    format!("{XS_NODE} removed")
}

/// An ioctl of the right command on `dev` with a zeroed argument: any error the driver
/// checks before the argument's contents (ENODEV while removing, EACCES) shows.
fn ioctl_zeroed(dev: &Dev) -> Result<i32, Errno> {
    let mut arg = [0u64; 8];
    // SAFETY: arg is a valid, writable 64-byte buffer for the duration of the call.
    let rc = unsafe { libc::ioctl(dev.raw(), 0xC040_520A_u32 as _, arg.as_mut_ptr()) };
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(rc)
    }
}

#[test]
fn rescind_with_an_open_file_keeps_the_node_until_the_last_close_with_posted() {
    let rig = rig("xs-rescind-open", Profile::Posted);
    let dev = rig.open().expect("open");
    let mark = rig.guest.log_mark();
    rescind_and_wait_for_enodev(&rig);
    assert!(
        std::fs::metadata(&rig.node).is_ok(),
        "the node went while a file is open"
    );
    assert_eq!(ioctl_zeroed(&dev), Err(Errno::ENODEV), "§3.2 #1: removing");
    assert!(!rig.guest.log_contains(&removed_line()));
    drop(dev);
    rig.guest.wait_for_log_from(mark, &removed_line());
    assert_eq!(rig.open().err(), Some(Errno::ENOENT));
}

#[test]
fn rescind_with_a_call_in_flight_leaves_it_waiting_and_keeps_the_node_with_posted() {
    let mut rig = rig("xs-rescind-posted", Profile::Posted);
    fakehost_ok(&rig, &["xs", "--drop-responses"]);
    let holder = rig.holder();
    holder.wait_in_ioctl();
    rescind_and_wait_for_enodev(&rig);
    assert!(std::fs::metadata(&rig.node).is_ok(), "the node went");
    assert!(holder.in_ioctl(), "the rescind ended the posted call");
    assert!(!rig.guest.log_contains(&removed_line()));
    rig.guest.kill();
    let (line, _) = holder.finish(ENDS);
    assert!(line.contains("ret -1 errno"), "{line}");
}

#[test]
fn rescind_with_a_call_in_flight_ends_it_with_enodev_and_removes_the_node_at_once_with_reviewed() {
    let rig = rig("xs-rescind-reviewed", Profile::Reviewed);
    fakehost_ok(&rig, &["xs", "--drop-responses"]);
    let dev = rig.open().expect("open");
    let holder = rig.holder();
    holder.wait_in_ioctl();
    let mark = rig.guest.log_mark();
    fakehost_ok(&rig, &["rescind", "xs"]);
    let (line, code) = holder.finish(ENDS);
    assert!(line.contains("ret -1 errno ENODEV"), "{line}");
    assert_eq!(code, Some(1));
    // Our file is still open, and the node goes all the same.
    rig.guest.wait_for_log_from(mark, &removed_line());
    assert_eq!(rig.open().err(), Some(Errno::ENOENT));
    drop(dev);
}

/// The device's bytes in a real object store: a put through /dev/azure_xs_fastpath is a blob
/// in Azurite (read back with Azure's own REST API), a get through the device returns it, an
/// rm through the device removes it from Azurite.
#[test]
fn a_blob_put_through_the_device_is_in_azurite_and_comes_back() {
    enter_private_mount_namespace().expect("private mount namespace");
    let scratch = std::env::temp_dir().join(format!("cusedev-xs-azurite-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let azurite = azurite::Azurite::start(&scratch);
    let container = format!("device-{}", std::process::id());
    azurite.create_container(&container);
    let url = azurite.store_url(&container);
    let rig = start_rig_over(
        Profile::Posted,
        Rig::builder("xs-azurite").host_args(&["--blob-store", &url]),
    );
    let source = rig.dir.join("source.bin");
    write_pattern_file(&source, 300_000, 9);
    rig.client(&["put", "through/the-device.bin", source.to_str().unwrap()])
        .assert_success("put through the device");
    let blob_path = format!("/{}/{container}/through/the-device.bin", azurite::ACCOUNT);
    let (code, body) = azurite.request("GET", &blob_path, &[]);
    assert_eq!(code, 200);
    assert_eq!(
        body,
        std::fs::read(&source).unwrap(),
        "Azurite holds the device's bytes"
    );
    let back = rig.dir.join("back.bin");
    rig.client(&["get", "through/the-device.bin", back.to_str().unwrap()])
        .assert_success("get through the device");
    assert_eq!(std::fs::read(&back).unwrap(), body);
    rig.client(&["rm", "through/the-device.bin"])
        .assert_success("rm through the device");
    assert_eq!(azurite.request("GET", &blob_path, &[]).0, 404);
    drop(rig);
    drop(azurite);
    let _ = std::fs::remove_dir_all(&scratch);
}
