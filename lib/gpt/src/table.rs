use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use crate::{Error, Guid, HeaderSource, ENTRY_COUNT, ENTRY_SIZE, MAX_NAME_UNITS, SECTOR_SIZE};

const SIGNATURE: &[u8; 8] = b"EFI PART";
const REVISION: u32 = 0x0001_0000;
const HEADER_SIZE: u32 = 92;
/// Sectors of the 128 × 128-byte entry arrays this crate writes.
pub(crate) const ENTRY_ARRAY_SECTORS: u64 = (ENTRY_COUNT as u64 * ENTRY_SIZE as u64) / SECTOR_SIZE;
/// Upper bound on an entry array read from disk, so a corrupt header cannot
/// make us allocate or read gigabytes.
const MAX_ENTRY_ARRAY_BYTES: u64 = 1 << 20;
const MAX_ENTRY_SIZE: u32 = 4096;
/// [`SECTOR_SIZE`] as `usize`, for buffers.
const SECTOR: usize = 512;
/// A header may be no longer than the sector that holds it.
const MAX_HEADER_SIZE: u32 = 512;

/// One partition: as planned by [`crate::Layout`] or as read from a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// 1-based index of the entry in the entry array (the `N` of `/dev/sdaN`).
    pub number: u32,
    pub name: String,
    pub type_guid: Guid,
    pub unique_guid: Guid,
    /// First sector, inclusive.
    pub first_lba: u64,
    /// Last sector, inclusive, as GPT stores it.
    pub last_lba: u64,
    pub attributes: u64,
}

impl Partition {
    /// Byte offset of the partition's start on the disk.
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR_SIZE
    }

    /// Number of sectors the partition spans.
    pub fn sectors(&self) -> u64 {
        self.last_lba - self.first_lba + 1
    }

    /// Size of the partition in bytes.
    pub fn size(&self) -> u64 {
        self.sectors() * SECTOR_SIZE
    }
}

/// A whole partition table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub disk_guid: Guid,
    /// Disk size in sectors; the backup header goes in the last one.
    pub disk_sectors: u64,
    pub first_usable_lba: u64,
    pub last_usable_lba: u64,
    /// Used entries only, in entry-array order.
    pub partitions: Vec<Partition>,
    /// Which copy this table was read from ([`HeaderSource::Primary`] for a
    /// freshly planned table). `Backup` means the primary copy is damaged
    /// and should be rewritten.
    pub source: HeaderSource,
}

impl Table {
    /// Disk size in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_sectors * SECTOR_SIZE
    }

    /// The partition with this GPT name, if exactly one has it.
    ///
    /// Two partitions with the same name give `None` rather than the first
    /// one: the updater overwrites what this returns, and guessing which of
    /// two `root_b`s is meant could destroy the running system.
    pub fn find(&self, name: &str) -> Option<&Partition> {
        let mut matches = self.partitions.iter().filter(|p| p.name == name);
        let found = matches.next()?;
        match matches.next() {
            Some(_) => None,
            None => Some(found),
        }
    }

    /// The partition with this 1-based entry number.
    pub fn partition(&self, number: u32) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.number == number)
    }

    /// Checks that [`write_tables`] can write this table: GUIDs set and
    /// distinct, names storable, numbers within the 128 entries written,
    /// partitions inside the usable range and not overlapping.
    pub fn validate(&self) -> Result<(), Error> {
        let n = self.disk_sectors;
        let layout_fits = n.checked_mul(SECTOR_SIZE).is_some()
            && self.first_usable_lba >= 2 + ENTRY_ARRAY_SECTORS
            && self.first_usable_lba <= self.last_usable_lba
            && n.checked_sub(ENTRY_ARRAY_SECTORS + 2)
                .is_some_and(|max_last| self.last_usable_lba <= max_last);
        if !layout_fits {
            return Err(Error::BadUsableRangeForWrite {
                first_usable: self.first_usable_lba,
                last_usable: self.last_usable_lba,
                disk_sectors: n,
            });
        }
        if self.disk_guid.is_zero() {
            return Err(Error::ZeroDiskGuid);
        }
        if self.partitions.len() > ENTRY_COUNT as usize {
            return Err(Error::TooManyPartitions {
                count: self.partitions.len(),
            });
        }
        let mut numbers: HashMap<u32, &str> = HashMap::new();
        let mut guids: HashMap<Guid, &str> = HashMap::new();
        for p in &self.partitions {
            if p.number == 0 || p.number > ENTRY_COUNT {
                return Err(Error::BadPartitionNumber {
                    name: p.name.clone(),
                    number: p.number,
                });
            }
            if let Some(first) = numbers.insert(p.number, &p.name) {
                return Err(Error::DuplicateNumber {
                    number: p.number,
                    first: first.to_owned(),
                    second: p.name.clone(),
                });
            }
            validate_name(&p.name)?;
            for (field, guid) in [("type", p.type_guid), ("unique", p.unique_guid)] {
                if guid.is_zero() {
                    return Err(Error::ZeroGuid {
                        field,
                        name: p.name.clone(),
                    });
                }
            }
            if let Some(first) = guids.insert(p.unique_guid, &p.name) {
                return Err(Error::DuplicateGuid {
                    guid: p.unique_guid,
                    first: first.to_owned(),
                    second: p.name.clone(),
                });
            }
        }
        check_partitions(
            &self.partitions,
            self.first_usable_lba,
            self.last_usable_lba,
        )
    }
}

/// Checks a name can be stored in an entry. Emptiness and uniqueness are
/// [`crate::Layout`]'s concern: GPT itself allows both.
pub(crate) fn validate_name(name: &str) -> Result<(), Error> {
    let units = name.encode_utf16().count();
    if units > MAX_NAME_UNITS {
        return Err(Error::NameTooLong {
            name: name.to_owned(),
            units,
        });
    }
    if name.contains('\0') {
        return Err(Error::NameContainsNul {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Range, bounds and overlap checks shared by reading and writing.
fn check_partitions(
    partitions: &[Partition],
    first_usable: u64,
    last_usable: u64,
) -> Result<(), Error> {
    for p in partitions {
        if p.first_lba > p.last_lba {
            return Err(Error::BadPartitionRange {
                number: p.number,
                name: p.name.clone(),
                first: p.first_lba,
                last: p.last_lba,
            });
        }
        if p.first_lba < first_usable || p.last_lba > last_usable {
            return Err(Error::PartitionOutOfBounds {
                number: p.number,
                name: p.name.clone(),
                first: p.first_lba,
                last: p.last_lba,
                first_usable,
                last_usable,
            });
        }
    }
    let mut sorted: Vec<&Partition> = partitions.iter().collect();
    sorted.sort_by_key(|p| p.first_lba);
    for pair in sorted.windows(2) {
        if pair[1].first_lba <= pair[0].last_lba {
            return Err(Error::PartitionsOverlap {
                first: describe(pair[0]),
                second: describe(pair[1]),
            });
        }
    }
    Ok(())
}

fn describe(p: &Partition) -> String {
    format!("{} ({})", p.number, p.name)
}

fn io_error(action: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { action, source }
}

/// Writes the protective MBR, the primary header and entry array at the
/// start, and the backup entry array and header at the end of `file`.
///
/// A regular file is resized to the table's disk size (partition contents
/// already copied in are kept); a block device must already be exactly that
/// size, since the backup header's position is part of the table. Only the
/// table sectors are written; the data is synced before returning.
pub fn write_tables(file: &mut File, table: &Table) -> Result<(), Error> {
    table.validate()?;
    let disk_size = table.disk_size();
    let metadata = file
        .metadata()
        .map_err(io_error(String::from("reading the disk's metadata")))?;
    if metadata.is_file() {
        file.set_len(disk_size)
            .map_err(io_error(format!("resizing the image to {disk_size} bytes")))?;
    } else {
        let device_size = file
            .seek(SeekFrom::End(0))
            .map_err(io_error(String::from("finding the device size")))?;
        if device_size != disk_size {
            return Err(Error::DeviceSizeMismatch {
                table_size: disk_size,
                device_size,
            });
        }
    }

    let last_lba = table.disk_sectors - 1;
    let backup_entries_lba = last_lba - ENTRY_ARRAY_SECTORS;
    let entries = encode_entries(table);
    let entries_crc = crc32fast::hash(&entries);
    let primary = encode_header(table, 1, last_lba, 2, entries_crc);
    let backup = encode_header(table, last_lba, 1, backup_entries_lba, entries_crc);

    let writes: [(&str, u64, &[u8]); 5] = [
        ("protective MBR", 0, &protective_mbr(table.disk_sectors)),
        ("primary GPT header", 1, &primary),
        ("primary entry array", 2, &entries),
        ("backup entry array", backup_entries_lba, &entries),
        ("backup GPT header", last_lba, &backup),
    ];
    for (what, lba, bytes) in writes {
        file.write_all_at(bytes, lba * SECTOR_SIZE)
            .map_err(io_error(format!("writing the {what} at LBA {lba}")))?;
    }
    file.sync_data()
        .map_err(io_error(String::from("syncing the partition table")))
}

fn protective_mbr(disk_sectors: u64) -> [u8; SECTOR] {
    let mut mbr = [0u8; SECTOR];
    let entry = &mut mbr[446..462];
    // Start CHS 0/0/2, i.e. LBA 1; end CHS all ones, as the UEFI spec asks
    // when the disk is too big to express in CHS (always true in practice).
    entry[1..4].copy_from_slice(&[0x00, 0x02, 0x00]);
    entry[4] = 0xEE;
    entry[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
    entry[8..12].copy_from_slice(&1u32.to_le_bytes());
    let size = u32::try_from(disk_sectors - 1).unwrap_or(u32::MAX);
    entry[12..16].copy_from_slice(&size.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    mbr
}

fn encode_entries(table: &Table) -> Vec<u8> {
    let mut entries = vec![0u8; (ENTRY_COUNT * ENTRY_SIZE) as usize];
    for p in &table.partitions {
        let start = (p.number as usize - 1) * ENTRY_SIZE as usize;
        let e = &mut entries[start..start + ENTRY_SIZE as usize];
        e[0..16].copy_from_slice(p.type_guid.as_bytes());
        e[16..32].copy_from_slice(p.unique_guid.as_bytes());
        e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
        e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
        e[48..56].copy_from_slice(&p.attributes.to_le_bytes());
        for (i, unit) in p.name.encode_utf16().enumerate() {
            e[56 + 2 * i..58 + 2 * i].copy_from_slice(&unit.to_le_bytes());
        }
    }
    entries
}

fn encode_header(
    table: &Table,
    my_lba: u64,
    alternate_lba: u64,
    entries_lba: u64,
    entries_crc: u32,
) -> [u8; SECTOR] {
    let mut h = [0u8; SECTOR];
    h[0..8].copy_from_slice(SIGNATURE);
    h[8..12].copy_from_slice(&REVISION.to_le_bytes());
    h[12..16].copy_from_slice(&HEADER_SIZE.to_le_bytes());
    h[24..32].copy_from_slice(&my_lba.to_le_bytes());
    h[32..40].copy_from_slice(&alternate_lba.to_le_bytes());
    h[40..48].copy_from_slice(&table.first_usable_lba.to_le_bytes());
    h[48..56].copy_from_slice(&table.last_usable_lba.to_le_bytes());
    h[56..72].copy_from_slice(table.disk_guid.as_bytes());
    h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
    h[80..84].copy_from_slice(&ENTRY_COUNT.to_le_bytes());
    h[84..88].copy_from_slice(&ENTRY_SIZE.to_le_bytes());
    h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
    let crc = crc32fast::hash(&h[..HEADER_SIZE as usize]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Reads the GPT of an image file or block device.
///
/// The primary copy is used when it is intact; otherwise the backup at the
/// last sector of the disk (located from the disk size, not from the
/// damaged primary header). Nothing read from the disk is trusted: every
/// size and offset is bounded before it is used.
pub fn read<R: Read + Seek>(disk: &mut R) -> Result<Table, Error> {
    let size = disk
        .seek(SeekFrom::End(0))
        .map_err(io_error(String::from("finding the disk size")))?;
    let disk_sectors = size / SECTOR_SIZE;
    if disk_sectors < 3 {
        return Err(Error::DiskTooSmallForGpt { size });
    }
    match read_copy(disk, disk_sectors, HeaderSource::Primary) {
        Ok(table) => Ok(table),
        Err(primary) => read_copy(disk, disk_sectors, HeaderSource::Backup).map_err(|backup| {
            Error::NoValidGpt {
                primary: Box::new(primary),
                backup: Box::new(backup),
            }
        }),
    }
}

struct Header {
    first_usable: u64,
    last_usable: u64,
    disk_guid: Guid,
    entries_lba: u64,
    num_entries: u32,
    entry_size: u32,
    entries_crc: u32,
}

fn read_copy<R: Read + Seek>(
    disk: &mut R,
    disk_sectors: u64,
    source: HeaderSource,
) -> Result<Table, Error> {
    let lba = match source {
        HeaderSource::Primary => 1,
        HeaderSource::Backup => disk_sectors - 1,
    };
    let mut sector = [0u8; SECTOR];
    read_at(disk, lba, &mut sector, &format!("{source} GPT header"))?;
    let header = parse_header(&sector, source, lba, disk_sectors)?;

    // parse_header bounded this to MAX_ENTRY_ARRAY_BYTES.
    let array_bytes = header.num_entries as usize * header.entry_size as usize;
    let mut array = vec![0u8; array_bytes];
    read_at(
        disk,
        header.entries_lba,
        &mut array,
        &format!("{source} entry array"),
    )?;
    let computed = crc32fast::hash(&array);
    if computed != header.entries_crc {
        return Err(Error::EntriesCrcMismatch {
            header: source,
            stored: header.entries_crc,
            computed,
        });
    }

    let mut partitions = Vec::new();
    for (number, entry) in (1u32..).zip(array.chunks_exact(header.entry_size as usize)) {
        let type_guid = guid_at(entry, 0);
        if type_guid.is_zero() {
            continue;
        }
        let units: Vec<u16> = entry[56..128]
            .chunks_exact(2)
            .map(|u| u16::from_le_bytes([u[0], u[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let name = String::from_utf16(&units).map_err(|_| Error::BadPartitionName { number })?;
        partitions.push(Partition {
            number,
            name,
            type_guid,
            unique_guid: guid_at(entry, 16),
            first_lba: u64_at(entry, 32),
            last_lba: u64_at(entry, 40),
            attributes: u64_at(entry, 48),
        });
    }
    check_partitions(&partitions, header.first_usable, header.last_usable)?;

    Ok(Table {
        disk_guid: header.disk_guid,
        disk_sectors,
        first_usable_lba: header.first_usable,
        last_usable_lba: header.last_usable,
        partitions,
        source,
    })
}

fn read_at<R: Read + Seek>(
    disk: &mut R,
    lba: u64,
    buf: &mut [u8],
    what: &str,
) -> Result<(), Error> {
    let action = || format!("reading the {what} at LBA {lba}");
    // Callers bound lba below the disk size, so this cannot overflow; the
    // check keeps that true if a caller ever changes.
    let offset = lba.checked_mul(SECTOR_SIZE).ok_or_else(|| Error::Io {
        action: action(),
        source: std::io::Error::other("offset overflows u64"),
    })?;
    disk.seek(SeekFrom::Start(offset))
        .and_then(|_| disk.read_exact(buf))
        .map_err(|source| Error::Io {
            action: action(),
            source,
        })
}

fn parse_header(
    h: &[u8; SECTOR],
    source: HeaderSource,
    lba: u64,
    disk_sectors: u64,
) -> Result<Header, Error> {
    let mut signature = [0u8; 8];
    signature.copy_from_slice(&h[0..8]);
    if &signature != SIGNATURE {
        return Err(Error::BadSignature {
            header: source,
            found: signature,
        });
    }
    let revision = u32_at(h, 8);
    if revision != REVISION {
        return Err(Error::UnsupportedRevision {
            header: source,
            revision,
        });
    }
    let header_size = u32_at(h, 12);
    if !(HEADER_SIZE..=MAX_HEADER_SIZE).contains(&header_size) {
        return Err(Error::BadHeaderSize {
            header: source,
            size: header_size,
        });
    }
    let stored = u32_at(h, 16);
    let mut zeroed = *h;
    zeroed[16..20].fill(0);
    let computed = crc32fast::hash(&zeroed[..header_size as usize]);
    if stored != computed {
        return Err(Error::HeaderCrcMismatch {
            header: source,
            stored,
            computed,
        });
    }
    let my_lba = u64_at(h, 24);
    if my_lba != lba {
        return Err(Error::BadMyLba {
            header: source,
            expected: lba,
            found: my_lba,
        });
    }
    let entry_size = u32_at(h, 84);
    if !(ENTRY_SIZE..=MAX_ENTRY_SIZE).contains(&entry_size) || !entry_size.is_power_of_two() {
        return Err(Error::BadEntrySize {
            header: source,
            size: entry_size,
        });
    }
    let num_entries = u32_at(h, 80);
    let array_bytes = u64::from(num_entries) * u64::from(entry_size);
    if array_bytes > MAX_ENTRY_ARRAY_BYTES {
        return Err(Error::TooManyEntries {
            header: source,
            count: num_entries,
            entry_size,
        });
    }
    let first = u64_at(h, 40);
    let last = u64_at(h, 48);
    if first > last {
        return Err(Error::BadUsableRange {
            header: source,
            first,
            last,
        });
    }
    // LBA 0 and 1 hold the MBR and primary header, the last LBA the backup
    // header; partitions there would overwrite the table.
    if first < 2 || last > disk_sectors - 2 {
        return Err(Error::UsableRangeOutsideDisk {
            header: source,
            first,
            last,
            disk_sectors,
        });
    }
    let entries_lba = u64_at(h, 72);
    let array_sectors = array_bytes.div_ceil(SECTOR_SIZE);
    if array_sectors > 0 {
        // The array must lie strictly between the primary header and the
        // backup header and outside the usable range.
        let fits = entries_lba >= 2
            && entries_lba
                .checked_add(array_sectors - 1)
                .is_some_and(|end| end <= disk_sectors - 2 && (end < first || entries_lba > last));
        if !fits {
            return Err(Error::BadEntryArrayLocation {
                header: source,
                lba: entries_lba,
                sectors: array_sectors,
            });
        }
    }
    Ok(Header {
        first_usable: first,
        last_usable: last,
        disk_guid: guid_at(h, 56),
        entries_lba,
        num_entries,
        entry_size,
        entries_crc: u32_at(h, 88),
    })
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn guid_at(b: &[u8], at: usize) -> Guid {
    let mut v = [0u8; 16];
    v.copy_from_slice(&b[at..at + 16]);
    Guid::from_bytes(v)
}
