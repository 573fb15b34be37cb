//! `/dev/vmbus/hv_fcopy`: the Hyper-V file copy service (drivers/hv/hv_fcopy.c).
//!
//! `Copy-VMFile` on a Hyper-V host pushes a file into a Linux guest in pieces: START_FILE_COPY
//! (names, flags, size), WRITE_TO_FILE fragments of at most 6 KiB, then COMPLETE_FCOPY, or
//! CANCEL_FCOPY to give up. The kernel driver does none of the file work. It sits between the
//! VMBus channel and a userspace daemon (`hv_fcopy_daemon`): it reads one host packet, hands
//! the daemon a message through a misc character device, waits for the daemon's 4-byte status,
//! and echoes the host's packet back with that status in it. If the daemon is slow, a timer
//! answers "failed" for it.
//!
//! Two kernels' versions of that driver are reproduced, byte for byte and errno for errno,
//! selected by [`KernelProfile`]:
//!
//! * [`linux_3_14`]: the 2014 driver as merged for v3.15 (its own file operations, a counting
//!   semaphore, a version-0 handshake without reply, 5 s timeout, short reads that lose the
//!   message, no poll). The unmodified 6.1 daemon cannot register with it (fcopy.md §9).
//! * [`linux_6_1`]: the driver of Linux 4.x–6.9 as in Debian's 6.1 kernel, built on the
//!   shared [`hvutil transport`](super::hvutil_transport) (version-1 handshake with a reply,
//!   30 s timeout, poll, EBADF on removal, host requests failed at once without a daemon).
//!
//! What the two have in common lives here: the persistent receive buffer and the message the
//! daemon gets for a START. [`probe`] builds the profile's model for the driver table; each
//! model is both [`Device`](crate::device::Device) (the char device) and
//! [`ChannelDriver`](crate::bus::channel::ChannelDriver) (the channel side).
//!
//! Receive buffer: `util_probe()` allocates 4 pages per util channel once, and the fcopy
//! callback reads every packet into the start of it with a 2-page limit. Nothing ever clears
//! it, so whatever a longer earlier packet left past the end of a shorter one is still there,
//! and both drivers hand some of those stale bytes to the daemon (WRITE always delivers a full
//! struct; 6.1 COMPLETE/CANCEL deliver `recvlen` bytes from offset 28, i.e. 28 more than the
//! packet holds). `RecvBuffer` keeps that memory so the same bytes come out.

pub mod linux_3_14;
pub mod linux_6_1;

#[cfg(test)]
pub(crate) mod testing;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use vmbus::fcopy::{parse_start, START_FCOPY_LEN};
use vmbus::ic::ICMSG_HDR_LEN;
use vmbus::utf16::Overflow;
use zerocopy::IntoBytes;

use crate::bus::channel::HostChannel;
use crate::devices::hv_util::KernelProfile;
use crate::table::{ChannelDevice, ProbeError, Profile};

/// The misc device name: `/dev/vmbus/hv_fcopy` (both eras).
pub const DEVICE_NAME: &str = "vmbus/hv_fcopy";

/// `PAGE_SIZE` / `HV_HYP_PAGE_SIZE` on x86_64.
const PAGE_SIZE: usize = 4096;

pub(crate) use crate::devices::hv_util::RecvBuffer;
pub use crate::devices::hv_util::RECV_BUFFER_LEN;

/// The length limit hv_fcopy passes to `vmbus_recvpacket()` (2 pages, both eras). A larger
/// host packet is refused with ENOBUFS and stays in the ring.
pub const RECV_LIMIT: usize = 2 * PAGE_SIZE;

/// How the kernel's `utf16s_to_utf8s()` treats a character that does not fit the 259-byte
/// budget of a START name: skipped, as in fs/nls/nls_base.c of v6.1.0 and of the seed era.
/// (The Nov-2025 fix stops instead; whether Debian's 6.1.y carries it is unverified,
/// fcopy.md §8.3.)
pub const NAME_OVERFLOW: Overflow = Overflow::Skip;

/// What both fcopy drivers keep of their channel (`fcopy_transaction.recv_channel`,
/// `recv_len`, `recv_req_id` and the receive buffer): the host request in hand and the way
/// to answer it. The profiles differ in *when* they answer, not in how.
pub(crate) struct HostSide {
    pub(crate) channel: Arc<dyn HostChannel>,
    pub(crate) recv: RecvBuffer,
    /// `recvlen` of the request in hand: the length of the reply.
    pub(crate) recv_len: usize,
    /// Transaction id of the request in hand, echoed in the reply.
    pub(crate) recv_req_id: u64,
    /// `vmbus_close()` has run (`channel->onchannel_callback == NULL`): replies are dropped
    /// and the callback no longer runs.
    pub(crate) channel_closed: bool,
}

impl HostSide {
    pub(crate) fn new(channel: Arc<dyn HostChannel>) -> HostSide {
        HostSide {
            channel,
            recv: RecvBuffer::new(),
            recv_len: 0,
            recv_req_id: 0,
            channel_closed: false,
        }
    }

    /// `fcopy_respond_to_host()`: echo the received buffer, `recv_len` bytes, with `status`
    /// and icflags TRANSACTION|RESPONSE, under the host's transaction id.
    pub(crate) fn respond(&mut self, status: u32) {
        if self.channel_closed {
            // "We have raced with util driver being unloaded; silently return."
            log::debug!("hv_fcopy: channel closed, reply {status:#x} dropped");
            return;
        }
        let reply = self.recv.reply(self.recv_len, status);
        log::debug!(
            "hv_fcopy: replying {status:#x} ({}) to host request {} ({} bytes)",
            vmbus::ic::status_meaning(status),
            self.recv_req_id,
            reply.len()
        );
        self.channel.send_inband(self.recv_req_id, &reply);
    }
}

/// fcopy's reading of the util receive buffer.
impl RecvBuffer {
    /// `hv_fcopy_hdr.operation` of the packet in the buffer (payload offset 28).
    pub(crate) fn operation(&self) -> u32 {
        self.u32_at(ICMSG_HDR_LEN)
    }

    /// The 1088-byte message the daemon gets for a START (`fcopy_send_data()`, both eras): a
    /// zeroed `hv_start_fcopy` with the operation, both names converted from UTF-16LE to
    /// NUL-terminated UTF-8 (at most 259 bytes each), the flags and the size.
    pub(crate) fn start_for_daemon(&self) -> Vec<u8> {
        let host = self.bytes(ICMSG_HDR_LEN, START_FCOPY_LEN);
        match parse_start(&host) {
            Ok(start) => start.to_daemon(NAME_OVERFLOW).as_bytes().to_vec(),
            // Cannot happen: `host` is exactly START_FCOPY_LEN bytes long.
            Err(_) => vec![0; START_FCOPY_LEN],
        }
    }
}

/// A short name for an fcopy operation, for logs.
pub(crate) fn op_name(op: u32) -> &'static str {
    use vmbus::fcopy::op;
    match op {
        op::START_FILE_COPY => "START_FILE_COPY",
        op::WRITE_TO_FILE => "WRITE_TO_FILE",
        op::COMPLETE_FCOPY => "COMPLETE_FCOPY",
        op::CANCEL_FCOPY => "CANCEL_FCOPY",
        _ => "unknown operation",
    }
}

/// The hv_fcopy driver of one channel, in the kernel version `profile` selects, with the
/// kernel's daemon timeout (5 s on linux-3.14, 30 s on linux-6.1).
///
/// Bus side: bind it to the fcopy channel as its
/// [`ChannelDriver`](crate::bus::channel::ChannelDriver); call `on_channel_callback` once per
/// host packet pushed into the channel's inbound ring (each call reads at most one packet,
/// like the kernel's callback), and `on_rescind` when the host rescinds the channel (on 6.1
/// this blocks until the daemon has closed the device; on 3.14 it returns at once).
///
/// Frontend side: serve it as a [`Device`](crate::device::Device) named [`DEVICE_NAME`],
/// mode 0600. Fails only when its timer thread cannot be started.
pub fn new(
    profile: KernelProfile,
    channel: Arc<dyn HostChannel>,
) -> io::Result<Arc<dyn ChannelDevice>> {
    with_timeout(profile, channel, default_timeout(profile))
}

/// Like [`new`] with another daemon timeout (for tests).
pub fn with_timeout(
    profile: KernelProfile,
    channel: Arc<dyn HostChannel>,
    daemon_timeout: Duration,
) -> io::Result<Arc<dyn ChannelDevice>> {
    Ok(match profile {
        KernelProfile::Linux3_14 => linux_3_14::SeedFcopy::new(channel, daemon_timeout)?,
        KernelProfile::Linux6_1 => linux_6_1::Fcopy61::new(channel, daemon_timeout)?,
    })
}

/// The kernel's daemon timeout for `profile`: `5*HZ` in the seed, `HV_UTIL_TIMEOUT` = 30 s
/// in 6.1.
pub fn default_timeout(profile: KernelProfile) -> Duration {
    match profile {
        KernelProfile::Linux3_14 => linux_3_14::DAEMON_TIMEOUT,
        KernelProfile::Linux6_1 => linux_6_1::DAEMON_TIMEOUT,
    }
}

/// The driver table's probe for an fcopy offer ([`crate::devices::DRIVER_TABLE`]): the model
/// of the row's profile, which is one of [`KERNEL_PROFILES`](crate::devices::hv_util::KERNEL_PROFILES).
pub fn probe(
    channel: Arc<dyn HostChannel>,
    profile: &Profile,
    _options: &clap::ArgMatches,
) -> Result<Arc<dyn ChannelDevice>, ProbeError> {
    let kernel =
        KernelProfile::from_name(profile.name).ok_or_else(|| ProbeError::UnknownProfile {
            profile: profile.name.to_string(),
        })?;
    new(kernel, channel).map_err(ProbeError::Resources)
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::device::{poll_bits, Device, Errno, Handle, IoctlCall};
    use crate::devices::hv_util::KERNEL_PROFILES;
    use crate::devices::DRIVER_TABLE;

    fn no_arg_ioctl() -> IoctlCall<'static> {
        IoctlCall {
            cmd: 0,
            arg: 0,
            input: &[],
            out_size: 0,
            unrestricted: true,
            compat: false,
        }
    }

    fn ioctl_of(dev: &dyn Device, h: Handle) -> Result<crate::device::IoctlOutcome, Errno> {
        let caller = caller();
        crate::reply::testing::answer_of(&caller.interrupt, |reply| {
            dev.ioctl(h, &no_arg_ioctl(), &caller, reply)
        })
    }

    #[test]
    fn device_is_vmbus_hv_fcopy_mode_0600_in_both_profiles() {
        for profile in KernelProfile::ALL {
            let dev = new(profile, TestChannel::new()).unwrap();
            assert_eq!(dev.name(), "vmbus/hv_fcopy");
            assert_eq!(dev.mode(), 0o600);
        }
    }

    #[test]
    fn default_timeouts_are_5_s_seed_and_30_s_6_1() {
        assert_eq!(
            default_timeout(KernelProfile::Linux3_14),
            Duration::from_secs(5)
        );
        assert_eq!(
            default_timeout(KernelProfile::Linux6_1),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn profiles_differ_in_poll_and_ioctl_is_enotty() {
        let seed = new(KernelProfile::Linux3_14, TestChannel::new()).unwrap();
        let h = seed.open(&caller(), libc::O_RDWR).unwrap();
        assert_eq!(seed.poll(h, None), poll_bits::DEFAULT_POLLMASK);
        assert_eq!(ioctl_of(&*seed, h), Err(Errno::ENOTTY));
        let new = new(KernelProfile::Linux6_1, TestChannel::new()).unwrap();
        let h = new.open(&caller(), libc::O_RDWR).unwrap();
        assert_eq!(new.poll(h, None), 0);
        assert_eq!(ioctl_of(&*new, h), Err(Errno::ENOTTY));
    }

    #[test]
    fn probe_builds_every_profile_of_the_row_under_the_row_node_name() {
        let row = DRIVER_TABLE
            .iter()
            .find(|row| row.node == DEVICE_NAME)
            .expect("fcopy has a row");
        assert_eq!(row.profiles, KERNEL_PROFILES);
        for profile in row.profiles.profiles {
            let dev = (row.probe)(TestChannel::new(), profile, &clap::ArgMatches::default())
                .expect("probe");
            assert_eq!(dev.name(), row.node);
        }
        // Which model each profile gets: the seed has no poll.
        let seed = probe(
            TestChannel::new(),
            KERNEL_PROFILES.get("linux-3.14").unwrap(),
            &clap::ArgMatches::default(),
        )
        .unwrap();
        let h = seed.open(&caller(), libc::O_RDWR).unwrap();
        assert_eq!(seed.poll(h, None), poll_bits::DEFAULT_POLLMASK);
    }

    #[test]
    fn probe_with_a_profile_fcopy_does_not_model_fails_cleanly() {
        let other = Profile {
            name: "posted",
            about: "not a kernel",
        };
        let err = probe(TestChannel::new(), &other, &clap::ArgMatches::default())
            .err()
            .expect("refused");
        assert!(matches!(err, ProbeError::UnknownProfile { .. }), "{err}");
    }

    #[test]
    fn recv_buffer_keeps_stale_bytes_past_a_short_packet() {
        let mut buf = RecvBuffer::new();
        assert_eq!(buf.fill(&[1; 100]), 100);
        assert_eq!(buf.fill(&[2; 10]), 10);
        let bytes = buf.bytes(0, 20);
        assert_eq!(&bytes[..10], &[2; 10]);
        assert_eq!(&bytes[10..], &[1; 10]);
        // Past the 16 KiB allocation: zeros, never a panic.
        assert_eq!(buf.bytes(RECV_BUFFER_LEN - 2, 4), vec![0, 0, 0, 0]);
        assert_eq!(buf.bytes(usize::MAX, 3), vec![0, 0, 0]);
    }
}
