//! The control socket: one request line, answer lines, then `OK` or
//! `ERR <reason>`. Root only: the socket is mode 0600 and every peer's
//! credentials are checked. `qinit ctl` is the thin client.
//!
//! The wire format has one parser and one renderer for each direction,
//! both here: [`Request::parse`] and [`Request::to_line`] for the request,
//! [`render_answer`] and [`parse_answer`] for the answer. The supervisor
//! answers with a typed [`Reply`] or [`ControlError`]; the client gets the
//! same [`Reply`] back, or a [`CallError`].

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::unistd::Pid;

/// A request line longer than this is refused.
pub const MAX_REQUEST: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Status,
    Start(String),
    Stop(String),
    Restart(String),
    Reboot,
    Poweroff,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RequestError {
    #[error("empty request")]
    Empty,
    #[error("unknown command `{0}` (status, start, stop, restart, reboot, poweroff)")]
    Unknown(String),
    #[error("`{0}` needs a service name")]
    MissingName(&'static str),
    #[error("`{0}` takes no argument")]
    Extra(&'static str),
    #[error("`{0}` is not a service name")]
    BadName(String),
}

impl Request {
    pub fn parse(line: &str) -> Result<Self, RequestError> {
        let mut words = line.split_whitespace();
        let cmd = words.next().ok_or(RequestError::Empty)?;
        let arg = words.next();
        if words.next().is_some() {
            return Err(RequestError::Unknown(line.to_owned()));
        }
        let name = |which: &'static str| -> Result<String, RequestError> {
            let n = arg.ok_or(RequestError::MissingName(which))?;
            if n.is_empty()
                || n.len() > 64
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(RequestError::BadName(n.to_owned()));
            }
            Ok(n.to_owned())
        };
        let none = |which: &'static str, r: Request| {
            if arg.is_some() {
                Err(RequestError::Extra(which))
            } else {
                Ok(r)
            }
        };
        match cmd {
            "status" => none("status", Request::Status),
            "reboot" => none("reboot", Request::Reboot),
            "poweroff" => none("poweroff", Request::Poweroff),
            "start" => Ok(Request::Start(name("start")?)),
            "stop" => Ok(Request::Stop(name("stop")?)),
            "restart" => Ok(Request::Restart(name("restart")?)),
            other => Err(RequestError::Unknown(other.to_owned())),
        }
    }

    /// The shutdown `reboot` and `poweroff` ask for.
    pub fn shutdown(&self) -> Option<Shutdown> {
        match self {
            Request::Reboot => Some(Shutdown::Reboot),
            Request::Poweroff => Some(Shutdown::Poweroff),
            Request::Status | Request::Start(_) | Request::Stop(_) | Request::Restart(_) => None,
        }
    }

    pub fn to_line(&self) -> String {
        match self {
            Request::Status => "status".into(),
            Request::Start(n) => format!("start {n}"),
            Request::Stop(n) => format!("stop {n}"),
            Request::Restart(n) => format!("restart {n}"),
            Request::Reboot => "reboot".into(),
            Request::Poweroff => "poweroff".into(),
        }
    }
}

/// How the system goes down: asked for with `reboot` or `poweroff`, or by
/// a signal to PID 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    Reboot,
    Poweroff,
}

/// A service's state as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceState {
    /// Waiting for what it starts after.
    Waiting,
    /// Spawned, not ready yet.
    Starting,
    Ready,
    /// A oneshot that exited 0.
    Done,
    /// Waiting to be restarted.
    Backoff,
    /// Why it failed. The wire turns each space into `_`, so a reason
    /// parsed from a `status` line has `_` where the supervisor had spaces.
    Failed(String),
    /// Stopping (signal sent) or stopped by request.
    Stopped,
}

impl std::fmt::Display for ServiceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServiceState::Waiting => f.write_str("waiting"),
            ServiceState::Starting => f.write_str("starting"),
            ServiceState::Ready => f.write_str("ready"),
            ServiceState::Done => f.write_str("done"),
            ServiceState::Backoff => f.write_str("backoff"),
            ServiceState::Failed(r) => write!(f, "failed ({r})"),
            ServiceState::Stopped => f.write_str("stopped"),
        }
    }
}

impl ServiceState {
    /// The `state=` value: one word, so a status line splits on spaces
    /// and stays one line whatever a failure's reason holds.
    fn token(&self) -> String {
        self.to_string()
            .chars()
            .map(|c| {
                if c.is_whitespace() || c.is_control() {
                    '_'
                } else {
                    c
                }
            })
            .collect()
    }

    fn from_token(token: &str) -> Option<Self> {
        Some(match token {
            "waiting" => ServiceState::Waiting,
            "starting" => ServiceState::Starting,
            "ready" => ServiceState::Ready,
            "done" => ServiceState::Done,
            "backoff" => ServiceState::Backoff,
            "stopped" => ServiceState::Stopped,
            other => ServiceState::Failed(
                other
                    .strip_prefix("failed_(")?
                    .strip_suffix(')')?
                    .to_owned(),
            ),
        })
    }
}

/// One line of `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStatus {
    pub name: String,
    pub state: ServiceState,
    pub pid: Option<Pid>,
    /// Restarts since it last started by request.
    pub restarts: u32,
    /// How long its last start took to become ready.
    pub ready_after: Option<Duration>,
}

impl ServiceStatus {
    /// `<name> state=<s> pid=<n|-> restarts=<n> ready_ms=<n|->`
    pub fn to_line(&self) -> String {
        format!(
            "{} state={} pid={} restarts={} ready_ms={}",
            self.name,
            self.state.token(),
            self.pid.map_or("-".into(), |p| p.to_string()),
            self.restarts,
            self.ready_after
                .map_or("-".into(), |d| d.as_millis().to_string())
        )
    }

    /// The inverse of [`ServiceStatus::to_line`].
    pub fn parse(line: &str) -> Option<Self> {
        let mut words = line.split(' ');
        let name = words.next().filter(|n| !n.is_empty())?.to_owned();
        let mut field = |key: &str| words.next()?.strip_prefix(key);
        let state = ServiceState::from_token(field("state=")?)?;
        let pid = match field("pid=")? {
            "-" => None,
            n => Some(Pid::from_raw(n.parse().ok().filter(|p: &i32| *p > 0)?)),
        };
        let restarts = field("restarts=")?.parse().ok()?;
        let ready_after = match field("ready_ms=")? {
            "-" => None,
            n => Some(Duration::from_millis(n.parse().ok()?)),
        };
        if words.next().is_some() {
            return None;
        }
        Some(Self {
            name,
            state,
            pid,
            restarts,
            ready_after,
        })
    }
}

/// What the supervisor answers a request it carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `status`: every service, in start order.
    Status(Vec<ServiceStatus>),
    /// `start`, `stop`, `restart`: under way.
    Accepted,
    /// `reboot`, `poweroff`: the services are stopped next.
    ShuttingDown(Shutdown),
}

impl Reply {
    /// The answer lines before `OK`; `qinit ctl` prints them.
    pub fn lines(&self) -> Vec<String> {
        match self {
            Reply::Status(services) => services.iter().map(ServiceStatus::to_line).collect(),
            Reply::Accepted => Vec::new(),
            Reply::ShuttingDown(Shutdown::Reboot) => vec!["rebooting".into()],
            Reply::ShuttingDown(Shutdown::Poweroff) => vec!["powering off".into()],
        }
    }

    /// The inverse of [`Reply::lines`] for the answer to `req`.
    fn parse(req: &Request, lines: Vec<String>) -> Result<Self, CallError> {
        let reply = match (req, req.shutdown()) {
            (Request::Status, _) => {
                let mut services = Vec::with_capacity(lines.len());
                for l in lines {
                    services.push(ServiceStatus::parse(&l).ok_or(CallError::Unexpected(l))?);
                }
                return Ok(Reply::Status(services));
            }
            (_, Some(kind)) => Reply::ShuttingDown(kind),
            (_, None) => Reply::Accepted,
        };
        let expected = reply.lines();
        if lines != expected {
            let bad = lines
                .iter()
                .zip(&expected)
                .find(|(got, want)| got != want)
                .map(|(got, _)| got.clone())
                .or_else(|| lines.get(expected.len()).cloned())
                // Fewer lines than expected: the `OK` came too early.
                .unwrap_or_else(|| "OK".into());
            return Err(CallError::Unexpected(bad));
        }
        Ok(reply)
    }
}

/// Why the supervisor did not carry a request out: the `<reason>` of
/// `ERR <reason>`.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ControlError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("permission denied: root only")]
    PermissionDenied,
    #[error("no service `{0}`")]
    NoService(String),
    #[error("{name} is {state}")]
    NotStartable { name: String, state: ServiceState },
}

/// Why [`call`] has no reply.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sending the request")]
    Send(#[source] std::io::Error),
    #[error("reading the answer")]
    Receive(#[source] std::io::Error),
    /// The supervisor's `ERR` reason. Only its text crosses the socket.
    #[error("{0}")]
    Refused(String),
    #[error("unexpected answer line `{0}`")]
    Unexpected(String),
    #[error("the answer ended before `OK`")]
    Truncated,
}

/// The whole answer as it goes on the socket.
pub fn render_answer(answer: &Result<Reply, ControlError>) -> String {
    match answer {
        Ok(reply) => {
            let mut text = String::new();
            for l in reply.lines() {
                text.push_str(&l);
                text.push('\n');
            }
            text.push_str("OK\n");
            text
        }
        Err(e) => format!("ERR {e}\n"),
    }
}

/// Reads the answer to `req` from its lines, up to `OK` or `ERR`.
pub fn parse_answer(
    req: &Request,
    lines: impl IntoIterator<Item = std::io::Result<String>>,
) -> Result<Reply, CallError> {
    let mut body = Vec::new();
    for line in lines {
        let line = line.map_err(CallError::Receive)?;
        if line == "OK" {
            return Reply::parse(req, body);
        }
        if let Some(reason) = line.strip_prefix("ERR ") {
            return Err(CallError::Refused(reason.to_owned()));
        }
        body.push(line);
    }
    match req.shutdown() {
        // The system may go down before the answer is read.
        Some(kind) if body.is_empty() => Ok(Reply::ShuttingDown(kind)),
        Some(_) => Reply::parse(req, body),
        None => Err(CallError::Truncated),
    }
}

/// Sends one request and reads its answer.
pub fn call(socket: &Path, req: &Request) -> Result<Reply, CallError> {
    let connect = |source| CallError::Connect {
        path: socket.to_owned(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(connect)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(connect)?;
    writeln!(s, "{}", req.to_line()).map_err(CallError::Send)?;
    parse_answer(req, BufReader::new(s).lines())
}

/// `qinit ctl <command>`: exit code 0 on OK, 1 on an error answer.
pub fn main(args: &[String]) -> i32 {
    if args.first().map(String::as_str) == Some("analyze") {
        return analyze(&args[1..]);
    }
    let line = args.join(" ");
    let req = match Request::parse(&line) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("qinit ctl: {e}");
            return 2;
        }
    };
    let socket = std::env::var_os("QINIT_CONTROL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| qcontract::paths::CONTROL_SOCKET.into());
    match call(&socket, &req) {
        Ok(reply) => {
            for l in reply.lines() {
                println!("{l}");
            }
            0
        }
        Err(e) => {
            eprintln!("qinit ctl: {}", qcontract::error_chain(&e));
            1
        }
    }
}

/// `qinit ctl analyze [--json|--svg]`: the boot's timeline, which qinit
/// wrote at `QINIT-READY`, as the critical chain and the blame list, as it
/// is, or as a chart. It reads the file, so it works whatever the control
/// socket does.
fn analyze(args: &[String]) -> i32 {
    enum Form {
        Text,
        Json,
        Svg,
    }
    let form = match args {
        [] => Form::Text,
        [flag] if flag == "--json" => Form::Json,
        [flag] if flag == "--svg" => Form::Svg,
        _ => {
            eprintln!("qinit ctl: usage: analyze [--json|--svg]");
            return 2;
        }
    };
    let path = std::env::var_os("QINIT_TIMELINE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| qcontract::paths::BOOT_TIMELINE.into());
    let t = match crate::timeline::load::<crate::timeline::Timeline>(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "qinit ctl analyze: {} (qinit writes it once every boot-critical service is up)",
                qcontract::error_chain(&e)
            );
            return 1;
        }
    };
    let text = match form {
        Form::Text => t.render(),
        Form::Svg => t.svg(),
        Form::Json => match serde_json::to_string_pretty(&t) {
            Ok(text) => text + "\n",
            Err(e) => {
                eprintln!("qinit ctl analyze: {e}");
                return 1;
            }
        },
    };
    print!("{text}");
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        assert_eq!(Request::parse("status").unwrap(), Request::Status);
        assert_eq!(
            Request::parse(" restart xenconsoled ").unwrap(),
            Request::Restart("xenconsoled".into())
        );
        assert_eq!(Request::parse("poweroff").unwrap(), Request::Poweroff);
        for r in [
            Request::Status,
            Request::Start("a".into()),
            Request::Stop("b".into()),
            Request::Restart("c".into()),
            Request::Reboot,
            Request::Poweroff,
        ] {
            assert_eq!(Request::parse(&r.to_line()).unwrap(), r);
        }
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(Request::parse("").unwrap_err(), RequestError::Empty);
        assert_eq!(
            Request::parse("stop").unwrap_err(),
            RequestError::MissingName("stop")
        );
        assert_eq!(
            Request::parse("reboot now").unwrap_err(),
            RequestError::Extra("reboot")
        );
        assert!(matches!(
            Request::parse("stop ../x").unwrap_err(),
            RequestError::BadName(_)
        ));
        assert!(matches!(
            Request::parse("explode").unwrap_err(),
            RequestError::Unknown(_)
        ));
        assert!(matches!(
            Request::parse("stop a b").unwrap_err(),
            RequestError::Unknown(_)
        ));
    }

    fn lines(text: &str) -> Vec<std::io::Result<String>> {
        text.lines().map(|l| Ok(l.to_owned())).collect()
    }

    fn status(name: &str, state: ServiceState) -> ServiceStatus {
        ServiceStatus {
            name: name.into(),
            state,
            pid: None,
            restarts: 0,
            ready_after: None,
        }
    }

    /// The bytes the supervisor sent before the typed reply: the
    /// `qinit ctl` CLI and the test scenarios read exactly these.
    #[test]
    fn answers_render_to_the_wire_format() {
        let reply = Reply::Status(vec![
            ServiceStatus {
                pid: Some(Pid::from_raw(179)),
                restarts: 1,
                ready_after: Some(Duration::from_millis(12)),
                ..status("xenconsoled", ServiceState::Ready)
            },
            status(
                "crasher",
                ServiceState::Failed("restart limit (10) reached; last exit status 3".into()),
            ),
        ]);
        assert_eq!(
            render_answer(&Ok(reply)),
            "xenconsoled state=ready pid=179 restarts=1 ready_ms=12\n\
             crasher state=failed_(restart_limit_(10)_reached;_last_exit_status_3) pid=- restarts=0 ready_ms=-\n\
             OK\n"
        );
        assert_eq!(render_answer(&Ok(Reply::Accepted)), "OK\n");
        assert_eq!(
            render_answer(&Ok(Reply::ShuttingDown(Shutdown::Reboot))),
            "rebooting\nOK\n"
        );
        assert_eq!(
            render_answer(&Ok(Reply::ShuttingDown(Shutdown::Poweroff))),
            "powering off\nOK\n"
        );
        let refusals = [
            (
                ControlError::PermissionDenied,
                "permission denied: root only",
            ),
            (ControlError::NoService("nope".into()), "no service `nope`"),
            (
                ControlError::NotStartable {
                    name: "a".into(),
                    state: ServiceState::Failed("not ready within 5 ms".into()),
                },
                "a is failed (not ready within 5 ms)",
            ),
            (RequestError::Empty.into(), "empty request"),
        ];
        for (e, text) in refusals {
            assert_eq!(render_answer(&Err(e)), format!("ERR {text}\n"));
        }
    }

    #[test]
    fn the_client_reads_back_what_the_supervisor_renders() {
        let statuses = vec![
            ServiceStatus {
                pid: Some(Pid::from_raw(42)),
                restarts: 3,
                ready_after: Some(Duration::ZERO),
                ..status("a", ServiceState::Ready)
            },
            status("b", ServiceState::Failed("exited_(status_1)".into())),
            status("c", ServiceState::Waiting),
            status("d", ServiceState::Backoff),
            status("e", ServiceState::Stopped),
            status("f", ServiceState::Done),
            status("g", ServiceState::Starting),
        ];
        let cases = [
            (Request::Status, Reply::Status(statuses)),
            (Request::Status, Reply::Status(vec![])),
            (Request::Stop("a".into()), Reply::Accepted),
            (Request::Reboot, Reply::ShuttingDown(Shutdown::Reboot)),
            (Request::Poweroff, Reply::ShuttingDown(Shutdown::Poweroff)),
        ];
        for (req, reply) in cases {
            let text = render_answer(&Ok(reply.clone()));
            assert_eq!(parse_answer(&req, lines(&text)).unwrap(), reply, "{text}");
        }
        let err = render_answer(&Err(ControlError::NoService("x".into())));
        match parse_answer(&Request::Start("x".into()), lines(&err)) {
            Err(CallError::Refused(reason)) => assert_eq!(reason, "no service `x`"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_client_refuses_what_it_cannot_read() {
        let unexpected = [
            (Request::Status, "a state=ready pid=1 restarts=0\nOK\n"),
            (
                Request::Status,
                "a state=dancing pid=1 restarts=0 ready_ms=-\nOK\n",
            ),
            (
                Request::Status,
                "a state=ready pid=0 restarts=0 ready_ms=-\nOK\n",
            ),
            (
                Request::Status,
                "a state=ready pid=- restarts=0 ready_ms=- x=1\nOK\n",
            ),
            (Request::Start("a".into()), "started\nOK\n"),
            (Request::Reboot, "powering off\nOK\n"),
            (Request::Reboot, "rebooting\nnow\nOK\n"),
            (Request::Reboot, "OK\n"),
        ];
        let mut bad_lines = Vec::new();
        for (req, text) in unexpected {
            match parse_answer(&req, lines(text)) {
                Err(CallError::Unexpected(line)) => bad_lines.push(line),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert_eq!(bad_lines[4..], ["started", "powering off", "now", "OK"]);
        // Only a shutdown may end before its `OK`.
        assert!(matches!(
            parse_answer(
                &Request::Status,
                lines("a state=ready pid=1 restarts=0 ready_ms=0\n")
            ),
            Err(CallError::Truncated)
        ));
        assert_eq!(
            parse_answer(&Request::Reboot, lines("rebooting\n")).unwrap(),
            Reply::ShuttingDown(Shutdown::Reboot)
        );
        assert_eq!(
            parse_answer(&Request::Poweroff, lines("")).unwrap(),
            Reply::ShuttingDown(Shutdown::Poweroff)
        );
    }
}
