//! The contracts between the programs that build, boot and update the
//! appliance. Each format, name or path that two programs share is
//! defined here once, with one parser and one renderer:
//!
//! | contract | written by | read by |
//! | --- | --- | --- |
//! | [`Slot`] and the [`Partition`] names | qimage (the GPT) | GRUB, qinit stage 1, qupdate |
//! | [`ImageInfo`] (`/etc/qinit/image`, `image.info`) | qimage | qinit, qupdate, qimage bundle/verify |
//! | the kernel command line's `qinit.*` keys ([`Cmdline`]) | qimage (grub.cfg) | qinit, qupdate |
//! | the [`paths`] of qinit's files | qimage, qinit | qinit, qupdate, the test tools |
//! | the kernel [`modules`] load lists | qimage | qinit, qguest |
//! | Qubes [`vm`] names | domain definitions | qdomd, the Qubes daemons |
//! | the system [`accounts`] | qimage (`/etc/passwd`) | qbus, the policy in [`bus`] |
//! | the [`bus`] socket, names and who may use them | qbus, the agents | the agents' clients |
//! | image [`version`]s and their order | profiles, bundles | qimage (checks), qupdate (same-epoch installs) |
//!
//! The root's dm-verity parameters (`root.verity`) are `qverity`'s
//! `VerityInfo` text form, and the GRUB environment is `grubenv`'s; they
//! use the [`Slot`] defined here.
//!
//! Nothing here does I/O except reading the files it names; parsing is
//! strict, and a caller on a security path treats any error as "refuse".

pub mod accounts;
pub mod bus;
pub mod cmdline;
mod image_info;
pub mod modules;
pub mod partition;
pub mod paths;
mod report;
mod slot;
pub mod version;
pub mod vm;

pub use cmdline::{Cmdline, CmdlineError, OnFailure};
pub use image_info::{ImageInfo, InfoError, DEFAULT_MAX_EPOCH_STEP};
pub use partition::Partition;
pub use report::error_chain;
pub use slot::{Slot, SlotError};
