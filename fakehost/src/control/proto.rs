//! The control protocol: JSON lines over a Unix socket.
//!
//! One request per connection. The client sends one line (a [`Request`]); for `copy` the open
//! source file travels with that line as an SCM_RIGHTS descriptor. The host answers with lines
//! of [`Response`] and closes the connection:
//!
//! ```text
//! → {"op":"copy","file_name":"big.iso","guest_dir":"/srv/incoming/","overwrite":false,"create_path":true}   + fd
//! ← {"type":"progress","done":6144,"total":10485760}           (at most ~10 per second)
//! ← {"type":"result","ok":true,"hresult":0,"meaning":"success","step":null,"bytes":10485760,"seconds":0.41,"error":null}
//!
//! → {"op":"rescind","service":"fcopy"}     ← {"type":"outcome","ok":true,"message":"rescinded fcopy: ..."}
//! → {"op":"offer","service":"fcopy"}       ← {"type":"outcome","ok":false,"message":"fcopy is already offered"}
//! → {"op":"status"}                        ← {"type":"status","bus":{...},"fcopy":{...}}
//! any malformed or refused request         ← {"type":"error","error":"..."}
//! ```

use serde::{Deserialize, Serialize};

use crate::bus::BusStatus;
use crate::fcopy::{CopyReport, FcopyStatus};
use crate::service::ServiceKind;

/// The longest request line accepted (names are at most 259 UTF-16 units each).
pub const MAX_REQUEST_LEN: usize = 64 * 1024;

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Copy the attached file into the guest.
    Copy {
        /// The name on the guest.
        file_name: String,
        /// The guest directory (a trailing '/' is added if missing).
        guest_dir: String,
        /// Replace an existing file (OVER_WRITE).
        #[serde(default)]
        overwrite: bool,
        /// Create missing directories (CREATE_PATH).
        #[serde(default)]
        create_path: bool,
    },
    /// Rescind a service's channel.
    Rescind {
        /// The service.
        service: ServiceKind,
    },
    /// Offer a service again after a rescind.
    Offer {
        /// The service.
        service: ServiceKind,
    },
    /// Report the host's state.
    Status {},
}

/// A line the host sends back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Copy progress: bytes acknowledged by the guest so far.
    Progress {
        /// Bytes done.
        done: u64,
        /// Bytes in all.
        total: u64,
    },
    /// The end of a copy.
    Result(CopyReport),
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Guest connection and channels.
    pub bus: BusStatus,
    /// The fcopy service.
    pub fcopy: FcopyStatus,
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
    use crate::fcopy::Step;

    #[test]
    fn copy_request_wire_form() {
        let req = Request::Copy {
            file_name: "big.iso".into(),
            guest_dir: "/srv/incoming/".into(),
            overwrite: false,
            create_path: true,
        };
        let line = String::from_utf8(req.to_line()).unwrap();
        assert_eq!(
            line,
            "{\"op\":\"copy\",\"file_name\":\"big.iso\",\"guest_dir\":\"/srv/incoming/\",\
             \"overwrite\":false,\"create_path\":true}\n"
        );
        assert_eq!(
            serde_json::from_str::<Request>(line.trim_end()).unwrap(),
            req
        );
    }

    #[test]
    fn copy_flags_default_to_false() {
        let req: Request =
            serde_json::from_str(r#"{"op":"copy","file_name":"a","guest_dir":"/x"}"#).unwrap();
        assert_eq!(
            req,
            Request::Copy {
                file_name: "a".into(),
                guest_dir: "/x".into(),
                overwrite: false,
                create_path: false
            }
        );
    }

    #[test]
    fn service_requests_round_trip() {
        for (req, text) in [
            (
                Request::Rescind {
                    service: ServiceKind::Fcopy,
                },
                r#"{"op":"rescind","service":"fcopy"}"#,
            ),
            (
                Request::Offer {
                    service: ServiceKind::Fcopy,
                },
                r#"{"op":"offer","service":"fcopy"}"#,
            ),
            (Request::Status {}, r#"{"op":"status"}"#),
        ] {
            assert_eq!(serde_json::to_string(&req).unwrap(), text);
            assert_eq!(serde_json::from_str::<Request>(text).unwrap(), req);
        }
    }

    #[test]
    fn unknown_ops_services_and_fields_are_rejected() {
        for bad in [
            r#"{"op":"format_disk"}"#,
            r#"{"op":"rescind","service":"kvp"}"#,
            r#"{"op":"status","extra":1}"#,
            r#"{"op":"copy","guest_dir":"/x"}"#,
            "not json",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn result_response_wire_form() {
        let resp = Response::Result(CopyReport {
            ok: false,
            hresult: Some(0x8007_0050),
            meaning: Some("file exists".into()),
            step: Some(Step::StartFileCopy),
            bytes: 0,
            seconds: 0.5,
            error: Some("guest answered START_FILE_COPY with 0x80070050 (file exists)".into()),
        });
        let line = String::from_utf8(resp.to_line()).unwrap();
        assert!(line.starts_with(r#"{"type":"result","ok":false,"hresult":2147942480,"#));
        assert!(line.contains(r#""step":"START_FILE_COPY""#));
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
