//! Builds the preload library (preload/cusedev_preload.c, docs/preload.md) twice into OUT_DIR,
//! for 64- and 32-bit clients; `preload::library` embeds both in the binary.
//!
//! The 64-bit one must build. The 32-bit one needs gcc-multilib; without it the file is left
//! empty (and a warning says so), and cusedev then serves only 64-bit clients.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = "preload/cusedev_preload.c";

const FLAGS: &[&str] = &[
    "-O2",
    "-g",
    "-fPIC",
    "-shared",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-fvisibility=hidden",
    "-D_GNU_SOURCE",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={SOURCE}");

    let Some(out_dir) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        fail("OUT_DIR is not set (build.rs runs under cargo)");
    };
    let compiler = cc::Build::new()
        .cargo_metadata(false)
        .get_compiler()
        .path()
        .to_path_buf();

    let lib64 = out_dir.join("libcusedev-preload-x86_64.so");
    if let Err(why) = compile(&compiler, &[], &lib64) {
        fail(&format!("the 64-bit preload library did not build:\n{why}"));
    }

    let lib32 = out_dir.join("libcusedev-preload-i386.so");
    if let Err(why) = compile(&compiler, &["-m32"], &lib32) {
        println!(
            "cargo:warning=no 32-bit preload library (is gcc-multilib installed?): \
             32-bit clients will not be served by the preload frontend"
        );
        for line in why.lines().take(5) {
            println!("cargo:warning=  {line}");
        }
        if let Err(err) = fs::write(&lib32, b"") {
            fail(&format!("cannot write {}: {err}", lib32.display()));
        }
    }
}

/// Runs the compiler once; the error is its output.
fn compile(compiler: &Path, extra: &[&str], out: &Path) -> Result<(), String> {
    let output = Command::new(compiler)
        .args(extra)
        .args(FLAGS)
        .arg("-o")
        .arg(out)
        .arg(SOURCE)
        .arg("-ldl")
        .output()
        .map_err(|err| format!("cannot run {}: {err}", compiler.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} exited with {}\n{}",
            compiler.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}
