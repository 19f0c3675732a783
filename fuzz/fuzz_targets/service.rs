//! qinit's service definitions (`/etc/qinit/services/*.toml`): any text
//! either parses into a service or gets an error naming the file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("/etc/qinit/services/fuzz.toml");
    if let Err(e) = qinit::services::parse(path, text) {
        assert!(e.to_string().contains("fuzz.toml"), "{e}");
    }
});
