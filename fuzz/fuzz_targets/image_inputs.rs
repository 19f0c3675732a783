//! qimage's outside inputs: a profile and a published package lock. Any
//! text is one or an error naming the file; a lock that parses renders
//! back to the same lock.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("profiles/fuzz.toml");
    if let Err(e) = qimage::profile::parse(path, text) {
        let s = e.to_string();
        assert!(s.contains("profiles/fuzz.toml"), "{s}");
    }
    let lock_path = std::path::Path::new("fuzz.lock");
    match qimage::lock::Lock::parse(lock_path, text) {
        Ok(lock) => {
            let again = qimage::lock::Lock::parse(lock_path, &lock.render()).expect("renders back");
            assert_eq!(again, lock);
        }
        Err(e) => {
            let s = e.to_string();
            assert!(s.contains("fuzz.lock"), "{s}");
        }
    }
});
