//! Developer entry points (a contract: README, CI and the lab use them):
//!
//! - `cargo xtask boot [--profile P]`: build and boot the disk image in
//!   nested QEMU; without a terminal, exit 0 once dom0 is ready.
//! - `cargo xtask test`: the whole suite, nested QEMU scenarios included
//!   (and the fuzz targets for a short while, where nightly is installed).
//! - `cargo xtask image --profile P`: build the images of profile P into
//!   `target/images/P/`.
//! - `cargo xtask soak --runs N`: the scenarios N times, pass counts.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod fuzz;
mod soak;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the appliance and boot it in nested QEMU.
    Boot {
        #[arg(long, default_value = "qemu")]
        profile: String,
        /// Seconds to wait for the ready marker (non-interactive runs).
        #[arg(long, default_value_t = 900)]
        timeout: u64,
    },
    /// Run the whole test suite, nested QEMU scenarios included.
    Test {
        /// Skip the nested QEMU scenarios (unit and host tests only).
        #[arg(long)]
        no_vm: bool,
    },
    /// Benchmarks (not tests): `boot` compares qinit with systemd, `update`
    /// qupdate with a plain copy and RAUC, `verity` our tree with veritysetup.
    Bench {
        #[arg(value_parser = ["boot", "update", "verity", "qrexec"])]
        what: String,
        /// Runs of each variant.
        #[arg(long, default_value_t = 2)]
        runs: u32,
        /// `update`: size of the root image in MiB (at least 256);
        /// `verity`: size of the data.
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
    },
    /// Run every fuzz target for a while (needs a nightly toolchain).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Configure and build the minimal dom0 kernel from Debian's
    /// linux-source (kernel-config/minimal-dom0.config; not part of the
    /// test suite: it takes long on 2 cores).
    Kernel {
        /// Configure and check the fragment only.
        #[arg(long)]
        config_only: bool,
    },
    /// Run the suite's scenarios N times back to back on every target and
    /// report each scenario's pass count (the flake budget, docs/lab.md).
    Soak {
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Only these legs of the suite (`qemu`, `qemu-lab`).
        #[arg(long = "leg", value_delimiter = ',')]
        legs: Vec<String>,
    },
    /// Build the images of one profile into target/images/<profile>/.
    Image {
        #[arg(long, default_value = "qemu")]
        profile: String,
        /// Refresh the Debian package lists first.
        #[arg(long)]
        refresh: bool,
    },
}

/// Host packages the build and the tests use, with the command each
/// provides (checked by dpkg so a partial install is noticed).
const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "ovmf",
    "grub-common",
    // GRUB's script interpreter, to check the A/B model against (lib/grubenv).
    "grub-emu",
    "mtools",
    "dosfstools",
    "e2fsprogs",
    "squashfs-tools",
    "cryptsetup-bin",
    "cpio",
    "gdisk",
    "debian-archive-keyring",
    "libc6-dev",
    "python3-minimal",
    "debootstrap",
    "kmod",
    // The hardware report names PCI devices from it.
    "pci.ids",
    // LAVA's job schema, to validate the jobs qlab generates.
    "lava-common",
    // Owner keys (`qimage keys init`): Secure Boot certificates and the
    // boot files' OpenPGP key.
    "openssl",
    "gnupg",
];

/// What building a kernel needs besides the compiler.
const KERNEL_BUILD_PACKAGES: &[&str] = &["make", "flex", "bison", "bc", "libelf-dev", "libssl-dev"];

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = repo_root()?;
    std::env::set_current_dir(&root)?;
    ensure_host_packages()?;
    match cli.command {
        Cmd::Image { profile, refresh } => {
            ImageBuild {
                refresh,
                ..ImageBuild::new(&profile)
            }
            .run(&root)?;
        }
        Cmd::Boot { profile, timeout } => {
            let dir = build_image(&root, &profile)?;
            boot(&root, &dir, &profile, Duration::from_secs(timeout))?;
        }
        Cmd::Test { no_vm } => test(&root, no_vm)?,
        Cmd::Soak { runs, legs } => {
            prepare_scenarios(&root)?;
            soak::run(&root, runs, &legs)?;
        }
        Cmd::Kernel { config_only } => {
            ensure_packages(KERNEL_BUILD_PACKAGES)?;
            let bin = build_static_binaries(&root)?;
            let mut cmd = Command::new(bin.join("qimage"));
            cmd.arg("kernel").arg("--cache-dir").arg(cache_dir());
            if config_only {
                cmd.arg("--config-only");
            }
            run_cmd(&mut cmd)?;
        }
        Cmd::Fuzz { seconds } => {
            fuzz::run(&root, seconds)?;
        }
        Cmd::Bench {
            what,
            runs,
            size_mib,
        } => match what.as_str() {
            "update" => bench::update::run(&root, runs, size_mib)?,
            "verity" => bench::verity::run(&root, runs, size_mib)?,
            "qrexec" => bench::qrexec::run(&root, runs)?,
            _ => bench::boot::run(&root, runs)?,
        },
    }
    Ok(())
}

fn repo_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .context("xtask has no parent directory")?
        .to_owned())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs missing host packages when root; otherwise prints the command.
fn ensure_host_packages() -> Result<()> {
    ensure_packages(HOST_PACKAGES)
}

fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let cmd = format!(
        "apt-get update && apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    if !is_root() {
        bail!("missing host packages; run as root:\n  {cmd}");
    }
    eprintln!("xtask: installing host packages: {}", missing.join(" "));
    let status = Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    if !status.success() {
        bail!("`{cmd}` failed ({status})");
    }
    Ok(())
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let desc = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("spawning {desc}"))?;
    if !status.success() {
        bail!("{desc} failed ({status})");
    }
    Ok(())
}

const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds the image binaries statically (they run in an initramfs with no
/// libc and on a root whose glibc is not the build host's).
fn build_static_binaries(root: &Path) -> Result<PathBuf> {
    run_cmd(
        cargo()
            .args(["build", "--release", "--locked", "--target", TARGET])
            .args(["-p", "qinit", "-p", "qimage", "-p", "qbus", "-p", "qupdate"])
            .args([
                "-p",
                "qdomd",
                "-p",
                "qguest",
                "-p",
                "qcmd",
                "-p",
                "qubesdbd",
                "-p",
                "qrexecd",
                "-p",
                "qvchan-cat",
            ])
            .env("RUSTFLAGS", static_rustflags(root)),
    )?;
    Ok(static_bin_dir(root))
}

/// Static linking, and source paths mapped to fixed names so the
/// binaries (and so the images) do not depend on where the checkout and
/// the cargo home are.
fn static_rustflags(root: &Path) -> String {
    let cargo_home = std::env::var("CARGO_HOME").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        format!("{home}/.cargo")
    });
    format!(
        "-C target-feature=+crt-static --remap-path-prefix={}=/build/src --remap-path-prefix={cargo_home}=/build/cargo",
        root.display()
    )
}

fn static_bin_dir(root: &Path) -> PathBuf {
    root.join("target").join(TARGET).join("release")
}

/// An XDG base directory: `$var`, else `$HOME/fallback` (root's home
/// without `$HOME`).
fn xdg_dir(var: &str, fallback: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(
        || {
            std::env::var_os("HOME")
                .map_or_else(|| PathBuf::from("/root"), PathBuf::from)
                .join(fallback)
        },
        PathBuf::from,
    )
}

fn cache_dir() -> PathBuf {
    xdg_dir("XDG_CACHE_HOME", ".cache").join("qubes-dom0")
}

/// The owner key set a production build trusts:
/// `$QUBES_DOM0_OWNER_KEYS`, else a local set in
/// `$XDG_CONFIG_HOME/qubes-dom0/owner-keys` (`~/.config/...`), which the
/// first production build makes (`qimage keys init`), outside the
/// repository. A developer's set: docs/security.md says how an owner makes
/// and keeps a real one.
fn owner_keys(bin: &Path) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("QUBES_DOM0_OWNER_KEYS") {
        return Ok(PathBuf::from(dir));
    }
    let dir = xdg_dir("XDG_CONFIG_HOME", ".config").join("qubes-dom0/owner-keys");
    if !dir.exists() {
        eprintln!(
            "xtask: no owner keys yet: making a local set in {} (a developer's; see docs/security.md)",
            dir.display()
        );
        run_cmd(
            Command::new(bin.join("qimage"))
                .args(["keys", "init", "--owner", "local-dev"])
                .arg(&dir),
        )?;
    }
    Ok(dir)
}

fn source_date_epoch(root: &Path) -> String {
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        return v;
    }
    Command::new("git")
        .args(["log", "-1", "--format=%ct"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "1767225600".into())
}

/// `qimage build` of the profile into `target/images/<profile>/`.
fn build_image(root: &Path, profile: &str) -> Result<PathBuf> {
    ImageBuild::new(profile).run(root)
}

/// One `qimage build` of a profile, with its options.
#[derive(Debug, Clone, Copy)]
struct ImageBuild<'a> {
    profile: &'a str,
    /// Refresh the Debian package lists first.
    refresh: bool,
    /// A root tree to take as given (the systemd benchmark's).
    root_tree: Option<&'a Path>,
}

impl<'a> ImageBuild<'a> {
    fn new(profile: &'a str) -> Self {
        Self {
            profile,
            refresh: false,
            root_tree: None,
        }
    }

    /// Builds the static binaries, then the image; returns its directory.
    fn run(self, root: &Path) -> Result<PathBuf> {
        let Self {
            profile,
            refresh,
            root_tree,
        } = self;
        let out = root.join("target/images").join(profile);
        let bin = build_static_binaries(root)?;
        let profile_path = root.join("image/profiles").join(format!("{profile}.toml"));
        if !profile_path.exists() {
            bail!("no profile {}", profile_path.display());
        }
        let t = Instant::now();
        let mut cmd = qimage(root, &bin, "build", &profile_path);
        cmd.arg("--out")
            .arg(&out)
            .env("SOURCE_DATE_EPOCH", source_date_epoch(root));
        if refresh {
            cmd.arg("--refresh");
        }
        if let Some(t) = root_tree {
            cmd.arg("--root-tree").arg(t);
        }
        let production = qimage::profile::load(&profile_path)
            .with_context(|| format!("reading {}", profile_path.display()))?
            .image
            .production;
        if production {
            cmd.arg("--owner-keys").arg(owner_keys(&bin)?);
        }
        run_cmd(&mut cmd)?;
        eprintln!(
            "xtask: image {profile} built in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        Ok(out)
    }
}

fn boot(root: &Path, image_dir: &Path, profile: &str, timeout: Duration) -> Result<()> {
    let work = root.join("target/vm").join(profile);
    std::fs::create_dir_all(&work)?;
    // Boot a copy: the built image stays pristine for the next run.
    let disk = work.join("disk.img");
    std::fs::copy(image_dir.join(qcontract::paths::output::DISK_IMAGE), &disk)
        .with_context(|| format!("copying the disk image to {}", disk.display()))?;
    let mut cfg = qemu::VmConfig::new(&disk, &work);
    cfg.echo = true;
    let interactive = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let mut vm = qemu::Vm::start(&cfg)?;
    if interactive {
        eprintln!(
            "xtask: interactive boot; serial log in {}. Type on the console; \
             the VM powers off when dom0 does (or Ctrl-C).",
            vm.serial_log.display()
        );
        forward_stdin(&mut vm)?;
        return Ok(());
    }
    match vm.wait_for_any(&["QINIT-READY", "QINIT-FAILED"], timeout)? {
        (0, line) => {
            eprintln!(
                "\nxtask: dom0 ready after {:.1} s of QEMU time: {line}",
                vm.uptime().as_secs_f64()
            );
            println!("{line}");
            vm.quit();
            Ok(())
        }
        (_, line) => {
            vm.quit();
            bail!(
                "dom0 failed to boot: {line} (serial log {})",
                vm.serial_log.display()
            )
        }
    }
}

fn forward_stdin(vm: &mut qemu::Vm) -> Result<()> {
    use std::io::BufRead;
    for line in std::io::stdin().lock().lines() {
        vm.send_line(&line?)?;
        if vm.wait_exit(Duration::from_millis(1)).is_some() {
            break;
        }
    }
    vm.quit();
    Ok(())
}

/// Seconds per fuzz target in the suite: a smoke run that finds shallow
/// crashes; `cargo xtask fuzz --seconds N` goes deeper.
const FUZZ_SECONDS: u64 = 30;

fn test(root: &Path, no_vm: bool) -> Result<()> {
    let t = Instant::now();
    let mut totals = TestTotals::default();
    run_tests(
        cargo().args(["test", "--workspace", "--locked"]),
        &mut totals,
    )?;
    totals.passed += fuzz::run(root, FUZZ_SECONDS)?;
    if !no_vm {
        let image = prepare_scenarios(root)?;
        check_reproducible(root, "qemu-test", &image, &mut totals)?;
        let mut result = Ok(());
        for leg in SUITE_LEGS {
            let ran = run_qlab(root, leg.args, Path::new("target/lab"), &mut totals);
            result = result.and(ran);
        }
        let lava = check_lava_jobs(root, &mut totals);
        result.and(lava)?;
    }
    eprintln!("xtask: whole suite took {:.0} s", t.elapsed().as_secs_f64());
    println!("suite: {} passed, {} failed", totals.passed, totals.failed);
    Ok(())
}

/// One `qlab run` of the suite.
pub struct SuiteLeg {
    /// What reports call it.
    pub name: &'static str,
    pub args: &'static [&'static str],
}

/// The scenario runs of the suite (`cargo xtask test` and `soak`): every
/// scenario on the QEMU target, then the lab-target code path against a
/// QEMU machine driven only through lab-style commands
/// (lab/targets/qemu-lab.toml): flashing, power on and off, a power cut,
/// the TCP console with its one shared line, and the hardware report.
pub const SUITE_LEGS: &[SuiteLeg] = &[
    SuiteLeg {
        name: "qemu",
        args: &["--target", "qemu"],
    },
    SuiteLeg {
        name: "qemu-lab",
        args: &[
            "--target",
            "lab/targets/qemu-lab.toml",
            "--scenario",
            "boot,power-cut,hcl",
        ],
    },
];

/// Builds what the scenarios run: the test image (its directory is
/// returned), the two releases whose bundles the update scenarios
/// install, qlab and the launcher.
fn prepare_scenarios(root: &Path) -> Result<PathBuf> {
    let image = build_image(root, "qemu-test")?;
    build_image(root, "qemu-test-next")?;
    build_image(root, "qemu-test-broken")?;
    run_cmd(cargo().args(["build", "--locked", "-p", "qlab", "-p", "qemu-launcher"]))?;
    Ok(image)
}

/// `qimage <subcommand>` for a profile, with the checkout, the package
/// cache and the static binaries it builds from.
fn qimage(root: &Path, bin: &Path, subcommand: &str, profile: &Path) -> Command {
    let mut cmd = Command::new(bin.join("qimage"));
    cmd.arg(subcommand)
        .arg("--profile")
        .arg(profile)
        .arg("--source-dir")
        .arg(root)
        .arg("--cache-dir")
        .arg(cache_dir())
        .arg("--bin-dir")
        .arg(bin);
    cmd
}

/// Rebuilds `profile` with `qimage verify` (same package lock, same
/// SOURCE_DATE_EPOCH) and has it compare every artifact and the root hash
/// with the first build: the reproducibility test, and a test of verify.
fn check_reproducible(
    root: &Path,
    profile: &str,
    first: &Path,
    totals: &mut TestTotals,
) -> Result<()> {
    let bin = static_bin_dir(root);
    let profile_path = root.join("image/profiles").join(format!("{profile}.toml"));
    let status = qimage(root, &bin, "verify", &profile_path)
        .arg("--against")
        .arg(first)
        .status()
        .context("spawning qimage verify")?;
    if status.success() {
        println!("reproducible {profile}: a rebuild is identical (qimage verify)");
        totals.passed += 1;
        Ok(())
    } else {
        totals.failed += 1;
        bail!("{profile}: a rebuild differs from the first build ({status})")
    }
}

/// Generates the LAVA jobs and has LAVA's own validator check them.
fn check_lava_jobs(root: &Path, totals: &mut TestTotals) -> Result<()> {
    let status = Command::new(root.join("target/debug/qlab"))
        .args(["export-lava", "--device-type", "qemu-lab", "--validate"])
        .args(["--target", "lab/targets/qemu-lab.toml"])
        .args(["--images", "target/images", "--out", "target/lava"])
        .arg("--image-url")
        .arg(format!("file://{}/target/lava/flash.img", root.display()))
        .current_dir(root)
        .status()
        .context("spawning qlab export-lava")?;
    if status.success() {
        totals.passed += 1;
        Ok(())
    } else {
        totals.failed += 1;
        bail!("qlab export-lava --validate failed ({status})")
    }
}

/// Runs `qlab run` with `args` (qvm on the PATH for the lab-style
/// target) and adds its scenario counts to `totals`.
fn run_qlab(root: &Path, args: &[&str], out: &Path, totals: &mut TestTotals) -> Result<()> {
    use std::io::BufRead;
    let debug = root.join("target/debug");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![debug.clone()];
    dirs.extend(std::env::split_paths(&path));
    let mut cmd = Command::new(debug.join("qlab"));
    cmd.arg("run")
        .args(args)
        .args(["--images", "target/images", "--out"])
        .arg(out)
        .current_dir(root)
        .env("PATH", std::env::join_paths(dirs)?)
        .stdout(std::process::Stdio::piped());
    let desc = format!("qlab run {}", args.join(" "));
    let mut child = cmd.spawn().with_context(|| format!("spawning {desc}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut counted = false;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        // `qlab: 8 passed, 0 failed on qemu; results in DIR`
        if let Some(rest) = line.strip_prefix("qlab: ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            if let [p, "passed,", f, "failed", ..] = words[..] {
                totals.passed += p.parse::<u64>().unwrap_or(0);
                totals.failed += f.parse::<u64>().unwrap_or(0);
                counted = true;
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        if !counted {
            totals.failed += 1;
        }
        bail!("{desc} failed ({status})");
    }
    Ok(())
}

#[derive(Debug, Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
}

/// Runs a `cargo test`, passing its output through and adding up its
/// `test result:` lines so the suite ends on one total.
fn run_tests(cmd: &mut Command, totals: &mut TestTotals) -> Result<()> {
    use std::io::BufRead;
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {desc}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match kind {
                    "passed" => totals.passed += n,
                    "failed" => totals.failed += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{desc} failed ({status})");
    }
    Ok(())
}
