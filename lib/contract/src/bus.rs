//! The system bus: where it is, and who may own and call each of the
//! agents' APIs on it. qbus enforces the table at the broker (a name is
//! taken, a call delivered, a signal sent or received only as it says);
//! each agent checks its callers against the same table again, so a bus
//! bug alone does not open an API.

use crate::accounts::{Account, ROOT};

/// Where clients find the system bus (the freedesktop default).
pub const SYSTEM_BUS_SOCKET: &str = "/run/dbus/system_bus_socket";

/// A well-known name that only one account may own, with its interface
/// and object, and the accounts that may call it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Service {
    /// The well-known name, which is also the interface's name.
    pub name: &'static str,
    /// The object the service serves at; every interface on it (the
    /// standard Properties and Introspectable ones too) is the service's.
    pub path: &'static str,
    /// The only account that may own the name and send its signals.
    pub owner: Account,
    /// The accounts that may call it and receive its signals.
    pub callers: &'static [Account],
}

impl Service {
    pub fn interface(&self) -> &'static str {
        self.name
    }

    pub fn may_call(&self, uid: u32) -> bool {
        self.callers.iter().any(|a| a.uid == uid)
    }

    /// Whether a message's object path is this service's object or below.
    pub fn owns_path(&self, path: &str) -> bool {
        path == self.path
            || path
                .strip_prefix(self.path)
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

/// `org.qubesos.Update1` (qupdated): installs and rolls back releases.
pub const UPDATE1: Service = Service {
    name: "org.qubesos.Update1",
    path: "/org/qubesos/Update1",
    owner: ROOT,
    callers: &[ROOT],
};

/// `org.qubesos.Domains1` (qdomd): starts and stops the VMs.
pub const DOMAINS1: Service = Service {
    name: "org.qubesos.Domains1",
    path: "/org/qubesos/Domains1",
    owner: ROOT,
    callers: &[ROOT],
};

/// Every protected service. A well-known name not listed here may be owned
/// by root alone, so a new agent is closed until it is listed.
pub const SERVICES: &[Service] = &[UPDATE1, DOMAINS1];

pub fn by_name(name: &str) -> Option<&'static Service> {
    SERVICES.iter().find(|s| s.name == name)
}

/// The service a message to `path` or on `interface` belongs to, if any.
pub fn by_path_or_interface(
    path: Option<&str>,
    interface: Option<&str>,
) -> Option<&'static Service> {
    SERVICES.iter().find(|s| {
        path.is_some_and(|p| s.owns_path(p)) || interface.is_some_and(|i| i == s.interface())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_apis_are_root_only() {
        for s in SERVICES {
            assert_eq!(s.owner, ROOT, "{}", s.name);
            assert!(s.may_call(0), "{}", s.name);
            assert!(!s.may_call(65534), "{}", s.name);
            assert!(!s.may_call(101), "{}", s.name);
        }
        assert_eq!(by_name("org.qubesos.Update1"), Some(&UPDATE1));
        assert_eq!(by_name("org.qubesos.Update2"), None);
    }

    #[test]
    fn paths_below_the_object_count_but_not_lookalikes() {
        assert!(UPDATE1.owns_path("/org/qubesos/Update1"));
        assert!(UPDATE1.owns_path("/org/qubesos/Update1/x"));
        assert!(!UPDATE1.owns_path("/org/qubesos/Update10"));
        assert!(!UPDATE1.owns_path("/org/qubesos"));
        assert_eq!(
            by_path_or_interface(Some("/"), Some("org.qubesos.Domains1")),
            Some(&DOMAINS1)
        );
        assert_eq!(
            by_path_or_interface(
                Some("/org/qubesos/Update1"),
                Some("org.freedesktop.DBus.Properties")
            ),
            Some(&UPDATE1)
        );
        assert_eq!(by_path_or_interface(Some("/"), None), None);
    }
}
