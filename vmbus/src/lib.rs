//! Wire formats of the VMBus util-service path, and the framing of the cusedev bus streams.
//!
//! cusedev serves Linux misc devices such as `/dev/vmbus/hv_fcopy` from userspace; the host
//! side (fakehost) plays Hyper-V. Both speak the byte formats in this crate, which follow the
//! kernel's structs to the byte (offsets checked by tests against `shared/spec`):
//!
//! * [`packet`]: VMBus ring packets (`vmpacket_descriptor`);
//! * [`ic`]: the pipe and IC headers inside a packet, status codes, the reply rule;
//! * [`negotiate`]: IC version negotiation, host request and the guest's in-place answer in
//!   its 6.1 and 3.x forms;
//! * [`fcopy`] and [`utf16`]: file-copy messages and the kernel's UTF-16 → UTF-8 conversion;
//! * [`kvp`] and [`vss`]: key-value exchange and snapshot messages, host and daemon sides;
//! * [`channel_msg`]: channel-management messages (offers, open, rescind, ...);
//! * [`guid`]: GUIDs in VMBus byte order and the service class GUIDs;
//! * [`xs_fastpath`] and [`guest_memory`]: the XStore fastpath's ioctl, VSP messages and
//!   GPA-direct packet, and the host's access to the pages such a packet names;
//! * [`lguest`]: `/dev/lguest`'s requests and the messages to and from the fake Guest;
//! * [`stream`] and [`address`]: our own stream framing and where the host listens.
//!
//! No I/O and no panics: every parser takes untrusted bytes and returns
//! `Result<_, WireError>`; nothing indexes a slice with a length read from input.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod address;
pub mod channel_msg;
pub mod error;
pub mod fcopy;
pub mod guest_memory;
pub mod guid;
pub mod ic;
pub mod kvp;
pub mod lguest;
pub mod negotiate;
pub mod packet;
pub mod stream;
pub mod utf16;
pub mod vss;
pub mod xs_fastpath;

pub use error::WireError;
