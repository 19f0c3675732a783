//! The kernel command line's `qinit.*` keys: GRUB's configuration (which
//! qimage writes) passes the slot it booted, the test profiles add
//! switches, and qinit and qupdate read them.

use crate::Slot;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("kernel command line has no {SLOT_KEY}= (GRUB passes it)")]
    NoSlot,
    #[error("kernel command line: {SLOT_KEY}=`{0}` is not A or B")]
    BadSlot(String),
    #[error("kernel command line: {key}=`{value}` is not one of {allowed}")]
    BadValue {
        key: &'static str,
        value: String,
        allowed: &'static str,
    },
    #[error("kernel command line: {0} is given twice; refusing to pick one")]
    Twice(&'static str),
}

/// Every `qinit.*` key this parser knows.
pub const KEYS: [&str; 5] = [SLOT_KEY, ON_FAILURE_KEY, VERIFY_KEY, DEBUG_KEY, INIT_KEY];

/// The slot GRUB booted: `qinit.slot=A|B`.
pub const SLOT_KEY: &str = "qinit.slot";
/// What to do when the boot fails: `reboot` (default), `poweroff`, `halt`.
pub const ON_FAILURE_KEY: &str = "qinit.on_failure";
/// `full` (default): read the whole root once before use; `lazy`.
pub const VERIFY_KEY: &str = "qinit.verify";
/// A root shell on the console; ignored by production images.
pub const DEBUG_KEY: &str = "qinit.debug";
/// Another init after switch root; ignored by production images.
pub const INIT_KEY: &str = "qinit.init";

/// What to do when boot cannot complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Reboot so the boot loader spends a try and falls back.
    Reboot,
    /// Power off (for tests that want QEMU to exit).
    Poweroff,
    /// Stay up for inspection.
    Halt,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    pub slot: Slot,
    pub on_failure: OnFailure,
    /// Read the whole verity device once before using it, so corruption
    /// anywhere fails the boot instead of surfacing later as EIO.
    pub verify_full: bool,
    pub debug: bool,
    /// Another init to hand over to after switch root (benchmarks against
    /// systemd); honoured only by non-production images.
    pub init: Option<String>,
    /// `qinit.*` words this parser does not know (a typo, or a switch of
    /// another version): the caller says so, they change nothing.
    pub unknown: Vec<String>,
}

impl Cmdline {
    /// Parses `/proc/cmdline`. Other words are the kernel's and Xen's.
    /// A `qinit.*` key given twice is refused: the two readers must never
    /// pick different ones.
    pub fn parse(text: &str) -> Result<Self, CmdlineError> {
        let mut slot = None;
        let mut on_failure = None;
        let mut verify_full = None;
        let mut debug = None;
        let mut init = None;
        let mut unknown = Vec::new();
        fn once<T>(field: &mut Option<T>, key: &'static str, v: T) -> Result<(), CmdlineError> {
            match field.replace(v) {
                Some(_) => Err(CmdlineError::Twice(key)),
                None => Ok(()),
            }
        }
        for word in text.split_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            match key {
                SLOT_KEY => {
                    let s = value
                        .parse()
                        .map_err(|_| CmdlineError::BadSlot(value.to_owned()))?;
                    once(&mut slot, SLOT_KEY, s)?;
                }
                ON_FAILURE_KEY => {
                    let v = match value {
                        "reboot" => OnFailure::Reboot,
                        "poweroff" => OnFailure::Poweroff,
                        "halt" => OnFailure::Halt,
                        v => {
                            return Err(CmdlineError::BadValue {
                                key: ON_FAILURE_KEY,
                                value: v.to_owned(),
                                allowed: "reboot, poweroff, halt",
                            })
                        }
                    };
                    once(&mut on_failure, ON_FAILURE_KEY, v)?;
                }
                VERIFY_KEY => {
                    let v = match value {
                        "full" => true,
                        "lazy" => false,
                        v => {
                            return Err(CmdlineError::BadValue {
                                key: VERIFY_KEY,
                                value: v.to_owned(),
                                allowed: "full, lazy",
                            })
                        }
                    };
                    once(&mut verify_full, VERIFY_KEY, v)?;
                }
                DEBUG_KEY => once(&mut debug, DEBUG_KEY, ())?,
                INIT_KEY => {
                    if !value.starts_with('/') || value.contains("..") {
                        return Err(CmdlineError::BadValue {
                            key: INIT_KEY,
                            value: value.to_owned(),
                            allowed: "an absolute path",
                        });
                    }
                    once(&mut init, INIT_KEY, value.to_owned())?;
                }
                k if k.starts_with("qinit.") => unknown.push(word.to_owned()),
                _ => {}
            }
        }
        Ok(Self {
            slot: slot.ok_or(CmdlineError::NoSlot)?,
            on_failure: on_failure.unwrap_or(OnFailure::Reboot),
            verify_full: verify_full.unwrap_or(true),
            debug: debug.is_some(),
            init,
            unknown,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_slot_and_switches() {
        let c =
            Cmdline::parse("console=hvc0 qinit.slot=B qinit.on_failure=poweroff qinit.verify=lazy")
                .unwrap();
        assert_eq!(c.slot, Slot::B);
        assert_eq!(c.on_failure, OnFailure::Poweroff);
        assert!(!c.verify_full);
        assert!(!c.debug);
        assert_eq!(c.init, None);
    }

    #[test]
    fn defaults() {
        let c = Cmdline::parse("qinit.slot=A qinit.debug").unwrap();
        assert_eq!(c.on_failure, OnFailure::Reboot);
        assert!(c.verify_full);
        assert!(c.debug);
    }

    #[test]
    fn errors() {
        assert_eq!(Cmdline::parse("quiet").unwrap_err(), CmdlineError::NoSlot);
        assert_eq!(
            Cmdline::parse("qinit.slot=C").unwrap_err(),
            CmdlineError::BadSlot("C".into())
        );
        assert!(matches!(
            Cmdline::parse("qinit.slot=A qinit.on_failure=explode").unwrap_err(),
            CmdlineError::BadValue {
                key: "qinit.on_failure",
                ..
            }
        ));
        assert!(matches!(
            Cmdline::parse("qinit.slot=A qinit.init=../x").unwrap_err(),
            CmdlineError::BadValue {
                key: "qinit.init",
                ..
            }
        ));
    }

    #[test]
    fn unknown_qinit_words_are_reported_and_others_ignored() {
        let c = Cmdline::parse("quiet qinit.slot=A qinit.verfy=lazy foo.qinit=1").unwrap();
        assert_eq!(c.unknown, ["qinit.verfy=lazy"]);
        assert!(c.verify_full);
    }

    #[test]
    fn a_key_given_twice_is_refused() {
        for text in [
            "qinit.slot=A qinit.slot=B",
            "qinit.slot=A qinit.slot=A",
            "qinit.slot=A qinit.verify=full qinit.verify=lazy",
            "qinit.slot=A qinit.debug qinit.debug",
        ] {
            assert!(
                matches!(Cmdline::parse(text), Err(CmdlineError::Twice(_))),
                "{text}"
            );
        }
    }
}
