//! `--help` of every subcommand describes that subcommand: a service's `fakehost serve`
//! options are documented on the options, never as `serve`'s own description (clap takes an
//! `Args` struct's doc comment as the command's `about`).

use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fakehost"))
        .args(args)
        .arg("--help")
        .output()
        .expect("run fakehost");
    assert!(out.status.success(), "fakehost {args:?} --help: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8 help")
}

#[test]
fn serve_help_starts_with_what_serve_does_and_lists_every_service_option() {
    let text = help(&["serve"]);
    let first = text.lines().next().unwrap_or_default();
    assert!(first.starts_with("Run the host"), "first line: {first:?}");
    for option in ["--lguest-guest", "--listen"] {
        assert!(text.contains(option), "{option} missing from:\n{text}");
    }
}
