//! Boot to ready on the real disk image: firmware → GRUB (from the
//! image's ESP) → Xen 4.20 → Linux dom0 → qinit from the slot's
//! initramfs → dm-verity root; and a corrupted root that must be refused.

use anyhow::{ensure, Context as _, Result};

use super::{Check, Ctx, Scenario};

pub const BOOT: Scenario = Scenario {
    name: "boot",
    about: "boot slot A to QINIT-READY; xenstore, the verity root and /var answer; qinit ctl analyze shows the critical chain and draws the boot",
    run: boot,
};

pub const CORRUPT_ROOT: Scenario = Scenario {
    name: "corrupt-root",
    about: "one flipped bit in root_a: dm-verity refuses it, no QINIT-READY",
    run: corrupt_root,
};

/// What a booted dom0 must answer. The LAVA export turns the same list
/// into its interactive test.
pub const CHECKS: &[Check] = &[
    // xenstored works: dom0's entries written by xen-init-dom0.
    Check::line(
        "xenstore-name",
        "xenstore-read /local/domain/0/name",
        "Domain-0",
    ),
    Check::text(
        "xenstore-domid",
        "xenstore-ls /local/domain/0",
        "domid = \"0\"",
    ),
    // The root is the verity device, read-only; /var is the data partition.
    Check::text("verity-root", "cat /proc/mounts", "/dev/dm-0 / squashfs ro"),
    Check::text("data-on-var", "cat /proc/mounts", " /var ext4 rw"),
    Check::text("xl-list", "xl list", "Domain-0"),
];

fn boot(ctx: &mut Ctx<'_>) -> Result<()> {
    let image = ctx.image;
    ctx.boot(image)?;
    let line = ctx.wait_ready()?;
    ensure!(line.contains("QINIT-READY slot=A version="), "{line}");
    let ms: u64 = super::field(&line, "ms=")
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no ms= in {line}"))?;
    ensure!(ms > 0, "{line}");

    for c in CHECKS {
        let out = ctx.sh(c.command)?;
        ensure!(c.holds(&out), "`{}`: no {:?} in {out}", c.command, c.expect);
    }
    // GRUB chose slot A and Xen booted dom0 from it. The console may come
    // up after GRUB on a lab machine, so these are checked only where
    // the transcript has them.
    let out = ctx.target.console().output();
    if out.contains("A/B: booting") {
        ensure!(
            out.contains("A/B: booting slot A"),
            "GRUB booted another slot"
        );
    }
    // The boot as qinit timed it: the chain from QINIT-READY down through
    // the services, stage 2's setup, stage 1 and the kernel.
    let analyze = ctx.sh("qinit ctl analyze")?;
    for needle in [
        "QINIT-READY @",
        "└─",
        "stage 2 setup @",
        "stage 1 @",
        "kernel @",
        "ms stage 1: early modules",
        "ms xenstored",
    ] {
        ensure!(
            analyze.contains(needle),
            "no {needle:?} in qinit ctl analyze:\n{analyze}"
        );
    }
    let chain: Vec<&str> = analyze
        .lines()
        .skip_while(|l| !l.starts_with("QINIT-READY @"))
        .take_while(|l| !l.is_empty())
        .collect();
    ctx.note(format!("critical chain: {}", chain.join(" / ")));
    // The same as a chart, kept with the run's results.
    let svg = ctx.sh("qinit ctl analyze --svg")?;
    let svg = svg.trim();
    ensure!(
        svg.starts_with("<svg")
            && svg.ends_with("</svg>")
            && svg.contains("stage 1: early modules"),
        "qinit ctl analyze --svg:\n{svg}"
    );
    let chart = ctx.work.join("boot.svg");
    std::fs::write(&chart, format!("{svg}\n"))
        .with_context(|| format!("writing {}", chart.display()))?;
    ctx.note(format!("boot chart {}", chart.display()));
    let disk = ctx.boot_disk()?;
    ctx.note(format!("boot disk {disk}"));
    ctx.target.power_off()?;
    Ok(())
}

fn corrupt_root(ctx: &mut Ctx<'_>) -> Result<()> {
    // 64 KiB in: inside the squashfs data, never in the verity tree.
    let bad = ctx.image.with_flipped_bit(
        &ctx.work.join("corrupt.img"),
        qcontract::Slot::A.root_name(),
        64 * 1024 + 123,
    )?;
    ctx.boot(&bad)?;
    let t = ctx.timeouts.boot;
    let (which, line) = ctx.wait_any(&["QINIT-FAILED", "QINIT-READY"], t)?;
    ensure!(which == 0, "booted a corrupted root: {line}");
    ensure!(line.contains("corrupt"), "{line}");
    let out = ctx.target.console().output();
    ensure!(out.contains("verity"), "no verity error in the log");
    ctx.target.power_off()?;
    let _ = std::fs::remove_file(&bad.path);
    Ok(())
}
