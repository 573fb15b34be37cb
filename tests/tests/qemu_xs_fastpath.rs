//! /dev/azure_xs_fastpath as a real character device: cusedev's CUSE frontend in a QEMU guest
//! (Debian's 6.1 kernel), its bus over AF_VSOCK through our vhost-user-vsock backend to
//! fakehost's XStore host on this host, the C client `tests/c/xs-client.c` in the guest.
//!
//! The posted patch's errno list over CUSE, then one 32 MiB-class blob each way: CUSE's ioctl
//! retry carries at most 32 pages (fs/fuse/ioctl.c, FUSE_MAX_PAGES_PER_REQ's iovec limit), so
//! 8190 data pages arriving intact means the device reads and writes the caller's memory
//! itself. Then a small load run and the 32-bit case list (ENOTTY through CUSE's compat
//! ioctl). One boot, well under two minutes under TCG (about 20 s here).

use std::time::Duration;

use cusedev_tests::fcopy_guest::{guest_ok, start_cusedev_serving, VsockHost, SHORT};
use cusedev_tests::qemu::{GuestConfig, GuestImage};
use cusedev_tests::xs_client::{xs_client, Bits, BIG_FIT, XS_NODE};

/// For client runs that move 32 MiB through an emulated CPU.
const LONG: Duration = Duration::from_secs(300);

#[test]
fn posted_errno_paths_a_32_mib_blob_and_a_load_over_cuse_in_a_qemu_guest() {
    let image = GuestImage::ensure().expect("guest image (tests/scripts/guest/build-guest.sh)");
    let host = VsockHost::start_with("qemu-xs", &[("--blob-root", "blobs")]);
    let mut guest = host
        .boot(
            &image,
            GuestConfig {
                lifetime: Duration::from_secs(600),
                ..GuestConfig::named("qemu-xs")
            },
        )
        .expect("boot the guest");
    eprintln!("guest booted in {:.1} s", guest.boot_seconds());

    let frontend =
        start_cusedev_serving(&mut guest, XS_NODE, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        frontend.contains("frontend: CUSE"),
        "the guest has /dev/cuse: {frontend}"
    );
    let kind = guest_ok(
        &mut guest,
        "stat",
        &format!("stat -c '%F' {XS_NODE}"),
        SHORT,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(kind.trim(), "character special file");

    let client = xs_client(Bits::B64);
    let client = client.display();
    let errno = guest
        .run(&format!("{client} errno --profile posted"), LONG)
        .expect("run xs-client errno");
    let failed: Vec<&str> = errno
        .output
        .lines()
        .filter(|l| l.starts_with("FAIL "))
        .collect();
    assert!(
        failed.is_empty() && errno.status == 0 && errno.output.contains(" cases, 0 failed\n"),
        "{} case(s) failed over CUSE:\n{}\n\n{}",
        failed.len(),
        failed.join("\n"),
        errno.output
    );
    let passed = errno
        .output
        .lines()
        .filter(|l| l.starts_with("ok "))
        .count();
    assert!(passed >= 40, "only {passed} cases ran:\n{}", errno.output);

    let mut run = |step: &str, args: String| {
        guest_ok(&mut guest, step, &format!("{client} {args}"), LONG)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let big = run(
        "a 32 MiB-class blob each way",
        format!("big --bytes {BIG_FIT}"),
    );
    assert!(big.contains(", equal"), "{big}");
    let load = run("load", "load --threads 16 --ops 100 --seed 3".into());
    assert!(load.contains("mismatches 0"), "{load}");

    // A 32-bit process through the real compat path (CUSE has a compat_ioctl; the driver
    // has none, so the model answers ENOTTY to every FUSE_IOCTL_COMPAT call).
    let compat = xs_client(Bits::B32);
    let compat = guest_ok(
        &mut guest,
        "the 32-bit case list",
        &format!("{} errno32", compat.display()),
        LONG,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        compat.contains("errno32: ") && compat.contains(" cases, 0 failed"),
        "{compat}"
    );

    guest.poweroff().expect("clean poweroff");
}
