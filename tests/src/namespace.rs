//! A private mount namespace per test, so tests can mount FUSE directories in parallel without
//! touching the host's mount table or each other.

use std::io;

use nix::mount::MsFlags;
use nix::sched::CloneFlags;

/// Moves the calling thread into a new mount namespace whose mounts do not propagate
/// anywhere.
///
/// `unshare(CLONE_NEWNS)` affects only the calling thread (it implies CLONE_FS, which the
/// kernel unshares for this thread alone, so it works in a multi-threaded test binary).
/// Threads and processes started from this thread afterwards inherit the namespace. Making
/// `/` recursively private stops our mounts from propagating to the host's namespace (where
/// `/` is usually shared). When the test's threads are gone, the namespace and every mount
/// in it go away with them: nothing stays mounted.
pub fn enter_private_mount_namespace() -> io::Result<()> {
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(|err| {
        io::Error::other(format!(
            "unshare(CLONE_NEWNS): {err} (the tests need root / CAP_SYS_ADMIN)"
        ))
    })?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|err| {
        io::Error::other(format!(
            "making / private in the new mount namespace: {err}"
        ))
    })
}
