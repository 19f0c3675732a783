//! Qubes VM names, as core-admin's `qubes.vm.validate_name` accepts them:
//! a letter, then letters, digits, `_`, `.` and `-`, at most 31 in all,
//! not ending in `-dm` (Qubes names stub domains that way) and not `none`
//! (the string form of "no VM"). Every daemon that takes a VM name from
//! outside (a definition file, a qrexec call, a command line) checks it
//! here before using it in a path or a message.

pub const MAX_LEN: usize = 31;

pub fn valid_vm_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && s.len() <= MAX_LEN
        && !s.ends_with("-dm")
        && s != "none"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_core_admin() {
        for ok in ["guivm", "sys-net", "work.2", "a", &"a".repeat(31)] {
            assert!(valid_vm_name(ok), "{ok}");
        }
        for bad in [
            "",
            "1vm",
            "-x",
            ".x",
            "a b",
            "a/b",
            "vm-dm",
            "none",
            "é",
            &"a".repeat(32),
        ] {
            assert!(!valid_vm_name(bad), "{bad}");
        }
    }
}
