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
    /// Kept for the test's length (dropping it stops the daemon).
    _daemon: cusedev_tests::harness::Supervised,
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
        _daemon: daemon,
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

// The daemon killed mid-copy and the disk full in the guest are rows of the fault matrix
// (tests/tests/fault_matrix/fcopy.rs), with cusedev's census around them.

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
