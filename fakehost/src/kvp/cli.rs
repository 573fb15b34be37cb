//! `fakehost kvp`: the KVP service's subcommands, and its option of `fakehost serve`
//! (`--kvp-vm-name`). They talk to the running `fakehost serve` through its control socket
//! ([`super::command`]).
//!
//! Exit status: 0 the guest answered success; 1 the guest said no (no such record, its daemon
//! failed) or did not answer; 2 usage error or fakehost not reachable.

use std::path::Path;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::command::KvpCommand;
use super::host_items::DEFAULT_VM_NAME;
use super::report::{parse_pool, pool_label, AdapterReport, Family, KvpReport, ValueType};
use crate::cli::{subcommand, usage_error, EXIT_GUEST_FAILED};
use crate::control::client::Client;
use crate::control::proto::Response;
use crate::service::ServiceCli;

/// The table's hook for the kvp subcommands.
pub const CLI: ServiceCli = ServiceCli {
    augment: |cmd| KvpCli::augment_subcommands(cmd),
    run,
    serve_args: |serve| KvpServeArgs::augment_args(serve),
};

// KVP's option of `fakehost serve`.
#[derive(Debug, Args)]
pub struct KvpServeArgs {
    /// VirtualMachineName the KVP host pushes into the guest's pool 3 (with HostName,
    /// VirtualMachineId and the other host items)
    #[arg(long, value_name = "NAME", default_value = DEFAULT_VM_NAME)]
    kvp_vm_name: String,
}

/// The VM name `fakehost serve`'s options give, or the default.
pub fn vm_name(serve_args: &clap::ArgMatches) -> String {
    match serve_args.try_get_one::<String>("kvp_vm_name") {
        Ok(Some(name)) => name.clone(),
        _ => DEFAULT_VM_NAME.to_owned(),
    }
}

const POOL_HELP: &str = "The pool: 0 external (host → guest data), 1 guest (guest → host \
                         data), 2 auto (the guest's intrinsic data, made by its daemon), 3 \
                         auto-external (this host's intrinsic data), 4 auto-internal; by number \
                         or name";

#[derive(Debug, Subcommand)]
enum KvpCli {
    /// Read and write the guest's KVP pools, as Hyper-V's KVP exchange does.
    ///
    /// Each request goes to the guest's hv_kvp driver and its hv_kvp_daemon, which keeps the
    /// pools in /var/lib/hyperv/.kvp_pool_0 .. _4 (pool 2 it makes up on the fly). The guest
    /// answers once its daemon has registered; until then a request waits up to the step
    /// timeout of `fakehost serve`. Exit status: 0 success, 1 the guest said no (no such
    /// record, daemon failure) or did not answer, 2 usage error or fakehost not reachable.
    #[command(after_help = "Examples:\n  \
        fakehost kvp list --pool auto          # the guest's FQDN, OS name, IP addresses...\n  \
        fakehost kvp set --pool 0 Color blue\n  \
        fakehost kvp get --pool 0 Color\n  \
        fakehost kvp delete --pool 0 Color\n  \
        fakehost kvp list --pool 3             # what this host pushed (HostName, ...)\n  \
        fakehost kvp ip --adapter 00:15:5D:00:04:01 --family ipv4")]
    Kvp {
        #[command(subcommand)]
        command: KvpSubcommand,
    },
}

#[derive(Debug, Args)]
struct PoolArg {
    #[arg(long, value_name = "N", value_parser = parse_pool, help = POOL_HELP)]
    pool: u8,
}

#[derive(Debug, Subcommand)]
enum KvpSubcommand {
    /// Every record of a pool, one KEY=VALUE line each (ENUMERATE 0, 1, 2, ... until the
    /// daemon says there are no more)
    List {
        #[command(flatten)]
        pool: PoolArg,
        /// Print the raw JSON answer
        #[arg(long)]
        json: bool,
    },
    /// Print the value of KEY (exit 1 if the pool has no such record).
    ///
    /// The value is found by enumerating the pool, as a Hyper-V host reads a guest's items.
    /// `--raw` sends one KVP_OP_GET instead and prints what the guest's driver answers: through
    /// a Linux 6.1 guest that is always an empty value for a key that exists (the 6.1 hv_kvp
    /// driver forwards no value size, so hv_kvp_daemon copies nothing and answers success; the
    /// driver would also read the value 4 bytes too far), and HV_S_CONT for one that does not.
    Get {
        #[command(flatten)]
        pool: PoolArg,
        /// The key
        key: String,
        /// Send KVP_OP_GET itself and print the guest's answer, empty as it is on Linux 6.1
        #[arg(long)]
        raw: bool,
        /// Print the raw JSON answer
        #[arg(long)]
        json: bool,
    },
    /// Set KEY to VALUE (the guest driver stores every type as text: u32 42 reads back "42")
    Set {
        #[command(flatten)]
        pool: PoolArg,
        /// The key (at most 255 UTF-16 units)
        key: String,
        /// The value (a string of at most 1023 UTF-16 units, or a number for u32/u64)
        value: String,
        /// How VALUE travels: REG_SZ, REG_U32 or REG_U64
        #[arg(long = "type", value_enum, default_value = "sz")]
        value_type: CliType,
        /// Print the raw JSON answer
        #[arg(long)]
        json: bool,
    },
    /// Delete KEY (exit 1 if the pool has no such record)
    Delete {
        #[command(flatten)]
        pool: PoolArg,
        /// The key
        key: String,
        /// Print the raw JSON answer
        #[arg(long)]
        json: bool,
    },
    /// The record at INDEX of a pool (one ENUMERATE; exit 1 past the last)
    Enumerate {
        #[command(flatten)]
        pool: PoolArg,
        /// The index (0 first)
        index: u32,
        /// Print the raw JSON answer
        #[arg(long)]
        json: bool,
    },
    /// A guest adapter's IP addresses, subnets, gateways, DNS servers and DHCP state
    /// (GET_IP_INFO), like `Get-VMNetworkAdapter | Select IPAddresses`.
    ///
    /// The guest's daemon finds the adapter by its MAC address. Without --adapter, every
    /// adapter is asked about if the guest is this machine (cusedev on this kernel: its
    /// adapters are /sys/class/net's); a guest in a VM cannot be asked which adapters it has,
    /// so name one. The 6.1 daemon always answers both families; --family filters what is
    /// shown.
    #[command(after_help = "Examples:\n  \
        fakehost kvp ip\n  \
        fakehost kvp ip --adapter 00:15:5d:00:04:01 --family ipv6")]
    Ip {
        /// The adapter's MAC address (00:15:5D:00:04:01; any case, ':' or '-' or none)
        #[arg(long, value_name = "MAC")]
        adapter: Option<String>,
        /// Which addresses to show
        #[arg(long, value_enum, default_value = "both")]
        family: CliFamily,
        /// Print the raw JSON answer
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CliType {
    /// REG_SZ: a string
    Sz,
    /// REG_U32: a 32-bit number
    U32,
    /// REG_U64: a 64-bit number
    U64,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CliFamily {
    /// IPv4 only
    Ipv4,
    /// IPv6 only
    Ipv6,
    /// Both
    Both,
}

fn run(matches: &clap::ArgMatches, control: &Path) -> Option<ExitCode> {
    let KvpCli::Kvp { command } = subcommand::<KvpCli>(matches)?;
    Some(match command {
        KvpSubcommand::List { pool, json } => {
            let pool = pool.pool;
            ask(control, "kvp list", KvpCommand::List { pool }, json, |r| {
                for record in &r.records {
                    println!("{}={}", record.key, record.value);
                }
                if r.records.is_empty() {
                    eprintln!("fakehost kvp list: {} is empty", pool_label(pool));
                }
            })
        }
        KvpSubcommand::Get {
            pool,
            key,
            raw,
            json,
        } => ask(
            control,
            "kvp get",
            KvpCommand::Get {
                pool: pool.pool,
                key,
                raw,
            },
            json,
            |r| {
                for record in &r.records {
                    println!("{}", record.value);
                }
            },
        ),
        KvpSubcommand::Set {
            pool,
            key,
            value,
            value_type,
            json,
        } => {
            let value_type = match value_type {
                CliType::Sz => ValueType::Sz,
                CliType::U32 => ValueType::U32,
                CliType::U64 => ValueType::U64,
            };
            if let Err(e) = super::command::typed_value(&value, value_type) {
                return Some(usage_error("kvp set", e));
            }
            let pool = pool.pool;
            let shown = key.clone();
            ask(
                control,
                "kvp set",
                KvpCommand::Set {
                    pool,
                    key,
                    value,
                    value_type,
                },
                json,
                |_| println!("set {shown:?} in {}", pool_label(pool)),
            )
        }
        KvpSubcommand::Delete { pool, key, json } => {
            let pool = pool.pool;
            let shown = key.clone();
            ask(
                control,
                "kvp delete",
                KvpCommand::Delete { pool, key },
                json,
                |_| println!("deleted {shown:?} from {}", pool_label(pool)),
            )
        }
        KvpSubcommand::Enumerate { pool, index, json } => ask(
            control,
            "kvp enumerate",
            KvpCommand::Enumerate {
                pool: pool.pool,
                index,
            },
            json,
            |r| {
                for record in &r.records {
                    println!("{}={}", record.key, record.value);
                }
            },
        ),
        KvpSubcommand::Ip {
            adapter,
            family,
            json,
        } => {
            if let Some(mac) = &adapter {
                if let Err(e) = super::ops::normalize_mac(mac) {
                    return Some(usage_error("kvp ip", e));
                }
            }
            let family = match family {
                CliFamily::Ipv4 => Family::Ipv4,
                CliFamily::Ipv6 => Family::Ipv6,
                CliFamily::Both => Family::Both,
            };
            ask(
                control,
                "kvp ip",
                KvpCommand::Ip { adapter, family },
                json,
                |r| print!("{}", ip_text(r)),
            )
        }
    })
}

/// Sends one command; prints its answer as JSON or with `print` (on success; a failure goes
/// to stderr) and picks the exit status.
fn ask(
    control: &Path,
    what: &str,
    command: KvpCommand,
    json: bool,
    print: impl FnOnce(&KvpReport),
) -> ExitCode {
    let result = match request(control, what, command) {
        Ok(result) => result,
        Err(code) => return code,
    };
    let report = match serde_json::from_value::<KvpReport>(result.clone()) {
        Ok(report) => report,
        Err(e) => return usage_error(what, format!("unreadable answer from fakehost: {e}")),
    };
    if json {
        match serde_json::to_string_pretty(&result) {
            Ok(text) => println!("{text}"),
            Err(e) => return usage_error(what, e),
        }
    } else if report.ok {
        print(&report);
    } else {
        // GET_IP_INFO may have answers for some adapters.
        if !report.adapters.is_empty() {
            print!("{}", ip_text(&report));
        }
        eprintln!(
            "fakehost {what}: {}",
            report.error.as_deref().unwrap_or("the guest said no")
        );
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_GUEST_FAILED)
    }
}

fn request(control: &Path, what: &str, command: KvpCommand) -> Result<serde_json::Value, ExitCode> {
    let mut client = Client::connect(control).map_err(|e| usage_error(what, e))?;
    client
        .send(&command.into_request(), None)
        .map_err(|e| usage_error(what, e))?;
    match client.final_response() {
        Ok(Response::Result { result }) => Ok(result),
        Ok(Response::Error { error }) => Err(usage_error(what, error)),
        Ok(other) => Err(usage_error(
            what,
            format!("unexpected answer from fakehost: {other:?}"),
        )),
        Err(e) => Err(usage_error(what, e)),
    }
}

/// `fakehost kvp ip`'s text: one block per adapter.
///
/// ```text
/// adapter 00:15:5D:00:04:01
///   IPAddresses      10.0.0.4, fe80::215:5dff:fe00:401
///   Subnets          255.255.255.0, /64
///   DefaultGateways  10.0.0.1
///   DNSServers       168.63.129.16
///   DHCPEnabled      True
/// ```
pub fn ip_text(report: &KvpReport) -> String {
    let mut out = String::new();
    if let Some(note) = &report.note {
        out.push_str(&format!("# {note}\n"));
    }
    for adapter in &report.adapters {
        out.push_str(&adapter_text(adapter));
    }
    out
}

fn adapter_text(adapter: &AdapterReport) -> String {
    let mut out = format!("adapter {}\n", adapter.adapter);
    match &adapter.ip {
        Some(ip) => {
            let list = |items: &[String]| {
                if items.is_empty() {
                    "-".to_owned()
                } else {
                    items.join(", ")
                }
            };
            for (name, value) in [
                ("IPAddresses", list(&ip.ip_addresses)),
                ("Subnets", list(&ip.subnets)),
                ("DefaultGateways", list(&ip.default_gateways)),
                ("DNSServers", list(&ip.dns_servers)),
                (
                    "DHCPEnabled",
                    if ip.dhcp_enabled { "True" } else { "False" }.to_owned(),
                ),
            ] {
                out.push_str(&format!("  {name:<16} {value}\n"));
            }
        }
        None => out.push_str(&format!(
            "  error            {}\n",
            adapter.error.as_deref().unwrap_or("no answer")
        )),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvp::report::AdapterIp;

    #[test]
    fn ip_text_reads_like_get_vmnetworkadapter() {
        let report = KvpReport {
            ok: false,
            operation: "GET_IP_INFO".into(),
            adapters: vec![
                AdapterReport {
                    adapter: "00:15:5D:00:04:01".into(),
                    ok: true,
                    hresult: Some(0),
                    meaning: Some("success".into()),
                    error: None,
                    ip: Some(AdapterIp {
                        addr_family: 3,
                        dhcp_enabled: true,
                        ip_addresses: vec!["10.0.0.4".into(), "fe80::1".into()],
                        subnets: vec!["255.255.255.0".into(), "/64".into()],
                        default_gateways: vec!["10.0.0.1".into()],
                        dns_servers: vec![],
                    }),
                },
                AdapterReport {
                    adapter: "AA:BB:CC:DD:EE:FF".into(),
                    ok: false,
                    hresult: Some(0x8000_4005),
                    meaning: None,
                    error: Some("GET_IP_INFO AA:BB:CC:DD:EE:FF: no".into()),
                    ip: None,
                },
            ],
            note: Some("here".into()),
            ..KvpReport::default()
        };
        assert_eq!(
            ip_text(&report),
            "# here\n\
             adapter 00:15:5D:00:04:01\n  \
               IPAddresses      10.0.0.4, fe80::1\n  \
               Subnets          255.255.255.0, /64\n  \
               DefaultGateways  10.0.0.1\n  \
               DNSServers       -\n  \
               DHCPEnabled      True\n\
             adapter AA:BB:CC:DD:EE:FF\n  \
               error            GET_IP_INFO AA:BB:CC:DD:EE:FF: no\n"
        );
    }
}
