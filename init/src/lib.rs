//! qinit: the dom0's PID 1.
//!
//! Stage 1 ([`stage1`]) runs from the initramfs: it mounts the kernel
//! filesystems, loads the early modules ([`modules`]), finds the slot's root
//! by GPT name (`qcontract::partition`), sets up dm-verity with the root
//! hash carried in the initramfs (`verity::VerityInfo`, [`dm`]) and
//! switches root. The kernel command line and the image info are
//! `qcontract`'s. Stage 2
//! ([`stage2`]) mounts what Xen needs and runs the services ([`services`]
//! definitions; [`supervisor`]: a state machine without I/O and the event
//! loop that executes it; [`control`], the control socket's protocol). Logs
//! go to the kernel log ([`kmsg`]); the boot's [`timeline`] (every step and
//! service on the kernel's clock) goes to `/run/qinit/boot.json`.

pub mod confine;
pub mod control;
pub mod dm;
pub mod kmsg;
pub mod modules;
pub mod mounts;
pub mod power;
pub mod seed;
pub mod services;
pub mod stage1;
pub mod stage2;
pub mod supervisor;
pub mod timeline;
