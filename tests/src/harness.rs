//! Starting the real pieces for an end-to-end test: fakehost, cusedev on a FUSE mount, and
//! Debian's unmodified hv_fcopy_daemon, inside the calling thread's private mount namespace.
//!
//! Readiness is awaited on log lines the programs print (the host says it listens, cusedev says
//! which node it serves, the driver says a daemon registered), never on sleeps.
//!
//! [`Rig::builder`] starts the pair for any device: say which nodes to wait for
//! ([`RigBuilder::serves`]) and which arguments cusedev and fakehost get. [`Rig::start`] is
//! the fcopy rig most tests here use.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Where Debian's hyperv-daemons puts the fcopy daemon.
pub const FCOPY_DAEMON: &str = "/usr/sbin/hv_fcopy_daemon";

/// The node the daemon opens; fixed in the daemon's source.
pub const FCOPY_NODE: &str = "/dev/vmbus/hv_fcopy";

/// fcopy's device name as cusedev's driver table has it (relative to /dev).
pub const FCOPY_DEVICE: &str = "vmbus/hv_fcopy";

/// What cusedev logs once it serves `device` (a name relative to /dev, `"vmbus/hv_fcopy"`):
/// the bus client's `serving /dev/NODE (ROW, profile P, relid N)`.
pub fn served_line(device: &str) -> String {
    format!("serving /dev/{device} (")
}

/// How long any readiness wait may take before the test fails with the log it has seen.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A workspace binary built next to the running executable: `target/<profile>/NAME`, seen
/// from a test (`target/<profile>/deps/<test>-<hash>`) or from a binary of this crate
/// (`target/<profile>/qemu-demo`).
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let mut dir = exe.parent().expect("executable lives in target/<profile>");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("deps lives in target/<profile>");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace --bins`, \
         which `make test` does)",
        path.display()
    );
    path
}

/// A fresh directory for one test's sockets and files.
pub fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cusedev-test-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Lines a child printed on stderr, shared with the thread that collects them.
#[derive(Default)]
struct LogBook {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

/// A child process whose stderr is collected (and echoed with a prefix, so a failing test
/// shows what each program said). Killed when dropped.
pub struct Supervised {
    pub name: &'static str,
    child: Child,
    log: Arc<LogBook>,
}

impl Supervised {
    pub fn spawn(name: &'static str, command: &mut Command) -> Supervised {
        let mut child = crate::spawn_isolated(command.stdin(Stdio::null()).stderr(Stdio::piped()))
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let log = Arc::new(LogBook::default());
        let stderr = child.stderr.take().expect("piped stderr");
        let book = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{name}] {line}");
                book.lines.lock().unwrap().push(line);
                book.grew.notify_all();
            }
        });
        Supervised { name, child, log }
    }

    /// Waits until a stderr line contains `needle`, counting from line `from`; returns the
    /// index after the matching line.
    pub fn wait_for_log_from(&self, from: usize, needle: &str) -> usize {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            if let Some(i) = lines.iter().skip(from).position(|l| l.contains(needle)) {
                return from + i + 1;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "{} never logged {needle:?}; it said:\n{}",
                self.name,
                lines.join("\n")
            );
            lines = self.log.grew.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    pub fn wait_for_log(&self, needle: &str) -> usize {
        self.wait_for_log_from(0, needle)
    }

    /// For a cusedev child: waits until it serves `device` (relative to /dev), counting from
    /// log line `from`; returns the index after that line.
    pub fn wait_for_device_from(&self, from: usize, device: &str) -> usize {
        self.wait_for_log_from(from, &served_line(device))
    }

    /// How many lines have been logged so far (a mark for `wait_for_log_from`).
    pub fn log_mark(&self) -> usize {
        self.log.lines.lock().unwrap().len()
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit on its own (bounded).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.name);
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        // SIGTERM first so cusedev unmounts cleanly; the namespace makes leftovers harmless.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }
}

/// fakehost + cusedev (FUSE) wired together in one scratch directory.
pub struct Rig {
    pub dir: PathBuf,
    pub host: Supervised,
    pub guest: Supervised,
}

/// What a [`Rig`] starts: the arguments of each side and the device nodes to wait for.
pub struct RigBuilder {
    test: String,
    frontend: String,
    guest_args: Vec<String>,
    host_args: Vec<String>,
    host_dir_args: Vec<(String, String)>,
    guest_dir_args: Vec<(String, String)>,
    devices: Vec<String>,
}

impl RigBuilder {
    /// cusedev's `--frontend` (default `fuse`).
    pub fn frontend(mut self, frontend: &str) -> RigBuilder {
        self.frontend = frontend.to_string();
        self
    }

    /// More arguments for `cusedev serve` (`--kernel linux-3.14`, `--profile D=P`).
    pub fn guest_args(mut self, args: &[&str]) -> RigBuilder {
        self.guest_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// More arguments for `fakehost serve`.
    pub fn host_args(mut self, args: &[&str]) -> RigBuilder {
        self.host_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// An argument for `fakehost serve` naming a directory of the rig's scratch directory,
    /// created before the host starts: `.host_dir_arg("--blob-root", "blobs")` passes
    /// `--blob-root <dir>/blobs`.
    pub fn host_dir_arg(mut self, flag: &str, name: &str) -> RigBuilder {
        self.host_dir_args
            .push((flag.to_string(), name.to_string()));
        self
    }

    /// The same for `cusedev serve`: `.guest_dir_arg("--dev-root", "dev")` serves the nodes
    /// under `<dir>/dev`, a device root of this rig's own. (Top-level nodes are files the
    /// FUSE frontend makes at the device root; in the shared /dev, tests running at once
    /// would make and remove each other's.)
    pub fn guest_dir_arg(mut self, flag: &str, name: &str) -> RigBuilder {
        self.guest_dir_args
            .push((flag.to_string(), name.to_string()));
        self
    }

    /// [`RigBuilder::start`] returns once cusedev serves `device` (relative to /dev, as in
    /// the driver table: `"vmbus/hv_fcopy"`). Repeat for more devices.
    pub fn serves(mut self, device: &str) -> RigBuilder {
        self.devices.push(device.to_string());
        self
    }

    /// Starts the host and the guest and waits for every device asked for. The caller must
    /// already be in a private mount namespace.
    pub fn start(self) -> Rig {
        let dir = scratch_dir(&self.test);
        let bus = dir.join("bus.sock");
        let mut host_args = self.host_args.clone();
        host_args.extend(dir_args(&dir, &self.host_dir_args));
        let host_args: Vec<&str> = host_args.iter().map(String::as_str).collect();
        let host = spawn_host(&dir, &host_args);
        let guest = Supervised::spawn(
            "cusedev",
            Command::new(workspace_binary("cusedev"))
                .arg("serve")
                .arg("--host")
                .arg(format!("unix:{}", bus.display()))
                .arg("--frontend")
                .arg(&self.frontend)
                .args(&self.guest_args)
                .args(dir_args(&dir, &self.guest_dir_args))
                .env("RUST_LOG", "info"),
        );
        for device in &self.devices {
            guest.wait_for_device_from(0, device);
        }
        Rig { dir, host, guest }
    }
}

impl Rig {
    /// A rig for `test` that serves nothing in particular yet: add devices and arguments.
    pub fn builder(test: &str) -> RigBuilder {
        RigBuilder {
            test: test.to_string(),
            frontend: "fuse".to_string(),
            guest_args: Vec::new(),
            host_args: Vec::new(),
            host_dir_args: Vec::new(),
            guest_dir_args: Vec::new(),
            devices: Vec::new(),
        }
    }

    /// The fcopy rig: starts the host and the guest with the given kernel profile and waits
    /// until the fcopy node is served. The caller must already be in a private mount
    /// namespace.
    pub fn start(test: &str, kernel: &str) -> Rig {
        Rig::start_with(test, kernel, &[])
    }

    /// The fcopy rig with more arguments for fakehost.
    pub fn start_with(test: &str, kernel: &str, host_args: &[&str]) -> Rig {
        Rig::builder(test)
            .guest_args(&["--kernel", kernel])
            .host_args(host_args)
            .serves(FCOPY_DEVICE)
            .start()
    }

    /// Like [`Rig::start`] with cusedev's `--frontend` chosen by the test.
    pub fn start_with_frontend(test: &str, kernel: &str, frontend: &str) -> Rig {
        Rig::builder(test)
            .frontend(frontend)
            .guest_args(&["--kernel", kernel])
            .serves(FCOPY_DEVICE)
            .start()
    }

    /// Waits until cusedev serves `device` again, counting from log line `from` (a
    /// [`Supervised::log_mark`] taken before the re-offer).
    pub fn wait_for_device_from(&self, from: usize, device: &str) -> usize {
        self.guest.wait_for_device_from(from, device)
    }

    /// Starts a new host on the same sockets (after the old one died).
    pub fn restart_host(&mut self) {
        self.host = spawn_host(&self.dir, &[]);
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("ctl.sock")
    }

    /// Runs `fakehost <args>` against this rig's host and returns its output.
    pub fn fakehost(&self, args: &[&str]) -> Output {
        let output = self
            .fakehost_spawn(args)
            .wait_with_output()
            .expect("run fakehost CLI");
        eprintln!(
            "[fakehost {}] exit {:?}\n{}{}",
            args.join(" "),
            output.status.code(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// Starts `fakehost <args>` in the background (for copies a test interferes with).
    pub fn fakehost_spawn(&self, args: &[&str]) -> Child {
        crate::spawn_isolated(
            Command::new(workspace_binary("fakehost"))
                .args(args)
                .env("FAKEHOST_CONTROL", self.control_socket())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .expect("start fakehost CLI")
    }

    /// Starts Debian's daemon in the foreground mode its systemd unit uses and waits until
    /// the driver has its registration.
    pub fn start_daemon(&self) -> Supervised {
        assert!(
            Path::new(FCOPY_DAEMON).exists(),
            "{FCOPY_DAEMON} is missing: install Debian's hyperv-daemons (make test does)"
        );
        let mark = self.guest.log_mark();
        let daemon = Supervised::spawn("hv_fcopy_daemon", Command::new(FCOPY_DAEMON).arg("-n"));
        self.guest.wait_for_log_from(mark, "registered");
        daemon
    }
}

/// `(flag, name)` pairs as arguments `flag <dir>/name`, each directory created.
pub fn dir_args(dir: &Path, pairs: &[(String, String)]) -> Vec<String> {
    let mut args = Vec::new();
    for (flag, name) in pairs {
        let path = dir.join(name);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        args.push(flag.clone());
        args.push(path.display().to_string());
    }
    args
}

/// `fakehost serve` on `dir`'s bus and control sockets, not started yet.
pub fn host_command(dir: &Path, host_args: &[&str]) -> Command {
    let mut command = Command::new(workspace_binary("fakehost"));
    command
        .arg("serve")
        .arg("--listen")
        .arg(format!("unix:{}", dir.join("bus.sock").display()))
        .arg("--control")
        .arg(dir.join("ctl.sock"))
        .args(host_args)
        .env("RUST_LOG", "info");
    command
}

/// Starts `command` (a [`host_command`]) and waits until the host listens.
pub fn start_host(command: &mut Command) -> Supervised {
    let host = Supervised::spawn("fakehost", command);
    host.wait_for_log("listening");
    host
}

/// Starts `fakehost serve` on `dir`'s bus and control sockets and waits until it listens.
fn spawn_host(dir: &Path, host_args: &[&str]) -> Supervised {
    start_host(&mut host_command(dir, host_args))
}

/// Mounts a tmpfs of `size` (e.g. "64m") at `dir` inside the caller's mount namespace.
pub fn mount_tmpfs(dir: &Path, size: &str) {
    std::fs::create_dir_all(dir).expect("create tmpfs mount point");
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some(format!("size={size},mode=0755").as_str()),
    )
    .unwrap_or_else(|e| panic!("mount tmpfs at {}: {e}", dir.display()));
}

/// Writes `len` bytes of deterministic pseudo-random content (xorshift64*), so copies of
/// different files never match by accident.
pub fn write_pattern_file(path: &Path, len: u64, seed: u64) {
    use std::io::Write;
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut state = seed | 1;
    let mut left = len;
    while left > 0 {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let word = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        let n = left.min(8) as usize;
        file.write_all(&word[..n]).unwrap();
        left -= n as u64;
    }
    file.flush().unwrap();
}

/// sha256 of a file, by coreutils' sha256sum.
pub fn sha256(path: &Path) -> String {
    let output = crate::spawn_isolated(
        Command::new("sha256sum")
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped()),
    )
    .and_then(|child| child.wait_with_output())
    .expect("run sha256sum");
    assert!(
        output.status.success(),
        "sha256sum {} failed",
        path.display()
    );
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}
