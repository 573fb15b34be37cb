//! The KVP operations as the host asks them: one request (or, for `list` and `ip`, a series)
//! while holding the channel's slot, each answer read with `vmbus::kvp::parse_reply`.
//!
//! A request body that cannot be encoded (a key too long, a NUL in it) is refused before
//! anything is sent (`Err`, the CLI's exit 2); everything after that is a [`KvpReport`], `ok`
//! or not.

use std::path::Path;

use vmbus::ic::status::{HV_S_CONT, HV_S_OK};
use vmbus::kvp::{self as wire, op, KvpReply, KvpValue};

use super::channel::{Slot, TxnError};
use super::report::{
    op_name, pool_label, status_message, AdapterIp, AdapterReport, Family, KvpReport, Record,
};
use super::{Inner, KvpHost};
use crate::bus::ChannelLink;
use crate::vss::peer::{self, GuestPlace};

/// `list` stops after this many records: a guest that never answers HV_S_CONT would
/// otherwise keep it going forever. (The daemon's pool files are far smaller.)
pub const MAX_LIST: u32 = 65_536;

/// Why a request got no usable answer.
#[derive(Debug, Clone)]
pub(super) struct Failed {
    /// The guest's status, if it answered.
    hresult: Option<u32>,
    /// In words.
    message: String,
    /// The guest did answer (a later request may still work).
    answered: bool,
}

impl Failed {
    fn txn(e: TxnError) -> Failed {
        Failed {
            hresult: None,
            message: e.to_string(),
            answered: matches!(e, TxnError::Malformed(_)),
        }
    }

    fn malformed(message: String) -> Failed {
        Failed {
            hresult: None,
            message: format!("the guest's answer is malformed: {message}"),
            answered: true,
        }
    }
}

impl Inner {
    /// One request of `operation` and its answer, `Ok` only for HV_S_OK.
    fn exchange(
        &self,
        slot: &Slot,
        link: &ChannelLink,
        operation: u8,
        body: &[u8],
    ) -> Result<KvpReply, Failed> {
        let reply = self
            .channel
            .transact(slot, link, body, self.step_timeout)
            .map_err(Failed::txn)?;
        let parsed =
            wire::parse_reply(&reply.payload).map_err(|e| Failed::malformed(e.to_string()))?;
        if parsed.operation != operation {
            return Err(Failed::malformed(format!(
                "operation {} in the answer to a {} request",
                parsed.operation,
                op_name(operation)
            )));
        }
        if parsed.status != HV_S_OK {
            return Err(Failed {
                hresult: Some(parsed.status),
                message: format!(
                    "the guest answered {:#010x}: {}",
                    parsed.status,
                    status_message(operation, parsed.status)
                ),
                answered: true,
            });
        }
        Ok(parsed)
    }

    /// The slot and a ready link, or why not.
    fn begin(&self) -> Result<(Slot, ChannelLink), Failed> {
        let slot = self.channel.acquire();
        match self.channel.wait_ready(self.step_timeout) {
            Ok(link) => Ok((slot, link)),
            Err(e) => Err(Failed::txn(TxnError::Ready(e))),
        }
    }

    /// One pool-3 SET of the push: `Err((why, go_on))`.
    pub(super) fn push_one(
        &self,
        slot: &Slot,
        link: &ChannelLink,
        key: &str,
        value: &str,
    ) -> Result<(), (String, bool)> {
        let body = wire::encode_set(
            wire::pool::AUTO_EXTERNAL,
            key,
            &KvpValue::Sz(value.to_owned()),
        )
        .map_err(|e| (format!("cannot encode it: {e}"), true))?;
        self.exchange(slot, link, op::SET, &body)
            .map(|_| ())
            .map_err(|f| (f.message, f.answered))
    }
}

/// A failed report: `what` names the request ("\"key\""), `failed` why.
fn failed(operation: u8, pool: Option<u8>, what: String, failed: Failed) -> KvpReport {
    let place = match pool {
        Some(pool) if what.is_empty() => format!(" in {}", pool_label(pool)),
        Some(pool) => format!(" {what} in {}", pool_label(pool)),
        None if what.is_empty() => String::new(),
        None => format!(" {what}"),
    };
    KvpReport {
        ok: false,
        operation: op_name(operation).to_owned(),
        pool,
        hresult: failed.hresult,
        meaning: failed.hresult.map(|s| status_message(operation, s)),
        error: Some(format!("{}{place}: {}", op_name(operation), failed.message)),
        ..KvpReport::default()
    }
}

fn succeeded(operation: u8, pool: Option<u8>, records: Vec<Record>) -> KvpReport {
    KvpReport {
        ok: true,
        operation: op_name(operation).to_owned(),
        pool,
        hresult: Some(HV_S_OK),
        meaning: Some(status_message(operation, HV_S_OK)),
        records,
        ..KvpReport::default()
    }
}

/// Refuses an empty key (Hyper-V's WMI refuses them too); the wire encoder checks the rest.
fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("a key cannot be empty".to_owned());
    }
    Ok(())
}

fn check_pool(pool: u8) -> Result<(), String> {
    if pool >= wire::pool::COUNT {
        return Err(format!(
            "no pool {pool}: pools are 0-{} (the daemon has no others)",
            wire::pool::COUNT - 1
        ));
    }
    Ok(())
}

fn encoded(body: Result<Vec<u8>, vmbus::WireError>) -> Result<Vec<u8>, String> {
    body.map_err(|e| e.to_string())
}

impl KvpHost {
    fn finish(&self, summary: String, report: KvpReport) -> KvpReport {
        let status = match (&report.hresult, &report.error) {
            (_, Some(error)) if !report.ok => error.clone(),
            (Some(s), _) => format!(
                "{summary}: {s:#010x} {}",
                report.meaning.as_deref().unwrap_or("")
            ),
            (None, _) => summary,
        };
        if report.ok {
            log::info!("kvp: {status}");
        } else {
            log::warn!("kvp: {status}");
        }
        self.inner.remember(status);
        report
    }

    /// The value of `key` in `pool`, found by enumerating the pool, as a Hyper-V host reads a
    /// guest's items (its `GuestExchangeItems` are an enumeration). A KVP GET cannot do it
    /// through a Linux 6.1 guest: the driver forwards no value size, so `hv_kvp_daemon`
    /// copies nothing and answers success with an empty value (see [`KvpHost::get`]).
    /// Not found: a failure with the daemon's end-of-enumeration status, HV_S_CONT.
    pub fn lookup(&self, pool: u8, key: &str) -> Result<KvpReport, String> {
        check_pool(pool)?;
        check_key(key)?;
        let mut listed = self.list(pool)?;
        if !listed.ok {
            return Ok(listed);
        }
        let total = listed.records.len();
        listed.records.retain(|record| record.key == key);
        listed.records.truncate(1);
        if listed.records.is_empty() {
            let mut report = failed(
                op::ENUMERATE,
                Some(pool),
                format!("{key:?}"),
                Failed {
                    hresult: Some(HV_S_CONT),
                    message: format!(
                        "no such record: the guest's daemon listed {total} records, none of \
                         them {key:?}, and answered {HV_S_CONT:#010x} after the last"
                    ),
                    answered: true,
                },
            );
            report.operation = "lookup".to_owned();
            return Ok(report);
        }
        listed.operation = "lookup".to_owned();
        Ok(listed)
    }

    /// GET `key` from `pool`: one KVP_OP_GET, answered as the guest's driver answers it.
    pub fn get(&self, pool: u8, key: &str) -> Result<KvpReport, String> {
        check_pool(pool)?;
        check_key(key)?;
        let body = encoded(wire::encode_get(pool, key))?;
        let what = format!("{key:?}");
        let report = match self.inner.begin() {
            Err(f) => failed(op::GET, Some(pool), what.clone(), f),
            Ok((slot, link)) => match self.inner.exchange(&slot, &link, op::GET, &body) {
                Ok(reply) => succeeded(
                    op::GET,
                    Some(pool),
                    vec![Record {
                        key: key.to_owned(),
                        value: reply.value,
                    }],
                ),
                Err(f) => failed(op::GET, Some(pool), what.clone(), f),
            },
        };
        Ok(self.finish(format!("GET {what} in {}", pool_label(pool)), report))
    }

    /// SET `key` to `value` in `pool`.
    pub fn set(&self, pool: u8, key: &str, value: &KvpValue) -> Result<KvpReport, String> {
        check_pool(pool)?;
        check_key(key)?;
        let body = encoded(wire::encode_set(pool, key, value))?;
        let what = format!("{key:?}");
        let shown = match value {
            KvpValue::Sz(s) => s.clone(),
            KvpValue::U32(v) => v.to_string(),
            KvpValue::U64(v) => v.to_string(),
        };
        let report = match self.inner.begin() {
            Err(f) => failed(op::SET, Some(pool), what.clone(), f),
            Ok((slot, link)) => match self.inner.exchange(&slot, &link, op::SET, &body) {
                Ok(_) => succeeded(
                    op::SET,
                    Some(pool),
                    vec![Record {
                        key: key.to_owned(),
                        value: shown,
                    }],
                ),
                Err(f) => failed(op::SET, Some(pool), what.clone(), f),
            },
        };
        Ok(self.finish(format!("SET {what} in {}", pool_label(pool)), report))
    }

    /// DELETE `key` from `pool`.
    pub fn delete(&self, pool: u8, key: &str) -> Result<KvpReport, String> {
        check_pool(pool)?;
        check_key(key)?;
        let body = encoded(wire::encode_delete(pool, key))?;
        let what = format!("{key:?}");
        let report = match self.inner.begin() {
            Err(f) => failed(op::DELETE, Some(pool), what.clone(), f),
            Ok((slot, link)) => match self.inner.exchange(&slot, &link, op::DELETE, &body) {
                Ok(_) => succeeded(op::DELETE, Some(pool), Vec::new()),
                Err(f) => failed(op::DELETE, Some(pool), what.clone(), f),
            },
        };
        Ok(self.finish(format!("DELETE {what} in {}", pool_label(pool)), report))
    }

    /// ENUMERATE record `index` of `pool`.
    pub fn enumerate(&self, pool: u8, index: u32) -> Result<KvpReport, String> {
        check_pool(pool)?;
        let body = wire::encode_enumerate(pool, index);
        let what = format!("index {index}");
        let report = match self.inner.begin() {
            Err(f) => failed(op::ENUMERATE, Some(pool), what.clone(), f),
            Ok((slot, link)) => match self.inner.exchange(&slot, &link, op::ENUMERATE, &body) {
                Ok(reply) => succeeded(
                    op::ENUMERATE,
                    Some(pool),
                    vec![Record {
                        key: reply.key,
                        value: reply.value,
                    }],
                ),
                Err(f) => failed(op::ENUMERATE, Some(pool), what.clone(), f),
            },
        };
        Ok(self.finish(format!("ENUMERATE {what} of {}", pool_label(pool)), report))
    }

    /// Every record of `pool`: ENUMERATE 0, 1, 2, … until the daemon's HV_S_CONT.
    pub fn list(&self, pool: u8) -> Result<KvpReport, String> {
        check_pool(pool)?;
        let summary = format!("list of {}", pool_label(pool));
        let (slot, link) = match self.inner.begin() {
            Ok(ready) => ready,
            Err(f) => {
                let report = failed(op::ENUMERATE, Some(pool), String::new(), f);
                return Ok(self.finish(summary, report));
            }
        };
        let mut records = Vec::new();
        let mut index = 0u32;
        let report = loop {
            if index >= MAX_LIST {
                let mut report = failed(
                    op::ENUMERATE,
                    Some(pool),
                    String::new(),
                    Failed::malformed(format!(
                        "the guest never ended the enumeration (stopped after {MAX_LIST} records)"
                    )),
                );
                report.records = records;
                break report;
            }
            let body = wire::encode_enumerate(pool, index);
            match self.inner.exchange(&slot, &link, op::ENUMERATE, &body) {
                Ok(reply) => records.push(Record {
                    key: reply.key,
                    value: reply.value,
                }),
                // The daemon's "no such record": the end.
                Err(Failed {
                    hresult: Some(HV_S_CONT),
                    ..
                }) => break succeeded(op::ENUMERATE, Some(pool), records),
                Err(f) => {
                    let mut report = failed(op::ENUMERATE, Some(pool), format!("index {index}"), f);
                    report.records = records;
                    break report;
                }
            }
            index += 1;
        };
        let summary = format!("{summary}: {} records", report.records.len());
        Ok(self.finish(summary, report))
    }

    /// GET_IP_INFO for `adapter` (a MAC address), or for every adapter when the guest is this
    /// machine and `adapter` is `None`.
    pub fn ip(&self, adapter: Option<&str>, family: Family) -> Result<KvpReport, String> {
        let given = adapter.map(normalize_mac).transpose()?;
        let (slot, link) = match self.inner.begin() {
            Ok(ready) => ready,
            Err(f) => {
                let report = failed(op::GET_IP_INFO, None, String::new(), f);
                return Ok(self.finish("GET_IP_INFO".to_owned(), report));
            }
        };
        let (adapters, note) = match given {
            Some(mac) => (vec![mac], None),
            None => {
                let place = peer::locate(link.peer.as_ref(), &self.inner.proc_root);
                let (macs, note) = discover(&place, &self.inner.net_root)?;
                (macs, Some(note))
            }
        };
        let mut reports = Vec::new();
        for mac in &adapters {
            let body = encoded(wire::encode_get_ip_info(mac, family.wire()))?;
            let report = match self.inner.exchange(&slot, &link, op::GET_IP_INFO, &body) {
                Ok(reply) => AdapterReport {
                    adapter: mac.clone(),
                    ok: true,
                    hresult: Some(HV_S_OK),
                    meaning: Some(status_message(op::GET_IP_INFO, HV_S_OK)),
                    error: None,
                    ip: Some(
                        reply
                            .ip
                            .map(|info| AdapterIp::from_info(&info, family))
                            .unwrap_or_default(),
                    ),
                },
                Err(f) => AdapterReport {
                    adapter: mac.clone(),
                    ok: false,
                    hresult: f.hresult,
                    meaning: f.hresult.map(|s| status_message(op::GET_IP_INFO, s)),
                    error: Some(format!("GET_IP_INFO {mac}: {}", f.message)),
                    ip: None,
                },
            };
            let gone = !report.ok && report.hresult.is_none();
            reports.push(report);
            if gone {
                // No answer: the other adapters would wait as long again.
                break;
            }
        }
        drop(slot);
        let ok = !reports.is_empty() && reports.iter().all(|r| r.ok);
        let last = reports.last();
        let report = KvpReport {
            ok,
            operation: op_name(op::GET_IP_INFO).to_owned(),
            pool: None,
            hresult: last.and_then(|r| r.hresult),
            meaning: last.and_then(|r| r.meaning.clone()),
            error: (!ok).then(|| {
                reports
                    .iter()
                    .filter_map(|r| r.error.clone())
                    .collect::<Vec<_>>()
                    .join("; ")
            }),
            records: Vec::new(),
            adapters: reports,
            note,
        };
        Ok(self.finish(format!("GET_IP_INFO of {}", adapters.join(", ")), report))
    }
}

/// A MAC address as the 6.1 daemon compares it: upper case, bytes separated by ':'
/// (it upper-cases `/sys/class/net/*/address` and `strcmp`s). Accepts ':', '-' or '.'
/// separators, or none, in either case.
pub fn normalize_mac(text: &str) -> Result<String, String> {
    let digits: String = text
        .trim()
        .chars()
        .filter(|c| !matches!(c, ':' | '-' | '.'))
        .collect();
    if digits.is_empty()
        || !digits.len().is_multiple_of(2)
        || digits.len() > 2 * 32
        || !digits.chars().all(|c| c.is_ascii_hexdigit())
    {
        return Err(format!(
            "{text:?} is not a MAC address (like 00:15:5D:01:02:03, the adapter id the \
             guest's KVP daemon looks up in /sys/class/net)"
        ));
    }
    let upper = digits.to_ascii_uppercase();
    let bytes: Vec<&str> = (0..upper.len())
        .step_by(2)
        .filter_map(|i| upper.get(i..i + 2))
        .collect();
    Ok(bytes.join(":"))
}

/// The adapters to ask about when none is given: this machine's, if the guest is this
/// machine; otherwise there is no way to know (KVP has no request that lists them).
pub fn discover(place: &GuestPlace, net_root: &Path) -> Result<(Vec<String>, String), String> {
    if let GuestPlace::VirtualMachine { .. } = place {
        return Err(format!(
            "{}; KVP has no request that lists its adapters, so name one with --adapter MAC \
             (the guest's `ip link` shows its MAC addresses)",
            place.describe()
        ));
    }
    let mut found: Vec<(String, String)> = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(net_root)
        .map_err(|e| {
            format!(
                "cannot list {}: {}; name an adapter with --adapter MAC",
                net_root.display(),
                crate::cli::os_reason(&e)
            )
        })?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let dir = net_root.join(&name);
        let flags = std::fs::read_to_string(dir.join("flags"))
            .ok()
            .and_then(|f| u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok())
            .unwrap_or(0);
        // IFF_LOOPBACK
        if name == "lo" || flags & 0x8 != 0 {
            continue;
        }
        let Ok(address) = std::fs::read_to_string(dir.join("address")) else {
            continue;
        };
        let Ok(mac) = normalize_mac(&address) else {
            continue;
        };
        if mac.chars().all(|c| c == '0' || c == ':') || found.iter().any(|(_, m)| *m == mac) {
            continue;
        }
        found.push((name, mac));
    }
    if found.is_empty() {
        return Err(format!(
            "{}, but it has no network adapter with a MAC address in {}; name one with \
             --adapter MAC",
            place.describe(),
            net_root.display()
        ));
    }
    let note = format!(
        "{}; its adapters: {}",
        place.describe(),
        found
            .iter()
            .map(|(name, mac)| format!("{name} {mac}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok((found.into_iter().map(|(_, mac)| mac).collect(), note))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;

    #[test]
    fn macs_are_normalised_as_the_daemon_compares_them() {
        assert_eq!(
            normalize_mac("00:15:5d:0a:0B:0c"),
            Ok("00:15:5D:0A:0B:0C".into())
        );
        assert_eq!(
            normalize_mac("00-15-5D-0A-0B-0C"),
            Ok("00:15:5D:0A:0B:0C".into())
        );
        assert_eq!(
            normalize_mac("00155d0a0b0c\n"),
            Ok("00:15:5D:0A:0B:0C".into())
        );
        for bad in ["", "xyz", "0:1:2", "00:15:5d:0a:0b:0g"] {
            assert!(normalize_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn discovery_lists_this_machines_adapters_but_not_a_vms() {
        let dir = TempDir::new("kvp-discover");
        for (name, address, flags) in [
            ("lo", "00:00:00:00:00:00", "0x9"),
            ("eth0", "00:15:5d:00:00:01", "0x1003"),
            ("br0", "00:15:5d:00:00:01", "0x1003"),
            ("wlan0", "aa:bb:cc:dd:ee:ff", "0x1003"),
            ("tun0", "", "0x1091"),
        ] {
            let d = dir.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("address"), format!("{address}\n")).unwrap();
            std::fs::write(d.join("flags"), format!("{flags}\n")).unwrap();
        }
        let here = GuestPlace::ThisMachine {
            reason: "the guest side of the bus is cusedev (pid 1) on this machine's kernel".into(),
        };
        let (macs, note) = discover(&here, dir.path()).unwrap();
        // br0 shares eth0's MAC: the daemon would find eth0 first anyway.
        assert_eq!(macs, ["00:15:5D:00:00:01", "AA:BB:CC:DD:EE:FF"]);
        assert!(
            note.contains("br0 00:15:5D:00:00:01") || note.contains("eth0"),
            "{note}"
        );
        let vm = GuestPlace::VirtualMachine {
            pid: 9,
            program: "vhost".into(),
        };
        let err = discover(&vm, dir.path()).unwrap_err();
        assert!(err.contains("--adapter MAC"), "{err}");
        let empty = TempDir::new("kvp-discover-empty");
        let err = discover(&here, empty.path()).unwrap_err();
        assert!(err.contains("no network adapter"), "{err}");
    }
}
