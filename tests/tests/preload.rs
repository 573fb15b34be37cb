//! The preload frontend (docs/preload.md) as an unprivileged user with no /dev/fuse: fakehost,
//! `cusedev run` and every client run as `nobody`, on a machine where nobody cannot open
//! /dev/fuse (checked first, with the FUSE frontend failing for nobody), with nothing mounted.
//!
//! - Debian's unmodified hv_fcopy_daemon under `cusedev run` receives a 10 MB copy.
//! - One shared list of check programs runs over every frontend ([`FRONTENDS`]: FUSE as
//!   today, as root in a private mount namespace; preload as nobody) and must print the same:
//!   the fcopy errno probe (`fcopy-probe`), the xs_fastpath C client's case lists (64- and
//!   32-bit), the lguest Launcher's errno list (64- and 32-bit), console and ping-pong runs,
//!   the fork check and the EINTR check (`preload-check`).
//! - `--frontend auto` picks preload for nobody and says so.
//!
//! Fork: the lguest errno list's `read-from-forked-child-eperm` and xs-client's
//! `fd_used_in_a_forked_child_is_eacces` make a device call from a forked child on the
//! parent's file (the device answers it, and refuses it as the driver does); xs-client's
//! `fd_inherited_across_exec_is_eacces` does after exec. `preload-check fork` is the explicit
//! one: the child's call works after the parent closed its copy, and the last close releases.
//! The Launcher's clone(CLONE_VM) service processes (console output, ping-pong) use the file
//! too: with `--libc-irq` they raise their interrupts through libc, as the 3.x Launcher's
//! did; by default they make raw system calls, which no LD_PRELOAD library can see (on the
//! preload frontend those fail with ESPIPE, the socket's answer to pwrite).
//!
//! EINTR: `fcopy-probe`'s `blocked_read_interrupted_by_a_signal_is_eintr` covers it, but it
//! waits for the reader to sleep in read/pread64, where the preload library sleeps in poll;
//! `preload-check eintr` waits for either.

use std::path::{Path, PathBuf};
use std::process::Command;

use cusedev_tests::enter_private_mount_namespace;
use cusedev_tests::harness::{
    host_command, sha256, start_host, workspace_binary, write_pattern_file, Supervised,
    FCOPY_DAEMON, FCOPY_DEVICE,
};
use cusedev_tests::lguest_launcher::{self, exit, parse_pingpong};
use cusedev_tests::preload::{
    as_nobody, assert_nobody_has_no_fuse, differences, nobody_dir, nobody_opens,
    nobody_scratch_dir, output, select_lines, Frontend, Served, FRONTENDS, NOBODY,
    PRELOAD_FRONTEND_LINE,
};
use cusedev_tests::xs_client::{self, Bits, Run, XS_DEVICE};

/// Runs `body` once per frontend, each on a thread of its own (FUSE's enters a private mount
/// namespace first; preload's needs none and gets none), and returns what each gave.
fn over_frontends<T: Send>(body: impl Fn(Frontend) -> T + Sync) -> Vec<(Frontend, T)> {
    FRONTENDS
        .iter()
        .map(|&frontend| {
            let result = std::thread::scope(|s| {
                s.spawn(|| {
                    if frontend == Frontend::Fuse {
                        enter_private_mount_namespace().expect("private mount namespace");
                    }
                    body(frontend)
                })
                .join()
            });
            match result {
                Ok(value) => (frontend, value),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
        .collect()
}

/// Asserts that every frontend's lines equal the first's (FUSE, today's reference).
fn assert_all_same(what: &str, results: &[(Frontend, Vec<String>)]) {
    let diffs = differences(what, results);
    assert!(diffs.is_empty(), "{}", diffs.join("\n\n"));
}

/// A fixture Guest script by file name.
fn guest_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/lguest")
        .join(name)
}

// ---------------------------------------------------------------- the unprivileged world

#[test]
fn nobody_has_no_dev_fuse_and_the_fuse_frontend_cannot_start_for_it() {
    assert_nobody_has_no_fuse();
    let dir = nobody_scratch_dir("pl-nofuse");
    let host = spawn_nobody_host(&dir, &[]);
    let out = output(
        as_nobody(
            Command::new(workspace_binary("cusedev"))
                .args(["serve", "--frontend", "fuse", "--dev-root"])
                .arg(&dir)
                .arg("--host")
                .arg(format!("unix:{}", dir.join("bus.sock").display()))
                .env("RUST_LOG", "info"),
        ),
        "cusedev serve --frontend fuse (nobody)",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot open /dev/fuse: Permission denied"),
        "{stderr}"
    );
    drop(host);
}

/// `fakehost serve` as nobody on `dir`'s bus and control sockets, waited for.
fn spawn_nobody_host(dir: &Path, args: &[&str]) -> Supervised {
    start_host(as_nobody(&mut host_command(dir, args)))
}

#[test]
fn auto_picks_preload_for_nobody_and_says_so() {
    assert_nobody_has_no_fuse();
    let dir = nobody_scratch_dir("pl-auto");
    let _host = spawn_nobody_host(&dir, &[]);
    let bus = format!("unix:{}", dir.join("bus.sock").display());

    // cusedev run --frontend auto: the command sees the device.
    let out = output(
        as_nobody(
            Command::new(workspace_binary("cusedev"))
                .args(["run", "--frontend", "auto", "--host", &bus, "--preload-dir"])
                .arg(dir.join("run-auto"))
                .arg("--")
                .arg(workspace_binary("preload-check"))
                .args(["open-errno", "/dev/lguest"])
                .env("RUST_LOG", "info"),
        ),
        "cusedev run --frontend auto (nobody)",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("frontend: preload (auto:"),
        "auto must pick preload and say why: {stderr}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "open /dev/lguest: ok"
    );
    // Outside `cusedev run` the node does not exist at all.
    assert_eq!(
        nobody_opens("/dev/lguest"),
        "open /dev/lguest: errno ENOENT"
    );

    // cusedev serve --frontend auto: the same choice, and the environment a client needs.
    let serve = Supervised::spawn(
        "cusedev serve",
        as_nobody(
            Command::new(workspace_binary("cusedev"))
                .args([
                    "serve",
                    "--frontend",
                    "auto",
                    "--host",
                    &bus,
                    "--preload-dir",
                ])
                .arg(dir.join("run-serve"))
                .env("RUST_LOG", "info"),
        ),
    );
    serve.wait_for_log("frontend: preload (auto:");
    serve.wait_for_log("LD_PRELOAD=");
    serve.wait_for_device_from(0, "lguest");
}

// ---------------------------------------------------------------- the real daemon

#[test]
fn the_unmodified_fcopy_daemon_under_cusedev_run_receives_ten_megabytes_as_nobody() {
    assert_nobody_has_no_fuse();
    assert!(
        Path::new(FCOPY_DAEMON).exists(),
        "{FCOPY_DAEMON} is missing: install Debian's hyperv-daemons (make test does)"
    );
    let dir = nobody_scratch_dir("pl-daemon");
    let host = spawn_nobody_host(&dir, &[]);
    // The default run directory: $XDG_RUNTIME_DIR/cusedev/run-<pid>, as a user session has.
    let xdg = dir.join("xdg");
    nobody_dir(&xdg);
    std::fs::set_permissions(&xdg, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let incoming = dir.join("incoming");
    nobody_dir(&incoming);
    let mut run = Supervised::spawn(
        "cusedev run",
        as_nobody(
            Command::new(workspace_binary("cusedev"))
                .arg("run")
                .arg("--host")
                .arg(format!("unix:{}", dir.join("bus.sock").display()))
                .arg("--")
                .arg(FCOPY_DAEMON)
                .arg("-n")
                .env("XDG_RUNTIME_DIR", &xdg)
                .env("RUST_LOG", "info"),
        ),
    );
    run.wait_for_log(PRELOAD_FRONTEND_LINE);
    run.wait_for_device_from(0, FCOPY_DEVICE);
    run.wait_for_log("daemon registered with version 1");
    let run_dir = xdg.join("cusedev").join(format!("run-{}", run.pid()));
    assert!(
        run_dir.join("preload.sock").exists(),
        "no socket in the default run directory {}",
        run_dir.display()
    );

    let src = dir.join("ten.bin");
    write_pattern_file(&src, 10 * 1000 * 1000, 21);
    let mut copy = Command::new(workspace_binary("fakehost"));
    copy.arg("copy")
        .arg(&src)
        .arg(format!("{}/", incoming.display()))
        .env("FAKEHOST_CONTROL", dir.join("ctl.sock"));
    let out = output(as_nobody(&mut copy), "fakehost copy (nobody)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "copy failed: {text}");
    assert!(text.contains("0x00000000"), "{text}");
    let copied = incoming.join("ten.bin");
    assert_eq!(sha256(&copied), sha256(&src), "the copy arrived different");
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&copied).unwrap());
    assert_eq!(
        owner, NOBODY,
        "the daemon ran as nobody, so the file is nobody's"
    );

    // SIGTERM to cusedev goes to the daemon, which dies of it: cusedev exits 128 + 15 and
    // removes its run directory.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = run.wait_exit();
    assert_eq!(status.code(), Some(128 + 15), "cusedev run's exit status");
    assert!(!run_dir.exists(), "{} left behind", run_dir.display());
    drop(host);
}

// ---------------------------------------------------------------- the shared lists

/// `fcopy-probe`'s lines as `PROBE ok NAME` / `PROBE FAIL NAME` (the reasons of a failure
/// name the frontend's own node and owner) and `PROBE done ...`.
fn probe_lines(run: &Run) -> Vec<String> {
    select_lines(&run.stdout, |l| {
        let rest = l.strip_prefix("PROBE ")?;
        Some(match rest.split_once(':') {
            Some((head, _)) if head.starts_with("FAIL ") => format!("PROBE {head}"),
            _ => l.to_string(),
        })
    })
}

/// The one check of `fcopy-probe` that needs a CUSE node: sysfs numbers and a root-owned
/// node (fcopy-probe.rs, node_is_a_char_device_0600_root).
const PROBE_NEEDS_CUSE: &str = "node_is_a_char_device_0600_root";

#[test]
fn fcopy_probe_gives_the_same_results_on_every_frontend() {
    let results = over_frontends(|frontend| {
        let served = Served::start(frontend, "pl-probe", FCOPY_DEVICE, &[], &[], &[]);
        let node = served.node.display().to_string();
        let run = served.run(&workspace_binary("fcopy-probe"), &[&node]);
        assert!(
            run.stdout.contains("PROBE done failures="),
            "{}: fcopy-probe did not finish its list:\n{}",
            frontend.name(),
            run.text()
        );
        probe_lines(&run)
    });
    // FUSE, the reference, passes every check but the CUSE-only one.
    for line in &results[0].1 {
        assert!(
            line.starts_with("PROBE ok ")
                || line.starts_with("PROBE done ")
                || line.contains(PROBE_NEEDS_CUSE),
            "FUSE fails a probe check: {line}"
        );
    }
    assert_all_same("fcopy-probe", &results);
}

/// A C program's case lines (`ok|FAIL|skip NAME: got ... want ...`), but for the cases in
/// `needs_root`. (The closing count line follows from them; it counts those cases too.)
fn case_lines(run: &Run, needs_root: &[&str]) -> Vec<String> {
    select_lines(&run.stdout, |l| {
        let case = ["ok ", "FAIL ", "skip "]
            .iter()
            .find_map(|p| l.strip_prefix(p))?;
        let name = case.split(':').next().unwrap_or_default();
        (!needs_root.contains(&name)).then(|| l.to_string())
    })
}

/// xs-client cases that need a privilege nobody lacks, each with the line nobody's run
/// prints for it: `fd_after_setgroups_is_eacces` changes its groups with setgroups(2), which
/// needs CAP_SETGID (kernel/groups.c, may_setgroups); the client reports the failed
/// setgroups as errno 1000 + EPERM, printed `E?`.
const XS_NEEDS_ROOT: [(&str, &str); 1] = [(
    "fd_after_setgroups_is_eacces",
    "FAIL fd_after_setgroups_is_eacces: got ret -1 errno E? want errno EACCES",
)];

/// One xs-client list on every frontend: the same case lines; FUSE (root) passes them all;
/// nobody's run prints for each case of `needs_root` the line given with it.
fn xs_list_holds(
    test: &str,
    bits: Bits,
    args: &[&str],
    min_cases: usize,
    guest_args: &[&str],
    needs_root: &[(&str, &str)],
) {
    let root_cases: Vec<&str> = needs_root.iter().map(|(c, _)| *c).collect();
    let results = over_frontends(|frontend| {
        let served = Served::start(
            frontend,
            test,
            XS_DEVICE,
            &[],
            &[("--blob-root", "blobs")],
            guest_args,
        );
        let run = served.run_with_dev(&xs_client::xs_client(bits), args);
        match frontend {
            Frontend::Fuse => xs_client::assert_all_cases_pass(&run, min_cases, &[]),
            Frontend::Preload => {
                for &(case, line) in needs_root {
                    let printed = run
                        .stdout
                        .lines()
                        .find(|l| l.contains(&format!(" {case}:")));
                    assert_eq!(
                        printed,
                        Some(line),
                        "nobody's run of {case}:\n{}",
                        run.text()
                    );
                }
            }
        }
        case_lines(&run, &root_cases)
    });
    assert!(
        results.iter().all(|(_, lines)| lines.len() >= min_cases),
        "a list lost its cases: {results:?}"
    );
    assert_all_same(
        &format!("xs-client {} {}", bits_name(bits), args.join(" ")),
        &results,
    );
}

fn bits_name(bits: Bits) -> &'static str {
    match bits {
        Bits::B64 => "64-bit",
        Bits::B32 => "32-bit",
    }
}

#[test]
fn xs_client_errno_list_of_the_posted_patch_gives_the_same_results_on_every_frontend() {
    xs_list_holds(
        "pl-xs-posted",
        Bits::B64,
        &["errno", "--profile", "posted"],
        40,
        &[],
        &XS_NEEDS_ROOT,
    );
}

#[test]
fn xs_client_errno_list_of_the_reviewed_profile_gives_the_same_results_on_every_frontend() {
    xs_list_holds(
        "pl-xs-reviewed",
        Bits::B64,
        &["errno", "--profile", "reviewed"],
        40,
        &["--profile", xs_client::REVIEWED],
        &XS_NEEDS_ROOT,
    );
}

#[test]
fn xs_client_32_bit_list_gives_the_same_results_on_every_frontend() {
    xs_list_holds("pl-xs-32", Bits::B32, &["errno32"], 7, &[], &[]);
}

/// lguest errno cases where the preload frontend differs, as the README says: a request
/// written short of its words is completed from the buffer of the syscall the caller sleeps
/// in (`Words::get` in cusedev/src/devices/lguest.rs reads it from /proc); under preload the
/// caller sleeps in the library's poll(2), so the missing word is EFAULT, as from `writev`.
const LGUEST_PRELOAD_DIFFERS: [&str; 2] = [
    "write-irq-size-one-word-reads-next-word-ok",
    "write-irq-size-one-word-next-word-32-einval",
];

#[test]
fn lguest_errno_lists_give_the_same_results_on_every_frontend() {
    // `--cuse`: the preload library sends offset 0 on every read and write, as
    // cuse_read_iter / cuse_write_iter do (fs/fuse/cuse.c, 6.1), so the three cpu-1 cases
    // are skipped on every frontend alike (lguest.rs runs them on FUSE).
    let script = guest_script("errno.guest");
    let mut diffs = Vec::new();
    for bits in [Bits::B64, Bits::B32] {
        let results = over_frontends(|frontend| {
            let served = Served::start(
                frontend,
                &format!("pl-lg-errno-{}", lguest_launcher::word(bits)),
                lguest_launcher::DEVICE,
                &["--lguest-guest", script.to_str().expect("utf-8 path")],
                &[],
                &[],
            );
            let run = served.run_with_dev(&lguest_launcher::launcher(bits), &["errno", "--cuse"]);
            if frontend == Frontend::Fuse {
                lguest_launcher::assert_all_cases_pass(&run, 40, &["initialize-returns-3w"]);
            } else {
                for case in LGUEST_PRELOAD_DIFFERS {
                    let printed = run
                        .stdout
                        .lines()
                        .find(|l| l.contains(&format!(" {case}:")))
                        .unwrap_or_default();
                    assert!(
                        printed.starts_with(&format!("FAIL {case}:")) && printed.contains("EFAULT"),
                        "the README's difference for {case} (EFAULT) no longer holds: {printed:?}\n{}",
                        run.text()
                    );
                }
            }
            let mut lines = case_lines(&run, &LGUEST_PRELOAD_DIFFERS);
            // The closing count, less the known differences: every other case must pass.
            let known = match frontend {
                Frontend::Fuse => 0,
                Frontend::Preload => LGUEST_PRELOAD_DIFFERS.len(),
            };
            lines.extend(select_lines(&run.stdout, |l| {
                let rest = l.strip_prefix("errno: ")?;
                let (cases, failed) = rest.split_once(" cases, ")?;
                let failed: usize = failed.strip_suffix(" failed")?.parse().ok()?;
                Some(format!(
                    "errno: {cases} cases, {} failed beyond the known",
                    failed - known.min(failed)
                ))
            }));
            let clean_exit = run.code == Some(0) || (known > 0 && run.code == Some(1));
            lines.push(format!("exit clean: {clean_exit}"));
            lines
        });
        diffs.extend(differences(
            &format!("lguest-launcher {} errno --cuse", bits_name(bits)),
            &results,
        ));
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n\n"));
}

/// What a console or ping-pong run comes to, in lines that hold on every frontend.
fn lguest_outcome(args: &[&str], run: &Run) -> Vec<String> {
    let mut lines = vec![format!("{}: exit {:?}", args.join(" "), run.code)];
    if args[0] == "pingpong" {
        let counts = if run.stdout.contains("notifies ") {
            let p = parse_pingpong(run);
            format!(
                "notifies {} irqs {} reason {}",
                p.notifies, p.irqs, p.reason
            )
        } else {
            format!("no counts; stderr: {}", launcher_lines(run).join(" | "))
        };
        lines.push(counts);
    } else {
        lines.extend(run.stdout.lines().map(str::to_string));
        lines.extend(launcher_lines(run));
    }
    lines
}

/// The Launcher's own stderr lines (`lguest...`), without cusedev's log.
fn launcher_lines(run: &Run) -> Vec<String> {
    select_lines(&run.stderr, |l| {
        l.starts_with("lguest").then(|| l.to_string())
    })
}

#[test]
fn lguest_console_and_pingpong_give_the_same_results_on_every_frontend() {
    let console = guest_script("console-hello.guest");
    let pingpong = guest_script("pingpong.guest");
    let results = over_frontends(|frontend| {
        let served = Served::start(
            frontend,
            "pl-lg-console",
            lguest_launcher::DEVICE,
            &["--lguest-guest", console.to_str().expect("utf-8 path")],
            &[],
            &[],
        );
        let mut lines = Vec::new();
        for bits in [Bits::B64, Bits::B32] {
            let run =
                served.run_with_dev(&lguest_launcher::launcher(bits), &["--libc-irq", "console"]);
            if frontend == Frontend::Fuse {
                assert_eq!(run.code, Some(exit::GUEST), "{}", run.text());
                assert!(run.stdout.contains("hello from the fake guest\n"));
                assert!(run.stderr.contains("lguest: CRASH: Power down\n"));
            }
            lines.push(bits_name(bits).to_string());
            lines.extend(lguest_outcome(&["console"], &run));
        }
        served.fakehost(&["lguest", "script", pingpong.to_str().expect("utf-8 path")]);
        for (bits, args) in [
            (Bits::B64, vec!["pingpong", "1000"]),
            (Bits::B32, vec!["pingpong", "1000", "--eventfd"]),
            (Bits::B64, vec!["pingpong", "1000", "--eventfd"]),
        ] {
            let mut all = vec!["--libc-irq"];
            all.extend_from_slice(&args);
            let run = served.run_with_dev(&lguest_launcher::launcher(bits), &all);
            if frontend == Frontend::Fuse {
                assert_eq!(run.code, Some(exit::OK), "{}", run.text());
            }
            lines.push(bits_name(bits).to_string());
            lines.extend(lguest_outcome(&args, &run));
        }
        lines
    });
    assert_all_same("lguest-launcher console and pingpong", &results);
}

/// `preload-check MODE NODE` on the fcopy node: its CHECK lines (INFO lines say how many
/// tries a step took, which varies).
fn fcopy_check_holds(test: &str, mode: &str, min_checks: usize) {
    let results = over_frontends(|frontend| {
        let served = Served::start(frontend, test, FCOPY_DEVICE, &[], &[], &[]);
        let node = served.node.display().to_string();
        let run = served.run(&workspace_binary("preload-check"), &[mode, &node]);
        let lines = select_lines(&run.stdout, |l| {
            l.starts_with("CHECK ").then(|| l.to_string())
        });
        if frontend == Frontend::Fuse {
            assert_eq!(run.code, Some(0), "FUSE fails a check:\n{}", run.text());
            assert!(lines.len() > min_checks, "{}", run.text());
        }
        lines
    });
    assert_all_same(&format!("preload-check {mode}"), &results);
}

#[test]
fn a_forked_child_keeps_the_device_and_its_last_close_releases_it_on_every_frontend() {
    fcopy_check_holds("pl-fork", "fork", 8);
}

#[test]
fn a_signal_ends_a_blocked_device_read_with_eintr_on_every_frontend() {
    fcopy_check_holds("pl-eintr", "eintr", 3);
}

// ---------------------------------------------------------------- a user namespace

#[test]
fn in_a_user_namespace_as_its_root_auto_still_picks_preload_and_a_forked_child_keeps_the_device() {
    // `unshare -U -r -m` as nobody: root of a new user and mount namespace, with no more
    // rights to the host's /dev/fuse than nobody has (its owner is not mapped there).
    let dir = nobody_scratch_dir("pl-userns");
    let _host = spawn_nobody_host(&dir, &[]);
    let unshared = |args: &[&str], label: &str| {
        output(
            as_nobody(
                Command::new("unshare")
                    .args(["-U", "-r", "-m", "--"])
                    .args(args)
                    .env("RUST_LOG", "info"),
            ),
            label,
        )
    };
    let check = workspace_binary("preload-check");
    let check = check.to_str().expect("utf-8 path");
    let fuse = unshared(
        &[check, "open-errno", "/dev/fuse"],
        "unshare: open /dev/fuse",
    );
    assert_eq!(
        String::from_utf8_lossy(&fuse.stdout).trim(),
        "open /dev/fuse: errno EACCES"
    );
    let cusedev = workspace_binary("cusedev");
    let bus = format!("unix:{}", dir.join("bus.sock").display());
    let run_dir = dir.join("run-userns").display().to_string();
    let out = unshared(
        &[
            cusedev.to_str().expect("utf-8 path"),
            "run",
            "--frontend",
            "auto",
            "--host",
            &bus,
            "--preload-dir",
            &run_dir,
            "--",
            check,
            "fork",
            "/dev/vmbus/hv_fcopy",
        ],
        "unshare: cusedev run --frontend auto -- preload-check fork",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("frontend: preload (auto:"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("CHECK done failures=0\n"), "{stdout}");
    assert!(
        stdout.contains("CHECK ok child_call_after_the_parent_closed_works\n"),
        "{stdout}"
    );
}

/// `cusedev run`'s own exit status is the command's, as a shell reports it: its code, 128 + N
/// for a signal N, 127 for a command that is not there; and a missing command is a usage
/// error. No host is needed for that (`--ready-timeout 0` starts the command at once).
#[test]
fn cusedev_run_exits_with_the_commands_status_as_a_shell_would() {
    let dir = nobody_scratch_dir("pl-run-status");
    let run = |command: &[&str]| {
        Command::new(workspace_binary("cusedev"))
            .args(["run", "--host"])
            .arg(format!("unix:{}", dir.join("no-host.sock").display()))
            .arg("--preload-dir")
            .arg(dir.join("run"))
            .args(["--ready-timeout", "0", "--"])
            .args(command)
            .env("RUST_LOG", "warn")
            .output()
            .expect("cusedev run")
    };
    assert_eq!(run(&["sh", "-c", "exit 7"]).status.code(), Some(7));
    assert_eq!(run(&["sh", "-c", "kill -TERM $$"]).status.code(), Some(143));
    let missing = run(&["/nonexistent/command"]);
    assert_eq!(missing.status.code(), Some(127));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("cannot start /nonexistent/command"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    assert!(
        !dir.join("run").join("preload.sock").exists(),
        "the run directory is cleaned up"
    );
    let usage = Command::new(workspace_binary("cusedev"))
        .arg("run")
        .output()
        .expect("cusedev run");
    assert_eq!(usage.status.code(), Some(2), "no command is a usage error");
}
