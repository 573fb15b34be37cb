//! The services this host can offer to a guest, by name.
//!
//! A service is a VMBus channel class (the `if_type` GUID of an offer) that has a host-side
//! implementation here. Only fcopy exists so far; kvp, vss and the others get a variant when
//! their host side is written, so the CLI can never offer a channel nobody answers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use vmbus::guid::Guid;

/// A service that fakehost can offer and serve.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    /// Guest file copy (`hv_fcopy`, `Copy-VMFile`).
    Fcopy,
}

impl ServiceKind {
    /// Every service, in the order offers are sent.
    pub const ALL: [ServiceKind; 1] = [ServiceKind::Fcopy];

    /// The channel class GUID sent as `if_type` in OFFERCHANNEL.
    pub fn class_guid(self) -> Guid {
        match self {
            ServiceKind::Fcopy => Guid::FCOPY,
        }
    }

    /// The short name used on the command line, in the control protocol and in logs.
    pub fn name(self) -> &'static str {
        match self {
            ServiceKind::Fcopy => "fcopy",
        }
    }
}

impl fmt::Display for ServiceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A service name that fakehost does not implement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown service {0:?}: fakehost serves only fcopy")]
pub struct UnknownService(pub String);

impl FromStr for ServiceKind {
    type Err = UnknownService;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ServiceKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownService(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_round_trip() {
        for kind in ServiceKind::ALL {
            assert_eq!(kind.name().parse::<ServiceKind>(), Ok(kind));
            assert_eq!(kind.class_guid().service_name(), Some(kind.name()));
        }
    }

    #[test]
    fn unknown_service_is_an_error_naming_it() {
        let err = "kvp".parse::<ServiceKind>().unwrap_err();
        assert!(err.to_string().contains("\"kvp\""));
    }
}
