//! Framing of the cusedev bus streams (docs/bus-protocol.md).
//!
//! Real VMBus has SynIC message slots and shared-memory rings; we have byte streams. Every
//! stream is a sequence of frames — an 8-byte header (`len` u32, `kind` u16, reserved u16)
//! and `len` bytes of body — and starts with a HELLO saying which stream it is. The limits
//! are checked on receipt so that a confused or hostile peer costs at most one 64 KiB buffer.

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::WireError;

/// Size of a frame header.
pub const FRAME_HEADER_LEN: usize = 8;
/// The largest frame body: the largest packet any driver sends (xs_fastpath's 8192-page
/// request, 65,624 bytes, which its 128 KiB ring holds) and a guest memory chunk with its
/// header both fit.
pub const MAX_FRAME_BODY: usize = 128 << 10;
/// First word of every HELLO: "VMBS" in little-endian.
pub const BUS_MAGIC: u32 = 0x5342_4d56;
/// The bus protocol version this crate speaks.
pub const BUS_PROTOCOL_VERSION: u32 = 1;
/// Size of a HELLO body.
pub const HELLO_LEN: usize = 24;

/// Frame kinds.
pub mod kind {
    /// First frame of every stream: a [`super::Hello`].
    pub const HELLO: u16 = 1;
    /// A channel-management message ([`crate::channel_msg`]), on the control stream.
    pub const CONTROL: u16 = 2;
    /// A VMBus packet ([`crate::packet`]), on a channel stream.
    pub const PACKET: u16 = 3;
    /// Host access to the pages of a GPA-direct packet ([`crate::guest_memory`]), on a
    /// channel stream.
    pub const MEMORY: u16 = 4;
}

/// The frame header as it is on the stream.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct FrameHeaderWire {
    /// Body length.
    pub len: U32,
    /// [`kind`].
    pub kind: U16,
    /// Reserved, 0.
    pub reserved: U16,
}

const _: () = assert!(core::mem::size_of::<FrameHeaderWire>() == FRAME_HEADER_LEN);

/// A checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameHeader {
    /// Body length, at most [`MAX_FRAME_BODY`].
    pub len: u32,
    /// One of [`kind`].
    pub kind: u16,
}

impl FrameHeader {
    /// Parses the header at the front of `bytes` (at least 8 bytes; anything after the header
    /// is not looked at). Errors: short input, `len` over [`MAX_FRAME_BODY`], unknown kind,
    /// non-zero reserved field.
    pub fn parse(bytes: &[u8]) -> Result<FrameHeader, WireError> {
        let (wire, _) =
            FrameHeaderWire::read_from_prefix(bytes).map_err(|_| WireError::TooShort {
                what: "bus frame header",
                need: FRAME_HEADER_LEN,
                got: bytes.len(),
            })?;
        let len = wire.len.get();
        if u64::from(len) > MAX_FRAME_BODY as u64 {
            return Err(WireError::TooLong {
                what: "bus frame body",
                max: MAX_FRAME_BODY,
                got: usize::try_from(len).unwrap_or(usize::MAX),
            });
        }
        let kind = wire.kind.get();
        if !matches!(
            kind,
            kind::HELLO | kind::CONTROL | kind::PACKET | kind::MEMORY
        ) {
            return Err(WireError::BadValue {
                what: "bus frame kind",
                value: kind.into(),
            });
        }
        if wire.reserved.get() != 0 {
            return Err(WireError::BadValue {
                what: "bus frame reserved field",
                value: wire.reserved.get().into(),
            });
        }
        Ok(FrameHeader { len, kind })
    }

    /// The 8 header bytes.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let wire = FrameHeaderWire {
            len: U32::new(self.len),
            kind: U16::new(self.kind),
            reserved: U16::new(0),
        };
        let mut out = [0u8; FRAME_HEADER_LEN];
        out.copy_from_slice(wire.as_bytes());
        out
    }
}

/// One frame: header + body.
///
/// Never panics. The body is not checked against [`MAX_FRAME_BODY`] here (the sender is
/// trusted code); a longer one makes the receiver's [`FrameHeader::parse`] fail, which is
/// where the limit protects anything. `len` saturates at `u32::MAX`.
pub fn encode_frame(kind: u16, body: &[u8]) -> Vec<u8> {
    let header = FrameHeader {
        len: u32::try_from(body.len()).unwrap_or(u32::MAX),
        kind,
    };
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(body);
    out
}

/// A whole frame found at the front of a receive buffer by [`decode_frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The checked header.
    pub header: FrameHeader,
    /// The body (`header.len` bytes).
    pub body: &'a [u8],
    /// Bytes of the buffer this frame used (header + body).
    pub consumed: usize,
}

/// Splits the first whole frame off a receive buffer: `Ok(None)` while more bytes are needed
/// (the header has already been checked if it is complete), otherwise the frame.
pub fn decode_frame(buf: &[u8]) -> Result<Option<Frame<'_>>, WireError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let header = FrameHeader::parse(buf)?;
    // `len <= MAX_FRAME_BODY` after parse, so this cannot overflow.
    let end = FRAME_HEADER_LEN + header.len as usize;
    Ok(buf.get(FRAME_HEADER_LEN..end).map(|body| Frame {
        header,
        body,
        consumed: end,
    }))
}

/// Which stream a HELLO opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The control stream (channel-management messages).
    Control,
    /// A channel stream (VMBus packets of one open channel).
    Channel,
}

impl Role {
    /// The value on the wire (0 control, 1 channel).
    pub fn to_u32(self) -> u32 {
        match self {
            Role::Control => 0,
            Role::Channel => 1,
        }
    }
}

/// The HELLO body as it is on the stream (24 bytes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct HelloWire {
    /// [`BUS_MAGIC`].
    pub magic: U32,
    /// [`BUS_PROTOCOL_VERSION`].
    pub version: U32,
    /// 0 control, 1 channel.
    pub role: U32,
    /// The channel (0 on the control stream).
    pub child_relid: U32,
    /// The guest's open id from OPENCHANNEL (0 on the control stream).
    pub open_id: U32,
    /// Reserved, 0.
    pub reserved: U32,
}

const _: () = assert!(core::mem::size_of::<HelloWire>() == HELLO_LEN);

/// The first frame of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hello {
    /// Control or channel stream.
    pub role: Role,
    /// For a channel stream: the channel it carries.
    pub child_relid: u32,
    /// For a channel stream: the open id the guest sent in OPENCHANNEL.
    pub open_id: u32,
}

impl Hello {
    /// A HELLO for the control stream.
    pub fn control() -> Hello {
        Hello {
            role: Role::Control,
            child_relid: 0,
            open_id: 0,
        }
    }

    /// A HELLO for the channel stream of `child_relid`, opened with `open_id`.
    pub fn channel(child_relid: u32, open_id: u32) -> Hello {
        Hello {
            role: Role::Channel,
            child_relid,
            open_id,
        }
    }

    /// The 24-byte body (wrap it with `encode_frame(kind::HELLO, ..)`).
    pub fn encode(&self) -> Vec<u8> {
        HelloWire {
            magic: U32::new(BUS_MAGIC),
            version: U32::new(BUS_PROTOCOL_VERSION),
            role: U32::new(self.role.to_u32()),
            child_relid: U32::new(self.child_relid),
            open_id: U32::new(self.open_id),
            reserved: U32::new(0),
        }
        .as_bytes()
        .to_vec()
    }

    /// Parses a HELLO body: exactly 24 bytes, right magic and version, role 0 or 1, reserved 0.
    pub fn parse(body: &[u8]) -> Result<Hello, WireError> {
        if body.len() > HELLO_LEN {
            return Err(WireError::TooLong {
                what: "bus HELLO",
                max: HELLO_LEN,
                got: body.len(),
            });
        }
        let wire = HelloWire::read_from_bytes(body).map_err(|_| WireError::TooShort {
            what: "bus HELLO",
            need: HELLO_LEN,
            got: body.len(),
        })?;
        if wire.magic.get() != BUS_MAGIC {
            return Err(WireError::BadMagic);
        }
        if wire.version.get() != BUS_PROTOCOL_VERSION {
            return Err(WireError::BadValue {
                what: "bus protocol version",
                value: wire.version.get().into(),
            });
        }
        let role = match wire.role.get() {
            0 => Role::Control,
            1 => Role::Channel,
            other => {
                return Err(WireError::BadValue {
                    what: "bus HELLO role",
                    value: other.into(),
                })
            }
        };
        if wire.reserved.get() != 0 {
            return Err(WireError::BadValue {
                what: "bus HELLO reserved field",
                value: wire.reserved.get().into(),
            });
        }
        Ok(Hello {
            role,
            child_relid: wire.child_relid.get(),
            open_id: wire.open_id.get(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn frame_header_offsets_match_bus_protocol() {
        assert_eq!(offset_of!(FrameHeaderWire, len), 0);
        assert_eq!(offset_of!(FrameHeaderWire, kind), 4);
        assert_eq!(offset_of!(FrameHeaderWire, reserved), 6);
    }

    #[test]
    fn hello_offsets_match_bus_protocol() {
        assert_eq!(offset_of!(HelloWire, magic), 0);
        assert_eq!(offset_of!(HelloWire, version), 4);
        assert_eq!(offset_of!(HelloWire, role), 8);
        assert_eq!(offset_of!(HelloWire, child_relid), 12);
        assert_eq!(offset_of!(HelloWire, open_id), 16);
        assert_eq!(offset_of!(HelloWire, reserved), 20);
    }

    #[test]
    fn encode_frame_then_parse_header() {
        let frame = encode_frame(kind::PACKET, &[9; 24]);
        assert_eq!(&frame[..8], &[24, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(
            FrameHeader::parse(&frame),
            Ok(FrameHeader {
                len: 24,
                kind: kind::PACKET
            })
        );
    }

    #[test]
    fn frame_header_short_is_too_short() {
        for len in 0..8 {
            assert_eq!(
                FrameHeader::parse(&[0u8; 8][..len]),
                Err(WireError::TooShort {
                    what: "bus frame header",
                    need: 8,
                    got: len
                })
            );
        }
    }

    #[test]
    fn frame_header_body_over_128k_is_too_long() {
        let ok = FrameHeader {
            len: 131072,
            kind: kind::CONTROL,
        };
        assert_eq!(FrameHeader::parse(&ok.encode()), Ok(ok));
        for len in [131073u32, u32::MAX] {
            let bytes = FrameHeader {
                len,
                kind: kind::CONTROL,
            }
            .encode();
            assert!(matches!(
                FrameHeader::parse(&bytes),
                Err(WireError::TooLong { max: 131072, .. })
            ));
        }
    }

    #[test]
    fn frame_header_bad_kind_or_reserved_is_bad_value() {
        for bad_kind in [0u16, 5, 0xffff] {
            let bytes = FrameHeader {
                len: 0,
                kind: bad_kind,
            }
            .encode();
            assert_eq!(
                FrameHeader::parse(&bytes),
                Err(WireError::BadValue {
                    what: "bus frame kind",
                    value: bad_kind.into()
                })
            );
        }
        let mut bytes = encode_frame(kind::HELLO, &[]);
        bytes[6] = 1;
        assert!(matches!(
            FrameHeader::parse(&bytes),
            Err(WireError::BadValue { value: 1, .. })
        ));
    }

    #[test]
    fn decode_frame_needs_whole_frame() {
        let mut buf = encode_frame(kind::CONTROL, &[1, 2, 3]);
        buf.extend(encode_frame(kind::PACKET, &[4]));
        for cut in 0..11 {
            assert_eq!(decode_frame(&buf[..cut]), Ok(None), "cut {cut}");
        }
        let frame = decode_frame(&buf).unwrap().unwrap();
        assert_eq!(frame.header.kind, kind::CONTROL);
        assert_eq!(frame.body, &[1, 2, 3]);
        assert_eq!(frame.consumed, 11);
        let frame = decode_frame(&buf[11..]).unwrap().unwrap();
        assert_eq!(
            (frame.header.kind, frame.body, frame.consumed),
            (kind::PACKET, &[4u8][..], 9)
        );
        assert!(decode_frame(&[0xff; 8]).is_err());
    }

    #[test]
    fn hello_round_trips_both_roles() {
        for hello in [Hello::control(), Hello::channel(17, 99)] {
            let body = hello.encode();
            assert_eq!(body.len(), 24);
            assert_eq!(Hello::parse(&body), Ok(hello));
        }
        assert_eq!(
            Hello::channel(0x0102_0304, 5).encode(),
            [0x56, 0x4d, 0x42, 0x53, 1, 0, 0, 0, 1, 0, 0, 0, 4, 3, 2, 1, 5, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(&Hello::control().encode()[..4], b"VMBS");
    }

    #[test]
    fn hello_short_or_oversized_is_rejected() {
        let body = Hello::control().encode();
        assert_eq!(
            Hello::parse(&body[..23]),
            Err(WireError::TooShort {
                what: "bus HELLO",
                need: 24,
                got: 23
            })
        );
        assert_eq!(
            Hello::parse(&[]),
            Err(WireError::TooShort {
                what: "bus HELLO",
                need: 24,
                got: 0
            })
        );
        let mut long = body.clone();
        long.push(0);
        assert_eq!(
            Hello::parse(&long),
            Err(WireError::TooLong {
                what: "bus HELLO",
                max: 24,
                got: 25
            })
        );
    }

    #[test]
    fn hello_bad_magic_version_role_reserved_are_rejected() {
        let good = Hello::channel(1, 2).encode();
        let mut bad = good.clone();
        bad[0] ^= 1;
        assert_eq!(Hello::parse(&bad), Err(WireError::BadMagic));
        let mut bad = good.clone();
        bad[4] = 2;
        assert_eq!(
            Hello::parse(&bad),
            Err(WireError::BadValue {
                what: "bus protocol version",
                value: 2
            })
        );
        let mut bad = good.clone();
        bad[8] = 2;
        assert_eq!(
            Hello::parse(&bad),
            Err(WireError::BadValue {
                what: "bus HELLO role",
                value: 2
            })
        );
        let mut bad = good.clone();
        bad[23] = 1;
        assert!(matches!(
            Hello::parse(&bad),
            Err(WireError::BadValue {
                what: "bus HELLO reserved field",
                ..
            })
        ));
        assert_eq!(Hello::parse(&[0xff; 24]), Err(WireError::BadMagic));
    }
}
