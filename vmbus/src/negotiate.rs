//! IC version negotiation (`ICMSGTYPE_NEGOTIATE`), both sides.
//!
//! The host lists the framework and service versions it can speak; the guest picks one of
//! each and rewrites the message body in place, then echoes the buffer. The guest side here is
//! a transcription of the kernel's `vmbus_prep_negotiate_resp()` in two eras, quirks included,
//! because the reply bytes are what a host sees (icmsg-vmbus.md §4):
//!
//! * [`prep_negotiate_resp`]: drivers/hv/channel_mgmt.c as in 6.1 (version arrays, 4.x form)
//!   plus the length checks of "hv_utils: Add validation for untrusted Hyper-V values"
//!   (2020, ≈v5.11).
//! * [`prep_negotiate_resp_v3`]: the 3.x form the 2014 seed fcopy driver called with one
//!   framework and one service version, without any length check.
//!
//! Both write the body that way: counts 1/1 and the chosen versions on success; counts 0/0 on
//! failure, with entry 0 = (host framework *count*, 0) unless a framework matched and entry 1
//! = (host service *count*, 0). The count lands in the "major" field because the kernel
//! initialises its `icframe_major`/`icmsg_major` locals from the counts and writes them out
//! unchanged when nothing matched (channel_mgmt.c, 3.x through 6.1). We reproduce it on
//! purpose: a host may log those numbers.

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::ic::{msgtype, IcVersion, IcVersionLe, ICMSG_HDR_LEN};
use crate::WireError;

/// `struct icmsg_negotiate` without its flexible `icversion_data[]` array (8 bytes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C, packed)]
pub struct IcNegotiate {
    /// Number of framework versions that follow.
    pub icframe_vercnt: U16,
    /// Number of service versions after the framework versions.
    pub icmsg_vercnt: U16,
    /// Reserved.
    pub reserved: U32,
}

const _: () = assert!(core::mem::size_of::<IcNegotiate>() == 8);

/// Size of [`IcNegotiate`].
pub const NEGOTIATE_HDR_LEN: usize = 8;
/// Size of one version entry.
pub const VERSION_ENTRY_LEN: usize = 4;
/// `IC_VERSION_NEGOTIATION_MAX_VER_COUNT` (include/linux/hyperv.h, since the 2020 validation
/// patch): more host entries than this in either list make the 6.1 guest fail negotiation.
pub const MAX_VER_COUNT: u16 = 100;
/// The `icmsgsize` the guest writes into its reply (header + two entries).
pub const RESPONSE_ICMSGSIZE: u16 = 0x10;

/// Offset of `icframe_vercnt` in the whole payload.
const FRAME_COUNT_AT: usize = ICMSG_HDR_LEN;
/// Offset of `icmsg_vercnt` in the whole payload.
const MSG_COUNT_AT: usize = ICMSG_HDR_LEN + 2;
/// Offset of `icversion_data[0]` in the whole payload.
const ENTRIES_AT: usize = ICMSG_HDR_LEN + NEGOTIATE_HDR_LEN;
/// Offset of `icmsgsize` in the whole payload (pipe header 8 + offset 10 in icmsg_hdr).
const ICMSGSIZE_AT: usize = 8 + 10;

/// `UTIL_FW_VERSION`: IC framework 3.0.
pub const UTIL_FW_VERSION: IcVersion = IcVersion::new(3, 0);
/// `UTIL_WS2K8_FW_VERSION`: IC framework 1.0.
pub const UTIL_WS2K8_FW_VERSION: IcVersion = IcVersion::new(1, 0);

/// fcopy framework versions offered by the guest (6.1 hv_fcopy.c; the 2014 seed too).
pub const FCOPY_FW_VERSIONS: &[IcVersion] = &[UTIL_FW_VERSION];
/// fcopy service versions (`WIN8_SRV_VERSION` 1.1; 6.1 and the 2014 seed).
pub const FCOPY_SRV_VERSIONS: &[IcVersion] = &[IcVersion::new(1, 1)];
/// kvp framework versions (hv_kvp.c, 6.1).
pub const KVP_FW_VERSIONS: &[IcVersion] = &[UTIL_FW_VERSION, UTIL_WS2K8_FW_VERSION];
/// kvp service versions (hv_kvp.c, 6.1).
pub const KVP_SRV_VERSIONS: &[IcVersion] = &[
    IcVersion::new(4, 0),
    IcVersion::new(3, 0),
    IcVersion::new(1, 0),
];
/// vss framework versions (hv_snapshot.c, 6.1).
pub const VSS_FW_VERSIONS: &[IcVersion] = &[UTIL_FW_VERSION];
/// vss service versions (hv_snapshot.c, 6.1).
pub const VSS_SRV_VERSIONS: &[IcVersion] = &[IcVersion::new(5, 0)];
/// shutdown framework versions (hv_util.c; 6.1 identity unverified, icmsg-vmbus.md §8).
pub const SHUTDOWN_FW_VERSIONS: &[IcVersion] = &[UTIL_FW_VERSION, UTIL_WS2K8_FW_VERSION];
/// shutdown service versions (hv_util.c).
pub const SHUTDOWN_SRV_VERSIONS: &[IcVersion] = &[
    IcVersion::new(3, 2),
    IcVersion::new(3, 1),
    IcVersion::new(3, 0),
    IcVersion::new(1, 0),
];
/// timesync framework versions (hv_util.c).
pub const TIMESYNC_FW_VERSIONS: &[IcVersion] = &[UTIL_FW_VERSION, UTIL_WS2K8_FW_VERSION];
/// timesync service versions (hv_util.c).
pub const TIMESYNC_SRV_VERSIONS: &[IcVersion] = &[
    IcVersion::new(4, 0),
    IcVersion::new(3, 0),
    IcVersion::new(1, 0),
];
/// heartbeat framework versions (hv_util.c).
pub const HEARTBEAT_FW_VERSIONS: &[IcVersion] = &[UTIL_FW_VERSION, UTIL_WS2K8_FW_VERSION];
/// heartbeat service versions (hv_util.c).
pub const HEARTBEAT_SRV_VERSIONS: &[IcVersion] = &[IcVersion::new(3, 0), IcVersion::new(1, 0)];

/// A host's whole NEGOTIATE request as one VMBus inband packet (descriptor, IC header,
/// body), as a scripted host sends it. The IC header carries the first version of each list
/// (guests do not read them), 1.0 for an empty list.
pub fn build_request_packet(trans_id: u64, fw: &[IcVersion], srv: &[IcVersion]) -> Vec<u8> {
    let first = |list: &[IcVersion]| list.first().copied().unwrap_or(IcVersion::new(1, 0));
    let message = crate::ic::build_ic_message(
        msgtype::NEGOTIATE,
        first(fw),
        first(srv),
        0,
        &build_request_body(fw, srv),
    );
    crate::packet::encode_inband(trans_id, 0, &message)
}

/// The negotiate body a host sends: counts, then `fw`, then `srv`.
///
/// Never panics; lists longer than 65535 entries (which no guest would accept anyway) are cut
/// to 65535 so that the counts stay truthful.
pub fn build_request_body(fw: &[IcVersion], srv: &[IcVersion]) -> Vec<u8> {
    let fw = fw.get(..usize::from(u16::MAX)).unwrap_or(fw);
    let srv = srv.get(..usize::from(u16::MAX)).unwrap_or(srv);
    let hdr = IcNegotiate {
        icframe_vercnt: U16::new(fw.len() as u16),
        icmsg_vercnt: U16::new(srv.len() as u16),
        reserved: U32::new(0),
    };
    let mut out =
        Vec::with_capacity(NEGOTIATE_HDR_LEN + VERSION_ENTRY_LEN * (fw.len() + srv.len()));
    out.extend_from_slice(hdr.as_bytes());
    for &v in fw.iter().chain(srv) {
        out.extend_from_slice(IcVersionLe::from(v).as_bytes());
    }
    out
}

/// Reads a little-endian u16 at `at`; bytes past the end read as 0.
fn get_u16_or_zero(buf: &[u8], at: usize) -> u16 {
    let byte = |i: usize| {
        at.checked_add(i)
            .and_then(|j| buf.get(j))
            .copied()
            .unwrap_or(0)
    };
    u16::from_le_bytes([byte(0), byte(1)])
}

/// Writes a little-endian u16 at `at`, byte by byte; bytes that fall past the end are dropped.
///
/// That is exactly what the host sees of the kernel's writes: the kernel writes into its
/// (larger) receive buffer, but only `recvlen` bytes of it are echoed.
fn put_u16_clipped(buf: &mut [u8], at: usize, value: u16) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        if let Some(slot) = at.checked_add(i).and_then(|j| buf.get_mut(j)) {
            *slot = byte;
        }
    }
}

/// Host version entry `index` (counting from the first framework entry).
fn host_entry(buf: &[u8], index: usize) -> IcVersion {
    let at = ENTRIES_AT.saturating_add(index.saturating_mul(VERSION_ENTRY_LEN));
    IcVersion::new(
        get_u16_or_zero(buf, at),
        get_u16_or_zero(buf, at.saturating_add(2)),
    )
}

/// The first guest version (guest order outer, host order inner) that the host also lists in
/// entries `range`.
fn first_match(
    buf: &[u8],
    guest: &[IcVersion],
    range: core::ops::Range<usize>,
) -> Option<IcVersion> {
    // Entries from `in_buf` on lie past the end and all read as 0.0, so one of them stands
    // for all: this keeps a 3.x scan of 65535 claimed entries cheap. (The 6.1 rule has
    // validated the counts against the length before it gets here.)
    let in_buf = buf
        .len()
        .saturating_sub(ENTRIES_AT)
        .div_ceil(VERSION_ENTRY_LEN);
    let end = range.end.min(in_buf.max(range.start).saturating_add(1));
    let range = range.start..end;
    guest
        .iter()
        .copied()
        .find(|&g| range.clone().any(|j| host_entry(buf, j) == g))
}

/// Writes the response body: counts, entry 0, entry 1 (see the module docs for the quirk).
fn write_response(buf: &mut [u8], success: bool, entry0: IcVersion, entry1: IcVersion) {
    let count = u16::from(success);
    put_u16_clipped(buf, FRAME_COUNT_AT, count);
    put_u16_clipped(buf, MSG_COUNT_AT, count);
    put_u16_clipped(buf, ENTRIES_AT, entry0.major);
    put_u16_clipped(buf, ENTRIES_AT + 2, entry0.minor);
    put_u16_clipped(buf, ENTRIES_AT + 4, entry1.major);
    put_u16_clipped(buf, ENTRIES_AT + 6, entry1.minor);
}

/// The 6.1 guest's negotiate answer, in place (icmsg-vmbus.md §4.1).
///
/// `payload` is the whole received payload (pipe + IC header + body, length = `recvlen`);
/// `fw_list`/`srv_list` are the guest's versions, preferred first. Returns the chosen
/// (framework, service) versions, or `None` when negotiation failed; either way the caller
/// sets icflags 0x05 ([`crate::ic::set_response_flags`]) and echoes the buffer.
///
/// Mirrors `vmbus_prep_negotiate_resp()` (drivers/hv/channel_mgmt.c, 6.1):
/// 1. `recvlen < 28 + 4` → `None`, nothing touched;
/// 2. `icmsgsize := 0x10`;
/// 3. a count > 100, or `28 + 8 + 4 × (sum of counts) > recvlen` → failure;
/// 4. framework: guest order outer, host entries inner, first exact match; none → failure
///    without looking at services;
/// 5. service: the same over the host's service entries;
/// 6. body written as described in the module docs. `status` is never touched.
pub fn prep_negotiate_resp(
    payload: &mut [u8],
    fw_list: &[IcVersion],
    srv_list: &[IcVersion],
) -> Option<(IcVersion, IcVersion)> {
    // VALID-2020: "Check that there's enough space for icframe_vercnt, icmsg_vercnt":
    // buflen < ICMSG_HDR + offsetof(struct icmsg_negotiate, reserved).
    if payload.len() < ICMSG_HDR_LEN + 4 {
        return None;
    }
    put_u16_clipped(payload, ICMSGSIZE_AT, RESPONSE_ICMSGSIZE);
    let host_fw_count = get_u16_or_zero(payload, FRAME_COUNT_AT);
    let host_srv_count = get_u16_or_zero(payload, MSG_COUNT_AT);

    // VALID-2020: ICMSG_NEGOTIATE_PKT_SIZE(fw, srv) = 28 + 8 + 4 * (fw + srv) > buflen.
    let needed =
        ENTRIES_AT + VERSION_ENTRY_LEN * (usize::from(host_fw_count) + usize::from(host_srv_count));
    if host_fw_count > MAX_VER_COUNT || host_srv_count > MAX_VER_COUNT || needed > payload.len() {
        write_response(
            payload,
            false,
            IcVersion::new(host_fw_count, 0),
            IcVersion::new(host_srv_count, 0),
        );
        return None;
    }
    choose_and_respond(payload, fw_list, srv_list, host_fw_count, host_srv_count)
}

/// Steps 4–6, the same in every era: the guest's framework list against the host's
/// framework entries, then its service list against the host's service entries (guest order
/// outer, host order inner, first exact match), and the answer written in place.
fn choose_and_respond(
    payload: &mut [u8],
    fw_list: &[IcVersion],
    srv_list: &[IcVersion],
    host_fw_count: u16,
    host_srv_count: u16,
) -> Option<(IcVersion, IcVersion)> {
    let fw_count = usize::from(host_fw_count);
    let srv_count = usize::from(host_srv_count);
    // The kernel's failure values, (count, 0) in each entry: channel_mgmt.c (6.1) starts with
    // `icframe_major = negop->icframe_vercnt; icframe_minor = 0;` (same for icmsg) and writes
    // those locals into icversion_data[0]/[1] at `fw_error:` when nothing replaced them.
    let fail_fw = IcVersion::new(host_fw_count, 0);
    let fail_srv = IcVersion::new(host_srv_count, 0);
    let Some(fw) = first_match(payload, fw_list, 0..fw_count) else {
        write_response(payload, false, fail_fw, fail_srv);
        return None;
    };
    let Some(srv) = first_match(payload, srv_list, fw_count..fw_count + srv_count) else {
        // A framework matched, so entry 0 carries it even though the answer is "no".
        write_response(payload, false, fw, fail_srv);
        return None;
    };
    write_response(payload, true, fw, srv);
    Some((fw, srv))
}

/// The 3.x guest's negotiate answer, in place (icmsg-vmbus.md §4.2), as the 2014 seed fcopy
/// driver gets it from `vmbus_prep_negotiate_resp(hdr, negop, buf, UTIL_FW_VERSION,
/// WIN8_SRV_VERSION)` (drivers/hv/channel_mgmt.c, 3.x).
///
/// The 3.x function took one framework and one service version; with longer lists this tries
/// them in order, which for exact matches gives the same answer as its "scan all host entries,
/// remember a match" loop. It checks no length at all: the kernel would read host entries
/// past `recvlen` from stale receive-buffer memory. We cannot reproduce stale memory, so bytes
/// past the end of `payload` read as zero (and writes past it are dropped, as they would be
/// invisible in the echoed reply anyway). Host counts are not capped either, as in 3.x.
pub fn prep_negotiate_resp_v3(
    payload: &mut [u8],
    fw_list: &[IcVersion],
    srv_list: &[IcVersion],
) -> Option<(IcVersion, IcVersion)> {
    put_u16_clipped(payload, ICMSGSIZE_AT, RESPONSE_ICMSGSIZE);
    let host_fw_count = get_u16_or_zero(payload, FRAME_COUNT_AT);
    let host_srv_count = get_u16_or_zero(payload, MSG_COUNT_AT);
    choose_and_respond(payload, fw_list, srv_list, host_fw_count, host_srv_count)
}

/// Host side: reads the guest's negotiate reply (whole payload: pipe + IC header + body).
///
/// `Ok(Some((fw, srv)))` when the guest answered counts 1/1, `Ok(None)` when it answered
/// 0/0 (negotiation failed). Errors: not a NEGOTIATE message, too short, or other counts.
pub fn parse_response(payload: &[u8]) -> Result<Option<(IcVersion, IcVersion)>, WireError> {
    let hdr = crate::ic::ic_header(payload)?;
    if hdr.icmsgtype.get() != msgtype::NEGOTIATE {
        return Err(WireError::BadValue {
            what: "negotiate response icmsgtype",
            value: hdr.icmsgtype.get().into(),
        });
    }
    let body = payload.get(ICMSG_HDR_LEN..).unwrap_or(&[]);
    let (neg, entries) = IcNegotiate::read_from_prefix(body).map_err(|_| WireError::TooShort {
        what: "icmsg_negotiate response",
        need: ENTRIES_AT,
        got: payload.len(),
    })?;
    match (neg.icframe_vercnt.get(), neg.icmsg_vercnt.get()) {
        (0, 0) => Ok(None),
        (1, 1) => {
            let (pair, _) =
                <[IcVersionLe; 2]>::read_from_prefix(entries).map_err(|_| WireError::TooShort {
                    what: "icmsg_negotiate response entries",
                    need: ENTRIES_AT + 2 * VERSION_ENTRY_LEN,
                    got: payload.len(),
                })?;
            Ok(Some((pair[0].into(), pair[1].into())))
        }
        (fw, srv) => Err(WireError::BadValue {
            what: "negotiate response counts (icframe_vercnt << 16 | icmsg_vercnt)",
            value: u64::from(fw) << 16 | u64::from(srv),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ic::{build_ic_message, ic_header, set_response_flags};
    use core::mem::offset_of;

    fn v(major: u16, minor: u16) -> IcVersion {
        IcVersion::new(major, minor)
    }

    /// A host negotiate request as a received payload: padded to 8 like `recvlen`.
    fn request(fw: &[IcVersion], srv: &[IcVersion]) -> Vec<u8> {
        let mut msg = build_ic_message(
            msgtype::NEGOTIATE,
            v(3, 0),
            v(1, 1),
            0,
            &build_request_body(fw, srv),
        );
        msg.resize(msg.len().div_ceil(8) * 8, 0);
        msg
    }

    fn body_words(payload: &[u8]) -> Vec<u16> {
        payload[28..44]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    }

    #[test]
    fn negotiate_header_offsets_match_spec() {
        assert_eq!(core::mem::size_of::<IcNegotiate>(), 8);
        assert_eq!(offset_of!(IcNegotiate, icframe_vercnt), 0);
        assert_eq!(offset_of!(IcNegotiate, icmsg_vercnt), 2);
        assert_eq!(offset_of!(IcNegotiate, reserved), 4);
    }

    #[test]
    fn build_request_body_lists_fw_then_srv() {
        let body = build_request_body(&[v(3, 0), v(1, 0)], &[v(1, 1)]);
        assert_eq!(
            body,
            [2, 0, 1, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0]
        );
    }

    #[test]
    fn fcopy_host_offers_fw_3_0_and_1_0_srv_1_1_picks_3_0_and_1_1() {
        let mut payload = request(&[v(3, 0), v(1, 0)], &[v(1, 1)]);
        let len = payload.len();
        let chosen = prep_negotiate_resp(&mut payload, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS);
        assert_eq!(chosen, Some((v(3, 0), v(1, 1))));
        assert_eq!(payload.len(), len);
        assert_eq!(ic_header(&payload).unwrap().icmsgsize.get(), 0x10);
        assert_eq!(body_words(&payload), [1, 1, 0, 0, 3, 0, 1, 1]);
        assert_eq!(parse_response(&payload), Ok(Some((v(3, 0), v(1, 1)))));
    }

    #[test]
    fn negotiate_prefers_guest_order_over_host_order() {
        // Host lists 1.0 first; the kvp guest prefers 3.0 and finds it later in the list.
        let mut payload = request(&[v(1, 0), v(3, 0)], &[v(1, 0), v(3, 0), v(4, 0)]);
        let chosen = prep_negotiate_resp(&mut payload, KVP_FW_VERSIONS, KVP_SRV_VERSIONS);
        assert_eq!(chosen, Some((v(3, 0), v(4, 0))));
        assert_eq!(body_words(&payload), [1, 1, 0, 0, 3, 0, 4, 0]);
    }

    #[test]
    fn negotiate_service_versions_are_not_matched_against_framework_entries() {
        // 1.1 appears only in the host's framework list: no service match.
        let mut payload = request(&[v(3, 0), v(1, 1)], &[v(9, 9)]);
        assert_eq!(
            prep_negotiate_resp(&mut payload, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS),
            None
        );
    }

    #[test]
    fn negotiate_no_matching_service_writes_zero_counts_and_count_quirk() {
        let mut payload = request(&[v(3, 0), v(1, 0)], &[v(2, 0), v(1, 0), v(7, 7)]);
        let chosen = prep_negotiate_resp(&mut payload, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS);
        assert_eq!(chosen, None);
        assert_eq!(ic_header(&payload).unwrap().icmsgsize.get(), 0x10);
        // counts 0/0; entry 0 = the matched framework 3.0; entry 1 = (host srv count 3, 0).
        assert_eq!(body_words(&payload), [0, 0, 0, 0, 3, 0, 3, 0]);
        assert_eq!(parse_response(&payload), Ok(None));
    }

    #[test]
    fn negotiate_no_matching_framework_writes_both_host_counts() {
        let mut payload = request(&[v(2, 0), v(1, 0)], &[v(1, 1), v(1, 0), v(0, 9), v(5, 5)]);
        let chosen = prep_negotiate_resp(&mut payload, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS);
        assert_eq!(chosen, None);
        // entry 0 = (host fw count 2, 0), entry 1 = (host srv count 4, 0).
        assert_eq!(body_words(&payload), [0, 0, 0, 0, 2, 0, 4, 0]);
    }

    #[test]
    fn negotiate_leaves_status_and_flags_for_the_caller() {
        let mut payload = request(&[v(3, 0)], &[v(1, 1)]);
        payload[20] = 0x99; // whatever status the host sent
        let before = payload.clone();
        prep_negotiate_resp(&mut payload, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS).unwrap();
        assert_eq!(payload[8..18], before[8..18]);
        assert_eq!(payload[20..28], before[20..28]);
        assert_eq!(payload[0..8], before[0..8]);
        set_response_flags(&mut payload).unwrap();
        assert_eq!(payload[20], 0x99);
        assert_eq!(payload[25], 0x05);
    }

    #[test]
    fn negotiate_too_short_payload_returns_none_untouched() {
        for len in [0, 1, 27, 28, 31] {
            let full = request(&[v(3, 0)], &[v(1, 1)]);
            let mut payload = full[..len].to_vec();
            let before = payload.clone();
            assert_eq!(
                prep_negotiate_resp(&mut payload, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS),
                None
            );
            assert_eq!(payload, before);
        }
    }

    #[test]
    fn negotiate_counts_over_100_fail_even_if_listed() {
        let fw: Vec<IcVersion> = (0..101).map(|_| v(3, 0)).collect();
        let mut payload = request(&fw, &[v(1, 1)]);
        assert_eq!(
            prep_negotiate_resp(&mut payload, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS),
            None
        );
        assert_eq!(body_words(&payload), [0, 0, 0, 0, 101, 0, 1, 0]);

        let srv: Vec<IcVersion> = (0..101).map(|_| v(1, 1)).collect();
        let mut payload = request(&[v(3, 0)], &srv);
        assert_eq!(
            prep_negotiate_resp(&mut payload, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS),
            None
        );
        assert_eq!(body_words(&payload), [0, 0, 0, 0, 1, 0, 101, 0]);

        // Exactly 100 is allowed.
        let fw: Vec<IcVersion> = (0..100).map(|_| v(3, 0)).collect();
        let mut payload = request(&fw, &[v(1, 1)]);
        assert!(prep_negotiate_resp(&mut payload, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS).is_some());
    }

    #[test]
    fn negotiate_counts_exceeding_buffer_fail() {
        let mut payload = request(&[v(3, 0)], &[v(1, 1)]); // 28 + 8 + 8 = 44 -> 48
                                                           // Claim 4 service entries: 28 + 8 + 4 * 5 = 56 > 48.
        payload[30] = 4;
        assert_eq!(
            prep_negotiate_resp(&mut payload, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS),
            None
        );
        assert_eq!(body_words(&payload), [0, 0, 0, 0, 1, 0, 4, 0]);
        // Claim 3: 28 + 8 + 16 = 52 > 48, still too long.
        let mut payload = request(&[v(3, 0)], &[v(1, 1)]);
        payload[30] = 3;
        assert_eq!(
            prep_negotiate_resp(&mut payload, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS),
            None
        );
        // Claim 2: 28 + 8 + 12 = 48 fits (the padding counts as an entry of 0.0).
        let mut payload = request(&[v(3, 0)], &[v(1, 1)]);
        payload[30] = 2;
        assert!(prep_negotiate_resp(&mut payload, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS).is_some());
    }

    #[test]
    fn negotiate_short_body_writes_only_what_fits() {
        // 32 bytes: counts readable (0, 0) -> failure; icmsgsize set; body writes clipped.
        let mut payload = request(&[], &[])[..32].to_vec();
        assert_eq!(
            prep_negotiate_resp(&mut payload, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS),
            None
        );
        assert_eq!(payload.len(), 32);
        assert_eq!(ic_header(&payload).unwrap().icmsgsize.get(), 0x10);
        assert_eq!(&payload[28..32], &[0, 0, 0, 0]);
    }

    #[test]
    fn negotiate_v3_picks_single_versions_without_length_checks() {
        let fw: Vec<IcVersion> = (0..150).map(|i| v(i, 0)).collect(); // > 100: 3.x does not care
        let mut payload = request(&fw, &[v(1, 0), v(1, 1)]);
        let chosen = prep_negotiate_resp_v3(&mut payload, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS);
        assert_eq!(chosen, Some((v(3, 0), v(1, 1))));
        assert_eq!(body_words(&payload), [1, 1, 0, 0, 3, 0, 1, 1]);
        assert_eq!(ic_header(&payload).unwrap().icmsgsize.get(), 0x10);
    }

    #[test]
    fn negotiate_v3_failure_uses_same_count_quirk() {
        let mut payload = request(&[v(1, 0)], &[v(1, 1), v(1, 0)]);
        assert_eq!(
            prep_negotiate_resp_v3(&mut payload, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS),
            None
        );
        assert_eq!(body_words(&payload), [0, 0, 0, 0, 1, 0, 2, 0]);
    }

    #[test]
    fn negotiate_v3_counts_past_buffer_read_zero_and_never_panic() {
        let mut payload = request(&[v(3, 0)], &[v(1, 1)]);
        payload[28] = 0xff;
        payload[29] = 0xff; // 65535 framework entries claimed in a 48-byte buffer
        let chosen = prep_negotiate_resp_v3(&mut payload, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS);
        // Framework 3.0 is entry 0, but the service entries are "past the end" -> zeros.
        assert_eq!(chosen, None);
        assert_eq!(body_words(&payload), [0, 0, 0, 0, 3, 0, 1, 0]);
        for len in [0, 5, 19, 20, 27, 31] {
            let mut short = request(&[v(3, 0)], &[v(1, 1)])[..len].to_vec();
            assert_eq!(
                prep_negotiate_resp_v3(&mut short, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS),
                None
            );
        }
    }

    #[test]
    fn negotiate_garbage_never_panics() {
        let mut state = 0xdead_beefu32;
        for len in 0..200 {
            let mut bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (state >> 16) as u8
                })
                .collect();
            let mut copy = bytes.clone();
            let _ = prep_negotiate_resp(&mut bytes, KVP_FW_VERSIONS, KVP_SRV_VERSIONS);
            let _ = prep_negotiate_resp_v3(&mut copy, KVP_FW_VERSIONS, KVP_SRV_VERSIONS);
            let _ = parse_response(&bytes);
        }
    }

    #[test]
    fn parse_response_rejects_short_wrong_type_and_odd_counts() {
        let mut ok = request(&[v(3, 0)], &[v(1, 1)]);
        prep_negotiate_resp(&mut ok, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS).unwrap();
        assert!(matches!(
            parse_response(&ok[..27]),
            Err(WireError::TooShort { need: 28, .. })
        ));
        assert!(matches!(
            parse_response(&ok[..35]),
            Err(WireError::TooShort { need: 36, .. })
        ));
        assert!(matches!(
            parse_response(&ok[..43]),
            Err(WireError::TooShort { need: 44, .. })
        ));
        let mut wrong_type = ok.clone();
        wrong_type[12] = msgtype::FCOPY as u8;
        assert!(matches!(
            parse_response(&wrong_type),
            Err(WireError::BadValue { value: 7, .. })
        ));
        let mut odd = ok.clone();
        odd[28] = 2;
        assert!(matches!(
            parse_response(&odd),
            Err(WireError::BadValue { .. })
        ));
        // A failure reply needs no entries.
        let mut failed = request(&[v(9, 0)], &[v(1, 1)]);
        prep_negotiate_resp(&mut failed, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS);
        assert_eq!(parse_response(&failed[..36]), Ok(None));
    }

    #[test]
    fn guest_version_tables_match_icmsg_vmbus_4_3() {
        assert_eq!(FCOPY_FW_VERSIONS, [v(3, 0)]);
        assert_eq!(FCOPY_SRV_VERSIONS, [v(1, 1)]);
        assert_eq!(KVP_FW_VERSIONS, [v(3, 0), v(1, 0)]);
        assert_eq!(KVP_SRV_VERSIONS, [v(4, 0), v(3, 0), v(1, 0)]);
        assert_eq!(VSS_FW_VERSIONS, [v(3, 0)]);
        assert_eq!(VSS_SRV_VERSIONS, [v(5, 0)]);
        assert_eq!(SHUTDOWN_SRV_VERSIONS, [v(3, 2), v(3, 1), v(3, 0), v(1, 0)]);
        assert_eq!(TIMESYNC_SRV_VERSIONS, [v(4, 0), v(3, 0), v(1, 0)]);
        assert_eq!(HEARTBEAT_SRV_VERSIONS, [v(3, 0), v(1, 0)]);
        assert_eq!(UTIL_FW_VERSION.to_u32(), 0x0003_0000);
        assert_eq!(FCOPY_SRV_VERSIONS[0].to_u32(), 0x0001_0001);
    }

    #[test]
    fn request_packet_is_an_inband_negotiate_with_both_lists() {
        let bytes = build_request_packet(7, FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS);
        let packet = crate::packet::parse_packet(&bytes).unwrap();
        assert_eq!(packet.trans_id, 7);
        let header = crate::ic::ic_header(packet.payload).unwrap();
        assert_eq!(header.icmsgtype.get(), msgtype::NEGOTIATE);
        let body = &packet.payload[ICMSG_HDR_LEN..];
        assert_eq!(
            &body[..build_request_body(FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS).len()],
            build_request_body(FCOPY_FW_VERSIONS, FCOPY_SRV_VERSIONS).as_slice()
        );
        // Empty lists still make a packet (a guest answers it with zero counts).
        assert!(crate::packet::parse_packet(&build_request_packet(1, &[], &[])).is_ok());
    }
}
