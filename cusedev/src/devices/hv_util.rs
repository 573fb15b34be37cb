//! What the Hyper-V util drivers (hv_fcopy today; hv_kvp and hv_vss next) share, as
//! drivers/hv/hv_util.c does for them in the kernel: the ring size `util_probe()` opens every
//! util channel with, and the kernel version whose drivers we reproduce.
//!
//! The version is one choice for all of them, because in a real guest they come from one
//! kernel: `--kernel` sets it for every row of the driver table whose profiles are
//! [`KERNEL_PROFILES`], and `--profile DEVICE=PROFILE` can still pick another for one device.
//! Read next: the table itself, [`crate::devices::DRIVER_TABLE`], and then a driver that
//! takes a [`KernelProfile`], [`crate::devices::fcopy`].

use crate::table::{Profile, ProfileSet};

/// Ring data area of a util channel in 6.1: `HV_UTIL_RING_SEND_SIZE` / `_RECV_SIZE` are
/// `VMBUS_RING_SIZE(3 * HV_HYP_PAGE_SIZE)` (drivers/hv/hv_util.c), three pages of which the
/// first is the ring header.
pub const UTIL_RING_BYTES: usize = 2 * 4096;

/// Which kernel's drivers to reproduce. Selected with `--kernel`.
///
/// The default is the one Debian's packaged daemons need: the unmodified 6.1
/// `hv_fcopy_daemon` writes version 1 and waits for the driver's 4-byte answer, which the 2014
/// driver never gives (it accepts only version 0), so it cannot register with `linux-3.14`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KernelProfile {
    /// The 2014 hv_fcopy as merged for v3.15 (drivers/hv/hv_fcopy.c): version-0 handshake with
    /// no reply, short reads lose the message, 5 s daemon timeout, rescind → ENODEV.
    #[value(name = "linux-3.14")]
    Linux3_14,
    /// The hvutil-transport drivers of Linux 4.x–6.9 as in Debian's 6.1 kernel: version-1
    /// handshake with a 4-byte reply, short read → EINVAL keeping the message, poll, 30 s
    /// timeout, close fails the pending transaction, rescind → EBADF.
    #[default]
    #[value(name = "linux-6.1")]
    Linux6_1,
}

impl KernelProfile {
    /// Every profile, in the order of [`KERNEL_PROFILES`].
    pub const ALL: [KernelProfile; 2] = [KernelProfile::Linux6_1, KernelProfile::Linux3_14];

    /// The name `--kernel` and `--profile` use (`"linux-6.1"`).
    pub fn name(self) -> &'static str {
        match self {
            KernelProfile::Linux3_14 => "linux-3.14",
            KernelProfile::Linux6_1 => "linux-6.1",
        }
    }

    /// The profile a table row was given, by name.
    pub fn from_name(name: &str) -> Option<KernelProfile> {
        KernelProfile::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl std::fmt::Display for KernelProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The profiles of a util driver's row: the kernel versions, as the table and `--help` show
/// them. A unit test keeps this in step with [`KernelProfile`] and its `--kernel` values.
pub const KERNEL_PROFILES: ProfileSet = ProfileSet {
    profiles: &[
        Profile {
            name: "linux-6.1",
            about: "Linux 4.x-6.9 as in Debian 12's kernel; what its packaged daemons need",
        },
        Profile {
            name: "linux-3.14",
            about: "the 2014 drivers (seed era); Debian's 6.1 daemons cannot register with them",
        },
    ],
    default: "linux-6.1",
    set_by_kernel_flag: true,
};

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn kernel_profiles_match_the_kernel_flag_values() {
        let listed: Vec<_> = KERNEL_PROFILES.profiles.iter().map(|p| p.name).collect();
        let flag: Vec<_> = KernelProfile::value_variants()
            .iter()
            .filter_map(|p| p.to_possible_value())
            .map(|v| v.get_name().to_string())
            .collect();
        let mut flag_sorted = flag.clone();
        flag_sorted.sort();
        let mut listed_sorted = listed.clone();
        listed_sorted.sort();
        assert_eq!(listed_sorted, flag_sorted);
        for profile in KernelProfile::ALL {
            assert_eq!(KernelProfile::from_name(profile.name()), Some(profile));
            assert!(flag.contains(&profile.name().to_string()));
        }
        assert_eq!(KERNEL_PROFILES.default, KernelProfile::default().name());
    }

    #[test]
    fn unknown_kernel_name_is_none() {
        assert_eq!(KernelProfile::from_name("linux-5.10"), None);
    }
}
