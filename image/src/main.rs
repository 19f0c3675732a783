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
        /// Refresh apt's package lists before building.
        #[arg(long)]
        refresh: bool,
        /// Use this tree as the root instead of composing one (benchmarks).
        #[arg(long)]
        root_tree: Option<PathBuf>,
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

fn main() -> ExitCode {
    env_logger_init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qimage: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
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
            Ok(())
        }
        Command::Size { image_dir, top } => {
            print!("{}", qimage::sbom::size_report(&image_dir, top)?);
            Ok(())
        }
        Command::Bundle {
            image_dir,
            keys,
            out,
        } => {
            let out = qimage::bundle::from_image_dir(&image_dir, &keys, out.as_deref())?;
            let len = std::fs::metadata(&out)?.len();
            println!("{}  {:.1} MiB", out.display(), len as f64 / 1048576.0);
            Ok(())
        }
        Command::Build {
            profile,
            out,
            source_dir,
            cache_dir,
            bin_dir,
            refresh,
            root_tree,
        } => {
            let name = qimage::profile::load(&profile)?.image.name;
            let out = out.unwrap_or_else(|| source_dir.join("target/images").join(&name));
            let epoch = std::env::var("SOURCE_DATE_EPOCH")
                .ok()
                .map(|s| s.parse::<u64>())
                .transpose()
                .map_err(|e| anyhow::anyhow!("SOURCE_DATE_EPOCH: {e}"))?
                .unwrap_or(DEFAULT_EPOCH);
            let result = qimage::pipeline::build(&qimage::pipeline::BuildOptions {
                profile,
                source_dir,
                out_dir: out.clone(),
                cache_dir,
                bin_dir,
                epoch,
                refresh,
                root_tree,
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
            Ok(())
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
