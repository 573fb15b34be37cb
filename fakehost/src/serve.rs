//! `fakehost serve`: the service table, the bus socket, the control socket and the threads
//! behind them.
//!
//! [`SERVICES`] is the host side's driver table (DESIGN.md "The driver table"): one row per
//! device class. Adding a device class on the host is its module under `fakehost/src/`
//! implementing [`ServiceClass`] and one `ServiceRow::of::<…>()` line here; the bus, the
//! control protocol and the CLI take everything else (names, offers, commands, status) from
//! the row.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmbus::address::BusAddress;

use crate::bus::{self, Bus, Registered};
use crate::control::server::{self as control_server, Control};
use crate::fcopy::FcopyHost;
use crate::kvp::KvpHost;
use crate::lguest::LguestHost;
use crate::service::{HostService, Offer, ServiceClass, ServiceCli, ServiceConfig, UnknownService};
use crate::sockets::{self, SocketError};
use crate::vss::VssHost;
use crate::xs::XsHost;

/// The device classes this host serves, in the order offers are sent.
pub const SERVICES: &[ServiceRow] = &[
    // Hyper-V guest file copy: /dev/vmbus/hv_fcopy and hv_fcopy_daemon.
    ServiceRow::of::<FcopyHost>(),
    // Hyper-V key-value pair exchange: /dev/vmbus/hv_kvp and hv_kvp_daemon.
    ServiceRow::of::<KvpHost>(),
    // Hyper-V live backup: /dev/vmbus/hv_vss and hv_vss_daemon (freeze, thaw, check).
    ServiceRow::of::<VssHost>(),
    // Azure XStore fastpath: /dev/azure_xs_fastpath, blobs in --blob-root/--blob-store.
    ServiceRow::of::<XsHost>(),
    // lguest Guests for /dev/lguest launchers: each runs the --lguest-guest script.
    ServiceRow::of::<LguestHost>(),
];

/// One row of [`SERVICES`].
#[derive(Debug, Clone, Copy)]
pub struct ServiceRow {
    /// The offer (name, class GUID, instance GUID).
    pub offer: Offer,
    /// Offered when `fakehost serve` gets no `--offer`.
    pub offered_by_default: bool,
    /// Extra `fakehost` subcommands.
    pub cli: Option<ServiceCli>,
    build: fn(&ServiceConfig) -> Result<Arc<dyn HostService>, String>,
}

impl ServiceRow {
    /// The row of device class `T`.
    pub const fn of<T: ServiceClass>() -> ServiceRow {
        ServiceRow {
            offer: T::OFFER,
            offered_by_default: T::OFFERED_BY_DEFAULT,
            cli: T::CLI,
            build: build::<T>,
        }
    }

    /// A fresh service of this class, or why it cannot run.
    pub fn build(&self, config: &ServiceConfig) -> Result<Arc<dyn HostService>, String> {
        (self.build)(config)
    }
}

fn build<T: ServiceClass>(config: &ServiceConfig) -> Result<Arc<dyn HostService>, String> {
    T::new(config).map(|service| Arc::new(service) as Arc<dyn HostService>)
}

/// Every service name, in table order.
pub fn service_names() -> Vec<&'static str> {
    SERVICES.iter().map(|r| r.offer.name).collect()
}

/// The names offered when `--offer` is not given.
pub fn default_offers() -> Vec<String> {
    SERVICES
        .iter()
        .filter(|r| r.offered_by_default)
        .map(|r| r.offer.name.to_owned())
        .collect()
}

/// The table index of service `name`, or an error listing the names there are.
pub fn find_service(name: &str) -> Result<usize, UnknownService> {
    SERVICES
        .iter()
        .position(|r| r.offer.name == name)
        .ok_or_else(|| UnknownService {
            name: name.to_owned(),
            known: service_names(),
        })
}

/// Mode of the bus socket: the guest side (cusedev, root) and members of the socket's group.
pub const BUS_SOCKET_MODE: u32 = 0o660;
/// Mode of the control socket: whoever runs `fakehost serve` only (root): the control socket
/// copies files into the guest as root, so it is not for everyone.
pub const CONTROL_SOCKET_MODE: u32 = 0o600;

/// What to serve.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The bus address (`unix:/run/cusedev/bus.sock`).
    pub listen: BusAddress,
    /// The control socket path.
    pub control: PathBuf,
    /// Services offered from the start, by name (see [`SERVICES`]).
    pub offers: Vec<String>,
    /// How long the guest has to answer one request (one fcopy step).
    pub step_timeout: Duration,
    /// `serve`'s parsed options, the services' own among them ([`ServiceConfig::serve_args`]).
    pub serve_args: clap::ArgMatches,
}

/// `fakehost serve`'s options as the services add them, parsed from `words` (the options
/// only, no program or subcommand name): what a test or an embedding program passes as
/// [`HostConfig::serve_args`].
pub fn parse_serve_options(words: &[&str]) -> Result<clap::ArgMatches, clap::Error> {
    with_serve_options(clap::Command::new("serve").no_binary_name(true)).try_get_matches_from(words)
}

/// Adds every service's own options to the `serve` command.
pub fn with_serve_options(serve: clap::Command) -> clap::Command {
    SERVICES
        .iter()
        .filter_map(|row| row.cli)
        .fold(serve, |serve, cli| (cli.serve_args)(serve))
}

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The host side of a vsock bus is the vhost backend: it terminates the guest's
    /// virtio-vsock device and connects each stream to our Unix listener.
    #[error(
        "cannot listen on {0}: fakehost listens on unix: addresses only. For a QEMU guest, \
         listen on unix:PATH and run `vhost --host unix:PATH ...`, which hands every guest \
         stream to port 5000 of the host (CID 2) to that socket"
    )]
    VsockUnsupported(String),
    /// An `offers` name that is not in the table.
    #[error("{0}")]
    UnknownService(UnknownService),
    /// Both sockets on one path.
    #[error("the bus socket and the control socket must be different paths ({0})")]
    SamePath(PathBuf),
    /// The bus socket could not be set up.
    #[error("bus socket: {0}")]
    Bus(SocketError),
    /// The control socket could not be set up.
    #[error("control socket: {0}")]
    Control(SocketError),
    /// A service cannot run (its store is unusable, ...).
    #[error("cannot start the {service} service: {reason}")]
    Service {
        /// The service's name.
        service: &'static str,
        /// Why.
        reason: String,
    },
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(io::Error),
}

/// A socket file we created, remembered by inode so we never delete someone else's.
#[derive(Debug)]
struct OwnedSocketFile {
    path: PathBuf,
    dev_ino: Option<(u64, u64)>,
}

impl OwnedSocketFile {
    fn new(path: &Path) -> OwnedSocketFile {
        let dev_ino = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        OwnedSocketFile {
            path: path.to_owned(),
            dev_ino,
        }
    }

    fn remove(&self) {
        let current = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if current.is_some() && current == self.dev_ino {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// A running host. Dropping it stops the listeners and removes the socket files.
pub struct RunningHost {
    bus: Arc<Bus>,
    files: Vec<OwnedSocketFile>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl RunningHost {
    /// Binds both sockets and starts accepting.
    pub fn start(config: &HostConfig) -> Result<RunningHost, ServeError> {
        let mut offered = config
            .offers
            .iter()
            .map(|name| find_service(name))
            .collect::<Result<Vec<usize>, _>>()
            .map_err(ServeError::UnknownService)?;
        offered.sort_unstable();
        offered.dedup();
        let bus_path = match &config.listen {
            BusAddress::Unix(path) => path.clone(),
            other => return Err(ServeError::VsockUnsupported(other.to_string())),
        };
        if bus_path == config.control {
            return Err(ServeError::SamePath(bus_path));
        }
        // Services first: one that cannot run (an unusable blob store) stops us before any
        // socket exists.
        let service_config = ServiceConfig {
            step_timeout: config.step_timeout,
            serve_args: config.serve_args.clone(),
        };
        let services = SERVICES
            .iter()
            .map(|row| {
                let service = row
                    .build(&service_config)
                    .map_err(|reason| ServeError::Service {
                        service: row.offer.name,
                        reason,
                    })?;
                Ok(Registered {
                    offer: row.offer,
                    service,
                })
            })
            .collect::<Result<Vec<_>, ServeError>>()?;
        sockets::prepare_socket_path(&bus_path).map_err(ServeError::Bus)?;
        let bus_listener =
            sockets::bind_listener(&bus_path, BUS_SOCKET_MODE).map_err(ServeError::Bus)?;
        let bus_file = OwnedSocketFile::new(&bus_path);
        let control_listener = sockets::prepare_socket_path(&config.control)
            .and_then(|()| sockets::bind_listener(&config.control, CONTROL_SOCKET_MODE));
        let control_listener = match control_listener {
            Ok(listener) => listener,
            Err(e) => {
                bus_file.remove();
                return Err(ServeError::Control(e));
            }
        };
        let control_file = OwnedSocketFile::new(&config.control);

        let bus = Bus::new(&offered, services);
        let control = Arc::new(Control {
            bus: Arc::clone(&bus),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut host = RunningHost {
            bus: Arc::clone(&bus),
            files: vec![bus_file, control_file],
            stop: Arc::clone(&stop),
            threads: Vec::new(),
        };
        let bus_stop = Arc::clone(&stop);
        host.spawn("bus-accept", move || {
            bus::listener::run(bus, bus_listener, bus_stop)
        })?;
        host.spawn("control-accept", move || {
            control_server::run(control, control_listener, stop)
        })?;
        log::info!(
            "listening: bus on unix:{} (mode {BUS_SOCKET_MODE:o}), control on {} (mode \
             {CONTROL_SOCKET_MODE:o}); offering {}; step timeout {} s",
            bus_path.display(),
            config.control.display(),
            if offered.is_empty() {
                "nothing".to_owned()
            } else {
                offered
                    .iter()
                    .map(|&i| SERVICES[i].offer.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            config.step_timeout.as_secs_f64()
        );
        Ok(host)
    }

    fn spawn(&mut self, name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), ServeError> {
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(f)
            .map_err(ServeError::Thread)?;
        self.threads.push(handle);
        Ok(())
    }

    /// The bus.
    pub fn bus(&self) -> &Arc<Bus> {
        &self.bus
    }

    /// Stops accepting and removes the socket files. Connected streams are left to the
    /// process's exit.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if self.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake each accept loop so it sees the flag. The threads are not joined: if someone
        // removed a socket file the wake-up cannot arrive, and waiting forever would be worse
        // than leaving a thread blocked in accept() until the process exits.
        for file in &self.files {
            let _ = UnixStream::connect(&file.path);
        }
        self.threads.clear();
        for file in &self.files {
            file.remove();
        }
    }
}

impl Drop for RunningHost {
    fn drop(&mut self) {
        self.stop_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_and_class_guids_are_unique() {
        let mut names = service_names();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SERVICES.len());
        for (i, row) in SERVICES.iter().enumerate() {
            assert!(
                SERVICES[..i]
                    .iter()
                    .all(|r| r.offer.class != row.offer.class),
                "{} shares a class GUID",
                row.offer.name
            );
            assert_eq!(find_service(row.offer.name), Ok(i));
        }
    }

    #[test]
    fn unknown_service_name_lists_the_table() {
        let err = find_service("kvp2").unwrap_err();
        assert_eq!(err.known, service_names());
        assert!(err.to_string().contains("fcopy"), "{err}");
    }

    #[test]
    fn every_service_builds_and_reports_status_before_any_guest() {
        let dir = crate::test_support::TempDir::new("serve-build");
        let config = ServiceConfig {
            step_timeout: Duration::from_secs(1),
            serve_args: crate::serve::parse_serve_options(&[
                "--blob-root",
                dir.path().join("blobs").to_str().unwrap(),
            ])
            .unwrap(),
        };
        for row in SERVICES {
            let status = row.build(&config).unwrap().status();
            assert!(!status.summary.is_empty(), "{}", row.offer.name);
            assert!(status.state.is_object(), "{}", row.offer.name);
        }
    }

    #[test]
    fn unknown_offer_refuses_to_start_and_names_the_known_services() {
        let dir = crate::test_support::TempDir::new("serve-unknown");
        let err = RunningHost::start(&HostConfig {
            listen: BusAddress::Unix(dir.path().join("bus.sock")),
            control: dir.path().join("ctl.sock"),
            offers: vec!["fcopy".into(), "teleport".into()],
            step_timeout: Duration::from_secs(1),
            serve_args: crate::serve::parse_serve_options(&[
                "--blob-root",
                dir.path().join("blobs").to_str().unwrap(),
            ])
            .unwrap(),
        })
        .err()
        .expect("started with an unknown service");
        assert!(
            err.to_string()
                .starts_with("unknown service \"teleport\": fakehost serves fcopy"),
            "{err}"
        );
        assert!(!dir.path().join("bus.sock").exists());
    }

    #[test]
    fn unusable_blob_store_refuses_to_start_before_any_socket() {
        let dir = crate::test_support::TempDir::new("serve-store");
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        let err = RunningHost::start(&HostConfig {
            listen: BusAddress::Unix(dir.path().join("bus.sock")),
            control: dir.path().join("ctl.sock"),
            offers: vec!["xs".into()],
            step_timeout: Duration::from_secs(1),
            serve_args: crate::serve::parse_serve_options(&[
                "--blob-root",
                dir.path().join("file/blobs").to_str().unwrap(),
            ])
            .unwrap(),
        })
        .err()
        .expect("started over a blob root inside a file");
        let text = err.to_string();
        assert!(
            text.starts_with("cannot start the xs service: blob root ")
                && text.contains("cannot create it"),
            "{text}"
        );
        assert!(!dir.path().join("bus.sock").exists());
        assert!(!dir.path().join("ctl.sock").exists());
    }
}
