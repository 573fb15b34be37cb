//! The CSV the sampler writes (build/soak/samples.csv, baseline.csv, end.csv): one row per
//! process per instant, in the order of `HEADER`. Times are Unix seconds, so rows written by
//! the periodic sampler and by the settle runs line up.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::procfs::Sample;

pub const HEADER: &str = "t,phase,process,pid,rss_kib,threads,readers,fds,fuse_fds";

/// One process (by the name the script gave it) at one instant of one phase.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub t: f64,
    pub phase: String,
    pub process: String,
    pub pid: u32,
    pub sample: Sample,
}

impl fmt::Display for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.sample;
        write!(
            f,
            "{:.3},{},{},{},{},{},{},{},{}",
            self.t,
            self.phase,
            self.process,
            self.pid,
            s.rss_kib,
            s.threads,
            s.readers,
            s.fds,
            s.fuse_fds
        )
    }
}

impl Row {
    /// Parses one line written by `Display` (not the header).
    pub fn parse(line: &str) -> Result<Row, String> {
        let bad = || format!("not a sample row: {line:?}");
        let fields: Vec<&str> = line.trim().split(',').collect();
        let [t, phase, process, pid, rss_kib, threads, readers, fds, fuse_fds] = fields[..] else {
            return Err(bad());
        };
        let int = |v: &str| v.parse::<u64>().map_err(|_| bad());
        Ok(Row {
            t: t.parse().map_err(|_| bad())?,
            phase: phase.to_owned(),
            process: process.to_owned(),
            pid: pid.parse().map_err(|_| bad())?,
            sample: Sample {
                rss_kib: int(rss_kib)?,
                threads: int(threads)?,
                readers: int(readers)?,
                fds: int(fds)?,
                fuse_fds: int(fuse_fds)?,
            },
        })
    }
}

/// Every row of a CSV file's text (its header skipped).
pub fn parse_all(text: &str) -> Result<Vec<Row>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && *l != HEADER)
        .map(Row::parse)
        .collect()
}

/// Now, as Unix seconds.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_survives_the_round_trip() {
        let row = Row {
            t: 1700000000.25,
            phase: "soak".into(),
            process: "cusedev".into(),
            pid: 42,
            sample: Sample {
                rss_kib: 9000,
                threads: 12,
                readers: 5,
                fds: 17,
                fuse_fds: 3,
            },
        };
        let text = format!("{HEADER}\n{row}\n");
        assert_eq!(parse_all(&text).unwrap(), vec![row]);
    }

    #[test]
    fn a_short_line_is_an_error() {
        assert!(Row::parse("1.0,soak,cusedev,42,9000").is_err());
        assert!(Row::parse("x,soak,cusedev,42,1,2,3,4,5").is_err());
    }
}
