//! qinit as the dom0's PID 1: supervision restarts a killed Xen daemon,
//! `qinit ctl reboot` comes back up through the whole boot chain, and
//! `qinit ctl poweroff` ends the machine. Where the target can choose its
//! entropy sources (QEMU), all of it runs on a CPU without RDRAND, and a
//! last boot without any hardware RNG either comes up on the random seed
//! qinit saved. The bus refuses a process of another uid.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};

use super::{Ctx, Scenario};
use crate::target::Entropy;

/// The seed's log line once it was credited at boot.
const SEED_CREDITED: &str = "random seed: credited 4096 bits";

pub const SUPERVISION: Scenario = Scenario {
    name: "supervision",
    about: "a killed xenconsoled is restarted; reboot and poweroff are orderly; no RDRAND, then no hardware RNG either",
    run: supervision,
};

fn supervision(ctx: &mut Ctx<'_>) -> Result<()> {
    let image = ctx.image;
    ctx.step("power off");
    ctx.target.power_off()?;
    ctx.step("flash");
    ctx.target.flash(&image.path)?;
    // The pool must fill without RDRAND: from the hardware RNG now, from
    // qinit's saved seed on the last boot.
    let chosen = ctx.target.set_entropy(Entropy {
        rdrand: false,
        hwrng: true,
    });
    ctx.power_on()?;
    ctx.wait_ready()?;
    if chosen {
        let seed = ctx.sh("dmesg | grep 'random seed'")?;
        ensure!(seed.contains("random seed: none yet"), "first boot: {seed}");
    }

    let status = ctx.sh("qinit ctl status")?;
    for svc in ["xenstored", "xen-init-dom0", "xenconsoled"] {
        ensure!(status.contains(&format!("{svc} state=")), "{status}");
    }
    ensure!(status.contains("xenstored state=ready"), "{status}");
    ensure!(status.contains("xen-init-dom0 state=done"), "{status}");
    ensure!(status.contains("dbus state=ready"), "{status}");
    bus_policy(ctx)?;

    // Kill xenconsoled behind qinit's back: it is restarted.
    let before = service_line(ctx, "xenconsoled")?;
    ctx.sh("kill -9 $(pidof xenconsoled)")?;
    let restarted = |l: &str| l.contains("state=ready") && l.contains("restarts=1");
    let status = ctx
        .sh_until(
            "qinit ctl status",
            Duration::from_secs(60),
            Duration::from_millis(500),
            |s| restarted(&find_service(s, "xenconsoled")),
        )
        .context("xenconsoled was not restarted")?;
    let line = find_service(&status, "xenconsoled");
    ensure!(pid_of(&before) != pid_of(&line), "{before} / {line}");
    ensure!(
        ctx.sh("pidof xenconsoled")?.trim() == pid_of(&line),
        "{line}"
    );

    // A clean reboot: services stop in order, the machine resets and the
    // next boot reaches the ready marker again.
    ctx.spawn("qinit ctl reboot")?;
    ctx.wait_for(
        "qinit: shutdown: Reboot: services stopped",
        Duration::from_secs(120),
    )?;
    let again = ctx.wait_ready()?;
    ensure!(again.contains("slot=A"), "{again}");
    if chosen {
        let seed = ctx.sh("dmesg | grep 'random seed'")?;
        ensure!(seed.contains(SEED_CREDITED), "after a reboot: {seed}");
    }

    // Power off: qinit says so, and the machine goes off by itself where
    // the target can tell.
    ctx.spawn("qinit ctl poweroff")?;
    let line = ctx.wait_for("qinit: shutdown: ", Duration::from_secs(120))?;
    ensure!(
        line.contains("services stopped") && !line.contains("Reboot"),
        "{line}"
    );
    if let Some(off) = ctx.target.powered_off_by_itself(Duration::from_secs(120)) {
        ensure!(off, "still running after poweroff");
    }
    ctx.target.power_off()?;

    // No RDRAND and no hardware RNG: only the seed saved at poweroff can
    // fill the pool before the bus and the agents ask it for bytes.
    if chosen {
        ctx.target.set_entropy(Entropy {
            rdrand: false,
            hwrng: false,
        });
        ctx.power_on()?;
        ctx.wait_ready()?;
        let seed = ctx.sh("dmesg | grep 'random seed'")?;
        ensure!(seed.contains(SEED_CREDITED), "without any RNG: {seed}");
        ctx.target.power_off()?;
    }
    Ok(())
}

/// The bus runs as `messagebus` with no capability, and a process of
/// another uid in dom0 can neither take the updater's name nor call the
/// agents' APIs (docs/services.md, "The system bus").
fn bus_policy(ctx: &mut Ctx<'_>) -> Result<()> {
    let sock = ctx.sh("stat -c '%a %U' /run/dbus/system_bus_socket")?;
    ensure!(sock.trim() == "666 messagebus", "the bus socket: {sock}");
    let creds = ctx.sh("grep -E '^(Uid|CapEff):' /proc/$(pidof qbus)/status")?;
    ensure!(
        creds.contains("Uid:\t101\t101\t101\t101") && creds.contains("CapEff:\t0000000000000000"),
        "the bus must be messagebus without capabilities: {creds}"
    );
    // `su` as root asks for no password; nobody's shell is nologin, so
    // the command gets busybox's.
    let as_nobody =
        |cmd: &str| format!("busybox su -s /usr/bin/sh -c '{cmd}' nobody 2>&1; echo rc=$?");
    let out = ctx.sh(&as_nobody("qdom list"))?;
    ensure!(
        out.contains("uid 65534 may not call org.qubesos.Domains1.List") && !out.contains("rc=0"),
        "Domains1 as nobody: {out}"
    );
    let out = ctx.sh(&as_nobody("qupdate status"))?;
    ensure!(
        out.contains("uid 65534 may not call") && !out.contains("rc=0"),
        "Update1 as nobody: {out}"
    );
    let out = ctx.sh(&as_nobody("qupdate service"))?;
    ensure!(
        out.contains("uid 65534 may not own org.qubesos.Update1") && !out.contains("rc=0"),
        "owning Update1 as nobody: {out}"
    );
    // The real updater still holds its name and answers root.
    let status = ctx.sh("qupdate status 2>&1")?;
    ensure!(
        status.contains("through qupdated"),
        "root through the service: {status}"
    );
    Ok(())
}

fn service_line(ctx: &mut Ctx<'_>, name: &str) -> Result<String> {
    let status = ctx.sh("qinit ctl status")?;
    Ok(find_service(&status, name))
}

/// The line of `qinit ctl status` output for service `name` (empty if
/// it has none).
fn find_service(status: &str, name: &str) -> String {
    status
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_default()
        .to_owned()
}

fn pid_of(line: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .unwrap_or_default()
        .to_owned()
}
