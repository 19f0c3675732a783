use std::io;
use std::path::PathBuf;

use crate::Slot;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("environment block is {size} bytes; GRUB's is exactly 1024")]
    WrongSize { size: usize },

    #[error("environment block does not start with \"# GRUB Environment Block\\n\"")]
    MissingHeader,

    #[error("line {line}: no '=' between variable name and value")]
    MissingEquals { line: usize },

    #[error("line {line}: not valid UTF-8")]
    NonUtf8 { line: usize },

    #[error("line {line}: value of {key:?} runs to the end of the block without a newline")]
    UnterminatedLine { line: usize, key: String },

    #[error("line {line}: value of {key:?} has '\\' before {found:?}; GRUB only escapes '\\' and newline")]
    BadEscape {
        line: usize,
        key: String,
        found: char,
    },

    #[error(
        "byte {offset}: padding contains {found:#04x}; after the variables only '#' may follow"
    )]
    BadPadding { offset: usize, found: u8 },

    #[error("line {line}: variable {key:?} is set twice")]
    DuplicateKey { line: usize, key: String },

    #[error("invalid variable name {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },

    #[error("value of {key:?} contains a NUL character, which GRUB cannot store")]
    NulInValue { key: String },

    #[error("variable {key:?} does not fit in the 1024-byte block ({needed} bytes needed in all)")]
    Overflow { key: String, needed: usize },

    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{path} is {size} bytes; a GRUB environment file must be exactly 1024")]
    WrongFileSize { path: PathBuf, size: u64 },

    #[error("{path}: {source}")]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<Error>,
    },

    #[error("boot state variable {name} is not set")]
    MissingVariable { name: &'static str },

    #[error("boot state variable {name} is {value:?}; expected {expected}")]
    BadValue {
        name: &'static str,
        value: String,
        expected: &'static str,
    },

    #[error("{tries} tries for slot {slot} is outside {allowed}")]
    BadTries {
        slot: Slot,
        tries: u8,
        allowed: &'static str,
    },

    #[error(
        "{name} is {found:?} but the state it guards reads {expected:?}: a torn or altered copy"
    )]
    Check {
        name: &'static str,
        found: String,
        expected: String,
    },

    #[error("slot order {order:?} must name A and B once each")]
    BadOrder { order: Vec<Slot> },
}
