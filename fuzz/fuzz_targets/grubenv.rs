//! GRUB's environment block and the A/B state in it, as read from the ESP.
//! The input becomes the body of a 1024-byte block (header first, `#`
//! padding after), so the fuzzer explores the variable lines rather than
//! the size check; the raw input is tried as a block too. The block and a
//! whole copy of the initial state go through `pick` as the two copies.
#![no_main]

use libfuzzer_sys::fuzz_target;

fn check(block: &[u8]) {
    if let Ok(env) = grubenv::Env::parse(block) {
        if let Ok(state) = grubenv::BootState::from_env(&env) {
            let mut env = env.clone();
            let _ = state.apply_to(&mut env);
            if let Ok(out) = env.to_block() {
                // What we write must read back to the same variables, and
                // to the same state, check and all.
                assert_eq!(grubenv::Env::parse(&out).ok(), Some(env.clone()));
                assert_eq!(grubenv::BootState::from_env(&env).ok(), Some(state));
            }
        }
    }
    // Two copies: a block that is whole counts first; one that is not
    // gives way to the whole secondary, never an error.
    let mut initial = grubenv::Env::new();
    grubenv::BootState::initial()
        .apply_to(&mut initial)
        .expect("the initial state renders");
    let second = initial.to_block().expect("the initial state fits");
    let picked = grubenv::pick([Ok(block), Ok(&second[..])]).expect("the secondary is whole");
    let first_whole = grubenv::Env::parse(block)
        .ok()
        .and_then(|e| grubenv::BootState::from_env(&e).ok());
    match first_whole {
        Some(state) => assert_eq!((picked.copy, picked.state), (0, state)),
        None => assert_eq!((picked.copy, picked.state), (1, grubenv::BootState::initial())),
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut block = b"# GRUB Environment Block\n".to_vec();
    block.extend_from_slice(&data[..data.len().min(1024 - block.len())]);
    block.resize(1024, b'#');
    check(&block);
});
