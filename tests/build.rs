//! Builds the C programs under `tests/c/` twice, 64-bit and 32-bit (`-m32`), into OUT_DIR:
//!
//! - `c/xs-client.c` → `xs-client`, `xs-client32` (directory in `XS_CLIENT_DIR`): "any
//!   program issuing the ioctl" on /dev/azure_xs_fastpath;
//! - `c/lguest-launcher.c` → `lguest-launcher`, `lguest-launcher32` (directory in
//!   `LGUEST_LAUNCHER_DIR`): a 3.x Launcher for /dev/lguest, whose word is the build's
//!   `unsigned long` (8 or 4 bytes).
//!
//! The tests run them on a FUSE mount here and, in the QEMU guest, on the CUSE node (whose
//! root is this host's `/`). The `cc` crate finds the C compiler (honouring `CC` and `CFLAGS`
//! as every other C build in the Rust world does); we only ask it for the compiler and link an
//! executable ourselves.
//!
//! A failed build does not fail the crate (every other test here would go with it): the
//! compiler's output lands in `OUT_DIR/<name>.build.log` and `cusedev_tests::xs_client` /
//! `cusedev_tests::lguest_launcher` fail the tests that need the binary with that text. The
//! build script then reruns on every build until the binary exists (after
//! `tests/scripts/install-deps.sh` installed gcc-multilib, say).

use std::path::{Path, PathBuf};

/// One C program: its source, the names of its two builds, and the variable that tells the
/// crate where they are.
struct Program {
    source: &'static str,
    name64: &'static str,
    name32: &'static str,
    dir_env: &'static str,
}

const PROGRAMS: &[Program] = &[
    Program {
        source: "c/xs-client.c",
        name64: "xs-client",
        name32: "xs-client32",
        dir_env: "XS_CLIENT_DIR",
    },
    Program {
        source: "c/lguest-launcher.c",
        name64: "lguest-launcher",
        name32: "lguest-launcher32",
        dir_env: "LGUEST_LAUNCHER_DIR",
    },
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // cargo_metadata(false) below keeps cc from printing these itself.
    for var in ["CC", "CFLAGS", "TARGET_CC", "TARGET_CFLAGS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for program in PROGRAMS {
        println!("cargo:rerun-if-changed={}", program.source);
        println!("cargo:rustc-env={}={}", program.dir_env, out.display());
        for (name, bits) in [(program.name64, "-m64"), (program.name32, "-m32")] {
            build(program.source, &out, name, bits);
        }
    }
}

/// Compiles `source` into `out/name` with `bits`; on failure leaves `out/name.build.log`.
fn build(source: &str, out: &Path, name: &str, bits: &str) {
    let binary = out.join(name);
    let log = out.join(format!("{name}.build.log"));
    let _ = std::fs::remove_file(&binary);
    let mut command = cc::Build::new()
        .cargo_metadata(false)
        .opt_level(2)
        .flag(bits)
        .get_compiler()
        .to_command();
    command
        .args([
            "-std=gnu11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pthread",
            "-o",
        ])
        .arg(&binary)
        .arg(source);
    let shown = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let text = match command.output() {
        Ok(output) if output.status.success() => None,
        Ok(output) => Some(format!(
            "{shown} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )),
        Err(err) => Some(format!("cannot run {shown}: {err}")),
    };
    match text {
        None => {
            let _ = std::fs::remove_file(&log);
        }
        Some(text) => {
            std::fs::write(&log, &text).expect("write the build log");
            println!(
                "cargo:warning={name} ({bits}) did not build; see {} \
                 (tests/scripts/install-deps.sh installs gcc and gcc-multilib)",
                log.display()
            );
            // A path that does not exist: cargo reruns this script on every build.
            println!("cargo:rerun-if-changed={}", binary.display());
        }
    }
}
