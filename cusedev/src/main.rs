//! `cusedev serve`: connects to a (fake) host and serves the devices it offers.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use log::{error, info, warn};
use nix::sys::signal::{SigSet, Signal};
use vmbus::address::BusAddress;

use cusedev::bus::client::BusClient;
use cusedev::devices::hv_util::KernelProfile;
use cusedev::devices::DRIVER_TABLE;
use cusedev::frontend::{Frontend, FrontendChoice};
use cusedev::fuse::unmount_guard::{self, UnmountGuard};
use cusedev::preload::command as run;
use cusedev::table::{describe, Drivers, ProfileChoice, ProfileError};

const ABOUT: &str = "Serve Linux misc character devices (/dev/vmbus/hv_fcopy, ...) from \
userspace, backed by a host reached over the cusedev bus.";

const SERVE_LONG_ABOUT: &str = "\
Which --kernel profile to choose:
  linux-6.1   (default) the drivers of Linux 4.x-6.9, which Debian's packaged daemons
              (hyperv-daemons 6.1) are written for. Use this to run the real daemons.
  linux-3.14  the 2014 hv_fcopy driver exactly. The unmodified 6.1 daemon cannot register
              with it (it writes version 1; the 2014 driver accepts only 0 and never replies),
              so use it only to test software written for that driver.

--kernel applies to the Hyper-V util drivers; any device's profile can be chosen with
--profile DEVICE=PROFILE (the list of devices and profiles is at the end).

Connects to the host and serves every device it offers until stopped (SIGINT/SIGTERM).
Device nodes come and go with the host's offers and rescinds.

With the FUSE frontend a small guard process (`cusedev unmount-guard`, started by serve)
watches cusedev's mounts: if cusedev is killed (SIGKILL, a crash), the guard lazily unmounts
them, so no stale mount (\"Transport endpoint is not connected\") is left at /dev/vmbus.
--no-unmount-guard goes without it; the next cusedev then unmounts what a killed one left.
CUSE needs no guard: the kernel removes a dead cusedev's character devices by itself.";

const SERVE_EXAMPLES: &str = "\
Examples:
  cusedev serve --host unix:/run/cusedev/bus.sock --frontend fuse
  cusedev serve --host vsock:2:5000 --frontend cuse     (in a QEMU guest)
  cusedev serve --profile fcopy=linux-3.14";

const LONG_ABOUT: &str = "\
Serve Linux misc character devices (/dev/vmbus/hv_fcopy, ...) from userspace, backed by a host
reached over the cusedev bus, so that unmodified daemons such as Debian's hv_fcopy_daemon run
without Hyper-V. `cusedev serve --help` says which --kernel profile to choose.

Frontends: CUSE gives real character devices; where the kernel has no CUSE (no /dev/cuse) a
FUSE mount over /dev/vmbus serves the same operations with the same errnos, and stat() shows a
regular file instead of a character device.";

#[derive(Parser)]
#[command(name = "cusedev", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Connect to the host and serve every device it offers until stopped (SIGINT/SIGTERM).
    /// (Its --help ends with the devices of the driver table, added in `main`.)
    #[command(long_about = SERVE_LONG_ABOUT)]
    Serve(ServeArgs),
    /// Started by `serve` (FUSE frontend): unmounts serve's mounts when serve dies. Not for
    /// running by hand; its stdin must be the socket serve made.
    #[command(name = "unmount-guard", hide = true)]
    UnmountGuard,
    /// Serve the host's devices to one command and its children only, through the preload
    /// library: no CUSE, no FUSE, no root needed. Exits with the command's status.
    #[command(long_about = RUN_LONG_ABOUT)]
    Run(RunArgs),
}

const RUN_LONG_ABOUT: &str = "\
Serve the host's devices to one command and its children only, through the preload library
(LD_PRELOAD): no /dev/cuse, no /dev/fuse and no root needed, as in a CI container.

cusedev connects to the host, waits until the host's first offers are bound (at most
--ready-timeout), then starts COMMAND with the library preloaded. COMMAND and everything it
starts see the devices at their usual paths (/dev/vmbus/hv_fcopy, ...); nothing else on the
machine does. When COMMAND exits, cusedev stops and exits with its status (128+N if a signal
N ended it). SIGINT and SIGTERM sent to cusedev are passed on to COMMAND.

The other options are serve's; `cusedev serve --help` says which --kernel profile to choose.
What differs from a kernel device is listed in the README (\"With the preload frontend\");
docs/preload.md has the design.";

const RUN_EXAMPLES: &str = "\
Examples:
  fakehost serve --listen unix:$XDG_RUNTIME_DIR/cusedev/bus.sock &
  cusedev run --host unix:$XDG_RUNTIME_DIR/cusedev/bus.sock -- /usr/sbin/hv_fcopy_daemon -n
  cusedev run --host unix:/tmp/bus.sock -- ./lguest-launcher console";

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// How long to wait for the host's first offers to be bound before starting COMMAND
    /// anyway (with a warning), in seconds.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    ready_timeout: f64,
    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Where the host listens: unix:PATH on one machine, vsock:2:PORT from a QEMU guest (the
    /// host's vhost backend hands the stream to fakehost; its --bus-port, default 5000).
    #[arg(long, default_value = "unix:/run/cusedev/bus.sock")]
    host: BusAddress,
    /// How device nodes are made: cuse (real character devices), fuse (a FUSE mount over the
    /// device's directory), preload (only for processes started with the preload library), or
    /// auto (CUSE when available, else FUSE, else preload). Default: auto for serve, preload
    /// for run.
    #[arg(long, value_enum)]
    frontend: Option<FrontendChoice>,
    /// The preload frontend's run directory (its socket and the library); default
    /// $XDG_RUNTIME_DIR/cusedev/run-PID (/run/cusedev/run-PID for root).
    #[arg(long, value_name = "DIR")]
    preload_dir: Option<PathBuf>,
    /// Which kernel's driver behaviour to reproduce (see above).
    #[arg(long, value_enum, default_value_t = KernelProfile::Linux6_1)]
    kernel: KernelProfile,
    /// The profile of one device, by its name or node (see the list below); overrides
    /// --kernel for that device. Repeat for more devices.
    #[arg(long = "profile", value_name = "DEVICE=PROFILE", value_parser = parse_profile)]
    profiles: Vec<ProfileChoice>,
    /// The directory device names are relative to. FUSE mounts its directories here; CUSE
    /// devices appear in /dev through devtmpfs, and cusedev also makes their nodes here
    /// when they are missing (no devtmpfs, or another directory).
    #[arg(long, default_value = "/dev")]
    dev_root: PathBuf,
    /// Do not start the unmount guard (FUSE frontend), the process that unmounts cusedev's
    /// FUSE mounts if cusedev is killed (see above).
    #[arg(long)]
    no_unmount_guard: bool,
}

/// `--profile DEVICE=PROFILE`, checked against the driver table.
fn parse_profile(arg: &str) -> Result<ProfileChoice, ProfileError> {
    ProfileChoice::parse(DRIVER_TABLE, arg)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // The device list is generated from the table, so it cannot be a derive attribute.
    let after_help = format!("{}\n\n{SERVE_EXAMPLES}", describe(DRIVER_TABLE));
    // Rows add their own options (`--lguest-word`); their probes read them back.
    let run_after_help = format!("{}\n\n{RUN_EXAMPLES}", describe(DRIVER_TABLE));
    let matches = Cli::command()
        .mut_subcommand("serve", |serve| {
            Drivers::augment(DRIVER_TABLE, serve.after_help(after_help))
        })
        .mut_subcommand("run", |run| {
            Drivers::augment(DRIVER_TABLE, run.after_help(run_after_help))
        })
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let (args, run, subcommand) = match cli.command {
        Command::Serve(args) => (args, None, "serve"),
        Command::Run(run) => {
            let command = RunCommand {
                argv: run.command,
                ready_timeout: Duration::try_from_secs_f64(run.ready_timeout)
                    .unwrap_or(Duration::from_secs(10)),
            };
            (run.serve, Some(command), "run")
        }
        Command::UnmountGuard => return unmount_guard::run(),
    };
    let options = matches
        .subcommand_matches(subcommand)
        .cloned()
        .unwrap_or_default();
    serve(args, options, run)
}

/// What `cusedev run` starts once the devices are there.
struct RunCommand {
    argv: Vec<OsString>,
    ready_timeout: Duration,
}

/// The FUSE frontend with an unmount guard watching its mounts; CUSE needs none. A guard that
/// cannot start is worth a warning, not a refusal to serve: the next cusedev still peels off
/// what a killed one leaves.
fn with_unmount_guard(frontend: Frontend) -> Frontend {
    match frontend {
        Frontend::Fuse(fuse) => match UnmountGuard::spawn() {
            Ok(guard) => Frontend::Fuse(fuse.with_unmount_guard(guard)),
            Err(e) => {
                warn!(
                    "cannot start the unmount guard: {e}; if cusedev is killed its mounts stay \
                     until the next cusedev takes them away"
                );
                Frontend::Fuse(fuse)
            }
        },
        cuse => cuse,
    }
}

fn serve(args: ServeArgs, options: clap::ArgMatches, run: Option<RunCommand>) -> ExitCode {
    let drivers = match Drivers::configure(DRIVER_TABLE, Some(args.kernel.name()), &args.profiles) {
        Ok(drivers) => drivers.with_options(options),
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    for (row, profile) in drivers.iter() {
        info!(
            "driver {}: /dev/{}, profile {}",
            row.name, row.node, profile.name
        );
    }

    // Signals are taken by one thread with sigwait(); block them before any thread starts so
    // every thread inherits the mask.
    let mut stop_signals = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        stop_signals.add(signal);
    }
    if let Err(e) = stop_signals.thread_block() {
        error!("cannot block signals: {e}");
        return ExitCode::FAILURE;
    }

    let choice = args.frontend.unwrap_or(if run.is_some() {
        FrontendChoice::Preload
    } else {
        FrontendChoice::Auto
    });
    let node_paths: Vec<PathBuf> = drivers
        .iter()
        .map(|(row, _)| args.dev_root.join(row.node))
        .collect();
    let registry = match Frontend::choose(choice, &args.dev_root, args.preload_dir.as_deref()) {
        Ok(frontend) if args.no_unmount_guard => Arc::new(frontend),
        Ok(frontend) => Arc::new(with_unmount_guard(frontend)),
        Err(why) => {
            error!("no frontend can run: {why}");
            return ExitCode::from(2);
        }
    };
    let environment = match &*registry {
        Frontend::Preload(preload) => preload.environment(&node_paths),
        _ => Vec::new(),
    };
    if run.is_none() && !environment.is_empty() {
        let line: Vec<String> = environment
            .iter()
            .map(|(k, v)| format!("{k}='{v}'"))
            .collect();
        info!("preload: start clients with {}", line.join(" "));
    }
    let client = BusClient::new(args.host, drivers, registry.clone());
    let first_offers = client.first_offers();
    let child = Arc::new(run::Child::default());
    let (done_tx, done_rx) = std::sync::mpsc::channel::<ExitCode>();
    let bus_done = done_tx.clone();
    let started = thread::Builder::new()
        .name("bus-client".to_owned())
        .spawn(move || {
            let code = match client.run() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e}");
                    ExitCode::FAILURE
                }
            };
            let _ = bus_done.send(code);
        })
        .and_then(|_| {
            thread::Builder::new()
                .name("stop-signals".to_owned())
                .spawn({
                    let child = child.clone();
                    let done_tx = done_tx.clone();
                    move || loop {
                        let Ok(signal) = stop_signals.wait() else {
                            let _ = done_tx.send(ExitCode::FAILURE);
                            return;
                        };
                        // With a command running, it decides when we stop: pass it on.
                        if child.forward(signal) {
                            info!("{signal}: passed on to the command");
                            continue;
                        }
                        info!("{signal}: stopping");
                        let _ = done_tx.send(ExitCode::SUCCESS);
                        return;
                    }
                })
        })
        .and_then(|_| match run {
            Some(command) => thread::Builder::new()
                .name("run-command".to_owned())
                .spawn(move || {
                    let code = run::run(
                        &command.argv,
                        &environment,
                        &first_offers,
                        command.ready_timeout,
                        &child,
                    );
                    let _ = done_tx.send(code);
                })
                .map(drop),
            None => Ok(()),
        });
    let code = match started {
        Ok(_) => done_rx.recv().unwrap_or(ExitCode::FAILURE),
        Err(e) => {
            error!("cannot start the threads of `cusedev serve`: {e}");
            ExitCode::FAILURE
        }
    };
    registry.shutdown();
    code
}
