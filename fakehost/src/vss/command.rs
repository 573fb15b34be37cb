//! The VSS service's control commands.
//!
//! On the wire, inside the generic service request (`control::proto`):
//!
//! ```text
//! → {"op":"service","service":"vss","command":{"op":"freeze","force":false,"timeout_secs":null}}
//! ← {"type":"result","result":{"ok":true,"operation":"FREEZE","hresult":0,"meaning":"success",
//!    "error":null,"flags":0,"seconds":1.92,"guest":{"frozen":"yes","secs":0},
//!    "place":"the guest side of the bus is the vhost-user-vsock backend (vhost, pid 4242): the
//!    guest is a VM"}}
//! → {"op":"service","service":"vss","command":{"op":"thaw"}}
//! → {"op":"service","service":"vss","command":{"op":"check"}}          (HOT_BACKUP)
//! ```
//!
//! A FREEZE of the machine fakehost runs on without `"force":true` is refused
//! (`{"type":"error","error":"refusing to FREEZE: ..."}`, the CLI's exit 2).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Frozen, VssHost};
use crate::control::proto::Request;
use crate::service::{CommandContext, CommandError, ServiceClass};

/// The three VSS operations a host asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VssOp {
    /// VSS_OP_FREEZE.
    Freeze,
    /// VSS_OP_THAW.
    Thaw,
    /// VSS_OP_HOT_BACKUP.
    Check,
}

/// A command for the VSS service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VssCommand {
    /// What to ask.
    pub op: VssOp,
    /// FREEZE even if the guest is this machine.
    #[serde(default)]
    pub force: bool,
    /// Seconds to wait for the answer (default: 910 for FREEZE, the step timeout otherwise).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// The result of a VSS command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VssReport {
    /// The guest answered success.
    pub ok: bool,
    /// "FREEZE", "THAW" or "HOT_BACKUP".
    pub operation: String,
    /// The guest's status, if it answered.
    pub hresult: Option<u32>,
    /// [`super::status_message`] of it.
    pub meaning: Option<String>,
    /// What went wrong, in words (`None` on success).
    pub error: Option<String>,
    /// The flags word of the answer (HOT_BACKUP: `vss_cf.flags`; 5 would be
    /// VSS_HBU_NO_AUTO_RECOVERY).
    pub flags: Option<u32>,
    /// Seconds from the request to the answer.
    pub seconds: f64,
    /// Whether the guest is frozen now, as far as this host knows.
    pub guest: Frozen,
    /// Where the guest is ([`super::peer`]), once the channel was there.
    pub place: Option<String>,
}

impl VssCommand {
    /// The control request that carries this command.
    pub fn into_request(self) -> Request {
        Request::Service {
            service: VssHost::OFFER.name.to_owned(),
            // Serialising this plain struct cannot fail; Null would be refused by the server.
            command: serde_json::to_value(self).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// Runs a command on `host` (the control connection's thread, until the guest answered).
pub(super) fn run(
    host: &VssHost,
    command: serde_json::Value,
    ctx: CommandContext<'_>,
) -> Result<serde_json::Value, CommandError> {
    let command = CommandError::parse::<VssCommand>(command)?;
    if !ctx.fds.is_empty() {
        return Err(CommandError::Malformed(
            "vss commands take no file descriptors".to_owned(),
        ));
    }
    if command.timeout_secs == Some(0) {
        return Err(CommandError::Malformed(
            "timeout_secs must be at least 1".to_owned(),
        ));
    }
    if !ctx.offered {
        return Err(CommandError::Refused(
            "vss is not offered (it was rescinded); run `fakehost offer vss` first".to_owned(),
        ));
    }
    let report = host
        .run(
            command.op,
            command.force,
            command.timeout_secs.map(Duration::from_secs),
        )
        .map_err(CommandError::Refused)?;
    serde_json::to_value(report).map_err(|e| CommandError::Refused(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_have_a_stable_wire_form() {
        let req = VssCommand {
            op: VssOp::Freeze,
            force: true,
            timeout_secs: Some(30),
        }
        .into_request();
        assert_eq!(
            String::from_utf8(req.to_line()).unwrap(),
            "{\"op\":\"service\",\"service\":\"vss\",\"command\":{\"force\":true,\"op\":\
             \"freeze\",\"timeout_secs\":30}}\n"
        );
        let thaw: VssCommand = serde_json::from_str(r#"{"op":"thaw"}"#).unwrap();
        assert_eq!(
            thaw,
            VssCommand {
                op: VssOp::Thaw,
                force: false,
                timeout_secs: None
            }
        );
        for bad in [
            r#"{"op":"create"}"#,
            r#"{"op":"check","extra":1}"#,
            r#"{"force":true}"#,
        ] {
            assert!(serde_json::from_str::<VssCommand>(bad).is_err(), "{bad}");
        }
    }
}
