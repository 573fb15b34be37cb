//! `fcopy-holder NODE RELEASE_FIFO`: registers with the 2014 (linux-3.14 profile) hv_fcopy
//! driver, sleeps in read(2), and keeps the device open until told to let go: for tests of what
//! a rescind does to an open file and to the node.
//!
//! Prints `HOLD registered`, then `HOLD read: <errno name or byte count>` when the read
//! returns, then waits until a writer opens and closes RELEASE_FIFO, closes the device and
//! prints `HOLD closed`. Every line is flushed at once so a test can wait for it.

use std::io::Write;
use std::process::ExitCode;

use cusedev_tests::dev::Dev;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "HOLD {line}");
    let _ = out.flush();
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [node, fifo] = args.as_slice() else {
        eprintln!("usage: fcopy-holder NODE RELEASE_FIFO");
        return ExitCode::from(2);
    };
    let dev = match Dev::open(node) {
        Ok(dev) => dev,
        Err(err) => {
            say(&format!("open: {err}"));
            return ExitCode::FAILURE;
        }
    };
    // The 2014 driver takes version 0 and never answers it (spec/fcopy.md §5).
    if let Err(err) = dev.write_u32(0) {
        say(&format!("register: {err}"));
        return ExitCode::FAILURE;
    }
    say("registered");
    match dev.pread(8192) {
        Ok(bytes) => say(&format!("read: {} bytes", bytes.len())),
        Err(err) => say(&format!("read: {err:?}")),
    }
    // Opening a FIFO for reading blocks until a writer opens it: the test's "let go".
    if let Err(err) = std::fs::read(fifo) {
        say(&format!("release fifo: {err}"));
    }
    drop(dev);
    say("closed");
    ExitCode::SUCCESS
}
