//! Which mounts exist and which sit on which, from `/proc/self/mountinfo`: enough to tell
//! whether a mount the guard holds is still mounted, and whether something covers it.
//!
//! Only the first two fields are read (mount id, parent id), never the paths, whose escaping
//! (`\040` for a space) would only matter to a guard that found mounts by name.

use std::collections::BTreeSet;
use std::io;

/// What to do with a mount the guard holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It is no longer in this namespace's tree: unmounted already (by cusedev, or by the next
    /// cusedev peeling it off), nothing to do.
    Gone,
    /// Another mount sits on it; a lazy unmount would take that one away with it.
    Covered,
    /// Still mounted, nothing on it: unmount it.
    Unmount,
}

/// The mounts of one mount namespace, as (id, parent id) pairs.
#[derive(Debug, Default)]
pub struct MountTable {
    ids: BTreeSet<u64>,
    parents: BTreeSet<u64>,
}

impl MountTable {
    /// The table of the calling process's mount namespace.
    pub fn of_this_process() -> io::Result<MountTable> {
        std::fs::read_to_string("/proc/self/mountinfo").map(|text| MountTable::parse(&text))
    }

    /// Parses mountinfo text (`36 35 98:0 /mnt1 /mnt2 rw ... - ext3 /dev/root rw`); lines
    /// that do not start with two numbers are skipped.
    pub fn parse(text: &str) -> MountTable {
        let mut table = MountTable::default();
        for line in text.lines() {
            let mut fields = line.split_ascii_whitespace().map(str::parse::<u64>);
            if let (Some(Ok(id)), Some(Ok(parent))) = (fields.next(), fields.next()) {
                table.ids.insert(id);
                // The root mount names a parent outside the namespace; it sits on nothing here.
                if parent != id {
                    table.parents.insert(parent);
                }
            }
        }
        table
    }

    /// What to do with the mount whose id is `id`.
    pub fn verdict(&self, id: u64) -> Verdict {
        if !self.ids.contains(&id) {
            Verdict::Gone
        } else if self.parents.contains(&id) {
            Verdict::Covered
        } else {
            Verdict::Unmount
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 0:21 / / rw,relatime - overlay overlay rw
25 22 0:5 / /dev rw,nosuid - devtmpfs udev rw,mode=755
40 25 0:44 / /dev/vmbus rw,nosuid,nodev,noexec - fuse.cusedev cusedev rw,user_id=0
41 40 0:45 / /dev/vmbus rw,nosuid,nodev,noexec - fuse.cusedev cusedev rw,user_id=0
42 25 0:46 / /dev/with\\040space rw - fuse.cusedev cusedev rw
garbage line
";

    #[test]
    fn a_mount_is_gone_covered_or_to_unmount() {
        let table = MountTable::parse(MOUNTINFO);
        assert_eq!(table.verdict(39), Verdict::Gone);
        assert_eq!(table.verdict(40), Verdict::Covered);
        assert_eq!(table.verdict(41), Verdict::Unmount);
        assert_eq!(table.verdict(42), Verdict::Unmount);
        assert_eq!(table.verdict(25), Verdict::Covered);
    }

    #[test]
    fn the_root_mount_of_this_process_is_in_its_table() {
        let table = MountTable::of_this_process().unwrap();
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let root: u64 = text
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some("/"))
            .and_then(|l| l.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap();
        assert_ne!(table.verdict(root), Verdict::Gone);
    }
}
