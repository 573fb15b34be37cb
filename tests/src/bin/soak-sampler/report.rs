//! The soak's summary table: for each process, its baseline and end (RSS, threads, readers,
//! descriptors), the RSS trend of the second half against its bound, and the verdict of
//! `rule`.

use crate::rows::Row;
use crate::rule::{other_threads, reader_bound, Verdict};

/// Prints the table for every process of `baseline`; returns whether all passed.
pub fn report(samples: &[Row], baseline: &[Row], end: &[Row]) -> Result<bool, String> {
    println!(
        "{:<16} {:>8} {:>10} {:>10} {:>17} {:>9} {:>8} {:>8} {:>10} {:>6} {:>6}  verdict",
        "process",
        "pid",
        "rss0 KiB",
        "rss1 KiB",
        "trend KiB ±se",
        "bound",
        "thr0",
        "thr1",
        "readers1",
        "fds0",
        "fds1"
    );
    let mut all_ok = true;
    for b in baseline {
        let e = end
            .iter()
            .find(|e| e.process == b.process)
            .ok_or_else(|| format!("{} has no end sample", b.process))?;
        let soak: Vec<(f64, f64)> = samples
            .iter()
            .filter(|r| r.phase == "soak" && r.process == b.process)
            .map(|r| (r.t, r.sample.rss_kib as f64))
            .collect();
        let v = Verdict::judge(&b.sample, &e.sample, &soak);
        let trend = match v.rss_growth {
            Some(g) => format!("{:+.0}±{:.0}", g.kib, g.se_kib),
            None => "none".to_owned(),
        };
        let verdict = if v.ok() {
            "flat".to_owned()
        } else {
            format!("FAIL: {}", v.failures().join(", "))
        };
        all_ok &= v.ok();
        let (s0, s1) = (&b.sample, &e.sample);
        println!(
            "{:<16} {:>8} {:>10} {:>10} {:>17} {:>9.0} {:>8} {:>8} {:>10} {:>6} {:>6}  {verdict}",
            b.process,
            b.pid,
            s0.rss_kib,
            s1.rss_kib,
            trend,
            v.rss_bound,
            format!("{}+{}", other_threads(s0), s0.readers),
            format!("{}+{}", other_threads(s1), s1.readers),
            format!("{}<={}", s1.readers, reader_bound(s1)),
            s0.fds,
            s1.fds,
        );
    }
    Ok(all_ok)
}
