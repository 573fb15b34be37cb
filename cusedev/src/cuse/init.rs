//! The CUSE_INIT answer: protocol version, limits, and the device's name.

use nix::errno::Errno;
use zerocopy::IntoBytes;

use crate::fuse::abi::{
    parse, CuseInitIn, CuseInitOut, CUSE_INIT_INFO_MAX, CUSE_UNRESTRICTED_IOCTL, KERNEL_VERSION,
};

/// The largest READ/WRITE payload we announce. CUSE connections keep the default of 32 pages
/// per request (`FUSE_DEFAULT_MAX_PAGES_PER_REQ`; cuse.c never raises it), so a bigger value
/// would not be used: a read(2) beyond 128 KiB reaches the device in 128 KiB pieces.
pub const CUSE_MAX_IO: u32 = 128 * 1024;

/// The body of the CUSE_INIT reply for a device named `name` (relative to /dev), speaking
/// protocol minor `minor`: `cuse_init_out` followed by `"DEVNAME=<name>\0"`.
///
/// The major and minor numbers are left 0, which makes the kernel allocate a free major
/// (`alloc_chrdev_region` in `cuse_process_init_reply`), as `misc_register` does with
/// MISC_DYNAMIC_MINOR. Unrestricted ioctl is taken when the kernel offers it (it always
/// does): device models decide which caller buffers an ioctl touches, as a driver does.
pub fn cuse_init_reply(body: &[u8], minor: u32, name: &str) -> Result<Vec<u8>, Errno> {
    let (init_in, _) = parse::<CuseInitIn>(body).map_err(|err| {
        log::error!("CUSE_INIT: {err}");
        Errno::EINVAL
    })?;
    let info = device_info(name)?;
    let out = CuseInitOut {
        major: KERNEL_VERSION,
        minor,
        flags: init_in.flags & CUSE_UNRESTRICTED_IOCTL,
        max_read: CUSE_MAX_IO,
        max_write: CUSE_MAX_IO,
        ..CuseInitOut::default()
    };
    let mut reply = out.as_bytes().to_vec();
    reply.extend_from_slice(&info);
    Ok(reply)
}

/// `"DEVNAME=<name>\0"`, the only key the kernel's `cuse_parse_devinfo` requires. A name with
/// a NUL or one too long for the info block would be cut or refused by the kernel; we refuse
/// it first with a clear log line.
fn device_info(name: &str) -> Result<Vec<u8>, Errno> {
    let mut info = format!("DEVNAME={name}").into_bytes();
    info.push(0);
    if name.is_empty() || name.contains('\0') || info.len() > CUSE_INIT_INFO_MAX {
        log::error!("CUSE_INIT: {name:?} cannot be a CUSE device name");
        return Err(Errno::EINVAL);
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init_in(flags: u32) -> Vec<u8> {
        CuseInitIn {
            major: 7,
            minor: 37,
            unused: 0,
            flags,
        }
        .as_bytes()
        .to_vec()
    }

    #[test]
    fn reply_is_cuse_init_out_then_devname() {
        let reply =
            cuse_init_reply(&init_in(CUSE_UNRESTRICTED_IOCTL), 37, "vmbus/hv_fcopy").unwrap();
        let (out, info) = parse::<CuseInitOut>(&reply).unwrap();
        assert_eq!((out.major, out.minor), (7, 37));
        assert_eq!(out.flags, CUSE_UNRESTRICTED_IOCTL);
        assert_eq!((out.max_read, out.max_write), (CUSE_MAX_IO, CUSE_MAX_IO));
        assert_eq!((out.dev_major, out.dev_minor), (0, 0));
        assert_eq!(info, b"DEVNAME=vmbus/hv_fcopy\0");
        assert_eq!(reply.len(), 72 + info.len());
    }

    #[test]
    fn unrestricted_ioctl_only_when_offered() {
        let reply = cuse_init_reply(&init_in(0), 37, "lguest").unwrap();
        assert_eq!(parse::<CuseInitOut>(&reply).unwrap().0.flags, 0);
    }

    #[test]
    fn bad_names_and_short_init_are_einval() {
        assert_eq!(cuse_init_reply(&init_in(0), 37, ""), Err(Errno::EINVAL));
        assert_eq!(cuse_init_reply(&init_in(0), 37, "a\0b"), Err(Errno::EINVAL));
        let long = "x".repeat(CUSE_INIT_INFO_MAX);
        assert_eq!(cuse_init_reply(&init_in(0), 37, &long), Err(Errno::EINVAL));
        assert_eq!(
            cuse_init_reply(&[7, 0, 0, 0], 37, "lguest"),
            Err(Errno::EINVAL)
        );
    }
}
