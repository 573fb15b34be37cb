//! The lifetime of a CUSE node when the device goes while a file is open, in the guest's real
//! CUSE (Debian's 6.1 kernel):
//!
//! - a rescind (decision #24): with the 2014 driver (`--kernel linux-3.14`) the node goes at
//!   once and the sleeping reader wakes with ENODEV, but the character device stays
//!   registered, answering the open file with the driver's errnos, until that file is closed;
//!   only then is the CUSE connection closed and the device unregistered. A new offer then
//!   registers the same name again.
//! - cusedev SIGKILLed (the fault matrix's row, decision #63): the kernel takes the node and
//!   the device away by itself, open file or not, and wakes the sleeping reader with an error;
//!   a restarted cusedev registers the same name again.
//!
//! Everything runs in the guest (fakehost on a Unix socket there): the point is the kernel's
//! CUSE, not the transport, which `qemu_fcopy.rs` covers.

use std::time::Duration;

use cusedev_tests::harness::workspace_binary;
use cusedev_tests::qemu::{Guest, GuestConfig, GuestImage};

const SHORT: Duration = Duration::from_secs(60);
const NODE: &str = "/dev/vmbus/hv_fcopy";
const SYSFS: &str = "'/sys/class/cuse/vmbus!hv_fcopy'";

fn ok(guest: &mut Guest, command: &str) -> String {
    guest
        .run_ok(command, SHORT)
        .unwrap_or_else(|e| panic!("`{command}`: {e}\n{}", guest.console_tail(30)))
}

/// A booted guest and the host's binaries it runs (the guest's root is the host's).
struct Scene {
    guest: Guest,
    fakehost: String,
    cusedev: String,
    wait_log: String,
    holder: String,
}

impl Scene {
    /// Boots a guest and starts fakehost in it.
    fn start(name: &str) -> Scene {
        let image = GuestImage::ensure().expect("guest image (tests/scripts/guest/build-guest.sh)");
        let guest = Guest::boot(&image, GuestConfig::named(name)).expect("boot the guest");
        let bin = |name: &str| workspace_binary(name).display().to_string();
        let mut scene = Scene {
            guest,
            fakehost: bin("fakehost"),
            cusedev: bin("cusedev"),
            wait_log: bin("wait-log"),
            holder: bin("fcopy-holder"),
        };
        let host = format!(
            "setsid {} serve --listen unix:/tmp/bus.sock --control /tmp/ctl.sock \
             >/tmp/host.log 2>&1 </dev/null & {}",
            scene.fakehost,
            scene.wait("/tmp/host.log", "listening", 0)
        );
        scene.ok(&host);
        scene
    }

    fn ok(&mut self, command: &str) -> String {
        ok(&mut self.guest, command)
    }

    /// The command that waits (bounded, on inotify) for `needle` in `file` after line `from`.
    fn wait(&self, file: &str, needle: &str, from: usize) -> String {
        format!(
            "{} {file} '{needle}' --from-line {from} --timeout 60",
            self.wait_log
        )
    }

    fn log_len(&mut self, file: &str) -> usize {
        self.ok(&format!("wc -l < {file}")).trim().parse().unwrap()
    }

    /// Starts `cusedev serve --frontend cuse --kernel linux-3.14` logging to `/tmp/NAME.log`,
    /// its pid in `/tmp/NAME.pid`, and waits until it serves the fcopy node.
    fn start_cusedev(&mut self, name: &str) {
        let command = format!(
            "RUST_LOG=info setsid sh -c 'echo $$ > /tmp/{name}.pid; exec {} serve --host \
             unix:/tmp/bus.sock --frontend cuse --kernel linux-3.14' >/tmp/{name}.log 2>&1 \
             </dev/null & {}",
            self.cusedev,
            self.wait(
                &format!("/tmp/{name}.log"),
                "serving /dev/vmbus/hv_fcopy",
                0
            )
        );
        self.ok(&command);
    }

    /// Starts an `fcopy-holder` logging to `/tmp/NAME.log`, let go through the FIFO
    /// `/tmp/NAME.release`, and waits until it registered and sleeps in read(2).
    fn start_holder(&mut self, name: &str) {
        let command = format!(
            "mkfifo /tmp/{name}.release && setsid {} {NODE} /tmp/{name}.release \
             >/tmp/{name}.log 2>&1 </dev/null & {}",
            self.holder,
            self.wait(&format!("/tmp/{name}.log"), "HOLD registered", 0)
        );
        self.ok(&command);
    }

    /// Lets holder `name` close the device, and waits until it has.
    fn release_holder(&mut self, name: &str) {
        self.ok(&format!("echo > /tmp/{name}.release"));
        let closed = self.wait(&format!("/tmp/{name}.log"), "HOLD closed", 0);
        self.ok(&closed);
    }

    /// Whether the node and the CUSE device are there: `node=0|1 sysfs=0|1` (test's status).
    fn presence(&mut self) -> String {
        let command = format!("test -e {NODE}; echo node=$?; test -e {SYSFS}; echo sysfs=$?");
        self.guest
            .run(&command, SHORT)
            .expect("look at the node")
            .output
    }
}

#[test]
fn rescind_with_an_open_file_removes_the_node_at_once_and_the_device_at_the_last_close() {
    let mut s = Scene::start("qemu-cuse-lifetime");
    s.start_cusedev("cusedev");
    s.start_holder("holder");

    let mark = s.log_len("/tmp/cusedev.log");
    s.ok(&format!(
        "FAKEHOST_CONTROL=/tmp/ctl.sock {} rescind fcopy",
        s.fakehost
    ));
    let read = s.ok(&s.wait("/tmp/holder.log", "HOLD read:", 0));
    assert!(read.contains("HOLD read: ENODEV"), "{read}");
    s.ok(&s.wait("/tmp/cusedev.log", "removed device vmbus/hv_fcopy", mark));
    // The node is gone at once; the device is still registered, held by the open file.
    assert_eq!(s.presence(), "node=1\nsysfs=0\n");

    // The last close: the CUSE connection closes and the kernel unregisters the device.
    s.release_holder("holder");
    s.ok(&s.wait(
        "/tmp/cusedev.log",
        "vmbus/hv_fcopy: CUSE connection closed; the kernel unregistered the device",
        mark,
    ));
    s.ok(&format!("test ! -e {SYSFS}"));

    // The same name registers again with the next offer.
    let mark = s.log_len("/tmp/cusedev.log");
    s.ok(&format!(
        "FAKEHOST_CONTROL=/tmp/ctl.sock {} offer fcopy",
        s.fakehost
    ));
    s.ok(&s.wait("/tmp/cusedev.log", "serving /dev/vmbus/hv_fcopy", mark));
    let node = s.ok(&format!("stat -c '%F %a' {NODE}"));
    assert_eq!(node.trim(), "character special file 600");
    s.guest.poweroff().expect("clean poweroff");
}

#[test]
fn cusedev_sigkilled_the_kernel_removes_node_and_device_wakes_the_reader_and_a_restart_serves() {
    let mut s = Scene::start("qemu-cuse-killed");
    s.start_cusedev("cusedev");
    s.start_holder("holder");

    s.ok("kill -KILL $(cat /tmp/cusedev.pid)");
    // The reader wakes with an error: closing /dev/cuse aborts the connection, and the
    // request in flight ends ECONNABORTED (cuse_channel_release -> fuse_dev_release ->
    // fuse_abort_conn, fs/fuse/cuse.c and dev.c, 6.1).
    let read = s.ok(&s.wait("/tmp/holder.log", "HOLD read:", 0));
    assert!(read.contains("HOLD read: ECONNABORTED"), "{read}");
    // cuse_channel_release unregisters the device before it aborts the connection, so by the
    // time the reader is awake node and device are gone, though the file is still open.
    assert_eq!(s.presence(), "node=1\nsysfs=1\n");

    // A restarted cusedev registers the same name and serves it: a new reader registers.
    s.start_cusedev("cusedev2");
    let node = s.ok(&format!("stat -c '%F %a' {NODE}"));
    assert_eq!(node.trim(), "character special file 600");
    s.start_holder("holder2");
    // The old file's last close, on the dead connection, leaves the new device alone.
    s.release_holder("holder");
    assert_eq!(s.presence(), "node=0\nsysfs=0\n");
    let woken = s.guest.run("grep -c 'HOLD read' /tmp/holder2.log", SHORT);
    assert_eq!(
        woken.expect("grep").output,
        "0\n",
        "the new reader sleeps on"
    );
    s.guest.poweroff().expect("clean poweroff");
}
