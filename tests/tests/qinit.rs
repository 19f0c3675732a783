//! qinit as the dom0's PID 1 in the real image: supervision restarts a
//! killed Xen daemon, `qinit ctl reboot` comes back up through the whole
//! boot chain, `qinit ctl poweroff` ends the machine.

use std::time::Duration;

use e2e::{scenario, sh, start, wait_ready};

#[test]
#[ignore = "boots the disk image in nested QEMU: run through `cargo xtask test`"]
fn supervision_reboot_and_poweroff() -> anyhow::Result<()> {
    let (work, disk) = scenario("qinit")?;
    let mut vm = start(&disk, &work, false)?;
    wait_ready(&mut vm)?;

    let status = sh(&mut vm, "qinit ctl status")?;
    for svc in ["xenstored", "xen-init-dom0", "xenconsoled"] {
        assert!(status.contains(&format!("{svc} state=")), "{status}");
    }
    assert!(status.contains("xenstored state=ready"), "{status}");
    assert!(status.contains("xen-init-dom0 state=done"), "{status}");

    // Kill xenconsoled behind qinit's back: it is restarted.
    sh(&mut vm, "kill -9 $(pidof xenconsoled)")?;
    vm.wait_for("xenconsoled: restart 1", Duration::from_secs(60))?;
    vm.wait_for("xenconsoled: started", Duration::from_secs(60))?;
    let status = sh(&mut vm, "qinit ctl status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("xenconsoled "))
        .unwrap_or_default()
        .to_owned();
    assert!(
        line.contains("state=ready") && line.contains("restarts=1"),
        "{line}"
    );
    assert!(!sh(&mut vm, "pidof xenconsoled")?.trim().is_empty());

    // A clean reboot: services stop in order, the machine resets and the
    // next boot reaches the ready marker again.
    vm.send_line("qinit ctl reboot")?;
    vm.wait_for("qinit: shutdown: Reboot", Duration::from_secs(120))?;
    let again = wait_ready(&mut vm)?;
    assert!(again.contains("slot=A"), "{again}");

    // Power off: QEMU exits on its own.
    vm.send_line("qinit ctl poweroff")?;
    let status = vm.wait_exit(Duration::from_secs(120));
    assert!(
        status.is_some(),
        "QEMU still running after poweroff:\n{}",
        vm.output()
    );
    Ok(())
}
