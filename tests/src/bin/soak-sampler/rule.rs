//! The flatness rule of the soak (docs/soak.md, docs/decisions.md #60): what "memory, threads
//! and descriptors stayed flat" means for one process, given its baseline (taken once quiet
//! after the warm-up), its end (taken once quiet after the soak) and its samples of the soak.
//!
//! - Descriptors: the same number at the end as at the baseline. Every open file, socket and
//!   pipe of these servers belongs to a connection, a copy or a Launcher; once the clients are
//!   gone and the servers have gone idle, one more is a leak.
//! - Threads: the same number, except the FUSE engine's readers: a session starts them on
//!   demand and keeps them, up to `MAX_READERS` per session (per /dev/fuse descriptor), so how
//!   many a burst leaves behind depends on scheduling. The other threads must be equal, the
//!   readers at most that bound.
//! - Resident memory: allocators keep what they got and V8 collects when it likes, so the end
//!   is not compared with the baseline byte for byte. A leak is a trend: the least-squares
//!   slope of RSS over the second half of the soak (the warm-up and the first half absorb
//!   arenas, caches and pools reaching their working size), times that half's duration, may
//!   exceed `rss_bound_kib` (2 MiB or 5 % of the baseline, whichever is larger) by no more than
//!   two standard errors of that fit. The error term is what lets a garbage-collected process
//!   (Azurite: a V8 sawtooth of tens of MiB) through a short run, where its trend cannot be
//!   told from its noise; it shrinks as the run grows (with T^-1/2 per unit of growth over
//!   the half), so the default 600 s judges it to a few MiB and the Rust servers, whose
//!   residuals are small, to about the bound itself.

use crate::procfs::Sample;

/// The engine's bound on readers per session.
const MAX_READERS: u64 = cusedev::fuse::session::MAX_READERS as u64;

/// Growth the RSS trend may show over the second half: this many KiB, or `RSS_FRACTION` of
/// the baseline, whichever is larger.
pub const RSS_FLOOR_KIB: f64 = 2048.0;
pub const RSS_FRACTION: f64 = 0.05;

/// The most readers `s` may have (0 for a process without FUSE sessions).
pub fn reader_bound(s: &Sample) -> u64 {
    MAX_READERS * s.fuse_fds
}

/// Threads other than the engine's readers.
pub fn other_threads(s: &Sample) -> u64 {
    s.threads.saturating_sub(s.readers)
}

/// Whether `now` is back at `baseline` for descriptors and threads.
pub fn back_at(baseline: &Sample, now: &Sample) -> bool {
    now.fds == baseline.fds
        && other_threads(now) == other_threads(baseline)
        && now.readers <= reader_bound(now)
}

/// How much RSS the trend may grow over the second half, for a process with this baseline.
pub fn rss_bound_kib(baseline: &Sample) -> f64 {
    RSS_FLOOR_KIB.max(baseline.rss_kib as f64 * RSS_FRACTION)
}

/// A least-squares line through (t, value) points: its slope, and the standard error of that
/// slope from the residuals.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fit {
    pub slope: f64,
    pub slope_se: f64,
}

/// The least-squares fit of `points`; None with fewer than three points or one distinct time
/// (no residual left to estimate the error from).
pub fn fit(points: &[(f64, f64)]) -> Option<Fit> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_v = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut cov, mut var) = (0.0, 0.0);
    for (t, v) in points {
        cov += (t - mean_t) * (v - mean_v);
        var += (t - mean_t) * (t - mean_t);
    }
    if var <= 0.0 {
        return None;
    }
    let slope = cov / var;
    let residuals: f64 = points
        .iter()
        .map(|(t, v)| (v - mean_v - slope * (t - mean_t)).powi(2))
        .sum();
    let slope_se = (residuals / (n - 2.0) / var).sqrt();
    Some(Fit { slope, slope_se })
}

/// The RSS trend of the second half of `soak` (t, RSS KiB in time order), over that half:
/// the fitted growth in KiB, its standard error, and how many samples it came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Growth {
    pub kib: f64,
    pub se_kib: f64,
    pub samples: usize,
}

pub fn second_half_growth(soak: &[(f64, f64)]) -> Option<Growth> {
    let (first, last) = (soak.first()?.0, soak.last()?.0);
    let mid = (first + last) / 2.0;
    let half: Vec<(f64, f64)> = soak.iter().copied().filter(|p| p.0 >= mid).collect();
    let span = half.last()?.0 - half.first()?.0;
    let f = fit(&half)?;
    Some(Growth {
        kib: f.slope * span,
        se_kib: f.slope_se * span,
        samples: half.len(),
    })
}

/// One process's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub fds_ok: bool,
    pub threads_ok: bool,
    pub readers_ok: bool,
    /// The fitted growth over the second half; None when the soak has too few samples to
    /// fit, which fails.
    pub rss_growth: Option<Growth>,
    pub rss_bound: f64,
}

impl Verdict {
    pub fn judge(baseline: &Sample, end: &Sample, soak: &[(f64, f64)]) -> Verdict {
        Verdict {
            fds_ok: end.fds == baseline.fds,
            threads_ok: other_threads(end) == other_threads(baseline),
            readers_ok: end.readers <= reader_bound(end),
            rss_growth: second_half_growth(soak),
            rss_bound: rss_bound_kib(baseline),
        }
    }

    pub fn rss_ok(&self) -> bool {
        // Above the bound by more than two standard errors: a growth the noise cannot explain.
        self.rss_growth
            .is_some_and(|g| g.kib - 2.0 * g.se_kib <= self.rss_bound)
    }

    /// The checks that failed, by name (empty: flat).
    pub fn failures(&self) -> Vec<&'static str> {
        [
            (self.fds_ok, "fds"),
            (self.threads_ok, "threads"),
            (self.readers_ok, "readers"),
            (self.rss_ok(), "rss"),
        ]
        .into_iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, name)| name)
        .collect()
    }

    pub fn ok(&self) -> bool {
        self.failures().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rss_kib: u64, threads: u64, readers: u64, fds: u64, fuse_fds: u64) -> Sample {
        Sample {
            rss_kib,
            threads,
            readers,
            fds,
            fuse_fds,
        }
    }

    fn line(n: usize, start: f64, per_second: f64) -> Vec<(f64, f64)> {
        (0..n)
            .map(|i| (i as f64 * 2.0, start + per_second * i as f64 * 2.0))
            .collect()
    }

    #[test]
    fn the_fit_of_a_line_is_its_slope_with_no_error() {
        let f = fit(&line(50, 1000.0, 3.5)).unwrap();
        assert!((f.slope - 3.5).abs() < 1e-9, "{f:?}");
        assert!(f.slope_se < 1e-6, "{f:?}");
        assert_eq!(fit(&[(1.0, 2.0), (2.0, 3.0)]), None);
        assert_eq!(fit(&[(1.0, 2.0), (1.0, 3.0), (1.0, 4.0)]), None);
    }

    #[test]
    fn growth_is_fitted_over_the_second_half_only() {
        // Warm-up growth in the first half, flat in the second.
        let mut soak = line(150, 1000.0, 100.0);
        let top = soak.last().unwrap().1;
        soak.extend((150..300).map(|i| (i as f64 * 2.0, top)));
        let g = second_half_growth(&soak).unwrap();
        assert!(g.kib.abs() < 1e-6, "{g:?}");
        assert_eq!(g.samples, 150);
    }

    /// Azurite's shape: a collection every 12 s, 60 MiB between floor and top.
    fn sawtooth(seconds: usize, floor: f64) -> Vec<(f64, f64)> {
        (0..seconds / 2)
            .map(|i| {
                let t = i as f64 * 2.0;
                (t, floor + (t % 12.0) / 12.0 * 60_000.0)
            })
            .collect()
    }

    #[test]
    fn a_steady_leak_fails_and_a_sawtooth_passes() {
        let base = sample(20_000, 10, 0, 12, 0);
        // 10 KiB/s over a 300-s half: 3 MiB, above the 2 MiB floor.
        let leak = line(300, 20_000.0, 10.0);
        let g = second_half_growth(&leak).unwrap();
        assert!((g.kib - 2_980.0).abs() < 1.0, "{g:?}");
        assert!(!Verdict::judge(&base, &base, &leak).rss_ok());
        // No trend under a sawtooth, over a 600-s soak and over a 60-s one.
        let big = sample(200_000, 10, 0, 12, 0);
        for seconds in [600, 60] {
            let v = Verdict::judge(&big, &big, &sawtooth(seconds, 200_000.0));
            assert!(v.ok(), "{seconds} s: {v:?}");
        }
        // A 100 KiB/s leak under that sawtooth: 30 MiB over the half of a 600-s soak.
        let saw_leak: Vec<(f64, f64)> = sawtooth(600, 200_000.0)
            .into_iter()
            .map(|(t, v)| (t, v + 100.0 * t))
            .collect();
        let v = Verdict::judge(&big, &big, &saw_leak);
        assert!(!v.rss_ok(), "{v:?}");
    }

    #[test]
    fn the_bound_is_a_fraction_of_large_processes() {
        assert_eq!(rss_bound_kib(&sample(10_000, 1, 0, 3, 0)), RSS_FLOOR_KIB);
        assert_eq!(rss_bound_kib(&sample(100_000, 1, 0, 3, 0)), 5_000.0);
    }

    #[test]
    fn one_descriptor_or_thread_more_fails() {
        let base = sample(20_000, 10, 2, 12, 2);
        let flat = line(20, 20_000.0, 0.0);
        assert!(Verdict::judge(&base, &base, &flat).ok());
        assert!(!Verdict::judge(&base, &sample(20_000, 10, 2, 13, 2), &flat).fds_ok);
        assert!(!Verdict::judge(&base, &sample(20_000, 11, 2, 12, 2), &flat).threads_ok);
        assert!(!back_at(&base, &sample(20_000, 11, 2, 12, 2)));
    }

    #[test]
    fn readers_may_grow_up_to_the_engines_bound_per_session() {
        let base = sample(20_000, 10, 2, 12, 2);
        let more_readers = sample(20_000, 24, 16, 12, 2);
        assert!(back_at(&base, &more_readers));
        let flat = line(20, 20_000.0, 0.0);
        assert!(Verdict::judge(&base, &more_readers, &flat).ok());
        let too_many = sample(20_000, 25, 17, 12, 2);
        assert!(!Verdict::judge(&base, &too_many, &flat).readers_ok);
    }

    #[test]
    fn too_few_samples_fail() {
        let base = sample(20_000, 10, 0, 12, 0);
        assert!(!Verdict::judge(&base, &base, &line(4, 20_000.0, 0.0)).rss_ok());
        assert!(!Verdict::judge(&base, &base, &[]).rss_ok());
    }
}
