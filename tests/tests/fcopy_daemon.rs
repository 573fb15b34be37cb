//! Debian's unmodified hv_fcopy_daemon receives files from fakehost through /dev/vmbus/hv_fcopy
//! served by cusedev on a real FUSE mount. Each test runs in its own mount namespace.

use std::path::Path;
use std::time::{Duration, Instant};

use cusedev_tests::enter_private_mount_namespace;
use cusedev_tests::harness::{mount_tmpfs, sha256, write_pattern_file, Rig};

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A rig with a daemon, a source directory and a guest directory on tmpfs.
struct Scene {
    rig: Rig,
    daemon: cusedev_tests::harness::Supervised,
    src: std::path::PathBuf,
    guest: std::path::PathBuf,
}

fn scene(test: &str, guest_size: &str) -> Scene {
    enter_private_mount_namespace().expect("private mount namespace");
    let rig = Rig::start(test, "linux-6.1");
    let src = rig.dir.join("src");
    mount_tmpfs(&src, "1200m");
    let guest = rig.dir.join("guest");
    mount_tmpfs(&guest, guest_size);
    let daemon = rig.start_daemon();
    Scene {
        rig,
        daemon,
        src,
        guest,
    }
}

fn copy(rig: &Rig, src: &Path, guest_dir: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["copy", src.to_str().unwrap(), guest_dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    rig.fakehost(&args)
}

#[test]
fn ten_megabyte_copy_arrives_identical() {
    let s = scene("ten_mb", "64m");
    let file = s.src.join("ten.bin");
    write_pattern_file(&file, 10 * 1000 * 1000, 1);
    let out = copy(&s.rig, &file, &s.guest, &[]);
    assert!(out.status.success(), "copy failed: {}", stdout(&out));
    assert!(stdout(&out).contains("0x00000000"), "{}", stdout(&out));
    assert_eq!(sha256(&s.guest.join("ten.bin")), sha256(&file));
}

#[test]
fn second_copy_without_overwrite_fails_with_file_exists_and_keeps_the_first() {
    let s = scene("exists", "64m");
    let first = s.src.join("a.bin");
    write_pattern_file(&first, 300_000, 2);
    assert!(copy(&s.rig, &first, &s.guest, &[]).status.success());

    let other = s.src.join("other.bin");
    write_pattern_file(&other, 100_000, 3);
    let out = copy(&s.rig, &other, &s.guest, &["--name", "a.bin"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("0x80070050"), "{}", stdout(&out));
    assert!(stdout(&out).contains("file exists"), "{}", stdout(&out));
    assert_eq!(sha256(&s.guest.join("a.bin")), sha256(&first));
}

#[test]
fn overwrite_with_a_shorter_file_replaces_it_exactly() {
    let s = scene("overwrite", "64m");
    let long = s.src.join("long.bin");
    write_pattern_file(&long, 500_000, 4);
    assert!(copy(&s.rig, &long, &s.guest, &["--name", "f.bin"])
        .status
        .success());

    let short = s.src.join("short.bin");
    write_pattern_file(&short, 7_000, 5);
    let out = copy(
        &s.rig,
        &short,
        &s.guest,
        &["--name", "f.bin", "--overwrite"],
    );
    assert!(out.status.success(), "{}", stdout(&out));
    let copied = s.guest.join("f.bin");
    assert_eq!(std::fs::metadata(&copied).unwrap().len(), 7_000);
    assert_eq!(sha256(&copied), sha256(&short));
}

#[test]
fn create_path_makes_a_missing_nested_directory() {
    let s = scene("create_path", "64m");
    let file = s.src.join("deep.bin");
    write_pattern_file(&file, 20_000, 6);
    let nested = s.guest.join("x/y/z");

    let without = copy(&s.rig, &file, &nested, &[]);
    assert_eq!(without.status.code(), Some(1), "{}", stdout(&without));
    assert!(
        stdout(&without).contains("0x80004005"),
        "{}",
        stdout(&without)
    );
    assert!(!s.guest.join("x").exists());

    let with = copy(&s.rig, &file, &nested, &["--create-path"]);
    assert!(with.status.success(), "{}", stdout(&with));
    assert_eq!(sha256(&nested.join("deep.bin")), sha256(&file));
}

#[test]
fn one_gibibyte_copy_matches_sha256() {
    let s = scene("one_gib", "1100m");
    let file = s.src.join("big.iso");
    write_pattern_file(&file, 1 << 30, 7);
    let out = copy(&s.rig, &file, &s.guest, &[]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert_eq!(sha256(&s.guest.join("big.iso")), sha256(&file));
}

#[test]
fn daemon_killed_mid_copy_fails_the_copy_at_once_and_the_next_daemon_completes_it() {
    let mut s = scene("killed", "600m");
    let file = s.src.join("mid.bin");
    write_pattern_file(&file, 300 << 20, 8);
    let copying =
        s.rig
            .fakehost_spawn(&["copy", file.to_str().unwrap(), s.guest.to_str().unwrap()]);

    // Mid-copy: the daemon has written part of the file.
    let target = s.guest.join("mid.bin");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&target).map(|m| m.len()).unwrap_or(0) < (4 << 20) {
        assert!(Instant::now() < deadline, "the copy never got going");
        std::thread::sleep(Duration::from_millis(5));
    }
    s.daemon.kill();
    let killed_at = Instant::now();
    let out = copying.wait_with_output().expect("copy exits");
    // The 6.1 driver fails the pending transaction when the fd closes; only the driver's 30 s
    // timeout would be slower, so anything well under it proves the close path.
    assert!(
        killed_at.elapsed() < Duration::from_secs(10),
        "the copy took {:?} to fail after the daemon died",
        killed_at.elapsed()
    );
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("0x80004005"), "{}", stdout(&out));

    let _daemon = s.rig.start_daemon();
    let again = copy(&s.rig, &file, &s.guest, &["--overwrite"]);
    assert!(again.status.success(), "{}", stdout(&again));
    assert_eq!(sha256(&target), sha256(&file));
}

#[test]
fn disk_full_reports_0x80070070_and_the_partial_file_is_removed() {
    // The daemon reports 0x80070070 only when pwrite() fails with ENOSPC; a *short* pwrite
    // leaves errno stale and gives 0x80004005 (tools/hv/hv_fcopy_daemon.c 6.1, spec §6.2). So
    // the tmpfs ends on a fragment boundary: 86 × 12288 bytes, a multiple of both 6144 (the
    // fragment) and 4096 (the page tmpfs allocates).
    let s = scene("disk_full", "1056768");
    let file = s.src.join("too_big.bin");
    write_pattern_file(&file, 4 << 20, 9);
    let out = copy(&s.rig, &file, &s.guest, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("0x80070070"), "{}", stdout(&out));
    assert!(stdout(&out).contains("disk full"), "{}", stdout(&out));
    assert!(
        !s.guest.join("too_big.bin").exists(),
        "CANCEL should have made the daemon delete the partial file"
    );
}

#[test]
fn copy_without_a_registered_daemon_fails_at_once_with_e_fail() {
    enter_private_mount_namespace().expect("private mount namespace");
    let rig = Rig::start("no_daemon", "linux-6.1");
    let file = rig.dir.join("lonely.bin");
    write_pattern_file(&file, 10_000, 10);
    let started = Instant::now();
    let out = rig.fakehost(&["copy", file.to_str().unwrap(), "/tmp/nowhere/"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}: the driver should answer at once, not after its timeout",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("0x80004005"), "{}", stdout(&out));
}

#[test]
fn the_unmodified_6_1_daemon_cannot_register_with_the_2014_driver() {
    // Spec §9 #1: it writes version 1, the 2014 driver accepts only 0 → EINVAL →
    // "Registration failed" → exit 1. This is why linux-6.1 is the default profile.
    enter_private_mount_namespace().expect("private mount namespace");
    let rig = Rig::start("seed_daemon", "linux-3.14");
    let mut daemon = cusedev_tests::harness::Supervised::spawn(
        "hv_fcopy_daemon",
        std::process::Command::new(cusedev_tests::harness::FCOPY_DAEMON).arg("-n"),
    );
    assert_eq!(daemon.wait_exit().code(), Some(1));
    rig.guest.wait_for_log(
        "registration with version 1 refused: the 2014 driver accepts only version 0",
    );
    assert!(!rig.guest.log_contains("registering done"));
}
