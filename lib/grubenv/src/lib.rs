//! The GRUB environment block and the A/B boot state stored in it.
//!
//! Three parties share this contract: the GRUB script from
//! [`grub_script`] reads the state at boot and spends trial boots, the
//! image builder writes the initial block with [`Env::store_new`], and the
//! updater moves the state through [`BootState`]'s transitions and rewrites
//! the block in place with [`Env::store`].
//!
//! Variables: `SLOT_ORDER` (`A B` or `B A`, preferred first), per slot
//! `<X>_OK` (`0` or `1`) and `<X>_TRIES` (one digit, 0..9), and
//! [`CHECK`], which they must agree with. The block is kept in two copies
//! ([`COPIES`]); the first whole one counts.

mod boot;
mod copies;
mod env;
mod error;
mod script;

pub use boot::{BootState, Slot, SlotState, CHECK, MAX_TRIES, SLOT_ORDER};
pub use copies::{copy_path, pick, whole, NoWholeCopy, Picked, COPIES, ESP_DIR};
pub use env::{Env, BLOCK_SIZE, HEADER};
pub use error::Error;
pub use script::grub_script;

#[cfg(test)]
mod tests;
