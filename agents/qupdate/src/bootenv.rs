//! The boot state in GRUB's environment block on the ESP, read and written
//! in place through the file's extents on the raw partition (the way GRUB
//! itself writes it), so no mount is needed and the file never moves or
//! changes size. Every write is flushed and read back before it counts.

use std::io::{Seek, SeekFrom, Write};

use grubenv::{BootState, Env};

use crate::disk::Disk;

/// Where GRUB's environment block lives on the ESP (contract).
pub const GRUBENV_PATH: &str = "/EFI/BOOT/grubenv";

#[derive(Debug, thiserror::Error)]
pub enum BootEnvError {
    #[error("locating {GRUBENV_PATH} on the ESP")]
    Locate(#[source] qfat::Error),
    #[error("{GRUBENV_PATH} is {0} bytes, not 1024")]
    Size(u64),
    #[error("reading {GRUBENV_PATH}")]
    Read(#[source] qfat::Error),
    #[error("writing {GRUBENV_PATH}")]
    Write(#[source] qfat::Error),
    #[error("syncing the disk")]
    Sync(#[source] std::io::Error),
    #[error("{GRUBENV_PATH} is malformed")]
    Parse(#[source] grubenv::Error),
    #[error("the new boot state does not make a valid {GRUBENV_PATH}")]
    Render(#[source] grubenv::Error),
    #[error("{GRUBENV_PATH} read back differs from what was written")]
    Verify,
}

/// Reads the environment and the A/B state in it.
pub fn load(disk: &mut Disk) -> Result<(Env, BootState), BootEnvError> {
    let ext = qfat::locate(&mut disk.file, disk.esp.offset, disk.esp.size, GRUBENV_PATH)
        .map_err(BootEnvError::Locate)?;
    if ext.size != grubenv::BLOCK_SIZE as u64 {
        return Err(BootEnvError::Size(ext.size));
    }
    let bytes =
        qfat::read_file(&mut disk.file, disk.esp.offset, &ext).map_err(BootEnvError::Read)?;
    let env = Env::parse(&bytes).map_err(BootEnvError::Parse)?;
    let state = BootState::from_env(&env).map_err(BootEnvError::Parse)?;
    Ok((env, state))
}

/// Writes `state` into the environment (other variables kept), syncs and
/// verifies by reading it back.
pub fn store(disk: &mut Disk, env: &mut Env, state: &BootState) -> Result<(), BootEnvError> {
    state.apply_to(env).map_err(BootEnvError::Render)?;
    let block = env.to_block().map_err(BootEnvError::Render)?;
    let ext = qfat::locate(&mut disk.file, disk.esp.offset, disk.esp.size, GRUBENV_PATH)
        .map_err(BootEnvError::Locate)?;
    qfat::write_in_place(&mut disk.file, disk.esp.offset, &ext, &block)
        .map_err(BootEnvError::Write)?;
    disk.file.flush().map_err(BootEnvError::Sync)?;
    disk.file.sync_all().map_err(BootEnvError::Sync)?;
    disk.file
        .seek(SeekFrom::Start(0))
        .map_err(BootEnvError::Sync)?;
    let back =
        qfat::read_file(&mut disk.file, disk.esp.offset, &ext).map_err(BootEnvError::Read)?;
    if back != block {
        return Err(BootEnvError::Verify);
    }
    Ok(())
}
