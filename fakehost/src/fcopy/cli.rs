//! `fakehost copy`: the fcopy service's subcommand, as users know it.
//!
//! Same flags, messages and exit codes as ever (0 copied, 1 the guest failed or did not answer,
//! 2 usage error or fakehost not reachable); it just reaches the host through the generic
//! service request now ([`super::command`]).

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;

use super::{names, CopyReport, FcopyCommand};
use crate::cli::{os_reason, subcommand, usage_error, EXIT_GUEST_FAILED};
use crate::control::client::{Client, ClientError};
use crate::control::proto::Response;
use crate::progress::ProgressBar;
use crate::service::ServiceCli;

/// The table's hook for fcopy's subcommands.
pub const CLI: ServiceCli = ServiceCli {
    augment: |cmd| FcopyCli::augment_subcommands(cmd),
    run,
    serve_args: ServiceCli::NO_SERVE_ARGS,
};

#[derive(Debug, Subcommand)]
enum FcopyCli {
    /// Copy a file into the guest, like `Copy-VMFile -FileSource Host`.
    ///
    /// The file is opened here, with your permissions, and its open descriptor is handed to the
    /// host, which never opens paths for you. GUEST_DIR gets a trailing '/' if it has none (the
    /// guest daemon only creates directories followed by '/'). The guest's answer is printed as
    /// an HRESULT: 0x00000000 success, 0x80070050 file exists, 0x80070070 disk full,
    /// 0x80004005 failure. Exit status: 0 copied, 1 the guest failed or did not answer,
    /// 2 usage error or fakehost not reachable.
    #[command(after_help = "Example:\n  \
        fakehost copy ./big.iso /srv/incoming --create-path --overwrite")]
    Copy {
        /// The file to copy
        src: PathBuf,
        /// The directory on the guest to copy into
        guest_dir: String,
        /// Name of the file on the guest [default: the name of SRC]
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Create GUEST_DIR and its parents on the guest if missing (CREATE_PATH)
        #[arg(long)]
        create_path: bool,
        /// Replace an existing file on the guest (OVER_WRITE); without it the guest answers
        /// 0x80070050 file exists
        #[arg(long)]
        overwrite: bool,
        /// If no guest has the fcopy channel open, wait up to SECS for one (for scripts that
        /// start both sides together); without it the copy fails at once, as Hyper-V does
        /// when the guest's service is not running
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        wait: u64,
    },
}

fn run(matches: &clap::ArgMatches, control: &Path) -> Option<ExitCode> {
    Some(match subcommand::<FcopyCli>(matches)? {
        FcopyCli::Copy {
            src,
            guest_dir,
            name,
            create_path,
            overwrite,
            wait,
        } => copy(
            control,
            &src,
            &guest_dir,
            name.as_deref(),
            (create_path, overwrite),
            wait,
        ),
    })
}

fn copy(
    control: &Path,
    src: &Path,
    guest_dir: &str,
    name: Option<&str>,
    (create_path, overwrite): (bool, bool),
    wait_secs: u64,
) -> ExitCode {
    let file_name = match names::guest_file_name(src, name) {
        Ok(name) => name,
        Err(e) => return usage_error("copy", e),
    };
    let path_name = match names::guest_path_name(guest_dir) {
        Ok(path) => path,
        Err(e) => return usage_error("copy", e),
    };
    let file = match File::open(src) {
        Ok(file) => file,
        Err(e) => {
            return usage_error(
                "copy",
                format!("cannot open {}: {}", src.display(), os_reason(&e)),
            )
        }
    };
    match file.metadata() {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return usage_error("copy", format!("{} is not a regular file", src.display())),
        Err(e) => {
            return usage_error(
                "copy",
                format!("cannot stat {}: {}", src.display(), os_reason(&e)),
            )
        }
    }
    let mut client = match Client::connect(control) {
        Ok(client) => client,
        Err(e) => return usage_error("copy", e),
    };
    let request = FcopyCommand::Copy {
        file_name: file_name.clone(),
        guest_dir: path_name.clone(),
        overwrite,
        create_path,
        wait_secs,
    }
    .into_request();
    if let Err(e) = client.send(&request, Some(file.as_fd())) {
        return usage_error("copy", e);
    }
    drop(file);
    let mut bar = ProgressBar::new();
    let result = loop {
        match client.next_response() {
            Ok(Some(Response::Progress { done, total })) => bar.update(done, total),
            Ok(Some(other)) => break Ok(other),
            Ok(None) => break Err(ClientError::NoAnswer),
            Err(e) => break Err(e),
        }
    };
    bar.finish();
    match result {
        Ok(Response::Result { result }) => match serde_json::from_value::<CopyReport>(result) {
            Ok(report) => {
                println!("{}", result_line(&file_name, &path_name, &report));
                if report.ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(EXIT_GUEST_FAILED)
                }
            }
            Err(e) => usage_error("copy", ClientError::BadResponse(e.to_string())),
        },
        Ok(Response::Error { error }) => usage_error("copy", error),
        Ok(other) => usage_error(
            "copy",
            format!("unexpected answer from fakehost: {other:?}"),
        ),
        Err(e) => usage_error("copy", e),
    }
}

/// The line `fakehost copy` prints at the end.
///
/// `copied big.iso (10485760 bytes) to /srv/incoming/: 0x00000000 success in 0.41 s (25.6 MB/s)`
/// or `copy failed at START_FILE_COPY: 0x80070050 file exists`.
pub fn result_line(file_name: &str, guest_dir: &str, report: &CopyReport) -> String {
    if report.ok {
        let status = report.hresult.unwrap_or(0);
        let meaning = report.meaning.as_deref().unwrap_or("success");
        let rate = if report.seconds > 0.0 {
            format!(" ({:.1} MB/s)", report.bytes as f64 / report.seconds / 1e6)
        } else {
            String::new()
        };
        return format!(
            "copied {file_name} ({} bytes) to {guest_dir}: {status:#010x} {meaning} in {:.2} s{rate}",
            report.bytes, report.seconds
        );
    }
    let step = report
        .step
        .map(|s| s.to_string())
        .unwrap_or_else(|| "an unknown step".into());
    match (report.hresult, &report.meaning) {
        (Some(status), Some(meaning)) => format!("copy failed at {step}: {status:#010x} {meaning}"),
        (Some(status), None) => format!("copy failed at {step}: {status:#010x}"),
        (None, _) => format!(
            "copy failed at {step}: {}",
            report.error.as_deref().unwrap_or("no reason given")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fcopy::Step;

    #[test]
    fn success_line_has_size_status_time_and_rate() {
        let report = CopyReport {
            ok: true,
            hresult: Some(0),
            meaning: Some("success".into()),
            step: None,
            bytes: 10_485_760,
            seconds: 0.41,
            error: None,
        };
        assert_eq!(
            result_line("big.iso", "/srv/incoming/", &report),
            "copied big.iso (10485760 bytes) to /srv/incoming/: 0x00000000 success in 0.41 s \
             (25.6 MB/s)"
        );
    }

    #[test]
    fn failure_line_names_step_and_status() {
        let report = CopyReport {
            ok: false,
            hresult: Some(0x8007_0050),
            meaning: Some("file exists".into()),
            step: Some(Step::StartFileCopy),
            bytes: 0,
            seconds: 0.01,
            error: Some("guest answered START_FILE_COPY with 0x80070050 (file exists)".into()),
        };
        assert_eq!(
            result_line("big.iso", "/srv/incoming/", &report),
            "copy failed at START_FILE_COPY: 0x80070050 file exists"
        );
    }

    #[test]
    fn failure_without_status_shows_the_error() {
        let report = CopyReport {
            ok: false,
            hresult: None,
            meaning: None,
            step: Some(Step::WriteToFile),
            bytes: 6144,
            seconds: 60.0,
            error: Some("guest did not answer within 60 s".into()),
        };
        assert_eq!(
            result_line("a", "/b/", &report),
            "copy failed at WRITE_TO_FILE: guest did not answer within 60 s"
        );
    }
}
