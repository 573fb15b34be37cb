//! The one error type of this crate.
//!
//! Every parser here reads bytes that came from the other side of a trust boundary (a host, a
//! guest, a socket), so every way the bytes can be wrong has a variant that says *what* was
//! wrong and by how much, instead of a panic or a silent truncation.

/// What was wrong with a piece of wire data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than the structure needs.
    #[error("{what}: too short: need {need} bytes, got {got}")]
    TooShort {
        /// The structure or field being read.
        what: &'static str,
        /// Bytes (or units) needed.
        need: usize,
        /// Bytes (or units) available.
        got: usize,
    },
    /// More bytes (or units, or entries) than the structure allows.
    #[error("{what}: too long: at most {max}, got {got}")]
    TooLong {
        /// The structure or field being read or built.
        what: &'static str,
        /// The largest allowed size.
        max: usize,
        /// The size found.
        got: usize,
    },
    /// A field holds a value this format does not allow (unknown type, bad version, ...).
    #[error("{what}: bad value {value} ({value:#x})")]
    BadValue {
        /// The field.
        what: &'static str,
        /// The value found, widened to 64 bits.
        value: u64,
    },
    /// A bus HELLO that does not start with [`crate::stream::BUS_MAGIC`]: the peer does not
    /// speak the cusedev bus protocol at all.
    #[error("bad magic: not a cusedev bus HELLO")]
    BadMagic,
    /// Two lengths that must agree do not (e.g. a packet's `len8 * 8` and its frame size).
    #[error("{what}: length mismatch: header says {expected} bytes, got {got}")]
    LengthMismatch {
        /// The structure whose lengths disagree.
        what: &'static str,
        /// The length the header announces.
        expected: usize,
        /// The length actually present.
        got: usize,
    },
    /// A string that is stored NUL-terminated contains a NUL itself.
    #[error("{what}: contains a NUL character")]
    ContainsNul {
        /// The string field.
        what: &'static str,
    },
    /// Text (a GUID, a bus address) that does not have the expected form.
    #[error("{what}: cannot parse {input:?}")]
    BadSyntax {
        /// What the text should have been.
        what: &'static str,
        /// The text as given.
        input: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_error_messages_name_what_was_wrong() {
        let e = WireError::TooShort {
            what: "hv_start_fcopy",
            need: 1088,
            got: 12,
        };
        assert_eq!(
            e.to_string(),
            "hv_start_fcopy: too short: need 1088 bytes, got 12"
        );
        let e = WireError::BadValue {
            what: "bus frame kind",
            value: 9,
        };
        assert_eq!(e.to_string(), "bus frame kind: bad value 9 (0x9)");
        assert_eq!(
            WireError::BadMagic.to_string(),
            "bad magic: not a cusedev bus HELLO"
        );
    }
}
