//! A service call a VM makes (`MSG_TRIGGER_SERVICE3`), as R4.2's
//! qrexec-daemon handles it (`handle_execute_service`,
//! `qrexec_execute_vm`, `run_qrexec_to_dom0`):
//!
//! 1. the names are checked before anything else: the service and its
//!    argument against the policy's character set, the target against
//!    what a VM name or a policy keyword can hold;
//! 2. the policy daemon at `/run/qubes/policy.sock` is asked; anything but
//!    a well-formed allow (no daemon, no answer, a malformed one) refuses;
//! 3. an allowed call to a VM asks that VM's daemon for a data port, with
//!    `<user>:QUBESRPC <service>+<arg> <source>`; the caller's agent is
//!    then told where to connect (`MSG_SERVICE_CONNECT`);
//! 4. an allowed call to dom0 runs the service here ([`serve_dom0`]): the
//!    caller is the data vchan's server, dom0 connects as its client.
//!
//! [`decide`] blocks (the policy may ask the user, or start the target);
//! qrexec-daemon runs it on a thread of its own per call.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qpolicy::query::{Answer, Query, MAX_ANSWER};
use qrexec::data::{self, Local, Side};
use qrexec::service::{self, Found, RequestedTarget};
use qrexec::wire::MsgType;
use qvchan::Vchan;

use crate::local::{DaemonConn, DataPort};

/// How long the policy may take: an `ask` waits for the user, an
/// autostart for the target to boot.
const POLICY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long an allowed target's daemon may take to appear after the
/// policy started the VM.
const TARGET_WAIT: Duration = Duration::from_secs(60);
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);
/// The caller's end of a call to dom0 must be there by then
/// (`libvchan_client_init_async` with 5 s in the C code).
const DOM0_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A call as the VM asked for it, its names checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The caller's name and domain.
    pub source: String,
    pub source_domid: u16,
    /// As the caller wrote it (a name, `@default`, `@dispvm`, ...).
    pub target: String,
    /// The service's name and its argument (without the `+`).
    pub name: String,
    pub arg: String,
}

impl Call {
    /// Checks a trigger's names (`sanitize_message_from_agent`; where the C
    /// code replaces a bad byte with `_` this refuses the call).
    pub fn new(
        source: &str,
        source_domid: u16,
        target: &str,
        service_and_arg: &str,
    ) -> Result<Call, String> {
        if !qrexec::cmdline::valid_service(service_and_arg) {
            return Err(format!(
                "service {:?} is not [A-Za-z0-9+-._], or empty, or starts with +",
                sanitize(service_and_arg, "+")
            ));
        }
        if target.len() > 63
            || !target
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"_.-@:".contains(&c))
        {
            return Err(format!(
                "target {:?} is not a VM name or a keyword",
                sanitize(target, "@:")
            ));
        }
        let (name, arg) = service_and_arg
            .split_once('+')
            .unwrap_or((service_and_arg, ""));
        Ok(Call {
            source: source.to_owned(),
            source_domid,
            target: target.to_owned(),
            name: name.to_owned(),
            arg: arg.to_owned(),
        })
    }

    /// `name+arg`, with the `+` even without an argument.
    pub fn descriptor(&self) -> String {
        format!("{}+{}", self.name, self.arg)
    }
}

/// What an allowed or refused call comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Refused, with the reason for the log.
    Refuse(String),
    /// To a VM: the caller's agent connects its data vchan there.
    Connect { target: String, port: DataPort },
    /// To dom0: a port for domain 0 is needed, then [`serve_dom0`].
    Dom0 { requested: RequestedTarget },
}

/// Decides `call` by the policy and, for a VM target, sets up the
/// target's end.
pub fn decide(call: &Call) -> Decision {
    decide_with(call, Path::new(qpolicy::SOCKET))
}

fn decide_with(call: &Call, socket: &Path) -> Decision {
    let answer = match ask_policy(socket, call) {
        Ok(a) => a,
        Err(e) => return Decision::Refuse(format!("no policy answer: {e}")),
    };
    let (user, target, requested) = match answer {
        Answer::Deny => return Decision::Refuse("denied by policy".into()),
        Answer::Allow {
            user,
            target,
            requested_target,
            ..
        } => (user, target, requested_target),
    };
    if target == qpolicy::eval::DOM0 {
        return Decision::Dom0 {
            requested: RequestedTarget::from_policy(&requested),
        };
    }
    if target.starts_with("@dispvm") {
        return Decision::Refuse(format!(
            "the policy allows it to {target}; disposable VMs are not supported here"
        ));
    }
    if !qcontract::vm::valid_vm_name(&target) || user.is_empty() || user.contains([':', ' ']) {
        return Decision::Refuse(format!(
            "the policy answered target {:?} user {:?}",
            sanitize(&target, "@:"),
            sanitize(&user, "")
        ));
    }
    match vm_call(call, &user, &target) {
        Ok(port) => Decision::Connect { target, port },
        Err(e) => Decision::Refuse(format!("allowed to {target}, but {e}")),
    }
}

fn ask_policy(socket: &Path, call: &Call) -> Result<Answer, String> {
    let q = Query {
        source: call.source.clone(),
        intended_target: call.target.clone(),
        service_and_arg: call.descriptor(),
        assume_yes_for_ask: false,
        just_evaluate: false,
    };
    let bytes = q.render().map_err(|e| e.to_string())?;
    let mut s = UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    s.set_read_timeout(Some(POLICY_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(SOCKET_TIMEOUT)))
        .and_then(|()| s.write_all(&bytes))
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    let mut answer = Vec::new();
    s.take(MAX_ANSWER as u64 + 1)
        .read_to_end(&mut answer)
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    Answer::parse(&answer).map_err(|e| e.to_string())
}

/// Asks the target's daemon for a data port to the caller, waiting for
/// the daemon if the policy has just started the target.
fn vm_call(call: &Call, user: &str, target: &str) -> Result<DataPort, String> {
    let deadline = Instant::now() + TARGET_WAIT;
    let mut conn = loop {
        match DaemonConn::connect(target, SOCKET_TIMEOUT) {
            Ok(c) => break c,
            Err(e) if Instant::now() >= deadline => return Err(e.to_string()),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let cmdline = format!("{user}:QUBESRPC {} {}", call.descriptor(), call.source);
    conn.request(
        MsgType::ExecCmdline,
        u32::from(call.source_domid),
        cmdline.as_bytes(),
    )
    .map_err(|e| e.to_string())
}

/// Runs a called dom0 service on the data port the caller's agent was
/// given: connect to the caller's vchan, greet, look the service up in
/// `/etc/qubes-rpc`, pass the data, send its exit code.
pub fn serve_dom0(call: &Call, port: u32, requested: &RequestedTarget) -> Result<(), String> {
    let chain = |e: &dyn std::error::Error| qcontract::error_chain(e);
    let mut xs = qxenstore::Xs::open().map_err(|e| chain(&e))?;
    let mut chan = Vchan::client(&mut xs, 0, call.source_domid, port, DOM0_CONNECT_TIMEOUT)
        .map_err(|e| chain(&e))?;
    drop(xs);
    data::handshake(&mut chan, IO_TIMEOUT).map_err(|e| chain(&e))?;
    let dirs: Vec<&Path> = service::DOM0_SERVICE_DIRS.iter().map(Path::new).collect();
    match service::find(&dirs, &call.name, &call.arg) {
        None => {
            data::send_not_found(&mut chan, IO_TIMEOUT).map_err(|e| chain(&e))?;
            Err(format!(
                "no service {} in /etc/qubes-rpc",
                call.descriptor()
            ))
        }
        Some(Found::Socket(path)) => {
            let header = service::socket_header(&call.descriptor(), &call.source, Some(requested));
            data::serve_socket(&mut chan, &path, &header)
                .map(drop)
                .map_err(|e| chain(&e))
        }
        Some(Found::Executable(path)) => {
            let mut cmd = Command::new(&path);
            if !call.arg.is_empty() {
                cmd.arg(&call.arg);
            }
            let child = cmd
                .envs(service::environment(
                    &call.name,
                    &call.arg,
                    &call.source,
                    Some(requested),
                ))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                // dom0's services have no stderr channel: it goes to the
                // daemon's log.
                .stderr(Stdio::inherit())
                .spawn();
            let mut child = match child {
                Ok(c) => c,
                Err(e) => {
                    data::send_not_found(&mut chan, IO_TIMEOUT).map_err(|e| chain(&e))?;
                    return Err(format!("{}: {e}", path.display()));
                }
            };
            let local = Local {
                input: child.stdout.take().map(OwnedFd::from),
                input_err: None,
                output: child.stdin.take().map(OwnedFd::from),
                output_err: None,
            };
            let mut status = || data::exit_status(child.wait());
            data::pump(&mut chan, Side::Service, local, &mut status)
                .map(drop)
                .map_err(|e| chain(&e))
        }
    }
}

/// `sanitize_name`: what is not `[A-Za-z0-9_.-]` or `extra` becomes `_`,
/// so a logged name cannot carry control characters.
pub fn sanitize(s: &str, extra: &str) -> String {
    s.chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) || extra.contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn names_are_checked_before_the_policy() {
        let c = Call::new("work", 3, "guivm", "qubes.Echo").unwrap();
        assert_eq!(c.descriptor(), "qubes.Echo+");
        let c = Call::new("work", 3, "@dispvm:fedora", "qubes.Filecopy+x.y").unwrap();
        assert_eq!((c.name.as_str(), c.arg.as_str()), ("qubes.Filecopy", "x.y"));
        assert!(Call::new("work", 3, "guivm", "+arg").is_err());
        assert!(Call::new("work", 3, "guivm", "a/b").is_err());
        assert!(Call::new("work", 3, "gui vm", "qubes.Echo").is_err());
        assert!(Call::new("work", 3, &"a".repeat(64), "qubes.Echo").is_err());
        let e = Call::new("work", 3, "x", "bad\u{1b}[2Jname").unwrap_err();
        assert!(!e.contains('\u{1b}'), "{e}");
    }

    /// A policy daemon that answers `answer` once and hands back the
    /// query it got.
    fn policy(dir: &Path, answer: &'static [u8]) -> std::thread::JoinHandle<Vec<u8>> {
        let l = UnixListener::bind(dir.join("policy.sock")).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut q = Vec::new();
            let mut b = [0u8; 256];
            while !Query::complete(&q) {
                let n = s.read(&mut b).unwrap();
                assert!(n > 0);
                q.extend_from_slice(&b[..n]);
            }
            s.write_all(answer).unwrap();
            q
        })
    }

    #[test]
    fn the_policy_decides_and_anything_odd_refuses() {
        let call = Call::new("work", 3, "dom0", "admin.vm.List").unwrap();
        for (answer, allowed) in [
            (&b"result=deny\n"[..], false),
            (b"result=allow\n", false),
            (b"garbage", false),
            (b"", false),
            (
                b"user=DEFAULT\nresult=allow\ntarget=dom0\nautostart=True\nrequested_target=@adminvm",
                true,
            ),
        ] {
            let d = tempfile::tempdir().unwrap();
            let server = policy(d.path(), answer);
            let got = decide_with(&call, &d.path().join("policy.sock"));
            assert_eq!(
                server.join().unwrap(),
                b"source=work\nintended_target=dom0\nservice_and_arg=admin.vm.List+\n\n"
            );
            match got {
                Decision::Dom0 { requested } => {
                    assert!(allowed, "{answer:?}");
                    assert_eq!(requested, RequestedTarget::from_policy("@adminvm"));
                }
                Decision::Refuse(_) => assert!(!allowed, "{answer:?}"),
                other => panic!("{other:?}"),
            }
        }
        // No policy daemon at all: refused.
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            decide_with(&call, &d.path().join("none.sock")),
            Decision::Refuse(_)
        ));
    }

    #[test]
    fn dispvm_targets_and_odd_users_are_refused() {
        let call = Call::new("work", 3, "@dispvm", "qubes.OpenInVM").unwrap();
        for answer in [
            &b"user=DEFAULT\nresult=allow\ntarget=@dispvm:fedora\nautostart=True\nrequested_target=@dispvm"[..],
            b"user=a:b\nresult=allow\ntarget=guivm\nautostart=True\nrequested_target=guivm",
        ] {
            let d = tempfile::tempdir().unwrap();
            let server = policy(d.path(), answer);
            assert!(matches!(
                decide_with(&call, &d.path().join("policy.sock")),
                Decision::Refuse(_)
            ));
            server.join().unwrap();
        }
    }
}
