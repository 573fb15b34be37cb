//! Every row of the driver table under a thread shortage: a probe whose driver needs a
//! thread refuses the offer with [`ProbeError::Resources`] instead of panicking, and probes
//! again once threads can be had.

use std::io;

use crate::devices::delayed_work::testing::refuse_spawns;
use crate::devices::fcopy::testing::TestChannel;
use crate::devices::DRIVER_TABLE;
use crate::table::{DriverRow, ProbeError, Profile};

/// The rows and profiles whose model starts threads, and how many: the timers of the util
/// drivers (kvp has two: the daemon timeout and the host handshake), xs_fastpath's timeout
/// thread in the reviewed profile. Everything else starts none.
const THREADS: &[(&str, &str, usize)] = &[
    ("fcopy", "linux-6.1", 1),
    ("fcopy", "linux-3.14", 1),
    ("kvp", "linux-6.1", 2),
    ("vss", "linux-6.1", 1),
    ("xs_fastpath", "reviewed", 1),
];

fn threads_of(row: &DriverRow, profile: &Profile) -> usize {
    THREADS
        .iter()
        .find(|(name, p, _)| *name == row.name && *p == profile.name)
        .map_or(0, |&(_, _, n)| n)
}

fn probe(row: &DriverRow, profile: &Profile) -> Result<(), ProbeError> {
    (row.probe)(TestChannel::new(), profile, &clap::ArgMatches::default()).map(drop)
}

/// Profiles a probe refuses for its own reasons (hv_kvp / hv_vss have no 3.14 model).
fn refused_anyway(row: &DriverRow, profile: &Profile) -> bool {
    matches!(
        probe(row, profile),
        Err(ProbeError::Driver(_) | ProbeError::UnknownProfile { .. })
    )
}

#[test]
fn probe_refuses_the_offer_with_eagain_when_any_thread_it_needs_cannot_start() {
    let mut refusals = 0;
    for row in DRIVER_TABLE {
        for profile in row.profiles.profiles {
            if refused_anyway(row, profile) {
                continue;
            }
            let needed = threads_of(row, profile);
            // The first, the last, and every thread in between may be the one refused.
            for allowed in 0..needed {
                refuse_spawns(allowed, usize::MAX);
                let result = probe(row, profile);
                refuse_spawns(0, 0);
                match result {
                    Err(ProbeError::Resources(e)) => {
                        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{}: {e}", row.name);
                        assert!(
                            e.to_string().contains("cannot start the thread"),
                            "{}: {e}",
                            row.name
                        );
                        refusals += 1;
                    }
                    other => panic!(
                        "{} {}: {allowed} of {needed} threads: {:?}",
                        row.name,
                        profile.name,
                        other.map(|_| "built")
                    ),
                }
            }
            // With threads to be had again, the same probe builds the device.
            probe(row, profile).unwrap_or_else(|e| panic!("{} {}: {e}", row.name, profile.name));
        }
    }
    assert_eq!(refusals, THREADS.iter().map(|t| t.2).sum::<usize>());
}

#[test]
fn probe_of_a_driver_without_threads_ignores_a_thread_shortage() {
    for row in DRIVER_TABLE {
        for profile in row.profiles.profiles {
            if threads_of(row, profile) > 0 || refused_anyway(row, profile) {
                continue;
            }
            refuse_spawns(0, usize::MAX);
            let result = probe(row, profile);
            refuse_spawns(0, 0);
            assert!(result.is_ok(), "{} {}", row.name, profile.name);
        }
    }
}
