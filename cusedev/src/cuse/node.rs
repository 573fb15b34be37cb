//! `/dev/cuse` itself, and the node of each CUSE device.
//!
//! The kernel registers a CUSE device as class `cuse`, named after DEVNAME, and devtmpfs makes
//! its node in `/dev` with mode 0600 root:root, the same as `misc_register` gives a misc
//! device without `.mode`. Where `/dev` is not a devtmpfs (some containers), or when the
//! device root is somewhere else, we make the node ourselves from the numbers sysfs shows, so
//! the device is reachable wherever the frontend was told to put it.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use super::error::CuseError;

/// The CUSE control device (misc minor 203).
pub const CUSE_DEVICE: &str = "/dev/cuse";
const CUSE_MISC_MINOR: u64 = 203;
const MISC_MAJOR: u64 = 10;

/// Opens `/dev/cuse` for one device's connection.
pub fn open_cuse() -> Result<OwnedFd, CuseError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(CUSE_DEVICE)
        .map_err(CuseError::OpenCuse)?;
    Ok(OwnedFd::from(file))
}

/// Checks that CUSE can be used here, loading the `cuse` module if it is not loaded (and
/// making `/dev/cuse` if the module is there but no devtmpfs made the node). The error says
/// why not, for the log line that explains the frontend choice.
pub fn probe() -> Result<(), String> {
    if !Path::new(CUSE_DEVICE).exists() {
        if !Path::new("/sys/module/cuse").exists() {
            match Command::new("modprobe").arg("cuse").output() {
                Ok(out) if out.status.success() => log::info!("loaded the cuse module"),
                Ok(out) => {
                    return Err(format!(
                        "{CUSE_DEVICE} is missing and `modprobe cuse` failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ))
                }
                Err(err) => {
                    return Err(format!(
                        "{CUSE_DEVICE} is missing and modprobe cannot run: {err}"
                    ))
                }
            }
        }
        if !Path::new(CUSE_DEVICE).exists() {
            make_char_node(Path::new(CUSE_DEVICE), MISC_MAJOR, CUSE_MISC_MINOR, 0o600).map_err(
                |err| format!("the cuse module is loaded but {CUSE_DEVICE} cannot be made: {err}"),
            )?;
            log::info!("made {CUSE_DEVICE} (10:203): no devtmpfs did");
        }
    }
    open_cuse().map(drop).map_err(|err| err.to_string())
}

/// The name sysfs gives a device whose DEVNAME contains slashes (kobject names cannot:
/// `kobject_set_name_vargs` turns each '/' into '!').
pub fn sysfs_name(name: &str) -> String {
    name.replace('/', "!")
}

/// The device numbers the kernel gave the CUSE device `name`, from
/// `/sys/class/cuse/<name>/dev` ("MAJOR:MINOR").
pub fn device_numbers(name: &str) -> io::Result<(u64, u64)> {
    let path = format!("/sys/class/cuse/{}/dev", sysfs_name(name));
    let text = fs::read_to_string(&path)?;
    parse_dev(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path} holds {text:?}, not MAJOR:MINOR"),
        )
    })
}

fn parse_dev(text: &str) -> Option<(u64, u64)> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Makes sure `<dev_root>/<name>` is the character device `major:minor` with `mode`,
/// creating (or replacing a stale) node when devtmpfs has not made the right one.
pub fn ensure_node(
    dev_root: &Path,
    name: &str,
    (major, minor): (u64, u64),
    mode: u32,
) -> Result<PathBuf, CuseError> {
    let path = dev_root.join(name);
    let node_error = |source| CuseError::Node {
        path: path.clone(),
        source,
    };
    match fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_char_device() && meta.rdev() == makedev(major, minor) => {
            if meta.mode() & 0o7777 != mode {
                fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(node_error)?;
            }
            return Ok(path);
        }
        Ok(_) => {
            log::warn!(
                "{} is not character device {major}:{minor} (left from an earlier run?); replacing it",
                path.display()
            );
            fs::remove_file(&path).map_err(node_error)?;
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(node_error(err)),
    }
    if let Some(parent) = path.parent() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(node_error)?;
    }
    make_char_node(&path, major, minor, mode).map_err(node_error)?;
    log::info!(
        "made {} ({major}:{minor}, mode {mode:04o}): no devtmpfs node was there",
        path.display()
    );
    Ok(path)
}

fn make_char_node(path: &Path, major: u64, minor: u64, mode: u32) -> io::Result<()> {
    mknod(
        path,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    )?;
    // mknod's mode is filtered through the umask; the node must have exactly the driver's.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Takes the node away now (new opens get ENOENT); open files are not affected. A node that
/// is already gone is fine.
pub fn remove_node(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_names_replace_slashes() {
        assert_eq!(sysfs_name("vmbus/hv_fcopy"), "vmbus!hv_fcopy");
        assert_eq!(sysfs_name("lguest"), "lguest");
    }

    #[test]
    fn dev_files_parse_as_major_minor() {
        assert_eq!(parse_dev("238:0\n"), Some((238, 0)));
        assert_eq!(parse_dev("238"), None);
        assert_eq!(parse_dev("x:1"), None);
    }

    #[test]
    fn ensure_node_makes_replaces_and_keeps_nodes() {
        let dir = std::env::temp_dir().join(format!("cusedev-node-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        // Missing (with a missing parent): made, with the exact mode despite the umask.
        let path = ensure_node(&dir, "vmbus/hv_fcopy", (1, 3), 0o600).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_char_device());
        assert_eq!((meta.rdev(), meta.mode() & 0o7777), (makedev(1, 3), 0o600));
        // Right node, wrong mode: chmod only.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        ensure_node(&dir, "vmbus/hv_fcopy", (1, 3), 0o600).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o600);
        // Wrong numbers (a stale node): replaced.
        ensure_node(&dir, "vmbus/hv_fcopy", (1, 5), 0o600).unwrap();
        assert_eq!(fs::symlink_metadata(&path).unwrap().rdev(), makedev(1, 5));
        remove_node(&path).unwrap();
        remove_node(&path).unwrap();
        assert!(!path.exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
