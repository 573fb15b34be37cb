//! hv_fcopy as first merged (v3.15, "Implement the file copy service", 2014).
//!
//! The seed driver has its own small `file_operations` (open, read, write, release: no poll)
//! and a handful of globals instead of a state machine (fcopy.md §4):
//!
//! * `opened`: one opener at a time (EBUSY);
//! * `in_hand_shake`: the first write after open must be version 0 (FCOPY_CURRENT_VERSION of
//!   the seed-era header); it is accepted *without any answer*. The unmodified 6.1 daemon
//!   writes 1 and gets EINVAL, so it cannot register here (fcopy.md §9);
//! * `fcopy_transaction.active`, **initially true**: while it is set the channel callback does
//!   not read the ring at all, only remembers that it was called. So before a daemon
//!   registers even NEGOTIATE goes unanswered; the handshake then runs the callback once;
//! * a counting semaphore `read_sema`: each host request adds a token, each read takes one,
//!   whatever then happens to the message. A read with too small a buffer returns 0 and the
//!   message is lost; the 5 s timer then fails it. The timer does not take the token back, so
//!   a daemon that reads after a timeout still gets the (already failed) request;
//! * releasing the device only resets `opened` and `in_hand_shake`: a pending transaction,
//!   its timer and its tokens survive the daemon;
//! * rescind wakes a blocked reader with ENODEV and removes the device at once, fd open or not.
//!
//! The callback treats every packet that is not NEGOTIATE as an fcopy request (there is no
//! icmsgtype check) and never validates lengths. Non-START requests reach the daemon as
//! `sizeof(struct hv_do_fcopy)` = 6192 raw bytes (no `pad` in the seed-era header) read from
//! the receive buffer at the time of the `read`, which is why the last 4 bytes of a full
//! 6144-byte fragment never reach the daemon.
//!
//! There are no locks in the seed driver. Here its globals sit under one driver lock
//! ([`WaitState`]); the semaphore is a counter under it with a [`WaitList`] of parked readers.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use log::{debug, error, info, warn};
use vmbus::fcopy::{op, DO_FCOPY_SEED_LEN, FCOPY_VERSION_0, START_FCOPY_LEN};
use vmbus::ic::{msgtype, set_response_flags, status, ICMSG_HDR_LEN};
use vmbus::negotiate::{prep_negotiate_resp_v3, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS};

use super::{op_name, HostSide, DEVICE_NAME, RECV_LIMIT};
use crate::bus::channel::{ChannelDriver, HostChannel, RecvError};
use crate::device::{Caller, Device, Errno, Handle, ReadReply, WaitList, WriteReply};
use crate::devices::delayed_work::DelayedWork;
use crate::wait::WaitState;

/// `schedule_delayed_work(&fcopy_work, 5*HZ)`: the seed's daemon timeout.
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(5);

/// `FCOPY_CURRENT_VERSION` in the seed-era uapi header: the only version the handshake takes.
const FCOPY_CURRENT_VERSION: u32 = FCOPY_VERSION_0;

/// The 2014 fcopy driver of one channel.
pub struct SeedFcopy {
    ws: Arc<WaitState<Seed>>,
    /// One channel callback at a time (the kernel's per-channel tasklet; the handshake also
    /// calls the callback directly). Taken before the driver lock, never while holding it.
    callback_serial: Mutex<()>,
    /// `fcopy_work`, the timeout.
    timer: Arc<DelayedWork>,
    next_handle: AtomicU64,
}

/// The seed's globals (`fcopy_transaction`, `opened`, `in_hand_shake`, `recv_buffer`).
struct Seed {
    opened: bool,
    in_hand_shake: bool,
    /// `fcopy_transaction.active`.
    active: bool,
    /// `fcopy_transaction.read_sema`: tokens available.
    read_sema: u32,
    /// Readers sleeping on the semaphore (parked), with their buffer sizes.
    readers: WaitList<u32, Vec<u8>>,
    /// `fcopy_transaction.message`: the converted START, rebuilt by each START only.
    message: Vec<u8>,
    /// `fcopy_transaction.fcopy_context`: the callback was deferred at least once. Never
    /// cleared, so every later handshake runs the callback.
    fcopy_context: bool,
    /// The channel and the host request in hand.
    host: HostSide,
    timeout: Duration,
    /// `misc_deregister()` has run.
    deregistered: bool,
}

impl SeedFcopy {
    /// `hv_fcopy_init()`: `active` true (defer everything until a daemon registers), the
    /// semaphore at 0, the device registered. Fails only when the timer's thread cannot be
    /// started.
    pub fn new(channel: Arc<dyn HostChannel>, timeout: Duration) -> io::Result<Arc<SeedFcopy>> {
        let timer = DelayedWork::spawn("hv_fcopy-timer")?;
        Ok(Arc::new_cyclic(|me: &Weak<SeedFcopy>| {
            let timer = Arc::new(timer.bind_driver(me.clone(), SeedFcopy::timeout_work));
            SeedFcopy {
                ws: WaitState::new(Seed {
                    opened: false,
                    in_hand_shake: true,
                    active: true,
                    read_sema: 0,
                    readers: WaitList::new(),
                    message: vec![0; START_FCOPY_LEN],
                    fcopy_context: false,
                    host: HostSide::new(channel),
                    timeout,
                    deregistered: false,
                }),
                callback_serial: Mutex::new(()),
                timer,
                next_handle: AtomicU64::new(1),
            }
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Seed> {
        self.ws.lock()
    }

    /// `fcopy_work_func()`: "the user-mode component has not responded".
    fn timeout_work(&self) {
        let mut seed = self.lock();
        warn!(
            "hv_fcopy: the daemon did not answer {} within {:?}; replying HV_E_FAIL (its \
             semaphore token stays, so the request can still be read: hv_fcopy.c v3.15)",
            op_name(seed.host.recv.operation()),
            seed.timeout
        );
        seed.respond_to_host(status::HV_E_FAIL);
    }

    /// Test visibility.
    #[cfg(test)]
    fn sleeping_readers(&self) -> usize {
        self.lock().readers.waiting()
    }
}

impl Drop for SeedFcopy {
    fn drop(&mut self) {
        self.timer.shutdown();
    }
}

impl Seed {
    /// `up(&fcopy_transaction.read_sema)`: the token goes straight to the longest sleeper if
    /// there is one (kernel/locking/semaphore.c), else it is kept for the next read.
    fn up(&mut self) {
        match self.readers.wake_one() {
            Some((count, reply)) => {
                let result = self.read_after_down(count);
                reply.answer(result);
            }
            None => self.read_sema += 1,
        }
    }

    /// What `fcopy_read()` does once it has its semaphore token.
    fn read_after_down(&mut self, count: u32) -> Result<Vec<u8>, Errno> {
        // "The channel may be rescinded and in this case, we will wakeup the thread blocked
        // on the semaphore and we will use the opened state to correctly handle this case."
        if !self.opened {
            return Err(Errno::ENODEV);
        }
        // fcopy_msg points into the live receive buffer: what is there *now* decides.
        let operation = self.host.recv.operation();
        let count = count as usize;
        if operation == op::START_FILE_COPY {
            if count < START_FCOPY_LEN {
                // Returns 0 and the token is gone: the request is lost and the host gets
                // HV_E_FAIL when the timer fires (hv_fcopy.c v3.15).
                warn!(
                    "hv_fcopy: read of {count} bytes < {START_FCOPY_LEN}: returns 0, request lost"
                );
                return Ok(Vec::new());
            }
            Ok(self.message.clone())
        } else {
            if count < DO_FCOPY_SEED_LEN {
                warn!(
                    "hv_fcopy: read of {count} bytes < {DO_FCOPY_SEED_LEN}: returns 0, request lost"
                );
                return Ok(Vec::new());
            }
            // sizeof(struct hv_do_fcopy) of the seed-era header (no pad): 6192 raw bytes.
            Ok(self.host.recv.bytes(ICMSG_HDR_LEN, DO_FCOPY_SEED_LEN))
        }
    }

    /// `fcopy_respond_to_host()`: ends the transaction and echoes the buffer with `status`.
    fn respond_to_host(&mut self, status: u32) {
        self.active = false;
        self.host.respond(status);
    }
}

impl Device for SeedFcopy {
    fn name(&self) -> &str {
        DEVICE_NAME
    }

    /// `fcopy_open()`.
    fn open(&self, _caller: &Caller, _flags: i32) -> Result<Handle, Errno> {
        let mut seed = self.lock();
        if seed.deregistered {
            // misc_deregister() has run: misc_open() finds no such minor.
            return Err(Errno::ENODEV);
        }
        // "We can have only active open at a time."
        if seed.opened {
            return Err(Errno::EBUSY);
        }
        seed.opened = true;
        Ok(self.next_handle.fetch_add(1, Ordering::Relaxed))
    }

    /// `fcopy_read()`. Offsets and O_NONBLOCK are ignored.
    fn read(&self, _handle: Handle, count: u32, _offset: u64, _caller: &Caller, reply: ReadReply) {
        let mut seed = self.lock();
        // down_interruptible(&fcopy_transaction.read_sema): a token now, or sleep until up()
        // hands one over.
        if seed.read_sema > 0 {
            seed.read_sema -= 1;
            let result = seed.read_after_down(count);
            drop(seed);
            reply.answer(result);
        } else {
            seed.readers.park_interruptible(count, reply);
        }
    }

    /// `fcopy_write()`.
    fn write(
        &self,
        _handle: Handle,
        data: &[u8],
        _offset: u64,
        _caller: &Caller,
        reply: WriteReply,
    ) {
        reply.answer(self.write_value(data));
    }

    // No .poll: the VFS reports the default mask (always readable and writable). The trait's
    // default does exactly that.

    /// `fcopy_release()`: "The daemon has exited; reset the state." Only these two flags:
    /// a pending transaction, its timer and semaphore tokens stay.
    fn release(&self, _handle: Handle) {
        let mut seed = self.lock();
        seed.in_hand_shake = true;
        seed.opened = false;
        debug!("hv_fcopy: daemon closed the device");
    }
}

impl SeedFcopy {
    /// `fcopy_write()`'s body: the byte count or the errno.
    fn write_value(&self, data: &[u8]) -> Result<u32, Errno> {
        let Ok(value) = <[u8; 4]>::try_from(data) else {
            return Err(Errno::EINVAL);
        };
        let value = u32::from_le_bytes(value);
        let mut seed = self.lock();
        if seed.in_hand_shake {
            // fcopy_handle_handshake()
            if value != FCOPY_CURRENT_VERSION {
                warn!(
                    "hv_fcopy: daemon registration with version {value} refused: the 2014 driver \
                     accepts only version 0 (EINVAL)"
                );
                return Err(Errno::EINVAL);
            }
            info!("hv_fcopy: user-mode registering done. Daemon version: {value}");
            seed.active = false;
            let deferred = seed.fcopy_context;
            // The kernel clears in_hand_shake after running the callback; nobody can tell
            // the difference without a second writer racing this one.
            seed.in_hand_shake = false;
            drop(seed);
            if deferred {
                // "if (fcopy_transaction.fcopy_context) hv_fcopy_onchannelcallback(...)":
                // one packet is processed before the write returns. No answer is queued for
                // the daemon.
                self.on_channel_callback();
            }
            return Ok(4);
        }
        // "Complete the transaction by forwarding the result to the host. But first, cancel
        // the timeout." No transaction, or the timer already fired: the value is silently
        // discarded and the write still returns 4.
        if self.timer.cancel() {
            debug!(
                "hv_fcopy: daemon answered {value:#x} ({})",
                vmbus::ic::status_meaning(value)
            );
            seed.respond_to_host(value);
        } else {
            debug!("hv_fcopy: daemon wrote {value:#x} with no transaction pending: discarded");
        }
        Ok(4)
    }
}

impl ChannelDriver for SeedFcopy {
    /// `hv_fcopy_onchannelcallback()`: reads at most one packet, unless a transaction is
    /// active (or no daemon has registered yet), in which case it reads nothing.
    fn on_channel_callback(&self) {
        let _serial = self
            .callback_serial
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut seed = self.lock();
        if seed.host.channel_closed {
            return;
        }
        if seed.active {
            // "We will defer processing this callback once the current transaction is
            // complete." Only the handshake comes back for it; after a normal reply the
            // next packet waits for the next channel interrupt.
            seed.fcopy_context = true;
            debug!("hv_fcopy: channel callback deferred (transaction active or no daemon)");
            return;
        }
        let (recvlen, requestid) = match seed.host.channel.recv(RECV_LIMIT) {
            Ok(Some(packet)) => (seed.host.recv.fill(&packet.payload), packet.trans_id),
            Ok(None) => return,
            Err(RecvError::NoBufs { needed, limit }) => {
                // 3.x vmbus_recvpacket() sets *buffer_actual_len to the packet's length and
                // *requestid to 0 before failing, copies nothing and leaves the packet in the
                // ring. The seed ignores the return value: it goes on with that length and
                // whatever the receive buffer still holds (drivers/hv/channel.c 3.14,
                // drivers/hv/hv_fcopy.c v3.15).
                error!(
                    "hv_fcopy: host packet of {needed} bytes does not fit the {limit}-byte limit; \
                     the 2014 driver processes the stale receive buffer as a {needed}-byte packet \
                     with request id 0, and the packet stays in the ring"
                );
                (needed, 0)
            }
        };
        if recvlen == 0 {
            return;
        }
        if seed.host.recv.icmsgtype() == msgtype::NEGOTIATE {
            // The 3.x negotiate has no length checks: it reads the host's version entries
            // from the receive buffer, stale bytes included, so it gets the whole buffer.
            let seed = &mut *seed;
            let buf = seed.host.recv.as_mut_slice();
            match prep_negotiate_resp_v3(buf, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS) {
                Some((fw, srv)) => info!("hv_fcopy: FCopy IC version {srv} (framework {fw})"),
                None => warn!(
                    "hv_fcopy: host NEGOTIATE shares no version with framework 3.0 / fcopy 1.1; \
                     answering with zero counts"
                ),
            }
            let _ = set_response_flags(buf);
            let reply = seed.host.recv.bytes(0, recvlen);
            seed.host.channel.send_inband(requestid, &reply);
            return;
        }
        // Anything else is taken for an fcopy request: the seed does not check icmsgtype or
        // any length.
        if seed.host.recv.icmsgtype() != msgtype::FCOPY {
            warn!(
                "hv_fcopy: host packet with icmsgtype {} handled as an fcopy request (the 2014 \
                 driver does not check)",
                seed.host.recv.icmsgtype()
            );
        }
        seed.active = true;
        seed.host.recv_len = recvlen;
        seed.host.recv_req_id = requestid;
        // fcopy_send_data(): only a START is converted; everything else is read raw from the
        // receive buffer by fcopy_read().
        let operation = seed.host.recv.operation();
        if operation == op::START_FILE_COPY {
            seed.message = seed.host.recv.start_for_daemon();
        }
        seed.up();
        self.timer.schedule(seed.timeout);
        debug!(
            "hv_fcopy: host request {} (id {requestid}, {recvlen} bytes) ready for the daemon",
            op_name(operation)
        );
    }

    /// `util_remove()`: `hv_fcopy_deinit()` then `vmbus_close()`. Returns at once even if
    /// the daemon keeps the device open.
    fn on_rescind(&self) {
        info!("hv_fcopy: channel rescinded; device removed");
        // cancel_delayed_work_sync(&fcopy_work): a pending transaction gets no reply.
        self.timer.cancel_sync();
        {
            // fcopy_dev_deinit(): "Setup state so that user level daemon can gracefully exit
            // if it is blocked on the read semaphore."
            let mut seed = self.lock();
            seed.opened = false;
            seed.up();
            seed.deregistered = true;
        }
        {
            let _serial = self
                .callback_serial
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.lock().host.channel_closed = true;
        }
        self.timer.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::device::poll_bits;
    use crate::devices::hvutil_transport::wait_for;
    use vmbus::fcopy::{StartFcopy, FCOPY_VERSION_1, OVER_WRITE};
    use vmbus::ic::IcVersion;
    use zerocopy::FromBytes;

    type Rig = super::super::testing::Rig<SeedFcopy>;

    impl RigDevice for SeedFcopy {
        const DAEMON_TIMEOUT: Duration = DAEMON_TIMEOUT;
        /// What the seed's daemon reads with (any buffer of at least 6192 bytes).
        const READ_LEN: u32 = 6196;

        fn create(channel: Arc<dyn HostChannel>, timeout: Duration) -> Arc<SeedFcopy> {
            SeedFcopy::new(channel, timeout).unwrap()
        }

        fn sleeping_readers(&self) -> usize {
            SeedFcopy::sleeping_readers(self)
        }
    }

    impl Rig {
        /// Opens and registers a version-0 daemon (what the seed expects).
        fn daemon(&self) -> Handle {
            let h = self.open();
            assert_eq!(self.write_u32(h, FCOPY_VERSION_0), Ok(4));
            h
        }

        fn tokens(&self) -> u32 {
            self.dev.lock().read_sema
        }
    }

    // ---- open ------------------------------------------------------------------------------

    #[test]
    fn second_open_is_ebusy_on_linux_3_14() {
        let rig = Rig::new();
        rig.open();
        assert_eq!(rig.dev.open(&caller(), libc::O_RDWR), Err(Errno::EBUSY));
    }

    #[test]
    fn open_after_close_succeeds_and_is_back_in_handshake_on_linux_3_14() {
        let rig = Rig::new();
        let h = rig.daemon();
        rig.dev.release(h);
        let h = rig.open();
        assert_eq!(rig.write_u32(h, FCOPY_VERSION_1), Err(Errno::EINVAL));
        assert_eq!(rig.write_u32(h, FCOPY_VERSION_0), Ok(4));
    }

    // ---- read ------------------------------------------------------------------------------

    #[test]
    fn blocked_read_is_interrupted_with_eintr_on_linux_3_14() {
        let rig = Rig::new();
        let h = rig.daemon();
        rig.assert_read_blocks_until_interrupted(h);
        assert_eq!(rig.tokens(), 0);
    }

    #[test]
    fn nonblocking_open_still_blocks_in_read_on_linux_3_14() {
        let rig = Rig::new();
        let h = rig
            .dev
            .open(&caller(), libc::O_RDWR | libc::O_NONBLOCK)
            .unwrap();
        rig.write_u32(h, FCOPY_VERSION_0).unwrap();
        let reader = rig.blocked_read(h, &caller());
        rig.host(1, &op(vmbus::fcopy::op::COMPLETE_FCOPY));
        assert_eq!(reader.join().unwrap().unwrap().len(), 6192);
    }

    #[test]
    fn blocked_read_gets_enodev_on_rescind_on_linux_3_14() {
        let rig = Rig::new();
        let h = rig.daemon();
        let reader = rig.blocked_read(h, &caller());
        rig.dev.on_rescind();
        assert_eq!(reader.join().unwrap(), Err(Errno::ENODEV));
    }

    #[test]
    fn read_after_rescind_consumes_the_wakeup_token_then_blocks_on_linux_3_14() {
        let rig = Rig::new();
        let h = rig.daemon();
        rig.dev.on_rescind();
        assert_eq!(rig.read(h), Err(Errno::ENODEV));
        // No token left: the next read sleeps until a signal.
        rig.assert_read_blocks_until_interrupted(h);
    }

    #[test]
    fn short_read_returns_zero_and_loses_message_on_linux_3_14() {
        let rig = Rig::with_timeout(Duration::from_millis(20));
        let h = rig.daemon();
        let req = start("f", "/tmp", 0, 1);
        rig.host(3, &req);
        assert_eq!(read_at(&*rig.dev, h, 1087, 0), Ok(Vec::new()));
        // The token is gone: the request cannot be read again...
        assert_eq!(rig.tokens(), 0);
        // ...and the host gets HV_E_FAIL when the timer fires.
        assert_eq!(rig.chan.wait_sent(1), vec![reply_to(3, &req, E_FAIL)]);
    }

    #[test]
    fn short_read_of_non_start_returns_zero_on_linux_3_14() {
        let rig = Rig::new();
        let h = rig.daemon();
        rig.host(3, &write(0, b"abc"));
        assert_eq!(read_at(&*rig.dev, h, 6191, 0), Ok(Vec::new()));
        assert_eq!(rig.tokens(), 0);
        // 1088 bytes is plenty for a START but not for a WRITE.
        let rig = Rig::new();
        let h = rig.daemon();
        rig.host(4, &op(vmbus::fcopy::op::CANCEL_FCOPY));
        assert_eq!(read_at(&*rig.dev, h, 1088, 0), Ok(Vec::new()));
    }

    #[test]
    fn start_delivers_1088_converted_bytes_on_linux_3_14() {
        let rig = Rig::new();
        let h = rig.daemon();
        rig.host(1, &start("naïve.txt", "/srv/𝄞", OVER_WRITE, 99));
        let msg = read_at(&*rig.dev, h, 1088, 0).unwrap();
        assert_eq!(msg.len(), 1088);
        let start = StartFcopy::read_from_bytes(&msg).unwrap();
        assert_eq!(start.hdr.operation.get(), op::START_FILE_COPY);
        assert_eq!(StartFcopy::utf8_name(&start.file_name), "naïve.txt");
        assert_eq!(StartFcopy::utf8_name(&start.path_name), "/srv/𝄞");
        assert_eq!(start.copy_flags.get(), OVER_WRITE);
        assert_eq!(start.file_size.get(), 99);
    }

    #[test]
    fn write_delivers_6192_raw_bytes_on_linux_3_14() {
        let rig = Rig::new();
        let h = rig.daemon();
        let data: Vec<u8> = (0..6144u32).map(|i| (i % 253) as u8).collect();
        let req = write(8192, &data);
        rig.host(1, &req);
        let msg = rig.read(h).unwrap();
        // No pad in the seed-era struct: the last 4 data bytes do not reach the daemon.
        assert_eq!(msg.len(), 6192);
        assert_eq!(msg, &req[28..28 + 6192]);
        assert_eq!(&msg[52..], &data[..6140]);
    }

    #[test]
    fn complete_delivers_6192_bytes_with_stale_tail_on_linux_3_14() {
        let rig = Rig::new();
        let h = rig.daemon();
        let earlier = write(0, &[0x77; 6144]);
        rig.host(1, &earlier);
        rig.read(h).unwrap();
        rig.write_u32(h, 0).unwrap();
        let complete = op(op::COMPLETE_FCOPY);
        rig.host(2, &complete);
        let msg = rig.read(h).unwrap();
        assert_eq!(msg.len(), 6192);
        assert_eq!(&msg[..36], &complete[28..]);
        // Past the 64-byte packet: what the WRITE left in the receive buffer.
        assert_eq!(&msg[36..], &earlier[64..28 + 6192]);
    }

    #[test]
    fn read_takes_the_operation_from_the_buffer_at_read_time_on_linux_3_14() {
        // fcopy_msg points into the live receive buffer; after a timeout a NEGOTIATE can
        // overwrite it before the daemon reads the (stale) request.
        let rig = Rig::with_timeout(Duration::from_millis(20));
        let h = rig.daemon();
        rig.host(1, &op(op::CANCEL_FCOPY));
        rig.chan.wait_sent(1);
        wait_for("the transaction to end", || !rig.dev.lock().active);
        let nego = negotiate(&[FW_3_0], &[SRV_1_1]);
        rig.host(2, &nego);
        let msg = rig.read(h).unwrap();
        assert_eq!(&msg[..8], &rig.chan.sent()[1].payload[28..36]);
    }

    // ---- write -----------------------------------------------------------------------------

    #[test]
    fn write_of_wrong_size_is_einval_on_linux_3_14() {
        let rig = Rig::new();
        let h = rig.open();
        assert_eq!(write_at(&*rig.dev, h, &[0; 3], 0), Err(Errno::EINVAL));
        assert_eq!(write_at(&*rig.dev, h, &[0; 8], 0), Err(Errno::EINVAL));
        // Still in the handshake.
        assert!(rig.dev.lock().in_hand_shake);
    }

    #[test]
    fn version_1_registration_is_einval_on_linux_3_14() {
        // The unmodified 6.1 daemon writes 1: "Registration failed", exit 1 (fcopy.md §9).
        let rig = Rig::new();
        let h = rig.open();
        assert_eq!(rig.write_u32(h, FCOPY_VERSION_1), Err(Errno::EINVAL));
        assert!(rig.dev.lock().in_hand_shake);
        assert_eq!(rig.write_u32(h, FCOPY_VERSION_0), Ok(4));
    }

    #[test]
    fn version_0_registration_queues_no_reply_on_linux_3_14() {
        let rig = Rig::new();
        let h = rig.daemon();
        assert_eq!(rig.tokens(), 0);
        assert!(!rig.dev.lock().in_hand_shake);
        assert!(!rig.dev.lock().active);
        rig.assert_read_blocks_until_interrupted(h);
    }

    #[test]
    fn negotiate_deferred_until_registration_on_linux_3_14() {
        let rig = Rig::new();
        let req = negotiate(&[FW_3_0], &[SRV_1_1]);
        rig.host(5, &req);
        assert!(rig.chan.sent().is_empty());
        assert!(rig.chan.has_pending());
        let h = rig.open();
        assert!(rig.chan.sent().is_empty());
        // The handshake runs the deferred callback before the write returns.
        assert_eq!(rig.write_u32(h, FCOPY_VERSION_0), Ok(4));
        let sent = rig.chan.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].trans_id, 5);
        assert_eq!(
            vmbus::negotiate::parse_response(&sent[0].payload).unwrap(),
            Some((FW_3_0, SRV_1_1))
        );
        assert_eq!(icflags_of(&sent[0].payload), 0x05);
    }

    #[test]
    fn deferred_request_is_processed_by_registration_on_linux_3_14() {
        let rig = Rig::new();
        rig.host(6, &start("x", "/y", 0, 0));
        let h = rig.daemon();
        assert_eq!(rig.tokens(), 1);
        assert_eq!(read_at(&*rig.dev, h, 1088, 0).unwrap().len(), 1088);
    }

    #[test]
    fn only_one_deferred_packet_is_processed_by_registration_on_linux_3_14() {
        let rig = Rig::new();
        rig.host(1, &negotiate(&[FW_3_0], &[SRV_1_1]));
        rig.host(2, &negotiate(&[FW_3_0], &[SRV_1_1]));
        rig.daemon();
        assert_eq!(rig.chan.sent().len(), 1);
        // The second waits for the next channel interrupt.
        rig.dev.on_channel_callback();
        assert_eq!(rig.chan.sent().len(), 2);
    }

    #[test]
    fn reply_completes_transaction_on_linux_3_14() {
        let rig = Rig::new();
        let h = rig.daemon();
        let req = start("f", "/tmp", 0, 1);
        rig.host(44, &req);
        rig.read(h).unwrap();
        assert_eq!(rig.write_u32(h, status::HV_ERROR_ALREADY_EXISTS), Ok(4));
        assert_eq!(
            rig.chan.sent(),
            vec![reply_to(44, &req, status::HV_ERROR_ALREADY_EXISTS)]
        );
        assert!(!rig.dev.lock().active);
        assert!(!rig.dev.timer.is_pending());
    }

    #[test]
    fn next_packet_waits_for_the_next_interrupt_after_a_reply_on_linux_3_14() {
        // No re-poll in the seed: a packet that arrived during the transaction stays in the
        // ring until the channel callback runs again.
        let rig = Rig::new();
        let h = rig.daemon();
        rig.host(1, &op(op::COMPLETE_FCOPY));
        rig.host(2, &negotiate(&[FW_3_0], &[SRV_1_1]));
        assert!(rig.chan.has_pending());
        rig.read(h).unwrap();
        rig.write_u32(h, 0).unwrap();
        assert_eq!(rig.chan.sent().len(), 1);
        assert!(rig.chan.has_pending());
        rig.dev.on_channel_callback();
        assert_eq!(rig.chan.sent().len(), 2);
    }

    #[test]
    fn reply_without_transaction_is_silently_discarded_on_linux_3_14() {
        let rig = Rig::new();
        let h = rig.daemon();
        assert_eq!(rig.write_u32(h, 0), Ok(4));
        assert_eq!(rig.write_u32(h, E_FAIL), Ok(4));
        assert!(rig.chan.sent().is_empty());
    }

    #[test]
    fn timeout_replies_e_fail_and_leaves_the_message_readable_on_linux_3_14() {
        let rig = Rig::with_timeout(Duration::from_millis(20));
        let h = rig.daemon();
        let req = write(0, b"late");
        rig.host(9, &req);
        assert_eq!(rig.chan.wait_sent(1), vec![reply_to(9, &req, E_FAIL)]);
        wait_for("the transaction to end", || !rig.dev.lock().active);
        // The token stays: the failed request is still delivered...
        assert_eq!(rig.tokens(), 1);
        assert_eq!(rig.read(h).unwrap().len(), 6192);
        // ...and the late answer is accepted and discarded.
        assert_eq!(rig.write_u32(h, 0), Ok(4));
        assert_eq!(rig.chan.sent().len(), 1);
    }

    // ---- release and rescind ---------------------------------------------------------------

    #[test]
    fn release_keeps_pending_transaction_on_linux_3_14() {
        let rig = Rig::new();
        let h = rig.daemon();
        let req = start("f", "/tmp", 0, 1);
        rig.host(2, &req);
        rig.dev.release(h);
        // Nothing was answered or withdrawn.
        assert!(rig.chan.sent().is_empty());
        assert!(rig.dev.timer.is_pending());
        assert_eq!(rig.tokens(), 1);
        assert!(rig.dev.lock().active);
        // The next daemon gets the old request and can even answer it.
        let h = rig.daemon();
        assert_eq!(read_at(&*rig.dev, h, 1088, 0).unwrap().len(), 1088);
        assert_eq!(rig.write_u32(h, 0), Ok(4));
        assert_eq!(rig.chan.sent(), vec![reply_to(2, &req, 0)]);
    }

    #[test]
    fn rescind_returns_at_once_with_fd_open_on_linux_3_14() {
        let rig = Rig::new();
        let h = rig.daemon();
        rig.host(1, &start("f", "/tmp", 0, 1));
        // Returns although the daemon keeps its fd; the pending request gets no reply.
        rig.dev.on_rescind();
        assert!(rig.chan.sent().is_empty());
        assert_eq!(rig.dev.open(&caller(), libc::O_RDWR), Err(Errno::ENODEV));
        // The open fd still works on the globals: the token from the request is read, and
        // `opened` is false, so ENODEV.
        assert_eq!(rig.read(h), Err(Errno::ENODEV));
        rig.dev.release(h);
        assert_eq!(rig.dev.open(&caller(), libc::O_RDWR), Err(Errno::ENODEV));
        // The channel is closed: nothing more is read.
        rig.host(2, &negotiate(&[FW_3_0], &[SRV_1_1]));
        assert!(rig.chan.sent().is_empty());
    }

    // ---- host packets ----------------------------------------------------------------------

    #[test]
    fn any_icmsgtype_is_treated_as_fcopy_on_linux_3_14() {
        let rig = Rig::new();
        let h = rig.daemon();
        let heartbeat =
            vmbus::ic::build_ic_message(msgtype::HEARTBEAT, FW_3_0, FW_3_0, 0, &[9; 40]);
        rig.host(7, &heartbeat);
        assert_eq!(rig.tokens(), 1);
        let msg = rig.read(h).unwrap();
        assert_eq!(&msg[..40], &[9; 40]);
        assert_eq!(rig.write_u32(h, 0), Ok(4));
        assert_eq!(rig.chan.sent(), vec![reply_to(7, &heartbeat, 0)]);
    }

    #[test]
    fn short_packet_is_still_a_request_on_linux_3_14() {
        // No length checks: 16 bytes become a request whose IC header and operation come
        // from the receive buffer past the packet (still zero here, so: a START).
        let rig = Rig::new();
        let h = rig.daemon();
        rig.chan.push_raw(3, vec![0xff; 16]);
        rig.dev.on_channel_callback();
        assert_eq!(rig.tokens(), 1);
        assert_eq!(rig.read(h).unwrap(), vec![0; 1088]);
        rig.write_u32(h, 0).unwrap();
        assert_eq!(rig.chan.sent()[0].payload.len(), 16);
    }

    #[test]
    fn negotiate_without_common_version_answers_zero_counts_on_linux_3_14() {
        let rig = Rig::new();
        rig.daemon();
        rig.host(1, &negotiate(&[IcVersion::new(1, 0)], &[SRV_1_1]));
        let reply = &rig.chan.sent()[0].payload;
        assert_eq!(vmbus::negotiate::parse_response(reply).unwrap(), None);
    }

    #[test]
    fn oversized_packet_replays_stale_buffer_with_request_id_0_on_linux_3_14() {
        let rig = Rig::new();
        let h = rig.daemon();
        let earlier = op(op::CANCEL_FCOPY);
        rig.host(1, &earlier);
        rig.read(h).unwrap();
        rig.write_u32(h, 0).unwrap();
        // 8200 bytes: refused by vmbus_recvpacket, processed anyway from the old buffer.
        rig.chan.push_raw(2, vec![0xee; RECV_LIMIT + 8]);
        rig.dev.on_channel_callback();
        assert_eq!(rig.tokens(), 1);
        let msg = rig.read(h).unwrap();
        assert_eq!(&msg[..36], &earlier[28..64]);
        // The daemon's answer goes out as 8200 bytes of receive buffer, request id 0.
        rig.write_u32(h, 0).unwrap();
        let sent = rig.chan.sent();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[1].trans_id, 0);
        assert_eq!(sent[1].payload.len(), RECV_LIMIT + 8);
        // And the packet is still there.
        assert!(rig.chan.has_pending());
    }

    #[test]
    fn poll_reports_vfs_default_on_linux_3_14() {
        let rig = Rig::new();
        let h = rig.daemon();
        assert_eq!(rig.dev.poll(h, None), poll_bits::DEFAULT_POLLMASK);
    }
}
