//! A vchan end against a hostile peer: ring orders from the shared page,
//! and index, live and notify bytes the peer rewrites between our calls.
//! Nothing panics or reads outside the rings; impossible indices are
//! errors.
#![no_main]

use std::ptr::NonNull;

use libfuzzer_sys::fuzz_target;
use qvchan::layout::{self, Orders};
use qvchan::ring::{Endpoint, SharedMem};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let _ = Orders::validate(
        u16::from_le_bytes([data[0], data[1]]),
        u16::from_le_bytes([data[2], data[3]]),
    );
    // One page with both rings in it, as a small vchan has.
    let mut page = vec![0u64; layout::PAGE_SIZE / 8];
    // The page must outlive the views below.
    let ptr = NonNull::new(page.as_mut_ptr().cast::<u8>()).expect("vec pointer");
    // SAFETY: `page` outlives every view and is touched only through them.
    let mem = unsafe { SharedMem::new(ptr, layout::PAGE_SIZE) };
    let orders = Orders { left: 10, right: 11 };
    let server_read = mem.slice(1024, 1024);
    let server_write = mem.slice(2048, 2048);
    let mut server = Endpoint::new_server(mem, orders, server_read, server_write);
    let mut buf = vec![0u8; 4096];
    // The peer's moves: each 6 bytes pick a header offset to overwrite with
    // a value, then one of our calls.
    for op in data[4..].chunks(6) {
        if op.len() < 6 {
            break;
        }
        // Any of the six header words: indices, orders, live and notify bytes.
        let off = (usize::from(op[0]) % 6) * 4;
        mem.store_u32(off, u32::from_le_bytes([op[1], op[2], op[3], op[4]]));
        let n = usize::from(op[5]) * 16;
        let r = match op[5] % 3 {
            0 => server.recv(&mut buf[..n.min(4096)]).map(|x| x.0),
            1 => server.send(&buf[..n.min(4096)]).map(|x| x.0),
            _ => server.data_ready(n),
        };
        if let Ok(got) = r {
            assert!(got <= 2048);
        }
        let _ = server.peer_state();
    }
});
