//! Targets: a machine the scenarios run on. Whatever it is, it can be
//! flashed with a disk image, powered on and off, and talked to over its
//! serial console (and where it has one, a command channel of its own).
//! Two kinds:
//!
//! - [`qemu::QemuTarget`]: the QEMU launcher of `qemu/` (power through the
//!   QEMU process and QMP, serial over a socket, the disk a file);
//! - [`lab::LabTarget`]: a machine described by a TOML file whose power,
//!   flash and console commands are the lab's own (labgrid, pdudaemon, an
//!   SD-mux, ser2net, ...).

use std::path::{Path, PathBuf};
use std::time::Duration;

use qconsole::Console;

pub mod lab;
pub mod qemu;
pub mod serial;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(
        "target {target}: {action} command `{command}` failed ({status}); its output:\n{output}"
    )]
    Command {
        target: String,
        action: &'static str,
        command: String,
        status: String,
        output: String,
    },
    #[error("target {target}: {action} command `{command}` did not finish within {timeout:?}")]
    CommandTimeout {
        target: String,
        action: &'static str,
        command: String,
        timeout: Duration,
    },
    #[error("target {target}: {what} {path}")]
    Io {
        target: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("target {target}: the serial console did not connect within {timeout:?}")]
    NoConsole { target: String, timeout: Duration },
    #[error("target {target}: QEMU")]
    Qemu {
        target: String,
        #[source]
        source: ::qemu::VmError,
    },
    #[error(transparent)]
    Console(#[from] qconsole::ConsoleError),
    #[error(transparent)]
    Config(#[from] lab::ConfigError),
}

/// How long a target may take for the slow things. Real machines differ
/// from TCG: a lab file can set them.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Power on to `QINIT-READY`.
    pub boot: Duration,
    /// One shell command.
    pub shell: Duration,
    /// Applying an update bundle.
    pub apply: Duration,
    /// `QINIT-READY` to `QDOMD-GUIVM-READY`.
    pub guivm: Duration,
}

impl Default for Timeouts {
    /// What nested QEMU under TCG on 2 cores needs, with room.
    fn default() -> Self {
        Self {
            boot: Duration::from_secs(420),
            shell: Duration::from_secs(60),
            apply: Duration::from_secs(600),
            guivm: Duration::from_secs(300),
        }
    }
}

/// A machine under test.
pub trait Target {
    /// The target's name, for reports.
    fn name(&self) -> &str;
    /// Writes `image` as the machine's disk. The machine is off.
    fn flash(&mut self, image: &Path) -> Result<(), TargetError>;
    /// Switches the machine on.
    fn power_on(&mut self) -> Result<(), TargetError>;
    /// Cuts the power at once (no shutdown: this is also the power-cut
    /// test's plug).
    fn power_off(&mut self) -> Result<(), TargetError>;
    /// The serial console: one transcript across power cycles.
    fn console(&mut self) -> &mut Console;
    /// Where commands go: a channel nothing else writes to where the
    /// target has one (QEMU's virtio-serial port), else the serial shell.
    fn commands(&mut self) -> &mut Console {
        self.console()
    }
    /// Whether the machine has switched itself off, where the target can
    /// tell (QEMU can; most lab power switches cannot).
    fn powered_off_by_itself(&mut self, within: Duration) -> Option<bool>;
    /// The entropy sources of the following power-ons, until the next
    /// flash: the CPU's RDRAND and a hardware RNG. False where the target
    /// cannot choose them (a real machine has what it has).
    fn set_entropy(&mut self, _sources: Entropy) -> bool {
        false
    }
    /// The target's timeouts.
    fn timeouts(&self) -> Timeouts;
    /// A short description of how the target is driven (for the report).
    fn describe(&self) -> String;
}

/// Where a target's kernel gets its first random bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entropy {
    pub rdrand: bool,
    pub hwrng: bool,
}

impl Entropy {
    /// What a real x86 machine has: RDRAND, and a TPM's RNG.
    pub const ALL: Self = Self {
        rdrand: true,
        hwrng: true,
    };
}

/// Opens the target named on the command line: `qemu` for the built-in
/// QEMU target, otherwise a lab target's TOML file.
pub fn open(spec: &str, work: &Path, echo: bool) -> Result<Box<dyn Target>, TargetError> {
    if spec == "qemu" {
        return Ok(Box::new(qemu::QemuTarget::new(work, echo)?));
    }
    let cfg = lab::LabConfig::load(Path::new(spec))?;
    Ok(Box::new(lab::LabTarget::new(cfg, work, echo)?))
}
