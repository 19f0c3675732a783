//! qrexec messages from a hostile VM (an agent's control channel) or a
//! hostile data peer: the framer in pieces of a size the input picks, and
//! every payload parser on each message, plus the command-line parser.
//! Nothing panics; what parses renders back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qrexec::cmdline;
use qrexec::framer::Framer;
use qrexec::wire::{
    ExecParams, Header, MsgType, PeerInfo, ServiceConnect, TriggerService3, HEADER_LEN,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(raw) = <[u8; HEADER_LEN]>::try_from(&data[..data.len().min(HEADER_LEN)]) {
        if let Ok(h) = Header::parse(&raw) {
            assert_eq!(h.render(), raw);
        }
    }
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut f = Framer::new(96 + 65000);
    for chunk in data.chunks(step) {
        f.push(chunk);
        loop {
            match f.next_message() {
                Ok(Some((h, payload))) => {
                    let _ = PeerInfo::parse(&payload);
                    if let Ok(p) = ExecParams::parse(h.kind, &payload) {
                        if h.kind != MsgType::ConnectionTerminated || !p.cmdline.is_empty() {
                            assert_eq!(p.render(true), payload);
                        }
                        if let Ok(text) = std::str::from_utf8(&p.cmdline) {
                            let _ = cmdline::parse(text);
                        }
                    }
                    if let Ok(c) = ServiceConnect::parse(&payload) {
                        // What is after the request id's NUL is not kept:
                        // what renders parses back the same.
                        let again = ServiceConnect::parse(&c.message()[HEADER_LEN..]);
                        assert_eq!(again.ok(), Some(c));
                    }
                    if let Ok(t) = TriggerService3::parse(&payload) {
                        let _ = cmdline::valid_service(&t.service_name);
                        let _ = t.message();
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
