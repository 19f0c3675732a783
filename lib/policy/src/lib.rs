//! qrexec policy as Qubes R4.2 defines it (core-qrexec
//! `qrexec/policy/parser.py`; notes in `docs/reference/qrexec-policy.md`):
//!
//! - [`parse`]: one file's lines into [`Rule`]s (`service argument source
//!   target action [key=value...]`), every error with its file, line and
//!   reason;
//! - [`load`]: the policy directories in order (the owner's on /var, then
//!   the shipped `/etc/qubes/policy.d`), files in C-locale order, with
//!   `!include` and `!include-dir`; a bad file is rejected, the files
//!   before it stay in force, and a deny-everything rule takes its place;
//! - [`eval`]: the first matching rule decides a [`Request`] against the
//!   [`System`] (the domains, their types and tags); no match is a deny;
//! - [`query`]: the policy daemon's socket, where qrexec-daemon asks.

pub mod eval;
pub mod load;
pub mod parse;
pub mod query;

pub use eval::{Domain, Request, Resolution, System};
pub use load::{load, Policy};
pub use parse::{Action, Rule, Token};

/// The shipped policy, read-only in the image.
pub const SHIPPED_DIR: &str = "/etc/qubes/policy.d";
/// The owner's policy on /var: its files come first when their names sort
/// first, and hide shipped files of the same name.
pub const OWNER_DIR: &str = "/var/lib/qubes/policy.d";
/// Where the policy daemon answers qrexec-daemon (`POLICYSOCKET`).
pub const SOCKET: &str = "/run/qubes/policy.sock";
