//! The contracts qinit and qupdate read at boot: the image info and the
//! kernel command line. Any text parses or is refused with an error; an
//! image info that parses renders back to the same value, and a command
//! line never yields a slot other than the one it names once.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use qcontract::{Cmdline, ImageInfo};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(info) = ImageInfo::parse(Path::new("fuzz"), text) {
        let again = ImageInfo::parse(Path::new("fuzz"), &info.render()).expect("renders parse");
        assert_eq!(again, info);
    }
    if let Ok(c) = Cmdline::parse(text) {
        let named: Vec<&str> = text
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("qinit.slot="))
            .collect();
        assert_eq!(named, [c.slot.to_string()]);
    }
});
