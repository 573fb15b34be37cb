//! `fakehost vss freeze|thaw|check`: the VSS service's subcommands. They talk to the running
//! `fakehost serve` through its control socket ([`super::command`]).
//!
//! Exit status: 0 the guest answered success; 1 it failed or did not answer; 2 usage error, a
//! refused FREEZE of this machine (without --force), or fakehost not reachable.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use super::command::{VssCommand, VssOp, VssReport};
use super::Frozen;
use crate::cli::{subcommand, usage_error, EXIT_GUEST_FAILED};
use crate::control::client::Client;
use crate::control::proto::Response;
use crate::service::ServiceCli;

/// The table's hook for the vss subcommands.
pub const CLI: ServiceCli = ServiceCli {
    augment: |cmd| VssCli::augment_subcommands(cmd),
    run,
    serve_args: ServiceCli::NO_SERVE_ARGS,
};

#[derive(Debug, Subcommand)]
enum VssCli {
    /// Freeze, thaw or check the guest's filesystems, as Hyper-V does around a live backup.
    ///
    /// Each request goes to the guest's hv_vss driver and its hv_vss_daemon. Without a
    /// registered daemon the driver answers 0x80004005 at once. Exit status: 0 success, 1 the
    /// guest failed or did not answer, 2 usage error, a refused freeze, or fakehost not
    /// reachable.
    #[command(after_help = "Examples:\n  \
        fakehost vss check\n  \
        fakehost vss freeze            # refused when the guest is this machine\n  \
        fakehost vss thaw")]
    Vss {
        #[command(subcommand)]
        command: VssSubcommand,
    },
}

#[derive(Debug, Subcommand)]
enum VssSubcommand {
    /// FREEZE: the daemon FIFREEZEs every writable block-device filesystem of the guest.
    ///
    /// The guest driver gives its daemon up to 900 s; this waits 910 s (or --timeout). When
    /// the guest is this machine (cusedev on this kernel, not a VM behind the vhost backend),
    /// the freeze would stop this machine's own filesystems, / included: it is refused unless
    /// --force. Thaw with `fakehost vss thaw`.
    #[command(after_help = "Example:\n  fakehost vss freeze && run-backup; fakehost vss thaw")]
    Freeze {
        /// Freeze even if the guest is this machine
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        common: Common,
    },
    /// THAW: the daemon FITHAWs what it froze
    Thaw {
        #[command(flatten)]
        common: Common,
    },
    /// HOT_BACKUP: ask whether the guest can take a live backup (the daemon answers 0)
    Check {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, clap::Args)]
struct Common {
    /// Seconds to wait for the guest's answer [default: 910 for freeze, the serve step
    /// timeout otherwise]
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: Option<u64>,
    /// Print the raw JSON answer
    #[arg(long)]
    json: bool,
}

fn run(matches: &clap::ArgMatches, control: &Path) -> Option<ExitCode> {
    let VssCli::Vss { command } = subcommand::<VssCli>(matches)?;
    let (op, force, common) = match command {
        VssSubcommand::Freeze { force, common } => (VssOp::Freeze, force, common),
        VssSubcommand::Thaw { common } => (VssOp::Thaw, false, common),
        VssSubcommand::Check { common } => (VssOp::Check, false, common),
    };
    let what = match op {
        VssOp::Freeze => "vss freeze",
        VssOp::Thaw => "vss thaw",
        VssOp::Check => "vss check",
    };
    Some(ask(
        control,
        what,
        VssCommand {
            op,
            force,
            timeout_secs: common.timeout,
        },
        common.json,
    ))
}

fn ask(control: &Path, what: &str, command: VssCommand, json: bool) -> ExitCode {
    let mut client = match Client::connect(control) {
        Ok(client) => client,
        Err(e) => return usage_error(what, e),
    };
    if let Err(e) = client.send(&command.into_request(), None) {
        return usage_error(what, e);
    }
    let result = match client.final_response() {
        Ok(Response::Result { result }) => result,
        Ok(Response::Error { error }) => return usage_error(what, error),
        Ok(other) => {
            return usage_error(what, format!("unexpected answer from fakehost: {other:?}"))
        }
        Err(e) => return usage_error(what, e),
    };
    let report = match serde_json::from_value::<VssReport>(result.clone()) {
        Ok(report) => report,
        Err(e) => return usage_error(what, format!("unreadable answer from fakehost: {e}")),
    };
    if json {
        match serde_json::to_string_pretty(&result) {
            Ok(text) => println!("{text}"),
            Err(e) => return usage_error(what, e),
        }
    } else if report.ok {
        println!("{}", result_line(&report));
    } else {
        eprintln!(
            "fakehost {what}: {}",
            report.error.as_deref().unwrap_or("the guest said no")
        );
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_GUEST_FAILED)
    }
}

/// `FREEZE: 0x00000000 success in 1.92 s; the guest is frozen (thaw with `fakehost vss thaw`)`.
pub fn result_line(report: &VssReport) -> String {
    let status = report.hresult.unwrap_or(0);
    let meaning = report.meaning.as_deref().unwrap_or("success");
    let state = match &report.guest {
        Frozen::Yes { .. } => "; the guest is frozen (thaw with `fakehost vss thaw`)".to_owned(),
        Frozen::No => "; the guest is not frozen".to_owned(),
        Frozen::Unknown { why } => format!("; the guest may be frozen: {why}"),
    };
    let flags = match (report.operation.as_str(), report.flags) {
        ("HOT_BACKUP", Some(flags)) => format!(", flags {flags:#x}"),
        _ => String::new(),
    };
    format!(
        "{}: {status:#010x} {meaning}{flags} in {:.2} s{state}",
        report.operation, report.seconds
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_say_what_the_guest_is_now() {
        let mut report = VssReport {
            ok: true,
            operation: "FREEZE".into(),
            hresult: Some(0),
            meaning: Some("success".into()),
            error: None,
            flags: Some(0),
            seconds: 1.5,
            guest: Frozen::Yes { secs: 0 },
            place: None,
        };
        assert_eq!(
            result_line(&report),
            "FREEZE: 0x00000000 success in 1.50 s; the guest is frozen (thaw with `fakehost vss \
             thaw`)"
        );
        report.operation = "HOT_BACKUP".into();
        report.guest = Frozen::No;
        assert_eq!(
            result_line(&report),
            "HOT_BACKUP: 0x00000000 success, flags 0x0 in 1.50 s; the guest is not frozen"
        );
    }
}
