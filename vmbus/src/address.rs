//! Where the host listens: `unix:/run/cusedev/bus.sock` or `vsock:CID:PORT`
//! (docs/bus-protocol.md). One text form for both the command line and logs, so that what a
//! log line prints can be pasted back as an argument.

use core::fmt;
use core::str::FromStr;
use std::path::PathBuf;

use crate::WireError;

/// A bus address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BusAddress {
    /// A Unix stream socket at this path.
    Unix(PathBuf),
    /// An AF_VSOCK stream socket.
    Vsock {
        /// Context id (2 = the host, as seen from a guest).
        cid: u32,
        /// Port.
        port: u32,
    },
}

/// A decimal u32 without sign, spaces or other decoration (`u32::from_str` would accept "+5").
fn parse_decimal(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

impl FromStr for BusAddress {
    type Err = WireError;

    /// `unix:PATH` (non-empty, no NUL) or `vsock:CID:PORT` (decimal).
    fn from_str(s: &str) -> Result<BusAddress, WireError> {
        let bad = || WireError::BadSyntax {
            what: "bus address (unix:/path or vsock:CID:PORT)",
            input: s.to_owned(),
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() || path.contains('\0') {
                return Err(bad());
            }
            return Ok(BusAddress::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("vsock:") {
            let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
            return Ok(BusAddress::Vsock {
                cid: parse_decimal(cid).ok_or_else(bad)?,
                port: parse_decimal(port).ok_or_else(bad)?,
            });
        }
        Err(bad())
    }
}

impl fmt::Display for BusAddress {
    /// The same form [`BusAddress::from_str`] accepts (a non-UTF-8 path is shown lossily).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusAddress::Unix(path) => write!(f, "unix:{}", path.display()),
            BusAddress::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_address_parses_unix_and_vsock() {
        assert_eq!(
            "unix:/run/cusedev/bus.sock".parse::<BusAddress>(),
            Ok(BusAddress::Unix(PathBuf::from("/run/cusedev/bus.sock")))
        );
        assert_eq!(
            "vsock:2:5000".parse::<BusAddress>(),
            Ok(BusAddress::Vsock { cid: 2, port: 5000 })
        );
        assert_eq!(
            "vsock:4294967295:0".parse::<BusAddress>(),
            Ok(BusAddress::Vsock {
                cid: u32::MAX,
                port: 0
            })
        );
    }

    #[test]
    fn bus_address_display_round_trips() {
        for text in [
            "unix:/run/cusedev/bus.sock",
            "unix:rel/bus.sock",
            "vsock:3:1234",
        ] {
            let addr: BusAddress = text.parse().unwrap();
            assert_eq!(addr.to_string(), text);
        }
    }

    #[test]
    fn bus_address_garbage_is_bad_syntax() {
        for bad in [
            "",
            "unix:",
            "unix:/a\0b",
            "/run/bus.sock",
            "tcp:1.2.3.4:5",
            "vsock:",
            "vsock:2",
            "vsock:2:",
            "vsock::5000",
            "vsock:+2:5000",
            "vsock:2:-1",
            "vsock:2:5000:1",
            "vsock:4294967296:1",
            "vsock: 2:5000",
            "UNIX:/x",
        ] {
            assert!(
                matches!(bad.parse::<BusAddress>(), Err(WireError::BadSyntax { .. })),
                "{bad:?}"
            );
        }
    }
}
