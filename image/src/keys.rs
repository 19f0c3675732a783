//! Owner keys: who a production image trusts, and the rules that keep the
//! repository's test keys out of it.
//!
//! An owner key set is a directory made by `qimage keys init DIR`, away
//! from any repository ([`init`]):
//!
//! | path | what | used by |
//! | --- | --- | --- |
//! | `update/<owner>-update-1.{key,pub}`, `-2` | ed25519 update signing keys (`qupdate keygen`'s format); both trusted, one kept offline as the rotation spare | `qimage build` (the `.pub` into `/etc/qupdate/trust.toml`), `qimage bundle --key` |
//! | `secureboot/{PK,KEK,db}.{key,crt}`, `owner-guid` | UEFI Secure Boot: platform key, key exchange key, signature database key (RSA 2048, X.509) and the owner GUID | the verified boot chain (docs/security.md) |
//! | `boot/gnupg/`, `boot/grub.pub` | the OpenPGP key (RSA 3072) that signs every file GRUB loads, and its public half for GRUB's embedded key | the verified boot chain |
//!
//! A production build ([`custody`]) trusts exactly the owner's update keys.
//! It refuses to build without them, with any key its profile names (every
//! path in a profile is in the repository), with a key set inside a git
//! work tree, or with an owner key equal to one the repository holds. Test
//! profiles trust only the keys they name, which are the committed test
//! keys.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::profile::Profile;

/// The update keys' directory in a key set.
pub const UPDATE_DIR: &str = "update";
/// Secure Boot's keys.
pub const SECURE_BOOT_DIR: &str = "secureboot";
/// The boot files' signing key.
pub const BOOT_DIR: &str = "boot";
/// Update keys `init` makes: one in use, one spare for rotation.
pub const UPDATE_KEYS: usize = 2;
/// Secure Boot's three keys, in the order of the chain.
pub const SECURE_BOOT_KEYS: [&str; 3] = ["PK", "KEK", "db"];

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not empty: `keys init` never writes over keys")]
    NotEmpty { path: PathBuf },
    #[error(
        "{path} is inside the git work tree {repo}: owner keys must never be committed, \
         make them elsewhere (docs/security.md)"
    )]
    InRepository { path: PathBuf, repo: PathBuf },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{command} failed ({status}): {stderr}")]
    Tool {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{tool} is needed to make owner keys: apt-get install {package}")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("update key")]
    Update(#[from] qbundle::KeyError),
}

/// Why a profile may not be built with the keys at hand. Each names the
/// profile and the rule.
#[derive(Debug, thiserror::Error)]
pub enum CustodyError {
    #[error(
        "profile {profile} is production and trusts only the owner's keys: make a key set \
         with `qimage keys init DIR` away from the repository, then build with \
         --owner-keys DIR (cargo xtask makes a local one, ~/.config/qubes-dom0/owner-keys)"
    )]
    NoOwnerKeys { profile: String },
    #[error(
        "profile {profile} is production but names update.{field} {key}: that key is in the \
         repository, and its private half is public"
    )]
    RepositoryKey {
        profile: String,
        field: &'static str,
        key: PathBuf,
    },
    #[error(
        "owner key {owner} is the repository's {repo}: a production image never trusts a \
         key the repository holds"
    )]
    OwnerKeyIsRepositoryKey { owner: PathBuf, repo: PathBuf },
    #[error("profile {profile}: update.threshold {threshold} is more than the {keys} owner update key(s)")]
    Threshold {
        profile: String,
        threshold: usize,
        keys: usize,
    },
    #[error("owner keys")]
    Keys(#[from] KeyError),
    #[error("repository key {path}")]
    RepositoryKeyUnreadable {
        path: PathBuf,
        #[source]
        source: qbundle::KeyError,
    },
}

/// The git work tree `path` (existing or not) would be in, if any.
pub fn git_work_tree(path: &Path) -> Option<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir().ok()?.join(path)
    };
    abs.ancestors()
        .find(|dir| dir.join(".git").exists())
        .map(Path::to_owned)
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> KeyError + 'a {
    move |source| KeyError::Io {
        path: path.to_owned(),
        what,
        source,
    }
}

fn run(cmd: &mut Command, tool: &'static str, package: &'static str) -> Result<(), KeyError> {
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            KeyError::MissingTool { tool, package }
        } else {
            KeyError::Tool {
                command: tool.to_owned(),
                status: "not started".into(),
                stderr: e.to_string(),
            }
        }
    })?;
    if !out.status.success() {
        return Err(KeyError::Tool {
            command: format!("{cmd:?}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

fn private_dir(path: &Path) -> Result<(), KeyError> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(io(path, "creating"))
}

/// What `init` made.
#[derive(Debug)]
pub struct KeySet {
    pub dir: PathBuf,
    pub update_public: Vec<PathBuf>,
}

/// Makes a full owner key set in `dir` (new, or empty), for an owner
/// called `owner` (it names the keys and the certificates' subjects).
pub fn init(dir: &Path, owner: &str) -> Result<KeySet, KeyError> {
    if !qcontract::ImageInfo::valid_name(owner) {
        return Err(KeyError::Invalid {
            path: dir.to_owned(),
            reason: format!("owner name `{owner}` must be non-empty [A-Za-z0-9._+-]"),
        });
    }
    if let Some(repo) = git_work_tree(dir) {
        return Err(KeyError::InRepository {
            path: dir.to_owned(),
            repo,
        });
    }
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(KeyError::NotEmpty {
                    path: dir.to_owned(),
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(dir, "reading")(e)),
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent, "creating"))?;
    // Made beside it and renamed into place whole: a set that failed half
    // way (no openssl, say) is never mistaken for a key set.
    let staging = tempfile::Builder::new()
        .prefix(".keys-init-")
        .tempdir_in(parent)
        .map_err(io(parent, "making a staging directory in"))?;
    let set = make(staging.path(), owner)?;
    std::fs::rename(staging.path(), dir).map_err(io(dir, "renaming the new set to"))?;
    // The staging directory is the set now; nothing is left to remove.
    let _ = staging.keep();
    Ok(KeySet {
        dir: dir.to_owned(),
        update_public: set.iter().map(|p| dir.join(p)).collect(),
    })
}

/// Makes the key set's files in `dir`; returns the update public keys'
/// paths within it.
fn make(dir: &Path, owner: &str) -> Result<Vec<PathBuf>, KeyError> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(dir, "chmod 700"))?;

    let update = dir.join(UPDATE_DIR);
    private_dir(&update)?;
    let mut update_public = Vec::new();
    for n in 1..=UPDATE_KEYS {
        let name = format!("{owner}-update-{n}");
        let key = qbundle::generate_keypair()?;
        key.store(&update.join(format!("{name}.key")))?;
        let public = Path::new(UPDATE_DIR).join(format!("{name}.pub"));
        write_new(
            &dir.join(&public),
            key.public(&name).to_line().as_bytes(),
            0o644,
        )?;
        update_public.push(public);
    }

    let sb = dir.join(SECURE_BOOT_DIR);
    private_dir(&sb)?;
    for role in SECURE_BOOT_KEYS {
        let key = sb.join(format!("{role}.key"));
        run(
            Command::new("openssl")
                .args([
                    "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
                ])
                .args(["-days", "3650", "-subj"])
                .arg(format!("/CN={owner} Secure Boot {role}/"))
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(sb.join(format!("{role}.crt"))),
            "openssl",
            "openssl",
        )?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .map_err(io(&key, "chmod 600"))?;
    }
    write_new(
        &sb.join("owner-guid"),
        format!("{}\n", random_guid()?).as_bytes(),
        0o644,
    )?;

    let boot = dir.join(BOOT_DIR);
    private_dir(&boot)?;
    let gnupg = boot.join("gnupg");
    private_dir(&gnupg)?;
    let uid = format!("{owner} boot signing");
    let gpg = |args: &[&str]| {
        let mut c = Command::new("gpg");
        c.arg("--homedir")
            .arg(&gnupg)
            .args(["--batch", "--no-tty", "--quiet"])
            .args(args);
        c
    };
    run(
        &mut gpg(&[
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            "--quick-generate-key",
            &uid,
            "rsa3072",
            "sign",
            "never",
        ]),
        "gpg",
        "gnupg",
    )?;
    // GRUB embeds the public key unarmoured (grub-mkimage --pubkey).
    let public = boot.join("grub.pub");
    run(
        gpg(&["--export"]).arg("--output").arg(&public).arg(&uid),
        "gpg",
        "gnupg",
    )?;
    // gpg-agent outlives the command; the key set is meant to go offline.
    let _ = Command::new("gpgconf")
        .arg("--homedir")
        .arg(&gnupg)
        .args(["--kill", "gpg-agent"])
        .status();

    write_new(&dir.join("README"), readme(owner).as_bytes(), 0o644)?;
    Ok(update_public)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(path, "creating"))?;
    f.write_all(bytes).map_err(io(path, "writing"))
}

/// A random (version 4) GUID, as EFI signature lists name their owner.
fn random_guid() -> Result<String, KeyError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| KeyError::Invalid {
        path: PathBuf::from("/dev/urandom"),
        reason: e.to_string(),
    })?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

fn readme(owner: &str) -> String {
    format!(
        "Owner keys of {owner}, made by `qimage keys init`.\n\
         \n\
         update/      ed25519 update signing keys. A production image trusts both\n\
                      .pub files; sign bundles with one (`qimage bundle --key`) and\n\
                      keep the other offline as the spare to rotate to.\n\
         secureboot/  UEFI Secure Boot PK, KEK and db (RSA 2048, X.509) and the\n\
                      owner GUID: enrolled in the firmware.\n\
         boot/        the OpenPGP key that signs every file GRUB loads\n\
                      (gnupg/ holds the secret key, grub.pub the public half).\n\
         \n\
         Keep this directory offline (an encrypted disk in a safe): a build\n\
         needs only the public halves and the signing keys of the moment.\n\
         See docs/security.md in the appliance's repository.\n"
    )
}

/// An owner key set opened for a build.
#[derive(Debug)]
pub struct OwnerKeys {
    pub dir: PathBuf,
    /// The update keys' public halves, sorted by file name.
    pub update_public: Vec<PathBuf>,
}

impl OwnerKeys {
    /// Opens `dir`: outside any git work tree, its update keys present
    /// and their private halves readable by their owner alone.
    pub fn open(dir: &Path) -> Result<Self, KeyError> {
        // Where it really is: a link from outside into a work tree is in it.
        let dir = &std::fs::canonicalize(dir).map_err(io(dir, "resolving"))?;
        if let Some(repo) = git_work_tree(dir) {
            return Err(KeyError::InRepository {
                path: dir.to_owned(),
                repo,
            });
        }
        let update = dir.join(UPDATE_DIR);
        let mut update_public = Vec::new();
        for e in std::fs::read_dir(&update).map_err(io(&update, "reading"))? {
            let path = e.map_err(io(&update, "reading"))?.path();
            // What a link points at is what counts, for a mode as for a key.
            let meta = std::fs::metadata(&path).map_err(io(&path, "stat"))?;
            match path.extension().and_then(|x| x.to_str()) {
                Some("key") if meta.mode() & 0o077 != 0 => {
                    return Err(KeyError::Invalid {
                        path,
                        reason: format!(
                            "a private key readable by others (mode {:o}): chmod 600",
                            meta.mode() & 0o777
                        ),
                    })
                }
                Some("pub") if meta.is_file() => update_public.push(path),
                _ => {}
            }
        }
        if update_public.is_empty() {
            return Err(KeyError::Invalid {
                path: update,
                reason: "no update public key (*.pub): not an owner key set".into(),
            });
        }
        update_public.sort();
        Ok(Self {
            dir: dir.to_owned(),
            update_public,
        })
    }
}

/// What an image trusts for updates, and who signs its own bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trust {
    /// Public key files for `/etc/qupdate/trust.toml` (absolute).
    pub keys: Vec<PathBuf>,
    pub threshold: usize,
    /// Private keys that sign the build's bundle (absolute).
    pub signing_keys: Vec<PathBuf>,
}

/// The custody rules (see the module's documentation): what `profile`
/// trusts and signs with, built from `source_dir` with `owner` keys.
pub fn custody(
    profile: &Profile,
    source_dir: &Path,
    owner: Option<&OwnerKeys>,
) -> Result<Trust, CustodyError> {
    let name = || profile.image.name.clone();
    let u = &profile.update;
    if !profile.image.production {
        return Ok(Trust {
            keys: u.trusted_keys.iter().map(|k| source_dir.join(k)).collect(),
            threshold: u.threshold,
            signing_keys: u.signing_keys.iter().map(|k| source_dir.join(k)).collect(),
        });
    }
    for (field, list) in [
        ("trusted_keys", &u.trusted_keys),
        ("signing_keys", &u.signing_keys),
    ] {
        if let Some(key) = list.first() {
            return Err(CustodyError::RepositoryKey {
                profile: name(),
                field,
                key: key.clone(),
            });
        }
    }
    let owner = owner.ok_or_else(|| CustodyError::NoOwnerKeys { profile: name() })?;
    let repo_keys = repository_public_keys(source_dir)?;
    for path in &owner.update_public {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.clone(),
            what: "reading",
            source,
        })?;
        let key = qbundle::PublicKey::parse(path, &text).map_err(KeyError::Update)?;
        if let Some((repo, _)) = repo_keys.iter().find(|(_, k)| k.key == key.key) {
            return Err(CustodyError::OwnerKeyIsRepositoryKey {
                owner: path.clone(),
                repo: repo.clone(),
            });
        }
    }
    if u.threshold == 0 || u.threshold > owner.update_public.len() {
        return Err(CustodyError::Threshold {
            profile: name(),
            threshold: u.threshold,
            keys: owner.update_public.len(),
        });
    }
    Ok(Trust {
        keys: owner.update_public.clone(),
        threshold: u.threshold,
        // The owner signs releases offline (`qimage bundle --key`).
        signing_keys: Vec::new(),
    })
}

/// Every update public key the repository holds: `*.pub` anywhere under
/// `source_dir/image` (where the test keys are).
fn repository_public_keys(
    source_dir: &Path,
) -> Result<Vec<(PathBuf, qbundle::PublicKey)>, CustodyError> {
    let mut found = Vec::new();
    let mut dirs = vec![source_dir.join("image")];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&dir, "reading")(e).into()),
        };
        for e in entries {
            let e = e.map_err(io(&dir, "reading"))?;
            let path = e.path();
            let ty = e.file_type().map_err(io(&path, "stat"))?;
            if ty.is_dir() {
                dirs.push(path);
            } else if ty.is_file() && path.extension().is_some_and(|x| x == "pub") {
                let text = std::fs::read_to_string(&path).map_err(io(&path, "reading"))?;
                // Only update keys count; another kind of .pub is not one.
                if let Ok(key) = qbundle::PublicKey::parse(&path, &text) {
                    found.push((path, key));
                }
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests;
