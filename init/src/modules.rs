//! Loading kernel modules in the order qimage resolved at build time.

use std::fs::File;
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use rustix::system::finit_module;

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("{path}: cannot read module list")]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot open module")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: finit_module")]
    Load {
        path: PathBuf,
        #[source]
        source: Errno,
    },
}

/// Reads a load list (qcontract's format).
pub fn read_list(path: &Path) -> Result<Vec<PathBuf>, ModuleError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModuleError::List {
        path: path.to_owned(),
        source,
    })?;
    Ok(qcontract::modules::parse_list(&text))
}

/// Loads one module; a module that is already loaded is fine.
pub fn load(path: &Path) -> Result<(), ModuleError> {
    let f = File::open(path).map_err(|source| ModuleError::Open {
        path: path.to_owned(),
        source,
    })?;
    // No module parameters, no flags.
    match finit_module(&f, c"", 0) {
        Ok(()) | Err(Errno::EXIST) => Ok(()),
        Err(source) => Err(ModuleError::Load {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Loads every module of a list, in order; stops at the first failure.
pub fn load_list(list: &Path) -> Result<usize, ModuleError> {
    let mods = read_list(list)?;
    for m in &mods {
        load(m)?;
    }
    Ok(mods.len())
}
