//! `cargo xtask bench boot`: boot-to-ready of qinit against the same Xen
//! daemons started by systemd (a stock Debian trixie root with xen-utils'
//! own units), on the same Xen, kernel, boot chain and QEMU settings, in
//! one run. Prints both times, the ratio and qinit's resident memory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

const SYSTEMD_MARKER: &str = "SYSTEMD-READY";

/// Systemd unit that marks the moment Debian's Xen daemons are up.
const READY_UNIT: &str = "[Unit]
Description=Benchmark marker: Xen daemons are up
Requires=xen.service
After=xen.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'read up idle < /proc/uptime; echo \"SYSTEMD-READY uptime=$up\" > /dev/console'

[Install]
WantedBy=multi-user.target
";

/// Debootstraps (once, cached) the systemd root the comparison boots.
fn systemd_root(cache: &Path, kernel_modules: &Path) -> Result<PathBuf> {
    let dir = cache.join("bench/systemd-root");
    let done = cache.join("bench/systemd-root.done");
    if done.exists() {
        return Ok(dir);
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    eprintln!("xtask: debootstrapping a trixie root with systemd and xen-utils (once)");
    crate::run_cmd(
        Command::new("debootstrap")
            .args([
                "--variant=minbase",
                "--include=systemd-sysv,udev,kmod,xen-utils-4.20,xenstore-utils",
                "--keyring=/usr/share/keyrings/debian-archive-keyring.gpg",
                "trixie",
            ])
            .arg(&dir)
            .arg("http://deb.debian.org/debian"),
    )?;
    // The same kernel modules as the appliance, indexed the Debian way.
    let kver = kernel_modules
        .file_name()
        .context("kernel module directory has no name")?
        .to_string_lossy()
        .into_owned();
    let target = dir.join("usr/lib/modules");
    std::fs::create_dir_all(&target)?;
    crate::run_cmd(
        Command::new("cp")
            .arg("-a")
            .arg(kernel_modules)
            .arg(&target),
    )?;
    crate::run_cmd(Command::new("depmod").arg("-b").arg(&dir).arg(&kver))?;
    let units = dir.join("etc/systemd/system");
    std::fs::write(units.join("qbench-ready.service"), READY_UNIT)?;
    let wants = units.join("multi-user.target.wants");
    std::fs::create_dir_all(&wants)?;
    let link = wants.join("qbench-ready.service");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/etc/systemd/system/qbench-ready.service", link)?;
    std::fs::write(done, "")?;
    Ok(dir)
}

struct Sample {
    wall: f64,
    guest: f64,
}

/// Boots `disk` once and times the first `marker` line.
fn boot_once(root: &Path, image_dir: &Path, name: &str, marker: &str) -> Result<(Sample, String)> {
    let work = root.join("target/bench").join(name);
    std::fs::create_dir_all(&work)?;
    let disk = work.join("disk.img");
    std::fs::copy(image_dir.join(qcontract::paths::output::DISK_IMAGE), &disk)?;
    let mut vm = qemu::Vm::start(&qemu::VmConfig::new(&disk, &work))?;
    let line = vm
        .wait_for(marker, Duration::from_secs(600))
        .with_context(|| format!("{name}: waiting for {marker}"))?;
    let wall = vm.uptime().as_secs_f64();
    // Give qinit's memory line a moment, then read everything.
    std::thread::sleep(Duration::from_secs(2));
    let out = vm.output();
    vm.quit();
    let guest = guest_seconds(&out, &line).unwrap_or(f64::NAN);
    Ok((Sample { wall, guest }, out))
}

/// The guest's uptime at the marker: systemd's line carries it, qinit
/// logs it right after its marker.
fn guest_seconds(out: &str, line: &str) -> Option<f64> {
    if let Some(up) = line.split("uptime=").nth(1) {
        return up.trim().parse().ok();
    }
    out.lines()
        .find_map(|l| l.split("qinit: ready at uptime=").nth(1))
        .and_then(|t| t.trim().parse().ok())
}

pub fn run(root: &Path, runs: u32) -> Result<()> {
    let cache = crate::cache_dir();
    let qinit_image = crate::build_image(root, "qemu")?;
    let systemd_tree = systemd_root(&cache, &super::kernel_modules_dir(&cache)?)?;
    let systemd_image = crate::ImageBuild {
        root_tree: Some(&systemd_tree),
        ..crate::ImageBuild::new("bench-systemd")
    }
    .run(root)?;
    let mut q = Vec::new();
    let mut s = Vec::new();
    let mut rss = String::from("?");
    // Alternate the two so drift on a noisy machine hits both alike.
    for i in 0..runs {
        eprintln!("xtask: bench run {}/{runs}", i + 1);
        let (sample, out) = boot_once(root, &qinit_image, "qinit", "QINIT-READY")?;
        if let Some(l) = out.lines().find(|l| l.contains("qinit: memory: rss=")) {
            rss = l.split("rss=").nth(1).unwrap_or("?").trim().to_owned();
        }
        q.push(sample);
        let (sample, _) = boot_once(root, &systemd_image, "systemd", SYSTEMD_MARKER)?;
        s.push(sample);
    }
    let qw = super::mean(&q.iter().map(|x| x.wall).collect::<Vec<_>>());
    let sw = super::mean(&s.iter().map(|x| x.wall).collect::<Vec<_>>());
    let qg = super::mean(&q.iter().map(|x| x.guest).collect::<Vec<_>>());
    let sg = super::mean(&s.iter().map(|x| x.guest).collect::<Vec<_>>());
    println!("boot to Xen daemons ready, {runs} run(s) each, nested QEMU (TCG):");
    println!("                      QEMU start -> ready    dom0 kernel uptime at ready");
    println!("  qinit               {qw:8.1} s              {qg:8.2} s");
    println!("  systemd (Debian)    {sw:8.1} s              {sg:8.2} s");
    println!(
        "  ratio systemd/qinit {:8.2}                {:8.2}",
        sw / qw,
        sg / qg
    );
    println!("  qinit resident memory in dom0: {rss}");
    Ok(())
}
