//! hv_fcopy messages: what the host sends after the 28 IC header bytes, and what the guest
//! driver hands its daemon.
//!
//! Layouts are the 6.1 UAPI ones (`include/uapi/linux/hyperv.h`, compiled sizes in fcopy.md
//! §2.1) plus the seed-era `hv_do_fcopy` without `pad` (fcopy.md §2.2). The host wire layout
//! always carries the pad; a seed (2014) driver copies only `sizeof` its own 6192-byte struct,
//! which is why the last 4 bytes of a full fragment get lost there (fcopy.md §9 #3).

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::utf16::{
    encode_name, units_from_le_bytes, units_to_le_bytes, utf16s_to_utf8s, Overflow,
};
use crate::WireError;

/// fcopy operation codes (`enum hv_fcopy_op`).
pub mod op {
    /// `START_FILE_COPY`.
    pub const START_FILE_COPY: u32 = 0;
    /// `WRITE_TO_FILE`.
    pub const WRITE_TO_FILE: u32 = 1;
    /// `COMPLETE_FCOPY`.
    pub const COMPLETE_FCOPY: u32 = 2;
    /// `CANCEL_FCOPY`.
    pub const CANCEL_FCOPY: u32 = 3;
}

/// `copy_flags`: overwrite an existing target.
pub const OVER_WRITE: u32 = 0x1;
/// `copy_flags`: create missing directories of `path_name`.
pub const CREATE_PATH: u32 = 0x2;
/// UTF-16 units in a name field.
pub const W_MAX_PATH: usize = 260;
/// Bytes of data in one WRITE_TO_FILE.
pub const DATA_FRAGMENT: usize = 6144;
/// Daemon registration value of the seed era (its `FCOPY_CURRENT_VERSION`).
pub const FCOPY_VERSION_0: u32 = 0;
/// Daemon registration value of 6.1 (its `FCOPY_CURRENT_VERSION`).
pub const FCOPY_VERSION_1: u32 = 1;

/// The largest UTF-8 name the guest driver produces: `W_MAX_PATH - 1` bytes, so the zeroed
/// 520-byte field always stays NUL-terminated (hv_fcopy.c `fcopy_send_data`, 6.1).
pub const UTF8_NAME_MAX: usize = W_MAX_PATH - 1;

/// `struct hv_fcopy_hdr` (36 bytes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct FcopyHdr {
    /// [`op`].
    pub operation: U32,
    /// Unused by Linux.
    pub service_id0: [u8; 16],
    /// Unused by Linux.
    pub service_id1: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<FcopyHdr>() == 36);

/// `struct hv_start_fcopy` (1088 bytes).
///
/// The name fields are bytes because they hold two encodings: UTF-16LE (260 units) as the host
/// sends them, and NUL-terminated UTF-8 in the copy the guest driver gives its daemon.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct StartFcopy {
    /// `operation` = START_FILE_COPY.
    pub hdr: FcopyHdr,
    /// Target file name (UTF-16LE from the host, UTF-8 to the daemon).
    pub file_name: [u8; 2 * W_MAX_PATH],
    /// Target directory (same encodings).
    pub path_name: [u8; 2 * W_MAX_PATH],
    /// [`OVER_WRITE`] | [`CREATE_PATH`].
    pub copy_flags: U32,
    /// Announced size of the file (the daemon does not check it).
    pub file_size: U64,
}

const _: () = assert!(core::mem::size_of::<StartFcopy>() == 1088);

/// `struct hv_do_fcopy` as in 6.1 and on the host wire (6196 bytes, with `pad`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct DoFcopy {
    /// `operation` = WRITE_TO_FILE.
    pub hdr: FcopyHdr,
    /// Reserved word the host wire format has after the header.
    pub pad: U32,
    /// Byte offset in the target file.
    pub offset: U64,
    /// Valid bytes in `data`.
    pub size: U32,
    /// The fragment.
    pub data: [u8; DATA_FRAGMENT],
}

const _: () = assert!(core::mem::size_of::<DoFcopy>() == 6196);

/// `struct hv_do_fcopy` of the seed-era (3.15) header: no `pad` (6192 bytes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct DoFcopySeed {
    /// `operation`.
    pub hdr: FcopyHdr,
    /// Byte offset in the target file.
    pub offset: U64,
    /// Valid bytes in `data`.
    pub size: U32,
    /// The fragment.
    pub data: [u8; DATA_FRAGMENT],
}

const _: () = assert!(core::mem::size_of::<DoFcopySeed>() == 6192);

/// Size of [`FcopyHdr`].
pub const FCOPY_HDR_LEN: usize = 36;
/// Size of [`StartFcopy`].
pub const START_FCOPY_LEN: usize = 1088;
/// Size of [`DoFcopy`] (6.1).
pub const DO_FCOPY_LEN: usize = 6196;
/// Size of [`DoFcopySeed`] (seed era).
pub const DO_FCOPY_SEED_LEN: usize = 6192;

fn header(operation: u32) -> FcopyHdr {
    FcopyHdr {
        operation: U32::new(operation),
        service_id0: [0; 16],
        service_id1: [0; 16],
    }
}

/// Host side: a START_FILE_COPY message (1088 bytes) with UTF-16LE names.
///
/// Errors when a name needs more than 259 UTF-16 units or contains NUL.
pub fn encode_start(
    file_name: &str,
    path_name: &str,
    flags: u32,
    size: u64,
) -> Result<Vec<u8>, WireError> {
    let mut msg = StartFcopy::new_zeroed();
    msg.hdr = header(op::START_FILE_COPY);
    msg.file_name
        .copy_from_slice(&units_to_le_bytes(&encode_name(file_name)?));
    msg.path_name
        .copy_from_slice(&units_to_le_bytes(&encode_name(path_name)?));
    msg.copy_flags = U32::new(flags);
    msg.file_size = U64::new(size);
    Ok(msg.as_bytes().to_vec())
}

/// Host side: a WRITE_TO_FILE message (6196 bytes, 6.1 layout with pad); `data` is
/// zero-padded to [`DATA_FRAGMENT`]. Errors when `data` is longer than that.
pub fn encode_write(offset: u64, data: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut msg = DoFcopy::new_zeroed();
    let slot = msg.data.get_mut(..data.len()).ok_or(WireError::TooLong {
        what: "fcopy WRITE_TO_FILE data",
        max: DATA_FRAGMENT,
        got: data.len(),
    })?;
    slot.copy_from_slice(data);
    msg.hdr = header(op::WRITE_TO_FILE);
    msg.offset = U64::new(offset);
    // `data.len() <= 6144` here.
    msg.size = U32::new(data.len() as u32);
    Ok(msg.as_bytes().to_vec())
}

/// Host side: a bare 36-byte header, for COMPLETE_FCOPY and CANCEL_FCOPY (the sizes a real
/// host uses for those are unverified, fcopy.md §8.1).
pub fn encode_op(op: u32) -> Vec<u8> {
    header(op).as_bytes().to_vec()
}

/// The `operation` of an fcopy message (the bytes after the 28 IC header bytes).
pub fn operation(msg: &[u8]) -> Result<u32, WireError> {
    FcopyHdr::read_from_prefix(msg)
        .map(|(hdr, _)| hdr.operation.get())
        .map_err(|_| WireError::TooShort {
            what: "hv_fcopy_hdr",
            need: FCOPY_HDR_LEN,
            got: msg.len(),
        })
}

/// A START_FILE_COPY from the front of `msg` (extra bytes, such as receive-buffer padding,
/// are ignored, as the driver ignores them).
pub fn parse_start(msg: &[u8]) -> Result<StartFcopy, WireError> {
    StartFcopy::read_from_prefix(msg)
        .map(|(start, _)| start)
        .map_err(|_| WireError::TooShort {
            what: "hv_start_fcopy",
            need: START_FCOPY_LEN,
            got: msg.len(),
        })
}

/// A 6.1-layout WRITE_TO_FILE from the front of `msg`.
pub fn parse_write(msg: &[u8]) -> Result<DoFcopy, WireError> {
    DoFcopy::read_from_prefix(msg)
        .map(|(write, _)| write)
        .map_err(|_| WireError::TooShort {
            what: "hv_do_fcopy",
            need: DO_FCOPY_LEN,
            got: msg.len(),
        })
}

impl StartFcopy {
    /// The message the guest driver builds for its daemon from a host START: a freshly
    /// zeroed struct, the operation copied, both names converted from UTF-16LE to at most
    /// 259 bytes of UTF-8 (so they stay NUL-terminated), flags and size copied. Service ids
    /// stay zero. (hv_fcopy.c `fcopy_send_data`, 6.1; the 2014 seed does the same.)
    pub fn to_daemon(&self, overflow: Overflow) -> StartFcopy {
        let mut out = StartFcopy::new_zeroed();
        out.hdr.operation = self.hdr.operation;
        convert_name(&self.file_name, &mut out.file_name, overflow);
        convert_name(&self.path_name, &mut out.path_name, overflow);
        out.copy_flags = self.copy_flags;
        out.file_size = self.file_size;
        out
    }

    /// Host-side view: a UTF-16LE name field decoded up to its first NUL (broken surrogates
    /// become U+FFFD). For logs and tests, not for what the guest sees.
    pub fn utf16_name(field: &[u8; 2 * W_MAX_PATH]) -> String {
        let units = units_from_le_bytes(field);
        let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
        String::from_utf16_lossy(units.get(..end).unwrap_or(&[]))
    }

    /// Daemon-side view: a UTF-8 name field up to its first NUL, as the daemon's `%s` would
    /// read it (invalid UTF-8 becomes U+FFFD).
    pub fn utf8_name(field: &[u8; 2 * W_MAX_PATH]) -> String {
        let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
        String::from_utf8_lossy(field.get(..end).unwrap_or(&[])).into_owned()
    }
}

fn convert_name(from: &[u8; 2 * W_MAX_PATH], to: &mut [u8; 2 * W_MAX_PATH], overflow: Overflow) {
    let utf8 = utf16s_to_utf8s(&units_from_le_bytes(from), UTF8_NAME_MAX, overflow);
    for (slot, byte) in to.iter_mut().zip(utf8) {
        *slot = byte;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn fcopy_hdr_offsets_match_spec() {
        assert_eq!(size_of::<FcopyHdr>(), 36);
        assert_eq!(offset_of!(FcopyHdr, operation), 0);
        assert_eq!(offset_of!(FcopyHdr, service_id0), 4);
        assert_eq!(offset_of!(FcopyHdr, service_id1), 20);
    }

    #[test]
    fn start_fcopy_offsets_match_spec() {
        assert_eq!(size_of::<StartFcopy>(), 1088);
        assert_eq!(offset_of!(StartFcopy, hdr), 0);
        assert_eq!(offset_of!(StartFcopy, file_name), 36);
        assert_eq!(offset_of!(StartFcopy, path_name), 556);
        assert_eq!(offset_of!(StartFcopy, copy_flags), 1076);
        assert_eq!(offset_of!(StartFcopy, file_size), 1080);
    }

    #[test]
    fn do_fcopy_offsets_match_spec_with_pad() {
        assert_eq!(size_of::<DoFcopy>(), 6196);
        assert_eq!(offset_of!(DoFcopy, hdr), 0);
        assert_eq!(offset_of!(DoFcopy, pad), 36);
        assert_eq!(offset_of!(DoFcopy, offset), 40);
        assert_eq!(offset_of!(DoFcopy, size), 48);
        assert_eq!(offset_of!(DoFcopy, data), 52);
    }

    #[test]
    fn do_fcopy_seed_offsets_match_spec_without_pad() {
        assert_eq!(size_of::<DoFcopySeed>(), 6192);
        assert_eq!(offset_of!(DoFcopySeed, hdr), 0);
        assert_eq!(offset_of!(DoFcopySeed, offset), 36);
        assert_eq!(offset_of!(DoFcopySeed, size), 44);
        assert_eq!(offset_of!(DoFcopySeed, data), 48);
    }

    #[test]
    fn encode_start_lays_out_utf16le_names_flags_size() {
        let msg =
            encode_start("f€.txt", "/tmp/x", OVER_WRITE | CREATE_PATH, 0x1_0000_0001).unwrap();
        assert_eq!(msg.len(), 1088);
        assert_eq!(&msg[0..4], &[0, 0, 0, 0]);
        assert_eq!(&msg[36..42], &[b'f', 0, 0xac, 0x20, b'.', 0]);
        assert_eq!(&msg[556..560], &[b'/', 0, b't', 0]);
        assert_eq!(&msg[1076..1080], &[3, 0, 0, 0]);
        assert_eq!(&msg[1080..1088], &[1, 0, 0, 0, 1, 0, 0, 0]);
        let start = parse_start(&msg).unwrap();
        assert_eq!(StartFcopy::utf16_name(&start.file_name), "f€.txt");
        assert_eq!(StartFcopy::utf16_name(&start.path_name), "/tmp/x");
        assert_eq!(operation(&msg), Ok(op::START_FILE_COPY));
    }

    #[test]
    fn encode_start_rejects_long_or_nul_names() {
        assert!(matches!(
            encode_start(&"a".repeat(260), "/tmp", 0, 0),
            Err(WireError::TooLong { .. })
        ));
        assert!(matches!(
            encode_start("a", "/t\0mp", 0, 0),
            Err(WireError::ContainsNul { .. })
        ));
        assert!(encode_start(&"a".repeat(259), "/tmp", 0, 0).is_ok());
    }

    #[test]
    fn encode_write_lays_out_pad_offset_size_data() {
        let msg = encode_write(0x0102_0304_0506_0708, &[0xee; 10]).unwrap();
        assert_eq!(msg.len(), 6196);
        assert_eq!(&msg[0..4], &[1, 0, 0, 0]);
        assert_eq!(&msg[36..40], &[0; 4]);
        assert_eq!(&msg[40..48], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&msg[48..52], &[10, 0, 0, 0]);
        assert_eq!(&msg[52..62], &[0xee; 10]);
        assert!(msg[62..].iter().all(|&b| b == 0));
        let write = parse_write(&msg).unwrap();
        assert_eq!(write.size.get(), 10);
        assert_eq!(write.offset.get(), 0x0102_0304_0506_0708);
    }

    #[test]
    fn encode_write_full_fragment_ok_and_oversized_is_too_long() {
        let full = encode_write(0, &[1; DATA_FRAGMENT]).unwrap();
        assert_eq!(&full[48..52], &[0, 0x18, 0, 0]);
        assert_eq!(
            encode_write(0, &[1; DATA_FRAGMENT + 1]),
            Err(WireError::TooLong {
                what: "fcopy WRITE_TO_FILE data",
                max: DATA_FRAGMENT,
                got: DATA_FRAGMENT + 1
            })
        );
    }

    #[test]
    fn seed_view_of_a_full_host_fragment_loses_last_4_bytes() {
        // fcopy.md §9 #3: the seed copies 6192 bytes of a 6196-byte host message.
        let data: Vec<u8> = (0..DATA_FRAGMENT).map(|i| i as u8).collect();
        let msg = encode_write(0x1122_3344_5566_7788, &data).unwrap();
        let seed_copy = &msg[..DO_FCOPY_SEED_LEN];
        let as_61 = &seed_copy[52..];
        assert_eq!(as_61.len(), DATA_FRAGMENT - 4);
        assert_eq!(as_61, &data[..DATA_FRAGMENT - 4]);
        // Read through the seed's own (pad-less) struct, offset and size are misplaced.
        let (seed, _) = DoFcopySeed::read_from_prefix(seed_copy).unwrap();
        assert_eq!(seed.offset.get(), 0x5566_7788_0000_0000); // pad + low half
        assert_eq!(seed.size.get(), 0x1122_3344); // high half of the real offset
    }

    #[test]
    fn encode_op_is_header_only() {
        assert_eq!(encode_op(op::COMPLETE_FCOPY).len(), 36);
        assert_eq!(&encode_op(op::CANCEL_FCOPY)[..4], &[3, 0, 0, 0]);
        assert!(encode_op(op::CANCEL_FCOPY)[4..].iter().all(|&b| b == 0));
    }

    #[test]
    fn fcopy_parsers_reject_short_input() {
        assert_eq!(
            operation(&[0; 35]),
            Err(WireError::TooShort {
                what: "hv_fcopy_hdr",
                need: 36,
                got: 35
            })
        );
        assert!(matches!(
            parse_start(&[0; 1087]),
            Err(WireError::TooShort { need: 1088, .. })
        ));
        assert!(matches!(
            parse_write(&[0; 6195]),
            Err(WireError::TooShort { need: 6196, .. })
        ));
        assert!(parse_start(&[0; 1092]).is_ok());
    }

    #[test]
    fn to_daemon_converts_names_to_nul_terminated_utf8() {
        let msg = encode_start("résumé.txt", "/tmp/😀", OVER_WRITE, 42).unwrap();
        let mut host = parse_start(&msg).unwrap();
        host.hdr.service_id0 = [0xff; 16];
        let daemon = host.to_daemon(Overflow::Skip);
        assert_eq!(StartFcopy::utf8_name(&daemon.file_name), "résumé.txt");
        assert_eq!(StartFcopy::utf8_name(&daemon.path_name), "/tmp/😀");
        assert_eq!(daemon.copy_flags.get(), OVER_WRITE);
        assert_eq!(daemon.file_size.get(), 42);
        assert_eq!(daemon.hdr.operation.get(), op::START_FILE_COPY);
        assert_eq!(daemon.hdr.service_id0, [0; 16]);
        assert!(daemon.file_name["résumé.txt".len()..]
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn to_daemon_caps_names_at_259_bytes() {
        // 200 × "é" = 400 UTF-8 bytes; only 129 fit in 259 (258 bytes), nothing more fits.
        let msg = encode_start(&"é".repeat(200), "/", 0, 0).unwrap();
        let daemon = parse_start(&msg).unwrap().to_daemon(Overflow::Skip);
        let name = StartFcopy::utf8_name(&daemon.file_name);
        assert_eq!(name.len(), 258);
        assert_eq!(daemon.file_name[258], 0);
        // 259 ASCII units fit exactly, leaving byte 259 as the terminator.
        let msg = encode_start(&"a".repeat(259), "/", 0, 0).unwrap();
        let daemon = parse_start(&msg).unwrap().to_daemon(Overflow::Stop);
        assert_eq!(StartFcopy::utf8_name(&daemon.file_name).len(), 259);
    }
}
