//! The CUSE personality of a session: one device, no filesystem.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::init::cuse_init_reply;
use crate::device::Device;
use crate::fuse::abi::Opcode;
use crate::fuse::session::{Reply, Request, RequestHandler};

/// Serves one device on one `/dev/cuse` connection.
pub struct CuseHandler {
    device: Arc<dyn Device>,
    /// `None` until CUSE_INIT has been answered; then whether the kernel took the answer.
    init: Mutex<Option<bool>>,
    init_done: Condvar,
}

impl CuseHandler {
    pub fn new(device: Arc<dyn Device>) -> CuseHandler {
        CuseHandler {
            device,
            init: Mutex::new(None),
            init_done: Condvar::new(),
        }
    }

    /// Waits until CUSE_INIT has been answered: `Some(true)` when the kernel took the answer
    /// (it has then registered the character device), `Some(false)` when it did not, `None`
    /// when the kernel sent no CUSE_INIT within `timeout`.
    pub fn wait_for_init(&self, timeout: Duration) -> Option<bool> {
        let deadline = Instant::now() + timeout;
        let mut init = self.init.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if init.is_some() {
                return *init;
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            init = self
                .init_done
                .wait_timeout(init, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl RequestHandler for CuseHandler {
    fn init(&self, req: &Request<'_>, minor: u32) -> Reply {
        if req.opcode != Opcode::CUSE_INIT {
            log::error!(
                "{}: {} on a CUSE connection; refusing",
                self.device.name(),
                req.opcode
            );
            return Reply::Error(Errno::EPROTO);
        }
        cuse_init_reply(req.body, minor, self.device.name()).into()
    }

    fn init_sent(&self, accepted: bool) {
        *self.init.lock().unwrap_or_else(|e| e.into_inner()) = Some(accepted);
        self.init_done.notify_all();
    }

    /// CUSE opens always name node 0: there is only the one device.
    fn device_for_open(&self, _nodeid: u64) -> Result<Arc<dyn Device>, Errno> {
        Ok(self.device.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, OwnedFd};

    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use zerocopy::IntoBytes;

    use super::*;
    use crate::device::{Caller, Handle};
    use crate::fuse::abi::{
        parse, CuseInitIn, CuseInitOut, InHeader, OpenIn, OpenOut, OutHeader,
        CUSE_UNRESTRICTED_IOCTL,
    };
    use crate::fuse::Session;

    struct Null;
    impl Device for Null {
        fn name(&self) -> &str {
            "vmbus/hv_fcopy"
        }
        fn open(&self, _caller: &Caller, _flags: i32) -> Result<Handle, Errno> {
            Ok(5)
        }
    }

    fn request(opcode: Opcode, unique: u64, body: &[u8]) -> Vec<u8> {
        let header = InHeader {
            len: (size_of::<InHeader>() + body.len()) as u32,
            opcode: opcode.0,
            unique,
            pid: 1,
            ..InHeader::default()
        };
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend_from_slice(body);
        bytes
    }

    /// The engine with a CuseHandler for [`Null`], on a socket standing in for /dev/cuse.
    fn serve_null() -> (OwnedFd, Arc<CuseHandler>, Session) {
        let (kernel, server) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let handler = Arc::new(CuseHandler::new(Arc::new(Null)));
        let session = Session::start(server, handler.clone(), "cuse-test").unwrap();
        (kernel, handler, session)
    }

    fn reply(sock: &OwnedFd) -> (OutHeader, Vec<u8>) {
        let mut buf = vec![0u8; 8192];
        let n = nix::unistd::read(sock.as_raw_fd(), &mut buf).unwrap();
        let (header, body) = parse::<OutHeader>(&buf[..n]).unwrap();
        (header, body.to_vec())
    }

    /// The engine with this handler, against a socket standing in for /dev/cuse: CUSE_INIT is
    /// answered with the name, the frontend learns it was taken, and OPEN of node 0 (what
    /// the kernel sends for the character device) reaches the device.
    #[test]
    fn cuse_init_names_the_device_and_signals_the_frontend() {
        let (kernel, handler, _session) = serve_null();
        assert_eq!(handler.wait_for_init(Duration::from_millis(1)), None);

        let init = CuseInitIn {
            major: 7,
            minor: 37,
            unused: 0,
            flags: CUSE_UNRESTRICTED_IOCTL,
        };
        nix::unistd::write(&kernel, &request(Opcode::CUSE_INIT, 1, init.as_bytes())).unwrap();
        let (header, body) = reply(&kernel);
        assert_eq!((header.unique, header.error), (1, 0));
        let (out, info) = parse::<CuseInitOut>(&body).unwrap();
        assert_eq!(
            (out.major, out.minor, out.flags),
            (7, 37, CUSE_UNRESTRICTED_IOCTL)
        );
        assert_eq!(info, b"DEVNAME=vmbus/hv_fcopy\0");
        assert_eq!(handler.wait_for_init(Duration::from_secs(10)), Some(true));

        nix::unistd::write(
            &kernel,
            &request(Opcode::OPEN, 2, OpenIn::default().as_bytes()),
        )
        .unwrap();
        let (header, body) = reply(&kernel);
        assert_eq!((header.unique, header.error), (2, 0));
        assert!(parse::<OpenOut>(&body).unwrap().0.fh > 0);
    }

    #[test]
    fn fuse_init_on_a_cuse_connection_is_eproto() {
        let (kernel, handler, _session) = serve_null();
        let init = CuseInitIn {
            major: 7,
            minor: 37,
            ..CuseInitIn::default()
        };
        nix::unistd::write(&kernel, &request(Opcode::INIT, 1, init.as_bytes())).unwrap();
        let (header, _) = reply(&kernel);
        assert_eq!(header.error, -(Errno::EPROTO as i32));
        assert_eq!(handler.wait_for_init(Duration::from_secs(10)), Some(false));
    }
}
