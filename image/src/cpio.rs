//! A writer for the "newc" cpio format the kernel unpacks as initramfs.
//!
//! Every entry is owned by root, carries one fixed mtime and a sequential
//! inode number, so the same inputs always give the same bytes.

use std::io::{self, Write};

const MAGIC: &str = "070701";
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("cpio entry `{name}`: {reason}")]
    BadEntry { name: String, reason: &'static str },
    #[error("cpio write")]
    Io(#[from] io::Error),
}

#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    mtime: u32,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W, mtime: u32) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
            mtime,
        }
    }

    pub fn dir(&mut self, name: &str, perm: u32) -> Result<(), CpioError> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, 0, &[])
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, 0, data)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        if target.is_empty() {
            return Err(CpioError::BadEntry {
                name: name.to_owned(),
                reason: "empty symlink target",
            });
        }
        self.entry(name, S_IFLNK | 0o777, 1, 0, target.as_bytes())
    }

    /// A character device node, e.g. /dev/console for the kernel's first
    /// open before devtmpfs is mounted.
    pub fn char_dev(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.entry(
            name,
            S_IFCHR | (perm & 0o7777),
            1,
            (u64::from(major) << 32) | u64::from(minor),
            &[],
        )
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: u64,
        data: &[u8],
    ) -> Result<(), CpioError> {
        validate_name(name)?;
        let size = u32::try_from(data.len()).map_err(|_| CpioError::BadEntry {
            name: name.to_owned(),
            reason: "file larger than 4 GiB",
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let rdev_major = u32::try_from(rdev >> 32).unwrap_or(u32::MAX);
        let rdev_minor = u32::try_from(rdev & 0xffff_ffff).unwrap_or(u32::MAX);
        self.header(ino, mode, nlink, size, rdev_major, rdev_minor, name)?;
        self.write_padded(data)?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn header(
        &mut self,
        ino: u32,
        mode: u32,
        nlink: u32,
        size: u32,
        rdev_major: u32,
        rdev_minor: u32,
        name: &str,
    ) -> Result<(), CpioError> {
        let namesize = u32::try_from(name.len() + 1).map_err(|_| CpioError::BadEntry {
            name: name.to_owned(),
            reason: "name too long",
        })?;
        let header = format!(
            "{MAGIC}{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
             {devmajor:08x}{devminor:08x}{rdev_major:08x}{rdev_minor:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = self.mtime,
            devmajor = 0,
            devminor = 0,
            check = 0,
        );
        self.raw(header.as_bytes())?;
        self.raw(name.as_bytes())?;
        self.raw(&[0])?;
        self.pad()?;
        Ok(())
    }

    fn raw(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (4 - (self.written % 4)) % 4;
        let zeros = [0u8; 3];
        self.raw(&zeros[..usize::try_from(rem).expect("under 4")])
    }

    fn write_padded(&mut self, data: &[u8]) -> io::Result<()> {
        self.raw(data)?;
        self.pad()
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.header(0, 0, 1, 0, 0, 0, "TRAILER!!!")?;
        Ok(self.out)
    }
}

fn validate_name(name: &str) -> Result<(), CpioError> {
    let bad = |reason| {
        Err(CpioError::BadEntry {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty name");
    }
    if name.starts_with('/') {
        return bad("names are relative to the archive root");
    }
    if name.split('/').any(|c| c == ".." || c.is_empty()) {
        return bad("name has an empty or `..` component");
    }
    if name.contains('\0') {
        return bad("name contains NUL");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new(), 1_700_000_000);
        w.dir("etc", 0o755).unwrap();
        w.file("etc/hello", 0o644, b"hello\n").unwrap();
        w.symlink("init", "sbin/qinit").unwrap();
        w.char_dev("console", 0o600, 5, 1).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn layout_is_aligned_and_terminated() {
        let a = archive();
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        let trailer = a.windows(10).position(|w| w == b"TRAILER!!!").unwrap();
        assert!(trailer > 0);
        // Header of the first entry: ino 1, directory mode, uid 0.
        assert_eq!(&a[6..14], b"00000001");
        assert_eq!(&a[14..22], b"000041ed");
        assert_eq!(&a[46..54], format!("{:08x}", 1_700_000_000u32).as_bytes());
    }

    #[test]
    fn deterministic() {
        assert_eq!(archive(), archive());
    }

    #[test]
    fn bad_names_are_rejected() {
        let mut w = CpioWriter::new(Vec::new(), 0);
        for name in ["", "/abs", "a/../b", "a//b"] {
            assert!(
                matches!(w.file(name, 0o644, b""), Err(CpioError::BadEntry { .. })),
                "{name}"
            );
        }
        assert!(matches!(
            w.symlink("x", ""),
            Err(CpioError::BadEntry { .. })
        ));
    }

    /// The host's GNU cpio is the reference reader.
    #[test]
    fn gnu_cpio_lists_what_we_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.cpio");
        std::fs::write(&path, archive()).unwrap();
        let out = std::process::Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(std::fs::File::open(&path).unwrap())
            .output()
            .expect("GNU cpio is needed for this test: apt-get install cpio");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "etc\netc/hello\ninit\nconsole\n"
        );
        let extract = dir.path().join("x");
        std::fs::create_dir(&extract).unwrap();
        let st = std::process::Command::new("cpio")
            .args(["-id", "--quiet", "--no-absolute-filenames"])
            .current_dir(&extract)
            .stdin(std::fs::File::open(&path).unwrap())
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(
            std::fs::read(extract.join("etc/hello")).unwrap(),
            b"hello\n"
        );
        assert_eq!(
            std::fs::read_link(extract.join("init")).unwrap(),
            std::path::Path::new("sbin/qinit")
        );
    }
}
