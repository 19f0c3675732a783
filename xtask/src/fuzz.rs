//! `cargo xtask fuzz`: every cargo-fuzz target in `fuzz/` for a bounded
//! time each. `cargo xtask test` runs it too, so a parser that crashes on
//! some input fails the suite. cargo-fuzz needs a nightly toolchain; where
//! none is installed (it cannot be downloaded here) the step says so and is
//! skipped, and everything else still runs.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

fn nightly() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn cargo_fuzz_installed() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "cargo", "fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The targets, from `cargo fuzz list`.
fn targets(dir: &Path) -> Result<Vec<String>> {
    let out = Command::new("rustup")
        .args(["run", "nightly", "cargo", "fuzz", "list"])
        .current_dir(dir)
        .output()
        .context("cargo fuzz list")?;
    if !out.status.success() {
        bail!("cargo fuzz list: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Runs each target for `seconds`; returns how many ran (0 if skipped).
pub fn run(root: &Path, seconds: u64) -> Result<u64> {
    if !nightly() {
        eprintln!(
            "xtask: fuzz: skipped: no nightly toolchain (cargo-fuzz needs one; \
             `rustup toolchain install nightly` where it can be downloaded)"
        );
        return Ok(0);
    }
    if !cargo_fuzz_installed() {
        eprintln!("xtask: fuzz: installing cargo-fuzz");
        crate::run_cmd(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let dir = root.join("fuzz");
    let mut ran = 0;
    for t in targets(&dir)? {
        eprintln!("xtask: fuzz: {t} for {seconds} s");
        let out = Command::new("rustup")
            .args(["run", "nightly", "cargo", "fuzz", "run", &t, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .current_dir(&dir)
            .output()
            .with_context(|| format!("cargo fuzz run {t}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "fuzz target {t} failed (the crashing input is under fuzz/artifacts/{t}/):\n{}",
                tail.join("\n")
            );
        }
        // libFuzzer's last status line: "#N DONE cov: .. exec/s: ..".
        let done = log
            .lines()
            .rev()
            .find(|l| l.contains("DONE"))
            .unwrap_or("(no summary)");
        println!("fuzz {t}: {seconds} s, no crash: {}", done.trim());
        ran += 1;
    }
    Ok(ran)
}
