//! The lguest service's control commands: what the Guests are doing, their interrupts and
//! notifications, and the script new Guests run.
//!
//! On the wire, inside the generic service request (`control::proto`):
//!
//! ```text
//! → {"op":"service","service":"lguest","command":{"op":"status"}}
//! ← {"type":"result","result":{"script":"builtin:console-hello","guests":[{"guest":1,"link":3,
//!    "launcher_pid":4242,"word":4,"base":3070230528,"pfn_limit":4103,"start":1048576,
//!    "script":"builtin:console-hello","state":{"kind":"stopped_at_notify","addr":16777216,
//!    "line":14},"state_text":"stopped at notify 0x1000000 (line 14)","runs":1,"notifies":1,
//!    "last_read":null,"ended":null}],"channels_attached":1,"started":1,"ignored":0}}
//! → {"op":"service","service":"lguest","command":{"op":"irqs"}}
//! ← {"type":"result","result":{"guests":[{"guest":1,"ended":false,"pending":[2],
//!    "raised":[{"irq":2,"count":1}],"total":1}]}}
//! → {"op":"service","service":"lguest","command":{"op":"notifies","guest":1}}  (guest optional)
//! ← {"type":"result","result":{"guests":[{"guest":1,"ended":false,"total":2,"by_address":
//!    [{"addr":16777216,"count":1,"read":1,"eventfd":0,"waiting":0},{"addr":16793600,
//!    "count":1,"read":0,"eventfd":1,"waiting":0}],"recent":[{"seq":1,"addr":16777216,
//!    "taken":"read"},{"seq":2,"addr":16793600,"taken":"eventfd"}]}]}}
//! → {"op":"service","service":"lguest","command":{"op":"script","name":"a.guest","text":"..."}}
//! ← {"type":"result","result":{"script":"a.guest","instructions":3,
//!    "previous":"builtin:console-hello"}}
//! ```
//!
//! A script that does not parse is refused (`{"type":"error","error":"a.guest:3: unknown
//! label \"x\""}`, the CLI's exit 2); the CLI parses it first and says so itself.

use serde::{Deserialize, Serialize};

use super::report::ScriptReport;
use super::script::Script;
use super::LguestHost;
use crate::control::proto::Request;
use crate::service::{CommandContext, CommandError, ServiceClass};

/// A command for the lguest service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum LguestCommand {
    /// Every Guest: number, launcher, state, script ([`super::report::StatusReport`]).
    Status {},
    /// Pending interrupts and counts per interrupt ([`super::report::IrqsReport`]).
    Irqs {},
    /// Notifications per address and how each was taken
    /// ([`super::report::NotifiesReport`]).
    Notifies {
        /// Only this guest number.
        #[serde(default)]
        guest: Option<u32>,
    },
    /// The script for Guests started from now on ([`ScriptReport`]).
    Script {
        /// What status calls it (the file as given, or `builtin:NAME`).
        name: String,
        /// Its text.
        text: String,
    },
}

impl LguestCommand {
    /// The control request that carries this command.
    pub fn into_request(self) -> Request {
        Request::Service {
            service: LguestHost::OFFER.name.to_owned(),
            // Serialising this plain enum cannot fail; Null would be refused by the server.
            command: serde_json::to_value(self).unwrap_or(serde_json::Value::Null),
        }
    }
}

fn to_json(report: impl Serialize) -> Result<serde_json::Value, CommandError> {
    serde_json::to_value(report).map_err(|e| CommandError::Refused(e.to_string()))
}

/// Runs a command on `host` (the control connection's thread).
pub(super) fn run(
    host: &LguestHost,
    command: serde_json::Value,
    _ctx: CommandContext<'_>,
) -> Result<serde_json::Value, CommandError> {
    match CommandError::parse::<LguestCommand>(command)? {
        LguestCommand::Status {} => to_json(host.lguest_status()),
        LguestCommand::Irqs {} => to_json(host.irqs()),
        LguestCommand::Notifies { guest } => to_json(host.notifies(guest)),
        LguestCommand::Script { name, text } => {
            let script =
                Script::parse(&name, &text).map_err(|e| CommandError::Refused(e.in_file(&name)))?;
            let instructions = script.program.len();
            let previous = host.set_script(script);
            to_json(ScriptReport {
                script: name,
                instructions,
                previous,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_have_a_stable_wire_form() {
        let req = LguestCommand::Notifies { guest: Some(3) }.into_request();
        assert_eq!(
            String::from_utf8(req.to_line()).unwrap(),
            "{\"op\":\"service\",\"service\":\"lguest\",\"command\":{\"guest\":3,\
             \"op\":\"notifies\"}}\n"
        );
        let status: LguestCommand = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
        assert_eq!(status, LguestCommand::Status {});
        let all: LguestCommand = serde_json::from_str(r#"{"op":"notifies"}"#).unwrap();
        assert_eq!(all, LguestCommand::Notifies { guest: None });
        assert!(serde_json::from_str::<LguestCommand>(r#"{"op":"script","name":"x"}"#).is_err());
        assert!(serde_json::from_str::<LguestCommand>(r#"{"op":"irqs","x":1}"#).is_err());
    }
}
