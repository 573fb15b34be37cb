//! A QEMU guest running Debian's 6.1 kernel, for tests that need a real guest kernel: CUSE
//! (`/dev/cuse`), virtio-vsock over vhost-user, the unmodified Hyper-V daemons.
//!
//! The guest's root is the host's `/`, read-only over 9p under an overlay whose upper layer is
//! a tmpfs in guest memory: host binaries (the daemons, this workspace's builds) run in the guest
//! as they are, and nothing the guest writes reaches the host. The image (an uncompressed
//! `vmlinux` and a busybox initramfs) is built and cached by `tests/scripts/guest/build-guest.sh`;
//! [`GuestImage::ensure`] runs it once per test process.
//!
//! ```no_run
//! # use cusedev_tests::qemu::{Guest, GuestConfig, GuestImage};
//! # use std::time::Duration;
//! # fn main() -> std::io::Result<()> {
//! let image = GuestImage::ensure()?;
//! let mut guest = Guest::boot(&image, GuestConfig::named("cuse-smoke"))?;
//! let kernel = guest.run_ok("uname -r", Duration::from_secs(10))?;
//! assert_eq!(kernel.trim(), image.kver);
//! guest.poweroff()?;
//! # Ok(()) }
//! ```
//!
//! # The agent protocol
//!
//! The kernel console is ttyS0 (QEMU writes it to `console.log`); the guest agent
//! (`tests/scripts/guest/agent.sh`) talks on ttyS1, which QEMU connects to its stdin and stdout,
//! so kernel messages never mix into the command channel. One message per `\n`-terminated
//! line; the port is raw and does not echo.
//!
//! | direction     | line                              | meaning                                   |
//! |---------------|-----------------------------------|-------------------------------------------|
//! | guest → host  | `AGENT READY <uptime s>`          | the agent accepts commands                |
//! | host → guest  | `RUN <id> <command line>`         | run it with `sh -c` in `/`, stdin `/dev/null` |
//! | host → guest  | `RUN64 <id> <base64>`             | the same for a command with newlines      |
//! | guest → host  | `OUT <id> <line>`                 | one line of output, stdout and stderr merged |
//! | guest → host  | `END <id> <status>`               | the command ended; its exit status        |
//! | host → guest  | `POWEROFF`                        | sync, answer `BYE`, power off             |
//! | guest → host  | `ERR <text>`                      | the agent did not understand a request    |
//!
//! Commands run one at a time. `END` comes once every writer of the command's output pipe has
//! gone, so **a command that leaves a process in the background must redirect that process's
//! output** (`daemon >/tmp/daemon.log 2>&1 &`), or the command never ends. Every line carries
//! its command's id, so the late output of a command that timed out is never mistaken for the
//! output of the next one (but the agent is still busy with it: after a timeout, drop the guest).
//!
//! # Logs and limits
//!
//! Each guest logs into `<repo>/build/qemu-logs/<name>-<pid>/`: `console.log` (ttyS0),
//! `qemu.stderr` and `agent.log` (the channel, both directions, with timestamps). Errors quote
//! the last console lines. A watchdog kills QEMU when [`GuestConfig::lifetime`] is over, and
//! dropping a [`Guest`] kills it, so a test never leaves QEMU behind or hangs.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// The emulator; `build-guest.sh` installs it (Debian's `qemu-system-x86`).
pub const QEMU: &str = "qemu-system-x86_64";

/// How long [`Guest::poweroff`] waits for QEMU to exit.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a QEMU that closed its stdout may take to become reapable.
const REAP_GRACE: Duration = Duration::from_secs(10);

/// Bytes a request may take on the wire: well under a pipe's 64 KiB, so sending never blocks
/// even while the agent is still busy with an earlier command.
const MAX_REQUEST: usize = 32 * 1024;

/// Console lines quoted in error messages.
const TAIL_LINES: usize = 40;

/// The workspace root (the parent of this crate's directory).
fn repo_root() -> PathBuf {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests.parent().unwrap_or(tests).to_path_buf()
}

/// The guest kernel and initramfs, as built by `tests/scripts/guest/build-guest.sh`.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// The uncompressed ELF `vmlinux` (QEMU boots it through its PVH entry).
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel release, as the guest's `uname -r` prints it.
    pub kver: String,
}

impl GuestImage {
    /// Builds the image unless cached (into `<repo>/build/guest`) and returns its paths. Runs
    /// the build script once per process; later calls return the first call's result.
    pub fn ensure() -> io::Result<GuestImage> {
        static IMAGE: OnceLock<Result<GuestImage, String>> = OnceLock::new();
        IMAGE
            .get_or_init(|| {
                GuestImage::build(&repo_root().join("build/guest")).map_err(|e| e.to_string())
            })
            .clone()
            .map_err(io::Error::other)
    }

    /// Runs `build-guest.sh OUT_DIR` (installs packages, downloads and unpacks the kernel,
    /// builds the initramfs: whatever is not cached yet) and parses its result lines.
    pub fn build(out_dir: &Path) -> io::Result<GuestImage> {
        let script = repo_root().join("tests/scripts/guest/build-guest.sh");
        let mut child = crate::spawn_isolated(
            Command::new(&script)
                .arg(out_dir)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .map_err(|e| context(e, format!("cannot run {}", script.display())))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout pipe"))?;
        let stdout_reader = thread::spawn(move || io::read_to_string(stdout));
        // Progress, echoed as it comes (a cold build downloads a kernel) and kept for errors.
        let mut progress = Vec::new();
        if let Some(stderr) = child.stderr.take() {
            for line in BufReader::new(stderr).lines() {
                let line = line.unwrap_or_else(|e| format!("(unreadable: {e})"));
                eprintln!("[build-guest] {line}");
                progress.push(line);
            }
        }
        let status = child.wait()?;
        let stdout = stdout_reader
            .join()
            .map_err(|_| io::Error::other("the build-guest.sh stdout reader panicked"))??;
        if !status.success() {
            let start = progress.len().saturating_sub(TAIL_LINES);
            return Err(io::Error::other(format!(
                "{} failed ({status}); its last lines:\n{}",
                script.display(),
                progress[start..].join("\n")
            )));
        }
        let value = |key: &str| {
            stdout
                .lines()
                .rev()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_string)
                .ok_or_else(|| {
                    io::Error::other(format!(
                        "{} printed no {key}= line; its stdout was:\n{stdout}",
                        script.display()
                    ))
                })
        };
        let image = GuestImage {
            kernel: value("KERNEL")?.into(),
            initrd: value("INITRD")?.into(),
            kver: value("KVER")?,
        };
        for file in [&image.kernel, &image.initrd] {
            if !file.is_file() {
                return Err(io::Error::other(format!(
                    "{} reported {}, which does not exist",
                    script.display(),
                    file.display()
                )));
            }
        }
        Ok(image)
    }
}

impl GuestImage {
    /// The unpacked kernel package's module tree (`build-guest.sh` leaves it next to the
    /// vmlinux, with the modules.dep its `depmod -b` made): `<out>/kernel-KVER/lib/modules/KVER`.
    /// The guest sees it over 9p, since its root is this host's `/`.
    pub fn modules_dir(&self) -> PathBuf {
        let out = self.kernel.parent().unwrap_or(Path::new("."));
        out.join(format!("kernel-{}", self.kver))
            .join("lib/modules")
            .join(&self.kver)
    }

    /// The module files that give the guest `names` (e.g. `virtio_blk`, `ext4`), each after
    /// its dependencies (from modules.dep), leaving out what the initramfs already loads. For
    /// a guest command `insmod` of each in order: the guest's own modprobe would look in
    /// `/lib/modules/KVER` of this host, which has no such kernel. Soft dependencies
    /// (`softdep pre: crc32c` of ext4) are not in modules.dep: name them.
    pub fn module_files(&self, names: &[&str]) -> io::Result<Vec<PathBuf>> {
        let dir = self.modules_dir();
        let dep = fs::read_to_string(dir.join("modules.dep"))
            .map_err(|e| context(e, format!("cannot read {}/modules.dep", dir.display())))?;
        let canonical = |file: &str| -> String {
            let base = file.rsplit('/').next().unwrap_or(file);
            base.strip_suffix(".ko").unwrap_or(base).replace('-', "_")
        };
        let mut path_of = std::collections::HashMap::new();
        let mut deps_of = std::collections::HashMap::new();
        for line in dep.lines() {
            let Some((rel, deps)) = line.split_once(':') else {
                continue;
            };
            path_of.insert(canonical(rel), rel.to_string());
            deps_of.insert(
                rel.to_string(),
                deps.split_whitespace()
                    .map(str::to_string)
                    .collect::<Vec<_>>(),
            );
        }
        let out = self.kernel.parent().unwrap_or(Path::new("."));
        let loaded: Vec<String> = fs::read_to_string(out.join("initramfs.modules"))
            .unwrap_or_default()
            .lines()
            .map(canonical)
            .collect();
        fn visit(
            rel: &str,
            deps_of: &std::collections::HashMap<String, Vec<String>>,
            order: &mut Vec<String>,
        ) {
            if order.iter().any(|r| r == rel) {
                return;
            }
            for dep in deps_of.get(rel).into_iter().flatten() {
                visit(dep, deps_of, order);
            }
            order.push(rel.to_string());
        }
        let mut order = Vec::new();
        for name in names {
            let rel = path_of.get(&name.replace('-', "_")).ok_or_else(|| {
                io::Error::other(format!(
                    "module {name} is not in {}/modules.dep (built in?)",
                    dir.display()
                ))
            })?;
            visit(rel, &deps_of, &mut order);
        }
        Ok(order
            .into_iter()
            .filter(|rel| !loaded.contains(&canonical(rel)))
            .map(|rel| dir.join(rel))
            .collect())
    }
}

/// How to start a guest. Build with `GuestConfig::named("my-test")` and struct update syntax.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    /// Names the log directory (`build/qemu-logs/<name>-<pid>/`) and error messages.
    pub name: String,
    pub memory_mib: u32,
    pub cpus: u32,
    /// The unix socket of a vhost-user-vsock backend: adds the shared memfd RAM vhost-user
    /// needs and a `vhost-user-vsock-pci` device. The backend chooses the guest's CID.
    pub vhost_user_vsock: Option<PathBuf>,
    /// From QEMU's start until the agent is ready.
    pub boot_timeout: Duration,
    /// The guest's whole life: after this a watchdog kills QEMU, whatever the test is doing.
    pub lifetime: Duration,
    /// Appended to the kernel command line. The guest's /init reads:
    /// - `cusedev.upper=SIZE`: the tmpfs upper layer (default `768m`, out of `memory_mib`);
    /// - `cusedev.cache=MODE`: the 9p cache mode. The default `none` shows host changes at
    ///   once; `loose` makes the first run of each host binary several times faster under
    ///   TCG (0.2 s instead of 0.7–1.9 s for three first commands, measured) but the guest may
    ///   then see stale copies of host files it read before they changed.
    pub kernel_args: Vec<String>,
    /// Appended to QEMU's command line.
    pub qemu_args: Vec<String>,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            name: "guest".into(),
            memory_mib: 1024,
            cpus: 2,
            vhost_user_vsock: None,
            boot_timeout: Duration::from_secs(120),
            lifetime: Duration::from_secs(600),
            kernel_args: Vec::new(),
            qemu_args: Vec::new(),
        }
    }
}

impl GuestConfig {
    pub fn named(name: &str) -> Self {
        GuestConfig {
            name: name.into(),
            ..GuestConfig::default()
        }
    }
}

/// What a guest command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandOutput {
    /// `sh`'s exit status (128 + n when a signal n killed the command).
    pub status: i32,
    /// stdout and stderr merged, each line ending in `\n`.
    pub output: String,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// A running QEMU guest with its agent ready. Killed when dropped.
pub struct Guest {
    name: String,
    log_dir: PathBuf,
    qemu: Arc<Mutex<Child>>,
    stdin: ChildStdin,
    lines: Receiver<String>,
    /// Set by the reader when QEMU's stdout closed (QEMU exits).
    stdout_closed: Arc<AtomicBool>,
    transcript: Transcript,
    watchdog: Watchdog,
    next_id: u64,
    boot_seconds: f64,
}

impl Guest {
    /// Starts QEMU on `image` and waits (up to `config.boot_timeout`) for the agent.
    pub fn boot(image: &GuestImage, config: GuestConfig) -> io::Result<Guest> {
        let log_dir = create_log_dir(&config.name)?;
        let console = log_dir.join("console.log");
        let stderr = File::create(log_dir.join("qemu.stderr"))
            .map_err(|e| context(e, format!("cannot create {}", log_dir.display())))?;
        let args = qemu_args(image, &config, &console)?;
        fs::write(
            log_dir.join("qemu.cmdline"),
            format!("{QEMU} {}\n", args.join(" ")),
        )?;

        let transcript = Transcript::create(&log_dir.join("agent.log"))?;
        let started = transcript.started;
        let mut command = Command::new(QEMU);
        command
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let (watchdog, qemu) = Watchdog::spawn(command, config.lifetime)?;
        let pipes = {
            let mut child = lock(&qemu);
            (child.stdin.take(), child.stdout.take())
        };
        let (Some(stdin), Some(stdout)) = pipes else {
            watchdog.disarm();
            let _ = lock(&qemu).kill();
            return Err(io::Error::other("QEMU started without stdio pipes"));
        };
        let (sender, lines) = mpsc::channel();
        // From here on, an error drops `guest`, which kills QEMU.
        let mut guest = Guest {
            name: config.name,
            log_dir,
            qemu,
            stdin,
            lines,
            stdout_closed: Arc::new(AtomicBool::new(false)),
            transcript,
            watchdog,
            next_id: 1,
            boot_seconds: 0.0,
        };
        spawn_reader(
            stdout,
            sender,
            guest.stdout_closed.clone(),
            guest.transcript.clone(),
        )?;
        let deadline = started + config.boot_timeout;
        loop {
            match guest
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) if line.starts_with("AGENT READY") => break,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(guest.failure(
                        io::ErrorKind::TimedOut,
                        &format!(
                            "the agent was not ready within {:?} of QEMU's start",
                            config.boot_timeout
                        ),
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(guest.failure(
                        io::ErrorKind::UnexpectedEof,
                        "QEMU exited before the agent was ready",
                    ))
                }
            }
        }
        guest.boot_seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "guest {}: agent ready {:.2} s after QEMU's start (logs: {})",
            guest.name,
            guest.boot_seconds,
            guest.log_dir.display()
        );
        Ok(guest)
    }

    /// Runs `command` with `sh -c` in the guest (in `/`, stdin `/dev/null`) and returns its exit
    /// status and merged output. A non-zero status is not an error here; see [`Guest::run_ok`].
    /// Errors: the command did not end within `timeout` (the guest is then still busy with
    /// it), QEMU died, or the command is too long (32 KiB).
    pub fn run(&mut self, command: &str, timeout: Duration) -> io::Result<CommandOutput> {
        let id = self.next_id;
        self.next_id += 1;
        let request = if command.contains(['\n', '\r']) {
            format!("RUN64 {id} {}", base64(command.as_bytes()))
        } else {
            format!("RUN {id} {command}")
        };
        if request.len() > MAX_REQUEST {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "guest {}: a command of {} bytes is over the agent's limit ({MAX_REQUEST} \
                     on the wire): put long scripts in a file the guest can read",
                    self.name,
                    command.len()
                ),
            ));
        }
        self.send(&request)?;

        let out_prefix = format!("OUT {id} ");
        let bare_out = format!("OUT {id}");
        let end_prefix = format!("END {id} ");
        let deadline = Instant::now() + timeout;
        let mut output = String::new();
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    if let Some(text) = line.strip_prefix(&out_prefix) {
                        output.push_str(text);
                        output.push('\n');
                    } else if line == bare_out {
                        output.push('\n');
                    } else if let Some(status) = line.strip_prefix(&end_prefix) {
                        let status = status.trim().parse().map_err(|_| {
                            io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("guest {}: the agent sent {line:?}", self.name),
                            )
                        })?;
                        return Ok(CommandOutput { status, output });
                    } else if line.starts_with("ERR ") {
                        return Err(self.failure(
                            io::ErrorKind::InvalidData,
                            &format!("the agent rejected `{command}`: {line}"),
                        ));
                    }
                    // Anything else: late lines of a command that timed out.
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.failure(
                        io::ErrorKind::TimedOut,
                        &format!(
                            "`{command}` did not end within {timeout:?}; its output so far:\n\
                             {output}"
                        ),
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.failure(
                        io::ErrorKind::UnexpectedEof,
                        &format!("QEMU exited while running `{command}`; its output:\n{output}"),
                    ))
                }
            }
        }
    }

    /// Like [`Guest::run`], but a non-zero exit status is an error quoting the output.
    pub fn run_ok(&mut self, command: &str, timeout: Duration) -> io::Result<String> {
        let result = self.run(command, timeout)?;
        if result.success() {
            Ok(result.output)
        } else {
            Err(io::Error::other(format!(
                "guest {}: `{command}` exited with status {}; its output:\n{}",
                self.name, result.status, result.output
            )))
        }
    }

    /// The last `lines` lines of the kernel console (ttyS0), for failure messages.
    pub fn console_tail(&self, lines: usize) -> String {
        tail(&self.log_dir.join("console.log"), lines)
    }

    /// Asks the agent to power the guest off and waits (up to a minute) for QEMU to exit.
    pub fn poweroff(mut self) -> io::Result<()> {
        self.send("POWEROFF")?;
        let deadline = Instant::now() + POWEROFF_TIMEOUT;
        // QEMU's exit closes its stdout, which ends the reader and disconnects the channel.
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.failure(
                        io::ErrorKind::TimedOut,
                        &format!("QEMU did not exit within {POWEROFF_TIMEOUT:?} of POWEROFF"),
                    ))
                }
            }
        }
        match self.exit_status() {
            Some(status) if status.success() => Ok(()),
            Some(status) => Err(self.failure(
                io::ErrorKind::Other,
                &format!("QEMU exited with {status} after POWEROFF"),
            )),
            None => Err(self.failure(
                io::ErrorKind::TimedOut,
                "QEMU closed the agent's channel after POWEROFF but did not exit",
            )),
        }
    }

    /// Seconds from QEMU's start until the agent was ready.
    pub fn boot_seconds(&self) -> f64 {
        self.boot_seconds
    }

    /// This guest's log directory (console.log, qemu.stderr, agent.log).
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// QEMU's exit status once it has exited; waits a little when the agent's channel is
    /// closed, as QEMU closes its stdout while exiting, just before it can be reaped.
    fn exit_status(&self) -> Option<ExitStatus> {
        let deadline = Instant::now() + REAP_GRACE;
        loop {
            // The lock is never held while blocking: the watchdog must always be able to kill.
            if let Ok(Some(status)) = lock(&self.qemu).try_wait() {
                return Some(status);
            }
            if !self.stdout_closed.load(Ordering::Acquire) || Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn send(&mut self, request: &str) -> io::Result<()> {
        self.transcript.record('>', request);
        let sent = self
            .stdin
            .write_all(format!("{request}\n").as_bytes())
            .and_then(|()| self.stdin.flush());
        sent.map_err(|e| {
            self.failure(
                e.kind(),
                &format!("cannot send to the agent ({e}): has QEMU exited?"),
            )
        })
    }

    /// An error saying what failed, with what QEMU and the guest said about it.
    fn failure(&self, kind: io::ErrorKind, what: &str) -> io::Error {
        let mut message = format!("guest {}: {what}", self.name);
        if self.watchdog.fired() {
            message.push_str("\n(the watchdog killed QEMU: GuestConfig::lifetime is over)");
        }
        if let Some(status) = self.exit_status() {
            let _ = write!(message, "\nQEMU exited: {status}");
        }
        let stderr = tail(&self.log_dir.join("qemu.stderr"), TAIL_LINES);
        if !stderr.trim().is_empty() {
            let _ = write!(message, "\n--- qemu stderr ---\n{stderr}");
        }
        let _ = write!(
            message,
            "\n--- last console lines ({}) ---\n{}",
            self.log_dir.join("console.log").display(),
            self.console_tail(TAIL_LINES)
        );
        io::Error::new(kind, message)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.watchdog.disarm();
        let mut qemu = lock(&self.qemu);
        // Ok for a child already reaped (after poweroff): std then sends no signal.
        let _ = qemu.kill();
        let _ = qemu.wait();
    }
}

/// The QEMU command line for one guest.
fn qemu_args(image: &GuestImage, config: &GuestConfig, console: &Path) -> io::Result<Vec<String>> {
    let mut append = String::from("console=ttyS0 panic=-1 quiet loglevel=4");
    for arg in &config.kernel_args {
        append.push(' ');
        append.push_str(arg);
    }
    let memory = format!("{}M", config.memory_mib);
    #[rustfmt::skip]
    let mut args: Vec<String> = [
        "-M", "q35", "-accel", "tcg", "-cpu", "qemu64", "-m", &memory,
        "-smp", &config.cpus.to_string(),
        "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none", "-no-reboot",
        "-kernel", utf8(&image.kernel)?, "-initrd", utf8(&image.initrd)?, "-append", &append,
        // The host's root for the guest's overlay; remap keeps inode numbers of different host
        // filesystems (/, /work, ...) from colliding.
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        // ttyS0: kernel console → file; ttyS1: the agent ↔ our stdin/stdout.
        "-serial", &format!("file:{}", utf8(console)?), "-serial", "stdio",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(socket) = &config.vhost_user_vsock {
        // vhost-user maps guest RAM in the backend: RAM must be a shareable memfd.
        args.extend([
            "-object".to_string(),
            format!("memory-backend-memfd,id=mem,size={memory},share=on"),
            "-numa".into(),
            "node,memdev=mem".into(),
            "-chardev".into(),
            format!("socket,id=vhost-vsock,path={}", qemu_escape(utf8(socket)?)),
            "-device".into(),
            "vhost-user-vsock-pci,chardev=vhost-vsock".into(),
        ]);
    }
    args.extend(config.qemu_args.iter().cloned());
    Ok(args)
}

fn utf8(path: &Path) -> io::Result<&str> {
    path.to_str().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not UTF-8: QEMU's options cannot carry it",
                path.display()
            ),
        )
    })
}

/// A value inside a QEMU `key=value,...` option: commas are doubled.
fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// `<repo>/build/qemu-logs/<name>-<pid>[-n]/`, new for every guest of this process.
fn create_log_dir(name: &str) -> io::Result<PathBuf> {
    let parent = repo_root().join("build/qemu-logs");
    fs::create_dir_all(&parent)
        .map_err(|e| context(e, format!("cannot create {}", parent.display())))?;
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let base = format!("{safe}-{}", std::process::id());
    // A bound, so a directory full of leftovers is an error rather than a long loop.
    for n in 1..=1000 {
        let dir = match n {
            1 => parent.join(&base),
            n => parent.join(format!("{base}-{n}")),
        };
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(context(e, format!("cannot create {}", dir.display()))),
        }
    }
    Err(io::Error::other(format!(
        "{}: 1000 log directories named {base}[-n] already exist; remove old ones",
        parent.display()
    )))
}

/// Reads the agent's lines (QEMU's stdout) into `sender` until QEMU exits.
fn spawn_reader(
    stdout: ChildStdout,
    sender: Sender<String>,
    closed: Arc<AtomicBool>,
    transcript: Transcript,
) -> io::Result<()> {
    thread::Builder::new()
        .name("qemu-agent-reader".into())
        .spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match reader.read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if raw.last() == Some(&b'\n') {
                    raw.pop();
                }
                let line = String::from_utf8_lossy(&raw).into_owned();
                transcript.record('<', &line);
                if sender.send(line).is_err() {
                    break;
                }
            }
            closed.store(true, Ordering::Release);
        })
        .map(drop)
}

/// `agent.log`: both directions of the channel, with seconds since QEMU's start.
#[derive(Clone)]
struct Transcript {
    file: Arc<Mutex<File>>,
    started: Instant,
}

impl Transcript {
    /// Timestamps count from now: create it right before starting QEMU.
    fn create(path: &Path) -> io::Result<Transcript> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| context(e, format!("cannot create {}", path.display())))?;
        Ok(Transcript {
            file: Arc::new(Mutex::new(file)),
            started: Instant::now(),
        })
    }

    fn record(&self, direction: char, line: &str) {
        let seconds = self.started.elapsed().as_secs_f64();
        // A log that cannot be written must not fail the test; the channel still works.
        let _ = writeln!(lock(&self.file), "[{seconds:8.3}] {direction} {line}");
    }
}

/// Kills QEMU when the guest's lifetime is over, unless disarmed first.
struct Watchdog {
    state: Arc<(Mutex<WatchState>, Condvar)>,
}

#[derive(Default)]
struct WatchState {
    disarmed: bool,
    fired: bool,
}

impl Watchdog {
    /// Starts `command` (QEMU) from a thread of its own that then watches it. The child gets
    /// `PR_SET_PDEATHSIG = SIGKILL`, which fires when the thread that forked it ends: the
    /// thread ends when the guest is dropped or its lifetime is over, and with the test
    /// process, so even a test killed from outside leaves no QEMU behind. (Spawning from the
    /// test's own thread would instead kill a guest shared between tests when the first ends.)
    fn spawn(
        mut command: Command,
        lifetime: Duration,
    ) -> io::Result<(Watchdog, Arc<Mutex<Child>>)> {
        let parent = std::process::id();
        // SAFETY: between fork and exec only async-signal-safe calls (prctl, getppid).
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The test process died before the prctl: do not outlive it.
                if libc::getppid() as u32 != parent {
                    return Err(io::Error::other("the test process is gone"));
                }
                Ok(())
            });
        }
        let state = Arc::new((Mutex::new(WatchState::default()), Condvar::new()));
        let shared = state.clone();
        let (started, spawned) = mpsc::channel();
        let watch = move || {
            let child = crate::spawn_isolated(&mut command);
            let qemu = match child {
                Ok(child) => Arc::new(Mutex::new(child)),
                Err(e) => {
                    let _ = started.send(Err(e));
                    return;
                }
            };
            let deadline = Instant::now() + lifetime;
            let (mutex, condvar) = &*shared;
            let mut state = lock(mutex);
            if started.send(Ok(qemu.clone())).is_err() {
                let _ = lock(&qemu).kill();
                return;
            }
            while !state.disarmed {
                let now = Instant::now();
                if now >= deadline {
                    state.fired = true;
                    let _ = lock(&qemu).kill();
                    return;
                }
                state = condvar
                    .wait_timeout(state, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        };
        thread::Builder::new()
            .name("qemu-watchdog".into())
            .spawn(watch)
            .map_err(|e| context(e, "cannot start the QEMU watchdog thread".into()))?;
        let qemu = spawned
            .recv()
            .map_err(|_| io::Error::other("the QEMU watchdog thread died"))?
            .map_err(|e| {
                context(
                    e,
                    format!("cannot start {QEMU} (tests/scripts/guest/build-guest.sh installs it)"),
                )
            })?;
        Ok((Watchdog { state }, qemu))
    }

    fn disarm(&self) {
        let (mutex, condvar) = &*self.state;
        lock(mutex).disarmed = true;
        condvar.notify_all();
    }

    fn fired(&self) -> bool {
        lock(&self.state.0).fired
    }
}

/// Locks, tolerating a thread that panicked while holding the lock.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn context(error: io::Error, what: String) -> io::Error {
    io::Error::new(error.kind(), format!("{what}: {error}"))
}

/// The last `lines` lines of a text file ("" when it cannot be read).
fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Standard base64 with padding (what coreutils' `base64 -d` reads).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let bytes = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let group = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]);
        for i in 0..4 {
            if i <= chunk.len() {
                encoded.push(ALPHABET[(group >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                encoded.push('=');
            }
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
        }
    }

    #[test]
    fn qemu_options_double_commas() {
        assert_eq!(qemu_escape("/a,b/c"), "/a,,b/c");
    }
}
