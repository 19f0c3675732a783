//! The command lines qrexec carries (`doc/execution.rst`,
//! `libqrexec/exec.c::parse_qubes_rpc_command`):
//!
//! - to a VM: `USER:[nogui:]QUBESRPC SERVICE[+ARG] SOURCE`, or
//!   `USER:<shell command>`;
//! - `DEFAULT` as the user means the VM's default user; the daemon
//!   substitutes it before the command reaches the agent.
//!
//! and the service-name rules of the policy (`RPCNAME_ALLOWED_CHARSET`).

use crate::wire::{
    MAX_QREXEC_CMD_LEN, MAX_SERVICE_NAME_LEN, NOGUI_CMD_PREFIX, RPC_REQUEST_COMMAND,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    #[error("no `user:` before the command")]
    NoUser,
    #[error("the command line is empty")]
    Empty,
    #[error("the command line is over {MAX_QREXEC_CMD_LEN} bytes")]
    TooLong,
    #[error("service call: {0}")]
    Service(&'static str),
}

/// What a command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Run a command with the user's shell.
    Command {
        user: String,
        nogui: bool,
        command: String,
    },
    /// Call a service.
    Service {
        user: String,
        nogui: bool,
        /// `name+arg` (with a trailing `+` when there is no argument).
        descriptor: String,
        name: String,
        arg: String,
        source: String,
    },
}

/// Parses `USER:...` as an agent does.
pub fn parse(cmdline: &str) -> Result<Request, CmdlineError> {
    if cmdline.len() > MAX_QREXEC_CMD_LEN {
        return Err(CmdlineError::TooLong);
    }
    let (user, rest) = cmdline.split_once(':').ok_or(CmdlineError::NoUser)?;
    let (nogui, rest) = match rest.strip_prefix(NOGUI_CMD_PREFIX) {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let user = user.to_owned();
    let Some(call) = rest
        .strip_prefix(RPC_REQUEST_COMMAND)
        .and_then(|r| r.strip_prefix(' '))
    else {
        if rest.is_empty() {
            return Err(CmdlineError::Empty);
        }
        return Ok(Request::Command {
            user,
            nogui,
            command: rest.to_owned(),
        });
    };
    let (descriptor, source) = call.split_once(' ').unwrap_or((call, ""));
    if descriptor.is_empty() {
        return Err(CmdlineError::Service("empty service descriptor"));
    }
    if descriptor.len() > MAX_SERVICE_NAME_LEN {
        return Err(CmdlineError::Service("service descriptor too long"));
    }
    let (name, arg) = descriptor.split_once('+').unwrap_or((descriptor, ""));
    if name.is_empty() || name.len() > 255 {
        return Err(CmdlineError::Service(
            "service name empty or over 255 bytes",
        ));
    }
    let source = source.split(' ').next().unwrap_or("").to_owned();
    Ok(Request::Service {
        user,
        nogui,
        descriptor: format!("{name}+{arg}"),
        name: name.to_owned(),
        arg: arg.to_owned(),
        source,
    })
}

/// Replaces a leading `DEFAULT:` with `<default_user>:`, as qrexec-daemon
/// does before forwarding.
pub fn substitute_default_user(cmdline: &[u8], default_user: &str) -> Vec<u8> {
    match cmdline.strip_prefix(b"DEFAULT:") {
        Some(rest) => [default_user.as_bytes(), b":", rest].concat(),
        None => cmdline.to_vec(),
    }
}

/// Whether `s` is a service name (or `name+arg`) the policy accepts:
/// `[A-Za-z0-9+-._]`, not empty, not starting with `+`.
pub fn valid_service(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('+')
        && s.len() <= MAX_SERVICE_NAME_LEN
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"+-._".contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_service_calls() {
        assert_eq!(
            parse("user:echo hi").unwrap(),
            Request::Command {
                user: "user".into(),
                nogui: false,
                command: "echo hi".into()
            }
        );
        assert_eq!(
            parse("root:nogui:QUBESRPC qubes.Filecopy+a work").unwrap(),
            Request::Service {
                user: "root".into(),
                nogui: true,
                descriptor: "qubes.Filecopy+a".into(),
                name: "qubes.Filecopy".into(),
                arg: "a".into(),
                source: "work".into(),
            }
        );
        let Request::Service { descriptor, .. } = parse("u:QUBESRPC qubes.VMShell dom0").unwrap()
        else {
            panic!()
        };
        assert_eq!(descriptor, "qubes.VMShell+");
        for bad in ["no-user", "u:", "u:QUBESRPC ", "u:QUBESRPC +arg src"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_user_and_service_names() {
        assert_eq!(substitute_default_user(b"DEFAULT:ls", "user"), b"user:ls");
        assert_eq!(substitute_default_user(b"root:ls", "user"), b"root:ls");
        assert!(valid_service("admin.vm.List"));
        assert!(valid_service("qubes.Filecopy+some-arg_1.x"));
        for bad in ["", "+x", "a b", "a/b", "a\0", "é"] {
            assert!(!valid_service(bad), "{bad:?}");
        }
    }
}
