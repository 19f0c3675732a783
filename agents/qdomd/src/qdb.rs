//! What qdomd writes into a VM's QubesDB before the VM is unpaused: the
//! entries core-admin writes (`QubesVM.create_qdb_entries` of Qubes R4.2,
//! and the GUI extension's `/qubes-gui-domain-xid`), from the domain's
//! definition. Pure: the daemon sends them over the QubesDB daemon's local
//! socket.

use qubesdb::wire::{check_data, QdbPath, MAX_DATA};

use crate::definition::{Domain, VmClass};

/// Keys qdomd writes itself; a definition's own entries may not replace
/// them.
const RESERVED: &[&str] = &[
    "/name",
    "/type",
    "/default-user",
    "/qubes-vm-type",
    "/qubes-vm-updateable",
    "/qubes-vm-persistence",
    "/qubes-debug-mode",
    "/qubes-base-template",
    "/qubes-random-seed",
    "/qubes-timezone",
    "/qubes-block-devices",
    "/qubes-usb-devices",
    "/qubes-gui-domain-xid",
];

/// Checks one of a definition's own entries: a QubesDB path (absolute, not
/// a directory), not one of qdomd's, and a value QubesDB can hold.
pub fn check_extra(key: &str, value: &str) -> Result<(), String> {
    QdbPath::new(key).map_err(|e| e.to_string())?;
    if !key.starts_with('/') || key.ends_with('/') {
        return Err("must be an absolute path that is not a directory".into());
    }
    if RESERVED.contains(&key) {
        return Err("is written by qdomd itself".into());
    }
    check_data(value.as_bytes()).map_err(|e| e.to_string())?;
    if value.len() >= MAX_DATA {
        return Err(format!(
            "value of {} bytes; QubesDB holds under {MAX_DATA}",
            value.len()
        ));
    }
    Ok(())
}

/// Everything the VM's database starts with, in the order it is written.
/// `gui_domid` is the GUI VM's domain for a VM that is not the GUI VM
/// itself; `seed` is 64 random bytes for `/qubes-random-seed`.
pub fn entries(d: &Domain, gui_domid: Option<u32>, seed: &[u8; 64]) -> Vec<(String, String)> {
    let q = &d.qubes;
    let class = q.class;
    let persistence = match class {
        VmClass::DispVM => "none",
        c if c.updateable() => "full",
        _ => "rw-only",
    };
    let vm_type = match class {
        VmClass::TemplateVM => "TemplateVM",
        _ => "AppVM",
    };
    let updateable = if class.updateable() { "True" } else { "False" };
    let mut out: Vec<(String, String)> = [
        ("/name", d.name.clone()),
        ("/type", class.as_str().to_owned()),
        ("/default-user", q.default_user.clone()),
        ("/qubes-vm-type", vm_type.to_owned()),
        ("/qubes-vm-updateable", updateable.to_owned()),
        ("/qubes-vm-persistence", persistence.to_owned()),
        ("/qubes-debug-mode", "0".to_owned()),
        (
            "/qubes-base-template",
            q.template.clone().unwrap_or_default(),
        ),
        ("/qubes-random-seed", base64(seed)),
        ("/qubes-timezone", "UTC".to_owned()),
        ("/qubes-block-devices", String::new()),
        ("/qubes-usb-devices", String::new()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    if let Some(gui) = gui_domid {
        out.push(("/qubes-gui-domain-xid".into(), gui.to_string()));
    }
    for (k, v) in &q.qubesdb {
        out.push((k.clone(), v.clone()));
    }
    out
}

/// Standard base64 with padding (Python's `base64.b64encode`).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::parse;
    use std::path::Path;

    fn domain(extra: &str) -> Domain {
        parse(
            Path::new("/etc/qdomd/domains/work.toml"),
            &format!("type = \"pv\"\nkernel = \"/k\"\nmemory_mib = 128\n{extra}"),
            None,
        )
        .unwrap()
    }

    #[test]
    fn an_app_vm_gets_core_admins_entries_and_the_gui_vm() {
        let d = domain(
            "[qubes]\ntemplate = \"debian-12\"\n[qubes.qubesdb]\n\"/qubes-service/foo\" = \"1\"\n",
        );
        let e = entries(&d, Some(3), &[0u8; 64]);
        let get = |k: &str| e.iter().find(|(p, _)| p == k).map(|(_, v)| v.as_str());
        assert_eq!(get("/name"), Some("work"));
        assert_eq!(get("/type"), Some("AppVM"));
        assert_eq!(get("/qubes-vm-type"), Some("AppVM"));
        assert_eq!(get("/qubes-vm-updateable"), Some("False"));
        assert_eq!(get("/qubes-vm-persistence"), Some("rw-only"));
        assert_eq!(get("/qubes-base-template"), Some("debian-12"));
        assert_eq!(get("/default-user"), Some("user"));
        assert_eq!(get("/qubes-gui-domain-xid"), Some("3"));
        assert_eq!(get("/qubes-service/foo"), Some("1"));
        assert_eq!(get("/qubes-random-seed").map(str::len), Some(88));
        for (k, v) in &e {
            QdbPath::new(k).unwrap();
            check_data(v.as_bytes()).unwrap();
        }
        let gui = entries(&d, None, &[0u8; 64]);
        assert!(!gui.iter().any(|(k, _)| k == "/qubes-gui-domain-xid"));
    }

    #[test]
    fn a_templates_root_persists() {
        let d = domain("[qubes]\nclass = \"TemplateVM\"\n");
        let e = entries(&d, None, &[0u8; 64]);
        assert!(e.contains(&("/qubes-vm-type".into(), "TemplateVM".into())));
        assert!(e.contains(&("/qubes-vm-updateable".into(), "True".into())));
        assert!(e.contains(&("/qubes-vm-persistence".into(), "full".into())));
    }

    #[test]
    fn own_entries_are_checked() {
        for bad in [
            "\"/name\" = \"x\"",
            "\"rel\" = \"x\"",
            "\"/dir/\" = \"x\"",
            "\"/a b\" = \"x\"",
            "\"/nul\" = \"a\\u0000b\"",
        ] {
            let r = parse(
                Path::new("/etc/qdomd/domains/work.toml"),
                &format!(
                    "type = \"pv\"\nkernel = \"/k\"\nmemory_mib = 128\n[qubes.qubesdb]\n{bad}\n"
                ),
                None,
            );
            assert!(r.is_err(), "{bad}");
        }
        for bad in [
            "default_user = \"Root\"",
            "template = \"1x\"",
            "label = \"Red!\"",
        ] {
            let r = parse(
                Path::new("/etc/qdomd/domains/work.toml"),
                &format!("type = \"pv\"\nkernel = \"/k\"\nmemory_mib = 128\n[qubes]\n{bad}\n"),
                None,
            );
            assert!(r.is_err(), "{bad}");
        }
    }

    #[test]
    fn base64_is_pythons() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
