//! The host side of an IC ("integration component") pipe, shared by every Hyper-V util
//! service: fcopy, KVP, VSS, and shutdown/timesync/heartbeat should they come.
//!
//! They all start the same way (icmsg-vmbus.md §4; openvmm's `IcPipe::negotiate` does the
//! same for its hosts): once the guest opened the channel, the host sends ICMSGTYPE_NEGOTIATE
//! listing its framework versions and its service versions; the guest rewrites the body with
//! one of each (counts 1/1) or refuses (counts 0/0), and echoes the buffer. Every later
//! message carries the agreed versions in its IC header. Only the version lists differ per
//! service, and when the guest answers: fcopy and VSS answer at once, KVP only after its
//! daemon registered (kvp-vss.md §3.4), the 2014 fcopy driver likewise. So the helper never
//! times out on its own: a service decides how long it waits, and the state stays
//! [`Negotiation::Pending`] until an answer comes.
//!
//! [`IcReply`] is the other shared piece: every guest reply is an inband packet whose IC
//! header has the RESPONSE flag, and anything else is logged and ignored by the service.
//!
//! Next: [`crate::fcopy`], the first user.

use serde::{Deserialize, Serialize};
use vmbus::ic::{self, icflags, msgtype, IcMsgHdr, IcVersion};
use vmbus::packet::{encode_inband, packet_type, Packet};
use vmbus::WireError;

/// VMBus packet flags on our requests. Linux util drivers never look at them and always answer
/// with an inband echo rather than a completion packet, so we do not ask for a completion.
/// (What a Windows host sets is UNVERIFIED, icmsg-vmbus.md §8.)
const REQUEST_PACKET_FLAGS: u16 = 0;

/// The versions a host offers for one service, preferred first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcVersions {
    /// The service's name as the versions are labelled in logs ("fcopy", "kvp").
    pub label: &'static str,
    /// IC framework versions.
    pub framework: &'static [IcVersion],
    /// Service message versions.
    pub service: &'static [IcVersion],
}

impl IcVersions {
    /// "framework 3.0, fcopy 1.1" or "framework 3.0/1.0, kvp 4.0/3.0/1.0".
    pub fn describe(&self) -> String {
        let list = |versions: &[IcVersion]| {
            versions
                .iter()
                .map(IcVersion::to_string)
                .collect::<Vec<_>>()
                .join("/")
        };
        format!(
            "framework {}, {} {}",
            list(self.framework),
            self.label,
            list(self.service)
        )
    }

    /// The versions an IC header carries before anything was agreed: our first choices.
    fn preferred(&self) -> (IcVersion, IcVersion) {
        (
            self.framework.first().copied().unwrap_or_default(),
            self.service.first().copied().unwrap_or_default(),
        )
    }
}

/// Where the negotiation of one channel stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Negotiation {
    /// NEGOTIATE sent with this transaction id; no usable answer yet.
    Pending {
        /// The VMBus transaction id of our NEGOTIATE.
        trans_id: u64,
    },
    /// The guest chose these (both from our lists).
    Agreed {
        /// The framework version.
        framework: IcVersion,
        /// The service message version.
        service: IcVersion,
    },
    /// The guest found no common version, or chose one we did not offer.
    Refused {
        /// What it answered, in words.
        reason: String,
    },
}

/// Why a guest packet was not a usable IC reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IcReplyError {
    /// Not an inband data packet.
    #[error("a VMBus packet of type {0:#x} (expected inband data)")]
    NotInband(u16),
    /// Too short for the IC headers.
    #[error("a malformed reply: {0}")]
    Malformed(WireError),
    /// The IC header lacks the RESPONSE flag.
    #[error("a packet that is not a response (icflags {icflags:#x}, trans_id {trans_id})")]
    NotResponse {
        /// The flags found.
        icflags: u8,
        /// The packet's transaction id.
        trans_id: u64,
    },
}

/// A guest's answer to one of our requests: inband, IC headers present, RESPONSE set.
#[derive(Debug, Clone, Copy)]
pub struct IcReply<'a> {
    /// The VMBus transaction id (the guest echoes ours).
    pub trans_id: u64,
    /// The IC header.
    pub header: IcMsgHdr,
    /// The whole payload (pipe + IC header + body, padding included).
    pub payload: &'a [u8],
}

impl<'a> IcReply<'a> {
    /// Checks `packet` is an IC reply.
    pub fn parse(packet: &Packet<'a>) -> Result<IcReply<'a>, IcReplyError> {
        if packet.ty != packet_type::DATA_INBAND {
            return Err(IcReplyError::NotInband(packet.ty));
        }
        let header = ic::ic_header(packet.payload).map_err(IcReplyError::Malformed)?;
        if header.icflags & icflags::RESPONSE == 0 {
            return Err(IcReplyError::NotResponse {
                icflags: header.icflags,
                trans_id: packet.trans_id,
            });
        }
        Ok(IcReply {
            trans_id: packet.trans_id,
            header,
            payload: packet.payload,
        })
    }

    /// `icmsgtype`.
    pub fn msgtype(&self) -> u16 {
        self.header.icmsgtype.get()
    }

    /// The guest's HRESULT.
    pub fn status(&self) -> u32 {
        self.header.status.get()
    }
}

/// What [`IcPipe::on_reply`] made of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Not the answer to our NEGOTIATE (another transaction, or negotiation is settled):
    /// the service's own business.
    NotNegotiation,
    /// The negotiation is settled now: see [`IcPipe::negotiation`].
    Settled,
    /// It was the answer to our NEGOTIATE but unreadable; still pending (a later, readable
    /// answer with the same id would count).
    Malformed(WireError),
}

/// The host end of one attached IC channel: its negotiation and the headers of its requests.
#[derive(Debug, Clone)]
pub struct IcPipe {
    versions: IcVersions,
    negotiation: Negotiation,
}

impl IcPipe {
    /// Starts negotiating: the pipe (pending) and the NEGOTIATE packet to send with `trans_id`.
    pub fn negotiate(versions: IcVersions, trans_id: u64) -> (IcPipe, Vec<u8>) {
        let pipe = IcPipe {
            versions,
            negotiation: Negotiation::Pending { trans_id },
        };
        let body = vmbus::negotiate::build_request_body(versions.framework, versions.service);
        let packet = pipe.request(msgtype::NEGOTIATE, trans_id, &body);
        (pipe, packet)
    }

    /// The versions offered.
    pub fn versions(&self) -> &IcVersions {
        &self.versions
    }

    /// Where the negotiation stands.
    pub fn negotiation(&self) -> &Negotiation {
        &self.negotiation
    }

    /// The agreed (framework, service) versions, once agreed.
    pub fn agreed(&self) -> Option<(IcVersion, IcVersion)> {
        match self.negotiation {
            Negotiation::Agreed { framework, service } => Some((framework, service)),
            _ => None,
        }
    }

    /// One IC request as an encoded inband packet with `trans_id`: the agreed versions in its
    /// IC header (our preferred ones while negotiating; the guest does not read them).
    pub fn request(&self, icmsgtype: u16, trans_id: u64, body: &[u8]) -> Vec<u8> {
        let (fw, msg) = self.agreed().unwrap_or_else(|| self.versions.preferred());
        // The IC header has an 8-bit transaction id of its own; Linux ignores it (it echoes
        // the VMBus trans_id), so its low byte is as good as anything.
        let payload = ic::build_ic_message(icmsgtype, fw, msg, trans_id as u8, body);
        encode_inband(trans_id, REQUEST_PACKET_FLAGS, &payload)
    }

    /// Looks at a guest reply: if it answers our NEGOTIATE, settles the negotiation.
    ///
    /// Only versions we offered count as agreed: a guest choosing anything else is treated as
    /// a refusal, since every later message would carry versions we cannot speak.
    pub fn on_reply(&mut self, reply: &IcReply<'_>) -> Answer {
        let Negotiation::Pending { trans_id } = self.negotiation else {
            return Answer::NotNegotiation;
        };
        if reply.trans_id != trans_id {
            return Answer::NotNegotiation;
        }
        let label = self.versions.label;
        match vmbus::negotiate::parse_response(reply.payload) {
            Err(e) => {
                log::warn!("{label}: ignoring a malformed NEGOTIATE reply: {e}");
                return Answer::Malformed(e);
            }
            Ok(Some((framework, service)))
                if self.versions.framework.contains(&framework)
                    && self.versions.service.contains(&service) =>
            {
                log::info!("{label}: negotiated framework {framework}, {label} message {service}");
                self.negotiation = Negotiation::Agreed { framework, service };
            }
            Ok(Some((framework, service))) => {
                let reason = format!(
                    "guest chose framework {framework}, message {service}, which we did not offer"
                );
                log::warn!("{label}: {reason}; treating the negotiation as failed");
                self.negotiation = Negotiation::Refused { reason };
            }
            Ok(None) => {
                let reason = format!(
                    "guest found no common version ({} offered)",
                    self.versions.describe()
                );
                log::warn!("{label}: {reason}");
                self.negotiation = Negotiation::Refused { reason };
            }
        }
        Answer::Settled
    }

    /// For `fakehost status`.
    pub fn status(&self) -> NegotiationStatus {
        let (framework, service) = match self.agreed() {
            Some((fw, srv)) => (Some(fw.to_string()), Some(srv.to_string())),
            None => (None, None),
        };
        NegotiationStatus {
            negotiation: match self.negotiation {
                Negotiation::Pending { .. } => "pending",
                Negotiation::Agreed { .. } => "agreed",
                Negotiation::Refused { .. } => "refused",
            }
            .to_owned(),
            framework_version: framework,
            message_version: service,
        }
    }
}

/// A channel's negotiation, for `fakehost status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NegotiationStatus {
    /// "none" (no channel), "pending", "agreed" or "refused".
    pub negotiation: String,
    /// The agreed framework version ("3.0"), once agreed.
    pub framework_version: Option<String>,
    /// The agreed service message version ("1.1"), once agreed.
    pub message_version: Option<String>,
}

impl NegotiationStatus {
    /// No channel attached.
    pub fn none() -> NegotiationStatus {
        NegotiationStatus {
            negotiation: "none".to_owned(),
            framework_version: None,
            message_version: None,
        }
    }

    /// "negotiation agreed (framework 3.0, fcopy 1.1)", "negotiation pending (no versions
    /// agreed)".
    pub fn summary(&self, label: &str) -> String {
        let versions = match (&self.framework_version, &self.message_version) {
            (Some(fw), Some(msg)) => format!("framework {fw}, {label} {msg}"),
            _ => "no versions agreed".to_owned(),
        };
        format!("negotiation {} ({versions})", self.negotiation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmbus::negotiate::{
        prep_negotiate_resp, prep_negotiate_resp_v3, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS,
        KVP_FW_VERSIONS, KVP_SRV_VERSIONS, VSS_FW_VERSIONS, VSS_SRV_VERSIONS,
    };
    use vmbus::packet::parse_packet;

    const FCOPY: IcVersions = IcVersions {
        label: "fcopy",
        framework: FCOPY_FW_VERSIONS,
        service: FCOPY_SRV_VERSIONS,
    };
    const KVP: IcVersions = IcVersions {
        label: "kvp",
        framework: KVP_FW_VERSIONS,
        service: KVP_SRV_VERSIONS,
    };
    const VSS: IcVersions = IcVersions {
        label: "vss",
        framework: VSS_FW_VERSIONS,
        service: VSS_SRV_VERSIONS,
    };

    /// What a guest whose driver lists `fw`/`srv` sends back for our NEGOTIATE `packet`
    /// (6.1 rule), as the packet the host's reader hands the service.
    fn guest_answer(packet: &[u8], fw: &[IcVersion], srv: &[IcVersion]) -> (u64, Vec<u8>) {
        let parsed = parse_packet(packet).unwrap();
        let mut payload = parsed.payload.to_vec();
        prep_negotiate_resp(&mut payload, fw, srv);
        ic::set_response_flags(&mut payload).unwrap();
        (parsed.trans_id, encode_inband(parsed.trans_id, 0, &payload))
    }

    fn feed(pipe: &mut IcPipe, packet: &[u8]) -> Result<Answer, IcReplyError> {
        let parsed = parse_packet(packet).unwrap();
        let reply = IcReply::parse(&parsed)?;
        Ok(pipe.on_reply(&reply))
    }

    #[test]
    fn negotiate_request_lists_our_versions_with_request_flags() {
        let (pipe, packet) = IcPipe::negotiate(KVP, 5);
        let parsed = parse_packet(&packet).unwrap();
        assert_eq!(parsed.trans_id, 5);
        let hdr = ic::ic_header(parsed.payload).unwrap();
        assert_eq!(hdr.icmsgtype.get(), msgtype::NEGOTIATE);
        assert_eq!(hdr.icflags, icflags::TRANSACTION | icflags::REQUEST);
        let body = &parsed.payload[ic::ICMSG_HDR_LEN..];
        assert_eq!(&body[..4], &[2, 0, 3, 0]); // 2 framework, 3 service versions
        assert_eq!(pipe.negotiation(), &Negotiation::Pending { trans_id: 5 });
        assert_eq!(pipe.status().negotiation, "pending");
    }

    #[test]
    fn every_util_service_agrees_with_its_6_1_guest_driver() {
        for (versions, want) in [
            (FCOPY, (IcVersion::new(3, 0), IcVersion::new(1, 1))),
            (KVP, (IcVersion::new(3, 0), IcVersion::new(4, 0))),
            (VSS, (IcVersion::new(3, 0), IcVersion::new(5, 0))),
        ] {
            let (mut pipe, packet) = IcPipe::negotiate(versions, 1);
            let (_, answer) = guest_answer(&packet, versions.framework, versions.service);
            assert_eq!(feed(&mut pipe, &answer), Ok(Answer::Settled));
            assert_eq!(pipe.agreed(), Some(want), "{}", versions.label);
            // Later requests carry the agreed versions.
            let request = pipe.request(msgtype::KVPEXCHANGE, 2, &[0; 4]);
            let hdr = ic::ic_header(parse_packet(&request).unwrap().payload).unwrap();
            assert_eq!(IcVersion::from(hdr.icverframe), want.0);
            assert_eq!(IcVersion::from(hdr.icvermsg), want.1);
        }
    }

    #[test]
    fn seed_era_guest_agrees_too() {
        let (mut pipe, packet) = IcPipe::negotiate(FCOPY, 1);
        let parsed = parse_packet(&packet).unwrap();
        let mut payload = parsed.payload.to_vec();
        prep_negotiate_resp_v3(&mut payload, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS);
        ic::set_response_flags(&mut payload).unwrap();
        assert_eq!(
            feed(&mut pipe, &encode_inband(1, 0, &payload)),
            Ok(Answer::Settled)
        );
        assert_eq!(pipe.status().negotiation, "agreed");
    }

    #[test]
    fn guest_without_a_common_version_refuses_and_the_reason_lists_ours() {
        let (mut pipe, packet) = IcPipe::negotiate(VSS, 1);
        let (_, answer) = guest_answer(&packet, &[IcVersion::new(1, 0)], VSS_SRV_VERSIONS);
        assert_eq!(feed(&mut pipe, &answer), Ok(Answer::Settled));
        let Negotiation::Refused { reason } = pipe.negotiation() else {
            panic!("{:?}", pipe.negotiation());
        };
        assert!(
            reason.contains("framework 3.0, vss 5.0 offered"),
            "{reason}"
        );
        assert_eq!(pipe.status().negotiation, "refused");
    }

    #[test]
    fn guest_choosing_a_version_we_did_not_offer_is_a_refusal() {
        let (mut pipe, packet) = IcPipe::negotiate(FCOPY, 1);
        // A guest that rewrites the body with 9.9 regardless.
        let parsed = parse_packet(&packet).unwrap();
        let mut payload = parsed.payload.to_vec();
        payload[28..44].copy_from_slice(&[1, 0, 1, 0, 0, 0, 0, 0, 9, 0, 9, 0, 1, 0, 1, 0]);
        ic::set_response_flags(&mut payload).unwrap();
        assert_eq!(
            feed(&mut pipe, &encode_inband(1, 0, &payload)),
            Ok(Answer::Settled)
        );
        assert!(matches!(pipe.negotiation(), Negotiation::Refused { .. }));
    }

    #[test]
    fn other_transactions_and_settled_pipes_are_not_negotiation() {
        let (mut pipe, packet) = IcPipe::negotiate(FCOPY, 1);
        let (_, answer) = guest_answer(&packet, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS);
        let mut other = parse_packet(&answer).unwrap().payload.to_vec();
        other[12] = msgtype::FCOPY as u8;
        assert_eq!(
            feed(&mut pipe, &encode_inband(2, 0, &other)),
            Ok(Answer::NotNegotiation)
        );
        assert_eq!(feed(&mut pipe, &answer), Ok(Answer::Settled));
        // A second answer changes nothing.
        assert_eq!(feed(&mut pipe, &answer), Ok(Answer::NotNegotiation));
        assert!(pipe.agreed().is_some());
    }

    #[test]
    fn malformed_answers_keep_the_negotiation_pending() {
        let (mut pipe, packet) = IcPipe::negotiate(KVP, 1);
        let request = parse_packet(&packet).unwrap().payload.to_vec();
        // The request echoed without the RESPONSE flag is not a reply at all.
        assert!(matches!(
            feed(&mut pipe, &encode_inband(1, 0, &request)),
            Err(IcReplyError::NotResponse { .. })
        ));
        // Too short for the IC headers.
        assert!(matches!(
            feed(&mut pipe, &encode_inband(1, 0, &[0; 8])),
            Err(IcReplyError::Malformed(_))
        ));
        // A response whose body is cut, or whose counts are odd.
        let mut cut = request.clone();
        ic::set_response_flags(&mut cut).unwrap();
        cut.truncate(32);
        assert!(matches!(
            feed(&mut pipe, &encode_inband(1, 0, &cut)),
            Ok(Answer::Malformed(_))
        ));
        let mut odd = request.clone();
        ic::set_response_flags(&mut odd).unwrap();
        odd[28] = 7;
        assert!(matches!(
            feed(&mut pipe, &encode_inband(1, 0, &odd)),
            Ok(Answer::Malformed(_))
        ));
        assert_eq!(pipe.negotiation(), &Negotiation::Pending { trans_id: 1 });
        // Not inband at all.
        let mut completion = encode_inband(1, 0, &odd);
        completion[0] = packet_type::COMP as u8;
        let parsed = parse_packet(&completion).unwrap();
        assert_eq!(
            IcReply::parse(&parsed).err(),
            Some(IcReplyError::NotInband(packet_type::COMP))
        );
    }

    #[test]
    fn garbage_answers_never_panic() {
        let mut state = 0x1234_5678u32;
        for len in 0..160 {
            let (mut pipe, _) = IcPipe::negotiate(KVP, 1);
            let mut payload: Vec<u8> = (0..len)
                .map(|_| {
                    state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (state >> 16) as u8
                })
                .collect();
            if payload.len() >= ic::ICMSG_HDR_LEN {
                payload[25] |= icflags::RESPONSE;
                payload[12] = msgtype::NEGOTIATE as u8;
                payload[13] = 0;
            }
            let packet = encode_inband(1, 0, &payload);
            let _ = feed(&mut pipe, &packet);
            let _ = pipe.status();
        }
    }

    #[test]
    fn status_summary_reads_like_the_cli_line() {
        assert_eq!(
            NegotiationStatus::none().summary("fcopy"),
            "negotiation none (no versions agreed)"
        );
        let (mut pipe, packet) = IcPipe::negotiate(FCOPY, 1);
        let (_, answer) = guest_answer(&packet, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS);
        feed(&mut pipe, &answer).unwrap();
        assert_eq!(
            pipe.status().summary("fcopy"),
            "negotiation agreed (framework 3.0, fcopy 1.1)"
        );
        assert_eq!(KVP.describe(), "framework 3.0/1.0, kvp 4.0/3.0/1.0");
    }
}
