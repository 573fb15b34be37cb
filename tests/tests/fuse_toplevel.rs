//! Top-level devices (`/dev/lguest`, `/dev/azure_xs_fastpath`) on the FUSE frontend: a FUSE
//! mount whose root is a regular file, mounted on a regular file the frontend makes.
//!
//! Each test enters a private mount namespace, serves a toy device under a temporary device
//! root with `FuseFrontend`, and drives it with real syscalls: stat, open, read, write, pread,
//! pwrite, ioctl, poll, close; then removal, stale leftovers of a killed server, and paths that
//! hold something that is not ours. The tests need root and /dev/fuse; without them they fail.
//!
//! The toy device reports every call it gets on a channel, so the tests assert what reached it
//! (offsets included) and wait for asynchronous calls such as RELEASE without sleeping.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use cusedev::device::{
    poll_bits, Caller, Device, Errno, Handle, IoctlAnswer, IoctlCall, IoctlReply, PollWaker,
    ReadReply, WriteReply,
};
use cusedev::fuse::{FrontendError, FuseFrontend};
use cusedev_tests::enter_private_mount_namespace;
use cusedev_tests::syscalls::{errno, ioctl_rw, mounts_at};
use nix::poll::{PollFd, PollFlags, PollTimeout};

/// Upper bound for anything a test waits for; reaching it is a failure, not a synchronisation.
const LIMIT: Duration = Duration::from_secs(30);

/// The toy's node, directly under the device root.
const NAME: &str = "toy_top";

/// `_IOWR('T', 1, [u8; 8])`: the toy answers with the input reversed and result 9.
const TOY_REVERSE: u32 = nix::request_code_readwrite!(b'T', 1, 8) as u32;

// ---------------------------------------------------------------------------------------------
// The toy device

/// One call as the device saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Open,
    Read { count: u32, offset: u64 },
    Write { data: Vec<u8>, offset: u64 },
    Ioctl { cmd: u32, input: Vec<u8> },
    Poll,
    Release,
}

/// Answers every call at once and reports it. A read returns the offset it was asked for
/// (little-endian, cut to the count), so the caller sees the device's answer too.
struct Toy {
    calls: Sender<Call>,
}

impl Toy {
    fn new() -> (Arc<Toy>, Receiver<Call>) {
        let (calls, seen) = mpsc::channel();
        (Arc::new(Toy { calls }), seen)
    }

    fn saw(&self, call: Call) {
        let _ = self.calls.send(call);
    }
}

impl Device for Toy {
    fn name(&self) -> &str {
        NAME
    }

    fn open(&self, _caller: &Caller, _flags: i32) -> Result<Handle, Errno> {
        self.saw(Call::Open);
        Ok(1)
    }

    fn read(&self, _handle: Handle, count: u32, offset: u64, _caller: &Caller, reply: ReadReply) {
        self.saw(Call::Read { count, offset });
        let mut answer = offset.to_le_bytes().to_vec();
        answer.truncate(count as usize);
        reply.ok(answer);
    }

    fn write(
        &self,
        _handle: Handle,
        data: &[u8],
        offset: u64,
        _caller: &Caller,
        reply: WriteReply,
    ) {
        self.saw(Call::Write {
            data: data.to_vec(),
            offset,
        });
        reply.ok(data.len() as u32);
    }

    fn ioctl(&self, _handle: Handle, call: &IoctlCall<'_>, _caller: &Caller, reply: IoctlAnswer) {
        self.saw(Call::Ioctl {
            cmd: call.cmd,
            input: call.input.to_vec(),
        });
        reply.ok(IoctlReply {
            result: 9,
            out: call.input.iter().rev().copied().collect(),
        }
        .into());
    }

    fn poll(&self, _handle: Handle, _waker: Option<PollWaker>) -> u32 {
        self.saw(Call::Poll);
        poll_bits::POLLIN | poll_bits::POLLRDNORM | poll_bits::POLLOUT | poll_bits::POLLWRNORM
    }

    fn release(&self, _handle: Handle) {
        self.saw(Call::Release);
    }
}

// ---------------------------------------------------------------------------------------------
// Fixture

/// A temporary device root in a private mount namespace, with a frontend over it.
struct Fixture {
    frontend: FuseFrontend,
    dev_root: PathBuf,
}

impl Fixture {
    fn new(test: &str) -> Fixture {
        let _ = env_logger::builder().is_test(true).try_init();
        enter_private_mount_namespace().expect("cannot enter a private mount namespace");
        let dev_root = std::env::temp_dir().join(format!(
            "cusedev-fuse-toplevel-{}-{test}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dev_root);
        fs::create_dir_all(&dev_root).unwrap();
        Fixture {
            frontend: FuseFrontend::new(&dev_root),
            dev_root,
        }
    }

    /// The fixture with a toy served at [`NAME`].
    fn serving(test: &str) -> (Fixture, Receiver<Call>) {
        let fx = Fixture::new(test);
        let seen = fx
            .add_toy()
            .expect("cannot mount the toy (/dev/fuse there, root?)");
        (fx, seen)
    }

    fn add_toy(&self) -> Result<Receiver<Call>, FrontendError> {
        let (toy, seen) = Toy::new();
        self.frontend.add_device(toy)?;
        Ok(seen)
    }

    fn path(&self) -> PathBuf {
        self.dev_root.join(NAME)
    }

    /// Opens the node O_RDWR and checks that the device saw the open.
    fn open(&self, seen: &Receiver<Call>) -> File {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path())
            .unwrap();
        assert_eq!(next(seen), Call::Open);
        file
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.frontend.shutdown();
        let _ = fs::remove_dir_all(&self.dev_root);
    }
}

/// The next call the device saw.
fn next(seen: &Receiver<Call>) -> Call {
    seen.recv_timeout(LIMIT)
        .expect("the device saw no call within the limit")
}

/// pwrite(2)s `data` at `offset`; returns the offset the device saw the same data at.
fn pwrite(file: &File, seen: &Receiver<Call>, data: &[u8], offset: u64) -> u64 {
    assert_eq!(file.write_at(data, offset).unwrap(), data.len());
    match next(seen) {
        Call::Write { data: got, offset } if got == data => offset,
        other => panic!("pwrite of {data:?} reached the device as {other:?}"),
    }
}

/// pread(2)s 16 bytes at `offset`; returns the offset the device saw, after checking that the
/// caller got the device's answer (that offset's bytes).
fn pread(file: &File, seen: &Receiver<Call>, offset: u64) -> u64 {
    let mut buf = [0u8; 16];
    let n = file.read_at(&mut buf, offset).unwrap();
    let Call::Read { count: 16, offset } = next(seen) else {
        panic!("pread reached the device as something else");
    };
    assert_eq!(buf[..n], offset.to_le_bytes());
    offset
}

/// Mounts a FUSE file at `path` (which must be a regular file) and closes the connection
/// without ever serving it: what a cusedev killed with SIGKILL leaves behind.
fn leave_dead_file_mount(path: &Path) {
    let fuse = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .unwrap();
    nix::mount::mount(
        Some("cusedev"),
        path,
        Some("fuse.cusedev"),
        nix::mount::MsFlags::empty(),
        Some(
            format!(
                "fd={},rootmode=100600,user_id=0,group_id=0",
                fuse.as_raw_fd()
            )
            .as_str(),
        ),
    )
    .unwrap();
    drop(fuse);
    assert_eq!(errno(fs::metadata(path).unwrap_err()), Errno::ENOTCONN);
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn top_level_node_is_a_0600_root_owned_regular_file_mounted_on_its_own() {
    let (fx, _seen) = Fixture::serving("stat");
    let meta = fs::symlink_metadata(fx.path()).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!(
        (meta.uid(), meta.gid(), meta.len(), meta.nlink()),
        (0, 0, 0, 1)
    );
    assert_eq!(mounts_at(&fx.path()), 1);
    assert_eq!(fx.frontend.mount_points(), [fx.path()]);
    // The root stays what the device says: chmod is refused, as for a file in a directory.
    let err = fs::set_permissions(fx.path(), fs::Permissions::from_mode(0o666)).unwrap_err();
    assert_eq!(errno(err), Errno::EPERM);
}

#[test]
fn open_read_write_ioctl_poll_and_close_reach_the_device() {
    let (fx, seen) = Fixture::serving("calls");
    let file = fx.open(&seen);

    assert_eq!((&file).write(b"abc").unwrap(), 3);
    assert_eq!(
        next(&seen),
        Call::Write {
            data: b"abc".to_vec(),
            offset: 0
        }
    );
    // read(2) without an offset reads at the file position, which the kernel advanced by the
    // three bytes written: a FUSE regular file keeps one (fs/fuse/file.c, fuse_direct_io).
    let mut buf = [0u8; 8];
    assert_eq!((&file).read(&mut buf).unwrap(), 8);
    assert_eq!(
        next(&seen),
        Call::Read {
            count: 8,
            offset: 3
        }
    );
    assert_eq!(buf, 3u64.to_le_bytes());

    let mut arg = *b"12345678";
    assert_eq!(ioctl_rw(&file, TOY_REVERSE, &mut arg), Ok(9));
    assert_eq!(&arg, b"87654321");
    assert_eq!(
        next(&seen),
        Call::Ioctl {
            cmd: TOY_REVERSE,
            input: b"12345678".to_vec()
        }
    );

    let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
    assert_eq!(nix::poll::poll(&mut fds, PollTimeout::ZERO).unwrap(), 1);
    assert!(fds[0].revents().unwrap().contains(PollFlags::POLLIN));
    assert_eq!(next(&seen), Call::Poll);

    drop(file);
    assert_eq!(next(&seen), Call::Release);
}

#[test]
fn pread_and_pwrite_offsets_reach_the_device_unchanged() {
    let (fx, seen) = Fixture::serving("offsets");
    let file = fx.open(&seen);
    // Past the size of 0 the kernel reports: a synchronous direct-I/O read does not look.
    assert_eq!(pread(&file, &seen, 12345), 12345);
    assert_eq!(pwrite(&file, &seen, b"cpu", 7), 7);

    const FAR: u64 = 1 << 40;
    assert_eq!(pwrite(&file, &seen, b"far", FAR), FAR);
    assert_eq!(pread(&file, &seen, FAR), FAR);
    // The write at 1<<40 grew the kernel's idea of the size until the next GETATTR; an offset
    // below it still goes to the device, not to a cache.
    assert_eq!(pread(&file, &seen, 12345), 12345);
}

#[test]
fn offsets_up_to_the_end_of_loff_t_reach_the_device_and_an_overflow_is_einval() {
    let (fx, seen) = Fixture::serving("loff_t");
    let file = fx.open(&seen);
    let last = i64::MAX as u64 - 3;
    assert_eq!(pwrite(&file, &seen, b"end", last), last);
    // offset + count past LLONG_MAX: rw_verify_area() refuses it (fs/read_write.c) before
    // the file system sees it, as it would for a char device.
    let err = file.write_at(b"over", last).unwrap_err();
    assert_eq!(errno(err), Errno::EINVAL);
    drop(file);
    assert_eq!(next(&seen), Call::Release);
}

/// Not a choice of ours but the kernel's, pinned here so a change shows: O_APPEND makes
/// `generic_write_checks()` put every write at the kernel's i_size, which the previous write
/// raised to its end (`fuse_write_update_attr()`), where a char device would see its f_pos.
#[test]
fn o_append_writes_land_at_the_kernels_size_not_at_the_callers_offset() {
    let (fx, seen) = Fixture::serving("o_append");
    let file = OpenOptions::new().append(true).open(fx.path()).unwrap();
    assert_eq!(next(&seen), Call::Open);
    assert_eq!(pwrite(&file, &seen, b"one", 100), 0);
    assert_eq!(pwrite(&file, &seen, b"two", 100), 3);
}

#[test]
fn removing_the_device_unmounts_and_deletes_the_file_and_adding_mounts_again() {
    let (fx, seen) = Fixture::serving("remove");
    drop(fx.open(&seen));
    assert_eq!(next(&seen), Call::Release);

    fx.frontend.remove_device(NAME).unwrap();
    assert_eq!(
        errno(fs::symlink_metadata(fx.path()).unwrap_err()),
        Errno::ENOENT
    );
    assert_eq!(mounts_at(&fx.path()), 0);
    assert!(fx.frontend.mount_points().is_empty());
    assert!(matches!(
        fx.frontend.remove_device(NAME),
        Err(FrontendError::NotRegistered { .. })
    ));

    let again = fx.add_toy().unwrap();
    assert_eq!(mounts_at(&fx.path()), 1);
    let file = fx.open(&again);
    assert_eq!(pwrite(&file, &again, b"back", 0), 0);
}

#[test]
fn a_file_open_at_removal_keeps_working_until_it_is_closed() {
    let (fx, seen) = Fixture::serving("open_at_removal");
    let file = fx.open(&seen);
    fx.frontend.remove_device(NAME).unwrap();
    assert!(!fx.path().exists());

    // misc_deregister() with a file open: the file still reaches the driver.
    assert_eq!(pwrite(&file, &seen, b"late", 5), 5);
    // A new device at the same name mounts beside the detached one.
    let again = fx.add_toy().unwrap();
    drop(fx.open(&again));
    drop(file);
    assert_eq!(next(&seen), Call::Release);
}

#[test]
fn dead_mount_left_by_a_killed_server_is_cleaned_up_and_served() {
    let fx = Fixture::new("stale_mount");
    fs::write(fx.path(), b"").unwrap();
    leave_dead_file_mount(&fx.path());

    let seen = fx.add_toy().unwrap();
    // The dead mount is gone, not hidden under ours.
    assert_eq!(mounts_at(&fx.path()), 1);
    let file = fx.open(&seen);
    assert_eq!(pwrite(&file, &seen, b"fresh", 7), 7);
}

#[test]
fn empty_file_left_behind_is_replaced_with_one_of_the_device_mode() {
    let fx = Fixture::new("leftover_file");
    fs::write(fx.path(), b"").unwrap();
    fs::set_permissions(fx.path(), fs::Permissions::from_mode(0o644)).unwrap();

    let seen = fx.add_toy().unwrap();
    assert_eq!(mounts_at(&fx.path()), 1);
    drop(fx.open(&seen));
    fx.frontend.remove_device(NAME).unwrap();
    assert!(!fx.path().exists());
}

#[test]
fn character_device_at_the_path_is_refused_and_left_alone() {
    let fx = Fixture::new("char_device");
    let rdev = nix::sys::stat::makedev(1, 3);
    nix::sys::stat::mknod(
        &fx.path(),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        rdev,
    )
    .unwrap();

    let err = fx.add_toy().unwrap_err();
    assert!(
        matches!(
            err,
            FrontendError::NotOurs {
                what: "a character device",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("it is a character device"),
        "{err}"
    );
    let meta = fs::symlink_metadata(fx.path()).unwrap();
    assert!(meta.file_type().is_char_device());
    assert_eq!(meta.rdev(), rdev);
    assert_eq!(mounts_at(&fx.path()), 0);
    assert!(fx.frontend.mount_points().is_empty());
}

#[test]
fn file_with_contents_at_the_path_is_refused_and_left_alone() {
    let fx = Fixture::new("file_with_contents");
    fs::write(fx.path(), b"somebody's data").unwrap();
    let err = fx.add_toy().unwrap_err();
    assert!(matches!(err, FrontendError::NotOurs { .. }), "{err}");
    assert_eq!(fs::read(fx.path()).unwrap(), b"somebody's data");
    assert_eq!(mounts_at(&fx.path()), 0);
}

#[test]
fn node_served_by_another_frontend_is_refused() {
    let (fx, seen) = Fixture::serving("served_twice");
    let other = FuseFrontend::new(&fx.dev_root);
    let (toy, _other_seen) = Toy::new();
    let err = other.add_device(toy).unwrap_err();
    assert!(matches!(err, FrontendError::AlreadyMounted { .. }), "{err}");
    // The first one still serves it.
    assert_eq!(mounts_at(&fx.path()), 1);
    drop(fx.open(&seen));
}
