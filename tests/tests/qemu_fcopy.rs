//! The whole path in a QEMU guest: Debian's unmodified hv_fcopy_daemon on a CUSE character
//! device served by cusedev, whose bus runs over AF_VSOCK through our vhost-user-vsock backend
//! to fakehost on the host (see `cusedev_tests::fcopy_guest`).
//!
//! One boot carries every check, in an order that keeps them apart: the errno probe plays the
//! daemon before the daemon starts.

use std::time::Duration;

use cusedev_tests::fcopy_guest::{
    cusedev_log_mark, guest_ok, guest_sha256, start_cusedev, start_daemon, wait_for_cusedev_log,
    VsockHost, SHORT,
};
use cusedev_tests::harness::{sha256, workspace_binary, write_pattern_file};
use cusedev_tests::qemu::{GuestConfig, GuestImage};

/// A 100 MB copy is 16,000+ daemon round trips through an emulated CPU.
const LONG: Duration = Duration::from_secs(900);

/// What `fcopy-probe` checks, each of which must print `PROBE ok <name>`.
const PROBE_CHECKS: [&str; 8] = [
    "node_is_a_char_device_0600_root",
    "second_open_is_ebusy",
    "writes_of_the_wrong_size_are_einval_before_the_handshake",
    "handshake_is_answered_with_version_1",
    "blocked_read_interrupted_by_a_signal_is_eintr",
    "sleeping_poll_is_woken_by_the_handshake_reply",
    "ioctl_is_enotty",
    "close_resets_the_handshake",
];

#[test]
fn unmodified_daemon_receives_files_over_cuse_and_vhost_vsock_in_a_qemu_guest() {
    let image = GuestImage::ensure().expect("guest image (tests/scripts/guest/build-guest.sh)");
    let host = VsockHost::start("qemu-fcopy");
    let mut guest = host
        .boot(
            &image,
            GuestConfig {
                lifetime: Duration::from_secs(1500),
                ..GuestConfig::named("qemu-fcopy")
            },
        )
        .expect("boot the guest");
    eprintln!("guest booted in {:.1} s", guest.boot_seconds());

    let frontend = start_cusedev(&mut guest).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        frontend.contains("frontend: CUSE (auto: /dev/cuse works"),
        "auto must pick CUSE in a guest that has it: {frontend}"
    );

    // stat() shows a character device with the misc driver's mode, as for the kernel's node.
    let kind = guest_ok(
        &mut guest,
        "stat",
        "stat -c '%F %a %U' /dev/vmbus/hv_fcopy",
        SHORT,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(kind.trim(), "character special file 600 root");

    // The errno paths, through the real character device.
    let probe = workspace_binary("fcopy-probe");
    let probed = guest
        .run(&format!("{} /dev/vmbus/hv_fcopy", probe.display()), SHORT)
        .expect("run fcopy-probe");
    for check in PROBE_CHECKS {
        assert!(
            probed.output.contains(&format!("PROBE ok {check}\n")),
            "probe check {check} did not pass:\n{}",
            probed.output
        );
    }
    assert_eq!(probed.status, 0, "{}", probed.output);

    start_daemon(&mut guest).unwrap_or_else(|e| panic!("{e}"));

    // 10 MB and 100 MB, each checked by sha256 inside the guest.
    for (name, len, seed) in [
        ("ten.bin", 10_000_000u64, 11),
        ("hundred.bin", 100_000_000, 12),
    ] {
        let src = host.dir.join(name);
        write_pattern_file(&src, len, seed);
        let (code, text) = host.copy(&src, "/srv/in/", &["--create-path"]);
        assert_eq!(code, Some(0), "copy of {name} failed:\n{text}");
        let in_guest = guest_sha256(&mut guest, &format!("/srv/in/{name}"), LONG)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(in_guest, sha256(&src), "{name} arrived different");
    }

    // A second copy without --overwrite: ERROR_FILE_EXISTS, and the file is kept.
    let ten = host.dir.join("ten.bin");
    let (code, text) = host.copy(&ten, "/srv/in/", &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("0x80070050"), "{text}");
    let in_guest =
        guest_sha256(&mut guest, "/srv/in/ten.bin", LONG).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(in_guest, sha256(&ten));

    // Rescind while the daemon holds the device (6.1): its read fails with EBADF, it lets go,
    // and only at that last close does the node go and the CUSE device get unregistered.
    let mark = cusedev_log_mark(&mut guest).unwrap_or_else(|e| panic!("{e}"));
    let (code, text) = host.fakehost(&["rescind", "fcopy"]);
    assert_eq!(code, Some(0), "{text}");
    for line in [
        "/dev/vmbus/hv_fcopy removed",
        "vmbus/hv_fcopy: CUSE connection closed; the kernel unregistered the device",
    ] {
        wait_for_cusedev_log(&mut guest, mark, line).unwrap_or_else(|e| panic!("{e}"));
    }
    guest_ok(
        &mut guest,
        "node and CUSE device gone",
        "test ! -e /dev/vmbus/hv_fcopy && test ! -e '/sys/class/cuse/vmbus!hv_fcopy'",
        SHORT,
    )
    .unwrap_or_else(|e| panic!("{e}"));

    // A new offer registers the same name again; a new daemon receives a file.
    let mark = cusedev_log_mark(&mut guest).unwrap_or_else(|e| panic!("{e}"));
    let (code, text) = host.fakehost(&["offer", "fcopy"]);
    assert_eq!(code, Some(0), "{text}");
    wait_for_cusedev_log(&mut guest, mark, "serving /dev/vmbus/hv_fcopy")
        .unwrap_or_else(|e| panic!("{e}"));
    start_daemon(&mut guest).unwrap_or_else(|e| panic!("{e}"));
    let (code, text) = host.copy(&ten, "/srv/again/", &["--create-path"]);
    assert_eq!(code, Some(0), "copy after the re-offer failed:\n{text}");
    let in_guest =
        guest_sha256(&mut guest, "/srv/again/ten.bin", LONG).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(in_guest, sha256(&ten));

    // The daemon said what it did in syslog: the driver's version it read, each target.
    let syslog = guest_ok(&mut guest, "syslog", "cat /tmp/syslog.txt", SHORT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(syslog.contains("HV_FCOPY"), "{syslog}");
    assert!(syslog.contains("kernel module version: 1"), "{syslog}");
    assert!(syslog.contains("hundred.bin"), "{syslog}");

    guest.poweroff().expect("clean poweroff");
}
