//! Channel streams: attaching them to their channel and feeding packets to the service.
//!
//! A channel stream is only accepted for a channel whose OPENCHANNEL we answered, with the same
//! `open_id` (docs/bus-protocol.md, sequence 3); anything else is logged and closed. Once
//! attached, every PACKET frame is checked by `vmbus::packet::parse_packet` (body length must be
//! the descriptor's `len8 * 8`) and handed to the service; a malformed frame closes the stream,
//! which the service sees as the channel going away.

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vmbus::guest_memory::MemoryMessage;
use vmbus::packet::parse_packet;
use vmbus::stream::{kind, Hello};

use super::frames::{read_frame, FrameError, StreamReader};
use super::{Bus, ChannelLink, ChannelState};
use crate::service::HostService;

/// Runs a channel stream until it ends.
pub(super) fn run(bus: &Bus, stream: Arc<UnixStream>, hello: &Hello, conn: u64) {
    let Some((link, service)) = bus.attach(hello, &stream) else {
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return;
    };
    let (link_id, relid) = (link.id, link.relid);
    log::info!("channel stream attached to relid {relid} (bus connection #{conn})");
    service.attached(link);
    let mut reader = StreamReader::new(&stream);
    // (what happened, whether it was the guest's fault)
    let (end, malformed) = loop {
        let frame = match read_frame(&mut reader) {
            Ok(Some(frame)) => frame,
            Ok(None) => break ("closed".to_owned(), false),
            Err(FrameError::Io(e)) => break (format!("lost: {e}"), false),
            Err(e) => break (format!("malformed frame: {e}; closing it"), true),
        };
        if frame.kind == kind::MEMORY {
            match MemoryMessage::parse(&frame.body) {
                Ok(message) => service.memory(link_id, &message),
                Err(e) => {
                    break (
                        format!("malformed guest memory message: {e}; closing it"),
                        true,
                    )
                }
            }
            continue;
        }
        if frame.kind != kind::PACKET {
            break (
                format!(
                    "unexpected frame kind {} (only PACKET and MEMORY frames belong on a channel); \
                     closing it",
                    frame.kind
                ),
                true,
            );
        }
        match parse_packet(&frame.body) {
            Ok(packet) => service.packet(link_id, &packet),
            Err(e) => break (format!("malformed VMBus packet: {e}; closing it"), true),
        }
    };
    if malformed {
        log::warn!("channel stream of relid {relid}: {end}");
    } else {
        log::info!("channel stream of relid {relid}: {end}");
    }
    // Detach before closing, so whoever sees the close finds the channel already gone.
    service.detached(link_id);
    bus.detach(relid, link_id);
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

impl Bus {
    /// Finds the opened channel a HELLO names and marks it attached.
    fn attach(
        &self,
        hello: &Hello,
        stream: &Arc<UnixStream>,
    ) -> Option<(ChannelLink, Arc<dyn HostService>)> {
        let (relid, open_id) = (hello.child_relid, hello.open_id);
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(session) = state.session.as_mut() else {
            log::warn!("channel stream for relid {relid} but no guest is connected; closing it");
            return None;
        };
        let Some(record) = session.channels.iter_mut().find(|c| c.relid == relid) else {
            log::warn!("channel stream for unknown relid {relid}; closing it");
            return None;
        };
        match record.state {
            ChannelState::Opened { open_id: opened } if opened == open_id && !record.rescinded => {}
            _ => {
                log::warn!(
                    "channel stream for relid {relid} with open_id {open_id}, but that channel \
                     is {}{}; closing it",
                    record.state.name(),
                    if record.rescinded { " (rescinded)" } else { "" }
                );
                return None;
            }
        }
        let Some(service) = self.service(record.service).map(|r| Arc::clone(&r.service)) else {
            log::warn!(
                "no host service for {}; closing its channel stream",
                record.name
            );
            return None;
        };
        let link_id = state.ids.serial();
        record.state = ChannelState::Attached {
            link_id,
            stream: Arc::clone(stream),
        };
        Some((
            ChannelLink::new(link_id, relid, Arc::clone(stream)),
            service,
        ))
    }

    /// The stream of `link_id` ended: the channel is closed (it may be opened again).
    fn detach(&self, relid: u32, link_id: u64) {
        let mut state = self.lock();
        let Some(session) = state.session.as_mut() else {
            return;
        };
        let record = session.channels.iter_mut().find(|c| c.relid == relid);
        if let Some(record) = record {
            if matches!(record.state, ChannelState::Attached { link_id: l, .. } if l == link_id) {
                record.state = ChannelState::Offered;
            }
        }
    }
}
