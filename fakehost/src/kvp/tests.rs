//! The KVP service against a fake guest: the 6.1 hv_kvp driver and hv_kvp_daemon in a few
//! dozen lines. The host end of a `UnixStream::pair()` is the service's real `ChannelLink`;
//! a thread reads what the host sends on the other end and answers through
//! `HostService::packet`, as the bus reader would.
//!
//! The guest reads the host's requests at the byte offsets of kvp-vss.md §1.1 (not through
//! `vmbus::kvp`), so these tests also check the encoders against the spec. Like the 6.1 driver
//! it leaves NEGOTIATE unanswered until its daemon registers (§3.4) and answers HV_E_FAIL to
//! requests while no daemon is there (§3.3); its answers follow §3.5 (echo the host's buffer,
//! status in the IC header, GET/ENUMERATE values converted to UTF-16 in place).

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmbus::ic::{self, msgtype, status};
use vmbus::kvp::op;
use vmbus::negotiate::{prep_negotiate_resp, KVP_FW_VERSIONS, KVP_SRV_VERSIONS};
use vmbus::packet::{encode_inband, parse_packet};

use super::report::{Family, KvpReport};
use super::KvpHost;
use crate::bus::frames::read_frame;
use crate::bus::{ChannelLink, PeerCred};
use crate::service::{CommandContext, CommandError, HostService};
use crate::test_support::{NullProgress, TempDir};
use crate::vss::peer::ProcRoot;

const LINK: u64 = 7;
/// Generous: every answer here is immediate, this only turns a hang into a failure.
const PATIENT: Duration = Duration::from_secs(10);
/// For tests that wait for a timeout on purpose.
const SHORT: Duration = Duration::from_millis(300);
/// Where the host's KVP message starts in a payload.
const B: usize = ic::ICMSG_HDR_LEN;

/// What the guest's daemon keeps and how the guest behaves.
#[derive(Default)]
struct Daemon {
    /// hv_kvp_daemon has registered (the driver is READY).
    registered: bool,
    /// Requests are read but never answered.
    silent: bool,
    /// Answer the next request with this mangling.
    mangle: Option<Mangle>,
    /// (operation, n, status): after n more requests of the operation, answer every further
    /// one with the status instead.
    fail: Option<(u8, usize, u32)>,
    pools: [Vec<(String, String)>; 5],
    /// MAC → (ip, subnet, gateway, dns, dhcp).
    adapters: Vec<(String, [&'static str; 4], u8)>,
    /// Every request the daemon got: (op, pool, key or adapter).
    seen: Vec<(u8, u8, String)>,
    /// Requests that did not look as the spec says a host request looks.
    problems: Vec<String>,
    /// Requests read and dropped while silent: (trans_id, payload).
    dropped: Vec<(u64, Vec<u8>)>,
}

/// Ways to break an answer.
#[derive(Debug, Clone, Copy)]
enum Mangle {
    /// Cut the payload to this many bytes.
    Truncate(usize),
    /// Another icmsgtype.
    MsgType(u16),
    /// Another operation in the body.
    Op(u8),
    /// No RESPONSE flag.
    NotResponse,
    /// Another transaction id.
    TransId(u64),
}

/// The daemon's pool 2, made up on ENUMERATE (kvp-vss.md §4.7).
const AUTO: [(&str, &str); 10] = [
    ("FullyQualifiedDomainName", "guest.example.org"),
    ("IntegrationServicesVersion", "3.1"),
    ("NetworkAddressIPv4", "10.0.0.4"),
    ("NetworkAddressIPv6", "fe80::215:5dff:fe00:401"),
    ("OSBuildNumber", "6.1.0-31-amd64"),
    ("OSName", "Debian GNU/Linux"),
    ("OSMajorVersion", "6"),
    ("OSMinorVersion", "1"),
    ("OSVersion", "6.1.0-31-amd64"),
    ("ProcessorArchitecture", "x86_64"),
];

/// A NEGOTIATE the driver holds: (trans_id, payload).
type Held = Mutex<Option<(u64, Vec<u8>)>>;

struct Guest {
    host: Arc<KvpHost>,
    daemon: Arc<Mutex<Daemon>>,
    /// NEGOTIATE, held until the daemon registers: (trans_id, payload).
    held: Arc<Held>,
    host_end: Arc<UnixStream>,
    reader: Option<JoinHandle<()>>,
    _dirs: Vec<TempDir>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.host_end.shutdown(std::net::Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn test_items() -> Vec<(String, String)> {
    super::host_items::items("testhost", "testhost.example.org", "VM-ID", "test-vm")
}

impl Guest {
    fn new(step_timeout: Duration) -> Guest {
        Guest::with_host(KvpHost::new(step_timeout, test_items()), Vec::new(), None)
    }

    /// A guest whose link claims to come from `peer`.
    fn with_host(host: KvpHost, dirs: Vec<TempDir>, peer: Option<PeerCred>) -> Guest {
        let _ = env_logger::builder().is_test(true).try_init();
        let host = Arc::new(host);
        let (ours, host_end) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let host_end = Arc::new(host_end);
        let mut link = ChannelLink::new(LINK, 1, Arc::clone(&host_end));
        if peer.is_some() {
            link.peer = peer;
        }
        let daemon = Arc::new(Mutex::new(Daemon::default()));
        let held = Arc::new(Mutex::new(None));
        let reader = {
            let (host, daemon, held) = (Arc::clone(&host), Arc::clone(&daemon), Arc::clone(&held));
            std::thread::spawn(move || serve(&ours, &host, &daemon, &held))
        };
        host.attached(link);
        // The driver holds NEGOTIATE until its daemon registers: wait until it does, so that
        // `register` answers it, synchronously.
        let deadline = Instant::now() + PATIENT;
        while lock(&held).is_none() {
            assert!(Instant::now() < deadline, "no NEGOTIATE from the host");
            std::thread::sleep(Duration::from_millis(1));
        }
        Guest {
            host,
            daemon,
            held,
            host_end,
            reader: Some(reader),
            _dirs: dirs,
        }
    }

    fn daemon(&self) -> MutexGuard<'_, Daemon> {
        lock(&self.daemon)
    }

    /// hv_kvp_daemon registers: the driver becomes READY and answers the held NEGOTIATE.
    fn register(&self) {
        self.daemon().registered = true;
        let held = lock(&self.held).take();
        if let Some((trans_id, payload)) = held {
            answer_negotiate(&self.host, trans_id, payload);
        }
    }

    /// Registers, then waits until the pool-3 push is over.
    fn ready(&self) -> &Guest {
        self.register();
        self.wait_push();
        self
    }

    fn wait_push(&self) {
        let deadline = Instant::now() + PATIENT;
        while !matches!(
            self.host.kvp_status().host_items.state.as_str(),
            "done" | "failed"
        ) {
            assert!(Instant::now() < deadline, "{:?}", self.host.kvp_status());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the guest has read `n` requests it was told not to answer.
    fn wait_dropped(&self, n: usize) {
        let deadline = Instant::now() + PATIENT;
        while self.daemon().dropped.len() < n {
            assert!(Instant::now() < deadline, "no request arrived");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn summary(&self) -> String {
        self.host.status().summary
    }
}

fn reply(host: &KvpHost, trans_id: u64, payload: &[u8]) {
    host.packet(
        LINK,
        &parse_packet(&encode_inband(trans_id, 0, payload)).unwrap(),
    );
}

fn answer_negotiate(host: &KvpHost, trans_id: u64, mut payload: Vec<u8>) {
    prep_negotiate_resp(&mut payload, KVP_FW_VERSIONS, KVP_SRV_VERSIONS);
    ic::set_response_flags(&mut payload).unwrap();
    reply(host, trans_id, &payload);
}

/// The guest end: reads the host's packets until the stream ends.
fn serve(stream: &UnixStream, host: &KvpHost, daemon: &Mutex<Daemon>, held: &Held) {
    while let Ok(Some(frame)) = read_frame(stream) {
        let Ok(packet) = parse_packet(&frame.body) else {
            lock(daemon).problems.push("an unparsable packet".into());
            continue;
        };
        let trans_id = packet.trans_id;
        let mut payload = packet.payload.to_vec();
        let Ok(hdr) = ic::ic_header(&payload) else {
            lock(daemon)
                .problems
                .push("a packet without IC headers".into());
            continue;
        };
        match hdr.icmsgtype.get() {
            msgtype::NEGOTIATE => {
                if lock(daemon).registered {
                    answer_negotiate(host, trans_id, payload);
                } else {
                    // §3.4: the driver does not read its ring before a daemon registered.
                    *lock(held) = Some((trans_id, payload));
                }
            }
            msgtype::KVPEXCHANGE => {
                let mut d = lock(daemon);
                if !d.registered {
                    drop(d);
                    ic::set_reply(&mut payload, status::HV_E_FAIL).unwrap();
                    reply(host, trans_id, &payload);
                    continue;
                }
                if d.silent {
                    d.dropped.push((trans_id, payload));
                    continue;
                }
                let code = daemon_op(&mut d, &mut payload);
                let mangle = d.mangle.take();
                drop(d);
                ic::set_reply(&mut payload, code).unwrap();
                let mut trans_id = trans_id;
                match mangle {
                    None => {}
                    Some(Mangle::Truncate(n)) => payload.truncate(n),
                    Some(Mangle::MsgType(t)) => {
                        payload[12..14].copy_from_slice(&t.to_le_bytes());
                    }
                    Some(Mangle::Op(o)) => payload[B] = o,
                    Some(Mangle::NotResponse) => payload[25] = ic::icflags::TRANSACTION,
                    Some(Mangle::TransId(t)) => trans_id = t,
                }
                reply(host, trans_id, &payload);
            }
            other => lock(daemon)
                .problems
                .push(format!("a packet of icmsgtype {other}")),
        }
    }
}

fn get_u32(p: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(p[at..at + 4].try_into().unwrap())
}

fn put_u32(p: &mut [u8], at: usize, v: u32) {
    p[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// A UTF-16LE field of `field` bytes at `at`, `size` bytes in use (NUL included).
fn get_utf16(p: &[u8], at: usize, field: usize, size: u32) -> String {
    let units: Vec<u16> = p[at..at + field]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take((size as usize / 2).min(field / 2))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// Writes `s` as the driver does (at most `max_units`), zero-filling `field` bytes; returns
/// the size 2 × (units + 1).
fn put_utf16(p: &mut [u8], at: usize, field: usize, s: &str, max_units: usize) -> u32 {
    p[at..at + field].fill(0);
    let units: Vec<u16> = s.encode_utf16().take(max_units).collect();
    for (i, u) in units.iter().enumerate() {
        p[at + 2 * i..at + 2 * i + 2].copy_from_slice(&u.to_le_bytes());
    }
    2 * (units.len() as u32 + 1)
}

/// The driver's conversion and the daemon's work, answering in place (§3.3-§3.5, §4.7).
fn daemon_op(d: &mut Daemon, p: &mut [u8]) -> u32 {
    let (operation, pool) = (p[B], p[B + 1]);
    let need = match operation {
        op::GET_IP_INFO | op::SET_IP_INFO => vmbus::kvp::IP_MSG_LEN,
        _ => vmbus::kvp::MSG_LEN,
    };
    if p.len() < B + need {
        d.problems.push(format!(
            "op {operation}: {} bytes of payload, {} needed",
            p.len(),
            B + need
        ));
        return status::HV_E_FAIL;
    }
    if let Some((o, n, code)) = d.fail.as_mut() {
        if *o == operation {
            if *n == 0 {
                let code = *code;
                d.seen.push((operation, pool, String::new()));
                return code;
            }
            *n -= 1;
        }
    }
    let slot = usize::from(pool);
    match operation {
        op::GET => {
            let key = get_utf16(p, B + 16, 512, get_u32(p, B + 8));
            d.seen.push((operation, pool, key.clone()));
            if !d.pools[slot].iter().any(|(k, _)| *k == key) {
                return status::HV_S_CONT;
            }
            // What a Linux 6.1 guest answers (tests/tests/kvp_daemon.rs shows it with the real
            // daemon): the driver forwards no value size, the daemon copies nothing, and the
            // host gets an empty REG_SZ.
            let size = put_utf16(p, B + 528, 2048, "", 1022);
            put_u32(p, B + 12, size);
            put_u32(p, B + 4, vmbus::kvp::REG_SZ);
            status::HV_S_OK
        }
        op::SET => {
            let key = get_utf16(p, B + 16, 512, get_u32(p, B + 8));
            let value = match get_u32(p, B + 4) {
                vmbus::kvp::REG_SZ => get_utf16(p, B + 528, 2048, get_u32(p, B + 12)),
                vmbus::kvp::REG_U32 => get_u32(p, B + 528).to_string(),
                vmbus::kvp::REG_U64 => {
                    u64::from_le_bytes(p[B + 528..B + 536].try_into().unwrap()).to_string()
                }
                other => {
                    d.problems.push(format!("SET with value_type {other}"));
                    return status::HV_E_FAIL;
                }
            };
            d.seen.push((operation, pool, key.clone()));
            let records = &mut d.pools[slot];
            match records.iter_mut().find(|(k, _)| *k == key) {
                Some(record) => record.1 = value,
                None => records.push((key, value)),
            }
            status::HV_S_OK
        }
        op::DELETE => {
            let key = get_utf16(p, B + 8, 512, get_u32(p, B + 4));
            d.seen.push((operation, pool, key.clone()));
            let records = &mut d.pools[slot];
            match records.iter().position(|(k, _)| *k == key) {
                Some(i) => {
                    records.remove(i);
                    status::HV_S_OK
                }
                None => status::HV_S_CONT,
            }
        }
        op::ENUMERATE => {
            let index = get_u32(p, B + 4) as usize;
            d.seen.push((operation, pool, index.to_string()));
            let record = if pool == vmbus::kvp::pool::AUTO {
                AUTO.get(index)
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            } else {
                d.pools[slot].get(index).cloned()
            };
            let Some((key, value)) = record else {
                return status::HV_S_CONT;
            };
            let size = put_utf16(p, B + 20, 512, &key, 254);
            put_u32(p, B + 12, size);
            let size = put_utf16(p, B + 532, 2048, &value, 1022);
            put_u32(p, B + 16, size);
            put_u32(p, B + 8, vmbus::kvp::REG_SZ);
            status::HV_S_OK
        }
        op::GET_IP_INFO => {
            let adapter = get_utf16(p, B + 2, 256, 256);
            d.seen.push((operation, pool, adapter.clone()));
            let Some((_, fields, dhcp)) = d.adapters.iter().find(|(mac, _, _)| *mac == adapter)
            else {
                return status::HV_E_FAIL;
            };
            let (fields, dhcp) = (*fields, *dhcp);
            p[B + 258] = vmbus::kvp::ADDR_FAMILY_IPV4 | vmbus::kvp::ADDR_FAMILY_IPV6;
            p[B + 259] = dhcp;
            put_utf16(p, B + 260, 2048, fields[0], 1023);
            put_utf16(p, B + 2308, 2048, fields[1], 1023);
            put_utf16(p, B + 4356, 1024, fields[2], 511);
            put_utf16(p, B + 5380, 2048, fields[3], 1023);
            status::HV_S_OK
        }
        _ => status::HV_S_OK,
    }
}

fn records(report: &KvpReport) -> Vec<(String, String)> {
    report
        .records
        .iter()
        .map(|r| (r.key.clone(), r.value.clone()))
        .collect()
}

fn pair(k: &str, v: &str) -> (String, String) {
    (k.to_owned(), v.to_owned())
}

#[test]
fn negotiation_waits_for_the_daemon_and_operations_say_so() {
    let guest = Guest::new(SHORT);
    let summary = guest.summary();
    assert!(
        summary.contains("negotiation pending")
            && summary.contains("waiting for the guest's KVP daemon to register"),
        "{summary}"
    );
    let started = Instant::now();
    let report = guest.host.get(0, "Color").unwrap();
    assert!(
        started.elapsed() >= SHORT,
        "gave up before the step timeout"
    );
    assert!(!report.ok);
    assert_eq!(report.hresult, None);
    let error = report.error.unwrap();
    assert!(
        error.contains("waiting for the guest's KVP daemon to register")
            && error.contains("still unanswered"),
        "{error}"
    );
    assert!(guest.daemon().seen.is_empty(), "nothing reached the daemon");
    // The daemon starts late; its driver answers the NEGOTIATE sent long ago.
    std::thread::sleep(Duration::from_millis(50));
    guest.ready();
    let summary = guest.summary();
    assert!(
        summary.contains("negotiation agreed (framework 3.0, kvp 4.0)")
            && summary.contains("host items pushed into pool 3 (16 of 16)"),
        "{summary}"
    );
    guest.daemon().pools[0].push(pair("Color", "blue"));
    let report = guest.host.lookup(0, "Color").unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(records(&report), [pair("Color", "blue")]);
    assert!(
        guest.daemon().problems.is_empty(),
        "{:?}",
        guest.daemon().problems
    );
}

#[test]
fn no_channel_at_all_is_named() {
    let host = KvpHost::new(SHORT, test_items());
    let report = host.list(2).unwrap();
    let error = report.error.unwrap();
    assert!(
        error.contains("the kvp channel was not opened within 0.3 s"),
        "{error}"
    );
    assert!(host.status().summary.starts_with("channel not attached"));
}

#[test]
fn the_host_items_go_into_pool_3_before_anything_else() {
    let guest = Guest::new(PATIENT);
    guest.register();
    // Asked at once: it waits for the push, then sees all sixteen.
    let report = guest.host.list(3).unwrap();
    assert!(report.ok, "{report:?}");
    let got = records(&report);
    assert_eq!(got, test_items());
    let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, super::host_items::NAMES);
    let d = guest.daemon();
    let sets: Vec<&(u8, u8, String)> = d.seen.iter().filter(|s| s.0 == op::SET).collect();
    assert_eq!(sets.len(), 16);
    assert!(sets.iter().all(|s| s.1 == 3), "{sets:?}");
    // The push came first: sixteen SETs, then the ENUMERATEs of the list.
    assert!(d.seen[..16].iter().all(|s| s.0 == op::SET), "{:?}", d.seen);
    drop(d);
    let status = guest.host.kvp_status();
    assert_eq!(status.host_items.state, "done");
    assert_eq!(status.host_items.pushed, 16);
    assert_eq!(status.virtual_machine_id, "VM-ID");
}

#[test]
fn a_push_the_guest_refuses_is_shown_not_fatal() {
    let guest = Guest::new(PATIENT);
    guest.daemon().fail = Some((op::SET, 0, status::HV_E_FAIL));
    guest.ready();
    let status = guest.host.kvp_status();
    assert_eq!(status.host_items.state, "failed");
    assert_eq!(status.host_items.pushed, 0);
    assert_eq!(status.host_items.failures.len(), 16, "every item was tried");
    assert!(
        status.host_items.failures[0].starts_with("HostName: the guest answered 0x80004005"),
        "{:?}",
        status.host_items.failures
    );
    assert!(guest.summary().contains("host items push failed (0 of 16"));
    // The service goes on.
    guest.daemon().fail = None;
    assert!(guest.host.list(2).unwrap().ok);
}

#[test]
fn a_push_the_guest_does_not_answer_stops_at_the_first_item() {
    let guest = Guest::new(SHORT);
    guest.daemon().silent = true;
    guest.register();
    guest.wait_push();
    let status = guest.host.kvp_status();
    assert_eq!(status.host_items.state, "failed");
    assert_eq!(
        status.host_items.failures,
        [
            "HostName: the guest did not answer within 0.3 s",
            "stopped after 1 of 16 items"
        ]
    );
    assert_eq!(guest.daemon().dropped.len(), 1);
}

#[test]
fn set_get_delete_round_trip_every_type() {
    let guest = Guest::new(PATIENT);
    guest.ready();
    use vmbus::kvp::KvpValue;
    for (value, text) in [
        (KvpValue::Sz("blue ünïcødé 🦀".into()), "blue ünïcødé 🦀"),
        (KvpValue::U32(42), "42"),
        (KvpValue::U64(u64::MAX), "18446744073709551615"),
    ] {
        let report = guest.host.set(0, "Color", &value).unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(report.operation, "SET");
        let report = guest.host.lookup(0, "Color").unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(report.records[0].value, text);
        // KVP_OP_GET itself succeeds with the empty value a 6.1 guest gives.
        let report = guest.host.get(0, "Color").unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(report.records[0].value, "");
    }
    assert_eq!(
        guest.daemon().pools[0],
        [pair("Color", "18446744073709551615")]
    );
    let report = guest.host.delete(0, "Color").unwrap();
    assert!(report.ok, "{report:?}");
    assert!(guest.daemon().pools[0].is_empty());
    // Missing records: the daemon's HV_S_CONT, in words.
    for report in [
        guest.host.get(0, "Color").unwrap(),
        guest.host.delete(0, "Color").unwrap(),
    ] {
        assert!(!report.ok);
        assert_eq!(report.hresult, Some(status::HV_S_CONT));
        assert_eq!(report.meaning.as_deref(), Some("no such record"));
        let error = report.error.unwrap();
        assert!(
            error.ends_with(
                "\"Color\" in pool 0 (external): the guest answered 0x80070103: no such record"
            ),
            "{error}"
        );
    }
    let missing = guest.host.lookup(0, "Color").unwrap();
    assert!(!missing.ok);
    assert_eq!(missing.hresult, Some(status::HV_S_CONT));
    assert!(
        missing
            .error
            .unwrap()
            .contains("listed 0 records, none of them \"Color\""),
        "a lookup says how many records it saw"
    );
    let last = guest.host.kvp_status().last.unwrap();
    assert!(last.starts_with("list of pool 0"), "{last}");
    assert!(
        guest.daemon().problems.is_empty(),
        "{:?}",
        guest.daemon().problems
    );
}

#[test]
fn keys_and_pools_are_checked_before_anything_is_sent() {
    let guest = Guest::new(PATIENT);
    guest.ready();
    let before = guest.daemon().seen.len();
    let long = "k".repeat(256);
    for err in [
        guest.host.get(5, "k").unwrap_err(),
        guest.host.get(0, "").unwrap_err(),
        guest.host.get(0, &long).unwrap_err(),
        guest.host.delete(0, "a\0b").unwrap_err(),
        guest
            .host
            .set(0, "k", &vmbus::kvp::KvpValue::Sz("v".repeat(1024)))
            .unwrap_err(),
        guest.host.ip(Some("not-a-mac"), Family::Both).unwrap_err(),
    ] {
        assert!(!err.is_empty());
    }
    // 255 units is the most a key may have.
    assert!(
        guest
            .host
            .set(0, &"k".repeat(255), &vmbus::kvp::KvpValue::U32(1))
            .unwrap()
            .ok
    );
    assert_eq!(guest.daemon().seen.len(), before + 1);
}

#[test]
fn list_enumerates_until_the_daemon_says_no_more() {
    let guest = Guest::new(PATIENT);
    guest.ready();
    let report = guest.host.list(2).unwrap();
    assert!(report.ok, "{report:?}");
    let want: Vec<_> = AUTO.iter().map(|(k, v)| pair(k, v)).collect();
    assert_eq!(records(&report), want);
    // Ten records, then index 10 answered HV_S_CONT.
    let enumerates: Vec<String> = guest
        .daemon()
        .seen
        .iter()
        .filter(|s| s.0 == op::ENUMERATE && s.1 == 2)
        .map(|s| s.2.clone())
        .collect();
    assert_eq!(enumerates.len(), 11);
    assert_eq!(enumerates.last().map(String::as_str), Some("10"));
    // An empty pool is a success with no records.
    let report = guest.host.list(0).unwrap();
    assert!(report.ok && report.records.is_empty(), "{report:?}");
    // One index at a time.
    let report = guest.host.enumerate(2, 5).unwrap();
    assert_eq!(records(&report), [pair("OSName", "Debian GNU/Linux")]);
    let report = guest.host.enumerate(2, 10).unwrap();
    assert!(!report.ok);
    assert_eq!(report.hresult, Some(status::HV_S_CONT));
    assert!(report.meaning.unwrap().starts_with("no more records"));
}

#[test]
fn a_list_the_daemon_fails_midway_keeps_what_it_got() {
    let guest = Guest::new(PATIENT);
    guest.ready();
    {
        let mut d = guest.daemon();
        d.pools[1] = vec![pair("a", "1"), pair("b", "2"), pair("c", "3")];
        d.fail = Some((op::ENUMERATE, 1, status::HV_E_FAIL));
    }
    let report = guest.host.list(1).unwrap();
    assert!(!report.ok);
    assert_eq!(records(&report), [pair("a", "1")]);
    assert_eq!(report.hresult, Some(status::HV_E_FAIL));
    let error = report.error.unwrap();
    assert!(
        error.starts_with("ENUMERATE index 1 in pool 1 (guest): the guest answered 0x80004005")
            && error.contains("KVP daemon failed"),
        "{error}"
    );
}

#[test]
fn requests_after_the_daemon_left_fail_with_its_drivers_hv_e_fail() {
    let guest = Guest::new(PATIENT);
    guest.ready();
    guest.daemon().registered = false;
    let report = guest
        .host
        .set(0, "k", &vmbus::kvp::KvpValue::Sz("v".into()))
        .unwrap();
    assert!(!report.ok);
    assert_eq!(report.hresult, Some(status::HV_E_FAIL));
    let meaning = report.meaning.unwrap();
    assert!(meaning.contains("is not running"), "{meaning}");
}

#[test]
fn ip_info_of_a_named_adapter() {
    let guest = Guest::new(PATIENT);
    guest.ready();
    guest.daemon().adapters.push((
        "00:15:5D:00:04:01".into(),
        [
            "10.0.0.4;fe80::215:5dff:fe00:401",
            "255.255.255.0;/64",
            "10.0.0.1",
            "168.63.129.16",
        ],
        1,
    ));
    let report = guest
        .host
        .ip(Some("00-15-5d-00-04-01"), Family::Both)
        .unwrap();
    assert!(report.ok, "{report:?}");
    let adapter = &report.adapters[0];
    assert_eq!(adapter.adapter, "00:15:5D:00:04:01");
    let ip = adapter.ip.as_ref().unwrap();
    assert_eq!(ip.ip_addresses, ["10.0.0.4", "fe80::215:5dff:fe00:401"]);
    assert_eq!(ip.subnets, ["255.255.255.0", "/64"]);
    assert_eq!(ip.default_gateways, ["10.0.0.1"]);
    assert_eq!(ip.dns_servers, ["168.63.129.16"]);
    assert!(ip.dhcp_enabled);
    assert_eq!(ip.addr_family, 3);
    // The daemon was asked with the upper-case, ':'-separated form it compares.
    assert!(guest
        .daemon()
        .seen
        .iter()
        .any(|s| s.0 == op::GET_IP_INFO && s.2 == "00:15:5D:00:04:01"));
    let v6 = guest
        .host
        .ip(Some("00:15:5d:00:04:01"), Family::Ipv6)
        .unwrap();
    assert_eq!(
        v6.adapters[0].ip.as_ref().unwrap().ip_addresses,
        ["fe80::215:5dff:fe00:401"]
    );
    // An adapter the guest does not have.
    let report = guest
        .host
        .ip(Some("00:15:5D:FF:FF:FF"), Family::Both)
        .unwrap();
    assert!(!report.ok);
    assert_eq!(report.hresult, Some(status::HV_E_FAIL));
    assert!(report.adapters[0]
        .meaning
        .as_ref()
        .unwrap()
        .contains("no adapter with that MAC"));
    assert!(
        guest.daemon().problems.is_empty(),
        "{:?}",
        guest.daemon().problems
    );
}

/// A fake /proc where pid 4242 runs `program`, and a fake /sys/class/net.
fn machine(program: &str) -> (TempDir, TempDir, ProcRoot, PathBuf) {
    let proc_dir = TempDir::new("kvp-proc");
    let pid = proc_dir.path().join("4242");
    std::fs::create_dir_all(&pid).unwrap();
    std::os::unix::fs::symlink(format!("/usr/bin/{program}"), pid.join("exe")).unwrap();
    let net = TempDir::new("kvp-net");
    for (name, mac) in [("eth0", "00:15:5d:00:04:01"), ("eth1", "00:15:5d:00:04:02")] {
        let d = net.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("address"), format!("{mac}\n")).unwrap();
        std::fs::write(d.join("flags"), "0x1003\n").unwrap();
    }
    let root = ProcRoot(proc_dir.path().to_owned());
    let net_root = net.path().to_owned();
    (proc_dir, net, root, net_root)
}

fn peer_4242() -> Option<PeerCred> {
    Some(PeerCred {
        pid: 4242,
        uid: 0,
        gid: 0,
    })
}

#[test]
fn ip_info_of_every_adapter_when_the_guest_is_this_machine() {
    let (proc_dir, net, root, net_root) = machine("cusedev");
    let host = KvpHost::with_roots(PATIENT, test_items(), root, net_root);
    let guest = Guest::with_host(host, vec![proc_dir, net], peer_4242());
    guest.ready();
    guest.daemon().adapters = vec![
        (
            "00:15:5D:00:04:01".into(),
            ["10.0.0.4", "255.255.255.0", "10.0.0.1", ""],
            0,
        ),
        (
            "00:15:5D:00:04:02".into(),
            ["192.168.1.9", "255.255.0.0", "", ""],
            1,
        ),
    ];
    let report = guest.host.ip(None, Family::Ipv4).unwrap();
    assert!(report.ok, "{report:?}");
    let macs: Vec<&str> = report.adapters.iter().map(|a| a.adapter.as_str()).collect();
    assert_eq!(macs, ["00:15:5D:00:04:01", "00:15:5D:00:04:02"]);
    assert_eq!(
        report.adapters[1].ip.as_ref().unwrap().ip_addresses,
        ["192.168.1.9"]
    );
    let note = report.note.unwrap();
    assert!(
        note.contains("cusedev (pid 4242)") && note.contains("eth1 00:15:5D:00:04:02"),
        "{note}"
    );
}

#[test]
fn ip_info_of_a_vm_needs_an_adapter() {
    let (proc_dir, net, root, net_root) = machine("vhost");
    let host = KvpHost::with_roots(PATIENT, test_items(), root, net_root);
    let guest = Guest::with_host(host, vec![proc_dir, net], peer_4242());
    guest.ready();
    let err = guest.host.ip(None, Family::Both).unwrap_err();
    assert!(
        err.contains("the guest is a VM") && err.contains("--adapter MAC"),
        "{err}"
    );
    assert!(!guest.daemon().seen.iter().any(|s| s.0 == op::GET_IP_INFO));
}

#[test]
fn an_unanswered_request_times_out_and_its_late_answer_is_ignored() {
    let guest = Guest::new(SHORT);
    guest.ready();
    guest.daemon().silent = true;
    let report = guest.host.get(0, "k").unwrap();
    assert!(!report.ok);
    assert_eq!(report.hresult, None);
    assert_eq!(
        report.error.as_deref(),
        Some("GET \"k\" in pool 0 (external): the guest did not answer within 0.3 s")
    );
    guest.wait_dropped(1);
    // The guest wakes up: its late answer to the abandoned request changes nothing, and the
    // next request is answered normally.
    let (trans_id, mut payload) = {
        let mut d = guest.daemon();
        d.silent = false;
        d.dropped.remove(0)
    };
    ic::set_reply(&mut payload, status::HV_S_OK).unwrap();
    reply(&guest.host, trans_id, &payload);
    guest.daemon().pools[0].push(pair("k", "v"));
    let report = guest.host.lookup(0, "k").unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records[0].value, "v");
}

#[test]
fn a_guest_that_goes_away_mid_request_is_reported_at_once() {
    let guest = Guest::new(PATIENT);
    guest.ready();
    guest.daemon().silent = true;
    let host = Arc::clone(&guest.host);
    let started = Instant::now();
    let get = std::thread::spawn(move || host.get(0, "k").unwrap());
    guest.wait_dropped(1);
    guest.host.detached(LINK);
    let report = get.join().unwrap();
    assert!(started.elapsed() < PATIENT);
    let error = report.error.unwrap();
    assert!(
        error.ends_with("the guest went away (the kvp channel closed)"),
        "{error}"
    );
    assert!(guest.summary().starts_with("channel not attached"));
}

#[test]
fn malformed_answers_never_panic_and_the_service_goes_on() {
    let guest = Guest::new(SHORT);
    guest.ready();
    guest.daemon().pools[0].push(pair("k", "v"));
    for (mangle, want) in [
        (Mangle::Truncate(B + 10), Some("malformed")),
        (Mangle::Truncate(B), Some("malformed")),
        (
            Mangle::MsgType(msgtype::VSS),
            Some("icmsgtype 5 instead of 2"),
        ),
        (
            Mangle::Op(op::DELETE),
            Some("operation 2 in the answer to a GET request"),
        ),
        // Dropped as not an answer, or answering nothing we asked: a timeout.
        (Mangle::Truncate(20), None),
        (Mangle::NotResponse, None),
        (Mangle::TransId(999_999), None),
    ] {
        guest.daemon().mangle = Some(mangle);
        let report = guest.host.get(0, "k").unwrap();
        assert!(!report.ok, "{mangle:?}");
        let error = report.error.unwrap();
        match want {
            Some(want) => assert!(error.contains(want), "{mangle:?}: {error}"),
            None => assert!(error.contains("did not answer"), "{mangle:?}: {error}"),
        }
        let report = guest.host.get(0, "k").unwrap();
        assert!(report.ok, "after {mangle:?}: {report:?}");
    }
    // Garbage of every length straight into the packet path.
    let mut state = 0x2545_f491u32;
    for len in 0..200 {
        let mut payload: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect();
        if payload.len() > 25 {
            payload[25] |= ic::icflags::RESPONSE;
        }
        reply(&guest.host, u64::from(state % 4), &payload);
    }
    assert!(guest.host.get(0, "k").unwrap().ok);
    let _ = guest.host.status();
}

#[test]
fn control_commands_refuse_bad_requests_and_answer_reports() {
    let guest = Guest::new(PATIENT);
    guest.ready();
    let run = |json: &str, offered: bool| {
        let mut sink = NullProgress;
        let ctx = CommandContext {
            offered,
            fds: Vec::new(),
            progress: &mut sink,
        };
        guest.host.command(serde_json::from_str(json).unwrap(), ctx)
    };
    let value = run(
        r#"{"op":"set","pool":1,"key":"n","value":"7","type":"u64"}"#,
        true,
    )
    .unwrap();
    let report: KvpReport = serde_json::from_value(value).unwrap();
    assert!(report.ok);
    let value = run(r#"{"op":"get","pool":1,"key":"n"}"#, true).unwrap();
    assert_eq!(value["records"][0]["value"], "7");
    let value = run(r#"{"op":"get","pool":1,"key":"missing"}"#, true).unwrap();
    assert_eq!(value["ok"], false);
    assert_eq!(value["hresult"], status::HV_S_CONT);
    for (json, offered) in [
        (r#"{"op":"get","pool":9,"key":"k"}"#, true),
        (
            r#"{"op":"set","pool":0,"key":"k","value":"x","type":"u32"}"#,
            true,
        ),
        (r#"{"op":"ip","adapter":"zz"}"#, true),
        (r#"{"op":"list","pool":0}"#, false),
    ] {
        assert!(
            matches!(run(json, offered), Err(CommandError::Refused(_))),
            "{json}"
        );
    }
    assert!(matches!(
        run(r#"{"op":"list"}"#, true),
        Err(CommandError::Malformed(_))
    ));
}
