//! Find where a file's bytes live on a raw FAT12/16/32 partition.
//!
//! The A/B updater rewrites GRUB's `EFI/BOOT/grubenv` on the ESP in place:
//! GRUB itself writes that file through its block list, so the file must keep
//! its clusters, and the updater must not need a (root-only) mount. [`locate`]
//! walks the boot sector, directories and FAT to list the byte ranges holding
//! a file; [`read_file`] and [`write_in_place`] use that list.
//!
//! The partition is outside data: every boot sector field is validated, every
//! offset is checked against the partition length, and cluster chains are
//! walked with loop detection, so a corrupt or hostile filesystem yields an
//! [`Error`] rather than a panic, a hang or a write outside the partition.

mod error;

pub use error::Error;

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom, Write};

/// A byte range relative to the start of the partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

/// Where a file's `size` bytes live, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileExtents {
    pub size: u64,
    pub extents: Vec<Extent>,
}

const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_DIRECTORY: u8 = 0x10;
const ATTR_LONG_NAME: u8 = 0x0F;
/// Only the low six attribute bits identify an LFN entry; the spec says to
/// ignore the two reserved high bits.
const ATTR_LONG_NAME_MASK: u8 = 0x3F;
/// Positions of the 13 UTF-16 code units inside an LFN entry.
const LFN_UNITS: [usize; 13] = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
/// 255 characters need at most 20 LFN entries.
const LFN_MAX_ENTRIES: u8 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Fat12,
    Fat16,
    Fat32,
}

impl Kind {
    /// FAT entry values from here up end a chain; the value just below
    /// marks a bad cluster.
    fn end_of_chain(self) -> u32 {
        match self {
            Kind::Fat12 => 0xFF8,
            Kind::Fat16 => 0xFFF8,
            Kind::Fat32 => 0x0FFF_FFF8,
        }
    }

    fn entry_bits(self) -> u64 {
        match self {
            Kind::Fat12 => 12,
            Kind::Fat16 => 16,
            Kind::Fat32 => 32,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Dir {
    /// FAT12/16 root directory: a fixed region between the FATs and the data.
    Fixed {
        offset: u64,
        len: usize,
    },
    Chain(u32),
}

struct Geometry {
    kind: Kind,
    cluster_size: u64,
    cluster_bytes: usize,
    /// Start of the FAT that is authoritative (FAT32 may disable mirroring).
    fat_offset: u64,
    root: Dir,
    data_offset: u64,
    cluster_count: u32,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// `Ok` if `ok`, else the error naming boot sector field `field`.
fn check(
    ok: bool,
    field: &'static str,
    value: impl Into<u64>,
    reason: &'static str,
) -> Result<(), Error> {
    let value = value.into();
    ok.then_some(()).ok_or(Error::InvalidField {
        field,
        value,
        reason,
    })
}

/// Validates the BIOS parameter block and derives the volume layout.
///
/// Every field is at most 32 bits wide and is multiplied by at most 4096 or
/// 255, so the `u64` arithmetic below cannot overflow; the only hazards are
/// zero values, underflow and regions that do not fit the partition.
fn parse_bpb(b: &[u8; 512], part_len: u64) -> Result<Geometry, Error> {
    let signature = le16(b, 510);
    if signature != 0xAA55 {
        return Err(Error::BadSignature { found: signature });
    }
    let bps = le16(b, 11);
    let ok = matches!(bps, 512 | 1024 | 2048 | 4096);
    check(ok, "BPB_BytsPerSec", bps, "not 512, 1024, 2048 or 4096")?;
    let spc = b[13];
    let ok = spc.is_power_of_two();
    check(ok, "BPB_SecPerClus", spc, "not a power of two")?;
    let reserved = le16(b, 14);
    check(reserved != 0, "BPB_RsvdSecCnt", reserved, "zero")?;
    let fats = b[16];
    check(fats != 0, "BPB_NumFATs", fats, "zero")?;
    let root_entries = le16(b, 17);
    // Like Linux and GRUB, a zero 16-bit FAT size is what makes a volume
    // FAT32; the cluster count only separates FAT12 from FAT16.
    let is_fat32 = le16(b, 22) == 0;
    let (fat_field, fat_size) = if is_fat32 {
        ("BPB_FATSz32", u64::from(le32(b, 36)))
    } else {
        ("BPB_FATSz16", u64::from(le16(b, 22)))
    };
    check(fat_size != 0, fat_field, fat_size, "zero")?;
    // FAT32 keeps its root directory in clusters, FAT12/16 in a fixed region.
    let ok = is_fat32 == (root_entries == 0);
    check(ok, "BPB_RootEntCnt", root_entries, "wrong for the FAT type")?;
    let (total_field, total) = match le16(b, 19) {
        0 => ("BPB_TotSec32", u64::from(le32(b, 32))),
        n => ("BPB_TotSec16", u64::from(n)),
    };
    check(total != 0, total_field, total, "zero")?;
    let bps = u64::from(bps);
    let ok = total * bps <= part_len;
    check(ok, total_field, total, "exceeds the partition")?;
    let root_sectors = (u64::from(root_entries) * 32).div_ceil(bps);
    let fat_start = u64::from(reserved);
    let meta = fat_start + u64::from(fats) * fat_size + root_sectors;
    let spc64 = u64::from(spc);
    let data_sectors = total.saturating_sub(meta);
    let ok = data_sectors >= spc64;
    check(ok, total_field, total, "leaves no data clusters")?;
    let count = data_sectors / spc64;
    let kind = match count {
        _ if is_fat32 => Kind::Fat32,
        0..4085 => Kind::Fat12,
        _ => Kind::Fat16,
    };
    // The highest cluster number, count + 1, must stay below the bad marker.
    let cluster_count = u32::try_from(count).unwrap_or(u32::MAX);
    let ok = cluster_count < kind.end_of_chain() - 2;
    check(ok, total_field, total, "too many clusters")?;
    let ok = fat_size * bps * 8 >= (count + 2) * kind.entry_bits();
    check(ok, fat_field, fat_size, "too small for the clusters")?;
    let mut active_fat = 0;
    let root = if is_fat32 {
        let flags = le16(b, 40);
        if flags & 0x80 != 0 {
            active_fat = u64::from(flags & 0x0F);
            let ok = active_fat < u64::from(fats);
            check(ok, "BPB_ExtFlags", flags, "no such active FAT")?;
        }
        let root_cluster = le32(b, 44);
        let ok = (2..=cluster_count + 1).contains(&root_cluster);
        check(ok, "BPB_RootClus", root_cluster, "outside the data area")?;
        Dir::Chain(root_cluster)
    } else {
        Dir::Fixed {
            offset: (fat_start + u64::from(fats) * fat_size) * bps,
            len: usize::from(root_entries) * 32,
        }
    };
    Ok(Geometry {
        kind,
        cluster_size: spc64 * bps,
        cluster_bytes: usize::from(spc) * usize::from(le16(b, 11)),
        fat_offset: (fat_start + active_fat * fat_size) * bps,
        root,
        data_offset: meta * bps,
        cluster_count,
    })
}

struct Part<'a, R> {
    dev: &'a mut R,
    offset: u64,
    len: u64,
}

impl<R: Read + Seek> Part<'_, R> {
    /// Reads `buf` from a partition-relative offset, refusing anything that
    /// is not entirely inside the partition.
    fn read_at(
        &mut self,
        offset: u64,
        buf: &mut [u8],
        what: impl Fn() -> String,
    ) -> Result<(), Error> {
        let len = buf.len() as u64;
        let abs = offset
            .checked_add(len)
            .filter(|&end| end <= self.len)
            .and_then(|end| self.offset.checked_add(end))
            .map(|_| self.offset + offset)
            .ok_or_else(|| Error::OutOfBounds {
                what: what(),
                offset,
                len,
                part_len: self.len,
            })?;
        self.dev
            .seek(SeekFrom::Start(abs))
            .and_then(|_| self.dev.read_exact(buf))
            .map_err(|source| Error::Io {
                what: what(),
                source,
            })
    }
}

struct Entry {
    attr: u8,
    cluster: u32,
    size: u32,
}

enum Scan {
    Found(Entry),
    End,
    More,
}

struct Volume<'a, R> {
    part: Part<'a, R>,
    geo: Geometry,
}

impl<R: Read + Seek> Volume<'_, R> {
    fn check_cluster(&self, cluster: u32, what: &str) -> Result<(), Error> {
        let max = self.geo.cluster_count + 1;
        if (2..=max).contains(&cluster) {
            Ok(())
        } else {
            Err(Error::ClusterOutOfRange {
                what: what.to_owned(),
                cluster,
                max,
            })
        }
    }

    /// Follows one FAT link; `seen` holds the chain so far, which both
    /// detects loops and bounds the walk by the number of clusters.
    fn follow(
        &mut self,
        cluster: u32,
        seen: &mut HashSet<u32>,
        what: &str,
    ) -> Result<Option<u32>, Error> {
        let kind = self.geo.kind;
        let n = u64::from(cluster);
        let (at, width) = match kind {
            Kind::Fat12 => (n + n / 2, 2),
            Kind::Fat16 => (n * 2, 2),
            Kind::Fat32 => (n * 4, 4),
        };
        let mut buf = [0u8; 4];
        let offset = self.geo.fat_offset + at;
        self.part.read_at(offset, &mut buf[..width], || {
            format!("FAT entry of cluster {cluster}")
        })?;
        let raw = u32::from_le_bytes(buf);
        let value = match kind {
            Kind::Fat12 if cluster % 2 == 1 => raw >> 4,
            Kind::Fat12 => raw & 0xFFF,
            Kind::Fat16 => raw,
            // The top four bits of a FAT32 entry are reserved.
            Kind::Fat32 => raw & 0x0FFF_FFFF,
        };
        let end = kind.end_of_chain();
        if value >= end {
            return Ok(None);
        }
        let what = what.to_owned();
        if value == 0 {
            return Err(Error::FreeCluster { what, cluster });
        }
        if value == end - 1 {
            return Err(Error::BadCluster { what, cluster });
        }
        self.check_cluster(value, &what)?;
        if !seen.insert(value) {
            return Err(Error::ChainLoop {
                what,
                cluster: value,
            });
        }
        Ok(Some(value))
    }

    fn cluster_offset(&self, cluster: u32) -> u64 {
        self.geo.data_offset + u64::from(cluster - 2) * self.geo.cluster_size
    }

    /// Searches one directory for `name`; `what` names the directory.
    fn find(&mut self, dir: Dir, name: &str, what: &str) -> Result<Option<Entry>, Error> {
        let mut lfn = Lfn::default();
        let fat32 = self.geo.kind == Kind::Fat32;
        match dir {
            Dir::Fixed { offset, len } => {
                let mut buf = vec![0; len];
                self.part.read_at(offset, &mut buf, || what.to_owned())?;
                match scan(&buf, &mut lfn, name, fat32) {
                    Scan::Found(e) => Ok(Some(e)),
                    Scan::End | Scan::More => Ok(None),
                }
            }
            Dir::Chain(start) => {
                self.check_cluster(start, what)?;
                let mut seen = HashSet::from([start]);
                let mut buf = vec![0; self.geo.cluster_bytes];
                let mut cluster = start;
                loop {
                    let offset = self.cluster_offset(cluster);
                    self.part
                        .read_at(offset, &mut buf, || format!("{what}, cluster {cluster}"))?;
                    match scan(&buf, &mut lfn, name, fat32) {
                        Scan::Found(e) => return Ok(Some(e)),
                        Scan::End => return Ok(None),
                        Scan::More => {}
                    }
                    match self.follow(cluster, &mut seen, what)? {
                        Some(next) => cluster = next,
                        None => return Ok(None),
                    }
                }
            }
        }
    }

    /// Maps a file's chain to extents, insisting that the chain holds
    /// exactly the clusters its size needs: with an inconsistent
    /// filesystem, an in-place write could land in someone else's data.
    fn file_extents(&mut self, start: u32, size: u64, what: &str) -> Result<FileExtents, Error> {
        let cs = self.geo.cluster_size;
        let needed = size.div_ceil(cs);
        let short = |clusters| Error::ChainTooShort {
            what: what.to_owned(),
            size,
            clusters,
        };
        let long = |clusters| Error::ChainTooLong {
            what: what.to_owned(),
            size,
            clusters,
        };
        match (start, needed) {
            (0, 0) => {
                return Ok(FileExtents {
                    size,
                    extents: Vec::new(),
                })
            }
            (0, _) => return Err(short(0)),
            (_, 0) => return Err(long(0)),
            _ => self.check_cluster(start, what)?,
        }
        let mut extents: Vec<Extent> = Vec::new();
        let mut seen = HashSet::from([start]);
        let mut cluster = start;
        for i in 0..needed {
            let offset = self.cluster_offset(cluster);
            let len = cs.min(size - i * cs);
            match extents.last_mut() {
                Some(last) if last.offset + last.len == offset => last.len += len,
                _ => extents.push(Extent { offset, len }),
            }
            let more = i + 1 < needed;
            match self.follow(cluster, &mut seen, what)? {
                Some(next) if more => cluster = next,
                Some(_) => return Err(long(needed)),
                None if more => return Err(short(i + 1)),
                None => {}
            }
        }
        Ok(FileExtents { size, extents })
    }
}

/// Long file name assembled from the LFN entries preceding a short entry.
#[derive(Default)]
struct Lfn {
    units: Vec<u16>,
    /// Sequence number the next LFN entry must carry; 0 once complete.
    next: u8,
    checksum: u8,
}

impl Lfn {
    fn push(&mut self, e: &[u8]) {
        let ord = e[0] & 0x3F;
        if e[0] & 0x40 != 0 {
            if ord == 0 || ord > LFN_MAX_ENTRIES {
                return self.reset();
            }
            self.units = vec![0xFFFF; usize::from(ord) * 13];
            self.checksum = e[13];
        } else if ord == 0 || ord != self.next || e[13] != self.checksum {
            return self.reset();
        }
        let at = usize::from(ord - 1) * 13;
        for (i, &pos) in LFN_UNITS.iter().enumerate() {
            self.units[at + i] = le16(e, pos);
        }
        self.next = ord - 1;
    }

    fn reset(&mut self) {
        self.units.clear();
        self.next = 0;
    }

    /// The long name belonging to short entry `e`, if a complete one whose
    /// checksum matches precedes it (otherwise it is an orphan from an
    /// LFN-unaware writer and must be ignored).
    fn take(&mut self, e: &[u8]) -> Option<String> {
        let units = std::mem::take(&mut self.units);
        let checksum = e[..11]
            .iter()
            .fold(0u8, |s, &b| s.rotate_right(1).wrapping_add(b));
        let complete = self.next == 0 && !units.is_empty() && self.checksum == checksum;
        self.reset();
        if !complete {
            return None;
        }
        let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
        String::from_utf16(&units[..end]).ok()
    }
}

fn short_name(e: &[u8]) -> Vec<u8> {
    let trim = |s: &[u8]| s.len() - s.iter().rev().take_while(|&&c| c == b' ').count();
    let mut name = e[..trim(&e[..8])].to_vec();
    // 0x05 stands in for a leading 0xE5 byte, which would mean "deleted".
    if name.first() == Some(&0x05) {
        name[0] = 0xE5;
    }
    let ext = &e[8..8 + trim(&e[8..11])];
    if !ext.is_empty() {
        name.push(b'.');
        name.extend_from_slice(ext);
    }
    name
}

fn scan(buf: &[u8], lfn: &mut Lfn, name: &str, fat32: bool) -> Scan {
    for e in buf.chunks_exact(32) {
        match e[0] {
            0x00 => return Scan::End,
            0xE5 => {
                lfn.reset();
                continue;
            }
            _ => {}
        }
        let attr = e[11];
        if attr & ATTR_LONG_NAME_MASK == ATTR_LONG_NAME {
            lfn.push(e);
            continue;
        }
        let long = lfn.take(e);
        if attr & ATTR_VOLUME_ID != 0 {
            continue;
        }
        let upper = |s: &str| s.chars().flat_map(char::to_uppercase).collect::<String>();
        let matches = short_name(e).eq_ignore_ascii_case(name.as_bytes())
            || long.is_some_and(|l| upper(&l) == upper(name));
        if matches {
            // FAT12/16 use the high cluster word for other purposes.
            let high = if fat32 { le16(e, 20) } else { 0 };
            return Scan::Found(Entry {
                attr,
                cluster: u32::from(high) << 16 | u32::from(le16(e, 26)),
                size: le32(e, 28),
            });
        }
    }
    Scan::More
}

/// Finds the byte ranges holding the file at `path` (e.g.
/// `/EFI/BOOT/grubenv`, matched case-insensitively against short and long
/// names) on the FAT partition spanning `part_len` bytes from `part_offset`.
pub fn locate<R: Read + Seek>(
    dev: &mut R,
    part_offset: u64,
    part_len: u64,
    path: &str,
) -> Result<FileExtents, Error> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let invalid_path = || Error::InvalidPath {
        path: path.to_owned(),
    };
    if components.iter().any(|c| *c == "." || *c == "..") {
        return Err(invalid_path());
    }
    let (file, dirs) = components.split_last().ok_or_else(invalid_path)?;
    let mut part = Part {
        dev,
        offset: part_offset,
        len: part_len,
    };
    let mut boot = [0u8; 512];
    part.read_at(0, &mut boot, || "boot sector".to_owned())?;
    let geo = parse_bpb(&boot, part_len)?;
    let mut vol = Volume { part, geo };
    let mut dir = vol.geo.root;
    let mut parent = "root directory".to_owned();
    let mut so_far = String::new();
    for name in dirs {
        so_far = format!("{so_far}/{name}");
        let entry = vol
            .find(dir, name, &parent)?
            .ok_or_else(|| Error::NotFound {
                component: so_far.clone(),
            })?;
        if entry.attr & ATTR_DIRECTORY == 0 {
            return Err(Error::NotADirectory { component: so_far });
        }
        parent = format!("directory {so_far}");
        vol.check_cluster(entry.cluster, &parent)?;
        dir = Dir::Chain(entry.cluster);
    }
    so_far = format!("{so_far}/{file}");
    let entry = vol
        .find(dir, file, &parent)?
        .ok_or_else(|| Error::NotFound {
            component: so_far.clone(),
        })?;
    if entry.attr & ATTR_DIRECTORY != 0 {
        return Err(Error::IsADirectory { component: so_far });
    }
    vol.file_extents(
        entry.cluster,
        u64::from(entry.size),
        &format!("file {so_far}"),
    )
}

/// Checks caller-supplied extents before any I/O and returns each as an
/// absolute device offset and an in-memory length.
fn spans(part_offset: u64, fe: &FileExtents) -> Result<Vec<(u64, usize)>, Error> {
    let mut sum = 0u64;
    let mut out = Vec::with_capacity(fe.extents.len());
    for e in &fe.extents {
        let overflow = || Error::ExtentOverflow {
            offset: e.offset,
            len: e.len,
        };
        let abs = part_offset.checked_add(e.offset).ok_or_else(overflow)?;
        abs.checked_add(e.len).ok_or_else(overflow)?;
        sum = sum.checked_add(e.len).ok_or_else(overflow)?;
        out.push((abs, usize::try_from(e.len).map_err(|_| overflow())?));
    }
    if sum != fe.size {
        return Err(Error::ExtentsMismatch { size: fe.size, sum });
    }
    Ok(out)
}

/// Reads a located file's contents.
pub fn read_file<R: Read + Seek>(
    dev: &mut R,
    part_offset: u64,
    extents: &FileExtents,
) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    for (abs, len) in spans(part_offset, extents)? {
        let start = out.len();
        out.resize(start + len, 0);
        dev.seek(SeekFrom::Start(abs))
            .and_then(|_| dev.read_exact(&mut out[start..]))
            .map_err(|source| Error::Io {
                what: format!("file extent at device byte {abs}"),
                source,
            })?;
    }
    Ok(out)
}

/// Overwrites a located file with `data` of exactly the same size, leaving
/// the filesystem metadata untouched. Does not sync: the caller fsyncs.
pub fn write_in_place<F: Read + Write + Seek>(
    dev: &mut F,
    part_offset: u64,
    extents: &FileExtents,
    data: &[u8],
) -> Result<(), Error> {
    let got = data.len() as u64;
    if got != extents.size {
        return Err(Error::SizeMismatch {
            size: extents.size,
            got,
        });
    }
    let mut rest = data;
    for (abs, len) in spans(part_offset, extents)? {
        let (chunk, tail) = rest.split_at(len);
        rest = tail;
        dev.seek(SeekFrom::Start(abs))
            .and_then(|_| dev.write_all(chunk))
            .map_err(|source| Error::Io {
                what: format!("file extent at device byte {abs}"),
                source,
            })?;
    }
    // Hand buffered writers' data down; durability is the caller's fsync.
    dev.flush().map_err(|source| Error::Io {
        what: "device flush".to_owned(),
        source,
    })
}
