//! What `fakehost copy` prints: a progress bar on a terminal, and one result line.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use crate::fcopy::CopyReport;

/// Cells in the bar.
const BAR_WIDTH: usize = 20;

/// `[#########...........] 42% 12.3 MiB/s` (no newline).
pub fn bar(done: u64, total: u64, bytes_per_sec: f64) -> String {
    let fraction = if total == 0 {
        1.0
    } else {
        (done as f64 / total as f64).clamp(0.0, 1.0)
    };
    let filled = ((fraction * BAR_WIDTH as f64) as usize).min(BAR_WIDTH);
    format!(
        "[{}{}] {:>3}% {:.1} MiB/s",
        "#".repeat(filled),
        ".".repeat(BAR_WIDTH - filled),
        (fraction * 100.0) as u32,
        bytes_per_sec / (1024.0 * 1024.0)
    )
}

/// A progress bar on stderr, drawn only when stderr is a terminal.
pub struct ProgressBar {
    start: Instant,
    enabled: bool,
    drawn: bool,
}

impl Default for ProgressBar {
    fn default() -> Self {
        ProgressBar::new()
    }
}

impl ProgressBar {
    /// Starts the clock; draws nothing unless stderr is a terminal.
    pub fn new() -> ProgressBar {
        ProgressBar {
            start: Instant::now(),
            enabled: std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    /// Redraws the bar.
    pub fn update(&mut self, done: u64, total: u64) {
        if !self.enabled {
            return;
        }
        let elapsed = self.start.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 {
            done as f64 / elapsed
        } else {
            0.0
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{}", bar(done, total, rate));
        let _ = err.flush();
        self.drawn = true;
    }

    /// Erases the bar so the result line starts clean.
    pub fn finish(&mut self) {
        if self.drawn {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{}\r", " ".repeat(BAR_WIDTH + 20));
            let _ = err.flush();
            self.drawn = false;
        }
    }
}

/// The line `fakehost copy` prints at the end.
///
/// `copied big.iso (10485760 bytes) to /srv/incoming/: 0x00000000 success in 0.41 s (25.6 MB/s)`
/// or `copy failed at START_FILE_COPY: 0x80070050 file exists`.
pub fn result_line(file_name: &str, guest_dir: &str, report: &CopyReport) -> String {
    if report.ok {
        let status = report.hresult.unwrap_or(0);
        let meaning = report.meaning.as_deref().unwrap_or("success");
        let rate = if report.seconds > 0.0 {
            format!(" ({:.1} MB/s)", report.bytes as f64 / report.seconds / 1e6)
        } else {
            String::new()
        };
        return format!(
            "copied {file_name} ({} bytes) to {guest_dir}: {status:#010x} {meaning} in {:.2} s{rate}",
            report.bytes, report.seconds
        );
    }
    let step = report
        .step
        .map(|s| s.to_string())
        .unwrap_or_else(|| "an unknown step".into());
    match (report.hresult, &report.meaning) {
        (Some(status), Some(meaning)) => format!("copy failed at {step}: {status:#010x} {meaning}"),
        (Some(status), None) => format!("copy failed at {step}: {status:#010x}"),
        (None, _) => format!(
            "copy failed at {step}: {}",
            report.error.as_deref().unwrap_or("no reason given")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fcopy::Step;

    #[test]
    fn bar_shows_fraction_percent_and_rate() {
        assert_eq!(
            bar(42, 100, 12.3 * 1024.0 * 1024.0),
            "[########............]  42% 12.3 MiB/s"
        );
        assert_eq!(bar(0, 0, 0.0), "[####################] 100% 0.0 MiB/s");
        assert_eq!(bar(200, 100, 0.0), "[####################] 100% 0.0 MiB/s");
    }

    #[test]
    fn success_line_has_size_status_time_and_rate() {
        let report = CopyReport {
            ok: true,
            hresult: Some(0),
            meaning: Some("success".into()),
            step: None,
            bytes: 10_485_760,
            seconds: 0.41,
            error: None,
        };
        assert_eq!(
            result_line("big.iso", "/srv/incoming/", &report),
            "copied big.iso (10485760 bytes) to /srv/incoming/: 0x00000000 success in 0.41 s \
             (25.6 MB/s)"
        );
    }

    #[test]
    fn failure_line_names_step_and_status() {
        let report = CopyReport {
            ok: false,
            hresult: Some(0x8007_0050),
            meaning: Some("file exists".into()),
            step: Some(Step::StartFileCopy),
            bytes: 0,
            seconds: 0.01,
            error: Some("guest answered START_FILE_COPY with 0x80070050 (file exists)".into()),
        };
        assert_eq!(
            result_line("big.iso", "/srv/incoming/", &report),
            "copy failed at START_FILE_COPY: 0x80070050 file exists"
        );
    }

    #[test]
    fn failure_without_status_shows_the_error() {
        let report = CopyReport {
            ok: false,
            hresult: None,
            meaning: None,
            step: Some(Step::WriteToFile),
            bytes: 6144,
            seconds: 60.0,
            error: Some("guest did not answer within 60 s".into()),
        };
        assert_eq!(
            result_line("a", "/b/", &report),
            "copy failed at WRITE_TO_FILE: guest did not answer within 60 s"
        );
    }
}
