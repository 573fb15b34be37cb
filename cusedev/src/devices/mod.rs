//! Device models: one module per kernel driver.

pub mod delayed_work;
pub mod fcopy;
pub mod hvutil_transport;
