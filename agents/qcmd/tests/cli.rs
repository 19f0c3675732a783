//! The `qcmd` binary as the serial shell runs it: a request is acked at
//! once, the worker prints the reply when the command ends, and the same
//! request typed again is answered from the store without running twice.

use std::process::Command;
use std::time::{Duration, Instant};

use qcmdchan::{Collector, Progress, Request, Scanner};

#[test]
fn a_typed_request_is_acked_then_answered_once() {
    if !std::path::Path::new("/usr/bin/sh").exists() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let marker = dir.path().join("ran");
    let cmd = format!("echo x >> {}; echo done", marker.display());
    let line = Request::run("t1", &cmd).render();
    let log = dir.path().join("out");
    let run = || {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log");
        let status = Command::new(env!("CARGO_BIN_EXE_qcmd"))
            .args(line.split(' '))
            .env("QCMD_STATE_DIR", &state)
            .stdout(out)
            .status()
            .expect("qcmd");
        assert!(status.success());
    };
    run();
    let deadline = Instant::now() + Duration::from_secs(20);
    let outcome = loop {
        let bytes = std::fs::read(&log).expect("read");
        let mut c = Collector::new("t1");
        for f in Scanner::at(0).scan(&bytes) {
            c.accept(&f);
        }
        if let Ok(Progress::Complete(o)) = c.progress() {
            break o;
        }
        assert!(
            Instant::now() < deadline,
            "no reply: {}",
            String::from_utf8_lossy(&bytes)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!((outcome.output.as_slice(), outcome.rc), (&b"done\n"[..], 0));
    run();
    assert_eq!(std::fs::read_to_string(&marker).expect("marker"), "x\n");
}
