//! `make qemu-demo`: the main job in a real guest kernel. Boots Debian's 6.1 kernel under QEMU
//! with our vhost-user-vsock backend; in the guest, cusedev serves /dev/vmbus/hv_fcopy as a
//! CUSE character device and Debian's unmodified hv_fcopy_daemon receives the fixtures from
//! fakehost on the host. Checks every file by sha256 inside the guest.
//!
//! Needs root and the workspace binaries built next to it (`make qemu-demo` does both). Logs:
//! `build/qemu-logs/qemu-demo-<pid>/` (guest console, agent channel) and the scratch directory
//! it prints (host sockets).

use std::path::Path;
use std::process::ExitCode;

use cusedev_tests::fcopy_guest::{
    guest_ok, guest_sha256, start_cusedev, start_daemon, VsockHost, SHORT,
};
use cusedev_tests::harness::sha256;
use cusedev_tests::qemu::{GuestConfig, GuestImage};

fn main() -> ExitCode {
    match demo() {
        Ok(()) => {
            println!("== qemu-demo passed");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("qemu-demo: {err}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> Result<(), String> {
    let top = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace root")?
        .to_path_buf();
    println!("== guest image (Debian's kernel + a busybox initramfs; cached in build/guest)");
    let image = GuestImage::ensure().map_err(|e| format!("building the guest image: {e}"))?;
    println!("   kernel {}", image.kver);

    let host = VsockHost::start("qemu-demo");
    println!(
        "== host: fakehost and vhost (vhost-user socket {}) running",
        host.vhost_socket().display()
    );
    let mut guest = host
        .boot(&image, GuestConfig::named("qemu-demo"))
        .map_err(|e| format!("booting the guest: {e}"))?;
    println!(
        "== guest booted in {:.1} s (QEMU, TCG)",
        guest.boot_seconds()
    );

    let frontend = start_cusedev(&mut guest).map_err(|e| e.to_string())?;
    println!("   guest cusedev: {}", frontend.trim());
    let node = guest_ok(&mut guest, "ls", "ls -l /dev/vmbus/hv_fcopy", SHORT)
        .map_err(|e| e.to_string())?;
    println!("   guest: {}", node.trim());
    start_daemon(&mut guest).map_err(|e| e.to_string())?;
    println!("   guest: /usr/sbin/hv_fcopy_daemon -n registered");

    for name in ["hello.txt", "sample.bin"] {
        let src = top.join("fixtures").join(name);
        println!("== fakehost copy fixtures/{name} /srv/in/ --create-path");
        let (code, text) = host.copy(&src, "/srv/in/", &["--create-path"]);
        print!("{text}");
        if code != Some(0) {
            return Err(format!("copying {name} failed (exit {code:?})"));
        }
        let in_guest = guest_sha256(&mut guest, &format!("/srv/in/{name}"), SHORT)
            .map_err(|e| e.to_string())?;
        if in_guest != sha256(&src) {
            return Err(format!(
                "{name} arrived different: sha256 {in_guest} in the guest"
            ));
        }
        println!("   sha256 in the guest matches the host's: {in_guest}");
    }

    println!("== again without --overwrite (the guest must refuse with 0x80070050)");
    let (code, text) = host.copy(&top.join("fixtures/hello.txt"), "/srv/in/", &[]);
    print!("{text}");
    if code != Some(1) || !text.contains("0x80070050") {
        return Err(format!(
            "the repeat copy should fail with 0x80070050 (exit {code:?})"
        ));
    }
    guest.poweroff().map_err(|e| format!("powering off: {e}"))?;
    Ok(())
}
