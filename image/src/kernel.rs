//! `qimage kernel`: builds the minimal dom0 kernel of
//! `kernel-config/minimal-dom0.config` from Debian's `linux-source-6.12`,
//! fetched through the same private apt setup as the images. Optional and
//! slow; not part of any image or the default tests.
//!
//! The fragment goes on top of `allnoconfig`. Kconfig drops an option whose
//! dependencies are not met without a word, so after configuring, every
//! option of the fragment is checked against the resulting `.config`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::apt::PrivateApt;
use crate::lock::{Resolver, Wanted};
use crate::profile::DebianSection;

/// The Debian package with the kernel source.
pub const SOURCE_PACKAGE: &str = "linux-source-6.12";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "{path} line {line}: `{text}` is neither `CONFIG_X=value` nor `# CONFIG_X is not set`"
    )]
    Fragment {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error(
        "host tools missing for a kernel build: {missing}; install them with \
         `apt-get install {packages}`"
    )]
    HostTools { missing: String, packages: String },
}

/// What a fragment or `.config` sets: option -> value (`n` for "is not set").
pub type Config = BTreeMap<String, String>;

/// Parses a config fragment strictly (every line a setting or a comment).
pub fn parse_fragment(path: &Path, text: &str) -> Result<Config, KernelError> {
    let mut out = Config::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if let Some((k, v)) = setting(line) {
            out.insert(k, v);
        } else if !line.starts_with('#') || line.starts_with("# CONFIG_") {
            return Err(KernelError::Fragment {
                path: path.to_owned(),
                line: i + 1,
                text: raw.to_owned(),
            });
        }
    }
    Ok(out)
}

/// Parses a generated `.config` (comments that are not settings ignored).
pub fn parse_config(text: &str) -> Config {
    text.lines().filter_map(|l| setting(l.trim())).collect()
}

fn setting(line: &str) -> Option<(String, String)> {
    if let Some(rest) = line.strip_prefix("# ") {
        let name = rest.strip_suffix(" is not set")?;
        return name
            .starts_with("CONFIG_")
            .then(|| (name.to_owned(), "n".to_owned()));
    }
    let (k, v) = line.split_once('=')?;
    (k.starts_with("CONFIG_") && !k.contains(' ')).then(|| (k.to_owned(), v.to_owned()))
}

/// Options of `fragment` the final `.config` does not have as asked:
/// (option, wanted, got).
pub fn dropped(fragment: &Config, config: &Config) -> Vec<(String, String, String)> {
    fragment
        .iter()
        .filter_map(|(k, want)| {
            let got = config.get(k).map_or("n", String::as_str);
            (got != want).then(|| (k.clone(), want.clone(), got.to_owned()))
        })
        .collect()
}

/// Host commands a kernel build runs, with the Debian package of each.
const HOST_TOOLS: &[(&str, &str)] = &[
    ("make", "make"),
    ("gcc", "gcc"),
    ("flex", "flex"),
    ("bison", "bison"),
    ("bc", "bc"),
    ("perl", "perl"),
    ("tar", "tar"),
    ("xz", "xz-utils"),
];
/// Headers the build includes, with their packages.
const HOST_HEADERS: &[(&str, &str)] = &[
    ("/usr/include/gelf.h", "libelf-dev"),
    ("/usr/include/openssl/ssl.h", "libssl-dev"),
];

fn check_host() -> Result<(), KernelError> {
    let on_path = |cmd: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
    };
    let mut missing = Vec::new();
    let mut packages = Vec::new();
    for (cmd, pkg) in HOST_TOOLS {
        if !on_path(cmd) {
            missing.push((*cmd).to_owned());
            packages.push(*pkg);
        }
    }
    for (header, pkg) in HOST_HEADERS {
        if !Path::new(header).exists() {
            missing.push((*header).to_owned());
            packages.push(*pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(KernelError::HostTools {
        missing: missing.join(", "),
        packages: packages.join(" "),
    })
}

/// Inputs of `qimage kernel`.
#[derive(Debug, Clone)]
pub struct KernelOptions {
    /// The profile whose `[debian]` section says where packages come from.
    pub debian: DebianSection,
    pub fragment: PathBuf,
    pub cache_dir: PathBuf,
    /// Where `bzImage` and the final `.config` go.
    pub out_dir: PathBuf,
    pub jobs: usize,
    /// Stop after configuring and checking (seconds, not an hour).
    pub config_only: bool,
}

/// What a build produced.
#[derive(Debug)]
pub struct KernelOutput {
    pub version: String,
    pub config: PathBuf,
    pub bzimage: Option<PathBuf>,
    pub build_seconds: Option<f64>,
}

fn run(cmd: &mut Command) -> Result<()> {
    let what = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

pub fn build(opts: &KernelOptions) -> Result<KernelOutput> {
    let fragment_text = fs::read_to_string(&opts.fragment)
        .with_context(|| format!("reading {}", opts.fragment.display()))?;
    let fragment = parse_fragment(&opts.fragment, &fragment_text)?;
    check_host()?;

    let apt = PrivateApt::new(&opts.cache_dir, &opts.debian)?;
    apt.update(false)?;
    let fetched = Resolver::new(&apt, None).fetch(&[Wanted {
        name: SOURCE_PACKAGE.into(),
        field: "kernel source".into(),
    }])?;
    let pkg = fetched
        .first()
        .context("the resolver returned no package")?;
    let extracted = apt.extract(pkg)?;
    let tarball = extracted
        .join("usr/src")
        .join(format!("{SOURCE_PACKAGE}.tar.xz"));
    let work = opts
        .cache_dir
        .join("kernel")
        .join(pkg.info.version.replace(':', "%3a"));
    let src = work.join(SOURCE_PACKAGE);
    let unpacked = work.join("unpacked.done");
    if !unpacked.exists() {
        if src.exists() {
            fs::remove_dir_all(&src).with_context(|| format!("removing {}", src.display()))?;
        }
        fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        log::info!("unpacking {}", tarball.display());
        run(Command::new("tar")
            .arg("-xf")
            .arg(&tarball)
            .arg("-C")
            .arg(&work))?;
        fs::write(&unpacked, &pkg.info.sha256)?;
    }
    let obj = work.join("build");
    fs::create_dir_all(&obj)?;
    let fragment_abs = fs::canonicalize(&opts.fragment)?;
    let make = |args: &[&str]| {
        let mut c = Command::new("make");
        c.current_dir(&src)
            .arg(format!("O={}", obj.display()))
            .env("KBUILD_BUILD_TIMESTAMP", "@0")
            .env("KBUILD_BUILD_USER", "qimage")
            .env("KBUILD_BUILD_HOST", "qimage")
            .args(args);
        c
    };
    run(make(&["allnoconfig"]).env("KCONFIG_ALLCONFIG", &fragment_abs))?;
    let config_path = obj.join(".config");
    let config_text = fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let lost = dropped(&fragment, &parse_config(&config_text));
    if !lost.is_empty() {
        let list: Vec<String> = lost
            .iter()
            .map(|(k, want, got)| format!("{k}={want} (got {got})"))
            .collect();
        bail!(
            "{}: Kconfig did not take {} option(s), their dependencies are not met: {}",
            opts.fragment.display(),
            lost.len(),
            list.join(", ")
        );
    }
    fs::create_dir_all(&opts.out_dir)?;
    let out_config = opts.out_dir.join("config");
    fs::copy(&config_path, &out_config)?;
    if opts.config_only {
        return Ok(KernelOutput {
            version: pkg.info.version.clone(),
            config: out_config,
            bzimage: None,
            build_seconds: None,
        });
    }
    let t = Instant::now();
    run(&mut make(&[
        &format!("-j{}", opts.jobs),
        "bzImage",
        "modules",
    ]))?;
    let secs = t.elapsed().as_secs_f64();
    let bz = opts.out_dir.join("bzImage");
    fs::copy(obj.join("arch/x86/boot/bzImage"), &bz)?;
    Ok(KernelOutput {
        version: pkg.info.version.clone(),
        config: out_config,
        bzimage: Some(bz),
        build_seconds: Some(secs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fragment_in_the_repository_parses() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernel-config/minimal-dom0.config");
        let f = parse_fragment(&path, &fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(f["CONFIG_XEN_DOM0"], "y");
        assert_eq!(f["CONFIG_DM_VERITY"], "m");
        assert_eq!(f["CONFIG_INET"], "n");
    }

    #[test]
    fn a_malformed_fragment_line_is_named() {
        match parse_fragment(Path::new("f"), "CONFIG_A=y\nXEN=y\n").unwrap_err() {
            KernelError::Fragment { line, text, .. } => {
                assert_eq!(line, 2);
                assert_eq!(text, "XEN=y");
            }
            e => panic!("{e:?}"),
        }
        assert!(parse_fragment(Path::new("f"), "# CONFIG_A is off\n").is_err());
    }

    #[test]
    fn options_kconfig_dropped_are_listed() {
        let frag = parse_fragment(
            Path::new("f"),
            "CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_D=\"x\"\n",
        )
        .unwrap();
        let config = parse_config(
            "# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_D=\"x\"\n",
        );
        assert_eq!(
            dropped(&frag, &config),
            vec![
                ("CONFIG_B".into(), "m".into(), "n".into()),
                ("CONFIG_C".into(), "n".into(), "y".into()),
            ]
        );
        // Absent from .config counts as off.
        assert!(dropped(&parse_config("# CONFIG_X is not set"), &Config::new()).is_empty());
    }
}
