//! One file copy: START_FILE_COPY, WRITE_TO_FILE × n, COMPLETE_FCOPY; CANCEL_FCOPY on failure.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vmbus::fcopy::{self as wire, op, DATA_FRAGMENT};
use vmbus::ic::{self, status::HV_S_OK};

use super::txn::{ReadyError, TxnError};
use super::FcopyHost;

/// What to copy, as the control socket received it.
#[derive(Debug)]
pub struct CopyRequest {
    /// The file name on the guest (no '/').
    pub file_name: String,
    /// The guest directory, with its trailing '/'.
    pub path_name: String,
    /// `OVER_WRITE` | `CREATE_PATH`.
    pub flags: u32,
    /// The source, opened by the client and passed to us.
    pub source: File,
    /// Bytes to copy (the source's size when the request arrived).
    pub size: u64,
}

/// The step a copy was at; names as in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Step {
    /// Waiting for the channel to be opened and negotiated.
    ChannelSetup,
    /// START_FILE_COPY.
    StartFileCopy,
    /// WRITE_TO_FILE (including reading the source for it).
    WriteToFile,
    /// COMPLETE_FCOPY.
    CompleteFcopy,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::ChannelSetup => "CHANNEL_SETUP",
            Step::StartFileCopy => "START_FILE_COPY",
            Step::WriteToFile => "WRITE_TO_FILE",
            Step::CompleteFcopy => "COMPLETE_FCOPY",
        })
    }
}

/// The outcome of a copy, as sent to the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CopyReport {
    /// The guest accepted every step.
    pub ok: bool,
    /// The guest's status for the last step answered (the failed one on failure); `None` when
    /// the failure was not a guest answer (timeout, guest gone, source unreadable).
    pub hresult: Option<u32>,
    /// `vmbus::ic::status_meaning(hresult)`.
    pub meaning: Option<String>,
    /// The failed step (`None` on success).
    pub step: Option<Step>,
    /// Bytes the guest acknowledged.
    pub bytes: u64,
    /// Seconds from the request to the end.
    pub seconds: f64,
    /// What went wrong, in words (`None` on success).
    pub error: Option<String>,
}

/// Called after every acknowledged fragment with (done, total); returning false aborts the copy
/// (the client that asked for it is gone).
pub type Progress<'a> = dyn FnMut(u64, u64) -> bool + 'a;

#[derive(Debug)]
enum Failure {
    Status(u32),
    Txn(TxnError),
    Ready(ReadyError),
    /// Host-side trouble (source unreadable, encoding): the guest is fine and gets a CANCEL.
    Local(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Status(s) => write!(f, "{s:#010x} {}", ic::status_meaning(*s)),
            Failure::Txn(e) => e.fmt(f),
            Failure::Ready(e) => e.fmt(f),
            Failure::Local(e) => f.write_str(e),
        }
    }
}

/// Resets `copying` however the copy ends.
struct CopyingFlag<'a>(&'a FcopyHost);

impl Drop for CopyingFlag<'_> {
    fn drop(&mut self) {
        self.0.lock().copying = false;
    }
}

impl FcopyHost {
    /// Copies `req.source` into the guest. Copies are serialised: this waits for a running one.
    pub fn copy(&self, req: CopyRequest, progress: &mut Progress<'_>) -> CopyReport {
        let _one_at_a_time = self.copy_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.lock().copying = true;
        let _flag = CopyingFlag(self);
        let started = Instant::now();
        log::info!(
            "copy {:?} into {:?}: {} bytes, flags {:#x}",
            req.file_name,
            req.path_name,
            req.size,
            req.flags
        );
        let mut bytes = 0;
        let result = self.run(&req, &mut bytes, progress);
        let seconds = started.elapsed().as_secs_f64();
        let report = match result {
            Ok(()) => {
                log::info!(
                    "copy {:?} done: {bytes} bytes in {seconds:.2} s, guest status 0x00000000",
                    req.file_name
                );
                CopyReport {
                    ok: true,
                    hresult: Some(HV_S_OK),
                    meaning: Some(ic::status_meaning(HV_S_OK).to_owned()),
                    step: None,
                    bytes,
                    seconds,
                    error: None,
                }
            }
            Err((step, failure)) => {
                log::warn!("copy {:?} failed at {step}: {failure}", req.file_name);
                self.cancel_after(&failure);
                let hresult = match failure {
                    Failure::Status(s) => Some(s),
                    _ => None,
                };
                CopyReport {
                    ok: false,
                    hresult,
                    meaning: hresult.map(|s| ic::status_meaning(s).to_owned()),
                    step: Some(step),
                    bytes,
                    seconds,
                    error: Some(match &failure {
                        Failure::Status(s) => format!(
                            "guest answered {step} with {s:#010x} ({})",
                            ic::status_meaning(*s)
                        ),
                        other => other.to_string(),
                    }),
                }
            }
        };
        report
    }

    fn run(
        &self,
        req: &CopyRequest,
        bytes: &mut u64,
        progress: &mut Progress<'_>,
    ) -> Result<(), (Step, Failure)> {
        // Encode first: a bad name is an error before anything reaches the guest.
        let start = wire::encode_start(&req.file_name, &req.path_name, req.flags, req.size)
            .map_err(|e| {
                (
                    Step::StartFileCopy,
                    Failure::Local(format!("bad name: {e}")),
                )
            })?;
        self.wait_ready()
            .map_err(|e| (Step::ChannelSetup, Failure::Ready(e)))?;
        self.step(Step::StartFileCopy, &start)?;

        let mut buf = vec![0u8; DATA_FRAGMENT];
        let mut offset = 0u64;
        while offset < req.size {
            let want = usize::try_from(req.size - offset)
                .unwrap_or(usize::MAX)
                .min(DATA_FRAGMENT);
            let data = buf.get_mut(..want).unwrap_or_default();
            read_exact_at(&req.source, data, offset, req.size)
                .map_err(|e| (Step::WriteToFile, Failure::Local(e)))?;
            let msg = wire::encode_write(offset, data)
                .map_err(|e| (Step::WriteToFile, Failure::Local(e.to_string())))?;
            self.step(Step::WriteToFile, &msg)?;
            offset += want as u64;
            *bytes = offset;
            if !progress(offset, req.size) {
                return Err((
                    Step::WriteToFile,
                    Failure::Local(
                        "cancelled: the client that asked for the copy went away".into(),
                    ),
                ));
            }
        }
        self.step(Step::CompleteFcopy, &wire::encode_op(op::COMPLETE_FCOPY))
    }

    /// One transaction; a non-zero status is a failure of `step`.
    fn step(&self, step: Step, msg: &[u8]) -> Result<(), (Step, Failure)> {
        match self.transact(msg) {
            Ok(HV_S_OK) => Ok(()),
            Ok(status) => Err((step, Failure::Status(status))),
            Err(e) => Err((step, Failure::Txn(e))),
        }
    }

    /// CANCEL_FCOPY after a failure, so the daemon closes and deletes a partial file. (After a
    /// failed START the daemon has already forgotten the name, so a pre-existing file is safe,
    /// fcopy.md §6.1 step 5.) Whether a real host does this is UNVERIFIED.
    fn cancel_after(&self, failure: &Failure) {
        let cancel = wire::encode_op(op::CANCEL_FCOPY);
        match failure {
            Failure::Txn(TxnError::GuestGone) | Failure::Ready(_) => {}
            Failure::Txn(TxnError::Timeout(_)) => {
                log::info!(
                    "copy: sending CANCEL_FCOPY without waiting (the guest is not answering)"
                );
                self.send_abandoned(&cancel);
            }
            Failure::Status(_) | Failure::Local(_) => match self.transact(&cancel) {
                Ok(status) => log::info!(
                    "copy: CANCEL_FCOPY answered {status:#010x} ({})",
                    ic::status_meaning(status)
                ),
                Err(e) => log::warn!("copy: CANCEL_FCOPY not answered: {e}"),
            },
        }
    }
}

/// Fills `buf` from `file` at `offset`, or says why not (the file shrank, a read error).
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64, size: u64) -> Result<(), String> {
    let mut filled = 0;
    while filled < buf.len() {
        let at = offset + filled as u64;
        match file.read_at(&mut buf[filled..], at) {
            Ok(0) => {
                return Err(format!(
                    "the source file shrank while copying (ended at {at} of {size} bytes)"
                ))
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("cannot read the source file at offset {at}: {e}")),
        }
    }
    Ok(())
}
