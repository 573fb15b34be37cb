//! Running one check program over each frontend, for tests that must give the same results
//! everywhere (tests/tests/preload.rs): today's FUSE way (cusedev serve --frontend fuse, as
//! root, in the test thread's private mount namespace) and the preload frontend (`cusedev run
//! -- PROGRAM`, as `nobody`, with no /dev/fuse and nothing mounted: docs/preload.md).
//!
//! [`Frontend`] lists the frontends; [`Served::start`] brings up fakehost and, for FUSE, the
//! serving cusedev; [`Served::run`] runs a program against the served node and returns what it
//! printed, with the node's path written as `NODE` so the outputs of two frontends compare
//! line by line ([`assert_same_lines`]).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::harness::{
    dir_args, host_command, scratch_dir, served_line, start_host, workspace_binary, Rig, Supervised,
};
use crate::lguest_launcher::run_command;
use crate::xs_client::Run;

/// `nobody`'s uid and gid on Debian (nogroup).
pub const NOBODY: u32 = 65534;

/// What `cusedev run` logs when the preload frontend serves.
pub const PRELOAD_FRONTEND_LINE: &str = "frontend: preload";

/// How long one program run may take before it is killed.
pub const RUN_LIMIT: Duration = Duration::from_secs(120);

/// The frontends a shared test list runs over. A later frontend is one more entry here, a
/// [`Served::start`] arm and a [`Served::command`] arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frontend {
    /// cusedev serve --frontend fuse, as root, the node under the rig's own device root.
    Fuse,
    /// cusedev run --frontend preload -- PROGRAM, everything as nobody, the node at its usual
    /// path in /dev (seen by PROGRAM alone).
    Preload,
}

/// Every frontend, the reference first: each shared list compares the others with it.
pub const FRONTENDS: [Frontend; 2] = [Frontend::Fuse, Frontend::Preload];

impl Frontend {
    pub fn name(self) -> &'static str {
        match self {
            Frontend::Fuse => "fuse",
            Frontend::Preload => "preload",
        }
    }
}

/// Makes `command` run as nobody (no supplementary groups), after everything else its
/// pre_exec hooks do.
pub fn as_nobody(command: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the forked child before exec and makes only the
    // async-signal-safe setgroups, setgid and setuid system calls.
    unsafe {
        command.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// A scratch directory nobody owns (mode 0755, so root's checks can read it too).
pub fn nobody_scratch_dir(test: &str) -> PathBuf {
    let dir = scratch_dir(test);
    chown_nobody(&dir);
    dir
}

/// Creates `dir` (and parents) owned by nobody, mode 0755.
pub fn nobody_dir(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    chown_nobody(dir);
}

fn chown_nobody(path: &Path) {
    std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY))
        .unwrap_or_else(|e| panic!("chown nobody {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Runs `command` to its end, its output captured.
pub fn output(command: &mut Command, label: &str) -> Output {
    let output = crate::spawn_isolated(
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .and_then(|child| child.wait_with_output())
    .unwrap_or_else(|e| panic!("cannot run {label}: {e}"));
    eprintln!(
        "[{label}] exit {:?}\n{}{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// What `preload-check open-errno PATH` says as nobody: `open PATH: ok` or `... errno E...`.
pub fn nobody_opens(path: &str) -> String {
    let out = output(
        as_nobody(Command::new(workspace_binary("preload-check")).args(["open-errno", path])),
        "preload-check open-errno (nobody)",
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "preload-check open-errno failed"
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The machine the preload tests claim to run on: nobody cannot open /dev/fuse.
pub fn assert_nobody_has_no_fuse() {
    assert_eq!(
        nobody_opens("/dev/fuse"),
        "open /dev/fuse: errno EACCES",
        "the preload tests must run where the unprivileged user has no /dev/fuse"
    );
}

/// fakehost, plus for FUSE the serving cusedev: one device, ready for program runs.
pub struct Served {
    pub frontend: Frontend,
    pub dir: PathBuf,
    /// The device relative to /dev, as the driver table names it (`"lguest"`).
    pub device: String,
    /// Its node as the programs open it.
    pub node: PathBuf,
    pub host: Supervised,
    /// FUSE: the serving cusedev. Preload: None (each run starts its own `cusedev run`).
    pub guest: Option<Supervised>,
    /// More `cusedev` arguments, kept for each `cusedev run`.
    guest_args: Vec<String>,
    runs: AtomicUsize,
}

impl Served {
    /// Starts the pieces of `frontend` serving `device`, with `host_args` for `fakehost
    /// serve` and `guest_args` for `cusedev serve` / `cusedev run`; `host_dir_args` name
    /// directories of the scratch directory (see [`crate::harness::RigBuilder::host_dir_arg`]).
    /// FUSE: the calling thread must be in a private mount namespace.
    pub fn start(
        frontend: Frontend,
        test: &str,
        device: &str,
        host_args: &[&str],
        host_dir_args: &[(&str, &str)],
        guest_args: &[&str],
    ) -> Served {
        let test = format!("{test}-{}", frontend.name());
        match frontend {
            Frontend::Fuse => {
                let mut builder = Rig::builder(&test)
                    .frontend("fuse")
                    .host_args(host_args)
                    .guest_args(guest_args)
                    .guest_dir_arg("--dev-root", "dev")
                    .serves(device);
                for (flag, name) in host_dir_args {
                    builder = builder.host_dir_arg(flag, name);
                }
                let rig = builder.start();
                let node = rig.dir.join("dev").join(device);
                Served {
                    frontend,
                    dir: rig.dir,
                    device: device.to_string(),
                    node,
                    host: rig.host,
                    guest: Some(rig.guest),
                    guest_args: Vec::new(),
                    runs: AtomicUsize::new(0),
                }
            }
            Frontend::Preload => {
                assert_nobody_has_no_fuse();
                let dir = nobody_scratch_dir(&test);
                let pairs: Vec<(String, String)> = host_dir_args
                    .iter()
                    .map(|(f, n)| (f.to_string(), n.to_string()))
                    .collect();
                let dir_flags = dir_args(&dir, &pairs);
                for (_, name) in &pairs {
                    chown_nobody(&dir.join(name));
                }
                let host = start_host(as_nobody(host_command(&dir, host_args).args(dir_flags)));
                Served {
                    frontend,
                    node: Path::new("/dev").join(device),
                    dir,
                    device: device.to_string(),
                    host,
                    guest: None,
                    guest_args: guest_args.iter().map(|a| a.to_string()).collect(),
                    runs: AtomicUsize::new(0),
                }
            }
        }
    }

    /// The bus socket fakehost listens on.
    pub fn bus(&self) -> String {
        format!("unix:{}", self.dir.join("bus.sock").display())
    }

    /// A command that runs `program ARGS` against the served node, as this frontend's user:
    /// FUSE, the program itself as root; preload, `cusedev run ... -- program ARGS` as nobody,
    /// with a run directory of its own in the scratch directory.
    pub fn command(&self, program: &Path, args: &[&str]) -> Command {
        match self.frontend {
            Frontend::Fuse => {
                let mut command = Command::new(program);
                command.args(args);
                command
            }
            Frontend::Preload => {
                let n = self.runs.fetch_add(1, Ordering::SeqCst);
                let mut command = Command::new(workspace_binary("cusedev"));
                command
                    .arg("run")
                    .arg("--host")
                    .arg(self.bus())
                    .arg("--preload-dir")
                    .arg(self.dir.join(format!("run-{n}")))
                    .args(&self.guest_args)
                    .arg("--")
                    .arg(program)
                    .args(args)
                    .env("RUST_LOG", "info");
                as_nobody(&mut command);
                command
            }
        }
    }

    /// Runs `program ARGS` to its end (killed after [`RUN_LIMIT`]); what it printed has the
    /// node's path replaced by `NODE`. Preload: also checks that cusedev said it served the
    /// node with the preload frontend (cusedev's log is in the run's stderr).
    pub fn run(&self, program: &Path, args: &[&str]) -> Run {
        let label = format!(
            "{} {} {}",
            self.frontend.name(),
            program.file_name().unwrap_or_default().to_string_lossy(),
            args.join(" ")
        );
        let mut command = self.command(program, args);
        command
            .env_remove(crate::lguest_launcher::RESTARTS_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let run = run_command(&mut command, &label, Some(RUN_LIMIT));
        if self.frontend == Frontend::Preload {
            for needle in [PRELOAD_FRONTEND_LINE.to_string(), served_line(&self.device)] {
                assert!(
                    run.stderr.contains(&needle),
                    "{label}: cusedev run never logged {needle:?}:\n{}",
                    run.text()
                );
            }
        }
        let node = self.node.display().to_string();
        Run {
            code: run.code,
            stdout: run.stdout.replace(&node, "NODE"),
            stderr: run.stderr.replace(&node, "NODE"),
            seconds: run.seconds,
        }
    }

    /// [`Served::run`] with the node passed as `--dev NODE` first (the C programs' way).
    pub fn run_with_dev(&self, program: &Path, args: &[&str]) -> Run {
        let node = self.node.display().to_string();
        let mut all = vec!["--dev", node.as_str()];
        all.extend_from_slice(args);
        self.run(program, &all)
    }

    /// `fakehost ARGS` against this host (as nobody for preload, whose host nobody owns);
    /// must succeed; returns its stdout.
    pub fn fakehost(&self, args: &[&str]) -> String {
        let mut command = Command::new(workspace_binary("fakehost"));
        command
            .args(args)
            .env("FAKEHOST_CONTROL", self.dir.join("ctl.sock"));
        if self.frontend == Frontend::Preload {
            as_nobody(&mut command);
        }
        let out = output(&mut command, &format!("fakehost {}", args.join(" ")));
        assert!(
            out.status.success(),
            "fakehost {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The lines of `text` that `keep` selects, mapped by it.
pub fn select_lines(text: &str, keep: impl Fn(&str) -> Option<String>) -> Vec<String> {
    text.lines().filter_map(keep).collect()
}

/// Whether `other`'s lines equal `reference`'s; if not, a message with a diff (`-` only in
/// the reference, `+` only in the other, by longest common subsequence).
pub fn same_lines(
    what: &str,
    reference: (Frontend, &[String]),
    other: (Frontend, &[String]),
) -> Result<(), String> {
    let (a, b) = (reference.1, other.1);
    if a == b {
        return Ok(());
    }
    Err(format!(
        "{what}: {} and {} differ (- {} only, + {} only):\n{}",
        reference.0.name(),
        other.0.name(),
        reference.0.name(),
        other.0.name(),
        line_diff(a, b).join("\n")
    ))
}

/// [`same_lines`], panicking with the diff.
pub fn assert_same_lines(
    what: &str,
    reference: (Frontend, &[String]),
    other: (Frontend, &[String]),
) {
    if let Err(diff) = same_lines(what, reference, other) {
        panic!("{diff}");
    }
}

/// Every frontend's lines against the first's (the reference): the diffs of those that
/// differ.
pub fn differences(what: &str, results: &[(Frontend, Vec<String>)]) -> Vec<String> {
    let Some((reference, rest)) = results.split_first() else {
        return Vec::new();
    };
    rest.iter()
        .filter_map(|other| {
            same_lines(what, (reference.0, &reference.1), (other.0, &other.1)).err()
        })
        .collect()
}

/// The lines of `a` and `b`, each prefixed `  ` (in both), `- ` (only in a) or `+ ` (only in
/// b), in order.
pub fn line_diff(a: &[String], b: &[String]) -> Vec<String> {
    // lcs[i][j]: the longest common subsequence of a[i..] and b[j..].
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push(format!("  {}", a[i]));
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push(format!("+ {}", b[j]));
            j += 1;
        } else {
            out.push(format!("- {}", a[i]));
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::line_diff;

    fn lines(s: &[&str]) -> Vec<String> {
        s.iter().map(|l| l.to_string()).collect()
    }

    #[test]
    fn the_diff_marks_a_changed_line_and_keeps_the_rest() {
        let diff = line_diff(&lines(&["a", "b", "c"]), &lines(&["a", "x", "c", "d"]));
        assert_eq!(diff, lines(&["  a", "+ x", "- b", "  c", "+ d"]));
    }
}
