//! `qlab`: run the scenario suite on a target.

use qcontract::paths::output::DISK_IMAGE;
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
    /// Write LAVA jobs for the scenarios a LAVA job can express, and the
    /// flash image they deploy, into a directory.
    ExportLava {
        /// The lab's device type for the machines.
        #[arg(long)]
        device_type: String,
        /// Where the dispatchers will fetch the flash image (upload
        /// `<out>/flash.img` there).
        #[arg(long)]
        image_url: String,
        /// Directory of built images (`cargo xtask image`).
        #[arg(long, default_value = "target/images")]
        images: PathBuf,
        /// A lab target file whose timeouts the jobs take.
        #[arg(long)]
        target: Option<PathBuf>,
        /// Output directory.
        #[arg(long, default_value = "target/lava")]
        out: PathBuf,
        /// Check the jobs with LAVA's own validator (Debian's lava-common).
        #[arg(long)]
        validate: bool,
    },
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

/// The default bundles of a build tree, by the names the scenarios use.
fn default_bundles(images: &Path, named: &mut Vec<(String, PathBuf)>) {
    for (name, profile) in [("next", "qemu-test-next"), ("broken", "qemu-test-broken")] {
        if named.iter().all(|(n, _)| n != name) {
            if let Some(p) = bundle_in(&images.join(profile)) {
                named.push((name.to_owned(), p));
            }
        }
    }
}

fn export_lava(
    device_type: &str,
    image_url: &str,
    images: &Path,
    target: Option<&Path>,
    out: &Path,
    validate: bool,
) -> Result<ExitCode> {
    let timeouts = match target {
        Some(t) => qlab::target::lab::LabConfig::load(t)?.timeouts,
        None => qlab::target::Timeouts::default(),
    };
    let disk = images.join("qemu-test").join(DISK_IMAGE);
    let mut bundles = Vec::new();
    default_bundles(images, &mut bundles);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let refs: Vec<(&str, &Path)> = bundles
        .iter()
        .map(|(n, p)| (n.as_str(), p.as_path()))
        .collect();
    let image = qlab::flash::compose(&disk, &refs, &out.join("flash.img"))?;
    let opts = qlab::lava::LavaOptions {
        device_type: device_type.to_owned(),
        image_url: image_url.to_owned(),
        timeouts,
    };
    let mut written = Vec::new();
    for s in scenario::ALL {
        match qlab::lava::job(s.name, s.about, &image, &opts) {
            Some(y) => {
                let p = out.join(format!("{}.yaml", s.name));
                std::fs::write(&p, y).with_context(|| format!("writing {}", p.display()))?;
                println!("qlab: {}", p.display());
                written.push(p);
            }
            None => println!("qlab: {}: runs under `qlab run` only", s.name),
        }
    }
    println!("qlab: upload {} to {image_url}", image.path.display());
    if validate {
        match qlab::lava::validate(&written) {
            Ok(report) => print!("{report}"),
            Err(report) => bail!("LAVA's validator rejected the jobs:\n{report}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::List => {
            for s in scenario::ALL {
                println!("{:<14} {}", s.name, s.about);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::ExportLava {
            device_type,
            image_url,
            images,
            target,
            out,
            validate,
        } => export_lava(
            &device_type,
            &image_url,
            &images,
            target.as_deref(),
            &out,
            validate,
        ),
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
            let disk = disk.unwrap_or_else(|| images.join("qemu-test").join(DISK_IMAGE));
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
            default_bundles(&images, &mut named);
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
