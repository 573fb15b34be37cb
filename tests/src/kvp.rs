//! What the KVP and VSS tests share: the daemons' paths and message sizes, the status codes
//! they answer with, readers for `fakehost kvp list` and for the daemon's own pool files, and
//! the two pieces of mount-namespace plumbing that let Debian's unmodified hv_kvp_daemon run on
//! this host without touching it:
//!
//! * [`PrivatePools`]: `/var/lib/hyperv` (hard-coded in the daemon, spec kvp-vss.md §4.1) is a
//!   directory of the test's scratch dir, bind-mounted in the test's private mount namespace,
//!   so the host's real pool files (if any) are never read or written.
//! * [`Syslog`]: the daemons log only through syslog(3), i.e. datagrams to `/dev/log`. Inside
//!   the namespace `/dev` is shadowed ([`shadow_directory`]: a tmpfs whose entries are bind
//!   mounts of the real ones) and `/dev/log` is a socket the test reads, so a test can wait
//!   for the daemon's own words ("KVP LIC Version: 3.1") and quote its reasons when it exits.
//!
//! **Never start hv_vss_daemon on this host** (spec §6): asked to freeze, it FIFREEZEs every
//! writable block-backed filesystem of the machine, this host's root included. It runs only in
//! the QEMU guest (tests/tests/qemu_kvp_vss.rs).
//!
//! Read next: tests/tests/kvp_daemon.rs, then tests/tests/qemu_kvp_vss.rs.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Where Debian's hyperv-daemons puts the KVP daemon; its unit runs it with `-n`.
pub const KVP_DAEMON: &str = "/usr/sbin/hv_kvp_daemon";
/// The VSS daemon. Only ever started inside the QEMU guest (see the module comment).
pub const VSS_DAEMON: &str = "/usr/sbin/hv_vss_daemon";

/// The nodes the daemons open (fixed in their sources) and their names in cusedev's table.
pub const KVP_NODE: &str = "/dev/vmbus/hv_kvp";
pub const KVP_DEVICE: &str = "vmbus/hv_kvp";
pub const VSS_NODE: &str = "/dev/vmbus/hv_vss";
pub const VSS_DEVICE: &str = "vmbus/hv_vss";

/// `sizeof(struct hv_kvp_msg)` as the 6.1 daemon reads and writes it (spec §1.1).
pub const KVP_MSG_LEN: usize = 7432;
/// `sizeof(struct hv_vss_msg)` (spec §1.2).
pub const VSS_MSG_LEN: usize = 12;

/// KVP operations (byte 0 of hv_kvp_msg).
pub const KVP_OP_GET: u8 = 0;
pub const KVP_OP_SET: u8 = 1;
pub const KVP_OP_REGISTER1: u8 = 100;
/// VSS operations (byte 0 of hv_vss_msg).
pub const VSS_OP_HOT_BACKUP: u8 = 2;
pub const VSS_OP_FREEZE: u8 = 5;
pub const VSS_OP_REGISTER1: u8 = 129;

/// The version string the 6.1 KVP driver answers a REGISTER1 with (spec §3.2).
pub const KVP_DRIVER_VERSION: &str = "3.1";

/// Offsets inside hv_kvp_msg of a SET/GET body (spec §1.1).
pub const KVP_SET_KEY_SIZE: usize = 8;
pub const KVP_SET_VALUE_SIZE: usize = 12;
pub const KVP_SET_KEY: usize = 16;
pub const KVP_SET_VALUE: usize = 528;

/// `HV_S_CONT`: what the 6.1 daemon answers for a GET or DELETE of a key its pool lacks
/// (tools/hv/hv_kvp_daemon.c: `hv_msg->error = HV_S_CONT`), and for the end of an enumeration.
pub const HV_S_CONT: u32 = 0x8007_0103;
/// `HV_E_FAIL`: what a driver answers when no daemon is there to ask.
pub const HV_E_FAIL: u32 = 0x8000_4005;

/// The daemon's pool directory (hard-coded, spec §4.1).
pub const POOL_DIR: &str = "/var/lib/hyperv";

/// Pools (spec §1.1).
pub const POOL_EXTERNAL: u8 = 0;
pub const POOL_AUTO: u8 = 2;
pub const POOL_AUTO_EXTERNAL: u8 = 3;

/// What the 6.1 daemon answers an ENUMERATE of pool 2 (AUTO) with, index by index (spec §4.7).
pub const AUTO_POOL_KEYS: [&str; 10] = [
    "FullyQualifiedDomainName",
    "IntegrationServicesVersion",
    "NetworkAddressIPv4",
    "NetworkAddressIPv6",
    "OSBuildNumber",
    "OSName",
    "OSMajorVersion",
    "OSMinorVersion",
    "OSVersion",
    "ProcessorArchitecture",
];

/// A pool record on disk: key[512] then value[2048], each NUL-terminated (spec §4.1).
const RECORD_KEY: usize = 512;
const RECORD_LEN: usize = 512 + 2048;

/// A REGISTER1 as the 6.1 KVP daemon writes it: 7432 bytes, byte 0 = 100 (the daemon leaves the
/// rest as whatever its buffer held; zeros here).
pub fn kvp_registration() -> Vec<u8> {
    let mut msg = vec![0u8; KVP_MSG_LEN];
    msg[0] = KVP_OP_REGISTER1;
    msg
}

/// A REGISTER1 as the 6.1 VSS daemon writes it: 12 bytes, byte 0 = 129.
pub fn vss_registration() -> Vec<u8> {
    let mut msg = vec![0u8; VSS_MSG_LEN];
    msg[0] = VSS_OP_REGISTER1;
    msg
}

/// `fakehost kvp list` output (`KEY=VALUE` per line) as ordered pairs. A line without `=`
/// is kept with the whole line as key and a value of `None`-like `"\0"`, so an assertion on
/// the records shows it rather than silently dropping it.
pub fn parse_records(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|line| match line.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (line.to_string(), "\0".to_string()),
        })
        .collect()
}

/// The records as a map (the last of duplicates wins; compare lengths to catch those).
pub fn record_map(records: &[(String, String)]) -> BTreeMap<String, String> {
    records.iter().cloned().collect()
}

/// `<dir>/.kvp_pool_<pool>`, the daemon's file for one pool.
pub fn pool_file(dir: &Path, pool: u8) -> PathBuf {
    dir.join(format!(".kvp_pool_{pool}"))
}

/// The records of one of the daemon's pool files, in file order.
pub fn read_pool_file(path: &Path) -> io::Result<Vec<(String, String)>> {
    let bytes = std::fs::read(path)?;
    if bytes.len() % RECORD_LEN != 0 {
        return Err(io::Error::other(format!(
            "{}: {} bytes is not a whole number of {RECORD_LEN}-byte records",
            path.display(),
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks(RECORD_LEN)
        .map(|r| (cstr(&r[..RECORD_KEY]), cstr(&r[RECORD_KEY..])))
        .collect())
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// Waits until `ready(path)` holds, sleeping on inotify events of `path`'s directory (the
/// daemon rewrites a pool file on every change), never on a timer; panics after `limit`
/// with what `describe` says about the last state.
pub fn wait_for_file_change(
    path: &Path,
    limit: Duration,
    mut ready: impl FnMut(&Path) -> bool,
    describe: impl Fn(&Path) -> String,
) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    use std::os::fd::AsFd;

    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).expect("inotify_init");
    let dir = path.parent().expect("a file in a directory");
    inotify
        .add_watch(
            dir,
            AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_MODIFY
                | AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_MOVED_TO,
        )
        .unwrap_or_else(|e| panic!("inotify watch on {}: {e}", dir.display()));
    let deadline = Instant::now() + limit;
    // Checked after the watch exists, so a change in between still wakes us.
    while !ready(path) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{} did not get ready within {limit:?}: {}",
            path.display(),
            describe(path)
        );
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(left.as_millis().min(60_000) as i32 + 1)
            .unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, ms) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => panic!("poll on inotify: {e}"),
        }
        if fds[0].any().unwrap_or(false) {
            let _ = inotify.read_events();
        }
    }
}

// ------------------------------------------------------------------ mount-namespace plumbing

/// Replaces `dir` in the calling thread's (private) mount namespace by a tmpfs on which every
/// entry of the real `dir` is again present: directories and files as bind mounts of the
/// originals (recursive, so `/dev/pts` stays devpts), symlinks as the same symlinks. The tmpfs
/// can then take new entries (`/dev/log`, `/var/lib/hyperv`) that exist nowhere else.
///
/// `work` is an empty directory for the moment's view of the original (unmounted before
/// returning: nothing under the scratch dir stays a mount of the real `dir`, so removing the
/// scratch dir can never reach into it).
pub fn shadow_directory(dir: &Path, work: &Path) -> io::Result<()> {
    let orig = work.join("orig");
    std::fs::create_dir_all(&orig)?;
    let err = |what: &str, e: nix::errno::Errno| io::Error::other(format!("{what}: {e}"));
    mount(
        Some(dir),
        &orig,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| err(&format!("bind {} at {}", dir.display(), orig.display()), e))?;
    let result = (|| {
        let mode = {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(dir)?.permissions().mode() & 0o7777
        };
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::empty(),
            Some(format!("mode={mode:o},size=16m").as_str()),
        )
        .map_err(|e| err(&format!("tmpfs over {}", dir.display()), e))?;
        for entry in std::fs::read_dir(&orig)? {
            let entry = entry?;
            let from = entry.path();
            let to = dir.join(entry.file_name());
            let kind = entry.file_type()?;
            if kind.is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
                continue;
            }
            if kind.is_dir() {
                std::fs::create_dir(&to)?;
            } else {
                std::fs::File::create(&to)?;
            }
            mount(
                Some(&from),
                &to,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| err(&format!("bind {} at {}", from.display(), to.display()), e))?;
        }
        Ok(())
    })();
    umount2(&orig, MntFlags::MNT_DETACH).map_err(|e| err("unmount the view", e))?;
    result
}

/// The daemon's `/var/lib/hyperv`, a directory of the test's scratch dir.
pub struct PrivatePools {
    /// The scratch directory seen at `/var/lib/hyperv` by the daemon.
    pub dir: PathBuf,
}

impl PrivatePools {
    /// Creates `<scratch>/hyperv` and bind-mounts it over `/var/lib/hyperv` in the calling
    /// thread's private mount namespace. Where the host has no `/var/lib/hyperv` (the package's
    /// unit makes it with StateDirectory=), `/var/lib` is shadowed first so that the mount
    /// point exists in the namespace only.
    pub fn mount(scratch: &Path) -> PrivatePools {
        let dir = scratch.join("hyperv");
        std::fs::create_dir_all(&dir).expect("create the private pool directory");
        let target = Path::new(POOL_DIR);
        if !target.is_dir() {
            shadow_directory(Path::new("/var/lib"), &scratch.join("var-lib-view"))
                .expect("shadow /var/lib");
            std::fs::create_dir(target).expect("create /var/lib/hyperv in the shadow");
        }
        mount(
            Some(&dir),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("bind {} over {POOL_DIR}: {e}", dir.display()));
        // The daemon must not reach the host's directory: check the mount is there.
        assert_eq!(
            crate::syscalls::mounts_at(target),
            1,
            "{POOL_DIR} is not our bind mount"
        );
        PrivatePools { dir }
    }

    /// The records of pool `pool` as the daemon last wrote them (none if no file yet).
    pub fn records(&self, pool: u8) -> Vec<(String, String)> {
        let path = pool_file(&self.dir, pool);
        match read_pool_file(&path) {
            Ok(records) => records,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("{e}"),
        }
    }
}

/// Messages sent to `/dev/log` in the test's mount namespace, collected by a thread.
pub struct Syslog {
    book: Arc<(Mutex<Vec<String>>, Condvar)>,
    stop: Arc<AtomicBool>,
}

impl Syslog {
    /// Shadows `/dev` (see [`shadow_directory`]) and binds a datagram socket at `/dev/log`.
    /// Must run on the test's thread, in its private mount namespace, before cusedev starts
    /// (cusedev then mounts its FUSE directory on the shadow's `/dev/vmbus`).
    pub fn capture(scratch: &Path) -> Syslog {
        shadow_directory(Path::new("/dev"), &scratch.join("dev-view")).expect("shadow /dev");
        let log = Path::new("/dev/log");
        if log.exists() || log.is_symlink() {
            // The host's own syslog socket, bound into the shadow: replace it with ours.
            let _ = umount2(log, MntFlags::MNT_DETACH);
            std::fs::remove_file(log).expect("remove /dev/log from the shadow");
        }
        let socket = UnixDatagram::bind(log).expect("bind /dev/log in the shadow");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("socket timeout");
        let book = Arc::new((Mutex::new(Vec::<String>::new()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (shared, stopped) = (book.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 8192];
            while !stopped.load(Ordering::Acquire) {
                match socket.recv(&mut buf) {
                    Ok(n) => {
                        let line = String::from_utf8_lossy(&buf[..n])
                            .trim_end_matches(['\n', '\0'])
                            .to_string();
                        eprintln!("[syslog] {line}");
                        shared.0.lock().unwrap().push(line);
                        shared.1.notify_all();
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => {
                        eprintln!("[syslog] receiving stopped: {e}");
                        break;
                    }
                }
            }
        });
        Syslog { book, stop }
    }

    /// How many messages have come so far (a mark for [`Syslog::wait_for_from`]).
    pub fn mark(&self) -> usize {
        self.book.0.lock().unwrap().len()
    }

    /// Waits until a message after the first `from` contains `needle`; returns the message
    /// and the mark after it. Panics after `limit` with everything logged.
    pub fn wait_for_from(&self, from: usize, needle: &str, limit: Duration) -> (String, usize) {
        let deadline = Instant::now() + limit;
        let mut lines = self.book.0.lock().unwrap();
        loop {
            if let Some(i) = lines.iter().skip(from).position(|l| l.contains(needle)) {
                return (lines[from + i].clone(), from + i + 1);
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "syslog never got {needle:?} within {limit:?}; it got:\n{}",
                lines.join("\n")
            );
            lines = self.book.1.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    /// All messages so far, one per line.
    pub fn text(&self) -> String {
        self.book.0.lock().unwrap().join("\n")
    }
}

impl Drop for Syslog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}
