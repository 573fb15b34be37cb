//! Choosing how device nodes are made, and the bus's view of the chosen frontend.

use std::path::Path;
use std::sync::Arc;

use crate::bus::client::DeviceRegistry;
use crate::cuse::CuseFrontend;
use crate::device::Device;
use crate::fuse::FuseFrontend;
use crate::preload::PreloadFrontend;

/// What the user asked for with `--frontend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FrontendChoice {
    /// CUSE when this kernel has it (loading the module if needed), else a FUSE mount, else
    /// the preload frontend.
    Auto,
    /// Real character devices through /dev/cuse.
    Cuse,
    /// Files in a FUSE mount over the device's directory (or on its own file, /dev/lguest).
    Fuse,
    /// No kernel help: only processes started with the preload library (`cusedev run`) see
    /// the devices (docs/preload.md).
    Preload,
}

/// The frontend that runs.
pub enum Frontend {
    Cuse(CuseFrontend),
    Fuse(FuseFrontend),
    Preload(PreloadFrontend),
}

impl Frontend {
    /// Picks and checks the frontend, saying in the log which one runs and why. The error is
    /// the reason no frontend can run.
    /// `preload_dir` is the preload frontend's run directory (`None`: the default one).
    pub fn choose(
        choice: FrontendChoice,
        dev_root: &Path,
        preload_dir: Option<&Path>,
    ) -> Result<Frontend, String> {
        let fuse = || -> Result<Frontend, String> {
            FuseFrontend::probe().map_err(|err| err.to_string())?;
            Ok(Frontend::Fuse(FuseFrontend::new(dev_root)))
        };
        let preload = |why: String| -> Result<Frontend, String> {
            let frontend =
                PreloadFrontend::start(dev_root, preload_dir).map_err(|err| err.to_string())?;
            log::info!("frontend: preload ({why}; devices under {} only for processes started with the preload library)", dev_root.display());
            Ok(Frontend::Preload(frontend))
        };
        match choice {
            FrontendChoice::Cuse => {
                CuseFrontend::probe()?;
                log::info!(
                    "frontend: CUSE (character devices in {})",
                    dev_root.display()
                );
                Ok(Frontend::Cuse(CuseFrontend::new(dev_root)))
            }
            FrontendChoice::Fuse => {
                let frontend = fuse()?;
                log::info!(
                    "frontend: FUSE mount under {} (as asked)",
                    dev_root.display()
                );
                Ok(frontend)
            }
            FrontendChoice::Preload => preload("as asked".to_owned()),
            FrontendChoice::Auto => match CuseFrontend::probe() {
                Ok(()) => {
                    log::info!(
                        "frontend: CUSE (auto: /dev/cuse works; character devices in {})",
                        dev_root.display()
                    );
                    Ok(Frontend::Cuse(CuseFrontend::new(dev_root)))
                }
                Err(why_not) => match fuse() {
                    Ok(frontend) => {
                        log::info!(
                            "frontend: FUSE mount under {} (auto: no CUSE here: {why_not}; \
                             stat() shows regular files instead of character devices)",
                            dev_root.display()
                        );
                        Ok(frontend)
                    }
                    Err(no_fuse) => preload(format!(
                        "auto: no CUSE here: {why_not}; no FUSE either: {no_fuse}"
                    )),
                },
            },
        }
    }

    /// Unregisters every device (CUSE) or unmounts every directory and file (FUSE).
    pub fn shutdown(&self) {
        match self {
            Frontend::Cuse(cuse) => cuse.shutdown(),
            Frontend::Fuse(fuse) => fuse.shutdown(),
            Frontend::Preload(preload) => preload.shutdown(),
        }
    }
}

impl DeviceRegistry for Frontend {
    fn add_device(&self, device: Arc<dyn Device>) -> Result<(), String> {
        match self {
            Frontend::Cuse(cuse) => cuse.add_device(device).map_err(|e| e.to_string()),
            Frontend::Fuse(fuse) => fuse.add_device(device).map_err(|e| e.to_string()),
            Frontend::Preload(preload) => preload.add_device(device).map_err(|e| e.to_string()),
        }
    }

    fn remove_device(&self, name: &str) {
        let result = match self {
            Frontend::Cuse(cuse) => cuse.remove_device(name).map_err(|e| e.to_string()),
            Frontend::Fuse(fuse) => fuse.remove_device(name).map_err(|e| e.to_string()),
            Frontend::Preload(preload) => {
                preload.remove_device(name);
                Ok(())
            }
        };
        if let Err(e) = result {
            log::error!("removing /dev/{name}: {e}");
        }
    }
}
