//! The control socket: one request line, answer lines, then `OK` or
//! `ERR <reason>`. Root only: the socket is mode 0600 and every peer's
//! credentials are checked. `qinit ctl` is the thin client.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
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

/// Sends one request and returns the answer lines, or the error text.
pub fn call(socket: &Path, req: &Request) -> Result<Vec<String>, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    writeln!(s, "{}", req.to_line()).map_err(|e| e.to_string())?;
    let mut lines = Vec::new();
    for line in BufReader::new(s).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if line == "OK" {
            return Ok(lines);
        }
        if let Some(err) = line.strip_prefix("ERR ") {
            return Err(err.to_owned());
        }
        lines.push(line);
    }
    // reboot/poweroff may close the socket as the system goes down.
    Ok(lines)
}

/// `qinit ctl <command>`: exit code 0 on OK, 1 on an error answer.
pub fn main(args: &[String]) -> i32 {
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
        Ok(lines) => {
            for l in lines {
                println!("{l}");
            }
            0
        }
        Err(e) => {
            eprintln!("qinit ctl: {e}");
            1
        }
    }
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
}
