//! The `root.verity` file `qimage bundle` reads next to a built slot: any
//! text parses or is refused, and what parses writes back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(info) = verity::VerityInfo::from_text(text) {
        assert_eq!(verity::VerityInfo::from_text(&info.to_text()).ok(), Some(info));
    }
});
