//! `cusedev serve`: connects to a (fake) host and serves the devices it offers.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;

use clap::{Parser, Subcommand};
use log::{error, info};
use nix::sys::signal::{SigSet, Signal};
use vmbus::address::BusAddress;

use cusedev::bus::client::BusClient;
use cusedev::frontend::{Frontend, FrontendChoice};
use cusedev::profile::KernelProfile;

const ABOUT: &str = "Serve Linux misc character devices (/dev/vmbus/hv_fcopy, ...) from \
userspace, backed by a host reached over the cusedev bus.";

const SERVE_LONG_ABOUT: &str = "\
Which --kernel profile to choose:
  linux-6.1   (default) the drivers of Linux 4.x-6.9, which Debian's packaged daemons
              (hyperv-daemons 6.1) are written for. Use this to run the real daemons.
  linux-3.14  the 2014 hv_fcopy driver exactly. The unmodified 6.1 daemon cannot register
              with it (it writes version 1; the 2014 driver accepts only 0 and never replies),
              so use it only to test software written for that driver.

Connects to the host and serves every device it offers until stopped (SIGINT/SIGTERM).
Device nodes come and go with the host's offers and rescinds.";

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
    #[command(
        long_about = SERVE_LONG_ABOUT,
        after_help = "Examples:\n  cusedev serve --host unix:/run/cusedev/bus.sock --frontend fuse\n  \
                      cusedev serve --host vsock:2:5000 --frontend cuse     (in a QEMU guest)"
    )]
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Where the host listens: unix:PATH on one machine, vsock:2:PORT from a QEMU guest (the
    /// host's vhost backend hands the stream to fakehost; its --bus-port, default 5000).
    #[arg(long, default_value = "unix:/run/cusedev/bus.sock")]
    host: BusAddress,
    /// How device nodes are made: cuse (real character devices), fuse (a FUSE mount over the
    /// device's directory), or auto (CUSE when available, else FUSE).
    #[arg(long, value_enum, default_value_t = FrontendChoice::Auto)]
    frontend: FrontendChoice,
    /// Which kernel's driver behaviour to reproduce (see above).
    #[arg(long, value_enum, default_value_t = KernelProfile::Linux6_1)]
    kernel: KernelProfile,
    /// The directory device names are relative to. FUSE mounts its directories here; CUSE
    /// devices appear in /dev through devtmpfs, and cusedev also makes their nodes here
    /// when they are missing (no devtmpfs, or another directory).
    #[arg(long, default_value = "/dev")]
    dev_root: PathBuf,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let Command::Serve(args) = Cli::parse().command;
    serve(args)
}

fn serve(args: ServeArgs) -> ExitCode {
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

    let registry = match Frontend::choose(args.frontend, &args.dev_root) {
        Ok(frontend) => Arc::new(frontend),
        Err(why) => {
            error!("no frontend can run: {why}");
            return ExitCode::from(2);
        }
    };
    let client = BusClient::new(args.host, args.kernel, registry.clone());
    let (done_tx, done_rx) = std::sync::mpsc::channel::<ExitCode>();
    let bus_done = done_tx.clone();
    thread::spawn(move || {
        let code = match client.run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!("{e}");
                ExitCode::FAILURE
            }
        };
        let _ = bus_done.send(code);
    });
    thread::spawn(move || {
        if let Ok(signal) = stop_signals.wait() {
            info!("{signal}: stopping");
        }
        let _ = done_tx.send(ExitCode::SUCCESS);
    });
    let code = done_rx.recv().unwrap_or(ExitCode::FAILURE);
    registry.shutdown();
    code
}
