//! Devices for preloaded processes: one CUSE session of the engine per device, on one end of
//! a socketpair, with [`super::kernel`] playing the kernel on the other end.
//!
//! Lifetime rules are CUSE's (see `cuse::frontend`): `add_device` makes the device openable;
//! `remove_device` makes new opens fail with ENOENT while open files keep their device until
//! their last close, after which the session stops.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nix::errno::Errno;
use zerocopy::{FromBytes, IntoBytes};

use super::kernel::{Kernel, Owner, MAX_MESSAGE};
use super::library::{self, Installed};
use super::run_dir::RunDir;
use super::wire::{self, Received};
use crate::cuse::handler::CuseHandler;
use crate::device::Device;
use crate::fuse::abi::{
    CuseInitIn, InHeader, Opcode, OutHeader, CUSE_UNRESTRICTED_IOCTL, KERNEL_MINOR_VERSION,
    KERNEL_VERSION,
};
use crate::fuse::name::parse_node_name;
use crate::fuse::Session;

/// How long the engine may take to answer CUSE_INIT.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the preload frontend cannot start or take a device.
#[derive(Debug, thiserror::Error)]
pub enum PreloadError {
    #[error("cannot make the run directory: {0}")]
    RunDir(io::Error),
    #[error("cannot install the preload library in {dir}: {source}")]
    Library { dir: PathBuf, source: io::Error },
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error("cannot start the preload kernel thread: {0}")]
    Thread(io::Error),
    #[error("{0}")]
    Sys(#[from] Errno),
    #[error("/dev/{name}: {reason}")]
    Device { name: String, reason: String },
}

/// Serves devices to processes that run with the preload library.
pub struct PreloadFrontend {
    dev_root: PathBuf,
    run_dir: RunDir,
    installed: Installed,
    kernel: Arc<Kernel>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl PreloadFrontend {
    /// Makes the run directory (`dir`, or the default one), installs the library, listens,
    /// and starts the kernel thread.
    pub fn start(dev_root: &Path, dir: Option<&Path>) -> Result<PreloadFrontend, PreloadError> {
        let run_dir = RunDir::create(dir).map_err(PreloadError::RunDir)?;
        let installed =
            library::install(run_dir.path()).map_err(|source| PreloadError::Library {
                dir: run_dir.path().to_owned(),
                source,
            })?;
        let socket = run_dir.socket();
        let _ = std::fs::remove_file(&socket);
        let listener = wire::listen(&socket).map_err(|errno| PreloadError::Listen {
            path: socket.clone(),
            source: errno.into(),
        })?;
        // Who may open a device is the node's mode, checked per caller (kernel::may_open),
        // not the socket's: anyone may knock.
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).map_err(
            |source| PreloadError::Listen {
                path: socket.clone(),
                source,
            },
        )?;
        let owner = Owner {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        };
        let (retired, retired_rx) = mpsc::channel::<Box<dyn Send>>();
        let kernel = Arc::new(Kernel::new(listener, owner, retired.clone())?);
        // Sessions stop off the kernel thread: stopping one waits for its readers.
        thread::Builder::new()
            .name("preload-reaper".to_owned())
            .spawn(move || {
                for session in retired_rx {
                    drop(session);
                }
            })
            .map_err(PreloadError::Thread)?;
        let thread_kernel = kernel.clone();
        let thread = thread::Builder::new()
            .name("preload-kernel".to_owned())
            .spawn(move || thread_kernel.run())
            .map_err(PreloadError::Thread)?;
        if !installed.has_32_bit {
            log::warn!(
                "this cusedev was built without the 32-bit preload library (no gcc-multilib): \
                 32-bit programs will not see the devices"
            );
        }
        Ok(PreloadFrontend {
            dev_root: dev_root.to_owned(),
            run_dir,
            installed,
            kernel,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// What a process needs in its environment to see the devices (`cusedev run` sets it).
    pub fn environment(&self, node_paths: &[PathBuf]) -> Vec<(String, String)> {
        let preload = match std::env::var("LD_PRELOAD") {
            Ok(existing) if !existing.is_empty() => {
                format!("{} {existing}", self.installed.preload_entry)
            }
            _ => self.installed.preload_entry.clone(),
        };
        let paths: Vec<String> = node_paths.iter().map(|p| p.display().to_string()).collect();
        vec![
            ("LD_PRELOAD".to_owned(), preload),
            (
                "CUSEDEV_PRELOAD_SOCKET".to_owned(),
                self.run_dir.socket().display().to_string(),
            ),
            ("CUSEDEV_PRELOAD_PATHS".to_owned(), paths.join(":")),
            (
                "CUSEDEV_PRELOAD_ROOT".to_owned(),
                self.dev_root.display().to_string(),
            ),
        ]
    }

    pub fn dev_root(&self) -> &Path {
        &self.dev_root
    }

    /// Starts the device's CUSE session and makes it openable.
    pub fn add_device(&self, device: Arc<dyn Device>) -> Result<(), PreloadError> {
        let name = device.name().to_owned();
        let refuse = |reason: String| PreloadError::Device {
            name: name.clone(),
            reason,
        };
        parse_node_name(&name).map_err(|reason| refuse(reason.to_owned()))?;
        let (ours, engines) = wire::seqpacket_pair(false)?;
        wire::widen_send_buffer(ours.as_fd());
        wire::widen_send_buffer(engines.as_fd());
        let mode = device.mode();
        let handler = Arc::new(CuseHandler::new(device));
        let session = Session::start(engines, handler, &format!("preload:{name}"))
            .map_err(|e| refuse(format!("cannot start its session: {e}")))?;
        cuse_init(&ours).map_err(|errno| refuse(format!("CUSE_INIT failed: {errno}")))?;
        self.kernel.add(&name, mode, ours, Box::new(session))?;
        log::info!(
            "preload: {}/{name} ready for preloaded processes",
            self.dev_root.display()
        );
        Ok(())
    }

    pub fn remove_device(&self, name: &str) {
        self.kernel.remove(name);
        log::info!("preload: {}/{name} removed", self.dev_root.display());
    }

    /// Stops the kernel thread and every session, and removes the run directory.
    pub fn shutdown(&self) {
        self.kernel.stop();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                log::error!("the preload kernel thread panicked");
            }
        }
        self.run_dir.remove();
    }
}

impl Drop for PreloadFrontend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// CUSE_INIT as the kernel sends it (fs/fuse/cuse.c `cuse_send_init`, 6.1), and its answer.
fn cuse_init(channel: &OwnedFd) -> Result<(), Errno> {
    let init_in = CuseInitIn {
        major: KERNEL_VERSION,
        minor: KERNEL_MINOR_VERSION,
        unused: 0,
        flags: CUSE_UNRESTRICTED_IOCTL,
    };
    let header = InHeader {
        len: (size_of::<InHeader>() + size_of::<CuseInitIn>()) as u32,
        opcode: Opcode::CUSE_INIT.0,
        unique: 2,
        ..InHeader::default()
    };
    wire::send(channel.as_fd(), &[header.as_bytes(), init_in.as_bytes()])?;
    let mut fds = [nix::poll::PollFd::new(
        channel.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let timeout =
        nix::poll::PollTimeout::try_from(INIT_TIMEOUT).unwrap_or(nix::poll::PollTimeout::MAX);
    if nix::poll::poll(&mut fds, timeout)? == 0 {
        return Err(Errno::ETIMEDOUT);
    }
    let mut buf = vec![0u8; MAX_MESSAGE];
    match wire::receive(channel.as_fd(), &mut buf)? {
        Received::Message(message) => {
            let (header, _) =
                OutHeader::read_from_prefix(&buf[..message.len]).map_err(|_| Errno::EPROTO)?;
            if header.error != 0 {
                return Err(Errno::from_raw(-header.error));
            }
            Ok(())
        }
        _ => Err(Errno::EPROTO),
    }
}
