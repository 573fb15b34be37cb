//! Row 3 on /dev/lguest with the C Launcher `tests/c/lguest-launcher.c` and fakehost's
//! scripted fake Guests (`fixtures/lguest/`): a Launcher SIGKILLed while its read runs the
//! Guest.

use std::path::{Path, PathBuf};

use cusedev_tests::census::RowFigures;
use cusedev_tests::enter_private_mount_namespace;
use cusedev_tests::harness::Rig;
use cusedev_tests::lguest_launcher::{exit, parse_pingpong, run_limited, Bits, Holder, DEVICE};

use super::{fakehost_ok, wait_all_served, ENDS};

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/lguest")
        .join(name)
}

/// Selects the script for Guests started from now on.
fn guest_script(rig: &Rig, name: &str) {
    let path = script(name);
    fakehost_ok(
        rig,
        &["lguest", "script", path.to_str().expect("utf-8 path")],
    );
}

/// A Launcher's 1,000 notify/IRQ round trips, all of them there.
fn pingpong(node: &Path) {
    let round = run_limited(Bits::B64, node, &["pingpong", "1000"], ENDS);
    assert_eq!(round.code, Some(exit::OK), "{}", round.text());
    let counts = parse_pingpong(&round);
    assert_eq!(
        (counts.notifies, counts.irqs),
        (1000, 1000),
        "{}",
        round.text()
    );
}

/// How many Guests `fakehost lguest status --json` lists as running (`"ended": null`).
fn running_guests(rig: &Rig) -> usize {
    fakehost_ok(rig, &["lguest", "status", "--json"])
        .matches("\"ended\": null")
        .count()
}

/// Row 3. The Launcher sleeps in its read (halt.guest waits for an interrupt that never
/// comes) when it is SIGKILLed: the read is interruptible (`wait_event_interruptible`,
/// drivers/lguest/lguest_user.c v3.10), so the kernel takes the request back and the file's
/// release ends the Guest (`close`: the kernel freed the Guest there). On the host side the
/// Guest is over ("ended": "closed"); cusedev is back at its census; the next Launcher's
/// round trips are all there.
#[test]
fn launcher_sigkilled_mid_read_ends_its_guest_and_the_next_launcher_works() {
    enter_private_mount_namespace().expect("private mount namespace");
    let guest = script("pingpong.guest");
    let rig = Rig::builder("fm-lguest-killed")
        .host_args(&["--lguest-guest", guest.to_str().expect("utf-8 path")])
        .guest_dir_arg("--dev-root", "dev")
        .serves(DEVICE)
        .start();
    wait_all_served(&rig, 0);
    let node = rig.dir.join("dev").join(DEVICE);
    pingpong(&node);
    let mut figures = RowFigures::baseline(
        "Launcher SIGKILLed mid-read",
        rig.guest.pid(),
        "a first Launcher's round trips",
    );
    guest_script(&rig, "halt.guest");
    let mut holder = Holder::start(Bits::B64, &node);
    holder.wait_in_read(ENDS);
    assert_eq!(running_guests(&rig), 1, "the held Launcher's Guest runs");
    figures.sample();
    holder.kill();
    let (said, code) = holder.finish(ENDS);
    assert_eq!(code, None, "killed by the signal: {said}");
    // The file's release reaches cusedev after the process is gone (FUSE sends RELEASE
    // asynchronously), and the host after that: watched, bounded.
    let deadline = std::time::Instant::now() + ENDS;
    while running_guests(&rig) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the killed Launcher's Guest still runs"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = fakehost_ok(&rig, &["lguest", "status", "--json"]);
    assert!(
        status.contains("\"ended\": \"closed\""),
        "the killed Launcher's Guest ended when its file closed: {status}"
    );
    guest_script(&rig, "pingpong.guest");
    pingpong(&node);
    assert_eq!(running_guests(&rig), 0);
    figures.back(ENDS);
}
