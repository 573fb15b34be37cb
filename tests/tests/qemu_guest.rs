//! The QEMU guest harness itself (tests/src/qemu.rs): one boot of Debian's 6.1 kernel, then
//! several independent checks of what other tests rely on. Every check runs even when an
//! earlier one failed; the test fails at the end listing all that did.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cusedev_tests::harness::sha256;
use cusedev_tests::qemu::{Guest, GuestConfig, GuestImage};

/// Generous for TCG: a simple command takes tens of milliseconds.
const QUICK: Duration = Duration::from_secs(30);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `s` quoted for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

type Check = Result<(), String>;

fn fail<T>(e: io::Error) -> Result<T, String> {
    Err(e.to_string())
}

fn expect_eq(what: &str, got: &str, want: &str) -> Check {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

fn kernel_is_the_image_kernel(guest: &mut Guest, image: &GuestImage) -> Check {
    let release = guest.run_ok("uname -r", QUICK).or_else(fail)?;
    expect_eq("uname -r", release.trim(), &image.kver)
}

fn cuse_and_vsock_nodes_exist(guest: &mut Guest) -> Check {
    // %t:%T are the major and minor in hex: 10:203 → a:cb.
    let cuse = guest
        .run_ok("stat -c '%F %t:%T' /dev/cuse", QUICK)
        .or_else(fail)?;
    expect_eq("/dev/cuse", cuse.trim(), "character special file a:cb")?;
    guest
        .run_ok("test -c /dev/vsock || { ls -l /dev; exit 1; }", QUICK)
        .map(drop)
        .map_err(|e| format!("/dev/vsock is not a char device: {e}"))
}

fn host_root_is_visible_and_protected(guest: &mut Guest) -> Check {
    let readme = repo_root().join("README.md");
    let before = std::fs::read(&readme).map_err(|e| format!("{}: {e}", readme.display()))?;
    let path = quote(&readme.to_string_lossy());

    let guest_sum = guest
        .run_ok(&format!("sha256sum {path}"), QUICK)
        .or_else(fail)?;
    let guest_sum = guest_sum.split_whitespace().next().unwrap_or_default();
    expect_eq(
        "README.md's sha256 in the guest",
        guest_sum,
        &sha256(&readme),
    )?;

    let root_fs = guest
        .run_ok("awk '$2 == \"/\" { print $3 }' /proc/mounts", QUICK)
        .or_else(fail)?;
    expect_eq("the guest's / filesystem", root_fs.trim(), "overlay")?;

    // Writes succeed in the guest (tmpfs upper layer) and never reach the host.
    let probe = repo_root().join(format!("build/qemu-guest-probe-{}", std::process::id()));
    let written = guest
        .run_ok(
            &format!(
                "echo guest-was-here >> {path} && tail -n 1 {path} && echo x > {}",
                quote(&probe.to_string_lossy())
            ),
            QUICK,
        )
        .or_else(fail)?;
    expect_eq(
        "README.md's last line in the guest",
        written.trim(),
        "guest-was-here",
    )?;
    let after = std::fs::read(&readme).map_err(|e| format!("{}: {e}", readme.display()))?;
    if after != before {
        return Err("the guest's write into README.md reached the host".into());
    }
    if probe.exists() {
        let _ = std::fs::remove_file(&probe);
        return Err(format!("the guest created {} on the host", probe.display()));
    }

    // The upper layer is big enough for the tests that copy 100 MB into the guest.
    let size = guest
        .run_ok("df -m / | awk 'NR == 2 { print $2 }'", QUICK)
        .or_else(fail)?;
    match size.trim().parse::<u64>() {
        Ok(mib) if mib >= 700 => Ok(()),
        _ => Err(format!(
            "the overlay's upper layer has {size:?} MiB, want ≥ 700"
        )),
    }
}

fn failing_commands_report_their_status(guest: &mut Guest) -> Check {
    let result = guest.run("echo before; exit 3", QUICK).or_else(fail)?;
    if result.status != 3 || result.output != "before\n" {
        return Err(format!("`exit 3` came back as {result:?}"));
    }
    let result = guest.run("false", QUICK).or_else(fail)?;
    if result.status != 1 {
        return Err(format!("`false` came back as {result:?}"));
    }
    let result = guest.run("kill -TERM $$", QUICK).or_else(fail)?;
    if result.status != 128 + 15 {
        return Err(format!(
            "a command killed by SIGTERM came back as {result:?}"
        ));
    }
    match guest.run_ok("echo oops; exit 7", QUICK) {
        Ok(output) => Err(format!("run_ok accepted status 7 (output {output:?})")),
        Err(e) if e.to_string().contains("status 7") && e.to_string().contains("oops") => Ok(()),
        Err(e) => Err(format!(
            "run_ok's error lacks the status or the output: {e}"
        )),
    }
}

fn multi_line_output_comes_back_intact(guest: &mut Guest) -> Check {
    let text = guest
        .run_ok(
            r"printf 'first\n\n  indented  \n\ttab\nlast without newline'",
            QUICK,
        )
        .or_else(fail)?;
    expect_eq(
        "printf output",
        &text,
        "first\n\n  indented  \n\ttab\nlast without newline\n",
    )?;

    let merged = guest
        .run_ok("echo out1; echo err1 >&2; echo out2", QUICK)
        .or_else(fail)?;
    expect_eq("stdout and stderr merged", &merged, "out1\nerr1\nout2\n")?;

    // Lines that look like protocol messages are only payload.
    let tricky = guest
        .run_ok(
            "echo 'END 1 0'; echo 'OUT 99 x'; echo 'AGENT READY 0'",
            QUICK,
        )
        .or_else(fail)?;
    expect_eq(
        "protocol-like output",
        &tricky,
        "END 1 0\nOUT 99 x\nAGENT READY 0\n",
    )?;

    let many = guest.run_ok("seq 1 3000", QUICK).or_else(fail)?;
    let want: String = (1..=3000).map(|i| format!("{i}\n")).collect();
    if many != want {
        return Err(format!(
            "`seq 1 3000` came back with {} lines (want 3000), ending {:?}",
            many.lines().count(),
            many.lines().last()
        ));
    }
    Ok(())
}

fn multi_line_commands_run_as_scripts(guest: &mut Guest) -> Check {
    let script = "for word in 'one two' \"three\"; do\n  echo \"[$word]\"\ndone\n\
                  cat <<'EOF'\n$HOME stays literal\nEOF\n";
    let output = guest.run_ok(script, QUICK).or_else(fail)?;
    expect_eq(
        "a multi-line script",
        &output,
        "[one two]\n[three]\n$HOME stays literal\n",
    )
}

fn a_timeout_is_an_error_with_the_console(guest: &mut Guest) -> Check {
    let started = Instant::now();
    match guest.run("echo started; sleep 2", Duration::from_millis(500)) {
        Ok(result) => Err(format!("`sleep 2` within 0.5 s returned {result:?}")),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
            let message = e.to_string();
            if !message.contains("started") || !message.contains("console") {
                return Err(format!(
                    "the timeout error lacks output or console: {message}"
                ));
            }
            if started.elapsed() > Duration::from_secs(2) {
                return Err(format!("the 0.5 s timeout took {:?}", started.elapsed()));
            }
            // The next command waits behind the sleep; the late END of the first is ignored.
            let after = guest.run_ok("echo next", QUICK).or_else(fail)?;
            expect_eq("the command after a timeout", &after, "next\n")
        }
        Err(e) => Err(format!("expected a timeout, got: {e}")),
    }
}

#[test]
fn guest_boots_runs_commands_and_powers_off() {
    let image = GuestImage::ensure().unwrap_or_else(|e| panic!("guest image: {e}"));
    let started = Instant::now();
    let mut guest = Guest::boot(&image, GuestConfig::named("qemu_guest"))
        .unwrap_or_else(|e| panic!("boot: {e}"));
    eprintln!(
        "qemu_guest: kernel {} booted to the agent in {:.2} s",
        image.kver,
        guest.boot_seconds()
    );

    let mut failures = Vec::new();
    let mut check = |name: &str, result: Check| {
        eprintln!(
            "qemu_guest: {name}: {}",
            if result.is_ok() { "ok" } else { "FAILED" }
        );
        if let Err(e) = result {
            failures.push(format!("{name}: {e}"));
        }
    };
    check("kernel", kernel_is_the_image_kernel(&mut guest, &image));
    check("device nodes", cuse_and_vsock_nodes_exist(&mut guest));
    check("host root", host_root_is_visible_and_protected(&mut guest));
    check(
        "exit status",
        failing_commands_report_their_status(&mut guest),
    );
    check("output", multi_line_output_comes_back_intact(&mut guest));
    check("scripts", multi_line_commands_run_as_scripts(&mut guest));
    check(
        "timeout",
        a_timeout_is_an_error_with_the_console(&mut guest),
    );

    let console = guest.console_tail(20);
    let shutdown = Instant::now();
    check("poweroff", guest.poweroff().map_err(|e| e.to_string()));
    eprintln!(
        "qemu_guest: poweroff took {:.2} s; whole guest {:.2} s",
        shutdown.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    assert!(
        failures.is_empty(),
        "{} check(s) failed:\n{}\n--- last console lines ---\n{console}",
        failures.len(),
        failures.join("\n")
    );
}
