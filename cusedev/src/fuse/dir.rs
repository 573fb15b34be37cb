//! The FUSE personality of a directory whose entries are devices, like `/dev/vmbus/` (a
//! top-level device such as `/dev/lguest` is a mount of its own: [`super::file`]).
//!
//! This is what a mount of `/dev/fuse` shows: a root directory (node 1, 0755 root:root) and
//! one regular file per device, with the device's mode (0600 root:root for a misc device).
//! Nothing is cached by the kernel (entry and attribute timeouts are 0), so a device added or
//! removed is seen by the very next path lookup, as with devtmpfs.
//!
//! Removing a device (`misc_deregister` in the kernel) only removes its name: a file that is
//! already open keeps working, and even fstat(2) on it still answers, because the node stays
//! here until the kernel forgets it (FORGET), which it does only after the last use.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;

use super::abi::{
    parse, parse_name, push_dirent, Attr, BatchForgetIn, EntryOut, ForgetIn, ForgetOne, Opcode,
    OpenOut, ReadIn, DT_DIR, DT_REG, ROOT_ID,
};
use super::attr::{attr_reply, device_attr, malformed, setattr_reply, statfs_reply, timed_attr};
use super::init::fuse_mount_init;
use super::name::check_leaf;
use super::session::{Reply, Request, RequestHandler};
use crate::device::Device;

/// One device in the directory.
struct Node {
    leaf: String,
    device: Arc<dyn Device>,
    attr: Attr,
    /// LOOKUPs the kernel has not yet FORGOTten; the node lives while this is > 0 or it has
    /// a name.
    lookups: u64,
    linked: bool,
}

struct State {
    by_name: BTreeMap<String, u64>,
    nodes: HashMap<u64, Node>,
    next_ino: u64,
}

/// A directory of devices, served over one FUSE mount.
pub struct DeviceDir {
    path: PathBuf,
    root_attr: Attr,
    state: Mutex<State>,
}

impl DeviceDir {
    /// An empty directory; `path` is where it is mounted, for log lines.
    pub fn new(path: &Path) -> DeviceDir {
        DeviceDir {
            path: path.to_owned(),
            root_attr: timed_attr(ROOT_ID, libc::S_IFDIR | 0o755, 2),
            state: Mutex::new(State {
                by_name: BTreeMap::new(),
                nodes: HashMap::new(),
                next_ino: ROOT_ID + 1,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the directory is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds `device` as `leaf`, with a fresh inode number (never reused, so the kernel cannot
    /// mistake a re-added device for the old one). EEXIST if the name is taken, EINVAL if it
    /// is not a valid entry name.
    pub fn add(&self, leaf: &str, device: Arc<dyn Device>) -> Result<u64, Errno> {
        check_leaf(leaf).map_err(|_| Errno::EINVAL)?;
        let mut state = self.lock();
        if state.by_name.contains_key(leaf) {
            return Err(Errno::EEXIST);
        }
        let ino = state.next_ino;
        state.next_ino += 1;
        state.by_name.insert(leaf.to_owned(), ino);
        state.nodes.insert(
            ino,
            Node {
                leaf: leaf.to_owned(),
                attr: device_attr(ino, device.as_ref()),
                device,
                lookups: 0,
                linked: true,
            },
        );
        Ok(ino)
    }

    /// Removes the name `leaf`: later lookups fail with ENOENT, open files keep working.
    /// Returns the device, or None if there was no such name.
    pub fn remove(&self, leaf: &str) -> Option<Arc<dyn Device>> {
        let mut state = self.lock();
        let ino = state.by_name.remove(leaf)?;
        let node = state.nodes.get_mut(&ino)?;
        node.linked = false;
        let device = node.device.clone();
        if node.lookups == 0 {
            state.nodes.remove(&ino);
        }
        Some(device)
    }

    /// The names in the directory, in order.
    pub fn names(&self) -> Vec<String> {
        self.lock().by_name.keys().cloned().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().by_name.is_empty()
    }

    fn attr_of(&self, nodeid: u64) -> Result<Attr, Errno> {
        if nodeid == ROOT_ID {
            return Ok(self.root_attr);
        }
        self.lock()
            .nodes
            .get(&nodeid)
            .map(|node| node.attr)
            .ok_or(Errno::ENOENT)
    }

    fn lookup(&self, req: &Request<'_>) -> Reply {
        let name = match parse_name(req.body) {
            Ok(name) => name,
            Err(err) => return malformed(&self.path, req, err),
        };
        if req.header.nodeid != ROOT_ID {
            return Reply::Error(Errno::ENOTDIR);
        }
        let mut state = self.lock();
        let Some(&ino) = std::str::from_utf8(name)
            .ok()
            .and_then(|name| state.by_name.get(name))
        else {
            return Reply::Error(Errno::ENOENT);
        };
        let Some(node) = state.nodes.get_mut(&ino) else {
            return Reply::Error(Errno::ENOENT);
        };
        node.lookups += 1;
        // Timeouts 0: the kernel asks again at every path walk, so a removal shows at once.
        Reply::of(&EntryOut {
            nodeid: ino,
            generation: 0,
            entry_valid: 0,
            attr_valid: 0,
            entry_valid_nsec: 0,
            attr_valid_nsec: 0,
            attr: node.attr,
        })
    }

    fn forget(&self, nodeid: u64, nlookup: u64) {
        let mut state = self.lock();
        let Some(node) = state.nodes.get_mut(&nodeid) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(nlookup);
        if node.lookups == 0 && !node.linked {
            log::debug!(
                "{}: forgot removed device {}",
                self.path.display(),
                node.leaf
            );
            state.nodes.remove(&nodeid);
        }
    }

    fn batch_forget(&self, req: &Request<'_>) {
        let (batch, mut rest) = match parse::<BatchForgetIn>(req.body) {
            Ok(parsed) => parsed,
            Err(err) => {
                log::warn!("{}: BATCH_FORGET: {err}; ignored", self.path.display());
                return;
            }
        };
        for _ in 0..batch.count {
            match parse::<ForgetOne>(rest) {
                Ok((one, tail)) => {
                    self.forget(one.nodeid, one.nlookup);
                    rest = tail;
                }
                Err(err) => {
                    log::warn!(
                        "{}: BATCH_FORGET of {} entries: {err}; the rest is ignored",
                        self.path.display(),
                        batch.count
                    );
                    return;
                }
            }
        }
    }

    fn readdir(&self, req: &Request<'_>) -> Reply {
        let (read_in, _) = match parse::<ReadIn>(req.body) {
            Ok(parsed) => parsed,
            Err(err) => return malformed(&self.path, req, err),
        };
        if req.header.nodeid != ROOT_ID {
            return Reply::Error(Errno::ENOTDIR);
        }
        let mut entries: Vec<(u64, u32, Vec<u8>)> = vec![
            (ROOT_ID, DT_DIR, b".".to_vec()),
            (ROOT_ID, DT_DIR, b"..".to_vec()),
        ];
        {
            let state = self.lock();
            entries.extend(
                state
                    .by_name
                    .iter()
                    .map(|(name, &ino)| (ino, DT_REG, name.as_bytes().to_vec())),
            );
        }
        // The offset is the index of the next entry; names added or removed between two
        // READDIRs of one listing may be skipped or repeated, as POSIX allows.
        let limit = read_in.size as usize;
        let mut buf = Vec::new();
        let start = usize::try_from(read_in.offset).unwrap_or(usize::MAX);
        for (index, (ino, typ, name)) in entries.iter().enumerate().skip(start) {
            if !push_dirent(&mut buf, limit, *ino, index as u64 + 1, *typ, name) {
                break;
            }
        }
        Reply::Data(buf)
    }
}

impl RequestHandler for DeviceDir {
    fn init(&self, req: &Request<'_>, minor: u32) -> Reply {
        fuse_mount_init(&self.path, req, minor)
    }

    fn device_for_open(&self, nodeid: u64) -> Result<Arc<dyn Device>, Errno> {
        if nodeid == ROOT_ID {
            return Err(Errno::EISDIR);
        }
        let state = self.lock();
        match state.nodes.get(&nodeid) {
            Some(node) if node.linked => Ok(node.device.clone()),
            // Looked up just before its removal: what misc_open() says for a minor that is no
            // longer registered (drivers/char/misc.c).
            Some(_) => Err(Errno::ENODEV),
            None => Err(Errno::ENOENT),
        }
    }

    fn node_request(&self, req: &Request<'_>) -> Reply {
        match req.opcode {
            Opcode::LOOKUP => self.lookup(req),
            Opcode::FORGET => {
                match parse::<ForgetIn>(req.body) {
                    Ok((forget, _)) => self.forget(req.header.nodeid, forget.nlookup),
                    Err(err) => log::warn!("{}: FORGET: {err}; ignored", self.path.display()),
                }
                Reply::None
            }
            Opcode::BATCH_FORGET => {
                self.batch_forget(req);
                Reply::None
            }
            Opcode::GETATTR => attr_reply(self.attr_of(req.header.nodeid)),
            Opcode::SETATTR => setattr_reply(&self.path, req, |nodeid| self.attr_of(nodeid)),
            Opcode::OPENDIR => {
                if req.header.nodeid != ROOT_ID {
                    return Reply::Error(Errno::ENOTDIR);
                }
                Reply::of(&OpenOut::default())
            }
            Opcode::READDIR => self.readdir(req),
            Opcode::RELEASEDIR => Reply::Data(Vec::new()),
            Opcode::STATFS => statfs_reply(self.lock().nodes.len() as u64 + 1),
            // The directory's contents are the registered devices and nothing else, as in
            // /dev where only the kernel creates device nodes... except that root may mknod
            // or unlink there; here that is refused.
            Opcode::MKNOD
            | Opcode::MKDIR
            | Opcode::UNLINK
            | Opcode::RMDIR
            | Opcode::RENAME
            | Opcode::RENAME2
            | Opcode::LINK
            | Opcode::SYMLINK
            | Opcode::CREATE
            | Opcode::TMPFILE => Reply::Error(Errno::EPERM),
            _ => Reply::Error(Errno::ENOSYS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuse::abi::{parse, DirentHeader};
    use crate::fuse::testing::{node_request, Null};
    use zerocopy::IntoBytes;

    fn request(dir: &DeviceDir, opcode: Opcode, nodeid: u64, body: &[u8]) -> Reply {
        node_request(dir, opcode, nodeid, body)
    }

    fn lookup(dir: &DeviceDir, name: &str) -> Result<EntryOut, Errno> {
        let body = format!("{name}\0");
        match request(dir, Opcode::LOOKUP, ROOT_ID, body.as_bytes()) {
            Reply::Data(data) => Ok(parse::<EntryOut>(&data).unwrap().0),
            Reply::Error(errno) => Err(errno),
            Reply::None => panic!("LOOKUP must be answered"),
        }
    }

    #[test]
    fn lookup_finds_a_regular_file_with_the_device_mode_and_no_caching() {
        let dir = DeviceDir::new(Path::new("/dev/test"));
        dir.add("null", Null::device()).unwrap();
        let entry = lookup(&dir, "null").unwrap();
        assert_eq!(entry.attr.mode, libc::S_IFREG | 0o600);
        assert_eq!((entry.attr.uid, entry.attr.gid, entry.attr.size), (0, 0, 0));
        assert_eq!((entry.entry_valid, entry.attr_valid), (0, 0));
        assert_eq!(lookup(&dir, "zero").unwrap_err(), Errno::ENOENT);
    }

    #[test]
    fn removed_name_is_enoent_but_the_node_answers_until_forgotten() {
        let dir = DeviceDir::new(Path::new("/dev/test"));
        dir.add("null", Null::device()).unwrap();
        let ino = lookup(&dir, "null").unwrap().nodeid;
        assert!(dir.remove("null").is_some());
        assert_eq!(lookup(&dir, "null").unwrap_err(), Errno::ENOENT);
        assert!(matches!(
            request(&dir, Opcode::GETATTR, ino, &[0; 16]),
            Reply::Data(_)
        ));
        assert_eq!(dir.device_for_open(ino).err(), Some(Errno::ENODEV));
        let forget = ForgetIn { nlookup: 1 };
        assert!(matches!(
            request(&dir, Opcode::FORGET, ino, forget.as_bytes()),
            Reply::None
        ));
        assert!(matches!(
            request(&dir, Opcode::GETATTR, ino, &[0; 16]),
            Reply::Error(Errno::ENOENT)
        ));
    }

    #[test]
    fn readded_device_gets_a_fresh_inode() {
        let dir = DeviceDir::new(Path::new("/dev/test"));
        let first = dir.add("null", Null::device()).unwrap();
        assert_eq!(dir.add("null", Null::device()), Err(Errno::EEXIST));
        dir.remove("null");
        let second = dir.add("null", Null::device()).unwrap();
        assert_ne!(first, second);
    }

    #[test]
    fn readdir_lists_dot_dotdot_and_devices_and_resumes_at_offset() {
        let dir = DeviceDir::new(Path::new("/dev/test"));
        dir.add("b", Null::device()).unwrap();
        dir.add("a", Null::device()).unwrap();
        let names = |offset: u64, size: u32| -> Vec<(String, u64)> {
            let read_in = ReadIn {
                offset,
                size,
                ..ReadIn::default()
            };
            let Reply::Data(mut data) = request(&dir, Opcode::READDIR, ROOT_ID, read_in.as_bytes())
            else {
                panic!("READDIR failed")
            };
            let mut out = Vec::new();
            while !data.is_empty() {
                let (header, rest) = parse::<DirentHeader>(&data).unwrap();
                let name = String::from_utf8(rest[..header.namelen as usize].to_vec()).unwrap();
                out.push((name, header.off));
                data.drain(..crate::fuse::abi::dirent_size(header.namelen as usize));
            }
            out
        };
        let all = names(0, 4096);
        let listed: Vec<&str> = all.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(listed, [".", "..", "a", "b"]);
        assert_eq!(names(3, 4096), vec![("b".to_owned(), 4)]);
        assert_eq!(names(0, 40).len(), 1);
        assert!(names(9, 4096).is_empty());
    }

    #[test]
    fn malformed_node_requests_are_einval_not_panics() {
        let dir = DeviceDir::new(Path::new("/dev/test"));
        for opcode in [Opcode::LOOKUP, Opcode::READDIR, Opcode::SETATTR] {
            assert!(
                matches!(
                    request(&dir, opcode, ROOT_ID, b"x"),
                    Reply::Error(Errno::EINVAL)
                ),
                "{opcode}"
            );
        }
        assert!(matches!(request(&dir, Opcode::FORGET, 5, b""), Reply::None));
        let truncated_batch = [2u8, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3];
        assert!(matches!(
            request(&dir, Opcode::BATCH_FORGET, 0, &truncated_batch),
            Reply::None
        ));
    }
}
