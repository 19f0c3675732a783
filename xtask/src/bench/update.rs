//! `cargo xtask bench update`: apply throughput of one root image of at
//! least 256 MiB, in one dom0 under nested QEMU, side by side:
//!
//! - a plain copy of the same bytes onto a spare virtual disk (`dd
//!   conv=fsync`): the floor any updater pays;
//! - `qupdate apply` (through qupdated) of a signed bundle into the real
//!   inactive root slot: verify, stream, fsync, read back, recompute the
//!   verity root hash;
//! - RAUC 1.8 (Debian bookworm's package, run from a tools disk with its own
//!   libraries) installing an equivalent signed verity bundle into a raw
//!   slot on a spare virtual disk of the same kind.
//!
//! Each variant writes into a virtio disk backed by a file on the host, with
//! the page cache dropped before each run. dm-verity, which RAUC needs to
//! mount its bundle, is in the dom0 kernel but not in this host's, which is
//! why the comparison runs in the guest.

use qcontract::paths::output;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Where the guest mounts the tools disk (the root is read-only; /run is
/// tmpfs).
const TOOLS: &str = "/run/bench-tools";
/// Bytes of boot payload in the qupdate bundle (the comparison is the root).
const BOOT_PAYLOAD: usize = 4096;
const RUN_TIMEOUT: Duration = Duration::from_secs(1800);

const RAUC_MANIFEST: &str = "[update]
compatible=qubes-bench
version=0.2.0

[bundle]
format=verity

[image.rootfs]
filename=root.img
";

/// The guest side, kept on the tools disk: commands typed on the serial
/// console stay short (a long line can lose characters on a busy guest).
fn guest_script() -> String {
    format!(
        r#"#!/bin/sh
# cargo xtask bench update: the guest side.
T={TOOLS}
export DBUS_SYSTEM_BUS_ADDRESS=unix:path=/run/dbus/system_bus_socket
rauc() {{ $T/rauc/lib/ld-linux-x86-64.so.2 --library-path $T/rauc/lib $T/rauc/rauc --conf=$T/system.conf "$@"; }}
case "$1" in
setup)
    test ! -s $T/loop.ko || busybox insmod $T/loop.ko 2>/dev/null || true
    rauc --override-boot-slot=A service > /tmp/rauc-service.log 2>&1 &
    i=0
    until rauc status > /tmp/rauc-status.log 2>&1; do
        i=$((i + 1))
        if [ $i -ge 60 ]; then cat /tmp/rauc-status.log /tmp/rauc-service.log; exit 1; fi
        sleep 1
    done
    qupdate status > /dev/null ;;
plain)
    dd if=$T/root.img of=/dev/vdd bs=1M conv=fsync 2>/dev/null ;;
qupdate)
    qupdate apply $T/qupdate.bundle > /tmp/qupdate.log 2>&1 || {{ cat /tmp/qupdate.log; exit 1; }} ;;
rauc)
    rauc install $T/rauc.raucb > /tmp/rauc.log 2>&1 || {{ cat /tmp/rauc.log /tmp/rauc-service.log; exit 1; }} ;;
time)
    sync; echo 3 > /proc/sys/vm/drop_caches
    read a b < /proc/uptime
    sh $0 "$2"; rc=$?
    read c d < /proc/uptime
    echo "BENCH $2 rc=$rc start=$a end=$c" ;;
*)
    echo "usage: $0 setup|plain|qupdate|rauc|time VARIANT" >&2; exit 2 ;;
esac
"#
    )
}

fn rauc_system_conf() -> String {
    format!(
        "[system]
compatible=qubes-bench
bootloader=noop
mountprefix=/run/rauc

[keyring]
path={TOOLS}/rauc.cert.pem

[slot.rootfs.0]
device=/dev/vda
type=raw
bootname=A

[slot.rootfs.1]
device=/dev/vdc
type=raw
bootname=B
"
    )
}

/// `/usr/bin/rauc` and every library `ldd` names, with the loader, so the
/// guest runs bookworm's RAUC on its own libc.
fn copy_rauc(dest: &Path) -> Result<()> {
    let lib = dest.join("lib");
    fs::create_dir_all(&lib)?;
    fs::copy("/usr/bin/rauc", dest.join("rauc")).context("copying /usr/bin/rauc")?;
    let out = Command::new("ldd").arg("/usr/bin/rauc").output()?;
    if !out.status.success() {
        bail!("ldd /usr/bin/rauc failed");
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let name = Path::new(path)
            .file_name()
            .context("library without a name")?;
        fs::copy(path, lib.join(name)).with_context(|| format!("copying {path}"))?;
    }
    Ok(())
}

/// The loop driver of the appliance's kernel, decompressed, for RAUC's
/// bundle mount (the dom0 image has no loop devices of its own).
fn copy_loop_module(dest: &Path) -> Result<()> {
    let mods = super::kernel_modules_dir(&crate::cache_dir())?;
    let dir = mods.join("kernel/drivers/block");
    for name in ["loop.ko.xz", "loop.ko"] {
        let src = dir.join(name);
        if !src.exists() {
            continue;
        }
        if name.ends_with(".xz") {
            let out = Command::new("xz").arg("-dc").arg(&src).output()?;
            if !out.status.success() {
                bail!("xz -dc {} failed", src.display());
            }
            fs::write(dest, out.stdout)?;
        } else {
            fs::copy(&src, dest)?;
        }
        return Ok(());
    }
    // Built in: nothing to load.
    fs::write(dest, b"")?;
    Ok(())
}

fn sparse_file(path: &Path, len: u64) -> Result<()> {
    let f = fs::File::create(path)?;
    f.set_len(len)?;
    Ok(())
}

struct Prepared {
    disk: PathBuf,
    extra: Vec<PathBuf>,
    root_bytes: u64,
    bundle_payload_bytes: u64,
}

fn prepare(root: &Path, image: &Path, work: &Path, size_mib: u64) -> Result<Prepared> {
    if work.exists() {
        fs::remove_dir_all(work)?;
    }
    let slot = work.join("slot");
    let tools = work.join("tools");
    let rauc_in = work.join("rauc-in");
    for d in [&slot, &tools, &rauc_in] {
        fs::create_dir_all(d)?;
    }

    eprintln!("xtask: writing a {size_mib} MiB root image with its verity tree");
    let root_img = slot.join(output::ROOT_IMAGE);
    super::write_pseudo_random(
        &root_img,
        size_mib << 20,
        "qubes-dom0 bench update root image",
    )?;
    let vinfo = verity::append_tree(
        &root_img,
        &verity::VerityParams::new(vec![0x5a; 32], [0x11; 16])?,
    )?;
    fs::write(slot.join(output::ROOT_VERITY), vinfo.to_text())?;
    fs::write(slot.join(output::BOOT_IMAGE), vec![0u8; BOOT_PAYLOAD])?;
    fs::copy(
        image.join(output::IMAGE_INFO),
        slot.join(output::IMAGE_INFO),
    )?;
    let root_bytes = fs::metadata(&root_img)?.len();

    // qupdate's bundle, signed the product's way.
    crate::run_cmd(
        Command::new(crate::static_bin_dir(root).join("qimage"))
            .arg("bundle")
            .arg("--image-dir")
            .arg(&slot)
            .arg("--key")
            .arg(root.join("image/keys/test.key"))
            .arg("--out")
            .arg(tools.join("qupdate.bundle")),
    )?;
    fs::hard_link(&root_img, tools.join("root.img"))?;

    // RAUC's bundle of the same root image.
    let key = work.join("rauc.key.pem");
    let cert = tools.join("rauc.cert.pem");
    run_quiet(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
            ])
            .args(["-subj", "/O=qubes-dom0 bench/CN=rauc bench"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    )?;
    fs::hard_link(&root_img, rauc_in.join("root.img"))?;
    fs::write(rauc_in.join("manifest.raucm"), RAUC_MANIFEST)?;
    crate::run_cmd(
        Command::new("rauc")
            .arg("bundle")
            .arg(format!("--cert={}", cert.display()))
            .arg(format!("--key={}", key.display()))
            .arg(&rauc_in)
            .arg(tools.join("rauc.raucb")),
    )?;
    fs::write(tools.join("system.conf"), rauc_system_conf())?;
    fs::write(tools.join("bench.sh"), guest_script())?;
    copy_rauc(&tools.join("rauc"))?;
    copy_loop_module(&tools.join("loop.ko"))?;

    // The tools disk, and two spare slots the size of the real one.
    let mut tools_bytes = 0u64;
    for e in fs::read_dir(&tools)?.flatten() {
        tools_bytes += e.metadata()?.len();
    }
    let tools_img = work.join("tools.img");
    let tools_mib = (tools_bytes >> 20) + 128;
    crate::run_cmd(
        Command::new("mke2fs")
            .args(["-q", "-t", "ext4", "-L", "tools", "-d"])
            .arg(&tools)
            .arg(&tools_img)
            .arg(format!("{tools_mib}M")),
    )?;
    let slot_len = (root_bytes >> 20) + 16;
    let rauc_slot = work.join("rauc-slot.img");
    let plain_slot = work.join("plain-slot.img");
    sparse_file(&rauc_slot, slot_len << 20)?;
    sparse_file(&plain_slot, slot_len << 20)?;
    let disk = work.join("disk.img");
    fs::copy(image.join(output::DISK_IMAGE), &disk)?;
    let bundle_payload_bytes = root_bytes + BOOT_PAYLOAD as u64;
    // The tree is not needed on the host once it is in the disk images.
    fs::remove_dir_all(&rauc_in)?;
    Ok(Prepared {
        disk,
        extra: vec![tools_img, rauc_slot, plain_slot],
        root_bytes,
        bundle_payload_bytes,
    })
}

/// Runs a chatty tool, showing its output only when it fails.
fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// One variant, timed in the guest from a cold page cache.
fn timed(vm: &mut qemu::Vm, name: &str) -> Result<f64> {
    let (out, _) = vm.shell(&format!("sh {TOOLS}/bench.sh time {name}"), RUN_TIMEOUT)?;
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with(&format!("BENCH {name} ")))
        .with_context(|| format!("{name}: no result line in {out}"))?;
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .with_context(|| format!("{name}: no {k} in {line}"))
    };
    if field("rc=")? != "0" {
        bail!("{name} failed: {out}");
    }
    let start: f64 = field("start=")?.parse()?;
    let end: f64 = field("end=")?.parse()?;
    Ok(end - start)
}

/// Whether `disk` begins with the bytes of `file`.
fn starts_with_file(disk: &Path, file: &Path) -> Result<bool> {
    use std::io::Read;
    let mut a = std::io::BufReader::new(fs::File::open(disk)?);
    let mut b = std::io::BufReader::new(fs::File::open(file)?);
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = b.read(&mut y)?;
        if n == 0 {
            return Ok(true);
        }
        a.read_exact(&mut x[..n])?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
    }
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

pub fn run(root: &Path, runs: u32, size_mib: u64) -> Result<()> {
    if size_mib < 256 {
        bail!("--size-mib {size_mib}: the comparison needs at least 256 MiB");
    }
    crate::ensure_packages(&["rauc", "openssl", "xz-utils"])?;
    let image = crate::build_image(root, "bench-update")?;
    let work = root.join("target/bench/update");
    let p = prepare(root, &image, &work, size_mib)?;

    let mut cfg = qemu::VmConfig::new(&p.disk, &work);
    cfg.extra_disks = p.extra.clone();
    let mut vm = qemu::Vm::start(&cfg)?;
    match vm.wait_for_any(&["QINIT-READY", "QINIT-FAILED"], Duration::from_secs(600))? {
        (0, _) => {}
        (_, line) => bail!("bench image failed to boot: {line}"),
    }
    let setup = format!(
        "mkdir -p {TOOLS} && mount -t ext4 -o ro /dev/vdb {TOOLS} && sh {TOOLS}/bench.sh setup"
    );
    let (out, rc) = vm.shell(&setup, Duration::from_secs(300))?;
    if rc != 0 {
        vm.quit();
        bail!("setting up RAUC in the guest failed: {out}");
    }
    let mut plain = Vec::new();
    let mut qupd = Vec::new();
    let mut rauc_t = Vec::new();
    let result = (|| -> Result<()> {
        for i in 0..runs {
            eprintln!("xtask: bench update run {}/{runs}", i + 1);
            plain.push(timed(&mut vm, "plain")?);
            qupd.push(timed(&mut vm, "qupdate")?);
            rauc_t.push(timed(&mut vm, "rauc")?);
        }
        Ok(())
    })();
    vm.quit();
    result?;
    // A number only counts if the bytes arrived: RAUC's slot and the plain
    // copy must hold the root image (qupdate reads its own slot back).
    let image = work.join("slot/root.img");
    for (name, disk) in [("RAUC", &p.extra[1]), ("plain copy", &p.extra[2])] {
        if !starts_with_file(disk, &image)? {
            bail!("{name}: {} does not hold the root image", disk.display());
        }
    }

    let (tp, tq, tr) = (
        super::mean(&plain),
        super::mean(&qupd),
        super::mean(&rauc_t),
    );
    let (mp, mq, mr) = (
        mbps(p.root_bytes, tp),
        mbps(p.bundle_payload_bytes, tq),
        mbps(p.root_bytes, tr),
    );
    println!(
        "apply of a {:.1} MiB root image (with verity tree), {runs} run(s) each, one dom0 in nested QEMU (TCG):",
        p.root_bytes as f64 / 1048576.0
    );
    println!("                                    seconds     MB/s");
    println!("  plain copy (dd conv=fsync)       {tp:8.1}  {mp:7.1}");
    println!("  qupdate apply (via qupdated)     {tq:8.1}  {mq:7.1}");
    println!("  RAUC 1.8 install (verity bundle) {tr:8.1}  {mr:7.1}");
    println!(
        "  throughput qupdate/plain {:.2}, qupdate/RAUC {:.2}",
        mq / mp,
        mq / mr
    );
    println!(
        "  (qupdate also reads the slot back and recomputes blake3 and the verity root hash; RAUC and dd do not)"
    );
    Ok(())
}
