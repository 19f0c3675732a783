//! GUID partition tables on disk image files.
//!
//! The image builder plans a fixed layout with [`Layout`], copies each
//! partition's contents to the planned byte offsets itself, and writes the
//! protective MBR plus both GPT copies with [`write_tables`]. The updater
//! reads a table back from the running disk with [`read`] and finds the
//! inactive slot's partitions by name with [`Table::find`].
//!
//! Everything assumes 512-byte logical sectors: that is what the image
//! files use, and 4Kn disks are not a target of this appliance.

mod error;
mod guid;
mod layout;
mod table;

pub use error::{Error, HeaderSource};
pub use guid::Guid;
pub use layout::Layout;
pub use table::{read, write_tables, Partition, Table};

/// Logical sector size of every table this crate writes or reads.
pub const SECTOR_SIZE: u64 = 512;
/// Partition start alignment used by [`Layout`].
pub const ALIGNMENT: u64 = 1 << 20;
/// Number of entries in the entry arrays this crate writes.
pub const ENTRY_COUNT: u32 = 128;
/// Size of one entry in the entry arrays this crate writes.
pub const ENTRY_SIZE: u32 = 128;
/// Longest partition name GPT can store, in UTF-16 code units.
pub const MAX_NAME_UNITS: usize = 36;

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests;
