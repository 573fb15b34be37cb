//! The `fakehost` command: run the fake Hyper-V host, or drive a running one.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use vmbus::address::BusAddress;

use fakehost::control::client::{self, Client, ClientError};
use fakehost::control::proto::{Request, Response, StatusReport};
use fakehost::names;
use fakehost::progress::{result_line, ProgressBar};
use fakehost::serve::{HostConfig, RunningHost};
use fakehost::service::ServiceKind;

/// Exit status when the guest said no or did not answer.
const EXIT_GUEST_FAILED: u8 = 1;
/// Exit status for usage errors and when fakehost cannot be reached.
const EXIT_USAGE: u8 = 2;

/// A fake Hyper-V host for cusedev's userspace VMBus devices.
///
/// `fakehost serve` plays the host: it listens for a guest (cusedev) on the bus socket, offers it
/// channels (fcopy), and listens for commands on a control socket. The other commands talk to a
/// running `fakehost serve` through that control socket.
#[derive(Debug, Parser)]
#[command(name = "fakehost", version, propagate_version = true)]
struct Cli {
    /// The control socket of `fakehost serve` [env: FAKEHOST_CONTROL]
    #[arg(
        long,
        global = true,
        env = "FAKEHOST_CONTROL",
        hide_env = true,
        default_value = "/run/cusedev/fakehost.ctl",
        value_name = "PATH"
    )]
    control: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the host: accept a guest on the bus and commands on the control socket.
    ///
    /// Creates missing parent directories (0755), replaces a stale socket file nothing answers
    /// on, and refuses to start if another fakehost is listening. The bus socket gets mode 0660,
    /// the control socket 0600. Logs to stderr (level info; set RUST_LOG to change it).
    /// SIGINT or SIGTERM removes both socket files and exits 0.
    #[command(after_help = "Example:\n  \
        fakehost serve --listen unix:/run/cusedev/bus.sock --offer fcopy --step-timeout 30")]
    Serve {
        /// Bus address to listen on: unix:/path (a QEMU guest reaches it through the vhost
        /// backend, `vhost --host unix:/path`)
        #[arg(
            long,
            default_value = "unix:/run/cusedev/bus.sock",
            value_name = "ADDRESS"
        )]
        listen: BusAddress,
        /// Service to offer to the guest (repeatable)
        #[arg(long = "offer", value_name = "SERVICE", default_values_t = [ServiceKind::Fcopy])]
        offers: Vec<ServiceKind>,
        /// Seconds the guest has to answer each copy step before the copy fails
        #[arg(long, default_value_t = 60, value_name = "SECS",
              value_parser = clap::value_parser!(u64).range(1..))]
        step_timeout: u64,
    },

    /// Copy a file into the guest, like `Copy-VMFile -FileSource Host`.
    ///
    /// The file is opened here, with your permissions, and its open descriptor is handed to the
    /// host, which never opens paths for you. GUEST_DIR gets a trailing '/' if it has none (the
    /// guest daemon only creates directories followed by '/'). The guest's answer is printed as
    /// an HRESULT: 0x00000000 success, 0x80070050 file exists, 0x80070070 disk full,
    /// 0x80004005 failure. Exit status: 0 copied, 1 the guest failed or did not answer,
    /// 2 usage error or fakehost not reachable.
    #[command(after_help = "Example:\n  \
        fakehost copy ./big.iso /srv/incoming --create-path --overwrite")]
    Copy {
        /// The file to copy
        src: PathBuf,
        /// The directory on the guest to copy into
        guest_dir: String,
        /// Name of the file on the guest [default: the name of SRC]
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Create GUEST_DIR and its parents on the guest if missing (CREATE_PATH)
        #[arg(long)]
        create_path: bool,
        /// Replace an existing file on the guest (OVER_WRITE); without it the guest answers
        /// 0x80070050 file exists
        #[arg(long)]
        overwrite: bool,
    },

    /// Rescind a service's channel: the guest's device goes away.
    ///
    /// The host stops offering the service (also to guests that connect later) until
    /// `fakehost offer`. Exit status 0 if it was offered, 1 if not.
    #[command(after_help = "Example:\n  fakehost rescind fcopy")]
    Rescind {
        /// The service
        service: ServiceKind,
    },

    /// Offer a service again after a rescind: the guest gets a new device.
    ///
    /// Exit status 0 if it is now offered, 1 if it already was.
    #[command(after_help = "Example:\n  fakehost offer fcopy")]
    Offer {
        /// The service
        service: ServiceKind,
    },

    /// Show whether a guest is connected, its channels and the negotiated versions.
    #[command(after_help = "Example:\n  fakehost status --json")]
    Status {
        /// Print the raw JSON answer
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            listen,
            mut offers,
            step_timeout,
        } => serve(HostConfig {
            offers: {
                offers.sort();
                offers.dedup();
                offers
            },
            listen,
            control: cli.control,
            step_timeout: Duration::from_secs(step_timeout),
        }),
        Command::Copy {
            src,
            guest_dir,
            name,
            create_path,
            overwrite,
        } => copy(
            &cli.control,
            &src,
            &guest_dir,
            name.as_deref(),
            create_path,
            overwrite,
        ),
        Command::Rescind { service } => outcome(&cli.control, &Request::Rescind { service }),
        Command::Offer { service } => outcome(&cli.control, &Request::Offer { service }),
        Command::Status { json } => status(&cli.control, json),
    }
}

fn serve(config: HostConfig) -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // Block the signals before any thread exists, so every thread inherits the mask and only
    // the sigwait below ever sees them: no async-signal-safety puzzles, no handler.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    if let Err(e) = signals.thread_block() {
        log::error!("cannot block SIGINT/SIGTERM: {e}");
        return ExitCode::FAILURE;
    }
    let host = match RunningHost::start(&config) {
        Ok(host) => host,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match signals.wait() {
        Ok(signal) => log::info!("{signal}: removing the sockets and exiting"),
        Err(e) => log::error!("waiting for signals failed ({e}); exiting"),
    }
    host.shutdown();
    ExitCode::SUCCESS
}

/// An I/O error's text without Rust's " (os error N)" suffix.
fn os_reason(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_owned(),
        None => e.to_string(),
    }
}

fn usage_error(command: &str, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("fakehost {command}: {message}");
    ExitCode::from(EXIT_USAGE)
}

fn copy(
    control: &Path,
    src: &Path,
    guest_dir: &str,
    name: Option<&str>,
    create_path: bool,
    overwrite: bool,
) -> ExitCode {
    let file_name = match names::guest_file_name(src, name) {
        Ok(name) => name,
        Err(e) => return usage_error("copy", e),
    };
    let path_name = match names::guest_path_name(guest_dir) {
        Ok(path) => path,
        Err(e) => return usage_error("copy", e),
    };
    let file = match File::open(src) {
        Ok(file) => file,
        Err(e) => {
            return usage_error(
                "copy",
                format!("cannot open {}: {}", src.display(), os_reason(&e)),
            )
        }
    };
    match file.metadata() {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return usage_error("copy", format!("{} is not a regular file", src.display())),
        Err(e) => {
            return usage_error(
                "copy",
                format!("cannot stat {}: {}", src.display(), os_reason(&e)),
            )
        }
    }
    let mut client = match Client::connect(control) {
        Ok(client) => client,
        Err(e) => return usage_error("copy", e),
    };
    let request = Request::Copy {
        file_name: file_name.clone(),
        guest_dir: path_name.clone(),
        overwrite,
        create_path,
    };
    if let Err(e) = client.send(&request, Some(file.as_fd())) {
        return usage_error("copy", e);
    }
    drop(file);
    let mut bar = ProgressBar::new();
    let result = loop {
        match client.next_response() {
            Ok(Some(Response::Progress { done, total })) => bar.update(done, total),
            Ok(Some(other)) => break Ok(other),
            Ok(None) => break Err(ClientError::NoAnswer),
            Err(e) => break Err(e),
        }
    };
    bar.finish();
    match result {
        Ok(Response::Result(report)) => {
            println!("{}", result_line(&file_name, &path_name, &report));
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_GUEST_FAILED)
            }
        }
        Ok(Response::Error { error }) => usage_error("copy", error),
        Ok(other) => usage_error(
            "copy",
            format!("unexpected answer from fakehost: {other:?}"),
        ),
        Err(e) => usage_error("copy", e),
    }
}

fn outcome(control: &Path, request: &Request) -> ExitCode {
    let command = match request {
        Request::Offer { .. } => "offer",
        _ => "rescind",
    };
    match client::request(control, request) {
        Ok(Response::Outcome { ok, message }) => {
            println!("{message}");
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Ok(Response::Error { error }) => usage_error(command, error),
        Ok(other) => usage_error(
            command,
            format!("unexpected answer from fakehost: {other:?}"),
        ),
        Err(e) => usage_error(command, e),
    }
}

fn status(control: &Path, json: bool) -> ExitCode {
    let report = match client::request(control, &Request::Status {}) {
        Ok(Response::Status(report)) => report,
        Ok(Response::Error { error }) => return usage_error("status", error),
        Ok(other) => {
            return usage_error(
                "status",
                format!("unexpected answer from fakehost: {other:?}"),
            )
        }
        Err(e) => return usage_error("status", e),
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => return usage_error("status", e),
        }
    } else {
        print_status(&report);
    }
    ExitCode::SUCCESS
}

fn print_status(report: &StatusReport) {
    let bus = &report.bus;
    match (&bus.guest_connected, &bus.vmbus_version) {
        (true, Some(version)) => println!("guest:    connected, VMBus {version}"),
        (true, None) => println!("guest:    connected, no VMBus version agreed yet"),
        (false, _) => println!("guest:    not connected"),
    }
    let offered: Vec<&str> = bus.offered.iter().map(|s| s.name()).collect();
    println!(
        "offered:  {}",
        if offered.is_empty() {
            "nothing".to_owned()
        } else {
            offered.join(", ")
        }
    );
    for c in &bus.channels {
        println!(
            "channel:  {} relid {} instance {}: {}{}",
            c.service,
            c.relid,
            c.instance,
            c.state,
            if c.rescinded {
                " (rescinded, waiting for the guest to release it)"
            } else {
                ""
            }
        );
    }
    let f = &report.fcopy;
    let versions = match (&f.framework_version, &f.message_version) {
        (Some(fw), Some(msg)) => format!("framework {fw}, fcopy {msg}"),
        _ => "no versions agreed".to_owned(),
    };
    println!(
        "fcopy:    channel {}, negotiation {} ({versions}), {}",
        if f.channel_attached {
            "attached"
        } else {
            "not attached"
        },
        f.negotiation,
        if f.copy_in_progress {
            "a copy is running"
        } else {
            "idle"
        }
    );
}
