//! qdomd's domain definitions, shipped and with a local override: any text
//! parses into a domain whose xl configuration can be written, or gets an
//! error naming one of the two files.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The input splits into a shipped file and an override at the first NUL.
    let (shipped, local) = match text.split_once('\0') {
        Some((a, b)) => (a, Some(b)),
        None => (text, None),
    };
    let path = std::path::Path::new("/etc/qdomd/domains/guivm.toml");
    let lpath = std::path::Path::new("/var/lib/qdomd/domains/guivm.toml");
    match qdomd::definition::parse(path, shipped, local.map(|l| (lpath, l))) {
        Ok(d) => {
            let cfg = qdomd::xl::config(&d);
            // One setting per line, each key once: nothing in a definition
            // may smuggle in a second xl setting.
            let mut keys = std::collections::BTreeSet::new();
            for line in cfg.lines() {
                let (k, _) = line.split_once(" = ").expect("a setting per line");
                assert!(k.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{cfg}");
                assert!(keys.insert(k.to_owned()), "{k} twice: {cfg}");
            }
        }
        Err(e) => {
            let s = e.to_string();
            assert!(s.contains("guivm.toml"), "{s}");
        }
    }
});
