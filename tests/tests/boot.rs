//! Boot scenarios on the real disk image: OVMF → GRUB (from the image's
//! ESP) → Xen 4.20 → Linux dom0 → qinit from the slot's initramfs →
//! dm-verity root.

use std::io::{Read, Seek, SeekFrom, Write};

use e2e::{scenario, sh, start, wait_ready};

#[test]
#[ignore = "boots the disk image in nested QEMU: run through `cargo xtask test`"]
fn boots_slot_a_to_ready_and_xenstore_answers() -> anyhow::Result<()> {
    let (work, disk) = scenario("boot")?;
    let mut vm = start(&disk, &work, false)?;
    let line = wait_ready(&mut vm)?;
    assert!(line.contains("QINIT-READY slot=A version="), "{line}");
    let ms: u64 = line
        .rsplit("ms=")
        .next()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no ms= in {line}"))?;
    assert!(ms > 0);

    // The whole chain ran: GRUB chose slot A, Xen booted dom0 from it.
    let out = vm.output();
    assert!(
        out.contains("A/B: booting slot A"),
        "GRUB's slot choice not seen"
    );
    assert!(out.contains("(XEN)"), "Xen's console not seen");

    // xenstored works: dom0's entries written by xen-init-dom0.
    let name = sh(&mut vm, "xenstore-read /local/domain/0/name")?;
    assert!(name.lines().any(|l| l.trim() == "Domain-0"), "{name}");
    let ls = sh(&mut vm, "xenstore-ls /local/domain/0")?;
    assert!(ls.contains("domid = \"0\""), "{ls}");

    // The root is the verity device, read-only; /var is the data partition.
    let mounts = sh(&mut vm, "cat /proc/mounts")?;
    assert!(mounts.contains("/dev/dm-0 / squashfs ro"), "{mounts}");
    assert!(mounts.contains(" /var ext4 rw"), "{mounts}");
    let uptime = sh(&mut vm, "xl list")?;
    assert!(uptime.contains("Domain-0"), "{uptime}");
    vm.quit();
    Ok(())
}

/// Flips one byte inside slot A's root filesystem: dm-verity must refuse
/// it and the boot must fail loudly instead of using the corrupted root.
#[test]
#[ignore = "boots the disk image in nested QEMU: run through `cargo xtask test`"]
fn corrupted_root_is_refused() -> anyhow::Result<()> {
    let (work, disk) = scenario("corrupt-root")?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)?;
    let table = qgpt_read(&mut f)?;
    // 64 KiB in: inside the squashfs data, never in the verity tree.
    let offset = table + 64 * 1024 + 123;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(&mut b)?;
    b[0] ^= 0x01;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(&b)?;
    f.sync_all()?;
    drop(f);

    // -no-reboot: stage 1 reboots after a failure; QEMU then exits.
    let mut vm = start(&disk, &work, true)?;
    let (which, line) = vm.wait_for_any(&["QINIT-FAILED", "QINIT-READY"], e2e::BOOT_TIMEOUT)?;
    assert_eq!(which, 0, "booted a corrupted root: {line}");
    assert!(line.contains("corrupt"), "{line}");
    let out = vm.output();
    assert!(
        out.contains("device-mapper: verity") || out.contains("verity"),
        "no verity error in the log"
    );
    assert!(!out.contains("QINIT-READY"));
    Ok(())
}

/// Byte offset of partition `root_a` in the disk image.
fn qgpt_read(f: &mut std::fs::File) -> anyhow::Result<u64> {
    let table = qgpt::read(f)?;
    let p = table
        .find("root_a")
        .ok_or_else(|| anyhow::anyhow!("no root_a partition"))?;
    Ok(p.offset())
}
