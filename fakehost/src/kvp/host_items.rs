//! The host's own items, which Hyper-V SETs into pool 3 (KVP_POOL_AUTO_EXTERNAL) of every VM
//! once its KVP daemon is up (on Azure they are what `/var/lib/hyperv/.kvp_pool_3` holds).
//!
//! fakehost plays a Windows Server 2022 Hyper-V host (OS 10.0, no service pack, not nested,
//! processor power settings at their defaults); what describes a real machine comes from this
//! one: its host name, its fully qualified name, its processor architecture. The VM's id is a
//! GUID made once per `fakehost serve` run, its name `--kvp-vm-name`.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use vmbus::guid::Guid;

/// `VirtualMachineName` when `--kvp-vm-name` is not given.
pub const DEFAULT_VM_NAME: &str = "cusedev-guest";

/// The item names, in the order they are pushed (Hyper-V's set, alphabetical).
pub const NAMES: [&str; 16] = [
    "HostName",
    "HostingSystemEditionId",
    "HostingSystemNestedLevel",
    "HostingSystemOsMajor",
    "HostingSystemOsMinor",
    "HostingSystemProcessorArchitecture",
    "HostingSystemProcessorIdleStateMax",
    "HostingSystemProcessorThrottleMax",
    "HostingSystemProcessorThrottleMin",
    "HostingSystemSpMajor",
    "HostingSystemSpMinor",
    "PhysicalHostName",
    "PhysicalHostNameFullyQualified",
    "VirtualMachineDynamicMemoryBalancingEnabled",
    "VirtualMachineId",
    "VirtualMachineName",
];

/// `PRODUCT_DATACENTER_SERVER`: the edition a Hyper-V host reports (Windows Server Datacenter).
const EDITION_DATACENTER: &str = "8";

/// The items as (key, REG_SZ value), in [`NAMES`] order.
pub fn items(host_name: &str, fqdn: &str, vm_id: &str, vm_name: &str) -> Vec<(String, String)> {
    let values = [
        host_name,
        EDITION_DATACENTER,
        "0",
        "10",
        "0",
        processor_architecture(std::env::consts::ARCH),
        "0",
        "100",
        "5",
        "0",
        "0",
        host_name,
        fqdn,
        "0",
        vm_id,
        vm_name,
    ];
    NAMES
        .iter()
        .zip(values)
        .map(|(k, v)| ((*k).to_owned(), v.to_owned()))
        .collect()
}

/// Windows' `PROCESSOR_ARCHITECTURE_*` for a Rust target architecture.
pub fn processor_architecture(arch: &str) -> &'static str {
    match arch {
        "x86" => "0",
        "arm" => "5",
        "x86_64" => "9",
        "aarch64" => "12",
        // PROCESSOR_ARCHITECTURE_UNKNOWN
        _ => "65535",
    }
}

/// This machine's host name (`/proc/sys/kernel/hostname`), "localhost" if unreadable.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The fully qualified name: the host name if it has a dot, else the host name and the first
/// `domain` or `search` domain of `resolv_conf`; the bare host name without either.
pub fn fully_qualified(host_name: &str, resolv_conf: &Path) -> String {
    if host_name.contains('.') {
        return host_name.to_owned();
    }
    let text = std::fs::read_to_string(resolv_conf).unwrap_or_default();
    let domain = text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("domain") | Some("search") => words.next().filter(|d| *d != "."),
            _ => None,
        }
    });
    match domain {
        Some(domain) => format!("{host_name}.{}", domain.trim_end_matches('.')),
        None => host_name.to_owned(),
    }
}

/// A VM id for this run, in Hyper-V's form (upper-case, no braces): made from our pid and the
/// time, unique enough and stable for the process's life.
pub fn new_vm_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = nanos as u64;
    let guid = Guid::from_fields(
        std::process::id() ^ (n >> 32) as u32,
        (n >> 16) as u16,
        // Version nibble 4 and RFC 4122 variant bits, as a random GUID has.
        (n as u16 & 0x0fff) | 0x4000,
        [
            0x80 | (nanos >> 64) as u8 & 0x3f,
            (nanos >> 72) as u8,
            b'f',
            b'a',
            b'k',
            b'e',
            (n >> 8) as u8,
            n as u8,
        ],
    );
    guid.to_string().to_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixteen_items_in_hyper_v_order_with_this_machine_in_them() {
        let items = items("box", "box.example.org", "ID", "vm1");
        assert_eq!(items.len(), 16);
        let keys: Vec<&str> = items.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, NAMES);
        let get = |k: &str| items.iter().find(|(key, _)| key == k).unwrap().1.clone();
        assert_eq!(get("HostName"), "box");
        assert_eq!(get("PhysicalHostName"), "box");
        assert_eq!(get("PhysicalHostNameFullyQualified"), "box.example.org");
        assert_eq!(get("VirtualMachineId"), "ID");
        assert_eq!(get("VirtualMachineName"), "vm1");
        assert_eq!(get("HostingSystemOsMajor"), "10");
        assert!(items.iter().all(|(_, v)| !v.is_empty()));
    }

    #[test]
    fn architectures_map_to_windows_numbers() {
        assert_eq!(processor_architecture("x86_64"), "9");
        assert_eq!(processor_architecture("aarch64"), "12");
        assert_eq!(processor_architecture("riscv64"), "65535");
    }

    #[test]
    fn fqdn_from_the_name_or_resolv_conf() {
        let dir = crate::test_support::TempDir::new("kvp-fqdn");
        let conf = dir.path().join("resolv.conf");
        assert_eq!(fully_qualified("a.b.c", &conf), "a.b.c");
        assert_eq!(fully_qualified("box", &conf), "box");
        std::fs::write(&conf, "nameserver 1.1.1.1\nsearch corp.example. other\n").unwrap();
        assert_eq!(fully_qualified("box", &conf), "box.corp.example");
    }

    #[test]
    fn vm_ids_look_like_hyper_v_ones() {
        let id = new_vm_id();
        assert_eq!(id.len(), 36, "{id}");
        assert_eq!(id, id.to_uppercase());
        assert_eq!(id.matches('-').count(), 4, "{id}");
    }
}
