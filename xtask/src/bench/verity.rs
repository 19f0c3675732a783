//! `cargo xtask bench verity`: our dm-verity tree (lib/verity, what qimage
//! uses) against `veritysetup format` on the same data in one run, both
//! writing a separate hash file, alternating; then a full image build from
//! a warm cache. Both tree builders must give the same root hash, or the
//! benchmark fails.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// Times one tree builder run as a process and takes the root hash from
/// its `Root hash:` line (both print one).
fn timed(cmd: &mut Command) -> Result<(f64, String)> {
    let t = Instant::now();
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let root = text
        .lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(|h| h.trim().to_owned())
        .with_context(|| format!("no `Root hash:` from {cmd:?}"))?;
    Ok((secs, root))
}

pub fn run(root: &Path, runs: u32, size_mib: u64) -> Result<()> {
    crate::build_static_binaries(root)?;
    let work = root.join("target/bench/verity");
    fs::create_dir_all(&work)?;
    let data = work.join("data.img");
    super::write_pseudo_random(&data, size_mib << 20, "qubes-dom0 bench verity data")?;
    let salt = [0x5au8; 32];
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..runs {
        eprintln!("xtask: bench verity run {}/{runs}", i + 1);
        // qimage's release build computes the trees of real images.
        let (ta, ha) = timed(
            Command::new(crate::static_bin_dir(root).join("qimage"))
                .arg("verity")
                .arg(&data)
                .arg(work.join("ours.hash"))
                .arg(format!("--salt={}", hex::encode(salt))),
        )?;
        let _ = fs::remove_file(work.join("veritysetup.hash"));
        let (tb, hb) = timed(
            Command::new("veritysetup")
                .arg("format")
                .arg(&data)
                .arg(work.join("veritysetup.hash"))
                .arg(format!("--salt={}", hex::encode(salt)))
                .arg("--uuid=22222222-2222-2222-2222-222222222222"),
        )?;
        if ha != hb {
            bail!("root hashes differ: ours {ha}, veritysetup {hb}");
        }
        a.push(ta);
        b.push(tb);
    }
    let mb = (size_mib << 20) as f64 / 1e6;
    let (ta, tb) = (super::mean(&a), super::mean(&b));
    println!("dm-verity tree over {size_mib} MiB, {runs} run(s) each, same root hash:");
    println!("  qimage verity        {ta:6.2} s  {:7.1} MB/s", mb / ta);
    println!("  veritysetup format   {tb:6.2} s  {:7.1} MB/s", mb / tb);
    println!("  throughput ours/veritysetup {:.2}", tb / ta);

    // A full build of the qemu profile from a warm cache (binaries built,
    // packages cached): what a developer waits for after a change.
    crate::build_image(root, "qemu")?;
    let t = Instant::now();
    crate::build_image(root, "qemu")?;
    println!(
        "full image build of `qemu` from a warm cache: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
