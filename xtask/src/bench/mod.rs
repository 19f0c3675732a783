//! Benchmarks (not tests): each prints a ratio against a baseline measured
//! side by side in the same run.
//!
//! - [`boot`]: boot-to-ready of qinit against systemd.
//! - [`update`]: apply throughput of qupdate against a plain copy and RAUC.
//! - [`qrexec`]: qrexec throughput against a raw vchan, call latency both
//!   ways, and the per-VM daemons' memory.
//! - [`verity`]: our dm-verity tree against `veritysetup format`, and a full
//!   image build from a warm cache.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub mod boot;
pub mod qrexec;
pub mod update;
pub mod verity;

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

/// Deterministic, incompressible bytes: no variant gains from compression.
pub(crate) fn write_pseudo_random(path: &Path, len: u64, context: &str) -> Result<()> {
    use std::io::{Read, Write};
    let mut xof = blake3::Hasher::new_derive_key(context)
        .update(b"v1")
        .finalize_xof();
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64))?;
        xof.read_exact(&mut buf[..n])?;
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}
