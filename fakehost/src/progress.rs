//! A progress bar on a terminal, for long service commands (`fakehost copy`).

use std::io::{IsTerminal, Write};
use std::time::Instant;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_shows_fraction_percent_and_rate() {
        assert_eq!(
            bar(42, 100, 12.3 * 1024.0 * 1024.0),
            "[########............]  42% 12.3 MiB/s"
        );
        assert_eq!(bar(0, 0, 0.0), "[####################] 100% 0.0 MiB/s");
        assert_eq!(bar(200, 100, 0.0), "[####################] 100% 0.0 MiB/s");
    }
}
