//! `fakehost`: the Hyper-V host side of cusedev's devices.
//!
//! A real Hyper-V host offers VMBus channels to a guest and, for `Copy-VMFile -FileSource Host`,
//! pushes a file into the guest through the fcopy integration service. cusedev serves the
//! guest's `/dev/vmbus/hv_fcopy` from userspace, so something has to play that host: this crate.
//!
//! * [`service`] says what a host service is ([`service::HostService`]); [`serve`] holds the
//!   table of them ([`serve::SERVICES`], one row per device class) and puts everything
//!   together behind two listening sockets.
//! * [`bus`] speaks the host side of our VMBus-over-streams bus (`docs/bus-protocol.md`):
//!   version, offers, opens, rescinds, and one stream per open channel.
//! * [`ic`] is what every Hyper-V util service shares: IC version negotiation and replies.
//! * [`fcopy`] is the fcopy host service: negotiate, START_FILE_COPY, WRITE_TO_FILE fragments,
//!   COMPLETE_FCOPY or CANCEL_FCOPY, one transaction at a time; and its `fakehost copy`.
//! * [`kvp`] is the KVP host: GET/SET/DELETE/ENUMERATE on the guest's pools, GET_IP_INFO, and
//!   the host's own items pushed into pool 3 once the guest's daemon registered; `fakehost kvp`.
//! * [`vss`] is the VSS host: FREEZE/THAW/HOT_BACKUP, refusing to freeze the machine it runs
//!   on; `fakehost vss`.
//! * [`xs`] is the XStore fastpath host: GPA-direct requests served from a blob store
//!   (`object_store`: a local directory, Azure, S3), with `fakehost xs` and `fakehost blobs`.
//! * [`control`] is the JSON-lines control socket the `fakehost` CLI talks to; [`cli`] and
//!   [`progress`] are what the CLI's subcommands share.
//!
//! Arrows point down only: this crate uses `vmbus` for every wire format and knows nothing of
//! cusedev, `/dev` or FUSE.

pub mod bus;
pub mod cli;
pub mod control;
pub mod fcopy;
pub mod ic;
pub mod kvp;
pub mod lguest;
pub mod progress;
pub mod serve;
pub mod service;
pub mod sockets;
pub mod vss;
pub mod xs;

#[cfg(test)]
mod test_support;
