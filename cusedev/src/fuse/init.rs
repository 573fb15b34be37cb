//! The INIT handshake: agreeing on a protocol version and on the limits of the connection.
//!
//! The kernel opens every FUSE connection with FUSE_INIT (CUSE: CUSE_INIT) carrying its
//! protocol version and the features it offers. The server answers with the version both
//! speak (major 7, minor = the smaller of the two) and the subset of features it wants; until
//! that answer arrives, every other syscall on the mount waits.

use std::path::Path;

use nix::errno::Errno;
use zerocopy::IntoBytes;

use super::abi::{
    init_flags, parse, parse_padded, InitIn, InitOut, Opcode, INIT_IN_COMPAT_SIZE,
    INIT_OUT_COMPAT_22_SIZE, KERNEL_MINOR_VERSION, KERNEL_VERSION, MIN_KERNEL_MINOR_VERSION,
};
use super::session::{Reply, Request};

/// The largest WRITE (and READ) payload we accept. With 4 KiB pages this is `MAX_PAGES` pages,
/// the kernel's own upper limit (FUSE_MAX_MAX_PAGES), so a 1 MiB write(2) is one request.
pub const MAX_WRITE: u32 = 1 << 20;
/// Pages per request, announced with `FUSE_MAX_PAGES`.
pub const MAX_PAGES: u16 = 256;
/// The reader's buffer: one request is at most in header + write_in + MAX_WRITE; the kernel
/// refuses a read(2) with a smaller buffer (fs/fuse/dev.c, fuse_dev_do_read).
pub const REQUEST_BUFFER_SIZE: usize = MAX_WRITE as usize + 4096;
/// Requests the kernel keeps in flight in the background (async RELEASE among them). High
/// enough that a RELEASE is never held back behind the limit, which would let a following
/// OPEN overtake it.
const MAX_BACKGROUND: u16 = 64;
const CONGESTION_THRESHOLD: u16 = 48;

/// The first two words of both `fuse_init_in` and `cuse_init_in`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
}

/// Picks the protocol minor both sides speak, or refuses the kernel (EPROTO) when it speaks
/// another major version or a minor too old for our structs.
pub fn negotiate(body: &[u8]) -> Result<(KernelVersion, u32), Errno> {
    let ([major, minor], _) = parse::<[u32; 2]>(body).map_err(|err| {
        log::error!("INIT: {err}");
        Errno::EINVAL
    })?;
    let kernel = KernelVersion { major, minor };
    if major != KERNEL_VERSION {
        log::error!(
            "INIT: the kernel speaks FUSE protocol {major}.{minor}, we speak only {KERNEL_VERSION}.x; refusing"
        );
        return Err(Errno::EPROTO);
    }
    if minor < MIN_KERNEL_MINOR_VERSION {
        log::error!(
            "INIT: the kernel speaks FUSE protocol {major}.{minor}, older than the \
             {KERNEL_VERSION}.{MIN_KERNEL_MINOR_VERSION} we need; refusing"
        );
        return Err(Errno::EPROTO);
    }
    Ok((kernel, minor.min(KERNEL_MINOR_VERSION)))
}

/// The FUSE_INIT reply of a device mount: big direct-I/O requests, no caching features, no
/// kernel-side locking or readdirplus; everything else the kernel offers is declined.
pub fn fuse_init_reply(body: &[u8], minor: u32) -> Result<Vec<u8>, Errno> {
    let init_in: InitIn = parse_padded(body, INIT_IN_COMPAT_SIZE).map_err(|err| {
        log::error!("FUSE_INIT: {err}");
        Errno::EINVAL
    })?;
    let wanted = init_flags::BIG_WRITES | init_flags::MAX_PAGES;
    let out = InitOut {
        major: KERNEL_VERSION,
        minor,
        max_readahead: init_in.max_readahead,
        flags: init_in.flags & wanted,
        max_background: MAX_BACKGROUND,
        congestion_threshold: CONGESTION_THRESHOLD,
        max_write: MAX_WRITE,
        time_gran: 1,
        max_pages: MAX_PAGES,
        ..InitOut::default()
    };
    // Kernels before 7.23 read a shorter struct (negotiate() already refused those before
    // 7.12, which is all that would need the 8-byte INIT_OUT_COMPAT_SIZE form).
    let len = if minor < 23 {
        INIT_OUT_COMPAT_22_SIZE
    } else {
        size_of::<InitOut>()
    };
    Ok(out.as_bytes()[..len].to_vec())
}

/// The INIT answer of a FUSE mount, whatever its root is (the mount at `label`). CUSE_INIT
/// can only come from `/dev/cuse`; on a mount it means the descriptor is not what we think.
pub fn fuse_mount_init(label: &Path, req: &Request<'_>, minor: u32) -> Reply {
    if req.opcode != Opcode::INIT {
        log::error!(
            "{}: {} on a FUSE mount; refusing",
            label.display(),
            req.opcode
        );
        return Reply::Error(Errno::EPROTO);
    }
    fuse_init_reply(req.body, minor).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuse::abi::parse;

    fn init_body(major: u32, minor: u32, flags: u32) -> Vec<u8> {
        let init = InitIn {
            major,
            minor,
            max_readahead: 131072,
            flags,
            ..InitIn::default()
        };
        init.as_bytes().to_vec()
    }

    #[test]
    fn minor_is_the_smaller_of_both() {
        let (kernel, minor) = negotiate(&init_body(7, 45, 0)).unwrap();
        assert_eq!(
            kernel,
            KernelVersion {
                major: 7,
                minor: 45
            }
        );
        assert_eq!(minor, 38);
        assert_eq!(negotiate(&init_body(7, 31, 0)).unwrap().1, 31);
    }

    #[test]
    fn other_major_or_ancient_minor_is_eproto() {
        assert_eq!(negotiate(&init_body(8, 0, 0)), Err(Errno::EPROTO));
        assert_eq!(negotiate(&init_body(6, 38, 0)), Err(Errno::EPROTO));
        assert_eq!(negotiate(&init_body(7, 8, 0)), Err(Errno::EPROTO));
    }

    #[test]
    fn truncated_init_is_einval() {
        assert_eq!(negotiate(&[7, 0, 0]), Err(Errno::EINVAL));
        assert_eq!(
            fuse_init_reply(&[7, 0, 0, 0, 38, 0, 0, 0], 38),
            Err(Errno::EINVAL)
        );
    }

    #[test]
    fn reply_takes_only_offered_flags_and_sets_limits() {
        let offered = init_flags::MAX_PAGES | init_flags::ASYNC_READ | init_flags::WRITEBACK_CACHE;
        let reply = fuse_init_reply(&init_body(7, 38, offered), 38).unwrap();
        assert_eq!(reply.len(), 64);
        let (out, _) = parse::<InitOut>(&reply).unwrap();
        assert_eq!((out.major, out.minor), (7, 38));
        assert_eq!(out.flags, init_flags::MAX_PAGES);
        assert_eq!(out.max_write, 1 << 20);
        assert_eq!(out.max_pages, 256);
        assert_eq!(out.max_readahead, 131072);
    }

    #[test]
    fn old_kernels_get_the_short_reply() {
        assert_eq!(fuse_init_reply(&init_body(7, 22, 0), 22).unwrap().len(), 24);
    }
}
