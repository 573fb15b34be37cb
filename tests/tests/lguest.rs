//! /dev/lguest on a FUSE mount, driven by the C Launcher `tests/c/lguest-launcher.c` (64- and
//! 32-bit) through real syscalls, against fakehost's scripted fake Guest
//! (`fixtures/lguest/*.guest`, chosen per test with `fakehost serve --lguest-guest`).
//!
//! The errno paths of lguest_user.c (../shared/spec/lguest.md §3) are the Launcher's `errno`
//! case list, the same list the QEMU test runs over CUSE. The rest: the console Guest printing
//! its line as v3.10's Launcher expects it (§7), eventfd attach while the owner sleeps in its
//! read, 1,000 notify/IRQ round trips both ways, 64 Launchers at once, a Launcher killed while
//! its Guest runs, a restart, a Guest killed for a bad memory access, and the host going away.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cusedev_tests::blocking::{install_sigusr1_without_restart, Blocking};
use cusedev_tests::census::{wait_for_baseline, Census};
use cusedev_tests::dev::{Dev, Errno};
use cusedev_tests::enter_private_mount_namespace;
use cusedev_tests::harness::Rig;
use cusedev_tests::lguest_launcher::{
    assert_all_cases_pass, exit, parse_pingpong, run_limited, Bits, Holder, Run, DEVICE,
};

/// How long a Launcher run that should end may take.
const ENDS: Duration = Duration::from_secs(60);

/// A fixture Guest script by file name.
fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/lguest")
        .join(name)
}

/// One test's rig: fakehost running `guest` for every Guest, cusedev serving /dev/lguest
/// under a device root of the test's own.
struct Lg {
    rig: Rig,
    node: PathBuf,
}

impl Lg {
    fn start(test: &str, guest: &str) -> Lg {
        Lg::start_with(test, guest, &[])
    }

    fn start_with(test: &str, guest: &str, guest_args: &[&str]) -> Lg {
        enter_private_mount_namespace().expect("private mount namespace");
        let guest = script(guest);
        let rig = Rig::builder(test)
            .host_args(&["--lguest-guest", guest.to_str().expect("utf-8 path")])
            .guest_args(guest_args)
            .guest_dir_arg("--dev-root", "dev")
            .serves(DEVICE)
            .start();
        let node = rig.dir.join("dev").join(DEVICE);
        Lg { rig, node }
    }

    fn launcher(&self, bits: Bits, args: &[&str]) -> Run {
        run_limited(bits, &self.node, args, ENDS)
    }

    /// `fakehost ARGS` against this rig's host; must succeed.
    fn fakehost(&self, args: &[&str]) -> String {
        let out = self.rig.fakehost(args);
        assert!(
            out.status.success(),
            "fakehost {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Selects the script for Guests started from now on.
    fn guest_script(&self, name: &str) {
        let path = script(name);
        self.fakehost(&["lguest", "script", path.to_str().expect("utf-8 path")]);
    }
}

/// Cases whose absence from a run means the list itself lost them.
const CORE_CASES: [&str; 12] = [
    "read-before-init-einval",
    "write-irq-before-init-einval",
    "initialize-returns-3w",
    "initialize-twice-ebusy",
    "write-irq-32-einval",
    "write-eventfd-fd-not-open-ebadf",
    "write-eventfd-pipe-einval",
    "read-from-other-thread-eperm",
    "read-runs-guest-until-death-enoent",
    "read-reason-with-nul",
    "write-irq-size-one-word-reads-next-word-ok",
    "write-irq-after-death-enoent",
];

fn errno_list_holds(test: &str, bits: Bits) {
    let lg = Lg::start(test, "errno.guest");
    let list = lg.launcher(bits, &["errno"]);
    assert_all_cases_pass(&list, 40, &CORE_CASES);
    let word = match bits {
        Bits::B64 => 8,
        Bits::B32 => 4,
    };
    assert!(
        list.stdout.contains(&format!("word {word} bytes")),
        "W detected from the ELF class: {}",
        list.text()
    );
}

#[test]
fn errno_paths_of_lguest_user_c_hold_for_a_64_bit_launcher() {
    errno_list_holds("lg-errno64", Bits::B64);
}

#[test]
fn errno_paths_of_lguest_user_c_hold_for_a_32_bit_launcher() {
    errno_list_holds("lg-errno32", Bits::B32);
}

#[test]
fn forced_word_size_makes_a_64_bit_launchers_initialize_return_12() {
    // --lguest-word 4: the device reads 4-byte words whatever the opener is, so the 64-bit
    // list's INITIALIZE returns 3·4 where it expects 3·8.
    let lg = Lg::start_with("lg-word", "errno.guest", &["--lguest-word", "4"]);
    let list = lg.launcher(Bits::B64, &["errno"]);
    assert!(
        list.stdout
            .contains("FAIL initialize-returns-3w: got ret 12 want ret 24"),
        "{}",
        list.text()
    );
}

fn console_prints_its_line(test: &str, bits: Bits) {
    let lg = Lg::start(test, "console-hello.guest");
    let console = lg.launcher(bits, &["console"]);
    assert_eq!(console.code, Some(exit::GUEST), "{}", console.text());
    assert!(
        console.stdout.contains("hello from the fake guest\n"),
        "{}",
        console.text()
    );
    assert!(
        console.stderr.contains("lguest: CRASH: Power down\n"),
        "{}",
        console.text()
    );
    // The Guest side saw what §7 says: the status notify at the device page (gpa 16 MiB)
    // returned by a read, the output kick at pfn 0x1004 taken by an eventfd.
    let notifies = lg.fakehost(&["lguest", "notifies"]);
    assert!(notifies.contains("0x1000000"), "{notifies}");
    assert!(notifies.contains("0x1004000"), "{notifies}");
}

#[test]
fn console_guest_prints_hello_and_the_64_bit_launcher_exits_with_power_down() {
    console_prints_its_line("lg-console64", Bits::B64);
}

#[test]
fn console_guest_prints_hello_and_the_32_bit_launcher_exits_with_power_down() {
    console_prints_its_line("lg-console32", Bits::B32);
}

#[test]
fn a_thousand_notify_irq_round_trips_lose_nothing_through_reads_and_through_eventfds() {
    let lg = Lg::start("lg-pingpong", "pingpong.guest");
    for (bits, args) in [
        (Bits::B64, vec!["pingpong", "1000"]),
        (Bits::B32, vec!["pingpong", "1000", "--eventfd"]),
        (Bits::B64, vec!["pingpong", "1000", "--eventfd"]),
    ] {
        let round = lg.launcher(bits, &args);
        let counts = parse_pingpong(&round);
        assert_eq!(round.code, Some(exit::OK), "{args:?}: {}", round.text());
        assert_eq!((counts.notifies, counts.irqs), (1000, 1000), "{args:?}");
        assert!(
            round.stdout.contains("reason: CRASH: pingpong done"),
            "{}",
            round.text()
        );
    }
}

#[test]
fn eventfd_attached_while_the_owner_sleeps_in_read_takes_the_next_notify() {
    let lg = Lg::start("lg-attach", "attach.guest");
    for bits in [Bits::B64, Bits::B32] {
        let attach = lg.launcher(bits, &["attach-while-blocked"]);
        assert_all_cases_pass(&attach, 7, &["attach-read-never-returned-0x2000"]);
    }
}

#[test]
fn sixty_four_launchers_at_once_each_complete_their_round_trips() {
    let lg = Lg::start("lg-64", "pingpong.guest");
    let node = lg.node.clone();
    let runs: Vec<Run> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..64)
            .map(|i| {
                let node = node.clone();
                let bits = if i % 2 == 0 { Bits::B64 } else { Bits::B32 };
                s.spawn(move || run_limited(bits, &node, &["pingpong", "1000"], ENDS * 5))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, round) in runs.iter().enumerate() {
        let counts = parse_pingpong(round);
        assert_eq!(
            (round.code, counts.notifies, counts.irqs),
            (Some(exit::OK), 1000, 1000),
            "launcher {i}: {}",
            round.text()
        );
    }
}

#[test]
fn a_launcher_killed_while_its_guest_runs_leaves_the_server_healthy_and_at_baseline() {
    let lg = Lg::start("lg-kill", "halt.guest");
    let kill_one = |lg: &Lg| {
        let mut holder = Holder::start(Bits::B64, &lg.node);
        holder.wait_in_read(ENDS);
        holder.kill();
        holder.finish(ENDS);
    };
    kill_one(&lg);
    let cusedev = lg.rig.guest.pid();
    let baseline = Census::of(cusedev);
    for _ in 0..3 {
        kill_one(&lg);
        wait_for_baseline(cusedev, &baseline, ENDS);
    }
    // The Guests of the killed Launchers are gone on the host side too, and a new Launcher
    // works.
    lg.guest_script("pingpong.guest");
    let round = lg.launcher(Bits::B64, &["pingpong", "1000"]);
    assert_eq!(parse_pingpong(&round).notifies, 1000, "{}", round.text());
    let status = lg.fakehost(&["lguest", "status", "--json"]);
    assert!(
        status.contains("\"ended\": \"closed\"") && !status.contains("\"ended\": null"),
        "every Guest of a killed Launcher ended when its file closed: {status}"
    );
}

#[test]
fn a_restart_request_makes_the_launcher_exec_itself_until_its_limit() {
    let lg = Lg::start("lg-restart", "restart.guest");
    let console = lg.launcher(Bits::B32, &["console", "--max-restarts", "2"]);
    assert_eq!(console.code, Some(exit::RESTARTS), "{}", console.text());
    assert!(
        console.text().contains("restart 2 of at most 2"),
        "{}",
        console.text()
    );
}

#[test]
fn a_guest_read_outside_its_memory_kills_it_with_the_kernels_reason() {
    let lg = Lg::start("lg-badread", "badread.guest");
    // pfn limit 0x1007: `read limit 16` starts at 0x1007000, past every page.
    let hold = lg.launcher(Bits::B64, &["hold"]);
    assert_eq!(hold.code, Some(exit::GUEST), "{}", hold.text());
    assert!(
        hold.stderr
            .contains("lguest: bad read address 0x1007000 len 16\n"),
        "{}",
        hold.text()
    );
}

#[test]
fn a_guest_write_outside_its_memory_kills_it_with_the_kernels_reason() {
    let lg = Lg::start("lg-badwrite", "badwrite.guest");
    let hold = lg.launcher(Bits::B32, &["hold"]);
    assert_eq!(hold.code, Some(exit::GUEST), "{}", hold.text());
    assert!(
        hold.stderr
            .contains("lguest: bad write address 0x1007000 len 4\n"),
        "{}",
        hold.text()
    );
}

#[test]
fn a_script_that_does_not_parse_is_refused_with_its_line_and_changes_nothing() {
    let lg = Lg::start("lg-badscript", "pingpong.guest");
    let bad = lg.rig.dir.join("bad.guest");
    std::fs::write(&bad, "notify 0x1000\nwait-irq 32 1s\n").unwrap();
    let out = lg
        .rig
        .fakehost(&["lguest", "script", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bad.guest:2:"), "{stderr}");
    // The Guests still run the script the host started with.
    let round = lg.launcher(Bits::B64, &["pingpong", "1000"]);
    assert_eq!(parse_pingpong(&round).notifies, 1000, "{}", round.text());
}

#[test]
fn the_host_going_away_wakes_a_sleeping_launcher_with_the_reason() {
    let lg = Lg::start("lg-rescind", "halt.guest");
    let holder = Holder::start(Bits::B64, &lg.node);
    holder.wait_in_read(ENDS);
    lg.fakehost(&["rescind", "lguest"]);
    let (printed, code) = holder.finish(ENDS);
    assert_eq!(code, Some(exit::GUEST), "{printed}");
    assert!(
        printed.contains("lguest: fake Guest lost: the host side of the bus went away"),
        "{printed}"
    );
}

#[test]
fn fakehost_lguest_reports_interrupts_and_notifications() {
    let lg = Lg::start("lg-status", "pingpong.guest");
    let round = lg.launcher(Bits::B64, &["pingpong", "1000"]);
    assert_eq!(parse_pingpong(&round).irqs, 1000, "{}", round.text());
    let irqs = lg.fakehost(&["lguest", "irqs"]);
    assert!(irqs.contains("1000"), "IRQ 3 raised 1000 times: {irqs}");
    let notifies = lg.fakehost(&["lguest", "notifies"]);
    assert!(notifies.contains("0x1000"), "{notifies}");
    assert!(notifies.contains("1000"), "{notifies}");
}

/// `pwrite(fd, words, len(words) * 8, 0)`, as a 64-bit Launcher sends a request.
fn request(dev: &Dev, words: &[u64]) -> Result<usize, Errno> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    // SAFETY: bytes is a valid buffer of bytes.len() bytes for the duration of the call.
    let rc = unsafe { libc::pwrite(dev.raw(), bytes.as_ptr().cast(), bytes.len(), 0) };
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(rc as usize)
    }
}

#[test]
fn a_signal_ends_the_read_with_eintr_and_what_the_guest_did_meanwhile_is_the_next_reads() {
    let lg = Lg::start("lg-signal", "signal.guest");
    install_sigusr1_without_restart();
    let dev = std::sync::Arc::new(Dev::open(lg.node.to_str().unwrap()).expect("open"));
    // 1 MiB: the crash message goes to the Guest's scratch address, 0x80000.
    let memory = vec![0u8; 256 << 12];
    let base = memory.as_ptr() as u64;
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let owner_dev = dev.clone();
    let owner = Blocking::spawn(move || {
        let init = request(&owner_dev, &[0, base, 256, 0x1000]);
        // The Guest waits for interrupt 5: this read sleeps until the signal.
        first_tx.send((init, owner_dev.pread(8))).unwrap();
        go_rx.recv().unwrap();
        let notified = owner_dev.pread(8);
        let died = owner_dev.pread(8);
        let reason = owner_dev.pread(100);
        (notified, died, reason)
    });
    owner.wait_blocked_in_read();
    owner.signal();
    let (init, first) = first_rx.recv().unwrap();
    assert_eq!(init, Ok(24));
    assert_eq!(first, Err(Errno::EINTR));
    // Another thread may not run the Guest; it may raise its interrupt.
    assert_eq!(dev.pread(8), Err(Errno::EPERM));
    assert_eq!(request(&dev, &[2, 5]), Ok(0));
    // The Guest notifies with no read running it (the kernel's Guest could not have run
    // then; ours keeps the notification for the next read).
    let deadline = std::time::Instant::now() + ENDS;
    while !lg.fakehost(&["lguest", "notifies"]).contains("0x3000") {
        assert!(
            std::time::Instant::now() < deadline,
            "the Guest never notified"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    go_tx.send(()).unwrap();
    let (notified, died, reason) = owner.join();
    assert_eq!(notified, Ok(0x3000u64.to_le_bytes().to_vec()));
    assert_eq!(died, Err(Errno::ENOENT));
    assert_eq!(reason, Ok(b"CRASH: after the signal\0".to_vec()));
    drop(memory);
}

#[test]
fn sixty_four_launchers_asleep_in_read_do_not_starve_the_writes_that_wake_others() {
    let lg = Lg::start("lg-sleepers", "halt.guest");
    let sleepers: Vec<Holder> = (0..64)
        .map(|i| {
            let bits = if i % 2 == 0 { Bits::B64 } else { Bits::B32 };
            Holder::start(bits, &lg.node)
        })
        .collect();
    for sleeper in &sleepers {
        sleeper.wait_in_read(ENDS);
    }
    // With 64 reads parked, others' IRQ and EVENTFD writes and their reads still go through.
    lg.guest_script("attach.guest");
    let node = lg.node.clone();
    let runs: Vec<Run> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let node = node.clone();
                s.spawn(move || run_limited(Bits::B64, &node, &["attach-while-blocked"], ENDS))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for attach in &runs {
        assert_all_cases_pass(attach, 7, &["attach-read-never-returned-0x2000"]);
    }
    for sleeper in &sleepers {
        assert!(sleeper.in_read(), "a sleeper woke up");
    }
}

#[test]
fn zero_byte_reads_and_writes_never_reach_the_device() {
    // docs/lguest.md: the FUSE kernel completes them itself, where the lguest driver would
    // read the request words anyway (write) or run the Guest (read).
    let lg = Lg::start("lg-zero", "halt.guest");
    let dev = Dev::open(lg.node.to_str().unwrap()).expect("open");
    let memory = vec![0u8; 16 << 12];
    assert_eq!(request(&dev, &[0, memory.as_ptr() as u64, 16, 0]), Ok(24));
    // A halted Guest: a read that reached the device would sleep until a signal.
    assert_eq!(dev.pread(0), Ok(Vec::new()));
    // SAFETY: a zero-length write reads no memory.
    let rc = unsafe { libc::pwrite(dev.raw(), std::ptr::null(), 0, 0) };
    assert_eq!(rc, 0);
    let log = lg.fakehost(&["lguest", "status", "--json"]);
    assert!(
        log.contains("waiting_for_first_read"),
        "the Guest never ran: {log}"
    );
    drop(memory);
}
