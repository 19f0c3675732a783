//! `qrexec-client-vm TARGET SERVICE[+ARG]`: a VM's program calls a
//! service, as Qubes' `qrexec-client-vm` does (`agent/qrexec-client-vm.c`,
//! without its local-program mode):
//!
//! 1. it sends `MSG_TRIGGER_SERVICE3` to the agent's trigger socket, with
//!    a `$` in the target read as `@` (`$dispvm` for shells), request id
//!    `SOCKET`;
//! 2. end of file instead of an answer means refused: "Request refused",
//!    exit code 126;
//! 3. otherwise the answer is the data vchan's domain and port, and this
//!    program is that vchan's server (64 KiB rings); stdin goes to the
//!    service, its stdout and stderr come back, and its exit code is ours.
//!
//! The trigger socket stays open for the whole call: its end tells the
//! agent the connection is over.

use std::io::Read;
use std::os::fd::AsFd;
use std::time::Duration;

use qrexec::data::{self, Local, Side};
use qrexec::wire::{ServiceConnect, ServiceParams, TriggerService3, TRIGGER3_TARGET_LEN};
use qvchan::Vchan;

/// How long the service's side may take to connect (it may have to be
/// started first).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the call; returns the process's exit code.
pub fn main(args: &[String]) -> i32 {
    let [target, service] = args else {
        eprintln!("usage: qrexec-client-vm TARGET SERVICE[+ARG]");
        return 2;
    };
    match call(target, service) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qrexec-client-vm: {e}");
            1
        }
    }
}

/// The request as the agent gets it.
fn request(target: &str, service: &str) -> Result<Vec<u8>, String> {
    let target = target.replace('$', "@");
    if target.is_empty() || target.len() >= TRIGGER3_TARGET_LEN || !target.is_ascii() {
        return Err(format!("target {target:?}: 1 to 63 ASCII bytes"));
    }
    if service.is_empty() || service.contains('\0') || !service.is_ascii() {
        return Err(format!("service {service:?}: not a service name"));
    }
    Ok(TriggerService3 {
        target_domain: target,
        request_id: ServiceParams {
            ident: "SOCKET".into(),
        },
        service_name: service.to_owned(),
    }
    .message())
}

fn call(target: &str, service: &str) -> Result<i32, String> {
    let path = qrexec::AGENT_TRIGGER_SOCKET;
    let mut trigger =
        std::os::unix::net::UnixStream::connect(path).map_err(|e| format!("{path}: {e}"))?;
    std::io::Write::write_all(&mut trigger, &request(target, service)?)
        .map_err(|e| format!("{path}: {e}"))?;
    let mut params = [0u8; 8];
    let mut got = 0;
    while got < params.len() {
        match trigger.read(&mut params[got..]) {
            Ok(0) if got == 0 => {
                eprintln!("Request refused");
                return Ok(qrexec::EXIT_REQUEST_REFUSED);
            }
            Ok(0) => return Err(format!("{path}: a short answer")),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{path}: {e}")),
        }
    }
    let (domain, port) = ServiceConnect::parse_params(params);
    let peer = u16::try_from(domain).map_err(|_| format!("peer domain {domain} out of range"))?;
    let chain = |e: &dyn std::error::Error| qcontract::error_chain(e);
    let mut xs = qxenstore::Xs::open().map_err(|e| chain(&e))?;
    let own = xs.own_domid().map_err(|e| chain(&e))?;
    let mut chan = Vchan::server(
        &mut xs,
        own,
        peer,
        port,
        qrexec::DATA_RING,
        qrexec::DATA_RING,
    )
    .map_err(|e| chain(&e))?;
    drop(xs);
    chan.wait_connected(CONNECT_TIMEOUT)
        .map_err(|e| chain(&e))?;
    data::handshake(&mut chan, IO_TIMEOUT).map_err(|e| chain(&e))?;
    let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().map_err(|e| e.to_string());
    let local = Local {
        input: Some(dup(std::io::stdin().as_fd())?),
        input_err: None,
        output: Some(dup(std::io::stdout().as_fd())?),
        output_err: Some(dup(std::io::stderr().as_fd())?),
    };
    let outcome = data::pump(&mut chan, Side::Client, local, &mut || 0).map_err(|e| chain(&e))?;
    drop(trigger);
    match outcome {
        data::Outcome::Exited(code) => Ok(code),
        // Only a service side ends this way.
        data::Outcome::Done => Err("the service ended without an exit code".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_what_the_c_client_sends() {
        let m = request("$adminvm", "admin.vm.List").unwrap();
        assert_eq!(&m[..8], &[0x12, 0x02, 0, 0, 110, 0, 0, 0]);
        assert_eq!(&m[8..16], b"@adminvm");
        assert!(m[16..72].iter().all(|b| *b == 0));
        assert_eq!(&m[72..78], b"SOCKET");
        assert!(m[78..104].iter().all(|b| *b == 0));
        assert_eq!(&m[104..], b"admin.vm.List\0");
        assert!(request(&"a".repeat(64), "x").is_err());
        assert!(request("dom0", "").is_err());
    }
}
