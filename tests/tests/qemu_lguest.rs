//! /dev/lguest as a real character device: cusedev's CUSE frontend in a QEMU guest (Debian's
//! 6.1 kernel), its bus over AF_VSOCK through our vhost-user-vsock backend to fakehost's fake
//! Guest on this host, the C Launcher `tests/c/lguest-launcher.c` in the guest (its root is
//! this host's `/`, so the binaries built here run there).
//!
//! The console Guest printing its line to a 32- and a 64-bit Launcher (spec lguest.md §7), the
//! errno case list over CUSE (`--cuse`: CUSE passes offset 0 on every read and write,
//! fs/fuse/cuse.c, so the three CPU-1 cases cannot fail there; docs/lguest.md), and 1,000
//! eventfd-signalled round trips. One boot.

use std::time::Duration;

use cusedev_tests::fcopy_guest::{guest_ok, start_cusedev_serving, VsockHost, SHORT};
use cusedev_tests::lguest_launcher::{launcher, Bits, NODE};
use cusedev_tests::qemu::{GuestConfig, GuestImage};

/// For Launcher runs under TCG.
const LONG: Duration = Duration::from_secs(300);

#[test]
fn console_guest_errno_list_and_round_trips_over_cuse_in_a_qemu_guest() {
    let image = GuestImage::ensure().expect("guest image (tests/scripts/guest/build-guest.sh)");
    // No --lguest-guest: the embedded default is the console Guest.
    let host = VsockHost::start("qemu-lguest");
    let mut guest = host
        .boot(
            &image,
            GuestConfig {
                lifetime: Duration::from_secs(600),
                ..GuestConfig::named("qemu-lguest")
            },
        )
        .expect("boot the guest");
    eprintln!("guest booted in {:.1} s", guest.boot_seconds());

    let frontend = start_cusedev_serving(&mut guest, NODE, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        frontend.contains("frontend: CUSE"),
        "the guest has /dev/cuse: {frontend}"
    );
    let kind = guest_ok(&mut guest, "stat", &format!("stat -c '%F' {NODE}"), SHORT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(kind.trim(), "character special file");

    let set_script = |name: &str| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/lguest")
            .join(name);
        let (code, out) = host.fakehost(&["lguest".as_ref(), "script".as_ref(), path.as_os_str()]);
        assert_eq!(code, Some(0), "fakehost lguest script {name}: {out}");
    };

    for bits in [Bits::B32, Bits::B64] {
        let console = guest
            .run(
                &format!("{} --dev {NODE} console", launcher(bits).display()),
                LONG,
            )
            .expect("run the console Launcher");
        assert_eq!(console.status, 1, "{}", console.output);
        assert!(
            console.output.contains("hello from the fake guest\n"),
            "{}",
            console.output
        );
        assert!(
            console.output.contains("lguest: CRASH: Power down"),
            "{}",
            console.output
        );
    }

    set_script("errno.guest");
    for bits in [Bits::B64, Bits::B32] {
        let list = guest
            .run(
                &format!("{} --dev {NODE} errno --cuse", launcher(bits).display()),
                LONG,
            )
            .expect("run the errno list");
        let failed: Vec<&str> = list
            .output
            .lines()
            .filter(|l| l.starts_with("FAIL "))
            .collect();
        assert!(
            failed.is_empty() && list.status == 0 && list.output.contains(" cases, 0 failed"),
            "{} case(s) failed over CUSE:\n{}\n\n{}",
            failed.len(),
            failed.join("\n"),
            list.output
        );
        let passed = list.output.lines().filter(|l| l.starts_with("ok ")).count();
        assert!(passed >= 40, "only {passed} cases ran:\n{}", list.output);
    }

    set_script("pingpong.guest");
    let round = guest_ok(
        &mut guest,
        "1000 eventfd round trips",
        &format!(
            "{} --dev {NODE} pingpong 1000 --eventfd",
            launcher(Bits::B32).display()
        ),
        LONG,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(round.contains("notifies 1000 irqs 1000"), "{round}");

    guest.poweroff().expect("clean poweroff");
}
