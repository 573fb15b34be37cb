//! Builds the C client `tests/c/xs-client.c` twice, 64-bit and 32-bit (`-m32`), into OUT_DIR.
//!
//! The tests run it as "any program issuing the ioctl" on /dev/azure_xs_fastpath (here on a
//! FUSE mount, in the QEMU guest on the CUSE node, whose root is this host's `/`). The `cc`
//! crate finds the C compiler (honouring `CC` and `CFLAGS` as every other C build in the
//! Rust world does); we only ask it for the compiler and link an executable ourselves.
//!
//! A failed build does not fail the crate (every other test here would go with it): the
//! compiler's output lands in `OUT_DIR/<name>.build.log` and `cusedev_tests::xs_client` fails
//! the tests that need the binary with that text. The build script then reruns on every
//! build until the binary exists (after `tests/scripts/install-deps.sh` installed gcc-multilib,
//! say).

use std::path::PathBuf;

const SOURCE: &str = "c/xs-client.c";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-changed=build.rs");
    // cargo_metadata(false) below keeps cc from printing these itself.
    for var in ["CC", "CFLAGS", "TARGET_CC", "TARGET_CFLAGS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rustc-env=XS_CLIENT_DIR={}", out.display());
    for (name, bits) in [("xs-client", "-m64"), ("xs-client32", "-m32")] {
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
            .arg(SOURCE);
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
}
