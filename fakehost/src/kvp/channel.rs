//! One attached IC channel driven one transaction at a time, with a thread waiting for each
//! answer: what the KVP and VSS hosts share.
//!
//! Both guest drivers have one message slot (kvp-vss.md §3.3, §5): while a request is with
//! the daemon they leave further packets in the ring. So a host sends one request, waits for
//! its answer (or the step deadline), then the next. Neither service is about throughput
//! (a KVP record, a freeze), so unlike fcopy's packet-driven machine the control connection's
//! thread simply sends and sleeps on a condition variable; the channel's reader thread
//! ([`IcChannel::on_packet`]) stores the answer and wakes it.
//!
//! Who may send is decided by a [`Slot`]: one holder at a time, taken in order of arrival
//! (each holder is bounded by its deadlines, so nobody waits forever). A `list` holds it for
//! its whole enumeration, the KVP host-item push for its sixteen SETs.
//!
//! Negotiation is [`crate::ic::IcPipe`]'s; this adds only *how long* to wait for it and what
//! to say when it does not come ([`ChannelConfig::unanswered_hint`]): the 6.1 KVP driver
//! answers NEGOTIATE only once its daemon registered (kvp-vss.md §3.4), so an unanswered
//! negotiation is normal there until the daemon starts, and never an error by itself.
//!
//! Next: [`super::KvpHost`] and [`crate::vss::VssHost`], its two users.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmbus::ic;
use vmbus::packet::Packet;

use crate::bus::ChannelLink;
use crate::ic::{Answer, IcPipe, IcReply, IcVersions, Negotiation, NegotiationStatus};

/// How many abandoned transaction ids are remembered, to log their late answers quietly.
const ABANDONED_MEMORY: usize = 16;

/// What differs between the services sharing this.
#[derive(Debug, Clone, Copy)]
pub struct ChannelConfig {
    /// The versions offered.
    pub versions: IcVersions,
    /// The icmsgtype of every request and answer after NEGOTIATE.
    pub msgtype: u16,
    /// What an unanswered negotiation means, for the error and status lines ("waiting for the
    /// guest's KVP daemon to register").
    pub unanswered_hint: &'static str,
    /// Why, for the error only ("the hv_kvp driver answers NEGOTIATE only once ...").
    pub unanswered_why: &'static str,
}

/// Why a channel is not ready for a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadyError {
    /// No guest opened the channel in time.
    #[error(
        "the {service} channel was not opened within {}: is a guest (cusedev) connected to \
         this host with its {service} device up?",
        secs(*waited)
    )]
    NoChannel {
        /// The service's label.
        service: &'static str,
        /// How long we waited.
        waited: Duration,
    },
    /// NEGOTIATE is still unanswered.
    #[error(
        "{hint}: the {service} version negotiation sent {} ago is still unanswered ({why})",
        secs(*age)
    )]
    Unanswered {
        /// The service's label.
        service: &'static str,
        /// [`ChannelConfig::unanswered_hint`].
        hint: &'static str,
        /// [`ChannelConfig::unanswered_why`].
        why: &'static str,
        /// Since when NEGOTIATE waits.
        age: Duration,
    },
    /// The guest found no common version.
    #[error("the guest refused the {service} version negotiation: {reason}")]
    Refused {
        /// The service's label.
        service: &'static str,
        /// [`Negotiation::Refused`]'s reason.
        reason: String,
    },
}

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxnError {
    /// The channel was not ready.
    #[error("{0}")]
    Ready(#[from] ReadyError),
    /// The channel stream ended before the answer.
    #[error("the guest went away (the {0} channel closed)")]
    GuestGone(&'static str),
    /// No answer within the deadline.
    #[error("the guest did not answer within {}", secs(*.0))]
    Timeout(Duration),
    /// The answer carried our transaction id but was not an answer of this service.
    #[error("the guest's answer is malformed: {0}")]
    Malformed(String),
}

/// "60 s", "0.5 s".
pub fn secs(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// A guest's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The HRESULT in its IC header.
    pub status: u32,
    /// The whole payload (pipe + IC header + body, padding included).
    pub payload: Vec<u8>,
}

/// What [`IcChannel::on_packet`] saw.
#[derive(Debug)]
pub enum Event {
    /// Nothing the service needs to act on.
    Nothing,
    /// The negotiation on `link` settled; `slot` is held already if the negotiation agreed
    /// and the service asked for it ([`IcChannel::new`]'s `reserve_on_agree`), so its first
    /// requests go before anyone else's.
    Settled {
        /// The link that negotiated.
        link: ChannelLink,
        /// The agreed outcome.
        negotiation: Negotiation,
        /// The slot, if reserved.
        slot: Option<Slot>,
    },
}

/// The right to send: one holder at a time. Dropping it lets the next in.
pub struct Slot {
    channel: Arc<IcChannel>,
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Slot")
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.channel.lock().busy = false;
        self.channel.changed.notify_all();
    }
}

/// The channel as `fakehost status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelView {
    /// The channel stream is attached.
    pub channel_attached: bool,
    /// The channel's version negotiation.
    #[serde(flatten)]
    pub negotiation: NegotiationStatus,
    /// Seconds NEGOTIATE has waited, while pending.
    pub negotiation_waiting_secs: Option<u64>,
    /// A request is in flight.
    pub request_in_flight: bool,
}

impl ChannelView {
    /// "channel attached, negotiation agreed (framework 3.0, kvp 4.0)", or for a pending one
    /// "channel attached, negotiation pending for 12 s (waiting for the guest's KVP daemon to
    /// register)".
    pub fn summary(&self, config: &ChannelConfig) -> String {
        if !self.channel_attached {
            return "channel not attached".to_owned();
        }
        match self.negotiation_waiting_secs {
            Some(waited) => format!(
                "channel attached, negotiation pending for {waited} s ({})",
                config.unanswered_hint
            ),
            None => format!(
                "channel attached, {}",
                self.negotiation.summary(config.versions.label)
            ),
        }
    }
}

/// One service's channel.
pub struct IcChannel {
    config: ChannelConfig,
    reserve_on_agree: bool,
    state: Mutex<State>,
    changed: Condvar,
}

struct State {
    link: Option<Link>,
    next_trans_id: u64,
    /// A [`Slot`] is out.
    busy: bool,
    /// Tickets of those waiting for the slot, first come first served.
    queue: VecDeque<u64>,
    next_ticket: u64,
    pending: Option<Pending>,
    abandoned: VecDeque<u64>,
}

struct Link {
    link: ChannelLink,
    pipe: IcPipe,
    since: Instant,
}

struct Pending {
    link_id: u64,
    trans_id: u64,
    answer: Option<Result<Reply, TxnError>>,
}

impl IcChannel {
    /// A channel with nothing attached. With `reserve_on_agree`, an agreed negotiation hands
    /// the service the slot ([`Event::Settled`]).
    pub fn new(config: ChannelConfig, reserve_on_agree: bool) -> Arc<IcChannel> {
        Arc::new(IcChannel {
            config,
            reserve_on_agree,
            state: Mutex::new(State {
                link: None,
                next_trans_id: 1,
                busy: false,
                queue: VecDeque::new(),
                next_ticket: 0,
                pending: None,
                abandoned: VecDeque::new(),
            }),
            changed: Condvar::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ChannelConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn label(&self) -> &'static str {
        self.config.versions.label
    }

    /// A channel stream was attached: NEGOTIATE goes out at once (the guest answers when it
    /// will).
    pub fn attached(&self, link: ChannelLink) {
        let packet = {
            let mut state = self.lock();
            let trans_id = state.take_trans_id();
            if let Some(old) = &state.link {
                log::info!(
                    "{}: channel relid {} replaces relid {}",
                    self.label(),
                    link.relid,
                    old.link.relid
                );
            }
            let (pipe, packet) = IcPipe::negotiate(self.config.versions, trans_id);
            state.link = Some(Link {
                link: link.clone(),
                pipe,
                since: Instant::now(),
            });
            state.fail_pending(TxnError::GuestGone(self.label()));
            packet
        };
        self.changed.notify_all();
        log::info!(
            "{}: sending NEGOTIATE on relid {} ({})",
            self.label(),
            link.relid,
            self.config.versions.describe()
        );
        // A failed send shuts the stream down; the detach that follows cleans up.
        let _ = link.send_packet(&packet);
    }

    /// The stream of `link_id` ended.
    pub fn detached(&self, link_id: u64) {
        let mut state = self.lock();
        if state.link.as_ref().map(|l| l.link.id) == Some(link_id) {
            log::info!("{}: channel closed", self.label());
            state.link = None;
        }
        if state.pending.as_ref().is_some_and(|p| p.link_id == link_id) {
            state.fail_pending(TxnError::GuestGone(self.label()));
        }
        drop(state);
        self.changed.notify_all();
    }

    /// A packet from the guest on `link_id`: the negotiation's answer, the answer to the
    /// request in flight, or something logged and dropped. Never panics on any input.
    pub fn on_packet(self: &Arc<Self>, link_id: u64, packet: &Packet<'_>) -> Event {
        let label = self.label();
        let reply = match IcReply::parse(packet) {
            Ok(reply) => reply,
            Err(e) => {
                log::warn!("{label}: ignoring {e}");
                return Event::Nothing;
            }
        };
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(link) = state.link.as_mut().filter(|l| l.link.id == link_id) else {
            log::debug!("{label}: a packet on a channel that is no longer current; ignored");
            return Event::Nothing;
        };
        match link.pipe.on_reply(&reply) {
            Answer::Settled => {
                let negotiation = link.pipe.negotiation().clone();
                let link = link.link.clone();
                let slot = (self.reserve_on_agree
                    && matches!(negotiation, Negotiation::Agreed { .. }))
                .then(|| {
                    // Taken ahead of any queue: the service's first requests go first.
                    state.busy = true;
                    Slot {
                        channel: Arc::clone(self),
                    }
                });
                if let Negotiation::Agreed { .. } = negotiation {
                    log::info!(
                        "{label}: the guest answered NEGOTIATE after {}",
                        secs_rounded(
                            state
                                .link
                                .as_ref()
                                .map_or(Duration::ZERO, |l| l.since.elapsed())
                        )
                    );
                }
                drop(guard);
                self.changed.notify_all();
                return Event::Settled {
                    link,
                    negotiation,
                    slot,
                };
            }
            Answer::Malformed(_) => return Event::Nothing,
            Answer::NotNegotiation => {}
        }
        let msgtype = self.config.msgtype;
        match state.pending.as_mut() {
            Some(p) if p.link_id == link_id && p.trans_id == reply.trans_id => {
                if p.answer.is_some() {
                    log::warn!(
                        "{label}: a second answer to transaction {}; ignored",
                        reply.trans_id
                    );
                    return Event::Nothing;
                }
                p.answer = Some(if reply.msgtype() == msgtype {
                    Ok(Reply {
                        status: reply.status(),
                        payload: reply.payload.to_vec(),
                    })
                } else {
                    log::warn!(
                        "{label}: the answer to transaction {} has icmsgtype {} (expected \
                         {msgtype})",
                        reply.trans_id,
                        reply.msgtype()
                    );
                    Err(TxnError::Malformed(format!(
                        "icmsgtype {} instead of {msgtype}",
                        reply.msgtype()
                    )))
                });
                drop(guard);
                self.changed.notify_all();
            }
            _ if state.abandoned.contains(&reply.trans_id) => log::info!(
                "{label}: late answer to abandoned transaction {}: {:#010x} ({})",
                reply.trans_id,
                reply.status(),
                ic::status_meaning(reply.status())
            ),
            _ => log::warn!(
                "{label}: ignoring an answer with unexpected trans_id {}",
                reply.trans_id
            ),
        }
        Event::Nothing
    }

    /// Waits for the slot (first come, first served).
    pub fn acquire(self: &Arc<Self>) -> Slot {
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket = state.next_ticket.wrapping_add(1);
        state.queue.push_back(ticket);
        while state.busy || state.queue.front() != Some(&ticket) {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.queue.pop_front();
        state.busy = true;
        drop(state);
        // Others may be next in the queue only once we release; nothing to wake now.
        Slot {
            channel: Arc::clone(self),
        }
    }

    /// Waits until the channel is attached and negotiated, at most `timeout`; the link.
    pub fn wait_ready(&self, timeout: Duration) -> Result<ChannelLink, ReadyError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(l) = state.link.as_ref() {
                match l.pipe.negotiation() {
                    Negotiation::Agreed { .. } => return Ok(l.link.clone()),
                    Negotiation::Refused { reason } => {
                        return Err(ReadyError::Refused {
                            service: self.label(),
                            reason: reason.clone(),
                        })
                    }
                    Negotiation::Pending { .. } => {}
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(match state.link.as_ref() {
                    None => ReadyError::NoChannel {
                        service: self.label(),
                        waited: timeout,
                    },
                    Some(l) => ReadyError::Unanswered {
                        service: self.label(),
                        hint: self.config.unanswered_hint,
                        why: self.config.unanswered_why,
                        age: round_secs(l.since.elapsed()),
                    },
                });
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Sends `body` as one request on `link` (which must be the current, negotiated link)
    /// and waits up to `timeout` for its answer. The caller holds the slot.
    pub fn transact(
        &self,
        _slot: &Slot,
        link: &ChannelLink,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Reply, TxnError> {
        let label = self.label();
        let (trans_id, packet) = {
            let mut state = self.lock();
            let Some(current) = state.link.as_ref().filter(|l| l.link.id == link.id) else {
                return Err(TxnError::GuestGone(label));
            };
            let packet_for = |trans_id| current.pipe.request(self.config.msgtype, trans_id, body);
            let trans_id = state.next_trans_id;
            let packet = packet_for(trans_id);
            state.take_trans_id();
            state.pending = Some(Pending {
                link_id: link.id,
                trans_id,
                answer: None,
            });
            (trans_id, packet)
        };
        // Without the lock: a send may block on a full socket for up to the write timeout.
        // A failed send shuts the stream down, and its detach fails the transaction.
        let _ = link.send_packet(&packet);
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            match state.pending.as_mut() {
                Some(p) if p.trans_id == trans_id => {
                    if let Some(answer) = p.answer.take() {
                        state.pending = None;
                        return answer;
                    }
                }
                // Taken away by an attach or detach: it failed.
                _ => return Err(TxnError::GuestGone(label)),
            }
            let now = Instant::now();
            if now >= deadline {
                state.pending = None;
                state.abandon(trans_id);
                log::warn!(
                    "{label}: no answer to transaction {trans_id} within {}",
                    secs(timeout)
                );
                return Err(TxnError::Timeout(timeout));
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The link and its negotiation for `fakehost status`.
    pub fn view(&self) -> ChannelView {
        let state = self.lock();
        let link = state.link.as_ref();
        ChannelView {
            channel_attached: link.is_some(),
            negotiation: link.map_or_else(NegotiationStatus::none, |l| l.pipe.status()),
            negotiation_waiting_secs: link
                .filter(|l| matches!(l.pipe.negotiation(), Negotiation::Pending { .. }))
                .map(|l| l.since.elapsed().as_secs()),
            request_in_flight: state.pending.is_some(),
        }
    }

    /// The current link, negotiated or not.
    pub fn link(&self) -> Option<ChannelLink> {
        self.lock().link.as_ref().map(|l| l.link.clone())
    }

    /// Whether `link_id` is the current link.
    pub fn is_current(&self, link_id: u64) -> bool {
        self.lock()
            .link
            .as_ref()
            .is_some_and(|l| l.link.id == link_id)
    }
}

impl State {
    fn take_trans_id(&mut self) -> u64 {
        let id = self.next_trans_id;
        self.next_trans_id = self.next_trans_id.wrapping_add(1).max(1);
        id
    }

    fn abandon(&mut self, trans_id: u64) {
        if self.abandoned.len() >= ABANDONED_MEMORY {
            self.abandoned.pop_front();
        }
        self.abandoned.push_back(trans_id);
    }

    /// The request in flight fails (its link went away or was replaced).
    fn fail_pending(&mut self, error: TxnError) {
        if let Some(p) = self.pending.as_mut() {
            if p.answer.is_none() {
                p.answer = Some(Err(error));
            }
        }
    }
}

/// A duration rounded to whole seconds (for messages).
fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

fn secs_rounded(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        secs(round_secs(d))
    }
}
