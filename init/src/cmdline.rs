//! The kernel command line: the slot GRUB booted and qinit's switches.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("kernel command line has no qinit.slot= (GRUB passes it)")]
    NoSlot,
    #[error("kernel command line: qinit.slot=`{0}` is not A or B")]
    BadSlot(String),
    #[error("kernel command line: {key}=`{value}` is not one of {allowed}")]
    BadValue {
        key: &'static str,
        value: String,
        allowed: &'static str,
    },
}

/// The A/B slot type is the boot state's own (one definition for GRUB's
/// contract, the updater and PID 1).
pub use grubenv::Slot;

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
}

impl Cmdline {
    pub fn parse(text: &str) -> Result<Self, CmdlineError> {
        let mut slot = None;
        let mut on_failure = OnFailure::Reboot;
        let mut verify_full = true;
        let mut debug = false;
        let mut init = None;
        for word in text.split_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            match key {
                "qinit.slot" => {
                    slot = Some(
                        value
                            .parse()
                            .map_err(|_| CmdlineError::BadSlot(value.to_owned()))?,
                    )
                }
                "qinit.on_failure" => {
                    on_failure = match value {
                        "reboot" => OnFailure::Reboot,
                        "poweroff" => OnFailure::Poweroff,
                        "halt" => OnFailure::Halt,
                        v => {
                            return Err(CmdlineError::BadValue {
                                key: "qinit.on_failure",
                                value: v.to_owned(),
                                allowed: "reboot, poweroff, halt",
                            })
                        }
                    }
                }
                "qinit.verify" => {
                    verify_full = match value {
                        "full" => true,
                        "lazy" => false,
                        v => {
                            return Err(CmdlineError::BadValue {
                                key: "qinit.verify",
                                value: v.to_owned(),
                                allowed: "full, lazy",
                            })
                        }
                    }
                }
                "qinit.debug" => debug = true,
                "qinit.init" => {
                    if !value.starts_with('/') || value.contains("..") {
                        return Err(CmdlineError::BadValue {
                            key: "qinit.init",
                            value: value.to_owned(),
                            allowed: "an absolute path",
                        });
                    }
                    init = Some(value.to_owned());
                }
                _ => {}
            }
        }
        Ok(Self {
            slot: slot.ok_or(CmdlineError::NoSlot)?,
            on_failure,
            verify_full,
            debug,
            init,
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
    }

    #[test]
    fn defaults() {
        let c = Cmdline::parse("qinit.slot=A").unwrap();
        assert_eq!(c.on_failure, OnFailure::Reboot);
        assert!(c.verify_full);
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
    }
}
