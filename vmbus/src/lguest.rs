//! lguest over the bus: the messages between `/dev/lguest` (cusedev) and the fake Guest
//! (fakehost), and the launcher ABI constants both sides share (spec lguest.md §1–§3).
//!
//! lguest is not a VMBus device: in Linux 3.x the Guest runs inside the host kernel, and
//! `/dev/lguest` is how the Launcher drives it. Here the roles are mirrored. cusedev keeps
//! what the host kernel kept (the Guest's registration, its death reason, its eventfds, the
//! bounds of its memory, the launcher's blocking `read`) and fakehost plays the Guest itself:
//! the instructions it executes, the hypercalls it makes.
//!
//! One bus channel carries every Guest: each `open` of `/dev/lguest` that INITIALIZEs gets a
//! guest number from cusedev, and every message names it. Messages are inband packets
//! (transaction id 0) of a fixed 8-byte header — [`LguestHeader`]: `op`, `guest` — and a
//! body of the op's size (every size below is that of the body):
//!
//! | dir | op | body | meaning |
//! |---|---|---|---|
//! | → Guest | [`op::START`] | [`StartBody`] 32 | LHREQ_INITIALIZE succeeded: a new Guest |
//! | → Guest | [`op::RUN`] | [`RunBody`] 8 | the Guest may run until its next NOTIFY or death |
//! | → Guest | [`op::IRQ`] | [`IrqBody`] 8 | LHREQ_IRQ: interrupt `irq` is pending |
//! | → Guest | [`op::DIED`] | [`DiedBody`] 8 + text | the Guest is dead, with the reason the launcher reads |
//! | → Guest | [`op::STOP`] | none | the file was closed: the Guest is gone |
//! | ← Guest | [`op::NOTIFY`] | [`NotifyBody`] 8 | LHCALL_NOTIFY(addr) |
//! | ← Guest | [`op::SHUTDOWN`] | [`ShutdownBody`] 16 | LHCALL_SHUTDOWN(message address, how) |
//! | ← Guest | [`op::KILL`] | [`KillBody`] 8 + text | a fault found on the Guest's side: `kill_guest(reason)` |
//!
//! The Guest's memory goes by guest memory frames ([`crate::guest_memory`]) whose
//! transaction id is the guest number and whose offset is the guest-physical address. cusedev
//! checks each access as the host kernel's `lgread`/`lgwrite` did and kills the Guest with
//! the kernel's reason when it is outside; a READ refused that way is answered with a DATA of
//! status EFAULT, followed by a DIED.
//!
//! The Guest runs only while the launcher is in `read(2)`, as in the kernel: it starts or
//! resumes on RUN and, after a NOTIFY, waits for the next RUN (cause [`run_cause::READ`]: the
//! launcher read again, or [`run_cause::EVENTFD`]: an eventfd took the notification and the
//! same read goes on). See docs/lguest.md.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::WireError;

/// `enum lguest_req` (include/linux/lguest_launcher.h, pre-4.1).
pub mod lhreq {
    /// `LHREQ_INITIALIZE` + base, pfn limit, start.
    pub const INITIALIZE: u64 = 0;
    /// `LHREQ_GETDMA`: no longer used.
    pub const GETDMA: u64 = 1;
    /// `LHREQ_IRQ` + irq.
    pub const IRQ: u64 = 2;
    /// `LHREQ_BREAK`: no longer used.
    pub const BREAK: u64 = 3;
    /// `LHREQ_EVENTFD` + address, fd.
    pub const EVENTFD: u64 = 4;
}

/// `LGUEST_IRQS` on x86_32: `NR_IRQS < 32 ? NR_IRQS : 32`.
pub const LGUEST_IRQS: u32 = 32;
/// The Guest's page size.
pub const PAGE_SIZE: u64 = 4096;
/// `LGUEST_SHUTDOWN_POWEROFF`.
pub const SHUTDOWN_POWEROFF: u32 = 1;
/// `LGUEST_SHUTDOWN_RESTART`.
pub const SHUTDOWN_RESTART: u32 = 2;
/// How many bytes LHCALL_SHUTDOWN reads at the message address (byte 127 forced to NUL).
pub const SHUTDOWN_MESSAGE_LEN: usize = 128;
/// The longest reason text either side sends (the kernel's reasons are well under this).
pub const MAX_REASON_LEN: usize = 1024;

/// Size of [`LguestHeader`].
pub const HEADER_LEN: usize = 8;

/// Message kinds.
pub mod op {
    /// cusedev → Guest: a Guest was initialized ([`super::StartBody`]).
    pub const START: u32 = 1;
    /// cusedev → Guest: run ([`super::RunBody`]).
    pub const RUN: u32 = 2;
    /// cusedev → Guest: an interrupt is pending ([`super::IrqBody`]).
    pub const IRQ: u32 = 3;
    /// cusedev → Guest: the Guest is dead ([`super::DiedBody`] + reason).
    pub const DIED: u32 = 4;
    /// cusedev → Guest: the file was closed; forget the Guest.
    pub const STOP: u32 = 5;
    /// Guest → cusedev: LHCALL_NOTIFY ([`super::NotifyBody`]).
    pub const NOTIFY: u32 = 16;
    /// Guest → cusedev: LHCALL_SHUTDOWN ([`super::ShutdownBody`]).
    pub const SHUTDOWN: u32 = 17;
    /// Guest → cusedev: kill the Guest with this reason ([`super::KillBody`] + text).
    pub const KILL: u32 = 18;
}

/// Why a RUN was sent.
pub mod run_cause {
    /// The launcher called `read` (again).
    pub const READ: u32 = 1;
    /// The last NOTIFY was signalled to an eventfd; the same `read` goes on running.
    pub const EVENTFD: u32 = 2;
}

/// How the Guest died, in a DIED.
pub mod died_kind {
    /// A reason string (the launcher's next read returns it).
    pub const REASON: u32 = 0;
    /// A restart was asked for (every read fails with ERESTART).
    pub const RESTART: u32 = 1;
}

/// Every message starts with this.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct LguestHeader {
    /// [`op`].
    pub op: U32,
    /// The guest number cusedev gave at START.
    pub guest: U32,
}

/// START: what LHREQ_INITIALIZE recorded, and who the launcher is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct StartBody {
    /// W, the launcher's `unsigned long`: 4 or 8.
    pub word: U32,
    /// The thread group of the task that initialized (for status displays only).
    pub launcher_pid: U32,
    /// The launcher's virtual address of guest-physical 0 (for status displays only).
    pub base: U64,
    /// Pages the Guest may reach: guest-physical addresses below `pfn_limit × 4096`.
    pub pfn_limit: U64,
    /// The Guest's start address.
    pub start: U64,
}

/// RUN.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct RunBody {
    /// [`run_cause`].
    pub cause: U32,
    /// 0.
    pub reserved: U32,
}

/// IRQ.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct IrqBody {
    /// The interrupt, below [`LGUEST_IRQS`].
    pub irq: U32,
    /// 0.
    pub reserved: U32,
}

/// DIED: followed by `len` bytes of reason text (no NUL).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct DiedBody {
    /// [`died_kind`].
    pub kind: U32,
    /// Bytes of text that follow (0 for a restart).
    pub len: U32,
}

/// NOTIFY.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct NotifyBody {
    /// The notified guest-physical address.
    pub addr: U64,
}

/// SHUTDOWN.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct ShutdownBody {
    /// Guest-physical address of the message (128 bytes are read there).
    pub message: U64,
    /// [`SHUTDOWN_POWEROFF`] or [`SHUTDOWN_RESTART`] (anything else: as poweroff, like the
    /// kernel, which only tests for RESTART).
    pub how: U32,
    /// 0.
    pub reserved: U32,
}

/// KILL: followed by `len` bytes of reason text (no NUL).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct KillBody {
    /// Bytes of text that follow.
    pub len: U32,
    /// 0.
    pub reserved: U32,
}

const _: () = assert!(core::mem::size_of::<LguestHeader>() == HEADER_LEN);
const _: () = assert!(core::mem::size_of::<StartBody>() == 32);
const _: () = assert!(core::mem::size_of::<RunBody>() == 8);
const _: () = assert!(core::mem::size_of::<IrqBody>() == 8);
const _: () = assert!(core::mem::size_of::<DiedBody>() == 8);
const _: () = assert!(core::mem::size_of::<NotifyBody>() == 8);
const _: () = assert!(core::mem::size_of::<ShutdownBody>() == 16);
const _: () = assert!(core::mem::size_of::<KillBody>() == 8);

/// What START tells the Guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// W: 4 or 8.
    pub word: u32,
    /// The launcher's thread group.
    pub launcher_pid: u32,
    /// The launcher's address of guest-physical 0.
    pub base: u64,
    /// The Guest's page limit.
    pub pfn_limit: u64,
    /// The start address.
    pub start: u64,
}

/// How a Guest ended, as DIED says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Death {
    /// Killed with this reason.
    Reason(String),
    /// Asked for a restart.
    Restart,
}

/// A message to the Guest (sent by cusedev).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToGuest {
    /// See [`op::START`].
    Start(Start),
    /// See [`op::RUN`]; the cause is a [`run_cause`] value.
    Run {
        /// [`run_cause`].
        cause: u32,
    },
    /// See [`op::IRQ`].
    Irq {
        /// The interrupt.
        irq: u32,
    },
    /// See [`op::DIED`].
    Died(Death),
    /// See [`op::STOP`].
    Stop,
}

/// A message from the Guest (sent by fakehost).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromGuest {
    /// LHCALL_NOTIFY.
    Notify {
        /// The address.
        addr: u64,
    },
    /// LHCALL_SHUTDOWN.
    Shutdown {
        /// Guest-physical address of the message.
        message: u64,
        /// [`SHUTDOWN_POWEROFF`] / [`SHUTDOWN_RESTART`].
        how: u32,
    },
    /// `kill_guest(reason)`.
    Kill {
        /// The reason.
        reason: String,
    },
}

fn header(op: u32, guest: u32) -> LguestHeader {
    LguestHeader {
        op: U32::new(op),
        guest: U32::new(guest),
    }
}

fn with_text(mut out: Vec<u8>, text: &str) -> Vec<u8> {
    // Longer reasons are cut at a character boundary rather than refused: a reason is for
    // people, and the sender has no better one to give.
    let mut end = text.len().min(MAX_REASON_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&text.as_bytes()[..end]);
    out
}

fn text_len(text: &str) -> u32 {
    let mut end = text.len().min(MAX_REASON_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end as u32
}

impl ToGuest {
    /// The packet payload for guest number `guest`.
    pub fn encode(&self, guest: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 32);
        match self {
            ToGuest::Start(s) => {
                out.extend_from_slice(header(op::START, guest).as_bytes());
                let body = StartBody {
                    word: U32::new(s.word),
                    launcher_pid: U32::new(s.launcher_pid),
                    base: U64::new(s.base),
                    pfn_limit: U64::new(s.pfn_limit),
                    start: U64::new(s.start),
                };
                out.extend_from_slice(body.as_bytes());
            }
            ToGuest::Run { cause } => {
                out.extend_from_slice(header(op::RUN, guest).as_bytes());
                let body = RunBody {
                    cause: U32::new(*cause),
                    reserved: U32::new(0),
                };
                out.extend_from_slice(body.as_bytes());
            }
            ToGuest::Irq { irq } => {
                out.extend_from_slice(header(op::IRQ, guest).as_bytes());
                let body = IrqBody {
                    irq: U32::new(*irq),
                    reserved: U32::new(0),
                };
                out.extend_from_slice(body.as_bytes());
            }
            ToGuest::Died(death) => {
                out.extend_from_slice(header(op::DIED, guest).as_bytes());
                let (kind, text) = match death {
                    Death::Reason(reason) => (died_kind::REASON, reason.as_str()),
                    Death::Restart => (died_kind::RESTART, ""),
                };
                let body = DiedBody {
                    kind: U32::new(kind),
                    len: U32::new(text_len(text)),
                };
                out.extend_from_slice(body.as_bytes());
                out = with_text(out, text);
            }
            ToGuest::Stop => out.extend_from_slice(header(op::STOP, guest).as_bytes()),
        }
        out
    }

    /// Parses a payload (which may carry the packet's padding to 8 bytes at the end):
    /// the guest number and the message.
    pub fn parse(payload: &[u8]) -> Result<(u32, ToGuest), WireError> {
        let (h, body) = parse_header(payload)?;
        let guest = h.guest.get();
        let message = match h.op.get() {
            op::START => {
                let b = fixed::<StartBody>(body, "lguest START")?;
                ToGuest::Start(Start {
                    word: b.word.get(),
                    launcher_pid: b.launcher_pid.get(),
                    base: b.base.get(),
                    pfn_limit: b.pfn_limit.get(),
                    start: b.start.get(),
                })
            }
            op::RUN => ToGuest::Run {
                cause: fixed::<RunBody>(body, "lguest RUN")?.cause.get(),
            },
            op::IRQ => ToGuest::Irq {
                irq: fixed::<IrqBody>(body, "lguest IRQ")?.irq.get(),
            },
            op::DIED => {
                let (b, rest) = prefix::<DiedBody>(body, "lguest DIED")?;
                let text = text(rest, b.len.get(), "lguest DIED reason")?;
                match b.kind.get() {
                    died_kind::REASON => ToGuest::Died(Death::Reason(text)),
                    died_kind::RESTART => ToGuest::Died(Death::Restart),
                    other => {
                        return Err(WireError::BadValue {
                            what: "lguest DIED kind",
                            value: other.into(),
                        })
                    }
                }
            }
            op::STOP => ToGuest::Stop,
            other => {
                return Err(WireError::BadValue {
                    what: "lguest message to the Guest: op",
                    value: other.into(),
                })
            }
        };
        Ok((guest, message))
    }
}

impl FromGuest {
    /// The packet payload for guest number `guest`.
    pub fn encode(&self, guest: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 16);
        match self {
            FromGuest::Notify { addr } => {
                out.extend_from_slice(header(op::NOTIFY, guest).as_bytes());
                out.extend_from_slice(
                    NotifyBody {
                        addr: U64::new(*addr),
                    }
                    .as_bytes(),
                );
            }
            FromGuest::Shutdown { message, how } => {
                out.extend_from_slice(header(op::SHUTDOWN, guest).as_bytes());
                let body = ShutdownBody {
                    message: U64::new(*message),
                    how: U32::new(*how),
                    reserved: U32::new(0),
                };
                out.extend_from_slice(body.as_bytes());
            }
            FromGuest::Kill { reason } => {
                out.extend_from_slice(header(op::KILL, guest).as_bytes());
                let body = KillBody {
                    len: U32::new(text_len(reason)),
                    reserved: U32::new(0),
                };
                out.extend_from_slice(body.as_bytes());
                out = with_text(out, reason);
            }
        }
        out
    }

    /// Parses a payload (padding allowed at the end): the guest number and the message.
    pub fn parse(payload: &[u8]) -> Result<(u32, FromGuest), WireError> {
        let (h, body) = parse_header(payload)?;
        let guest = h.guest.get();
        let message = match h.op.get() {
            op::NOTIFY => FromGuest::Notify {
                addr: fixed::<NotifyBody>(body, "lguest NOTIFY")?.addr.get(),
            },
            op::SHUTDOWN => {
                let b = fixed::<ShutdownBody>(body, "lguest SHUTDOWN")?;
                FromGuest::Shutdown {
                    message: b.message.get(),
                    how: b.how.get(),
                }
            }
            op::KILL => {
                let (b, rest) = prefix::<KillBody>(body, "lguest KILL")?;
                FromGuest::Kill {
                    reason: text(rest, b.len.get(), "lguest KILL reason")?,
                }
            }
            other => {
                return Err(WireError::BadValue {
                    what: "lguest message from the Guest: op",
                    value: other.into(),
                })
            }
        };
        Ok((guest, message))
    }
}

fn parse_header(payload: &[u8]) -> Result<(LguestHeader, &[u8]), WireError> {
    LguestHeader::read_from_prefix(payload).map_err(|_| WireError::TooShort {
        what: "lguest message header",
        need: HEADER_LEN,
        got: payload.len(),
    })
}

fn prefix<'a, T: FromBytes + KnownLayout + Immutable>(
    body: &'a [u8],
    what: &'static str,
) -> Result<(T, &'a [u8]), WireError> {
    T::read_from_prefix(body).map_err(|_| WireError::TooShort {
        what,
        need: core::mem::size_of::<T>(),
        got: body.len(),
    })
}

fn fixed<T: FromBytes + KnownLayout + Immutable>(
    body: &[u8],
    what: &'static str,
) -> Result<T, WireError> {
    Ok(prefix::<T>(body, what)?.0)
}

/// `len` bytes of UTF-8 text at the start of `rest` (what follows is padding).
fn text(rest: &[u8], len: u32, what: &'static str) -> Result<String, WireError> {
    let len = len as usize;
    if len > MAX_REASON_LEN {
        return Err(WireError::TooLong {
            what,
            max: MAX_REASON_LEN,
            got: len,
        });
    }
    let bytes = rest.get(..len).ok_or(WireError::TooShort {
        what,
        need: len,
        got: rest.len(),
    })?;
    if bytes.contains(&0) {
        return Err(WireError::ContainsNul { what });
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| WireError::BadSyntax {
        what,
        input: String::from_utf8_lossy(bytes).into_owned(),
    })
}

/// The 3.x `lguest_address_ok`: may the Host touch `len` bytes at guest-physical `addr`
/// on the Guest's behalf? (drivers/lguest/lg.h of 3.x; see docs/decisions.md.)
pub fn address_ok(pfn_limit: u64, addr: u64, len: u64) -> bool {
    match addr.checked_add(len) {
        Some(end) => end / PAGE_SIZE < pfn_limit,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_guest_round_trips_with_padding() {
        let messages = [
            ToGuest::Start(Start {
                word: 4,
                launcher_pid: 77,
                base: 0xb700_0000,
                pfn_limit: 0x1007,
                start: 0x10_0000,
            }),
            ToGuest::Run {
                cause: run_cause::EVENTFD,
            },
            ToGuest::Irq { irq: 31 },
            ToGuest::Died(Death::Reason("CRASH: Power down".into())),
            ToGuest::Died(Death::Restart),
            ToGuest::Stop,
        ];
        for m in messages {
            let mut bytes = m.encode(9);
            bytes.resize(bytes.len().div_ceil(8) * 8, 0);
            assert_eq!(ToGuest::parse(&bytes).unwrap(), (9, m));
        }
    }

    #[test]
    fn from_guest_round_trips() {
        let messages = [
            FromGuest::Notify { addr: 0x100_4000 },
            FromGuest::Shutdown {
                message: 0x8_0000,
                how: SHUTDOWN_POWEROFF,
            },
            FromGuest::Kill {
                reason: "fake guest: expect failed".into(),
            },
        ];
        for m in messages {
            let mut bytes = m.encode(3);
            bytes.resize(bytes.len().div_ceil(8) * 8, 0);
            assert_eq!(FromGuest::parse(&bytes).unwrap(), (3, m));
        }
    }

    #[test]
    fn bad_messages_are_errors() {
        assert!(matches!(
            ToGuest::parse(&[1, 0, 0]),
            Err(WireError::TooShort { .. })
        ));
        let mut notify = FromGuest::Notify { addr: 1 }.encode(1);
        notify.truncate(12);
        assert!(matches!(
            FromGuest::parse(&notify),
            Err(WireError::TooShort { .. })
        ));
        let mut kill = FromGuest::Kill {
            reason: "abc".into(),
        }
        .encode(1);
        kill[8] = 200; // len beyond the bytes present
        assert!(FromGuest::parse(&kill).is_err());
        let mut kill = FromGuest::Kill {
            reason: "a\u{0}c".into(),
        }
        .encode(1);
        kill.truncate(19);
        assert!(matches!(
            FromGuest::parse(&kill),
            Err(WireError::ContainsNul { .. })
        ));
        let unknown = header(99, 1).as_bytes().to_vec();
        assert!(matches!(
            FromGuest::parse(&unknown),
            Err(WireError::BadValue { .. })
        ));
        assert!(matches!(
            ToGuest::parse(&unknown),
            Err(WireError::BadValue { .. })
        ));
    }

    #[test]
    fn long_reasons_are_cut_at_a_character() {
        let long = "é".repeat(MAX_REASON_LEN);
        let bytes = ToGuest::Died(Death::Reason(long)).encode(1);
        let (_, parsed) = ToGuest::parse(&bytes).unwrap();
        let ToGuest::Died(Death::Reason(text)) = parsed else {
            panic!("not a reason")
        };
        assert_eq!(text.len(), MAX_REASON_LEN);
    }

    #[test]
    fn address_check_is_the_3x_one() {
        // 0x1007 pages: the last byte of page 0x1006 is unreachable, as in 3.x (end / PAGE_SIZE
        // must be below the limit, and an access ending at the page boundary has end = limit).
        assert!(address_ok(0x1007, 0, 16));
        assert!(address_ok(0x1007, 0x0100_6000, 0xfff));
        assert!(!address_ok(0x1007, 0x0100_6000, 0x1000));
        assert!(!address_ok(0x1007, u64::MAX - 3, 8));
        assert!(!address_ok(0, 0, 0));
    }
}
