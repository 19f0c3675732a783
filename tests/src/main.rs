//! `qlab`: run the scenario suite on a target.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

use qlab::runner::{self, RunOptions};
use qlab::scenario;

/// Runs the end-to-end scenarios on nested QEMU or on a lab machine.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run scenarios on a target; exits 1 when one fails.
    Run {
        /// `qemu` for the built-in QEMU target, or a lab target's TOML file.
        #[arg(long)]
        target: String,
        /// Scenarios to run, in order (default: all); comma separated or
        /// repeated.
        #[arg(long = "scenario", value_delimiter = ',')]
        scenarios: Vec<String>,
        /// Directory of built images (`cargo xtask image`).
        #[arg(long, default_value = "target/images")]
        images: PathBuf,
        /// The disk image to flash (default: <images>/qemu-test/disk.img).
        #[arg(long)]
        disk: Option<PathBuf>,
        /// An update bundle as NAME=FILE (`next` and `broken` default to
        /// the bundles of qemu-test-next and qemu-test-broken).
        #[arg(long = "bundle")]
        bundles: Vec<String>,
        /// Where run directories go.
        #[arg(long, default_value = "target/lab")]
        out: PathBuf,
        /// Copy the serial console to stdout.
        #[arg(long)]
        echo: bool,
    },
    /// List the scenarios.
    List,
    /// Check a lab target file and print what it describes.
    Check {
        /// The lab target's TOML file.
        target: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qlab: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The first `*.bundle` file in `dir`.
fn bundle_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "bundle"))
        .collect();
    found.sort();
    found.into_iter().next()
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::List => {
            for s in scenario::ALL {
                println!("{:<14} {}", s.name, s.about);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check { target } => {
            let cfg = qlab::target::lab::LabConfig::load(&target)?;
            println!("{cfg:#?}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            target,
            scenarios,
            images,
            disk,
            bundles,
            out,
            echo,
        } => {
            let chosen = if scenarios.is_empty() {
                scenario::ALL.iter().collect()
            } else {
                scenarios
                    .iter()
                    .map(|n| {
                        scenario::find(n)
                            .with_context(|| format!("no scenario {n:?} (`qlab list` shows them)"))
                    })
                    .collect::<Result<Vec<_>>>()?
            };
            let disk = disk.unwrap_or_else(|| images.join("qemu-test/disk.img"));
            if !disk.is_file() {
                bail!(
                    "no disk image {}: build it with `cargo xtask image --profile qemu-test`",
                    disk.display()
                );
            }
            let mut named: Vec<(String, PathBuf)> = Vec::new();
            for b in &bundles {
                let (name, file) = b
                    .split_once('=')
                    .with_context(|| format!("--bundle {b:?}: expected NAME=FILE"))?;
                named.push((name.to_owned(), PathBuf::from(file)));
            }
            for (name, profile) in [("next", "qemu-test-next"), ("broken", "qemu-test-broken")] {
                if named.iter().all(|(n, _)| n != name) {
                    if let Some(p) = bundle_in(&images.join(profile)) {
                        named.push((name.to_owned(), p));
                    }
                }
            }
            let report = runner::run(&RunOptions {
                target,
                scenarios: chosen,
                disk,
                bundles: named,
                out,
                echo,
            })?;
            println!(
                "qlab: {} passed, {} failed on {}; results in {}",
                report.passed(),
                report.failed(),
                report.target,
                report.dir.display()
            );
            Ok(if report.failed() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
