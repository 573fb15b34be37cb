//! cusedev's side: starting the guard, telling it each mount as it is made and unmade, and
//! letting it go at a clean exit.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{shutdown, socketpair, AddressFamily, Shutdown, SockFlag, SockType};
use nix::sys::stat::Mode;

use super::wire::{self, Message};
use super::SUBCOMMAND;

/// How long a clean exit waits for the guard to follow (it has nothing left to do by then).
const EXIT_WAIT_MS: u16 = 5000;

/// The running guard, shared by every mount of the frontend.
pub struct UnmountGuard {
    link: Mutex<Link>,
    next_key: AtomicU64,
}

struct Link {
    /// Our end of the socket; `None` once the guard is gone or let go.
    socket: Option<OwnedFd>,
    child: Option<Child>,
}

/// One mount the guard watches; [`Guarded::forget`] before cusedev unmounts it itself.
pub struct Guarded {
    guard: Arc<UnmountGuard>,
    key: u64,
}

impl Guarded {
    /// Tells the guard that cusedev is about to unmount this mount itself.
    pub fn forget(self) {
        self.guard.send(&Message::Forget { key: self.key }, None);
    }
}

impl UnmountGuard {
    /// Starts the guard: this very binary (`/proc/self/exe`, which still works when the file
    /// was replaced since), exec'ed fresh, so it has none of our threads and no `/dev/fuse`,
    /// with its end of a socketpair as stdin and our stderr as its log.
    pub fn spawn() -> io::Result<UnmountGuard> {
        // CLOEXEC on both ends: no other program cusedev starts (modprobe) may hold our end,
        // or the guard would not see end-of-file when cusedev dies.
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let child = Command::new("/proc/self/exe")
            .arg0("cusedev")
            .arg(SUBCOMMAND)
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        log::info!(
            "unmount guard started (pid {}): if cusedev is killed, it unmounts cusedev's FUSE \
             mounts (--no-unmount-guard turns it off)",
            child.id()
        );
        Ok(UnmountGuard {
            link: Mutex::new(Link {
                socket: Some(ours),
                child: Some(child),
            }),
            next_key: AtomicU64::new(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Has the guard watch the mount now at `path` (just mounted by us). `None` when it
    /// cannot; the mount then has only the next cusedev's peeling to fall back on.
    pub fn watch(self: &Arc<Self>, path: &Path) -> Option<Guarded> {
        // O_PATH: the mount's root itself, without asking the FUSE server anything (it has not
        // even answered INIT yet).
        let root = match nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        ) {
            // SAFETY: open(2) has just returned this descriptor; nothing else owns it.
            Ok(raw) => unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) },
            Err(err) => {
                log::warn!(
                    "unmount guard: cannot open {} to hand it over ({err}); not guarded",
                    path.display()
                );
                return None;
            }
        };
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let watch = Message::Watch {
            key,
            path: path.to_owned(),
        };
        self.send(&watch, Some(&root)).then(|| Guarded {
            guard: self.clone(),
            key,
        })
    }

    /// Sends `message` (with `fd`); says whether the guard got it. A guard that is gone is
    /// reported once and not asked again.
    fn send(&self, message: &Message, fd: Option<&OwnedFd>) -> bool {
        let mut link = self.lock();
        let Some(socket) = &link.socket else {
            return false;
        };
        match wire::send(socket.as_fd(), message, fd.map(|fd| fd.as_fd())) {
            Ok(()) => true,
            Err(Errno::EAGAIN) => {
                log::warn!("unmount guard: not reading its socket (stopped?); {message:?} lost");
                false
            }
            Err(err) => {
                let status = link
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                log::warn!(
                    "unmount guard: gone ({err}, exit {status:?}); from now on a killed cusedev's \
                     mounts are left for the next cusedev to take away"
                );
                link.socket = None;
                false
            }
        }
    }

    /// At a clean exit, after every mount was forgotten and unmounted: closes our end, so the
    /// guard reads end-of-file, and waits (bounded) until it has exited. Idempotent.
    pub fn finish(&self) {
        let (socket, child) = {
            let mut link = self.lock();
            (link.socket.take(), link.child.take())
        };
        let Some(mut child) = child else { return };
        if let Some(socket) = socket {
            if !hangs_up(&socket) {
                log::warn!(
                    "unmount guard (pid {}) has not exited {EXIT_WAIT_MS} ms after cusedev let it \
                     go; leaving it",
                    child.id()
                );
                return;
            }
        }
        match child.wait() {
            Ok(status) if status.success() => log::debug!("unmount guard exited"),
            Ok(status) => log::warn!("unmount guard exited with {status}"),
            Err(err) => log::warn!("unmount guard: cannot wait for it: {err}"),
        }
    }
}

/// Shuts down writing on our end of the socket, so the guard reads end-of-file, and waits
/// (bounded) for its end to close, which it does as it exits: our end then hangs up.
fn hangs_up(socket: &OwnedFd) -> bool {
    let _ = shutdown(socket.as_raw_fd(), Shutdown::Write);
    let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::from(EXIT_WAIT_MS)) {
            Err(Errno::EINTR) => continue,
            Ok(ready) => return ready == 1,
            Err(_) => return false,
        }
    }
}
