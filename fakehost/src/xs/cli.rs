//! `fakehost xs` (fault injection) and `fakehost blobs` (the blob store as the guest sees it),
//! the xs service's subcommands. Both talk to the running `fakehost serve` through its control
//! socket ([`super::command`]); files are opened here, with your permissions, and handed over
//! as open descriptors.
//!
//! Exit status: 0 done, 1 the store said no (no such blob, store failure), 2 usage error or
//! fakehost not reachable.

use std::fs::{File, OpenOptions};
use std::io::IsTerminal;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;
use vmbus::xs_fastpath::xstore::{check_name, check_prefix};

use super::command::{BlobReport, FaultReport, XsCommand};
use super::faults::Fault;
use super::store::{StoreSpec, DEFAULT_BLOB_ROOT};
use crate::cli::{os_reason, subcommand, usage_error, EXIT_GUEST_FAILED};
use crate::control::client::Client;
use crate::control::proto::Response;
use crate::service::ServiceCli;

/// The table's hook for the xs subcommands.
pub const CLI: ServiceCli = ServiceCli {
    augment: |cmd| XsCli::augment_subcommands(cmd),
    run,
    serve_args: |serve| ServeArgs::augment_args(serve),
};

// xs's options of `fakehost serve`: where the blobs are.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directory of the XStore service's blobs (created if missing)
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BLOB_ROOT,
          conflicts_with = "blob_store")]
    blob_root: PathBuf,
    /// The XStore service's blobs in another store instead: file:///DIR,
    /// azure://ACCOUNT/CONTAINER?endpoint=URL (key from AZURE_STORAGE_KEY; Azurite's
    /// devstoreaccount1 needs none) or s3://BUCKET?endpoint=URL&region=REGION (keys from
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)
    #[arg(long, value_name = "URL")]
    blob_store: Option<StoreSpec>,
}

/// The store `fakehost serve`'s options name; the default root when they are absent.
pub fn store_spec(serve_args: &clap::ArgMatches) -> StoreSpec {
    if let Ok(Some(spec)) = serve_args.try_get_one::<StoreSpec>("blob_store") {
        return spec.clone();
    }
    match serve_args.try_get_one::<PathBuf>("blob_root") {
        Ok(Some(root)) => StoreSpec::Local(root.clone()),
        _ => StoreSpec::Local(PathBuf::from(DEFAULT_BLOB_ROOT)),
    }
}

#[derive(Debug, Subcommand)]
enum XsCli {
    /// Inject faults into the XStore host (/dev/azure_xs_fastpath's VSP), or show the one in force.
    ///
    /// At most one option; none shows the fault in force and how many requests were dropped.
    /// A fault applies to requests that arrive after it is set.
    #[command(after_help = "Examples:\n  \
        fakehost xs --delay 200ms        # each store operation takes 200 ms longer\n  \
        fakehost xs --fail-status 5      # every request answered STORE_ERROR\n  \
        fakehost xs --drop-responses     # requests are read, never answered\n  \
        fakehost xs --normal")]
    Xs {
        #[command(flatten)]
        fault: FaultArgs,
    },

    /// List, store, fetch and delete the blobs the XStore host serves to the guest.
    ///
    /// These go through the running `fakehost serve`, so they see exactly the store and the
    /// names the guest sees (`fakehost serve --blob-root/--blob-store`). Names: 1-1024 bytes
    /// of UTF-8, segments separated by '/', no empty, '.' or '..' segment, no control
    /// characters, not ending in '#' and digits. Exit status: 0 done, 1 the store said no,
    /// 2 usage error or fakehost not reachable.
    #[command(after_help = "Examples:\n  \
        fakehost blobs put logs/today.txt ./today.txt\n  \
        fakehost blobs ls logs/\n  \
        fakehost blobs get logs/today.txt - | sha256sum\n  \
        fakehost blobs rm logs/today.txt")]
    Blobs {
        #[command(subcommand)]
        command: BlobsCommand,
    },
}

#[derive(Debug, Args)]
#[group(multiple = false)]
struct FaultArgs {
    /// Delay every store operation by DURATION (200ms, 2s, 1m); a request whose timeout_ms is
    /// shorter answers TIMEOUT
    #[arg(long, value_name = "DURATION", value_parser = parse_delay)]
    delay: Option<Duration>,
    /// Answer every request with status N (1 BAD_REQUEST .. 9 GUEST_MEMORY, or any other
    /// non-zero value) without touching the store
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    fail_status: Option<u32>,
    /// Take requests off the channel and never answer them (the posted driver then waits
    /// forever)
    #[arg(long)]
    drop_responses: bool,
    /// End fault injection
    #[arg(long)]
    normal: bool,
}

impl FaultArgs {
    fn fault(&self) -> Option<Fault> {
        if let Some(delay) = self.delay {
            Some(Fault::Delay {
                ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            })
        } else if let Some(status) = self.fail_status {
            Some(Fault::FailStatus { status })
        } else if self.drop_responses {
            Some(Fault::DropResponses)
        } else if self.normal {
            Some(Fault::Normal)
        } else {
            None
        }
    }
}

fn parse_delay(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (e.g. 200ms, 2s, 1m)"))
}

#[derive(Debug, Subcommand)]
enum BlobsCommand {
    /// List the blobs whose names start with PREFIX (all without one), in name order
    Ls {
        /// A plain string prefix ("logs/" or "logs/2024-")
        prefix: Option<String>,
        /// Show each blob's size in bytes before its name
        #[arg(short, long)]
        long: bool,
    },
    /// Store FILE ('-': standard input) as blob NAME, replacing it atomically
    Put {
        /// The blob
        name: String,
        /// The file to store, read to its end
        file: PathBuf,
    },
    /// Write blob NAME to FILE (replaced only once the whole blob is there) or standard output
    Get {
        /// The blob
        name: String,
        /// Where to write it ('-' or none: standard output)
        file: Option<PathBuf>,
    },
    /// Delete blob NAME
    Rm {
        /// The blob
        name: String,
    },
}

fn run(matches: &clap::ArgMatches, control: &Path) -> Option<ExitCode> {
    Some(match subcommand::<XsCli>(matches)? {
        XsCli::Xs { fault } => xs(control, fault.fault()),
        XsCli::Blobs { command } => blobs(control, command),
    })
}

fn xs(control: &Path, set: Option<Fault>) -> ExitCode {
    let report: FaultReport = match ask(control, "xs", XsCommand::Fault { set }, None) {
        Ok(report) => report,
        Err(code) => return code,
    };
    let verb = if set.is_some() { "now" } else { "in force" };
    println!("xs fault {verb}: {}", report.description);
    if report.dropped > 0 || report.fault == Fault::DropResponses {
        println!("requests dropped so far: {}", report.dropped);
    }
    ExitCode::SUCCESS
}

/// Sends one xs command and reads its result; `Err` is the exit status, the error printed.
fn ask<T: DeserializeOwned>(
    control: &Path,
    what: &str,
    command: XsCommand,
    fd: Option<BorrowedFd<'_>>,
) -> Result<T, ExitCode> {
    let mut client = Client::connect(control).map_err(|e| usage_error(what, e))?;
    client
        .send(&command.into_request(), fd)
        .map_err(|e| usage_error(what, e))?;
    match client.final_response() {
        Ok(Response::Result { result }) => serde_json::from_value(result)
            .map_err(|e| usage_error(what, format!("unreadable answer from fakehost: {e}"))),
        Ok(Response::Error { error }) => Err(usage_error(what, error)),
        Ok(other) => Err(usage_error(
            what,
            format!("unexpected answer from fakehost: {other:?}"),
        )),
        Err(e) => Err(usage_error(what, e)),
    }
}

impl BlobsCommand {
    /// "blobs ls", for messages.
    fn what(&self) -> &'static str {
        match self {
            BlobsCommand::Ls { .. } => "blobs ls",
            BlobsCommand::Put { .. } => "blobs put",
            BlobsCommand::Get { .. } => "blobs get",
            BlobsCommand::Rm { .. } => "blobs rm",
        }
    }

    /// The name (or prefix) checked by the protocol's rules, before anything is sent.
    fn check(&self) -> Result<(), String> {
        let (name, checked) = match self {
            BlobsCommand::Ls { prefix, .. } => {
                let prefix = prefix.as_deref().unwrap_or_default();
                (prefix, check_prefix(prefix))
            }
            BlobsCommand::Put { name, .. }
            | BlobsCommand::Get { name, .. }
            | BlobsCommand::Rm { name } => (name.as_str(), check_name(name)),
        };
        checked.map_err(|e| format!("{name:?}: {e}"))
    }
}

fn blobs(control: &Path, command: BlobsCommand) -> ExitCode {
    if let Err(e) = command.check() {
        return usage_error(command.what(), e);
    }
    match command {
        BlobsCommand::Ls { prefix, long } => {
            let prefix = prefix.unwrap_or_default();
            blob_command(
                control,
                "blobs ls",
                XsCommand::Ls { prefix },
                None,
                |report| {
                    for blob in &report.blobs {
                        if long {
                            println!("{:>12} {}", blob.size, blob.name);
                        } else {
                            println!("{}", blob.name);
                        }
                    }
                    if report.blobs.is_empty() {
                        eprintln!("fakehost blobs ls: no blobs");
                    }
                },
            )
        }
        BlobsCommand::Put { name, file } => put(control, name, &file),
        BlobsCommand::Get { name, file } => get(control, name, file.as_deref()),
        BlobsCommand::Rm { name } => blob_command(
            control,
            "blobs rm",
            XsCommand::Rm { name },
            None,
            |report| println!("{}", report.message),
        ),
    }
}

/// Runs a blob command: `done` prints a success; a failure is printed here (exit 1).
fn blob_command(
    control: &Path,
    what: &str,
    command: XsCommand,
    fd: Option<BorrowedFd<'_>>,
    done: impl FnOnce(&BlobReport),
) -> ExitCode {
    let report: BlobReport = match ask(control, what, command, fd) {
        Ok(report) => report,
        Err(code) => return code,
    };
    if report.ok {
        done(&report);
        ExitCode::SUCCESS
    } else {
        eprintln!("fakehost {what}: {}", report.message);
        ExitCode::from(EXIT_GUEST_FAILED)
    }
}

fn put(control: &Path, name: String, file: &Path) -> ExitCode {
    let command = XsCommand::Put { name };
    if file == Path::new("-") {
        let stdin = std::io::stdin();
        return blob_command(control, "blobs put", command, Some(stdin.as_fd()), |r| {
            println!("{}", r.message)
        });
    }
    let opened = match File::open(file) {
        Ok(opened) => opened,
        Err(e) => {
            return usage_error(
                "blobs put",
                format!("cannot open {}: {}", file.display(), os_reason(&e)),
            )
        }
    };
    if opened.metadata().is_ok_and(|m| m.is_dir()) {
        return usage_error("blobs put", format!("{} is a directory", file.display()));
    }
    blob_command(control, "blobs put", command, Some(opened.as_fd()), |r| {
        println!("{}", r.message)
    })
}

fn get(control: &Path, name: String, file: Option<&Path>) -> ExitCode {
    let command = XsCommand::Get { name };
    let Some(file) = file.filter(|f| *f != Path::new("-")) else {
        let stdout = std::io::stdout();
        if stdout.is_terminal() {
            eprintln!("fakehost blobs get: writing the blob to the terminal");
        }
        return blob_command(control, "blobs get", command, Some(stdout.as_fd()), |r| {
            eprintln!("fakehost blobs get: {}", r.message)
        });
    };
    // The blob goes to a new file beside FILE, renamed over it once complete: a failed get
    // leaves FILE as it was.
    let partial = partial_path(file);
    let out = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&partial)
    {
        Ok(out) => out,
        Err(e) => {
            return usage_error(
                "blobs get",
                format!("cannot create {}: {}", partial.display(), os_reason(&e)),
            )
        }
    };
    let mut report = None;
    let code = blob_command(control, "blobs get", command, Some(out.as_fd()), |r| {
        report = Some(r.message.clone())
    });
    drop(out);
    let Some(message) = report else {
        let _ = std::fs::remove_file(&partial);
        return code;
    };
    if let Err(e) = std::fs::rename(&partial, file) {
        let _ = std::fs::remove_file(&partial);
        return usage_error(
            "blobs get",
            format!("cannot replace {}: {}", file.display(), os_reason(&e)),
        );
    }
    println!("{message}, written to {}", file.display());
    code
}

/// `DIR/.NAME.fakehost-PID` for `DIR/NAME`.
fn partial_path(file: &Path) -> PathBuf {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "blob".into());
    file.with_file_name(format!(".{name}.fakehost-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_takes_humantime_durations() {
        assert_eq!(parse_delay("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_delay("1m 30s"), Ok(Duration::from_secs(90)));
        let err = parse_delay("200").unwrap_err();
        assert!(err.contains("e.g. 200ms"), "{err}");
    }

    #[test]
    fn partial_file_sits_beside_the_target() {
        let p = partial_path(Path::new("/tmp/out/blob.bin"));
        assert_eq!(p.parent(), Some(Path::new("/tmp/out")));
        assert!(p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".blob.bin.fakehost-"));
    }
}
