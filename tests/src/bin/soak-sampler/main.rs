//! soak-sampler: the measuring half of `make soak` (tests/scripts/soak.sh, docs/soak.md).
//!
//! The script starts the long-lived processes (fakehost, cusedev, the daemon, the blob store)
//! and the workloads; this program watches the processes through /proc:
//!
//! ```text
//! soak-sampler sample --out CSV --phase-file FILE [--interval SECS] NAME=PID...
//! soak-sampler settle --out CSV --phase NAME [--baseline CSV] [--window SECS] [--limit SECS] NAME=PID...
//! soak-sampler report --samples CSV --baseline CSV --end CSV
//! ```
//!
//! - `sample` appends one row per process every interval (default 2 s) to CSV, tagged with
//!   the phase named in FILE (the script writes it), until FILE says `stop`; a process that
//!   is gone ends it with exit status 1.
//! - `settle` waits (bounded) until the processes are quiet (`settle.rs`) and, with
//!   `--baseline`, back at that baseline (`rule.rs`), then writes their sample to CSV; exit
//!   status 1 if the limit passed first (the last sample is written all the same).
//! - `report` prints the table and applies the flatness rule; exit status 1 if a process
//!   failed it.
//!
//! Rust rather than a script so that the rule reads the engine's own reader bound
//! (`cusedev::fuse::session::MAX_READERS`) instead of a copy of the number, and so that the
//! rule has unit tests. Exit status 2 is bad usage.

mod procfs;
mod report;
mod rows;
mod rule;
mod settle;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use rows::{parse_all, Row, HEADER};
use settle::{sample_all, settle, Settled};

const USAGE: &str = "usage: soak-sampler sample --out CSV --phase-file FILE [--interval SECS] NAME=PID...\n\
       soak-sampler settle --out CSV --phase NAME [--baseline CSV] [--window SECS] [--limit SECS] NAME=PID...\n\
       soak-sampler report --samples CSV --baseline CSV --end CSV";

/// Options (`--name value`) and the NAME=PID list of one command line.
struct Args {
    options: Vec<(String, String)>,
    procs: Vec<(String, u32)>,
}

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
        let (mut options, mut procs) = (Vec::new(), Vec::new());
        while let Some(arg) = args.next() {
            if let Some(name) = arg.strip_prefix("--") {
                let value = args.next().ok_or(format!("--{name} needs a value"))?;
                options.push((name.to_owned(), value));
            } else {
                let (name, pid) = arg
                    .split_once('=')
                    .and_then(|(n, p)| Some((n.to_owned(), p.parse().ok()?)))
                    .ok_or(format!("{arg:?} is not NAME=PID"))?;
                procs.push((name, pid));
            }
        }
        Ok(Args { options, procs })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn need(&self, name: &str) -> Result<&str, String> {
        self.get(name).ok_or(format!("--{name} is missing"))
    }

    fn seconds(&self, name: &str, default: f64) -> Result<Duration, String> {
        match self.get(name) {
            None => Ok(Duration::from_secs_f64(default)),
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64)
                .ok_or(format!("--{name} {v:?} is not seconds")),
        }
    }
}

/// An error of the run itself (exit 1), as opposed to bad usage (exit 2).
enum Failure {
    Usage(String),
    Run(String),
}

impl From<String> for Failure {
    fn from(text: String) -> Failure {
        Failure::Usage(text)
    }
}

fn read_rows(path: &str) -> Result<Vec<Row>, Failure> {
    let text = fs::read_to_string(path).map_err(|e| Failure::Run(format!("{path}: {e}")))?;
    parse_all(&text).map_err(|e| Failure::Run(format!("{path}: {e}")))
}

fn write_rows(path: &str, rows: &[Row], append: bool) -> Result<(), Failure> {
    let run = |e: std::io::Error| Failure::Run(format!("{path}: {e}"));
    let mut file = OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(path)
        .map_err(run)?;
    if file.metadata().map_err(run)?.len() == 0 {
        writeln!(file, "{HEADER}").map_err(run)?;
    }
    for row in rows {
        writeln!(file, "{row}").map_err(run)?;
    }
    Ok(())
}

fn cmd_sample(args: &Args) -> Result<(), Failure> {
    let out = args.need("out")?;
    let phase_file = args.need("phase-file")?;
    let interval = args.seconds("interval", 2.0)?;
    if args.procs.is_empty() {
        return Err(Failure::Usage("no NAME=PID to sample".into()));
    }
    loop {
        let phase = fs::read_to_string(phase_file)
            .map(|p| p.trim().to_owned())
            .map_err(|e| Failure::Run(format!("{phase_file}: {e}")))?;
        if phase == "stop" {
            return Ok(());
        }
        let rows = sample_all(&args.procs, &phase)
            .map_err(|e| Failure::Run(format!("sample: {e}: the process is gone")))?;
        write_rows(out, &rows, true)?;
        // The sampling period, not a synchronisation: rows are taken every `interval`.
        std::thread::sleep(interval);
    }
}

fn cmd_settle(args: &Args) -> Result<(), Failure> {
    let out = args.need("out")?;
    let phase = args.need("phase")?;
    let window = args.seconds("window", 15.0)?;
    let limit = args.seconds("limit", 120.0)?;
    let baseline = match args.get("baseline") {
        Some(path) => Some(read_rows(path)?),
        None => None,
    };
    if args.procs.is_empty() {
        return Err(Failure::Usage("no NAME=PID to settle".into()));
    }
    match settle(&args.procs, phase, baseline.as_deref(), window, limit).map_err(Failure::Run)? {
        Settled::Yes(rows) => write_rows(out, &rows, false),
        Settled::No(rows, behind) => {
            write_rows(out, &rows, false)?;
            Err(Failure::Run(format!(
                "not settled{} within {limit:?}: {}",
                if baseline.is_some() {
                    " at the baseline"
                } else {
                    ""
                },
                behind.join(", ")
            )))
        }
    }
}

fn cmd_report(args: &Args) -> Result<(), Failure> {
    let samples = read_rows(args.need("samples")?)?;
    let baseline = read_rows(args.need("baseline")?)?;
    let end = read_rows(args.need("end")?)?;
    match report::report(&samples, &baseline, &end).map_err(Failure::Run)? {
        true => Ok(()),
        false => Err(Failure::Run("a process did not stay flat".into())),
    }
}

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1);
    let command = argv.next().unwrap_or_default();
    let result =
        Args::parse(argv)
            .map_err(Failure::Usage)
            .and_then(|args| match command.as_str() {
                "sample" => cmd_sample(&args),
                "settle" => cmd_settle(&args),
                "report" => cmd_report(&args),
                _ => Err(Failure::Usage(format!("unknown command {command:?}"))),
            });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(text)) => {
            eprintln!("soak-sampler: {text}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Run(text)) => {
            eprintln!("soak-sampler: {text}");
            ExitCode::FAILURE
        }
    }
}
