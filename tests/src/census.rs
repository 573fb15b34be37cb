//! What a process holds, for tests that must leave nothing behind: its descriptors and its
//! threads, counted before a fault and waited for (on /proc, bounded) after it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What a process holds: its fds, how many of them are /dev/fuse (one per FUSE session), and
/// its threads counted by name (comm).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Census {
    pub fds: usize,
    pub fuse_fds: usize,
    pub threads: BTreeMap<String, usize>,
}

impl Census {
    pub fn of(pid: u32) -> Census {
        let fd_dir = format!("/proc/{pid}/fd");
        let links: Vec<PathBuf> = std::fs::read_dir(&fd_dir)
            .unwrap_or_else(|e| panic!("{fd_dir}: {e}"))
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .collect();
        let mut threads = BTreeMap::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
        {
            let Ok(task) = task else { continue };
            if let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) {
                *threads.entry(comm.trim().to_string()).or_insert(0) += 1;
            }
        }
        Census {
            fds: links.len(),
            fuse_fds: links
                .iter()
                .filter(|l| l.as_os_str() == "/dev/fuse")
                .count(),
            threads,
        }
    }

    /// Whether `self` is back at `baseline`: the same fds and the same threads, except that
    /// the engine's reader threads (`cusedev-fuse`) may number up to
    /// [`cusedev::fuse::session::MAX_READERS`] per session: a session starts readers on
    /// demand and keeps them, so how many a burst of requests leaves depends on scheduling.
    pub fn is_back_at(&self, baseline: &Census) -> bool {
        let readers = |c: &Census| c.threads.get(READER).copied().unwrap_or(0);
        let others = |c: &Census| {
            let mut t = c.threads.clone();
            t.remove(READER);
            t
        };
        self.fds == baseline.fds
            && others(self) == others(baseline)
            && readers(self) <= cusedev::fuse::session::MAX_READERS * self.fuse_fds
    }
}

/// The engine's reader threads' name.
const READER: &str = "cusedev-fuse";

/// Waits (bounded, on /proc) until `pid` is back at `baseline` (see [`Census::is_back_at`]).
pub fn wait_for_baseline(pid: u32, baseline: &Census, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let now = Census::of(pid);
        if now.is_back_at(baseline) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} is not back at its baseline {limit:?} later:\nnow      {now:?}\nbaseline \
             {baseline:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
