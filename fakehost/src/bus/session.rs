//! The guest session: answering the control stream.
//!
//! Sequence (docs/bus-protocol.md "Sequences"): INITIATE_CONTACT → VERSION_RESPONSE,
//! REQUESTOFFERS → OFFERCHANNEL × n + ALLOFFERS_DELIVERED, OPENCHANNEL → OPENCHANNEL_RESULT,
//! then CLOSECHANNEL / RELID_RELEASED as channels go. Anything the guest sends that does not fit
//! (a bad frame, an unparsable message, a host-only message, a request out of order) is logged
//! and ends the session: a guest that gets the protocol wrong is better restarted than guessed
//! at, and it reconnects with back-off anyway.

use std::sync::Arc;

use vmbus::channel_msg::{ChannelMessage, VERSION_WIN10};
use vmbus::stream::kind;
use vmbus::WireError;

use super::frames::{read_frame, FrameError, FrameWriter, StreamReader};
use super::{version_string, Bus, ChannelState, Session};

/// OPENCHANNEL_RESULT status for an open we refuse. Hyper-V reports NTSTATUS values; the Linux
/// guest only checks for non-zero, so STATUS_UNSUCCESSFUL says "no" plainly.
pub const OPEN_REFUSED: u32 = 0xC000_0001;

/// How a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    /// The guest closed the control stream.
    #[error("control stream closed")]
    Closed,
    /// The stream failed or carried a malformed frame.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// A frame of the wrong kind for a control stream.
    #[error("unexpected frame kind {0} on the control stream (only CONTROL frames belong there)")]
    WrongKind(u16),
    /// A CONTROL body that is not a channel message.
    #[error("malformed channel message: {0}")]
    Message(#[from] WireError),
    /// A well-formed message that breaks the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Runs a control stream until it ends.
pub(super) fn run(bus: &Bus, stream: Arc<std::os::unix::net::UnixStream>, conn: u64) {
    let writer = Arc::new(FrameWriter::new(Arc::clone(&stream)));
    let Some(session_id) = bus.begin_session(Arc::clone(&writer)) else {
        log::warn!(
            "bus connection #{conn}: refusing a second guest control stream while one is \
             connected (one guest at a time)"
        );
        writer.shutdown();
        return;
    };
    log::info!("guest connected (bus connection #{conn})");
    let mut reader = StreamReader::new(&stream);
    let end = loop {
        let frame = match read_frame(&mut reader) {
            Ok(Some(frame)) => frame,
            Ok(None) => break SessionEnd::Closed,
            Err(e) => break SessionEnd::Frame(e),
        };
        if frame.kind != kind::CONTROL {
            break SessionEnd::WrongKind(frame.kind);
        }
        let msg = match ChannelMessage::parse(&frame.body) {
            Ok(msg) => msg,
            Err(e) => break SessionEnd::Message(e),
        };
        if let Err(e) = bus.handle_control(session_id, msg) {
            break e;
        }
    };
    match &end {
        SessionEnd::Closed => log::info!("guest gone: {end}"),
        SessionEnd::Frame(FrameError::Io(_)) => log::info!("guest gone: {end}"),
        _ => log::warn!("closing the guest's control stream: {end}"),
    }
    // Forget the session before closing the stream, so a guest that sees the close and
    // reconnects at once is not refused as a second guest.
    bus.end_session(session_id);
    writer.shutdown();
}

impl Bus {
    /// Registers a new guest session, unless one is alive.
    fn begin_session(&self, writer: Arc<FrameWriter>) -> Option<u64> {
        let mut state = self.lock();
        if state.session.is_some() {
            return None;
        }
        let id = state.ids.serial();
        state.session = Some(Session {
            id,
            writer,
            version: None,
            offers_requested: false,
            channels: Vec::new(),
        });
        Some(id)
    }

    /// Forgets the session and ends every channel stream it had: their readers then detach
    /// the services, which fail any transaction in flight ("guest went away").
    fn end_session(&self, session_id: u64) {
        let mut state = self.lock();
        if state.session.as_ref().map(|s| s.id) != Some(session_id) {
            return;
        }
        if let Some(session) = state.session.take() {
            for record in &session.channels {
                record.state.close_stream();
            }
        }
    }

    fn handle_control(&self, session_id: u64, msg: ChannelMessage) -> Result<(), SessionEnd> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(session) = state.session.as_mut().filter(|s| s.id == session_id) else {
            return Err(SessionEnd::Protocol("session already ended".into()));
        };
        match msg {
            ChannelMessage::InitiateContact { version } => {
                let supported = version >= VERSION_WIN10;
                if supported {
                    log::info!(
                        "guest asked for VMBus {}: accepted",
                        version_string(version)
                    );
                    session.version = Some(version);
                } else {
                    log::info!(
                        "guest asked for VMBus {}: refused (we need 4.0 or later)",
                        version_string(version)
                    );
                }
                let _ = session.send(&ChannelMessage::VersionResponse {
                    supported,
                    conn_id: message_connection_id(version),
                });
            }
            ChannelMessage::RequestOffers => {
                if session.version.is_none() {
                    return Err(SessionEnd::Protocol(
                        "REQUESTOFFERS before a VMBus version was agreed".into(),
                    ));
                }
                if session.offers_requested {
                    return Err(SessionEnd::Protocol("REQUESTOFFERS sent twice".into()));
                }
                session.offers_requested = true;
                for id in state.offered.iter().copied() {
                    let Some(row) = self.services.get(id) else {
                        continue;
                    };
                    if let Err(e) = session.offer(&mut state.ids, id, &row.offer) {
                        log::error!("cannot offer {}: {e}", row.offer.name);
                    }
                }
                let _ = session.send(&ChannelMessage::AllOffersDelivered);
                log::info!(
                    "all offers delivered ({} channel(s))",
                    session.channels.len()
                );
            }
            ChannelMessage::OpenChannel {
                child_relid,
                open_id,
            } => {
                let record = session.channels.iter_mut().find(|c| c.relid == child_relid);
                let status = match record {
                    Some(c) if !c.rescinded && matches!(c.state, ChannelState::Offered) => {
                        c.state = ChannelState::Opened { open_id };
                        log::info!(
                            "guest opened {} (relid {child_relid}, open_id {open_id})",
                            c.name
                        );
                        0
                    }
                    Some(c) => {
                        log::warn!(
                            "refusing OPENCHANNEL for relid {child_relid}: it is {}{}",
                            c.state.name(),
                            if c.rescinded { " and rescinded" } else { "" }
                        );
                        OPEN_REFUSED
                    }
                    None => {
                        log::warn!("refusing OPENCHANNEL for relid {child_relid}: not offered");
                        OPEN_REFUSED
                    }
                };
                let _ = session.send(&ChannelMessage::OpenResult {
                    child_relid,
                    open_id,
                    status,
                });
            }
            ChannelMessage::CloseChannel { child_relid } => {
                match session.channels.iter_mut().find(|c| c.relid == child_relid) {
                    Some(c) => {
                        log::info!("guest closed {} (relid {child_relid})", c.name);
                        c.state.close_stream();
                        c.state = ChannelState::Offered;
                    }
                    None => log::warn!("CLOSECHANNEL for unknown relid {child_relid}; ignored"),
                }
            }
            ChannelMessage::RelidReleased { child_relid } => {
                let index = session.channels.iter().position(|c| c.relid == child_relid);
                match index {
                    Some(i) if session.channels[i].rescinded => {
                        let record = session.channels.remove(i);
                        record.state.close_stream();
                        log::info!(
                            "guest released {} (relid {child_relid}): rescind complete",
                            record.name
                        );
                    }
                    Some(_) => log::warn!(
                        "RELID_RELEASED for relid {child_relid}, which was not rescinded; ignored"
                    ),
                    None => log::warn!("RELID_RELEASED for unknown relid {child_relid}; ignored"),
                }
            }
            other => {
                return Err(SessionEnd::Protocol(format!(
                    "the guest sent a host-to-guest message: {other:?}"
                )));
            }
        }
        Ok(())
    }
}

/// `msg_conn_id` in VERSION_RESPONSE. Linux (drivers/hv/connection.c) posts messages on
/// connection 4 from VMBus 5.0 on and on connection 1 before; answering the same keeps a guest
/// that checks it happy. Nothing on our bus uses it.
fn message_connection_id(version: u32) -> u32 {
    use vmbus::channel_msg::VERSION_WIN10_V5 as VERSION_5_0;
    if version >= VERSION_5_0 {
        4
    } else {
        1
    }
}
