//! The xs service's control commands: fault injection, and the blobs as the guest sees them.
//!
//! On the wire, inside the generic service request (`control::proto`):
//!
//! ```text
//! → {"op":"service","service":"xs","command":{"op":"fault","set":{"mode":"delay","ms":200}}}
//! ← {"type":"result","result":{"fault":{"mode":"delay","ms":200},"description":"every store
//!    operation delayed by 200ms","dropped":0}}                       ("set":null only reports)
//! → {"op":"service","service":"xs","command":{"op":"ls","prefix":"logs/"}}
//! ← {"type":"result","result":{"ok":true,"message":"2 blobs","bytes":0,"blobs":[{"name":
//!    "logs/a","size":3},{"name":"logs/b","size":9}]}}
//! → {"op":"service","service":"xs","command":{"op":"put","name":"a/b"}}     + the file's fd
//! → {"op":"service","service":"xs","command":{"op":"get","name":"a/b"}}     + an fd to write
//! → {"op":"service","service":"xs","command":{"op":"rm","name":"a/b"}}
//! ← {"type":"result","result":{"ok":false,"message":"no blob \"a/b\" in file:///...", ...}}
//! ```
//!
//! A bad name or a missing descriptor is refused (`{"type":"error"}`, the CLI's exit 2); a
//! store that says no is a result with `ok: false` (exit 1). The descriptors are opened by
//! the CLI with the user's permissions, as fcopy's `copy` does: the host opens no path.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use vmbus::xs_fastpath::xstore::{check_name, check_prefix};

use super::faults::Fault;
use super::store::StoreFailure;
use super::XsHost;
use crate::control::proto::Request;
use crate::service::{CommandContext, CommandError, ServiceClass};

/// How much of a file `put` reads at a time.
const READ_CHUNK: usize = 1 << 20;

/// A command for the xs service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum XsCommand {
    /// Reports the fault in force, after setting it if `set` is given.
    Fault {
        /// The new fault.
        #[serde(default)]
        set: Option<Fault>,
    },
    /// Lists the blobs whose names start with `prefix`.
    Ls {
        /// A plain string prefix ("" for all).
        #[serde(default)]
        prefix: String,
    },
    /// Stores the attached file (read to its end) as blob `name`, atomically.
    Put {
        /// The blob.
        name: String,
    },
    /// Writes blob `name` into the attached descriptor.
    Get {
        /// The blob.
        name: String,
    },
    /// Deletes blob `name`.
    Rm {
        /// The blob.
        name: String,
    },
}

impl XsCommand {
    /// The control request that carries this command.
    pub fn into_request(self) -> Request {
        Request::Service {
            service: XsHost::OFFER.name.to_owned(),
            // Serialising this plain enum cannot fail; Null would be refused by the server.
            command: serde_json::to_value(self).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// The answer to [`XsCommand::Fault`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultReport {
    /// The fault in force now.
    pub fault: Fault,
    /// It, in words.
    pub description: String,
    /// Requests dropped so far (`--drop-responses`).
    pub dropped: u64,
}

/// The answer to the blob commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobReport {
    /// The store did it.
    pub ok: bool,
    /// What happened, in words.
    pub message: String,
    /// Bytes stored (`put`) or written (`get`).
    #[serde(default)]
    pub bytes: u64,
    /// `ls`: the blobs, in name order.
    #[serde(default)]
    pub blobs: Vec<BlobEntry>,
}

/// One blob of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobEntry {
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

impl BlobReport {
    fn ok(message: String, bytes: u64) -> BlobReport {
        BlobReport {
            ok: true,
            message,
            bytes,
            blobs: Vec::new(),
        }
    }

    fn failed(message: String) -> BlobReport {
        BlobReport {
            ok: false,
            message,
            bytes: 0,
            blobs: Vec::new(),
        }
    }
}

/// Runs a command on `host` (the control connection's thread).
pub(super) fn run(
    host: &XsHost,
    command: serde_json::Value,
    ctx: CommandContext<'_>,
) -> Result<serde_json::Value, CommandError> {
    let report = match CommandError::parse::<XsCommand>(command)? {
        XsCommand::Fault { set } => {
            if let Some(fault) = set {
                host.set_fault(fault.check().map_err(CommandError::Refused)?);
            }
            let fault = host.fault();
            let report = FaultReport {
                fault,
                description: fault.to_string(),
                dropped: host.xs_status().dropped,
            };
            return serde_json::to_value(report).map_err(|e| CommandError::Refused(e.to_string()));
        }
        XsCommand::Ls { prefix } => {
            check_prefix(&prefix).map_err(|e| refused(&prefix, e))?;
            ls(host, &prefix)
        }
        XsCommand::Put { name } => {
            check_name(&name).map_err(|e| refused(&name, e))?;
            put(host, &name, one_fd(ctx.fds, "put", "the file to store")?)
        }
        XsCommand::Get { name } => {
            check_name(&name).map_err(|e| refused(&name, e))?;
            get(
                host,
                &name,
                one_fd(ctx.fds, "get", "where to write the blob")?,
            )
        }
        XsCommand::Rm { name } => {
            check_name(&name).map_err(|e| refused(&name, e))?;
            match host.block_on(host.store().delete(&name)) {
                Some(Ok(())) => BlobReport::ok(format!("deleted {name}"), 0),
                other => failed(host, other),
            }
        }
    };
    if !report.ok {
        log::warn!("xs: blobs command failed: {}", report.message);
    }
    serde_json::to_value(report).map_err(|e| CommandError::Refused(e.to_string()))
}

fn refused(name: &str, e: impl std::fmt::Display) -> CommandError {
    CommandError::Refused(format!("{name:?} is not a blob name: {e}"))
}

fn one_fd(fds: Vec<OwnedFd>, op: &str, what: &str) -> Result<File, CommandError> {
    let mut fds = fds.into_iter();
    match (fds.next(), fds.next()) {
        (Some(fd), None) => Ok(File::from(fd)),
        _ => Err(CommandError::Refused(format!(
            "{op} needs exactly one open file descriptor attached (SCM_RIGHTS): {what}"
        ))),
    }
}

/// The report of a store operation that failed, or that could not run (no runtime).
fn failed<T>(host: &XsHost, result: Option<Result<T, StoreFailure>>) -> BlobReport {
    let url = host.store().url();
    BlobReport::failed(match result {
        Some(Err(StoreFailure::NotFound(name))) => format!("no blob {name:?} in {url}"),
        Some(Err(e)) => format!("the blob store {url} failed: {e}"),
        _ => "the xs service is shutting down".into(),
    })
}

fn ls(host: &XsHost, prefix: &str) -> BlobReport {
    match host.block_on(host.store().list(prefix)) {
        Some(Ok(listed)) => BlobReport {
            ok: true,
            message: format!(
                "{} blob{}",
                listed.len(),
                if listed.len() == 1 { "" } else { "s" }
            ),
            bytes: 0,
            blobs: listed
                .into_iter()
                .map(|l| BlobEntry {
                    name: l.name,
                    size: l.size,
                })
                .collect(),
        },
        other => failed(host, other),
    }
}

fn put(host: &XsHost, name: &str, mut file: File) -> BlobReport {
    let mut upload = match host.store().upload(name) {
        Ok(upload) => upload,
        Err(e) => return failed::<()>(host, Some(Err(e))),
    };
    let mut buf = vec![0u8; READ_CHUNK];
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                host.block_on(upload.abort());
                return BlobReport::failed(format!(
                    "cannot read the file after {total} bytes: {}; {name:?} is unchanged",
                    crate::cli::os_reason(&e)
                ));
            }
        };
        match host.block_on(upload.write(&buf[..n])) {
            Some(Ok(())) => total += n as u64,
            other => {
                host.block_on(upload.abort());
                return failed(host, other);
            }
        }
    }
    match host.block_on(upload.finish()) {
        Some(Ok(())) => {
            log::info!("xs: stored {name:?} ({total} bytes) for the CLI");
            BlobReport::ok(
                format!("stored {name} ({total} bytes) in {}", host.store().url()),
                total,
            )
        }
        other => failed(host, other),
    }
}

fn get(host: &XsHost, name: &str, mut file: File) -> BlobReport {
    let (mut chunks, size) = match host.block_on(host.store().get_stream(name)) {
        Some(Ok(got)) => got,
        other => return failed(host, other.map(|r| r.map(drop))),
    };
    let mut written = 0u64;
    while let Some(chunk) = host.block_on(chunks.next()).flatten() {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => return failed::<()>(host, Some(Err(e))),
        };
        if let Err(e) = file.write_all(&chunk) {
            return BlobReport::failed(format!(
                "cannot write {name} after {written} of {size} bytes: {}",
                crate::cli::os_reason(&e)
            ));
        }
        written += chunk.len() as u64;
    }
    BlobReport::ok(format!("{name}: {written} bytes"), written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_have_a_stable_wire_form() {
        let req = XsCommand::Fault {
            set: Some(Fault::FailStatus { status: 5 }),
        }
        .into_request();
        assert_eq!(
            String::from_utf8(req.to_line()).unwrap(),
            "{\"op\":\"service\",\"service\":\"xs\",\"command\":{\"op\":\"fault\",\"set\":\
             {\"mode\":\"fail_status\",\"status\":5}}}\n"
        );
        let ls: XsCommand = serde_json::from_str(r#"{"op":"ls"}"#).unwrap();
        assert_eq!(ls, XsCommand::Ls { prefix: "".into() });
        assert!(serde_json::from_str::<XsCommand>(r#"{"op":"rm"}"#).is_err());
        assert!(serde_json::from_str::<XsCommand>(r#"{"op":"rm","name":"a","x":1}"#).is_err());
    }
}
