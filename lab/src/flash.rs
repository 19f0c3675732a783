//! The image a run flashes: the disk image, followed by the run's payloads
//! (update bundles) in the space after it.
//!
//! A lab machine has one way in for data, the medium it is flashed
//! with, and dom0 has no network. So the bundles ride along on that
//! medium, each at a MiB boundary past the disk image's last sector,
//! outside every partition. dom0 reads one back with `dd` from its own
//! disk. On a real disk that is bigger than the image, that space is
//! there anyway (the backup GPT is then not at the disk's end, which Linux
//! and GRUB accept, as with any image written to a larger disk).

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

const ALIGN: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    #[error("flash image {path}: {what}")]
    Io {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("flash image: no partition {0} in the disk image")]
    NoPartition(String),
    #[error("flash image: reading the GPT")]
    Gpt(#[source] qgpt::Error),
}

/// A payload's place on the flashed medium.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    pub name: String,
    /// Byte offset from the medium's start (a multiple of 1 MiB).
    pub offset: u64,
    pub len: u64,
}

impl Payload {
    /// A shell pipeline that prints the payload, read from `disk` in dom0.
    pub fn read_command(&self, disk: &str) -> String {
        format!(
            "dd if={disk} bs={ALIGN} skip={} count={} 2>/dev/null | head -c {}",
            self.offset / ALIGN,
            self.len.div_ceil(ALIGN),
            self.len
        )
    }
}

/// A composed image and where its payloads are.
#[derive(Debug, Clone)]
pub struct FlashImage {
    pub path: PathBuf,
    pub payloads: Vec<Payload>,
}

impl FlashImage {
    pub fn payload(&self, name: &str) -> Option<&Payload> {
        self.payloads.iter().find(|p| p.name == name)
    }

    /// Writes a copy of this image to `out` with one bit of partition
    /// `part` flipped at `offset` bytes into it.
    pub fn with_flipped_bit(
        &self,
        out: &Path,
        part: &str,
        offset: u64,
    ) -> Result<Self, FlashError> {
        use std::io::{Read, Write};
        copy(&self.path, out)?;
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| FlashError::Io {
                path: out.to_owned(),
                what,
                source,
            }
        };
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(out)
            .map_err(io("opening"))?;
        let table = qgpt::read(&mut f).map_err(FlashError::Gpt)?;
        let p = table
            .find(part)
            .ok_or_else(|| FlashError::NoPartition(part.to_owned()))?;
        let at = p.offset() + offset;
        let mut b = [0u8; 1];
        f.seek(SeekFrom::Start(at)).map_err(io("seeking"))?;
        f.read_exact(&mut b).map_err(io("reading"))?;
        b[0] ^= 0x01;
        f.seek(SeekFrom::Start(at)).map_err(io("seeking"))?;
        f.write_all(&b).map_err(io("writing"))?;
        f.sync_all().map_err(io("syncing"))?;
        Ok(Self {
            path: out.to_owned(),
            payloads: self.payloads.clone(),
        })
    }
}

fn copy(from: &Path, to: &Path) -> Result<(), FlashError> {
    std::fs::copy(from, to).map_err(|source| FlashError::Io {
        path: to.to_owned(),
        what: format!("copying {} to it", from.display()),
        source,
    })?;
    Ok(())
}

/// Writes `disk` followed by `payloads` (name, file) to `out`.
pub fn compose(
    disk: &Path,
    payloads: &[(&str, &Path)],
    out: &Path,
) -> Result<FlashImage, FlashError> {
    let tmp = out.with_extension("partial");
    copy(disk, &tmp)?;
    let io = |what: String| {
        let path = tmp.clone();
        move |source| FlashError::Io { path, what, source }
    };
    let mut f = OpenOptions::new()
        .append(true)
        .open(&tmp)
        .map_err(io("opening".into()))?;
    let mut placed = Vec::new();
    for (name, file) in payloads {
        let end = f.metadata().map_err(io("stat".into()))?.len();
        let offset = end.div_ceil(ALIGN) * ALIGN;
        f.set_len(offset).map_err(io("padding".into()))?;
        let mut src =
            std::fs::File::open(file).map_err(io(format!("opening {}", file.display())))?;
        let len =
            std::io::copy(&mut src, &mut f).map_err(io(format!("appending {}", file.display())))?;
        placed.push(Payload {
            name: (*name).to_owned(),
            offset,
            len,
        });
    }
    let end = f.metadata().map_err(io("stat".into()))?.len();
    f.set_len(end.div_ceil(ALIGN) * ALIGN)
        .map_err(io("padding".into()))?;
    f.sync_all().map_err(io("syncing".into()))?;
    drop(f);
    std::fs::rename(&tmp, out).map_err(io(format!("renaming to {}", out.display())))?;
    Ok(FlashImage {
        path: out.to_owned(),
        payloads: placed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn payloads_follow_the_disk_at_mib_boundaries_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, vec![7u8; 3 * 512]).expect("disk");
        let a = dir.path().join("a.bundle");
        let b = dir.path().join("b.bundle");
        std::fs::write(&a, b"first bundle").expect("a");
        std::fs::write(&b, vec![9u8; 1 << 20]).expect("b");
        let out = dir.path().join("flash.img");
        let img = compose(&disk, &[("next", &a), ("broken", &b)], &out).expect("compose");
        assert_eq!(
            img.payloads[0],
            Payload {
                name: "next".into(),
                offset: ALIGN,
                len: 12
            }
        );
        assert_eq!(img.payloads[1].offset, 2 * ALIGN);
        let bytes = std::fs::read(&out).expect("read");
        assert_eq!(bytes.len() as u64, 3 * ALIGN);
        assert_eq!(&bytes[..3 * 512], &vec![7u8; 3 * 512][..]);
        assert_eq!(&bytes[1 << 20..(1 << 20) + 12], b"first bundle");
        assert!(!out.with_extension("partial").exists());

        // The command dom0 runs gives back exactly the payload.
        let p = img.payload("next").expect("next");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(p.read_command(&out.display().to_string()))
            .output()
            .expect("sh");
        assert_eq!(out.stdout, b"first bundle");
        let mut f = std::fs::File::open(&b).expect("b");
        let mut want = Vec::new();
        f.read_to_end(&mut want).expect("read");
        let p = img.payload("broken").expect("broken");
        let got = std::process::Command::new("sh")
            .arg("-c")
            .arg(p.read_command(&img.path.display().to_string()))
            .output()
            .expect("sh");
        assert_eq!(got.stdout, want);
    }
}
