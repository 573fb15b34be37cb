//! Debian's unmodified `hv_kvp_daemon -n` (hyperv-daemons, 6.1) on `/dev/vmbus/hv_kvp` served
//! by cusedev on a real FUSE mount, driven by `fakehost kvp ...`; then the errno paths of
//! `/dev/vmbus/hv_kvp` and `/dev/vmbus/hv_vss` through real syscalls with the test itself
//! playing the daemon (spec kvp-vss.md; the hvutil table is fcopy.md §5.2).
//!
//! Each test runs in its own private mount namespace, in which
//! * `/var/lib/hyperv` is a directory of the test's scratch dir (the daemon's pool files,
//!   spec §4.1, never the host's), and
//! * `/dev/log` is a socket the test reads (the daemon says everything through syslog), on a
//!   shadow of `/dev` on which cusedev mounts `/dev/vmbus`, the daemon's hard-coded path.
//!
//! (`cusedev_tests::kvp` has both.)
//!
//! hv_vss_daemon is never started here: it would freeze this host's filesystems (spec §6). It
//! runs in the QEMU guest (qemu_kvp_vss.rs).

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cusedev_tests::blocking::{install_sigusr1_without_restart, Blocking};
use cusedev_tests::dev::{cstr_at, u32_at, Dev, Errno};
use cusedev_tests::enter_private_mount_namespace;
use cusedev_tests::harness::{scratch_dir, Rig, Supervised, READY_TIMEOUT};
use cusedev_tests::kvp::*;

// ------------------------------------------------------------------ the daemon's scene

/// cusedev + fakehost, the private pool directory and the syslog catcher.
struct Scene {
    rig: Rig,
    pools: PrivatePools,
    syslog: Syslog,
}

/// What one `fakehost kvp ...` said.
struct Said {
    code: Option<i32>,
    stdout: String,
    /// stdout and stderr together, for messages.
    all: String,
}

fn said(output: Output) -> Said {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let all = format!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    Said {
        code: output.status.code(),
        stdout,
        all,
    }
}

fn scene(test: &str) -> Scene {
    enter_private_mount_namespace().expect("private mount namespace");
    // Not the rig's scratch dir: the rig makes (and first empties) its own.
    let ns = scratch_dir(&format!("{test}-ns"));
    let syslog = Syslog::capture(&ns);
    let pools = PrivatePools::mount(&ns);
    let rig = Rig::builder(test)
        .guest_args(&["--kernel", "linux-6.1"])
        .serves(KVP_DEVICE)
        .start();
    Scene { rig, pools, syslog }
}

impl Scene {
    /// Starts the daemon as its unit does and waits until it says it read the driver's
    /// answer to its registration (spec §4.6: "KVP LIC Version: %s"), i.e. the driver is
    /// READY and the host's negotiation can go on.
    fn start_daemon(&self) -> Supervised {
        assert!(
            Path::new(KVP_DAEMON).exists(),
            "{KVP_DAEMON} is missing: install Debian's hyperv-daemons (tests/scripts/install-deps.sh)"
        );
        let mark = self.syslog.mark();
        let daemon = Supervised::spawn("hv_kvp_daemon", Command::new(KVP_DAEMON).arg("-n"));
        let (line, _) = self
            .syslog
            .wait_for_from(mark, "KVP LIC Version:", READY_TIMEOUT);
        assert!(
            line.ends_with(&format!("KVP LIC Version: {KVP_DRIVER_VERSION}")),
            "the 6.1 driver answers REGISTER1 with version {KVP_DRIVER_VERSION:?}: {line}"
        );
        daemon
    }

    /// `fakehost kvp ARGS`, echoed into the test's output.
    fn kvp(&self, args: &[&str]) -> Said {
        let mut all = vec!["kvp"];
        all.extend_from_slice(args);
        said(self.rig.fakehost(&all))
    }

    /// `fakehost kvp ARGS` without the echo (for hundreds of calls).
    fn kvp_quiet(&self, args: &[&str]) -> Said {
        let mut all = vec!["kvp"];
        all.extend_from_slice(args);
        said(
            self.rig
                .fakehost_spawn(&all)
                .wait_with_output()
                .expect("run fakehost kvp"),
        )
    }

    /// `fakehost kvp ARGS` that must succeed; its stdout.
    fn kvp_ok(&self, args: &[&str]) -> String {
        let out = self.kvp(args);
        assert_eq!(
            out.code,
            Some(0),
            "fakehost kvp {}: {}",
            args.join(" "),
            out.all
        );
        out.stdout
    }

    /// `fakehost kvp get --pool P KEY [EXTRA]`: the value printed (without the line's newline).
    fn get(&self, pool: u8, key: &str, extra: &[&str]) -> String {
        let pool = pool.to_string();
        let mut args = vec!["get", "--pool", &pool, key];
        args.extend_from_slice(extra);
        let out = self.kvp_ok(&args);
        out.strip_suffix('\n').unwrap_or(&out).to_string()
    }

    fn list(&self, pool: u8) -> Vec<(String, String)> {
        parse_records(&self.kvp_ok(&["list", "--pool", &pool.to_string()]))
    }

    /// Waits until the daemon's file of pool 3 holds at least `count` records: the host pushes
    /// its intrinsic data (HostName, ...) there once the daemon has registered, and the daemon
    /// rewrites the file on every SET.
    fn wait_for_host_push(&self, count: usize) -> Vec<(String, String)> {
        let path = pool_file(&self.pools.dir, POOL_AUTO_EXTERNAL);
        wait_for_file_change(
            &path,
            READY_TIMEOUT,
            |p| read_pool_file(p).is_ok_and(|r| r.len() >= count),
            |p| format!("it holds {:?}", read_pool_file(p)),
        );
        self.pools.records(POOL_AUTO_EXTERNAL)
    }
}

/// The value of `KEY=` in /etc/os-release, without its quotes (as the daemon reads it).
fn os_release(key: &str) -> String {
    let text = std::fs::read_to_string("/etc/os-release").expect("/etc/os-release");
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim_matches(['"', '\'']).to_string())
        .unwrap_or_default()
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .expect("uname")
        .release()
        .to_string_lossy()
        .into_owned()
}

/// How many pool-3 records the host pushes at least (the KVP host's contract).
const HOST_PUSHED_AT_LEAST: usize = 16;

// ------------------------------------------------------------------ 1. the pools

#[test]
fn host_records_in_pool_3_and_the_guests_intrinsic_data_in_pool_2_read_back_through_the_daemon() {
    let s = scene("kvp-pools");
    let _daemon = s.start_daemon();
    let in_file = s.wait_for_host_push(HOST_PUSHED_AT_LEAST);

    // Pool 3 (AUTO_EXTERNAL): the host's items, enumerated back through the daemon.
    let listed = s.list(POOL_AUTO_EXTERNAL);
    assert!(
        listed.len() >= 11,
        "list --pool 3 gave {} records: {listed:?}",
        listed.len()
    );
    let listed_map = record_map(&listed);
    assert_eq!(listed_map.len(), listed.len(), "duplicate keys: {listed:?}");
    for key in ["HostName", "VirtualMachineName"] {
        assert!(
            listed_map.get(key).is_some_and(|v| !v.is_empty()),
            "no {key} among the host's records: {listed:?}"
        );
    }
    // The daemon's own file holds exactly what it enumerated, in its order (an ENUMERATE of
    // a pool other than AUTO is the n-th record of that pool's file, spec §4.7).
    let in_file_now = s.pools.records(POOL_AUTO_EXTERNAL);
    assert!(in_file_now.len() >= in_file.len());
    assert_eq!(
        listed,
        in_file_now,
        "list --pool 3 and {}/.kvp_pool_3 differ",
        s.pools.dir.display()
    );

    // Pool 2 (AUTO): the daemon's own intrinsic data, index by index (spec §4.7).
    let auto = s.list(POOL_AUTO);
    let keys: Vec<&str> = auto.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, AUTO_POOL_KEYS, "pool 2 as listed: {auto:?}");
    let auto = record_map(&auto);
    assert!(
        !auto["FullyQualifiedDomainName"].is_empty(),
        "empty FQDN: {auto:?}"
    );
    assert_eq!(
        auto["OSName"],
        os_release("NAME"),
        "NAME of /etc/os-release"
    );
    let release = kernel_release();
    // The daemon cuts uname's release at the first '-' for OSVersion ("x.y.z" for the host)
    // and keeps all of it as OSBuildNumber.
    assert_eq!(auto["OSVersion"], release.split('-').next().unwrap());
    assert_eq!(auto["OSBuildNumber"], release);
    assert_eq!(auto["OSMajorVersion"], os_release("VERSION_ID"));
    assert_eq!(
        auto["IntegrationServicesVersion"], KVP_DRIVER_VERSION,
        "the daemon reports the version string the driver gave it"
    );
    assert_eq!(auto["ProcessorArchitecture"], std::env::consts::ARCH);
    // The daemon keeps no file content for pool 2: it answers from what it knows.
}

// ------------------------------------------------------------------ 2. set / get / delete

// What a host GET gives on Linux 6.1 with Debian's daemon, found by this test (and seen with
// strace on the daemon: the GET it reads has value_size 0, its answer an empty value):
// * kvp_send_key() fills only the key of a GET; the message is kzalloc'ed, so the daemon
//   reads value_size = 0 (drivers/hv/hv_kvp.c; spec §3.3);
// * the daemon's kvp_get_value() copies `value_size` bytes of the record, i.e. none
//   (tools/hv/hv_kvp_daemon.c: `memcpy(value, record[i].value, value_size)`), and answers 0;
// * kvp_respond_to_host() would anyway read a GET value at the ENUMERATE offset, 4 bytes in.
// So a GET of a key that exists succeeds with an empty value, one that does not exist fails
// with HV_S_CONT, and what a key holds is read back by ENUMERATE (`list`), which the daemon
// answers with the whole record (and `fakehost kvp get`, which looks the key up that way;
// `get --raw` sends the GET). The test asserts exactly that, so a change to either side
// shows.

#[test]
fn set_values_read_back_by_list_get_of_a_set_key_is_empty_as_on_linux_6_1_and_a_missing_key_is_exit_1_with_hv_s_cont(
) {
    let s = scene("kvp-rw");
    let _daemon = s.start_daemon();
    let pool0 = || record_map(&s.list(POOL_EXTERNAL));

    // REG_SZ, through UTF-16 on the wire and UTF-8 in the daemon.
    let greeting = "grüß dich, 世界";
    s.kvp_ok(&["set", "--pool", "0", "Greeting", greeting]);
    assert_eq!(pool0().get("Greeting").map(String::as_str), Some(greeting));
    s.kvp_ok(&["set", "--pool", "0", "Greeting", "replaced"]);
    assert_eq!(
        pool0().get("Greeting").map(String::as_str),
        Some("replaced")
    );
    let long: String = (0..1000).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    s.kvp_ok(&["set", "--pool", "0", "Long", &long]);

    // REG_U32 / REG_U64: the driver hands the daemon decimal text (spec §3.3), which is what
    // the daemon stores and what an ENUMERATE gives back.
    s.kvp_ok(&["set", "--pool", "0", "Count", "4294967295", "--type", "u32"]);
    s.kvp_ok(&["set", "--pool", "0", "Zero", "0", "--type", "u32"]);
    s.kvp_ok(&[
        "set",
        "--pool",
        "0",
        "Big",
        "18446744073709551615",
        "--type",
        "u64",
    ]);
    let listed = s.list(POOL_EXTERNAL);
    let expected = [
        ("Greeting", "replaced"),
        ("Long", long.as_str()),
        ("Count", "4294967295"),
        ("Zero", "0"),
        ("Big", "18446744073709551615"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // The daemon appends new keys and replaces in place: file order is set order.
    assert_eq!(listed, expected);
    assert_eq!(
        s.pools.records(POOL_EXTERNAL),
        expected,
        "the daemon's .kvp_pool_0"
    );
    let one = s.kvp_ok(&["enumerate", "--pool", "0", "2"]);
    assert_eq!(one, "Count=4294967295\n");

    // KVP_OP_GET of keys that exist (`get --raw`): success, empty value (see above). Plain
    // `get` finds the value by enumerating, as a Hyper-V host reads a guest's items.
    for (key, value) in &expected[..4] {
        assert_eq!(s.get(0, key, &["--raw"]), "", "GET {key} on Linux 6.1");
        assert_eq!(&s.get(0, key, &[]), value, "get {key} by enumeration");
    }

    // DELETE, then the key is gone for GET, DELETE, ENUMERATE and the pool file.
    s.kvp_ok(&["delete", "--pool", "0", "Greeting"]);
    for args in [
        &["get", "--pool", "0", "Greeting"][..],
        &["get", "--raw", "--pool", "0", "Greeting"],
        &["delete", "--pool", "0", "Greeting"],
        &["get", "--pool", "0", "NeverSet"],
        &["get", "--raw", "--pool", "0", "NeverSet"],
        &["delete", "--pool", "0", "NeverSet"],
        &["enumerate", "--pool", "0", "4"],
    ] {
        let out = s.kvp(args);
        assert_eq!(
            out.code,
            Some(1),
            "fakehost kvp {}: the guest says no: {}",
            args.join(" "),
            out.all
        );
        assert!(
            out.all.to_lowercase().contains("0x80070103"),
            "fakehost kvp {} should name the daemon's HV_S_CONT (0x80070103): {}",
            args.join(" "),
            out.all
        );
    }
    let left: Vec<(String, String)> = expected[1..].to_vec();
    assert_eq!(s.list(POOL_EXTERNAL), left);
    assert_eq!(s.pools.records(POOL_EXTERNAL), left);
}

// ------------------------------------------------------------------ 3. many entries

/// This machine's first adapter with a MAC and an IPv4 address: (name, MAC, address).
fn an_adapter_with_ipv4() -> Option<(String, String, String)> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    let mut ipv4 = std::collections::BTreeMap::new();
    for ifa in addrs {
        if let Some(sin) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            ipv4.entry(ifa.interface_name.clone())
                .or_insert_with(|| sin.ip().to_string());
        }
    }
    ipv4.into_iter().find_map(|(name, addr)| {
        let mac = std::fs::read_to_string(format!("/sys/class/net/{name}/address")).ok()?;
        let mac = mac.trim().to_uppercase();
        (name != "lo" && mac != "00:00:00:00:00:00").then_some((name, mac, addr))
    })
}

#[test]
fn ip_info_of_an_adapter_is_what_the_daemon_finds_on_it_and_an_unknown_mac_is_refused() {
    let s = scene("kvp-ip");
    let _daemon = s.start_daemon();
    // The guest is this machine: the daemon reads this machine's interfaces (getifaddrs) and
    // runs Debian's hv_get_dns_info / hv_get_dhcp_info.
    let (name, mac, addr) = an_adapter_with_ipv4().expect("this machine has an IPv4 adapter");
    let shown = s.kvp_ok(&["ip", "--adapter", &mac, "--family", "ipv4"]);
    assert!(
        shown.contains(&format!("adapter {mac}")) && shown.contains(&addr),
        "GET_IP_INFO for {name} ({mac}) shows {addr}: {shown}"
    );
    assert!(shown.contains("DHCPEnabled"), "{shown}");
    // hv_get_dns_info reads /etc/resolv.conf.
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    if let Some(dns) = resolv
        .lines()
        .find_map(|l| l.strip_prefix("nameserver").map(str::trim))
        .filter(|dns| dns.contains('.'))
    {
        let line = shown
            .lines()
            .find(|l| l.contains("DNSServers"))
            .unwrap_or("");
        assert!(
            line.contains(dns),
            "DNS {dns} from /etc/resolv.conf: {shown}"
        );
    }
    let unknown = s.kvp(&["ip", "--adapter", "02:00:00:00:00:99"]);
    assert_eq!(unknown.code, Some(1), "{}", unknown.all);
    assert!(
        unknown.all.contains("0x80004005"),
        "HV_E_FAIL: {}",
        unknown.all
    );
}

#[test]
fn two_hundred_fifty_entries_set_twice_all_read_back_with_the_second_values_and_the_daemon_lives() {
    let s = scene("kvp-many");
    let mut daemon = s.start_daemon();
    let key = |i: usize| format!("entry-{i:03}");
    let value = |round: &str, i: usize| format!("{round}-{i:03}-{}", "ü".repeat(i % 37));
    for round in ["first", "second"] {
        for i in 0..250 {
            let out = s.kvp_quiet(&["set", "--pool", "0", &key(i), &value(round, i)]);
            assert_eq!(
                out.code,
                Some(0),
                "{round} set of {}: {}\n--- syslog ---\n{}",
                key(i),
                out.all,
                s.syslog.text()
            );
        }
        assert!(
            daemon.try_exit().is_none(),
            "the daemon died during the {round} round; syslog:\n{}",
            s.syslog.text()
        );
    }

    let listed = s.list(POOL_EXTERNAL);
    let map = record_map(&listed);
    assert_eq!(listed.len(), 250, "{} records listed", listed.len());
    assert_eq!(map.len(), 250, "duplicate keys in the listing");
    for i in 0..250 {
        assert_eq!(
            map.get(&key(i)),
            Some(&value("second", i)),
            "{} read back wrong",
            key(i)
        );
    }
    let file = s.pools.records(POOL_EXTERNAL);
    assert_eq!(
        file.len(),
        250,
        "the pool file holds {} records",
        file.len()
    );
    assert_eq!(record_map(&file), map);
    // Still the process we started, never restarted.
    assert!(daemon.try_exit().is_none());
    assert!(Path::new(&format!("/proc/{}", daemon.pid())).exists());
}

// ------------------------------------------------------------------ 4. rescind and re-offer

#[test]
fn twenty_rescinds_each_end_the_daemon_by_design_and_after_each_re_offer_a_new_daemon_serves_the_same_pools(
) {
    let s = scene("kvp-rescind");
    let mut daemon = s.start_daemon();
    s.kvp_ok(&["set", "--pool", "0", "Survivor", "still here"]);
    let pushed = s.wait_for_host_push(HOST_PUSHED_AT_LEAST).len();

    for cycle in 1..=20 {
        let said_before = s.syslog.mark();
        let logged_before = s.rig.guest.log_mark();
        let out = s.rig.fakehost(&["rescind", "kvp"]);
        assert!(out.status.success(), "rescind kvp, cycle {cycle}");

        // Why the daemon ends (spec §4 steps 2–4): the rescind wakes its poll with
        // POLLERR|POLLHUP, its read fails (EBADF), it goes back to the reopen point, closes
        // the fd and opens the node again; that open fails (EBADF while the channel is torn
        // down, ENODEV once the misc device is deregistered, ENOENT once the node is gone: all
        // three are seen), and a failed open is exit(1). So the 6.1 daemon
        // does not survive a rescind: on a real guest systemd's BindsTo= stops its unit with
        // the device and udev starts it again when the device comes back. We do the same.
        s.syslog
            .wait_for_from(said_before, "read failed", READY_TIMEOUT);
        let (why, _) =
            s.syslog
                .wait_for_from(said_before, "open /dev/vmbus/hv_kvp failed", READY_TIMEOUT);
        assert_eq!(
            daemon.wait_exit().code(),
            Some(1),
            "cycle {cycle}: the daemon ends with exit(1) after: {why}"
        );
        s.rig
            .guest
            .wait_for_log_from(logged_before, "/dev/vmbus/hv_kvp removed");
        assert_eq!(Dev::open(KVP_NODE).err(), Some(Errno::ENOENT));

        let logged_before = s.rig.guest.log_mark();
        let out = s.rig.fakehost(&["offer", "kvp"]);
        assert!(out.status.success(), "offer kvp, cycle {cycle}");
        s.rig.wait_for_device_from(logged_before, KVP_DEVICE);
        daemon = s.start_daemon();
        // Serving again: the new daemon answers from the pool file the old one wrote (an
        // ENUMERATE; a GET's value would be empty on 6.1, see test 2).
        assert_eq!(
            s.list(POOL_EXTERNAL),
            [("Survivor".to_string(), "still here".to_string())],
            "cycle {cycle}"
        );
    }

    // Every registration made the host push its records again: they replace, not add.
    s.kvp_ok(&["set", "--pool", "0", "Last", "one"]);
    assert_eq!(
        record_map(&s.list(POOL_EXTERNAL))
            .get("Last")
            .map(String::as_str),
        Some("one")
    );
    let listed = s.list(POOL_AUTO_EXTERNAL);
    assert_eq!(
        listed.len(),
        pushed,
        "pool 3 after 20 re-pushes: {listed:?}"
    );
    assert_eq!(
        record_map(&listed).len(),
        pushed,
        "duplicate keys: {listed:?}"
    );
    assert!(daemon.try_exit().is_none());
}

// ------------------------------------------------------------------ 5. errno probes

/// How one of the two nodes differs in the probes.
struct Node {
    path: &'static str,
    device: &'static str,
    /// fakehost's name for the service (`rescind kvp`).
    service: &'static str,
    /// What the daemon reads and writes at once.
    msg_len: usize,
    /// What the driver answers a registration with: its length.
    reply_len: usize,
    registration: fn() -> Vec<u8>,
    check_reply: fn(&[u8]),
    /// Write sizes the driver refuses with EINVAL (0 is not among them: FUSE and CUSE complete
    /// a 0-byte write without asking the server).
    wrong_sizes: &'static [usize],
    /// A well-sized message other than a registration.
    not_a_registration: fn() -> Vec<u8>,
}

const KVP: Node = Node {
    path: KVP_NODE,
    device: KVP_DEVICE,
    service: "kvp",
    msg_len: KVP_MSG_LEN,
    reply_len: KVP_MSG_LEN,
    registration: kvp_registration,
    check_reply: |reply| {
        // A whole hv_kvp_msg: operation = what the daemon wrote, the version string at 4.
        assert_eq!(reply.len(), KVP_MSG_LEN);
        assert_eq!(reply[0], KVP_OP_REGISTER1);
        assert_eq!(cstr_at(reply, 4, 512), KVP_DRIVER_VERSION);
    },
    // on_msg refuses only what is shorter than hv_kvp_msg (spec §3.2).
    wrong_sizes: &[4, 12, KVP_MSG_LEN - 1],
    not_a_registration: || {
        let mut msg = vec![0u8; KVP_MSG_LEN];
        msg[0] = KVP_OP_SET;
        msg
    },
};

const VSS: Node = Node {
    path: VSS_NODE,
    device: VSS_DEVICE,
    service: "vss",
    msg_len: VSS_MSG_LEN,
    reply_len: 4,
    registration: vss_registration,
    check_reply: |reply| {
        // A bare u32: the kernel's VSS_OP_REGISTER1 (spec §5).
        assert_eq!(reply.len(), 4);
        assert_eq!(u32_at(reply, 0), u32::from(VSS_OP_REGISTER1));
    },
    // on_msg wants exactly 12 (spec §5).
    wrong_sizes: &[4, 11, 13, KVP_MSG_LEN],
    not_a_registration: || {
        let mut msg = vec![0u8; VSS_MSG_LEN];
        msg[0] = VSS_OP_FREEZE;
        msg
    },
};

const POLLIN: u32 = libc::POLLIN as u32;
const POLLERR: u32 = libc::POLLERR as u32;
const POLLHUP: u32 = libc::POLLHUP as u32;
const POLLRDNORM: u32 = libc::POLLRDNORM as u32;

/// cusedev serving both nodes, no daemon.
fn probe_rig(test: &str, node: &Node) -> Rig {
    enter_private_mount_namespace().expect("private mount namespace");
    install_sigusr1_without_restart();
    Rig::builder(&format!("{test}-{}", node.service))
        .guest_args(&["--kernel", "linux-6.1"])
        .serves(KVP_DEVICE)
        .serves(VSS_DEVICE)
        .start()
}

/// Opens and completes the handshake as the 6.1 daemon does: write the registration, read the
/// driver's answer.
fn register(node: &Node) -> Dev {
    let dev = Dev::open(node.path).expect("open");
    assert_eq!(dev.write(&(node.registration)()), Ok(node.msg_len));
    let reply = dev.read(node.msg_len).expect("the driver's answer");
    (node.check_reply)(&reply);
    dev
}

fn second_open_is_ebusy(node: &Node) {
    let _rig = probe_rig("busy", node);
    let _first = Dev::open(node.path).expect("first open");
    assert_eq!(Dev::open(node.path).err(), Some(Errno::EBUSY));
}

fn write_of_the_wrong_size_is_einval_and_registration_still_possible(node: &Node) {
    let _rig = probe_rig("wsize", node);
    let dev = Dev::open(node.path).unwrap();
    for &size in node.wrong_sizes {
        let mut msg = (node.registration)();
        msg.resize(size, 0);
        assert_eq!(dev.write(&msg), Err(Errno::EINVAL), "a {size}-byte write");
    }
    // Still DEVICE_INIT: the proper registration works.
    assert_eq!(dev.write(&(node.registration)()), Ok(node.msg_len));
    (node.check_reply)(&dev.read(node.msg_len).unwrap());
}

fn only_a_registration_is_accepted_before_the_handshake(node: &Node) {
    let _rig = probe_rig("notreg", node);
    let dev = Dev::open(node.path).unwrap();
    assert_eq!(dev.write(&(node.not_a_registration)()), Err(Errno::EINVAL));
    assert_eq!(dev.poll(0), Ok(0), "nothing queued by the refused write");
    drop(dev);
    drop(register(node));
}

fn registration_is_answered_with_the_drivers_version(node: &Node) {
    let _rig = probe_rig("answer", node);
    // register() checks the answer's size and content.
    drop(register(node));
}

fn short_read_is_einval_and_keeps_the_message(node: &Node) {
    let _rig = probe_rig("short", node);
    let dev = Dev::open(node.path).unwrap();
    assert_eq!(dev.write(&(node.registration)()), Ok(node.msg_len));
    assert_eq!(dev.read(node.reply_len - 1), Err(Errno::EINVAL));
    assert_eq!(dev.read(1), Err(Errno::EINVAL));
    (node.check_reply)(&dev.read(node.msg_len).unwrap());
}

fn poll_reports_pollin_only_after_a_message_and_never_pollout(node: &Node) {
    let _rig = probe_rig("poll", node);
    let dev = Dev::open(node.path).unwrap();
    assert_eq!(
        dev.poll(0),
        Ok(0),
        "nothing queued: no bits, not even POLLOUT"
    );
    assert_eq!(dev.write(&(node.registration)()), Ok(node.msg_len));
    assert_eq!(dev.poll(0), Ok(POLLIN | POLLRDNORM));
    assert_eq!(
        dev.poll(0),
        Ok(POLLIN | POLLRDNORM),
        "polling does not consume"
    );
    (node.check_reply)(&dev.read(node.msg_len).unwrap());
    if node.service == "vss" {
        // The VSS host asks nothing unprompted.
        assert_eq!(dev.poll(0), Ok(0));
    }
    // (KVP: the host's pool-3 push may already be queued; see the next probe.)
}

fn sleeping_poll_is_woken_by_a_host_request(node: &Node) {
    let rig = probe_rig("pollwake", node);
    let dev = Arc::new(register(node));
    if node.service == "kvp" {
        // Once the driver is READY the host's NEGOTIATE is answered and the host pushes its
        // intrinsic records: SETs into pool 3, with key and value converted to UTF-8 and
        // their sizes counting the NUL (spec §3.3). Whether the first is queued before the
        // poll sleeps is the host's timing; either way only POLLIN|POLLRDNORM comes.
        assert_eq!(dev.poll(30_000), Ok(POLLIN | POLLRDNORM));
        let set = dev.read(KVP_MSG_LEN).unwrap();
        assert_eq!(set.len(), KVP_MSG_LEN);
        assert_eq!(
            (set[0], set[1]),
            (KVP_OP_SET, POOL_AUTO_EXTERNAL),
            "SET into pool 3"
        );
        let key = cstr_at(&set, KVP_SET_KEY, 512);
        let value = cstr_at(&set, KVP_SET_VALUE, 2048);
        assert!(!key.is_empty(), "a pushed record without a key");
        assert_eq!(u32_at(&set, KVP_SET_KEY_SIZE) as usize, key.len() + 1);
        assert_eq!(u32_at(&set, KVP_SET_VALUE_SIZE) as usize, value.len() + 1);
        // Answer it as the daemon does: status 0 in the first 4 bytes of the same buffer.
        let mut reply = set;
        reply[..4].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(dev.write(&reply), Ok(KVP_MSG_LEN));
        return;
    }
    let poller = {
        let dev = dev.clone();
        Blocking::spawn(move || dev.poll(-1))
    };
    poller.wait_blocked_in(&[libc::SYS_poll, libc::SYS_ppoll]);
    let check = rig.fakehost_spawn(&["vss", "check"]);
    assert_eq!(poller.join(), Ok(POLLIN | POLLRDNORM));
    let msg = dev.read(VSS_MSG_LEN).unwrap();
    assert_eq!(msg.len(), VSS_MSG_LEN, "a whole hv_vss_msg");
    assert_eq!(msg[0], VSS_OP_HOT_BACKUP, "`vss check` asks HOT_BACKUP");
    assert_eq!(
        &msg[1..],
        &[0u8; 11],
        "only the op, the rest zeroed (spec §5)"
    );
    let mut reply = msg;
    reply[..4].copy_from_slice(&0u32.to_ne_bytes());
    assert_eq!(dev.write(&reply), Ok(VSS_MSG_LEN));
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "vss check answered 0: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn blocked_read_interrupted_by_a_signal_is_eintr(node: &Node) {
    let _rig = probe_rig("eintr", node);
    // Before the handshake nothing is queued (for KVP, after it the host's push would be).
    let dev = Arc::new(Dev::open(node.path).unwrap());
    let reader = {
        let dev = dev.clone();
        let len = node.msg_len;
        Blocking::spawn(move || dev.read(len))
    };
    reader.wait_blocked_in_read();
    reader.signal();
    assert_eq!(reader.join(), Err(Errno::EINTR));
    // The device is still usable.
    assert_eq!(dev.write(&(node.registration)()), Ok(node.msg_len));
    (node.check_reply)(&dev.read(node.msg_len).unwrap());
}

fn close_resets_the_handshake(node: &Node) {
    let _rig = probe_rig("reset", node);
    drop(register(node));
    // Had the state stayed READY (or later), a second registration would not be answered
    // the same way.
    drop(register(node));
}

fn ioctl_is_enotty(node: &Node) {
    let _rig = probe_rig("ioctl", node);
    let dev = Dev::open(node.path).unwrap();
    assert_eq!(dev.ioctl(0x5401 /* TCGETS */, 0), Err(Errno::ENOTTY));
}

fn rescind_wakes_a_blocked_reader_with_ebadf_and_the_node_goes_after_the_close(node: &Node) {
    let rig = probe_rig("rescind", node);
    let dev = Arc::new(Dev::open(node.path).unwrap());
    let reader = {
        let dev = dev.clone();
        let len = node.msg_len;
        Blocking::spawn(move || dev.read(len))
    };
    reader.wait_blocked_in_read();
    let mark = rig.guest.log_mark();
    assert!(rig.fakehost(&["rescind", node.service]).status.success());
    assert_eq!(reader.join(), Err(Errno::EBADF));
    assert_eq!(dev.write(&(node.registration)()), Err(Errno::EBADF));
    assert_eq!(dev.poll(0), Ok(POLLERR | POLLHUP));
    // The 6.1 teardown waits for the last close before the node goes.
    let removed = format!("{} removed", node.path);
    assert!(!rig.guest.log_contains(&removed));
    assert_eq!(Dev::open(node.path).err(), Some(Errno::EBADF));
    drop(dev);
    rig.guest.wait_for_log_from(mark, &removed);
    assert_eq!(Dev::open(node.path).err(), Some(Errno::ENOENT));

    let mark = rig.guest.log_mark();
    assert!(rig.fakehost(&["offer", node.service]).status.success());
    rig.wait_for_device_from(mark, node.device);
    drop(register(node));
}

/// Each probe, as one test per node: `on_hv_kvp::second_open_is_ebusy`, ...
macro_rules! probes {
    ($($probe:ident),* $(,)?) => {
        mod on_hv_kvp {
            $( #[test] fn $probe() { super::$probe(&super::KVP) } )*
        }
        mod on_hv_vss {
            $( #[test] fn $probe() { super::$probe(&super::VSS) } )*
        }
    };
}

probes!(
    second_open_is_ebusy,
    write_of_the_wrong_size_is_einval_and_registration_still_possible,
    only_a_registration_is_accepted_before_the_handshake,
    registration_is_answered_with_the_drivers_version,
    short_read_is_einval_and_keeps_the_message,
    poll_reports_pollin_only_after_a_message_and_never_pollout,
    sleeping_poll_is_woken_by_a_host_request,
    blocked_read_interrupted_by_a_signal_is_eintr,
    close_resets_the_handshake,
    ioctl_is_enotty,
    rescind_wakes_a_blocked_reader_with_ebadf_and_the_node_goes_after_the_close,
);

// VSS only: what the test plays there has no KVP counterpart (a KVP host request before a
// daemon registered waits for the NEGOTIATE the driver leaves unanswered, spec §3.4).

#[test]
fn vss_request_without_a_registered_daemon_fails_at_once_with_e_fail() {
    let rig = probe_rig("vssnodaemon", &VSS);
    let started = Instant::now();
    let out = rig.fakehost(&["vss", "check"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}: the driver answers HV_E_FAIL at once (spec §5), not after a timeout",
        started.elapsed()
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.to_lowercase().contains("0x80004005"), "{text}");
}

#[test]
fn vss_reply_with_nothing_asked_is_einval() {
    let _rig = probe_rig("vssnoreq", &VSS);
    let dev = register(&VSS);
    assert_eq!(dev.write(&[0u8; VSS_MSG_LEN]), Err(Errno::EINVAL));
}

#[test]
fn vss_freeze_refused_by_the_daemon_is_reported_to_the_host_as_its_status() {
    let rig = probe_rig("vssrefuse", &VSS);
    let dev = Arc::new(register(&VSS));
    let reader = {
        let dev = dev.clone();
        Blocking::spawn(move || dev.read(VSS_MSG_LEN))
    };
    reader.wait_blocked_in_read();
    // --force: the guest side is cusedev on this machine, for which fakehost refuses a FREEZE
    // (see the next test); here the test is the daemon and freezes nothing.
    let freeze = rig.fakehost_spawn(&["vss", "freeze", "--force"]);
    let msg = reader.join().unwrap();
    assert_eq!(msg.len(), VSS_MSG_LEN);
    assert_eq!(msg[0], VSS_OP_FREEZE);
    // What the daemon writes when a FIFREEZE failed (spec §6.6).
    let mut reply = msg;
    reply[..4].copy_from_slice(&HV_E_FAIL.to_ne_bytes());
    assert_eq!(dev.write(&reply), Ok(VSS_MSG_LEN));
    let out = freeze.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.to_lowercase().contains("0x80004005"), "{text}");
}

#[test]
fn vss_freeze_of_this_machine_is_refused_without_force_and_never_reaches_the_device() {
    // The guest side of the bus is cusedev on this kernel: a real daemon would freeze this
    // host. fakehost refuses (exit 2) before sending anything.
    let rig = probe_rig("vssguard", &VSS);
    let dev = register(&VSS);
    let out = rig.fakehost(&["vss", "freeze"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("--force"),
        "the refusal names the way out: {text}"
    );
    assert_eq!(dev.poll(0), Ok(0), "nothing reached the driver");
}
