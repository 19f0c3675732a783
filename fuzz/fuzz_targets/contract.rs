//! The contracts qinit and qupdate read at boot: the image info and the
//! kernel command line, and the versions qupdate orders. Any text parses
//! or is refused with an error; an image info that parses renders back to
//! the same value, a command line never yields a slot other than the one
//! it names once, and versions order consistently.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use qcontract::version::Version;
use qcontract::{Cmdline, ImageInfo};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(info) = ImageInfo::parse(Path::new("fuzz"), text) {
        let again = ImageInfo::parse(Path::new("fuzz"), &info.render()).expect("renders parse");
        assert_eq!(again, info);
    }
    // Two versions, split at the first NUL: the order is total and agrees
    // with itself both ways.
    let (a, b) = text.split_once('\0').unwrap_or((text, "0.0.0"));
    if let (Ok(a), Ok(b)) = (Version::parse(a), Version::parse(b)) {
        assert_eq!(a.cmp(&b), b.cmp(&a).reverse());
        assert_eq!(a.cmp(&a), std::cmp::Ordering::Equal);
        assert_eq!(Version::parse(&a.to_string()).ok(), Some(a));
    }
    if let Ok(c) = Cmdline::parse(text) {
        let named: Vec<&str> = text
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("qinit.slot="))
            .collect();
        assert_eq!(named, [c.slot.to_string()]);
    }
});
