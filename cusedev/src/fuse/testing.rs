//! Unit-test helpers for the FUSE personalities: a device that only opens, and node requests
//! built the way the kernel sends them.

use std::sync::Arc;

use nix::errno::Errno;

use super::abi::{InHeader, Opcode};
use super::session::{Reply, Request, RequestHandler};
use crate::device::{Caller, Device, Handle};

/// A device with nothing but an open.
pub struct Null;

impl Null {
    pub fn device() -> Arc<dyn Device> {
        Arc::new(Null)
    }
}

impl Device for Null {
    fn name(&self) -> &str {
        "test/null"
    }
    fn open(&self, _caller: &Caller, _flags: i32) -> Result<Handle, Errno> {
        Ok(0)
    }
}

/// `handler`'s answer to a node request `opcode` on `nodeid` with `body`.
pub fn node_request(
    handler: &dyn RequestHandler,
    opcode: Opcode,
    nodeid: u64,
    body: &[u8],
) -> Reply {
    let header = InHeader {
        opcode: opcode.0,
        nodeid,
        unique: 2,
        ..InHeader::default()
    };
    handler.node_request(&Request {
        header: &header,
        opcode,
        body,
    })
}
