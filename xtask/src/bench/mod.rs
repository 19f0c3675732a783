//! Benchmarks (not tests): each prints a ratio against a baseline measured
//! side by side in the same run.
//!
//! - [`boot`]: boot-to-ready of qinit against systemd.
//! - [`update`]: apply throughput of qupdate against a plain copy and RAUC.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub mod boot;
pub mod update;

pub(crate) fn kernel_modules_dir(cache: &Path) -> Result<PathBuf> {
    let extract = cache.join("apt-trixie/extract");
    for e in std::fs::read_dir(&extract)
        .with_context(|| format!("{}: build an image first", extract.display()))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("linux-image-") && e.path().is_dir() {
            let mods = e.path().join("usr/lib/modules");
            if let Some(k) = std::fs::read_dir(&mods)?.flatten().next() {
                return Ok(k.path());
            }
        }
    }
    bail!("no unpacked kernel package under {}", extract.display())
}

pub(crate) fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}
