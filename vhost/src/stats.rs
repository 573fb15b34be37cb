//! Counters for everything the guest or a host client did wrong, and for connection churn.
//! Plain integers: the device is single-threaded (it lives in the vring worker thread behind
//! the backend lock), and the counts are read by tests and logged when the VMM disconnects.

use std::fmt;

/// Device counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    /// TX chains that were malformed (short header, bad len, wrong direction, out of bounds).
    pub malformed_tx: u64,
    /// RX chains that were malformed (read-only, out of bounds, too small for a header).
    pub malformed_rx: u64,
    /// TX packets with a source CID other than the guest's or a destination other than the host.
    pub bad_cid: u64,
    /// TX packets with a socket type other than STREAM.
    pub bad_type: u64,
    /// Connections reset because the guest overran our advertised buffer.
    pub overruns: u64,
    /// Packets that were dropped as meaningless in their connection's state.
    pub ignored: u64,
    /// RSTs we sent.
    pub resets_sent: u64,
    /// RSTs the guest sent for known connections.
    pub resets_received: u64,
    /// Guest connection requests to ports nobody serves, or whose host connect failed.
    pub refused: u64,
    /// Host clients whose `CONNECT` line was malformed.
    pub bad_host_commands: u64,
    /// Connections opened (either direction).
    pub opened: u64,
    /// Connections closed.
    pub closed: u64,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "opened {} closed {} refused {} resets sent {} received {} overruns {} malformed tx {} rx {} bad cid {} bad type {} ignored {} bad host commands {}",
            self.opened,
            self.closed,
            self.refused,
            self.resets_sent,
            self.resets_received,
            self.overruns,
            self.malformed_tx,
            self.malformed_rx,
            self.bad_cid,
            self.bad_type,
            self.ignored,
            self.bad_host_commands
        )
    }
}
