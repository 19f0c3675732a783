//! GRUB's environment block and the A/B state in it, as read from the ESP.
//! The input becomes the body of a 1024-byte block (header first, `#`
//! padding after), so the fuzzer explores the variable lines rather than
//! the size check; the raw input is tried as a block too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fn check(block: &[u8]) {
    if let Ok(env) = grubenv::Env::parse(block) {
        if let Ok(state) = grubenv::BootState::from_env(&env) {
            let mut env = env.clone();
            let _ = state.apply_to(&mut env);
            if let Ok(out) = env.to_block() {
                // What we write must read back to the same variables.
                assert_eq!(grubenv::Env::parse(&out).ok(), Some(env));
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut block = b"# GRUB Environment Block\n".to_vec();
    block.extend_from_slice(&data[..data.len().min(1024 - block.len())]);
    block.resize(1024, b'#');
    check(&block);
});
