//! Row 8: 1,000 opens at once against each single-open device.
//!
//! Which devices are single-open: every Linux 6.1 hvutil-transport node (`hvt_op_open`: a
//! second opener while the mode is CHARDEV gets EBUSY, drivers/hv/hv_utils_transport.c 6.1),
//! i.e. /dev/vmbus/hv_fcopy, /dev/vmbus/hv_kvp and /dev/vmbus/hv_vss; and the 2014 fcopy
//! (`fcopy_open`: `if (opened) return -EBUSY`, drivers/hv/hv_fcopy.c v3.15). Not
//! /dev/azure_xs_fastpath (its open only records the file: the xs client's case
//! `hundred_concurrent_opens_all_succeed`) nor /dev/lguest (one Guest per open file).

use std::sync::Barrier;

use cusedev_tests::census::RowFigures;
use cusedev_tests::dev::{Dev, Errno};
use cusedev_tests::enter_private_mount_namespace;
use cusedev_tests::harness::{Rig, FCOPY_DEVICE};
use cusedev_tests::kvp::{KVP_DEVICE, VSS_DEVICE};

use super::{wait_all_served, ENDS};

const OPENERS: usize = 1000;

/// `OPENERS` threads open `node` at once (a barrier releases them together); returns the
/// winners' files and the errno of every loser.
fn open_at_once(node: &str) -> (Vec<Dev>, Vec<Errno>) {
    let barrier = Barrier::new(OPENERS);
    let results: Vec<Result<Dev, Errno>> = std::thread::scope(|s| {
        let openers: Vec<_> = (0..OPENERS)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    Dev::open(node)
                })
            })
            .collect();
        openers.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let mut won = Vec::new();
    let mut lost = Vec::new();
    for result in results {
        match result {
            Ok(dev) => won.push(dev),
            Err(errno) => lost.push(errno),
        }
    }
    (won, lost)
}

/// Row 8. For each single-open node of the 6.1 profile: exactly one of 1,000 simultaneous
/// opens wins, the 999 others get EBUSY; once the winner closes, the next open succeeds; and
/// cusedev holds nothing more than before.
#[test]
fn a_thousand_opens_at_once_of_a_single_open_device_one_wins_the_rest_ebusy_and_nothing_leaks() {
    enter_private_mount_namespace().expect("private mount namespace");
    let rig = Rig::builder("fm-single-open")
        .guest_args(&["--kernel", "linux-6.1"])
        .guest_dir_arg("--dev-root", "dev")
        .serves(FCOPY_DEVICE)
        .start();
    wait_all_served(&rig, 0);
    let nodes: Vec<String> = [FCOPY_DEVICE, KVP_DEVICE, VSS_DEVICE]
        .iter()
        .map(|device| rig.dir.join("dev").join(device).display().to_string())
        .collect();
    for node in &nodes {
        drop(Dev::open(node).expect("a first open"));
    }
    let mut figures = RowFigures::baseline(
        "1,000 concurrent opens of hv_fcopy, hv_kvp, hv_vss",
        rig.guest.pid(),
        "one open and close of each",
    );
    for node in &nodes {
        let (mut won, lost) = open_at_once(node);
        figures.sample();
        assert_eq!(won.len(), 1, "{node}: {} opens won", won.len());
        let not_ebusy: Vec<&Errno> = lost.iter().filter(|e| **e != Errno::EBUSY).collect();
        assert!(not_ebusy.is_empty(), "{node}: losers got {not_ebusy:?}");
        assert_eq!(lost.len(), OPENERS - 1);
        // While the winner holds it, a late opener loses too.
        assert_eq!(Dev::open(node).err(), Some(Errno::EBUSY), "{node}");
        drop(won.pop());
        drop(Dev::open(node).expect("the open after the winner closed"));
        eprintln!(
            "fault-matrix: {node}: 1 of {OPENERS} opens won, {} EBUSY",
            lost.len()
        );
    }
    figures.back(ENDS);
}
