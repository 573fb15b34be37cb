//! Where the guest is: a VM behind the vhost-user-vsock backend, or this very machine.
//!
//! It matters for VSS: `hv_vss_daemon` FIFREEZEs every writable block-device filesystem of
//! the machine it runs on, `/` included (kvp-vss.md §6). When cusedev runs on a bare machine
//! (the guest side of the bus is this kernel), a FREEZE freezes *this* machine, the shell
//! that typed the command included. KVP uses the same answer to list the guest's network
//! adapters (they are this machine's).
//!
//! The bus does not carry the guest's identity (no boot id or machine id travels in HELLO), so
//! we look at who connected the channel stream: SO_PEERCRED on the Unix socket
//! ([`crate::bus::PeerCred`], taken when the stream attached). For a guest in a QEMU VM that is
//! the vhost-user-vsock backend (`vhost --host unix:PATH`), which relays the guest's
//! virtio-vsock streams; for a guest on this kernel it is cusedev itself.
//!
//! The rule, failing safe:
//!
//! * the peer's program is the vhost backend (`/proc/PID/exe`'s file name is `vhost`,
//!   `vhost-vsock` or `vhost-user-vsock`; `/proc/PID/comm` when exe cannot be read) ⇒ a VM:
//!   [`GuestPlace::VirtualMachine`];
//! * anything else ⇒ [`GuestPlace::ThisMachine`]: cusedev (the normal bare-machine case), any
//!   other program, a peer pid of 0 (a PID namespace we cannot see: a container on this same
//!   kernel), a process that is gone, or no credentials at all. Only a positive identification
//!   of the VM backend counts as "elsewhere".

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bus::PeerCred;

/// Program names of the vhost-user-vsock backend (the `vhost` binary of this workspace, its
/// package name, and the usual upstream name).
pub const VHOST_PROGRAMS: &[&str] = &["vhost", "vhost-vsock", "vhost-user-vsock"];

/// The program name cusedev runs as.
pub const CUSEDEV_PROGRAM: &str = "cusedev";

/// Where the guest side of a channel is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "place", rename_all = "snake_case")]
pub enum GuestPlace {
    /// Behind the vhost-user-vsock backend: a VM with a kernel of its own.
    VirtualMachine {
        /// The backend's pid.
        pid: i32,
        /// Its program name.
        program: String,
    },
    /// On this machine's kernel, or we cannot rule that out.
    ThisMachine {
        /// Why, in words ("the guest side of the bus is cusedev (pid 812) on this kernel").
        reason: String,
    },
}

impl GuestPlace {
    /// One line for logs and messages.
    pub fn describe(&self) -> String {
        match self {
            GuestPlace::VirtualMachine { pid, program } => format!(
                "the guest side of the bus is the vhost-user-vsock backend ({program}, pid \
                 {pid}): the guest is a VM"
            ),
            GuestPlace::ThisMachine { reason } => reason.clone(),
        }
    }

    /// The guest is (or may be) this machine.
    pub fn is_this_machine(&self) -> bool {
        matches!(self, GuestPlace::ThisMachine { .. })
    }
}

/// Where `/proc` is (tests point it at a fake tree).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcRoot(pub PathBuf);

impl Default for ProcRoot {
    fn default() -> Self {
        ProcRoot(PathBuf::from("/proc"))
    }
}

/// Applies the rule of the module docs to the peer of a channel stream.
pub fn locate(peer: Option<&PeerCred>, proc_root: &ProcRoot) -> GuestPlace {
    let this = |reason: String| GuestPlace::ThisMachine { reason };
    let Some(peer) = peer else {
        return this(
            "the bus cannot tell who is on the guest side of the channel (no peer credentials): \
             counted as this machine"
                .to_owned(),
        );
    };
    if peer.pid <= 0 {
        return this(
            "the guest side of the bus is a process in a PID namespace this host cannot see (a \
             container on this kernel?): counted as this machine"
                .to_owned(),
        );
    }
    let pid = peer.pid;
    let Some(program) = program_of(pid, &proc_root.0) else {
        return this(format!(
            "the process that connected the channel (pid {pid}) is gone or cannot be looked at: \
             counted as this machine"
        ));
    };
    classify(pid, &program)
}

/// The decision for a visible peer `pid` running `program`.
pub fn classify(pid: i32, program: &str) -> GuestPlace {
    if VHOST_PROGRAMS.contains(&program) {
        return GuestPlace::VirtualMachine {
            pid,
            program: program.to_owned(),
        };
    }
    let reason = if program == CUSEDEV_PROGRAM {
        format!(
            "the guest side of the bus is cusedev (pid {pid}) on this machine's kernel: the \
             guest is this machine"
        )
    } else {
        format!(
            "the guest side of the bus is pid {pid} ({program}), not the vhost-user-vsock \
             backend ({}): counted as this machine",
            VHOST_PROGRAMS[0]
        )
    };
    GuestPlace::ThisMachine { reason }
}

/// The file name of `/proc/PID/exe` (without a " (deleted)" suffix), or `/proc/PID/comm` when
/// exe cannot be read (another user's process without CAP_SYS_PTRACE).
pub fn program_of(pid: i32, proc_root: &Path) -> Option<String> {
    let dir = proc_root.join(pid.to_string());
    if let Ok(exe) = std::fs::read_link(dir.join("exe")) {
        let name = exe.file_name()?.to_string_lossy().into_owned();
        let name = name.strip_suffix(" (deleted)").unwrap_or(&name).to_owned();
        return Some(name);
    }
    let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
    let comm = comm.trim_end_matches('\n');
    (!comm.is_empty()).then(|| comm.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;

    fn fake_proc(dir: &TempDir, pid: i32, exe: Option<&str>, comm: Option<&str>) -> ProcRoot {
        let p = dir.path().join(pid.to_string());
        std::fs::create_dir_all(&p).unwrap();
        if let Some(exe) = exe {
            std::os::unix::fs::symlink(exe, p.join("exe")).unwrap();
        }
        if let Some(comm) = comm {
            std::fs::write(p.join("comm"), format!("{comm}\n")).unwrap();
        }
        ProcRoot(dir.path().to_owned())
    }

    fn cred(pid: i32) -> PeerCred {
        PeerCred {
            pid,
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn the_vhost_backend_means_a_vm() {
        for exe in [
            "/usr/local/bin/vhost",
            "/work/target/debug/vhost-vsock",
            "/usr/libexec/vhost-user-vsock (deleted)",
        ] {
            let dir = TempDir::new("peer-vhost");
            let root = fake_proc(&dir, 4242, Some(exe), None);
            let place = locate(Some(&cred(4242)), &root);
            assert!(
                matches!(&place, GuestPlace::VirtualMachine { pid: 4242, .. }),
                "{exe}: {place:?}"
            );
            assert!(!place.is_this_machine());
            assert!(place.describe().contains("the guest is a VM"), "{place:?}");
        }
    }

    #[test]
    fn cusedev_is_this_machine() {
        let dir = TempDir::new("peer-cusedev");
        let root = fake_proc(&dir, 812, Some("/work/target/debug/cusedev"), None);
        let place = locate(Some(&cred(812)), &root);
        assert!(place.is_this_machine());
        assert!(
            place.describe().contains("cusedev (pid 812)"),
            "{}",
            place.describe()
        );
    }

    #[test]
    fn comm_is_used_when_exe_is_unreadable() {
        let dir = TempDir::new("peer-comm");
        let root = fake_proc(&dir, 77, None, Some("vhost"));
        assert!(!locate(Some(&cred(77)), &root).is_this_machine());
        let dir = TempDir::new("peer-comm2");
        let root = fake_proc(&dir, 78, None, Some("cusedev"));
        assert!(locate(Some(&cred(78)), &root).is_this_machine());
    }

    #[test]
    fn anything_unknown_counts_as_this_machine() {
        let dir = TempDir::new("peer-unknown");
        let root = fake_proc(&dir, 5, Some("/usr/bin/socat"), None);
        let place = locate(Some(&cred(5)), &root);
        assert!(
            place.describe().contains("pid 5 (socat), not the vhost"),
            "{place:?}"
        );
        // Gone, invisible, no credentials at all.
        for (peer, needle) in [
            (Some(cred(6)), "is gone"),
            (Some(cred(0)), "PID namespace"),
            (None, "no peer credentials"),
        ] {
            let place = locate(peer.as_ref(), &root);
            assert!(place.is_this_machine(), "{peer:?}");
            assert!(place.describe().contains(needle), "{place:?}");
        }
    }

    #[test]
    fn a_socket_pair_in_this_test_is_this_machine() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = PeerCred::of(&a).expect("SO_PEERCRED on a socket pair");
        assert_eq!(peer.pid, std::process::id() as i32);
        let place = locate(Some(&peer), &ProcRoot::default());
        assert!(place.is_this_machine(), "{place:?}");
    }
}
