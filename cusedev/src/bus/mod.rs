//! The guest side of the bus: channels as a util driver sees them, and the client that
//! connects to the host, receives offers and binds drivers to channels.

pub mod channel;
pub mod client;
pub mod first_offers;
pub mod frame_io;
pub mod requestor;
pub mod socket;
