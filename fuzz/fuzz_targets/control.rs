//! qinit's control socket (`qinit ctl`): any request line parses or is
//! refused, and a parsed request renders back to itself; any answer text
//! is read as a reply or an error, never a panic, and a status reply
//! renders back to the same lines.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qinit::control::{parse_answer, Request};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (first, rest) = text.split_once('\n').unwrap_or((text, ""));
    if let Ok(req) = Request::parse(first) {
        assert_eq!(Request::parse(&req.to_line()).ok(), Some(req.clone()));
        let lines = rest.lines().map(|l| Ok(l.to_owned()));
        if let Ok(reply) = parse_answer(&req, lines) {
            let again = reply.lines();
            let lines = again.iter().cloned().chain(["OK".to_owned()]).map(Ok);
            let back = parse_answer(&req, lines).expect("a rendered reply parses");
            assert_eq!(back.lines(), again);
        }
    }
});
