//! The XStore host's blob store through real processes: `fakehost serve` started as a
//! process over a temporary `--blob-root` or over Azurite, driven by the `fakehost blobs` CLI
//! (the same control commands and store the guest's requests use).
//!
//! Synchronisation: a process's log line, a socket that accepts, a file that appears; every
//! wait has a deadline that only turns a hang into a failure. The Azurite test installs
//! Azurite into build/node (fakehost/scripts/install-azurite.sh) and fails, not skips, when
//! node or npm is missing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::azurite::{Azurite, ACCOUNT};
use common::TempDir;

const DEADLINE: Duration = Duration::from_secs(60);

/// A child process killed (SIGKILL) and reaped when dropped, its stderr lines forwarded.
struct Proc {
    name: &'static str,
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    fn spawn(name: &'static str, command: &mut Command) -> Proc {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{name}] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            name,
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `text`, and returns it.
    fn wait_for(&mut self, text: &str) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(text);
                    self.seen.push(line.clone());
                    if found {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "{} never logged {text:?}; it said:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `fakehost serve` on `dir`'s sockets with `store_args`, once it listens.
fn serve(dir: &Path, store_args: &[&str]) -> Proc {
    let mut host = Proc::spawn(
        "fakehost",
        Command::new(env!("CARGO_BIN_EXE_fakehost"))
            .arg("serve")
            .arg("--listen")
            .arg(format!("unix:{}", dir.join("bus.sock").display()))
            .arg("--control")
            .arg(dir.join("ctl.sock"))
            .args(["--offer", "xs"])
            .args(store_args)
            .env("RUST_LOG", "info"),
    );
    host.wait_for("listening");
    host
}

/// `fakehost ARGS` against `dir`'s control socket.
fn cli(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_fakehost"))
        .arg("--control")
        .arg(dir.join("ctl.sock"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    eprintln!(
        "[fakehost {}] exit {:?}\n{}{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout)
            .chars()
            .take(2000)
            .collect::<String>(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 11) as u8 ^ seed)
        .collect()
}

/// put, ls, get (to a file and to stdout), rm, and the failures, on one running host.
fn round_trip(dir: &Path, store_url: &str) {
    let contents = pattern(3 << 20, 1);
    let src = dir.join("src.bin");
    std::fs::write(&src, &contents).unwrap();

    let put = cli(
        dir,
        &["blobs", "put", "docs/report.bin", src.to_str().unwrap()],
    );
    assert!(put.status.success());
    assert_eq!(
        text(&put.stdout).trim(),
        format!("stored docs/report.bin (3145728 bytes) in {store_url}")
    );
    assert!(cli(dir, &["blobs", "put", "docs/b", src.to_str().unwrap()])
        .status
        .success());

    let ls = cli(dir, &["blobs", "ls", "docs/"]);
    assert!(ls.status.success());
    assert_eq!(text(&ls.stdout), "docs/b\ndocs/report.bin\n");
    let long = cli(dir, &["blobs", "ls", "-l", "docs/r"]);
    assert_eq!(text(&long.stdout), "     3145728 docs/report.bin\n");
    let none = cli(dir, &["blobs", "ls", "nothing/"]);
    assert!(none.status.success());
    assert_eq!(text(&none.stdout), "");
    assert!(text(&none.stderr).contains("no blobs"));

    let out = dir.join("out.bin");
    let get = cli(
        dir,
        &["blobs", "get", "docs/report.bin", out.to_str().unwrap()],
    );
    assert!(get.status.success());
    assert!(std::fs::read(&out).unwrap() == contents, "file differs");
    let to_stdout = cli(dir, &["blobs", "get", "docs/report.bin", "-"]);
    assert!(to_stdout.status.success());
    assert!(to_stdout.stdout == contents, "stdout differs");

    let rm = cli(dir, &["blobs", "rm", "docs/report.bin"]);
    assert!(rm.status.success());
    assert_eq!(text(&rm.stdout).trim(), "deleted docs/report.bin");

    // A blob that is not there: exit 1, and the target file is left as it was.
    std::fs::write(&out, b"keep me").unwrap();
    let missing = cli(
        dir,
        &["blobs", "get", "docs/report.bin", out.to_str().unwrap()],
    );
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        text(&missing.stderr).trim(),
        format!("fakehost blobs get: no blob \"docs/report.bin\" in {store_url}")
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    assert_eq!(
        cli(dir, &["blobs", "rm", "docs/report.bin"]).status.code(),
        Some(1)
    );

    // Usage errors: exit 2.
    let bad = cli(dir, &["blobs", "put", "../up", src.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains("'..' segment"),
        "{}",
        text(&bad.stderr)
    );
    let no_file = cli(dir, &["blobs", "put", "x", "/nonexistent/file"]);
    assert_eq!(no_file.status.code(), Some(2));
    assert!(text(&no_file.stderr).contains("cannot open /nonexistent/file"));

    let status = cli(dir, &["status"]);
    let status = text(&status.stdout);
    assert!(
        status.contains(&format!("xs:       store {store_url} (ok)")),
        "{status}"
    );
}

#[test]
fn blobs_round_trip_through_a_served_blob_root() {
    let dir = TempDir::new("root");
    let root = dir.0.join("var/blobs");
    let _host = serve(&dir.0, &["--blob-root", root.to_str().unwrap()]);
    assert!(root.is_dir(), "--blob-root created");
    round_trip(&dir.0, &format!("file://{}", root.display()));
    // What the CLI stored is a plain file under the root.
    assert_eq!(std::fs::read(root.join("docs/b")).unwrap().len(), 3 << 20);

    // Fault injection round-trips through the control socket and shows in the status.
    let set = cli(&dir.0, &["xs", "--delay", "250ms"]);
    assert_eq!(
        text(&set.stdout).trim(),
        "xs fault now: every store operation delayed by 250ms"
    );
    let shown = cli(&dir.0, &["xs"]);
    assert!(text(&shown.stdout).contains("in force: every store operation delayed by 250ms"));
    assert_eq!(
        cli(&dir.0, &["xs", "--delay", "soon"]).status.code(),
        Some(2)
    );
    let status = text(&cli(&dir.0, &["status"]).stdout);
    assert!(
        status.contains("fault: every store operation delayed by 250ms"),
        "{status}"
    );
    assert!(cli(&dir.0, &["xs", "--normal"]).status.success());
}

#[test]
fn blobs_without_a_running_host_is_a_usage_error() {
    let dir = TempDir::new("nohost");
    let out = cli(&dir.0, &["blobs", "ls"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("is `fakehost serve` running?"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bad_blob_store_url_refuses_to_start_with_the_reason() {
    let dir = TempDir::new("badurl");
    let out = Command::new(env!("CARGO_BIN_EXE_fakehost"))
        .args(["serve", "--listen"])
        .arg(format!("unix:{}", dir.0.join("bus.sock").display()))
        .arg("--control")
        .arg(dir.0.join("ctl.sock"))
        .args(["--blob-store", "azure://acct"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("exactly one container"), "{err}");

    let file = dir.0.join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fakehost"))
        .args(["serve", "--listen"])
        .arg(format!("unix:{}", dir.0.join("bus.sock").display()))
        .arg("--control")
        .arg(dir.0.join("ctl.sock"))
        .arg("--blob-root")
        .arg(file.join("blobs"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot start the xs service: blob root"),
        "{err}"
    );
    assert!(!dir.0.join("ctl.sock").exists());
}

#[test]
fn an_unreachable_store_is_logged_at_startup_shown_in_status_and_fails_commands() {
    let dir = TempDir::new("unreachable");
    // A port nothing listens on (bound, then closed).
    let port = common::azurite::free_port();
    let url =
        format!("azure://devstoreaccount1/c?endpoint=http://127.0.0.1:{port}/devstoreaccount1");
    let mut host = serve(&dir.0, &["--blob-store", &url]);
    let line = host.wait_for("xs: blob store");
    assert!(line.contains("does not answer"), "{line}");
    let status = text(&cli(&dir.0, &["status"]).stdout);
    assert!(
        status.contains(&format!("store {url} (failing: ")),
        "{status}"
    );
    let ls = cli(&dir.0, &["blobs", "ls"]);
    assert_eq!(ls.status.code(), Some(1));
    assert!(
        text(&ls.stderr).starts_with(&format!("fakehost blobs ls: the blob store {url} failed: ")),
        "{}",
        text(&ls.stderr)
    );
}

/// Waits until `check` holds, looking again every few milliseconds (a condition polled, not
/// a guessed sleep).
fn poll_until(what: &str, mut check: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The local store's staged file for `name` (`name#N`), if one exists, and its size.
fn staged(root: &Path, name: &str) -> Option<(PathBuf, u64)> {
    std::fs::read_dir(root).ok()?.find_map(|entry| {
        let entry = entry.ok()?;
        let file = entry.file_name().to_string_lossy().into_owned();
        let suffix = file.strip_prefix(&format!("{name}#"))?;
        (!suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit()))
            .then(|| (entry.path(), entry.metadata().map_or(0, |m| m.len())))
    })
}

#[test]
fn a_put_cut_short_by_sigkill_leaves_the_old_blob_whole() {
    let dir = TempDir::new("kill");
    let root = dir.0.join("blobs");
    let old = pattern(1 << 20, 7);
    let old_file = dir.0.join("old.bin");
    std::fs::write(&old_file, &old).unwrap();
    let mut host = serve(&dir.0, &["--blob-root", root.to_str().unwrap()]);
    assert!(
        cli(&dir.0, &["blobs", "put", "big", old_file.to_str().unwrap()])
            .status
            .success()
    );

    // A 40 MiB put from a pipe: we feed 15 MiB, see the host staging parts of it, and kill
    // the host while the rest has not even been written.
    let mut put = Command::new(env!("CARGO_BIN_EXE_fakehost"))
        .arg("--control")
        .arg(dir.0.join("ctl.sock"))
        .args(["blobs", "put", "big", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin: ChildStdin = put.stdin.take().unwrap();
    let new = pattern(40 << 20, 9);
    stdin.write_all(&new[..15 << 20]).unwrap();
    poll_until("a staged part of the new blob", || {
        staged(&root, "big").is_some_and(|(_, size)| size >= 5 << 20)
    });
    host.kill();
    drop(stdin);
    let cut = put.wait_with_output().unwrap();
    assert_eq!(cut.status.code(), Some(2), "{}", text(&cut.stderr));
    assert!(
        text(&cut.stderr).contains("fakehost closed the connection"),
        "{}",
        text(&cut.stderr)
    );

    // The kill landed mid-put: its staging file is still there, the blob is the old one.
    let (staging, _) = staged(&root, "big").expect("the interrupted put's staging file");
    assert!(std::fs::read(root.join("big")).unwrap() == old, "blob torn");

    // A new host sees the old blob, and only it.
    let _host = serve(&dir.0, &["--blob-root", root.to_str().unwrap()]);
    let get = cli(&dir.0, &["blobs", "get", "big", "-"]);
    assert!(get.status.success());
    assert!(
        get.stdout == old,
        "the old blob is not what a new host serves"
    );
    assert_eq!(text(&cli(&dir.0, &["blobs", "ls"]).stdout), "big\n");
    assert!(staging.exists());
}

// ---------------------------------------------------------------------------------------------
// Azurite

#[test]
fn blobs_round_trip_through_azurite() {
    let dir = TempDir::new("azurite");
    let azurite = Azurite::start(&dir.0.join("azurite"));
    let container = format!("xs-{}", std::process::id());
    azurite.create_container(&container);
    let url = azurite.store_url(&container);
    let mut host = serve(&dir.0, &["--blob-store", &url]);
    let probe_line = host.wait_for("xs: blob store");
    assert!(probe_line.ends_with(" answers"), "{probe_line}");
    // The CLI's put is in Azurite, byte for byte, before the round trip deletes it.
    let probe = dir.0.join("probe.txt");
    std::fs::write(&probe, b"through azurite").unwrap();
    assert!(cli(
        &dir.0,
        &["blobs", "put", "probe/one.txt", probe.to_str().unwrap()]
    )
    .status
    .success());
    let (code, body) =
        azurite.request("GET", &format!("/{ACCOUNT}/{container}/probe/one.txt"), &[]);
    assert_eq!((code, text(&body)), (200, "through azurite".to_owned()));

    round_trip(&dir.0, &url);
}

// ---------------------------------------------------------------------------------------------
// A guest on the real bus socket

mod guest {
    //! A scripted xs_fastpath guest over `fakehost serve`'s bus socket: it opens the xs
    //! channel as the bus client does, then any number of threads make calls at once. One
    //! pump thread reads the channel: it answers READs from the calls' pages, applies WRITEs
    //! and hands each completion to the thread that waits for it.

    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::sync::{mpsc, Arc, Mutex};

    use vmbus::channel_msg::{ChannelMessage, VERSION_WIN10_V5_3};
    use vmbus::guest_memory::{header, op, MemoryMessage, MAX_CHUNK};
    use vmbus::guid::Guid;
    use vmbus::packet::{packet_type, parse_packet};
    use vmbus::stream::{encode_frame, kind, FrameHeader, Hello, FRAME_HEADER_LEN};
    use vmbus::xs_fastpath::xstore::Request;
    use vmbus::xs_fastpath::{encode_request_packet, VspRequest, VspResponse, OP_USER_REQUEST};
    use zerocopy::little_endian::U32;
    use zerocopy::IntoBytes;

    const PAGE: usize = 4096;

    fn read_frame(mut stream: &UnixStream) -> Option<(u16, Vec<u8>)> {
        let mut head = [0u8; FRAME_HEADER_LEN];
        stream.read_exact(&mut head).ok()?;
        let head = FrameHeader::parse(&head).unwrap();
        let mut body = vec![0u8; head.len as usize];
        stream.read_exact(&mut body).ok()?;
        Some((head.kind, body))
    }

    fn control(stream: &UnixStream, msg: &ChannelMessage) -> ChannelMessage {
        (&*stream)
            .write_all(&encode_frame(kind::CONTROL, &msg.encode()))
            .unwrap();
        let (k, body) = read_frame(stream).expect("control stream closed");
        assert_eq!(k, kind::CONTROL);
        ChannelMessage::parse(&body).unwrap()
    }

    /// One call's pages: data (from page 0), then one request page, then one response page.
    struct Pages {
        mem: Vec<u8>,
        done: mpsc::Sender<(VspResponse, Vec<u8>)>,
    }

    /// What a finished call left: the completion and its pages.
    pub struct Done {
        pub response: VspResponse,
        pub mem: Vec<u8>,
        pub data_len: usize,
    }

    impl Done {
        /// The response buffer.
        pub fn response_buffer(&self) -> &[u8] {
            let pages = self.data_len.div_ceil(PAGE);
            &self.mem[(pages + 1) * PAGE..(pages + 2) * PAGE]
        }
    }

    pub struct Guest {
        _control: UnixStream,
        writer: Arc<Mutex<UnixStream>>,
        calls: Arc<Mutex<HashMap<u64, Pages>>>,
    }

    fn send(writer: &Mutex<UnixStream>, kind: u16, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut frame = FrameHeader {
            len: len as u32,
            kind,
        }
        .encode()
        .to_vec();
        for part in parts {
            frame.extend_from_slice(part);
        }
        let stream = writer.lock().unwrap();
        let _ = (&*stream).write_all(&frame);
    }

    impl Guest {
        /// Connects, takes the xs offer, opens its channel and starts the pump.
        pub fn open(bus: &Path) -> Guest {
            let control_stream = UnixStream::connect(bus).unwrap();
            (&control_stream)
                .write_all(&encode_frame(kind::HELLO, &Hello::control().encode()))
                .unwrap();
            let version = VERSION_WIN10_V5_3;
            assert!(matches!(
                control(
                    &control_stream,
                    &ChannelMessage::InitiateContact { version }
                ),
                ChannelMessage::VersionResponse {
                    supported: true,
                    ..
                }
            ));
            let relid = match control(&control_stream, &ChannelMessage::RequestOffers) {
                ChannelMessage::Offer {
                    if_type,
                    child_relid,
                    ..
                } => {
                    assert_eq!(if_type, Guid::XS_FASTPATH);
                    child_relid
                }
                other => panic!("expected the xs offer, got {other:?}"),
            };
            let (k, body) = read_frame(&control_stream).unwrap();
            assert_eq!(k, kind::CONTROL);
            assert_eq!(
                ChannelMessage::parse(&body).unwrap(),
                ChannelMessage::AllOffersDelivered
            );
            let open = ChannelMessage::OpenChannel {
                child_relid: relid,
                open_id: 1,
            };
            assert!(matches!(
                control(&control_stream, &open),
                ChannelMessage::OpenResult { status: 0, .. }
            ));
            let channel = UnixStream::connect(bus).unwrap();
            (&channel)
                .write_all(&encode_frame(
                    kind::HELLO,
                    &Hello::channel(relid, 1).encode(),
                ))
                .unwrap();
            let writer = Arc::new(Mutex::new(channel.try_clone().unwrap()));
            let calls: Arc<Mutex<HashMap<u64, Pages>>> = Arc::default();
            let (pump_writer, pump_calls) = (Arc::clone(&writer), Arc::clone(&calls));
            std::thread::spawn(move || pump(&channel, &pump_writer, &pump_calls));
            Guest {
                _control: control_stream,
                writer,
                calls,
            }
        }

        /// One call, as the driver makes it; blocks until its completion.
        pub fn call(&self, trans_id: u64, request: &Request, data: &[u8], data_len: usize) -> Done {
            let data_pages = data_len.div_ceil(PAGE);
            let mut mem = vec![0u8; (data_pages + 2) * PAGE];
            mem[..data.len()].copy_from_slice(data);
            let bytes = request.encode();
            let req_off = data_pages * PAGE;
            mem[req_off..req_off + bytes.len()].copy_from_slice(&bytes);
            let vsp = VspRequest {
                version: U32::new(0),
                timeout_ms: U32::new(0),
                data_buffer_offset: U32::new(0),
                data_buffer_length: U32::new(data_len as u32),
                data_buffer_valid: U32::new(u32::from(data_len > 0)),
                operation_type: U32::new(OP_USER_REQUEST),
                request_buffer_offset: U32::new(req_off as u32),
                request_buffer_length: U32::new(bytes.len() as u32),
                response_buffer_offset: U32::new((req_off + PAGE) as u32),
                response_buffer_length: U32::new(PAGE as u32),
                transaction_id: Guid([0; 16]),
            };
            let pfns: Vec<u64> = (0..(data_pages + 2) as u64).collect();
            let packet = encode_request_packet(trans_id, &pfns, &vsp).unwrap();
            let (done, finished) = mpsc::channel();
            self.calls
                .lock()
                .unwrap()
                .insert(trans_id, Pages { mem, done });
            send(&self.writer, kind::PACKET, &[&packet]);
            let (response, mem) = finished
                .recv()
                .expect("the channel ended before the answer");
            Done {
                response,
                mem,
                data_len,
            }
        }
    }

    fn pump(channel: &UnixStream, writer: &Mutex<UnixStream>, calls: &Mutex<HashMap<u64, Pages>>) {
        while let Some((k, body)) = read_frame(channel) {
            if k == kind::PACKET {
                let packet = parse_packet(&body).unwrap();
                assert_eq!(packet.ty, packet_type::COMP);
                let call = calls.lock().unwrap().remove(&packet.trans_id);
                let call = call.expect("a completion for a call in flight");
                let _ = call
                    .done
                    .send((VspResponse::read_lenient(packet.payload), call.mem));
                continue;
            }
            assert_eq!(k, kind::MEMORY);
            match MemoryMessage::parse(&body).unwrap() {
                MemoryMessage::Read {
                    trans_id,
                    offset,
                    len,
                } => {
                    let bytes = {
                        let calls = calls.lock().unwrap();
                        let mem = &calls[&trans_id].mem;
                        mem[offset as usize..offset as usize + len as usize].to_vec()
                    };
                    for (i, chunk) in bytes.chunks(MAX_CHUNK).enumerate() {
                        let at = offset + (i * MAX_CHUNK) as u64;
                        let head = header(op::DATA, 0, trans_id, at, chunk.len() as u32);
                        send(writer, kind::MEMORY, &[head.as_bytes(), chunk]);
                    }
                }
                MemoryMessage::Write {
                    trans_id,
                    offset,
                    bytes,
                } => {
                    let mut calls = calls.lock().unwrap();
                    let mem = &mut calls.get_mut(&trans_id).unwrap().mem;
                    mem[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
                }
                other => panic!("the host sent {other:?}"),
            }
        }
    }
}

#[test]
fn sixty_four_guest_threads_put_and_get_over_the_bus_and_the_cli_sees_their_blobs() {
    use vmbus::xs_fastpath::xstore::{parse_response_header, Op, Request, Status};

    let dir = TempDir::new("bus");
    let root = dir.0.join("blobs");
    let _host = serve(&dir.0, &["--blob-root", root.to_str().unwrap()]);
    let guest = std::sync::Arc::new(guest::Guest::open(&dir.0.join("bus.sock")));
    let contents = |i: u64| pattern(((i as usize) * 37_000) % (3 << 20) + 1, i as u8);
    let threads: Vec<_> = (1..=64u64)
        .map(|i| {
            let guest = std::sync::Arc::clone(&guest);
            std::thread::spawn(move || {
                let name = format!("guest/{i:02}");
                let data = contents(i);
                let put = Request {
                    op: Op::PUT,
                    offset: 0,
                    length: data.len() as u64,
                    name: name.clone(),
                };
                let done = guest.call(i, &put, &data, data.len());
                assert_eq!(Status(done.response.error.get()), Status::OK, "PUT {name}");
                let get = Request {
                    op: Op::GET,
                    offset: 0,
                    length: data.len() as u64,
                    name,
                };
                // The same id again: the driver reuses ids once a call completed.
                let done = guest.call(i, &get, &[], data.len());
                assert_eq!(Status(done.response.error.get()), Status::OK);
                let header = parse_response_header(done.response_buffer()).unwrap();
                assert_eq!(header.count.get(), data.len() as u64);
                assert!(
                    done.mem[..data.len()] == data[..],
                    "GET {i} brought other bytes"
                );
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }

    let ls = cli(&dir.0, &["blobs", "ls", "guest/"]);
    assert_eq!(text(&ls.stdout).lines().count(), 64);
    let get = cli(&dir.0, &["blobs", "get", "guest/17", "-"]);
    assert!(
        get.stdout == contents(17),
        "the CLI sees other bytes than the guest stored"
    );
    let status = text(&cli(&dir.0, &["status"]).stdout);
    assert!(
        status.contains("128 served, 0 failed, 0 in flight"),
        "{status}"
    );
}
