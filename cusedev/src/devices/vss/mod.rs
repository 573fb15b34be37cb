//! `/dev/vmbus/hv_vss`: the Hyper-V volume shadow copy service (drivers/hv/hv_snapshot.c,
//! Linux 6.1).
//!
//! Before a host takes a backup of a running guest ("production checkpoint", VSS-based
//! backup) it asks the guest to freeze its file systems so that the disk image is consistent,
//! and to thaw them afterwards. The kernel driver does no freezing itself: it forwards
//! FREEZE, THAW and the HOT_BACKUP feature check to `hv_vss_daemon` as a 12-byte message
//! carrying only the operation, waits for the daemon's status (15 minutes for a FREEZE,
//! 30 s otherwise) and echoes the host's packet with that status. The other operations are
//! answered by the driver at once (GET_DM_INFO with flags 0, everything else with 0).
//!
//! Only the 6.1 driver is modelled; the row's `linux-3.14` profile is refused by [`probe`].
//! What a daemon and a host notice (kvp-vss.md §5):
//!
//! * the char device is the shared [hvutil transport](super::hvutil_transport);
//! * a daemon write must be exactly 12 bytes; op 129 registers with a 4-byte answer (129)
//!   and READY once it is read; the legacy op 128 is accepted without answer and leaves the
//!   driver in DEVICE_INIT;
//! * unlike kvp, the channel is read (and NEGOTIATE answered) before any daemon registers;
//!   FREEZE/THAW/HOT_BACKUP then fail with HV_E_FAIL at once;
//! * **quirk**: answering an operation the driver handles itself ends with
//!   `hv_poll_channel(vss_poll_wrapper)`, which forces READY whatever the state was. After a
//!   host's CREATE or GET_DM_INFO a daemon that opened the device but never registered (or
//!   registered the legacy way) is given FREEZE/THAW requests (hv_snapshot.c 6.1, as
//!   written);
//! * **quirk**: a daemon reply whose byte 0 is HOT_BACKUP (2) makes the driver set the host's
//!   flags to VSS_HBU_NO_AUTO_RECOVERY; the 6.1 daemon writes its status over that byte
//!   (0 or 0x05), so through it the host's own flags come back;
//! * the daemon closing the device answers a pending request with HV_E_FAIL.
//!
//! Not modelled: LUN information in large FREEZE packets (kvp-vss.md §1.2), suspend (the
//! fake THAW of pre-suspend), the netlink connector (CN_VSS_IDX 0xA). The driver's refusal
//! to load on VMBus < WIN8_1 (3.0) cannot arise: the bus client negotiates only VMBus 4.0 and
//! newer (`cusedev/src/bus/client.rs`), and the probe is not told the version.
//!
//! Threads as in [`kvp`](super::kvp): the handle-request work runs inline at the end of the
//! callback, the timeout is a [`DelayedWork`].

#[cfg(test)]
mod tests;

use std::io;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use log::{debug, error, info, warn};
use vmbus::ic::{msgtype, set_reply, set_response_flags, ICMSG_HDR_LEN};
use vmbus::negotiate::{prep_negotiate_resp, VSS_FW_VERSIONS, VSS_SRV_VERSIONS};
use vmbus::vss::{op, VssMsg, HV_E_FAIL, MSG_LEN, VSS_HBU_NO_AUTO_RECOVERY};

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
pub const DEVICE_NAME: &str = "vmbus/hv_vss";

/// `HV_UTIL_TIMEOUT`: how long the daemon has for THAW and HOT_BACKUP.
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(30);

/// `VSS_FREEZE_TIMEOUT` (15 × 60 s): how long the daemon has for a FREEZE.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// `VSS_MAX_PKT_SIZE` / the `vmbus_recvpacket()` limit: `HV_HYP_PAGE_SIZE * 2`.
pub const RECV_LIMIT: usize = 2 * 4096;

/// Why the `linux-3.14` profile is refused.
pub const NOT_MODELLED_3_14: &str =
    "hv_vss of Linux 3.14 is not modelled; use --profile vss=linux-6.1";

/// `VSS_OP_REGISTER1` as the u32 the driver answers a registration with.
const OUR_VERSION: u32 = op::REGISTER1 as u32;

/// Offset of the host message's `vss_hdr.operation` in the receive buffer.
const OP_AT: usize = ICMSG_HDR_LEN;
/// Offset of the host message's `vss_cf.flags` / `dm_info.flags` in the receive buffer.
const FLAGS_AT: usize = ICMSG_HDR_LEN + 8;

/// The 6.1 hv_vss driver of one channel.
pub struct Vss61 {
    hvt: HvutilTransport<Service>,
    /// One callback at a time (the kernel's per-channel tasklet).
    callback_serial: Mutex<()>,
    /// `vss_timeout_work`.
    timer: Arc<DelayedWork>,
}

/// The vss service state (`vss_transaction`, `dm_reg_value`), under the driver lock.
pub(crate) struct Service {
    state: State,
    /// `dm_reg_value`: [`op::REGISTER`] or [`op::REGISTER1`].
    dm_reg_value: Option<u8>,
    channel: Arc<dyn HostChannel>,
    recv: RecvBuffer,
    recv_len: usize,
    recv_req_id: u64,
    channel_closed: bool,
    timer: Arc<DelayedWork>,
    timeout: Duration,
    freeze_timeout: Duration,
    repoll: bool,
}

impl Vss61 {
    /// `hv_vss_init()` on `channel`: state DEVICE_INIT, transport in INIT mode. Fails only
    /// when the timer's thread cannot be started.
    pub fn new(
        channel: Arc<dyn HostChannel>,
        timeout: Duration,
        freeze_timeout: Duration,
    ) -> io::Result<Arc<Vss61>> {
        let timer = DelayedWork::spawn("hv_vss-timer")?;
        Ok(Arc::new_cyclic(|me: &Weak<Vss61>| {
            let timer = Arc::new(timer.bind_driver(me.clone(), Vss61::timeout_work));
            let service = Service {
                state: State::DeviceInit,
                dm_reg_value: None,
                channel,
                recv: RecvBuffer::new(),
                recv_len: 0,
                recv_req_id: 0,
                channel_closed: false,
                timer: timer.clone(),
                timeout,
                freeze_timeout,
                repoll: false,
            };
            Vss61 {
                hvt: HvutilTransport::new(service),
                callback_serial: Mutex::new(()),
                timer,
            }
        }))
    }

    /// `vss_timeout_func()`: "Timeout waiting for userspace component to reply happened."
    fn timeout_work(&self) {
        {
            let mut guard = self.hvt.lock();
            let svc = &mut guard.svc;
            warn!(
                "hv_vss: timeout waiting for daemon to reply to {}; replying HV_E_FAIL",
                op_name(svc.operation())
            );
            svc.respond_to_host(HV_E_FAIL);
            svc.poll_wrapper();
        }
        self.repoll_if_asked();
    }

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

impl Drop for Vss61 {
    fn drop(&mut self) {
        self.timer.shutdown();
    }
}

/// A short name for a vss operation, for logs.
fn op_name(operation: u8) -> &'static str {
    match operation {
        op::CREATE => "CREATE",
        op::DELETE => "DELETE",
        op::HOT_BACKUP => "HOT_BACKUP",
        op::GET_DM_INFO => "GET_DM_INFO",
        op::BU_COMPLETE => "BU_COMPLETE",
        op::FREEZE => "FREEZE",
        op::THAW => "THAW",
        op::AUTO_RECOVER => "AUTO_RECOVER",
        _ => "unknown operation",
    }
}

impl Service {
    /// The operation of the host request in the receive buffer.
    fn operation(&mut self) -> u8 {
        self.recv.as_mut_slice().get(OP_AT).copied().unwrap_or(0)
    }

    /// Writes the host message's flags word in the receive buffer.
    fn set_host_flags(&mut self, flags: u32) {
        if let Some(slot) = self.recv.as_mut_slice().get_mut(FLAGS_AT..FLAGS_AT + 4) {
            slot.copy_from_slice(&flags.to_le_bytes());
        }
    }

    /// `vss_respond_to_host(error)`: status and icflags TRANSACTION|RESPONSE into the
    /// receive buffer, `recv_len` bytes echoed under the host's transaction id.
    fn respond_to_host(&mut self, error: u32) {
        if self.channel_closed {
            // "We have raced with util driver being unloaded; silently return."
            debug!("hv_vss: channel closed, reply {error:#x} dropped");
            return;
        }
        let _ = set_reply(self.recv.as_mut_slice(), error);
        let reply = self.recv.bytes(0, self.recv_len);
        debug!(
            "hv_vss: replying {error:#x} ({}) to host request {} ({} bytes)",
            vmbus::ic::status_meaning(error),
            self.recv_req_id,
            reply.len()
        );
        self.channel.send_inband(self.recv_req_id, &reply);
    }

    /// `vss_poll_wrapper()` via `hv_poll_channel()`: READY (whatever the state was), then the
    /// channel callback again.
    fn poll_wrapper(&mut self) {
        self.state = State::Ready;
        if self.channel.has_pending() {
            self.repoll = true;
        }
    }

    /// `vss_register_done()`.
    fn register_done(&mut self) {
        debug!("hv_vss: userspace daemon registered");
        self.poll_wrapper();
    }

    /// `vss_handle_handshake()`.
    fn handle_handshake(
        &mut self,
        hvt: &mut Transport<Service>,
        operation: u8,
    ) -> Result<(), Errno> {
        match operation {
            op::REGISTER => {
                // "Daemon doesn't expect us to reply". Nothing else either: the state stays
                // DEVICE_INIT (until the poll-wrapper quirk forces READY).
                self.dm_reg_value = Some(operation);
            }
            _ => {
                // VSS_OP_REGISTER1: "Daemon expects us to reply with our own version".
                if hvt
                    .send(
                        &OUR_VERSION.to_le_bytes(),
                        Some(Box::new(Service::register_done)),
                    )
                    .is_err()
                {
                    return Err(Errno::EFAULT);
                }
                self.dm_reg_value = Some(operation);
            }
        }
        info!("hv_vss: userspace daemon ver. {operation} connected");
        Ok(())
    }

    /// `hv_vss_onchannelcallback()`: reads at most one host packet.
    fn channel_callback(&mut self, hvt: &mut Transport<Service>) {
        if self.channel_closed || self.state > State::Ready {
            return;
        }
        let packet = match self.channel.recv(RECV_LIMIT) {
            Ok(Some(packet)) => packet,
            Ok(None) => return,
            Err(e) => {
                error!("hv_vss: VSS request received. Could not read into recv buf: {e}");
                return;
            }
        };
        let recvlen = self.recv.fill(&packet.payload);
        let requestid = packet.trans_id;
        if recvlen == 0 {
            return;
        }
        if recvlen < ICMSG_HDR_LEN {
            warn!("hv_vss: VSS request received. Packet length too small: {recvlen}; dropped");
            return;
        }
        match self.recv.icmsgtype() {
            msgtype::NEGOTIATE => {
                let buf = self
                    .recv
                    .as_mut_slice()
                    .get_mut(..recvlen)
                    .unwrap_or_default();
                match prep_negotiate_resp(buf, VSS_FW_VERSIONS, VSS_SRV_VERSIONS) {
                    Some((fw, srv)) => info!("hv_vss: VSS IC version {srv} (framework {fw})"),
                    None => warn!(
                        "hv_vss: host NEGOTIATE shares no version with framework 3.0 / vss 5.0 \
                         (or is malformed); answering with zero counts"
                    ),
                }
                let _ = set_response_flags(buf);
                self.channel.send_inband(requestid, buf);
            }
            msgtype::VSS => {
                // "Ensure recvlen is big enough to contain hv_vss_msg"
                if recvlen < ICMSG_HDR_LEN + MSG_LEN {
                    warn!("hv_vss: Invalid VSS msg. Packet length too small: {recvlen}; dropped");
                    return;
                }
                self.recv_len = recvlen;
                self.recv_req_id = requestid;
                // schedule_work(&vss_handle_request_work), run inline.
                self.handle_request(hvt);
            }
            other => warn!(
                "hv_vss: VSS request received. Invalid msg type: {other}; dropped without reply"
            ),
        }
    }

    /// `vss_handle_request()`.
    fn handle_request(&mut self, hvt: &mut Transport<Service>) {
        let operation = self.operation();
        match operation {
            // "Initiate a "freeze/thaw" operation in the guest. We respond to the host once
            // the operation is complete."
            op::FREEZE | op::THAW | op::HOT_BACKUP => {
                if self.state < State::Ready {
                    // "Userspace is not registered yet"
                    warn!(
                        "hv_vss: {} from the host with no daemon registered; replying HV_E_FAIL",
                        op_name(operation)
                    );
                    self.respond_to_host(HV_E_FAIL);
                    return;
                }
                self.state = State::HostmsgReceived;
                self.send_op(hvt, operation);
                return;
            }
            op::GET_DM_INFO => self.set_host_flags(0),
            _ => {}
        }
        debug!(
            "hv_vss: {} answered by the driver ({operation})",
            op_name(operation)
        );
        self.respond_to_host(0);
        // Forces READY even with no daemon (see the module docs).
        self.poll_wrapper();
    }

    /// `vss_send_op()`: a zeroed 12-byte message with only the operation.
    fn send_op(&mut self, hvt: &mut Transport<Service>, operation: u8) {
        let message = VssMsg::with_op(operation);
        self.state = State::UserspaceReq;
        self.timer.schedule(if operation == op::FREEZE {
            self.freeze_timeout
        } else {
            self.timeout
        });
        debug!(
            "hv_vss: host request {} (id {}) handed to the daemon",
            op_name(operation),
            self.recv_req_id
        );
        if let Err(errno) = hvt.send(&message.to_vec(), None) {
            warn!("hv_vss: failed to communicate to the daemon: {errno}; replying HV_E_FAIL");
            if self.timer.cancel() {
                self.respond_to_host(HV_E_FAIL);
                self.state = State::Ready;
            }
        }
    }
}

impl HvutilService for Service {
    /// `vss_on_msg()`.
    fn on_msg(&mut self, hvt: &mut Transport<Self>, msg: &[u8]) -> Result<(), Errno> {
        let Ok(reply) = VssMsg::from_prefix(msg) else {
            return Err(Errno::EINVAL);
        };
        if msg.len() != MSG_LEN {
            // "Message size does not match length"
            return Err(Errno::EINVAL);
        }
        let operation = reply.hdr.operation;
        if operation == op::REGISTER || operation == op::REGISTER1 {
            // "Don't process registration messages if we're in the middle of a transaction
            // processing."
            if self.state > State::Ready {
                warn!("hv_vss: unexpected registration request during a transaction; EINVAL");
                return Err(Errno::EINVAL);
            }
            return self.handle_handshake(hvt, operation);
        }
        if self.state != State::UserspaceReq {
            // "This is a spurious call!"
            warn!(
                "hv_vss: daemon wrote with no request pending (state {:?}); EINVAL",
                self.state
            );
            return Err(Errno::EINVAL);
        }
        self.state = State::UserspaceRecv;
        // Byte 0 of the *reply*, which the 6.1 daemon has overwritten with its status.
        if operation == op::HOT_BACKUP {
            self.set_host_flags(VSS_HBU_NO_AUTO_RECOVERY);
        }
        let error = reply.error();
        if self.timer.cancel() {
            debug!(
                "hv_vss: daemon answered {error:#x} ({})",
                vmbus::ic::status_meaning(error)
            );
            self.respond_to_host(error);
            // "Transaction is finished, reset the state."
            self.poll_wrapper();
        } else {
            warn!("hv_vss: daemon answered as the timeout fired; answer dropped");
        }
        Ok(())
    }

    /// `vss_on_reset()`: the daemon closed the device.
    fn on_reset(&mut self) {
        if self.timer.cancel() {
            warn!(
                "hv_vss: daemon closed the device with {} pending; replying HV_E_FAIL",
                op_name(self.operation())
            );
            self.respond_to_host(HV_E_FAIL);
        }
        self.state = State::DeviceInit;
        debug!("hv_vss: daemon closed the device");
    }
}

/// The char device is the transport's (see [`HvutilDriver`]).
impl HvutilDriver for Vss61 {
    type Service = Service;
    const NODE: &'static str = DEVICE_NAME;

    fn transport(&self) -> &HvutilTransport<Service> {
        &self.hvt
    }

    fn repoll_if_asked(&self) {
        Vss61::repoll_if_asked(self)
    }
}

impl ChannelDriver for Vss61 {
    /// The channel callback, and again as long as it asked for a re-poll with a packet
    /// waiting: `hv_poll_channel()` at the end of an operation the driver answered itself
    /// schedules the callback once more, which reads the next packet.
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

    /// `util_remove()`: `hv_vss_deinit()` then `vmbus_close()`.
    fn on_rescind(&self) {
        info!("hv_vss: channel rescinded; waiting for the daemon to close the device");
        self.hvt.lock().svc.state = State::DeviceDying;
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
        info!("hv_vss: device removed");
    }
}

/// The 6.1 hv_vss driver on `channel`, with the kernel's timeouts.
/// Fails only when a timer thread cannot be started.
pub fn new(channel: Arc<dyn HostChannel>) -> io::Result<Arc<dyn ChannelDevice>> {
    Ok(Vss61::new(channel, DAEMON_TIMEOUT, FREEZE_TIMEOUT)?)
}

/// The driver table's probe for a VSS offer: the 6.1 model; `linux-3.14` is refused with
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
