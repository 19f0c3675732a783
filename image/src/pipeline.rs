//! The whole build of one profile: packages → root tree → verity root →
//! initramfs → boot partition → ESP → GPT disk.
//!
//! Everything is written into a temporary directory beside the output and
//! renamed into place at the end, so a failed build never leaves a partial
//! image where a good one is expected.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
// File names inside the output directory and the image are the contract
// crate's: xtask, the lab, qinit and qupdate use the same ones.
use qcontract::paths::output::{self, BOOT_IMAGE, DISK_IMAGE, ROOT_IMAGE};
use qcontract::paths::{DOM0_MODULES, EARLY_MODULES, GUEST_MODULES, IMAGE_INFO, ROOT_VERITY};
use qcontract::{ImageInfo, Partition, Slot};
use sha2::{Digest, Sha256};

use crate::apt::PrivateApt;
use crate::cpio::CpioWriter;
use crate::elf;
use crate::fsimage;
use crate::grub;
use crate::kmod::{self, KernelModules, Module};
use crate::lock::{self, Lock, Pin, Resolver, Wanted};
use crate::packages::{PackageSet, Unpacked};
use crate::profile::{self, Profile};
use crate::rootfs::RootTree;

/// Inputs of a build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub profile: PathBuf,
    /// Repository root; profile paths are relative to it.
    pub source_dir: PathBuf,
    /// Final output directory (`target/images/<profile>`).
    pub out_dir: PathBuf,
    /// Package cache shared between builds (`~/.cache/qubes-dom0`).
    pub cache_dir: PathBuf,
    /// Where the workspace's static binaries are.
    pub bin_dir: PathBuf,
    /// Fixed timestamp for every file and filesystem.
    pub epoch: u64,
    /// Refresh apt's package lists.
    pub refresh: bool,
    /// Use this directory as the root filesystem instead of composing one
    /// (for benchmarks against a stock Debian root).
    pub root_tree: Option<PathBuf>,
    /// Build from exactly this lock (`--lock`); every package must be in it.
    pub lock: Option<PathBuf>,
    /// Record the build's lock in the cache for the next build (not when
    /// verifying someone else's lock).
    pub update_cache_lock: bool,
    /// Scratch directory (default `<cache>/work/<profile>`).
    pub work_dir: Option<PathBuf>,
    /// The owner's key set (`qimage keys init`): what a production image
    /// trusts. Test profiles do not use it.
    pub owner_keys: Option<PathBuf>,
}

/// What a build produced.
#[derive(Debug)]
pub struct BuildOutput {
    pub profile: Profile,
    pub artifacts: Vec<(String, u64)>,
    pub root_hash: String,
    pub kernel_version: String,
}

pub fn build(opts: &BuildOptions) -> Result<BuildOutput> {
    let profile = profile::load(&opts.profile)?;
    build_profile(opts, profile).with_context(|| format!("profile {}", opts.profile.display()))
}

/// The build's output directory while it is being written: beside the
/// final one, renamed into place by [`commit`](Staging::commit), removed if
/// the build fails first.
struct Staging {
    dir: PathBuf,
    committed: bool,
}

impl Staging {
    fn new(out_dir: &Path, name: &str) -> Result<Self> {
        let dir = out_dir.with_file_name(format!(".{name}.partial"));
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            dir,
            committed: false,
        })
    }

    /// Replaces `out_dir` with the staged build.
    fn commit(mut self, out_dir: &Path) -> Result<()> {
        if out_dir.exists() {
            fs::remove_dir_all(out_dir)
                .with_context(|| format!("removing old {}", out_dir.display()))?;
        }
        fs::rename(&self.dir, out_dir)
            .with_context(|| format!("moving the build into {}", out_dir.display()))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                log::warn!("leaving partial build {}: {e}", self.dir.display());
            }
        }
    }
}

/// The lock this build follows: `--lock` (strict), else the cache's lock
/// of the profile unless `--refresh`, else none.
fn select_pin(opts: &BuildOptions, profile: &Profile) -> Result<Option<Pin>> {
    let name = &profile.image.name;
    let pin = match &opts.lock {
        Some(path) => Some(Pin {
            lock: Lock::read(path)?,
            path: path.clone(),
            strict: true,
        }),
        None if opts.refresh => None,
        None => {
            let path = lock::cache_lock_path(&opts.cache_dir, name);
            if path.exists() {
                Some(Pin {
                    lock: Lock::read(&path)?,
                    path,
                    strict: false,
                })
            } else {
                None
            }
        }
    };
    if let Some(p) = &pin {
        p.check_suite(&profile.debian.suite)?;
        if p.lock.profile != *name {
            log::warn!(
                "lock {} was written for profile `{}`, building `{name}`",
                p.path.display(),
                p.lock.profile
            );
        }
        log::info!("following lock {}", p.path.display());
    }
    Ok(pin)
}

/// Every package the build fetches, with the profile field naming it.
fn wanted_packages(profile: &Profile, kernel_package: &str) -> Vec<Wanted> {
    let mut wanted: Vec<Wanted> = profile
        .debian
        .packages
        .iter()
        .enumerate()
        .map(|(i, n)| Wanted {
            name: n.clone(),
            field: format!("debian.packages[{i}]"),
        })
        .collect();
    for (name, field) in [
        (kernel_package, "boot.kernel_package (resolved)"),
        (profile.boot.xen.package.as_str(), "boot.xen.package"),
        (profile.boot.grub_package.as_str(), "boot.grub_package"),
    ] {
        if !wanted.iter().any(|w| w.name == name) {
            wanted.push(Wanted {
                name: name.to_owned(),
                field: field.to_owned(),
            });
        }
    }
    wanted
}

/// The build, stage by stage: each stage takes what the earlier ones
/// made and returns its own typed artifact; nothing reaches the output
/// directory but through the staging directory, which only [`publish`]
/// commits.
fn build_profile(opts: &BuildOptions, profile: Profile) -> Result<BuildOutput> {
    let name = profile.image.name.clone();
    let stage = Staging::new(&opts.out_dir, &name)?;
    let work = opts
        .work_dir
        .clone()
        .unwrap_or_else(|| opts.cache_dir.join("work").join(&name));
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let ids = Ids::new(&profile);
    // Before anything is fetched: a production build without the owner's
    // keys, or with one of the repository's, stops here.
    let owner = opts
        .owner_keys
        .as_deref()
        .map(crate::keys::OwnerKeys::open)
        .transpose()?;
    let trust = crate::keys::custody(&profile, &opts.source_dir, owner.as_ref())?;

    let packages = fetch(opts, &profile)?;
    let kernel = kernel(opts, &profile, &packages)?;
    let info = image_info(&profile, &kernel.version, opts.epoch)?.render();
    let root = root_tree(opts, &profile, &trust, &packages, &kernel, &info, &work)?;
    let verity = verity_root(opts, &profile, &ids, &root, &stage.dir)?;
    let initrd = initramfs(opts, &kernel, &verity, &info, &work)?;
    let parts = partitions(
        opts, &profile, &ids, &packages, &kernel, &initrd, &work, &stage.dir,
    )?;
    let disk = stage.dir.join(DISK_IMAGE);
    assemble_disk(
        &disk,
        &profile,
        &ids,
        &parts.esp,
        &parts.boot,
        &verity.image,
        &parts.data,
    )?;
    publish(
        opts, profile, &trust, stage, packages, kernel, root, verity, &initrd, &parts, &info,
    )
}

/// Stage 1: the packages, fetched and unpacked, following the lock.
struct Packages {
    set: PackageSet,
    /// The versioned kernel image package the metapackage resolved to.
    kernel_package: String,
    /// The lock followed, if any, and the one this build makes.
    pin: Option<Pin>,
    lock: Lock,
}

fn fetch(opts: &BuildOptions, profile: &Profile) -> Result<Packages> {
    let apt = PrivateApt::new(&opts.cache_dir, &profile.debian)?;
    apt.update(opts.refresh)?;
    let pin = select_pin(opts, profile)?;
    let resolver = Resolver::new(&apt, pin.as_ref());
    let kernel_pin = resolver.kernel(&profile.boot.kernel_package)?;
    let kernel_package = kernel_pin.package.clone();
    let fetched = resolver.fetch(&wanted_packages(profile, &kernel_package))?;
    let lock = Lock::new(
        &profile.image.name,
        &profile.debian.suite,
        kernel_pin,
        &fetched,
    );
    let mut unpacked = Vec::new();
    for f in &fetched {
        unpacked.push(Unpacked {
            name: f.info.name.clone(),
            version: f.info.version.clone(),
            sha256: f.info.sha256.clone(),
            root: apt.extract(f)?,
        });
    }
    Ok(Packages {
        set: PackageSet::new(unpacked),
        kernel_package,
        pin,
        lock,
    })
}

/// Stage 2: the kernel and the modules each part of the system loads.
struct Kernel {
    package: String,
    version: String,
    vmlinuz: PathBuf,
    /// Stage 1 (initramfs).
    early: Vec<Module>,
    /// Stage 2 (the root).
    dom0: Vec<Module>,
    /// The guest stand-in, from its own initramfs.
    guest: Vec<Module>,
}

fn kernel(opts: &BuildOptions, profile: &Profile, packages: &Packages) -> Result<Kernel> {
    let package = packages.kernel_package.clone();
    let kernel_root = packages
        .set
        .packages()
        .iter()
        .find(|p| p.name == package)
        .map(|p| p.root.clone())
        .context("kernel package vanished")?;
    let version = single_subdir(&kernel_root.join("usr/lib/modules"))
        .with_context(|| format!("{package}: finding the module directory"))?;
    let vmlinuz = kernel_root.join(format!("boot/vmlinuz-{version}"));
    let kmods = KernelModules::open(&kernel_root.join("usr/lib/modules").join(&version))?;
    let early = resolve_modules(
        &kmods,
        &opts.source_dir,
        &profile.modules.early,
        &BTreeSet::new(),
    )?;
    let early_names: BTreeSet<String> = early.iter().map(|m| m.name.clone()).collect();
    let dom0 = resolve_modules(
        &kmods,
        &opts.source_dir,
        &profile.modules.dom0,
        &early_names,
    )?;
    let guest = match &profile.guivm {
        Some(g) => resolve_modules(&kmods, &opts.source_dir, &g.modules, &BTreeSet::new())?,
        None => Vec::new(),
    };
    Ok(Kernel {
        package,
        version,
        vmlinuz,
        early,
        dom0,
        guest,
    })
}

/// Stage 3: the root tree, composed from the profile or taken as given
/// (benchmarks against a stock Debian root).
struct Root {
    dir: PathBuf,
    /// The composed root's inventory and bill of materials (none for a
    /// given tree).
    composed: Option<Composed>,
}

impl Root {
    fn uncompressed(&self) -> Option<u64> {
        self.composed
            .as_ref()
            .map(|c| c.files.iter().map(|f| f.size).sum())
    }
}

#[allow(clippy::too_many_arguments)]
fn root_tree(
    opts: &BuildOptions,
    profile: &Profile,
    trust: &crate::keys::Trust,
    packages: &Packages,
    kernel: &Kernel,
    info: &str,
    work: &Path,
) -> Result<Root> {
    if let Some(dir) = &opts.root_tree {
        return Ok(Root {
            dir: dir.clone(),
            composed: None,
        });
    }
    let dir = work.join("rootfs");
    let files = KernelFiles {
        package: &kernel.package,
        version: &kernel.version,
        vmlinuz: &kernel.vmlinuz,
        dom0_modules: &kernel.dom0,
        guest_modules: &kernel.guest,
    };
    let composed = compose_root(&dir, profile, trust, &packages.set, opts, &files, info)?;
    Ok(Root {
        dir,
        composed: Some(composed),
    })
}

/// Stage 4: the root image with its verity tree, within the budget and
/// the partition.
struct VerityRoot {
    image: PathBuf,
    squashfs_size: u64,
    info: verity::VerityInfo,
}

fn verity_root(
    opts: &BuildOptions,
    profile: &Profile,
    ids: &Ids,
    root: &Root,
    staging: &Path,
) -> Result<VerityRoot> {
    let image = staging.join(ROOT_IMAGE);
    fsimage::squashfs(&root.dir, &image, opts.epoch)?;
    let squashfs_size = fs::metadata(&image)?.len();
    let params = verity::VerityParams::new(ids.verity_salt.to_vec(), ids.verity_uuid)?;
    let info = verity::append_tree(&image, &params)?;
    check_budget(profile, squashfs_size, root.uncompressed())?;
    let size = fs::metadata(&image)?.len();
    let cap = profile.disk.root_mib << 20;
    if size > cap {
        return Err(fsimage::FsImageError::TooBig {
            image,
            used: size,
            capacity: cap,
        })
        .context("profile field disk.root_mib is too small");
    }
    Ok(VerityRoot {
        image,
        squashfs_size,
        info,
    })
}

/// Stage 5: the initramfs (qinit, the early modules, the root's verity
/// parameters in the same text as `root.verity`, the image info).
fn initramfs(
    opts: &BuildOptions,
    kernel: &Kernel,
    verity: &VerityRoot,
    info: &str,
    work: &Path,
) -> Result<PathBuf> {
    let initrd = work.join(output::INITRD);
    let qinit = opts.bin_dir.join("qinit");
    let qinit_bytes = fs::read(&qinit)
        .with_context(|| format!("reading {} (build qinit first)", qinit.display()))?;
    write_initramfs(
        &initrd,
        opts.epoch,
        &qinit_bytes,
        &kernel.version,
        &kernel.early,
        &verity.info.to_text(),
        info,
    )?;
    Ok(initrd)
}

/// Stage 6: the partition images besides the root.
struct Partitions {
    /// The slot's boot partition (Xen, kernel, initramfs, its GRUB part),
    /// in the staging directory: bundles carry it.
    boot: PathBuf,
    esp: PathBuf,
    data: PathBuf,
}

#[allow(clippy::too_many_arguments)]
fn partitions(
    opts: &BuildOptions,
    profile: &Profile,
    ids: &Ids,
    packages: &Packages,
    kernel: &Kernel,
    initrd: &Path,
    work: &Path,
    staging: &Path,
) -> Result<Partitions> {
    // Boot partition.
    let xen = packages.set.locate_in(
        &profile.boot.xen.package,
        &profile.boot.xen.path,
        "boot.xen.path",
    )?;
    let xen_cmdline_path = opts.source_dir.join(&profile.boot.xen_cmdline);
    let xen_cmdline = fs::read_to_string(&xen_cmdline_path)
        .with_context(|| format!("reading boot.xen_cmdline {}", xen_cmdline_path.display()))?;
    let xen_cmdline = one_line(&xen_cmdline)
        .with_context(|| format!("boot.xen_cmdline {}", xen_cmdline_path.display()))?;
    let boot_cfg = work.join("boot.cfg");
    fs::write(
        &boot_cfg,
        grub::slot_config(
            &profile.image.version,
            &xen_cmdline,
            &profile.boot.kernel_cmdline,
        ),
    )?;
    let boot = staging.join(BOOT_IMAGE);
    fsimage::fat(
        &boot,
        profile.disk.boot_mib,
        "BOOT",
        ids.boot_volid,
        &[
            ("/xen.gz".into(), xen.host_path.clone()),
            ("/vmlinuz".into(), kernel.vmlinuz.clone()),
            ("/initrd.gz".into(), initrd.to_owned()),
            ("/boot.cfg".into(), boot_cfg),
        ],
        opts.epoch,
    )?;

    // ESP.
    let grub_root = packages
        .set
        .packages()
        .iter()
        .find(|p| p.name == profile.boot.grub_package)
        .map(|p| p.root.join("usr/lib/grub/x86_64-efi"))
        .context("grub package vanished")?;
    let efi = work.join("BOOTX64.EFI");
    grub::make_efi(&grub_root, &profile.boot.grub_modules, &efi)?;
    let grub_cfg = work.join("grub.cfg");
    fs::write(&grub_cfg, grub::esp_config(profile.boot.grub_timeout))?;
    let grubenv_path = work.join("grubenv");
    let mut env = grubenv::Env::new();
    grubenv::BootState::initial().apply_to(&mut env)?;
    if grubenv_path.exists() {
        fs::remove_file(&grubenv_path)?;
    }
    env.store_new(&grubenv_path)?;
    // Both copies of the environment start the same (lib/grubenv).
    let mut esp_files = vec![
        (format!("{}/BOOTX64.EFI", grub::ESP_DIR), efi),
        (format!("{}/grub.cfg", grub::ESP_DIR), grub_cfg),
    ];
    for copy in 0..grubenv::COPIES.len() {
        esp_files.push((grubenv::copy_path(copy), grubenv_path.clone()));
    }
    let esp = work.join("esp.img");
    fsimage::fat(
        &esp,
        profile.disk.esp_mib,
        "ESP",
        ids.esp_volid,
        &esp_files,
        opts.epoch,
    )?;

    // Data partition: the directories the services expect on /var.
    let data_tree = work.join("data");
    if data_tree.exists() {
        fs::remove_dir_all(&data_tree)?;
    }
    for d in [
        "lib/xen",
        "lib/xenstored",
        "log/xen",
        "log/xen/console",
        "lib/qupdate",
        "lib/qdomd/domains",
    ] {
        fs::create_dir_all(data_tree.join(d))?;
    }
    let data = work.join("data.img");
    fsimage::ext4(
        &data,
        profile.disk.data_mib,
        "data",
        &ids.data_uuid,
        &data_tree,
        opts.epoch,
    )?;
    Ok(Partitions { boot, esp, data })
}

/// Stage 8: the rest of the output files, the signed bundle, the summary;
/// then the staging directory replaces the output directory, and the
/// cache's lock is updated.
#[allow(clippy::too_many_arguments)]
fn publish(
    opts: &BuildOptions,
    profile: Profile,
    trust: &crate::keys::Trust,
    stage: Staging,
    packages: Packages,
    kernel: Kernel,
    root: Root,
    verity: VerityRoot,
    initrd: &Path,
    parts: &Partitions,
    info: &str,
) -> Result<BuildOutput> {
    let staging = stage.dir.clone();
    fs::write(staging.join(output::PACKAGES_LOCK), packages.lock.render())?;
    if let Some(c) = &root.composed {
        fs::write(
            staging.join(output::ROOT_FILES),
            crate::sbom::files_tsv(&c.files),
        )?;
        fs::write(staging.join(output::SBOM), &c.sbom)?;
    }
    fs::copy(initrd, staging.join(output::INITRD))?;
    // What `qimage bundle` needs to sign this slot later.
    fs::write(staging.join(output::ROOT_VERITY), verity.info.to_text())?;
    fs::write(staging.join(output::IMAGE_INFO), info)?;
    if !trust.signing_keys.is_empty() {
        let name = output::bundle_file(&profile.image.name, &profile.image.version);
        let keys = &trust.signing_keys;
        crate::bundle::write_signed(
            &staging.join(&name),
            &crate::bundle::Release {
                compatible: profile.image.compatible.clone(),
                version: profile.image.version.clone(),
                security_epoch: profile.update.security_epoch,
                build_id: opts.epoch.to_string(),
            },
            &parts.boot,
            &verity.image,
            &verity.info,
            keys,
        )?;
    }
    let mut artifacts = Vec::new();
    let mut names: Vec<String> = [DISK_IMAGE, BOOT_IMAGE, ROOT_IMAGE, output::INITRD]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    for e in fs::read_dir(&staging)?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.ends_with(output::BUNDLE_SUFFIX) {
            names.push(n);
        }
    }
    for f in names {
        let len = fs::metadata(staging.join(&f))?.len();
        artifacts.push((f, len));
    }
    artifacts.push(("root.squashfs (in root.img)".into(), verity.squashfs_size));
    let summary: String = artifacts
        .iter()
        .map(|(n, s)| format!("{n}\t{s}\n"))
        .collect::<String>()
        + &format!(
            "root_hash\t{}\nkernel\t{}\n",
            verity.info.root_hash_hex(),
            kernel.version
        );
    fs::write(staging.join(output::SUMMARY), summary)?;

    stage.commit(&opts.out_dir)?;
    if opts.update_cache_lock {
        let path = lock::cache_lock_path(&opts.cache_dir, &profile.image.name);
        if let Some(old) = packages.pin.as_ref().filter(|p| p.path == path) {
            for change in lock::changes(&old.lock, &packages.lock) {
                log::info!("lock: {change}");
            }
        }
        packages.lock.write(&path)?;
    }
    Ok(BuildOutput {
        profile,
        artifacts,
        root_hash: verity.info.root_hash_hex(),
        kernel_version: kernel.version,
    })
}

/// The GUI VM stand-in's kernel (dom0's own) and initramfs (the agent as
/// `/init`, nothing else) into `g.dir`.
fn add_guivm(
    tree: &mut RootTree,
    g: &crate::profile::GuiVmSection,
    opts: &BuildOptions,
    kernel: &KernelFiles<'_>,
) -> Result<()> {
    let KernelFiles {
        package: kernel_package,
        version: kver,
        vmlinuz,
        guest_modules,
        ..
    } = *kernel;
    let field = "profile guivm.dir";
    if !g.dir.starts_with('/') {
        bail!("{field}: `{}` must be an absolute path", g.dir);
    }
    let kernel = fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    tree.write(
        &format!("{}/vmlinuz", g.dir),
        0o644,
        &kernel,
        &format!("package {kernel_package}"),
    )?;
    let agent_path = opts.bin_dir.join(&g.agent);
    let agent = fs::read(&agent_path).with_context(|| {
        format!(
            "profile guivm.agent: reading {} (build it first)",
            agent_path.display()
        )
    })?;
    let mtime =
        u32::try_from(opts.epoch).context("SOURCE_DATE_EPOCH does not fit cpio's 32-bit mtime")?;
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    let mut w = CpioWriter::new(gz, mtime);
    for d in [
        "dev",
        "proc",
        "sys",
        "sbin",
        "etc",
        "usr",
        "usr/lib",
        "usr/lib/modules",
    ] {
        w.dir(d, 0o755)?;
    }
    w.dir("tmp", 0o1777)?;
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.file("init", 0o755, &agent)?;
    w.symlink("sbin/poweroff", "/init")?;
    w.dir("etc/qguest", 0o755)?;
    cpio_modules(&mut w, kver, guest_modules, GUEST_MODULES)?;
    let mut made: BTreeSet<String> = BTreeSet::new();
    let mut parents = |w: &mut CpioWriter<_>, path: &str| -> Result<()> {
        let mut acc = String::new();
        let dirs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        for d in &dirs[..dirs.len().saturating_sub(1)] {
            acc = if acc.is_empty() {
                (*d).to_owned()
            } else {
                format!("{acc}/{d}")
            };
            if !["sbin", "etc", "usr", "usr/lib", "usr/lib/modules"].contains(&acc.as_str())
                && made.insert(acc.clone())
            {
                w.dir(&acc, 0o755)?;
            }
        }
        Ok(())
    };
    for (i, t) in g.tools.iter().enumerate() {
        let field = format!("profile guivm.tools[{i}]");
        if !t.starts_with('/') || t.contains("..") {
            bail!("{field}: `{t}` must be an absolute path");
        }
        let src = tree.dir().join(t.trim_start_matches('/'));
        let bytes = fs::read(&src)
            .with_context(|| format!("{field}: reading {} from the root", src.display()))?;
        parents(&mut w, t)?;
        w.file(t.trim_start_matches('/'), 0o755, &bytes)?;
    }
    for (dest, src) in &g.files {
        let field = format!("profile guivm.files.\"{dest}\"");
        if !dest.starts_with('/') || dest.contains("..") {
            bail!("{field}: `{dest}` must be an absolute path");
        }
        let from = opts.source_dir.join(src);
        let bytes =
            fs::read(&from).with_context(|| format!("{field}: reading {}", from.display()))?;
        let meta = fs::metadata(&from).with_context(|| format!("{field}: {}", from.display()))?;
        let mode = if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 != 0 {
            0o755
        } else {
            0o644
        };
        parents(&mut w, dest)?;
        w.file(dest.trim_start_matches('/'), mode, &bytes)?;
    }
    for (link, target) in &g.links {
        if !link.starts_with('/') || link.contains("..") {
            bail!("profile guivm.links: `{link}` must be an absolute path");
        }
        parents(&mut w, link)?;
        w.symlink(link.trim_start_matches('/'), target)?;
    }
    let initrd = w.finish()?.finish()?;
    tree.write(&format!("{}/initrd.gz", g.dir), 0o644, &initrd, "workspace")?;
    Ok(())
}

/// The kernel's pieces the root needs.
#[derive(Clone, Copy)]
struct KernelFiles<'a> {
    /// The versioned kernel image package.
    package: &'a str,
    version: &'a str,
    vmlinuz: &'a Path,
    /// Modules stage 2 loads.
    dom0_modules: &'a [Module],
    /// Modules the guest stand-in loads.
    guest_modules: &'a [Module],
}

/// The profile's size budget: a root over it fails the build.
fn check_budget(profile: &Profile, compressed: u64, uncompressed: Option<u64>) -> Result<()> {
    let b = &profile.budget;
    let over = |field: &str, limit_mib: u64, actual: u64, what: &str| {
        anyhow::anyhow!(
            "profile {}: budget.{field} = {limit_mib} MiB, but {what} is {:.1} MiB \
             (`qimage size --image-dir ...` shows what takes the space)",
            profile.image.name,
            actual as f64 / 1_048_576.0
        )
    };
    if let Some(limit) = b.root_compressed_mib {
        if compressed > limit << 20 {
            return Err(over(
                "root_compressed_mib",
                limit,
                compressed,
                "root.squashfs",
            ));
        }
    }
    if let (Some(limit), Some(actual)) = (b.root_uncompressed_mib, uncompressed) {
        if actual > limit << 20 {
            return Err(over(
                "root_uncompressed_mib",
                limit,
                actual,
                "the root's files",
            ));
        }
    }
    Ok(())
}

/// What the composed root holds: its inventory and bill of materials.
struct Composed {
    files: Vec<crate::sbom::FileEntry>,
    sbom: String,
}

/// Lays out the root tree the profile describes.
fn compose_root(
    tree_dir: &Path,
    profile: &Profile,
    trust: &crate::keys::Trust,
    set: &PackageSet,
    opts: &BuildOptions,
    kernel: &KernelFiles<'_>,
    info: &str,
) -> Result<Composed> {
    let KernelFiles {
        version: kver,
        dom0_modules: dom0,
        ..
    } = *kernel;
    let mut tree = RootTree::create(tree_dir)?;
    let mut roots = Vec::new();
    for (i, f) in profile.root.files.iter().enumerate() {
        roots.push(set.locate(f, &format!("root.files[{i}]"))?);
    }
    for located in elf::closure(set, &roots)?.values() {
        tree.add_located(located)?;
    }
    for (link, target) in &profile.root.links {
        tree.symlink(link, target, "profile root.links")?;
    }
    for d in &profile.root.dirs {
        tree.mkdir(d)?;
    }
    for b in &profile.root.binaries {
        tree.add_binary(b, &opts.bin_dir)?;
    }
    tree.allow_replace(&profile.root.replace);
    for ov in &profile.root.overlays {
        tree.add_overlay(&opts.source_dir.join(ov), &ov.display().to_string())?;
    }
    tree.check_replaced()?;
    tree.add_modules(kver, dom0, DOM0_MODULES, kernel.package)?;
    tree.write(IMAGE_INFO, 0o644, info.as_bytes(), "generated")?;
    if let Some(g) = &profile.guivm {
        add_guivm(&mut tree, g, opts, kernel)?;
    }
    tree.write(
        "/etc/os-release",
        0o644,
        format!(
            "NAME=\"Qubes dom0 appliance\"\nID=qubes-dom0-appliance\nVERSION_ID={}\nVARIANT_ID={}\n",
            profile.image.version, profile.image.name
        )
        .as_bytes(),
        "generated",
    )?;
    // The accounts the daemons switch to and the bus's policy names: one
    // table (qcontract::accounts), so a uid here is the uid there.
    tree.write(
        "/etc/passwd",
        0o644,
        qcontract::accounts::render_passwd().as_bytes(),
        "generated",
    )?;
    tree.write(
        "/etc/group",
        0o644,
        qcontract::accounts::render_group().as_bytes(),
        "generated",
    )?;
    if !trust.keys.is_empty() {
        let mut keys = Vec::new();
        for path in &trust.keys {
            let text = fs::read_to_string(path)
                .with_context(|| format!("trusted update key: reading {}", path.display()))?;
            keys.push(qbundle::PublicKey::parse(path, &text)?);
        }
        let trust = qbundle::TrustStore::render(&keys, trust.threshold);
        tree.write(
            "/etc/qupdate/trust.toml",
            0o644,
            trust.as_bytes(),
            "generated",
        )?;
    }

    // Last: the bill of materials of everything above (not of itself).
    let files = crate::sbom::inventory(tree_dir, tree.origins())?;
    let doc = crate::sbom::cyclonedx(
        &crate::sbom::Subject {
            name: &profile.image.name,
            version: &profile.image.version,
            compatible: &profile.image.compatible,
            epoch: opts.epoch,
        },
        &profile.debian.suite,
        set.packages(),
        &files,
    );
    let sbom = serde_json::to_string_pretty(&doc)?;
    tree.write(crate::sbom::SBOM_PATH, 0o644, sbom.as_bytes(), "generated")?;
    Ok(Composed { files, sbom })
}

/// Identifiers derived from the profile so rebuilding gives the same bytes.
struct Ids {
    verity_salt: [u8; 32],
    verity_uuid: [u8; 16],
    esp_volid: u32,
    boot_volid: u32,
    data_uuid: String,
    namespace: String,
}

impl Ids {
    fn new(p: &Profile) -> Self {
        let namespace = format!(
            "{}/{}/{}",
            p.image.compatible, p.image.name, p.image.version
        );
        let h = |what: &str| -> [u8; 32] {
            let mut d = Sha256::new();
            d.update(namespace.as_bytes());
            d.update([0]);
            d.update(what.as_bytes());
            d.finalize().into()
        };
        let mut verity_uuid = [0u8; 16];
        verity_uuid.copy_from_slice(&h("verity-uuid")[..16]);
        let vol = |what: &str| {
            let b = h(what);
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        };
        let data_uuid = qgpt::Guid::derive(&namespace, "data-fs")
            .to_string()
            .to_lowercase();
        Self {
            verity_salt: h("verity-salt"),
            verity_uuid,
            esp_volid: vol("esp"),
            boot_volid: vol("boot"),
            data_uuid,
            namespace,
        }
    }
}

/// The image's identity. It must read back as itself: qinit and qupdate
/// refuse an image info they cannot parse (the kernel's version, from
/// its modules directory, is the one field no profile check covers).
fn image_info(p: &Profile, kver: &str, epoch: u64) -> Result<ImageInfo> {
    let info = ImageInfo {
        name: p.image.name.clone(),
        version: p.image.version.clone(),
        compatible: p.image.compatible.clone(),
        kernel: kver.to_owned(),
        build_epoch: epoch,
        production: p.image.production,
        security_epoch: p.update.security_epoch,
        max_epoch_step: p.update.max_epoch_step,
    };
    let back = ImageInfo::parse(Path::new(IMAGE_INFO), &info.render())
        .context("the image info this build would write does not parse")?;
    anyhow::ensure!(back == info, "the image info does not read back as written");
    Ok(info)
}

fn one_line(text: &str) -> Result<String> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    match lines.as_slice() {
        [one] => Ok((*one).to_owned()),
        _ => bail!(
            "expected exactly one non-comment line, found {}",
            lines.len()
        ),
    }
}

fn single_subdir(dir: &Path) -> Result<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match names.len() {
        1 => Ok(names.remove(0)),
        n => bail!(
            "{}: expected one kernel version directory, found {n}",
            dir.display()
        ),
    }
}

fn resolve_modules(
    kmods: &KernelModules,
    source_dir: &Path,
    lists: &[PathBuf],
    skip: &BTreeSet<String>,
) -> Result<Vec<Module>> {
    let mut parsed = Vec::new();
    for l in lists {
        let path = source_dir.join(l);
        parsed.push((path.clone(), kmod::read_list(&path)?));
    }
    Ok(kmods.resolve(&parsed, skip)?)
}

#[allow(clippy::too_many_arguments)]
fn write_initramfs(
    out: &Path,
    epoch: u64,
    qinit: &[u8],
    kver: &str,
    early: &[Module],
    verity_text: &str,
    info: &str,
) -> Result<()> {
    let mtime =
        u32::try_from(epoch).context("SOURCE_DATE_EPOCH does not fit cpio's 32-bit mtime")?;
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(file, flate2::Compression::best());
    let mut w = CpioWriter::new(gz, mtime);
    for d in [
        "dev",
        "proc",
        "sys",
        "run",
        "newroot",
        "etc",
        "etc/qinit",
        "usr",
        "usr/lib",
        "usr/lib/modules",
    ] {
        w.dir(d, 0o755)?;
    }
    w.dir("tmp", 0o1777)?;
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.file("init", 0o755, qinit)?;
    cpio_modules(&mut w, kver, early, EARLY_MODULES)?;
    w.file(
        ROOT_VERITY.trim_start_matches('/'),
        0o644,
        verity_text.as_bytes(),
    )?;
    w.file(IMAGE_INFO.trim_start_matches('/'), 0o644, info.as_bytes())?;
    let gz = w.finish()?;
    let file = gz.finish()?;
    file.sync_all()?;
    Ok(())
}

/// Writes `modules` under `usr/lib/modules/<kver>/` of an initramfs (the
/// directories `usr/lib/modules` and the list's own must exist) and their
/// load list at `list_path`.
fn cpio_modules<W: Write>(
    w: &mut CpioWriter<W>,
    kver: &str,
    modules: &[Module],
    list_path: &str,
) -> Result<()> {
    let mut dirs: BTreeSet<String> = BTreeSet::new();
    let mut paths = Vec::new();
    for m in modules {
        let rel = format!("usr/lib/modules/{kver}/{}", m.rel_path);
        let mut acc = String::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            // usr/lib/modules exists already; create what is below it once.
            if acc.matches('/').count() >= 3 && dirs.insert(acc.clone()) {
                w.dir(&acc, 0o755)?;
            }
        }
        w.file(&rel, 0o644, &m.data)?;
        paths.push(format!("/{rel}"));
    }
    let list = qcontract::modules::render_list(paths.iter().map(String::as_str));
    w.file(list_path.trim_start_matches('/'), 0o644, list.as_bytes())?;
    Ok(())
}

/// Stage 7: the disk: GPT, ESP, slot A, an empty slot B, /var.
fn assemble_disk(
    disk: &Path,
    p: &Profile,
    ids: &Ids,
    esp: &Path,
    boot: &Path,
    root: &Path,
    data: &Path,
) -> Result<()> {
    let mib = |n: u64| n << 20;
    let layout = Partition::LAYOUT
        .into_iter()
        .fold(qgpt::Layout::new(), |l, part| {
            let (kind, size) = match part {
                Partition::Esp => (qgpt::Guid::ESP, p.disk.esp_mib),
                Partition::Boot(_) => (qgpt::Guid::XBOOTLDR, p.disk.boot_mib),
                Partition::Root(_) => (qgpt::Guid::ROOT_X86_64, p.disk.root_mib),
                Partition::Data => (qgpt::Guid::LINUX_DATA, p.disk.data_mib),
            };
            l.add(part.name(), kind, mib(size))
        });
    let plan = layout.plan(qgpt::Guid::derive(&ids.namespace, "disk"), |name| {
        qgpt::Guid::derive(&ids.namespace, name)
    })?;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(disk)
        .with_context(|| format!("creating {}", disk.display()))?;
    qgpt::write_tables(&mut f, &plan)?;
    for (name, src) in [
        (Partition::Esp.name(), esp),
        (Slot::A.boot_name(), boot),
        (Slot::A.root_name(), root),
        (Partition::Data.name(), data),
    ] {
        let part = plan
            .partitions
            .iter()
            .find(|x| x.name == name)
            .with_context(|| format!("partition {name} missing from the plan"))?;
        let bytes = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        if bytes.len() as u64 > part.size() {
            bail!(
                "{} ({} bytes) does not fit partition {name} ({} bytes)",
                src.display(),
                bytes.len(),
                part.size()
            );
        }
        f.seek(SeekFrom::Start(part.offset()))?;
        f.write_all(&bytes)?;
    }
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_build_leaves_the_old_output_and_no_staging() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("qemu");
        fs::create_dir_all(&out).unwrap();
        fs::write(out.join(DISK_IMAGE), b"good").unwrap();
        let stage = Staging::new(&out, "qemu").unwrap();
        let staged = stage.dir.clone();
        fs::write(staged.join(DISK_IMAGE), b"half").unwrap();
        drop(stage); // the build failed here
        assert!(!staged.exists());
        assert_eq!(fs::read(out.join(DISK_IMAGE)).unwrap(), b"good");

        let stage = Staging::new(&out, "qemu").unwrap();
        fs::write(stage.dir.join(DISK_IMAGE), b"new").unwrap();
        fs::write(
            stage.dir.join(qcontract::paths::output::PACKAGES_LOCK),
            b"lock",
        )
        .unwrap();
        stage.commit(&out).unwrap();
        assert_eq!(fs::read(out.join(DISK_IMAGE)).unwrap(), b"new");
        assert!(!staged.exists());
    }

    #[test]
    fn wanted_packages_name_their_fields() {
        let p = profile::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles/qemu.toml"))
            .unwrap();
        let w = wanted_packages(&p, "linux-image-6.12.1-amd64");
        assert_eq!(w[0].field, "debian.packages[0]");
        let k = w
            .iter()
            .find(|w| w.name == "linux-image-6.12.1-amd64")
            .unwrap();
        assert_eq!(k.field, "boot.kernel_package (resolved)");
        // The profile lists Xen and GRUB itself; they are not repeated.
        assert_eq!(
            w.iter().filter(|w| w.name == "grub-efi-amd64-bin").count(),
            1
        );
    }

    #[test]
    fn one_line_accepts_comments() {
        assert_eq!(one_line("# c\n\n console=com1 \n").unwrap(), "console=com1");
        assert!(one_line("a\nb\n").is_err());
        assert!(one_line("# only\n").is_err());
    }
}
