//! What is in the root image and where each file came from: the inventory
//! behind the bill of materials (CycloneDX 1.5 JSON, carried in the image at
//! [`SBOM_PATH`] and written next to it) and behind `qimage size`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::packages::Unpacked;

/// Where the image carries its bill of materials.
pub const SBOM_PATH: &str = "/usr/share/qubes-dom0/sbom.cdx.json";

/// One regular file of the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// `package <name>`, `workspace`, `overlay <dir>`, `generated`, ...
    pub origin: String,
}

impl FileEntry {
    /// The Debian package it came from, if any.
    pub fn package(&self) -> Option<&str> {
        self.origin.strip_prefix("package ")
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Every regular file under `tree`, with the origin the tree recorded for
/// it (`origins` is keyed by the /usr-merged path).
pub fn inventory(tree: &Path, origins: &BTreeMap<String, String>) -> Result<Vec<FileEntry>> {
    let mut out = Vec::new();
    let mut stack = vec![tree.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let e = e?;
            let ft = e.file_type()?;
            let p = e.path();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let rel = p.strip_prefix(tree).context("a path outside the tree")?;
                let image = format!("/{}", rel.display());
                let origin = origins
                    .get(&image)
                    .cloned()
                    .unwrap_or_else(|| "unknown".to_owned());
                out.push(FileEntry {
                    size: e.metadata()?.len(),
                    sha256: sha256_file(&p)?,
                    path: image,
                    origin,
                });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

pub fn files_tsv(files: &[FileEntry]) -> String {
    files
        .iter()
        .map(|f| format!("{}\t{}\t{}\t{}\n", f.path, f.size, f.sha256, f.origin))
        .collect()
}

fn parse_tsv(text: &str, file: &Path) -> Result<Vec<FileEntry>> {
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            let mut c = l.splitn(4, '\t');
            let (Some(path), Some(size), Some(sha256), Some(origin)) =
                (c.next(), c.next(), c.next(), c.next())
            else {
                bail!(
                    "{} line {}: expected 4 tab-separated fields",
                    file.display(),
                    i + 1
                );
            };
            Ok(FileEntry {
                path: path.to_owned(),
                size: size
                    .parse()
                    .with_context(|| format!("{} line {}: size", file.display(), i + 1))?,
                sha256: sha256.to_owned(),
                origin: origin.to_owned(),
            })
        })
        .collect()
}

/// The image's identity in the bill of materials.
#[derive(Debug, Clone)]
pub struct Subject<'a> {
    pub name: &'a str,
    pub version: &'a str,
    pub compatible: &'a str,
    pub epoch: u64,
}

fn purl(p: &Unpacked, suite: &str) -> String {
    format!(
        "pkg:deb/debian/{}@{}?arch=amd64&distro={suite}",
        p.name,
        p.version.replace(':', "%3A")
    )
}

/// RFC 3339 UTC for a Unix time (no calendar crate for one timestamp).
fn rfc3339(t: u64) -> String {
    let days = t / 86400;
    let secs = t % 86400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// A CycloneDX 1.5 document: one component per Debian package used (purl,
/// the .deb's sha256) and one for the workspace's own files, each with its
/// files (path, sha256, size) as nested `file` components. Deterministic:
/// the serial number is derived from the content, the time is the build
/// epoch.
pub fn cyclonedx(
    subject: &Subject<'_>,
    suite: &str,
    packages: &[Unpacked],
    files: &[FileEntry],
) -> serde_json::Value {
    use serde_json::json;
    let file_json = |f: &FileEntry| {
        json!({
            "type": "file",
            "name": f.path,
            "hashes": [{ "alg": "SHA-256", "content": f.sha256 }],
            "properties": [
                { "name": "qubes-dom0:size", "value": f.size.to_string() },
                { "name": "qubes-dom0:origin", "value": f.origin },
            ],
        })
    };
    let mut components = Vec::new();
    for p in packages {
        let own: Vec<_> = files
            .iter()
            .filter(|f| f.package() == Some(p.name.as_str()))
            .map(file_json)
            .collect();
        let mut c = json!({
            "type": "library",
            "name": p.name,
            "version": p.version,
            "purl": purl(p, suite),
            "hashes": [{ "alg": "SHA-256", "content": p.sha256 }],
        });
        if own.is_empty() {
            // Fetched for the build (GRUB, Xen's boot image) but no file of
            // it is in the root: still part of what made the image.
            c["properties"] = json!([{ "name": "qubes-dom0:in-root", "value": "false" }]);
        } else {
            c["components"] = json!(own);
        }
        components.push(c);
    }
    let ours: Vec<_> = files
        .iter()
        .filter(|f| f.package().is_none())
        .map(file_json)
        .collect();
    components.push(json!({
        "type": "application",
        "name": "qubes-dom0-appliance",
        "version": subject.version,
        "description": "the workspace's binaries, overlays and generated files",
        "components": ours,
    }));
    let mut doc = json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "metadata": {
            "timestamp": rfc3339(subject.epoch),
            "tools": { "components": [{ "type": "application", "name": "qimage", "version": env!("CARGO_PKG_VERSION") }] },
            "component": {
                "type": "operating-system",
                "name": subject.name,
                "version": subject.version,
                "properties": [{ "name": "qubes-dom0:compatible", "value": subject.compatible }],
            },
        },
        "components": components,
    });
    let digest = Sha256::digest(doc.to_string().as_bytes());
    let h = hex::encode(&digest[..16]);
    doc["serialNumber"] = json!(format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ));
    doc
}

fn mib(b: u64) -> f64 {
    b as f64 / 1_048_576.0
}

/// `qimage size`: the root by package and by file, largest first, with the
/// partition sizes of the build.
pub fn size_report(dir: &Path, top: usize) -> Result<String> {
    let tsv = dir.join(qcontract::paths::output::ROOT_FILES);
    let text = fs::read_to_string(&tsv)
        .with_context(|| format!("{}: not a qimage build output", tsv.display()))?;
    let files = parse_tsv(&text, &tsv)?;
    let mut out = String::new();
    if let Ok(summary) = fs::read_to_string(dir.join(qcontract::paths::output::SUMMARY)) {
        out.push_str("images (bytes as built; slot images are what a bundle carries):\n");
        for l in summary.lines() {
            if let Some((name, size)) = l.split_once('\t') {
                if let Ok(n) = size.parse::<u64>() {
                    out.push_str(&format!("  {name:<36} {:>9.1} MiB\n", mib(n)));
                }
            }
        }
    }
    let total: u64 = files.iter().map(|f| f.size).sum();
    out.push_str(&format!(
        "root, uncompressed: {:.1} MiB in {} files\n\nby origin:\n",
        mib(total),
        files.len()
    ));
    let mut by: BTreeMap<&str, (u64, usize)> = BTreeMap::new();
    for f in &files {
        let e = by.entry(f.origin.as_str()).or_default();
        e.0 += f.size;
        e.1 += 1;
    }
    let mut by: Vec<_> = by.into_iter().collect();
    by.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(b.0)));
    for (origin, (size, n)) in by {
        out.push_str(&format!(
            "  {:>9.2} MiB {n:>5} files  {origin}\n",
            mib(size)
        ));
    }
    out.push_str(&format!("\nlargest {top} files:\n"));
    let mut sorted: Vec<&FileEntry> = files.iter().collect();
    sorted.sort_by(|a, b| b.size.cmp(&a.size).then(a.path.cmp(&b.path)));
    for f in sorted.into_iter().take(top) {
        out.push_str(&format!(
            "  {:>9.2} MiB  {}  ({})\n",
            mib(f.size),
            f.path,
            f.origin
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_600), "2026-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400 + 3661), "2000-02-29T01:01:01Z");
    }

    #[test]
    fn inventory_attributes_files_and_the_bom_and_report_follow() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("root");
        fs::create_dir_all(tree.join("usr/sbin")).unwrap();
        fs::write(tree.join("usr/sbin/xl"), vec![1u8; 3000]).unwrap();
        fs::write(tree.join("usr/sbin/qinit"), vec![2u8; 1000]).unwrap();
        let origins: BTreeMap<String, String> = [
            (
                "/usr/sbin/xl".to_owned(),
                "package xen-utils-4.20".to_owned(),
            ),
            ("/usr/sbin/qinit".to_owned(), "workspace".to_owned()),
        ]
        .into();
        let files = inventory(&tree, &origins).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[1].package(), Some("xen-utils-4.20"));
        let pkgs = vec![
            Unpacked {
                name: "xen-utils-4.20".into(),
                version: "4.20.1-1".into(),
                sha256: "ab".repeat(32),
                root: d.path().into(),
            },
            Unpacked {
                name: "grub-efi-amd64-bin".into(),
                version: "2.12-9".into(),
                sha256: "cd".repeat(32),
                root: d.path().into(),
            },
        ];
        let subject = Subject {
            name: "t",
            version: "0.1.0",
            compatible: "c",
            epoch: 1_767_225_600,
        };
        let doc = cyclonedx(&subject, "trixie", &pkgs, &files);
        assert_eq!(doc["bomFormat"], "CycloneDX");
        assert_eq!(
            doc["components"][0]["purl"],
            "pkg:deb/debian/xen-utils-4.20@4.20.1-1?arch=amd64&distro=trixie"
        );
        assert_eq!(
            doc["components"][0]["components"][0]["name"],
            "/usr/sbin/xl"
        );
        assert_eq!(doc["components"][1]["properties"][0]["value"], "false");
        assert_eq!(
            doc["components"][2]["components"][0]["name"],
            "/usr/sbin/qinit"
        );
        // Same input, same document.
        assert_eq!(doc, cyclonedx(&subject, "trixie", &pkgs, &files));

        let out = d.path().join("out");
        fs::create_dir_all(&out).unwrap();
        fs::write(
            out.join(qcontract::paths::output::ROOT_FILES),
            files_tsv(&files),
        )
        .unwrap();
        let r = size_report(&out, 5).unwrap();
        let xl = r.find("package xen-utils-4.20").unwrap();
        let ws = r.find("workspace").unwrap();
        assert!(xl < ws, "largest origin first: {r}");
        fs::write(out.join(qcontract::paths::output::ROOT_FILES), "bad line\n").unwrap();
        let e = size_report(&out, 5).unwrap_err().to_string();
        assert!(e.contains("root.files.tsv line 1"), "{e}");
    }
}
