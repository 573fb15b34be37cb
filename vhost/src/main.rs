//! `vhost`: the vhost-user virtio-vsock backend binary. See `vhost --help`.

#![deny(unsafe_op_in_unsafe_fn)]
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::info;
use nix::sys::signal::{SigSet, Signal};

use vhost_vsock::config::Cli;
use vhost_vsock::server::{serve, Shutdown};

fn fail(cause: impl std::fmt::Display) -> ExitCode {
    eprintln!("vhost: {cause}");
    ExitCode::from(2)
}

/// Block SIGINT/SIGTERM in every thread (threads inherit the mask, so this must run before
/// any is spawned) and handle them synchronously in a dedicated thread.
fn spawn_signal_thread(shutdown: Arc<Shutdown>) -> Result<(), String> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            while let Ok(signal) = set.wait() {
                info!("received {signal}, shutting down");
                shutdown.trigger();
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let cfg = match cli.into_config() {
        Ok(cfg) => cfg,
        Err(e) => return fail(e),
    };
    let shutdown = match Shutdown::new() {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot set up shutdown: {e}")),
    };
    if let Err(e) = spawn_signal_thread(shutdown.clone()) {
        return fail(e);
    }
    match serve(&cfg, &shutdown) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}
