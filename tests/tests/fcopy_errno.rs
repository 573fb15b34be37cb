//! Every errno path of hv_fcopy, through real syscalls on the served node, with the test itself
//! playing the daemon. One test per row of ../shared/spec/fcopy.md §4.2 (2014 driver,
//! `--kernel linux-3.14`) and §5.2/§5.3 (Linux 6.1 hvutil transport, `--kernel linux-6.1`).
//!
//! Not reachable through FUSE or CUSE, and so not tested: EFAULT on a bad user buffer (the
//! kernel's FUSE code faults in the caller before the request reaches us), and the 0-byte
//! write (FUSE completes it with 0 without sending a request; the real driver says EINVAL).

use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cusedev_tests::blocking::{install_sigusr1_without_restart, Blocking};
use cusedev_tests::dev::{cstr_at, u32_at, Dev, Errno};
use cusedev_tests::enter_private_mount_namespace;
use cusedev_tests::harness::{write_pattern_file, Rig, FCOPY_NODE};

const POLLIN: u32 = libc::POLLIN as u32;
const POLLOUT: u32 = libc::POLLOUT as u32;
const POLLERR: u32 = libc::POLLERR as u32;
const POLLHUP: u32 = libc::POLLHUP as u32;
const POLLRDNORM: u32 = libc::POLLRDNORM as u32;
const POLLWRNORM: u32 = libc::POLLWRNORM as u32;

/// What the 6.1 daemon reads into (a union of the three messages): 6196 bytes.
const DAEMON_BUF: usize = 6196;

fn rig(test: &str, kernel: &str) -> Rig {
    enter_private_mount_namespace().expect("private mount namespace");
    install_sigusr1_without_restart();
    Rig::start(test, kernel)
}

/// Opens and completes the 6.1 handshake: write version 1, read the driver's 4-byte answer.
fn register_6_1() -> Dev {
    let dev = Dev::open(FCOPY_NODE).expect("open");
    assert_eq!(dev.write_u32(1), Ok(4));
    let reply = dev.pread(DAEMON_BUF).expect("version reply");
    assert_eq!(reply.len(), 4);
    assert_eq!(
        u32_at(&reply, 0),
        1,
        "the 6.1 driver answers FCOPY_CURRENT_VERSION = 1"
    );
    dev
}

/// A daemon-sized pread on another thread, once it sleeps in the driver.
fn blocked_daemon_read(dev: &Arc<Dev>) -> Blocking<Result<Vec<u8>, Errno>> {
    let dev = dev.clone();
    let reader = Blocking::spawn(move || dev.pread(DAEMON_BUF));
    reader.wait_blocked_in_read();
    reader
}

/// Starts a copy in the background so the host sends START_FILE_COPY.
fn start_copy(rig: &Rig, name: &str) -> Child {
    let file = rig.dir.join(name);
    write_pattern_file(&file, 1000, 42);
    rig.fakehost_spawn(&["copy", file.to_str().unwrap(), "/tmp/cusedev-errno-target/"])
}

/// After a failed step the host sends CANCEL_FCOPY; answer it as the daemon does (status 0).
fn answer_cancel(dev: &Dev) {
    let cancel = dev.pread(DAEMON_BUF).expect("CANCEL_FCOPY");
    assert_eq!(u32_at(&cancel, 0), 3, "CANCEL_FCOPY after a failed step");
    assert_eq!(dev.write_u32(0), Ok(4));
}

fn finish(child: Child) -> (Option<i32>, String) {
    let out = child.wait_with_output().expect("copy exits");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

// ---------------------------------------------------------------- Linux 6.1 (hvutil transport)

#[test]
fn second_open_is_ebusy_on_linux_6_1() {
    let _rig = rig("busy61", "linux-6.1");
    let _first = Dev::open(FCOPY_NODE).expect("first open");
    assert_eq!(Dev::open(FCOPY_NODE).err(), Some(Errno::EBUSY));
}

#[test]
fn write_of_other_than_four_bytes_is_einval_on_linux_6_1() {
    let _rig = rig("wsize61", "linux-6.1");
    let dev = Dev::open(FCOPY_NODE).unwrap();
    assert_eq!(dev.write(&[1, 0, 0]), Err(Errno::EINVAL));
    assert_eq!(dev.write(&[1, 0, 0, 0, 0]), Err(Errno::EINVAL));
    // Still in DEVICE_INIT: a proper registration works afterwards.
    assert_eq!(dev.write_u32(1), Ok(4));
}

#[test]
fn unknown_version_is_einval_and_registration_still_possible_on_linux_6_1() {
    let _rig = rig("ver61", "linux-6.1");
    let dev = Dev::open(FCOPY_NODE).unwrap();
    assert_eq!(dev.write_u32(7), Err(Errno::EINVAL));
    assert_eq!(dev.write_u32(1), Ok(4));
    assert_eq!(u32_at(&dev.pread(DAEMON_BUF).unwrap(), 0), 1);
}

#[test]
fn short_read_is_einval_and_keeps_the_message_on_linux_6_1() {
    let _rig = rig("short61", "linux-6.1");
    let dev = Dev::open(FCOPY_NODE).unwrap();
    assert_eq!(dev.write_u32(1), Ok(4));
    assert_eq!(dev.pread(3), Err(Errno::EINVAL));
    let reply = dev.pread(DAEMON_BUF).unwrap();
    assert_eq!(reply, 1u32.to_ne_bytes());
}

#[test]
fn blocked_read_interrupted_by_a_signal_is_eintr_on_linux_6_1() {
    let _rig = rig("eintr61", "linux-6.1");
    let dev = Arc::new(register_6_1());
    let reader = blocked_daemon_read(&dev);
    reader.signal();
    assert_eq!(reader.join(), Err(Errno::EINTR));
}

#[test]
fn poll_reports_pollin_only_while_a_message_is_queued_and_never_pollout_on_linux_6_1() {
    let rig = rig("poll61", "linux-6.1");
    let dev = Arc::new(Dev::open(FCOPY_NODE).unwrap());
    assert_eq!(
        dev.poll(0),
        Ok(0),
        "nothing queued: no bits, not even POLLOUT"
    );
    assert_eq!(dev.write_u32(1), Ok(4));
    assert_eq!(dev.poll(0), Ok(POLLIN | POLLRDNORM));
    dev.pread(DAEMON_BUF).unwrap();
    assert_eq!(dev.poll(0), Ok(0));

    // A poll that sleeps is woken when the host's request arrives.
    let poller = {
        let dev = dev.clone();
        Blocking::spawn(move || dev.poll(-1))
    };
    poller.wait_blocked_in(&[libc::SYS_poll, libc::SYS_ppoll]);
    let copy = start_copy(&rig, "poll.bin");
    assert_eq!(poller.join(), Ok(POLLIN | POLLRDNORM));
    let start = dev.pread(DAEMON_BUF).unwrap();
    assert_eq!(start.len(), 1088);
    assert_eq!(dev.write_u32(0x8000_4005), Ok(4));
    answer_cancel(&dev);
    let (code, _) = finish(copy);
    assert_eq!(code, Some(1));
}

#[test]
fn start_file_copy_arrives_as_1088_bytes_with_utf8_names_on_linux_6_1() {
    let rig = rig("start61", "linux-6.1");
    let dev = register_6_1();
    let copy = start_copy(&rig, "naïve.bin");
    let start = dev.pread(DAEMON_BUF).unwrap();
    assert_eq!(start.len(), 1088);
    assert_eq!(u32_at(&start, 0), 0, "START_FILE_COPY");
    assert_eq!(cstr_at(&start, 36, 520), "naïve.bin");
    assert_eq!(cstr_at(&start, 556, 520), "/tmp/cusedev-errno-target/");
    assert_eq!(
        u64::from_ne_bytes(start[1080..1088].try_into().unwrap()),
        1000
    );
    // Refuse it: the host reports our status.
    assert_eq!(dev.write_u32(0x8007_0050), Ok(4));
    answer_cancel(&dev);
    let (code, out) = finish(copy);
    assert_eq!(code, Some(1));
    assert!(out.contains("0x80070050"), "{out}");
}

#[test]
fn reply_with_no_transaction_pending_is_einval_on_linux_6_1() {
    let _rig = rig("noreq61", "linux-6.1");
    let dev = register_6_1();
    assert_eq!(dev.write_u32(0), Err(Errno::EINVAL));
}

#[test]
fn close_resets_the_handshake_on_linux_6_1() {
    let _rig = rig("reset61", "linux-6.1");
    drop(register_6_1());
    // Had the state stayed READY, version 1 would be taken as a reply → EINVAL.
    drop(register_6_1());
}

#[test]
fn closing_with_a_request_pending_fails_it_at_once_on_linux_6_1() {
    let rig = rig("closefail61", "linux-6.1");
    let dev = register_6_1();
    let copy = start_copy(&rig, "pending.bin");
    assert_eq!(dev.pread(DAEMON_BUF).unwrap().len(), 1088);
    let closed_at = Instant::now();
    drop(dev);
    let (code, out) = finish(copy);
    assert!(closed_at.elapsed() < Duration::from_secs(10), "not at once");
    assert_eq!(code, Some(1));
    assert!(out.contains("0x80004005"), "{out}");
}

#[test]
fn rescind_wakes_a_blocked_reader_with_ebadf_and_the_node_goes_after_close_on_linux_6_1() {
    let rig = rig("rescind61", "linux-6.1");
    let dev = Arc::new(register_6_1());
    let reader = blocked_daemon_read(&dev);
    let mark = rig.guest.log_mark();
    let out = rig.fakehost(&["rescind", "fcopy"]);
    assert!(out.status.success());
    assert_eq!(reader.join(), Err(Errno::EBADF));
    assert_eq!(dev.write_u32(0), Err(Errno::EBADF));
    assert_eq!(dev.poll(0), Ok(POLLERR | POLLHUP));
    // The 6.1 teardown waits for the daemon's close before the node goes.
    assert!(!rig.guest.log_contains("/dev/vmbus/hv_fcopy removed"));
    assert_eq!(Dev::open(FCOPY_NODE).err(), Some(Errno::EBADF));
    drop(dev);
    rig.guest
        .wait_for_log_from(mark, "/dev/vmbus/hv_fcopy removed");
    assert_eq!(Dev::open(FCOPY_NODE).err(), Some(Errno::ENOENT));

    // A re-offer brings the node back and a new daemon can register.
    let mark = rig.guest.log_mark();
    assert!(rig.fakehost(&["offer", "fcopy"]).status.success());
    rig.guest
        .wait_for_log_from(mark, "serving /dev/vmbus/hv_fcopy");
    drop(register_6_1());
}

#[test]
fn host_that_vanishes_takes_the_node_and_a_new_host_brings_it_back_on_linux_6_1() {
    let mut rig = rig("vanish61", "linux-6.1");
    let dev = Arc::new(register_6_1());
    let reader = blocked_daemon_read(&dev);
    let mark = rig.guest.log_mark();
    rig.host.kill();
    // No host, no channel: treated as a rescind, so the reader gets the 6.1 errno.
    assert_eq!(reader.join(), Err(Errno::EBADF));
    drop(dev);
    rig.guest
        .wait_for_log_from(mark, "removed device vmbus/hv_fcopy");
    assert_eq!(Dev::open(FCOPY_NODE).err(), Some(Errno::ENOENT));

    let mark = rig.guest.log_mark();
    rig.restart_host();
    rig.guest
        .wait_for_log_from(mark, "serving /dev/vmbus/hv_fcopy");
    drop(register_6_1());
}

#[test]
fn ioctl_is_enotty_on_linux_6_1() {
    let _rig = rig("ioctl61", "linux-6.1");
    let dev = Dev::open(FCOPY_NODE).unwrap();
    assert_eq!(dev.ioctl(0x5401 /* TCGETS */, 0), Err(Errno::ENOTTY));
}

/// `--frontend auto` takes CUSE where the kernel has it and a FUSE mount where it has not, and
/// says which and why; the node must be what the log says. CI machines have no CUSE module, so
/// here this checks the fallback; the CUSE side is checked in a QEMU guest (qemu_fcopy.rs).
#[test]
fn auto_frontend_serves_the_node_it_names_in_the_log() {
    enter_private_mount_namespace().expect("private mount namespace");
    let rig = Rig::start_with_frontend("auto", "linux-6.1", "auto");
    let dev = register_6_1();
    let meta = std::fs::metadata(FCOPY_NODE).expect("stat the node");
    if rig
        .guest
        .log_contains("frontend: CUSE (auto: /dev/cuse works")
    {
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(
            &meta.file_type()
        ));
    } else {
        rig.guest
            .wait_for_log("frontend: FUSE mount under /dev (auto: no CUSE here: ");
        assert!(meta.is_file(), "a FUSE mount serves a regular file");
    }
    drop(dev);
}

// ---------------------------------------------------------------- Linux 3.14 (2014 driver)

/// Registers as a seed-era daemon: version 0, to which the 2014 driver never replies.
fn register_3_14() -> Dev {
    let dev = Dev::open(FCOPY_NODE).expect("open");
    assert_eq!(dev.write_u32(0), Ok(4));
    dev
}

#[test]
fn version_1_registration_is_einval_on_linux_3_14() {
    let _rig = rig("ver314", "linux-3.14");
    let dev = Dev::open(FCOPY_NODE).unwrap();
    assert_eq!(dev.write_u32(1), Err(Errno::EINVAL));
    assert_eq!(dev.write_u32(0), Ok(4));
}

#[test]
fn second_open_is_ebusy_on_linux_3_14() {
    let _rig = rig("busy314", "linux-3.14");
    let _first = Dev::open(FCOPY_NODE).unwrap();
    assert_eq!(Dev::open(FCOPY_NODE).err(), Some(Errno::EBUSY));
}

#[test]
fn write_of_other_than_four_bytes_is_einval_on_linux_3_14() {
    let _rig = rig("wsize314", "linux-3.14");
    let dev = Dev::open(FCOPY_NODE).unwrap();
    assert_eq!(dev.write(&[0, 0]), Err(Errno::EINVAL));
}

#[test]
fn poll_is_always_readable_and_writable_on_linux_3_14() {
    // The 2014 driver has no .poll: the VFS default mask.
    let _rig = rig("poll314", "linux-3.14");
    let dev = register_3_14();
    assert_eq!(dev.poll(0), Ok(POLLIN | POLLOUT | POLLRDNORM | POLLWRNORM));
}

#[test]
fn registration_gets_no_reply_and_the_first_read_is_the_host_request_on_linux_3_14() {
    let rig = rig("noreply314", "linux-3.14");
    let dev = Arc::new(register_3_14());
    let reader = {
        let dev = dev.clone();
        Blocking::spawn(move || dev.pread(DAEMON_BUF))
    };
    // No version reply is queued: the read sleeps until the host sends something.
    reader.wait_blocked_in_read();
    let copy = start_copy(&rig, "seed.bin");
    let start = reader.join().unwrap();
    assert_eq!(start.len(), 1088);
    assert_eq!(cstr_at(&start, 36, 520), "seed.bin");
    assert_eq!(dev.write_u32(0x8000_4005), Ok(4));
    let cancel = dev.pread(DAEMON_BUF).unwrap();
    assert_eq!(
        cancel.len(),
        6192,
        "the 2014 driver hands sizeof(hv_do_fcopy) of its era"
    );
    assert_eq!(u32_at(&cancel, 0), 3);
    assert_eq!(dev.write_u32(0), Ok(4));
    let (code, out) = finish(copy);
    assert_eq!(code, Some(1));
    assert!(out.contains("0x80004005"), "{out}");
}

#[test]
fn short_read_returns_zero_and_loses_the_message_on_linux_3_14() {
    let rig = rig("short314", "linux-3.14");
    let dev = register_3_14();
    let copy = start_copy(&rig, "lost.bin");
    // The read sleeps until START arrives, then gives 0 bytes and drops it.
    assert_eq!(
        dev.pread(100),
        Ok(vec![]),
        "the 2014 driver returns 0 for a short read"
    );
    // START is lost: only the 5 s timer answers the host (HV_E_FAIL), which then cancels.
    // The next message the daemon sees is that CANCEL, not the START.
    let next = dev.pread(DAEMON_BUF).unwrap();
    assert_eq!(next.len(), 6192);
    assert_eq!(u32_at(&next, 0), 3, "CANCEL_FCOPY, START was lost");
    assert_eq!(dev.write_u32(0), Ok(4));
    let (code, out) = finish(copy);
    assert_eq!(code, Some(1));
    assert!(out.contains("0x80004005"), "{out}");
}

#[test]
fn blocked_read_interrupted_by_a_signal_is_eintr_on_linux_3_14() {
    let _rig = rig("eintr314", "linux-3.14");
    let dev = Arc::new(register_3_14());
    let reader = blocked_daemon_read(&dev);
    reader.signal();
    assert_eq!(reader.join(), Err(Errno::EINTR));
}

#[test]
fn rescind_wakes_a_blocked_reader_with_enodev_and_removes_the_node_at_once_on_linux_3_14() {
    let rig = rig("rescind314", "linux-3.14");
    let dev = Arc::new(register_3_14());
    let reader = blocked_daemon_read(&dev);
    let mark = rig.guest.log_mark();
    assert!(rig.fakehost(&["rescind", "fcopy"]).status.success());
    assert_eq!(reader.join(), Err(Errno::ENODEV));
    // The 2014 driver deregisters without waiting for the fd to close.
    rig.guest
        .wait_for_log_from(mark, "/dev/vmbus/hv_fcopy removed");
    assert_eq!(Dev::open(FCOPY_NODE).err(), Some(Errno::ENOENT));
    drop(dev);
}
