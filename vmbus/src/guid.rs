//! GUIDs as VMBus stores them, and the service class GUIDs of the util devices.
//!
//! A VMBus offer names its device class with a `guid_t` whose byte order is the Windows one
//! (`GUID_INIT` in include/linux/uuid.h): the first 32-bit group and the two 16-bit groups are
//! little-endian, the last eight bytes are stored as written. So the text
//! `34d14be3-dee4-41c8-9ae7-6b174977c192` is the bytes `e3 4b d1 34 e4 de c8 41 9a e7 ...`
//! (icmsg-vmbus.md §6). Getting this wrong makes the guest bind no driver at all, which is a
//! very quiet failure; hence the byte-level tests at the bottom.

use core::fmt;
use core::str::FromStr;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::WireError;

/// A GUID in on-wire (mixed-endian) byte order.
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(transparent)]
pub struct Guid(pub [u8; 16]);

const _: () = assert!(core::mem::size_of::<Guid>() == 16);

/// File copy (hv_fcopy), `{34d14be3-dee4-41c8-9ae7-6b174977c192}`.
pub const FCOPY: Guid = Guid::FCOPY;
/// Key-value pair exchange (hv_kvp), `{a9a0f4e7-5a45-4d96-b827-8a841e8c03e6}`.
pub const KVP: Guid = Guid::KVP;
/// Volume shadow copy / backup (hv_vss), `{35fa2e29-ea23-4236-96ae-3a6ebacba440}`.
pub const VSS: Guid = Guid::VSS;
/// Guest shutdown, `{0e0b6031-5213-4934-818b-38d90ced39db}`.
pub const SHUTDOWN: Guid = Guid::SHUTDOWN;
/// Time synchronisation, `{9527e630-d0ae-497b-adce-e80ab0175caf}`.
pub const TIMESYNC: Guid = Guid::TIMESYNC;
/// Heartbeat, `{57164f39-9115-4e78-ab55-382f3bd5422d}`.
pub const HEARTBEAT: Guid = Guid::HEARTBEAT;
/// xs_fastpath (out-of-tree patch only), `{0590b792-db64-45cc-81db-b8d70c577c9e}`.
pub const XS_FASTPATH: Guid = Guid::XS_FASTPATH;
/// The fake lguest Guest (this project's own class: lguest never was a VMBus device),
/// `{6c677565-7374-4775-a573-742067756573}`.
pub const LGUEST_GUEST: Guid = Guid::LGUEST_GUEST;

impl Guid {
    /// File copy (hv_fcopy).
    pub const FCOPY: Guid = Guid::from_fields(
        0x34d1_4be3,
        0xdee4,
        0x41c8,
        [0x9a, 0xe7, 0x6b, 0x17, 0x49, 0x77, 0xc1, 0x92],
    );
    /// Key-value pair exchange (hv_kvp).
    pub const KVP: Guid = Guid::from_fields(
        0xa9a0_f4e7,
        0x5a45,
        0x4d96,
        [0xb8, 0x27, 0x8a, 0x84, 0x1e, 0x8c, 0x03, 0xe6],
    );
    /// Volume shadow copy / backup (hv_vss).
    pub const VSS: Guid = Guid::from_fields(
        0x35fa_2e29,
        0xea23,
        0x4236,
        [0x96, 0xae, 0x3a, 0x6e, 0xba, 0xcb, 0xa4, 0x40],
    );
    /// Guest shutdown.
    pub const SHUTDOWN: Guid = Guid::from_fields(
        0x0e0b_6031,
        0x5213,
        0x4934,
        [0x81, 0x8b, 0x38, 0xd9, 0x0c, 0xed, 0x39, 0xdb],
    );
    /// Time synchronisation.
    pub const TIMESYNC: Guid = Guid::from_fields(
        0x9527_e630,
        0xd0ae,
        0x497b,
        [0xad, 0xce, 0xe8, 0x0a, 0xb0, 0x17, 0x5c, 0xaf],
    );
    /// Heartbeat.
    pub const HEARTBEAT: Guid = Guid::from_fields(
        0x5716_4f39,
        0x9115,
        0x4e78,
        [0xab, 0x55, 0x38, 0x2f, 0x3b, 0xd5, 0x42, 0x2d],
    );
    /// xs_fastpath (out-of-tree patch only).
    pub const XS_FASTPATH: Guid = Guid::from_fields(
        0x0590_b792,
        0xdb64,
        0x45cc,
        [0x81, 0xdb, 0xb8, 0xd7, 0x0c, 0x57, 0x7c, 0x9e],
    );
    /// The fake lguest Guest: "lguest Guest" in ASCII, made a version-4 GUID.
    pub const LGUEST_GUEST: Guid = Guid::from_fields(
        0x6c67_7565,
        0x7374,
        0x4775,
        [0xa5, 0x73, 0x74, 0x20, 0x67, 0x75, 0x65, 0x73],
    );

    /// The all-zero GUID.
    pub const NIL: Guid = Guid([0; 16]);

    /// Builds a GUID from its textual groups, like the kernel's `GUID_INIT(d1, d2, d3, d4...)`:
    /// `d1`, `d2`, `d3` are stored little-endian, `d4` as given.
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// The GUID's bytes in text order (`d1` big-endian, ...), i.e. the order of the hex digits.
    fn text_order(&self) -> [u8; 16] {
        let b = self.0;
        [
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
            b[14], b[15],
        ]
    }

    /// Inverse of [`Guid::text_order`].
    fn from_text_order(t: [u8; 16]) -> Guid {
        Guid([
            t[3], t[2], t[1], t[0], t[5], t[4], t[7], t[6], t[8], t[9], t[10], t[11], t[12], t[13],
            t[14], t[15],
        ])
    }

    /// The short name of the util service this class GUID belongs to (`"fcopy"`, `"kvp"`,
    /// `"vss"`, `"shutdown"`, `"timesync"`, `"heartbeat"`, `"xs_fastpath"`), if any.
    pub fn service_name(&self) -> Option<&'static str> {
        SERVICES
            .iter()
            .find(|(guid, _)| guid == self)
            .map(|&(_, name)| name)
    }

    /// The class GUID of a util service by its short name (inverse of [`Guid::service_name`]).
    pub fn from_service_name(name: &str) -> Option<Guid> {
        SERVICES
            .iter()
            .find(|(_, n)| *n == name)
            .map(|&(guid, _)| guid)
    }
}

/// Every service this project knows, with its short name.
const SERVICES: [(Guid, &str); 8] = [
    (Guid::FCOPY, "fcopy"),
    (Guid::KVP, "kvp"),
    (Guid::VSS, "vss"),
    (Guid::SHUTDOWN, "shutdown"),
    (Guid::TIMESYNC, "timesync"),
    (Guid::HEARTBEAT, "heartbeat"),
    (Guid::XS_FASTPATH, "xs_fastpath"),
    (Guid::LGUEST_GUEST, "lguest"),
];

impl fmt::Display for Guid {
    /// Canonical lowercase form, `34d14be3-dee4-41c8-9ae7-6b174977c192`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.text_order().iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

impl FromStr for Guid {
    type Err = WireError;

    /// Accepts the canonical form in either case, optionally in braces
    /// (`{34D14BE3-DEE4-41C8-9AE7-6B174977C192}`), as Windows tools print it.
    fn from_str(s: &str) -> Result<Guid, WireError> {
        let bad = || WireError::BadSyntax {
            what: "GUID",
            input: s.to_owned(),
        };
        let inner = match s.strip_prefix('{') {
            Some(rest) => rest.strip_suffix('}').ok_or_else(bad)?,
            None => s,
        };
        if inner.len() != 36 {
            return Err(bad());
        }
        let mut text = [0u8; 16];
        let mut nibbles = 0usize;
        for (i, c) in inner.bytes().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                if c != b'-' {
                    return Err(bad());
                }
                continue;
            }
            let digit = char::from(c).to_digit(16).ok_or_else(bad)?;
            let slot = text.get_mut(nibbles / 2).ok_or_else(bad)?;
            // `to_digit(16)` is < 16, so the narrowing cannot lose bits.
            *slot = (*slot << 4) | digit as u8;
            nibbles += 1;
        }
        if nibbles != 32 {
            return Err(bad());
        }
        Ok(Guid::from_text_order(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_fcopy_bytes_match_icmsg_vmbus_section_6() {
        assert_eq!(
            Guid::FCOPY.0,
            [
                0xe3, 0x4b, 0xd1, 0x34, 0xe4, 0xde, 0xc8, 0x41, 0x9a, 0xe7, 0x6b, 0x17, 0x49, 0x77,
                0xc1, 0x92
            ]
        );
    }

    #[test]
    fn guid_all_services_bytes_match_spec_table() {
        let table: [(Guid, [u8; 16]); 7] = [
            (
                KVP,
                [
                    0xe7, 0xf4, 0xa0, 0xa9, 0x45, 0x5a, 0x96, 0x4d, 0xb8, 0x27, 0x8a, 0x84, 0x1e,
                    0x8c, 0x03, 0xe6,
                ],
            ),
            (
                VSS,
                [
                    0x29, 0x2e, 0xfa, 0x35, 0x23, 0xea, 0x36, 0x42, 0x96, 0xae, 0x3a, 0x6e, 0xba,
                    0xcb, 0xa4, 0x40,
                ],
            ),
            (
                SHUTDOWN,
                [
                    0x31, 0x60, 0x0b, 0x0e, 0x13, 0x52, 0x34, 0x49, 0x81, 0x8b, 0x38, 0xd9, 0x0c,
                    0xed, 0x39, 0xdb,
                ],
            ),
            (
                TIMESYNC,
                [
                    0x30, 0xe6, 0x27, 0x95, 0xae, 0xd0, 0x7b, 0x49, 0xad, 0xce, 0xe8, 0x0a, 0xb0,
                    0x17, 0x5c, 0xaf,
                ],
            ),
            (
                HEARTBEAT,
                [
                    0x39, 0x4f, 0x16, 0x57, 0x15, 0x91, 0x78, 0x4e, 0xab, 0x55, 0x38, 0x2f, 0x3b,
                    0xd5, 0x42, 0x2d,
                ],
            ),
            (
                XS_FASTPATH,
                [
                    0x92, 0xb7, 0x90, 0x05, 0x64, 0xdb, 0xcc, 0x45, 0x81, 0xdb, 0xb8, 0xd7, 0x0c,
                    0x57, 0x7c, 0x9e,
                ],
            ),
            (
                FCOPY,
                [
                    0xe3, 0x4b, 0xd1, 0x34, 0xe4, 0xde, 0xc8, 0x41, 0x9a, 0xe7, 0x6b, 0x17, 0x49,
                    0x77, 0xc1, 0x92,
                ],
            ),
        ];
        for (guid, bytes) in table {
            assert_eq!(guid.0, bytes, "{guid}");
        }
    }

    #[test]
    fn guid_display_is_canonical_lowercase() {
        assert_eq!(
            Guid::FCOPY.to_string(),
            "34d14be3-dee4-41c8-9ae7-6b174977c192"
        );
        assert_eq!(
            Guid::XS_FASTPATH.to_string(),
            "0590b792-db64-45cc-81db-b8d70c577c9e"
        );
        assert_eq!(
            format!("{:?}", Guid::KVP),
            "Guid(a9a0f4e7-5a45-4d96-b827-8a841e8c03e6)"
        );
    }

    #[test]
    fn guid_from_str_round_trips_every_service() {
        for (guid, _) in SERVICES {
            assert_eq!(guid.to_string().parse::<Guid>(), Ok(guid));
        }
    }

    #[test]
    fn guid_from_str_accepts_braces_and_uppercase() {
        assert_eq!(
            "{34D14BE3-DEE4-41C8-9AE7-6B174977C192}".parse::<Guid>(),
            Ok(Guid::FCOPY)
        );
    }

    #[test]
    fn guid_from_str_garbage_is_bad_syntax() {
        for bad in [
            "",
            "34d14be3",
            "34d14be3-dee4-41c8-9ae7-6b174977c19",
            "34d14be3-dee4-41c8-9ae7-6b174977c1922",
            "34d14be3xdee4-41c8-9ae7-6b174977c192",
            "34d14be3-dee4-41c8-9ae7-6b174977c19g",
            "+4d14be3-dee4-41c8-9ae7-6b174977c192",
            "{34d14be3-dee4-41c8-9ae7-6b174977c192",
            "34d14be3-dee4-41c8-9ae7-6b174977c192}",
            "34d14be3-dee4-41c8-9ae7-6b174977c1é",
            "34d14be3-dee4-41c8-9ae7-6b174977c192-",
        ] {
            assert!(
                matches!(bad.parse::<Guid>(), Err(WireError::BadSyntax { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn guid_service_name_knows_every_util_service() {
        assert_eq!(Guid::FCOPY.service_name(), Some("fcopy"));
        assert_eq!(Guid::KVP.service_name(), Some("kvp"));
        assert_eq!(Guid::VSS.service_name(), Some("vss"));
        assert_eq!(Guid::SHUTDOWN.service_name(), Some("shutdown"));
        assert_eq!(Guid::TIMESYNC.service_name(), Some("timesync"));
        assert_eq!(Guid::HEARTBEAT.service_name(), Some("heartbeat"));
        assert_eq!(Guid::XS_FASTPATH.service_name(), Some("xs_fastpath"));
        assert_eq!(Guid::NIL.service_name(), None);
        assert_eq!(Guid::from_service_name("vss"), Some(Guid::VSS));
        assert_eq!(Guid::from_service_name("nope"), None);
    }
}
