//! KVP and VSS in a QEMU guest (Debian's 6.1 kernel): cusedev serves `/dev/vmbus/hv_kvp` and
//! `/dev/vmbus/hv_vss` as CUSE character devices, its bus over AF_VSOCK through our
//! vhost-user-vsock backend to fakehost on this host, and Debian's unmodified
//! `hv_kvp_daemon -n` and `hv_vss_daemon -n` run in the guest.
//!
//! The VSS daemon freezes every writable block-backed filesystem of the machine it runs on
//! (spec kvp-vss.md §6), which is why it runs only here: the guest's root is an overlay on 9p
//! (not block-backed), and the one block device is a raw image made on this host for the
//! test, formatted and mounted in the guest. A freeze must then stop a write to it until the
//! thaw.
//!
//! One boot: one KVP exchange; `vss check`; freeze → a write blocks in D state → thaw → it
//! finishes; 20 rescinds and re-offers of the VSS channel, each followed by a `vss check`.

use std::time::{Duration, Instant};

use cusedev_tests::fcopy_guest::{
    cusedev_log_mark, guest_ok, start_cusedev_serving, wait_for_cusedev_log, VsockHost, SHORT,
};
use cusedev_tests::harness::workspace_binary;
use cusedev_tests::kvp::{
    parse_records, record_map, KVP_DAEMON, KVP_DRIVER_VERSION, KVP_NODE, VSS_DAEMON, VSS_NODE,
};
use cusedev_tests::qemu::{Guest, GuestConfig, GuestImage};

/// The raw disk attached as virtio-blk (`/dev/vda` in the guest).
const DISK_BYTES: u64 = 64 << 20;
const MOUNT: &str = "/mnt/disk";
const SYSLOG: &str = "/tmp/syslog.txt";
const RESCINDS: usize = 20;

fn ok(guest: &mut Guest, step: &str, command: &str) -> String {
    guest_ok(guest, step, command, SHORT).unwrap_or_else(|e| panic!("{e}"))
}

/// Lines in the guest's syslog file so far: a mark for [`wait_syslog`].
fn syslog_mark(guest: &mut Guest) -> usize {
    let n = ok(guest, "syslog length", &format!("wc -l < {SYSLOG}"));
    n.trim()
        .parse()
        .unwrap_or_else(|_| panic!("wc printed {n:?}"))
}

/// Waits (inotify, in the guest) for a syslog line after line `mark` containing `needle`.
fn wait_syslog(guest: &mut Guest, mark: usize, needle: &str) -> String {
    let wait_log = workspace_binary("wait-log");
    ok(
        guest,
        &format!("syslog says {needle:?}"),
        &format!(
            "{} {SYSLOG} '{needle}' --from-line {mark} --timeout 60",
            wait_log.display()
        ),
    )
}

/// `fakehost ARGS` that must exit 0; its output.
fn host_ok(host: &VsockHost, args: &[&str]) -> String {
    let (code, text) = host.fakehost(args);
    assert_eq!(code, Some(0), "fakehost {}: {text}", args.join(" "));
    text
}

/// Starts a daemon in the guest the way its unit does (`-n`), detached, its stdio away from
/// the agent's pipe; returns its pid.
fn start_daemon(guest: &mut Guest, path: &str) -> u32 {
    let pid = ok(
        guest,
        &format!("start {path}"),
        &format!("setsid {path} -n >/tmp/$(basename {path}).log 2>&1 </dev/null & echo $!"),
    );
    pid.trim()
        .parse()
        .unwrap_or_else(|_| panic!("echo $! printed {pid:?}"))
}

/// A guest shell snippet that reads the scheduler state of `$pid` into `$st` (the field after
/// the parenthesised comm of /proc/PID/stat), without forking; `$st` is empty once the process
/// is gone.
const READ_STATE: &str = r#"st=; if read -r line 2>/dev/null < /proc/$pid/stat; then st=${line##*\)}; st=${st# }; st=${st%% *}; fi"#;

#[test]
fn freeze_blocks_a_write_until_thaw_and_vss_survives_twenty_rescinds_in_a_qemu_guest() {
    let started = Instant::now();
    let image = GuestImage::ensure().expect("guest image (tests/scripts/guest/build-guest.sh)");
    let modules = image
        .module_files(&["virtio_blk", "crc32c_generic", "ext4"])
        .expect("module files for the disk");
    let host = VsockHost::start("qemu-kvp-vss");
    let disk = host.dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(DISK_BYTES))
        .expect("create the raw disk image");
    let mut guest = host
        .boot(
            &image,
            GuestConfig {
                lifetime: Duration::from_secs(400),
                qemu_args: vec![
                    "-drive".into(),
                    format!("file={},format=raw,if=virtio", disk.display()),
                ],
                ..GuestConfig::named("qemu-kvp-vss")
            },
        )
        .expect("boot the guest");
    eprintln!("guest booted in {:.1} s", guest.boot_seconds());

    // cusedev, both nodes over CUSE.
    let frontend =
        start_cusedev_serving(&mut guest, KVP_NODE, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        frontend.contains("frontend: CUSE"),
        "the guest has /dev/cuse: {frontend}"
    );
    wait_for_cusedev_log(&mut guest, 0, &format!("serving {VSS_NODE} ("))
        .unwrap_or_else(|e| panic!("{e}"));
    let kinds = ok(
        &mut guest,
        "stat the nodes",
        &format!("stat -c '%n %F' {KVP_NODE} {VSS_NODE}"),
    );
    assert_eq!(
        kinds,
        format!("{KVP_NODE} character special file\n{VSS_NODE} character special file\n")
    );

    // The disk: modules from the image's kernel (the guest's /lib/modules is this host's).
    let insmods: Vec<String> = modules.iter().map(|m| m.display().to_string()).collect();
    let mounted = ok(
        &mut guest,
        "format and mount the disk",
        &format!(
            "set -e; for m in {}; do n=$(basename $m .ko | tr - _); \
             grep -q \"^$n \" /proc/modules || insmod $m; done; \
             test -b /dev/vda; mkfs.ext4 -q -F /dev/vda; mkdir -p {MOUNT}; \
             mount -t ext4 /dev/vda {MOUNT}; \
             echo before > {MOUNT}/before; sync -f {MOUNT}/before; \
             grep ' {MOUNT} ' /proc/mounts",
            insmods.join(" ")
        ),
    );
    assert!(
        mounted.starts_with(&format!("/dev/vda {MOUNT} ext4 rw")),
        "{mounted}"
    );

    // The daemons.
    let mark = syslog_mark(&mut guest);
    start_daemon(&mut guest, KVP_DAEMON);
    let lic = wait_syslog(&mut guest, mark, "KVP LIC Version:");
    assert!(
        lic.trim_end()
            .ends_with(&format!("KVP LIC Version: {KVP_DRIVER_VERSION}")),
        "{lic}"
    );
    let mark = syslog_mark(&mut guest);
    let mut vss_pid = start_daemon(&mut guest, VSS_DAEMON);
    let version = wait_syslog(&mut guest, mark, "VSS: kernel module version:");
    assert!(
        version
            .trim_end()
            .ends_with("VSS: kernel module version: 129"),
        "the 6.1 driver answers VSS_OP_REGISTER1 (129): {version}"
    );

    // One KVP exchange in pool 0: SET, GET (which on 6.1 succeeds with an empty value: the
    // driver sends the daemon value_size 0 and the daemon copies that many bytes; see
    // kvp_daemon.rs, test 2), and the value read back by ENUMERATE. Then the guest's own
    // intrinsic data, which must be the guest kernel's, not this host's.
    host_ok(
        &host,
        &["kvp", "set", "--pool", "0", "QemuKey", "from the host"],
    );
    let (code, got) = host.fakehost(&["kvp", "get", "--raw", "--pool", "0", "QemuKey"]);
    assert_eq!((code, got.as_str()), (Some(0), "\n"), "GET on Linux 6.1");
    let (code, got) = host.fakehost(&["kvp", "get", "--pool", "0", "QemuKey"]);
    assert_eq!(
        (code, got.as_str()),
        (Some(0), "from the host\n"),
        "get by enumeration"
    );
    let (code, got) = host.fakehost(&["kvp", "get", "--pool", "0", "NoSuchKey"]);
    assert_eq!(code, Some(1), "{got}");
    assert!(
        got.contains("0x80070103"),
        "HV_S_CONT from the daemon: {got}"
    );
    let pool0 = parse_records(&host_ok(&host, &["kvp", "list", "--pool", "0"]));
    assert_eq!(
        pool0,
        [("QemuKey".to_string(), "from the host".to_string())]
    );
    let auto = record_map(&parse_records(&host_ok(
        &host,
        &["kvp", "list", "--pool", "2"],
    )));
    assert_eq!(
        auto.get("OSBuildNumber").map(String::as_str),
        Some(image.kver.as_str()),
        "pool 2 comes from the guest's daemon: {auto:?}"
    );

    // VSS: check, then freeze.
    let mark = syslog_mark(&mut guest);
    host_ok(&host, &["vss", "check"]);
    wait_syslog(&mut guest, mark, "VSS: op=CHECK HOT BACKUP");
    host_ok(&host, &["vss", "freeze"]);
    wait_syslog(&mut guest, mark, "VSS: op=FREEZE: succeeded");

    // A write from another process now blocks in the frozen filesystem (sb_start_write, an
    // uninterruptible sleep) until the thaw.
    let writer: u32 = ok(
        &mut guest,
        "start a writer",
        &format!(
            "sh -c 'echo x > {MOUNT}/f && sync -f {MOUNT}/f && echo done > /tmp/writer.done' \
             >/tmp/writer.log 2>&1 </dev/null & echo $!"
        ),
    )
    .trim()
    .parse()
    .expect("writer pid");
    // No event says "asleep in D"; /proc says it, read in a bounded loop without forking.
    let blocked = ok(
        &mut guest,
        "the writer sleeps in D",
        &format!(
            "pid={writer}; i=0; while :; do {READ_STATE}; [ \"$st\" = D ] && break; \
             [ -n \"$st\" ] || {{ echo gone; cat /tmp/writer.log; exit 1; }}; \
             i=$((i+1)); [ $i -lt 200000 ] || {{ echo \"state $st\"; exit 1; }}; done; \
             echo \"state $st\"; test ! -e /tmp/writer.done && echo not-done; \
             echo stack:; cat /proc/$pid/stack"
        ),
    );
    assert!(blocked.starts_with("state D\nnot-done\n"), "{blocked}");
    // Where a frozen superblock stops a writer: mnt_want_write → sb_start_write.
    assert!(blocked.contains("mnt_want_write"), "{blocked}");
    // Still there, still asleep, right before the thaw.
    let still = ok(
        &mut guest,
        "the writer is still blocked",
        &format!(
            "pid={writer}; {READ_STATE}; echo \"state $st\"; \
             test ! -e /tmp/writer.done && test ! -s {MOUNT}/f 2>/dev/null && echo not-done"
        ),
    );
    assert_eq!(still, "state D\nnot-done\n", "{blocked}");

    let mark = syslog_mark(&mut guest);
    host_ok(&host, &["vss", "thaw"]);
    wait_syslog(&mut guest, mark, "VSS: op=THAW: succeeded");
    let wait_log = workspace_binary("wait-log");
    let done = ok(
        &mut guest,
        "the writer finishes after the thaw",
        &format!(
            "{} /tmp/writer.done done --timeout 60 && cat {MOUNT}/f",
            wait_log.display()
        ),
    );
    assert_eq!(done, "done\nx\n");

    // Rescind and re-offer the VSS channel, RESCINDS times. Why the daemon ends each time
    // (spec §6 steps 2–5): the rescind wakes its poll, its read fails (EBADF) → "read failed",
    // back to the reopen point, whose open of the node fails while the channel is torn down
    // (EBADF) or once the node is gone (ENOENT) → exit(1). On a real guest systemd's BindsTo=
    // ends the unit with the device and udev starts it again with the next offer; so do we.
    for cycle in 1..=RESCINDS {
        let said = syslog_mark(&mut guest);
        let logged = cusedev_log_mark(&mut guest).unwrap_or_else(|e| panic!("{e}"));
        host_ok(&host, &["rescind", "vss"]);
        let gone = ok(
            &mut guest,
            &format!("cycle {cycle}: the daemon ends and the node goes"),
            &format!(
                "W={wait}; $W {SYSLOG} 'read failed' --from-line {said} --timeout 60 >/dev/null \
                 && $W {SYSLOG} 'open {VSS_NODE} failed' --from-line {said} --timeout 60 \
                 && $W /tmp/cusedev.log '{VSS_NODE} removed' --from-line {logged} --timeout 60 \
                 >/dev/null && $W /tmp/cusedev.log \
                 'vmbus/hv_vss: CUSE connection closed; the kernel unregistered the device' \
                 --from-line {logged} --timeout 60 >/dev/null && pid={vss_pid} && i=0 && \
                 while :; do {READ_STATE}; [ -z \"$st\" ] || [ \"$st\" = Z ] && break; \
                 i=$((i+1)); [ $i -lt 200000 ] || {{ echo \"alive: $st\"; exit 1; }}; done && \
                 test ! -e {VSS_NODE} && wc -l < /tmp/cusedev.log && wc -l < {SYSLOG}",
                wait = wait_log.display()
            ),
        );
        let mut lines = gone.lines().rev();
        let said: usize = lines
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("marks");
        let logged: usize = lines
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("marks");

        host_ok(&host, &["offer", "vss"]);
        let again = ok(
            &mut guest,
            &format!("cycle {cycle}: served again, a new daemon registers"),
            &format!(
                "W={wait}\n\
                 $W /tmp/cusedev.log 'serving {VSS_NODE} (' --from-line {logged} --timeout 60 >/dev/null\n\
                 setsid {VSS_DAEMON} -n >/tmp/hv_vss_daemon.log 2>&1 </dev/null &\n\
                 echo $!\n\
                 $W {SYSLOG} 'VSS: kernel module version:' --from-line {said} --timeout 60",
                wait = wait_log.display()
            ),
        );
        let mut lines = again.lines();
        vss_pid = lines
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid: {again}"));
        assert!(
            lines
                .next()
                .is_some_and(|l| l.ends_with("VSS: kernel module version: 129")),
            "cycle {cycle}: {again}"
        );
        let (code, text) = host.fakehost(&["vss", "check"]);
        assert_eq!(
            code,
            Some(0),
            "cycle {cycle}: vss check after the re-offer: {text}"
        );
    }

    // The KVP daemon was not disturbed by any of it.
    let pool0 = parse_records(&host_ok(&host, &["kvp", "list", "--pool", "0"]));
    assert_eq!(
        pool0,
        [("QemuKey".to_string(), "from the host".to_string())]
    );

    guest.poweroff().expect("clean poweroff");
    eprintln!(
        "the whole test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
