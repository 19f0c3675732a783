//! `cargo xtask bench qrexec`: the Qubes daemons in one boot of the
//! qemu-test image (nested QEMU), each number next to its baseline:
//!
//! - throughput of 64 MiB dom0 → app VM through qrexec (`qrexec-client
//!   -d work root:'cat >/dev/null'`) against a raw vchan copy of the same
//!   bytes with the same crate and ring size (`qvchan-cat`), no protocol
//!   on top (goal: at least 0.8 of it);
//! - the latency of 100 sequential empty service calls from the app VM to
//!   dom0 (`qrexec-client-vm dom0 test.Null`, policy and all), next to
//!   100 empty commands dom0 → VM (`qrexec-client -d work root:true`);
//! - the resident memory of each per-VM daemon (goal: under 2 MiB each).
//!
//! Both sides of each pair run in the same boot, alternating.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

const BYTES: u64 = 64 << 20;
/// A vchan port no qrexec data connection uses (they are 513..769).
const RAW_PORT: u32 = 4000;
const CALLS: u32 = 100;
const RUN_TIMEOUT: Duration = Duration::from_secs(1200);

/// Runs `command` in dom0 between two reads of the uptime; seconds.
fn timed(vm: &mut qemu::Vm, command: &str) -> Result<f64> {
    let line = format!(
        "read a x </proc/uptime; {command}; rc=$?; read b x </proc/uptime; echo \"BENCH rc=$rc start=$a end=$b\""
    );
    let (out, _) = vm.shell(&line, RUN_TIMEOUT)?;
    span(&out).with_context(|| format!("`{command}`: {out}"))
}

/// The seconds of a `BENCH rc=0 start=.. end=..` line.
fn span(out: &str) -> Result<f64> {
    let l = out
        .lines()
        .rev()
        .find(|l| l.starts_with("BENCH "))
        .context("no BENCH line")?;
    let field = |k: &str| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .with_context(|| format!("no {k} in {l}"))
    };
    ensure!(field("rc=")? == "0", "failed: {l}");
    let start: f64 = field("start=")?.parse()?;
    let end: f64 = field("end=")?.parse()?;
    Ok(end - start)
}

fn sh(vm: &mut qemu::Vm, command: &str) -> Result<String> {
    let (out, rc) = vm.shell(command, Duration::from_secs(300))?;
    if rc != 0 {
        bail!("`{command}` exited {rc}: {out}");
    }
    Ok(out)
}

/// Polls `command` until `done` holds.
fn until(vm: &mut qemu::Vm, command: &str, done: impl Fn(&str) -> bool) -> Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let (out, _) = vm.shell(command, Duration::from_secs(120))?;
        if done(&out) {
            return Ok(out);
        }
        if std::time::Instant::now() > deadline {
            bail!("`{command}` never got there: {out}");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn rss_kib(vm: &mut qemu::Vm, pattern: &str) -> Result<Vec<(String, u64)>> {
    let out = sh(
        vm,
        &format!(
            "for p in $(ps -o pid,args | grep '[{}]{}' | awk '{{print $1}}'); do \
             echo \"$(tr '\\0' ' ' </proc/$p/cmdline) $(grep VmRSS /proc/$p/status | awk '{{print $2}}')\"; done",
            &pattern[..1],
            &pattern[1..]
        ),
    )?;
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (cmd, kib) = l.trim().rsplit_once(' ').context("no RSS")?;
            Ok((cmd.trim().to_owned(), kib.parse()?))
        })
        .collect()
}

pub fn run(root: &Path, runs: u32) -> Result<()> {
    let image = crate::build_image(root, "qemu-test")?;
    let work = root.join("target/bench/qrexec");
    std::fs::create_dir_all(&work)?;
    let disk = work.join("disk.img");
    std::fs::copy(image.join(qcontract::paths::output::DISK_IMAGE), &disk)?;
    let mut vm = qemu::Vm::start(&qemu::VmConfig::new(&disk, &work))?;
    let result = measure(&mut vm, runs);
    vm.quit();
    let m = result?;

    let raw = super::mean(&m.raw);
    let qrexec = super::mean(&m.qrexec);
    let mbps = |s: f64| BYTES as f64 / 1e6 / s;
    let up = super::mean(&m.vm_to_dom0) / f64::from(CALLS) * 1000.0;
    let down = super::mean(&m.dom0_to_vm) / f64::from(CALLS) * 1000.0;
    println!("qrexec in one dom0 and two VMs, nested QEMU (TCG), {runs} run(s) each:");
    println!("  64 MiB dom0 -> VM                    seconds     MB/s");
    println!(
        "    raw vchan (qvchan-cat)            {raw:8.2}  {:7.1}",
        mbps(raw)
    );
    println!(
        "    qrexec (qrexec-client, cat)       {qrexec:8.2}  {:7.1}",
        mbps(qrexec)
    );
    println!(
        "    throughput qrexec/raw {:.2} (goal 0.80)",
        mbps(qrexec) / mbps(raw)
    );
    println!("  {CALLS} sequential empty calls          ms per call");
    println!("    dom0 -> VM (qrexec-client)        {down:8.1}");
    println!(
        "    VM -> dom0 (qrexec-client-vm)     {up:8.1}   (policy, service lookup, a dom0 process)"
    );
    println!("    ratio VM->dom0 / dom0->VM {:.2}", up / down);
    println!("  resident memory of the per-VM daemons (goal 2048 KiB each):");
    for (cmd, kib) in &m.rss {
        println!(
            "    {kib:6} KiB  {:.2} of the goal  {cmd}",
            *kib as f64 / 2048.0
        );
    }
    Ok(())
}

struct Measured {
    raw: Vec<f64>,
    qrexec: Vec<f64>,
    vm_to_dom0: Vec<f64>,
    dom0_to_vm: Vec<f64>,
    rss: Vec<(String, u64)>,
}

fn measure(vm: &mut qemu::Vm, runs: u32) -> Result<Measured> {
    match vm.wait_for_any(&["QINIT-READY", "QINIT-FAILED"], Duration::from_secs(600))? {
        (0, _) => {}
        (_, line) => bail!("the image did not boot: {line}"),
    }
    vm.wait_for("QDOMD-GUIVM-READY", Duration::from_secs(600))?;
    sh(vm, "qdom start work")?;
    until(
        vm,
        "cat /var/log/xen/console/guest-work.log 2>/dev/null; true",
        |c| c.contains("QGUEST-QUBESDB"),
    )?;
    let domid = sh(vm, "xl domid work 2>/dev/null")?.trim().to_owned();
    ensure!(domid.parse::<u16>().is_ok(), "domid of work: {domid:?}");
    // The empty dom0 service (`test.Null`, test images) and a rule for it.
    sh(
        vm,
        "mkdir -p /var/lib/qubes/policy.d && \
         echo 'test.Null * work @adminvm allow target=dom0' >/var/lib/qubes/policy.d/50-bench.policy",
    )?;
    // Warm both paths once (first calls load programs from disk).
    sh(vm, "qrexec-client -d work -w 60 root:true </dev/null")?;
    sh(
        vm,
        "qrexec-client -d work -w 60 root:'qrexec-client-vm dom0 test.Null </dev/null' </dev/null",
    )?;
    let mut m = Measured {
        raw: Vec::new(),
        qrexec: Vec::new(),
        vm_to_dom0: Vec::new(),
        dom0_to_vm: Vec::new(),
        rss: Vec::new(),
    };
    for i in 0..runs {
        eprintln!("xtask: bench qrexec run {}/{runs}", i + 1);
        // The receiver first (detached, with -e), then the timed sender,
        // which waits for it to connect.
        sh(
            vm,
            &format!(
                "qrexec-client -d work -w 60 -e root:'qvchan-cat recv 0 {RAW_PORT} >/dev/null 2>/tmp/raw.log'"
            ),
        )?;
        m.raw.push(timed(
            vm,
            &format!("head -c {BYTES} /dev/zero | qvchan-cat send {domid} {RAW_PORT} 2>/dev/null"),
        )?);
        m.qrexec.push(timed(
            vm,
            &format!("head -c {BYTES} /dev/zero | qrexec-client -d work root:'cat >/dev/null'"),
        )?);
        m.dom0_to_vm.push(timed(
            vm,
            &format!(
                "i=0; while [ $i -lt {CALLS} ]; do qrexec-client -d work root:true </dev/null || exit 1; i=$((i+1)); done"
            ),
        )?);
        let (out, _) = vm.shell(
            &format!(
                "qrexec-client -d work root:'read a x </proc/uptime; i=0; while [ $i -lt {CALLS} ]; do \
                 qrexec-client-vm dom0 test.Null </dev/null || break; i=$((i+1)); done; \
                 read b x </proc/uptime; [ $i -eq {CALLS} ]; echo \"BENCH rc=$? start=$a end=$b\"' </dev/null"
            ),
            RUN_TIMEOUT,
        )?;
        m.vm_to_dom0
            .push(span(&out).with_context(|| format!("VM -> dom0 calls: {out}"))?);
    }
    m.rss = rss_kib(vm, "qubesdb-daemon ")?;
    m.rss.extend(rss_kib(vm, "qrexec-daemon ")?);
    ensure!(
        m.rss.len() >= 4,
        "not every per-VM daemon found: {:?}",
        m.rss
    );
    Ok(m)
}
