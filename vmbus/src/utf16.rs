//! UTF-16 file names of the fcopy protocol, and the kernel's UTF-16 → UTF-8 conversion.
//!
//! The host sends `file_name`/`path_name` as UTF-16LE in 260-unit fields; the guest driver
//! converts them with `utf16s_to_utf8s()` (fs/nls/nls_base.c) into a 259-byte budget before
//! the daemon sees them (fcopy.md §8). That function is lenient in very particular ways (it
//! drops broken surrogates rather than failing) and its overflow rule changed in Nov 2025, so
//! [`utf16s_to_utf8s`] reproduces it rule by rule instead of using `String::from_utf16`.

use crate::WireError;

/// Units in a name field (`W_MAX_PATH`).
pub const NAME_UNITS: usize = 260;

/// What `utf16s_to_utf8s()` does with a character whose UTF-8 form does not fit the space
/// left in the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Overflow {
    /// Skip it and go on, so a later shorter character may still be appended: the original
    /// fs/nls/nls_base.c (v6.1.0, and the 2014 seed era).
    Skip,
    /// Stop converting: the Nov-2025 fix "stop filling the buffer once a character does not
    /// fit" (backported to stable; whether a given 6.1.y has it is unverified, fcopy.md §8.3).
    Stop,
}

/// A host-side name field: `s` as UTF-16, NUL-terminated and zero-filled to 260 units.
///
/// Errors when `s` needs more than 259 units (no room for the terminator) or contains NUL
/// (the guest would silently cut the name there).
pub fn encode_name(s: &str) -> Result<[u16; NAME_UNITS], WireError> {
    if s.contains('\0') {
        return Err(WireError::ContainsNul { what: "fcopy name" });
    }
    let units: Vec<u16> = s.encode_utf16().collect();
    // The last unit is reserved for the terminator.
    if units.len() > NAME_UNITS - 1 {
        return Err(WireError::TooLong {
            what: "fcopy name (UTF-16 units)",
            max: NAME_UNITS - 1,
            got: units.len(),
        });
    }
    let mut out = [0u16; NAME_UNITS];
    for (slot, unit) in out.iter_mut().zip(units) {
        *slot = unit;
    }
    Ok(out)
}

/// UTF-16 units from little-endian bytes; a trailing odd byte is ignored.
pub fn units_from_le_bytes(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
        .collect()
}

/// Little-endian bytes of UTF-16 units (inverse of [`units_from_le_bytes`]).
pub fn units_to_le_bytes(units: &[u16]) -> Vec<u8> {
    units.iter().flat_map(|u| u.to_le_bytes()).collect()
}

const SURROGATE_MASK: u32 = 0xf800;
const SURROGATE_PAIR: u32 = 0xd800;
const SURROGATE_LOW: u32 = 0x0400;
const SURROGATE_BITS: u32 = 0x03ff;
const PLANE_SIZE: u32 = 0x1_0000;

/// `utf32_to_utf8()` for a scalar value that is not a surrogate: its UTF-8 bytes, or `None`
/// when they need more than `room` bytes (the kernel returns -1 then).
fn utf8_of(u: u32, room: usize) -> Option<([u8; 4], usize)> {
    let c = char::from_u32(u)?;
    let mut buf = [0u8; 4];
    let len = c.encode_utf8(&mut buf).len();
    (len <= room).then_some((buf, len))
}

/// `utf16s_to_utf8s(units, units.len(), UTF16_LITTLE_ENDIAN, out, max_out)` of
/// fs/nls/nls_base.c, returning the bytes written (no terminator; the kernel's caller writes
/// into a zeroed field, so the result is NUL-terminated there). Rules, fcopy.md §8.3:
///
/// * a 0 unit stops; ASCII is one byte;
/// * a lone low surrogate is skipped;
/// * a high surrogate as the last unit stops;
/// * a high surrogate followed by anything but a low surrogate is skipped, and that next unit
///   is then processed normally;
/// * a valid pair becomes one 4-byte sequence;
/// * a character that does not fit the remaining `max_out` space is skipped
///   ([`Overflow::Skip`], v6.1.0) or ends the conversion ([`Overflow::Stop`], Nov-2025 fix).
pub fn utf16s_to_utf8s(units: &[u16], max_out: usize, overflow: Overflow) -> Vec<u8> {
    let mut out = Vec::with_capacity(max_out.min(units.len().saturating_mul(4)));
    let mut rest = units.iter().map(|&u| u32::from(u)).peekable();
    // `while (inlen > 0 && maxout > 0)`
    while out.len() < max_out {
        let Some(mut u) = rest.next() else { break };
        if u == 0 {
            break;
        }
        if u <= 0x7f {
            // The loop condition guarantees room for one byte.
            out.push(u as u8);
            continue;
        }
        if u & SURROGATE_MASK == SURROGATE_PAIR {
            if u & SURROGATE_LOW != 0 {
                // Lone low surrogate: "Ignore character and move on".
                continue;
            }
            // High surrogate: peek at the next unit without consuming it, because a non-low
            // unit is processed on its own in the next round.
            let Some(&next) = rest.peek() else {
                // High surrogate as the last unit: `if (inlen <= 0) break;`.
                break;
            };
            if next & SURROGATE_MASK != SURROGATE_PAIR || next & SURROGATE_LOW == 0 {
                continue;
            }
            rest.next();
            u = PLANE_SIZE + ((u & SURROGATE_BITS) << 10) + (next & SURROGATE_BITS);
        }
        match utf8_of(u, max_out - out.len()) {
            Some((bytes, len)) => out.extend_from_slice(bytes.get(..len).unwrap_or(&[])),
            None => match overflow {
                Overflow::Skip => {}
                Overflow::Stop => break,
            },
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(units: &[u16], max_out: usize) -> Vec<u8> {
        let skip = utf16s_to_utf8s(units, max_out, Overflow::Skip);
        let stop = utf16s_to_utf8s(units, max_out, Overflow::Stop);
        assert_eq!(
            skip, stop,
            "rules other than overflow must not depend on the mode"
        );
        skip
    }

    #[test]
    fn utf16_ascii_is_one_byte_each() {
        let units: Vec<u16> = "hello.txt".encode_utf16().collect();
        assert_eq!(conv(&units, 259), b"hello.txt");
    }

    #[test]
    fn utf16_zero_unit_stops() {
        assert_eq!(conv(&[0x61, 0, 0x62], 259), b"a");
        assert_eq!(conv(&[0, 0x62], 259), b"");
    }

    #[test]
    fn utf16_bmp_characters_use_2_and_3_bytes() {
        assert_eq!(conv(&[0xe9], 259), "é".as_bytes());
        assert_eq!(conv(&[0x20ac], 259), "€".as_bytes());
        assert_eq!(conv(&[0xfffd], 259), [0xef, 0xbf, 0xbd]);
    }

    #[test]
    fn utf16_lone_low_surrogate_is_skipped() {
        assert_eq!(conv(&[0x61, 0xdc00, 0x62], 259), b"ab");
        assert_eq!(conv(&[0xdfff], 259), b"");
    }

    #[test]
    fn utf16_high_surrogate_as_last_unit_stops() {
        assert_eq!(conv(&[0x61, 0xd83d], 259), b"a");
    }

    #[test]
    fn utf16_high_surrogate_then_non_low_skips_high_and_keeps_next() {
        // High + ASCII: the ASCII is processed normally.
        assert_eq!(conv(&[0xd83d, 0x62, 0x63], 259), b"bc");
        // High + high + low: the first high is dropped, the second forms a pair with the low.
        assert_eq!(conv(&[0xd83d, 0xd83d, 0xde00], 259), "😀".as_bytes());
        // High + 0: the high is skipped, then the 0 stops.
        assert_eq!(conv(&[0xd83d, 0, 0x62], 259), b"");
        // High + BMP non-ASCII.
        assert_eq!(conv(&[0xd800, 0xe9], 259), "é".as_bytes());
    }

    #[test]
    fn utf16_valid_pair_is_four_bytes() {
        let units: Vec<u16> = "a😀b".encode_utf16().collect();
        assert_eq!(units.len(), 4);
        assert_eq!(conv(&units, 259), "a😀b".as_bytes());
        assert_eq!(conv(&[0xdbff, 0xdfff], 259), [0xf4, 0x8f, 0xbf, 0xbf]);
    }

    #[test]
    fn utf16_stops_at_end_of_input_and_at_max_out() {
        let units: Vec<u16> = "abcdef".encode_utf16().collect();
        assert_eq!(conv(&units[..3], 259), b"abc");
        assert_eq!(conv(&units, 4), b"abcd");
        assert_eq!(conv(&units, 0), b"");
        assert_eq!(conv(&[], 259), b"");
    }

    #[test]
    fn utf16_overflow_skip_keeps_later_shorter_characters() {
        // 257 ASCII + "€" (3 bytes, only 2 left) + "é" (2 bytes) with a 259-byte budget.
        let mut units = vec![0x61u16; 257];
        units.push(0x20ac);
        units.push(0xe9);
        let skip = utf16s_to_utf8s(&units, 259, Overflow::Skip);
        assert_eq!(skip.len(), 259);
        assert_eq!(&skip[257..], "é".as_bytes());
    }

    #[test]
    fn utf16_overflow_stop_ends_at_first_character_that_does_not_fit() {
        let mut units = vec![0x61u16; 257];
        units.push(0x20ac);
        units.push(0xe9);
        let stop = utf16s_to_utf8s(&units, 259, Overflow::Stop);
        assert_eq!(stop, vec![0x61; 257]);
    }

    #[test]
    fn utf16_overflow_of_a_pair_consumes_both_units() {
        // "😀" needs 4 bytes, 3 are left; Skip drops the whole pair (not just the high half)
        // and goes on with "x".
        let units = [0x61, 0x61, 0xd83d, 0xde00, 0x78];
        assert_eq!(utf16s_to_utf8s(&units, 5, Overflow::Skip), b"aax");
        assert_eq!(utf16s_to_utf8s(&units, 5, Overflow::Stop), b"aa");
    }

    #[test]
    fn encode_name_is_nul_terminated_and_zero_filled() {
        let name = encode_name("a€").unwrap();
        assert_eq!(&name[..3], &[0x61, 0x20ac, 0]);
        assert!(name[2..].iter().all(|&u| u == 0));
        let max = "x".repeat(259);
        assert_eq!(encode_name(&max).unwrap()[258], 0x78);
        assert_eq!(encode_name(&max).unwrap()[259], 0);
    }

    #[test]
    fn encode_name_too_long_or_with_nul_is_an_error() {
        assert_eq!(
            encode_name(&"x".repeat(260)),
            Err(WireError::TooLong {
                what: "fcopy name (UTF-16 units)",
                max: 259,
                got: 260
            })
        );
        // 258 ASCII + one pair = 260 units.
        let pair = format!("{}😀", "x".repeat(258));
        assert!(matches!(
            encode_name(&pair),
            Err(WireError::TooLong { got: 260, .. })
        ));
        assert_eq!(
            encode_name("a\0b"),
            Err(WireError::ContainsNul { what: "fcopy name" })
        );
    }

    #[test]
    fn units_le_bytes_round_trip_and_ignore_odd_byte() {
        let units = [0x0061, 0x20ac, 0xd83d];
        let bytes = units_to_le_bytes(&units);
        assert_eq!(bytes, [0x61, 0x00, 0xac, 0x20, 0x3d, 0xd8]);
        assert_eq!(units_from_le_bytes(&bytes), units);
        assert_eq!(units_from_le_bytes(&bytes[..5]), &units[..2]);
        assert!(units_from_le_bytes(&[]).is_empty());
    }
}
