//! What a KVP operation reports (the control command's result), pool names, and the guest's
//! status codes in words.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use vmbus::ic::{self, status};
use vmbus::kvp::op;

/// Pool names, by number (`KVP_POOL_*`), as `--pool` also accepts them.
pub const POOL_NAMES: [&str; 5] = [
    "external",
    "guest",
    "auto",
    "auto-external",
    "auto-internal",
];

/// What each pool holds, for `--help` and messages.
pub const POOL_ABOUT: [&str; 5] = [
    "data the host gave the guest (Hyper-V's host exchange items)",
    "data the guest gives the host (guest exchange items)",
    "the guest's intrinsic data (FullyQualifiedDomainName, OSName, ...), made by the daemon",
    "the host's intrinsic data (HostName, VirtualMachineId, ...), pushed by this host",
    "the guest's own internal data",
];

/// "pool 3 (auto-external)".
pub fn pool_label(pool: u8) -> String {
    match POOL_NAMES.get(usize::from(pool)) {
        Some(name) => format!("pool {pool} ({name})"),
        None => format!("pool {pool}"),
    }
}

/// A pool from its number or name.
pub fn parse_pool(text: &str) -> Result<u8, String> {
    let text = text.trim();
    if let Some(n) = POOL_NAMES.iter().position(|name| *name == text) {
        return Ok(n as u8);
    }
    match text.parse::<u8>() {
        Ok(n) if usize::from(n) < POOL_NAMES.len() => Ok(n),
        _ => Err(format!(
            "no pool {text:?}: pools are 0-4 or {}",
            POOL_NAMES.join(", ")
        )),
    }
}

/// A SET value's type (`--type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    /// REG_SZ, a string.
    #[default]
    Sz,
    /// REG_U32: the guest driver turns it into decimal text.
    U32,
    /// REG_U64: likewise.
    U64,
}

/// The address families `ip` shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// IPv4 only.
    Ipv4,
    /// IPv6 only.
    Ipv6,
    /// Both.
    #[default]
    Both,
}

impl Family {
    /// `addr_family` of the request.
    pub fn wire(self) -> u8 {
        match self {
            Family::Ipv4 => vmbus::kvp::ADDR_FAMILY_IPV4,
            Family::Ipv6 => vmbus::kvp::ADDR_FAMILY_IPV6,
            Family::Both => vmbus::kvp::ADDR_FAMILY_IPV4 | vmbus::kvp::ADDR_FAMILY_IPV6,
        }
    }
}

/// One record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The key.
    pub key: String,
    /// The value, as text (the guest driver turns every value into a REG_SZ string).
    pub value: String,
}

/// One adapter's IP configuration, as Hyper-V's `Msvm_GuestNetworkAdapterConfiguration` has
/// it (`Get-VMNetworkAdapter | Select IPAddresses, ...`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterIp {
    /// Address families the guest reported (`addr_family` bits: 1 IPv4, 2 IPv6).
    pub addr_family: u8,
    /// DHCP is on.
    pub dhcp_enabled: bool,
    /// Addresses.
    pub ip_addresses: Vec<String>,
    /// Subnet masks (IPv4 dotted, IPv6 as /prefix).
    pub subnets: Vec<String>,
    /// Default gateways.
    pub default_gateways: Vec<String>,
    /// DNS servers.
    pub dns_servers: Vec<String>,
}

impl AdapterIp {
    /// From the daemon's `;`-separated fields, keeping `family`'s entries.
    pub fn from_info(info: &vmbus::kvp::IpInfo, family: Family) -> AdapterIp {
        AdapterIp {
            addr_family: info.addr_family,
            dhcp_enabled: info.dhcp_enabled != 0,
            ip_addresses: split(&info.ip_addr, family),
            subnets: split(&info.sub_net, family),
            default_gateways: split(&info.gate_way, family),
            dns_servers: split(&info.dns_addr, family),
        }
    }
}

/// A `;`-separated (or space/comma-separated) list; entries of the other family dropped.
fn split(field: &str, family: Family) -> Vec<String> {
    field
        .split([';', ',', ' ', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .filter(|s| keeps(s, family))
        .map(str::to_owned)
        .collect()
}

/// Whether an address or mask belongs to `family`; what is neither is kept.
fn keeps(entry: &str, family: Family) -> bool {
    let v6 = match entry.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => false,
        Ok(IpAddr::V6(_)) => true,
        // "/64" (an IPv6 prefix length) or "fe80::1%eth0".
        Err(_) if entry.starts_with('/') || entry.contains(':') => true,
        Err(_) => return true,
    };
    match family {
        Family::Both => true,
        Family::Ipv4 => !v6,
        Family::Ipv6 => v6,
    }
}

/// One adapter's answer to GET_IP_INFO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterReport {
    /// The adapter id asked for (its MAC address, as the daemon compares it).
    pub adapter: String,
    /// The guest answered success.
    pub ok: bool,
    /// The guest's status, if it answered.
    pub hresult: Option<u32>,
    /// [`status_message`] of it.
    pub meaning: Option<String>,
    /// What went wrong, when not ok.
    pub error: Option<String>,
    /// The configuration, when ok.
    pub ip: Option<AdapterIp>,
}

/// The result of every KVP command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvpReport {
    /// The guest answered success to everything asked.
    pub ok: bool,
    /// "GET", "SET", "DELETE", "ENUMERATE" (also for `list`) or "GET_IP_INFO".
    pub operation: String,
    /// The pool (not for GET_IP_INFO).
    pub pool: Option<u8>,
    /// The guest's status for the last request answered (the failing one on failure).
    pub hresult: Option<u32>,
    /// [`status_message`] of it.
    pub meaning: Option<String>,
    /// What went wrong, in words (`None` on success).
    pub error: Option<String>,
    /// GET: the record; ENUMERATE: the record at the index; `list`: every record.
    pub records: Vec<Record>,
    /// GET_IP_INFO: one per adapter asked about.
    pub adapters: Vec<AdapterReport>,
    /// Anything else worth saying ("adapters found on this machine: ...").
    pub note: Option<String>,
}

/// The operation's name.
pub fn op_name(operation: u8) -> &'static str {
    match operation {
        op::GET => "GET",
        op::SET => "SET",
        op::DELETE => "DELETE",
        op::ENUMERATE => "ENUMERATE",
        op::GET_IP_INFO => "GET_IP_INFO",
        op::SET_IP_INFO => "SET_IP_INFO",
        _ => "?",
    }
}

/// What a guest status means for `operation` (hv_kvp_daemon's codes, kvp-vss.md §4.7).
pub fn status_message(operation: u8, code: u32) -> String {
    match (code, operation) {
        (status::HV_S_OK, _) => "success".to_owned(),
        (status::HV_S_CONT, op::GET | op::DELETE) => "no such record".to_owned(),
        (status::HV_S_CONT, op::ENUMERATE) => "no more records (no such record)".to_owned(),
        (status::HV_S_CONT, op::SET) => {
            "the guest's KVP daemon could not store the record".to_owned()
        }
        (status::HV_E_FAIL, op::GET_IP_INFO) => {
            "failed: the guest has no adapter with that MAC address, or its KVP daemon failed \
             (see its log)"
                .to_owned()
        }
        (status::HV_E_FAIL, _) => "failed: the guest's KVP daemon failed (see its log), is not \
                                   running, or did not answer its driver in time"
            .to_owned(),
        (status::HV_GUID_NOTFOUND, _) => "no such adapter".to_owned(),
        (other, _) => ic::status_meaning(other).to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_by_number_or_name() {
        assert_eq!(parse_pool("3"), Ok(3));
        assert_eq!(parse_pool("auto-external"), Ok(3));
        assert_eq!(parse_pool("external"), Ok(0));
        let err = parse_pool("5").unwrap_err();
        assert!(err.contains("pools are 0-4"), "{err}");
        assert!(parse_pool("-1").is_err());
        assert_eq!(pool_label(2), "pool 2 (auto)");
        assert_eq!(pool_label(9), "pool 9");
    }

    #[test]
    fn status_codes_in_words() {
        assert_eq!(status_message(op::GET, status::HV_S_CONT), "no such record");
        assert_eq!(
            status_message(op::DELETE, status::HV_S_CONT),
            "no such record"
        );
        assert!(status_message(op::ENUMERATE, status::HV_S_CONT).starts_with("no more records"));
        assert!(status_message(op::SET, status::HV_E_FAIL).contains("KVP daemon failed"));
        assert!(status_message(op::GET_IP_INFO, status::HV_E_FAIL).contains("MAC address"));
        assert_eq!(
            status_message(op::SET_IP_INFO, status::HV_GUID_NOTFOUND),
            "no such adapter"
        );
        assert_eq!(status_message(op::GET, status::HV_S_OK), "success");
        assert_eq!(status_message(op::GET, 0x1234), "unknown status");
    }

    #[test]
    fn ip_fields_split_and_filter_by_family() {
        let info = vmbus::kvp::IpInfo {
            adapter_id: "00:15:5D:00:00:01".into(),
            addr_family: 3,
            dhcp_enabled: 1,
            ip_addr: "10.0.0.4;fe80::215:5dff:fe00:1".into(),
            sub_net: "255.255.255.0;/64".into(),
            gate_way: "10.0.0.1".into(),
            dns_addr: "10.0.0.2 fd00::53".into(),
        };
        let both = AdapterIp::from_info(&info, Family::Both);
        assert_eq!(both.ip_addresses, ["10.0.0.4", "fe80::215:5dff:fe00:1"]);
        assert_eq!(both.subnets, ["255.255.255.0", "/64"]);
        assert_eq!(both.dns_servers, ["10.0.0.2", "fd00::53"]);
        assert!(both.dhcp_enabled);
        let v4 = AdapterIp::from_info(&info, Family::Ipv4);
        assert_eq!(v4.ip_addresses, ["10.0.0.4"]);
        assert_eq!(v4.subnets, ["255.255.255.0"]);
        assert_eq!(v4.dns_servers, ["10.0.0.2"]);
        let v6 = AdapterIp::from_info(&info, Family::Ipv6);
        assert_eq!(v6.ip_addresses, ["fe80::215:5dff:fe00:1"]);
        assert_eq!(v6.subnets, ["/64"]);
        assert!(v6.default_gateways.is_empty());
        assert_eq!(Family::Both.wire(), 3);
    }
}
