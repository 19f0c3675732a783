//! Host integration tests: qinit stage 2 runs as PID 1 of a fresh PID and
//! mount namespace (`unshare`), supervising fake services written as shell
//! scripts: sleepers, crashers, notify senders, slow starters and orphan
//! makers. Needs root (CI runs as root) and util-linux's `unshare`.

#![allow(clippy::unwrap_used)] // test harness code: a panic is a test failure

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qinit::control::{call, CallError, Request};

struct Sandbox {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// qinit's stderr, read by a thread so a chatty run cannot block it.
    log: Option<std::thread::JoinHandle<String>>,
}

impl Sandbox {
    /// Writes the service files and starts qinit in its namespace.
    fn start(services: &[(&str, &str)]) -> Sandbox {
        assert!(
            rustix::process::geteuid().is_root(),
            "these tests create PID and mount namespaces: run them as root"
        );
        let dir = tempfile::tempdir().unwrap();
        let svc = dir.path().join("services");
        std::fs::create_dir(&svc).unwrap();
        for (name, text) in services {
            let text = text.replace("$DIR", &dir.path().display().to_string());
            std::fs::write(svc.join(format!("{name}.toml")), text).unwrap();
        }
        let child = Command::new("unshare")
            .args(["--pid", "--fork", "--mount", "--mount-proc", "--kill-child"])
            .arg(env!("CARGO_BIN_EXE_qinit"))
            .arg("stage2")
            .env("QINIT_SANDBOX", "1")
            .env("QINIT_SERVICE_DIR", &svc)
            .env("QINIT_CONTROL", dir.path().join("control"))
            .env("QINIT_NOTIFY_DIR", dir.path().join("notify"))
            .env("QINIT_TIMELINE", dir.path().join("boot.json"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("util-linux unshare is needed: apt-get install util-linux");
        let mut child = child;
        let mut stderr = child.stderr.take().unwrap();
        let log = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let sb = Sandbox {
            dir,
            child: Some(child),
            log: Some(log),
        };
        sb.wait_path("control", Duration::from_secs(10));
        sb
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn wait_path(&self, rel: &str, timeout: Duration) {
        let p = self.path(rel);
        let start = Instant::now();
        while !p.exists() {
            assert!(start.elapsed() < timeout, "{} did not appear", p.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The answer lines, as `qinit ctl` prints them.
    fn ctl(&self, req: Request) -> Result<Vec<String>, CallError> {
        call(&self.path("control"), &req).map(|reply| reply.lines())
    }

    /// Polls `status` until `service` reports `state`.
    fn wait_state(&self, service: &str, state: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let lines = self.ctl(Request::Status).unwrap();
            if let Some(l) = lines.iter().find(|l| l.starts_with(&format!("{service} "))) {
                if l.contains(&format!("state={state}")) {
                    return l.clone();
                }
            }
            assert!(
                start.elapsed() < timeout,
                "{service} never reached {state}: {lines:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_default()
    }

    /// Powers the sandbox off and returns qinit's log (stderr).
    fn shutdown(mut self) -> String {
        let _ = self.ctl(Request::Poweroff);
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "qinit did not exit"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.log.take().unwrap().join().unwrap()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn shell(script: &str) -> String {
    format!("exec = [\"/bin/sh\", \"-c\", {script:?}]\n")
}

#[test]
fn dependencies_order_the_start_and_independent_services_run_in_parallel() {
    let sb = Sandbox::start(&[
        (
            "base",
            &(shell("sleep 0.3; echo base >> $DIR/log; touch $DIR/base.ready; exec sleep 1000")
                + "ready = \"path\"\nready_path = \"$DIR/base.ready\"\n"),
        ),
        (
            "left",
            &(shell("echo left-start >> $DIR/log; sleep 1; echo left-end >> $DIR/log")
                + "ready = \"exit\"\nrequires = [\"base\"]\n"),
        ),
        (
            "right",
            &(shell("echo right-start >> $DIR/log; sleep 1; echo right-end >> $DIR/log")
                + "ready = \"exit\"\nafter = [\"base\"]\n"),
        ),
        (
            "last",
            // Ready only once its line is written: with `ready = "started"`
            // the log could be read before it, and the hook's line could
            // come first.
            &(shell("echo last >> $DIR/log; touch $DIR/last.ready; exec sleep 1000")
                + "ready = \"path\"\nready_path = \"$DIR/last.ready\"\n\
                   after = [\"left\", \"right\"]\nboot_critical = true\n"),
        ),
        (
            "mark-good",
            &(shell("echo mark-good >> $DIR/log") + "ready = \"exit\"\nboot_complete = true\n"),
        ),
    ]);
    sb.wait_state("last", "ready", Duration::from_secs(20));
    let log = sb.read("log");
    let lines: Vec<&str> = log.lines().collect();
    let pos = |s: &str| lines.iter().position(|l| *l == s).unwrap();
    assert_eq!(lines[0], "base", "{lines:?}");
    // Both started before either finished: they ran side by side.
    assert!(pos("left-start") < pos("right-end") && pos("right-start") < pos("left-end"));
    assert!(pos("last") > pos("left-end") && pos("last") > pos("right-end"));
    // The boot-complete hook ran after the health gate (last is critical).
    sb.wait_state("mark-good", "done", Duration::from_secs(10));
    let log = sb.read("log");
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        lines.iter().position(|l| *l == "mark-good").unwrap() > pos("last"),
        "{lines:?}"
    );
    let status = sb.ctl(Request::Status).unwrap();
    assert!(
        status.iter().any(|l| l.starts_with("left state=done")),
        "{status:?}"
    );
    // The timeline written at ready: the chain runs from the critical
    // service through what it waited for, and `qinit ctl analyze` says so.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qinit"))
        .args(["ctl", "analyze"])
        .env("QINIT_TIMELINE", sb.path("boot.json"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[1].starts_with("QINIT-READY @"), "{text}");
    assert!(lines[2].starts_with("└─last @"), "{text}");
    assert!(
        lines[3].starts_with("  └─left @") || lines[3].starts_with("  └─right @"),
        "{text}"
    );
    assert!(lines[4].starts_with("    └─base @"), "{text}");
    assert!(lines[5].starts_with("      └─stage 2 setup @"), "{text}");
    // left and right each slept a second: blame has them near the top.
    let took = |name: &str| -> u64 {
        let l = lines
            .iter()
            .find(|l| l.trim_end().ends_with(&format!("ms {name}")))
            .unwrap_or_else(|| panic!("{name} not in {text}"));
        l.trim().split("ms").next().unwrap().trim().parse().unwrap()
    };
    assert!(took("left") >= 1000 && took("right") >= 1000, "{text}");
    let json = std::process::Command::new(env!("CARGO_BIN_EXE_qinit"))
        .args(["ctl", "analyze", "--json"])
        .env("QINIT_TIMELINE", sb.path("boot.json"))
        .output()
        .unwrap();
    let t: qinit::timeline::Timeline = serde_json::from_slice(&json.stdout).unwrap();
    let svg = std::process::Command::new(env!("CARGO_BIN_EXE_qinit"))
        .args(["ctl", "analyze", "--svg"])
        .env("QINIT_TIMELINE", sb.path("boot.json"))
        .output()
        .unwrap();
    let svg = String::from_utf8(svg.stdout).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("last (boot-critical)"),
        "{svg}"
    );
    let last = t.services.iter().find(|s| s.name == "last").unwrap();
    assert!(
        last.boot_critical && last.ready_ms <= Some(t.ready_ms),
        "{t:?}"
    );
    sb.shutdown();
}

#[test]
fn a_crasher_restarts_with_growing_backoff_then_gives_up() {
    let sb = Sandbox::start(&[(
        "crasher",
        &(shell("date +%s%N >> $DIR/runs; exit 3")
            + "ready = \"started\"\nrestart = \"on-failure\"\n"),
    )]);
    // 250 + 500 + 1000 ms of backoff: four runs within a few seconds.
    let start = Instant::now();
    while sb.read("runs").lines().count() < 4 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "too few restarts"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let runs: Vec<u128> = sb
        .read("runs")
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    let gaps: Vec<u128> = runs.windows(2).map(|w| (w[1] - w[0]) / 1_000_000).collect();
    // Each gap is at least the backoff for that restart.
    for (i, gap) in gaps.iter().take(3).enumerate() {
        let floor = 250u128 << i;
        assert!(
            *gap >= floor,
            "gap {i} was {gap} ms, backoff {floor} ms: {gaps:?}"
        );
    }
    let line = sb.wait_state("crasher", "backoff", Duration::from_secs(5));
    assert!(line.contains("restarts="), "{line}");
    sb.shutdown();
}

#[test]
fn notify_readiness_orphans_and_bad_definitions() {
    let sb = Sandbox::start(&[
        (
            "notifier",
            &(shell(
                "sleep 0.5; python3 -c 'import os,socket; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendto(b\"STATUS=warming up\\nREADY=1\", os.environ[\"NOTIFY_SOCKET\"])'; exec sleep 1000",
            ) + "ready = \"notify\"\n"),
        ),
        (
            "orphan-maker",
            &(shell("sleep 0.3 & exit 0") + "ready = \"exit\"\n"),
        ),
        ("broken", "exec = [\"/bin/true\"]\nready = \"sometime\"\n"),
        (
            "needs-broken",
            &(shell("exec sleep 1000") + "ready = \"started\"\nrequires = [\"broken\"]\n"),
        ),
        ("cycle-a", &(shell("sleep 1000") + "ready = \"started\"\nafter = [\"cycle-b\"]\n")),
        ("cycle-b", &(shell("sleep 1000") + "ready = \"started\"\nafter = [\"cycle-a\"]\n")),
        (
            "fine",
            &(shell("exec sleep 1000") + "ready = \"started\"\n"),
        ),
        // Confinement: another uid, one capability kept, no_new_privs.
        (
            "confined",
            "exec = [\"/bin/grep\", \"-E\", \"^(Uid|Gid|CapEff|CapBnd|NoNewPrivs)\", \"/proc/self/status\"]\n\
             ready = \"exit\"\nuser = 65534\ngroup = 65534\ncapabilities = [\"NET_ADMIN\"]\nno_new_privs = true\n",
        ),
        // No shell in between: dash clears its signal mask, grep does not.
        (
            "sigs",
            "exec = [\"/bin/grep\", \"^SigBlk\", \"/proc/self/status\"]\nready = \"exit\"\n",
        ),
    ]);
    let line = sb.wait_state("notifier", "ready", Duration::from_secs(20));
    assert!(!line.contains("ready_ms=-"), "{line}");
    sb.wait_state("orphan-maker", "done", Duration::from_secs(10));
    sb.wait_state("fine", "ready", Duration::from_secs(10));
    let status = sb.ctl(Request::Status).unwrap().join("\n");
    for rejected in ["broken", "needs-broken", "cycle-a", "cycle-b"] {
        assert!(
            !status.contains(&format!("{rejected} state")),
            "{rejected} should not run: {status}"
        );
    }
    // Give the orphaned sleep time to exit and be reaped by qinit.
    std::thread::sleep(Duration::from_millis(800));
    let log = sb.shutdown();
    assert!(log.contains("reaped orphan"), "{log}");
    // The confined service ran as nobody with only CAP_NET_ADMIN (bit 12)
    // and no_new_privs.
    assert!(
        log.contains("confined: Uid:\t65534\t65534\t65534\t65534"),
        "{log}"
    );
    assert!(log.contains("confined: Gid:\t65534"), "{log}");
    assert!(log.contains("confined: CapEff:\t0000000000001000"), "{log}");
    assert!(log.contains("confined: CapBnd:\t0000000000001000"), "{log}");
    assert!(log.contains("confined: NoNewPrivs:\t1"), "{log}");
    // qinit's blocked signals must not leak into services.
    assert!(log.contains("sigs: SigBlk:\t0000000000000000"), "{log}");
    assert!(log.contains("notifier: warming up"), "{log}");
    assert!(
        log.contains("service broken rejected") && log.contains("broken.toml"),
        "{log}"
    );
    assert!(log.contains("service needs-broken rejected"), "{log}");
    assert!(log.contains("dependency cycle"), "{log}");
}

#[test]
fn control_restart_stop_and_ordered_shutdown_with_timeouts() {
    let sb = Sandbox::start(&[
        (
            "first",
            &(shell("trap 'echo first-stop >> $DIR/log; exit 0' TERM; echo first-start >> $DIR/log; while :; do sleep 0.1; done")
                + "ready = \"started\"\n"),
        ),
        (
            "second",
            &(shell("trap 'echo second-stop >> $DIR/log; exit 0' TERM; echo second-start >> $DIR/log; while :; do sleep 0.1; done")
                + "ready = \"started\"\nrequires = [\"first\"]\n"),
        ),
        (
            "stubborn",
            &(shell("trap '' TERM; while :; do sleep 0.1; done")
                + "ready = \"started\"\nafter = [\"second\"]\nstop_timeout_ms = 500\n"),
        ),
    ]);
    let before = sb.wait_state("stubborn", "ready", Duration::from_secs(10));
    let pid_of = |l: &str| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix("pid="))
            .unwrap()
            .to_owned()
    };
    // restart gives a new process.
    let old = pid_of(&sb.wait_state("first", "ready", Duration::from_secs(5)));
    sb.ctl(Request::Restart("first".into())).unwrap();
    let start = Instant::now();
    loop {
        let l = sb.wait_state("first", "ready", Duration::from_secs(10));
        if pid_of(&l) != old {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "first not restarted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(matches!(
        sb.ctl(Request::Restart("nope".into())),
        Err(CallError::Refused(reason)) if reason == "no service `nope`"
    ));
    assert!(before.contains("pid="));

    let log = sb.shutdown();
    // Reverse dependency order: stubborn (killed after its 500 ms), then
    // second, then first.
    // Only the shutdown: skip what the restart above logged.
    let since_restart = log.rsplit("first: started").next().unwrap();
    let order: Vec<&str> = since_restart
        .lines()
        .filter_map(|l| l.split("qinit: ").nth(1))
        .filter(|l| l.contains(": stopping (pid"))
        .map(|l| l.split(':').next().unwrap())
        .collect();
    assert_eq!(order, vec!["stubborn", "second", "first"], "{log}");
    assert!(
        log.contains("stubborn: not stopped after 500 ms; killing"),
        "{log}"
    );
}
