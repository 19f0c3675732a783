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
    assert!(status.contains("dbus state=ready"), "{status}");
    let sock = sh(&mut vm, "stat -c '%a %U' /run/dbus/system_bus_socket")?;
    assert_eq!(
        sock.trim(),
        "600 root",
        "system bus socket must be root only"
    );

    // Kill xenconsoled behind qinit's back: it is restarted.
    let before = service_line(&mut vm, "xenconsoled")?;
    sh(&mut vm, "kill -9 $(pidof xenconsoled)")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let line = loop {
        let line = service_line(&mut vm, "xenconsoled")?;
        if line.contains("state=ready") && line.contains("restarts=1") {
            break line;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not restarted: {line}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_ne!(pid_of(&before), pid_of(&line), "{before} / {line}");
    assert_eq!(sh(&mut vm, "pidof xenconsoled")?.trim(), pid_of(&line));

    // A clean reboot: services stop in order, the machine resets and the
    // next boot reaches the ready marker again.
    vm.send_line("qinit ctl reboot")?;
    vm.wait_for(
        "qinit: shutdown: Reboot: services stopped",
        Duration::from_secs(120),
    )?;
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

fn service_line(vm: &mut qemu::Vm, name: &str) -> anyhow::Result<String> {
    let status = sh(vm, "qinit ctl status")?;
    Ok(status
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_default()
        .to_owned())
}

fn pid_of(line: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .unwrap_or_default()
        .to_owned()
}
