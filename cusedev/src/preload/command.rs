//! `cusedev run -- COMMAND`: the command that gets the devices, started once they are there.

use std::ffi::OsString;
use std::process::{Command, ExitCode};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::bus::first_offers::FirstOffers;

/// The running command, for passing signals on.
#[derive(Default)]
pub struct Child {
    /// `Some` while the command runs; `None` before it starts and after it is reaped (so a
    /// signal never goes to a reused pid).
    pid: Mutex<Option<u32>>,
}

impl Child {
    /// Sends `signal` to the command if it runs; false if there is none.
    pub fn forward(&self, signal: Signal) -> bool {
        let pid = *self.pid.lock().unwrap_or_else(|e| e.into_inner());
        match pid {
            Some(pid) => {
                let _ = kill(Pid::from_raw(pid as i32), signal);
                true
            }
            None => false,
        }
    }

    fn set(&self, pid: Option<u32>) {
        *self.pid.lock().unwrap_or_else(|e| e.into_inner()) = pid;
    }
}

/// Waits (at most `ready_timeout`) for the host's first offers, runs `argv` with
/// `environment` added, and returns its status as cusedev's: its exit code, or 128 + N for a
/// signal N, as a shell reports it.
pub fn run(
    argv: &[OsString],
    environment: &[(String, String)],
    first_offers: &FirstOffers,
    ready_timeout: Duration,
    child: &Child,
) -> ExitCode {
    let Some((program, args)) = argv.split_first() else {
        log::error!("run: no command given");
        return ExitCode::from(2);
    };
    if !first_offers.wait(ready_timeout) {
        log::warn!(
            "run: the host's first offers were not all bound within {ready_timeout:?}; \
             starting {} anyway (a device that comes later appears then)",
            program.to_string_lossy()
        );
    }
    let mut command = Command::new(program);
    command.args(args);
    for (key, value) in environment {
        command.env(key, value);
    }
    // The stop signals are blocked in cusedev (one thread takes them with sigwait), and a
    // child inherits the mask: give the command the empty mask a shell would.
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // sigprocmask, which is async-signal-safe; it touches no memory of the parent's.
        unsafe {
            command.pre_exec(|| {
                nix::sys::signal::sigprocmask(
                    nix::sys::signal::SigmaskHow::SIG_SETMASK,
                    Some(&nix::sys::signal::SigSet::empty()),
                    None,
                )
                .map_err(std::io::Error::from)
            });
        }
    }
    let mut process = match command.spawn() {
        Ok(process) => process,
        Err(e) => {
            log::error!("run: cannot start {}: {e}", program.to_string_lossy());
            // What a shell answers for a command it cannot run.
            return ExitCode::from(if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            });
        }
    };
    child.set(Some(process.id()));
    log::info!(
        "run: started {} (pid {})",
        program.to_string_lossy(),
        process.id()
    );
    let status = process.wait();
    child.set(None);
    match status {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            let code = match (status.code(), status.signal()) {
                (Some(code), _) => code,
                (None, Some(signal)) => 128 + signal,
                (None, None) => 1,
            };
            log::info!("run: {} exited: {status}", program.to_string_lossy());
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Err(e) => {
            log::error!("run: waiting for {}: {e}", program.to_string_lossy());
            ExitCode::FAILURE
        }
    }
}
