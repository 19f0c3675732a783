//! QubesDB messages from a hostile VM (dom0's side of the vchan) and from
//! a hostile dom0 (the VM side), fed in pieces of a size the input picks.
//! Nothing panics; a header that parses renders back to the same bytes;
//! the database only ever holds paths and values the rules allow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qubesdb::db::Db;
use qubesdb::peer::{Dom0Side, VmSide};
use qubesdb::wire::{Header, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if data.len() >= HEADER_LEN {
        let mut raw = [0u8; HEADER_LEN];
        raw.copy_from_slice(&data[..HEADER_LEN]);
        if let Ok(h) = Header::parse(&raw) {
            assert_eq!(Header::parse(&h.render()), Ok(h));
        }
    }
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut db = Db::new();
    let mut d = Dom0Side::new();
    for chunk in data.chunks(step) {
        if d.input(&mut db, chunk).is_err() {
            break;
        }
    }
    let mut vdb = Db::new();
    let (mut v, _) = VmSide::new();
    for chunk in data.chunks(step) {
        if v.input(&mut vdb, chunk).is_err() {
            break;
        }
    }
    for (p, v) in db.multiread(&qubesdb::wire::QdbPath::new("").expect("empty path")) {
        assert!(p.as_str().starts_with('/') && !p.as_str().ends_with('/'));
        assert!(!v.contains(&0));
    }
});
