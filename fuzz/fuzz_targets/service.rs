//! qinit's inputs from disk: the service definitions
//! (`/etc/qinit/services/*.toml`), where any text either parses into a
//! service or gets an error naming the file, and the random seed on /var
//! (`/var/lib/qinit/random-seed`), where any bytes either are the exact
//! format, rendered back byte for byte, or are refused with a reason.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match qinit::seed::Seed::parse(data) {
        Ok(seed) => assert_eq!(seed.render(), data),
        Err(why) => assert!(!why.is_empty()),
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("/etc/qinit/services/fuzz.toml");
    if let Err(e) = qinit::services::parse(path, text) {
        assert!(e.to_string().contains("fuzz.toml"), "{e}");
    }
});
