//! `wait-log FILE PATTERN [--from-line N] [--timeout SECONDS]`: waits until a line of FILE
//! (after its first N lines) contains PATTERN, and prints that line.
//!
//! For scripts inside a QEMU guest that must wait for a server to say it is ready: it sleeps
//! on inotify (IN_MODIFY) rather than polling, and gives up after the timeout (default 60 s)
//! with exit status 1 and the file's last lines, so a test never waits forever. Exit status 2
//! is bad usage.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

struct Args {
    file: String,
    pattern: String,
    from_line: usize,
    timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut positional = Vec::new();
    let mut from_line = 0;
    let mut timeout = Duration::from_secs(60);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--from-line" => {
                from_line = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--from-line needs a line count")?;
            }
            "--timeout" => {
                let seconds: f64 = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--timeout needs seconds")?;
                timeout = Duration::from_secs_f64(seconds);
            }
            _ => positional.push(arg),
        }
    }
    let [file, pattern]: [String; 2] = positional
        .try_into()
        .map_err(|_| "usage: wait-log FILE PATTERN [--from-line N] [--timeout SECONDS]")?;
    Ok(Args {
        file,
        pattern,
        from_line,
        timeout,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(usage) => {
            eprintln!("wait-log: {usage}");
            return ExitCode::from(2);
        }
    };
    match wait(&args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("wait-log: {why}");
            ExitCode::FAILURE
        }
    }
}

/// Sleeps on inotify until `file` exists: a server started in the background may not have
/// created its log yet when we start waiting for a line in it.
fn wait_for_file(inotify: &Inotify, file: &str, deadline: Instant) -> Result<(), String> {
    let path = std::path::Path::new(file);
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => std::path::Path::new("."),
    };
    let watch = inotify
        .add_watch(dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
        .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
    while !path.exists() {
        if !sleep_on(inotify, deadline)? {
            return Err(format!("{file} did not appear before the timeout"));
        }
    }
    let _ = inotify.rm_watch(watch);
    Ok(())
}

/// Waits for inotify events until `deadline`; false when the deadline passed first.
fn sleep_on(inotify: &Inotify, deadline: Instant) -> Result<bool, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Ok(false);
    }
    let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
    let ms =
        PollTimeout::try_from(left.as_millis().min(60_000) as i32 + 1).unwrap_or(PollTimeout::MAX);
    match nix::poll::poll(&mut fds, ms) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
        Err(e) => return Err(format!("poll: {e}")),
    }
    // Drain the events; what matters is only that something changed.
    if fds[0].any().unwrap_or(false) {
        let _ = inotify.read_events();
    }
    Ok(true)
}

fn wait(args: &Args) -> Result<String, String> {
    let deadline = Instant::now() + args.timeout;
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).map_err(|e| format!("inotify: {e}"))?;
    wait_for_file(&inotify, &args.file, deadline)?;
    // Watch before the first read, so a line written in between still wakes us.
    inotify
        .add_watch(
            args.file.as_str(),
            AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_ATTRIB,
        )
        .map_err(|e| format!("cannot watch {}: {e}", args.file))?;
    let mut reader = BufReader::new(
        File::open(&args.file).map_err(|e| format!("cannot open {}: {e}", args.file))?,
    );
    let mut seen = Vec::new();
    let mut partial = String::new();
    loop {
        // Read every complete line that is there now.
        loop {
            let mut chunk = String::new();
            let n = reader
                .read_line(&mut chunk)
                .map_err(|e| format!("reading {}: {e}", args.file))?;
            if n == 0 {
                break;
            }
            partial.push_str(&chunk);
            if !partial.ends_with('\n') {
                // A line still being written: keep it, the rest comes with the next event.
                break;
            }
            let line = std::mem::take(&mut partial).trim_end().to_owned();
            seen.push(line.clone());
            if seen.len() > args.from_line && line.contains(&args.pattern) {
                return Ok(line);
            }
        }
        if !sleep_on(&inotify, deadline)? {
            let tail = seen[seen.len().saturating_sub(20)..].join("\n");
            return Err(format!(
                "no line with {:?} in {} after {:?}; its last lines:\n{tail}",
                args.pattern, args.file, args.timeout
            ));
        }
    }
}
