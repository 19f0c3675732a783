use std::collections::{HashMap, HashSet};

use crate::table::{validate_name, ENTRY_ARRAY_SECTORS};
use crate::{Error, Guid, HeaderSource, Partition, Table, ALIGNMENT, SECTOR_SIZE};

/// Sectors taken at the end of the disk by the backup entry array and header.
const BACKUP_SECTORS: u64 = ENTRY_ARRAY_SECTORS + 1;
/// First usable LBA: after the MBR, the primary header and its entry array.
pub(crate) const FIRST_USABLE_LBA: u64 = 2 + ENTRY_ARRAY_SECTORS;

#[derive(Clone, Debug)]
struct PartSpec {
    name: String,
    type_guid: Guid,
    /// `None` for the rest-of-disk partition.
    size: Option<u64>,
}

/// An ordered list of partitions to lay out on a new disk.
///
/// Every partition starts on a 1 MiB boundary and its size is rounded up to
/// a whole MiB, so partitions are contiguous and no space is left unowned
/// between them. The disk is either the size given to [`Layout::disk_size`]
/// or, without one, the sum of the partitions plus the GPT overhead rounded
/// up to 1 MiB.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    disk_size: Option<u64>,
    parts: Vec<PartSpec>,
}

impl Layout {
    pub fn new() -> Layout {
        Layout::default()
    }

    /// Fixes the total disk size in bytes (a multiple of 512). Needed for a
    /// rest-of-disk partition; without one, the disk is simply this large.
    pub fn disk_size(mut self, bytes: u64) -> Layout {
        self.disk_size = Some(bytes);
        self
    }

    /// Appends a partition of at least `size_bytes` bytes.
    pub fn add(mut self, name: &str, type_guid: Guid, size_bytes: u64) -> Layout {
        self.parts.push(PartSpec {
            name: name.to_owned(),
            type_guid,
            size: Some(size_bytes),
        });
        self
    }

    /// Appends a partition that takes the rest of the disk up to the last
    /// MiB boundary before the backup table; it must be the last one and
    /// needs [`Layout::disk_size`].
    pub fn add_rest(mut self, name: &str, type_guid: Guid) -> Layout {
        self.parts.push(PartSpec {
            name: name.to_owned(),
            type_guid,
            size: None,
        });
        self
    }

    /// Computes every partition's place. `unique_guid` is called once per
    /// partition with its name; pass a deterministic function such as
    /// `|name| Guid::derive("my-image", name)` for reproducible images.
    /// Partitions are numbered from 1 in the order they were added.
    pub fn plan(
        &self,
        disk_guid: Guid,
        mut unique_guid: impl FnMut(&str) -> Guid,
    ) -> Result<Table, Error> {
        if self.parts.len() > crate::ENTRY_COUNT as usize {
            return Err(Error::TooManyPartitions {
                count: self.parts.len(),
            });
        }
        if disk_guid.is_zero() {
            return Err(Error::ZeroDiskGuid);
        }
        let mut names = HashSet::new();
        for (index, spec) in self.parts.iter().enumerate() {
            if spec.name.is_empty() {
                return Err(Error::EmptyName { index });
            }
            validate_name(&spec.name)?;
            if !names.insert(spec.name.as_str()) {
                return Err(Error::DuplicateName {
                    name: spec.name.clone(),
                });
            }
            if spec.type_guid.is_zero() {
                return Err(Error::ZeroGuid {
                    field: "type",
                    name: spec.name.clone(),
                });
            }
            if spec.size.is_none() {
                if index + 1 != self.parts.len() {
                    return Err(Error::RestNotLast {
                        name: spec.name.clone(),
                    });
                }
                if self.disk_size.is_none() {
                    return Err(Error::RestWithoutDiskSize {
                        name: spec.name.clone(),
                    });
                }
            }
        }
        let fixed_disk_sectors = match self.disk_size {
            Some(size) if size % SECTOR_SIZE != 0 => {
                return Err(Error::UnalignedDiskSize { size });
            }
            Some(size) => Some(size / SECTOR_SIZE),
            None => None,
        };

        let align = ALIGNMENT / SECTOR_SIZE;
        let mut next = align;
        let mut partitions = Vec::with_capacity(self.parts.len());
        let mut guids: HashMap<Guid, &str> = HashMap::new();
        for (number, spec) in (1u32..).zip(&self.parts) {
            let overflow = || Error::SizeOverflow {
                name: spec.name.clone(),
                size: spec.size.unwrap_or(u64::MAX),
            };
            let first = next;
            let last = match (spec.size, fixed_disk_sectors) {
                (Some(0), _) => {
                    return Err(Error::ZeroSize {
                        name: spec.name.clone(),
                    })
                }
                (Some(bytes), _) => {
                    let sectors = align_up(bytes, ALIGNMENT).ok_or_else(overflow)? / SECTOR_SIZE;
                    first.checked_add(sectors - 1).ok_or_else(overflow)?
                }
                (None, Some(disk_sectors)) => {
                    // End on a MiB boundary too, giving up the sub-MiB tail:
                    // a whole-MiB partition is what tools expect (sgdisk -v
                    // warns otherwise) and what fixed-size images fit.
                    let end = disk_sectors.saturating_sub(BACKUP_SECTORS) / align * align;
                    if end <= first {
                        return Err(Error::DiskTooSmall {
                            needed: (first + align + BACKUP_SECTORS) * SECTOR_SIZE,
                            size: disk_sectors * SECTOR_SIZE,
                        });
                    }
                    end - 1
                }
                // Rejected above; kept total so no unwrap is needed.
                (None, None) => {
                    return Err(Error::RestWithoutDiskSize {
                        name: spec.name.clone(),
                    })
                }
            };
            next = last.checked_add(1).ok_or_else(overflow)?;

            let guid = unique_guid(&spec.name);
            if guid.is_zero() {
                return Err(Error::ZeroGuid {
                    field: "unique",
                    name: spec.name.clone(),
                });
            }
            if let Some(first) = guids.insert(guid, &spec.name) {
                return Err(Error::DuplicateGuid {
                    guid,
                    first: first.to_owned(),
                    second: spec.name.clone(),
                });
            }
            partitions.push(Partition {
                number,
                name: spec.name.clone(),
                type_guid: spec.type_guid,
                unique_guid: guid,
                first_lba: first,
                last_lba: last,
                attributes: 0,
            });
        }

        let too_big = || Error::SizeOverflow {
            name: String::from("<disk>"),
            size: u64::MAX,
        };
        let needed_sectors = next.checked_add(BACKUP_SECTORS).ok_or_else(too_big)?;
        let needed = needed_sectors
            .checked_mul(SECTOR_SIZE)
            .ok_or_else(too_big)?;
        let disk_sectors = match fixed_disk_sectors {
            Some(sectors) => {
                if sectors < needed_sectors {
                    return Err(Error::DiskTooSmall {
                        needed,
                        size: sectors * SECTOR_SIZE,
                    });
                }
                sectors
            }
            None => align_up(needed, ALIGNMENT).ok_or_else(too_big)? / SECTOR_SIZE,
        };

        Ok(Table {
            disk_guid,
            disk_sectors,
            first_usable_lba: FIRST_USABLE_LBA,
            last_usable_lba: disk_sectors - BACKUP_SECTORS - 1,
            partitions,
            source: HeaderSource::Primary,
        })
    }
}

fn align_up(value: u64, align: u64) -> Option<u64> {
    value.checked_add(align - 1).map(|v| v / align * align)
}
