//! A vhost-user virtio-vsock device backend (virtio spec 1.2 §5.10) that carries cusedev bus
//! streams between a QEMU guest and the bus host (fakehost), and follows the "hybrid vsock"
//! Unix-socket convention for everything else.
//!
//! Modules, each with one job:
//! - [`packet`] — the 44-byte header codec;
//! - [`chain`] — descriptor chains ↔ packets, with every guest-controlled bound checked;
//! - [`connection`] — one connection's state machine and credit accounting (pure logic);
//! - [`host_side`] — routing, Unix connects, the `CONNECT <port>` handshake;
//! - [`muxer`] — the connection table, host sockets and their epoll, RX scheduling;
//! - [`device`] — queue processing on `virtio_queue::Queue`;
//! - [`backend`] — the `vhost_user_backend::VhostUserBackendMut` implementation;
//! - [`server`] — the vhost-user socket and per-VMM sessions;
//! - [`config`] — the command line;
//! - [`stats`] — counters.
//!
//! Threads: the vhost-user message thread and one vring worker (both from
//! vhost-user-backend), the main thread waiting for sessions, and a signal thread in the
//! binary. All connection work happens in the vring worker — see [`backend`].

#![deny(unsafe_op_in_unsafe_fn)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backend;
pub mod chain;
pub mod config;
pub mod connection;
pub mod device;
pub mod host_side;
pub mod muxer;
pub mod packet;
pub mod server;
pub mod stats;
