//! `/dev/azure_xs_fastpath`: the Azure XStore fastpath driver of the posted 2021 patch
//! ("Drivers: hv: add XStore Fastpath driver", Long Li, linux-hyperv, 2021-06-07; never
//! merged), and a `reviewed` profile that applies what Michael Kelley's review asked for.
//! Facts and their sources: ../shared/spec/xs_fastpath.md.
//!
//! The driver is a pipe from one ioctl to the Azure host. The caller names three buffers in
//! its own memory (request, response, optional data); the driver pins their pages, sends one
//! GPA-direct packet that lists every page, sleeps until the host completes it, and copies two
//! words of the completion (status, response length) back into the caller's struct. The host
//! reads the request and data and writes the response and data *in the pinned pages*: the
//! kernel itself copies nothing but those two words.
//!
//! Here the pages stay in the caller's address space and are reached through [`Caller`]'s
//! memory access (process_vm_readv/writev for the pid the kernel put in the request): the host
//! asks for them with guest-memory frames ([`vmbus::guest_memory`]), which this model answers
//! from the page list it recorded at "pin" time, never from what the host sends. So a 32 MiB
//! data buffer crosses once, in 64 KiB chunks, between the caller and the bus, and CUSE's
//! ioctl retry (at most 32 pages) is never needed: not even the 64-byte struct goes through it.
//!
//! Both profiles in one file because they differ in a handful of decisions ([`Rules`]), each
//! marked where it applies.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use vmbus::guest_memory::{self, MemoryMessage, MEMORY_HEADER_LEN};
use vmbus::xs_fastpath::{
    encode_request_packet, pages_spanned, RequestSync, VspRequest, VspResponse, HV_PAGE_SIZE,
    IOCTL_USER_REQUEST, MAX_PAGES, OP_USER_REQUEST, REQUESTOR_SLOTS, REQUEST_SYNC_LEN,
    RESPONSE_LEN_OFFSET, STATUS_OFFSET,
};
use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, IntoBytes};

use crate::bus::channel::{ChannelDriver, HostChannel};
use crate::bus::requestor::Requestor;
use crate::caller::CredentialIdentity;
use crate::device::{
    Caller, Device, Errno, Handle, IoctlAnswer, IoctlCall, IoctlOutcome, IoctlReply, Parked,
};
use crate::devices::delayed_work::spawn_named;
use crate::table::{ProbeError, Profile, ProfileSet};

/// The misc device name (`xs_fastpath_misc.name`).
pub const DEVICE_NAME: &str = "azure_xs_fastpath";

/// The two profiles.
pub const PROFILES: ProfileSet = ProfileSet {
    profiles: &[
        Profile {
            name: "posted",
            about:
                "the 2021 patch as posted: waits forever, EIO for unknown ioctls, logs user errors",
        },
        Profile {
            name: "reviewed",
            about: "with the review applied: bounded wait (ETIMEDOUT), lengths and timeout \
                    validated first, ENOTTY, quiet, ENODEV for calls in flight at removal",
        },
    ],
    default: "posted",
    set_by_kernel_flag: false,
};

/// x86_64's PAGE_SIZE: the posted driver counts pages in it (Kconfig: depends on X86_64), the
/// reviewed one in Hyper-V's 4 KiB pages whatever the guest's page size (review points 14,
/// 15). On x86_64 the two agree; the difference is which constant the arithmetic names.
const PAGE_SIZE: u64 = 4096;
/// `MAX_RW_COUNT` (include/linux/fs.h): `import_single_range` cuts a longer buffer to it, and
/// the patch then sees fewer bytes pinned than asked for and fails with EFAULT.
const MAX_RW_COUNT: u64 = 0x7fff_f000;
/// The largest `timeout` the reviewed driver accepts, in ms (review point 16).
const MAX_TIMEOUT_MS: u32 = 60_000;
/// How long past the caller's own timeout the reviewed driver waits for the host (point 17).
const WAIT_GRACE: Duration = Duration::from_secs(5);
/// The receive limit of the channel callback: a completion is 12 bytes; the posted driver
/// does not check the size, so anything the ring can hold is read.
const RECV_LIMIT: usize = vmbus::xs_fastpath::RING_BYTES;

/// What the two profiles decide differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rules {
    /// The errno of an unknown command: EIO in the patch's `default:` case, ENOTTY reviewed.
    unknown_command: Errno,
    /// Reviewed: timeout and lengths are checked before anything is pinned.
    validate_first: bool,
    /// Reviewed: the wait for the host ends after the caller's timeout + [`WAIT_GRACE`].
    bounded_wait: bool,
    /// Posted: user mistakes are console errors (`pr_err`); reviewed: debug (point 7).
    log_user_errors: bool,
    /// Reviewed: removal deregisters first and ends calls in flight with ENODEV (point 20);
    /// posted: it waits, uninterruptibly, until every file is closed.
    removal_ends_calls: bool,
}

const POSTED: Rules = Rules {
    unknown_command: Errno::EIO,
    validate_first: false,
    bounded_wait: false,
    log_user_errors: true,
    removal_ends_calls: false,
};

const REVIEWED: Rules = Rules {
    unknown_command: Errno::ENOTTY,
    validate_first: true,
    bounded_wait: true,
    log_user_errors: false,
    removal_ends_calls: true,
};

/// The driver's probe: the channel is open with the row's 128 KiB rings.
pub fn probe(
    channel: Arc<dyn HostChannel>,
    profile: &Profile,
    _options: &clap::ArgMatches,
) -> Result<Arc<dyn crate::table::ChannelDevice>, ProbeError> {
    let rules = match profile.name {
        "posted" => POSTED,
        "reviewed" => REVIEWED,
        other => {
            return Err(ProbeError::UnknownProfile {
                profile: other.to_string(),
            })
        }
    };
    Ok(XsFastpath::new(channel, rules).map_err(ProbeError::Resources)?)
}

/// One user buffer's pinned pages, as a run of the packet's page range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PinnedRun {
    /// Where the run starts in the range (its first page × page size).
    range_start: u64,
    /// The user address of its first page.
    first_page: u64,
    /// Bytes of whole pages in the run.
    bytes: u64,
}

/// The pages of one call, in the packet's order: data, request, response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PinnedPages {
    runs: Vec<PinnedRun>,
}

impl PinnedPages {
    /// Adds a buffer's pages; returns the buffer's offset in the range (in-page offset +
    /// pages before it), what the VSP request tells the host.
    fn push(&mut self, addr: u64, len: u64) -> u64 {
        let range_start = self.range_bytes();
        let first_page = addr - addr % PAGE_SIZE;
        let bytes = pages_spanned(addr, len, PAGE_SIZE) * PAGE_SIZE;
        self.runs.push(PinnedRun {
            range_start,
            first_page,
            bytes,
        });
        range_start + addr % PAGE_SIZE
    }

    fn range_bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.bytes).sum()
    }

    fn pages(&self) -> u64 {
        self.range_bytes() / PAGE_SIZE
    }

    /// The frame numbers the packet lists. Our bus has no guest-physical addresses; the
    /// caller's virtual page numbers stand in for them (the host only logs them: it reaches
    /// the pages by range offset).
    fn pfns(&self) -> Vec<u64> {
        self.runs
            .iter()
            .flat_map(|r| (0..r.bytes / PAGE_SIZE).map(move |k| r.first_page / PAGE_SIZE + k))
            .collect()
    }

    /// The caller addresses of `len` bytes at `offset` of the range, one piece per run they
    /// touch. EINVAL: outside the range (the host's mistake).
    fn resolve(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, Errno> {
        let end = offset.checked_add(len).ok_or(Errno::EINVAL)?;
        if end > self.range_bytes() {
            return Err(Errno::EINVAL);
        }
        let mut pieces = Vec::new();
        for run in &self.runs {
            let run_end = run.range_start + run.bytes;
            let from = offset.max(run.range_start);
            let to = end.min(run_end);
            if from < to {
                pieces.push((run.first_page + (from - run.range_start), to - from));
            }
        }
        Ok(pieces)
    }
}

/// A call waiting for its completion.
struct InFlight {
    /// The caller: its memory is where the pages are, for as long as the call is unanswered
    /// (the caller's thread cannot leave the syscall before we answer, so its pid stays its).
    caller: Caller,
    /// The user address of its 64-byte struct.
    arg: u64,
    pages: Arc<PinnedPages>,
    /// Taken for writing before the call is answered, for reading around every access to the
    /// caller's memory: no access outlives the syscall it belongs to.
    access: Arc<RwLock<bool>>,
    reply: Parked<IoctlOutcome>,
    /// Reviewed: when the wait ends with ETIMEDOUT.
    deadline: Option<Instant>,
}

struct State {
    /// Set by removal: opens and ioctls get ENODEV.
    removing: bool,
    /// Open files and the credentials captured at open (`file->f_cred`); `None` if they
    /// could not be read (then every ioctl on the file gets EACCES).
    files: HashMap<Handle, Option<CredentialIdentity>>,
    next_handle: Handle,
    requestor: Requestor,
    in_flight: HashMap<u64, InFlight>,
    /// Reviewed: ids of calls that timed out; their slot is kept until the late completion
    /// comes, so a late answer can never complete a newer call.
    abandoned: HashSet<u64>,
    /// The device is gone: the timeout thread ends.
    stopped: bool,
}

/// The device.
pub struct XsFastpath {
    channel: Arc<dyn HostChannel>,
    rules: Rules,
    core: Arc<Core>,
}

/// What the device shares with its timeout thread.
struct Core {
    state: Mutex<State>,
    /// Signalled when a file closes (removal waits for none open) and when the earliest
    /// deadline may have changed (the timeout thread).
    changed: Condvar,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for XsFastpath {
    fn drop(&mut self) {
        self.core.lock().stopped = true;
        self.core.changed.notify_all();
    }
}

/// What an accepted ioctl becomes before it is sent.
struct Prepared {
    pages: PinnedPages,
    request: VspRequest,
    deadline: Option<Instant>,
}

impl XsFastpath {
    /// The device; a reviewed one fails when its timeout thread cannot be started.
    fn new(channel: Arc<dyn HostChannel>, rules: Rules) -> io::Result<Arc<XsFastpath>> {
        let core = Arc::new(Core {
            state: Mutex::new(State {
                removing: false,
                files: HashMap::new(),
                next_handle: 1,
                requestor: Requestor::new(REQUESTOR_SLOTS),
                in_flight: HashMap::new(),
                abandoned: HashSet::new(),
                stopped: false,
            }),
            changed: Condvar::new(),
        });
        if rules.bounded_wait {
            // Without it calls would wait as the posted driver's do: a reviewed device that
            // cannot bound its waits is not built at all.
            let for_thread = core.clone();
            spawn_named("xs-timeouts", move || expire_calls(&for_thread))?;
        }
        Ok(Arc::new(XsFastpath {
            channel,
            rules,
            core,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.core.lock()
    }

    /// A mistake of the caller's: a console line in the posted driver, debug when reviewed.
    fn user_error(&self, caller: &Caller, what: std::fmt::Arguments<'_>) {
        if self.rules.log_user_errors {
            error!(
                "xs_fastpath: pid {} ({}): {what}",
                caller.pid,
                comm(caller.pid)
            );
        } else {
            debug!("xs_fastpath: pid {}: {what}", caller.pid);
        }
    }

    /// The checks of the patch's ioctl handler up to the send, in its order (spec §3.2).
    fn prepare(
        &self,
        handle: Handle,
        call: &IoctlCall<'_>,
        caller: &Caller,
    ) -> Result<Prepared, Errno> {
        // No .compat_ioctl in the file_operations: a 32-bit caller never reaches the driver.
        if call.compat {
            return Err(Errno::ENOTTY);
        }
        // 0: the `default:` case of the switch on cmd.
        if call.cmd != IOCTL_USER_REQUEST {
            self.user_error(
                caller,
                format_args!("unknown ioctl command {:#x}", call.cmd),
            );
            return Err(self.rules.unknown_command);
        }
        // 1 and 2: removal, then `file->f_cred != current_cred()`.
        let opened_as = {
            let state = self.lock();
            if state.removing {
                return Err(Errno::ENODEV);
            }
            state.files.get(&handle).cloned().flatten()
        };
        let now = caller.credentials().ok();
        if opened_as.is_none() || now != opened_as {
            self.user_error(
                caller,
                format_args!("credentials differ from those the file was opened with"),
            );
            return Err(Errno::EACCES);
        }
        // 3 and 4: access_ok and copy_from_user of the struct. A FUSE mount's restricted
        // ioctl has fetched it already (`_IOC_SIZE(cmd)` = 64 bytes); CUSE has not.
        if !access_ok(call.arg, REQUEST_SYNC_LEN as u64) {
            self.user_error(caller, format_args!("bad argument address {:#x}", call.arg));
            return Err(Errno::EFAULT);
        }
        let mut raw = [0u8; REQUEST_SYNC_LEN];
        match call.input.get(..REQUEST_SYNC_LEN) {
            Some(fetched) => raw.copy_from_slice(fetched),
            None => caller.read_memory(call.arg, &mut raw)?,
        }
        let request = RequestSync::read_from_bytes(&raw).map_err(|_| Errno::EFAULT)?;
        // 5.
        if request.request_len.get() == 0 || request.response_len.get() == 0 {
            return Err(Errno::EINVAL);
        }
        let buffers = Buffers::of(&request);
        if self.rules.validate_first {
            // Review points 13 and 16: nothing is pinned for a call that cannot be sent.
            let timeout = request.timeout.get();
            if timeout == 0 || timeout > MAX_TIMEOUT_MS {
                self.user_error(caller, format_args!("timeout {timeout} ms out of range"));
                return Err(Errno::EINVAL);
            }
            if buffers.hv_pages() > MAX_PAGES {
                self.user_error(caller, format_args!("buffers span over {MAX_PAGES} pages"));
                return Err(Errno::EINVAL);
            }
        }
        // 7, 8, 9: pin request, response, then data; 10: the page cap.
        let mut pages = PinnedPages::default();
        let order = buffers.in_pin_order();
        if let Err((i, errno)) = pin(caller, &order) {
            let what = order.get(i).map_or("?", |b| b.0);
            self.user_error(caller, format_args!("failed to pin the {what} buffer"));
            return Err(errno);
        }
        let data_offset = buffers.data.map(|(addr, len)| pages.push(addr, len));
        let request_offset = pages.push(buffers.request.0, buffers.request.1);
        let response_offset = pages.push(buffers.response.0, buffers.response.1);
        if pages.pages() > MAX_PAGES {
            self.user_error(caller, format_args!("{} pages over the cap", pages.pages()));
            return Err(Errno::EINVAL);
        }
        let data_len = buffers.data.map_or(0, |(_, len)| len);
        let request_out = VspRequest {
            version: U32::new(0),
            timeout_ms: request.timeout,
            data_buffer_offset: U32::new(data_offset.unwrap_or(0) as u32),
            data_buffer_length: U32::new(data_len as u32),
            data_buffer_valid: U32::new(u32::from(buffers.data.is_some())),
            operation_type: U32::new(OP_USER_REQUEST),
            // At most 8192 pages of 4 KiB: every offset fits 32 bits.
            request_buffer_offset: U32::new(request_offset as u32),
            request_buffer_length: request.request_len,
            response_buffer_offset: U32::new(response_offset as u32),
            response_buffer_length: request.response_len,
            transaction_id: request.guid,
        };
        let deadline = self.rules.bounded_wait.then(|| {
            Instant::now() + Duration::from_millis(request.timeout.get().into()) + WAIT_GRACE
        });
        Ok(Prepared {
            pages,
            request: request_out,
            deadline,
        })
    }

    /// 11–14: take a request id, record the call, send, and sleep until the completion.
    fn submit(&self, prepared: Prepared, call_arg: u64, caller: &Caller, reply: IoctlAnswer) {
        let pages = Arc::new(prepared.pages);
        let (id, packet) = {
            let mut state = self.lock();
            // Under the lock, unlike the patch's unsynchronised test (review point 10): a
            // call never starts after removal has begun.
            if state.removing {
                drop(state);
                return reply.err(Errno::ENODEV);
            }
            let Some(id) = state.requestor.take() else {
                drop(state);
                // vmbus_next_request_id: every slot in flight.
                return reply.err(Errno::EAGAIN);
            };
            let packet = match encode_request_packet(id, &pages.pfns(), &prepared.request) {
                Ok(packet) => packet,
                Err(e) => {
                    state.requestor.release(id);
                    drop(state);
                    error!("xs_fastpath: cannot build the request packet: {e}");
                    return reply.err(Errno::EINVAL);
                }
            };
            state.in_flight.insert(
                id,
                InFlight {
                    caller: caller.clone(),
                    arg: call_arg,
                    pages,
                    access: Arc::new(RwLock::new(false)),
                    // wait_for_completion(): no signal ends it; FUSE keeps the caller in D
                    // state until we answer.
                    reply: reply.park(),
                    deadline: prepared.deadline,
                },
            );
            (id, packet)
        };
        if prepared.deadline.is_some() {
            self.core.changed.notify_all();
        }
        if let Err(e) = self.channel.send_packet(&packet) {
            warn!("xs_fastpath: request {id} not sent, the host is gone ({e})");
            if let Some(call) = self.take_call(id) {
                finish(call, Err(Errno::ENODEV));
            }
        }
    }

    /// Removes a call from the table and frees its id.
    fn take_call(&self, id: u64) -> Option<InFlight> {
        let mut state = self.lock();
        let call = state.in_flight.remove(&id)?;
        state.requestor.release(id);
        Some(call)
    }

    /// One completion from the host (the channel callback's loop body).
    fn complete(&self, trans_id: u64, payload: &[u8]) {
        let call = {
            let mut state = self.lock();
            match state.in_flight.remove(&trans_id) {
                Some(call) => {
                    state.requestor.release(trans_id);
                    Some(call)
                }
                None => {
                    if state.abandoned.remove(&trans_id) {
                        state.requestor.release(trans_id);
                        debug!("xs_fastpath: late completion of timed-out request {trans_id}");
                    } else {
                        error!(
                            "xs_fastpath: completion for unknown request id {trans_id}; skipped"
                        );
                    }
                    None
                }
            }
        };
        let Some(call) = call else { return };
        let response = VspResponse::read_lenient(payload);
        // 15, 16: put_user of the two words, status first; only they are written back.
        let written = call
            .caller
            .write_memory(call.arg + STATUS_OFFSET, response.error.as_bytes())
            .and_then(|()| {
                call.caller.write_memory(
                    call.arg + RESPONSE_LEN_OFFSET,
                    response.response_len.as_bytes(),
                )
            });
        // 17: 0 even when the host reported an error; the caller reads the status.
        finish(call, written.map(|()| 0));
    }

    /// The host reads or writes a call's pages.
    fn memory(&self, message: MemoryMessage<'_>) {
        match message {
            MemoryMessage::Read {
                trans_id,
                offset,
                len,
            } => self.host_reads(trans_id, offset, len),
            MemoryMessage::Write {
                trans_id,
                offset,
                bytes,
            } => self.host_writes(trans_id, offset, bytes),
            MemoryMessage::Data { trans_id, .. } => {
                warn!("xs_fastpath: host sent DATA for request {trans_id}; only guests send DATA");
            }
        }
    }

    /// The pages and access lock of a call in flight.
    fn call_pages(&self, trans_id: u64) -> Option<(Caller, Arc<PinnedPages>, Arc<RwLock<bool>>)> {
        let state = self.lock();
        let call = state.in_flight.get(&trans_id)?;
        Some((call.caller.clone(), call.pages.clone(), call.access.clone()))
    }

    fn host_reads(&self, trans_id: u64, offset: u64, len: u32) {
        let fail = |status: Errno| {
            let body = MemoryMessage::Data {
                trans_id,
                offset,
                status: status as u32,
                bytes: &[],
            }
            .encode();
            if let Err(e) = self.channel.send_memory(&body) {
                debug!("xs_fastpath: DATA for request {trans_id} not sent ({e})");
            }
        };
        let Some((caller, pages, access)) = self.call_pages(trans_id) else {
            warn!("xs_fastpath: host reads pages of request {trans_id}, which is not in flight");
            return fail(Errno::ENOENT);
        };
        let pieces = match pages.resolve(offset, len.into()) {
            Ok(pieces) => pieces,
            Err(errno) => {
                warn!(
                    "xs_fastpath: host reads {len} bytes at {offset} of request {trans_id}, \
                     outside its {} bytes of pages",
                    pages.range_bytes()
                );
                return fail(errno);
            }
        };
        let guard = access.read().unwrap_or_else(|e| e.into_inner());
        if *guard {
            drop(guard);
            return fail(Errno::ENOENT);
        }
        // One buffer for the frame: header, then the caller's bytes read straight into it.
        let mut frame = vec![0u8; MEMORY_HEADER_LEN + guest_memory::MAX_CHUNK];
        let mut at = offset;
        for (addr, piece_len) in pieces {
            let mut done = 0;
            while done < piece_len {
                let n = (piece_len - done).min(guest_memory::MAX_CHUNK as u64) as usize;
                let body = &mut frame[..MEMORY_HEADER_LEN + n];
                if let Err(errno) = caller.read_memory(addr + done, &mut body[MEMORY_HEADER_LEN..])
                {
                    drop(guard);
                    return fail(errno);
                }
                let header =
                    guest_memory::header(guest_memory::op::DATA, 0, trans_id, at, n as u32);
                body[..MEMORY_HEADER_LEN].copy_from_slice(header.as_bytes());
                if let Err(e) = self.channel.send_memory(body) {
                    debug!("xs_fastpath: DATA for request {trans_id} not sent ({e})");
                    return;
                }
                done += n as u64;
                at += n as u64;
            }
        }
    }

    fn host_writes(&self, trans_id: u64, offset: u64, bytes: &[u8]) {
        let Some((caller, pages, access)) = self.call_pages(trans_id) else {
            warn!("xs_fastpath: host writes pages of request {trans_id}, which is not in flight; dropped");
            return;
        };
        let Ok(pieces) = pages.resolve(offset, bytes.len() as u64) else {
            warn!(
                "xs_fastpath: host writes {} bytes at {offset} of request {trans_id}, outside \
                 its pages; dropped",
                bytes.len()
            );
            return;
        };
        let guard = access.read().unwrap_or_else(|e| e.into_inner());
        if *guard {
            return;
        }
        let mut from = 0usize;
        for (addr, len) in pieces {
            let chunk = &bytes[from..from + len as usize];
            if let Err(errno) = caller.write_memory(addr, chunk) {
                // A pinned page stays the caller's even if it unmaps it meanwhile; ours goes
                // away with the mapping, so the bytes land nowhere, as they would be invisible
                // to the caller in the kernel.
                debug!("xs_fastpath: host write to request {trans_id} lost ({errno})");
            }
            from += len as usize;
        }
    }
}

/// Answers a call taken out of the table: waits for its memory accesses to end first.
fn finish(call: InFlight, result: Result<i32, Errno>) {
    {
        let mut answered = call.access.write().unwrap_or_else(|e| e.into_inner());
        *answered = true;
    }
    let Some(reply) = call.reply.claim() else {
        return;
    };
    match result {
        Ok(result) => reply.ok(IoctlOutcome::Done(IoctlReply {
            result,
            out: Vec::new(),
        })),
        Err(errno) => reply.err(errno),
    }
}

/// The three buffers the caller names, as the patch reads them from the struct.
struct Buffers {
    request: (u64, u64),
    response: (u64, u64),
    data: Option<(u64, u64)>,
}

impl Buffers {
    fn of(request: &RequestSync) -> Buffers {
        let data_len = u64::from(request.data_len.get());
        Buffers {
            request: (
                request.request_buffer.get(),
                request.request_len.get().into(),
            ),
            response: (
                request.response_buffer.get(),
                request.response_len.get().into(),
            ),
            data: (data_len != 0).then(|| (request.data_buffer.get(), data_len)),
        }
    }

    /// The patch pins request, response, then data.
    fn in_pin_order(&self) -> Vec<(&'static str, u64, u64)> {
        let mut order = vec![
            ("request", self.request.0, self.request.1),
            ("response", self.response.0, self.response.1),
        ];
        if let Some((addr, len)) = self.data {
            order.push(("data", addr, len));
        }
        order
    }

    /// Pages in Hyper-V's 4 KiB units, computed without pinning (reviewed).
    fn hv_pages(&self) -> u64 {
        self.in_pin_order()
            .iter()
            .map(|&(_, addr, len)| pages_spanned(addr, len, HV_PAGE_SIZE))
            .sum()
    }
}

/// `import_single_range` + `iov_iter_get_pages_alloc` with the READ direction (FOLL_WRITE),
/// for each buffer in turn: a valid user range, at most MAX_RW_COUNT long, writable memory.
/// The error names the first buffer that fails.
fn pin(caller: &Caller, buffers: &[(&str, u64, u64)]) -> Result<(), (usize, Errno)> {
    let mut ranges = Vec::with_capacity(buffers.len());
    for (i, &(_, addr, len)) in buffers.iter().enumerate() {
        if !access_ok(addr, len) || len > MAX_RW_COUNT {
            // The buffers before it are checked first, as the patch pins them first.
            caller.check_writable_ranges(&ranges)?;
            return Err((i, Errno::EFAULT));
        }
        ranges.push((addr, len));
    }
    caller.check_writable_ranges(&ranges)
}

/// `access_ok()` on x86_64: the range lies below the user address limit.
fn access_ok(addr: u64, len: u64) -> bool {
    addr.checked_add(len)
        .is_some_and(|end| end <= crate::caller::TASK_SIZE_MAX)
}

/// The caller's `comm`, for the posted driver's log lines (`current->comm`).
fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Reviewed: the thread that ends calls whose host did not answer in time. It ends when the
/// device is removed or dropped.
fn expire_calls(core: &Core) {
    let mut state = core.lock();
    loop {
        if state.stopped {
            return;
        }
        let now = Instant::now();
        let due: Vec<u64> = state
            .in_flight
            .iter()
            .filter(|(_, call)| call.deadline.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        if due.is_empty() {
            let next = state.in_flight.values().filter_map(|c| c.deadline).min();
            state = match next {
                Some(deadline) => {
                    core.changed
                        .wait_timeout(state, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => core.changed.wait(state).unwrap_or_else(|e| e.into_inner()),
            };
            continue;
        }
        let mut calls = Vec::new();
        for id in due {
            if let Some(call) = state.in_flight.remove(&id) {
                // The slot stays taken until the host's late answer (or the end).
                state.abandoned.insert(id);
                calls.push((id, call));
            }
        }
        drop(state);
        for (id, call) in calls {
            debug!("xs_fastpath: no completion for request {id} in time; ETIMEDOUT");
            finish(call, Err(Errno::ETIMEDOUT));
        }
        state = core.lock();
    }
}

impl Device for XsFastpath {
    fn name(&self) -> &str {
        DEVICE_NAME
    }

    fn open(&self, caller: &Caller, _flags: i32) -> Result<Handle, Errno> {
        let identity = caller.credentials().ok();
        let mut state = self.lock();
        if state.removing {
            return Err(Errno::ENODEV);
        }
        let handle = state.next_handle;
        state.next_handle += 1;
        state.files.insert(handle, identity);
        Ok(handle)
    }

    fn ioctl(&self, handle: Handle, call: &IoctlCall<'_>, caller: &Caller, reply: IoctlAnswer) {
        match self.prepare(handle, call, caller) {
            Ok(prepared) => self.submit(prepared, call.arg, caller, reply),
            Err(errno) => reply.err(errno),
        }
    }

    fn release(&self, handle: Handle) {
        self.lock().files.remove(&handle);
        self.core.changed.notify_all();
    }
}

impl ChannelDriver for XsFastpath {
    fn on_channel_callback(&self) {
        // The patch's callback drains the ring with no budget (review point 6).
        loop {
            match self.channel.recv(RECV_LIMIT) {
                Ok(Some(packet)) => self.complete(packet.trans_id, &packet.payload),
                Ok(None) => return,
                Err(e) => {
                    error!("xs_fastpath: {e}");
                    return;
                }
            }
        }
    }

    fn on_rescind(&self) {
        let mut state = self.lock();
        state.removing = true;
        if self.rules.removal_ends_calls {
            // Reviewed: deregister first (the node goes when this returns), end what waits.
            let calls: Vec<InFlight> = state.in_flight.drain().map(|(_, call)| call).collect();
            state.stopped = true;
            drop(state);
            self.core.changed.notify_all();
            info!(
                "xs_fastpath: removed; {} call(s) in flight end with ENODEV",
                calls.len()
            );
            for call in calls {
                finish(call, Err(Errno::ENODEV));
            }
            return;
        }
        // Posted: wait, uninterruptibly, until no file is open; only then deregister. A
        // caller stuck waiting for the host holds its file, so this can wait forever, as the
        // kernel's removal does.
        info!(
            "xs_fastpath: removal waits for {} open file(s) to close",
            state.files.len()
        );
        while !state.files.is_empty() {
            state = self
                .core
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        state.stopped = true;
        info!("xs_fastpath: removed");
    }

    fn on_memory(&self, message: MemoryMessage<'_>) {
        self.memory(message);
    }
}

#[cfg(test)]
#[path = "xs_fastpath_tests.rs"]
mod tests;
