//! Paths that more than one program uses: qimage writes them into the
//! image, qinit and the agents read them, the build tools find a build's
//! outputs by them.

/// The image's identity ([`crate::ImageInfo`]), in both the initramfs and
/// the root.
pub const IMAGE_INFO: &str = "/etc/qinit/image";
/// The root's dm-verity parameters (qverity's `VerityInfo` text form),
/// in the initramfs, which is part of the verified slot.
pub const ROOT_VERITY: &str = "/etc/qinit/root.verity";
/// The early modules' load list, in the initramfs.
pub const EARLY_MODULES: &str = "/etc/qinit/modules.early";
/// The dom0 modules' load list, in the root.
pub const DOM0_MODULES: &str = "/etc/qinit/modules.dom0";
/// The guest stand-ins' modules' load list, in their initramfs (qguest
/// loads it before it opens the Xen devices).
pub const GUEST_MODULES: &str = "/etc/qguest/modules";
/// qinit's service files, in the root.
pub const SERVICE_DIR: &str = "/etc/qinit/services";
/// qinit's control socket (`qinit ctl`).
pub const CONTROL_SOCKET: &str = "/run/qinit/control";
/// Where services find their readiness sockets.
pub const NOTIFY_DIR: &str = "/run/qinit/notify";
/// Stage 1's steps, left in the new root's /run for stage 2.
pub const STAGE1_TIMELINE: &str = "/run/qinit/stage1.json";
/// The boot's timeline, written at `QINIT-READY` (`qinit ctl analyze`).
pub const BOOT_TIMELINE: &str = "/run/qinit/boot.json";

/// The files of a build's output directory (`target/images/<profile>/`),
/// which qimage writes and `qimage bundle`, `qimage verify`, xtask and the
/// test lab read.
pub mod output {
    /// The whole disk: GPT, ESP, slot A, an empty slot B and /var.
    pub const DISK_IMAGE: &str = "disk.img";
    /// A slot's boot partition image.
    pub const BOOT_IMAGE: &str = "boot.img";
    /// A slot's root partition image: squashfs and its verity tree.
    pub const ROOT_IMAGE: &str = "root.img";
    /// `root.img`'s verity parameters, the same text as
    /// [`super::ROOT_VERITY`].
    pub const ROOT_VERITY: &str = "root.verity";
    /// A copy of the image's [`super::IMAGE_INFO`].
    pub const IMAGE_INFO: &str = "image.info";
    /// A copy of the slot's initramfs (also inside `boot.img`).
    pub const INITRD: &str = "initrd.gz";
    /// The exact packages of the build (qimage's lock format).
    pub const PACKAGES_LOCK: &str = "packages.lock";
    /// The root's software bill of materials (CycloneDX JSON).
    pub const SBOM: &str = "sbom.cdx.json";
    /// Every file of the root with its size, mode and origin.
    pub const ROOT_FILES: &str = "root.files.tsv";
    /// The sizes of the artifacts, the root hash and the kernel version.
    pub const SUMMARY: &str = "summary.txt";
    /// How a signed update bundle's file name ends.
    pub const BUNDLE_SUFFIX: &str = ".bundle";

    /// The update bundle of image `name` at `version`.
    pub fn bundle_file(name: &str, version: &str) -> String {
        format!("{name}-{version}{BUNDLE_SUFFIX}")
    }
}
