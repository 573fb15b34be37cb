//! The VSS service against a fake guest: the 6.1 hv_vss driver (NEGOTIATE answered at once,
//! HV_E_FAIL while no daemon is registered, the host's buffer echoed with the daemon's status,
//! kvp-vss.md §5) and an hv_vss_daemon whose answers the test sets. The host end of a
//! `UnixStream::pair()` is the service's real `ChannelLink`; where the guest is comes from a
//! fake `/proc` and the link's peer credentials.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmbus::ic::{self, msgtype, status};
use vmbus::negotiate::{prep_negotiate_resp, VSS_FW_VERSIONS, VSS_SRV_VERSIONS};
use vmbus::packet::{encode_inband, parse_packet};
use vmbus::vss::op;

use super::peer::ProcRoot;
use super::{Frozen, VssHost, VssOp, VssReport, DRIVER_FREEZE_TIMEOUT, FREEZE_TIMEOUT};
use crate::bus::frames::read_frame;
use crate::bus::{ChannelLink, PeerCred};
use crate::service::{CommandContext, CommandError, HostService};
use crate::test_support::{NullProgress, TempDir};

const LINK: u64 = 9;
const PATIENT: Duration = Duration::from_secs(10);
const SHORT: Duration = Duration::from_millis(300);
const B: usize = ic::ICMSG_HDR_LEN;

#[derive(Default)]
struct Daemon {
    registered: bool,
    /// Requests are read and never answered.
    silent: bool,
    /// The status the daemon answers FREEZE with (THAW and HOT_BACKUP: 0).
    freeze_status: u32,
    /// Break the next answer.
    mangle: Option<Mangle>,
    /// Operations the daemon got.
    seen: Vec<u8>,
    problems: Vec<String>,
    dropped: usize,
}

#[derive(Debug, Clone, Copy)]
enum Mangle {
    Truncate(usize),
    Op(u8),
    NotResponse,
}

struct Guest {
    host: Arc<VssHost>,
    daemon: Arc<Mutex<Daemon>>,
    host_end: Arc<UnixStream>,
    reader: Option<JoinHandle<()>>,
    _proc: Option<TempDir>,
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

/// Where the guest side of the bus runs: behind the vhost backend, as cusedev on this
/// kernel, or whatever the real peer of a socket pair is (this test binary).
#[derive(Clone, Copy)]
enum Place {
    Vm,
    Cusedev,
    SocketPair,
}

impl Guest {
    fn new(place: Place, step_timeout: Duration) -> Guest {
        let _ = env_logger::builder().is_test(true).try_init();
        let (host, proc_dir, peer) = match place {
            Place::SocketPair => (VssHost::new(step_timeout), None, None),
            Place::Vm | Place::Cusedev => {
                let dir = TempDir::new("vss-proc");
                let pid = dir.path().join("4242");
                std::fs::create_dir_all(&pid).unwrap();
                let program = match place {
                    Place::Vm => "/usr/local/bin/vhost",
                    _ => "/usr/local/bin/cusedev",
                };
                std::os::unix::fs::symlink(program, pid.join("exe")).unwrap();
                let host = VssHost::with_proc_root(step_timeout, ProcRoot(dir.path().to_owned()));
                let peer = PeerCred {
                    pid: 4242,
                    uid: 0,
                    gid: 0,
                };
                (host, Some(dir), Some(peer))
            }
        };
        let host = Arc::new(host);
        let (ours, host_end) = UnixStream::pair().unwrap();
        let host_end = Arc::new(host_end);
        let mut link = ChannelLink::new(LINK, 1, Arc::clone(&host_end));
        if peer.is_some() {
            link.peer = peer;
        }
        let daemon = Arc::new(Mutex::new(Daemon {
            registered: true,
            ..Daemon::default()
        }));
        let reader = {
            let (host, daemon) = (Arc::clone(&host), Arc::clone(&daemon));
            std::thread::spawn(move || serve(&ours, &host, &daemon))
        };
        host.attached(link);
        let guest = Guest {
            host,
            daemon,
            host_end,
            reader: Some(reader),
            _proc: proc_dir,
        };
        let deadline = Instant::now() + PATIENT;
        while guest.host.vss_status().channel.negotiation.negotiation != "agreed" {
            assert!(Instant::now() < deadline, "{:?}", guest.host.vss_status());
            std::thread::sleep(Duration::from_millis(1));
        }
        guest
    }

    fn daemon(&self) -> MutexGuard<'_, Daemon> {
        lock(&self.daemon)
    }

    fn run(&self, what: VssOp, force: bool) -> Result<VssReport, String> {
        self.host.run(what, force, Some(PATIENT))
    }

    fn frozen(&self) -> Frozen {
        self.host.vss_status().guest
    }
}

fn reply(host: &VssHost, trans_id: u64, payload: &[u8]) {
    host.packet(
        LINK,
        &parse_packet(&encode_inband(trans_id, 0, payload)).unwrap(),
    );
}

fn serve(stream: &UnixStream, host: &VssHost, daemon: &Mutex<Daemon>) {
    while let Ok(Some(frame)) = read_frame(stream) {
        let Ok(packet) = parse_packet(&frame.body) else {
            lock(daemon).problems.push("an unparsable packet".into());
            continue;
        };
        let trans_id = packet.trans_id;
        let mut payload = packet.payload.to_vec();
        let Ok(hdr) = ic::ic_header(&payload) else {
            lock(daemon).problems.push("no IC headers".into());
            continue;
        };
        match hdr.icmsgtype.get() {
            msgtype::NEGOTIATE => {
                prep_negotiate_resp(&mut payload, VSS_FW_VERSIONS, VSS_SRV_VERSIONS);
                ic::set_response_flags(&mut payload).unwrap();
                reply(host, trans_id, &payload);
            }
            msgtype::VSS => {
                let mut d = lock(daemon);
                // §5: shorter than the 12-byte hv_vss_msg is dropped by the driver.
                if payload.len() < B + 12 {
                    d.problems
                        .push(format!("a VSS request of {} bytes", payload.len()));
                    continue;
                }
                if payload[B + 1..B + 12].iter().any(|&b| b != 0) {
                    d.problems.push(format!(
                        "reserved/flags not zero: {:?}",
                        &payload[B..B + 12]
                    ));
                }
                let operation = payload[B];
                let code = if !d.registered {
                    status::HV_E_FAIL
                } else if d.silent {
                    d.seen.push(operation);
                    d.dropped += 1;
                    continue;
                } else {
                    d.seen.push(operation);
                    match operation {
                        op::FREEZE => d.freeze_status,
                        _ => status::HV_S_OK,
                    }
                };
                let mangle = d.mangle.take();
                drop(d);
                ic::set_reply(&mut payload, code).unwrap();
                match mangle {
                    None => {}
                    Some(Mangle::Truncate(n)) => payload.truncate(n),
                    Some(Mangle::Op(o)) => payload[B] = o,
                    Some(Mangle::NotResponse) => payload[25] = ic::icflags::TRANSACTION,
                }
                reply(host, trans_id, &payload);
            }
            other => lock(daemon).problems.push(format!("icmsgtype {other}")),
        }
    }
}

#[test]
fn a_vm_guest_is_frozen_checked_and_thawed() {
    let guest = Guest::new(Place::Vm, PATIENT);
    assert!(guest.host.status().summary.contains("guest not frozen"));
    let report = guest.run(VssOp::Freeze, false).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.operation, "FREEZE");
    assert_eq!(report.hresult, Some(0));
    assert!(matches!(report.guest, Frozen::Yes { .. }));
    assert!(report
        .place
        .unwrap()
        .contains("vhost-user-vsock backend (vhost, pid 4242)"));
    let summary = guest.host.status().summary;
    assert!(
        summary.contains("negotiation agreed (framework 3.0, vss 5.0)")
            && summary.contains("guest FROZEN for 0 s")
            && summary.contains("last: FREEZE 0x00000000 success"),
        "{summary}"
    );
    let report = guest.run(VssOp::Check, false).unwrap();
    assert!(report.ok);
    assert_eq!(report.operation, "HOT_BACKUP");
    assert_eq!(
        report.flags,
        Some(0),
        "the host's flags come back untouched"
    );
    assert!(matches!(guest.frozen(), Frozen::Yes { .. }));
    let report = guest.run(VssOp::Thaw, false).unwrap();
    assert!(report.ok);
    assert_eq!(guest.frozen(), Frozen::No);
    let d = guest.daemon();
    assert_eq!(d.seen, [op::FREEZE, op::HOT_BACKUP, op::THAW]);
    assert!(d.problems.is_empty(), "{:?}", d.problems);
}

#[test]
fn freezing_this_machine_is_refused_unless_forced() {
    for place in [Place::Cusedev, Place::SocketPair] {
        let guest = Guest::new(place, PATIENT);
        let err = guest.run(VssOp::Freeze, false).unwrap_err();
        assert!(
            err.starts_with("refusing to FREEZE: ")
                && err.contains("/ included")
                && err.contains("--force"),
            "{err}"
        );
        match place {
            Place::Cusedev => assert!(err.contains("cusedev (pid 4242)"), "{err}"),
            _ => assert!(err.contains("not the vhost-user-vsock backend"), "{err}"),
        }
        assert!(guest.daemon().seen.is_empty(), "nothing was sent");
        assert_eq!(guest.frozen(), Frozen::No);
        // Thaw and check are always allowed.
        assert!(guest.run(VssOp::Check, false).unwrap().ok);
        assert!(guest.run(VssOp::Thaw, false).unwrap().ok);
        // --force does it.
        let report = guest.run(VssOp::Freeze, true).unwrap();
        assert!(report.ok, "{report:?}");
        assert!(matches!(guest.frozen(), Frozen::Yes { .. }));
        assert!(guest.run(VssOp::Thaw, false).unwrap().ok);
        assert_eq!(
            guest.daemon().seen,
            [op::HOT_BACKUP, op::THAW, op::FREEZE, op::THAW]
        );
    }
}

#[test]
fn a_failed_freeze_names_the_daemons_log() {
    let guest = Guest::new(Place::Vm, PATIENT);
    guest.daemon().freeze_status = status::HV_E_FAIL;
    let report = guest.run(VssOp::Freeze, false).unwrap();
    assert!(!report.ok);
    assert_eq!(report.hresult, Some(status::HV_E_FAIL));
    assert!(report
        .meaning
        .unwrap()
        .starts_with("the guest's VSS daemon failed: see its log"));
    assert_eq!(
        report
            .error
            .as_deref()
            .map(|e| e.split(" (or").next().unwrap_or("")),
        Some("FREEZE: the guest answered 0x80004005: the guest's VSS daemon failed: see its log")
    );
    // The daemon thaws after a failed freeze.
    assert_eq!(guest.frozen(), Frozen::No);
}

#[test]
fn without_a_daemon_the_driver_answers_hv_e_fail_at_once() {
    let guest = Guest::new(Place::Vm, PATIENT);
    guest.daemon().registered = false;
    let started = Instant::now();
    let report = guest.run(VssOp::Check, false).unwrap();
    assert!(started.elapsed() < PATIENT);
    assert!(!report.ok);
    assert_eq!(report.hresult, Some(status::HV_E_FAIL));
}

#[test]
fn an_unanswered_freeze_leaves_the_guest_maybe_frozen() {
    let guest = Guest::new(Place::Vm, PATIENT);
    guest.daemon().silent = true;
    let report = guest
        .host
        .run(VssOp::Freeze, false, Some(Duration::from_millis(400)))
        .unwrap();
    assert!(!report.ok);
    assert_eq!(report.hresult, None);
    assert_eq!(
        report.error.as_deref(),
        Some("FREEZE: the guest did not answer within 0.4 s")
    );
    let Frozen::Unknown { why } = guest.frozen() else {
        panic!("{:?}", guest.frozen());
    };
    assert!(why.contains("fakehost vss thaw"), "{why}");
    assert!(guest.host.status().summary.contains("guest maybe frozen"));
    // A thaw then settles it.
    guest.daemon().silent = false;
    assert!(guest.run(VssOp::Thaw, false).unwrap().ok);
    assert_eq!(guest.frozen(), Frozen::No);
}

#[test]
fn freeze_waits_past_the_drivers_limit_and_the_others_the_step_timeout() {
    assert!(FREEZE_TIMEOUT > DRIVER_FREEZE_TIMEOUT);
    assert_eq!(DRIVER_FREEZE_TIMEOUT, Duration::from_secs(900));
    let guest = Guest::new(Place::Vm, SHORT);
    guest.daemon().silent = true;
    let started = Instant::now();
    let report = guest.host.run(VssOp::Thaw, false, None).unwrap();
    assert!(started.elapsed() >= SHORT && started.elapsed() < PATIENT);
    assert_eq!(
        report.error.as_deref(),
        Some("THAW: the guest did not answer within 0.3 s")
    );
}

#[test]
fn a_channel_closing_while_frozen_leaves_it_unknown() {
    let guest = Guest::new(Place::Vm, SHORT);
    assert!(guest.run(VssOp::Freeze, false).unwrap().ok);
    guest.host.detached(LINK);
    let Frozen::Unknown { why } = guest.frozen() else {
        panic!("{:?}", guest.frozen());
    };
    assert!(
        why.contains("channel closed while the guest was frozen"),
        "{why}"
    );
    // No channel now: a request says so after the step timeout.
    let report = guest.host.run(VssOp::Check, false, None).unwrap();
    assert!(report
        .error
        .unwrap()
        .contains("the vss channel was not opened"));
}

#[test]
fn no_channel_is_named() {
    let host = VssHost::new(SHORT);
    let report = host.run(VssOp::Freeze, false, None).unwrap();
    assert!(!report.ok);
    let error = report.error.unwrap();
    assert!(
        error.contains("the vss channel was not opened within 0.3 s"),
        "{error}"
    );
    assert!(host.status().summary.starts_with("channel not attached"));
    // Nothing was sent, so nothing may be frozen.
    assert_eq!(report.guest, Frozen::No);
    assert_eq!(host.vss_status().guest, Frozen::No);
}

#[test]
fn malformed_answers_never_panic_and_the_service_goes_on() {
    let guest = Guest::new(Place::Vm, SHORT);
    for (mangle, want) in [
        (Mangle::Truncate(B + 4), "malformed"),
        (
            Mangle::Op(op::CREATE),
            "operation 0 in the answer to HOT_BACKUP",
        ),
        (Mangle::NotResponse, "did not answer"),
        (Mangle::Truncate(12), "did not answer"),
    ] {
        guest.daemon().mangle = Some(mangle);
        // (Not an answer at all: the wait runs to the step timeout, SHORT here.)
        let report = guest.host.run(VssOp::Check, false, None).unwrap();
        assert!(!report.ok, "{mangle:?}");
        let error = report.error.unwrap();
        assert!(error.contains(want), "{mangle:?}: {error}");
        assert!(
            guest.run(VssOp::Check, false).unwrap().ok,
            "after {mangle:?}"
        );
    }
    let mut state = 0x9e37_79b9u32;
    for len in 0..120 {
        let payload: Vec<u8> = (0..len)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 24) as u8
            })
            .collect();
        reply(&guest.host, u64::from(state % 3), &payload);
    }
    assert!(guest.run(VssOp::Check, false).unwrap().ok);
    assert!(
        guest.daemon().problems.is_empty(),
        "{:?}",
        guest.daemon().problems
    );
}

#[test]
fn control_commands_refuse_what_they_must() {
    let guest = Guest::new(Place::Cusedev, PATIENT);
    let run = |json: &str, offered: bool| {
        let mut sink = NullProgress;
        let ctx = CommandContext {
            offered,
            fds: Vec::new(),
            progress: &mut sink,
        };
        guest.host.command(serde_json::from_str(json).unwrap(), ctx)
    };
    match run(r#"{"op":"freeze"}"#, true) {
        Err(CommandError::Refused(e)) => assert!(e.starts_with("refusing to FREEZE"), "{e}"),
        other => panic!("{other:?}"),
    }
    let value = run(r#"{"op":"freeze","force":true,"timeout_secs":5}"#, true).unwrap();
    assert_eq!(value["ok"], true);
    assert_eq!(value["guest"]["frozen"], "yes");
    let value = run(r#"{"op":"thaw"}"#, true).unwrap();
    assert_eq!(value["guest"]["frozen"], "no");
    assert!(matches!(
        run(r#"{"op":"thaw","timeout_secs":0}"#, true),
        Err(CommandError::Malformed(_))
    ));
    assert!(matches!(
        run(r#"{"op":"snapshot"}"#, true),
        Err(CommandError::Malformed(_))
    ));
    assert!(matches!(
        run(r#"{"op":"check"}"#, false),
        Err(CommandError::Refused(_))
    ));
}
