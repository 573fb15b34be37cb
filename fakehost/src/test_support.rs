//! Helpers for unit tests (no tempfile crate: a directory under the system temp dir, removed on
//! drop).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A fresh directory, removed with its contents when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/fakehost-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("fakehost-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create test temp dir");
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A progress sink nobody listens to (but that never says the client left).
pub struct NullProgress;

impl crate::service::ProgressSink for NullProgress {
    fn interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(3600)
    }

    fn report(&mut self, _done: u64, _total: u64) -> bool {
        true
    }
}
