//! The `fakehost` command: run the fake Hyper-V host, or drive a running one.

//!
//! The subcommands here are the generic ones; a service adds its own (fcopy's `copy`) through
//! its row in `fakehost::serve::SERVICES`, and the service names `--offer`, `offer` and
//! `rescind` accept come from the same table.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::builder::PossibleValuesParser;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use vmbus::address::BusAddress;

use fakehost::cli::usage_error;
use fakehost::control::client;
use fakehost::control::proto::{Request, Response, StatusReport};
use fakehost::serve::{self, HostConfig, RunningHost, SERVICES};

/// A fake Hyper-V host for cusedev's userspace VMBus devices.
///
/// `fakehost serve` plays the host: it listens for a guest (cusedev) on the bus socket, offers it
/// channels (its services), and listens for commands on a control socket. The other commands
/// talk to a running `fakehost serve` through that control socket.
#[derive(Debug, Parser)]
#[command(name = "fakehost", version, propagate_version = true)]
struct Cli {
    /// The control socket of `fakehost serve`: /run/cusedev/fakehost.ctl for root, else
    /// $XDG_RUNTIME_DIR/cusedev/fakehost.ctl when XDG_RUNTIME_DIR is set (a user cannot make
    /// /run/cusedev), so `serve` and the other commands of one user agree [env:
    /// FAKEHOST_CONTROL]
    #[arg(
        long,
        global = true,
        env = "FAKEHOST_CONTROL",
        hide_env = true,
        default_value_os_t = default_control_socket(),
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
        #[arg(long = "offer", value_name = "SERVICE",
              value_parser = service_parser(),
              default_values_t = serve::default_offers())]
        offers: Vec<String>,
        /// Seconds the guest has to answer each request (each copy step) before it fails
        #[arg(long, default_value_t = 60, value_name = "SECS",
              value_parser = clap::value_parser!(u64).range(1..))]
        step_timeout: u64,
    },

    /// Rescind a service's channel: the guest's device goes away.
    ///
    /// The host stops offering the service (also to guests that connect later) until
    /// `fakehost offer`. Exit status 0 if it was offered, 1 if not.
    #[command(after_help = "Example:\n  fakehost rescind fcopy")]
    Rescind {
        /// The service
        #[arg(value_parser = service_parser())]
        service: String,
    },

    /// Offer a service again after a rescind: the guest gets a new device.
    ///
    /// Exit status 0 if it is now offered, 1 if it already was.
    #[command(after_help = "Example:\n  fakehost offer fcopy")]
    Offer {
        /// The service
        #[arg(value_parser = service_parser())]
        service: String,
    },

    /// Show whether a guest is connected, its channels and the negotiated versions.
    #[command(after_help = "Example:\n  fakehost status --json")]
    Status {
        /// Print the raw JSON answer
        #[arg(long)]
        json: bool,
    },
}

/// Service names from the table; clap lists them in `--help` and in its error for any other.
fn service_parser() -> PossibleValuesParser {
    PossibleValuesParser::new(
        SERVICES
            .iter()
            .map(|row| clap::builder::PossibleValue::new(row.offer.name).help(row.offer.summary)),
    )
}

/// See `Cli::control`.
fn default_control_socket() -> PathBuf {
    let runtime = std::env::var_os("XDG_RUNTIME_DIR").filter(|dir| !dir.is_empty());
    match runtime {
        Some(dir) if !nix::unistd::geteuid().is_root() => {
            PathBuf::from(dir).join("cusedev/fakehost.ctl")
        }
        _ => PathBuf::from("/run/cusedev/fakehost.ctl"),
    }
}

fn main() -> ExitCode {
    // The derived command plus every service's own subcommands and `serve` options.
    let mut command = Cli::command().mut_subcommand("serve", fakehost::serve::with_serve_options);
    for cli in SERVICES.iter().filter_map(|row| row.cli) {
        command = (cli.augment)(command);
    }
    let matches = command.get_matches();
    let control = matches
        .get_one::<PathBuf>("control")
        .cloned()
        .unwrap_or_else(default_control_socket);
    for cli in SERVICES.iter().filter_map(|row| row.cli) {
        if let Some(code) = (cli.run)(&matches, &control) {
            return code;
        }
    }
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
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
            serve_args: matches
                .subcommand_matches("serve")
                .cloned()
                .unwrap_or_default(),
        }),
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
    println!(
        "offered:  {}",
        if bus.offered.is_empty() {
            "nothing".to_owned()
        } else {
            bus.offered.join(", ")
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
    for (name, service) in &report.services {
        println!("{:<10}{}", format!("{name}:"), service.summary);
    }
}
