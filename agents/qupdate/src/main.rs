//! `qupdate`: the A/B updater's command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use qupdate::{Config, Progress, Updater};

/// Signed A/B updates of the dom0 appliance.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    #[command(flatten)]
    system: SystemArgs,
}

/// Overrides for working on a disk image instead of the running system
/// (host tests, image preparation). Without `--disk` everything comes from
/// the running dom0.
#[derive(Debug, Args)]
struct SystemArgs {
    /// Disk (device or image file) holding the slots.
    #[arg(long, global = true)]
    disk: Option<PathBuf>,
    /// The slot treated as booted (A or B); with --disk.
    #[arg(long, global = true)]
    booted: Option<String>,
    /// The system's compatible string; with --disk.
    #[arg(long, global = true)]
    compatible: Option<String>,
    /// Trust store (default /etc/qupdate/trust.toml).
    #[arg(long, global = true)]
    trust: Option<PathBuf>,
    /// State file (default /var/lib/qupdate/state.json).
    #[arg(long, global = true)]
    state: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Verify a bundle and install it into the inactive slot.
    Apply {
        /// Bundle file, or `-` for standard input.
        bundle: String,
        /// Tries the boot loader gives the new slot.
        #[arg(long, default_value_t = qupdate::DEFAULT_TRIES)]
        tries: u8,
        #[arg(long)]
        json: bool,
    },
    /// Mark the booted slot good (qinit's boot-complete hook).
    MarkGood,
    /// Make the other slot the default, if it is good.
    Rollback,
    /// Show both slots, the boot order, the floor and the last error.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Make a signing key pair: <name>.key (private, 0600) and <name>.pub.
    Keygen {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

fn config(s: &SystemArgs) -> anyhow::Result<Config> {
    let mut cfg = match &s.disk {
        None => Config::from_system()?,
        Some(disk) => Config {
            disk: disk.clone(),
            trust: qupdate::TRUST_STORE.into(),
            state: qupdate::STATE_FILE.into(),
            compatible: s
                .compatible
                .clone()
                .ok_or_else(|| anyhow::anyhow!("--disk needs --compatible"))?,
            booted: s
                .booted
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("--disk needs --booted"))?
                .parse()?,
            image_version: "unknown".into(),
            image_epoch: 0,
            tries: qupdate::DEFAULT_TRIES,
            lock_wait: qupdate::LOCK_WAIT,
        },
    };
    if let Some(t) = &s.trust {
        cfg.trust = t.clone();
    }
    if let Some(st) = &s.state {
        cfg.state = st.clone();
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qupdate: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn progress_printer() -> impl FnMut(Progress) {
    let tty = std::io::stderr().is_terminal();
    let mut last = (String::new(), u64::MAX);
    move |p: Progress| {
        let pct = (p.done * 100).checked_div(p.total).unwrap_or(100);
        if (p.phase.to_owned(), pct) == last {
            return;
        }
        if tty {
            eprint!(
                "\r{:<7} [{:<40}] {pct:>3}%  {} / {} MiB",
                p.phase,
                "#".repeat(usize::try_from(pct * 40 / 100).unwrap_or(0)),
                p.done >> 20,
                p.total >> 20
            );
            if pct == 100 {
                eprintln!();
            }
        } else if pct.is_multiple_of(10) {
            eprintln!("qupdate: {} {pct}%", p.phase);
        }
        last = (p.phase.to_owned(), pct);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Keygen { name, out } => {
            let key = qbundle::generate_keypair()?;
            std::fs::create_dir_all(&out)?;
            key.store(&out.join(format!("{name}.key")))?;
            std::fs::write(out.join(format!("{name}.pub")), key.public(&name).to_line())?;
            println!(
                "wrote {0}/{name}.key (keep it off every image) and {0}/{name}.pub",
                out.display()
            );
            Ok(())
        }
        Cmd::Apply {
            bundle,
            tries,
            json,
        } => {
            let mut cfg = config(&cli.system)?;
            cfg.tries = tries;
            let mut updater = Updater::open(cfg)?;
            let mut progress = progress_printer();
            let applied = if bundle == "-" {
                updater.apply(&mut std::io::stdin().lock(), &mut progress)?
            } else {
                let mut f = qupdate::open_bundle(std::path::Path::new(&bundle))?;
                updater.apply(&mut f, &mut progress)?
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&applied)?);
            } else {
                println!(
                    "installed {} (epoch {}) into slot {}, signed by {}; it boots next, with {} tries",
                    applied.version,
                    applied.security_epoch,
                    applied.slot,
                    applied.signers.join(", "),
                    updater.config().tries
                );
            }
            Ok(())
        }
        Cmd::MarkGood => {
            let mut updater = Updater::open(config(&cli.system)?)?;
            updater.mark_good()?;
            println!("slot {} marked good", updater.config().booted);
            Ok(())
        }
        Cmd::Rollback => {
            let mut updater = Updater::open(config(&cli.system)?)?;
            let slot = updater.rollback()?;
            println!("slot {slot} is the default from the next boot");
            Ok(())
        }
        Cmd::Status { json } => {
            let mut updater = Updater::open(config(&cli.system)?)?;
            let st = updater.status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                println!(
                    "booted slot {}; boot order {}; floor {}",
                    st.booted,
                    st.order.join(" "),
                    st.floor
                );
                for s in &st.slots {
                    println!(
                        "  slot {}: {}{} version {} epoch {}",
                        s.slot,
                        s.state,
                        if s.state == "bootable" {
                            format!(" ({} tries)", s.tries)
                        } else {
                            String::new()
                        },
                        s.version.as_deref().unwrap_or("-"),
                        s.security_epoch.map_or("-".into(), |e| e.to_string())
                    );
                }
                if let Some(e) = &st.last_error {
                    println!("  last error: {e}");
                }
            }
            Ok(())
        }
    }
}
