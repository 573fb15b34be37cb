//! The fcopy path through a QEMU guest, shared by the end-to-end test and `make qemu-demo`:
//!
//! ```text
//!  host: fakehost copy ─► fakehost serve ◄─unix─ vhost ◄─vhost-user─ QEMU (TCG)
//!  guest: hv_fcopy_daemon ─► /dev/vmbus/hv_fcopy (CUSE) ─► cusedev serve ─► AF_VSOCK 2:5000
//! ```
//!
//! Readiness is awaited on log lines: on the host through [`Supervised`], in the guest with
//! the `wait-log` tool (inotify), never with sleeps.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::{
    dir_args, scratch_dir, workspace_binary, Supervised, FCOPY_DAEMON, FCOPY_NODE,
};
use crate::qemu::{Guest, GuestConfig, GuestImage};

/// The vsock port the guest's cusedev connects to; the vhost backend hands it to fakehost.
pub const BUS_PORT: u32 = 5000;
/// The guest's CID, set by the vhost backend.
pub const GUEST_CID: u32 = 3;
/// For guest commands that only start or look at something.
pub const SHORT: Duration = Duration::from_secs(60);

/// The host side: fakehost and our vhost backend on a scratch directory. Both are killed when
/// this is dropped.
pub struct VsockHost {
    pub dir: PathBuf,
    pub fakehost: Supervised,
    pub vhost: Supervised,
}

impl VsockHost {
    /// Starts fakehost (bus + control sockets) and `vhost` in front of it, and waits until
    /// both listen.
    pub fn start(name: &str) -> VsockHost {
        VsockHost::start_with(name, &[])
    }

    /// Like [`VsockHost::start`], with more `fakehost serve` arguments that name directories
    /// of the scratch directory (`("--blob-root", "blobs")`; see [`dir_args`]).
    pub fn start_with(name: &str, host_dir_args: &[(&str, &str)]) -> VsockHost {
        let dir = scratch_dir(name);
        let pairs: Vec<(String, String)> = host_dir_args
            .iter()
            .map(|(flag, name)| (flag.to_string(), name.to_string()))
            .collect();
        let host_args = dir_args(&dir, &pairs);
        let bus = dir.join("bus.sock");
        let fakehost = Supervised::spawn(
            "fakehost",
            Command::new(workspace_binary("fakehost"))
                .arg("serve")
                .arg("--listen")
                .arg(format!("unix:{}", bus.display()))
                .arg("--control")
                .arg(dir.join("ctl.sock"))
                .args(&host_args)
                .env("RUST_LOG", "info"),
        );
        fakehost.wait_for_log("listening");
        let vhost = Supervised::spawn(
            "vhost",
            Command::new(workspace_binary("vhost"))
                .arg("--socket")
                .arg(dir.join("vhost.sock"))
                .arg("--guest-cid")
                .arg(GUEST_CID.to_string())
                .arg("--host")
                .arg(format!("unix:{}", bus.display()))
                .arg("--bus-port")
                .arg(BUS_PORT.to_string())
                .env("RUST_LOG", "info"),
        );
        vhost.wait_for_log("listening for the VMM on");
        VsockHost {
            dir,
            fakehost,
            vhost,
        }
    }

    /// The vhost-user socket QEMU connects to.
    pub fn vhost_socket(&self) -> PathBuf {
        self.dir.join("vhost.sock")
    }

    /// Boots a guest attached to this host's vhost backend and waits until the backend has
    /// the VMM. `config.vhost_user_vsock` is set here.
    pub fn boot(&self, image: &GuestImage, config: GuestConfig) -> io::Result<Guest> {
        let guest = Guest::boot(
            image,
            GuestConfig {
                vhost_user_vsock: Some(self.vhost_socket()),
                ..config
            },
        )?;
        self.vhost.wait_for_log("VMM connected");
        Ok(guest)
    }

    /// `fakehost copy SRC DEST_DIR EXTRA...` against this host: (exit code, stdout + stderr).
    pub fn copy(&self, src: &Path, dest_dir: &str, extra: &[&str]) -> (Option<i32>, String) {
        let mut args = vec!["copy".as_ref(), src.as_os_str(), dest_dir.as_ref()];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        self.fakehost(&args)
    }

    /// `fakehost ARGS...` (a control command) against this host: (exit code, stdout + stderr).
    pub fn fakehost<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> (Option<i32>, String) {
        let output = crate::spawn_isolated(
            Command::new(workspace_binary("fakehost"))
                .args(args)
                .env("FAKEHOST_CONTROL", self.dir.join("ctl.sock"))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped()),
        )
        .and_then(|child| child.wait_with_output());
        match output {
            Ok(output) => (
                output.status.code(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ),
            ),
            Err(err) => (None, format!("cannot run fakehost: {err}")),
        }
    }
}

/// Runs `command` in the guest; an error carries its output and the console's last lines.
pub fn guest_ok(
    guest: &mut Guest,
    step: &str,
    command: &str,
    timeout: Duration,
) -> io::Result<String> {
    guest.run_ok(command, timeout).map_err(|err| {
        io::Error::other(format!(
            "{step}: `{command}` failed: {err}\n--- guest console ---\n{}",
            guest.console_tail(40)
        ))
    })
}

/// Starts syslogd (the daemon logs nowhere else) and `cusedev serve --frontend auto` over
/// vsock, and waits until the node is served. Returns cusedev's `frontend:` log line.
pub fn start_cusedev(guest: &mut Guest) -> io::Result<String> {
    start_cusedev_serving(guest, FCOPY_NODE, &[])
}

/// [`start_cusedev`] for any device: waits until cusedev serves `node` (`/dev/...`);
/// `extra` goes to `cusedev serve` (`--profile D=P`).
pub fn start_cusedev_serving(guest: &mut Guest, node: &str, extra: &[&str]) -> io::Result<String> {
    let cusedev = workspace_binary("cusedev");
    let wait_log = workspace_binary("wait-log");
    guest_ok(
        guest,
        "start syslogd",
        "busybox syslogd -n -O /tmp/syslog.txt >/dev/null 2>&1 </dev/null &",
        SHORT,
    )?;
    guest_ok(
        guest,
        "start cusedev",
        &format!(
            "RUST_LOG=info setsid {} serve --host vsock:2:{BUS_PORT} --frontend auto {} \
             >/tmp/cusedev.log 2>&1 </dev/null &",
            cusedev.display(),
            extra.join(" ")
        ),
        SHORT,
    )?;
    guest_ok(
        guest,
        "cusedev serves the node",
        &format!(
            "{} /tmp/cusedev.log 'serving {node} (' --timeout 60 >/dev/null && \
             grep -m1 'frontend:' /tmp/cusedev.log",
            wait_log.display()
        ),
        SHORT,
    )
}

/// Starts Debian's unmodified daemon in the guest and waits until the driver has its
/// registration (counting only log lines written after the start, so an earlier handshake,
/// such as the errno probe's, does not count).
pub fn start_daemon(guest: &mut Guest) -> io::Result<()> {
    let mark = cusedev_log_mark(guest)?;
    guest_ok(
        guest,
        "start the daemon",
        &format!("setsid {FCOPY_DAEMON} -n >/tmp/daemon.log 2>&1 </dev/null &"),
        SHORT,
    )?;
    wait_for_cusedev_log(guest, mark, "daemon registered with version 1").map(drop)
}

/// How many lines cusedev's log has now: a mark for [`wait_for_cusedev_log`].
pub fn cusedev_log_mark(guest: &mut Guest) -> io::Result<usize> {
    let count = guest_ok(
        guest,
        "cusedev log length",
        "wc -l < /tmp/cusedev.log",
        SHORT,
    )?;
    count
        .trim()
        .parse()
        .map_err(|_| io::Error::other(format!("wc printed {count:?}")))
}

/// Waits until a line of cusedev's log after line `mark` contains `needle`; returns it.
pub fn wait_for_cusedev_log(guest: &mut Guest, mark: usize, needle: &str) -> io::Result<String> {
    let wait_log = workspace_binary("wait-log");
    guest_ok(
        guest,
        &format!("cusedev logs {needle:?}"),
        &format!(
            "{} /tmp/cusedev.log '{needle}' --from-line {mark} --timeout 60",
            wait_log.display()
        ),
        SHORT,
    )
}

/// The sha256 of a guest file, computed in the guest.
pub fn guest_sha256(guest: &mut Guest, path: &str, timeout: Duration) -> io::Result<String> {
    let output = guest_ok(
        guest,
        "sha256 in the guest",
        &format!("sha256sum {path}"),
        timeout,
    )?;
    output
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| io::Error::other(format!("sha256sum printed nothing for {path}")))
}
