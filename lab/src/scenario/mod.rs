//! The scenarios, written once against [`Target`] so the same code runs on
//! nested QEMU and on a lab machine. Each gets a [`Ctx`]: the target, the
//! run's flash image with its update bundles, and helpers that wait on
//! the console markers (a contract: `QINIT-READY`, `QINIT-FAILED`,
//! `QDOMD-GUIVM-READY`) and run commands in dom0 over the target's
//! command channel.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::flash::{FlashImage, Payload};
use crate::hcl::HclFacts;
use crate::target::{Target, Timeouts};

pub mod boot;
pub mod guivm;
pub mod hcl;
mod qinit;
pub mod update;

/// One scenario.
#[derive(Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&mut Ctx<'_>) -> Result<()>,
}

/// Every scenario, in the order a run takes them.
pub const ALL: &[Scenario] = &[
    boot::BOOT,
    boot::CORRUPT_ROOT,
    qinit::SUPERVISION,
    guivm::GUIVM,
    update::UPDATE,
    update::ROLLBACK,
    update::POWER_CUT,
    update::POWER_CUTS,
    hcl::HCL,
];

pub fn find(name: &str) -> Option<&'static Scenario> {
    ALL.iter().find(|s| s.name == name)
}

/// A shell command and what its output must hold.
#[derive(Debug, Clone, Copy)]
pub struct Check {
    pub name: &'static str,
    pub command: &'static str,
    pub expect: &'static str,
    /// `expect` must be a whole line, not just part of one.
    pub whole_line: bool,
}

impl Check {
    pub const fn text(name: &'static str, command: &'static str, expect: &'static str) -> Self {
        Self {
            name,
            command,
            expect,
            whole_line: false,
        }
    }

    pub const fn line(name: &'static str, command: &'static str, expect: &'static str) -> Self {
        Self {
            name,
            command,
            expect,
            whole_line: true,
        }
    }

    pub fn holds(&self, output: &str) -> bool {
        if self.whole_line {
            output.lines().any(|l| l.trim() == self.expect)
        } else {
            output.contains(self.expect)
        }
    }
}

/// Shell that sets `$d` to the disk dom0 booted from: the one holding the
/// data partition on /var (`/sys/block/<disk>/<partition>` exists).
pub const FIND_BOOT_DISK: &str =
    "p=$(awk '$2==\"/var\"{print $1}' /proc/mounts); d=$(ls -d /sys/block/*/${p##*/}); d=${d#/sys/block/}; d=/dev/${d%%/*}";

/// What a scenario works with.
pub struct Ctx<'a> {
    pub target: &'a mut dyn Target,
    /// The run's flash image: the test disk image and the bundles.
    pub image: &'a FlashImage,
    /// The scenario's own directory (logs, modified images).
    pub work: PathBuf,
    pub timeouts: Timeouts,
    progress: &'a mut dyn FnMut(&str),
    /// Figures worth reporting (times, sizes), one line each.
    pub notes: Vec<String>,
    /// What the hardware report collected.
    pub hcl: Option<HclFacts>,
}

impl<'a> Ctx<'a> {
    pub fn new(
        target: &'a mut dyn Target,
        image: &'a FlashImage,
        work: PathBuf,
        progress: &'a mut dyn FnMut(&str),
    ) -> Self {
        let timeouts = target.timeouts();
        Self {
            target,
            image,
            work,
            timeouts,
            progress,
            notes: Vec::new(),
            hcl: None,
        }
    }

    /// Tells the progress line what the scenario is doing now.
    pub fn step(&mut self, what: &str) {
        (self.progress)(what);
    }

    pub fn note(&mut self, line: String) {
        self.notes.push(line);
    }

    /// Power off, flash `image`, power on: a fresh boot from a known disk.
    pub fn boot(&mut self, image: &FlashImage) -> Result<()> {
        self.step("power off");
        self.target.power_off()?;
        self.step("flash");
        self.target.flash(&image.path)?;
        self.power_on()
    }

    /// Power on; later waits see only what this boot prints.
    pub fn power_on(&mut self) -> Result<()> {
        self.target.console().skip_to_end();
        self.step("power on");
        self.target.power_on()?;
        Ok(())
    }

    /// Pulls the plug and switches on again.
    pub fn power_cut(&mut self) -> Result<()> {
        self.step("power cut");
        self.target.power_off()?;
        self.power_on()
    }

    /// Waits for the first of `needles`.
    pub fn wait_any(&mut self, needles: &[&str], timeout: Duration) -> Result<(usize, String)> {
        self.step(&format!("waiting for {}", needles.join(" or ")));
        Ok(self.target.console().wait_for_any(needles, timeout)?)
    }

    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        self.wait_any(&[needle], timeout).map(|(_, l)| l)
    }

    /// Waits for the ready marker; a failure marker ends the wait at once.
    pub fn wait_ready(&mut self) -> Result<String> {
        let t = self.timeouts.boot;
        let started = Instant::now();
        match self.wait_any(&["QINIT-READY", "QINIT-FAILED"], t)? {
            (0, line) => {
                self.note(format!(
                    "{line} ({:.1} s after the wait began)",
                    started.elapsed().as_secs_f64()
                ));
                Ok(line)
            }
            (_, line) => bail!("boot failed: {line}"),
        }
    }

    /// Starts a command in dom0 without waiting for it to end (a reboot,
    /// an update a power cut will interrupt); returns once dom0 says it
    /// started. Its output is discarded: redirect it to keep it.
    pub fn spawn(&mut self, command: &str) -> Result<()> {
        self.step(&format!("$ {} &", short(command)));
        let t = self.timeouts.shell;
        Ok(self.target.commands().spawn(command, t)?)
    }

    /// Runs a command in dom0; a non-zero exit is an error.
    pub fn sh(&mut self, command: &str) -> Result<String> {
        let t = self.timeouts.shell;
        self.sh_within(command, t)
    }

    pub fn sh_within(&mut self, command: &str, timeout: Duration) -> Result<String> {
        self.step(&format!("$ {}", short(command)));
        let (out, rc) = self.target.commands().shell(command, timeout)?;
        if rc != 0 {
            bail!("`{command}` exited {rc}: {out}");
        }
        Ok(out)
    }

    /// The disk dom0 booted from (`/dev/vda` in QEMU, whatever it is on a
    /// lab machine): the one holding the data partition on /var.
    pub fn boot_disk(&mut self) -> Result<String> {
        let out = self.sh(&format!("{FIND_BOOT_DISK}; echo \"DISK=$d\""))?;
        out.lines()
            .find_map(|l| l.trim().strip_prefix("DISK=/dev/"))
            .filter(|d| !d.is_empty() && !d.contains('*'))
            .map(|d| format!("/dev/{d}"))
            .with_context(|| format!("no disk holds /var: {out}"))
    }

    /// The payload `name` of the flash image.
    pub fn payload(&self, name: &str) -> Result<Payload> {
        self.image
            .payload(name)
            .cloned()
            .with_context(|| format!("the flash image carries no {name} bundle"))
    }

    /// `qupdate status --json` until `pred` holds.
    pub fn wait_status(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        self.sh_until(
            "qupdate status --json",
            timeout,
            Duration::from_secs(1),
            pred,
        )
    }

    /// Runs `command` every `pause` until its output satisfies `pred`;
    /// returns that output. After `timeout` the last output is the error.
    pub fn sh_until(
        &mut self,
        command: &str,
        timeout: Duration,
        pause: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.sh(command)?;
            if pred(&out) {
                return Ok(out);
            }
            if Instant::now() >= deadline {
                bail!("`{command}` did not turn as expected within {timeout:?}; last:\n{out}");
            }
            std::thread::sleep(pause);
        }
    }
}

fn short(command: &str) -> String {
    let one_line: String = command.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 60 {
        format!("{}…", one_line.chars().take(59).collect::<String>())
    } else {
        one_line
    }
}

/// The value after `key` in a marker line (`domid=3` → `3`).
pub fn field<'l>(line: &'l str, key: &str) -> Option<&'l str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_names_are_unique() {
        let mut names: Vec<&str> = ALL.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        assert!(find("update").is_some());
        assert!(find("nope").is_none());
    }

    #[test]
    fn marker_fields() {
        let l = "QDOMD-GUIVM-READY name=guivm domid=3 ms=11712";
        assert_eq!(field(l, "domid="), Some("3"));
        assert_eq!(field(l, "x="), None);
    }
}
