//! qimage: composes Debian packages and the workspace's binaries into dom0
//! slot images and a bootable GPT disk.
//!
//! The file tree follows the build: [`profile`] says what goes in, [`apt`]
//! fetches it at the versions [`lock`] pins, [`packages`] and [`elf`] pick
//! files and their libraries, [`kmod`] resolves kernel modules, [`rootfs`] lays out the root tree,
//! [`cpio`] writes the initramfs, [`fsimage`] makes filesystems, [`grub`]
//! the boot loader configuration, and [`pipeline`] runs it all; [`bundle`]
//! signs update bundles of built slots; [`sbom`] lists what the root holds
//! (bill of materials, `qimage size`); [`verify`] rebuilds and compares
//! with a published build; [`kernel`] builds the optional minimal kernel;
//! [`keys`] makes an owner's key set and decides what an image trusts.

pub mod apt;
pub mod archive;
pub mod bundle;
pub mod cpio;
pub mod elf;
pub mod fsimage;
pub mod grub;
pub mod kernel;
pub mod keys;
pub mod kmod;
pub mod lock;
pub mod packages;
pub mod pipeline;
pub mod profile;
pub mod rootfs;
pub mod sbom;
pub mod verify;
