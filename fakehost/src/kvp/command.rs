//! The KVP service's control commands.
//!
//! On the wire, inside the generic service request (`control::proto`); every one answers with
//! a [`KvpReport`]:
//!
//! ```text
//! → {"op":"service","service":"kvp","command":{"op":"get","pool":0,"key":"Color"}}
//! ← {"type":"result","result":{"ok":true,"operation":"GET","pool":0,"hresult":0,
//!    "meaning":"success","error":null,"records":[{"key":"Color","value":"blue"}],
//!    "adapters":[],"note":null}}
//! → {"op":"service","service":"kvp","command":{"op":"set","pool":0,"key":"Color",
//!    "value":"blue","type":"sz"}}                              ("type": "sz", "u32", "u64")
//! → {"op":"service","service":"kvp","command":{"op":"delete","pool":0,"key":"Color"}}
//! → {"op":"service","service":"kvp","command":{"op":"enumerate","pool":2,"index":0}}
//! → {"op":"service","service":"kvp","command":{"op":"list","pool":2}}
//! → {"op":"service","service":"kvp","command":{"op":"ip","adapter":"00:15:5D:00:00:01",
//!    "family":"both"}}                     ("adapter": null discovers; "family": ipv4/ipv6/both)
//! ← {"type":"result","result":{"ok":false,"operation":"DELETE","pool":0,
//!    "hresult":2147942659,"meaning":"no such record","error":"DELETE \"Color\" in pool 0
//!    (external): the guest answered 0x80070103: no such record",...}}
//! ```
//!
//! A pool outside 0-4, an empty or too long key, a value that does not fit its type, or an
//! adapter that is not a MAC address is refused (`{"type":"error"}`, the CLI's exit 2) before
//! anything reaches the guest.

use serde::{Deserialize, Serialize};
use vmbus::kvp::KvpValue;

use super::report::{Family, ValueType};
use super::{KvpHost, KvpReport};
use crate::control::proto::Request;
use crate::service::{CommandContext, CommandError, ServiceClass};

/// A command for the KVP service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum KvpCommand {
    /// GET a record's value: by enumerating the pool, or with `raw` one KVP_OP_GET.
    Get {
        /// The pool (0-4).
        pool: u8,
        /// The key.
        key: String,
        /// Send KVP_OP_GET itself (a Linux 6.1 guest answers it with an empty value).
        #[serde(default)]
        raw: bool,
    },
    /// SET a record.
    Set {
        /// The pool (0-4).
        pool: u8,
        /// The key.
        key: String,
        /// The value, as text (a decimal number for u32/u64).
        value: String,
        /// How it travels.
        #[serde(rename = "type", default)]
        value_type: ValueType,
    },
    /// DELETE a record.
    Delete {
        /// The pool (0-4).
        pool: u8,
        /// The key.
        key: String,
    },
    /// ENUMERATE one index.
    Enumerate {
        /// The pool (0-4).
        pool: u8,
        /// The index.
        index: u32,
    },
    /// Every record of a pool (ENUMERATE until HV_S_CONT).
    List {
        /// The pool (0-4).
        pool: u8,
    },
    /// GET_IP_INFO.
    Ip {
        /// The adapter's MAC address; `None`: every adapter, if they can be found.
        #[serde(default)]
        adapter: Option<String>,
        /// Which addresses to show.
        #[serde(default)]
        family: Family,
    },
}

impl KvpCommand {
    /// The control request that carries this command.
    pub fn into_request(self) -> Request {
        Request::Service {
            service: KvpHost::OFFER.name.to_owned(),
            // Serialising this plain enum cannot fail; Null would be refused by the server.
            command: serde_json::to_value(self).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// `value` as a SET value of `value_type`.
pub fn typed_value(value: &str, value_type: ValueType) -> Result<KvpValue, String> {
    let number = |what: &str| format!("{value:?} is not a {what} (a decimal number)");
    Ok(match value_type {
        ValueType::Sz => KvpValue::Sz(value.to_owned()),
        ValueType::U32 => KvpValue::U32(value.trim().parse().map_err(|_| number("u32"))?),
        ValueType::U64 => KvpValue::U64(value.trim().parse().map_err(|_| number("u64"))?),
    })
}

/// Runs a command on `host` (the control connection's thread, until the guest answered).
pub(super) fn run(
    host: &KvpHost,
    command: serde_json::Value,
    ctx: CommandContext<'_>,
) -> Result<serde_json::Value, CommandError> {
    let command = CommandError::parse::<KvpCommand>(command)?;
    if !ctx.fds.is_empty() {
        return Err(CommandError::Malformed(
            "kvp commands take no file descriptors".to_owned(),
        ));
    }
    if !ctx.offered {
        return Err(CommandError::Refused(
            "kvp is not offered (it was rescinded); run `fakehost offer kvp` first".to_owned(),
        ));
    }
    let report: KvpReport = match command {
        KvpCommand::Get {
            pool,
            key,
            raw: true,
        } => host.get(pool, &key),
        KvpCommand::Get {
            pool,
            key,
            raw: false,
        } => host.lookup(pool, &key),
        KvpCommand::Set {
            pool,
            key,
            value,
            value_type,
        } => typed_value(&value, value_type).and_then(|v| host.set(pool, &key, &v)),
        KvpCommand::Delete { pool, key } => host.delete(pool, &key),
        KvpCommand::Enumerate { pool, index } => host.enumerate(pool, index),
        KvpCommand::List { pool } => host.list(pool),
        KvpCommand::Ip { adapter, family } => host.ip(adapter.as_deref(), family),
    }
    .map_err(CommandError::Refused)?;
    serde_json::to_value(report).map_err(|e| CommandError::Refused(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_have_a_stable_wire_form() {
        let req = KvpCommand::Set {
            pool: 0,
            key: "Color".into(),
            value: "7".into(),
            value_type: ValueType::U32,
        }
        .into_request();
        assert_eq!(
            String::from_utf8(req.to_line()).unwrap(),
            "{\"op\":\"service\",\"service\":\"kvp\",\"command\":{\"key\":\"Color\",\"op\":\
             \"set\",\"pool\":0,\"type\":\"u32\",\"value\":\"7\"}}\n"
        );
        let set: KvpCommand =
            serde_json::from_str(r#"{"op":"set","pool":1,"key":"k","value":"v"}"#).unwrap();
        assert!(matches!(
            set,
            KvpCommand::Set {
                value_type: ValueType::Sz,
                ..
            }
        ));
        let ip: KvpCommand = serde_json::from_str(r#"{"op":"ip"}"#).unwrap();
        assert_eq!(
            ip,
            KvpCommand::Ip {
                adapter: None,
                family: Family::Both
            }
        );
        for bad in [
            r#"{"op":"get","pool":0}"#,
            r#"{"op":"get","pool":0,"key":"k","x":1}"#,
            r#"{"op":"list","pool":256}"#,
            r#"{"op":"set","pool":0,"key":"k","value":"v","type":"dword"}"#,
            r#"{"op":"ip","family":"ipx"}"#,
            r#"{"op":"format"}"#,
        ] {
            assert!(serde_json::from_str::<KvpCommand>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn typed_values_parse_their_numbers() {
        assert_eq!(typed_value("42", ValueType::U32), Ok(KvpValue::U32(42)));
        assert_eq!(
            typed_value("18446744073709551615", ValueType::U64),
            Ok(KvpValue::U64(u64::MAX))
        );
        assert!(typed_value("4294967296", ValueType::U32).is_err());
        assert!(typed_value("-1", ValueType::U64).is_err());
        assert_eq!(
            typed_value(" x ", ValueType::Sz),
            Ok(KvpValue::Sz(" x ".into()))
        );
    }
}
