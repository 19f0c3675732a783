//! The Admin API, as qubesd serves it (`qubes/api/__init__.py`,
//! `qubes/api/admin.py` of core-admin R4.2), backed by qdomd's state.
//!
//! A VM calls `admin.*` through qrexec; the policy sends allowed calls to
//! dom0, where `/etc/qubes-rpc/admin.<method>` is a link to
//! [`SOCKET`], a socket service. qrexec-daemon connects, writes the
//! descriptor line `<method>+<arg> <source> name|keyword <dest>` and a
//! NUL, then the caller's payload, and half-closes; the answer is
//!
//! - `0x30 0x00` and the method's text: done;
//! - `0x32 0x00` exception type `\0` traceback (always empty here) `\0`
//!   message `\0`: a refusal the user may see (no such domain, not
//!   running, ...);
//! - nothing, the connection closed: a malformed call (qubesd's
//!   `ProtocolError`, which a correct client never gets);
//! - for `admin.Events`, a stream of `0x31 0x00` subject `\0` event `\0`
//!   (key `\0` value `\0`)* `\0`, until the caller goes away.
//!
//! The part here is free of I/O: [`parse`] reads a request, [`plan`]
//! decides what it needs against the domain list, [`events_for`] turns a
//! state change into Qubes' events, and the `render_*` functions write
//! the answers; [`serve`] is the thin executor.
//!
//! The subset: `admin.vm.List`, `admin.vm.Start`, `admin.vm.Shutdown`
//! (with `force` and `wait`), `admin.vm.Kill`, `admin.vm.property.Get`
//! for `name`, `type`, `label`, `guivm` and `memory`, and `admin.Events`
//! for domains starting and stopping. Everything else is an unknown
//! method, closed without an answer as qubesd does.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc};

use crate::daemon::{DomainInfo, Request, Shared, VmView};
use crate::lifecycle::Phase;

/// qubesd's socket (`/var/run/qubesd.sock`; /var/run is /run here), the
/// target of the `/etc/qubes-rpc/admin.*` links.
pub const SOCKET: &str = "/run/qubesd.sock";
/// qubesd's `buffer_size`: a longer request is dropped.
pub const MAX_REQUEST: usize = 65536;
/// dom0's name, as the Admin API and the policy write it.
const DOM0: &str = qpolicy::eval::DOM0;
/// How long a start may take before the caller is told it failed.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `admin.vm.Shutdown+wait` waits (qdomd destroys a domain that
/// has not stopped 30 s after the request).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(60);
/// How long a caller may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// `admin.Events` streams at once; more are refused (`QubesException`).
const MAX_EVENT_STREAMS: usize = 16;
/// How often a quiet event stream checks that its caller is still there
/// (it has half-closed already, so only a hang-up tells).
const HANGUP_CHECK: Duration = Duration::from_secs(5);
/// How long `admin.vm.Kill` waits for the domain to be gone.
const KILL_WAIT: Duration = Duration::from_secs(30);

/// A request, as qubesd's `eof_received` splits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: String,
    pub arg: String,
    pub source: String,
    /// The destination's name (`@adminvm` already made `dom0`).
    pub dest: String,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("no NUL after the descriptor line")]
    NoNul,
    #[error("the descriptor line is not ASCII")]
    NotAscii,
    #[error("the descriptor line is not `method+arg source type dest`")]
    Fields,
    #[error("destination type {0:?}: only an explicit name is supported")]
    DestType(String),
}

/// Splits a whole request (everything up to the caller's end of file).
pub fn parse(buf: &[u8]) -> Result<Call, FramingError> {
    let nul = buf
        .iter()
        .position(|b| *b == 0)
        .ok_or(FramingError::NoNul)?;
    let (line, payload) = (&buf[..nul], &buf[nul + 1..]);
    let line = std::str::from_utf8(line)
        .ok()
        .filter(|l| l.is_ascii())
        .ok_or(FramingError::NotAscii)?;
    let mut fields = line.splitn(4, ' ');
    let (Some(meth_arg), Some(source), Some(dest_type), Some(dest)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(FramingError::Fields);
    };
    let dest = match (dest_type, dest) {
        ("keyword", "adminvm") => DOM0,
        ("name", d) => d,
        (t, _) => return Err(FramingError::DestType(t.to_owned())),
    };
    let (method, arg) = meth_arg.split_once('+').unwrap_or((meth_arg, ""));
    Ok(Call {
        method: method.to_owned(),
        arg: arg.to_owned(),
        source: source.to_owned(),
        dest: dest.to_owned(),
        payload: payload.to_vec(),
    })
}

/// An answer that ends the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok(String),
    /// A `QubesException` subclass by name, and its message.
    Exception {
        kind: &'static str,
        message: String,
    },
    /// A malformed call: closed without an answer, logged with the reason.
    Abort(String),
}

impl Reply {
    fn exception(kind: &'static str, message: String) -> Reply {
        Reply::Exception { kind, message }
    }
}

/// What a call needs done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Reply(Reply),
    /// Start the VM, answer once it runs.
    Start(String),
    Shutdown {
        vm: String,
        force: bool,
        wait: bool,
    },
    Kill(String),
    /// Stream events: of every domain, or of one.
    Events {
        only: Option<String>,
    },
}

/// Qubes' power states (`get_power_state`).
fn power_state(phase: Phase) -> &'static str {
    match phase {
        Phase::Stopped | Phase::Backoff => "Halted",
        Phase::Starting => "Transient",
        Phase::Running | Phase::Ready => "Running",
        Phase::Stopping => "Halting",
    }
}

/// Python's `repr` of a name that passed [`qcontract::vm::valid_vm_name`]
/// (no quotes in it, so single quotes).
fn repr(name: &str) -> String {
    format!("'{name}'")
}

/// Decides a call against the domain list.
pub fn plan(call: &Call, vms: &[VmView]) -> Plan {
    let abort = |why: &str| Plan::Reply(Reply::Abort(why.to_owned()));
    let known = |name: &str| name == DOM0 || vms.iter().any(|v| v.name == name);
    for (what, name) in [("source", &call.source), ("destination", &call.dest)] {
        if !qcontract::vm::valid_vm_name(name) && name != DOM0 {
            return abort(&format!("{what} is not a VM name"));
        }
        if !known(name) {
            return Plan::Reply(Reply::exception(
                "QubesVMNotFoundError",
                format!("No such domain: {}", repr(name)),
            ));
        }
    }
    let wants_arg = matches!(
        call.method.as_str(),
        "admin.vm.property.Get" | "admin.vm.Shutdown"
    );
    if !wants_arg && !call.arg.is_empty() {
        return abort("unexpected argument");
    }
    if !call.payload.is_empty() {
        return abort("unexpected payload");
    }
    let dest = vms.iter().find(|v| v.name == call.dest);
    let fake_dom0 = |what: &str| {
        Plan::Reply(Reply::exception(
            "QubesVMError",
            format!("Cannot {what} Dom0 fake domain!"),
        ))
    };
    let not_started = |vm: &VmView| {
        Plan::Reply(Reply::exception(
            "QubesVMNotStartedError",
            format!("Domain is powered off: {}", repr(&vm.name)),
        ))
    };
    match call.method.as_str() {
        "admin.vm.List" => Plan::Reply(Reply::Ok(list(vms, dest))),
        "admin.vm.Start" => match dest {
            None => fake_dom0("start"),
            Some(vm) => Plan::Start(vm.name.clone()),
        },
        "admin.vm.Shutdown" => {
            let args: Vec<&str> = if call.arg.is_empty() {
                Vec::new()
            } else {
                call.arg.split('+').collect()
            };
            if !args.iter().all(|a| ["force", "wait"].contains(a)) {
                return abort("shutdown takes `force` and `wait` only");
            }
            match dest {
                None => fake_dom0("shutdown"),
                Some(vm) if vm.halted() => not_started(vm),
                Some(vm) => Plan::Shutdown {
                    vm: vm.name.clone(),
                    force: args.contains(&"force"),
                    wait: args.contains(&"wait"),
                },
            }
        }
        "admin.vm.Kill" => match dest {
            None => fake_dom0("kill"),
            Some(vm) if vm.halted() => not_started(vm),
            Some(vm) => Plan::Kill(vm.name.clone()),
        },
        "admin.vm.property.Get" => Plan::Reply(property(&call.dest, dest, &call.arg)),
        "admin.Events" => Plan::Events {
            only: dest.map(|v| v.name.clone()),
        },
        _ => abort("no such method"),
    }
}

/// `admin.vm.List`: every domain with dom0 for dom0, else the one.
fn list(vms: &[VmView], dest: Option<&VmView>) -> String {
    let mut rows: Vec<(String, &str, &str)> = match dest {
        Some(vm) => vec![(vm.name.clone(), vm.class, power_state(vm.phase))],
        None => std::iter::once((DOM0.to_owned(), "AdminVM", "Running"))
            .chain(
                vms.iter()
                    .map(|v| (v.name.clone(), v.class, power_state(v.phase))),
            )
            .collect(),
    };
    rows.sort();
    rows.iter()
        .map(|(name, class, state)| format!("{name} class={class} state={state}\n"))
        .collect()
}

/// `admin.vm.property.Get` (`_serialize_property`): `default=<bool>
/// type=<type> <value>`. `type` is not a property in qubesd (its clients
/// read `class=` from `admin.vm.List`); it is answered with the class.
fn property(dest_name: &str, dest: Option<&VmView>, prop: &str) -> Reply {
    let value = match (dest, prop) {
        (_, "name") => ("False", "str", dest_name.to_owned()),
        (Some(vm), "type") => ("True", "str", vm.class.to_owned()),
        (None, "type") => ("True", "str", "AdminVM".to_owned()),
        (Some(vm), "label") => ("False", "label", vm.label.clone()),
        (None, "label") => ("True", "label", "black".to_owned()),
        // Derived from the GUI VM's role, so the system's default when
        // there is one; none (the GUI VM itself) is an empty value, as
        // qubesd renders None.
        (Some(vm), "guivm") => (
            if vm.guivm.is_some() { "True" } else { "False" },
            "vm",
            vm.guivm.clone().unwrap_or_default(),
        ),
        (Some(vm), "memory") => ("False", "int", vm.memory_mib.to_string()),
        _ => {
            // The name only if it is one: it is the caller's text.
            let shown = if prop.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
                && prop.len() <= 64
            {
                repr(prop)
            } else {
                "(invalid)".to_owned()
            };
            return Reply::exception(
                "QubesNoSuchPropertyError",
                format!("Invalid property {shown} of {dest_name}"),
            );
        }
    };
    let (default, kind, v) = value;
    Reply::Ok(format!("default={default} type={kind} {v}"))
}

/// The events a domain's change of phase makes, as qubesd fires them
/// (`domain-pre-start`, `domain-start`, `domain-pre-shutdown`,
/// `domain-shutdown` then `domain-stopped`; `domain-start-failed` for a
/// start that never ran).
pub fn events_for(
    prev: Option<Phase>,
    now: Phase,
) -> Vec<(&'static str, Vec<(&'static str, String)>)> {
    let was = prev.unwrap_or(Phase::Stopped);
    let mut out = Vec::new();
    match now {
        Phase::Starting if was != Phase::Starting => {
            out.push(("domain-pre-start", vec![("start_guid", "True".to_owned())]));
        }
        p if p.is_up() && !was.is_up() => {
            out.push(("domain-start", vec![("start_guid", "True".to_owned())]));
        }
        Phase::Stopping if was.is_up() => out.push(("domain-pre-shutdown", Vec::new())),
        p if p.is_halted() && (was.is_up() || was == Phase::Stopping) => {
            out.push(("domain-shutdown", Vec::new()));
            out.push(("domain-stopped", Vec::new()));
        }
        p if p.is_halted() && was == Phase::Starting => {
            out.push((
                "domain-start-failed",
                vec![("reason", "the domain did not start".to_owned())],
            ));
        }
        _ => {}
    }
    out
}

/// `0x30 0x00` and the text.
pub fn render_ok(content: &str) -> Vec<u8> {
    [b"0\0", content.as_bytes()].concat()
}

/// `0x32 0x00` type, an empty traceback, message, each NUL-terminated.
pub fn render_exception(kind: &str, message: &str) -> Vec<u8> {
    [b"2\0", kind.as_bytes(), b"\0\0", message.as_bytes(), b"\0"].concat()
}

/// One event: `0x31 0x00` subject (empty for the system), event, the
/// keyword arguments, and an empty field to end them.
pub fn render_event(subject: &str, event: &str, kwargs: &[(&str, String)]) -> Vec<u8> {
    let mut out = b"1\0".to_vec();
    for field in [subject, event] {
        out.extend_from_slice(field.as_bytes());
        out.push(0);
    }
    for (k, v) in kwargs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out.push(0);
    out
}

/// Serves the socket until the task is dropped. Only root connects
/// (qrexec-daemon); the socket is root-only as well.
pub async fn serve(
    listener: tokio::net::UnixListener,
    shared: Arc<Mutex<Shared>>,
    requests: mpsc::UnboundedSender<Request>,
    events: broadcast::Sender<DomainInfo>,
) {
    let streams = Arc::new(tokio::sync::Semaphore::new(MAX_EVENT_STREAMS));
    crate::rootsock::serve(listener, "admin socket", move |stream| {
        client(
            stream,
            shared.clone(),
            requests.clone(),
            events.subscribe(),
            streams.clone(),
        )
    })
    .await;
}

async fn read_request(stream: &mut tokio::net::UnixStream) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading a request: {e}"))?;
        if n == 0 {
            return Ok(buf);
        }
        if buf.len() + n > MAX_REQUEST {
            return Err(format!("a request over {MAX_REQUEST} bytes, dropped"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn client(
    mut stream: tokio::net::UnixStream,
    shared: Arc<Mutex<Shared>>,
    requests: mpsc::UnboundedSender<Request>,
    events: broadcast::Receiver<DomainInfo>,
    streams: Arc<tokio::sync::Semaphore>,
) -> Result<(), String> {
    let raw = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream))
        .await
        .map_err(|_| "a client sent no request in time".to_string())??;
    let call = parse(&raw).map_err(|e| format!("framing error: {e}"))?;
    let vms = crate::daemon::vms_now(&shared)?;
    // The names are the caller's text: only their harmless characters go
    // into the log.
    let what = format!(
        "{}{}{} from {} to {}",
        loggable(&call.method),
        if call.arg.is_empty() { "" } else { "+" },
        loggable(&call.arg),
        loggable(&call.source),
        loggable(&call.dest)
    );
    let reply = match plan(&call, &vms) {
        Plan::Reply(r) => r,
        Plan::Start(vm) => {
            let running = vms.iter().any(|v| v.name == vm && v.running());
            if !running {
                send(&requests, Request::Start(vm.clone()))?;
            }
            match crate::daemon::wait_for_vm(&shared, &vm, VmView::running, START_TIMEOUT).await {
                Ok(()) => Reply::Ok(String::new()),
                Err(e) => Reply::exception("QubesException", format!("Start failed: {e}")),
            }
        }
        Plan::Shutdown { vm, force, wait } => {
            // qdomd's shutdown already ends in a destroy after its
            // timeout, so `force` asks for nothing more.
            let _ = force;
            send(&requests, Request::Shutdown(vm.clone()))?;
            if wait {
                match crate::daemon::wait_for_vm(&shared, &vm, VmView::halted, SHUTDOWN_WAIT).await
                {
                    Ok(()) => Reply::Ok(String::new()),
                    Err(_) => Reply::exception(
                        "QubesVMShutdownTimeoutError",
                        format!("Domain shutdown timed out: {}", repr(&vm)),
                    ),
                }
            } else {
                Reply::Ok(String::new())
            }
        }
        Plan::Kill(vm) => {
            send(&requests, Request::Kill(vm.clone()))?;
            // qubesd answers once the domain is gone.
            match crate::daemon::wait_for_vm(&shared, &vm, VmView::halted, KILL_WAIT).await {
                Ok(()) => Reply::Ok(String::new()),
                Err(e) => Reply::exception("QubesException", format!("Kill failed: {e}")),
            }
        }
        Plan::Events { only } => match streams.try_acquire_owned() {
            Ok(slot) => {
                log::info!("admin: {what}: streaming events");
                let r = stream_events(stream, &shared, &vms, only, events).await;
                drop(slot);
                return r;
            }
            Err(_) => Reply::exception(
                "QubesException",
                format!("{MAX_EVENT_STREAMS} event streams are open already"),
            ),
        },
    };
    let bytes = match &reply {
        Reply::Ok(text) => {
            log::info!("admin: {what}: ok");
            render_ok(text)
        }
        Reply::Exception { kind, message } => {
            log::info!("admin: {what}: {kind}: {message}");
            render_exception(kind, message)
        }
        Reply::Abort(why) => {
            log::warn!("admin: {what}: {why}; closed without an answer");
            return Ok(());
        }
    };
    stream
        .write_all(&bytes)
        .await
        .map_err(|e| format!("answering {what}: {e}"))?;
    stream
        .shutdown()
        .await
        .map_err(|e| format!("answering {what}: {e}"))
}

/// At most 80 characters of `s`, each outside `[A-Za-z0-9_.+@:-]` as `_`.
fn loggable(s: &str) -> String {
    s.chars()
        .take(80)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.+@:-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn send(requests: &mpsc::UnboundedSender<Request>, r: Request) -> Result<(), String> {
    requests
        .send(r)
        .map_err(|_| "qdomd is stopping".to_string())
}

/// `admin.Events`: the confirmation, then every change until the caller
/// goes away: a write fails, or a periodic check finds it hung up.
async fn stream_events(
    mut stream: tokio::net::UnixStream,
    shared: &Mutex<Shared>,
    vms: &[VmView],
    only: Option<String>,
    mut events: broadcast::Receiver<DomainInfo>,
) -> Result<(), String> {
    let mut last: std::collections::HashMap<String, Phase> =
        vms.iter().map(|v| (v.name.clone(), v.phase)).collect();
    let gone = |e: std::io::Error| format!("events: the caller is gone ({e})");
    stream
        .write_all(&render_event("", "connection-established", &[]))
        .await
        .map_err(gone)?;
    let mut check = tokio::time::interval(HANGUP_CHECK);
    loop {
        let changes: Vec<(String, Phase)> = tokio::select! {
            got = events.recv() => match got {
                Ok(i) => vec![(i.name, i.phase)],
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // Changes were dropped for this slow caller: catch up
                    // from the state as it is now.
                    log::warn!("admin: events: {n} changes missed by a slow caller; catching up");
                    crate::daemon::vms_now(shared)?
                        .iter()
                        .map(|v| (v.name.clone(), v.phase))
                        .collect()
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
            _ = check.tick() => {
                if hung_up(&stream) {
                    return Ok(());
                }
                continue;
            }
        };
        for (name, phase) in changes {
            let prev = last.insert(name.clone(), phase);
            if only.as_ref().is_some_and(|o| *o != name) {
                continue;
            }
            for (event, kwargs) in events_for(prev, phase) {
                stream
                    .write_all(&render_event(&name, event, &kwargs))
                    .await
                    .map_err(gone)?;
            }
        }
    }
}

/// Whether the caller closed its end entirely (`POLLHUP`; it half-closed
/// when it sent the request, so end of file says nothing).
fn hung_up(stream: &tokio::net::UnixStream) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(stream, PollFlags::empty())];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut fds, Some(&now)), Ok(n) if n > 0)
        && fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn vm(name: &str, phase: Phase, guivm: Option<&str>) -> VmView {
        VmView {
            name: name.into(),
            class: "AppVM",
            label: "red".into(),
            memory_mib: 400,
            tags: BTreeSet::new(),
            phase,
            domid: None,
            guivm: guivm.map(Into::into),
        }
    }

    fn call(line: &str) -> Call {
        parse(format!("{line}\0").as_bytes()).unwrap()
    }

    #[test]
    fn requests_split_as_qubesd_splits_them() {
        let c = parse(b"admin.vm.List+ guivm keyword adminvm\0").unwrap();
        assert_eq!(
            (
                c.method.as_str(),
                c.arg.as_str(),
                c.source.as_str(),
                c.dest.as_str()
            ),
            ("admin.vm.List", "", "guivm", "dom0")
        );
        let c = parse(b"admin.vm.Shutdown+force+wait guivm name work\0xy").unwrap();
        assert_eq!((c.arg.as_str(), c.dest.as_str()), ("force+wait", "work"));
        assert_eq!(c.payload, b"xy");
        assert_eq!(parse(b"admin.vm.List guivm name"), Err(FramingError::NoNul));
        assert_eq!(parse(b"admin.vm.List guivm\0"), Err(FramingError::Fields));
        assert_eq!(
            parse(b"admin.vm.List+ guivm keyword default\0"),
            Err(FramingError::DestType("keyword".into()))
        );
        assert_eq!(
            parse("admin.vm.List+ gu\u{e9}vm name work\0".as_bytes()),
            Err(FramingError::NotAscii)
        );
    }

    #[test]
    fn list_is_qubesd_text() {
        let vms = [
            vm("work", Phase::Stopped, Some("guivm")),
            vm("guivm", Phase::Ready, None),
        ];
        let p = plan(&call("admin.vm.List+ guivm keyword adminvm"), &vms);
        assert_eq!(
            p,
            Plan::Reply(Reply::Ok(
                "dom0 class=AdminVM state=Running\n\
                 guivm class=AppVM state=Running\n\
                 work class=AppVM state=Halted\n"
                    .into()
            ))
        );
        let p = plan(&call("admin.vm.List+ guivm name work"), &vms);
        assert_eq!(
            p,
            Plan::Reply(Reply::Ok("work class=AppVM state=Halted\n".into()))
        );
        assert_eq!(
            render_ok("work class=AppVM state=Halted\n"),
            b"0\0work class=AppVM state=Halted\n"
        );
    }

    #[test]
    fn actions_check_the_state_first() {
        let vms = [
            vm("work", Phase::Stopped, Some("guivm")),
            vm("guivm", Phase::Ready, None),
        ];
        assert_eq!(
            plan(&call("admin.vm.Start+ guivm name work"), &vms),
            Plan::Start("work".into())
        );
        assert_eq!(
            plan(&call("admin.vm.Shutdown+ guivm name work"), &vms),
            Plan::Reply(Reply::exception(
                "QubesVMNotStartedError",
                "Domain is powered off: 'work'".into()
            ))
        );
        assert_eq!(
            plan(&call("admin.vm.Shutdown+wait guivm name guivm"), &vms),
            Plan::Shutdown {
                vm: "guivm".into(),
                force: false,
                wait: true
            }
        );
        assert!(matches!(
            plan(&call("admin.vm.Shutdown+now guivm name guivm"), &vms),
            Plan::Reply(Reply::Abort(_))
        ));
        assert!(matches!(
            plan(&call("admin.vm.Kill+ guivm keyword adminvm"), &vms),
            Plan::Reply(Reply::Exception {
                kind: "QubesVMError",
                ..
            })
        ));
        assert_eq!(
            plan(&call("admin.vm.Start+ guivm name ghost"), &vms),
            Plan::Reply(Reply::exception(
                "QubesVMNotFoundError",
                "No such domain: 'ghost'".into()
            ))
        );
        // Malformed: closed without an answer.
        for line in [
            "admin.vm.Start+now guivm name work",
            "admin.vm.Create.AppVM+ guivm keyword adminvm",
            "admin.vm.List+ guivm name ../etc",
        ] {
            assert!(
                matches!(plan(&call(line), &vms), Plan::Reply(Reply::Abort(_))),
                "{line}"
            );
        }
        let mut with_payload = call("admin.vm.Kill+ guivm name guivm");
        with_payload.payload = b"x".to_vec();
        assert!(matches!(
            plan(&with_payload, &vms),
            Plan::Reply(Reply::Abort(_))
        ));
    }

    #[test]
    fn properties_are_serialized_as_qubesd_does() {
        let vms = [
            vm("work", Phase::Ready, Some("guivm")),
            vm("guivm", Phase::Ready, None),
        ];
        let get = |line: &str| match plan(&call(line), &vms) {
            Plan::Reply(Reply::Ok(t)) => t,
            other => panic!("{line}: {other:?}"),
        };
        assert_eq!(
            get("admin.vm.property.Get+name guivm name work"),
            "default=False type=str work"
        );
        assert_eq!(
            get("admin.vm.property.Get+label guivm name work"),
            "default=False type=label red"
        );
        assert_eq!(
            get("admin.vm.property.Get+guivm guivm name work"),
            "default=True type=vm guivm"
        );
        assert_eq!(
            get("admin.vm.property.Get+guivm guivm name guivm"),
            "default=False type=vm "
        );
        assert_eq!(
            get("admin.vm.property.Get+memory guivm name work"),
            "default=False type=int 400"
        );
        assert_eq!(
            get("admin.vm.property.Get+type guivm name work"),
            "default=True type=str AppVM"
        );
        assert_eq!(
            plan(&call("admin.vm.property.Get+netvm guivm name work"), &vms),
            Plan::Reply(Reply::exception(
                "QubesNoSuchPropertyError",
                "Invalid property 'netvm' of work".into()
            ))
        );
        assert_eq!(
            render_exception(
                "QubesNoSuchPropertyError",
                "Invalid property 'netvm' of work"
            ),
            b"2\0QubesNoSuchPropertyError\0\0Invalid property 'netvm' of work\0"
        );
    }

    #[test]
    fn phases_become_qubes_events() {
        let names = |v: Vec<(&'static str, Vec<(&'static str, String)>)>| {
            v.into_iter().map(|(e, _)| e).collect::<Vec<_>>()
        };
        assert_eq!(
            names(events_for(Some(Phase::Stopped), Phase::Starting)),
            ["domain-pre-start"]
        );
        assert_eq!(
            names(events_for(Some(Phase::Starting), Phase::Running)),
            ["domain-start"]
        );
        assert!(events_for(Some(Phase::Running), Phase::Ready).is_empty());
        assert_eq!(
            names(events_for(Some(Phase::Ready), Phase::Stopping)),
            ["domain-pre-shutdown"]
        );
        assert_eq!(
            names(events_for(Some(Phase::Stopping), Phase::Stopped)),
            ["domain-shutdown", "domain-stopped"]
        );
        assert_eq!(
            names(events_for(Some(Phase::Ready), Phase::Backoff)),
            ["domain-shutdown", "domain-stopped"]
        );
        assert_eq!(
            names(events_for(Some(Phase::Starting), Phase::Stopped)),
            ["domain-start-failed"]
        );
        assert_eq!(
            render_event("work", "domain-start", &[("start_guid", "True".into())]),
            b"1\0work\0domain-start\0start_guid\0True\0\0"
        );
        assert_eq!(
            render_event("", "connection-established", &[]),
            b"1\0\0connection-established\0\0"
        );
    }

    /// A caller that half-closed is still there; one that closed is gone.
    #[tokio::test]
    async fn a_hung_up_caller_is_seen() {
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        let mut theirs = theirs;
        theirs.shutdown().await.unwrap();
        assert!(!hung_up(&ours));
        drop(theirs);
        assert!(hung_up(&ours));
    }
}
