//! Who may do what on the system bus: a pure function of the sender's uid,
//! the message's header and, for a call to a unique name, the protected
//! service that name owns. The table of services is `qcontract::bus`.
//!
//! busd itself already delivers a reply only to the call it answers and
//! has no eavesdropping; what it lacks is dbus-daemon's `<policy>`: any
//! client could own any name and call any service. The rules here close
//! that, and anything they do not name is root only (fail closed):
//! - a protected name is owned only by its owner's uid, any other
//!   well-known name only by root;
//! - a method call to a protected service (by its name, or by the unique
//!   name that owns it) comes only from its callers; a call to any other
//!   client, or without a destination, only from root;
//! - the bus's own API is open (Hello, AddMatch, GetConnectionUnixUser…)
//!   except `BecomeMonitor` and `UpdateActivationEnvironment`, root only;
//! - a signal on a protected interface or object is sent only by the
//!   owner's uid and received only by its callers;
//! - no client sends a signal on the bus's own interfaces or object
//!   (`NameOwnerChanged` and the like are the bus's), and a signal to one
//!   client (with a destination) is root's.

use qcontract::accounts::ROOT;
use qcontract::bus::{self, Service};

/// The bus's own name, where the broker's API is.
pub const BUS_NAME: &str = "org.freedesktop.DBus";

/// The error name a refused call gets, as dbus-daemon answers.
pub const ACCESS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";

/// The bus's own interfaces and objects: no client sends signals on them.
const BUS_INTERFACES: &[&str] = &["org.freedesktop.DBus", "org.freedesktop.DBus.Local"];
const BUS_PATHS: &[&str] = &["/org/freedesktop/DBus", "/org/freedesktop/DBus/Local"];

/// Bus methods that only root may call: a monitor sees every message, and
/// the activation environment is root's to set.
const ROOT_ONLY_BUS_METHODS: &[&str] = &["BecomeMonitor", "UpdateActivationEnvironment"];

/// What kind of message, as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    MethodCall,
    /// A method return or an error: busd delivers it only to the call it
    /// answers.
    Reply,
    Signal,
}

/// The header fields the rules read. `name_arg` is the first argument of
/// a call to the bus's `RequestName`, the only body the policy reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: Kind,
    pub destination: Option<&'a str>,
    pub path: Option<&'a str>,
    pub interface: Option<&'a str>,
    pub member: Option<&'a str>,
    pub name_arg: Option<&'a str>,
}

/// Why a message was refused; the text names the uid, what it tried and
/// the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("uid {uid} may not own {name}: only uid {owner} may")]
    Own { uid: u32, name: String, owner: u32 },
    #[error("uid {uid} may not own {name}: a name no policy lists is root's")]
    OwnUnlisted { uid: u32, name: String },
    #[error("uid {uid} may not call RequestName without a name")]
    RequestNameWithoutName { uid: u32 },
    #[error("uid {uid} may not call {member} on the bus: root only")]
    BusMethod { uid: u32, member: String },
    #[error("uid {uid} may not call {member} of {service}: not among its callers")]
    Call {
        uid: u32,
        service: &'static str,
        member: String,
    },
    #[error("uid {uid} may not call {member} on {destination}: calls to other clients are root's")]
    CallUnlisted {
        uid: u32,
        destination: String,
        member: String,
    },
    #[error("uid {uid} may not send signal {member}: only the bus sends its own signals")]
    BusSignal { uid: u32, member: String },
    #[error(
        "uid {uid} may not send signal {member} to {destination}: a signal to one client is root's"
    )]
    UnicastSignal {
        uid: u32,
        destination: String,
        member: String,
    },
    #[error("uid {uid} may not send signal {member} of {service}: only uid {owner} may")]
    Signal {
        uid: u32,
        service: &'static str,
        member: String,
        owner: u32,
    },
}

impl Message<'_> {
    fn member_name(&self) -> String {
        match (self.interface, self.member) {
            (Some(i), Some(m)) => format!("{i}.{m}"),
            (None, Some(m)) => m.to_owned(),
            _ => "(no member)".to_owned(),
        }
    }
}

/// May a client of `uid` send `msg`? `owner_of_destination` is the
/// protected service whose name the destination's unique name owns, if it
/// is a unique name that owns one (the caller looks that up in busd's name
/// registry); a well-known destination is looked up here.
pub fn may_send(
    uid: u32,
    msg: &Message<'_>,
    owner_of_destination: Option<&'static Service>,
) -> Result<(), Denied> {
    let root = uid == ROOT.uid;
    match msg.kind {
        Kind::Reply => Ok(()),
        Kind::Signal => {
            // Only the bus speaks for the bus: a client's NameOwnerChanged
            // would pass for the bus's own with zbus, which cannot check a
            // well-known sender.
            if msg.interface.is_some_and(|i| BUS_INTERFACES.contains(&i))
                || msg.path.is_some_and(|p| BUS_PATHS.contains(&p))
            {
                return Err(Denied::BusSignal {
                    uid,
                    member: msg.member_name(),
                });
            }
            // A signal to one client is a call in all but name, and calls
            // to other clients are root's: so is this.
            if let (Some(dest), false) = (msg.destination, root) {
                return Err(Denied::UnicastSignal {
                    uid,
                    destination: dest.to_owned(),
                    member: msg.member_name(),
                });
            }
            match bus::by_path_or_interface(msg.path, msg.interface) {
                Some(s) if s.owner.uid != uid => Err(Denied::Signal {
                    uid,
                    service: s.name,
                    member: msg.member_name(),
                    owner: s.owner.uid,
                }),
                _ => Ok(()),
            }
        }
        Kind::MethodCall => match msg.destination {
            Some(BUS_NAME) => may_call_bus(uid, msg),
            Some(dest) => {
                let service = bus::by_name(dest).or(owner_of_destination);
                match service {
                    Some(s) if s.may_call(uid) => Ok(()),
                    Some(s) => Err(Denied::Call {
                        uid,
                        service: s.name,
                        member: msg.member_name(),
                    }),
                    None if root => Ok(()),
                    None => Err(Denied::CallUnlisted {
                        uid,
                        destination: dest.to_owned(),
                        member: msg.member_name(),
                    }),
                }
            }
            None if root => Ok(()),
            None => Err(Denied::CallUnlisted {
                uid,
                destination: "(no destination)".to_owned(),
                member: msg.member_name(),
            }),
        },
    }
}

fn may_call_bus(uid: u32, msg: &Message<'_>) -> Result<(), Denied> {
    let root = uid == ROOT.uid;
    let member = msg.member.unwrap_or_default();
    if ROOT_ONLY_BUS_METHODS.contains(&member) && !root {
        return Err(Denied::BusMethod {
            uid,
            member: member.to_owned(),
        });
    }
    if member != "RequestName" {
        return Ok(());
    }
    let Some(name) = msg.name_arg else {
        return Err(Denied::RequestNameWithoutName { uid });
    };
    match bus::by_name(name) {
        Some(s) if s.owner.uid == uid => Ok(()),
        Some(s) => Err(Denied::Own {
            uid,
            name: name.to_owned(),
            owner: s.owner.uid,
        }),
        None if root => Ok(()),
        None => Err(Denied::OwnUnlisted {
            uid,
            name: name.to_owned(),
        }),
    }
}

/// May a client of `uid` receive `msg`? Only a protected service's signals
/// are held back (from everyone but its callers and its owner); calls and
/// replies reach only whom [`may_send`] let them reach.
pub fn may_receive(uid: u32, msg: &Message<'_>) -> bool {
    match msg.kind {
        Kind::Signal => match bus::by_path_or_interface(msg.path, msg.interface) {
            Some(s) => s.owner.uid == uid || s.may_call(uid),
            None => true,
        },
        Kind::MethodCall | Kind::Reply => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcontract::bus::{DOMAINS1, UPDATE1};

    const NOBODY: u32 = 65534;

    fn call(dest: &'static str, interface: &'static str, member: &'static str) -> Message<'static> {
        Message {
            kind: Kind::MethodCall,
            destination: Some(dest),
            path: Some("/"),
            interface: Some(interface),
            member: Some(member),
            name_arg: None,
        }
    }

    fn request_name(name: &'static str) -> Message<'static> {
        Message {
            name_arg: Some(name),
            ..call(BUS_NAME, BUS_NAME, "RequestName")
        }
    }

    #[test]
    fn only_the_owner_takes_a_protected_name_and_only_root_any_other() {
        assert!(may_send(0, &request_name("org.qubesos.Update1"), None).is_ok());
        assert!(may_send(0, &request_name("org.example.Other"), None).is_ok());
        let e = may_send(NOBODY, &request_name("org.qubesos.Update1"), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "uid 65534 may not own org.qubesos.Update1: only uid 0 may"
        );
        let e = may_send(101, &request_name("org.example.Other"), None).unwrap_err();
        assert!(matches!(e, Denied::OwnUnlisted { uid: 101, .. }), "{e}");
        let no_name = Message {
            name_arg: None,
            ..request_name("x")
        };
        assert!(may_send(0, &no_name, None).is_err());
    }

    #[test]
    fn the_bus_api_is_open_but_monitoring() {
        for m in [
            "Hello",
            "AddMatch",
            "GetConnectionUnixUser",
            "ListNames",
            "ReleaseName",
        ] {
            assert!(
                may_send(NOBODY, &call(BUS_NAME, BUS_NAME, m), None).is_ok(),
                "{m}"
            );
        }
        let monitor = call(BUS_NAME, "org.freedesktop.DBus.Monitoring", "BecomeMonitor");
        assert!(may_send(0, &monitor, None).is_ok());
        let e = may_send(NOBODY, &monitor, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "uid 65534 may not call BecomeMonitor on the bus: root only"
        );
        assert!(may_send(
            NOBODY,
            &call(BUS_NAME, BUS_NAME, "UpdateActivationEnvironment"),
            None
        )
        .is_err());
    }

    #[test]
    fn a_protected_service_is_called_only_by_its_callers_by_any_name() {
        let by_name = call("org.qubesos.Update1", "org.qubesos.Update1", "MarkGood");
        assert!(may_send(0, &by_name, None).is_ok());
        let e = may_send(NOBODY, &by_name, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "uid 65534 may not call org.qubesos.Update1.MarkGood of org.qubesos.Update1: not among its callers"
        );
        // Properties and introspection too: the destination decides, not
        // the interface.
        let props = call(
            "org.qubesos.Domains1",
            "org.freedesktop.DBus.Properties",
            "GetAll",
        );
        assert!(may_send(NOBODY, &props, None).is_err());
        // The unique name of the owner is the same service.
        let by_unique = call(":busd.3", "org.qubesos.Update1", "Rollback");
        assert!(may_send(NOBODY, &by_unique, Some(&UPDATE1)).is_err());
        assert!(may_send(0, &by_unique, Some(&UPDATE1)).is_ok());
        assert!(may_send(NOBODY, &call(":busd.3", "org.x", "Y"), Some(&DOMAINS1)).is_err());
    }

    #[test]
    fn calls_to_unlisted_clients_are_roots() {
        let c = call(":busd.7", "org.example.Thing", "Do");
        assert!(may_send(0, &c, None).is_ok());
        assert!(matches!(
            may_send(NOBODY, &c, None),
            Err(Denied::CallUnlisted { uid: NOBODY, .. })
        ));
        let no_dest = Message {
            destination: None,
            ..c
        };
        assert!(may_send(0, &no_dest, None).is_ok());
        assert!(may_send(NOBODY, &no_dest, None).is_err());
    }

    #[test]
    fn replies_pass_since_busd_matches_them_to_calls() {
        let reply = Message {
            kind: Kind::Reply,
            ..call(":busd.1", "", "")
        };
        assert!(may_send(NOBODY, &reply, None).is_ok());
        assert!(may_receive(NOBODY, &reply));
    }

    #[test]
    fn a_protected_services_signals_are_sent_by_its_owner_and_seen_by_its_callers() {
        let completed = Message {
            kind: Kind::Signal,
            destination: None,
            path: Some("/org/qubesos/Update1"),
            interface: Some("org.qubesos.Update1"),
            member: Some("Completed"),
            name_arg: None,
        };
        assert!(may_send(0, &completed, None).is_ok());
        assert!(matches!(
            may_send(NOBODY, &completed, None),
            Err(Denied::Signal {
                uid: NOBODY,
                owner: 0,
                ..
            })
        ));
        assert!(may_receive(0, &completed));
        assert!(!may_receive(NOBODY, &completed));
        // PropertiesChanged of the service's object is the service's too.
        let changed = Message {
            interface: Some("org.freedesktop.DBus.Properties"),
            member: Some("PropertiesChanged"),
            ..completed
        };
        assert!(may_send(NOBODY, &changed, None).is_err());
        assert!(!may_receive(NOBODY, &changed));
        // The bus's own signals are nobody else's, root's included.
        let owner_changed = Message {
            path: Some("/org/freedesktop/DBus"),
            interface: Some("org.freedesktop.DBus"),
            member: Some("NameOwnerChanged"),
            ..completed
        };
        for uid in [0, NOBODY] {
            assert!(matches!(
                may_send(uid, &owner_changed, None),
                Err(Denied::BusSignal { .. })
            ));
            let elsewhere = Message {
                path: Some("/x"),
                ..owner_changed
            };
            assert!(may_send(uid, &elsewhere, None).is_err());
        }
        // A signal to one client is root's.
        let unicast = Message {
            destination: Some(":busd.9"),
            path: Some("/org/example"),
            interface: Some("org.example.Thing"),
            ..completed
        };
        assert!(matches!(
            may_send(NOBODY, &unicast, None),
            Err(Denied::UnicastSignal { uid: NOBODY, .. })
        ));
        assert!(may_send(0, &unicast, None).is_ok());
        // Anyone else's signals are anyone's.
        let other = Message {
            path: Some("/org/example"),
            interface: Some("org.example.Thing"),
            ..completed
        };
        assert!(may_send(NOBODY, &other, None).is_ok());
        assert!(may_receive(NOBODY, &other));
    }
}
