//! Kernel versions whose user-visible driver behaviour we reproduce.

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

impl std::fmt::Display for KernelProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelProfile::Linux3_14 => "linux-3.14",
            KernelProfile::Linux6_1 => "linux-6.1",
        })
    }
}
