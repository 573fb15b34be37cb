//! The run directory of a preload frontend: its listening socket and the preload library.
//! Private to the user (0700, as `$XDG_RUNTIME_DIR` itself is); removed when cusedev stops.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Where run directories go when `--preload-dir` is not given: `$XDG_RUNTIME_DIR/cusedev`,
/// else `/run/cusedev` for root, else `$TMPDIR/cusedev-<uid>` (`/tmp` without TMPDIR).
pub fn default_parent() -> PathBuf {
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(runtime).join("cusedev");
    }
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return PathBuf::from("/run/cusedev");
    }
    std::env::temp_dir().join(format!("cusedev-{uid}"))
}

/// A directory this process made and removes.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// `dir` itself when given (made if missing, kept at the end), else
    /// `<default parent>/run-<pid>` (removed at the end).
    pub fn create(dir: Option<&Path>) -> io::Result<RunDir> {
        let path = match dir {
            Some(dir) => dir.to_owned(),
            None => {
                let parent = default_parent();
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&parent)?;
                parent.join(format!("run-{}", std::process::id()))
            }
        };
        // A run directory left by a killed cusedev of the same pid is stale: start afresh.
        if dir.is_none() && path.exists() {
            fs::remove_dir_all(&path)?;
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)?;
        // The library inside must stay readable to every process of the command, whatever
        // user it becomes; the socket is guarded by the node's mode check, not by the
        // directory. 0711: others may pass through to the library, not list.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o711))?;
        Ok(RunDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn socket(&self) -> PathBuf {
        self.path.join("preload.sock")
    }

    /// Takes away what this process put there (the directory too, unless it held something
    /// else already). Idempotent; also done on drop.
    pub fn remove(&self) {
        let _ = fs::remove_file(self.socket());
        let _ = fs::remove_dir_all(self.path.join("lib"));
        let _ = fs::remove_dir_all(self.path.join("lib32"));
        let _ = fs::remove_dir(&self.path);
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        self.remove();
    }
}
