//! The system accounts of dom0: one table, rendered into the image's
//! `/etc/passwd` and `/etc/group` by qimage and read by the programs that
//! switch to an account (the bus drops to [`MESSAGEBUS`]) or name one in a
//! policy ([`crate::bus`]). Nothing looks an account up in `/etc/passwd`
//! at run time: the uid a policy names and the uid a daemon runs as come
//! from the same constant.

/// One account: a user and its primary group of the same number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub name: &'static str,
    pub uid: u32,
    pub gid: u32,
    /// What the account is for (the passwd GECOS field).
    pub description: &'static str,
}

pub const ROOT: Account = Account {
    name: "root",
    uid: 0,
    gid: 0,
    description: "root",
};

/// The system bus broker after it has bound its socket (as dbus-daemon's
/// `messagebus`, and Debian's number for it is not fixed, so ours is).
pub const MESSAGEBUS: Account = Account {
    name: "messagebus",
    uid: 101,
    gid: 101,
    description: "system bus",
};

/// No privilege at all: what a test runs a hostile local process as.
pub const NOBODY: Account = Account {
    name: "nobody",
    uid: 65534,
    gid: 65534,
    description: "nobody",
};

pub const ALL: &[Account] = &[ROOT, MESSAGEBUS, NOBODY];

pub fn by_uid(uid: u32) -> Option<&'static Account> {
    ALL.iter().find(|a| a.uid == uid)
}

/// `/etc/passwd`. No account has a password or a shell but root's (which
/// production images do not ship).
pub fn render_passwd() -> String {
    ALL.iter()
        .map(|a| {
            let (home, shell) = match a.uid {
                0 => ("/root", "/bin/sh"),
                _ => ("/nonexistent", "/usr/sbin/nologin"),
            };
            format!(
                "{}:x:{}:{}:{}:{home}:{shell}\n",
                a.name, a.uid, a.gid, a.description
            )
        })
        .collect()
}

/// `/etc/group`: each account's own group, with no other members.
pub fn render_group() -> String {
    ALL.iter()
        .map(|a| format!("{}:x:{}:\n", a.name, a.gid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_are_unique() {
        for (i, a) in ALL.iter().enumerate() {
            for b in &ALL[i + 1..] {
                assert_ne!(a.name, b.name);
                assert_ne!(a.uid, b.uid);
                assert_ne!(a.gid, b.gid);
            }
        }
        assert_eq!(by_uid(101), Some(&MESSAGEBUS));
        assert_eq!(by_uid(1000), None);
    }

    #[test]
    fn passwd_and_group_lines() {
        let passwd = render_passwd();
        assert!(
            passwd.starts_with("root:x:0:0:root:/root:/bin/sh\n"),
            "{passwd}"
        );
        assert!(
            passwd.contains("messagebus:x:101:101:system bus:/nonexistent:/usr/sbin/nologin\n"),
            "{passwd}"
        );
        assert_eq!(passwd.lines().count(), ALL.len());
        let group = render_group();
        assert!(
            group.starts_with("root:x:0:\nmessagebus:x:101:\n"),
            "{group}"
        );
    }
}
