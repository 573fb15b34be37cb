//! `qemu-fcopy-bench [--mb N]`: the QEMU half of `make bench` for the main job.
//!
//! Boots the test guest attached to our vhost backend and measures, from QEMU's start: the
//! guest agent ready, cusedev serving /dev/vmbus/hv_fcopy over CUSE with its bus on vsock, and
//! Debian's hv_fcopy_daemon registered (the "daemon ready" time). Then copies N MB (default 20)
//! through the daemon and reports the rate, checked by sha256 in the guest. Prints one
//! `qemu-fcopy ...` line per figure (figures are TCG figures: compare runs, not machines).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use cusedev_tests::fcopy_guest::{guest_sha256, start_cusedev, start_daemon, VsockHost};
use cusedev_tests::harness::{sha256, write_pattern_file};
use cusedev_tests::qemu::{GuestConfig, GuestImage};

fn main() -> ExitCode {
    let mut megabytes: u64 = 20;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--mb", Some(n)) if n > 0 => megabytes = n,
            _ => {
                eprintln!("usage: qemu-fcopy-bench [--mb N]");
                return ExitCode::from(2);
            }
        }
    }
    match bench(megabytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("qemu-fcopy-bench: {err}");
            ExitCode::FAILURE
        }
    }
}

fn bench(megabytes: u64) -> Result<(), String> {
    let image = GuestImage::ensure().map_err(|e| format!("guest image: {e}"))?;
    let host = VsockHost::start("qemu-fcopy-bench");
    let start = Instant::now();
    let mut guest = host
        .boot(&image, GuestConfig::named("qemu-fcopy-bench"))
        .map_err(|e| format!("boot: {e}"))?;
    println!("qemu-fcopy boot_to_agent_s={:.2}", guest.boot_seconds());
    start_cusedev(&mut guest).map_err(|e| e.to_string())?;
    println!(
        "qemu-fcopy boot_to_node_served_s={:.2}",
        start.elapsed().as_secs_f64()
    );
    start_daemon(&mut guest).map_err(|e| e.to_string())?;
    println!(
        "qemu-fcopy boot_to_daemon_ready_s={:.2}",
        start.elapsed().as_secs_f64()
    );

    let src = host.dir.join("bench.bin");
    let len = megabytes * 1_000_000;
    write_pattern_file(&src, len, 42);
    let copy_start = Instant::now();
    let (code, text) = host.copy(&src, "/srv/bench/", &["--create-path"]);
    let seconds = copy_start.elapsed().as_secs_f64();
    if code != Some(0) {
        return Err(format!("copy failed ({code:?}): {text}"));
    }
    let in_guest = guest_sha256(&mut guest, "/srv/bench/bench.bin", Duration::from_secs(600))
        .map_err(|e| e.to_string())?;
    let verified = in_guest == sha256(&src);
    println!(
        "qemu-fcopy copy_bytes={len} seconds={seconds:.2} MB_per_s={:.2} verified={}",
        len as f64 / seconds / 1e6,
        if verified { "yes" } else { "NO" }
    );
    guest.poweroff().map_err(|e| format!("poweroff: {e}"))?;
    if verified {
        Ok(())
    } else {
        Err("the copied file differs".into())
    }
}
