//! Fault injection for the XStore host (`fakehost xs --delay | --fail-status | --drop-responses
//! | --normal`): what a test sets to see how a guest copes with a slow, failing or silent VSP.
//!
//! One fault at a time; each request takes the fault in force when its packet arrives, so a
//! change never alters a request already under way.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmbus::xs_fastpath::xstore::Status;

/// The fault in force.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// Requests are served as they come.
    #[default]
    Normal,
    /// Every store operation takes `ms` longer (inside the request's `timeout_ms`, so a
    /// request with a shorter timeout answers TIMEOUT).
    Delay {
        /// The extra time, in milliseconds.
        ms: u64,
    },
    /// Every request is answered with this status at once; nothing is read or written.
    FailStatus {
        /// The status (non-zero).
        status: u32,
    },
    /// Requests are taken off the channel and never answered (counted).
    DropResponses,
}

impl Fault {
    /// The extra time a store operation takes.
    pub fn delay(self) -> Duration {
        match self {
            Fault::Delay { ms } => Duration::from_millis(ms),
            _ => Duration::ZERO,
        }
    }

    /// Checks a fault from a control command: a delay must fit a `Duration`'s milliseconds
    /// sensibly (at most a day), and a forced status must not be 0 (that is `--normal`).
    pub fn check(self) -> Result<Fault, String> {
        match self {
            Fault::Delay { ms } if ms > 86_400_000 => Err(format!(
                "a delay of {ms} ms is over a day; give at most 24h"
            )),
            Fault::FailStatus { status: 0 } => {
                Err("status 0 is success: to serve requests normally use --normal".into())
            }
            other => Ok(other),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Fault::Normal => f.write_str("none"),
            Fault::Delay { ms } => write!(
                f,
                "every store operation delayed by {}",
                humantime::format_duration(Duration::from_millis(ms))
            ),
            Fault::FailStatus { status } => {
                write!(f, "every request answered with status {}", Status(status))
            }
            Fault::DropResponses => f.write_str("requests are read but never answered"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_describe_themselves() {
        assert_eq!(Fault::Normal.to_string(), "none");
        assert_eq!(
            Fault::Delay { ms: 200 }.to_string(),
            "every store operation delayed by 200ms"
        );
        assert_eq!(
            Fault::FailStatus { status: 5 }.to_string(),
            "every request answered with status 5 STORE_ERROR"
        );
        assert_eq!(
            Fault::DropResponses.to_string(),
            "requests are read but never answered"
        );
    }

    #[test]
    fn wire_form_names_the_mode() {
        let text = serde_json::to_string(&Fault::Delay { ms: 200 }).unwrap();
        assert_eq!(text, r#"{"mode":"delay","ms":200}"#);
        let back: Fault = serde_json::from_str(r#"{"mode":"drop_responses"}"#).unwrap();
        assert_eq!(back, Fault::DropResponses);
        assert!(serde_json::from_str::<Fault>(r#"{"mode":"explode"}"#).is_err());
    }

    #[test]
    fn status_zero_and_absurd_delays_are_refused() {
        assert!(Fault::FailStatus { status: 0 }.check().is_err());
        assert!(Fault::Delay { ms: u64::MAX }.check().is_err());
        assert_eq!(
            Fault::FailStatus { status: 9 }.check(),
            Ok(Fault::FailStatus { status: 9 })
        );
    }
}
