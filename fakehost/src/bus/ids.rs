//! Fresh identifiers for offers: child relids and instance GUIDs.
//!
//! Each OFFERCHANNEL needs a `child_relid` no other live channel uses and an `if_instance` GUID
//! unique to that offer (a re-offer after a rescind is a new device to the guest, as on Hyper-V).
//! No randomness is needed, only uniqueness: the GUID is built from our pid, the time the host
//! started and a per-offer counter.

use std::time::{SystemTime, UNIX_EPOCH};

use vmbus::guid::Guid;

/// Relids are kept below the Linux guest's channel-table size (`MAX_CHANNEL_RELIDS`, 2048 in
/// drivers/hv/hyperv_vmbus.h), which rejects larger ones, so a long-running host wraps.
pub const MAX_RELID: u32 = 2047;

/// The allocator.
#[derive(Debug)]
pub struct Ids {
    next_relid: u32,
    offers: u32,
    pid: u32,
    started_nanos: u64,
    next_serial: u64,
}

impl Default for Ids {
    fn default() -> Self {
        Ids::new()
    }
}

impl Ids {
    /// A fresh allocator.
    pub fn new() -> Ids {
        let started_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Ids {
            next_relid: 1,
            offers: 0,
            pid: std::process::id(),
            started_nanos,
            next_serial: 1,
        }
    }

    /// The next relid in 1..=[`MAX_RELID`] for which `in_use` is false. `None` only if every
    /// relid is in use (2047 live channels).
    pub fn relid(&mut self, in_use: impl Fn(u32) -> bool) -> Option<u32> {
        for _ in 0..MAX_RELID {
            let candidate = self.next_relid;
            self.next_relid = if candidate >= MAX_RELID {
                1
            } else {
                candidate + 1
            };
            if !in_use(candidate) {
                return Some(candidate);
            }
        }
        None
    }

    /// A GUID no other offer of this process (or, practically, of any earlier run) has.
    pub fn instance_guid(&mut self) -> Guid {
        self.offers = self.offers.wrapping_add(1);
        let [c0, c1, c2, c3] = self.offers.to_le_bytes();
        Guid::from_fields(
            self.pid,
            u16::from_le_bytes([c0, c1]),
            u16::from_le_bytes([c2, c3]),
            self.started_nanos.to_be_bytes(),
        )
    }

    /// A serial number for sessions, links and log lines.
    pub fn serial(&mut self) -> u64 {
        let n = self.next_serial;
        self.next_serial = self.next_serial.wrapping_add(1);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relids_skip_those_in_use_and_wrap() {
        let mut ids = Ids::new();
        assert_eq!(ids.relid(|r| r == 1), Some(2));
        ids.next_relid = MAX_RELID;
        assert_eq!(ids.relid(|_| false), Some(MAX_RELID));
        assert_eq!(ids.relid(|_| false), Some(1));
        assert_eq!(ids.relid(|_| true), None);
    }

    #[test]
    fn instance_guids_differ_per_offer() {
        let mut ids = Ids::new();
        let a = ids.instance_guid();
        let b = ids.instance_guid();
        assert_ne!(a, b);
    }
}
