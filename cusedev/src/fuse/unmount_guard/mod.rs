//! The unmount guard: a small process that takes cusedev's FUSE mounts away when cusedev dies
//! without doing it itself (SIGKILL, the OOM killer, a crash).
//!
//! Without it a killed cusedev leaves each mount behind with no server: every stat(2) or open(2)
//! there fails with ENOTCONN ("Transport endpoint is not connected") until someone unmounts it,
//! and until then no real device node could show through either. The next cusedev peels such
//! mounts off ([`super::mount_point`]), but nothing guarantees there is a next one.
//!
//! How (libfuse's `auto_unmount` in fusermount3 works the same way; its facts are used here,
//! not its code):
//!
//! - cusedev starts `cusedev unmount-guard` ([`SUBCOMMAND`], hidden) at start-up, by exec of
//!   `/proc/self/exe`: a fresh process, so it holds none of cusedev's threads and no `/dev/fuse`
//!   descriptor (a guard holding one would keep the dead connection alive). It inherits
//!   cusedev's mount namespace, which is the one the mounts are in (the tests' private
//!   namespaces included: the guard is started from inside them), and its stderr, so its lines
//!   land in cusedev's log.
//! - Each mount cusedev makes is handed to the guard at once as an `O_PATH` descriptor of its
//!   root over a `SOCK_SEQPACKET` socketpair ([`wire`]); before cusedev unmounts one itself,
//!   it says `forget`.
//! - When the socket reads end-of-file, the last copy of cusedev's end is closed: cusedev is
//!   gone, however it died. The guard then lazily unmounts (MNT_DETACH) every mount it still
//!   holds that is still mounted and has nothing mounted on it ([`mount_table`]), through
//!   `/proc/self/fd/N`, and exits ([`guard`]). A lazy unmount because the daemon may still have
//!   a file open there; its calls fail (ENOTCONN) until it closes it.
//!
//! Why a descriptor and not the path plus an id: on Linux 6.1 both a mount's id
//! (`mnt_alloc_id`, fs/namespace.c) and a FUSE superblock's anonymous device number
//! (`get_anon_bdev`, fs/super.c) come from an IDA that hands out the lowest free number, so a
//! newer cusedev's mount on the same path may well get the very numbers of the dead one. An
//! open descriptor names one mount and, being held, keeps its numbers from being reused: the
//! guard can never take away a newer cusedev's mount.
//!
//! Why a socket and not `prctl(PR_SET_PDEATHSIG)`: the death signal fires when the *thread*
//! that forked the guard exits, not the process, and it needs the guard to be our child; the
//! socket's end-of-file is exactly "every holder of cusedev's end is gone", for any death.
//!
//! What the guard does not cover: a guard killed itself (SIGKILL; every other signal is
//! blocked) guards nothing, cusedev logs so at its next mount, and the next cusedev still
//! peels what is left; a whole service killed at once (systemd's final SIGKILL to the cgroup)
//! takes the guard too. `cusedev serve --no-unmount-guard` does without it.
//!
//! Read next: [`link`] (cusedev's side), then [`guard`].

pub mod guard;
pub mod link;
pub mod mount_table;
pub mod wire;

pub use guard::run;
pub use link::{Guarded, UnmountGuard};

/// The hidden `cusedev` subcommand that runs the guard.
pub const SUBCOMMAND: &str = "unmount-guard";
