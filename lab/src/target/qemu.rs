//! The QEMU target: the launcher of `qemu/` with its disk a file in the
//! target's work directory. Power on starts QEMU, power off kills it (a
//! real power cut: nothing is flushed). The serial socket of each run is
//! attached to one console, the command channel's socket to another: the
//! commands never share a line with the kernel or the services.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qconsole::Console;

use super::{Entropy, Target, TargetError, Timeouts};

const NAME: &str = "qemu";

#[derive(Debug)]
pub struct QemuTarget {
    work: PathBuf,
    disk: PathBuf,
    machine: Option<qemu::Machine>,
    console: Console,
    /// The dedicated command channel, across power cycles like `console`.
    commands: Console,
    entropy: Entropy,
}

impl QemuTarget {
    /// A target whose disk, firmware variables and sockets live in `work`.
    pub fn new(work: &Path, echo: bool) -> Result<Self, TargetError> {
        std::fs::create_dir_all(work).map_err(|source| TargetError::Io {
            target: NAME.into(),
            what: "creating",
            path: work.to_owned(),
            source,
        })?;
        Ok(Self {
            work: work.to_owned(),
            disk: work.join("disk.img"),
            machine: None,
            console: Console::new(Some(&work.join("serial.log")), echo)?,
            commands: qemu::command_console(work)?,
            entropy: Entropy::ALL,
        })
    }
}

impl Target for QemuTarget {
    fn name(&self) -> &str {
        NAME
    }

    fn flash(&mut self, image: &Path) -> Result<(), TargetError> {
        // A fresh machine: what a scenario took away comes back.
        self.entropy = Entropy::ALL;
        std::fs::copy(image, &self.disk).map_err(|source| TargetError::Io {
            target: NAME.into(),
            what: "copying the image to",
            path: self.disk.clone(),
            source,
        })?;
        Ok(())
    }

    fn power_on(&mut self) -> Result<(), TargetError> {
        self.power_off()?;
        let cfg = qemu::VmConfig {
            rdrand: self.entropy.rdrand,
            hwrng: self.entropy.hwrng,
            ..qemu::VmConfig::new(&self.disk, &self.work)
        };
        let qemu_err = |source| TargetError::Qemu {
            target: NAME.into(),
            source,
        };
        let (machine, serial) = qemu::Machine::spawn(&cfg).map_err(qemu_err)?;
        qemu::attach_stream(&self.console, serial, &self.work).map_err(qemu_err)?;
        let channel = machine.command_channel().map_err(qemu_err)?;
        qemu::attach_stream(&self.commands, channel, &self.work).map_err(qemu_err)?;
        self.machine = Some(machine);
        Ok(())
    }

    fn power_off(&mut self) -> Result<(), TargetError> {
        if let Some(mut m) = self.machine.take() {
            m.kill();
        }
        Ok(())
    }

    fn console(&mut self) -> &mut Console {
        &mut self.console
    }

    fn commands(&mut self) -> &mut Console {
        &mut self.commands
    }

    fn powered_off_by_itself(&mut self, within: Duration) -> Option<bool> {
        Some(
            self.machine
                .as_mut()
                .is_none_or(|m| m.wait_exit(within).is_some()),
        )
    }

    fn set_entropy(&mut self, sources: Entropy) -> bool {
        self.entropy = sources;
        true
    }

    fn timeouts(&self) -> Timeouts {
        Timeouts::default()
    }

    fn describe(&self) -> String {
        format!(
            "QEMU {} (TCG, OVMF, virtio disk, virtio-rng), serial over a socket, commands over virtio-serial, power through the QEMU process",
            qemu::CPU_MODEL
        )
    }
}

impl Drop for QemuTarget {
    /// The disk is a copy of the run's image, as big as it; the serial log
    /// stays.
    fn drop(&mut self) {
        let _ = self.power_off();
        let _ = std::fs::remove_file(&self.disk);
    }
}
