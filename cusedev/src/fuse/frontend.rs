//! The FUSE mount frontend: devices named `dir/leaf` appear as files in FUSE mounts of
//! `<dev_root>/dir`; top-level devices (`lguest`) as FUSE mounts on the file `<dev_root>/lguest`.
//!
//! The kernel's misc devices live in `/dev` (`/dev/vmbus/hv_fcopy`, `/dev/lguest`). Without CUSE
//! we cannot make character devices, but we can mount a FUSE directory over `/dev/vmbus` and
//! serve a regular file `hv_fcopy` in it, or mount a FUSE file on `/dev/lguest`, with the same
//! open/read/write/ioctl/poll/close behaviour. One mount (and one session) per directory,
//! shared by all devices of that directory ([`DeviceDir`]); one per top-level device
//! ([`DeviceFile`]). Both are served by the same engine; only what the mount's root is differs.
//!
//! Lifetimes follow `misc_register`/`misc_deregister`. A device removed from a directory loses
//! its name, and the directory stays mounted until [`FuseFrontend::shutdown`]. A removed
//! top-level device is unmounted lazily and its file deleted at once: the path shows nothing,
//! as /dev shows no node for an unregistered device. Files open at that moment keep working
//! until closed, so its session goes on serving them ("retired") until the kernel, its mount
//! unused at last, ends the connection.
//!
//! With an [`UnmountGuard`] ([`FuseFrontend::with_unmount_guard`], what `cusedev serve` does
//! by default) every mount is handed to the guard as it is made, and forgotten just before
//! the frontend unmounts it itself: if cusedev is killed, the guard unmounts what is left.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::dir::DeviceDir;
use super::error::FrontendError;
use super::file::DeviceFile;
use super::mount::{self, DIRECTORY_ROOT};
use super::mount_point;
use super::name::{parse_node_name, NodeName};
use super::session::{RequestHandler, Session};
use super::unmount_guard::{Guarded, UnmountGuard};
use crate::device::Device;

/// One FUSE connection mounted at `path`.
struct Mount {
    path: PathBuf,
    session: Session,
    /// The guard's watch on this mount, until we unmount it ourselves.
    guarded: Option<Guarded>,
}

impl Mount {
    /// Mounts a new connection at `path` (made ready by [`mount_point`]) with a root of mode
    /// `root_mode`, hands it to `guard` (if any) and starts the session that serves it with
    /// `handler`.
    fn start(
        path: PathBuf,
        root_mode: u32,
        handler: Arc<dyn RequestHandler>,
        guard: Option<&Arc<UnmountGuard>>,
    ) -> Result<Mount, FrontendError> {
        let fd = mount::open_fuse_device()?;
        mount::mount_fuse(fd.as_fd(), &path, root_mode)?;
        // At once, before the session starts: the less time the mount spends unguarded, the
        // smaller the window in which a kill still leaves it behind.
        let guarded = guard.and_then(|guard| guard.watch(&path));
        let label = path.display().to_string();
        match Session::start(fd, handler, &label) {
            Ok(session) => Ok(Mount {
                path,
                session,
                guarded,
            }),
            Err(source) => {
                // The fd is closed by now, which aborted the connection; take the dead mount
                // away so the next attempt does not find it.
                if let Some(guarded) = guarded {
                    guarded.forget();
                }
                let _ = mount::unmount(&path);
                Err(FrontendError::Session { path, source })
            }
        }
    }

    /// Detaches the mount (processes with a file open there keep it until they close it).
    fn unmount(&mut self) {
        if let Some(guarded) = self.guarded.take() {
            guarded.forget();
        }
        match mount::unmount(&self.path) {
            Ok(()) => log::info!("unmounted {}", self.path.display()),
            Err(err) => log::warn!("cannot unmount {}: {err}", self.path.display()),
        }
    }
}

/// One mounted directory.
struct DirMount {
    mount: Mount,
    dir: Arc<DeviceDir>,
}

/// One top-level device, mounted on its own file.
struct FileMount {
    mount: Mount,
    file: Arc<DeviceFile>,
}

#[derive(Default)]
struct State {
    /// Directory relative to dev_root ("vmbus") → its mount.
    dirs: BTreeMap<String, DirMount>,
    /// Top-level device name ("lguest") → its mount.
    files: BTreeMap<String, FileMount>,
    /// Sessions of removed top-level devices, serving the files still open on their detached
    /// mounts; each finishes when the kernel ends its connection.
    retired: Vec<Session>,
    shut_down: bool,
}

impl State {
    /// Lets go of the retired sessions that have finished.
    fn reap_retired(&mut self) {
        self.retired.retain(|session| !session.is_finished());
    }
}

/// Serves devices as files in FUSE mounts under a device root (normally `/dev`).
pub struct FuseFrontend {
    dev_root: PathBuf,
    state: Mutex<State>,
    /// Unmounts our mounts if we are killed; let go at [`FuseFrontend::shutdown`].
    guard: Option<Arc<UnmountGuard>>,
}

/// The name of `name`'s node, or why the frontend refuses it.
fn parse_name(name: &str) -> Result<NodeName<'_>, FrontendError> {
    parse_node_name(name).map_err(|reason| FrontendError::InvalidName {
        name: name.to_owned(),
        reason,
    })
}

impl FuseFrontend {
    /// A frontend that mounts under `dev_root` (normally `/dev`). Nothing is mounted until
    /// the first device is added.
    pub fn new(dev_root: &Path) -> FuseFrontend {
        FuseFrontend {
            dev_root: dev_root.to_owned(),
            state: Mutex::new(State::default()),
            guard: None,
        }
    }

    /// The same frontend with every mount it makes from now on watched by `guard`.
    pub fn with_unmount_guard(mut self, guard: UnmountGuard) -> FuseFrontend {
        self.guard = Some(Arc::new(guard));
        self
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

    /// Where a device named `name` appears (`<dev_root>/vmbus/hv_fcopy`, `<dev_root>/lguest`).
    pub fn device_path(&self, name: &str) -> PathBuf {
        self.dev_root.join(name)
    }

    /// The directories and top-level device files currently mounted, as absolute paths.
    pub fn mount_points(&self) -> Vec<PathBuf> {
        let state = self.lock();
        let dirs = state.dirs.values().map(|m| &m.mount);
        let files = state.files.values().map(|m| &m.mount);
        dirs.chain(files).map(|m| m.path.clone()).collect()
    }

    /// Makes `device` appear at `<dev_root>/<device.name()>`: in its directory's mount (made on
    /// the directory's first device), or on a file of its own for a top-level name.
    pub fn add_device(&self, device: Arc<dyn Device>) -> Result<(), FrontendError> {
        let name = device.name().to_owned();
        let node = parse_name(&name)?;
        let mut state = self.lock();
        if state.shut_down {
            return Err(FrontendError::ShutDown);
        }
        state.reap_retired();
        match node {
            NodeName::InDir { dir, leaf } => self.add_to_dir(&mut state, dir, leaf, device),
            NodeName::TopLevel(leaf) => {
                if state.files.contains_key(leaf) {
                    return Err(FrontendError::AlreadyRegistered { name });
                }
                let mounted = self.mount_file(leaf, device)?;
                log::info!(
                    "added device {name} at {} (a FUSE mount on a file)",
                    mounted.mount.path.display()
                );
                state.files.insert(leaf.to_owned(), mounted);
                Ok(())
            }
        }
    }

    fn add_to_dir(
        &self,
        state: &mut State,
        dir: &str,
        leaf: &str,
        device: Arc<dyn Device>,
    ) -> Result<(), FrontendError> {
        let name = device.name().to_owned();
        if !state.dirs.contains_key(dir) {
            let mounted = self.mount_dir(dir)?;
            state.dirs.insert(dir.to_owned(), mounted);
        }
        let mounted = &state.dirs[dir];
        match mounted.dir.add(leaf, device) {
            Ok(ino) => {
                log::info!(
                    "added device {name} at {} (inode {ino})",
                    mounted.mount.path.join(leaf).display()
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

    /// Removes the device named `name`: new opens fail (ENOENT), files already open keep
    /// working until closed (`misc_deregister` with a file still open). A directory stays
    /// mounted, possibly empty, until [`FuseFrontend::shutdown`]; a top-level device's mount
    /// is detached and its file deleted now.
    pub fn remove_device(&self, name: &str) -> Result<(), FrontendError> {
        let node = parse_name(name)?;
        let mut state = self.lock();
        state.reap_retired();
        let not_registered = || FrontendError::NotRegistered {
            name: name.to_owned(),
        };
        match node {
            NodeName::InDir { dir, leaf } => {
                let mounted = state.dirs.get(dir).ok_or_else(not_registered)?;
                mounted.dir.remove(leaf).ok_or_else(not_registered)?;
                log::info!(
                    "removed device {name} from {}",
                    mounted.mount.path.join(leaf).display()
                );
            }
            NodeName::TopLevel(leaf) => {
                let mounted = state.files.remove(leaf).ok_or_else(not_registered)?;
                let session = unmount_file(mounted);
                log::info!("removed device {name}");
                state.retired.push(session);
            }
        }
        Ok(())
    }

    /// Unmounts every directory and top-level file (lazily: processes with a file open there
    /// get ENOTCONN from then on), stops their sessions and deletes the top-level files.
    /// Afterwards `add_device` fails. Idempotent.
    pub fn shutdown(&self) {
        let (dirs, files, retired) = {
            let mut state = self.lock();
            state.shut_down = true;
            (
                std::mem::take(&mut state.dirs),
                std::mem::take(&mut state.files),
                std::mem::take(&mut state.retired),
            )
        };
        for (_, mut mounted) in dirs {
            mounted.mount.unmount();
            mounted.mount.session.stop();
        }
        let sessions = files.into_values().map(unmount_file).chain(retired);
        for mut session in sessions {
            session.stop();
        }
        // Everything is unmounted and forgotten: the guard has nothing left to do.
        if let Some(guard) = &self.guard {
            guard.finish();
        }
    }

    fn mount_dir(&self, dir: &str) -> Result<DirMount, FrontendError> {
        let path = self.dev_root.join(dir);
        mount_point::prepare_dir(&path)?;
        let device_dir = Arc::new(DeviceDir::new(&path));
        let mount = Mount::start(
            path,
            DIRECTORY_ROOT,
            device_dir.clone(),
            self.guard.as_ref(),
        )?;
        log::info!("mounted FUSE device directory {}", mount.path.display());
        Ok(DirMount {
            mount,
            dir: device_dir,
        })
    }

    fn mount_file(&self, leaf: &str, device: Arc<dyn Device>) -> Result<FileMount, FrontendError> {
        let path = self.dev_root.join(leaf);
        let file = Arc::new(DeviceFile::new(&path, device));
        mount_point::prepare_file(&path, file.root_mode() & 0o7777)?;
        let guard = self.guard.as_ref();
        match Mount::start(path.clone(), file.root_mode(), file.clone(), guard) {
            Ok(mount) => Ok(FileMount { mount, file }),
            Err(err) => {
                mount_point::remove_file(&path);
                Err(err)
            }
        }
    }
}

/// Takes a top-level device away: opens that already walked the path get ENODEV, the mount
/// is detached, the file under it deleted. Returns the session, which serves the files still
/// open until they are closed (or it is stopped).
fn unmount_file(mut mounted: FileMount) -> Session {
    mounted.file.deregister();
    mounted.mount.unmount();
    mount_point::remove_file(&mounted.mount.path);
    mounted.mount.session
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
    fn malformed_names_are_refused_before_anything_is_mounted() {
        let frontend = FuseFrontend::new(Path::new("/nonexistent/dev"));
        for bad in ["/lguest", "vmbus/", "../x", ""] {
            let err = frontend.remove_device(bad).unwrap_err();
            assert!(
                matches!(err, FrontendError::InvalidName { .. }),
                "{bad:?}: {err}"
            );
        }
        assert!(matches!(
            frontend.remove_device("lguest"),
            Err(FrontendError::NotRegistered { .. })
        ));
    }
}
