//! vsock-tool against itself without a VM: its `serve --unix` server behind a fake hybrid-vsock
//! peer that answers `CONNECT <port>` the way vhost-device-vsock (and our `vhost`) do, so the
//! `--uds PATH:PORT` client path, both server modes and the sink's integrity check are covered.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const TOOL: &str = env!("CARGO_BIN_EXE_vsock-tool");

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vsock-tool-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts `vsock-tool serve --unix PATH` and returns once it says it is listening.
fn start_server(path: &Path) -> Child {
    let mut child = Command::new(TOOL)
        .args(["serve", "--unix"])
        .arg(path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("listening"), "server said: {line}");
    child
}

/// Copies `from` to `to` until EOF, then half-closes `to` (the sink answers only after EOF).
fn pump(mut from: UnixStream, to: UnixStream) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut w = &to;
        let _ = std::io::copy(&mut from, &mut w);
        let _ = to.shutdown(Shutdown::Write);
    })
}

/// A fake backend at `uds`: `CONNECT <port>` is forwarded to the Unix socket `<uds>_<port>`
/// (standing in for the guest's listener); a port with no such socket gets the connection
/// closed, as a backend does when the guest refuses.
fn fake_backend(uds: PathBuf) {
    let listener = UnixListener::bind(&uds).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while conn.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            let line = String::from_utf8(line).unwrap();
            let port = line.strip_prefix("CONNECT ").expect("CONNECT line");
            let target = format!("{}_{port}", uds.display());
            let Ok(guest) = UnixStream::connect(&target) else {
                continue; // drops `conn`: the client sees EOF instead of OK
            };
            conn.write_all(b"OK 1234\n").unwrap();
            pump(conn.try_clone().unwrap(), guest.try_clone().unwrap());
            pump(guest, conn);
        }
    });
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(TOOL).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn latency_and_throughput_through_a_fake_connect_peer() {
    let dir = scratch("ok");
    let uds = dir.join("vsock.sock");
    let mut server = start_server(&dir.join("vsock.sock_5202"));
    fake_backend(uds.clone());
    let target = format!("{}:5202", uds.display());

    let (code, out, err) = run(&[
        "latency",
        "--uds",
        &target,
        "--count",
        "50",
        "--timeout",
        "10",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("latency size=64 count=50 avg_us="), "{out}");
    assert!(
        out.contains(" p99_us=") && out.contains(" max_us="),
        "{out}"
    );

    // An odd size and chunk: the stream and the hash must not depend on the split. Both the
    // length-prefixed mode and the one ended by a half-close.
    for extra in [None, Some("--half-close")] {
        let mut args = vec![
            "throughput",
            "--uds",
            &target,
            "--bytes",
            "3000001",
            "--chunk",
            "4093",
        ];
        args.extend(extra);
        let (code, out, err) = run(&args);
        assert_eq!(code, 0, "{extra:?}: {out}{err}");
        assert!(
            out.starts_with("throughput bytes=3000001 seconds="),
            "{out}"
        );
        assert!(out.trim_end().ends_with("verified=yes"), "{out}");
    }

    server.kill().unwrap();
    server.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refused_connect_and_bad_usage_fail_cleanly() {
    let dir = scratch("refused");
    let uds = dir.join("vsock.sock");
    fake_backend(uds.clone());
    let (code, _, err) = run(&[
        "latency",
        "--uds",
        &format!("{}:9", uds.display()),
        "--timeout",
        "5",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("closed the connection after CONNECT 9"),
        "{err}"
    );

    let (code, _, err) = run(&["latency", "--uds", "nocolon"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("usage:"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
