//! Test doubles for the fcopy models: a host channel and host packets built with the `vmbus`
//! encoders, the way fakehost builds them.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmbus::ic::{build_ic_message, ic_header, msgtype, IcVersion};
use vmbus::negotiate::build_request_body;
use vmbus::packet::{encode_inband, parse_packet};

use crate::bus::channel::{ChannelDriver, HostChannel, InboundPacket, InboundRing, RecvError};
use crate::device::{Caller, Device, Errno, Handle};
use crate::devices::hvutil_transport::wait_for;
use crate::reply::testing::{answer_of, answered_now};

/// A packet the driver sent to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sent {
    pub trans_id: u64,
    pub payload: Vec<u8>,
}

/// The driver's channel in a test: an inbound ring the test fills, and a log of what the
/// driver sent.
pub(crate) struct TestChannel {
    ring: InboundRing,
    sent: Mutex<Vec<Sent>>,
    sent_changed: Condvar,
}

impl TestChannel {
    pub(crate) fn new() -> Arc<TestChannel> {
        Arc::new(TestChannel {
            // Large enough that a test never blocks on a full ring.
            ring: InboundRing::new(1 << 20),
            sent: Mutex::new(Vec::new()),
            sent_changed: Condvar::new(),
        })
    }

    /// The host puts `payload` (an IC message) into the ring as an inband packet. The
    /// payload the driver reads back is padded to 8 bytes, as the kernel's `recvlen` is.
    pub(crate) fn push(&self, trans_id: u64, payload: &[u8]) {
        let bytes = encode_inband(trans_id, 0, payload);
        let packet = parse_packet(&bytes).expect("a packet we just encoded parses");
        assert!(self.ring.push(InboundPacket {
            trans_id: packet.trans_id,
            payload: packet.payload.to_vec(),
        }));
    }

    /// A packet with a payload of exactly `len` bytes (len a multiple of 8 for realism).
    pub(crate) fn push_raw(&self, trans_id: u64, payload: Vec<u8>) {
        assert!(self.ring.push(InboundPacket { trans_id, payload }));
    }

    pub(crate) fn sent(&self) -> Vec<Sent> {
        self.sent.lock().unwrap().clone()
    }

    /// Waits until the driver has sent at least `count` packets (a timer or a re-poll on
    /// another thread may be the sender) and returns them all.
    pub(crate) fn wait_sent(&self, count: usize) -> Vec<Sent> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut sent = self.sent.lock().unwrap();
        while sent.len() < count {
            let now = Instant::now();
            assert!(now < deadline, "timed out waiting for {count} sent packets");
            sent = self
                .sent_changed
                .wait_timeout(sent, deadline - now)
                .unwrap()
                .0;
        }
        sent.clone()
    }
}

impl HostChannel for TestChannel {
    fn recv(&self, buf_limit: usize) -> Result<Option<InboundPacket>, RecvError> {
        self.ring.recv(buf_limit)
    }

    fn has_pending(&self) -> bool {
        self.ring.has_pending()
    }

    fn send_inband(&self, trans_id: u64, payload: &[u8]) {
        self.sent.lock().unwrap().push(Sent {
            trans_id,
            payload: payload.to_vec(),
        });
        self.sent_changed.notify_all();
    }
}

pub(crate) fn caller() -> Caller {
    Caller::detached(4242)
}

/// A read that waits for its answer, however it comes (at once, or after parking).
pub(crate) fn read_blocking(
    dev: &dyn Device,
    h: Handle,
    count: u32,
    caller: &Caller,
) -> Result<Vec<u8>, Errno> {
    answer_of(&caller.interrupt, |reply| {
        dev.read(h, count, 0, caller, reply)
    })
}

/// A write, which these drivers always answer before returning.
pub(crate) fn write_now(dev: &dyn Device, h: Handle, data: &[u8]) -> Result<u32, Errno> {
    write_at(dev, h, data, 0)
}

/// A write at `offset`, answered before it returns.
pub(crate) fn write_at(
    dev: &dyn Device,
    h: Handle,
    data: &[u8],
    offset: u64,
) -> Result<u32, Errno> {
    let caller = caller();
    let (answer, _rx) = answered_now(&caller.interrupt, |reply| {
        dev.write(h, data, offset, &caller, reply)
    });
    answer.expect("a write is answered before it returns")
}

/// A read of `count` bytes at `offset` that waits for its answer.
pub(crate) fn read_at(
    dev: &dyn Device,
    h: Handle,
    count: u32,
    offset: u64,
) -> Result<Vec<u8>, Errno> {
    let caller = caller();
    answer_of(&caller.interrupt, |reply| {
        dev.read(h, count, offset, &caller, reply)
    })
}

/// `HV_E_FAIL`, what the driver answers for a request that failed on its side.
pub(crate) const E_FAIL: u32 = vmbus::ic::status::HV_E_FAIL;

/// Framework / message versions a host puts in its IC headers.
pub(crate) const FW_3_0: IcVersion = IcVersion::new(3, 0);
pub(crate) const SRV_1_1: IcVersion = IcVersion::new(1, 1);

/// A host NEGOTIATE message offering `fw` and `srv`.
pub(crate) fn negotiate(fw: &[IcVersion], srv: &[IcVersion]) -> Vec<u8> {
    build_ic_message(
        msgtype::NEGOTIATE,
        IcVersion::new(1, 0),
        IcVersion::new(1, 0),
        0,
        &build_request_body(fw, srv),
    )
}

/// A host fcopy message with `body` after the IC header.
pub(crate) fn fcopy(body: &[u8]) -> Vec<u8> {
    build_ic_message(msgtype::FCOPY, FW_3_0, SRV_1_1, 0, body)
}

pub(crate) fn start(file: &str, path: &str, flags: u32, size: u64) -> Vec<u8> {
    fcopy(&vmbus::fcopy::encode_start(file, path, flags, size).unwrap())
}

pub(crate) fn write(offset: u64, data: &[u8]) -> Vec<u8> {
    fcopy(&vmbus::fcopy::encode_write(offset, data).unwrap())
}

pub(crate) fn op(op: u32) -> Vec<u8> {
    fcopy(&vmbus::fcopy::encode_op(op))
}

/// The status field of a reply.
pub(crate) fn status_of(payload: &[u8]) -> u32 {
    ic_header(payload).unwrap().status.get()
}

/// The icflags field of a reply.
pub(crate) fn icflags_of(payload: &[u8]) -> u8 {
    ic_header(payload).unwrap().icflags
}

/// `payload` padded with zeros to a multiple of 8, as the driver sees it.
pub(crate) fn padded(payload: &[u8]) -> Vec<u8> {
    let mut out = payload.to_vec();
    out.resize(payload.len().div_ceil(8) * 8, 0);
    out
}

/// What the driver's reply to `request` must be: the same bytes (padded) with `status` and
/// icflags 0x05 in the IC header.
pub(crate) fn expected_reply(request: &[u8], status: u32) -> Vec<u8> {
    let mut out = padded(request);
    vmbus::ic::set_reply(&mut out, status).unwrap();
    out
}

/// The reply the driver must send for `request` (under `trans_id`, with `status`).
pub(crate) fn reply_to(trans_id: u64, request: &[u8], status: u32) -> Sent {
    Sent {
        trans_id,
        payload: expected_reply(request, status),
    }
}

/// What a test rig needs to know of one profile's fcopy model.
pub(crate) trait RigDevice: Device + ChannelDriver + Send + Sync + 'static {
    /// The kernel's daemon timeout for this model.
    const DAEMON_TIMEOUT: Duration;
    /// The buffer size this profile's daemon reads with.
    const READ_LEN: u32;

    /// The model on `channel` with daemon timeout `timeout`.
    fn create(channel: Arc<dyn HostChannel>, timeout: Duration) -> Arc<Self>;

    /// How many readers sleep in `read` waiting for a message.
    fn sleeping_readers(&self) -> usize;
}

/// A device of one profile on a [`TestChannel`]. Profile-specific helpers (registering a
/// daemon and the like) are inherent impls next to each model's tests.
pub(crate) struct Rig<D> {
    pub dev: Arc<D>,
    pub chan: Arc<TestChannel>,
}

impl<D: RigDevice> Rig<D> {
    /// A rig with the kernel's daemon timeout.
    pub(crate) fn new() -> Rig<D> {
        Rig::with_timeout(D::DAEMON_TIMEOUT)
    }

    pub(crate) fn with_timeout(timeout: Duration) -> Rig<D> {
        let chan = TestChannel::new();
        Rig {
            dev: D::create(chan.clone(), timeout),
            chan,
        }
    }

    /// The host sends `payload` and the channel callback runs once.
    pub(crate) fn host(&self, trans_id: u64, payload: &[u8]) {
        self.chan.push(trans_id, payload);
        self.dev.on_channel_callback();
    }

    pub(crate) fn open(&self) -> Handle {
        self.dev.open(&caller(), libc::O_RDWR).unwrap()
    }

    pub(crate) fn write_u32(&self, h: Handle, value: u32) -> Result<u32, Errno> {
        write_now(&*self.dev, h, &value.to_le_bytes())
    }

    /// A read with the buffer size this profile's daemon uses, waiting for its answer.
    pub(crate) fn read(&self, h: Handle) -> Result<Vec<u8>, Errno> {
        read_blocking(&*self.dev, h, D::READ_LEN, &caller())
    }

    /// Starts a read on another thread and waits until it sleeps.
    pub(crate) fn blocked_read(
        &self,
        h: Handle,
        caller: &Caller,
    ) -> std::thread::JoinHandle<Result<Vec<u8>, Errno>> {
        let before = self.dev.sleeping_readers();
        let reader = {
            let dev = self.dev.clone();
            let caller = caller.clone();
            std::thread::spawn(move || read_blocking(&*dev, h, D::READ_LEN, &caller))
        };
        wait_for("the reader to sleep", || {
            self.dev.sleeping_readers() > before
        });
        reader
    }

    /// A read that blocks (nothing to read) until a signal interrupts it with EINTR.
    pub(crate) fn assert_read_blocks_until_interrupted(&self, h: Handle) {
        let caller = caller();
        let reader = self.blocked_read(h, &caller);
        caller.interrupt.fire();
        assert_eq!(reader.join().unwrap(), Err(Errno::EINTR));
    }
}
