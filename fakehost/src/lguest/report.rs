//! What the service remembers of each Guest, and the JSON forms `fakehost lguest status`,
//! `irqs` and `notifies` show it in.
//!
//! A [`GuestView`] is shared between the Guest's thread (which owns its state: what it is
//! doing, the notifications it made, its last read) and the bus reader (which sets pending
//! interrupts and counts them the moment an IRQ arrives, so `irqs` is exact even while the
//! Guest is busy). Both hold its lock only to copy a few fields.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use serde::{Deserialize, Serialize};
use vmbus::lguest::{run_cause, Start, LGUEST_IRQS};

/// How many notifications each Guest keeps in order for `notifies`.
pub const RECENT_NOTIFIES: usize = 16;
/// How many bytes of the last read status keeps.
pub const LAST_READ_SHOWN: usize = 256;

/// What a Guest is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GuestState {
    /// Started (LHREQ_INITIALIZE), not run yet: the launcher has not read.
    WaitingForFirstRead,
    /// Executing the instruction on `line` (or sleeping there, or waiting for memory).
    Running {
        /// The script line.
        line: u32,
    },
    /// `wait-irq`: until interrupt `irq` is pending.
    WaitingForIrq {
        /// The interrupt.
        irq: u32,
        /// The script line.
        line: u32,
    },
    /// `halt`: until any interrupt is pending.
    Halted {
        /// The script line.
        line: u32,
    },
    /// Made a NOTIFY and waits for the launcher to read again.
    StoppedAtNotify {
        /// The notified address.
        addr: u64,
        /// The script line.
        line: u32,
    },
    /// Dead: the reason the launcher reads (or "restart requested").
    Dead {
        /// The reason.
        reason: String,
    },
    /// Past the last instruction: halted for good, interrupts counted and ignored.
    Idle,
}

impl fmt::Display for GuestState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestState::WaitingForFirstRead => f.write_str("waiting for first read"),
            GuestState::Running { line } => write!(f, "running line {line}"),
            GuestState::WaitingForIrq { irq, line } => {
                write!(f, "waiting for irq {irq} (line {line})")
            }
            GuestState::Halted { line } => write!(f, "halted (line {line})"),
            GuestState::StoppedAtNotify { addr, line } => {
                write!(f, "stopped at notify {addr:#x} (line {line})")
            }
            GuestState::Dead { reason } => write!(f, "dead: {reason}"),
            GuestState::Idle => f.write_str("idle: end of script"),
        }
    }
}

/// How a notification was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Taken {
    /// The launcher's read returned it.
    Read,
    /// An eventfd took it; the read went on.
    Eventfd,
}

impl Taken {
    /// From a RUN's cause (an unknown cause counts as a read, and is logged by the caller).
    pub fn from_cause(cause: u32) -> Taken {
        if cause == run_cause::EVENTFD {
            Taken::Eventfd
        } else {
            Taken::Read
        }
    }
}

/// One notification, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyRecord {
    /// 1 for the Guest's first notification.
    pub seq: u64,
    /// The address.
    pub addr: u64,
    /// How it was taken; None while the Guest still waits.
    pub taken: Option<Taken>,
}

/// The notifications to one address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressCount {
    /// The address.
    pub addr: u64,
    /// Notifications made to it.
    pub count: u64,
    /// Of those, returned by the launcher's read.
    pub read: u64,
    /// Of those, taken by an eventfd.
    pub eventfd: u64,
    /// Of those, not taken yet (0 or 1).
    pub waiting: u64,
}

/// A Guest's notifications.
#[derive(Debug, Clone, Default)]
pub struct NotifyLog {
    total: u64,
    by_addr: BTreeMap<u64, AddressCount>,
    recent: VecDeque<NotifyRecord>,
}

impl NotifyLog {
    /// The Guest notified `addr`.
    pub fn notified(&mut self, addr: u64) {
        self.total += 1;
        let count = self.by_addr.entry(addr).or_insert_with(|| AddressCount {
            addr,
            ..AddressCount::default()
        });
        count.count += 1;
        count.waiting += 1;
        if self.recent.len() == RECENT_NOTIFIES {
            self.recent.pop_front();
        }
        self.recent.push_back(NotifyRecord {
            seq: self.total,
            addr,
            taken: None,
        });
    }

    /// The RUN after the last notification came, with this cause.
    pub fn taken(&mut self, taken: Taken) {
        let Some(last) = self.recent.back_mut() else {
            return;
        };
        if last.taken.is_some() {
            return;
        }
        last.taken = Some(taken);
        if let Some(count) = self.by_addr.get_mut(&last.addr) {
            count.waiting = count.waiting.saturating_sub(1);
            match taken {
                Taken::Read => count.read += 1,
                Taken::Eventfd => count.eventfd += 1,
            }
        }
    }

    /// Notifications made.
    pub fn total(&self) -> u64 {
        self.total
    }
}

/// The last `read` instruction's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRead {
    /// Where.
    pub addr: u64,
    /// Bytes read.
    pub len: u32,
    /// The first [`LAST_READ_SHOWN`] of them, in hex.
    pub hex: String,
}

/// Everything the service keeps about one Guest.
#[derive(Debug, Clone)]
pub struct GuestView {
    /// The guest number cusedev gave it.
    pub guest: u32,
    /// The channel link it came on.
    pub link: u64,
    /// What START said.
    pub start: Start,
    /// The script's name.
    pub script: String,
    /// What it is doing.
    pub state: GuestState,
    /// Pending interrupts (bit i = interrupt i).
    pub pending: u32,
    /// IRQs raised, per interrupt.
    pub raised: [u64; LGUEST_IRQS as usize],
    /// RUNs received.
    pub runs: u64,
    /// Its notifications.
    pub notifies: NotifyLog,
    /// Its last `read`.
    pub last_read: Option<LastRead>,
    /// Why it is no longer served (None while its file is open).
    pub ended: Option<String>,
}

impl GuestView {
    /// A Guest just started.
    pub fn new(guest: u32, link: u64, start: Start, script: &str) -> GuestView {
        GuestView {
            guest,
            link,
            start,
            script: script.to_owned(),
            state: GuestState::WaitingForFirstRead,
            pending: 0,
            raised: [0; LGUEST_IRQS as usize],
            runs: 0,
            notifies: NotifyLog::default(),
            last_read: None,
            ended: None,
        }
    }

    /// Its `status` entry.
    pub fn status(&self) -> GuestStatus {
        GuestStatus {
            guest: self.guest,
            link: self.link,
            launcher_pid: self.start.launcher_pid,
            word: self.start.word,
            base: self.start.base,
            pfn_limit: self.start.pfn_limit,
            start: self.start.start,
            script: self.script.clone(),
            state_text: self.state.to_string(),
            state: self.state.clone(),
            runs: self.runs,
            notifies: self.notifies.total(),
            last_read: self.last_read.clone(),
            ended: self.ended.clone(),
        }
    }

    /// Its `irqs` entry.
    pub fn irqs(&self) -> GuestIrqs {
        GuestIrqs {
            guest: self.guest,
            ended: self.ended.is_some(),
            pending: (0..LGUEST_IRQS)
                .filter(|i| self.pending & (1 << i) != 0)
                .collect(),
            raised: self
                .raised
                .iter()
                .enumerate()
                .filter(|(_, &n)| n > 0)
                .map(|(irq, &count)| IrqCount {
                    irq: irq as u32,
                    count,
                })
                .collect(),
            total: self.raised.iter().sum(),
        }
    }

    /// Its `notifies` entry.
    pub fn notifies(&self) -> GuestNotifies {
        GuestNotifies {
            guest: self.guest,
            ended: self.ended.is_some(),
            total: self.notifies.total,
            by_address: self.notifies.by_addr.values().cloned().collect(),
            recent: self.notifies.recent.iter().cloned().collect(),
        }
    }
}

/// One Guest in `fakehost lguest status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStatus {
    /// Its guest number.
    pub guest: u32,
    /// The channel link it came on.
    pub link: u64,
    /// The launcher's thread group.
    pub launcher_pid: u32,
    /// W: the launcher's word size.
    pub word: u32,
    /// The launcher's address of guest-physical 0.
    pub base: u64,
    /// Its page limit.
    pub pfn_limit: u64,
    /// Its start address.
    pub start: u64,
    /// The script it runs.
    pub script: String,
    /// What it is doing.
    pub state: GuestState,
    /// That, in words.
    pub state_text: String,
    /// RUNs received.
    pub runs: u64,
    /// Notifications made.
    pub notifies: u64,
    /// Its last `read`.
    pub last_read: Option<LastRead>,
    /// Why it is no longer served ("closed", "the channel went away"); null while its file
    /// is open.
    pub ended: Option<String>,
}

/// The answer to `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The script Guests started from now on run.
    pub script: String,
    /// The Guests whose file is open (by link and number), then the last ended ones (oldest
    /// first).
    pub guests: Vec<GuestStatus>,
    /// Channel streams attached (one per cusedev).
    pub channels_attached: usize,
    /// Guests started since fakehost started.
    pub started: u64,
    /// Messages from the bus that were malformed or named no Guest (logged and dropped).
    pub ignored: u64,
}

/// An interrupt's count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqCount {
    /// The interrupt.
    pub irq: u32,
    /// LHREQ_IRQs that raised it.
    pub count: u64,
}

/// One Guest in `fakehost lguest irqs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestIrqs {
    /// Its guest number.
    pub guest: u32,
    /// Its file is closed.
    pub ended: bool,
    /// Interrupts pending now, in order.
    pub pending: Vec<u32>,
    /// How often each interrupt was raised (only those raised at all).
    pub raised: Vec<IrqCount>,
    /// All raised.
    pub total: u64,
}

/// The answer to `irqs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqsReport {
    /// As in [`StatusReport::guests`].
    pub guests: Vec<GuestIrqs>,
}

/// One Guest in `fakehost lguest notifies`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNotifies {
    /// Its guest number.
    pub guest: u32,
    /// Its file is closed.
    pub ended: bool,
    /// Notifications made.
    pub total: u64,
    /// Per address, in address order.
    pub by_address: Vec<AddressCount>,
    /// The last few, oldest first.
    pub recent: Vec<NotifyRecord>,
}

/// The answer to `notifies`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifiesReport {
    /// As in [`StatusReport::guests`] (only guest N with `--guest N`).
    pub guests: Vec<GuestNotifies>,
}

/// The answer to `script`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptReport {
    /// The script Guests started from now on run.
    pub script: String,
    /// Its instructions.
    pub instructions: usize,
    /// The one it replaced.
    pub previous: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_log_pairs_each_notification_with_the_run_after_it() {
        let mut log = NotifyLog::default();
        for i in 0..20 {
            log.notified(0x1000);
            log.taken(if i % 2 == 0 {
                Taken::Read
            } else {
                Taken::Eventfd
            });
        }
        log.notified(0x2000);
        log.taken(Taken::Eventfd);
        log.taken(Taken::Read); // a RUN with no notification before it: nothing to pair
        log.notified(0x1000);
        let view = GuestView {
            notifies: log,
            ..GuestView::new(
                1,
                1,
                Start {
                    word: 8,
                    launcher_pid: 1,
                    base: 0,
                    pfn_limit: 1,
                    start: 0,
                },
                "t",
            )
        };
        let n = view.notifies();
        assert_eq!(n.total, 22);
        assert_eq!(
            n.by_address,
            vec![
                AddressCount {
                    addr: 0x1000,
                    count: 21,
                    read: 10,
                    eventfd: 10,
                    waiting: 1
                },
                AddressCount {
                    addr: 0x2000,
                    count: 1,
                    read: 0,
                    eventfd: 1,
                    waiting: 0
                }
            ]
        );
        assert_eq!(n.recent.len(), RECENT_NOTIFIES);
        let last = n.recent.last().unwrap();
        assert_eq!((last.seq, last.addr, last.taken), (22, 0x1000, None));
        assert_eq!(n.recent[RECENT_NOTIFIES - 2].taken, Some(Taken::Eventfd));
    }

    #[test]
    fn states_read_as_the_brief_says() {
        let cases = [
            (GuestState::WaitingForFirstRead, "waiting for first read"),
            (GuestState::Running { line: 3 }, "running line 3"),
            (
                GuestState::WaitingForIrq { irq: 5, line: 2 },
                "waiting for irq 5 (line 2)",
            ),
            (GuestState::Halted { line: 1 }, "halted (line 1)"),
            (
                GuestState::StoppedAtNotify {
                    addr: 0x1000,
                    line: 7,
                },
                "stopped at notify 0x1000 (line 7)",
            ),
            (
                GuestState::Dead {
                    reason: "CRASH: x".into(),
                },
                "dead: CRASH: x",
            ),
            (GuestState::Idle, "idle: end of script"),
        ];
        for (state, text) in cases {
            assert_eq!(state.to_string(), text);
        }
        assert_eq!(
            serde_json::to_string(&GuestState::WaitingForIrq { irq: 5, line: 2 }).unwrap(),
            r#"{"kind":"waiting_for_irq","irq":5,"line":2}"#
        );
    }
}
