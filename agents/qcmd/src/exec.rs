//! Running the host's commands: `sh -c` in qcmd's own directory (the
//! shell's, or the service's: `/` in dom0), stdin empty, stdout and stderr
//! in one pipe so their order is kept, as the serial shell showed them.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};

// Output past the protocol's limit is read and counted, not kept: far
// more than any scenario prints, and a serial line would take minutes.
use qcmdchan::{Outcome, MAX_OUTPUT};

/// The shell of the test images (busybox).
const SHELL: &str = "/usr/bin/sh";

/// Runs `command` to its end. The command's own background processes
/// must not keep its output open (use a spawn for those): the reply waits
/// for the pipe to close.
pub fn run(command: &str) -> Outcome {
    match run_inner(command) {
        Ok(o) => o,
        Err(e) => Outcome {
            output: format!("qcmd: cannot run {SHELL}: {e}\n").into_bytes(),
            rc: 127,
            dropped: 0,
        },
    }
}

fn run_inner(command: &str) -> std::io::Result<Outcome> {
    let (mut reader, writer) = std::io::pipe()?;
    let child = {
        // The Command holds both ends given to the child: it must be gone
        // before reading, or the pipe never reports its end.
        let mut cmd = Command::new(SHELL);
        cmd.arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .stdout(writer.try_clone()?)
            .stderr(writer);
        cmd.spawn()
    };
    let mut child = child?;
    let mut output = Vec::new();
    let mut dropped = 0u64;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let keep = n.min(MAX_OUTPUT - output.len());
        output.extend_from_slice(&buf[..keep]);
        dropped += (n - keep) as u64;
    }
    let status = child.wait()?;
    // wait(2) reports a child that exited or was killed, never one that
    // only stopped (no WUNTRACED).
    let rc = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .expect("a waited-for child exited or was killed by a signal");
    Ok(Outcome {
        output,
        rc,
        dropped,
    })
}

/// Starts `command` in a session of its own with no stdio, and does not
/// wait for it. The caller reaps it (the daemon) or leaves that to PID 1.
pub fn spawn(command: &str) -> Result<std::process::Child, String> {
    let mut cmd = Command::new(SHELL);
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // A hangup of the serial shell, or the daemon's stop, must not take
    // a reboot or an update with it.
    // SAFETY: the closure runs in the child between fork and exec; it
    // only calls setsid(2), which is async-signal-safe, and allocates
    // nothing.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    cmd.spawn()
        .map_err(|e| format!("qcmd: cannot start {SHELL}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have_shell() -> bool {
        std::path::Path::new(SHELL).exists()
    }

    #[test]
    fn output_and_status_come_back_in_order() {
        if !have_shell() {
            return;
        }
        let o = run("echo out; echo err >&2; echo out2; exit 3");
        assert_eq!(o.output, b"out\nerr\nout2\n");
        assert_eq!(o.rc, 3);
        let o = run("kill -9 $$");
        assert_eq!(o.rc, 137);
    }

    #[test]
    fn output_past_the_limit_is_counted_not_kept() {
        if !have_shell() {
            return;
        }
        let o = run(&format!("head -c {} /dev/zero", MAX_OUTPUT + 10));
        assert_eq!(o.output.len(), MAX_OUTPUT);
        assert_eq!(o.dropped, 10);
        assert_eq!(o.rc, 0);
    }

    #[test]
    fn a_spawned_command_runs_in_its_own_session() {
        if !have_shell() {
            return;
        }
        let mut child = spawn("exec sleep 5").expect("spawn");
        let pid = child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        // pid (comm) state ppid pgrp session ...
        let after_comm = stat.rsplit_once(')').expect("comm").1;
        let session = after_comm.split_whitespace().nth(3).expect("session");
        assert_eq!(session, pid.to_string());
        child.kill().expect("kill");
        child.wait().expect("wait");
    }
}
