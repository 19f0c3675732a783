//! `qupdate`: the A/B updater's command line.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod serve;

use clap::{Parser, Subcommand};
use qupdate::args::SystemArgs;
use qupdate::backend::{self, BundleSource, Route};
use qupdate::{ApplyOptions, Progress, SlotState, Status};

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
        /// Tries the boot loader gives the new slot (1 to 9).
        #[arg(
            long,
            default_value_t = qupdate::DEFAULT_TRIES,
            value_parser = clap::value_parser!(u8).range(1..=i64::from(grubenv::MAX_TRIES))
        )]
        tries: u8,
        /// Install although the booted slot is not marked good yet, which
        /// may overwrite the only slot proven to boot.
        #[arg(long)]
        force: bool,
        /// Seconds the bundle stream may send nothing before the apply
        /// ends (1 to 3600).
        #[arg(
            long,
            value_name = "SECS",
            default_value_t = qupdate::stall::STALL_TIMEOUT.as_secs(),
            value_parser = clap::value_parser!(u64).range(1..=u64::from(qupdate::MAX_STALL_SECS))
        )]
        stall_timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Mark the booted slot good (qinit's boot-complete hook).
    MarkGood {
        /// Only through qupdated: a boot whose updater does not answer on
        /// the bus is not healthy, and is not marked good (the hook's way).
        #[arg(long)]
        through_service: bool,
    },
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
    // Printed again only when the phase or the percentage moves.
    let mut last = None;
    move |p: Progress| {
        let pct = p.percent();
        if last == Some((p.phase, pct)) {
            return;
        }
        let phase = p.phase.as_str();
        if tty {
            eprint!(
                "\r{:<7} [{:<40}] {pct:>3}%  {} / {} MiB",
                phase,
                "#".repeat(usize::from(pct) * 40 / 100),
                p.done >> 20,
                p.total >> 20
            );
            if pct == 100 {
                eprintln!();
            }
        } else if pct.is_multiple_of(10) {
            eprintln!("qupdate: {phase} {pct}%");
        }
        last = Some((p.phase, pct));
    }
}

/// A command that works on the slots, through the one backend chosen
/// for the invocation.
enum SlotCmd {
    Apply {
        bundle: Bundle,
        opts: ApplyOptions,
        json: bool,
    },
    MarkGood {
        through_service: bool,
    },
    Rollback,
    Status {
        json: bool,
    },
}

/// Where `qupdate apply` reads the bundle: a file, or `-` for stdin (a
/// pipe from an UpdateVM).
enum Bundle {
    File(std::fs::File),
    Stdin(std::io::StdinLock<'static>),
}

impl Bundle {
    fn open(arg: &str) -> Result<Self, qupdate::UpdateError> {
        Ok(if arg == "-" {
            Self::Stdin(std::io::stdin().lock())
        } else {
            Self::File(qupdate::open_bundle(Path::new(arg))?)
        })
    }

    fn source(&mut self) -> &mut dyn BundleSource {
        match self {
            Self::File(f) => f,
            Self::Stdin(s) => s,
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let cmd = match cli.command {
        Cmd::Service => return serve::run(cli.system.config()?),
        Cmd::Keygen { name, out } => return keygen(&name, &out),
        Cmd::Apply {
            bundle,
            tries,
            force,
            stall_timeout,
            json,
        } => SlotCmd::Apply {
            // Before the backend: a bundle that cannot be opened is the
            // error, whichever side would have installed it.
            bundle: Bundle::open(&bundle)?,
            opts: ApplyOptions {
                tries,
                force,
                stall_timeout: std::time::Duration::from_secs(stall_timeout),
            },
            json,
        },
        Cmd::MarkGood { through_service } => SlotCmd::MarkGood { through_service },
        Cmd::Rollback => SlotCmd::Rollback,
        Cmd::Status { json } => SlotCmd::Status { json },
    };
    let mut backend = backend::select(&cli.system)?;
    if backend.route() == Route::Service {
        eprintln!("qupdate: through qupdated ({})", qupdate::dbus::BUS_NAME);
    }
    match cmd {
        SlotCmd::Apply {
            mut bundle,
            opts,
            json,
        } => {
            let applied = backend.apply(bundle.source(), &opts, &mut progress_printer())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&applied)?);
            } else {
                println!(
                    "installed {} (epoch {}) into slot {}, signed by {}; it boots next, with {} tries",
                    applied.version,
                    applied.security_epoch,
                    applied.slot,
                    applied.signers.join(", "),
                    opts.tries,
                );
            }
        }
        SlotCmd::MarkGood { through_service } => {
            if through_service && backend.route() != Route::Service {
                anyhow::bail!(
                    "mark-good --through-service: {} is not on the system bus, \
                     so this boot is not healthy and stays on trial",
                    qupdate::dbus::BUS_NAME
                );
            }
            let booted = backend.mark_good()?;
            println!("slot {booted} marked good");
        }
        SlotCmd::Rollback => {
            let slot = backend.rollback()?;
            println!("slot {slot} is the default from the next boot");
        }
        SlotCmd::Status { json } => {
            let st = backend.status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{}", status_text(&st));
            }
        }
    }
    Ok(())
}

fn keygen(name: &str, out: &Path) -> anyhow::Result<()> {
    let key = qbundle::generate_keypair()?;
    std::fs::create_dir_all(out)?;
    key.store(&out.join(format!("{name}.key")))?;
    std::fs::write(out.join(format!("{name}.pub")), key.public(name).to_line())?;
    println!(
        "wrote {0}/{name}.key (keep it off every image) and {0}/{name}.pub",
        out.display()
    );
    Ok(())
}

/// `qupdate status` for people.
fn status_text(st: &Status) -> String {
    let order: Vec<String> = st.order.iter().map(ToString::to_string).collect();
    let mut text = format!(
        "booted slot {}; boot order {}; floor {}\n",
        st.booted,
        order.join(" "),
        st.floor
    );
    for s in &st.slots {
        let tries = if s.state == SlotState::Bootable {
            format!(" ({} tries)", s.tries)
        } else {
            String::new()
        };
        text += &format!(
            "  slot {}: {}{tries} version {} epoch {}\n",
            s.slot,
            s.state,
            s.version.as_deref().unwrap_or("-"),
            s.security_epoch.map_or("-".into(), |e| e.to_string())
        );
    }
    if let Some(e) = &st.last_error {
        text += &format!("  last error: {e}\n");
    }
    text
}

#[cfg(test)]
mod tests {
    use qcontract::Slot;
    use qupdate::SlotStatus;

    use super::*;

    #[test]
    fn status_text_reads_as_it_always_has() {
        let slot = |slot, state, tries, version: Option<&str>| SlotStatus {
            slot,
            state,
            tries,
            version: version.map(Into::into),
            security_epoch: version.map(|_| 5),
            root_hash: None,
        };
        let mut st = Status {
            booted: Slot::A,
            order: vec![Slot::B, Slot::A],
            floor: 1,
            slots: [
                slot(Slot::A, SlotState::Good, 0, Some("0.1.0")),
                slot(Slot::B, SlotState::Bootable, 2, Some("0.2.0")),
            ],
            last_error: Some("bundle rejected: truncated".into()),
        };
        assert_eq!(
            status_text(&st),
            "booted slot A; boot order B A; floor 1\n\
             \x20 slot A: good version 0.1.0 epoch 5\n\
             \x20 slot B: bootable (2 tries) version 0.2.0 epoch 5\n\
             \x20 last error: bundle rejected: truncated\n"
        );
        st.slots[1] = slot(Slot::B, SlotState::Empty, 0, None);
        st.last_error = None;
        assert_eq!(
            status_text(&st),
            "booted slot A; boot order B A; floor 1\n\
             \x20 slot A: good version 0.1.0 epoch 5\n\
             \x20 slot B: empty version - epoch -\n"
        );
    }
}
