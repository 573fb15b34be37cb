//! `fakehost lguest`: the lguest service's subcommands (`status`, `irqs`, `notifies`,
//! `script`), and its option of `fakehost serve` (`--lguest-guest FILE`). They talk to the
//! running `fakehost serve` through its control socket ([`super::command`]).
//!
//! Exit status: 0 done; 2 usage error, a script that does not parse (`FILE:LINE: reason` on
//! stderr), or fakehost not reachable.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;

use super::command::LguestCommand;
use super::report::{
    GuestIrqs, GuestNotifies, GuestStatus, IrqsReport, NotifiesReport, ScriptReport, StatusReport,
    Taken,
};
use super::script::{Script, BUILTINS};
use crate::cli::{os_reason, subcommand, usage_error, EXIT_USAGE};
use crate::control::client::Client;
use crate::control::proto::{Response, MAX_REQUEST_LEN};
use crate::service::ServiceCli;

/// The table's hook for the lguest subcommands.
pub const CLI: ServiceCli = ServiceCli {
    augment: |cmd| LguestCli::augment_subcommands(cmd),
    run,
    serve_args: |serve| LguestServeArgs::augment_args(serve),
};

// lguest's option of `fakehost serve`: the script every new Guest runs.
#[derive(Debug, Args)]
pub struct LguestServeArgs {
    /// Script every new lguest Guest runs (docs/lguest-guest.md); a script that does not
    /// parse stops `serve` with FILE:LINE: reason [default: the built-in console-hello, a
    /// virtio console line and a crash]
    #[arg(long, value_name = "FILE")]
    lguest_guest: Option<PathBuf>,
}

/// The script file `fakehost serve`'s options name, if any.
pub fn script_path(serve_args: &clap::ArgMatches) -> Option<PathBuf> {
    match serve_args.try_get_one::<PathBuf>("lguest_guest") {
        Ok(Some(path)) => Some(path.clone()),
        _ => None,
    }
}

#[derive(Debug, Subcommand)]
enum LguestCli {
    /// Watch and steer the fake lguest Guests behind /dev/lguest.
    ///
    /// Each Launcher that opens /dev/lguest and writes LHREQ_INITIALIZE gets a Guest here,
    /// which runs a script (docs/lguest-guest.md): the `--lguest-guest` file of `fakehost
    /// serve`, the built-in console-hello without one, or the last `fakehost lguest script`.
    /// Ended Guests (their file closed) are kept for status, the last 32.
    #[command(after_help = "Examples:\n  \
        fakehost lguest status\n  \
        fakehost lguest script fixtures/lguest/pingpong.guest\n  \
        fakehost lguest notifies --guest 1 --json\n  \
        fakehost lguest irqs")]
    Lguest {
        #[command(subcommand)]
        command: LguestSubcommand,
    },
}

#[derive(Debug, Subcommand)]
enum LguestSubcommand {
    /// Each Guest: its number, launcher pid, W, pfn_limit, what it is doing, its script.
    ///
    /// States: waiting for first read, running line L, waiting for irq N, halted, stopped at
    /// notify ADDR, dead: REASON, idle: end of script.
    Status {
        /// Print the raw JSON answer
        #[arg(long)]
        json: bool,
    },
    /// Each Guest's pending interrupts and how often each interrupt was raised (LHREQ_IRQ).
    Irqs {
        /// Print the raw JSON answer
        #[arg(long)]
        json: bool,
    },
    /// Notifications each Guest made: count per address, how each was taken (the launcher's
    /// read returned it, or an eventfd took it), and the last few in order.
    Notifies {
        /// Only guest number N
        #[arg(long, value_name = "N")]
        guest: Option<u32>,
        /// Print the raw JSON answer
        #[arg(long)]
        json: bool,
    },
    /// Set the script Guests started from now on run (running Guests keep theirs).
    ///
    /// FILE is parsed here first: a mistake is reported as FILE:LINE: reason, exit status 2,
    /// and nothing changes.
    #[command(after_help = "Examples:\n  \
        fakehost lguest script ./pingpong.guest\n  \
        fakehost lguest script --builtin console-hello")]
    Script {
        /// The script file
        #[arg(required_unless_present = "builtin", conflicts_with = "builtin")]
        file: Option<PathBuf>,
        /// A script built into fakehost (the fixtures of fixtures/lguest/)
        #[arg(long, value_name = "NAME", value_parser = builtin_names())]
        builtin: Option<String>,
        /// Print the raw JSON answer
        #[arg(long)]
        json: bool,
    },
}

fn builtin_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(BUILTINS.iter().map(|(name, _)| *name))
}

fn run(matches: &clap::ArgMatches, control: &Path) -> Option<ExitCode> {
    let LguestCli::Lguest { command } = subcommand::<LguestCli>(matches)?;
    Some(match command {
        LguestSubcommand::Status { json } => show(
            control,
            "lguest status",
            LguestCommand::Status {},
            json,
            print_status,
        ),
        LguestSubcommand::Irqs { json } => show(
            control,
            "lguest irqs",
            LguestCommand::Irqs {},
            json,
            print_irqs,
        ),
        LguestSubcommand::Notifies { guest, json } => show(
            control,
            "lguest notifies",
            LguestCommand::Notifies { guest },
            json,
            |r: &NotifiesReport| print_notifies(r, guest),
        ),
        LguestSubcommand::Script {
            file,
            builtin,
            json,
        } => script(control, file.as_deref(), builtin.as_deref(), json),
    })
}

/// Sends one command; prints its answer as JSON or with `print`.
fn show<T: DeserializeOwned>(
    control: &Path,
    what: &str,
    command: LguestCommand,
    json: bool,
    print: impl FnOnce(&T),
) -> ExitCode {
    let result = match ask(control, what, command) {
        Ok(result) => result,
        Err(code) => return code,
    };
    if json {
        match serde_json::to_string_pretty(&result) {
            Ok(text) => println!("{text}"),
            Err(e) => return usage_error(what, e),
        }
        return ExitCode::SUCCESS;
    }
    match serde_json::from_value::<T>(result) {
        Ok(report) => {
            print(&report);
            ExitCode::SUCCESS
        }
        Err(e) => usage_error(what, format!("unreadable answer from fakehost: {e}")),
    }
}

/// Sends one command and reads its result; `Err` is the exit status, the error printed.
fn ask(control: &Path, what: &str, command: LguestCommand) -> Result<serde_json::Value, ExitCode> {
    let request = command.into_request();
    let line = request.to_line().len();
    if line > MAX_REQUEST_LEN {
        return Err(usage_error(
            what,
            format!(
                "the request is {line} bytes; the control socket takes at most {MAX_REQUEST_LEN}"
            ),
        ));
    }
    let mut client = Client::connect(control).map_err(|e| usage_error(what, e))?;
    client
        .send(&request, None)
        .map_err(|e| usage_error(what, e))?;
    match client.final_response() {
        Ok(Response::Result { result }) => Ok(result),
        Ok(Response::Error { error }) => Err(usage_error(what, error)),
        Ok(other) => Err(usage_error(
            what,
            format!("unexpected answer from fakehost: {other:?}"),
        )),
        Err(e) => Err(usage_error(what, e)),
    }
}

fn script(control: &Path, file: Option<&Path>, builtin: Option<&str>, json: bool) -> ExitCode {
    const WHAT: &str = "lguest script";
    let (name, text) = match (file, builtin) {
        (_, Some(builtin)) => match BUILTINS.iter().find(|(n, _)| *n == builtin) {
            Some((_, text)) => (format!("builtin:{builtin}"), (*text).to_owned()),
            None => return usage_error(WHAT, format!("no built-in script {builtin:?}")),
        },
        (Some(file), None) => {
            let name = file.display().to_string();
            match std::fs::read(file) {
                Ok(bytes) => match String::from_utf8(bytes) {
                    Ok(text) => (name, text),
                    Err(e) => {
                        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
                        let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
                        eprintln!("{name}:{line}: the script is not UTF-8 text");
                        return ExitCode::from(EXIT_USAGE);
                    }
                },
                Err(e) => {
                    return usage_error(WHAT, format!("cannot read {name}: {}", os_reason(&e)))
                }
            }
        }
        (None, None) => return usage_error(WHAT, "give a script FILE or --builtin NAME"),
    };
    // Parsed here first: the mistake is reported against the user's own file.
    if let Err(e) = Script::parse(&name, &text) {
        eprintln!("{}", e.in_file(&name));
        return ExitCode::from(EXIT_USAGE);
    }
    show(
        control,
        WHAT,
        LguestCommand::Script { name, text },
        json,
        |r: &ScriptReport| {
            println!(
                "new Guests run {} ({} instruction{}; was {})",
                r.script,
                r.instructions,
                if r.instructions == 1 { "" } else { "s" },
                r.previous
            )
        },
    )
}

fn ended_tag(ended: &Option<String>) -> String {
    match ended {
        Some(why) => format!(" [ended: {why}]"),
        None => String::new(),
    }
}

fn print_status(report: &StatusReport) {
    println!("new Guests run {}", report.script);
    if report.guests.is_empty() {
        println!("no Guests");
    }
    for g in &report.guests {
        print_guest(g);
    }
    if report.ignored > 0 {
        println!(
            "{} malformed or misdirected message(s) from the bus ignored (see the log)",
            report.ignored
        );
    }
}

fn print_guest(g: &GuestStatus) {
    println!(
        "guest {}: launcher pid {}, W {}, pfn_limit {:#x}: {}; script {}{}",
        g.guest,
        g.launcher_pid,
        g.word,
        g.pfn_limit,
        g.state_text,
        g.script,
        ended_tag(&g.ended)
    );
    if let Some(read) = &g.last_read {
        println!(
            "  last read: {} bytes at {:#x}: {}{}",
            read.len,
            read.addr,
            read.hex,
            if read.hex.len() < read.len as usize * 2 {
                "..."
            } else {
                ""
            }
        );
    }
}

fn print_irqs(report: &IrqsReport) {
    if report.guests.is_empty() {
        println!("no Guests");
    }
    for g in &report.guests {
        print_guest_irqs(g);
    }
}

fn print_guest_irqs(g: &GuestIrqs) {
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    let pending: Vec<String> = g.pending.iter().map(u32::to_string).collect();
    let raised: Vec<String> = g
        .raised
        .iter()
        .map(|c| format!("irq {} ×{}", c.irq, c.count))
        .collect();
    println!(
        "guest {}{}: pending {}; raised {}",
        g.guest,
        if g.ended { " (ended)" } else { "" },
        list(&pending),
        list(&raised)
    );
}

fn print_notifies(report: &NotifiesReport, guest: Option<u32>) {
    if report.guests.is_empty() {
        match guest {
            Some(n) => println!("no guest {n}"),
            None => println!("no Guests"),
        }
    }
    for g in &report.guests {
        print_guest_notifies(g);
    }
}

fn print_guest_notifies(g: &GuestNotifies) {
    println!(
        "guest {}{}: {} notification{}",
        g.guest,
        if g.ended { " (ended)" } else { "" },
        g.total,
        if g.total == 1 { "" } else { "s" }
    );
    for a in &g.by_address {
        println!(
            "  {:#x}: {} ({} read, {} eventfd{})",
            a.addr,
            a.count,
            a.read,
            a.eventfd,
            if a.waiting > 0 { ", 1 waiting" } else { "" }
        );
    }
    if !g.recent.is_empty() {
        let recent: Vec<String> = g
            .recent
            .iter()
            .map(|r| {
                let how = match r.taken {
                    Some(Taken::Read) => "read",
                    Some(Taken::Eventfd) => "eventfd",
                    None => "waiting",
                };
                format!("#{} {:#x} {how}", r.seq, r.addr)
            })
            .collect();
        println!("  last: {}", recent.join(", "));
    }
}
