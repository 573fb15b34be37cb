//! The control protocol: JSON lines over a Unix socket.
//!
//! One request per connection. The client sends one line (a [`Request`]), with descriptors
//! attached as SCM_RIGHTS if the command needs them (fcopy's `copy`: the open source file).
//! The host answers with lines of [`Response`] and closes the connection. The protocol names
//! no service: `offer`, `rescind` and `service` carry a name from the table in
//! [`crate::serve::SERVICES`], and a service's commands and results are its own JSON:
//!
//! ```text
//! → {"op":"rescind","service":"fcopy"}     ← {"type":"outcome","ok":true,"message":"rescinded fcopy: ..."}
//! → {"op":"offer","service":"fcopy"}       ← {"type":"outcome","ok":false,"message":"fcopy is already offered"}
//! → {"op":"status"}                        ← {"type":"status","bus":{...},"services":{"fcopy":{"summary":"...","state":{...}}}}
//! → {"op":"service","service":"fcopy","command":{"op":"copy",...}}   + fd
//!                                          ← {"type":"progress","done":6144,"total":10485760}   (long commands, ~10 per second)
//!                                          ← {"type":"result","result":{...the service's answer...}}
//! any malformed or refused request, or an unknown service
//!                                          ← {"type":"error","error":"unknown service \"kvp\": fakehost serves fcopy"}
//! ```
//!
//! fcopy's command and result are described in [`crate::fcopy::command`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::bus::BusStatus;
use crate::service::ServiceStatus;

/// The longest request line accepted (fcopy's names are at most 259 UTF-16 units each).
pub const MAX_REQUEST_LEN: usize = 64 * 1024;

/// A client's request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Rescind a service's channel.
    Rescind {
        /// The service's name.
        service: String,
    },
    /// Offer a service again after a rescind.
    Offer {
        /// The service's name.
        service: String,
    },
    /// Report the host's state.
    Status {},
    /// A command for one service, routed to it by name.
    Service {
        /// The service's name.
        service: String,
        /// The command, in the service's own form.
        command: serde_json::Value,
    },
}

/// A line the host sends back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Progress of a long command: units (bytes for a copy) done so far.
    Progress {
        /// Done.
        done: u64,
        /// In all.
        total: u64,
    },
    /// The end of a service command: the service's answer.
    Result {
        /// In the service's own form (fcopy: a `CopyReport`).
        result: serde_json::Value,
    },
    /// The end of a rescind or offer.
    Outcome {
        /// It did what was asked.
        ok: bool,
        /// What happened, in words.
        message: String,
    },
    /// The answer to `status`.
    Status(StatusReport),
    /// The request was malformed or could not be started.
    Error {
        /// Why.
        error: String,
    },
}

/// The host's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Guest connection and channels.
    pub bus: BusStatus,
    /// Every service in the table, by name.
    pub services: BTreeMap<String, ServiceStatus>,
}

impl Response {
    /// One JSON line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        line_of(self)
    }
}

impl Request {
    /// One JSON line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        line_of(self)
    }
}

fn line_of(value: &impl Serialize) -> Vec<u8> {
    // Serialising these plain structs cannot fail (no maps with non-string keys, no custom
    // serialisers); fall back to an error line rather than panic all the same.
    let mut line = serde_json::to_vec(value).unwrap_or_else(|e| {
        format!("{{\"type\":\"error\",\"error\":\"cannot encode message: {e}\"}}").into_bytes()
    });
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_requests_round_trip() {
        for (req, text) in [
            (
                Request::Rescind {
                    service: "fcopy".into(),
                },
                r#"{"op":"rescind","service":"fcopy"}"#,
            ),
            (
                Request::Offer {
                    service: "kvp".into(),
                },
                r#"{"op":"offer","service":"kvp"}"#,
            ),
            (Request::Status {}, r#"{"op":"status"}"#),
            (
                Request::Service {
                    service: "xs".into(),
                    command: serde_json::json!({"op": "fail_next", "errno": 5}),
                },
                r#"{"op":"service","service":"xs","command":{"errno":5,"op":"fail_next"}}"#,
            ),
        ] {
            assert_eq!(serde_json::to_string(&req).unwrap(), text);
            assert_eq!(serde_json::from_str::<Request>(text).unwrap(), req);
        }
    }

    #[test]
    fn unknown_ops_and_fields_are_rejected() {
        for bad in [
            r#"{"op":"format_disk"}"#,
            r#"{"op":"copy","file_name":"a","guest_dir":"/x"}"#,
            r#"{"op":"status","extra":1}"#,
            r#"{"op":"rescind"}"#,
            r#"{"op":"service","service":"fcopy"}"#,
            "not json",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn result_response_wire_form() {
        let resp = Response::Result {
            result: serde_json::json!({"ok": false, "hresult": 2147942480u32}),
        };
        let line = String::from_utf8(resp.to_line()).unwrap();
        assert_eq!(
            line,
            "{\"type\":\"result\",\"result\":{\"hresult\":2147942480,\"ok\":false}}\n"
        );
        assert_eq!(
            serde_json::from_str::<Response>(line.trim_end()).unwrap(),
            resp
        );
    }

    #[test]
    fn progress_and_error_round_trip() {
        for resp in [
            Response::Progress {
                done: 6144,
                total: 10,
            },
            Response::Error { error: "no".into() },
            Response::Outcome {
                ok: true,
                message: "rescinded".into(),
            },
        ] {
            let line = resp.to_line();
            let back: Response = serde_json::from_slice(&line).unwrap();
            assert_eq!(back, resp);
        }
        assert_eq!(
            String::from_utf8(Response::Progress { done: 1, total: 2 }.to_line()).unwrap(),
            "{\"type\":\"progress\",\"done\":1,\"total\":2}\n"
        );
    }
}
