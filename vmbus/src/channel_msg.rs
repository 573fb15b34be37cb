//! VMBus channel-management messages (the SynIC message layer), as carried on the control
//! stream.
//!
//! On real hardware these travel through SynIC message slots; we send the same bytes as
//! CONTROL frames (docs/bus-protocol.md). Layouts: include/linux/hyperv.h, compiled sizes in
//! icmsg-vmbus.md §5. Only the messages our bus exchanges are modelled by
//! [`ChannelMessage`]; GPADL and unload messages exist on real VMBus but never on our streams,
//! because the streams replace the rings they would set up.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::guid::Guid;
use crate::WireError;

/// `enum vmbus_channel_message_type`.
pub mod msgtype {
    /// `CHANNELMSG_INVALID`.
    pub const INVALID: u32 = 0;
    /// `CHANNELMSG_OFFERCHANNEL` (host → guest).
    pub const OFFERCHANNEL: u32 = 1;
    /// `CHANNELMSG_RESCIND_CHANNELOFFER` (host → guest).
    pub const RESCIND_CHANNELOFFER: u32 = 2;
    /// `CHANNELMSG_REQUESTOFFERS` (guest → host).
    pub const REQUESTOFFERS: u32 = 3;
    /// `CHANNELMSG_ALLOFFERS_DELIVERED` (host → guest).
    pub const ALLOFFERS_DELIVERED: u32 = 4;
    /// `CHANNELMSG_OPENCHANNEL` (guest → host).
    pub const OPENCHANNEL: u32 = 5;
    /// `CHANNELMSG_OPENCHANNEL_RESULT` (host → guest).
    pub const OPENCHANNEL_RESULT: u32 = 6;
    /// `CHANNELMSG_CLOSECHANNEL` (guest → host).
    pub const CLOSECHANNEL: u32 = 7;
    /// `CHANNELMSG_GPADL_HEADER` (guest → host).
    pub const GPADL_HEADER: u32 = 8;
    /// `CHANNELMSG_GPADL_BODY` (guest → host).
    pub const GPADL_BODY: u32 = 9;
    /// `CHANNELMSG_GPADL_CREATED` (host → guest).
    pub const GPADL_CREATED: u32 = 10;
    /// `CHANNELMSG_GPADL_TEARDOWN` (guest → host).
    pub const GPADL_TEARDOWN: u32 = 11;
    /// `CHANNELMSG_GPADL_TORNDOWN` (host → guest).
    pub const GPADL_TORNDOWN: u32 = 12;
    /// `CHANNELMSG_RELID_RELEASED` (guest → host).
    pub const RELID_RELEASED: u32 = 13;
    /// `CHANNELMSG_INITIATE_CONTACT` (guest → host).
    pub const INITIATE_CONTACT: u32 = 14;
    /// `CHANNELMSG_VERSION_RESPONSE` (host → guest).
    pub const VERSION_RESPONSE: u32 = 15;
    /// `CHANNELMSG_UNLOAD` (guest → host).
    pub const UNLOAD: u32 = 16;
    /// `CHANNELMSG_UNLOAD_RESPONSE` (host → guest).
    pub const UNLOAD_RESPONSE: u32 = 17;
    /// `CHANNELMSG_TL_CONNECT_REQUEST` (guest → host, hvsock).
    pub const TL_CONNECT_REQUEST: u32 = 21;
    /// `CHANNELMSG_MODIFYCHANNEL` (guest → host).
    pub const MODIFYCHANNEL: u32 = 22;
    /// `CHANNELMSG_TL_CONNECT_RESULT` (host → guest).
    pub const TL_CONNECT_RESULT: u32 = 23;
    /// `CHANNELMSG_MODIFYCHANNEL_RESPONSE` (host → guest).
    pub const MODIFYCHANNEL_RESPONSE: u32 = 24;
}

/// `VMBUS_CHANNEL_*` offer flags (`chn_flags`).
pub mod chn_flags {
    /// `VMBUS_CHANNEL_ENUMERATE_DEVICE_INTERFACE`.
    pub const ENUMERATE_DEVICE_INTERFACE: u16 = 0x1;
    /// `VMBUS_CHANNEL_SERVER_SUPPORTS_TRANSFER_PAGES`.
    pub const SERVER_SUPPORTS_TRANSFER_PAGES: u16 = 0x2;
    /// `VMBUS_CHANNEL_SERVER_SUPPORTS_GPADLS`.
    pub const SERVER_SUPPORTS_GPADLS: u16 = 0x4;
    /// `VMBUS_CHANNEL_NAMED_PIPE_MODE`.
    pub const NAMED_PIPE_MODE: u16 = 0x10;
    /// `VMBUS_CHANNEL_LOOPBACK_OFFER`.
    pub const LOOPBACK_OFFER: u16 = 0x100;
    /// `VMBUS_CHANNEL_PARENT_OFFER`.
    pub const PARENT_OFFER: u16 = 0x200;
    /// `VMBUS_CHANNEL_REQUEST_MONITORED_NOTIFICATION`.
    pub const REQUEST_MONITORED_NOTIFICATION: u16 = 0x400;
    /// `VMBUS_CHANNEL_TLNPI_PROVIDER_OFFER` (hvsock).
    pub const TLNPI_PROVIDER_OFFER: u16 = 0x2000;
}

/// `VMBUS_PIPE_TYPE_BYTE`.
pub const PIPE_TYPE_BYTE: u32 = 0;
/// `VMBUS_PIPE_TYPE_MESSAGE`.
pub const PIPE_TYPE_MESSAGE: u32 = 4;

/// VMBus protocol version 0.13 (Windows Server 2008).
pub const VERSION_WS2008: u32 = 13;
/// VMBus protocol version 1.1 (Windows 7).
pub const VERSION_WIN7: u32 = 1 << 16 | 1;
/// VMBus protocol version 2.4 (Windows 8).
pub const VERSION_WIN8: u32 = 2 << 16 | 4;
/// VMBus protocol version 3.0 (Windows 8.1); hv_vss refuses older ones.
pub const VERSION_WIN8_1: u32 = 3 << 16;
/// VMBus protocol version 4.0 (Windows 10): the oldest our host accepts.
pub const VERSION_WIN10: u32 = 4 << 16;
/// VMBus protocol version 4.1.
pub const VERSION_WIN10_V4_1: u32 = 4 << 16 | 1;
/// VMBus protocol version 5.0.
pub const VERSION_WIN10_V5: u32 = 5 << 16;
/// VMBus protocol version 5.1.
pub const VERSION_WIN10_V5_1: u32 = 5 << 16 | 1;
/// VMBus protocol version 5.2 (Windows Server 2019).
pub const VERSION_WIN10_V5_2: u32 = 5 << 16 | 2;
/// VMBus protocol version 5.3 (Windows Server 2022).
pub const VERSION_WIN10_V5_3: u32 = 5 << 16 | 3;

/// `struct vmbus_channel_message_header` (8 bytes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct ChannelMessageHeader {
    /// [`msgtype`].
    pub msgtype: U32,
    /// Padding.
    pub padding: U32,
}

const _: () = assert!(core::mem::size_of::<ChannelMessageHeader>() == 8);

/// `struct vmbus_channel_offer` (176 bytes), the body of an offer.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct ChannelOffer {
    /// Device class (service GUID).
    pub if_type: Guid,
    /// Unique per offered device.
    pub if_instance: Guid,
    /// Reserved.
    pub reserved1: U64,
    /// Reserved.
    pub reserved2: U64,
    /// [`chn_flags`].
    pub chn_flags: U16,
    /// MMIO space the device needs, in MiB.
    pub mmio_megabytes: U16,
    /// Union: user-defined bytes, or pipe mode + 116 bytes.
    pub user_def: [u8; 120],
    /// Sub-channel index (0 for a primary channel).
    pub sub_channel_index: U16,
    /// Reserved.
    pub reserved3: U16,
}

const _: () = assert!(core::mem::size_of::<ChannelOffer>() == 176);

/// `struct vmbus_channel_offer_channel` (196 bytes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct OfferChannel {
    /// msgtype OFFERCHANNEL.
    pub header: ChannelMessageHeader,
    /// The offer proper.
    pub offer: ChannelOffer,
    /// Channel id the guest uses in every later message about this channel.
    pub child_relid: U32,
    /// Monitor id.
    pub monitorid: u8,
    /// Bit 0: `monitor_allocated`.
    pub monitor_allocated: u8,
    /// Bit 0: `is_dedicated_interrupt`.
    pub is_dedicated_interrupt: U16,
    /// Connection id for signalling the host.
    pub connection_id: U32,
}

const _: () = assert!(core::mem::size_of::<OfferChannel>() == 196);

/// `struct vmbus_channel_rescind_offer` (12 bytes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct RescindOffer {
    /// msgtype RESCIND_CHANNELOFFER.
    pub header: ChannelMessageHeader,
    /// The rescinded channel.
    pub child_relid: U32,
}

const _: () = assert!(core::mem::size_of::<RescindOffer>() == 12);

/// `struct vmbus_channel_open_channel` (148 bytes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct OpenChannel {
    /// msgtype OPENCHANNEL.
    pub header: ChannelMessageHeader,
    /// The channel to open.
    pub child_relid: U32,
    /// Guest-chosen id echoed in the result.
    pub openid: U32,
    /// GPADL of the ring pages (0 on our bus: no rings).
    pub ringbuffer_gpadlhandle: U32,
    /// Target virtual processor.
    pub target_vp: U32,
    /// Where the host→guest ring starts, in pages.
    pub downstream_ringbuffer_pageoffset: U32,
    /// Service-defined.
    pub userdata: [u8; 120],
}

const _: () = assert!(core::mem::size_of::<OpenChannel>() == 148);

/// `struct vmbus_channel_open_result` (20 bytes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct OpenResult {
    /// msgtype OPENCHANNEL_RESULT.
    pub header: ChannelMessageHeader,
    /// The channel.
    pub child_relid: U32,
    /// The guest's open id.
    pub openid: U32,
    /// 0 = success.
    pub status: U32,
}

const _: () = assert!(core::mem::size_of::<OpenResult>() == 20);

/// `struct vmbus_channel_close_channel` (12 bytes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct CloseChannel {
    /// msgtype CLOSECHANNEL.
    pub header: ChannelMessageHeader,
    /// The channel.
    pub child_relid: U32,
}

const _: () = assert!(core::mem::size_of::<CloseChannel>() == 12);

/// `struct vmbus_channel_relid_released` (12 bytes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct RelidReleased {
    /// msgtype RELID_RELEASED.
    pub header: ChannelMessageHeader,
    /// The channel id the guest gives back.
    pub child_relid: U32,
}

const _: () = assert!(core::mem::size_of::<RelidReleased>() == 12);

/// `struct vmbus_channel_initiate_contact` (40 bytes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct InitiateContact {
    /// msgtype INITIATE_CONTACT.
    pub header: ChannelMessageHeader,
    /// Requested VMBus version (`major << 16 | minor`).
    pub vmbus_version_requested: U32,
    /// Target vCPU for host messages.
    pub target_vcpu: U32,
    /// Union: interrupt page GPA, or (≥ 5.0) `msg_sint` u8, `msg_vtl` u8, 6 reserved bytes.
    pub interrupt_page: U64,
    /// Monitor page 1 GPA.
    pub monitor_page1: U64,
    /// Monitor page 2 GPA.
    pub monitor_page2: U64,
}

const _: () = assert!(core::mem::size_of::<InitiateContact>() == 40);

/// `struct vmbus_channel_version_response` (16 bytes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct VersionResponse {
    /// msgtype VERSION_RESPONSE.
    pub header: ChannelMessageHeader,
    /// 1 if the requested version is accepted.
    pub version_supported: u8,
    /// Connection state.
    pub connection_state: u8,
    /// Padding.
    pub padding: U16,
    /// Message connection id (≥ 5.0).
    pub msg_conn_id: U32,
}

const _: () = assert!(core::mem::size_of::<VersionResponse>() == 16);

/// A channel-management message our bus exchanges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelMessage {
    /// Guest → host: connect with this VMBus version.
    InitiateContact {
        /// `major << 16 | minor`, e.g. [`VERSION_WIN10`].
        version: u32,
    },
    /// Host → guest: answer to `InitiateContact`.
    VersionResponse {
        /// Whether the version was accepted.
        supported: bool,
        /// `msg_conn_id`.
        conn_id: u32,
    },
    /// Guest → host: send me your offers.
    RequestOffers,
    /// Host → guest: one device.
    Offer {
        /// Service class GUID.
        if_type: Guid,
        /// Unique per offer.
        if_instance: Guid,
        /// Channel id.
        child_relid: u32,
        /// Connection id.
        connection_id: u32,
    },
    /// Host → guest: no more offers for now.
    AllOffersDelivered,
    /// Guest → host: open a channel.
    OpenChannel {
        /// Channel id.
        child_relid: u32,
        /// Guest-chosen id, echoed in the result and in the channel stream's HELLO.
        open_id: u32,
    },
    /// Host → guest: result of `OpenChannel`.
    OpenResult {
        /// Channel id.
        child_relid: u32,
        /// The guest's open id.
        open_id: u32,
        /// 0 = success.
        status: u32,
    },
    /// Host → guest: the device is gone.
    Rescind {
        /// Channel id.
        child_relid: u32,
    },
    /// Guest → host: channel closed.
    CloseChannel {
        /// Channel id.
        child_relid: u32,
    },
    /// Guest → host: the channel id may be reused.
    RelidReleased {
        /// Channel id.
        child_relid: u32,
    },
}

fn header(msgtype: u32) -> ChannelMessageHeader {
    ChannelMessageHeader {
        msgtype: U32::new(msgtype),
        padding: U32::new(0),
    }
}

/// The exact size of a message body of type `msgtype` (header included), or `None` if the
/// type is not one [`ChannelMessage`] models.
fn modelled_size(msgtype: u32) -> Option<(usize, &'static str)> {
    use core::mem::size_of;
    Some(match msgtype {
        msgtype::OFFERCHANNEL => (size_of::<OfferChannel>(), "vmbus_channel_offer_channel"),
        msgtype::RESCIND_CHANNELOFFER => (size_of::<RescindOffer>(), "vmbus_channel_rescind_offer"),
        msgtype::REQUESTOFFERS => (size_of::<ChannelMessageHeader>(), "REQUESTOFFERS"),
        msgtype::ALLOFFERS_DELIVERED => (size_of::<ChannelMessageHeader>(), "ALLOFFERS_DELIVERED"),
        msgtype::OPENCHANNEL => (size_of::<OpenChannel>(), "vmbus_channel_open_channel"),
        msgtype::OPENCHANNEL_RESULT => (size_of::<OpenResult>(), "vmbus_channel_open_result"),
        msgtype::CLOSECHANNEL => (size_of::<CloseChannel>(), "vmbus_channel_close_channel"),
        msgtype::RELID_RELEASED => (size_of::<RelidReleased>(), "vmbus_channel_relid_released"),
        msgtype::INITIATE_CONTACT => (
            size_of::<InitiateContact>(),
            "vmbus_channel_initiate_contact",
        ),
        msgtype::VERSION_RESPONSE => (
            size_of::<VersionResponse>(),
            "vmbus_channel_version_response",
        ),
        _ => return None,
    })
}

/// `T` from exactly `bytes` (the caller has checked the length).
fn read_exact<T: FromBytes>(bytes: &[u8], what: &'static str) -> Result<T, WireError> {
    T::read_from_bytes(bytes).map_err(|_| WireError::LengthMismatch {
        what,
        expected: core::mem::size_of::<T>(),
        got: bytes.len(),
    })
}

impl ChannelMessage {
    /// The `msgtype` this message is sent with.
    pub fn msgtype(&self) -> u32 {
        match self {
            ChannelMessage::InitiateContact { .. } => msgtype::INITIATE_CONTACT,
            ChannelMessage::VersionResponse { .. } => msgtype::VERSION_RESPONSE,
            ChannelMessage::RequestOffers => msgtype::REQUESTOFFERS,
            ChannelMessage::Offer { .. } => msgtype::OFFERCHANNEL,
            ChannelMessage::AllOffersDelivered => msgtype::ALLOFFERS_DELIVERED,
            ChannelMessage::OpenChannel { .. } => msgtype::OPENCHANNEL,
            ChannelMessage::OpenResult { .. } => msgtype::OPENCHANNEL_RESULT,
            ChannelMessage::Rescind { .. } => msgtype::RESCIND_CHANNELOFFER,
            ChannelMessage::CloseChannel { .. } => msgtype::CLOSECHANNEL,
            ChannelMessage::RelidReleased { .. } => msgtype::RELID_RELEASED,
        }
    }

    /// The message as the kernel would put it in a SynIC message slot: the full struct, every
    /// field we do not model zero.
    pub fn encode(&self) -> Vec<u8> {
        let hdr = header(self.msgtype());
        match *self {
            ChannelMessage::InitiateContact { version } => {
                let mut m = InitiateContact::new_zeroed();
                m.header = hdr;
                m.vmbus_version_requested = U32::new(version);
                m.as_bytes().to_vec()
            }
            ChannelMessage::VersionResponse { supported, conn_id } => VersionResponse {
                header: hdr,
                version_supported: u8::from(supported),
                connection_state: 0,
                padding: U16::new(0),
                msg_conn_id: U32::new(conn_id),
            }
            .as_bytes()
            .to_vec(),
            ChannelMessage::RequestOffers | ChannelMessage::AllOffersDelivered => {
                hdr.as_bytes().to_vec()
            }
            ChannelMessage::Offer {
                if_type,
                if_instance,
                child_relid,
                connection_id,
            } => {
                let mut m = OfferChannel::new_zeroed();
                m.header = hdr;
                m.offer.if_type = if_type;
                m.offer.if_instance = if_instance;
                m.child_relid = U32::new(child_relid);
                m.connection_id = U32::new(connection_id);
                m.as_bytes().to_vec()
            }
            ChannelMessage::OpenChannel {
                child_relid,
                open_id,
            } => {
                let mut m = OpenChannel::new_zeroed();
                m.header = hdr;
                m.child_relid = U32::new(child_relid);
                m.openid = U32::new(open_id);
                m.as_bytes().to_vec()
            }
            ChannelMessage::OpenResult {
                child_relid,
                open_id,
                status,
            } => OpenResult {
                header: hdr,
                child_relid: U32::new(child_relid),
                openid: U32::new(open_id),
                status: U32::new(status),
            }
            .as_bytes()
            .to_vec(),
            ChannelMessage::Rescind { child_relid } => RescindOffer {
                header: hdr,
                child_relid: U32::new(child_relid),
            }
            .as_bytes()
            .to_vec(),
            ChannelMessage::CloseChannel { child_relid } => CloseChannel {
                header: hdr,
                child_relid: U32::new(child_relid),
            }
            .as_bytes()
            .to_vec(),
            ChannelMessage::RelidReleased { child_relid } => RelidReleased {
                header: hdr,
                child_relid: U32::new(child_relid),
            }
            .as_bytes()
            .to_vec(),
        }
    }

    /// Parses one whole message (header included). The length must be exactly the struct's:
    /// shorter → [`WireError::TooShort`], longer → [`WireError::TooLong`]; a `msgtype` we do
    /// not model (unknown, or GPADL/unload ones that never cross our bus) →
    /// [`WireError::BadValue`].
    pub fn parse(bytes: &[u8]) -> Result<ChannelMessage, WireError> {
        let (hdr, _) =
            ChannelMessageHeader::read_from_prefix(bytes).map_err(|_| WireError::TooShort {
                what: "vmbus_channel_message_header",
                need: core::mem::size_of::<ChannelMessageHeader>(),
                got: bytes.len(),
            })?;
        let ty = hdr.msgtype.get();
        let (size, what) = modelled_size(ty).ok_or(WireError::BadValue {
            what: "channel message type",
            value: ty.into(),
        })?;
        if bytes.len() < size {
            return Err(WireError::TooShort {
                what,
                need: size,
                got: bytes.len(),
            });
        }
        if bytes.len() > size {
            return Err(WireError::TooLong {
                what,
                max: size,
                got: bytes.len(),
            });
        }
        Ok(match ty {
            msgtype::OFFERCHANNEL => {
                let m: OfferChannel = read_exact(bytes, what)?;
                ChannelMessage::Offer {
                    if_type: m.offer.if_type,
                    if_instance: m.offer.if_instance,
                    child_relid: m.child_relid.get(),
                    connection_id: m.connection_id.get(),
                }
            }
            msgtype::RESCIND_CHANNELOFFER => ChannelMessage::Rescind {
                child_relid: read_exact::<RescindOffer>(bytes, what)?.child_relid.get(),
            },
            msgtype::REQUESTOFFERS => ChannelMessage::RequestOffers,
            msgtype::ALLOFFERS_DELIVERED => ChannelMessage::AllOffersDelivered,
            msgtype::OPENCHANNEL => {
                let m: OpenChannel = read_exact(bytes, what)?;
                ChannelMessage::OpenChannel {
                    child_relid: m.child_relid.get(),
                    open_id: m.openid.get(),
                }
            }
            msgtype::OPENCHANNEL_RESULT => {
                let m: OpenResult = read_exact(bytes, what)?;
                ChannelMessage::OpenResult {
                    child_relid: m.child_relid.get(),
                    open_id: m.openid.get(),
                    status: m.status.get(),
                }
            }
            msgtype::CLOSECHANNEL => ChannelMessage::CloseChannel {
                child_relid: read_exact::<CloseChannel>(bytes, what)?.child_relid.get(),
            },
            msgtype::RELID_RELEASED => ChannelMessage::RelidReleased {
                child_relid: read_exact::<RelidReleased>(bytes, what)?.child_relid.get(),
            },
            msgtype::INITIATE_CONTACT => ChannelMessage::InitiateContact {
                version: read_exact::<InitiateContact>(bytes, what)?
                    .vmbus_version_requested
                    .get(),
            },
            msgtype::VERSION_RESPONSE => {
                let m: VersionResponse = read_exact(bytes, what)?;
                ChannelMessage::VersionResponse {
                    // The kernel tests `version_supported` for non-zero
                    // (drivers/hv/connection.c vmbus_negotiate_version, 6.1).
                    supported: m.version_supported != 0,
                    conn_id: m.msg_conn_id.get(),
                }
            }
            _ => {
                return Err(WireError::BadValue {
                    what: "channel message type",
                    value: ty.into(),
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    fn all_messages() -> Vec<ChannelMessage> {
        vec![
            ChannelMessage::InitiateContact {
                version: VERSION_WIN10_V5_3,
            },
            ChannelMessage::VersionResponse {
                supported: true,
                conn_id: 0x1234,
            },
            ChannelMessage::VersionResponse {
                supported: false,
                conn_id: 0,
            },
            ChannelMessage::RequestOffers,
            ChannelMessage::Offer {
                if_type: Guid::FCOPY,
                if_instance: Guid::KVP,
                child_relid: 17,
                connection_id: 0x2001,
            },
            ChannelMessage::AllOffersDelivered,
            ChannelMessage::OpenChannel {
                child_relid: 17,
                open_id: 99,
            },
            ChannelMessage::OpenResult {
                child_relid: 17,
                open_id: 99,
                status: 0,
            },
            ChannelMessage::Rescind { child_relid: 17 },
            ChannelMessage::CloseChannel { child_relid: 17 },
            ChannelMessage::RelidReleased { child_relid: 17 },
        ]
    }

    #[test]
    fn channel_message_header_offsets_match_spec() {
        assert_eq!(size_of::<ChannelMessageHeader>(), 8);
        assert_eq!(offset_of!(ChannelMessageHeader, msgtype), 0);
        assert_eq!(offset_of!(ChannelMessageHeader, padding), 4);
    }

    #[test]
    fn channel_offer_offsets_match_spec() {
        assert_eq!(size_of::<ChannelOffer>(), 176);
        assert_eq!(offset_of!(ChannelOffer, if_type), 0);
        assert_eq!(offset_of!(ChannelOffer, if_instance), 16);
        assert_eq!(offset_of!(ChannelOffer, reserved1), 32);
        assert_eq!(offset_of!(ChannelOffer, reserved2), 40);
        assert_eq!(offset_of!(ChannelOffer, chn_flags), 48);
        assert_eq!(offset_of!(ChannelOffer, mmio_megabytes), 50);
        assert_eq!(offset_of!(ChannelOffer, user_def), 52);
        assert_eq!(offset_of!(ChannelOffer, sub_channel_index), 172);
        assert_eq!(offset_of!(ChannelOffer, reserved3), 174);
    }

    #[test]
    fn offer_channel_offsets_match_spec() {
        assert_eq!(size_of::<OfferChannel>(), 196);
        assert_eq!(offset_of!(OfferChannel, header), 0);
        assert_eq!(offset_of!(OfferChannel, offer), 8);
        assert_eq!(offset_of!(OfferChannel, child_relid), 184);
        assert_eq!(offset_of!(OfferChannel, monitorid), 188);
        assert_eq!(offset_of!(OfferChannel, monitor_allocated), 189);
        assert_eq!(offset_of!(OfferChannel, is_dedicated_interrupt), 190);
        assert_eq!(offset_of!(OfferChannel, connection_id), 192);
    }

    #[test]
    fn small_message_offsets_match_spec() {
        assert_eq!(size_of::<RescindOffer>(), 12);
        assert_eq!(offset_of!(RescindOffer, child_relid), 8);
        assert_eq!(size_of::<CloseChannel>(), 12);
        assert_eq!(offset_of!(CloseChannel, child_relid), 8);
        assert_eq!(size_of::<RelidReleased>(), 12);
        assert_eq!(offset_of!(RelidReleased, child_relid), 8);
        assert_eq!(size_of::<OpenResult>(), 20);
        assert_eq!(offset_of!(OpenResult, child_relid), 8);
        assert_eq!(offset_of!(OpenResult, openid), 12);
        assert_eq!(offset_of!(OpenResult, status), 16);
    }

    #[test]
    fn open_channel_offsets_match_spec() {
        assert_eq!(size_of::<OpenChannel>(), 148);
        assert_eq!(offset_of!(OpenChannel, header), 0);
        assert_eq!(offset_of!(OpenChannel, child_relid), 8);
        assert_eq!(offset_of!(OpenChannel, openid), 12);
        assert_eq!(offset_of!(OpenChannel, ringbuffer_gpadlhandle), 16);
        assert_eq!(offset_of!(OpenChannel, target_vp), 20);
        assert_eq!(
            offset_of!(OpenChannel, downstream_ringbuffer_pageoffset),
            24
        );
        assert_eq!(offset_of!(OpenChannel, userdata), 28);
    }

    #[test]
    fn initiate_contact_and_version_response_offsets_match_spec() {
        assert_eq!(size_of::<InitiateContact>(), 40);
        assert_eq!(offset_of!(InitiateContact, vmbus_version_requested), 8);
        assert_eq!(offset_of!(InitiateContact, target_vcpu), 12);
        assert_eq!(offset_of!(InitiateContact, interrupt_page), 16);
        assert_eq!(offset_of!(InitiateContact, monitor_page1), 24);
        assert_eq!(offset_of!(InitiateContact, monitor_page2), 32);
        assert_eq!(size_of::<VersionResponse>(), 16);
        assert_eq!(offset_of!(VersionResponse, version_supported), 8);
        assert_eq!(offset_of!(VersionResponse, connection_state), 9);
        assert_eq!(offset_of!(VersionResponse, padding), 10);
        assert_eq!(offset_of!(VersionResponse, msg_conn_id), 12);
    }

    #[test]
    fn channel_message_round_trips_with_exact_sizes() {
        for msg in all_messages() {
            let bytes = msg.encode();
            assert_eq!(&bytes[..4], &msg.msgtype().to_le_bytes());
            assert_eq!(ChannelMessage::parse(&bytes), Ok(msg), "{msg:?}");
        }
        let sizes: Vec<usize> = all_messages().iter().map(|m| m.encode().len()).collect();
        assert_eq!(sizes, [40, 16, 16, 8, 196, 8, 148, 20, 12, 12, 12]);
    }

    #[test]
    fn offer_encodes_guid_bytes_and_relid_at_spec_offsets() {
        let bytes = ChannelMessage::Offer {
            if_type: Guid::FCOPY,
            if_instance: Guid::NIL,
            child_relid: 0x0102_0304,
            connection_id: 0x0a0b_0c0d,
        }
        .encode();
        assert_eq!(&bytes[0..4], &[1, 0, 0, 0]);
        assert_eq!(&bytes[8..24], &Guid::FCOPY.0);
        assert_eq!(&bytes[184..188], &[4, 3, 2, 1]);
        assert_eq!(&bytes[192..196], &[0x0d, 0x0c, 0x0b, 0x0a]);
    }

    #[test]
    fn channel_message_short_body_is_too_short() {
        for msg in all_messages() {
            let bytes = msg.encode();
            if bytes.len() == 8 {
                continue;
            }
            let short = &bytes[..bytes.len() - 1];
            assert!(
                matches!(ChannelMessage::parse(short), Err(WireError::TooShort { need, got, .. }) if need == bytes.len() && got == short.len()),
                "{msg:?}"
            );
        }
        for len in 0..8 {
            assert!(matches!(
                ChannelMessage::parse(&[1u8; 8][..len]),
                Err(WireError::TooShort { need: 8, .. })
            ));
        }
    }

    #[test]
    fn channel_message_extra_bytes_are_too_long() {
        for msg in all_messages() {
            let mut bytes = msg.encode();
            let size = bytes.len();
            bytes.push(0);
            assert_eq!(
                ChannelMessage::parse(&bytes),
                Err(WireError::TooLong {
                    what: modelled_size(msg.msgtype()).unwrap().1,
                    max: size,
                    got: size + 1
                })
            );
        }
    }

    #[test]
    fn channel_message_unknown_or_unmodelled_type_is_bad_value() {
        for ty in [
            0u32,
            msgtype::GPADL_HEADER,
            msgtype::GPADL_CREATED,
            msgtype::UNLOAD,
            18,
            25,
            0xffff_ffff,
        ] {
            let mut bytes = vec![0u8; 196];
            bytes[..4].copy_from_slice(&ty.to_le_bytes());
            assert_eq!(
                ChannelMessage::parse(&bytes),
                Err(WireError::BadValue {
                    what: "channel message type",
                    value: ty.into()
                })
            );
        }
    }

    #[test]
    fn version_response_nonzero_supported_is_true() {
        let mut bytes = ChannelMessage::VersionResponse {
            supported: false,
            conn_id: 5,
        }
        .encode();
        bytes[8] = 2;
        assert_eq!(
            ChannelMessage::parse(&bytes),
            Ok(ChannelMessage::VersionResponse {
                supported: true,
                conn_id: 5
            })
        );
    }

    #[test]
    fn vmbus_versions_match_spec() {
        assert_eq!(VERSION_WS2008, 0x0000_000d);
        assert_eq!(VERSION_WIN7, 0x0001_0001);
        assert_eq!(VERSION_WIN8, 0x0002_0004);
        assert_eq!(VERSION_WIN8_1, 0x0003_0000);
        assert_eq!(VERSION_WIN10, 0x0004_0000);
        assert_eq!(VERSION_WIN10_V4_1, 0x0004_0001);
        assert_eq!(VERSION_WIN10_V5, 0x0005_0000);
        assert_eq!(VERSION_WIN10_V5_1, 0x0005_0001);
        assert_eq!(VERSION_WIN10_V5_2, 0x0005_0002);
        assert_eq!(VERSION_WIN10_V5_3, 0x0005_0003);
    }
}
