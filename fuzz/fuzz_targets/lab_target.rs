//! qlab's lab target files: any text is a valid lab file or an error that
//! names the file; a valid one has a console, commands and timeouts that
//! are usable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qlab::target::lab::{ConsoleSpec, LabConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("lab/fuzz.toml");
    match LabConfig::parse(path, std::path::Path::new("lab"), text) {
        Ok(c) => {
            assert!(!c.name.is_empty() && c.name.len() <= 64);
            assert!(!c.power_on.trim().is_empty() && !c.flash.trim().is_empty());
            assert!(!c.timeouts.boot.is_zero() && !c.flash_timeout.is_zero());
            if let ConsoleSpec::Device { path, .. } = &c.console {
                assert!(path.is_absolute());
            }
        }
        Err(e) => {
            let s = e.to_string();
            assert!(s.starts_with("lab target lab/fuzz.toml: "), "{s}");
        }
    }
});
