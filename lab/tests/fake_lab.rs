//! The runner and the lab target end to end on the host: a "machine" that
//! is a shell script behind lab-style commands (power on creates a file,
//! the console command waits for it, prints the ready marker and runs
//! what is typed). Checks what a run leaves behind: the reports, the
//! per-scenario serial logs, a failure's message, a panic caught.

use std::path::Path;

use anyhow::ensure;
use qlab::runner::{self, RunOptions};
use qlab::scenario::{Ctx, Scenario};

/// The console answers through the real `qcmd` (built beside this test:
/// `agents/qcmd` has an integration test, so `cargo test` builds it).
const FAKE_DOM0: &str = r#"
echo $$ > console.pid
export PATH="$QCMD_DIR:$PATH" QCMD_STATE_DIR="$PWD/qcmd-state"
while [ ! -f on ]; do sleep 0.05; done
echo "QINIT-READY slot=A version=9.9.9 ms=1"
while read -r line; do eval "$line"; done
"#;

const LAB: &str = r#"
name = "fake"
[power]
on = "test -f flashed && touch on"
off = "rm -f on; [ -f console.pid ] && kill $(cat console.pid) 2>/dev/null; true"
[flash]
command = "cp \"$QLAB_IMAGE\" flashed"
[console]
command = "sh ./fake-dom0.sh"
[timeouts]
boot_s = 20
shell_s = 10
"#;

fn greets(ctx: &mut Ctx<'_>) -> anyhow::Result<()> {
    let image = ctx.image;
    ctx.boot(image)?;
    let ready = ctx.wait_ready()?;
    ensure!(ready.contains("version=9.9.9"), "{ready}");
    let out = ctx.sh("echo hello from dom0")?;
    ensure!(out == "hello from dom0", "{out:?}");
    // A power cycle: the console reconnects and the next boot is seen.
    ctx.power_cut()?;
    ctx.wait_ready()?;
    let p = ctx.payload("next")?;
    let out = ctx.sh(&p.read_command("flashed"))?;
    ensure!(out == "bundle bytes", "{out:?}");
    Ok(())
}

fn fails(ctx: &mut Ctx<'_>) -> anyhow::Result<()> {
    let image = ctx.image;
    ctx.boot(image)?;
    ctx.wait_ready()?;
    ctx.sh("echo about to fail; exit_code_is 3")?;
    Ok(())
}

fn panics(_ctx: &mut Ctx<'_>) -> anyhow::Result<()> {
    let v: Vec<u8> = Vec::new();
    let _ = v[1];
    Ok(())
}

static GREETS: Scenario = Scenario {
    name: "greets",
    about: "boots and answers",
    run: greets,
};
static FAILS: Scenario = Scenario {
    name: "fails",
    about: "a command fails",
    run: fails,
};
static PANICS: Scenario = Scenario {
    name: "panics",
    about: "a bug in a scenario",
    run: panics,
};

/// Where cargo put the `qcmd` binary: this test runs from
/// `<target>/<profile>/deps/`, the binary is in `<target>/<profile>/`.
fn qcmd_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .to_owned();
    assert!(
        dir.join("qcmd").exists(),
        "no qcmd in {}: build it (cargo build -p qcmd)",
        dir.display()
    );
    dir
}

#[test]
fn a_run_on_a_fake_lab_machine_reports_every_scenario() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = dir.path().join("lab");
    std::fs::create_dir_all(&lab).expect("lab dir");
    std::fs::write(
        lab.join("fake-dom0.sh"),
        format!("QCMD_DIR={}\n{FAKE_DOM0}", qcmd_dir().display()),
    )
    .expect("script");
    std::fs::write(lab.join("fake.toml"), LAB).expect("lab file");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).expect("disk");
    let bundle = dir.path().join("next.bundle");
    std::fs::write(&bundle, b"bundle bytes").expect("bundle");
    // The lab's commands run in the lab file's directory; the fake
    // machine's disk is the file `flashed` there.
    let out = dir.path().join("runs");
    let report = runner::run(&RunOptions {
        target: lab.join("fake.toml").display().to_string(),
        scenarios: vec![&GREETS, &FAILS, &PANICS],
        disk,
        bundles: vec![("next".into(), bundle)],
        out: out.clone(),
        echo: false,
    })
    .expect("run");
    let verdicts: Vec<(&str, bool)> = report
        .results
        .iter()
        .map(|r| (r.name.as_str(), r.error.is_none()))
        .collect();
    assert_eq!(
        verdicts,
        [("greets", true), ("fails", false), ("panics", false)],
        "{:#?}",
        report.results
    );
    let fails = report.results[1].error.as_deref().unwrap_or_default();
    assert!(
        fails.contains("exited 127") && fails.contains("about to fail"),
        "{fails}"
    );
    assert_eq!(
        report.results[2].error.as_deref(),
        Some("the scenario panicked")
    );

    let junit = std::fs::read_to_string(report.dir.join("junit.xml")).expect("junit");
    assert!(junit.contains("tests=\"3\" failures=\"2\""), "{junit}");
    assert!(junit.contains("name=\"greets\""), "{junit}");
    let summary = std::fs::read_to_string(report.dir.join("summary.txt")).expect("summary");
    assert!(summary.contains("1 passed, 2 failed"), "{summary}");
    // Each scenario's log holds its own boots only.
    let log =
        |s: &str| std::fs::read_to_string(report.dir.join(s).join("serial.log")).expect("log");
    assert_eq!(
        log("greets").matches("QINIT-READY").count(),
        2,
        "{}",
        log("greets")
    );
    let commands = |s: &str| {
        std::fs::read_to_string(report.dir.join(s).join("commands.log")).expect("commands log")
    };
    assert!(commands("fails").contains("about to fail"));
    assert!(!commands("fails").contains("hello from dom0"));
    assert!(commands("greets").contains("$ echo hello from dom0\nhello from dom0\n"));
    assert!(!report.dir.join("hcl.yml").exists(), "no hcl scenario ran");
    assert!(
        !report.dir.join("flash.img").exists(),
        "the composed image is removed"
    );
    assert!(Path::new(&out.join("latest")).exists());
}
