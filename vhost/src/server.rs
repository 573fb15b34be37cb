//! The vhost-user socket and the per-VMM session loop.
//!
//! One [`VhostUserDaemon`] (and one fresh [`VsockBackend`]) per frontend connection: when QEMU
//! disconnects, the daemon is dropped — which stops its vring worker — every host socket of
//! that session is closed, and we go back to listening, so a restarted QEMU starts from a
//! clean device. The listening socket and the `--uds-path` socket stay bound throughout.
//!
//! Shutdown: [`Shutdown::trigger`] (called from the signal thread in `main`) wakes the wait
//! for the next VMM, or shuts the current vhost-user connection down, after which the session
//! ends as if QEMU had left.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use log::{info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::{umask, Mode};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{VsockBackend, HOST_EVENT};
use crate::device::VsockDevice;
use crate::muxer::DeviceConfig;

/// Everything the server needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// The vhost-user socket to listen on.
    pub socket: PathBuf,
    /// Exit after the first VMM disconnects.
    pub once: bool,
    /// The device.
    pub device: DeviceConfig,
}

/// Fatal server errors.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Creating the socket's directory failed.
    #[error("cannot create directory {}: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Something other than a socket is in the way.
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    /// Binding / preparing the socket failed.
    #[error("cannot listen on {}: {source}", path.display())]
    Listen {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// An I/O failure of the server itself.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        source: io::Error,
    },
}

/// A shutdown request shared between the signal thread and the server loop.
pub struct Shutdown {
    requested: AtomicBool,
    wake_tx: UnixStream,
    wake_rx: UnixStream,
    active: Mutex<Option<ShutdownHandle>>,
}

impl Shutdown {
    /// A fresh, untriggered request.
    pub fn new() -> io::Result<Arc<Shutdown>> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        Ok(Arc::new(Shutdown {
            requested: AtomicBool::new(false),
            wake_tx,
            wake_rx,
            active: Mutex::new(None),
        }))
    }

    /// Ask the server to stop: wakes the listen wait and disconnects the current VMM.
    pub fn trigger(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let _ = (&self.wake_tx).write(&[1]);
        if let Ok(active) = self.active.lock() {
            if let Some(handle) = active.as_ref() {
                handle.shutdown();
            }
        }
    }

    /// Whether [`Self::trigger`] was called.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    fn set_active(&self, handle: Option<ShutdownHandle>) {
        if let Ok(mut active) = self.active.lock() {
            *active = handle;
            // A trigger that ran before the handle was stored would have missed it.
            if self.requested() {
                if let Some(handle) = active.as_ref() {
                    handle.shutdown();
                }
            }
        }
    }
}

/// Create `path`'s directory, remove a stale socket, bind with mode 0600.
pub fn bind_socket(path: &Path) -> Result<UnixListener, ServerError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ServerError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    }
    let listen_err = |source| ServerError::Listen {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(listen_err)?;
        }
        Ok(_) => return Err(ServerError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_err(e)),
    }
    // umask makes the socket 0600 from the moment it exists; the chmod below makes it so
    // regardless of what umask did.
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound.map_err(listen_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_err)?;
    Ok(listener)
}

/// Removes socket files when the server ends.
struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Wait until `listener` has a connection (true) or shutdown was requested (false).
fn wait_for_vmm(listener: &UnixListener, shutdown: &Shutdown) -> Result<bool, ServerError> {
    loop {
        if shutdown.requested() {
            return Ok(false);
        }
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(shutdown.wake_rx.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                return Err(ServerError::Io {
                    what: "waiting for the VMM",
                    source: e.into(),
                })
            }
        }
        let [vmm, wake] = fds;
        if wake.any().unwrap_or(false) {
            let mut buf = [0u8; 16];
            let _ = (&shutdown.wake_rx).read(&mut buf);
            continue;
        }
        if vmm.any().unwrap_or(false) {
            return Ok(true);
        }
    }
}

/// Whether a daemon error is just the VMM going away.
fn is_disconnect(e: &DaemonError) -> bool {
    matches!(
        e,
        DaemonError::HandleRequest(VhostUserError::Disconnected)
            | DaemonError::HandleRequest(VhostUserError::PartialMessage)
            | DaemonError::HandleRequest(VhostUserError::SocketBroken(_))
    )
}

/// One VMM session on an already-readable listener. Errors here end the session, not the
/// server.
fn session(
    listener: &UnixListener,
    uds: Option<&UnixListener>,
    cfg: &ServerConfig,
    shutdown: &Shutdown,
) -> Result<(), String> {
    let uds = uds
        .map(UnixListener::try_clone)
        .transpose()
        .map_err(|e| format!("cannot share the connect socket: {e}"))?;
    let device = VsockDevice::new(cfg.device.clone(), uds)
        .map_err(|e| format!("cannot create the device: {e}"))?;
    let backend = Arc::new(RwLock::new(VsockBackend::new(cfg.device.guest_cid, device)));
    let host_fd = backend
        .read()
        .map_err(|_| "backend lock poisoned".to_string())?
        .host_epoll_fd();
    let mut daemon = VhostUserDaemon::new(
        "vhost-vsock".to_string(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| format!("cannot create the vhost-user daemon: {e}"))?;
    for handler in daemon.get_epoll_handlers() {
        handler
            .register_listener(host_fd, EventSet::IN, u64::from(HOST_EVENT))
            .map_err(|e| format!("cannot watch host sockets: {e}"))?;
    }
    let mut vhost_listener = Listener::from(
        listener
            .try_clone()
            .map_err(|e| format!("cannot share the vhost-user socket: {e}"))?,
    );
    daemon
        .start(&mut vhost_listener)
        .map_err(|e| format!("cannot accept the VMM: {e}"))?;
    info!("VMM connected");
    shutdown.set_active(daemon.shutdown_handle());
    let result = daemon.wait();
    shutdown.set_active(None);
    match result {
        Ok(()) => {}
        Err(e) if is_disconnect(&e) => {}
        Err(e) => warn!("the VMM connection ended with an error: {e}"),
    }
    if let Ok(mut backend) = backend.write() {
        backend.disconnect();
        info!("VMM disconnected");
        info!("session stats: {}", backend.stats());
    } else {
        info!("VMM disconnected");
    }
    // Dropping the daemon sends the worker its exit event and joins it.
    drop(daemon);
    Ok(())
}

/// A bound server: both sockets exist (so clients may connect) before [`Server::run`].
pub struct Server {
    cfg: ServerConfig,
    listener: UnixListener,
    uds: Option<UnixListener>,
    cleanup: RemoveOnDrop,
}

impl Server {
    /// Bind the vhost-user socket and, with `--uds-path`, the host connect socket.
    pub fn bind(cfg: ServerConfig) -> Result<Server, ServerError> {
        let listener = bind_socket(&cfg.socket)?;
        let mut cleanup = RemoveOnDrop(vec![cfg.socket.clone()]);
        let uds = match &cfg.device.routes.uds_path {
            Some(path) => {
                let l = bind_socket(path)?;
                cleanup.0.push(path.clone());
                l.set_nonblocking(true)
                    .map_err(|source| ServerError::Listen {
                        path: path.clone(),
                        source,
                    })?;
                Some(l)
            }
            None => None,
        };
        Ok(Server {
            cfg,
            listener,
            uds,
            cleanup,
        })
    }

    /// Serve VMMs until shutdown (or, with `once`, until the first one leaves). The socket
    /// files are removed on return.
    pub fn run(self, shutdown: &Shutdown) -> Result<(), ServerError> {
        loop {
            info!("listening for the VMM on {}", self.cfg.socket.display());
            if !wait_for_vmm(&self.listener, shutdown)? {
                break;
            }
            if let Err(e) = session(&self.listener, self.uds.as_ref(), &self.cfg, shutdown) {
                warn!("{e}");
            }
            if self.cfg.once || shutdown.requested() {
                break;
            }
        }
        info!("shutting down");
        drop(self.cleanup);
        Ok(())
    }
}

/// [`Server::bind`] then [`Server::run`].
pub fn serve(cfg: &ServerConfig, shutdown: &Shutdown) -> Result<(), ServerError> {
    Server::bind(cfg.clone())?.run(shutdown)
}
