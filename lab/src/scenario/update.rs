//! Updates: A → B with a real reboot, a new slot whose updater is broken
//! that falls back to A on its own, and a power cut mid-apply. The bundles come from the
//! flashed medium (see `flash.rs`), piped into `qupdate apply -` as they
//! would come from an UpdateVM.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};

use super::{Ctx, Scenario, FIND_BOOT_DISK};
use crate::flash::Payload;

pub const UPDATE: Scenario = Scenario {
    name: "update",
    about: "apply the next bundle into slot B, reboot into it, refuse an apply while it is on trial, mark it good",
    run: update,
};

pub const ROLLBACK: Scenario = Scenario {
    name: "rollback",
    about: "a release whose updater never comes up: three failed boots, then back to A on its own",
    run: rollback,
};

pub const POWER_CUTS: Scenario = Scenario {
    name: "power-cuts",
    about: "eighteen power cuts at chosen points of an apply, after its activation and around the next boot's mark-good",
    run: power_cuts,
};

pub const POWER_CUT: Scenario = Scenario {
    name: "power-cut",
    about: "power cut at 30% of an apply: A still boots, the same apply then succeeds",
    run: power_cut,
};

/// The state of `slot` in `qupdate status --json`.
fn slot_state<'s>(status: &'s str, slot: &str) -> &'s str {
    let at = status.find(&format!("\"slot\": \"{slot}\"")).unwrap_or(0);
    status[at..]
        .split("\"state\": \"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or("")
}

fn compact(s: &str) -> String {
    s.split_whitespace().collect()
}

/// `<read the payload from the boot disk> | qupdate apply -`, the command
/// line dom0 runs (the LAVA export uses the same one).
pub fn apply_command(payload: &Payload, tail: &str) -> String {
    format!(
        "{FIND_BOOT_DISK}; {} | qupdate apply -{tail}",
        payload.read_command("$d")
    )
}

/// While this file exists, a test image's mark-good hook waits
/// (image/overlays/qemu-test).
const HOLD_MARK_GOOD: &str = "/var/lib/qlab/hold-mark-good";

/// What `qupdate apply` prints once slot B holds the update.
pub const APPLIED: &str = "into slot B";
/// The ready marker of the next release, booted from slot B.
pub const READY_B: &str = "QINIT-READY slot=B version=0.2.0";

fn update(ctx: &mut Ctx<'_>) -> Result<()> {
    let image = ctx.image;
    ctx.boot(image)?;
    let line = ctx.wait_ready()?;
    ensure!(line.contains("slot=A"), "{line}");
    let apply = apply_command(&ctx.payload("next")?, "");
    let t = ctx.timeouts.apply;
    let out = ctx.sh_within(&apply, t)?;
    ensure!(out.contains(APPLIED), "{out}");
    // The CLI found qupdated on the bus and handed it the pipe.
    ensure!(out.contains("through qupdated"), "{out}");
    let st = ctx.sh("qupdate status --json")?;
    ensure!(slot_state(&st, "B") == "bootable", "{st}");
    ensure!(compact(&st).contains("\"order\":[\"B\",\"A\"]"), "{st}");

    // B's mark-good waits while the hold file is there (test images), so
    // there is time to try an apply from a slot still on trial.
    ctx.sh(&format!("mkdir -p /var/lib/qlab && touch {HOLD_MARK_GOOD}"))?;
    ctx.spawn("qinit ctl reboot")?;
    let line = ctx.wait_ready()?;
    ensure!(line.contains(READY_B), "{line}");
    let st = ctx.sh("qupdate status --json")?;
    ensure!(slot_state(&st, "B") == "bootable", "B on trial: {st}");
    // An apply now would write over A, the only slot proven to boot: it is
    // refused before a byte of the bundle is read, and A stays good.
    let out = ctx.sh(&format!("{apply} 2>&1; echo rc=$?"))?;
    ensure!(
        out.contains("not marked good yet") && out.contains("--force") && !out.contains("rc=0"),
        "an apply from B on trial: {out}"
    );
    let st = ctx.sh("qupdate status --json")?;
    ensure!(
        slot_state(&st, "A") == "good",
        "A after the refused apply: {st}"
    );
    ctx.sh(&format!("rm {HOLD_MARK_GOOD}"))?;
    let st = ctx.wait_status(Duration::from_secs(120), |s| slot_state(s, "B") == "good")?;
    ensure!(
        compact(&st).contains("\"floor\":1"),
        "the floor rises once B is good: {st}"
    );
    ensure!(compact(&st).contains("\"booted\":\"B\""), "{st}");
    ctx.target.power_off()?;
    Ok(())
}

fn rollback(ctx: &mut Ctx<'_>) -> Result<()> {
    let image = ctx.image;
    ctx.boot(image)?;
    ctx.wait_ready()?;
    let apply = apply_command(&ctx.payload("broken")?, "");
    let t = ctx.timeouts.apply;
    ctx.sh_within(&apply, t)?;
    ctx.spawn("qinit ctl reboot")?;
    // Slot B's updater never comes up. It is part of the health gate, so
    // the boot fails and reboots, three times.
    let boot = ctx.timeouts.boot;
    for i in 0..3 {
        let (which, line) = ctx.wait_any(&["QINIT-FAILED", "QINIT-READY"], boot)?;
        ensure!(which == 0, "try {i}: {line}");
        ensure!(
            line.contains("reason=service qupdated"),
            "try {i} failed for another reason: {line}"
        );
    }
    let line = ctx.wait_ready()?;
    ensure!(line.contains("slot=A"), "fell back to A: {line}");
    let st = ctx.sh("qupdate status --json")?;
    ensure!(slot_state(&st, "B") == "bad", "{st}");
    ensure!(slot_state(&st, "A") == "good", "{st}");
    ctx.target.power_off()?;
    Ok(())
}

/// Where the power-cut scenario's apply writes its output in dom0.
const APPLY_LOG: &str = "/run/qlab-apply.log";
/// The line the apply's shell appends once it ends, before its status.
const APPLY_ENDED: &str = "qlab-apply-status=";
/// The progress line at which the plug is pulled.
const WRITING: &str = "qupdate: write 30%";

fn power_cut(ctx: &mut Ctx<'_>) -> Result<()> {
    let image = ctx.image;
    ctx.boot(image)?;
    ctx.wait_ready()?;
    // In the background, its progress (whole lines: not a terminal) and
    // then its status in a file that dom0 itself watches.
    let apply = apply_command(&ctx.payload("next")?, &format!(" >{APPLY_LOG} 2>&1"));
    ctx.spawn(&format!("{apply}; echo \"{APPLY_ENDED}$?\" >>{APPLY_LOG}"))?;
    // Pull the plug while the payloads are being written.
    let t = ctx.timeouts.apply;
    ctx.sh_within(
        &format!(
            "until grep -q '{WRITING}' {APPLY_LOG} 2>/dev/null; do \
             if grep -q '{APPLY_ENDED}' {APPLY_LOG} 2>/dev/null; then cat {APPLY_LOG}; exit 1; fi; \
             sleep 0.2; done"
        ),
        t,
    )
    .context("the apply ended before it wrote 30%")?;
    ctx.power_cut()?;

    let line = ctx.wait_ready()?;
    ensure!(line.contains("slot=A"), "{line}");
    let st = ctx.sh("qupdate status --json")?;
    ensure!(slot_state(&st, "B") != "bootable", "{st}");
    ensure!(slot_state(&st, "A") == "good", "{st}");
    let apply = apply_command(&ctx.payload("next")?, "");
    let out = ctx.sh_within(&apply, t)?;
    ensure!(out.contains(APPLIED), "{out}");
    ctx.target.power_off()?;
    Ok(())
}

/// The points of an apply the `power-cuts` scenario pulls the plug at: a
/// phase and a percentage of it, reached or passed. The exhaustive host
/// check (`agents/qupdate/tests/crash.rs`) covers every write; these are
/// the same moments on real QEMU, page cache and virtio disk included.
/// None is later than 70 % of the read-back: a cut there could land after
/// the activation, and the boot would rightly be B's.
const CUT_POINTS: &[(&str, u8)] = &[
    ("write", 0),
    ("write", 10),
    ("write", 20),
    ("write", 30),
    ("write", 40),
    ("write", 50),
    ("write", 60),
    ("write", 70),
    ("write", 80),
    ("write", 90),
    ("verify", 0),
    ("verify", 10),
    ("verify", 30),
    ("verify", 50),
    ("verify", 70),
];

/// A shell test that the apply's log shows `phase` at `pct` % or past it
/// (progress lines come every 10 %, and a line may be skipped).
fn reached(phase: &str, pct: u8) -> String {
    let later = if phase == "write" {
        " || $2 == \"verify\""
    } else {
        ""
    };
    format!(
        "awk '$1 == \"qupdate:\" {{ p = $3; sub(\"%\", \"\", p); \
         if (($2 == \"{phase}\" && p + 0 >= {pct}){later}) f = 1 }} END {{ exit !f }}' {APPLY_LOG}"
    )
}

/// Starts the apply in the background and cuts the power once its log
/// shows `phase` at `pct` %; then A must boot, good, with B not bootable.
fn cut_during_apply(ctx: &mut Ctx<'_>, phase: &str, pct: u8) -> Result<()> {
    let apply = apply_command(&ctx.payload("next")?, &format!(" >{APPLY_LOG} 2>&1"));
    ctx.sh(&format!("rm -f {APPLY_LOG}"))?;
    ctx.spawn(&format!("{apply}; echo \"{APPLY_ENDED}$?\" >>{APPLY_LOG}"))?;
    let t = ctx.timeouts.apply;
    ctx.sh_within(
        &format!(
            "until {}; do \
             if grep -q '{APPLY_ENDED}' {APPLY_LOG} 2>/dev/null; then cat {APPLY_LOG}; exit 1; fi; \
             sleep 0.1; done",
            reached(phase, pct)
        ),
        t,
    )
    .with_context(|| format!("the apply ended before {phase} {pct}%"))?;
    ctx.power_cut()?;
    let line = ctx.wait_ready()?;
    ensure!(line.contains("slot=A"), "cut at {phase} {pct}%: {line}");
    let st = ctx.sh("qupdate status --json")?;
    ensure!(
        slot_state(&st, "B") != "bootable" && slot_state(&st, "B") != "good",
        "cut at {phase} {pct}%: B must not boot: {st}"
    );
    ensure!(
        slot_state(&st, "A") == "good",
        "cut at {phase} {pct}%: {st}"
    );
    Ok(())
}

fn power_cuts(ctx: &mut Ctx<'_>) -> Result<()> {
    let image = ctx.image;
    ctx.boot(image)?;
    ctx.wait_ready()?;
    for &(phase, pct) in CUT_POINTS {
        cut_during_apply(ctx, phase, pct)?;
    }
    let cuts = CUT_POINTS.len();
    // Right after the activation: B is durable as the next boot's slot.
    let apply = apply_command(&ctx.payload("next")?, "");
    let t = ctx.timeouts.apply;
    let out = ctx.sh_within(&apply, t)?;
    ensure!(out.contains(APPLIED), "{out}");
    ctx.power_cut()?;
    let line = ctx.wait_ready()?;
    ensure!(line.contains(READY_B), "cut after the activation: {line}");
    // At B's ready marker, while its mark-good may be under way: either
    // way the next boot comes up, on B still on trial or B good.
    ctx.power_cut()?;
    let line = ctx.wait_ready()?;
    ensure!(line.contains(READY_B), "cut at B's mark-good: {line}");
    let st = ctx.wait_status(Duration::from_secs(120), |s| slot_state(s, "B") == "good")?;
    ensure!(compact(&st).contains("\"booted\":\"B\""), "{st}");
    // And once B is good, a cut at the very next ready marker changes
    // nothing.
    ctx.power_cut()?;
    let line = ctx.wait_ready()?;
    ensure!(line.contains(READY_B), "cut after mark-good: {line}");
    ctx.note(format!(
        "power-cuts: {} cuts, every boot came up on a whole slot",
        cuts + 3
    ));
    ctx.target.power_off()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_states_are_read_from_the_status_json() {
        let st =
            r#"{"slots": [{"slot": "A", "state": "good"}, {"slot": "B", "state": "bootable"}]}"#;
        assert_eq!(slot_state(st, "A"), "good");
        assert_eq!(slot_state(st, "B"), "bootable");
    }

    /// The cut test reads the progress lines as the CLI prints them.
    #[test]
    fn the_cut_points_are_read_from_progress_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("apply.log");
        let check = |phase: &str, pct: u8| {
            let cmd = reached(phase, pct).replace(APPLY_LOG, log.to_str().unwrap());
            std::process::Command::new("sh")
                .args(["-c", &cmd])
                .status()
                .unwrap()
                .success()
        };
        std::fs::write(
            &log,
            "qupdate: through qupdated\nqupdate: write 0%\nqupdate: write 40%\n",
        )
        .unwrap();
        assert!(check("write", 0) && check("write", 30) && check("write", 40));
        assert!(!check("write", 50) && !check("verify", 0));
        std::fs::write(&log, "qupdate: write 90%\nqupdate: verify 10%\n").unwrap();
        assert!(check("write", 100) && check("verify", 10) && !check("verify", 20));
    }
}
