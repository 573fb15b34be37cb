//! The lifetime of a CUSE node when the device goes while a file is open (decision #24):
//! with the 2014 driver (`--kernel linux-3.14`) a rescind removes the node at once and wakes the
//! sleeping reader with ENODEV, but the character device stays registered, answering the open
//! file with the driver's errnos, until that file is closed; only then is the CUSE connection
//! closed and the device unregistered. A new offer then registers the same name again.
//!
//! Everything runs in the guest (fakehost on a Unix socket there): the point is the kernel's
//! CUSE, not the transport, which `qemu_fcopy.rs` covers.

use std::time::Duration;

use cusedev_tests::harness::workspace_binary;
use cusedev_tests::qemu::{Guest, GuestConfig, GuestImage};

const SHORT: Duration = Duration::from_secs(60);
const SYSFS: &str = "'/sys/class/cuse/vmbus!hv_fcopy'";

fn ok(guest: &mut Guest, command: &str) -> String {
    guest
        .run_ok(command, SHORT)
        .unwrap_or_else(|e| panic!("`{command}`: {e}\n{}", guest.console_tail(30)))
}

#[test]
fn rescind_with_an_open_file_removes_the_node_at_once_and_the_device_at_the_last_close() {
    let image = GuestImage::ensure().expect("guest image (tests/scripts/guest/build-guest.sh)");
    let mut guest =
        Guest::boot(&image, GuestConfig::named("qemu-cuse-lifetime")).expect("boot the guest");
    let bin = |name: &str| workspace_binary(name).display().to_string();
    let (fakehost, cusedev, wait_log, holder) = (
        bin("fakehost"),
        bin("cusedev"),
        bin("wait-log"),
        bin("fcopy-holder"),
    );
    let wait = |file: &str, needle: &str, from: usize| {
        format!("{wait_log} {file} '{needle}' --from-line {from} --timeout 60")
    };
    let log_len = |guest: &mut Guest| -> usize {
        ok(guest, "wc -l < /tmp/cusedev.log")
            .trim()
            .parse()
            .unwrap()
    };

    ok(
        &mut guest,
        &format!(
            "setsid {fakehost} serve --listen unix:/tmp/bus.sock --control /tmp/ctl.sock \
             >/tmp/host.log 2>&1 </dev/null & {}",
            wait("/tmp/host.log", "listening", 0)
        ),
    );
    ok(
        &mut guest,
        &format!(
            "RUST_LOG=info setsid {cusedev} serve --host unix:/tmp/bus.sock --frontend cuse \
             --kernel linux-3.14 >/tmp/cusedev.log 2>&1 </dev/null & {}",
            wait("/tmp/cusedev.log", "serving /dev/vmbus/hv_fcopy", 0)
        ),
    );
    ok(
        &mut guest,
        &format!(
            "mkfifo /tmp/release && setsid {holder} /dev/vmbus/hv_fcopy /tmp/release \
             >/tmp/holder.log 2>&1 </dev/null & {}",
            wait("/tmp/holder.log", "HOLD registered", 0)
        ),
    );

    let mark = log_len(&mut guest);
    ok(
        &mut guest,
        &format!("FAKEHOST_CONTROL=/tmp/ctl.sock {fakehost} rescind fcopy"),
    );
    let read = ok(&mut guest, &wait("/tmp/holder.log", "HOLD read:", 0));
    assert!(read.contains("HOLD read: ENODEV"), "{read}");
    ok(
        &mut guest,
        &wait("/tmp/cusedev.log", "removed device vmbus/hv_fcopy", mark),
    );
    // The node is gone at once; the device is still registered, held by the open file.
    let state = guest
        .run(
            &format!("test -e /dev/vmbus/hv_fcopy; echo node=$?; test -e {SYSFS}; echo sysfs=$?"),
            SHORT,
        )
        .expect("look at the node");
    assert_eq!(state.output, "node=1\nsysfs=0\n");

    // The last close: the CUSE connection closes and the kernel unregisters the device.
    ok(&mut guest, "echo > /tmp/release");
    ok(&mut guest, &wait("/tmp/holder.log", "HOLD closed", 0));
    ok(
        &mut guest,
        &wait(
            "/tmp/cusedev.log",
            "vmbus/hv_fcopy: CUSE connection closed; the kernel unregistered the device",
            mark,
        ),
    );
    ok(&mut guest, &format!("test ! -e {SYSFS}"));

    // The same name registers again with the next offer.
    let mark = log_len(&mut guest);
    ok(
        &mut guest,
        &format!("FAKEHOST_CONTROL=/tmp/ctl.sock {fakehost} offer fcopy"),
    );
    ok(
        &mut guest,
        &wait("/tmp/cusedev.log", "serving /dev/vmbus/hv_fcopy", mark),
    );
    let node = ok(&mut guest, "stat -c '%F %a' /dev/vmbus/hv_fcopy");
    assert_eq!(node.trim(), "character special file 600");
    guest.poweroff().expect("clean poweroff");
}
