//! cusedev: Linux misc character devices served from userspace.
//!
//! A kernel driver split at the `file_operations` line: the daemon above it stays real, the
//! driver below it is a [`device::Device`] model, reached through a frontend (a FUSE mount
//! here, CUSE where the kernel has it) and talking to its host over the [`bus`]. Which devices
//! exist is one [`table`]: [`devices::DRIVER_TABLE`].
//!
//! Read first: [`table`], then [`devices`], then [`bus::client`]; docs/adding-a-device.md has
//! the whole reading order.

pub mod bus;
pub mod caller;
#[cfg(test)]
mod caller_tests;
pub mod cuse;
pub mod device;
pub mod devices;
pub mod frontend;
pub mod fuse;
pub mod preload;
pub mod reply;
pub mod table;
pub mod wait;
