//! Devices as real character devices, one `/dev/cuse` connection each.
//!
//! Lifetime rules, chosen to match `misc_register`/`misc_deregister`:
//! - a device is there (its node exists and opens reach it) from `add_device` on;
//! - `remove_device` takes the node away at once (new opens get ENOENT) but files already open
//!   keep working, answered by the device model (which decides what a removed device says:
//!   ENODEV, EBADF, ...). Only when the last of them is closed is the CUSE connection closed,
//!   which makes the kernel unregister the character device. Closing it earlier would turn
//!   every call on those files into the FUSE layer's ENOTCONN instead of the driver's errno.
//!
//! The connection is closed by a reaper thread: the last close arrives as RELEASE on the
//! session's own reader thread, which cannot wait for its own end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::Duration;

use super::error::CuseError;
use super::handler::CuseHandler;
use super::node;
use crate::device::{
    Caller, Device, Errno, Handle, IoctlAnswer, IoctlCall, PollWaker, ReadReply, WriteReply,
};
use crate::fuse::name::parse_node_name;
use crate::fuse::Session;

/// How long the kernel may take to send CUSE_INIT and register the device.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);

/// One registered device.
struct Node {
    /// Tells this registration apart from a later one under the same name.
    id: u64,
    path: PathBuf,
    session: Session,
    device: Arc<TrackedDevice>,
    removed: bool,
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<String, Node>,
    next_id: u64,
    shut_down: bool,
}

type SharedState = Arc<Mutex<State>>;

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves devices as CUSE character devices.
pub struct CuseFrontend {
    dev_root: PathBuf,
    state: SharedState,
    retire: Sender<(String, Session)>,
}

/// Checks a device name relative to /dev: `lguest`, `vmbus/hv_fcopy`.
fn check_name(name: &str) -> Result<(), CuseError> {
    parse_node_name(name)
        .map(drop)
        .map_err(|reason| CuseError::InvalidName {
            name: name.to_owned(),
            reason,
        })
}

impl CuseFrontend {
    /// A frontend whose nodes are (also) made under `dev_root`, normally `/dev`, where
    /// devtmpfs makes them anyway.
    pub fn new(dev_root: &Path) -> CuseFrontend {
        let (retire, retired) = mpsc::channel::<(String, Session)>();
        // Ends when every sender is gone: the frontend and all its tracked devices.
        let spawned = thread::Builder::new()
            .name("cusedev-cuse-reaper".to_owned())
            .spawn(move || {
                for (name, mut session) in retired {
                    session.stop();
                    log::info!(
                        "{name}: CUSE connection closed; the kernel unregistered the device"
                    );
                }
            });
        if let Err(err) = spawned {
            // Without the reaper, connections of removed devices stay open until shutdown:
            // their nodes are gone all the same, so only a re-add of the name is affected.
            log::error!("cannot start the CUSE reaper thread: {err}");
        }
        CuseFrontend {
            dev_root: dev_root.to_owned(),
            state: Arc::new(Mutex::new(State::default())),
            retire,
        }
    }

    /// Whether CUSE can be used here (loading the module if needed); the error says why not.
    pub fn probe() -> Result<(), String> {
        node::probe()
    }

    /// Where a device named `name` appears.
    pub fn device_path(&self, name: &str) -> PathBuf {
        self.dev_root.join(name)
    }

    /// Registers `device` as the character device `/dev/<device.name()>` and returns once its
    /// node exists.
    pub fn add_device(&self, device: Arc<dyn Device>) -> Result<(), CuseError> {
        let name = device.name().to_owned();
        check_name(&name)?;
        let (id, stale) = {
            let mut state = lock(&self.state);
            if state.shut_down {
                return Err(CuseError::ShutDown);
            }
            let stale = match state.nodes.get(&name) {
                Some(node) if !node.removed => {
                    return Err(CuseError::AlreadyRegistered { name });
                }
                Some(_) => state.nodes.remove(&name),
                None => None,
            };
            state.next_id += 1;
            (state.next_id, stale)
        };
        if let Some(mut stale) = stale {
            // The kernel refuses a second CUSE device of the same name, so the old one must
            // go now; its open files lose their device (ENOTCONN) instead of its errnos.
            log::warn!(
                "{name}: the removed device is still open ({} file(s)); closing its CUSE \
                 connection so the new one can register",
                stale.device.open_files()
            );
            stale.session.stop();
        }

        let fd = node::open_cuse()?;
        let tracked = Arc::new(TrackedDevice {
            inner: device.clone(),
            id,
            open: AtomicUsize::new(0),
            state: Arc::downgrade(&self.state),
            retire: self.retire.clone(),
        });
        let handler = Arc::new(CuseHandler::new(tracked.clone()));
        let mut session =
            Session::start(fd, handler.clone(), &name).map_err(|source| CuseError::Session {
                name: name.clone(),
                source,
            })?;
        let refused = || CuseError::KernelRefused {
            name: name.clone(),
            seconds: INIT_TIMEOUT.as_secs(),
        };
        if handler.wait_for_init(INIT_TIMEOUT) != Some(true) {
            session.stop();
            return Err(refused());
        }
        // The kernel registered the device while it took our CUSE_INIT answer; sysfs has its
        // numbers unless the registration failed (a name already taken, for one).
        let numbers = match node::device_numbers(&name) {
            Ok(numbers) => numbers,
            Err(err) => {
                log::error!("{name}: no registered CUSE device after CUSE_INIT: {err}");
                session.stop();
                return Err(refused());
            }
        };
        let path = match node::ensure_node(&self.dev_root, &name, numbers, device.mode()) {
            Ok(path) => path,
            Err(err) => {
                session.stop();
                return Err(err);
            }
        };
        log::info!(
            "added device {name} at {} (character device {}:{}, CUSE)",
            path.display(),
            numbers.0,
            numbers.1
        );
        let mut state = lock(&self.state);
        if state.shut_down {
            drop(state);
            session.stop();
            let _ = node::remove_node(&path);
            return Err(CuseError::ShutDown);
        }
        state.nodes.insert(
            name,
            Node {
                id,
                path,
                session,
                device: tracked,
                removed: false,
            },
        );
        Ok(())
    }

    /// Takes the node of `name` away (new opens: ENOENT); open files keep working until the
    /// last is closed, then the kernel unregisters the device.
    pub fn remove_device(&self, name: &str) -> Result<(), CuseError> {
        let mut state = lock(&self.state);
        let not_registered = || CuseError::NotRegistered {
            name: name.to_owned(),
        };
        let node = state
            .nodes
            .get_mut(name)
            .filter(|node| !node.removed)
            .ok_or_else(not_registered)?;
        node.removed = true;
        if let Err(err) = node::remove_node(&node.path) {
            log::error!("cannot remove {}: {err}", node.path.display());
        }
        let open = node.device.open_files();
        log::info!(
            "removed device {name} from {}{}",
            node.path.display(),
            if open > 0 {
                format!(" ({open} file(s) still open; the device goes when they are closed)")
            } else {
                String::new()
            }
        );
        if open == 0 {
            if let Some(node) = state.nodes.remove(name) {
                let _ = self.retire.send((name.to_owned(), node.session));
            }
        }
        Ok(())
    }

    /// Closes every CUSE connection (the kernel unregisters the devices; files still open get
    /// ENOTCONN from then on) and removes nodes we made. Afterwards `add_device` fails.
    pub fn shutdown(&self) {
        let nodes = {
            let mut state = lock(&self.state);
            state.shut_down = true;
            std::mem::take(&mut state.nodes)
        };
        for (name, mut node) in nodes {
            node.session.stop();
            if let Err(err) = node::remove_node(&node.path) {
                log::warn!("cannot remove {}: {err}", node.path.display());
            }
            log::info!("unregistered CUSE device {name}");
        }
    }
}

impl Drop for CuseFrontend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The device as the CUSE session sees it: the model, plus a count of open files so that a
/// removed device's connection is closed at its last close.
struct TrackedDevice {
    inner: Arc<dyn Device>,
    id: u64,
    open: AtomicUsize,
    state: Weak<Mutex<State>>,
    retire: Sender<(String, Session)>,
}

impl TrackedDevice {
    fn open_files(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// After the last close of a removed device: hand its connection to the reaper. The
    /// count is read under the state lock by `remove_device`, so one of the two always sees
    /// both "removed" and "no file open".
    fn last_close(&self) {
        let Some(state) = self.state.upgrade() else {
            return;
        };
        let mut state = lock(&state);
        let name = self.inner.name();
        let ours = state
            .nodes
            .get(name)
            .is_some_and(|node| node.id == self.id && node.removed);
        if ours {
            if let Some(node) = state.nodes.remove(name) {
                log::debug!("{name}: last file closed after removal; closing its CUSE connection");
                let _ = self.retire.send((name.to_owned(), node.session));
            }
        }
    }
}

impl Device for TrackedDevice {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn mode(&self) -> u32 {
        self.inner.mode()
    }

    fn open(&self, caller: &Caller, flags: i32) -> Result<Handle, Errno> {
        let handle = self.inner.open(caller, flags)?;
        self.open.fetch_add(1, Ordering::SeqCst);
        Ok(handle)
    }

    fn read(&self, handle: Handle, count: u32, offset: u64, caller: &Caller, reply: ReadReply) {
        self.inner.read(handle, count, offset, caller, reply)
    }

    fn write(&self, handle: Handle, data: &[u8], offset: u64, caller: &Caller, reply: WriteReply) {
        self.inner.write(handle, data, offset, caller, reply)
    }

    fn ioctl(&self, handle: Handle, call: &IoctlCall<'_>, caller: &Caller, reply: IoctlAnswer) {
        self.inner.ioctl(handle, call, caller, reply)
    }

    fn poll(&self, handle: Handle, waker: Option<PollWaker>) -> u32 {
        self.inner.poll(handle, waker)
    }

    fn release(&self, handle: Handle) {
        self.inner.release(handle);
        if self.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.last_close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_may_be_top_level_or_nested_but_not_escape() {
        for good in ["lguest", "vmbus/hv_fcopy", "azure_xs_fastpath"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["/lguest", "vmbus/", "vmbus//x", "../x", "vmbus/..", ""] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn frontend_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CuseFrontend>();
    }
}
