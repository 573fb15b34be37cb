//! hv_fcopy as in Linux 6.1 (drivers/hv/hv_fcopy.c, 4.x–6.9), on the hvutil transport.
//!
//! This is the driver Debian's `hv_fcopy_daemon` (6.1) was written against. The char device
//! is the shared [`hvutil transport`](crate::devices::hvutil_transport); this file is the
//! service behind it (fcopy.md §5.3–§5.5):
//!
//! * Registration: the daemon writes its version. Version 1 gets a 4-byte answer (the
//!   driver's own version, 1) and the driver becomes READY only once the daemon has *read*
//!   that answer. Version 0 is accepted without an answer, and then nothing else happens: the
//!   state stays DEVICE_INIT, so a version-0 daemon never gets a request.
//! * Host packets: NEGOTIATE is answered whenever no transaction is in flight, daemon or not.
//!   An fcopy request with no registered daemon is failed at once with HV_E_FAIL. Otherwise
//!   the request becomes the daemon's message (START converted to UTF-8, WRITE as 6196 raw
//!   bytes, anything else as `recvlen` raw bytes) and a 30 s timer starts. While a
//!   transaction is in flight the channel callback leaves packets in the ring; once the daemon
//!   answers (or the timer fires) the driver re-polls the channel.
//! * The daemon closing the device fails a pending transaction at once. Rescind wakes the
//!   daemon with EBADF and waits for it to close before the device goes away.
//!
//! Threads: the kernel runs the channel callback in one tasklet per channel, the timeout in a
//! workqueue and the send-work in another. Here the callback is serialised by a mutex (it may
//! be called by the bus reader and by a re-poll at the same time), the timeout is a
//! [`DelayedWork`], and the send-work runs inline at the end of the callback (the kernel's
//! `schedule_work()` runs it right after, on the same CPU; `Service::send_data` says which
//! kernel race that rules out). The re-poll that `hv_poll_channel()` schedules as a tasklet
//! once a transaction ends runs on the thread that ended it (the daemon's write, the timer),
//! right after it lets go of the driver lock: nothing can tell the two apart, and a host that
//! has its next request waiting in the ring gets it to the daemon without a thread hop.

use std::io;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use log::{debug, error, info, warn};
use vmbus::fcopy::{op, DO_FCOPY_LEN, FCOPY_HDR_LEN, FCOPY_VERSION_0, FCOPY_VERSION_1};
use vmbus::ic::{msgtype, set_response_flags, status, ICMSG_HDR_LEN};
use vmbus::negotiate::{prep_negotiate_resp, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS};

use super::{op_name, HostSide, DEVICE_NAME, RECV_LIMIT};
use crate::bus::channel::{ChannelDriver, HostChannel};
use crate::device::Errno;
use crate::devices::delayed_work::DelayedWork;
use crate::devices::hvutil_transport::{
    HvutilDeviceState as State, HvutilDriver, HvutilService, HvutilTransport, Shared, Transport,
};

/// `HV_UTIL_TIMEOUT` (drivers/hv/hyperv_vmbus.h, 6.1): how long the daemon has to answer.
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(30);

/// `FCOPY_CURRENT_VERSION` in 6.1's uapi header: what the driver answers a version-1 daemon.
const FCOPY_CURRENT_VERSION: u32 = FCOPY_VERSION_1;

/// The 6.1 fcopy driver of one channel.
pub struct Fcopy61 {
    hvt: HvutilTransport<Service>,
    /// The channel callback runs in one tasklet per channel in the kernel: never twice at
    /// once. Taken before the driver lock, never while holding it.
    callback_serial: Mutex<()>,
    /// `fcopy_timeout_work`.
    timer: Arc<DelayedWork>,
}

/// The fcopy service state (`fcopy_transaction` and friends), under the driver lock.
pub(crate) struct Service {
    state: State,
    /// `dm_reg_value`: the version the daemon registered with.
    dm_reg_value: Option<u32>,
    /// The channel and the host request in hand.
    host: HostSide,
    timer: Arc<DelayedWork>,
    timeout: Duration,
    /// `hv_poll_channel()` was asked for with a packet waiting: whoever ends the transaction
    /// re-polls once it lets go of the driver lock ([`Fcopy61::repoll_if_asked`]).
    repoll: bool,
}

impl Fcopy61 {
    /// `hv_fcopy_init()` on `channel`: state DEVICE_INIT, transport in INIT mode. Fails only
    /// when the timer's thread cannot be started (the kernel's init failing with -ENOMEM).
    pub fn new(channel: Arc<dyn HostChannel>, timeout: Duration) -> io::Result<Arc<Fcopy61>> {
        let timer = DelayedWork::spawn("hv_fcopy-timer")?;
        Ok(Arc::new_cyclic(|me: &Weak<Fcopy61>| {
            let timer = Arc::new(timer.bind_driver(me.clone(), Fcopy61::timeout_work));
            let service = Service {
                state: State::DeviceInit,
                dm_reg_value: None,
                host: HostSide::new(channel),
                timer: timer.clone(),
                timeout,
                repoll: false,
            };
            Fcopy61 {
                hvt: HvutilTransport::new(service),
                callback_serial: Mutex::new(()),
                timer,
            }
        }))
    }

    /// `fcopy_timeout_func()`: the daemon did not answer in time.
    fn timeout_work(&self) {
        self.fail_timed_out_request();
        self.repoll_if_asked();
    }

    fn fail_timed_out_request(&self) {
        let mut guard = self.hvt.lock();
        let svc = &mut guard.svc;
        warn!(
            "hv_fcopy: the daemon did not answer {} within {:?}; replying HV_E_FAIL to the host \
             (a queued message stays readable, drivers/hv/hv_fcopy.c 6.1)",
            op_name(svc.host.recv.operation()),
            svc.timeout
        );
        svc.respond_to_host(status::HV_E_FAIL);
        // hv_poll_channel(channel, fcopy_poll_wrapper): READY whatever the state was, and
        // the channel is polled again. The message the daemon did not read is *not*
        // withdrawn: it will read it later, answer, and get EINVAL.
        svc.poll_wrapper();
    }

    /// The re-poll `hv_poll_channel()` asked for, if it did: the channel callback, on this
    /// thread, with no lock held.
    fn repoll_if_asked(&self) {
        let asked = std::mem::take(&mut self.hvt.lock().svc.repoll);
        if asked {
            self.on_channel_callback();
        }
    }

    /// Test visibility: the service state.
    #[cfg(test)]
    fn state(&self) -> State {
        self.hvt.lock().svc.state
    }
}

impl Drop for Fcopy61 {
    fn drop(&mut self) {
        self.timer.shutdown();
    }
}

impl Service {
    /// `fcopy_respond_to_host()`: echo the received buffer, `recv_len` bytes, with `status`
    /// and icflags TRANSACTION|RESPONSE, under the host's transaction id.
    fn respond_to_host(&mut self, status: u32) {
        self.host.respond(status);
    }

    /// `fcopy_poll_wrapper()` via `hv_poll_channel()`: "Transaction is finished, reset the
    /// state here to avoid races", then run the channel callback again.
    ///
    /// The re-poll is only asked for when a host packet is waiting. Nothing is lost otherwise:
    /// the bus runs the callback after every packet it adds, and that callback takes the driver
    /// lock we hold, so it sees READY; a packet added before our check is seen by the check.
    /// Every path that can get here (the daemon's write, its read of the handshake reply, the
    /// timer) re-polls when it lets go of the lock.
    fn poll_wrapper(&mut self) {
        self.state = State::Ready;
        if self.host.channel.has_pending() {
            self.repoll = true;
        }
    }

    /// `fcopy_handle_handshake()`.
    fn handshake(&mut self, hvt: &mut Transport<Service>, version: u32) -> Result<(), Errno> {
        match version {
            FCOPY_VERSION_0 => {
                // "Daemon doesn't expect us to reply". Nothing else happens either: the state
                // stays DEVICE_INIT, so host requests keep failing with HV_E_FAIL and this
                // daemon is never given one (drivers/hv/hv_fcopy.c 4.x-6.9, as written).
                self.dm_reg_value = Some(version);
                info!(
                    "hv_fcopy: daemon registered with version 0; the 6.1 driver never becomes \
                     READY for it, host requests will keep failing"
                );
            }
            FCOPY_VERSION_1 => {
                // "Daemon expects us to reply with our own version". READY comes only when
                // the daemon has read it (fcopy_register_done, the on-read callback).
                let our_ver = FCOPY_CURRENT_VERSION.to_le_bytes();
                if hvt
                    .send(&our_ver, Some(Box::new(Service::register_done)))
                    .is_err()
                {
                    // Any failure to queue (e.g. the previous answer still unread) is EFAULT.
                    return Err(Errno::EFAULT);
                }
                self.dm_reg_value = Some(version);
                info!("hv_fcopy: daemon registered with version 1");
            }
            other => {
                // "For now we will fail the registration."
                warn!(
                    "hv_fcopy: daemon registration with unknown version {other} refused (EINVAL)"
                );
                return Err(Errno::EINVAL);
            }
        }
        Ok(())
    }

    /// `fcopy_register_done()`: the daemon has read our version.
    fn register_done(&mut self) {
        debug!("hv_fcopy: userspace daemon registered");
        self.poll_wrapper();
    }

    /// `hv_fcopy_onchannelcallback()`: reads at most one host packet.
    fn channel_callback(&mut self, hvt: &mut Transport<Service>) {
        if self.host.channel_closed {
            return;
        }
        // A transaction is in flight: leave the packet in the ring; the re-poll after the
        // daemon's answer (or the timeout) picks it up.
        if self.state > State::Ready {
            return;
        }
        let packet = match self.host.channel.recv(RECV_LIMIT) {
            Ok(Some(packet)) => packet,
            Ok(None) => return,
            Err(e) => {
                // "Fcopy request received. Could not read into recv buf": the kernel only
                // logs, and the packet stays at the head of the ring, so every later callback
                // fails the same way until the channel is rescinded.
                error!("hv_fcopy: {e}; the channel is stuck until rescind (as in Linux 6.1)");
                return;
            }
        };
        let recvlen = self.host.recv.fill(&packet.payload);
        let requestid = packet.trans_id;
        if recvlen == 0 {
            return;
        }
        if recvlen < ICMSG_HDR_LEN {
            warn!(
                "hv_fcopy: host packet of {recvlen} bytes is shorter than the {ICMSG_HDR_LEN}-byte \
                 IC header; dropped without reply"
            );
            return;
        }
        match self.host.recv.icmsgtype() {
            msgtype::NEGOTIATE => {
                let buf = self
                    .host
                    .recv
                    .as_mut_slice()
                    .get_mut(..recvlen)
                    .unwrap_or_default();
                match prep_negotiate_resp(buf, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS) {
                    Some((fw, srv)) => info!("hv_fcopy: FCopy IC version {srv} (framework {fw})"),
                    None => warn!(
                        "hv_fcopy: host NEGOTIATE shares no version with framework 3.0 / \
                         fcopy 1.1 (or is malformed); answering with zero counts"
                    ),
                }
                let _ = set_response_flags(buf);
                self.host.channel.send_inband(requestid, buf);
            }
            msgtype::FCOPY => {
                if recvlen < ICMSG_HDR_LEN + FCOPY_HDR_LEN {
                    warn!(
                        "hv_fcopy: fcopy packet of {recvlen} bytes has no room for the \
                         {FCOPY_HDR_LEN}-byte hv_fcopy_hdr; dropped without reply"
                    );
                    return;
                }
                self.host.recv_len = recvlen;
                self.host.recv_req_id = requestid;
                if self.state < State::Ready {
                    // "Userspace is not registered yet"
                    warn!(
                        "hv_fcopy: {} from the host with no daemon registered; replying HV_E_FAIL",
                        op_name(self.host.recv.operation())
                    );
                    self.respond_to_host(status::HV_E_FAIL);
                    return;
                }
                self.state = State::HostmsgReceived;
                // schedule_work(&fcopy_send_work); schedule_delayed_work(&fcopy_timeout_work):
                // the timer is armed before the send-work runs, as it is in the kernel when
                // the work runs on the CPU that ran the tasklet.
                self.timer.schedule(self.timeout);
                self.send_data(hvt);
            }
            other => {
                // Since "hv_utils: Add validation for untrusted Hyper-V values" (≈5.11);
                // before it every non-negotiate packet was taken for an fcopy request.
                warn!(
                    "hv_fcopy: host packet with icmsgtype {other} (neither negotiate nor fcopy); \
                     dropped without reply"
                );
            }
        }
    }

    /// `fcopy_send_data()`: the daemon's message for the request in the receive buffer.
    ///
    /// In the kernel this is a work item; it runs inline here (see the module docs). The one
    /// behaviour that removes is a kernel race: the 30 s timer firing before the work ran,
    /// after which the work would still set USERSPACE_REQ with no timer left.
    fn send_data(&mut self, hvt: &mut Transport<Service>) {
        let operation = self.host.recv.operation();
        let message = match operation {
            op::START_FILE_COPY => self.host.recv.start_for_daemon(),
            // Always the full struct: past a short packet the daemon gets stale bytes.
            op::WRITE_TO_FILE => self.host.recv.bytes(ICMSG_HDR_LEN, DO_FCOPY_LEN),
            // recvlen bytes from offset 28: 28 bytes more than the packet holds, the tail
            // being whatever the receive buffer held there (drivers/hv/hv_fcopy.c 6.1).
            _ => self.host.recv.bytes(ICMSG_HDR_LEN, self.host.recv_len),
        };
        self.state = State::UserspaceReq;
        debug!(
            "hv_fcopy: host request {} (id {}, {} bytes) handed to the daemon as {} bytes",
            op_name(operation),
            self.host.recv_req_id,
            self.host.recv_len,
            message.len()
        );
        if let Err(errno) = hvt.send(&message, None) {
            warn!(
                "hv_fcopy: cannot hand {} to the daemon ({errno}: {}); replying HV_E_FAIL",
                op_name(operation),
                match errno {
                    Errno::EFAULT => "its previous message is still unread",
                    Errno::EINVAL => "no daemon has the device open",
                    _ => "out of memory",
                }
            );
            if self.timer.cancel() {
                self.respond_to_host(status::HV_E_FAIL);
                self.state = State::Ready;
            }
        }
    }
}

impl HvutilService for Service {
    /// `fcopy_on_msg()`: the daemon's registration or its answer.
    fn on_msg(&mut self, hvt: &mut Transport<Self>, msg: &[u8]) -> Result<(), Errno> {
        let Ok(value) = <[u8; 4]>::try_from(msg) else {
            return Err(Errno::EINVAL);
        };
        let value = u32::from_le_bytes(value);
        if self.state == State::DeviceInit {
            return self.handshake(hvt, value);
        }
        if self.state != State::UserspaceReq {
            warn!(
                "hv_fcopy: daemon wrote {value:#x} with no request pending (state {:?}); EINVAL",
                self.state
            );
            return Err(Errno::EINVAL);
        }
        // "Complete the transaction by forwarding the result to the host. But first, cancel
        // the timeout." If the timer has already started firing, the answer is accepted
        // (write returns 4) and dropped: the timer replies HV_E_FAIL instead.
        if self.timer.cancel() {
            self.state = State::UserspaceRecv;
            debug!(
                "hv_fcopy: daemon answered {value:#x} ({})",
                vmbus::ic::status_meaning(value)
            );
            self.respond_to_host(value);
            self.poll_wrapper();
        } else {
            warn!("hv_fcopy: daemon answered {value:#x} as the timeout fired; answer dropped");
        }
        Ok(())
    }

    /// `fcopy_on_reset()`: "The daemon has exited; reset the state." Even from DYING.
    fn on_reset(&mut self) {
        self.state = State::DeviceInit;
        if self.timer.cancel() {
            warn!(
                "hv_fcopy: daemon closed the device with {} pending; replying HV_E_FAIL",
                op_name(self.host.recv.operation())
            );
            self.respond_to_host(status::HV_E_FAIL);
        }
        debug!("hv_fcopy: daemon closed the device");
    }
}

/// The char device is the transport's (see [`HvutilDriver`]).
impl HvutilDriver for Fcopy61 {
    type Service = Service;
    const NODE: &'static str = DEVICE_NAME;

    fn transport(&self) -> &HvutilTransport<Service> {
        &self.hvt
    }

    fn repoll_if_asked(&self) {
        Fcopy61::repoll_if_asked(self)
    }
}

impl ChannelDriver for Fcopy61 {
    fn on_channel_callback(&self) {
        let _serial = self
            .callback_serial
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut guard = self.hvt.lock();
        let Shared { hvt, svc } = &mut *guard;
        svc.channel_callback(hvt);
    }

    /// `util_remove()`: `hv_fcopy_deinit()` then `vmbus_close()`.
    fn on_rescind(&self) {
        info!("hv_fcopy: channel rescinded; waiting for the daemon to close the device");
        // hv_fcopy_deinit(): DYING, cancel the timeout (a pending transaction gets no reply)
        // and the send-work (inline here, nothing to cancel), destroy the transport.
        self.hvt.lock().svc.state = State::DeviceDying;
        self.timer.cancel_sync();
        self.hvt.destroy();
        // vmbus_close(): no more callbacks, replies from now on are dropped.
        {
            let _serial = self
                .callback_serial
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.hvt.lock().svc.host.channel_closed = true;
        }
        self.timer.shutdown();
        info!("hv_fcopy: device removed");
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::device::{poll_bits, Device, Handle};
    use crate::devices::hvutil_transport::wait_for;
    use std::thread;
    use vmbus::fcopy::{StartFcopy, CREATE_PATH, OVER_WRITE};
    use vmbus::ic::IcVersion;
    use zerocopy::FromBytes;

    type Rig = super::super::testing::Rig<Fcopy61>;

    impl RigDevice for Fcopy61 {
        const DAEMON_TIMEOUT: Duration = DAEMON_TIMEOUT;
        /// The 6.1 daemon always reads with a 6196-byte buffer.
        const READ_LEN: u32 = DO_FCOPY_LEN as u32;

        fn create(channel: Arc<dyn HostChannel>, timeout: Duration) -> Arc<Fcopy61> {
            Fcopy61::new(channel, timeout).unwrap()
        }

        fn sleeping_readers(&self) -> usize {
            self.hvt.sleeping_readers()
        }
    }

    impl Rig {
        /// Opens and registers a version-1 daemon the way hv_fcopy_daemon does.
        fn daemon(&self) -> Handle {
            let h = self.open();
            assert_eq!(self.write_u32(h, FCOPY_VERSION_1), Ok(4));
            assert_eq!(self.read(h).unwrap(), 1u32.to_le_bytes());
            assert_eq!(self.dev.state(), State::Ready);
            h
        }

        fn rescind_in_background(&self) -> thread::JoinHandle<()> {
            let dev = self.dev.clone();
            thread::spawn(move || dev.on_rescind())
        }

        /// Starts the rescind on another thread and waits until it waits for the daemon's
        /// close.
        fn rescind_waiting_for_close(&self) -> thread::JoinHandle<()> {
            let remover = self.rescind_in_background();
            wait_for("rescind to wait for the close", || {
                self.dev.hvt.destroy_waiting()
            });
            remover
        }

        fn wait_ready_after_timeout(&self) {
            wait_for("READY after the timeout", || {
                self.dev.state() == State::Ready
            });
        }
    }

    /// A registered daemon whose START (request 1) was not answered within 20 ms: the host
    /// has had its HV_E_FAIL and the driver is READY again, the message still unread.
    fn daemon_with_timed_out_start() -> (Rig, Handle) {
        let rig = Rig::with_timeout(Duration::from_millis(20));
        let h = rig.daemon();
        rig.host(1, &start("f", "/tmp", 0, 1));
        rig.chan.wait_sent(1);
        rig.wait_ready_after_timeout();
        (rig, h)
    }

    // ---- §5.2 through the fcopy device --------------------------------------------------

    #[test]
    fn second_open_is_ebusy() {
        let rig = Rig::new();
        rig.open();
        assert_eq!(rig.dev.open(&caller(), libc::O_RDWR), Err(Errno::EBUSY));
    }

    #[test]
    fn short_read_returns_einval_and_keeps_message_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.daemon();
        rig.host(5, &start("f", "/tmp", 0, 1));
        assert_eq!(read_at(&*rig.dev, h, 1087, 0), Err(Errno::EINVAL));
        assert_eq!(read_at(&*rig.dev, h, 1088, 0).unwrap().len(), 1088);
    }

    #[test]
    fn read_is_interrupted_with_eintr_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.daemon();
        rig.assert_read_blocks_until_interrupted(h);
    }

    #[test]
    fn nonblocking_read_still_blocks_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig
            .dev
            .open(&caller(), libc::O_RDWR | libc::O_NONBLOCK)
            .unwrap();
        assert_eq!(rig.write_u32(h, FCOPY_VERSION_1), Ok(4));
        rig.read(h).unwrap();
        let reader = rig.blocked_read(h, &caller());
        rig.host(1, &op(op::COMPLETE_FCOPY));
        assert_eq!(reader.join().unwrap().unwrap().len(), 64);
    }

    #[test]
    fn read_after_rescind_returns_ebadf_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.daemon();
        let reader = rig.blocked_read(h, &caller());
        let remover = rig.rescind_in_background();
        assert_eq!(reader.join().unwrap(), Err(Errno::EBADF));
        assert_eq!(rig.read(h), Err(Errno::EBADF));
        assert_eq!(rig.write_u32(h, 0), Err(Errno::EBADF));
        assert_eq!(
            rig.dev.poll(h, None),
            poll_bits::POLLERR | poll_bits::POLLHUP
        );
        assert_eq!(rig.dev.open(&caller(), libc::O_RDWR), Err(Errno::EBADF));
        rig.dev.release(h);
        remover.join().unwrap();
        // misc_deregister() has run.
        assert_eq!(rig.dev.open(&caller(), libc::O_RDWR), Err(Errno::ENODEV));
    }

    #[test]
    fn rescind_waits_for_daemon_close_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.daemon();
        let remover = rig.rescind_waiting_for_close();
        assert!(!remover.is_finished());
        rig.dev.release(h);
        remover.join().unwrap();
    }

    #[test]
    fn rescind_without_daemon_returns_at_once_on_linux_6_1() {
        let rig = Rig::new();
        rig.dev.on_rescind();
        assert_eq!(rig.dev.open(&caller(), libc::O_RDWR), Err(Errno::ENODEV));
    }

    #[test]
    fn rescind_with_pending_transaction_sends_no_reply_on_linux_6_1() {
        // hv_fcopy_deinit() cancels the timer without replying; on_reset then finds no timer.
        let rig = Rig::new();
        let h = rig.daemon();
        rig.host(3, &start("f", "/tmp", 0, 1));
        let remover = rig.rescind_waiting_for_close();
        rig.dev.release(h);
        remover.join().unwrap();
        assert!(rig.chan.sent().is_empty());
        // And the channel is closed: nothing is read any more.
        rig.host(4, &negotiate(&[FW_3_0], &[SRV_1_1]));
        assert!(rig.chan.sent().is_empty());
    }

    #[test]
    fn poll_reports_queued_message_and_never_pollout_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.open();
        assert_eq!(rig.dev.poll(h, None), 0);
        rig.write_u32(h, FCOPY_VERSION_1).unwrap();
        assert_eq!(
            rig.dev.poll(h, None),
            poll_bits::POLLIN | poll_bits::POLLRDNORM
        );
    }

    #[test]
    fn offsets_are_ignored_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.open();
        // pwrite at offset 99 registers, pread at offset 12345 reads the reply.
        assert_eq!(write_at(&*rig.dev, h, &1u32.to_le_bytes(), 99), Ok(4));
        assert_eq!(read_at(&*rig.dev, h, 4, 12345).unwrap(), vec![1, 0, 0, 0]);
    }

    // ---- §5.3 on_msg -------------------------------------------------------------------

    #[test]
    fn registration_of_wrong_size_is_einval_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.open();
        assert_eq!(write_at(&*rig.dev, h, &[1, 0, 0], 0), Err(Errno::EINVAL));
        assert_eq!(
            write_at(&*rig.dev, h, &[1, 0, 0, 0, 0], 0),
            Err(Errno::EINVAL)
        );
        assert_eq!(rig.dev.state(), State::DeviceInit);
    }

    #[test]
    fn version_0_daemon_never_reaches_ready_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.open();
        assert_eq!(rig.write_u32(h, FCOPY_VERSION_0), Ok(4));
        // No reply is queued and the state stays DEVICE_INIT...
        assert_eq!(rig.dev.poll(h, None), 0);
        assert_eq!(rig.dev.state(), State::DeviceInit);
        assert_eq!(rig.dev.hvt.lock().svc.dm_reg_value, Some(0));
        // ...so host requests still fail at once, and writing 0 again is another handshake.
        let req = start("f", "/tmp", 0, 1);
        rig.host(9, &req);
        assert_eq!(rig.chan.sent(), vec![reply_to(9, &req, E_FAIL)]);
        assert_eq!(rig.write_u32(h, FCOPY_VERSION_0), Ok(4));
    }

    #[test]
    fn version_1_daemon_is_ready_only_after_reading_the_reply_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.open();
        assert_eq!(rig.write_u32(h, FCOPY_VERSION_1), Ok(4));
        assert_eq!(rig.dev.state(), State::DeviceInit);
        // Not READY yet: a request now is failed at once.
        let req = op(op::COMPLETE_FCOPY);
        rig.host(1, &req);
        assert_eq!(status_of(&rig.chan.wait_sent(1)[0].payload), E_FAIL);
        // Reading the 4-byte answer (FCOPY_CURRENT_VERSION = 1) makes it READY.
        assert_eq!(rig.read(h).unwrap(), vec![1, 0, 0, 0]);
        assert_eq!(rig.dev.state(), State::Ready);
    }

    #[test]
    fn second_registration_before_reading_the_reply_is_efault_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.open();
        assert_eq!(rig.write_u32(h, FCOPY_VERSION_1), Ok(4));
        assert_eq!(rig.write_u32(h, FCOPY_VERSION_1), Err(Errno::EFAULT));
    }

    #[test]
    fn registration_with_unknown_version_is_einval_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.open();
        assert_eq!(rig.write_u32(h, 2), Err(Errno::EINVAL));
        assert_eq!(rig.write_u32(h, u32::MAX), Err(Errno::EINVAL));
        assert_eq!(rig.dev.state(), State::DeviceInit);
    }

    #[test]
    fn reply_without_pending_request_is_einval_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.daemon();
        assert_eq!(rig.write_u32(h, 0), Err(Errno::EINVAL));
        // A second handshake once READY is no handshake: EINVAL too.
        assert_eq!(rig.write_u32(h, FCOPY_VERSION_1), Err(Errno::EINVAL));
        assert!(rig.chan.sent().is_empty());
    }

    #[test]
    fn reply_completes_transaction_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.daemon();
        let req = start("f", "/tmp", OVER_WRITE, 10);
        rig.host(77, &req);
        assert_eq!(rig.dev.state(), State::UserspaceReq);
        rig.read(h).unwrap();
        assert_eq!(rig.write_u32(h, status::HV_ERROR_ALREADY_EXISTS), Ok(4));
        let sent = rig.chan.wait_sent(1);
        // The whole received buffer (padded recvlen 1120), status and flags 0x05, same id.
        assert_eq!(
            sent,
            vec![reply_to(77, &req, status::HV_ERROR_ALREADY_EXISTS)]
        );
        assert_eq!(sent[0].payload.len(), 1120);
        assert_eq!(icflags_of(&sent[0].payload), 0x05);
        assert_eq!(rig.dev.state(), State::Ready);
        // The reply echoes the host's UTF-16 names, not the converted ones.
        assert_eq!(&sent[0].payload[28 + 36..28 + 38], &[b'f', 0]);
    }

    #[test]
    fn packet_during_transaction_waits_in_ring_until_repoll_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.daemon();
        rig.host(1, &start("f", "/tmp", 0, 1));
        rig.read(h).unwrap();
        // A host that does not wait: the callback leaves its packet in the ring.
        rig.host(2, &op(op::COMPLETE_FCOPY));
        assert!(rig.chan.has_pending());
        // The daemon's answer re-polls the channel: COMPLETE comes through.
        rig.write_u32(h, 0).unwrap();
        wait_for("the re-poll to take COMPLETE from the ring", || {
            !rig.chan.has_pending()
        });
        let msg = rig.read(h).unwrap();
        assert_eq!(msg.len(), 64);
        assert_eq!(rig.chan.sent().len(), 1);
        assert_eq!(rig.chan.sent()[0].trans_id, 1);
    }

    #[test]
    fn reply_racing_the_timer_returns_ok_but_sends_nothing_on_linux_6_1() {
        // The timer has started firing (no longer pending) but not replied yet: the state is
        // still USERSPACE_REQ, cancel_delayed_work_sync() returns false, write returns 4 and
        // the daemon's answer is dropped; the timer then replies HV_E_FAIL.
        let rig = Rig::with_timeout(Duration::from_millis(1));
        let h = rig.daemon();
        rig.dev.timer.hold_next_firing();
        let req = op(op::COMPLETE_FCOPY);
        rig.host(6, &req);
        rig.dev.timer.wait_until_held();
        rig.read(h).unwrap();
        assert_eq!(rig.write_u32(h, 0), Ok(4));
        assert!(rig.chan.sent().is_empty());
        rig.dev.timer.release_hold();
        let sent = rig.chan.wait_sent(1);
        assert_eq!(sent, vec![reply_to(6, &req, E_FAIL)]);
    }

    #[test]
    fn close_fails_pending_transaction_at_once_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.daemon();
        let req = write(0, b"data");
        rig.host(8, &req);
        rig.dev.release(h);
        // Synchronously, long before the 30 s timer.
        assert_eq!(rig.chan.sent(), vec![reply_to(8, &req, E_FAIL)]);
        assert_eq!(rig.dev.state(), State::DeviceInit);
        assert!(!rig.dev.timer.is_pending());
    }

    #[test]
    fn close_without_transaction_sends_nothing_and_unregisters_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.daemon();
        rig.dev.release(h);
        assert!(rig.chan.sent().is_empty());
        assert_eq!(rig.dev.state(), State::DeviceInit);
        // The next daemon registers from scratch.
        rig.daemon();
    }

    #[test]
    fn close_drops_unread_message_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.daemon();
        rig.host(1, &start("f", "/tmp", 0, 1));
        rig.dev.release(h);
        let h = rig.open();
        assert_eq!(rig.dev.poll(h, None), 0);
    }

    // ---- §5.4 host packets -------------------------------------------------------------

    #[test]
    fn negotiate_answered_without_daemon_on_linux_6_1() {
        let rig = Rig::new();
        let req = negotiate(
            &[IcVersion::new(1, 0), FW_3_0],
            &[IcVersion::new(1, 0), SRV_1_1],
        );
        rig.host(11, &req);
        let sent = rig.chan.wait_sent(1);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].trans_id, 11);
        let reply = &sent[0].payload;
        assert_eq!(reply.len(), padded(&req).len());
        assert_eq!(
            vmbus::negotiate::parse_response(reply).unwrap(),
            Some((FW_3_0, SRV_1_1))
        );
        assert_eq!(icflags_of(reply), 0x05);
        // Status is left as the host sent it.
        assert_eq!(status_of(reply), 0);
        assert_eq!(rig.dev.state(), State::DeviceInit);
    }

    #[test]
    fn negotiate_without_common_version_answers_zero_counts_on_linux_6_1() {
        let rig = Rig::new();
        rig.host(12, &negotiate(&[IcVersion::new(1, 0)], &[SRV_1_1]));
        let reply = &rig.chan.wait_sent(1)[0].payload;
        assert_eq!(vmbus::negotiate::parse_response(reply).unwrap(), None);
        assert_eq!(icflags_of(reply), 0x05);
    }

    #[test]
    fn negotiate_is_answered_between_transactions_on_linux_6_1() {
        let rig = Rig::new();
        rig.daemon();
        rig.host(13, &negotiate(&[FW_3_0], &[SRV_1_1]));
        assert_eq!(rig.chan.wait_sent(1)[0].trans_id, 13);
    }

    #[test]
    fn no_daemon_fails_fcopy_request_immediately() {
        let rig = Rig::new();
        for (id, req) in [
            (1, start("a", "/b", 0, 0)),
            (2, write(0, b"x")),
            (3, op(op::CANCEL_FCOPY)),
        ] {
            rig.host(id, &req);
            assert_eq!(rig.chan.sent().last().unwrap(), &reply_to(id, &req, E_FAIL));
        }
        assert_eq!(rig.dev.state(), State::DeviceInit);
    }

    #[test]
    fn daemon_open_but_unregistered_still_fails_requests_immediately_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.open();
        rig.host(1, &start("a", "/b", 0, 0));
        assert_eq!(status_of(&rig.chan.sent()[0].payload), E_FAIL);
        assert_eq!(rig.dev.poll(h, None), 0);
    }

    #[test]
    fn unknown_icmsgtype_dropped_without_reply() {
        let rig = Rig::new();
        rig.daemon();
        let heartbeat =
            vmbus::ic::build_ic_message(msgtype::HEARTBEAT, FW_3_0, FW_3_0, 0, &[0; 40]);
        rig.host(1, &heartbeat);
        assert!(rig.chan.sent().is_empty());
        assert!(!rig.chan.has_pending());
        assert_eq!(rig.dev.state(), State::Ready);
    }

    #[test]
    fn oversized_packet_wedges_channel() {
        let rig = Rig::new();
        rig.daemon();
        rig.chan.push_raw(1, vec![0; RECV_LIMIT + 8]);
        rig.dev.on_channel_callback();
        rig.host(2, &negotiate(&[FW_3_0], &[SRV_1_1]));
        rig.dev.on_channel_callback();
        assert!(rig.chan.sent().is_empty());
        assert!(rig.chan.has_pending());
    }

    #[test]
    fn packet_of_exactly_8192_bytes_is_read_on_linux_6_1() {
        let rig = Rig::new();
        let mut req = op(op::COMPLETE_FCOPY);
        req.resize(RECV_LIMIT, 0);
        rig.host(1, &req);
        assert_eq!(rig.chan.sent()[0].payload.len(), RECV_LIMIT);
    }

    #[test]
    fn empty_packet_is_ignored_on_linux_6_1() {
        let rig = Rig::new();
        rig.daemon();
        rig.host(1, &[]);
        assert!(rig.chan.sent().is_empty());
        assert_eq!(rig.dev.state(), State::Ready);
    }

    #[test]
    fn packet_shorter_than_ic_header_dropped_without_reply_on_linux_6_1() {
        let rig = Rig::new();
        rig.daemon();
        rig.host(1, &[0; 20]);
        assert!(rig.chan.sent().is_empty());
        assert_eq!(rig.dev.state(), State::Ready);
    }

    #[test]
    fn fcopy_packet_without_room_for_fcopy_header_dropped_without_reply_on_linux_6_1() {
        let rig = Rig::new();
        rig.daemon();
        // 28 + 28 = 56 bytes (already a multiple of 8) < 64.
        rig.host(1, &fcopy(&[0; 28]));
        assert!(rig.chan.sent().is_empty());
        assert_eq!(rig.dev.state(), State::Ready);
    }

    #[test]
    fn start_delivers_1088_converted_bytes_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.daemon();
        rig.host(
            1,
            &start("résumé.txt", "/tmp/ü", CREATE_PATH | OVER_WRITE, 123_456),
        );
        let msg = rig.read(h).unwrap();
        assert_eq!(msg.len(), 1088);
        let start = StartFcopy::read_from_bytes(&msg).unwrap();
        assert_eq!(start.hdr.operation.get(), op::START_FILE_COPY);
        assert_eq!(start.hdr.service_id0, [0; 16]);
        assert_eq!(StartFcopy::utf8_name(&start.file_name), "résumé.txt");
        assert_eq!(StartFcopy::utf8_name(&start.path_name), "/tmp/ü");
        assert!(start.file_name["résumé.txt".len()..]
            .iter()
            .all(|&b| b == 0));
        assert_eq!(start.copy_flags.get(), CREATE_PATH | OVER_WRITE);
        assert_eq!(start.file_size.get(), 123_456);
    }

    #[test]
    fn write_delivers_exactly_6196_bytes() {
        let rig = Rig::new();
        let h = rig.daemon();
        let data: Vec<u8> = (0..6144u32).map(|i| (i % 251) as u8).collect();
        let req = write(4096, &data);
        rig.host(1, &req);
        let msg = rig.read(h).unwrap();
        assert_eq!(msg.len(), 6196);
        assert_eq!(msg, &req[28..]);
        assert_eq!(&msg[52..], &data[..]);
    }

    #[test]
    fn short_write_packet_delivers_stale_bytes_past_its_end_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.daemon();
        let full = write(0, &[0xaa; 6144]);
        rig.host(1, &full);
        rig.read(h).unwrap();
        rig.write_u32(h, 0).unwrap();
        // A WRITE packet cut after 100 data bytes: the rest of the 6196 come from the
        // previous packet still in the receive buffer.
        let mut short = write(0, &[0xbb; 100]);
        short.truncate(28 + 52 + 100);
        rig.host(2, &short);
        let msg = rig.read(h).unwrap();
        assert_eq!(msg.len(), 6196);
        let short = padded(&short);
        assert_eq!(&msg[..short.len() - 28], &short[28..]);
        assert_eq!(&msg[short.len() - 28..], &full[short.len()..]);
    }

    #[test]
    fn complete_delivers_recvlen_bytes_with_stale_tail() {
        let rig = Rig::new();
        let h = rig.daemon();
        let earlier = write(7, &[0x5a; 6144]);
        rig.host(1, &earlier);
        rig.read(h).unwrap();
        rig.write_u32(h, 0).unwrap();
        rig.chan.wait_sent(1);
        let complete = op(op::COMPLETE_FCOPY);
        assert_eq!(complete.len(), 64);
        rig.host(2, &complete);
        let msg = rig.read(h).unwrap();
        // recvlen (64) bytes from offset 28: the 36-byte header, then 28 stale bytes that
        // the WRITE left at buffer offsets 64..92.
        assert_eq!(msg.len(), 64);
        assert_eq!(&msg[..36], &complete[28..]);
        assert_eq!(&msg[36..], &earlier[64..92]);
    }

    #[test]
    fn unknown_operation_is_delivered_raw_on_linux_6_1() {
        let rig = Rig::new();
        let h = rig.daemon();
        let req = op(42);
        rig.host(1, &req);
        let msg = rig.read(h).unwrap();
        assert_eq!(msg.len(), 64);
        assert_eq!(&msg[..4], &42u32.to_le_bytes());
    }

    #[test]
    fn timeout_replies_e_fail() {
        let rig = Rig::with_timeout(Duration::from_millis(20));
        let h = rig.daemon();
        let req = start("f", "/tmp", 0, 1);
        rig.host(21, &req);
        let sent = rig.chan.wait_sent(1);
        assert_eq!(sent, vec![reply_to(21, &req, E_FAIL)]);
        rig.wait_ready_after_timeout();
        let _ = h;
    }

    #[test]
    fn timed_out_message_stays_queued_and_late_reply_is_einval_on_linux_6_1() {
        let (rig, h) = daemon_with_timed_out_start();
        // The daemon reads the stale message later and answers it: EINVAL.
        assert_eq!(rig.read(h).unwrap().len(), 1088);
        assert_eq!(rig.write_u32(h, 0), Err(Errno::EINVAL));
        assert_eq!(rig.chan.sent().len(), 1);
    }

    #[test]
    fn request_while_stale_message_unread_fails_at_once_on_linux_6_1() {
        let (rig, h) = daemon_with_timed_out_start();
        // The timed-out START still blocks the slot: the next request cannot be queued
        // (EFAULT from hvutil_transport_send) and is failed at once.
        let req = op(op::CANCEL_FCOPY);
        rig.host(2, &req);
        assert_eq!(rig.chan.sent()[1], reply_to(2, &req, E_FAIL));
        assert_eq!(rig.dev.state(), State::Ready);
        // The daemon still gets the old START.
        assert_eq!(rig.read(h).unwrap().len(), 1088);
    }

    // ---- §7: the whole 6.1 daemon sequence ----------------------------------------------

    #[test]
    fn full_daemon_sequence_on_linux_6_1() {
        let rig = Rig::new();
        // 1. The daemon opens and registers (blocking in its first read on its own thread).
        let h = rig.open();
        assert_eq!(rig.write_u32(h, FCOPY_VERSION_1), Ok(4));
        let daemon = {
            let dev = rig.dev.clone();
            thread::spawn(move || {
                let read = |dev: &Fcopy61| read_at(dev, h, DO_FCOPY_LEN as u32, 0);
                let mut got = Vec::new();
                assert_eq!(read(&dev).unwrap(), vec![1, 0, 0, 0]);
                for _ in 0..4 {
                    let msg = read(&dev).unwrap();
                    let operation = u32::from_le_bytes(msg[..4].try_into().unwrap());
                    got.push((operation, msg.len()));
                    let status = if operation == op::WRITE_TO_FILE {
                        status::HV_ERROR_DISK_FULL
                    } else {
                        0
                    };
                    assert_eq!(write_at(&*dev, h, &status.to_le_bytes(), 0), Ok(4));
                }
                got
            })
        };
        // 2. Negotiation (at any time).
        rig.host(100, &negotiate(&[FW_3_0], &[SRV_1_1]));
        rig.chan.wait_sent(1);
        // 3.-5. START, two WRITEs, COMPLETE; the host waits for each reply.
        let requests = [
            start("file.bin", "/tmp/dir", CREATE_PATH, 7000),
            write(0, &[1; 6144]),
            write(6144, &[2; 856]),
            op(op::COMPLETE_FCOPY),
        ];
        wait_for("the daemon to register", || rig.dev.state() == State::Ready);
        for (i, req) in requests.iter().enumerate() {
            rig.host(101 + i as u64, req);
            let sent = rig.chan.wait_sent(2 + i);
            let reply = &sent[1 + i];
            assert_eq!(reply.trans_id, 101 + i as u64);
            assert_eq!(reply.payload.len(), padded(req).len());
            let expected = if i == 1 || i == 2 {
                status::HV_ERROR_DISK_FULL
            } else {
                0
            };
            assert_eq!(status_of(&reply.payload), expected);
            wait_for("READY between requests", || rig.dev.state() == State::Ready);
        }
        assert_eq!(
            daemon.join().unwrap(),
            vec![(0, 1088), (1, 6196), (1, 6196), (2, 64)]
        );
    }
}
