//! Creating the listening Unix sockets safely.
//!
//! Both sockets live in a root-owned runtime directory (`/run/cusedev` by default). Three things
//! matter here:
//!
//! * a socket file left behind by a crashed fakehost must not stop a restart, but a *live*
//!   fakehost must not be silently replaced (two hosts on one path would split the guests);
//! * the mode must be right before anyone can connect: we chmod between `bind()` and
//!   `listen()`, and a socket that is not listening refuses every connect, so there is no window
//!   in which a too-permissive socket accepts a connection;
//! * we never remove anything that is not a socket.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};

/// Why a listening socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The parent directory could not be created.
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Something answers on the path: another fakehost is running.
    #[error("another fakehost is already listening on {0}")]
    AlreadyListening(PathBuf),
    /// The path exists and is not a socket; we do not delete it.
    #[error("{0} exists and is not a socket; remove it or choose another path")]
    NotASocket(PathBuf),
    /// Looking at, probing or removing an existing file failed.
    #[error("cannot replace the stale socket {path}: {source}")]
    Stale {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A socket-level call failed.
    #[error("cannot {what} {path}: {source}")]
    Socket {
        /// "create a socket for", "bind", "listen on".
        what: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: nix::Error,
    },
    /// Setting the mode failed.
    #[error("cannot set mode {mode:o} on {path}: {source}")]
    Chmod {
        /// The wanted mode.
        mode: u32,
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Creates `path`'s parent directories (mode 0755) and removes a stale socket file at `path`
/// (one nothing answers on). Errors if a live server answers or `path` is not a socket.
pub fn prepare_socket_path(path: &Path) -> Result<(), SocketError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|source| SocketError::CreateDir {
                path: parent.to_owned(),
                source,
            })?;
    }
    let stale = |source| SocketError::Stale {
        path: path.to_owned(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(stale(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketError::AlreadyListening(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("removing stale socket {}", path.display());
            std::fs::remove_file(path).map_err(stale)
        }
        Err(e) => Err(stale(e)),
    }
}

/// Binds a listening Unix socket at `path` with permission bits `mode`, set before `listen()`.
pub fn bind_listener(path: &Path, mode: u32) -> Result<UnixListener, SocketError> {
    let sock_err = |what, source| SocketError::Socket {
        what,
        path: path.to_owned(),
        source,
    };
    let addr = UnixAddr::new(path).map_err(|e| sock_err("use the socket path", e))?;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| sock_err("create a socket for", e))?;
    socket::bind(fd.as_raw_fd(), &addr).map_err(|e| sock_err("bind", e))?;
    // Not listening yet: every connect() is refused until listen(), so this chmod has no race.
    if let Err(source) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        let _ = std::fs::remove_file(path);
        return Err(SocketError::Chmod {
            mode,
            path: path.to_owned(),
            source,
        });
    }
    let backlog = Backlog::new(64).map_err(|e| sock_err("listen on", e))?;
    if let Err(e) = socket::listen(&fd, backlog) {
        let _ = std::fs::remove_file(path);
        return Err(sock_err("listen on", e));
    }
    Ok(UnixListener::from(fd))
}

/// Accepts connections until `stop` is set (then one more connect wakes the loop), serving
/// each on a thread of its own named `<what>-<n>`, so a slow peer never holds up the next.
pub fn accept_loop(
    listener: std::os::unix::net::UnixListener,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    what: &'static str,
    serve: impl Fn(std::os::unix::net::UnixStream, u64) + Send + Sync + 'static,
) {
    let serve = std::sync::Arc::new(serve);
    let mut n: u64 = 0;
    for stream in listener.incoming() {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                log::warn!("{what} accept failed: {e}");
                continue;
            }
        };
        n += 1;
        let serve = std::sync::Arc::clone(&serve);
        let spawned = std::thread::Builder::new()
            .name(format!("{what}-{n}"))
            .spawn(move || serve(stream, n));
        if let Err(e) = spawned {
            log::error!("cannot start a thread for {what} connection #{n}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn bind_listener_sets_the_mode_and_creates_parents() {
        let dir = TempDir::new("sockets-mode");
        let path = dir.path().join("a/b/ctl.sock");
        prepare_socket_path(&path).unwrap();
        let _listener = bind_listener(&path, 0o600).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let parent = std::fs::metadata(path.parent().unwrap()).unwrap();
        assert!(parent.is_dir());
    }

    #[test]
    fn stale_socket_is_removed() {
        let dir = TempDir::new("sockets-stale");
        let path = dir.path().join("bus.sock");
        drop(bind_listener(&path, 0o660).unwrap());
        assert!(path.exists(), "a dropped listener leaves its file behind");
        prepare_socket_path(&path).unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn live_socket_is_not_replaced() {
        let dir = TempDir::new("sockets-live");
        let path = dir.path().join("bus.sock");
        let _live = bind_listener(&path, 0o660).unwrap();
        let err = prepare_socket_path(&path).unwrap_err();
        assert!(matches!(err, SocketError::AlreadyListening(_)));
        assert!(err
            .to_string()
            .contains("another fakehost is already listening on"));
    }

    #[test]
    fn regular_file_is_not_removed() {
        let dir = TempDir::new("sockets-file");
        let path = dir.path().join("bus.sock");
        std::fs::write(&path, b"precious").unwrap();
        assert!(matches!(
            prepare_socket_path(&path),
            Err(SocketError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }
}
