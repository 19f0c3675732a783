//! The environment's two copies on the ESP, and which one counts.
//!
//! A single block that is torn or corrupted would leave GRUB without an A/B
//! state (it then boots A, whatever was on trial). So the state is kept
//! twice, each copy whole on its own only if its [`CHECK`](crate::CHECK)
//! agrees with its values:
//! - the GRUB script reads the copies in [`COPIES`] order and uses the
//!   first whole one; when it spends a try it saves the copy it read
//!   first, and boots only if that save worked, then the other copy;
//! - the updater reads the same way ([`pick`]) and writes both, the
//!   primary first, each flushed and read back before the next.
//!
//! A write cut anywhere therefore leaves at least one whole copy: the new
//! state if the primary was finished, else the old one in the secondary.

use crate::{BootState, Env};

/// GRUB's prefix on the ESP: `BOOTX64.EFI` reads `grub.cfg` and the
/// environment's copies from here.
pub const ESP_DIR: &str = "/EFI/BOOT";

/// The copies' file names in [`ESP_DIR`], in the order the script reads
/// them: the primary, then the secondary.
pub const COPIES: [&str; 2] = ["grubenv", "grubenv2"];

/// Copy `copy`'s path on the ESP (`/EFI/BOOT/grubenv`).
pub fn copy_path(copy: usize) -> String {
    format!("{ESP_DIR}/{}", COPIES[copy])
}

/// The copy the boot loader goes by, with its environment and state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Picked {
    /// Index into [`COPIES`].
    pub copy: usize,
    pub env: Env,
    pub state: BootState,
}

/// Neither copy is whole: each one's reason, in [`COPIES`] order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "neither copy of the GRUB environment is whole ({}: {}; {}: {})",
    COPIES[0], reasons[0], COPIES[1], reasons[1]
)]
pub struct NoWholeCopy {
    pub reasons: [String; 2],
}

/// A copy's environment and A/B state, if the copy is whole; else why not.
pub fn whole(block: &[u8]) -> Result<(Env, BootState), String> {
    let env = Env::parse(block).map_err(|e| e.to_string())?;
    let state = BootState::from_env(&env).map_err(|e| e.to_string())?;
    Ok((env, state))
}

/// The first whole copy among `blocks` (each the copy's bytes, or why they
/// could not be read), as GRUB's script picks it.
pub fn pick<B: AsRef<[u8]>>(blocks: [Result<B, String>; 2]) -> Result<Picked, NoWholeCopy> {
    let mut reasons = [String::new(), String::new()];
    for (copy, block) in blocks.into_iter().enumerate() {
        match block.and_then(|b| whole(b.as_ref())) {
            Ok((env, state)) => return Ok(Picked { copy, env, state }),
            Err(why) => reasons[copy] = why,
        }
    }
    Err(NoWholeCopy { reasons })
}
