//! Command-line overrides shared by `qupdate` and `qupdated`: without
//! `--disk` everything comes from the running dom0; with it, the slots live
//! on a disk image (host tests, image preparation).

use std::path::PathBuf;

use clap::Args;

use crate::{Config, UpdateError};

#[derive(Debug, Clone, Default, Args)]
pub struct SystemArgs {
    /// Disk (device or image file) holding the slots.
    #[arg(long, global = true)]
    pub disk: Option<PathBuf>,
    /// The slot treated as booted (A or B); with --disk.
    #[arg(long, global = true)]
    pub booted: Option<String>,
    /// The system's compatible string; with --disk.
    #[arg(long, global = true)]
    pub compatible: Option<String>,
    /// Trust store (default /etc/qupdate/trust.toml).
    #[arg(long, global = true)]
    pub trust: Option<PathBuf>,
    /// State file (default /var/lib/qupdate/state.json).
    #[arg(long, global = true)]
    pub state: Option<PathBuf>,
    /// The booted image's version; with --disk (dom0 reads its own from
    /// /etc/qinit/image).
    #[arg(long, global = true)]
    pub image_version: Option<String>,
    /// The booted image's security epoch, which mark-good raises the
    /// floor to; with --disk.
    #[arg(long, global = true)]
    pub image_epoch: Option<u64>,
    /// How far above the floor a bundle's epoch may be; with --disk (the
    /// running dom0's comes from its image info).
    #[arg(long, global = true, default_value_t = qcontract::DEFAULT_MAX_EPOCH_STEP,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_epoch_step: u64,
}

impl SystemArgs {
    pub fn config(&self) -> Result<Config, UpdateError> {
        let mut cfg = match &self.disk {
            None => Config::from_system()?,
            Some(disk) => Config {
                disk: disk.clone(),
                trust: crate::TRUST_STORE.into(),
                state: crate::STATE_FILE.into(),
                compatible: self
                    .compatible
                    .clone()
                    .ok_or_else(|| UpdateError::Usage("--disk needs --compatible".into()))?,
                booted: self
                    .booted
                    .as_deref()
                    .ok_or_else(|| UpdateError::Usage("--disk needs --booted".into()))?
                    .parse()
                    .map_err(|e| UpdateError::Usage(format!("--booted: {e}")))?,
                image_version: self
                    .image_version
                    .clone()
                    .ok_or_else(|| UpdateError::Usage("--disk needs --image-version".into()))?,
                image_epoch: self
                    .image_epoch
                    .ok_or_else(|| UpdateError::Usage("--disk needs --image-epoch".into()))?,
                max_epoch_step: self.max_epoch_step,
                lock_wait: crate::LOCK_WAIT,
            },
        };
        if let Some(t) = &self.trust {
            cfg.trust = t.clone();
        }
        if let Some(st) = &self.state {
            cfg.state = st.clone();
        }
        Ok(cfg)
    }
}
