//! The guard process itself, `cusedev unmount-guard`: holds the root of every mount cusedev
//! tells it about, and when cusedev's end of the socket closes, lazily unmounts those still
//! mounted, then exits.
//!
//! It must outlive cusedev's death and nothing else, so it takes itself out of everything
//! that could end it earlier: a session of its own (a Ctrl-C on cusedev's terminal, or a
//! signal to cusedev's process group, does not reach it), every signal blocked (a SIGTERM to
//! the whole service lets cusedev shut down cleanly and the guard follow it), `/` as its
//! directory (it pins no mount), and no descriptor but the socket (stdin), /dev/null (stdout)
//! and the log (stderr, cusedev's own).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;

use nix::mount::MntFlags;
use nix::sys::signal::SigSet;

use super::mount_table::{MountTable, Verdict};
use super::wire::{self, Message, Received};

/// A mount cusedev asked us to watch.
struct Watched {
    /// Where cusedev mounted it (for the log; the root below is what is unmounted).
    path: PathBuf,
    /// An `O_PATH` descriptor of the mount's root: the mount itself, not whatever is at
    /// `path` later. Holding it also keeps the mount's id from being reused.
    root: OwnedFd,
    /// The mount's id, as /proc/self/mountinfo names it.
    mount_id: Option<u64>,
}

/// `cusedev unmount-guard`: serves the socket on stdin until it closes. The exit status is 0
/// when the socket closed (whether cusedev exited or died), 1 when it could not be read.
pub fn run() -> ExitCode {
    detach_from_cusedev();
    let socket = io::stdin();
    let mut watched = BTreeMap::new();
    loop {
        match wire::recv(socket.as_fd()) {
            Ok(Received::Message(Message::Watch { key, path }, Some(root))) => {
                let mount_id = mount_id_of(&root);
                log::debug!(
                    "unmount guard: watching {} (mount {mount_id:?})",
                    path.display()
                );
                watched.insert(
                    key,
                    Watched {
                        path,
                        root,
                        mount_id,
                    },
                );
            }
            Ok(Received::Message(Message::Forget { key }, _)) => {
                if let Some(gone) = watched.remove(&key) {
                    log::debug!("unmount guard: cusedev unmounts {}", gone.path.display());
                }
            }
            Ok(Received::Message(Message::Watch { path, .. }, None)) => {
                log::warn!(
                    "unmount guard: asked to watch {} without its descriptor; ignored",
                    path.display()
                );
            }
            Ok(Received::Garbled) => log::warn!("unmount guard: a garbled message; ignored"),
            Ok(Received::Closed) => break,
            Err(err) => {
                // cusedev may well be alive: unmounting now could take a serving mount away.
                log::error!(
                    "unmount guard: cannot read cusedev's socket ({err}); exiting without \
                     unmounting (`cusedev unmount-guard` is started by `cusedev serve`)"
                );
                return ExitCode::FAILURE;
            }
        }
    }
    if watched.is_empty() {
        log::debug!("unmount guard: cusedev has exited and unmounted everything itself");
        return ExitCode::SUCCESS;
    }
    unmount_leftovers(watched.into_values());
    ExitCode::SUCCESS
}

/// Lazily unmounts each watched mount that is still mounted and has nothing mounted on it.
fn unmount_leftovers(watched: impl Iterator<Item = Watched>) {
    let table = match MountTable::of_this_process() {
        Ok(table) => table,
        Err(err) => {
            log::error!(
                "unmount guard: cannot read /proc/self/mountinfo ({err}); nothing unmounted"
            );
            return;
        }
    };
    for mount in watched {
        let path = mount.path.display();
        let Some(id) = mount.mount_id else {
            log::warn!("unmount guard: {path}: its mount id is unknown; left alone");
            continue;
        };
        match table.verdict(id) {
            Verdict::Gone => log::info!(
                "unmount guard: {path}: cusedev's mount is gone already (the next cusedev took \
                 it away, or cusedev did)"
            ),
            Verdict::Covered => log::warn!(
                "unmount guard: {path}: something is mounted on cusedev's dead mount; left alone \
                 (unmounting it would take that away too)"
            ),
            Verdict::Unmount => {
                // Through the descriptor: the path resolves to exactly the mount we hold, so
                // a newer mount at the same path can never be the one that goes.
                let via = format!("/proc/self/fd/{}", mount.root.as_raw_fd());
                match nix::mount::umount2(via.as_str(), MntFlags::MNT_DETACH) {
                    Ok(()) => log::warn!(
                        "unmount guard: cusedev is gone; lazily unmounted its mount at {path}"
                    ),
                    Err(err) => log::error!("unmount guard: cannot unmount {path}: {err}"),
                }
            }
        }
    }
}

/// The id of the mount `root` is on, from `/proc/self/fdinfo` (which asks the kernel, not the
/// FUSE server: a statx could wait on a server that does not answer).
fn mount_id_of(root: &OwnedFd) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", root.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("mnt_id:"))
        .and_then(|id| id.trim().parse().ok())
}

/// Leaves cusedev's session, blocks every signal, moves to `/` and closes every descriptor
/// above stderr. Each step is best effort: a
/// guard that could not do one still guards.
fn detach_from_cusedev() {
    if let Err(err) = nix::unistd::setsid() {
        log::debug!("unmount guard: setsid: {err}");
    }
    // SIGKILL and SIGSTOP cannot be blocked; nothing else ends the guard before its time.
    if let Err(err) = SigSet::all().thread_block() {
        log::warn!("unmount guard: cannot block signals: {err}");
    }
    if let Err(err) = std::env::set_current_dir("/") {
        log::warn!("unmount guard: cannot move to /: {err}");
    }
    // SAFETY: this runs first thing in the guard's main, before anything in this process has
    // opened a descriptor: those at 3 and above were inherited through exec and nothing here
    // owns them, so closing them cannot invalidate an owned fd.
    if unsafe { libc::close_range(3, libc::c_uint::MAX, 0) } != 0 {
        log::warn!(
            "unmount guard: cannot close inherited descriptors: {}",
            io::Error::last_os_error()
        );
    }
}
