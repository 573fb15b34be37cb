//! `fakehost`: the Hyper-V host side of cusedev's devices.
//!
//! A real Hyper-V host offers VMBus channels to a guest and, for `Copy-VMFile -FileSource Host`,
//! pushes a file into the guest through the fcopy integration service. cusedev serves the
//! guest's `/dev/vmbus/hv_fcopy` from userspace, so something has to play that host: this crate.
//!
//! * [`bus`] speaks the host side of our VMBus-over-streams bus (`docs/bus-protocol.md`):
//!   version, offers, opens, rescinds, and one stream per open channel.
//! * [`fcopy`] is the fcopy host service: negotiate, START_FILE_COPY, WRITE_TO_FILE fragments,
//!   COMPLETE_FCOPY or CANCEL_FCOPY, one transaction at a time.
//! * [`control`] is the JSON-lines control socket the `fakehost` CLI talks to.
//! * [`serve`] puts them together behind two listening sockets.
//!
//! Arrows point down only: this crate uses `vmbus` for every wire format and knows nothing of
//! cusedev, `/dev` or FUSE.

pub mod bus;
pub mod control;
pub mod fcopy;
pub mod names;
pub mod progress;
pub mod serve;
pub mod service;
pub mod sockets;

#[cfg(test)]
mod test_support;
