//! The control socket: how the `fakehost` CLI drives a running host.
//!
//! [`proto`] is the wire form (JSON lines), [`fdpass`] carries the source file's descriptor,
//! [`server`] answers requests inside `fakehost serve`, [`client`] is what the CLI uses.

pub mod client;
pub mod fdpass;
pub mod proto;
pub mod server;
