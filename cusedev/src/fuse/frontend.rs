//! The FUSE mount frontend: devices named `dir/leaf` appear as files in FUSE mounts of
//! `<dev_root>/dir`.
//!
//! The kernel's misc devices live in `/dev` (`/dev/vmbus/hv_fcopy`). Without CUSE we cannot
//! make character devices, but we can mount a FUSE directory over `/dev/vmbus` and serve a
//! regular file `hv_fcopy` in it with the same open/read/write/ioctl/poll/close behaviour.
//! One mount (and one session) per directory, shared by all devices of that directory.
//!
//! Top-level names (`/dev/lguest`) would need a mount on a file; not supported yet.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::dir::{check_leaf, DeviceDir};
use super::error::FrontendError;
use super::mount;
use super::session::Session;
use crate::device::Device;

/// One mounted directory.
struct DirMount {
    path: PathBuf,
    dir: Arc<DeviceDir>,
    session: Session,
}

#[derive(Default)]
struct State {
    /// Directory relative to dev_root ("vmbus") → its mount.
    mounts: BTreeMap<String, DirMount>,
    shut_down: bool,
}

/// Serves devices as files in FUSE mounts under a device root (normally `/dev`).
pub struct FuseFrontend {
    dev_root: PathBuf,
    state: Mutex<State>,
}

/// Splits `"vmbus/hv_fcopy"` into `("vmbus", "hv_fcopy")`, checking every component.
fn split_name(name: &str) -> Result<(&str, &str), FrontendError> {
    let invalid = |reason| FrontendError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    let Some((dir, leaf)) = name.rsplit_once('/') else {
        check_leaf(name).map_err(invalid)?;
        return Err(FrontendError::TopLevelName {
            name: name.to_owned(),
        });
    };
    if dir.starts_with('/') {
        return Err(invalid(
            "the name is relative to /dev and cannot start with '/'",
        ));
    }
    for component in dir.split('/') {
        check_leaf(component).map_err(invalid)?;
    }
    check_leaf(leaf).map_err(invalid)?;
    Ok((dir, leaf))
}

impl FuseFrontend {
    /// A frontend that mounts under `dev_root` (normally `/dev`). Nothing is mounted until
    /// the first device is added.
    pub fn new(dev_root: &Path) -> FuseFrontend {
        FuseFrontend {
            dev_root: dev_root.to_owned(),
            state: Mutex::new(State::default()),
        }
    }

    /// Checks that this machine can run the frontend at all (`/dev/fuse` opens).
    pub fn probe() -> Result<(), FrontendError> {
        mount::open_fuse_device().map(drop)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The device root this frontend mounts under.
    pub fn dev_root(&self) -> &Path {
        &self.dev_root
    }

    /// Where a device named `name` appears (`<dev_root>/vmbus/hv_fcopy`).
    pub fn device_path(&self, name: &str) -> PathBuf {
        self.dev_root.join(name)
    }

    /// The directories currently mounted, as absolute paths.
    pub fn mount_points(&self) -> Vec<PathBuf> {
        self.lock()
            .mounts
            .values()
            .map(|m| m.path.clone())
            .collect()
    }

    /// Makes `device` appear at `<dev_root>/<device.name()>`, mounting its directory first if
    /// this is the directory's first device.
    pub fn add_device(&self, device: Arc<dyn Device>) -> Result<(), FrontendError> {
        let name = device.name().to_owned();
        let (dir, leaf) = split_name(&name)?;
        let mut state = self.lock();
        if state.shut_down {
            return Err(FrontendError::ShutDown);
        }
        if !state.mounts.contains_key(dir) {
            let mounted = self.mount_dir(dir)?;
            state.mounts.insert(dir.to_owned(), mounted);
        }
        let mounted = &state.mounts[dir];
        match mounted.dir.add(leaf, device) {
            Ok(ino) => {
                log::info!(
                    "added device {name} at {} (inode {ino})",
                    mounted.path.join(leaf).display()
                );
                Ok(())
            }
            Err(nix::errno::Errno::EEXIST) => Err(FrontendError::AlreadyRegistered { name }),
            Err(_) => Err(FrontendError::InvalidName {
                name,
                reason: "not a valid file name",
            }),
        }
    }

    /// Removes the device named `name`: new opens fail with ENOENT, files already open keep
    /// working until closed (`misc_deregister` with a file still open). The directory stays
    /// mounted, possibly empty, until [`FuseFrontend::shutdown`].
    pub fn remove_device(&self, name: &str) -> Result<(), FrontendError> {
        let (dir, leaf) = split_name(name)?;
        let state = self.lock();
        let not_registered = || FrontendError::NotRegistered {
            name: name.to_owned(),
        };
        let mounted = state.mounts.get(dir).ok_or_else(not_registered)?;
        mounted.dir.remove(leaf).ok_or_else(not_registered)?;
        log::info!(
            "removed device {name} from {}",
            mounted.path.join(leaf).display()
        );
        Ok(())
    }

    /// Unmounts every directory (lazily: processes with a file open there get ENOTCONN from
    /// then on) and stops their sessions. Afterwards `add_device` fails. Idempotent.
    pub fn shutdown(&self) {
        let mounts = {
            let mut state = self.lock();
            state.shut_down = true;
            std::mem::take(&mut state.mounts)
        };
        for (_, mut mounted) in mounts {
            match mount::unmount(&mounted.path) {
                Ok(()) => log::info!("unmounted {}", mounted.path.display()),
                Err(err) => log::warn!("cannot unmount {}: {err}", mounted.path.display()),
            }
            mounted.session.stop();
        }
    }

    fn mount_dir(&self, dir: &str) -> Result<DirMount, FrontendError> {
        let path = self.dev_root.join(dir);
        mount::prepare_mount_point(&path)?;
        let fd = mount::open_fuse_device()?;
        mount::mount_fuse(fd.as_fd(), &path)?;
        let device_dir = Arc::new(DeviceDir::new(&path));
        let label = path.display().to_string();
        let session = match Session::start(fd, device_dir.clone(), &label) {
            Ok(session) => session,
            Err(source) => {
                // The fd is closed by now, which aborted the connection; take the dead mount
                // away so the next attempt does not find it.
                let _ = mount::unmount(&path);
                return Err(FrontendError::Session { path, source });
            }
        };
        log::info!("mounted FUSE device directory {label}");
        Ok(DirMount {
            path,
            dir: device_dir,
            session,
        })
    }
}

impl Drop for FuseFrontend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<FuseFrontend>();
    }

    #[test]
    fn names_split_at_the_last_slash() {
        assert_eq!(split_name("vmbus/hv_fcopy").unwrap(), ("vmbus", "hv_fcopy"));
        assert_eq!(split_name("a/b/c").unwrap(), ("a/b", "c"));
    }

    #[test]
    fn top_level_and_malformed_names_are_refused_with_a_reason() {
        let err = split_name("lguest").unwrap_err();
        assert!(matches!(err, FrontendError::TopLevelName { .. }));
        assert!(err
            .to_string()
            .contains("top-level device names are not supported"));
        for bad in ["/vmbus/x", "vmbus/", "vmbus//x", "../x", "vmbus/..", ""] {
            assert!(split_name(bad).is_err(), "{bad:?}");
        }
    }
}
