//! The command channel's parsers on hostile bytes: a request line, a frame
//! candidate, the scanner over a stream fed in pieces, and the collector.
//! Nothing panics; whatever parses renders back to itself; the scanner
//! finds only frames that parse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcmdchan::{Collector, End, Frame, Request, Scanner};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(r) = Request::parse(text) {
            assert_eq!(Request::parse(&r.render()), Ok(r.clone()));
            let _ = r.resend_which();
        }
    }
    if let Ok(f) = Frame::parse(data) {
        assert_eq!(Frame::parse(f.render().as_bytes()), Ok(f));
    }
    if let Some(e) = End::parse(data) {
        assert_eq!(e.render(), data);
    }
    let mut scanner = Scanner::at(0);
    let mut collector = Collector::new("a1");
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut cut = 0;
    while cut < data.len() {
        cut = (cut + step).min(data.len());
        for f in scanner.scan(&data[..cut]) {
            assert_eq!(Frame::parse(f.render().as_bytes()), Ok(f.clone()));
            collector.accept(&f);
        }
    }
    let _ = collector.progress();
});
