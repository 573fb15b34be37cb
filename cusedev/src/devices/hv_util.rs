//! What the Hyper-V util drivers (hv_fcopy, hv_kvp, hv_vss) share, as drivers/hv/hv_util.c
//! does for them in the kernel: the ring size `util_probe()` opens every util channel with,
//! the receive buffer it allocates for each, and the kernel version whose drivers we
//! reproduce.
//!
//! The version is one choice for all of them, because in a real guest they come from one
//! kernel: `--kernel` sets it for every row of the driver table whose profiles are
//! [`KERNEL_PROFILES`], and `--profile DEVICE=PROFILE` can still pick another for one device.
//! Read next: the table itself, [`crate::devices::DRIVER_TABLE`], and then a driver that
//! takes a [`KernelProfile`], [`crate::devices::fcopy`].

use vmbus::ic::set_reply;

use std::sync::Arc;

use crate::table::{ChannelDevice, ProbeError, Profile, ProfileSet};

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

/// The probe of a util driver reproduced only as in Linux 6.1 (hv_kvp, hv_vss): `build` for
/// `linux-6.1`; `linux-3.14` is refused with `not_modelled` (the bus client logs it and leaves
/// the offer alone; the 3.x drivers talked to their daemons over netlink). `build`'s own
/// refusal (no thread for a timer) is passed on.
pub fn probe_linux_6_1_only(
    profile: &Profile,
    not_modelled: &'static str,
    build: impl FnOnce() -> Result<Arc<dyn ChannelDevice>, ProbeError>,
) -> Result<Arc<dyn ChannelDevice>, ProbeError> {
    match KernelProfile::from_name(profile.name) {
        Some(KernelProfile::Linux6_1) => build(),
        Some(KernelProfile::Linux3_14) => Err(ProbeError::Driver(not_modelled.into())),
        None => Err(ProbeError::UnknownProfile {
            profile: profile.name.to_string(),
        }),
    }
}

/// The per-channel receive buffer `util_probe()` allocates (4 pages, drivers/hv/hv_util.c).
pub const RECV_BUFFER_LEN: usize = 4 * 4096;

/// The driver's receive buffer, persistent across packets (see the module docs).
pub(crate) struct RecvBuffer {
    bytes: Box<[u8]>,
}

impl RecvBuffer {
    pub(crate) fn new() -> RecvBuffer {
        RecvBuffer {
            bytes: vec![0; RECV_BUFFER_LEN].into_boxed_slice(),
        }
    }

    /// `vmbus_recvpacket()` into the buffer: the payload lands at the start, the rest keeps
    /// what earlier packets left there. Returns the length copied (the kernel's `recvlen`).
    pub(crate) fn fill(&mut self, payload: &[u8]) -> usize {
        // The channel never hands out more than RECV_LIMIT bytes; clamp anyway rather than
        // trust it with our memory.
        let len = payload.len().min(self.bytes.len());
        for (slot, byte) in self.bytes.iter_mut().zip(payload) {
            *slot = *byte;
        }
        len
    }

    /// The whole buffer, for code that (like the kernel) works on it in place.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// `len` bytes from offset `from`. Bytes past the end of the 16 KiB buffer read as zero:
    /// the kernel would read past its allocation there (only reachable through the seed's
    /// oversized-packet path); we cannot reproduce foreign heap memory.
    pub(crate) fn bytes(&self, from: usize, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        if let Some(available) = self.bytes.get(from..) {
            for (slot, byte) in out.iter_mut().zip(available) {
                *slot = *byte;
            }
        }
        out
    }

    pub(crate) fn u16_at(&self, at: usize) -> u16 {
        let b = self.bytes(at, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    pub(crate) fn u32_at(&self, at: usize) -> u32 {
        let b = self.bytes(at, 4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// `icmsg_hdr.icmsgtype` of the packet in the buffer (payload offset 8 + 4).
    pub(crate) fn icmsgtype(&self) -> u16 {
        self.u16_at(vmbus::ic::PIPE_HDR_LEN + 4)
    }

    /// The util drivers' `*_respond_to_host()`: writes `status` and icflags TRANSACTION|RESPONSE into the IC
    /// header in the buffer and returns the first `len` bytes, which are sent back.
    pub(crate) fn reply(&mut self, len: usize, status: u32) -> Vec<u8> {
        // The buffer is always longer than the 28-byte header, so this cannot fail.
        let _ = set_reply(&mut self.bytes, status);
        self.bytes(0, len)
    }
}

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
