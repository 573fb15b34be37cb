//! What every `fakehost` subcommand shares: exit codes and how usage errors are printed.

use std::process::ExitCode;

/// Exit status when the guest said no or did not answer.
pub const EXIT_GUEST_FAILED: u8 = 1;
/// Exit status for usage errors and when fakehost cannot be reached.
pub const EXIT_USAGE: u8 = 2;

/// An I/O error's text without Rust's " (os error N)" suffix.
pub fn os_reason(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_owned(),
        None => e.to_string(),
    }
}

/// A service's subcommands out of the whole command line's matches: `None` if the chosen
/// subcommand is not one of `T`'s (another row's); a clap error exits as clap does.
pub fn subcommand<T: clap::Subcommand + clap::FromArgMatches>(
    matches: &clap::ArgMatches,
) -> Option<T> {
    let (name, _) = matches.subcommand()?;
    if !T::has_subcommand(name) {
        return None;
    }
    Some(T::from_arg_matches(matches).unwrap_or_else(|e| e.exit()))
}

/// Prints `fakehost COMMAND: MESSAGE` on stderr; exit status 2.
pub fn usage_error(command: &str, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("fakehost {command}: {message}");
    ExitCode::from(EXIT_USAGE)
}
