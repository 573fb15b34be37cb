//! Command line: parsing (clap) and validation into a [`ServerConfig`].

use std::path::PathBuf;

use clap::Parser;
use vmbus::address::BusAddress;

use crate::muxer::DeviceConfig;
use crate::server::ServerConfig;

const AFTER_HELP: &str = "\
Port routing (guest connects to CID 2, port P):
  P == --bus-port      a new Unix connection to the --host socket (fakehost's bus
                       listener); bytes are proxied both ways unchanged, one Unix
                       connection per vsock connection.
  other P, --uds-path  a new Unix connection to the socket <uds-path>_P
                       (the \"hybrid vsock\" convention of Firecracker and
                       rust-vmm's vhost-device-vsock).
  otherwise            refused with RST (the guest's connect() fails), as is any
                       port whose socket cannot be connected.

Host-initiated connections (--uds-path only): connect to the Unix socket
<uds-path>, write \"CONNECT <guest port>\\n\"; once the guest accepts, the backend
writes \"OK <host port>\\n\" and the socket carries the stream. If the guest
refuses, the socket is closed.

QEMU:  -chardev socket,id=c0,path=<socket> -device vhost-user-vsock-pci,chardev=c0
       (plus a shared memory backend, e.g. -object memory-backend-memfd,share=on).
Logs go to stderr (RUST_LOG overrides the default level, info).";

/// A vhost-user virtio-vsock device backend for QEMU guests.
#[derive(Debug, Parser)]
#[command(name = "vhost", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    /// The vhost-user socket to listen on (QEMU connects). Its directory is created; a stale
    /// socket is replaced; mode 0600.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// The guest's CID, served through the device config space (3 .. 4294967294).
    #[arg(long, value_name = "CID")]
    pub guest_cid: u64,

    /// The bus host's listener, `unix:PATH`.
    #[arg(long, value_name = "ADDRESS")]
    pub host: String,

    /// Host vsock port that guests use to reach the bus host.
    #[arg(long, value_name = "PORT", default_value_t = 5000)]
    pub bus_port: u32,

    /// Hybrid-vsock base path: guest connections to other ports go to <PATH>_<port>, and host
    /// clients connect to <PATH> with `CONNECT <port>`.
    #[arg(long, value_name = "PATH")]
    pub uds_path: Option<PathBuf>,

    /// Exit (status 0) after the first VMM disconnects instead of waiting for the next.
    #[arg(long)]
    pub once: bool,
}

/// Invalid command-line values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A reserved CID.
    #[error(
        "guest CID {0} is reserved (0 hypervisor, 1 local, 2 host, 4294967295 any); use 3 or above"
    )]
    ReservedCid(u64),
    /// A CID that does not fit the 32 bits Linux uses.
    #[error("guest CID {0} does not fit in 32 bits")]
    CidTooLarge(u64),
    /// `--host` is not an address.
    #[error("invalid --host: {0}")]
    BadHost(String),
    /// `--host` is a vsock address.
    #[error("the bus host must be a unix: address, not {0}")]
    HostNotUnix(String),
    /// Port u32::MAX is VMADDR_PORT_ANY.
    #[error("--bus-port 4294967295 is VMADDR_PORT_ANY, not a port")]
    BadBusPort,
}

impl Cli {
    /// Validate into a server configuration.
    pub fn into_config(self) -> Result<ServerConfig, ConfigError> {
        let cid = self.guest_cid;
        if cid > u64::from(u32::MAX) {
            return Err(ConfigError::CidTooLarge(cid));
        }
        if cid <= 2 || cid == u64::from(u32::MAX) {
            return Err(ConfigError::ReservedCid(cid));
        }
        if self.bus_port == u32::MAX {
            return Err(ConfigError::BadBusPort);
        }
        let bus_socket = match self.host.parse::<BusAddress>() {
            Ok(BusAddress::Unix(path)) => path,
            Ok(vsock @ BusAddress::Vsock { .. }) => {
                return Err(ConfigError::HostNotUnix(vsock.to_string()))
            }
            Err(e) => return Err(ConfigError::BadHost(e.to_string())),
        };
        Ok(ServerConfig {
            socket: self.socket,
            once: self.once,
            device: DeviceConfig::new(cid, bus_socket, self.bus_port, self.uds_path),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ServerConfig, ConfigError> {
        let mut argv = vec!["vhost", "--socket", "/tmp/v.sock"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().into_config()
    }

    #[test]
    fn defaults_and_values() {
        let cfg = parse(&["--guest-cid", "3", "--host", "unix:/run/cusedev/bus.sock"]).unwrap();
        assert_eq!(cfg.socket, PathBuf::from("/tmp/v.sock"));
        assert_eq!(cfg.device.guest_cid, 3);
        assert_eq!(cfg.device.routes.bus_port, 5000);
        assert_eq!(
            cfg.device.routes.bus_socket,
            PathBuf::from("/run/cusedev/bus.sock")
        );
        assert_eq!(cfg.device.routes.uds_path, None);
        assert!(!cfg.once);
        let cfg = parse(&[
            "--guest-cid",
            "4294967294",
            "--host",
            "unix:/b",
            "--bus-port",
            "7",
            "--uds-path",
            "/tmp/u",
            "--once",
        ])
        .unwrap();
        assert_eq!(cfg.device.guest_cid, u64::from(u32::MAX) - 1);
        assert_eq!(cfg.device.routes.bus_port, 7);
        assert_eq!(cfg.device.routes.uds_path, Some(PathBuf::from("/tmp/u")));
        assert!(cfg.once);
    }

    #[test]
    fn reserved_cids_are_refused() {
        for cid in ["0", "1", "2", "4294967295"] {
            assert!(
                matches!(
                    parse(&["--guest-cid", cid, "--host", "unix:/b"]),
                    Err(ConfigError::ReservedCid(_))
                ),
                "{cid}"
            );
        }
        assert!(matches!(
            parse(&["--guest-cid", "4294967296", "--host", "unix:/b"]),
            Err(ConfigError::CidTooLarge(_))
        ));
    }

    #[test]
    fn host_must_be_unix() {
        let err = parse(&["--guest-cid", "3", "--host", "vsock:2:5000"]).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("the bus host must be a unix: address"));
        assert!(matches!(
            parse(&["--guest-cid", "3", "--host", "/no/scheme"]),
            Err(ConfigError::BadHost(_))
        ));
    }
}
