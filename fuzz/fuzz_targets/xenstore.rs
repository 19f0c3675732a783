//! Bytes from a hostile xenstore (a guest's xenbus peer is the kernel, but
//! dom0's socket peer is a daemon that guests feed): the stream decoder in
//! pieces of a size the input picks, and every reply parser on each
//! message. Nothing panics; a decoded header renders back to its bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qxenstore::wire::{self, Decoder, Perm, WatchEvent};

fuzz_target!(|data: &[u8]| {
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut d = Decoder::default();
    for chunk in data.chunks(step) {
        d.push(chunk);
        loop {
            match d.next_message() {
                Ok(Some(m)) => {
                    let raw = m.header.render();
                    assert_eq!(wire::Header::parse(&raw), Ok(m.header));
                    assert_eq!(m.payload.len(), m.header.payload_len());
                    let _ = m.kind();
                    let _ = WatchEvent::parse(&m.payload);
                    let _ = wire::error_name(&m.payload);
                    let _ = wire::parse_tx_id(&m.payload);
                    if let Ok(list) = wire::split_strings(&m.payload, "fuzz") {
                        for s in list {
                            if let Ok(p) = Perm::parse(&s) {
                                assert_eq!(Perm::parse(&p.render()), Ok(p));
                            }
                            let _ = wire::check_path(&s);
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
