//! The boot state in GRUB's environment on the ESP, read and written in
//! place through the files' extents on the raw partition (the way GRUB
//! itself writes them), so no mount is needed and no file ever moves or
//! changes size. The environment is kept in two copies
//! ([`grubenv::COPIES`]): the first whole one counts, as in GRUB's script,
//! and every store writes both, the primary first, each flushed and read
//! back before the next, so a cut anywhere leaves a whole copy.

use std::io::{Seek, SeekFrom, Write};

use grubenv::{BootState, Env};

use crate::disk::Disk;

#[derive(Debug, thiserror::Error)]
pub enum BootEnvError {
    #[error("locating {path} on the ESP")]
    Locate {
        path: String,
        #[source]
        source: qfat::Error,
    },
    #[error("{path} is {size} bytes, not 1024")]
    Size { path: String, size: u64 },
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: qfat::Error,
    },
    #[error("writing {path}")]
    Write {
        path: String,
        #[source]
        source: qfat::Error,
    },
    #[error("syncing the disk")]
    Sync(#[source] std::io::Error),
    #[error("the GRUB environment on the ESP")]
    NoWholeCopy(#[source] grubenv::NoWholeCopy),
    #[error("the new boot state does not make a valid GRUB environment")]
    Render(#[source] grubenv::Error),
    #[error("{path} read back differs from what was written")]
    Verify { path: String },
}

/// One copy's location on the ESP.
fn locate(disk: &mut Disk, copy: usize) -> Result<qfat::FileExtents, BootEnvError> {
    let path = grubenv::copy_path(copy);
    let ext =
        qfat::locate(&mut disk.file, disk.esp.offset, disk.esp.size, &path).map_err(|source| {
            BootEnvError::Locate {
                path: path.clone(),
                source,
            }
        })?;
    if ext.size != grubenv::BLOCK_SIZE as u64 {
        return Err(BootEnvError::Size {
            path,
            size: ext.size,
        });
    }
    Ok(ext)
}

/// One copy's bytes, or why they cannot be had.
fn read_copy(disk: &mut Disk, copy: usize) -> Result<Vec<u8>, BootEnvError> {
    let ext = locate(disk, copy)?;
    qfat::read_file(&mut disk.file, disk.esp.offset, &ext).map_err(|source| BootEnvError::Read {
        path: grubenv::copy_path(copy),
        source,
    })
}

/// Reads the environment and the A/B state in it from the first whole
/// copy. Neither whole is an error: the caller refuses to act on a boot
/// state it cannot read.
pub fn load(disk: &mut Disk) -> Result<(Env, BootState), BootEnvError> {
    let reason = |r: Result<Vec<u8>, BootEnvError>| r.map_err(|e| qcontract::error_chain(&e));
    let picked = grubenv::pick([reason(read_copy(disk, 0)), reason(read_copy(disk, 1))])
        .map_err(BootEnvError::NoWholeCopy)?;
    Ok((picked.env, picked.state))
}

/// Writes `state` into the environment (other variables kept), into both
/// copies in turn; each is synced and verified by reading it back before
/// the next is touched.
///
/// A cut in the primary's write leaves GRUB the secondary, so first the
/// secondary must hold the state GRUB goes by now. It may be whole and
/// older: GRUB saves the copy it read from before the other, and an
/// earlier store may have stopped between the two. Then the current state
/// is copied into it first.
pub fn store(disk: &mut Disk, env: &mut Env, state: &BootState) -> Result<(), BootEnvError> {
    state.apply_to(env).map_err(BootEnvError::Render)?;
    let block = env.to_block().map_err(BootEnvError::Render)?;
    let primary = read_copy(disk, 0);
    let secondary = read_copy(disk, 1);
    if let (Ok(primary), Ok(secondary)) = (&primary, &secondary) {
        if grubenv::whole(primary).is_ok() && primary != secondary {
            write_copy(disk, 1, primary)?;
        }
    }
    for copy in 0..grubenv::COPIES.len() {
        write_copy(disk, copy, &block)?;
    }
    Ok(())
}

/// Writes one copy in place, syncs, and reads it back.
fn write_copy(disk: &mut Disk, copy: usize, block: &[u8]) -> Result<(), BootEnvError> {
    let path = grubenv::copy_path(copy);
    let ext = locate(disk, copy)?;
    qfat::write_in_place(&mut disk.file, disk.esp.offset, &ext, block).map_err(|source| {
        BootEnvError::Write {
            path: path.clone(),
            source,
        }
    })?;
    disk.file.flush().map_err(BootEnvError::Sync)?;
    disk.file.sync_all().map_err(BootEnvError::Sync)?;
    disk.file
        .seek(SeekFrom::Start(0))
        .map_err(BootEnvError::Sync)?;
    let back = read_copy(disk, copy)?;
    if back != block {
        return Err(BootEnvError::Verify { path });
    }
    Ok(())
}
