//! `qvm`: boot a disk image in QEMU and wait for a console line, or start
//! it in the background with its serial port on TCP (how the lab-target
//! test drives a VM through lab-style commands only).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// Boots a disk image through OVMF in QEMU (TCG) with the serial console
/// captured; optionally waits for a line and exits.
#[derive(Debug, Parser)]
struct Cli {
    /// Raw disk image to boot.
    disk: PathBuf,
    /// Directory for firmware variables, sockets and logs.
    #[arg(long, default_value = "target/qvm")]
    work_dir: PathBuf,
    /// Wait for this text on the console, then power off and exit 0.
    #[arg(long)]
    wait_for: Option<String>,
    /// Seconds to wait.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048)]
    memory: u32,
    /// Serve the serial port on TCP at this address (`host:port`), as a
    /// serial server such as ser2net would.
    #[arg(long)]
    serial_tcp: Option<String>,
    /// Start QEMU in the background and exit at once, writing its pid here
    /// (a lab-style power switch: `kill` is the power cut). Needs
    /// `--serial-tcp`.
    #[arg(long, requires = "serial_tcp")]
    detach: Option<PathBuf>,
    /// No dedicated command channel: the VM has only its serial line, as
    /// a lab machine does (commands then go through the serial shell).
    #[arg(long)]
    no_command_channel: bool,
    /// A CPU without RDRAND: the kernel's pool must fill some other way.
    #[arg(long)]
    no_rdrand: bool,
    /// No hardware RNG (virtio-rng) either.
    #[arg(long)]
    no_hwrng: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut cfg = qemu::VmConfig::new(&cli.disk, &cli.work_dir);
    cfg.echo = true;
    cfg.memory_mib = cli.memory;
    cfg.serial_tcp = cli.serial_tcp;
    cfg.command_channel = !cli.no_command_channel;
    cfg.rdrand = !cli.no_rdrand;
    cfg.hwrng = !cli.no_hwrng;
    if let Some(pidfile) = &cli.detach {
        return match qemu::power_on_detached(&cfg, pidfile) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("qvm: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let mut vm = match qemu::Vm::start(&cfg) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("qvm: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.wait_for {
        Some(needle) => match vm.wait_for(&needle, Duration::from_secs(cli.timeout)) {
            Ok(line) => {
                eprintln!(
                    "\nqvm: saw {line:?} after {:.1} s",
                    vm.uptime().as_secs_f64()
                );
                vm.quit();
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("\nqvm: {e}");
                ExitCode::FAILURE
            }
        },
        None => {
            let status = vm.wait_exit(Duration::from_secs(cli.timeout));
            eprintln!("\nqvm: QEMU exited: {status:?}");
            ExitCode::SUCCESS
        }
    }
}
