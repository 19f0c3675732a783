//! Helpers for the end-to-end scenarios: find the built image, give each
//! scenario its own copy of the disk, boot it, and always leave the serial
//! log behind for a failing test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// How long a boot to the ready marker may take under TCG on 2 cores.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(420);
/// How long a shell command may take.
pub const SHELL_TIMEOUT: Duration = Duration::from_secs(60);

/// The qemu-test image directory `cargo xtask test` built.
pub fn image_dir() -> Result<PathBuf> {
    let dir = std::env::var_os("QTEST_IMAGE_DIR")
        .map(PathBuf::from)
        .context("QTEST_IMAGE_DIR is not set: run the scenarios through `cargo xtask test`")?;
    if !dir.join("disk.img").is_file() {
        bail!("{} has no disk.img", dir.display());
    }
    Ok(dir)
}

/// A scenario's private working directory with a fresh copy of the disk.
pub fn scenario(name: &str) -> Result<(PathBuf, PathBuf)> {
    let image = image_dir()?;
    let work = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/e2e")
        .join(name);
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let disk = work.join("disk.img");
    std::fs::copy(image.join("disk.img"), &disk)
        .with_context(|| format!("copying the disk image into {}", work.display()))?;
    Ok((work, disk))
}

/// Starts a VM on `disk`; the console is echoed so `cargo test` shows it
/// for a failing scenario.
pub fn start(disk: &Path, work: &Path, no_reboot: bool) -> Result<qemu::Vm> {
    let mut cfg = qemu::VmConfig::new(disk, work);
    cfg.no_reboot = no_reboot;
    cfg.echo = std::env::var_os("QTEST_ECHO").is_some();
    Ok(qemu::Vm::start(&cfg)?)
}

/// Waits for the ready marker; a failure marker ends the wait at once.
pub fn wait_ready(vm: &mut qemu::Vm) -> Result<String> {
    match vm.wait_for_any(&["QINIT-READY", "QINIT-FAILED"], BOOT_TIMEOUT) {
        Ok((0, line)) => Ok(line),
        Ok((_, line)) => bail!("boot failed: {line}\n--- serial ---\n{}", vm.output()),
        Err(e) => bail!("{e}\n(serial log: {})", vm.serial_log.display()),
    }
}

/// Runs a command on the test image's serial shell.
pub fn sh(vm: &mut qemu::Vm, command: &str) -> Result<String> {
    let (out, rc) = vm.shell(command, SHELL_TIMEOUT)?;
    if rc != 0 {
        bail!("`{command}` exited {rc}: {out}");
    }
    Ok(out)
}

/// A bundle built by `cargo xtask test`, copied into the scenario's work
/// directory and padded to whole sectors so it can be a virtual drive.
/// Returns the copy and the bundle's real length.
pub fn bundle_drive(env: &str, work: &Path) -> Result<(PathBuf, u64)> {
    let src = std::env::var_os(env).map(PathBuf::from).with_context(|| {
        format!("{env} is not set: run the scenarios through `cargo xtask test`")
    })?;
    let len = std::fs::metadata(&src)
        .with_context(|| format!("{}", src.display()))?
        .len();
    let dst = work.join("bundle.img");
    std::fs::copy(&src, &dst)?;
    let padded = len.div_ceil(512) * 512;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&dst)?
        .set_len(padded)?;
    Ok((dst, len))
}

/// Like [`start`] with extra raw drives (`/dev/vdb`, ...).
pub fn start_with(disk: &Path, work: &Path, extra: &[PathBuf]) -> Result<qemu::Vm> {
    let mut cfg = qemu::VmConfig::new(disk, work);
    cfg.extra_disks = extra.to_vec();
    cfg.echo = std::env::var_os("QTEST_ECHO").is_some();
    Ok(qemu::Vm::start(&cfg)?)
}

/// Runs a command on the serial shell with its own timeout.
pub fn sh_long(vm: &mut qemu::Vm, command: &str, timeout: Duration) -> Result<String> {
    let (out, rc) = vm.shell(command, timeout)?;
    if rc != 0 {
        bail!("`{command}` exited {rc}: {out}");
    }
    Ok(out)
}

/// Polls `qupdate status --json` until `pred` holds.
pub fn wait_status(
    vm: &mut qemu::Vm,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> Result<String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let s = sh(vm, "qupdate status --json")?;
        if pred(&s) {
            return Ok(s);
        }
        if std::time::Instant::now() > deadline {
            bail!("status never matched: {s}");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
