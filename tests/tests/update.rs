//! Updates on the real disk image: A → B with a real reboot, a failing
//! new slot that falls back to A on its own, and a power cut mid-apply.

use std::time::Duration;

use e2e::{bundle_drive, scenario, sh, sh_long, start_with, wait_ready, wait_status};

const APPLY_TIMEOUT: Duration = Duration::from_secs(600);

fn slot_state<'a>(status: &'a str, slot: &str) -> &'a str {
    // `qupdate status --json`: find the object for `slot` and its state.
    let at = status.find(&format!("\"slot\": \"{slot}\"")).unwrap_or(0);
    let rest = &status[at..];
    rest.split("\"state\": \"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or("")
}

#[test]
#[ignore = "boots the disk image in nested QEMU: run through `cargo xtask test`"]
fn update_a_to_b_reboot_and_mark_good() -> anyhow::Result<()> {
    let (work, disk) = scenario("update")?;
    let (drive, len) = bundle_drive("QTEST_BUNDLE_NEXT", &work)?;
    let mut vm = start_with(&disk, &work, &[drive])?;
    let line = wait_ready(&mut vm)?;
    assert!(line.contains("slot=A"), "{line}");
    // Piped on stdin, as from an UpdateVM.
    let out = sh_long(
        &mut vm,
        &format!("head -c {len} /dev/vdb | qupdate apply -"),
        APPLY_TIMEOUT,
    )?;
    assert!(out.contains("into slot B"), "{out}");
    // The CLI found qupdated on the bus and handed it the pipe.
    assert!(out.contains("through qupdated"), "{out}");
    let st = sh(&mut vm, "qupdate status --json")?;
    assert_eq!(slot_state(&st, "B"), "bootable", "{st}");
    let compact: String = st.split_whitespace().collect();
    assert!(compact.contains("\"order\":[\"B\",\"A\"]"), "{st}");

    vm.send_line("qinit ctl reboot")?;
    let line = wait_ready(&mut vm)?;
    assert!(line.contains("slot=B version=0.2.0"), "{line}");
    let st = wait_status(&mut vm, Duration::from_secs(120), |s| {
        slot_state(s, "B") == "good"
    })?;
    let compact: String = st.split_whitespace().collect();
    assert!(
        compact.contains("\"floor\":1"),
        "the floor rises once B is good: {st}"
    );
    assert!(compact.contains("\"booted\":\"B\""), "{st}");
    vm.quit();
    Ok(())
}

#[test]
#[ignore = "boots the disk image in nested QEMU: run through `cargo xtask test`"]
fn a_failing_update_falls_back_to_a_on_its_own() -> anyhow::Result<()> {
    let (work, disk) = scenario("rollback")?;
    let (drive, len) = bundle_drive("QTEST_BUNDLE_BROKEN", &work)?;
    let mut vm = start_with(&disk, &work, &[drive])?;
    wait_ready(&mut vm)?;
    sh_long(
        &mut vm,
        &format!("head -c {len} /dev/vdb | qupdate apply -"),
        APPLY_TIMEOUT,
    )?;
    vm.send_line("qinit ctl reboot")?;
    // Slot B fails its boot-critical service and reboots, three times.
    for i in 0..3 {
        let (which, line) = vm.wait_for_any(&["QINIT-FAILED", "QINIT-READY"], e2e::BOOT_TIMEOUT)?;
        assert_eq!(which, 0, "try {i}: {line}");
    }
    let line = wait_ready(&mut vm)?;
    assert!(line.contains("slot=A"), "fell back to A: {line}");
    let st = sh(&mut vm, "qupdate status --json")?;
    assert_eq!(slot_state(&st, "B"), "bad", "{st}");
    assert_eq!(slot_state(&st, "A"), "good", "{st}");
    vm.quit();
    Ok(())
}

#[test]
#[ignore = "boots the disk image in nested QEMU: run through `cargo xtask test`"]
fn power_cut_during_apply_then_the_same_apply_succeeds() -> anyhow::Result<()> {
    let (work, disk) = scenario("power-cut")?;
    let (drive, len) = bundle_drive("QTEST_BUNDLE_NEXT", &work)?;
    let mut vm = start_with(&disk, &work, std::slice::from_ref(&drive))?;
    wait_ready(&mut vm)?;
    // Through a pipe, so progress comes as whole lines the test can see.
    vm.send_line(&format!(
        "head -c {len} /dev/vdb | qupdate apply - 2>&1 | cat"
    ))?;
    // Pull the plug while the payloads are being written.
    vm.wait_for("qupdate: write 30%", APPLY_TIMEOUT)?;
    vm.kill();
    drop(vm);

    let mut vm = start_with(&disk, &work, std::slice::from_ref(&drive))?;
    let line = wait_ready(&mut vm)?;
    assert!(line.contains("slot=A"), "{line}");
    let st = sh(&mut vm, "qupdate status --json")?;
    assert_ne!(slot_state(&st, "B"), "bootable", "{st}");
    assert_eq!(slot_state(&st, "A"), "good", "{st}");
    let out = sh_long(
        &mut vm,
        &format!("head -c {len} /dev/vdb | qupdate apply -"),
        APPLY_TIMEOUT,
    )?;
    assert!(out.contains("into slot B"), "{out}");
    vm.quit();
    Ok(())
}
