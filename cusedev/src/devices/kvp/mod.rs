//! `/dev/vmbus/hv_kvp`: the Hyper-V key-value exchange (drivers/hv/hv_kvp.c, Linux 6.1).
//!
//! A Hyper-V host keeps "KVP pools" of string pairs per guest: the host writes some (the
//! External pool, SET/DELETE), reads what the guest publishes (ENUMERATE of the Auto pool:
//! FQDN, OS name, IP addresses...) and can ask for or set an adapter's IP configuration
//! (GET_IP_INFO / SET_IP_INFO, used for failover IP injection). The kernel driver stores
//! nothing: it converts each host request from UTF-16 to a 7432-byte UTF-8 message for
//! `hv_kvp_daemon`, which keeps the pools in `/var/lib/hyperv/.kvp_pool_<n>`, and converts the
//! daemon's answer back into the host's buffer (the conversions are in [`convert`]).
//!
//! Only the 6.1 driver is modelled (the row's `linux-3.14` profile is refused by [`probe`]:
//! the 3.x driver spoke netlink to its daemon, which cusedev cannot offer). What a daemon and
//! a host notice (kvp-vss.md §3):
//!
//! * the char device is the shared [hvutil transport](super::hvutil_transport) (EBUSY,
//!   blocking reads, EINVAL keeping the message, POLLIN|POLLRDNORM, EBADF after rescind);
//! * registration: a 7432-byte write with op 100 (or legacy 4) queues a 7432-byte answer,
//!   `(op, "3.1")`; the driver becomes READY when the daemon *reads* it, and then polls the
//!   channel. A second registration before that read is accepted and its answer lost (the
//!   send failure is ignored, unlike fcopy's EFAULT);
//! * **negotiation quirk**: while no daemon is registered the channel callback does not read
//!   the ring at all (the first time it starts a 55 s timer that only re-runs the callback),
//!   so a host's NEGOTIATE, and any request after it, stays unanswered until a daemon has
//!   registered. The "no daemon → HV_E_FAIL" branch of the request path is dead code in 6.1
//!   for that reason (reachable only in a kernel race our lock rules out);
//! * a request is the daemon's message for 30 s; then HV_E_FAIL, and the unread message stays
//!   queued (the next request then fails at once: the slot is taken);
//! * the daemon closing the device answers a pending request with HV_E_FAIL and unregisters
//!   it; requests then wait in the ring for the next daemon.
//!
//! Not modelled: suspend (pre-suspend forces READY), the netlink connector (CN_KVP_IDX 9),
//! and the VMBus < WIN8_1 rules (our bus never negotiates below 4.0).
//!
//! Threads are as in [`fcopy`](super::fcopy::linux_6_1): the callback is serialised by a
//! mutex, the send-work runs inline at the end of the callback, the two timers are
//! [`DelayedWork`]s, and the re-poll `hv_poll_channel()` asks for runs on the thread that ended
//! the transaction once it lets go of the driver lock.

pub(crate) mod convert;
#[cfg(test)]
mod tests;

use std::io;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use log::{debug, error, info, warn};
use vmbus::ic::{msgtype, set_reply, set_response_flags, ICMSG_HDR_LEN};
use vmbus::kvp::{op, KvpMsg, DRV_VERSION, HV_E_FAIL, HV_S_CONT};
use vmbus::negotiate::{prep_negotiate_resp, KVP_FW_VERSIONS, KVP_SRV_VERSIONS};

use crate::bus::channel::{ChannelDriver, HostChannel};
use crate::device::Errno;
use crate::devices::delayed_work::DelayedWork;
use crate::devices::hv_util;
use crate::devices::hv_util::RecvBuffer;
use crate::devices::hvutil_transport::{
    HvutilDeviceState as State, HvutilDriver, HvutilService, HvutilTransport, Shared, Transport,
};
use crate::table::{ChannelDevice, ProbeError, Profile};

/// The misc device name.
pub const DEVICE_NAME: &str = "vmbus/hv_kvp";

/// `HV_UTIL_TIMEOUT`: how long the daemon has to answer a host request.
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(30);

/// `HV_UTIL_NEGO_TIMEOUT` (55 s since v4.10): the re-poll while no daemon is registered.
pub const NEGO_TIMEOUT: Duration = Duration::from_secs(55);

/// The length limit hv_kvp passes to `vmbus_recvpacket()`: `HV_HYP_PAGE_SIZE * 4`.
pub const RECV_LIMIT: usize = 4 * 4096;

/// Why the `linux-3.14` profile is refused.
pub const NOT_MODELLED_3_14: &str =
    "hv_kvp of Linux 3.14 is not modelled; use --profile kvp=linux-6.1";

/// `host_negotiatied` (sic), a static in the kernel's callback: whether the host's NEGOTIATE
/// has been answered, and whether the 55 s re-poll has been armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Nego {
    /// `NEGO_NOT_STARTED`.
    NotStarted,
    /// `NEGO_IN_PROGRESS`: the re-poll timer was armed once.
    InProgress,
    /// `NEGO_FINISHED`: a NEGOTIATE was answered.
    Finished,
}

/// The 6.1 hv_kvp driver of one channel.
pub struct Kvp61 {
    hvt: HvutilTransport<Service>,
    /// The channel callback runs in one tasklet per channel: never twice at once. Taken
    /// before the driver lock, never while holding it.
    callback_serial: Mutex<()>,
    /// `kvp_timeout_work`.
    timer: Arc<DelayedWork>,
    /// `kvp_host_handshake_work`.
    handshake_timer: Arc<DelayedWork>,
}

/// The kvp service state (`kvp_transaction`, `dm_reg_value`, `host_negotiatied`), under the
/// driver lock.
pub(crate) struct Service {
    state: State,
    /// `dm_reg_value`: [`op::REGISTER`] or [`op::REGISTER1`] once a daemon registered.
    dm_reg_value: Option<u8>,
    nego: Nego,
    channel: Arc<dyn HostChannel>,
    recv: RecvBuffer,
    /// `recv_len` of the request in hand: the length of the reply.
    recv_len: usize,
    recv_req_id: u64,
    /// `vmbus_close()` has run: no more callbacks, replies dropped.
    channel_closed: bool,
    timer: Arc<DelayedWork>,
    handshake_timer: Arc<DelayedWork>,
    timeout: Duration,
    nego_timeout: Duration,
    /// `hv_poll_channel()` was asked for with a packet waiting.
    repoll: bool,
}

impl Kvp61 {
    /// `hv_kvp_init()` on `channel`: state DEVICE_INIT, transport in INIT mode. Fails only
    /// when a timer's thread cannot be started (a first one started ends with the error).
    pub fn new(
        channel: Arc<dyn HostChannel>,
        timeout: Duration,
        nego_timeout: Duration,
    ) -> io::Result<Arc<Kvp61>> {
        let timer = DelayedWork::spawn("hv_kvp-timer")?;
        let handshake_timer = DelayedWork::spawn("hv_kvp-nego")?;
        Ok(Arc::new_cyclic(|me: &Weak<Kvp61>| {
            let timer = Arc::new(timer.bind_driver(me.clone(), Kvp61::timeout_work));
            let handshake_timer =
                Arc::new(handshake_timer.bind_driver(me.clone(), Kvp61::host_handshake_work));
            let service = Service {
                state: State::DeviceInit,
                dm_reg_value: None,
                nego: Nego::NotStarted,
                channel,
                recv: RecvBuffer::new(),
                recv_len: 0,
                recv_req_id: 0,
                channel_closed: false,
                timer: timer.clone(),
                handshake_timer: handshake_timer.clone(),
                timeout,
                nego_timeout,
                repoll: false,
            };
            Kvp61 {
                hvt: HvutilTransport::new(service),
                callback_serial: Mutex::new(()),
                timer,
                handshake_timer,
            }
        }))
    }

    /// `kvp_timeout_func()`: "the user-mode component has not responded".
    fn timeout_work(&self) {
        {
            let mut guard = self.hvt.lock();
            let svc = &mut guard.svc;
            warn!(
                "hv_kvp: the daemon did not answer {} within {:?}; replying HV_E_FAIL (its \
                 unread message stays queued, drivers/hv/hv_kvp.c 6.1)",
                op_name(svc.operation()),
                svc.timeout
            );
            svc.respond_to_host(None, HV_E_FAIL);
            svc.poll_wrapper();
        }
        self.repoll_if_asked();
    }

    /// `kvp_host_handshake_func()`: `tasklet_schedule()` of the channel callback, nothing
    /// more. With no daemon yet, that callback returns at once again.
    fn host_handshake_work(&self) {
        debug!("hv_kvp: {NEGO_TIMEOUT:?} negotiation re-poll");
        self.on_channel_callback();
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

impl Drop for Kvp61 {
    fn drop(&mut self) {
        self.timer.shutdown();
        self.handshake_timer.shutdown();
    }
}

/// A short name for a kvp operation, for logs.
fn op_name(operation: u8) -> &'static str {
    match operation {
        op::GET => "GET",
        op::SET => "SET",
        op::DELETE => "DELETE",
        op::ENUMERATE => "ENUMERATE",
        op::GET_IP_INFO => "GET_IP_INFO",
        op::SET_IP_INFO => "SET_IP_INFO",
        _ => "unknown operation",
    }
}

impl Service {
    /// The operation of the host request in the receive buffer.
    fn operation(&mut self) -> u8 {
        self.recv
            .as_mut_slice()
            .get(convert::OP_AT)
            .copied()
            .unwrap_or(0)
    }

    /// `kvp_respond_to_host(msg_to_host, error)`: the daemon's answer (or the driver's own
    /// failure) patched into the receive buffer, `recv_len` bytes echoed with the status and
    /// icflags TRANSACTION|RESPONSE under the host's transaction id.
    fn respond_to_host(&mut self, reply: Option<&[u8]>, error: u32) {
        if self.channel_closed {
            // "We have raced with util driver being unloaded; silently return."
            debug!("hv_kvp: channel closed, reply {error:#x} dropped");
            return;
        }
        let buf = self.recv.as_mut_slice();
        let status = convert::respond(buf, reply, error);
        // The buffer is always longer than the IC header.
        let _ = set_reply(buf, status);
        let reply = self.recv.bytes(0, self.recv_len);
        debug!(
            "hv_kvp: replying {status:#x} ({}) to host request {} ({} bytes)",
            vmbus::ic::status_meaning(status),
            self.recv_req_id,
            reply.len()
        );
        self.channel.send_inband(self.recv_req_id, &reply);
    }

    /// `kvp_poll_wrapper()` via `hv_poll_channel()`: READY, then the channel callback again
    /// (asked for only when a packet waits; see fcopy's `poll_wrapper` for why that is
    /// enough).
    fn poll_wrapper(&mut self) {
        self.state = State::Ready;
        if self.channel.has_pending() {
            self.repoll = true;
        }
    }

    /// `kvp_register_done()`: the daemon has read our registration answer. "If we're still
    /// negotiating with the host cancel the timeout work to not poll the channel twice."
    fn register_done(&mut self) {
        debug!("hv_kvp: userspace daemon registered");
        self.handshake_timer.cancel();
        self.poll_wrapper();
    }

    /// `kvp_handle_handshake()` + `kvp_register()`.
    fn handle_handshake(
        &mut self,
        hvt: &mut Transport<Service>,
        operation: u8,
    ) -> Result<(), Errno> {
        match operation {
            op::REGISTER => {
                info!("hv_kvp: IP injection functionality not available; upgrade the KVP daemon");
            }
            op::REGISTER1 => {}
            other => {
                warn!(
                    "hv_kvp: incompatible daemon (KVP version {}, daemon version {other}); EINVAL",
                    op::REGISTER1
                );
                return Err(Errno::EINVAL);
            }
        }
        self.dm_reg_value = Some(operation);
        info!("hv_kvp: userspace daemon ver. {operation} connected");
        // kvp_register(): a zeroed hv_kvp_msg with the daemon's op and HV_DRV_VERSION "3.1".
        // Its send can fail (an earlier answer still unread): ignored, the write still
        // succeeds (hv_kvp.c 6.1 does not look at hvutil_transport_send()'s result here).
        let answer = KvpMsg::register(operation, DRV_VERSION);
        if let Err(errno) = hvt.send(&answer.to_vec(), Some(Box::new(Service::register_done))) {
            warn!("hv_kvp: registration answer not queued ({errno}); ignored as in Linux 6.1");
        }
        Ok(())
    }

    /// `hv_kvp_onchannelcallback()`: reads at most one host packet.
    fn channel_callback(&mut self, hvt: &mut Transport<Service>) {
        if self.channel_closed {
            return;
        }
        if self.state < State::Ready {
            // "If userspace daemon is not connected and host is asking us to negotiate we
            // need to delay to not lose messages. This is important for Failover IP setting."
            // The ring is not read; the timer only calls this callback again.
            if self.nego == Nego::NotStarted {
                self.nego = Nego::InProgress;
                self.handshake_timer.schedule(self.nego_timeout);
                debug!(
                    "hv_kvp: host packet before any daemon registered: left in the ring, \
                     re-poll in {:?}",
                    self.nego_timeout
                );
            }
            return;
        }
        if self.state > State::Ready {
            return;
        }
        let packet = match self.channel.recv(RECV_LIMIT) {
            Ok(Some(packet)) => packet,
            Ok(None) => return,
            Err(e) => {
                error!("hv_kvp: KVP request received. Could not read into recv buf: {e}");
                return;
            }
        };
        let recvlen = self.recv.fill(&packet.payload);
        let requestid = packet.trans_id;
        if recvlen == 0 {
            return;
        }
        if recvlen < ICMSG_HDR_LEN {
            warn!("hv_kvp: KVP request received. Packet length too small: {recvlen}; dropped");
            return;
        }
        match self.recv.icmsgtype() {
            msgtype::NEGOTIATE => {
                let buf = self
                    .recv
                    .as_mut_slice()
                    .get_mut(..recvlen)
                    .unwrap_or_default();
                match prep_negotiate_resp(buf, KVP_FW_VERSIONS, KVP_SRV_VERSIONS) {
                    Some((fw, srv)) => info!("hv_kvp: KVP IC version {srv} (framework {fw})"),
                    None => warn!(
                        "hv_kvp: host NEGOTIATE shares no version with framework 3.0/1.0, \
                         kvp 4.0/3.0/1.0 (or is malformed); answering with zero counts"
                    ),
                }
                let _ = set_response_flags(buf);
                self.channel.send_inband(requestid, buf);
                self.nego = Nego::Finished;
                self.poll_wrapper();
            }
            msgtype::KVPEXCHANGE => {
                // "recvlen is not checked against sizeof(struct kvp_msg) because kvp_msg
                // contains a union of structs and the msg type received is not known."
                self.recv_len = recvlen;
                self.recv_req_id = requestid;
                if self.state < State::Ready {
                    // "Userspace is not registered yet" (unreachable: checked above).
                    self.respond_to_host(None, HV_E_FAIL);
                    return;
                }
                self.state = State::HostmsgReceived;
                // schedule_work(&kvp_sendkey_work); schedule_delayed_work(&kvp_timeout_work):
                // armed before the (inline) send-work, so that its failure path finds it.
                self.timer.schedule(self.timeout);
                self.send_key(hvt);
            }
            other => warn!(
                "hv_kvp: KVP request received. Invalid msg type: {other}; dropped without reply"
            ),
        }
    }

    /// `kvp_send_key()`: the daemon's message for the request in the receive buffer.
    fn send_key(&mut self, hvt: &mut Transport<Service>) {
        let message = convert::daemon_message(self.recv.as_mut_slice());
        let operation = message.hdr.operation;
        // "Since the message is being sent to userspace, we can assume the state is
        // HVUTIL_USERSPACE_REQ."
        self.state = State::UserspaceReq;
        debug!(
            "hv_kvp: host request {} (id {}, pool {}, {} bytes) handed to the daemon",
            op_name(operation),
            self.recv_req_id,
            message.hdr.pool,
            self.recv_len
        );
        if let Err(errno) = hvt.send(&message.to_vec(), None) {
            warn!(
                "hv_kvp: failed to communicate to the daemon ({errno}{}); replying HV_E_FAIL",
                if errno == Errno::EFAULT {
                    ": its previous message is still unread"
                } else {
                    ""
                }
            );
            if self.timer.cancel() {
                self.respond_to_host(None, HV_E_FAIL);
                self.state = State::Ready;
            }
        }
    }
}

impl HvutilService for Service {
    /// `kvp_on_msg()`: the daemon's registration or its answer.
    fn on_msg(&mut self, hvt: &mut Transport<Self>, msg: &[u8]) -> Result<(), Errno> {
        // `len < sizeof(*message)`: EINVAL. Longer writes are taken (their tail is ignored).
        let Ok(message) = KvpMsg::from_prefix(msg) else {
            return Err(Errno::EINVAL);
        };
        let operation = message.hdr.operation;
        // "If we are negotiating the version information with the daemon; handle that first."
        if self.state < State::Ready {
            return self.handle_handshake(hvt, operation);
        }
        // "We didn't send anything to userspace so the reply is spurious"
        if self.state < State::UserspaceReq {
            warn!(
                "hv_kvp: daemon wrote with no request pending (state {:?}); EINVAL",
                self.state
            );
            return Err(Errno::EINVAL);
        }
        self.state = State::UserspaceRecv;
        // "Based on the version of the daemon, we propagate errors from the daemon
        // differently."
        let error = match self.dm_reg_value {
            // "Null string is used to pass back error condition."
            Some(op::REGISTER) if message.enumerate().data.key[0] == 0 => HV_S_CONT,
            // "We use the message header information from the user level daemon to
            // transmit errors."
            Some(op::REGISTER1) => message.error(),
            _ => 0,
        };
        // "Complete the transaction by forwarding the key value to the host. But first,
        // cancel the timeout." A timer already firing wins: the answer is dropped, write
        // still returns the full length.
        if self.timer.cancel() {
            debug!(
                "hv_kvp: daemon answered {error:#x} ({})",
                vmbus::ic::status_meaning(error)
            );
            self.respond_to_host(Some(msg), error);
            self.poll_wrapper();
        } else {
            warn!("hv_kvp: daemon answered as the timeout fired; answer dropped");
        }
        Ok(())
    }

    /// `kvp_on_reset()`: the daemon closed the device.
    fn on_reset(&mut self) {
        if self.timer.cancel() {
            warn!(
                "hv_kvp: daemon closed the device with {} pending; replying HV_E_FAIL",
                op_name(self.operation())
            );
            self.respond_to_host(None, HV_E_FAIL);
        }
        self.state = State::DeviceInit;
        debug!("hv_kvp: daemon closed the device");
    }
}

/// The char device is the transport's (see [`HvutilDriver`]).
impl HvutilDriver for Kvp61 {
    type Service = Service;
    const NODE: &'static str = DEVICE_NAME;

    fn transport(&self) -> &HvutilTransport<Service> {
        &self.hvt
    }

    fn repoll_if_asked(&self) {
        Kvp61::repoll_if_asked(self)
    }
}

impl ChannelDriver for Kvp61 {
    /// The channel callback, and again as long as it asked for a re-poll with a packet
    /// waiting: `hv_poll_channel()` after a NEGOTIATE (or a registration, an answer, a
    /// timeout) schedules the callback once more, which reads the next packet.
    fn on_channel_callback(&self) {
        loop {
            {
                let _serial = self
                    .callback_serial
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let mut guard = self.hvt.lock();
                let Shared { hvt, svc } = &mut *guard;
                svc.channel_callback(hvt);
            }
            if !std::mem::take(&mut self.hvt.lock().svc.repoll) {
                break;
            }
        }
    }

    /// `util_remove()`: `hv_kvp_deinit()` then `vmbus_close()`.
    fn on_rescind(&self) {
        info!("hv_kvp: channel rescinded; waiting for the daemon to close the device");
        // hv_kvp_deinit(): DYING, cancel both timers (a pending request gets no reply) and
        // the send-work (inline here), destroy the transport.
        self.hvt.lock().svc.state = State::DeviceDying;
        self.handshake_timer.cancel_sync();
        self.timer.cancel_sync();
        self.hvt.destroy();
        {
            let _serial = self
                .callback_serial
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.hvt.lock().svc.channel_closed = true;
        }
        self.timer.shutdown();
        self.handshake_timer.shutdown();
        info!("hv_kvp: device removed");
    }
}

/// The 6.1 hv_kvp driver on `channel`, with the kernel's timeouts.
/// Fails only when a timer thread cannot be started.
pub fn new(channel: Arc<dyn HostChannel>) -> io::Result<Arc<dyn ChannelDevice>> {
    Ok(Kvp61::new(channel, DAEMON_TIMEOUT, NEGO_TIMEOUT)?)
}

/// The driver table's probe for a KVP offer: the 6.1 model; `linux-3.14` is refused with
/// [`NOT_MODELLED_3_14`] (the bus client logs it and leaves the offer alone).
pub fn probe(
    channel: Arc<dyn HostChannel>,
    profile: &Profile,
    _options: &clap::ArgMatches,
) -> Result<Arc<dyn ChannelDevice>, ProbeError> {
    hv_util::probe_linux_6_1_only(profile, NOT_MODELLED_3_14, || {
        new(channel).map_err(ProbeError::Resources)
    })
}
