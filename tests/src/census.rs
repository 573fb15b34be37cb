//! What a process holds, for tests that must leave nothing behind: its descriptors and its
//! threads, counted before a fault and waited for (on /proc, bounded) after it.
//!
//! [`RowFigures`] is the fault matrix's bookkeeping around one row (tests/tests/fault_matrix/):
//! the baseline, the most seen while the fault was in force, and the census it came back to,
//! printed as one `fault-matrix:` line on stderr (docs/fault-matrix.md collects them).

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

    /// Every thread, whatever its name.
    pub fn thread_count(&self) -> usize {
        self.threads.values().sum()
    }

    /// The engine's reader threads.
    pub fn readers(&self) -> usize {
        self.threads.get(READER).copied().unwrap_or(0)
    }

    /// `pid`'s census once it has stayed the same for [`SETTLED`]: a baseline taken while a
    /// short-lived thread is still on its way out (the thread that bound an offer ends just
    /// after cusedev logs `serving ...`, and nothing tells when) would never be seen again.
    /// Polls /proc; panics if it does not settle within `limit`.
    pub fn settled(pid: u32, limit: Duration) -> Census {
        let deadline = Instant::now() + limit;
        let mut last = Census::of(pid);
        let mut since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let now = Census::of(pid);
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= SETTLED {
                return last;
            }
            assert!(
                Instant::now() < deadline,
                "pid {pid} did not settle within {limit:?}: last {last:?}"
            );
        }
    }

    /// Whether `self` is back at `baseline`: the same fds and the same threads, except that
    /// the engine's reader threads (`cusedev-fuse`) may number up to
    /// [`cusedev::fuse::session::MAX_READERS`] per session: a session starts readers on
    /// demand and keeps them, so how many a burst of requests leaves depends on scheduling.
    pub fn is_back_at(&self, baseline: &Census) -> bool {
        let readers = Census::readers;
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

/// How long a census must stay the same to count as settled ([`Census::settled`]).
pub const SETTLED: Duration = Duration::from_millis(300);

/// Waits (bounded, on /proc) until `pid` is back at `baseline` (see [`Census::is_back_at`]);
/// returns the census that was.
pub fn wait_for_baseline(pid: u32, baseline: &Census, limit: Duration) -> Census {
    let deadline = Instant::now() + limit;
    loop {
        let now = Census::of(pid);
        if now.is_back_at(baseline) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} is not back at its baseline {limit:?} later:\nnow      {now:?}\nbaseline \
             {baseline:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One fault-matrix row's census of a process (cusedev): taken at a baseline, sampled while
/// the fault is in force, and waited for to come back.
pub struct RowFigures {
    row: String,
    pid: u32,
    baseline: Census,
    /// What the baseline was taken after ("a first copy"): threads a device starts once, on
    /// first use, belong to it.
    after: String,
    peak_fds: usize,
    peak_threads: usize,
}

impl RowFigures {
    /// The baseline of `pid` for row `row`: its census once settled ([`Census::settled`]).
    pub fn baseline(row: &str, pid: u32, after: &str) -> RowFigures {
        let baseline = Census::settled(pid, Duration::from_secs(30));
        RowFigures {
            row: row.to_string(),
            pid,
            peak_fds: baseline.fds,
            peak_threads: baseline.thread_count(),
            baseline,
            after: after.to_string(),
        }
    }

    /// Counts `pid` now, while the fault is in force (the line shows the highest seen).
    pub fn sample(&mut self) {
        let now = Census::of(self.pid);
        self.peak_fds = self.peak_fds.max(now.fds);
        self.peak_threads = self.peak_threads.max(now.thread_count());
    }

    /// Waits (bounded) until `pid` is back at the baseline, then prints the row's line:
    /// `fault-matrix: ROW: cusedev fds A -> B, threads C -> D (baseline ...)`.
    pub fn back(self, limit: Duration) -> Census {
        let end = wait_for_baseline(self.pid, &self.baseline, limit);
        eprintln!("{}", self.line(&end));
        end
    }

    fn line(&self, end: &Census) -> String {
        format!(
            "fault-matrix: {}: cusedev fds {} -> {}, threads {} -> {} (baseline after {}; FUSE \
             readers {} -> {}; during the fault up to {} fds, {} threads)",
            self.row,
            self.baseline.fds,
            end.fds,
            self.baseline.thread_count(),
            end.thread_count(),
            self.after,
            self.baseline.readers(),
            end.readers(),
            self.peak_fds,
            self.peak_threads
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_has_the_fixed_shape_the_docs_collect() {
        let census = |fds, threads| Census {
            fds,
            fuse_fds: 1,
            threads: BTreeMap::from([("cusedev".to_string(), threads), (READER.to_string(), 2)]),
        };
        let figures = RowFigures {
            row: "daemon-killed".into(),
            pid: 1,
            baseline: census(12, 9),
            after: "a first copy".into(),
            peak_fds: 13,
            peak_threads: 12,
        };
        assert_eq!(
            figures.line(&census(12, 9)),
            "fault-matrix: daemon-killed: cusedev fds 12 -> 12, threads 11 -> 11 (baseline after \
             a first copy; FUSE readers 2 -> 2; during the fault up to 13 fds, 12 threads)"
        );
    }
}
