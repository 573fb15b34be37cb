//! qemu-vsock-bench: virtio-vsock through our vhost-user backend (`vhost`) against rust-vmm's
//! `vhost-device-vsock`, with the same guest image in the same run (the QEMU part of
//! `make bench`; `tests/scripts/bench-qemu.sh` builds the reference backend and calls this).
//!
//! For each backend and round: start the backend, a host `vsock-tool serve` on the backend's
//! `<uds>_5201`, boot the guest (`cusedev_tests::qemu`), then
//! - in the guest: `vsock-tool latency` and `throughput` to the host (CID 2, port 5201);
//! - in the guest: `vsock-tool serve --vsock-port 5202 --background`, then on the host
//!   `vsock-tool latency` and `throughput --uds <uds>:5202` (host -> guest);
//!
//! and power the guest off. Rounds alternate the backends so a slow phase of this shared
//! machine hits both; the table shows each figure's median over the rounds and the ratio
//! ours/theirs. Every raw line is appended to the `--raw` file.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use cusedev_tests::qemu::{Guest, GuestConfig, GuestImage};

const USAGE: &str = "\
usage: qemu-vsock-bench --bin-dir DIR --theirs PATH --work DIR --raw FILE
                        [--backends ours,theirs] [--rounds 3] [--count 1000] [--bytes 64M]
                        [--cpus 1]
  --bin-dir   holds `vhost` and `vsock-tool`; must be visible in the guest (not under /run
              or /dev, which the guest mounts itself)
  --theirs    the vhost-device-vsock binary
  --work      sockets and logs (host only)
  --raw       the raw result lines are appended here";

const GUEST_CID: u32 = 3;
const HOST_CID: u32 = 2;
/// Host port the guest connects to (a Unix listener at `<uds>_5201` on the host).
const G2H_PORT: u32 = 5201;
/// Guest port the host connects to (through `CONNECT 5202` on `<uds>`).
const H2G_PORT: u32 = 5202;
const SIZE: usize = 64;
/// Bound on each vsock-tool run; vsock-tool's own 30 s read timeout normally fires first.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a backend may take to listen on its vhost-user socket.
const BACKEND_READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Ours,
    Theirs,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Ours => "ours",
            Backend::Theirs => "theirs",
        }
    }
}

struct Opts {
    bin_dir: PathBuf,
    theirs: PathBuf,
    work: PathBuf,
    raw: PathBuf,
    backends: Vec<Backend>,
    rounds: usize,
    count: usize,
    bytes: u64,
    /// Guest vCPUs (each a host thread under TCG).
    cpus: u32,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let (digits, mult) = match s.strip_suffix(['M', 'm']) {
        Some(d) => (d, 1u64 << 20),
        None => (s, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("bad byte count '{s}'"))
}

fn parse_opts(args: &[String]) -> Result<Opts, String> {
    let mut bin_dir = None;
    let mut theirs = None;
    let mut work = None;
    let mut raw = None;
    let mut backends = vec![Backend::Ours, Backend::Theirs];
    let mut rounds = 3;
    let mut count = 1000;
    let mut bytes = 64 << 20;
    // One vCPU: under TCG each vCPU is a busy host thread, and on a 2-core host a second one
    // competes with the backend being measured (2 vCPUs measured slower and noisier).
    let mut cpus = 1;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value"))?
            .as_str();
        let number = |v: &str| {
            v.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{flag}: bad number '{v}'"))
        };
        match flag.as_str() {
            "--bin-dir" => bin_dir = Some(PathBuf::from(value)),
            "--theirs" => theirs = Some(PathBuf::from(value)),
            "--work" => work = Some(PathBuf::from(value)),
            "--raw" => raw = Some(PathBuf::from(value)),
            "--rounds" => rounds = number(value)?,
            "--count" => count = number(value)?,
            "--bytes" => bytes = parse_bytes(value)?,
            "--cpus" => cpus = number(value)? as u32,
            "--backends" => {
                backends = value
                    .split(',')
                    .map(|b| match b {
                        "ours" => Ok(Backend::Ours),
                        "theirs" => Ok(Backend::Theirs),
                        _ => Err(format!("unknown backend '{b}' (ours, theirs)")),
                    })
                    .collect::<Result<_, _>>()?;
            }
            _ => return Err(format!("unknown option '{flag}'")),
        }
    }
    Ok(Opts {
        bin_dir: bin_dir.ok_or("--bin-dir is required")?,
        theirs: theirs.ok_or("--theirs is required")?,
        work: work.ok_or("--work is required")?,
        raw: raw.ok_or("--raw is required")?,
        backends,
        rounds,
        count,
        bytes,
        cpus,
    })
}

/// A child process that is killed (and reaped) when dropped, so no exit path of the bench
/// leaves a backend or a server running.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether a Unix socket is listening at `path`, from /proc/net/unix (flag __SO_ACCEPTCON).
fn unix_listening(path: &Path) -> bool {
    let Ok(table) = fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // Num RefCount Protocol Flags Type St Inode Path
        cols.len() >= 8
            && cols[7] == want
            && u32::from_str_radix(cols[3], 16).is_ok_and(|f| f & 0x1_0000 != 0)
    })
}

/// Waits until the backend listens on its vhost-user socket. Neither backend announces
/// readiness, and a probe connection would be taken for the VMM (ours serves one with
/// `--once`), so the listening state is polled in the kernel's table instead.
fn wait_listening(path: &Path, backend: &mut Child, log: &Path) -> Result<(), String> {
    let deadline = Instant::now() + BACKEND_READY_TIMEOUT;
    while !unix_listening(path) {
        if let Ok(Some(status)) = backend.try_wait() {
            return Err(format!(
                "the backend exited ({status}) before listening on {}; its log:\n{}",
                path.display(),
                fs::read_to_string(log).unwrap_or_default()
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the backend did not listen on {} within {BACKEND_READY_TIMEOUT:?}",
                path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn remove_stale(path: &Path) {
    let _ = fs::remove_file(path);
}

/// `key=value` fields of a vsock-tool result line.
fn fields(line: &str) -> HashMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect()
}

fn field(line: &str, key: &str) -> Result<f64, String> {
    fields(line)
        .get(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no {key}= in '{line}'"))
}

/// The one line of `output` starting with `prefix` (vsock-tool prints nothing else on
/// success; the guest merges stderr in).
fn result_line(output: &str, prefix: &str, what: &str) -> Result<String, String> {
    output
        .lines()
        .find(|l| l.starts_with(prefix))
        .map(str::to_string)
        .ok_or_else(|| format!("{what}: no '{prefix}' line in its output:\n{output}"))
}

/// The figures of one round of one backend.
#[derive(Clone, Debug, Default)]
struct Figures {
    boot_s: f64,
    g2h_avg_us: f64,
    g2h_p50_us: f64,
    g2h_p99_us: f64,
    g2h_mib_s: f64,
    h2g_avg_us: f64,
    h2g_p50_us: f64,
    h2g_p99_us: f64,
    h2g_mib_s: f64,
}

/// A table row: label, decimals, and how to read the figure.
type Row = (&'static str, usize, fn(&Figures) -> f64);

const ROWS: [Row; 9] = [
    ("boot to agent ready (s)", 2, |f| f.boot_s),
    ("guest->host 64 B round trip avg (us)", 1, |f| f.g2h_avg_us),
    ("guest->host 64 B round trip p50 (us)", 1, |f| f.g2h_p50_us),
    ("guest->host 64 B round trip p99 (us)", 1, |f| f.g2h_p99_us),
    ("guest->host throughput (MiB/s)", 1, |f| f.g2h_mib_s),
    ("host->guest 64 B round trip avg (us)", 1, |f| f.h2g_avg_us),
    ("host->guest 64 B round trip p50 (us)", 1, |f| f.h2g_p50_us),
    ("host->guest 64 B round trip p99 (us)", 1, |f| f.h2g_p99_us),
    ("host->guest throughput (MiB/s)", 1, |f| f.h2g_mib_s),
];

struct Run<'a> {
    opts: &'a Opts,
    image: &'a GuestImage,
    raw: File,
}

impl Run<'_> {
    fn tool(&self) -> PathBuf {
        self.opts.bin_dir.join("vsock-tool")
    }

    fn record(&mut self, backend: Backend, round: usize, line: &str) {
        let tagged = format!("backend={} round={round} {line}", backend.name());
        println!("  {tagged}");
        // The raw file is the record; failing to write it is worth a warning, not a lost run.
        if let Err(e) = writeln!(self.raw, "{tagged}") {
            eprintln!("qemu-vsock-bench: writing {}: {e}", self.opts.raw.display());
        }
    }

    fn start_backend(&self, backend: Backend, dir: &Path) -> Result<Reaped, String> {
        let socket = dir.join("vhost-user.sock");
        let uds = dir.join("vsock.sock");
        let log = dir.join("backend.log");
        for p in [&socket, &uds] {
            remove_stale(p);
        }
        let mut cmd = match backend {
            Backend::Ours => {
                let mut c = Command::new(self.opts.bin_dir.join("vhost"));
                // The bus socket is only dialled for cusedev's own streams, which this bench
                // does not open: a path nobody listens on will do.
                c.arg("--socket")
                    .arg(&socket)
                    .arg("--guest-cid")
                    .arg(GUEST_CID.to_string())
                    .arg("--host")
                    .arg(format!("unix:{}", dir.join("no-bus.sock").display()))
                    .arg("--uds-path")
                    .arg(&uds)
                    .arg("--once");
                c
            }
            Backend::Theirs => {
                let mut c = Command::new(&self.opts.theirs);
                c.arg("--vm").arg(format!(
                    "guest-cid={GUEST_CID},socket={},uds-path={}",
                    socket.display(),
                    uds.display()
                ));
                c
            }
        };
        let log_file = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = cmd
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
        let mut child = Reaped(child);
        wait_listening(&socket, &mut child.0, &log)?;
        Ok(child)
    }

    /// The host's guest->host server; returns once it listens (it says so on stderr).
    fn start_host_server(&self, path: &Path, log: &Path) -> Result<Reaped, String> {
        remove_stale(path);
        let child = Command::new(self.tool())
            .args(["serve", "--unix"])
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start vsock-tool: {e}"))?;
        let mut child = Reaped(child);
        let stderr = child.0.stderr.take().ok_or("no stderr pipe")?;
        let mut stderr = BufReader::new(stderr);
        let mut line = String::new();
        stderr
            .read_line(&mut line)
            .map_err(|e| format!("vsock-tool serve: {e}"))?;
        if !line.contains("listening") {
            return Err(format!("vsock-tool serve --unix: {line}"));
        }
        // Keep draining its stderr into a log so it can never block on a full pipe.
        let mut log = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        std::thread::spawn(move || io::copy(&mut stderr, &mut log));
        Ok(child)
    }

    /// A vsock-tool client on the host; returns its result line.
    fn host_tool(&self, args: &[String], prefix: &str) -> Result<String, String> {
        let out = Command::new(self.tool())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run vsock-tool: {e}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            return Err(format!(
                "host: vsock-tool {} failed ({}):\n{text}",
                args.join(" "),
                out.status
            ));
        }
        result_line(&text, prefix, "host vsock-tool")
    }

    fn guest_tool(&self, guest: &mut Guest, args: &str, prefix: &str) -> Result<String, String> {
        let cmd = format!("{} {args}", self.tool().display());
        let out = guest
            .run(&cmd, STEP_TIMEOUT)
            .map_err(|e| format!("guest: {e}"))?;
        if !out.success() {
            return Err(format!(
                "guest: `{cmd}` exited with {}:\n{}",
                out.status, out.output
            ));
        }
        result_line(&out.output, prefix, &cmd)
    }

    fn one(&mut self, backend: Backend, round: usize) -> Result<Figures, String> {
        let dir = self.opts.work.join(backend.name());
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let uds = dir.join("vsock.sock");
        let socket = dir.join("vhost-user.sock");
        let count = self.opts.count;
        let bytes = self.opts.bytes;

        let _backend = self.start_backend(backend, &dir)?;
        let g2h_path = PathBuf::from(format!("{}_{G2H_PORT}", uds.display()));
        let _server = self.start_host_server(&g2h_path, &dir.join("host-serve.log"))?;

        let config = GuestConfig {
            vhost_user_vsock: Some(socket),
            cpus: self.opts.cpus,
            ..GuestConfig::named(&format!("vsock-bench-{}", backend.name()))
        };
        let mut guest = Guest::boot(self.image, config).map_err(|e| format!("boot: {e}"))?;
        let mut f = Figures {
            boot_s: guest.boot_seconds(),
            ..Figures::default()
        };
        self.record(backend, round, &format!("boot seconds={:.2}", f.boot_s));

        let line = self.guest_tool(
            &mut guest,
            &format!("latency --vsock {HOST_CID}:{G2H_PORT} --size {SIZE} --count {count}"),
            "latency ",
        )?;
        self.record(backend, round, &format!("g2h {line}"));
        (f.g2h_avg_us, f.g2h_p50_us, f.g2h_p99_us) = (
            field(&line, "avg_us")?,
            field(&line, "p50_us")?,
            field(&line, "p99_us")?,
        );

        let line = self.guest_tool(
            &mut guest,
            &format!("throughput --vsock {HOST_CID}:{G2H_PORT} --bytes {bytes}"),
            "throughput ",
        )?;
        self.record(backend, round, &format!("g2h {line}"));
        f.g2h_mib_s = field(&line, "MiB_per_s")?;

        // `--background` returns once the guest listens: the host may connect right after.
        let out = guest
            .run(
                &format!(
                    "{} serve --vsock-port {H2G_PORT} --background --log /tmp/vsock-serve.log",
                    self.tool().display()
                ),
                STEP_TIMEOUT,
            )
            .map_err(|e| format!("guest: {e}"))?;
        if !out.success() {
            return Err(format!("guest: vsock-tool serve failed:\n{}", out.output));
        }

        let target = format!("{}:{H2G_PORT}", uds.display());
        let args = |rest: &str| -> Vec<String> {
            let mut v: Vec<String> = rest.split_whitespace().map(String::from).collect();
            v.splice(1..1, ["--uds".to_string(), target.clone()]);
            v
        };
        let line = self.host_tool(
            &args(&format!("latency --size {SIZE} --count {count}")),
            "latency ",
        )?;
        self.record(backend, round, &format!("h2g {line}"));
        (f.h2g_avg_us, f.h2g_p50_us, f.h2g_p99_us) = (
            field(&line, "avg_us")?,
            field(&line, "p50_us")?,
            field(&line, "p99_us")?,
        );

        let line = self.host_tool(&args(&format!("throughput --bytes {bytes}")), "throughput ")?;
        self.record(backend, round, &format!("h2g {line}"));
        f.h2g_mib_s = field(&line, "MiB_per_s")?;

        guest.poweroff().map_err(|e| format!("poweroff: {e}"))?;
        Ok(f)
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "version unknown".into())
}

fn table(opts: &Opts, results: &HashMap<&'static str, Vec<Figures>>) -> String {
    let med = |b: Backend, row: fn(&Figures) -> f64| {
        results
            .get(b.name())
            .and_then(|v| median(v.iter().map(row).collect()))
    };
    let cell = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
    let mut t = String::new();
    let _ = writeln!(
        t,
        "QEMU (TCG, {} vCPU) virtio-vsock, median of {} round(s); ours = vhost, theirs = {}",
        opts.cpus,
        opts.rounds,
        version(&opts.theirs)
    );
    let _ = writeln!(
        t,
        "latency: {} round trips of {SIZE} B (lower is better); throughput: {} MiB, verified",
        opts.count,
        opts.bytes >> 20
    );
    let _ = writeln!(
        t,
        "{:<40} {:>10} {:>10} {:>12}",
        "", "ours", "theirs", "ours/theirs"
    );
    for (label, prec, row) in ROWS {
        let (o, th) = (med(Backend::Ours, row), med(Backend::Theirs, row));
        let ratio = match (o, th) {
            (Some(o), Some(th)) if th > 0.0 => format!("{:.2}", o / th),
            _ => "-".into(),
        };
        let _ = writeln!(
            t,
            "{label:<40} {:>10} {:>10} {ratio:>12}",
            cell(o, prec),
            cell(th, prec)
        );
    }
    t
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The guest runs the tools by the path the host sees: it must be absolute.
    let opts = match parse_opts(&args).and_then(|mut o| {
        o.bin_dir = fs::canonicalize(&o.bin_dir)
            .map_err(|e| format!("--bin-dir {}: {e}", o.bin_dir.display()))?;
        // Absolute socket paths too: the backends' listening state is looked up by path in
        // /proc/net/unix, which shows the path as it was bound.
        fs::create_dir_all(&o.work).map_err(|e| format!("{}: {e}", o.work.display()))?;
        o.work = fs::canonicalize(&o.work).map_err(|e| format!("{}: {e}", o.work.display()))?;
        Ok(o)
    }) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("qemu-vsock-bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match bench(&opts) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("qemu-vsock-bench: {e}");
            ExitCode::from(1)
        }
    }
}

/// Returns whether every round of every backend succeeded.
fn bench(opts: &Opts) -> Result<bool, String> {
    for dir in ["/run/", "/dev/"] {
        if opts.bin_dir.starts_with(dir) {
            return Err(format!(
                "{} is not visible in the guest, which mounts its own {dir}",
                opts.bin_dir.display()
            ));
        }
    }
    fs::create_dir_all(&opts.work).map_err(|e| format!("{}: {e}", opts.work.display()))?;
    let image = GuestImage::ensure().map_err(|e| format!("guest image: {e}"))?;
    let mut raw = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&opts.raw)
        .map_err(|e| format!("{}: {e}", opts.raw.display()))?;
    let stamp = Command::new("date")
        .arg("-Is")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let _ = writeln!(
        raw,
        "# {stamp} qemu-vsock-bench: {} round(s), count={} bytes={}, {} vCPU, guest {}; theirs = {}",
        opts.rounds,
        opts.count,
        opts.bytes,
        opts.cpus,
        image.kver,
        version(&opts.theirs)
    );
    let mut run = Run {
        opts,
        image: &image,
        raw,
    };

    let mut results: HashMap<&'static str, Vec<Figures>> = HashMap::new();
    let mut ok = true;
    for round in 1..=opts.rounds {
        for &backend in &opts.backends {
            println!("round {round}, backend {}:", backend.name());
            match run.one(backend, round) {
                Ok(f) => results.entry(backend.name()).or_default().push(f),
                Err(e) => {
                    ok = false;
                    run.record(backend, round, "FAILED");
                    eprintln!("qemu-vsock-bench: {} round {round}: {e}", backend.name());
                }
            }
        }
    }
    let t = table(opts, &results);
    print!("\n{t}");
    let _ = write!(run.raw, "{t}");
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_result_lines() {
        let out = "noise\nlatency size=64 count=10 avg_us=12.5 p50_us=11.0 p99_us=40.2 \
                   max_us=50.0\n";
        let line = result_line(out, "latency ", "t").unwrap();
        assert_eq!(field(&line, "avg_us"), Ok(12.5));
        assert_eq!(field(&line, "p99_us"), Ok(40.2));
        assert!(field(&line, "MiB_per_s").is_err());
        assert!(result_line(out, "throughput ", "t").is_err());
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn parses_options() {
        let a: Vec<String> = "--bin-dir b --theirs t --work w --raw r --backends theirs \
                              --rounds 1 --bytes 8M"
            .split_whitespace()
            .map(String::from)
            .collect();
        let o = parse_opts(&a).unwrap();
        assert_eq!(o.backends, vec![Backend::Theirs]);
        assert_eq!((o.rounds, o.count, o.bytes), (1, 1000, 8 << 20));
        assert!(parse_opts(&a[..2]).is_err());
        let mut bad = a.clone();
        bad[9] = "mine".into();
        assert!(parse_opts(&bad).is_err());
    }
}
