//! vsock-tool: a small measurement and check tool for virtio-vsock paths.
//!
//! It speaks AF_VSOCK (inside a guest) and the host side of the "hybrid vsock" Unix-socket
//! convention of rust-vmm's `vhost-device-vsock` (and of our `vhost` backend):
//! - a guest connection to host port P arrives as a Unix connection to `<uds_path>_<P>`;
//! - the host reaches guest port P by connecting to `<uds_path>`, writing `CONNECT P\n` and
//!   reading `OK <n>\n`; the stream is then the guest connection.
//!
//! The first byte a client sends selects the server mode: `E` echoes everything back until
//! EOF; `S` sinks everything until EOF and answers with the byte count and the FNV-1a 64 hash
//! of the data (8 bytes LE each), so a throughput run is also an integrity check; `L` is `S`
//! with the byte count sent first (8 bytes LE) instead of an EOF.
//!
//! `L` exists because `S` needs a half-close (shutdown(SHUT_WR)) to travel through the
//! backend, and vhost-device-vsock 0.3.0 has none: it ignores a guest's SHUTDOWN with only
//! the SEND flag (the host peer never sees EOF) and turns a host-side EOF into a full
//! shutdown towards the guest (the guest can no longer answer). The throughput client uses
//! `L` unless told `--half-close`.
//!
//! Every connect and every read has a timeout, so a broken path fails a benchmark instead of
//! hanging it.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, Shutdown, SockFlag, SockType, VsockAddr,
};
use nix::sys::time::TimeVal;

const USAGE: &str = "\
usage:
  vsock-tool serve (--vsock-port P | --unix PATH) [--once] [--background [--log FILE]] [--timeout S]
  vsock-tool latency (--vsock CID:PORT | --uds PATH:PORT) [--size 64] [--count 1000] [--timeout S]
  vsock-tool throughput (--vsock CID:PORT | --uds PATH:PORT) --bytes N [--chunk 65536]
                        [--half-close] [--timeout S]

  serve: per connection, the first byte selects the mode: 'E' echo until EOF, 'S' sink until
         EOF then answer 8 bytes LE count + 8 bytes LE FNV-1a 64 of the data, 'L' like 'S'
         but the count comes first (8 bytes LE) instead of an EOF.
  throughput: sends N pseudo-random bytes in 'L' mode and checks the answer; --half-close
         uses 'S' mode (needs a backend that forwards shutdown(SHUT_WR)).
         --background returns once the listener is bound (readiness without polling).
  --vsock CID:PORT  AF_VSOCK connect (e.g. 2:5201 from a guest to the host)
  --uds PATH:PORT   host -> guest through the hybrid-vsock Unix socket PATH (CONNECT PORT)
  --bytes/--chunk/--size accept K, M, G suffixes (binary); --timeout is in seconds (default 30)";

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// AF_VSOCK `cid:port`.
    Vsock { cid: u32, port: u32 },
    /// Hybrid vsock: the backend's Unix socket and the guest port to ask for.
    Uds { path: PathBuf, port: u32 },
}

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Listen {
    Vsock(u32),
    Unix(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
enum Command {
    Serve {
        listen: Listen,
        once: bool,
        background: bool,
        log: Option<PathBuf>,
        timeout: Duration,
    },
    Latency {
        target: Target,
        size: usize,
        count: usize,
        timeout: Duration,
    },
    Throughput {
        target: Target,
        bytes: u64,
        chunk: usize,
        half_close: bool,
        timeout: Duration,
    },
}

// ---------------------------------------------------------------------------------------------
// Argument parsing (by hand: clap is not a dependency of this crate).

/// Parses `123`, `64K`, `64M`, `1G` (binary multiples).
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1u64 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1u64 << 30),
        _ => (s, 1),
    };
    let n: u64 = digits.parse().map_err(|_| format!("bad size '{s}'"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' too large"))
}

fn parse_port(s: &str) -> Result<u32, String> {
    s.parse().map_err(|_| format!("bad port '{s}'"))
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|_| format!("bad timeout '{s}'"))?;
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("timeout must be positive, got '{s}'"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `CID:PORT`.
fn parse_vsock(s: &str) -> Result<Target, String> {
    let (cid, port) = s
        .split_once(':')
        .ok_or_else(|| format!("expected CID:PORT, got '{s}'"))?;
    let cid = cid.parse().map_err(|_| format!("bad CID '{cid}'"))?;
    Ok(Target::Vsock {
        cid,
        port: parse_port(port)?,
    })
}

/// `PATH:PORT`; the port is after the last colon so a path may contain colons.
fn parse_uds(s: &str) -> Result<Target, String> {
    let (path, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("expected PATH:PORT, got '{s}'"))?;
    if path.is_empty() {
        return Err(format!("empty path in '{s}'"));
    }
    Ok(Target::Uds {
        path: PathBuf::from(path),
        port: parse_port(port)?,
    })
}

fn parse_args(args: &[String]) -> Result<Command, String> {
    let (sub, rest) = args.split_first().ok_or("missing subcommand")?;
    let mut target = None;
    let mut listen = None;
    let mut once = false;
    let mut background = false;
    let mut log = None;
    let mut timeout = DEFAULT_TIMEOUT;
    let mut size = 64usize;
    let mut count = 1000usize;
    let mut bytes = None;
    let mut chunk = 65536usize;
    let mut half_close = false;

    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .map(String::as_str)
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let set_once = |slot_is_some: bool| {
            if slot_is_some {
                Err(format!("{flag}: only one address may be given"))
            } else {
                Ok(())
            }
        };
        match (sub.as_str(), flag.as_str()) {
            ("serve", "--vsock-port") => {
                set_once(listen.is_some())?;
                listen = Some(Listen::Vsock(parse_port(value()?)?));
            }
            ("serve", "--unix") => {
                set_once(listen.is_some())?;
                listen = Some(Listen::Unix(PathBuf::from(value()?)));
            }
            ("serve", "--once") => once = true,
            ("serve", "--background") => background = true,
            ("serve", "--log") => log = Some(PathBuf::from(value()?)),
            ("latency" | "throughput", "--vsock") => {
                set_once(target.is_some())?;
                target = Some(parse_vsock(value()?)?);
            }
            ("latency" | "throughput", "--uds") => {
                set_once(target.is_some())?;
                target = Some(parse_uds(value()?)?);
            }
            ("latency", "--size") => size = parse_size(value()?)? as usize,
            ("latency", "--count") => count = parse_size(value()?)? as usize,
            ("throughput", "--bytes") => bytes = Some(parse_size(value()?)?),
            ("throughput", "--chunk") => chunk = parse_size(value()?)? as usize,
            ("throughput", "--half-close") => half_close = true,
            ("serve" | "latency" | "throughput", "--timeout") => timeout = parse_timeout(value()?)?,
            ("serve" | "latency" | "throughput", _) => {
                return Err(format!("unknown option '{flag}' for {sub}"))
            }
            _ => return Err(format!("unknown subcommand '{sub}'")),
        }
    }

    let need_target = || {
        target
            .clone()
            .ok_or("--vsock CID:PORT or --uds PATH:PORT is required")
    };
    match sub.as_str() {
        "serve" => {
            let listen = listen.ok_or("--vsock-port P or --unix PATH is required")?;
            if log.is_some() && !background {
                return Err("--log only applies with --background".into());
            }
            Ok(Command::Serve {
                listen,
                once,
                background,
                log,
                timeout,
            })
        }
        "latency" => {
            if size == 0 || count == 0 {
                return Err("--size and --count must be positive".into());
            }
            Ok(Command::Latency {
                target: need_target()?,
                size,
                count,
                timeout,
            })
        }
        "throughput" => {
            if chunk == 0 {
                return Err("--chunk must be positive".into());
            }
            Ok(Command::Throughput {
                target: need_target()?,
                bytes: bytes.ok_or("--bytes N is required")?,
                chunk,
                half_close,
                timeout,
            })
        }
        _ => Err(format!("unknown subcommand '{sub}'")),
    }
}

// ---------------------------------------------------------------------------------------------
// Data: FNV-1a 64 and a fixed-seed pseudo-random byte stream.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Incremental FNV-1a 64: feeding the data in any split gives the same hash.
#[derive(Clone, Copy)]
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Fnv1a(FNV_OFFSET)
    }
    fn update(&mut self, data: &[u8]) {
        let mut h = self.0;
        for &b in data {
            h ^= u64::from(b);
            h = h.wrapping_mul(FNV_PRIME);
        }
        self.0 = h;
    }
    fn finish(self) -> u64 {
        self.0
    }
}

/// The payload of a throughput run: SplitMix64 words, little-endian, from a fixed seed.
/// Cheap (one multiply chain per 8 bytes) so the sender's CPU is not what gets measured, and
/// a byte stream: filling buffers of any sizes yields the same sequence.
struct PrngStream {
    state: u64,
    word: [u8; 8],
    /// Bytes of `word` already handed out (8 = none left).
    used: usize,
}

const PRNG_SEED: u64 = 0x5653_4f43_4b21_7431; // "VSOCK!t1"

impl PrngStream {
    fn new() -> Self {
        PrngStream {
            state: PRNG_SEED,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)).to_le_bytes()
    }

    fn fill(&mut self, mut buf: &mut [u8]) {
        // Drain a partly used word first, then whole words, then start a new word.
        if self.used < 8 {
            let n = (8 - self.used).min(buf.len());
            buf[..n].copy_from_slice(&self.word[self.used..self.used + n]);
            self.used += n;
            buf = &mut buf[n..];
        }
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_word());
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            self.word = self.next_word();
            tail.copy_from_slice(&self.word[..tail.len()]);
            self.used = tail.len();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sockets.

/// A connected stream socket (AF_VSOCK or AF_UNIX). Reads and writes are plain read(2) and
/// write(2) through a `File`; the receive timeout (SO_RCVTIMEO) turns a stuck peer into an
/// error.
struct Conn {
    file: File,
}

impl Conn {
    fn new(fd: OwnedFd, timeout: Duration) -> io::Result<Self> {
        let tv = TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
        socket::setsockopt(&fd, sockopt::ReceiveTimeout, &tv)?;
        // Writes block only while the peer does not read; bound them too.
        socket::setsockopt(&fd, sockopt::SendTimeout, &tv)?;
        Ok(Conn {
            file: File::from(fd),
        })
    }

    fn shutdown_write(&self) -> io::Result<()> {
        socket::shutdown(self.file.as_raw_fd(), Shutdown::Write)?;
        Ok(())
    }
}

/// SO_RCVTIMEO expiry reads as EAGAIN; say what it means.
fn name_timeout(e: io::Error, what: &str) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, format!("{what}: timed out"))
    } else {
        io::Error::new(e.kind(), format!("{what}: {e}"))
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf).map_err(|e| name_timeout(e, "read"))
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf).map_err(|e| name_timeout(e, "write"))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Level and option of the AF_VSOCK connect timeout (linux/vm_sockets.h); libc lacks them.
/// On 64-bit targets SO_VM_SOCKETS_CONNECT_TIMEOUT is the "old" option 6 taking a timeval.
const SOL_VSOCK: libc::c_int = libc::AF_VSOCK;
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;

/// A blocking AF_VSOCK connect bounded by `timeout` (the kernel's default is 2 s, too short
/// for a slow emulated guest and not what the user asked for).
fn connect_vsock(cid: u32, port: u32, timeout: Duration) -> io::Result<OwnedFd> {
    let fd = socket::socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as _,
        tv_usec: timeout.subsec_micros() as _,
    };
    // SAFETY: `fd` is an open socket we own; the option value points to a live timeval whose
    // size is passed alongside, and the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            SOL_VSOCK,
            SO_VM_SOCKETS_CONNECT_TIMEOUT,
            std::ptr::from_ref(&tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    socket::connect(fd.as_raw_fd(), &VsockAddr::new(cid, port)).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("connect vsock {cid}:{port}: {e}"),
        )
    })?;
    Ok(fd)
}

/// Host -> guest through the hybrid-vsock Unix socket: `CONNECT port\n`, expect `OK <n>\n`.
fn connect_uds(path: &Path, port: u32, timeout: Duration) -> io::Result<Conn> {
    // A Unix connect does not wait for the peer to accept, so it needs no timeout of its own;
    // the guest side of the handshake is bounded by the read timeout below.
    let stream = UnixStream::connect(path)
        .map_err(|e| io::Error::new(e.kind(), format!("connect {}: {e}", path.display())))?;
    let mut conn = Conn::new(OwnedFd::from(stream), timeout)?;
    conn.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Read byte by byte: anything after the newline already belongs to the guest's stream.
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        if conn.read(&mut b)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!(
                    "{}: backend closed the connection after CONNECT {port} (no listener in the guest?)",
                    path.display()
                ),
            ));
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > 64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "CONNECT answer too long",
            ));
        }
    }
    let line = String::from_utf8_lossy(&line);
    if !line.starts_with("OK ") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("CONNECT {port}: unexpected answer '{line}'"),
        ));
    }
    Ok(conn)
}

fn connect(target: &Target, timeout: Duration) -> io::Result<Conn> {
    match target {
        Target::Vsock { cid, port } => Conn::new(connect_vsock(*cid, *port, timeout)?, timeout),
        Target::Uds { path, port } => connect_uds(path, *port, timeout),
    }
}

enum Listener {
    Vsock(OwnedFd),
    Unix(UnixListener),
}

impl Listener {
    fn bind(listen: &Listen) -> io::Result<Self> {
        match listen {
            Listen::Vsock(port) => {
                let fd = socket::socket(
                    AddressFamily::Vsock,
                    SockType::Stream,
                    SockFlag::SOCK_CLOEXEC,
                    None,
                )?;
                socket::bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, *port))
                    .map_err(|e| {
                        io::Error::new(
                            io::Error::from(e).kind(),
                            format!("bind vsock port {port}: {e}"),
                        )
                    })?;
                socket::listen(&fd, Backlog::new(128)?)?;
                Ok(Listener::Vsock(fd))
            }
            Listen::Unix(path) => {
                // A socket file left by an earlier run would make bind fail with EADDRINUSE.
                if std::fs::symlink_metadata(path)
                    .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                    .unwrap_or(false)
                {
                    std::fs::remove_file(path)?;
                }
                let l = UnixListener::bind(path).map_err(|e| {
                    io::Error::new(e.kind(), format!("bind {}: {e}", path.display()))
                })?;
                Ok(Listener::Unix(l))
            }
        }
    }

    fn accept(&self) -> io::Result<OwnedFd> {
        match self {
            Listener::Vsock(fd) => {
                let raw = socket::accept4(fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
                // SAFETY: accept4 just returned this descriptor; nothing else owns it.
                Ok(unsafe { OwnedFd::from_raw_fd(raw) })
            }
            Listener::Unix(l) => Ok(OwnedFd::from(l.accept()?.0)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server.

/// Serves one connection; the first byte picks the mode.
fn handle(mut conn: Conn) -> io::Result<()> {
    let mut mode = [0u8; 1];
    conn.read_exact(&mut mode)?;
    let mut buf = vec![0u8; 256 * 1024];
    match mode[0] {
        b'E' => loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            conn.write_all(&buf[..n])?;
        },
        b'S' | b'L' => {
            // For 'L' the sender says how much follows; for 'S' the end is its EOF.
            let mut want = u64::MAX;
            if mode[0] == b'L' {
                let mut len = [0u8; 8];
                conn.read_exact(&mut len)?;
                want = u64::from_le_bytes(len);
            }
            let mut total = 0u64;
            let mut fnv = Fnv1a::new();
            while total < want {
                let room = (want - total).min(buf.len() as u64) as usize;
                let n = conn.read(&mut buf[..room])?;
                if n == 0 {
                    if mode[0] == b'L' {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("EOF after {total} of {want} bytes"),
                        ));
                    }
                    break;
                }
                total += n as u64;
                fnv.update(&buf[..n]);
            }
            let mut answer = [0u8; 16];
            answer[..8].copy_from_slice(&total.to_le_bytes());
            answer[8..].copy_from_slice(&fnv.finish().to_le_bytes());
            conn.write_all(&answer)
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown mode byte {other:#04x}"),
        )),
    }
}

/// Detaches into the background once the listener is bound: the foreground process exits 0
/// only then, so `vsock-tool serve --background` returning is the readiness signal. The child
/// leaves the caller's stdio so a caller capturing output (a guest agent, `$(...)`) is not
/// kept waiting for EOF.
fn daemonize(log: Option<&Path>) -> io::Result<()> {
    // SAFETY: called before any thread is spawned, so the child is a full copy of a
    // single-threaded process and may run arbitrary code.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { .. } => std::process::exit(0),
        nix::unistd::ForkResult::Child => {}
    }
    nix::unistd::setsid()?;
    let null = File::options().read(true).write(true).open("/dev/null")?;
    let out = match log {
        Some(p) => File::options().create(true).append(true).open(p)?,
        None => null.try_clone()?,
    };
    for (src, dst) in [(null.as_fd(), 0), (out.as_fd(), 1), (out.as_fd(), 2)] {
        nix::unistd::dup2(src.as_raw_fd(), dst)?;
    }
    Ok(())
}

fn serve(
    listen: &Listen,
    once: bool,
    background: bool,
    log: Option<&Path>,
    timeout: Duration,
) -> io::Result<()> {
    let listener = Listener::bind(listen)?;
    eprintln!("vsock-tool: listening on {listen:?}");
    if background {
        daemonize(log)?;
    }
    loop {
        let fd = match listener.accept() {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let conn = Conn::new(fd, timeout)?;
        if once {
            return handle(conn);
        }
        std::thread::spawn(move || {
            if let Err(e) = handle(conn) {
                eprintln!("vsock-tool: connection: {e}");
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn latency(target: &Target, size: usize, count: usize, timeout: Duration) -> io::Result<()> {
    let mut conn = connect(target, timeout)?;
    conn.write_all(b"E")?;
    let mut out = vec![0u8; size];
    PrngStream::new().fill(&mut out);
    let mut back = vec![0u8; size];
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        conn.write_all(&out)?;
        conn.read_exact(&mut back)?;
        samples.push(t.elapsed());
        if back != out {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "echo differs from what was sent",
            ));
        }
    }
    // Dropping the connection closes it; the server's echo loop then sees EOF.
    let total: Duration = samples.iter().sum();
    samples.sort_unstable();
    println!(
        "latency size={size} count={count} avg_us={:.1} p50_us={:.1} p99_us={:.1} max_us={:.1}",
        us(total) / count as f64,
        us(percentile(&samples, 50.0)),
        us(percentile(&samples, 99.0)),
        us(samples.last().copied().unwrap_or_default()),
    );
    Ok(())
}

/// Returns whether the sink's count and hash matched.
fn throughput(
    target: &Target,
    bytes: u64,
    chunk: usize,
    half_close: bool,
    timeout: Duration,
) -> io::Result<bool> {
    // The expected hash is computed before the clock starts, so the timed loop only pays for
    // generating the bytes (cheap) and moving them.
    let mut expect = Fnv1a::new();
    {
        let mut prng = PrngStream::new();
        let mut buf = vec![0u8; chunk];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk as u64) as usize;
            prng.fill(&mut buf[..n]);
            expect.update(&buf[..n]);
            left -= n as u64;
        }
    }
    let expect = expect.finish();

    let mut conn = connect(target, timeout)?;
    let mut prng = PrngStream::new();
    let mut buf = vec![0u8; chunk];
    let t = Instant::now();
    if half_close {
        conn.write_all(b"S")?;
    } else {
        let mut head = [0u8; 9];
        head[0] = b'L';
        head[1..].copy_from_slice(&bytes.to_le_bytes());
        conn.write_all(&head)?;
    }
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk as u64) as usize;
        prng.fill(&mut buf[..n]);
        conn.write_all(&buf[..n])?;
        left -= n as u64;
    }
    if half_close {
        conn.shutdown_write()?;
    }
    let (mut count, mut hash) = ([0u8; 8], [0u8; 8]);
    conn.read_exact(&mut count)?;
    conn.read_exact(&mut hash)?;
    let secs = t.elapsed().as_secs_f64();
    let (count, hash) = (u64::from_le_bytes(count), u64::from_le_bytes(hash));
    let ok = count == bytes && hash == expect;
    println!(
        "throughput bytes={bytes} seconds={secs:.3} MiB_per_s={:.1} verified={}",
        bytes as f64 / (1u64 << 20) as f64 / secs,
        if ok { "yes" } else { "no" }
    );
    if !ok {
        eprintln!(
            "vsock-tool: sink saw {count} bytes hash {hash:#018x}; sent {bytes} bytes hash {expect:#018x}"
        );
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = match parse_args(&args) {
        Ok(cmd) => cmd,
        Err(e) => {
            eprintln!("vsock-tool: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match &cmd {
        Command::Serve {
            listen,
            once,
            background,
            log,
            timeout,
        } => serve(listen, *once, *background, log.as_deref(), *timeout).map(|()| true),
        Command::Latency {
            target,
            size,
            count,
            timeout,
        } => latency(target, *size, *count, *timeout).map(|()| true),
        Command::Throughput {
            target,
            bytes,
            chunk,
            half_close,
            timeout,
        } => throughput(target, *bytes, *chunk, *half_close, *timeout),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("vsock-tool: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_serve() {
        assert_eq!(
            parse_args(&args("serve --vsock-port 5202 --once")),
            Ok(Command::Serve {
                listen: Listen::Vsock(5202),
                once: true,
                background: false,
                log: None,
                timeout: DEFAULT_TIMEOUT,
            })
        );
        assert_eq!(
            parse_args(&args(
                "serve --unix /tmp/u_5201 --background --log /tmp/l --timeout 2.5"
            )),
            Ok(Command::Serve {
                listen: Listen::Unix("/tmp/u_5201".into()),
                once: false,
                background: true,
                log: Some("/tmp/l".into()),
                timeout: Duration::from_millis(2500),
            })
        );
    }

    #[test]
    fn parses_clients() {
        assert_eq!(
            parse_args(&args("latency --vsock 2:5201 --count 10")),
            Ok(Command::Latency {
                target: Target::Vsock { cid: 2, port: 5201 },
                size: 64,
                count: 10,
                timeout: DEFAULT_TIMEOUT,
            })
        );
        assert_eq!(
            parse_args(&args(
                "throughput --uds /a:b/u.sock:5202 --bytes 64M --chunk 4K --half-close"
            )),
            Ok(Command::Throughput {
                target: Target::Uds {
                    path: "/a:b/u.sock".into(),
                    port: 5202
                },
                bytes: 64 << 20,
                chunk: 4096,
                half_close: true,
                timeout: DEFAULT_TIMEOUT,
            })
        );
    }

    #[test]
    fn rejects_bad_usage() {
        for bad in [
            "",
            "frobnicate",
            "serve",
            "serve --vsock-port 1 --unix /x",
            "serve --vsock-port",
            "serve --vsock-port x",
            "serve --unix /x --log /l",
            "latency --size 64",
            "latency --vsock 2",
            "latency --vsock 2:1 --count 0",
            "latency --vsock 2:1 --bytes 1",
            "throughput --vsock 2:1",
            "throughput --uds :5 --bytes 1",
            "throughput --uds /u:5 --bytes 1 --timeout 0",
            "throughput --uds /u:5 --bytes 99999999999G",
        ] {
            assert!(parse_args(&args(bad)).is_err(), "accepted '{bad}'");
        }
    }

    #[test]
    fn fnv1a_known_values() {
        let h = |d: &[u8]| {
            let mut f = Fnv1a::new();
            f.update(d);
            f.finish()
        };
        assert_eq!(h(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(h(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(h(b"foobar"), 0x8594_4171_f739_67e8);
        let mut split = Fnv1a::new();
        split.update(b"foo");
        split.update(b"bar");
        assert_eq!(split.finish(), h(b"foobar"));
    }

    #[test]
    fn prng_stream_is_fixed_and_split_independent() {
        let mut whole = vec![0u8; 1000];
        PrngStream::new().fill(&mut whole);
        // SplitMix64's first output for this seed, little-endian: pins the stream so the two
        // ends of a benchmark built at different times still agree.
        assert_eq!(whole[..8], 0x119d_16a8_6867_77c2u64.to_le_bytes());
        for splits in [&[1usize, 7, 8, 3, 981][..], &[13, 500, 487], &[999, 1]] {
            let mut s = PrngStream::new();
            let mut got = Vec::new();
            for &n in splits {
                let mut b = vec![0u8; n];
                s.fill(&mut b);
                got.extend_from_slice(&b);
            }
            assert_eq!(got, whole, "splits {splits:?}");
        }
        assert!(whole.windows(8).any(|w| w != [0; 8]));
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_micros(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_micros(99));
        assert_eq!(percentile(&v[..1], 99.0), Duration::from_micros(1));
    }
}
