//! `qimage`: build dom0 images from a profile.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Composes dom0 slot images and disk images from Debian packages.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the images of one profile.
    Build {
        /// Profile file (image/profiles/<name>.toml).
        #[arg(long)]
        profile: PathBuf,
        /// Output directory (default: target/images/<profile name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Repository root; profile paths are relative to it.
        #[arg(long, default_value = ".")]
        source_dir: PathBuf,
        /// Package cache, kept between builds.
        #[arg(long)]
        cache_dir: PathBuf,
        /// Directory with the workspace's static binaries.
        #[arg(long)]
        bin_dir: PathBuf,
        /// Refresh apt's package lists and ignore the cache's package lock:
        /// take the archive's current versions and lock those.
        #[arg(long, conflicts_with = "lock")]
        refresh: bool,
        /// Build from exactly the packages of this lock (a published
        /// `packages.lock`); the cache's lock is left as it is.
        #[arg(long)]
        lock: Option<PathBuf>,
        /// Use this tree as the root instead of composing one (benchmarks).
        #[arg(long)]
        root_tree: Option<PathBuf>,
        /// The owner's key set (`qimage keys init`), outside the
        /// repository: what a production image trusts. Required for a
        /// production profile; test profiles trust the test key only.
        #[arg(long)]
        owner_keys: Option<PathBuf>,
    },
    /// Rebuild a profile in a scratch directory and compare it with a
    /// published build (every output file and the root hash) or with a
    /// root hash. Exits 2 when they differ.
    Verify {
        /// Profile file (image/profiles/<name>.toml).
        #[arg(long)]
        profile: PathBuf,
        /// A published build's output directory (needs root.verity; its
        /// packages.lock and image.info's build epoch are used).
        #[arg(
            long,
            required_unless_present = "root_hash",
            conflicts_with = "root_hash"
        )]
        against: Option<PathBuf>,
        /// Only compare the root's dm-verity root hash with this one.
        #[arg(long)]
        root_hash: Option<String>,
        /// Build from this lock instead of the published one.
        #[arg(long)]
        lock: Option<PathBuf>,
        /// Keep the rebuild in this directory.
        #[arg(long)]
        keep: Option<PathBuf>,
        /// Repository root; profile paths are relative to it.
        #[arg(long, default_value = ".")]
        source_dir: PathBuf,
        /// Package cache, kept between builds.
        #[arg(long)]
        cache_dir: PathBuf,
        /// Directory with the workspace's static binaries.
        #[arg(long)]
        bin_dir: PathBuf,
        /// The owner's key set the published build was made with (a
        /// production profile).
        #[arg(long)]
        owner_keys: Option<PathBuf>,
    },
    /// Owner keys: `keys init DIR` makes a full set (update signing, UEFI
    /// Secure Boot PK/KEK/db, the boot files' signing key).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Build the minimal dom0 kernel (kernel-config/minimal-dom0.config)
    /// from Debian's linux-source-6.12. Slow; not used by any image yet.
    Kernel {
        /// Profile whose [debian] section names the archive.
        #[arg(long, default_value = "image/profiles/qemu.toml")]
        profile: PathBuf,
        /// The config fragment.
        #[arg(long, default_value = "kernel-config/minimal-dom0.config")]
        fragment: PathBuf,
        /// Package cache, kept between builds.
        #[arg(long)]
        cache_dir: PathBuf,
        /// Where bzImage and the final config go.
        #[arg(long, default_value = "target/kernel")]
        out: PathBuf,
        /// Parallel make jobs.
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Configure and check the fragment only.
        #[arg(long)]
        config_only: bool,
    },
    /// Compute a dm-verity hash tree for DATA into HASH (as `veritysetup
    /// format DATA HASH` would) and print the root hash.
    Verity {
        data: PathBuf,
        hash: PathBuf,
        /// Salt in hex (veritysetup's `--salt`).
        #[arg(long, default_value = "")]
        salt: String,
    },
    /// Report a built root by origin (package, workspace, ...) and by file,
    /// largest first, with the partition sizes.
    Size {
        /// The build's output directory.
        #[arg(long)]
        image_dir: PathBuf,
        /// How many of the largest files to list.
        #[arg(long, default_value_t = 20)]
        top: usize,
    },
    /// Sign an update bundle of a built slot (a `build` output directory).
    Bundle {
        /// The build's output directory (boot.img, root.img, root.verity,
        /// image.info).
        #[arg(long)]
        image_dir: PathBuf,
        /// Private key file (`qupdate keygen`); repeat for several signers.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// Output file (default: <image-dir>/<name>-<version>.bundle).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Make a full owner key set in DIR (new or empty, outside any git
    /// work tree). Keep it offline: see docs/security.md.
    Init {
        dir: PathBuf,
        /// The owner's name, in the keys' names and the certificates.
        #[arg(long, default_value = "owner")]
        owner: String,
    },
}

fn main() -> ExitCode {
    env_logger_init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qimage: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `qimage verify`'s exit status when the rebuild differs (1 is an error).
const EXIT_MISMATCH: u8 = 2;

fn source_date_epoch() -> anyhow::Result<Option<u64>> {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .map(|s| s.parse::<u64>())
        .transpose()
        .map_err(|e| anyhow::anyhow!("SOURCE_DATE_EPOCH: {e}"))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Verify {
            profile,
            against,
            root_hash,
            lock,
            keep,
            source_dir,
            cache_dir,
            bin_dir,
            owner_keys,
        } => {
            let published = match (&against, &root_hash) {
                (Some(dir), _) => qimage::verify::Published::from_dir(dir)?,
                (None, Some(h)) => qimage::verify::Published::root_hash(h)?,
                (None, None) => anyhow::bail!("give --against DIR or --root-hash HEX"),
            };
            let report = qimage::verify::run(
                &qimage::verify::VerifyOptions {
                    build: qimage::pipeline::BuildOptions {
                        profile,
                        source_dir,
                        out_dir: PathBuf::new(),
                        cache_dir,
                        bin_dir,
                        epoch: DEFAULT_EPOCH,
                        refresh: false,
                        root_tree: None,
                        lock: None,
                        update_cache_lock: false,
                        work_dir: None,
                        owner_keys,
                    },
                    lock,
                    epoch: source_date_epoch()?,
                    keep,
                },
                &published,
            )?;
            print!("{}", report.render());
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_MISMATCH)
            })
        }
        Command::Kernel {
            profile,
            fragment,
            cache_dir,
            out,
            jobs,
            config_only,
        } => {
            let debian = qimage::profile::load(&profile)?.debian;
            let built = qimage::kernel::build(&qimage::kernel::KernelOptions {
                debian,
                fragment,
                cache_dir,
                out_dir: out,
                jobs,
                config_only,
            })?;
            println!(
                "qimage: linux-source {}: config {}",
                built.version,
                built.config.display()
            );
            if let (Some(bz), Some(secs)) = (&built.bzimage, built.build_seconds) {
                println!(
                    "qimage: {} built in {secs:.0} s with {jobs} jobs",
                    bz.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verity { data, hash, salt } => {
            let salt = hex::decode(&salt).map_err(|e| anyhow::anyhow!("--salt: {e}"))?;
            let len = std::fs::metadata(&data)
                .map_err(|e| anyhow::anyhow!("{}: {e}", data.display()))?
                .len();
            let input = std::io::BufReader::with_capacity(
                1 << 20,
                std::fs::File::open(&data)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", data.display()))?,
            );
            let out = std::fs::File::create(&hash)
                .map_err(|e| anyhow::anyhow!("{}: {e}", hash.display()))?;
            let params = verity::VerityParams::new(salt, [0; 16])?;
            let info = verity::build_tree(input, len, &params, out, 0)?;
            println!("Root hash: {}", info.root_hash_hex());
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys {
            command: KeysCommand::Init { dir, owner },
        } => {
            let set = qimage::keys::init(&dir, &owner)?;
            println!("qimage: owner key set for {owner} in {}", set.dir.display());
            for k in &set.update_public {
                println!("  update key {}", k.display());
            }
            println!(
                "Keep it offline; see docs/security.md and {}/README.",
                set.dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Size { image_dir, top } => {
            print!("{}", qimage::sbom::size_report(&image_dir, top)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bundle {
            image_dir,
            keys,
            out,
        } => {
            let out = qimage::bundle::from_image_dir(&image_dir, &keys, out.as_deref())?;
            let len = std::fs::metadata(&out)?.len();
            println!("{}  {:.1} MiB", out.display(), len as f64 / 1048576.0);
            Ok(ExitCode::SUCCESS)
        }
        Command::Build {
            profile,
            out,
            source_dir,
            cache_dir,
            bin_dir,
            refresh,
            lock,
            root_tree,
            owner_keys,
        } => {
            let name = qimage::profile::load(&profile)?.image.name;
            let out = out.unwrap_or_else(|| source_dir.join("target/images").join(&name));
            let epoch = source_date_epoch()?.unwrap_or(DEFAULT_EPOCH);
            let result = qimage::pipeline::build(&qimage::pipeline::BuildOptions {
                profile,
                source_dir,
                out_dir: out.clone(),
                cache_dir,
                bin_dir,
                epoch,
                refresh,
                root_tree,
                update_cache_lock: lock.is_none(),
                lock,
                work_dir: None,
                owner_keys,
            })?;
            println!(
                "qimage: built profile {} version {} (kernel {}) into {}",
                result.profile.image.name,
                result.profile.image.version,
                result.kernel_version,
                out.display()
            );
            for (name, size) in &result.artifacts {
                println!("  {name:<32} {:>10.1} MiB", *size as f64 / 1048576.0);
            }
            println!("  root hash {}", result.root_hash);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// 2026-01-01T00:00:00Z: used when SOURCE_DATE_EPOCH is not set.
const DEFAULT_EPOCH: u64 = 1_767_225_600;

/// Minimal stderr logger: `QIMAGE_LOG=debug` for more.
fn env_logger_init() {
    struct Stderr(log::LevelFilter);
    impl log::Log for Stderr {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= self.0
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                eprintln!(
                    "qimage: {}: {}",
                    r.level().as_str().to_lowercase(),
                    r.args()
                );
            }
        }
        fn flush(&self) {}
    }
    let level = match std::env::var("QIMAGE_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("warn") => log::LevelFilter::Warn,
        _ => log::LevelFilter::Info,
    };
    if log::set_boxed_logger(Box::new(Stderr(level))).is_ok() {
        log::set_max_level(level);
    }
}
