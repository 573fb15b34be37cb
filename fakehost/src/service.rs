//! What a host service is: the seam between the bus, the control socket and one device class.
//!
//! A device class on the host side is one module (`fcopy/`, later `kvp/`, `vss/`, `xs/`,
//! `lguest/`) that implements [`HostService`] and [`ServiceClass`], plus one row in
//! [`crate::serve::SERVICES`]. Nothing else names it: the bus offers what the table lists and
//! hands each channel stream to its row's service, the control socket routes `offer`,
//! `rescind`, `status` and service commands by name, and the CLI takes its service names and
//! extra subcommands from the table. This is the host-side twin of the kernel's
//! `util_id_table` (drivers/hv/hv_util.c) and of openvmm's simple vmbus devices, whose
//! `offer()` describes themselves.
//!
//! Reading order: this file, then [`crate::serve`] (the table), then [`crate::ic`] (the IC
//! negotiation every Hyper-V util service shares), then a service, e.g. [`crate::fcopy`].

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmbus::guest_memory::MemoryMessage;
use vmbus::guid::Guid;
use vmbus::packet::Packet;

use crate::bus::ChannelLink;

/// How a device class shows itself on the bus: what OFFERCHANNEL says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    /// The short name used on the command line, in the control protocol and in logs.
    pub name: &'static str,
    /// One line for `--help` and logs ("guest file copy (hv_fcopy, Copy-VMFile)").
    pub summary: &'static str,
    /// The channel class GUID sent as `if_type`.
    pub class: Guid,
    /// Where the `if_instance` GUID comes from.
    pub instance: InstanceGuid,
}

/// The `if_instance` GUID of a service's offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceGuid {
    /// A fresh GUID for every offer: a re-offer after a rescind is a new device to the guest,
    /// as with Hyper-V's util services.
    PerOffer,
    /// Always this one (a device whose guest side keys state on the instance).
    Fixed(Guid),
}

/// What every service is built from: `fakehost serve`'s options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// How long the guest has to answer one host request before the operation fails.
    pub step_timeout: Duration,
    /// `fakehost serve`'s parsed options, the services' own among them (those each added with
    /// [`ServiceCli::serve_args`], e.g. xs's `--blob-root`). A service reads its own with
    /// `try_get_one`; in a config built without them (`ArgMatches::default()`) it takes its
    /// defaults. [`crate::serve::parse_serve_options`] builds one from words.
    pub serve_args: clap::ArgMatches,
}

/// The host side of one device class, called by the bus (channel protocol) and by the
/// control server (commands, status).
///
/// Threads: the bus calls `attached` once per channel stream, then `packet` for every packet,
/// then `detached` once when that stream ends for any reason, all on the stream's reader
/// thread. `command` and `status` run on control connections' threads, concurrently with it.
pub trait HostService: Send + Sync {
    /// A channel stream was attached: the service may start sending (e.g. NEGOTIATE).
    fn attached(&self, link: ChannelLink);
    /// A well-framed VMBus packet arrived on the link with this id. Anything in it may be
    /// hostile: log and ignore, never panic.
    fn packet(&self, link_id: u64, packet: &Packet<'_>);
    /// A guest memory message (the guest's DATA answering this service's READ) arrived on
    /// the link. Same threading and trust as [`HostService::packet`]. The default: this
    /// service reads no guest pages.
    fn memory(&self, link_id: u64, message: &MemoryMessage<'_>) {
        let _ = link_id;
        log::warn!(
            "guest sent a memory message to a service that reads no pages: {message:?}; dropped"
        );
    }
    /// The link's stream ended (closed, rescinded, guest gone): fail what waits on it.
    fn detached(&self, link_id: u64);

    /// A service-specific control command (`{"op":"service","service":NAME,"command":...}`).
    /// The default: this service has none.
    fn command(
        &self,
        command: serde_json::Value,
        ctx: CommandContext<'_>,
    ) -> Result<serde_json::Value, CommandError> {
        let _ = (command, ctx);
        Err(CommandError::NoCommands)
    }

    /// Its part of `fakehost status`.
    fn status(&self) -> ServiceStatus;
}

/// A device class as the table builds it: its offer, its CLI and a constructor.
///
/// Separate from [`HostService`] because the bus and the control server hold services as
/// `dyn HostService`, and constants and constructors do not fit a trait object.
pub trait ServiceClass: HostService + Sized + 'static {
    /// The offer.
    const OFFER: Offer;
    /// Offered by `fakehost serve` when no `--offer` is given.
    const OFFERED_BY_DEFAULT: bool;
    /// Extra `fakehost` subcommands that drive this service (fcopy's `copy`).
    const CLI: Option<ServiceCli> = None;
    /// A fresh service, or why it cannot run (`fakehost serve` then refuses to start, with
    /// this reason).
    fn new(config: &ServiceConfig) -> Result<Self, String>;
}

/// A service's extra subcommands on the `fakehost` command line.
#[derive(Debug, Clone, Copy)]
pub struct ServiceCli {
    /// Adds the subcommands to the `fakehost` command.
    pub augment: fn(clap::Command) -> clap::Command,
    /// Runs the chosen subcommand if it is one of this service's (`None` if not), given the
    /// whole command line's matches and the control socket path.
    pub run: fn(&clap::ArgMatches, &Path) -> Option<ExitCode>,
    /// Adds the service's own options to `fakehost serve` (it reads them back from
    /// [`ServiceConfig::serve_args`]); [`ServiceCli::NO_SERVE_ARGS`] for none.
    pub serve_args: fn(clap::Command) -> clap::Command,
}

impl ServiceCli {
    /// A service whose `serve` takes no options of its own.
    pub const NO_SERVE_ARGS: fn(clap::Command) -> clap::Command = |serve| serve;
}

/// What a service command gets besides its JSON: the request's descriptors, whether the
/// service is offered, and a way to report progress on long operations.
pub struct CommandContext<'a> {
    /// The service is offered (not rescinded).
    pub offered: bool,
    /// Descriptors that came with the request line (SCM_RIGHTS), e.g. fcopy's source file.
    pub fds: Vec<OwnedFd>,
    /// Sends progress lines to the client.
    pub progress: &'a mut dyn ProgressSink,
}

/// Where a long command reports its progress (the control connection).
pub trait ProgressSink {
    /// How often the command should report; more often is throttled anyway.
    fn interval(&self) -> Duration;
    /// Reports `done` of `total`. `false`: the client went away, so the command should stop.
    fn report(&mut self, done: u64, total: u64) -> bool;
}

/// Why a service command was refused before it started (the CLI's usage errors, exit 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The service takes no commands.
    #[error("this service takes no commands")]
    NoCommands,
    /// The command is not one the service knows, or its fields are wrong.
    #[error("malformed command: {0}")]
    Malformed(String),
    /// A well-formed command that cannot run now, with the reason.
    #[error("{0}")]
    Refused(String),
}

impl CommandError {
    /// A service's command out of its JSON; anything else is [`CommandError::Malformed`].
    pub fn parse<T: serde::de::DeserializeOwned>(command: serde_json::Value) -> Result<T, Self> {
        serde_json::from_value(command).map_err(|e| CommandError::Malformed(e.to_string()))
    }
}

/// A service's part of `fakehost status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// One line for people ("channel attached, negotiation agreed (...), idle").
    pub summary: String,
    /// The service's own state, for `fakehost status --json` readers.
    pub state: serde_json::Value,
}

/// A service name that is not in the table; the message lists the names that are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown service {name:?}: fakehost serves {}", known.join(", "))]
pub struct UnknownService {
    /// The name asked for.
    pub name: String,
    /// The names in the table.
    pub known: Vec<&'static str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_service_names_it_and_the_known_ones() {
        let err = UnknownService {
            name: "kvp".into(),
            known: vec!["fcopy", "xs"],
        };
        assert_eq!(
            err.to_string(),
            "unknown service \"kvp\": fakehost serves fcopy, xs"
        );
    }
}
