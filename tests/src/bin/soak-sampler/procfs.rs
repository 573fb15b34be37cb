//! What a long-lived process of the soak holds right now, read from /proc: its resident memory,
//! its threads (and how many of them are the FUSE engine's readers), its descriptors (and how
//! many of them are /dev/fuse, one per FUSE session).

use std::fs;
use std::io;

/// The engine's reader threads' name (`cusedev/src/fuse/session.rs`, `Session::start_reader`):
/// a session starts them on demand and keeps them, up to `MAX_READERS` per session.
const READER: &str = "cusedev-fuse";

/// One process at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub rss_kib: u64,
    pub threads: u64,
    pub readers: u64,
    pub fds: u64,
    pub fuse_fds: u64,
}

impl Sample {
    /// Reads `pid`'s /proc entries; an error when the process is gone (or not ours to read).
    pub fn of(pid: u32) -> io::Result<Sample> {
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> io::Result<u64> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("/proc/{pid}/status has no {name}"),
                    )
                })
        };
        let rss_kib = field("VmRSS:")?;
        let threads = field("Threads:")?;

        let mut readers = 0;
        for task in fs::read_dir(format!("/proc/{pid}/task"))? {
            // A thread that ends between readdir and the read is simply not counted.
            let Ok(task) = task else { continue };
            if fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.trim() == READER) {
                readers += 1;
            }
        }

        let (mut fds, mut fuse_fds) = (0, 0);
        for fd in fs::read_dir(format!("/proc/{pid}/fd"))? {
            let Ok(fd) = fd else { continue };
            // An fd closed between readdir and readlink is not counted either.
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            fds += 1;
            if target.as_os_str() == "/dev/fuse" {
                fuse_fds += 1;
            }
        }
        Ok(Sample {
            rss_kib,
            threads,
            readers,
            fds,
            fuse_fds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_a_thread_and_stdio() {
        let s = Sample::of(std::process::id()).unwrap();
        assert!(s.rss_kib > 0);
        assert!(s.threads >= 1);
        assert!(s.fds >= 3, "{s:?}");
    }

    #[test]
    fn a_thread_named_like_the_engines_readers_is_a_reader() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name(READER.to_owned())
            .spawn(move || {
                ready_tx.send(()).unwrap();
                rx.recv().ok();
            })
            .unwrap();
        ready_rx.recv().unwrap();
        let s = Sample::of(std::process::id()).unwrap();
        assert_eq!(s.readers, 1, "{s:?}");
        assert!(s.threads >= 2, "{s:?}");
        tx.send(()).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn a_process_that_is_gone_is_an_error() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(Sample::of(pid).is_err());
    }
}
