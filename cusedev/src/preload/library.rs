//! The preload library, as built by build.rs from cusedev/preload/, carried inside the
//! cusedev binary so that `cusedev run` needs nothing installed beside it.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

static LIBRARY_64: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/libcusedev-preload-x86_64.so"));
/// Empty when the build machine had no 32-bit toolchain (build.rs warned).
static LIBRARY_32: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libcusedev-preload-i386.so"));

/// The library's file name in each `$LIB` directory.
const FILE_NAME: &str = "libcusedev-preload.so";

/// Where the dynamic loader's `$LIB` points on Debian, per word size: the multiarch
/// directory, and for 32-bit also `lib32`, which the biarch loader of gcc-multilib's
/// `libc6-i386` expands it to.
const LIB_64: &str = "lib/x86_64-linux-gnu";
const LIB_32: [&str; 2] = ["lib32", "lib/i386-linux-gnu"];

/// The libraries installed in a run directory.
#[derive(Debug, Clone)]
pub struct Installed {
    /// The `LD_PRELOAD` entry: `<dir>/$LIB/libcusedev-preload.so`, literally `$LIB`, which
    /// ld.so expands to the directory of the process's word size.
    pub preload_entry: String,
    pub has_32_bit: bool,
}

/// Writes the libraries under `dir` (0755 files in 0755 directories: every process the
/// command starts, whatever user it becomes, must be able to map them).
pub fn install(dir: &Path) -> io::Result<Installed> {
    write_library(&dir.join(LIB_64), LIBRARY_64)?;
    let has_32_bit = !LIBRARY_32.is_empty();
    if has_32_bit {
        for lib in LIB_32 {
            write_library(&dir.join(lib), LIBRARY_32)?;
        }
    }
    Ok(Installed {
        preload_entry: format!("{}/$LIB/{FILE_NAME}", dir.display()),
        has_32_bit,
    })
}

fn write_library(lib_dir: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
    fs::create_dir_all(lib_dir)?;
    let path = lib_dir.join(FILE_NAME);
    fs::write(&path, bytes)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_64_bit_library_is_an_elf_shared_object() {
        assert_eq!(&LIBRARY_64[..4], b"\x7fELF");
        // ELFCLASS64, ET_DYN.
        assert_eq!(LIBRARY_64[4], 2);
        assert_eq!(u16::from_le_bytes([LIBRARY_64[16], LIBRARY_64[17]]), 3);
    }

    #[test]
    fn install_writes_both_word_sizes_under_lib_names() {
        let dir = std::env::temp_dir().join(format!("cusedev-lib-test-{}", std::process::id()));
        let installed = install(&dir).unwrap();
        assert!(installed
            .preload_entry
            .ends_with("/$LIB/libcusedev-preload.so"));
        assert!(dir.join(LIB_64).join(FILE_NAME).exists());
        for lib in LIB_32 {
            assert_eq!(dir.join(lib).join(FILE_NAME).exists(), installed.has_32_bit);
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
