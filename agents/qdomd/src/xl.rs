//! The xl configuration for a domain. qdomd creates domains through Xen's
//! own toolstack (`xl create <file>`); this is the only place that knows
//! xl's syntax. Every string was checked by [`crate::definition`] to hold no
//! quote, backslash, comma or control character, so quoting is plain.

use crate::definition::Domain;

/// The text of `/run/qdomd/<name>.cfg`.
///
/// Xen's own reactions to a guest's poweroff, reboot and crash are all
/// `destroy`: qdomd sees the domain go away and applies the definition's
/// restart policy with backoff, so there is one place that restarts.
pub fn config(d: &Domain) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        out.push_str(k);
        out.push_str(" = ");
        out.push_str(&v);
        out.push('\n');
    };
    let q = |s: &str| format!("\"{s}\"");
    line("name", q(&d.name));
    line("type", q(d.kind.as_str()));
    if let Some(k) = &d.kernel {
        line("kernel", q(k));
    }
    if let Some(r) = &d.ramdisk {
        line("ramdisk", q(r));
    }
    if let Some(c) = &d.cmdline {
        line("cmdline", q(c));
    }
    line("memory", d.memory_mib.to_string());
    line("maxmem", d.memory_mib.to_string());
    line("vcpus", d.vcpus.to_string());
    if !d.disks.is_empty() {
        let disks: Vec<String> = d
            .disks
            .iter()
            .map(|x| {
                format!(
                    "'format=raw, vdev={}, access={}, target={}'",
                    x.vdev,
                    if x.readonly { "ro" } else { "rw" },
                    x.target
                )
            })
            .collect();
        line("disk", format!("[ {} ]", disks.join(", ")));
    }
    if !d.pci.is_empty() {
        let pci: Vec<String> = d.pci.iter().map(|p| format!("'{p}'")).collect();
        line("pci", format!("[ {} ]", pci.join(", ")));
    }
    line("on_poweroff", q("destroy"));
    line("on_reboot", q("destroy"));
    line("on_crash", q("destroy"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::parse;
    use std::path::Path;

    #[test]
    fn a_pv_gui_vm_with_a_disk_and_a_gpu() {
        let d = parse(
            Path::new("/etc/qdomd/domains/gui.toml"),
            r#"
type = "pv"
kernel = "/usr/lib/qdomd/guivm/vmlinuz"
ramdisk = "/usr/lib/qdomd/guivm/initrd.gz"
cmdline = "console=hvc0 quiet"
memory_mib = 256
vcpus = 2
disks = [{ target = "/dev/vg0/gui", vdev = "xvda" }, { target = "/var/lib/gui.iso", vdev = "xvdb", readonly = true }]
pci = ["0000:00:02.0"]
role = "gui"
autostart = true
"#,
            None,
        )
        .unwrap();
        assert_eq!(
            config(&d),
            r#"name = "gui"
type = "pv"
kernel = "/usr/lib/qdomd/guivm/vmlinuz"
ramdisk = "/usr/lib/qdomd/guivm/initrd.gz"
cmdline = "console=hvc0 quiet"
memory = 256
maxmem = 256
vcpus = 2
disk = [ 'format=raw, vdev=xvda, access=rw, target=/dev/vg0/gui', 'format=raw, vdev=xvdb, access=ro, target=/var/lib/gui.iso' ]
pci = [ '0000:00:02.0' ]
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
"#
        );
    }

    #[test]
    fn an_hvm_domain_has_no_kernel_lines() {
        let d = parse(
            Path::new("/x/win.toml"),
            "type = \"hvm\"\nmemory_mib = 2048\ndisks = [{ target = \"/dev/vg0/win\", vdev = \"hda\" }]\n",
            None,
        )
        .unwrap();
        let c = config(&d);
        assert!(c.contains("type = \"hvm\"") && !c.contains("kernel"), "{c}");
        assert!(c.contains("vcpus = 1"), "{c}");
    }
}
