//! The GUI VM on the real image: qdomd starts the stand-in without any
//! manual step after dom0 is ready, `qdom list` shows it, `xl destroy` from
//! a shell gets it restarted, and stopping qdomd through qinit shuts it
//! down.

use std::time::{Duration, Instant};

use e2e::{scenario, sh, start, wait_ready};

const GUIVM_TIMEOUT: Duration = Duration::from_secs(300);

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key))
}

/// `qdom list`'s row for the GUI VM: (state, domid).
fn guivm_row(vm: &mut qemu::Vm) -> anyhow::Result<(String, String)> {
    let out = sh(vm, "qdom list")?;
    let row = out
        .lines()
        .find(|l| l.starts_with("guivm "))
        .ok_or_else(|| anyhow::anyhow!("no guivm in `qdom list`: {out}"))?;
    let cols: Vec<&str> = row.split_whitespace().collect();
    Ok((cols[1].to_owned(), cols[2].to_owned()))
}

#[test]
#[ignore = "boots the disk image in nested QEMU: run through `cargo xtask test`"]
fn guivm_started_watched_restarted_and_stopped() -> anyhow::Result<()> {
    let (work, disk) = scenario("guivm")?;
    let mut vm = start(&disk, &work, false)?;
    let ready = wait_ready(&mut vm)?;
    let ready_at = vm.uptime();
    // dom0 does not wait for the GUI VM: its marker comes after READY (the
    // console cursor only moves forward).
    let line = vm.wait_for("QDOMD-GUIVM-READY name=guivm", GUIVM_TIMEOUT)?;
    let first_domid = field(&line, "domid=").unwrap_or("?").to_owned();
    eprintln!(
        "e2e: {ready}\ne2e: {line}\ne2e: GUI VM ready {:.1} s of QEMU time after QINIT-READY",
        (vm.uptime() - ready_at).as_secs_f64()
    );
    assert!(field(&line, "ms=").is_some(), "{line}");

    let (state, domid) = guivm_row(&mut vm)?;
    assert_eq!(
        (state.as_str(), domid.as_str()),
        ("ready", first_domid.as_str())
    );
    let xl = sh(&mut vm, "xl list")?;
    assert!(xl.contains("guivm"), "{xl}");
    // The guest said it was ready through its own xenstore directory.
    let key = sh(
        &mut vm,
        &format!("xenstore-read /local/domain/{domid}/data/ready"),
    )?;
    assert!(key.contains("qguest"), "{key}");
    let rss = sh(&mut vm, "grep VmRSS /proc/$(pidof qdom)/status")?;
    eprintln!("e2e: qdomd {}", rss.trim());

    // Destroyed behind qdomd's back: it comes back under a new domid.
    sh(&mut vm, &format!("xl destroy {domid}"))?;
    let line = vm.wait_for("QDOMD-GUIVM-READY name=guivm", GUIVM_TIMEOUT)?;
    let second = field(&line, "domid=").unwrap_or("?").to_owned();
    assert_ne!(second, first_domid, "{line}");
    let (state, domid) = guivm_row(&mut vm)?;
    assert_eq!((state.as_str(), domid.as_str()), ("ready", second.as_str()));

    // Stopping qdomd through qinit shuts the guest down (cleanly: the
    // guest's own poweroff runs, as its console log shows).
    sh(&mut vm, "qinit ctl stop qdomd")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let xl = sh(&mut vm, "xl list")?;
        if !xl.contains("guivm") {
            break;
        }
        assert!(Instant::now() < deadline, "guivm still running: {xl}");
        std::thread::sleep(Duration::from_secs(2));
    }
    let status = sh(&mut vm, "qinit ctl status")?;
    assert!(status.contains("qdomd state=stopped"), "{status}");
    let console = sh(&mut vm, "cat /var/log/xen/console/guest-guivm.log")?;
    assert!(console.contains("qguest: poweroff requested"), "{console}");
    vm.quit();
    Ok(())
}
