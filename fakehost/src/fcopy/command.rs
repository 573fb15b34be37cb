//! fcopy's control commands: `copy`, with the open source file attached.
//!
//! On the wire, inside the generic service request (`control::proto`):
//!
//! ```text
//! → {"op":"service","service":"fcopy","command":{"create_path":true,"file_name":"big.iso",
//!    "guest_dir":"/srv/incoming/","op":"copy","overwrite":false}}      + the source fd
//! ← {"type":"progress","done":6144,"total":10485760}           (at most ~10 per second)
//! ← {"type":"result","result":{"ok":true,"hresult":0,"meaning":"success","step":null,
//!    "bytes":10485760,"seconds":0.41,"error":null}}
//! ```

use std::fs::File;

use serde::{Deserialize, Serialize};
use vmbus::fcopy::{CREATE_PATH, OVER_WRITE};

use super::names;
use super::{CopyRequest, FcopyHost};
use crate::control::proto::Request;
use crate::service::{CommandContext, CommandError, ServiceClass};

/// A command for the fcopy service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum FcopyCommand {
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
        /// How long to wait for a guest to open the fcopy channel when none has; 0 (the
        /// default) fails at once, as Hyper-V does when the guest's service is not running.
        #[serde(default)]
        wait_secs: u64,
    },
}

impl FcopyCommand {
    /// The control request that carries this command.
    pub fn into_request(self) -> Request {
        Request::Service {
            service: FcopyHost::OFFER.name.to_owned(),
            // Serialising this plain enum cannot fail; Null would be refused by the server.
            command: serde_json::to_value(self).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// Runs a command on `host` (the control connection's thread, for the whole copy).
pub(super) fn run(
    host: &FcopyHost,
    command: serde_json::Value,
    ctx: CommandContext<'_>,
) -> Result<serde_json::Value, CommandError> {
    match CommandError::parse::<FcopyCommand>(command)? {
        FcopyCommand::Copy {
            file_name,
            guest_dir,
            overwrite,
            create_path,
            wait_secs,
        } => {
            let flags =
                if overwrite { OVER_WRITE } else { 0 } | if create_path { CREATE_PATH } else { 0 };
            let CommandContext {
                offered,
                fds,
                progress,
            } = ctx;
            let mut request = prepare_copy(offered, fds, file_name, &guest_dir, flags)
                .map_err(CommandError::Refused)?;
            request.wait_for_channel = std::time::Duration::from_secs(wait_secs);
            let report = host.copy(request, progress);
            serde_json::to_value(report).map_err(|e| CommandError::Refused(e.to_string()))
        }
    }
}

/// Checks a copy request before anything is sent to the guest.
fn prepare_copy(
    offered: bool,
    fds: Vec<std::os::fd::OwnedFd>,
    file_name: String,
    guest_dir: &str,
    flags: u32,
) -> Result<CopyRequest, String> {
    let mut fds = fds.into_iter();
    let (Some(fd), None) = (fds.next(), fds.next()) else {
        return Err(
            "a copy request needs exactly one open file descriptor attached \
                    (SCM_RIGHTS): the source file"
                .into(),
        );
    };
    let source = File::from(fd);
    let meta = source
        .metadata()
        .map_err(|e| format!("cannot stat the source file: {e}"))?;
    if !meta.is_file() {
        return Err("the source is not a regular file".into());
    }
    names::check_file_name(&file_name).map_err(|e| e.to_string())?;
    let path_name = names::guest_path_name(guest_dir).map_err(|e| e.to_string())?;
    if !offered {
        return Err(
            "fcopy is not offered (it was rescinded); run `fakehost offer fcopy` first".into(),
        );
    }
    Ok(CopyRequest {
        file_name,
        path_name,
        flags,
        source,
        size: meta.len(),
        wait_for_channel: std::time::Duration::ZERO,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_command_wire_form() {
        let req = FcopyCommand::Copy {
            file_name: "big.iso".into(),
            guest_dir: "/srv/incoming/".into(),
            overwrite: false,
            create_path: true,
            wait_secs: 0,
        }
        .into_request();
        let line = String::from_utf8(req.to_line()).unwrap();
        assert_eq!(
            line,
            "{\"op\":\"service\",\"service\":\"fcopy\",\"command\":{\"create_path\":true,\
             \"file_name\":\"big.iso\",\"guest_dir\":\"/srv/incoming/\",\"op\":\"copy\",\
             \"overwrite\":false,\"wait_secs\":0}}\n"
        );
        assert_eq!(
            serde_json::from_str::<Request>(line.trim_end()).unwrap(),
            req
        );
    }

    #[test]
    fn copy_flags_default_to_false() {
        let cmd: FcopyCommand =
            serde_json::from_str(r#"{"op":"copy","file_name":"a","guest_dir":"/x"}"#).unwrap();
        assert_eq!(
            cmd,
            FcopyCommand::Copy {
                file_name: "a".into(),
                guest_dir: "/x".into(),
                overwrite: false,
                create_path: false,
                wait_secs: 0
            }
        );
    }

    #[test]
    fn unknown_commands_and_fields_are_malformed() {
        let host = FcopyHost::new(std::time::Duration::from_secs(1));
        for bad in [
            r#"{"op":"format_disk"}"#,
            r#"{"op":"copy","guest_dir":"/x"}"#,
            r#"{"op":"copy","file_name":"a","guest_dir":"/x","extra":1}"#,
            r#""copy""#,
            "null",
        ] {
            let mut sink = crate::test_support::NullProgress;
            let ctx = CommandContext {
                offered: true,
                fds: Vec::new(),
                progress: &mut sink,
            };
            let value = serde_json::from_str(bad).unwrap();
            assert!(
                matches!(run(&host, value, ctx), Err(CommandError::Malformed(_))),
                "{bad}"
            );
        }
    }
}
