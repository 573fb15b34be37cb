//! The C client `tests/c/xs-client.c` (built 64- and 32-bit by `tests/build.rs`) and what the
//! xs_fastpath tests need around it: running it, reading its case lines, and watching a
//! process that sits in the ioctl.
//!
//! The client is the "any program issuing the ioctl" of the device: its own declaration of
//! the 64-byte argument and of 0xC040520A, fakehost's XStore request format in the buffers
//! (docs/xs-protocol.md). Its `errno` subcommand is the case list of
//! ../shared/spec/xs_fastpath.md §3.2; the tests here assert on its lines.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The node the posted patch registers (misc device, dynamic minor).
pub const XS_NODE: &str = "/dev/azure_xs_fastpath";

/// The device's name as cusedev's driver table has it (relative to /dev).
pub const XS_DEVICE: &str = "azure_xs_fastpath";

/// `--profile` for the reviewed behaviour (spec §4, the reviewer's points).
pub const REVIEWED: &str = "xs_fastpath=reviewed";

/// The largest data buffer that fits the 8192-page cap with a one-page request and response:
/// 32 MiB − 8 KiB.
pub const BIG_FIT: u64 = (8192 - 2) * 4096;

/// x86_64's ioctl(2) number, for /proc/PID/syscall.
pub const SYS_IOCTL: i64 = libc::SYS_ioctl;

/// Which build of the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bits {
    B64,
    B32,
}

/// The client binary; fails with the compiler's output when build.rs could not build it.
pub fn xs_client(bits: Bits) -> PathBuf {
    let name = match bits {
        Bits::B64 => "xs-client",
        Bits::B32 => "xs-client32",
    };
    let dir = PathBuf::from(env!("XS_CLIENT_DIR"));
    let binary = dir.join(name);
    if !binary.exists() {
        let log = std::fs::read_to_string(dir.join(format!("{name}.build.log")))
            .unwrap_or_else(|_| "(no build log)".into());
        panic!(
            "{} was not built (tests/build.rs compiles tests/c/xs-client.c; \
             tests/scripts/install-deps.sh installs gcc and gcc-multilib):\n{log}",
            binary.display()
        );
    }
    binary
}

/// `xs-client ARGS`, with stdout and stderr captured.
fn command(bits: Bits, args: &[&str]) -> Command {
    let mut command = Command::new(xs_client(bits));
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// What one run printed: its exit code and both streams.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub seconds: f64,
}

impl Run {
    fn from(output: Output, seconds: f64) -> Run {
        Run {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            seconds,
        }
    }

    /// Both streams, for assertion messages.
    pub fn text(&self) -> String {
        format!(
            "exit {:?} after {:.2} s\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.seconds, self.stdout, self.stderr
        )
    }

    /// Panics with everything it printed unless it exited 0.
    pub fn assert_success(&self, what: &str) -> &Run {
        assert_eq!(self.code, Some(0), "{what}:\n{}", self.text());
        self
    }
}

/// Runs the client to the end.
pub fn run(bits: Bits, args: &[&str]) -> Run {
    let started = Instant::now();
    let output = crate::spawn_isolated(&mut command(bits, args))
        .and_then(|child| child.wait_with_output())
        .unwrap_or_else(|e| panic!("cannot run xs-client {args:?}: {e}"));
    let run = Run::from(output, started.elapsed().as_secs_f64());
    eprintln!("[xs-client {}] {}", args.join(" "), run.text());
    run
}

/// The `ok|FAIL <case>: ...` lines of an `errno` run, checked: every line ok, at least
/// `min_cases` of them, the closing count line saying 0 failed, and each of `must_have`
/// among the passed cases (so a case list that lost a case fails too).
pub fn assert_all_cases_pass(run: &Run, min_cases: usize, must_have: &[&str]) {
    let failed: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("FAIL "))
        .collect();
    let passed: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("ok "))
        .filter_map(|l| l.split(':').next())
        .collect();
    assert!(
        failed.is_empty(),
        "{} case(s) failed:\n{}\n\n{}",
        failed.len(),
        failed.join("\n"),
        run.text()
    );
    assert!(
        passed.len() >= min_cases,
        "only {} cases ran (want at least {min_cases}):\n{}",
        passed.len(),
        run.text()
    );
    for case in must_have {
        assert!(
            passed.contains(case),
            "case {case} missing:\n{}",
            run.text()
        );
    }
    assert!(
        run.stdout.contains(" cases, 0 failed\n"),
        "no closing count line:\n{}",
        run.text()
    );
    assert_eq!(run.code, Some(0), "{}", run.text());
}

/// A client running `hold` (one request the host delays or drops), whose first line says its
/// pid. Killed when dropped.
pub struct Holder {
    child: Child,
    stdout: BufReader<ChildStdout>,
    pub pid: i32,
}

impl Holder {
    /// Starts `xs-client ARGS` (ending in `hold ...`) and waits for its "calling" line.
    pub fn start(args: &[&str]) -> Holder {
        let mut child = crate::spawn_isolated(&mut command(Bits::B64, args))
            .unwrap_or_else(|e| panic!("cannot start xs-client hold: {e}"));
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read hold's first line");
        let pid = line
            .strip_prefix("hold: pid ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|pid| pid.parse().ok())
            .unwrap_or_else(|| panic!("hold printed {line:?}, not its pid"));
        Holder { child, stdout, pid }
    }

    /// Waits until the holder sleeps inside ioctl(2).
    pub fn wait_in_ioctl(&self) {
        crate::thread_state::wait_until_process_sleeps_in_syscall(
            self.pid,
            &[SYS_IOCTL],
            Duration::from_secs(30),
        );
    }

    /// Whether it is, right now, asleep in ioctl(2).
    pub fn in_ioctl(&self) -> bool {
        crate::thread_state::process_sleeps_in_syscall(self.pid, &[SYS_IOCTL])
    }

    /// Whether the process has exited (reaps it if so).
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_some()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Waits (bounded) until it ends; returns its last line (`hold: ret ...`) and exit code.
    pub fn finish(mut self, limit: Duration) -> (String, Option<i32>) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "hold (pid {}) did not end within {limit:?}",
                self.pid
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut self.stdout, &mut rest);
        eprintln!("[xs-client hold] {rest}exit {:?}", status.code());
        (rest.trim().to_string(), status.code())
    }
}

impl Drop for Holder {
    /// SIGKILL, and reap if it is gone already. No blocking wait: a posted call whose answer
    /// was dropped keeps even a killed process in the ioctl until cusedev goes.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.try_wait();
    }
}

/// The seconds in a `hold: ... after X s` line.
pub fn seconds_after(line: &str) -> f64 {
    line.rsplit_once(" after ")
        .and_then(|(_, rest)| rest.trim_end_matches(" s").trim().parse().ok())
        .unwrap_or_else(|| panic!("no 'after X s' in {line:?}"))
}
