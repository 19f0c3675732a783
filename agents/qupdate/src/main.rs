//! `qupdate`: the A/B updater's command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

mod serve;

use clap::{Parser, Subcommand};
use qupdate::args::SystemArgs;
use qupdate::client::Client;
use qupdate::{Progress, SlotState, Updater};

/// Signed A/B updates of the dom0 appliance.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    #[command(flatten)]
    system: SystemArgs,
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
    /// Serve org.qubesos.Update1 on the system bus (qinit runs this as
    /// the `qupdated` service).
    Service,
    /// Make a signing key pair: <name>.key (private, 0600) and <name>.pub.
    Keygen {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

/// The running `qupdated`, unless the slots were named on the command line
/// (`--disk`) or no service is on the system bus.
fn service(system: &SystemArgs) -> anyhow::Result<Option<Client>> {
    if system.disk.is_some() {
        return Ok(None);
    }
    let client = Client::connect()?;
    if client.is_some() {
        eprintln!("qupdate: through qupdated ({})", qupdate::dbus::BUS_NAME);
    }
    Ok(client)
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
        let phase = p.phase.as_str();
        if (phase.to_owned(), pct) == last {
            return;
        }
        if tty {
            eprint!(
                "\r{:<7} [{:<40}] {pct:>3}%  {} / {} MiB",
                phase,
                "#".repeat(usize::try_from(pct * 40 / 100).unwrap_or(0)),
                p.done >> 20,
                p.total >> 20
            );
            if pct == 100 {
                eprintln!();
            }
        } else if pct.is_multiple_of(10) {
            eprintln!("qupdate: {phase} {pct}%");
        }
        last = (phase.to_owned(), pct);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Service => serve::run(cli.system.config()?),
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
            let mut progress = progress_printer();
            let file = (bundle != "-")
                .then(|| qupdate::open_bundle(std::path::Path::new(&bundle)))
                .transpose()?;
            let applied = if let Some(service) = service(&cli.system)? {
                match &file {
                    Some(f) => service.apply(f, tries, &mut progress)?,
                    None => service.apply(std::io::stdin(), tries, &mut progress)?,
                }
            } else {
                let mut cfg = cli.system.config()?;
                cfg.tries = tries;
                let mut updater = Updater::open(cfg)?;
                match file {
                    Some(mut f) => updater.apply(&mut f, &mut progress)?,
                    None => updater.apply(&mut std::io::stdin().lock(), &mut progress)?,
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&applied)?);
            } else {
                println!(
                    "installed {} (epoch {}) into slot {}, signed by {}; it boots next, with {tries} tries",
                    applied.version,
                    applied.security_epoch,
                    applied.slot,
                    applied.signers.join(", "),
                );
            }
            Ok(())
        }
        Cmd::MarkGood => {
            let booted = if let Some(service) = service(&cli.system)? {
                service.mark_good()?
            } else {
                let mut updater = Updater::open(cli.system.config()?)?;
                updater.mark_good()?;
                updater.config().booted
            };
            println!("slot {booted} marked good");
            Ok(())
        }
        Cmd::Rollback => {
            let slot = if let Some(service) = service(&cli.system)? {
                service.rollback()?
            } else {
                Updater::open(cli.system.config()?)?.rollback()?
            };
            println!("slot {slot} is the default from the next boot");
            Ok(())
        }
        Cmd::Status { json } => {
            let st = match service(&cli.system)? {
                Some(service) => service.status()?,
                None => Updater::open(cli.system.config()?)?.status()?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                println!(
                    "booted slot {}; boot order {}; floor {}",
                    st.booted,
                    st.order
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(" "),
                    st.floor
                );
                for s in &st.slots {
                    println!(
                        "  slot {}: {}{} version {} epoch {}",
                        s.slot,
                        s.state,
                        if s.state == SlotState::Bootable {
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
