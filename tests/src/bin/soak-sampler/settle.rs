//! Waiting for the servers to be quiet: after the warm-up (for the baseline) and after the
//! soak (for the end), the clients are gone, but servers still wind down for a while: tokio's
//! blocking pool keeps an idle thread 10 s (fakehost's store calls), Node closes an idle
//! keep-alive connection after 5 s (Azurite), a FUSE RELEASE arrives after close(2). So a
//! process counts as settled when its threads, readers and descriptors have not changed for a
//! whole window (longer than those timers), and, at the end, are also back at the baseline.
//! Polls /proc once a second up to a limit; a limit reached is a failure, with the last sample.

use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::procfs::Sample;
use crate::rows::{now, Row};
use crate::rule::back_at;

/// What must stay unchanged for a window: everything but RSS (threads, readers, fds, FUSE fds).
type Shape = (u64, u64, u64, u64);

fn shape(s: &Sample) -> Shape {
    (s.threads, s.readers, s.fds, s.fuse_fds)
}

/// Samples every process once; an error names the first one that is gone.
pub fn sample_all(procs: &[(String, u32)], phase: &str) -> Result<Vec<Row>, String> {
    let t = now();
    procs
        .iter()
        .map(|(name, pid)| {
            let sample = Sample::of(*pid).map_err(|e| format!("{name} (pid {pid}): {e}"))?;
            Ok(Row {
                t,
                phase: phase.to_owned(),
                process: name.clone(),
                pid: *pid,
                sample,
            })
        })
        .collect()
}

/// How a settle run ended.
pub enum Settled {
    /// Quiet (and at the baseline, if one was given) for the whole window.
    Yes(Vec<Row>),
    /// The limit passed first: the last sample, and which processes were not there yet.
    No(Vec<Row>, Vec<String>),
}

pub fn settle(
    procs: &[(String, u32)],
    phase: &str,
    baseline: Option<&[Row]>,
    window: Duration,
    limit: Duration,
) -> Result<Settled, String> {
    let deadline = Instant::now() + limit;
    // The processes' shapes when last seen, and since when they have been so.
    let mut last: Option<(Vec<Shape>, Instant)> = None;
    loop {
        let rows = sample_all(procs, phase)?;
        let shapes: Vec<_> = rows.iter().map(|r| shape(&r.sample)).collect();
        let since = match &last {
            Some((prev, since)) if *prev == shapes => *since,
            _ => Instant::now(),
        };
        last = Some((shapes, since));
        let behind: Vec<String> = match baseline {
            None => Vec::new(),
            Some(base) => rows
                .iter()
                .filter(|r| {
                    !base
                        .iter()
                        .find(|b| b.process == r.process)
                        .is_some_and(|b| back_at(&b.sample, &r.sample))
                })
                .map(|r| r.process.clone())
                .collect(),
        };
        if behind.is_empty() && since.elapsed() >= window {
            return Ok(Settled::Yes(rows));
        }
        if Instant::now() >= deadline {
            let behind = if behind.is_empty() {
                procs.iter().map(|p| p.0.clone()).collect()
            } else {
                behind
            };
            return Ok(Settled::No(rows, behind));
        }
        sleep(Duration::from_secs(1));
    }
}
