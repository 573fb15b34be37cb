//! The C Launcher `tests/c/lguest-launcher.c` (built 64- and 32-bit by `tests/build.rs`) and
//! what the lguest tests need around it: running it, reading its lines, and watching a
//! Launcher that sits in its read.
//!
//! The Launcher is the other party of `/dev/lguest` as in Linux 3.x (../shared/spec/lguest.md
//! §3, §4, §7): its own declaration of the LHREQ_* words, a console-only Launcher that behaves
//! as v3.10's does, and subcommands that each expect one fakehost Guest script
//! (`fixtures/lguest/`): `errno` (errno.guest), `pingpong N [--eventfd]` (pingpong.guest),
//! `attach-while-blocked` (attach.guest), `hold` (halt.guest), `bench SECONDS [--eventfd]`
//! (bench-read.guest / bench-eventfd.guest). `lguest-launcher --help` says the rest.
//!
//! `errno` and `attach-while-blocked` print case lines in xs-client's format, so
//! [`assert_all_cases_pass`] checks them too.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

pub use crate::xs_client::{assert_all_cases_pass, Bits, Run};

/// The node lguest registers (misc device, dynamic minor).
pub const NODE: &str = "/dev/lguest";

/// The device's name as cusedev's driver table has it (relative to /dev).
pub const DEVICE: &str = "lguest";

/// The Launcher's exit codes.
pub mod exit {
    /// Everything asked for worked.
    pub const OK: i32 = 0;
    /// The Guest died (console, hold), a case failed, or a runtime error.
    pub const GUEST: i32 = 1;
    /// Usage error.
    pub const USAGE: i32 = 2;
    /// The Guest asked for more restarts than `--max-restarts` allows.
    pub const RESTARTS: i32 = 3;
}

/// The environment variable in which `console` counts its restarts across execv. A test
/// starting a Launcher leaves it unset (or sets it to start part-way).
pub const RESTARTS_ENV: &str = "LGUEST_LAUNCHER_RESTARTS";

/// The Launcher's word (`unsigned long`) in bytes: every request is an array of these.
pub fn word(bits: Bits) -> usize {
    match bits {
        Bits::B64 => 8,
        Bits::B32 => 4,
    }
}

/// pread64's number in the build's ABI, as `/proc/PID/syscall` shows it (x86_64 17, i386 180).
pub fn sys_pread64(bits: Bits) -> i64 {
    match bits {
        Bits::B64 => 17,
        Bits::B32 => 180,
    }
}

/// The Launcher binary; fails with the compiler's output when build.rs could not build it.
pub fn launcher(bits: Bits) -> PathBuf {
    let name = match bits {
        Bits::B64 => "lguest-launcher",
        Bits::B32 => "lguest-launcher32",
    };
    let dir = PathBuf::from(env!("LGUEST_LAUNCHER_DIR"));
    let binary = dir.join(name);
    if !binary.exists() {
        let log = std::fs::read_to_string(dir.join(format!("{name}.build.log")))
            .unwrap_or_else(|_| "(no build log)".into());
        panic!(
            "{} was not built (tests/build.rs compiles tests/c/lguest-launcher.c; \
             tests/scripts/install-deps.sh installs gcc and gcc-multilib):\n{log}",
            binary.display()
        );
    }
    binary
}

/// `lguest-launcher --dev DEV ARGS`, with stdout and stderr captured and no restart count
/// inherited. Add environment or arguments before running it with [`run_command`].
pub fn command(bits: Bits, dev: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(launcher(bits));
    command
        .arg("--dev")
        .arg(dev)
        .args(args)
        .env_remove(RESTARTS_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs the Launcher to the end.
pub fn run(bits: Bits, dev: &Path, args: &[&str]) -> Run {
    run_command(&mut command(bits, dev, args), &args.join(" "), None)
}

/// Runs the Launcher, SIGKILLing it if it has not ended within `limit` (the [`Run`] then has
/// no exit code, and what it printed until then).
pub fn run_limited(bits: Bits, dev: &Path, args: &[&str], limit: Duration) -> Run {
    run_command(&mut command(bits, dev, args), &args.join(" "), Some(limit))
}

/// Runs a prepared [`command`]; `label` names it in the log.
pub fn run_command(command: &mut Command, label: &str, limit: Option<Duration>) -> Run {
    let started = Instant::now();
    let mut child = crate::spawn_isolated(command)
        .unwrap_or_else(|e| panic!("cannot run lguest-launcher {label}: {e}"));
    // Both streams drained on threads, so a chatty Launcher never blocks on a full pipe.
    let drain = |stream: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut stream) = stream {
                let _ = stream.read_to_end(&mut text);
            }
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if limit.is_some_and(|limit| started.elapsed() > limit) {
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let run = Run {
        code: status.code(),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
        seconds: started.elapsed().as_secs_f64(),
    };
    eprintln!("[lguest-launcher {label}] {}", run.text());
    run
}

/// What `pingpong` printed.
#[derive(Debug, Clone, PartialEq)]
pub struct PingPong {
    pub notifies: u64,
    pub irqs: u64,
    pub seconds: f64,
    /// After `reason: ` (`CRASH: pingpong done`).
    pub reason: String,
}

/// Parses `notifies N irqs M seconds S` and `reason: REASON`; panics with the run otherwise.
pub fn parse_pingpong(run: &Run) -> PingPong {
    let fields = run
        .stdout
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f[..] {
                ["notifies", n, "irqs", m, "seconds", s] => {
                    Some((n.parse().ok()?, m.parse().ok()?, s.parse().ok()?))
                }
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("no 'notifies N irqs M seconds S' line:\n{}", run.text()));
    let reason = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("reason: "))
        .unwrap_or_else(|| panic!("no 'reason:' line:\n{}", run.text()));
    PingPong {
        notifies: fields.0,
        irqs: fields.1,
        seconds: fields.2,
        reason: reason.to_string(),
    }
}

/// One `bench` line.
#[derive(Debug, Clone, PartialEq)]
pub struct Bench {
    /// `read-round-trips` or `eventfd-notifies`.
    pub what: String,
    pub ops: u64,
    pub seconds: f64,
    /// Per second.
    pub rate: f64,
    /// The pipe ping-pong floor, round trips per second.
    pub floor: f64,
    /// rate / floor.
    pub ratio: f64,
}

/// Parses `bench WHAT ops N seconds S rate R/s floor F/s ratio X`; panics with the run
/// otherwise.
pub fn parse_bench(run: &Run) -> Bench {
    run.stdout
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f[..] {
                ["bench", what, "ops", ops, "seconds", s, "rate", r, "floor", fl, "ratio", x] => {
                    Some(Bench {
                        what: what.to_string(),
                        ops: ops.parse().ok()?,
                        seconds: s.parse().ok()?,
                        rate: r.strip_suffix("/s")?.parse().ok()?,
                        floor: fl.strip_suffix("/s")?.parse().ok()?,
                        ratio: x.parse().ok()?,
                    })
                }
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("no 'bench ...' line:\n{}", run.text()))
}

/// Whether some thread of process `pid` sleeps ('S', or 'D' for a FUSE request whose caller
/// got a fatal signal) inside syscall `nr`, from `/proc/PID/task/*/{syscall,stat}`.
pub fn task_sleeps_in_syscall(pid: i32, nr: i64) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        let dir = task.path();
        let in_nr = std::fs::read_to_string(dir.join("syscall"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<i64>().ok())
            == Some(nr);
        let state = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|s| {
                let after = &s[s.rfind(')')? + 1..];
                after.trim_start().chars().next()
            });
        in_nr && matches!(state, Some('S' | 'D'))
    })
}

/// A Launcher running `hold`: INITIALIZEd, printed `reading`, and sits in pread until killed
/// (halt.guest). Killed when dropped.
pub struct Holder {
    child: Child,
    stdout: BufReader<ChildStdout>,
    bits: Bits,
    pub pid: i32,
}

impl Holder {
    /// Starts `lguest-launcher --dev DEV hold` and waits for its `reading` line.
    pub fn start(bits: Bits, dev: &Path) -> Holder {
        let mut child = crate::spawn_isolated(&mut command(bits, dev, &["hold"]))
            .unwrap_or_else(|e| panic!("cannot start lguest-launcher hold: {e}"));
        let pid = i32::try_from(child.id()).expect("pid fits i32");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read hold's first line");
        if line != "reading\n" {
            let _ = child.kill();
            let output = child.wait_with_output().expect("wait for hold");
            panic!(
                "hold printed {line:?}, not \"reading\" (exit {:?}):\n{}",
                output.status.code(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Holder {
            child,
            stdout,
            bits,
            pid,
        }
    }

    /// Waits (bounded) until the Launcher sleeps inside its pread.
    pub fn wait_in_read(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.in_read() {
            assert!(
                Instant::now() < deadline,
                "hold (pid {}) did not sleep in pread64 within {limit:?}",
                self.pid
            );
            std::thread::yield_now();
        }
    }

    /// Whether it is, right now, asleep in pread64.
    pub fn in_read(&self) -> bool {
        task_sleeps_in_syscall(self.pid, sys_pread64(self.bits))
    }

    /// Whether the process has exited (reaps it if so).
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_some()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Waits (bounded) until it ends; returns what it printed after `reading` (stdout, then
    /// stderr) and its exit code (None when killed by a signal).
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
        let _ = self.stdout.read_to_string(&mut rest);
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = stderr.read_to_string(&mut rest);
        }
        eprintln!("[lguest-launcher hold] {rest}exit {:?}", status.code());
        (rest.trim().to_string(), status.code())
    }
}

impl Drop for Holder {
    /// SIGKILL, and reap if it is gone already; no blocking wait (a read the device never
    /// answers can keep even a killed process in the kernel until cusedev goes).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.try_wait();
    }
}
