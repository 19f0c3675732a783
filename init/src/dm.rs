//! Device-mapper through its ioctl interface, without dmsetup or
//! veritysetup: create a device, load one table, resume it.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

const DM_NAME_LEN: usize = 128;
const DM_UUID_LEN: usize = 129;
/// `sizeof(struct dm_ioctl)`.
const DM_IOCTL_SIZE: usize = 312;
/// `sizeof(struct dm_target_spec)`.
const DM_TARGET_SPEC_SIZE: usize = 40;
const DM_VERSION: [u32; 3] = [4, 0, 0];
const _: () = assert!(48 + DM_NAME_LEN + DM_UUID_LEN + 7 == DM_IOCTL_SIZE);

const DM_READONLY_FLAG: u32 = 1 << 0;

const DM_DEV_CREATE_CMD: u8 = 3;
const DM_DEV_REMOVE_CMD: u8 = 4;
const DM_DEV_SUSPEND_CMD: u8 = 6;
const DM_TABLE_LOAD_CMD: u8 = 9;

#[derive(Debug, thiserror::Error)]
pub enum DmError {
    #[error("open /dev/mapper/control (is dm-mod loaded?)")]
    Control(#[source] std::io::Error),
    #[error("device-mapper {op} of `{name}`")]
    Ioctl {
        op: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("device-mapper `{name}`: {reason}")]
    Invalid { name: String, reason: &'static str },
}

/// One line of a device-mapper table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub start_sector: u64,
    pub sectors: u64,
    pub target_type: String,
    pub params: String,
}

/// Builds the ioctl buffer: a `struct dm_ioctl` followed, for table loads,
/// by `dm_target_spec`s each with its NUL-terminated parameter string,
/// padded to 8 bytes as the kernel expects.
pub fn encode(name: &str, flags: u32, targets: &[Target]) -> Result<Vec<u8>, DmError> {
    let invalid = |reason| DmError::Invalid {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.len() >= DM_NAME_LEN || name.contains('/') {
        return Err(invalid("name must be 1..127 bytes without '/'"));
    }
    let mut body = Vec::new();
    for t in targets {
        if t.target_type.len() >= 16 {
            return Err(invalid("target type longer than 15 bytes"));
        }
        if t.params.contains('\0') {
            return Err(invalid("target parameters contain NUL"));
        }
        let start = body.len();
        let unpadded = DM_TARGET_SPEC_SIZE + t.params.len() + 1;
        let len = unpadded.div_ceil(8) * 8;
        body.resize(start + len, 0);
        body[start..start + 8].copy_from_slice(&t.start_sector.to_ne_bytes());
        body[start + 8..start + 16].copy_from_slice(&t.sectors.to_ne_bytes());
        // status (i32) stays 0; `next` is the offset of the next spec.
        let next = u32::try_from(len).map_err(|_| invalid("table too large"))?;
        body[start + 20..start + 24].copy_from_slice(&next.to_ne_bytes());
        body[start + 24..start + 24 + t.target_type.len()]
            .copy_from_slice(t.target_type.as_bytes());
        let p = start + DM_TARGET_SPEC_SIZE;
        body[p..p + t.params.len()].copy_from_slice(t.params.as_bytes());
    }
    // Room for the kernel's answer (it writes status data after the header).
    let total = DM_IOCTL_SIZE + body.len().max(4096);
    let mut buf = vec![0u8; total];
    for (i, v) in DM_VERSION.iter().enumerate() {
        buf[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    let data_size = u32::try_from(total).map_err(|_| invalid("table too large"))?;
    buf[12..16].copy_from_slice(&data_size.to_ne_bytes());
    let data_start = u32::try_from(DM_IOCTL_SIZE).map_err(|_| invalid("layout"))?;
    buf[16..20].copy_from_slice(&data_start.to_ne_bytes());
    let count = u32::try_from(targets.len()).map_err(|_| invalid("too many targets"))?;
    buf[20..24].copy_from_slice(&count.to_ne_bytes());
    buf[28..32].copy_from_slice(&flags.to_ne_bytes());
    buf[48..48 + name.len()].copy_from_slice(name.as_bytes());
    buf[DM_IOCTL_SIZE..DM_IOCTL_SIZE + body.len()].copy_from_slice(&body);
    Ok(buf)
}

/// `_IOWR(0xfd, cmd, struct dm_ioctl)`.
const fn request(cmd: u8) -> libc::c_ulong {
    let dir_rw: libc::c_ulong = 3;
    (dir_rw << 30) | ((DM_IOCTL_SIZE as libc::c_ulong) << 16) | (0xfd << 8) | cmd as libc::c_ulong
}

fn ioctl(control: &File, cmd: u8, buf: &mut [u8]) -> std::io::Result<()> {
    if buf.len() < DM_IOCTL_SIZE {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: `buf` is a live, writable buffer at least as large as the
    // `data_size` recorded in its header (set by `encode` to buf.len()),
    // which is all the kernel reads or writes through the pointer.
    let rc = unsafe { libc::ioctl(control.as_raw_fd(), request(cmd), buf.as_mut_ptr()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Decodes the kernel's `huge_encode_dev` device number.
pub fn decode_dev(dev: u64) -> (u32, u32) {
    let major = u32::try_from((dev >> 8) & 0xfff).expect("masked to 12 bits");
    let minor = u32::try_from((dev & 0xff) | ((dev >> 12) & 0xfff00)).expect("masked to 20 bits");
    (major, minor)
}

/// A handle on /dev/mapper/control.
#[derive(Debug)]
pub struct Control {
    file: File,
}

impl Control {
    pub fn open() -> Result<Self, DmError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(Path::new("/dev/mapper/control"))
            .map_err(DmError::Control)?;
        Ok(Self { file })
    }

    /// Creates a read-only device with `targets` and makes it live.
    /// Returns its (major, minor).
    pub fn create_readonly(&self, name: &str, targets: &[Target]) -> Result<(u32, u32), DmError> {
        let err = |op| {
            move |source| DmError::Ioctl {
                op,
                name: name.to_owned(),
                source,
            }
        };
        let mut buf = encode(name, DM_READONLY_FLAG, &[])?;
        ioctl(&self.file, DM_DEV_CREATE_CMD, &mut buf).map_err(err("create"))?;
        let dev = u64::from_ne_bytes(buf[40..48].try_into().map_err(|_| DmError::Invalid {
            name: name.to_owned(),
            reason: "short answer",
        })?);
        let mut buf = encode(name, DM_READONLY_FLAG, targets)?;
        if let Err(e) = ioctl(&self.file, DM_TABLE_LOAD_CMD, &mut buf) {
            self.remove(name);
            return Err(err("table load")(e));
        }
        // DM_DEV_SUSPEND without DM_SUSPEND_FLAG resumes: the table goes live.
        let mut buf = encode(name, DM_READONLY_FLAG, &[])?;
        if let Err(e) = ioctl(&self.file, DM_DEV_SUSPEND_CMD, &mut buf) {
            self.remove(name);
            return Err(err("resume")(e));
        }
        Ok(decode_dev(dev))
    }

    /// Best-effort removal after a failed setup, so a retry starts clean.
    pub fn remove(&self, name: &str) {
        if let Ok(mut buf) = encode(name, 0, &[]) {
            if let Err(e) = ioctl(&self.file, DM_DEV_REMOVE_CMD, &mut buf) {
                log::warn!("device-mapper remove of {name}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_kernel_headers() {
        // Values from <linux/dm-ioctl.h> on x86_64.
        assert_eq!(request(DM_DEV_CREATE_CMD), 0xc138fd03);
        assert_eq!(request(DM_TABLE_LOAD_CMD), 0xc138fd09);
        assert_eq!(request(DM_DEV_SUSPEND_CMD), 0xc138fd06);
    }

    #[test]
    fn encodes_header_and_one_target() {
        let t = Target {
            start_sector: 0,
            sectors: 800,
            target_type: "verity".into(),
            params: "1 254:3 254:3 4096 4096 100 101 sha256 aa -".into(),
        };
        let buf = encode("root", DM_READONLY_FLAG, std::slice::from_ref(&t)).unwrap();
        assert_eq!(u32::from_ne_bytes(buf[0..4].try_into().unwrap()), 4);
        assert_eq!(
            u32::from_ne_bytes(buf[12..16].try_into().unwrap()) as usize,
            buf.len()
        );
        assert_eq!(u32::from_ne_bytes(buf[16..20].try_into().unwrap()), 312);
        assert_eq!(u32::from_ne_bytes(buf[20..24].try_into().unwrap()), 1);
        assert_eq!(&buf[48..52], b"root");
        let spec = &buf[312..];
        assert_eq!(u64::from_ne_bytes(spec[8..16].try_into().unwrap()), 800);
        let next = u32::from_ne_bytes(spec[20..24].try_into().unwrap()) as usize;
        assert_eq!(next % 8, 0);
        assert!(next > 40 + t.params.len());
        assert_eq!(&spec[24..30], b"verity");
        assert_eq!(&spec[40..40 + t.params.len()], t.params.as_bytes());
        assert_eq!(spec[40 + t.params.len()], 0);
    }

    #[test]
    fn rejects_bad_names_and_params() {
        assert!(encode("", 0, &[]).is_err());
        assert!(encode("a/b", 0, &[]).is_err());
        assert!(encode(&"x".repeat(128), 0, &[]).is_err());
        let t = Target {
            start_sector: 0,
            sectors: 1,
            target_type: "a-very-long-target-type".into(),
            params: String::new(),
        };
        assert!(encode("r", 0, &[t]).is_err());
    }

    #[test]
    fn device_numbers_decode() {
        assert_eq!(decode_dev((254 << 8) | 3), (254, 3));
        assert_eq!(
            decode_dev((254 << 8) | (0x123 & 0xff) | ((0x123 & !0xff) << 12)),
            (254, 0x123)
        );
    }
}
