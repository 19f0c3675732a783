//! The agent's trigger socket, where a VM's programs call services
//! (`qrexec-client-vm`; the C agent's `handle_trigger_io`):
//!
//! - a client sends one `MSG_TRIGGER_SERVICE3` (target, request id
//!   `SOCKET`, service name); the agent takes it only if the type is that
//!   and `96 < len <= 96 + 65000`, as the C agent does, and also parses it
//!   here: a malformed request reaching dom0 would make dom0's daemon cut
//!   the whole VM off, so one local program could not do that to the
//!   others;
//! - the request id is replaced with `SOCKET<n>`, naming this client, and
//!   the request goes to dom0 on the control channel;
//! - dom0's answer names the client: `MSG_SERVICE_REFUSED` closes it (the
//!   caller reads end of file: "Request refused"), `MSG_SERVICE_CONNECT`
//!   hands it the 8 bytes of domain and port of its data vchan
//!   ([`Pending::take`]);
//! - the socket is open to every process of the VM (mode 0666), as in
//!   Qubes: what a call may do is dom0's policy's decision.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qrexec::wire::{
    Header, MsgType, ServiceParams, TriggerService3, HEADER_LEN, MAX_SERVICE_NAME_LEN,
    TRIGGER3_FIXED_LEN,
};

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Calls waiting for dom0's answer at once; more are closed at once.
const MAX_PENDING: usize = 256;
/// Clients still sending their request at once; more are closed at once,
/// so a local program cannot use up the agent's threads.
const MAX_READING: usize = 32;
const IDENT_PREFIX: &str = "SOCKET";

/// The clients whose calls dom0 has not answered yet, by number.
#[derive(Debug, Default)]
pub struct Pending {
    clients: Mutex<HashMap<u32, UnixStream>>,
    next: AtomicU32,
}

impl Pending {
    /// Keeps `stream` and returns the request id that names it.
    fn insert(&self, stream: UnixStream) -> Result<String, String> {
        let mut map = self
            .clients
            .lock()
            .map_err(|_| "pending calls lock poisoned".to_string())?;
        if map.len() >= MAX_PENDING {
            return Err(format!("{MAX_PENDING} calls are waiting already"));
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        map.insert(n, stream);
        Ok(ident(n))
    }

    /// The client a request id of ours names, taken out of the table.
    pub fn take(&self, request_id: &str) -> Option<UnixStream> {
        let n = parse_ident(request_id)?;
        self.clients.lock().ok()?.remove(&n)
    }

    /// Closes every waiting client (the control channel is gone, so no
    /// answer will come).
    pub fn clear(&self) {
        if let Ok(mut map) = self.clients.lock() {
            map.clear();
        }
    }
}

fn ident(n: u32) -> String {
    format!("{IDENT_PREFIX}{n}")
}

fn parse_ident(s: &str) -> Option<u32> {
    let digits = s.strip_prefix(IDENT_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Reads one client's request: the header's checks of the C agent first,
/// then the whole message's.
fn read_request(stream: &mut impl Read) -> Result<TriggerService3, String> {
    let mut raw = [0u8; HEADER_LEN];
    stream
        .read_exact(&mut raw)
        .map_err(|e| format!("reading the header: {e}"))?;
    let h = Header::parse(&raw).map_err(|e| e.to_string())?;
    if h.kind != MsgType::TriggerService3 {
        return Err(format!(
            "{} instead of {}",
            h.kind,
            MsgType::TriggerService3
        ));
    }
    let len = h.len as usize;
    if len <= TRIGGER3_FIXED_LEN || len > TRIGGER3_FIXED_LEN + MAX_SERVICE_NAME_LEN {
        return Err(format!("a request of {len} bytes"));
    }
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .map_err(|e| format!("reading the request: {e}"))?;
    TriggerService3::parse(&body).map_err(|e| e.to_string())
}

/// The request as dom0 gets it: the same, under our request id.
fn forward(req: TriggerService3, request_id: String) -> Vec<u8> {
    TriggerService3 {
        request_id: ServiceParams { ident: request_id },
        ..req
    }
    .message()
}

/// Serves the trigger socket for good: every request becomes a message
/// for `send` (the control channel's queue).
pub fn serve(
    listener: UnixListener,
    pending: Arc<Pending>,
    send: impl Fn(Vec<u8>) + Clone + Send + 'static,
    log: fn(&str),
) {
    let reading = crate::threads::Bounded::new(MAX_READING);
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log(&format!("qrexec: trigger socket: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let (pending, send) = (pending.clone(), send.clone());
        let started = reading.spawn(move || {
            let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
            let req = match read_request(&mut stream) {
                Ok(r) => r,
                // The client is closed, as the C agent closes it.
                Err(e) => return log(&format!("qrexec: a local call dropped: {e}")),
            };
            let _ = stream.set_read_timeout(None);
            match pending.insert(stream) {
                Ok(id) => send(forward(req, id)),
                Err(e) => log(&format!("qrexec: a local call dropped: {e}")),
            }
        });
        if !started {
            log("qrexec: a local call dropped: too many clients sending at once, or no thread");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qrexec::wire::message;

    fn request(target: &str, svc: &str) -> Vec<u8> {
        TriggerService3 {
            target_domain: target.into(),
            request_id: ServiceParams {
                ident: "SOCKET".into(),
            },
            service_name: svc.into(),
        }
        .message()
    }

    #[test]
    fn requests_are_checked_and_renamed() {
        let r = read_request(&mut &request("dom0", "admin.vm.List")[..]).unwrap();
        let out = forward(r, ident(7));
        assert_eq!(out, {
            let mut m = request("dom0", "admin.vm.List");
            m[HEADER_LEN + 64..HEADER_LEN + 70].copy_from_slice(b"SOCKET");
            m[HEADER_LEN + 70] = b'7';
            m
        });
        // Everything after the id's NUL is zero, as dom0 requires.
        assert!(out[HEADER_LEN + 71..HEADER_LEN + 96]
            .iter()
            .all(|b| *b == 0));
        assert_eq!(parse_ident("SOCKET7"), Some(7));
        for bad in ["SOCKET", "SOCKET-1", "SOCKETx", "OTHER7"] {
            assert_eq!(parse_ident(bad), None, "{bad}");
        }
    }

    #[test]
    fn malformed_requests_go_no_further() {
        // Wrong type, too short, too long, a name without its NUL.
        let mut wrong = request("dom0", "x");
        wrong[0] = 0x10;
        let short = message(MsgType::TriggerService3, &[0u8; 96]);
        let mut long = message(MsgType::TriggerService3, &[]);
        long[4..8].copy_from_slice(&(96u32 + 65001).to_le_bytes());
        let mut unterminated = request("dom0", "abc");
        let last = unterminated.len() - 1;
        unterminated[last] = b'd';
        for m in [wrong, short, long, unterminated] {
            assert!(read_request(&mut &m[..]).is_err());
        }
    }

    #[test]
    fn pending_calls_are_bounded_and_taken_once() {
        let p = Pending::default();
        let (a, _b) = UnixStream::pair().unwrap();
        let id = p.insert(a).unwrap();
        assert!(p.take(&id).is_some());
        assert!(p.take(&id).is_none());
        let mut keep = Vec::new();
        for _ in 0..MAX_PENDING {
            let (a, b) = UnixStream::pair().unwrap();
            p.insert(a).unwrap();
            keep.push(b);
        }
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(p.insert(a).is_err());
        p.clear();
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(p.insert(a).is_ok());
    }
}
