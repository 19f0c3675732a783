//! The hardware report: what Qubes's `qubes-hcl-report` records (CPU,
//! chipset, IOMMU, TPM, HVM and SLAT as Xen reports them, memory, Xen and
//! kernel versions) plus which scenarios passed, as YAML in the layout of
//! Qubes's HCL files.
//!
//! dom0 only prints raw facts (`xl info`, Xen's boot messages, sysfs); the
//! runner turns PCI ids into names with the host's `pci.ids` (Debian
//! package `pci.ids`), so the image carries no database for it.

use std::collections::BTreeMap;
use std::path::Path;

/// Where Debian's `pci.ids` package puts the database.
pub const PCI_IDS: &str = "/usr/share/misc/pci.ids";

/// One PCI function as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDevice {
    pub slot: String,
    /// 24-bit class code (`0x060000` is a host bridge).
    pub class: u32,
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
}

/// Raw facts from dom0.
#[derive(Debug, Clone, Default)]
pub struct HclFacts {
    /// `xl info`, key by key.
    pub xl_info: BTreeMap<String, String>,
    /// Xen's boot messages (`xl dmesg`).
    pub xen_log: String,
    pub cpu: String,
    pub kernel: String,
    /// `/sys/class/dmi/id/*`.
    pub dmi: BTreeMap<String, String>,
    /// `/sys/class/tpm/tpm0/tpm_version_major`, when there is a TPM.
    pub tpm_major: Option<String>,
    pub pci: Vec<PciDevice>,
    /// The image's version from the ready marker.
    pub image_version: String,
}

/// `key : value` lines, as `xl info` prints them.
pub fn parse_xl_info(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty() && !k.contains(' '))
        .collect()
}

/// `key=value` lines.
pub fn parse_pairs(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .collect()
}

/// `slot class vendor device revision` lines from sysfs (`0x` numbers);
/// lines that do not parse are skipped.
pub fn parse_pci(text: &str) -> Vec<PciDevice> {
    let hex = |s: &str| u32::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let [slot, class, vendor, device, revision] = f[..] else {
                return None;
            };
            Some(PciDevice {
                slot: slot.to_owned(),
                class: hex(class)?,
                vendor: u16::try_from(hex(vendor)?).ok()?,
                device: u16::try_from(hex(device)?).ok()?,
                revision: u8::try_from(hex(revision)?).ok()?,
            })
        })
        .collect()
}

/// Vendor and device names from `pci.ids`.
#[derive(Debug, Default)]
pub struct PciNames {
    vendors: BTreeMap<u16, String>,
    devices: BTreeMap<(u16, u16), String>,
}

impl PciNames {
    /// Reads the host's database; without one, names fall back to ids.
    pub fn load(path: &Path) -> Self {
        std::fs::read_to_string(path)
            .map(|t| Self::parse(&t))
            .unwrap_or_default()
    }

    pub fn parse(text: &str) -> Self {
        let mut names = Self::default();
        let mut vendor = None;
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            // The device classes come last; nothing after them is a vendor.
            if line.starts_with("C ") {
                break;
            }
            let id_name = |s: &str| {
                let (id, name) = s.split_once("  ")?;
                Some((u16::from_str_radix(id, 16).ok()?, name.trim().to_owned()))
            };
            if line.starts_with("\t\t") {
                // A subsystem: not reported.
            } else if let Some(rest) = line.strip_prefix('\t') {
                if let (Some(v), Some((d, name))) = (vendor, id_name(rest)) {
                    names.devices.insert((v, d), name);
                }
            } else if let Some((v, name)) = id_name(line) {
                vendor = Some(v);
                names.vendors.insert(v, name);
            } else {
                vendor = None;
            }
        }
        names
    }

    /// `Vendor Device [vvvv:dddd] (rev rr)`, as lspci -nn words it.
    pub fn describe(&self, d: &PciDevice) -> String {
        let vendor = self
            .vendors
            .get(&d.vendor)
            .map_or("Unknown vendor", String::as_str);
        let device = self
            .devices
            .get(&(d.vendor, d.device))
            .map_or("Device", String::as_str);
        format!(
            "{vendor} {device} [{:04x}:{:04x}] (rev {:02x})",
            d.vendor, d.device, d.revision
        )
    }
}

/// A scenario's outcome, for the `works` and `remark` fields.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub scenario: String,
    pub passed: bool,
}

/// The report's yes/no fields, derived the way qubes-hcl-report does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub hvm: bool,
    pub iommu: bool,
    pub slat: bool,
    pub remap: bool,
}

impl HclFacts {
    pub fn capabilities(&self) -> Capabilities {
        let caps = self.xl_info.get("virt_caps").map_or("", String::as_str);
        let words: Vec<&str> = caps.split_whitespace().collect();
        let log = self.xen_log.to_lowercase();
        Capabilities {
            hvm: words.contains(&"hvm"),
            iommu: words.iter().any(|w| w.ends_with("directio")),
            slat: words.contains(&"hap") || log.contains("hardware assisted paging (hap) detected"),
            remap: log.contains("interrupt remapping enabled"),
        }
    }

    pub fn xen_version(&self) -> String {
        let g = |k: &str| self.xl_info.get(k).cloned().unwrap_or_default();
        let v = format!("{}.{}{}", g("xen_major"), g("xen_minor"), g("xen_extra"));
        if v == "." {
            "unknown".into()
        } else {
            v
        }
    }

    /// The memory Xen sees, in MiB.
    pub fn memory_mib(&self) -> String {
        self.xl_info
            .get("total_memory")
            .cloned()
            .unwrap_or_else(|| "unknown".into())
    }

    fn class_devices(&self, names: &PciNames, pred: impl Fn(u32) -> bool) -> Vec<String> {
        self.pci
            .iter()
            .filter(|d| pred(d.class))
            .map(|d| names.describe(d))
            .collect()
    }

    /// The report as a Qubes HCL YAML document.
    pub fn to_yaml(&self, names: &PciNames, outcomes: &[Outcome], product: &str) -> String {
        let caps = self.capabilities();
        let yn = |b: bool| if b { "yes" } else { "no" };
        let tpm = match self.tpm_major.as_deref() {
            Some("2") => "2.0".to_owned(),
            Some("1") => "1.2".to_owned(),
            Some(_) => "yes".to_owned(),
            None => "no".to_owned(),
        };
        let dmi = |k: &str| self.dmi.get(k).cloned().unwrap_or_else(|| "unknown".into());
        let bios = match (self.dmi.get("bios_version"), self.dmi.get("bios_date")) {
            (Some(v), Some(d)) => format!("{v} {d}"),
            (Some(v), None) => v.clone(),
            _ => "unknown".into(),
        };
        let class = |c: u32| c >> 8;
        let chipset = self.class_devices(names, |c| class(c) == 0x0600);
        let gpu = self.class_devices(names, |c| class(c) >> 8 == 0x03);
        let network = self.class_devices(names, |c| class(c) >> 8 == 0x02);
        let storage = self.class_devices(names, |c| class(c) >> 8 == 0x01);
        let usb = self.pci.iter().filter(|d| class(d.class) == 0x0c03).count();
        let passed = outcomes.iter().filter(|o| o.passed).count();
        let works = if outcomes.is_empty() {
            "partial"
        } else if passed == outcomes.len() {
            "yes"
        } else if passed == 0 {
            "no"
        } else {
            "partial"
        };
        let remark = outcomes
            .iter()
            .map(|o| {
                format!(
                    "{}: {}",
                    o.scenario,
                    if o.passed { "passed" } else { "FAILED" }
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        let mut y = String::from("---\n");
        quoted(&mut y, "layout", "hcl", 0);
        quoted(&mut y, "type", &machine_type(&dmi("chassis_type")), 0);
        quoted(&mut y, "hvm", yn(caps.hvm), 0);
        quoted(&mut y, "iommu", yn(caps.iommu), 0);
        quoted(&mut y, "slat", yn(caps.slat), 0);
        quoted(&mut y, "tpm", &tpm, 0);
        quoted(&mut y, "remap", yn(caps.remap), 0);
        block(&mut y, "brand", &dmi("sys_vendor"), 0);
        block(&mut y, "model", &dmi("product_name"), 0);
        block(&mut y, "bios", &bios, 0);
        block(&mut y, "cpu", &self.cpu, 0);
        block(&mut y, "cpu-short", "FIXME", 0);
        block(&mut y, "chipset", &or_none(&chipset), 0);
        block(&mut y, "chipset-short", "FIXME", 0);
        block(&mut y, "gpu", &or_none(&gpu), 0);
        block(&mut y, "gpu-short", "FIXME", 0);
        block(&mut y, "network", &or_none(&network), 0);
        block(&mut y, "memory", &self.memory_mib(), 0);
        block(&mut y, "scsi", &or_none(&storage), 0);
        block(&mut y, "usb", &usb.to_string(), 0);
        y.push_str("versions:\n");
        y.push_str("- works:\n");
        y.push_str(&format!("    '{works}'\n"));
        block(
            &mut y,
            "qubes",
            &format!("{product} {}", self.image_version),
            2,
        );
        block(&mut y, "xen", &self.xen_version(), 2);
        block(&mut y, "kernel", &self.kernel, 2);
        block(&mut y, "remark", &remark, 2);
        block(&mut y, "credit", "FIXAUTHOR", 2);
        block(&mut y, "link", "FIXLINK", 2);
        y.push_str("---\n");
        y
    }
}

fn or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none found".into()
    } else {
        v.join("\n")
    }
}

/// SMBIOS chassis types (DMTF DSP0134) to the HCL's words.
fn machine_type(chassis: &str) -> String {
    match chassis.trim().parse::<u32>() {
        Ok(8..=10 | 14 | 30..=32) => "laptop",
        Ok(3..=7 | 13 | 15 | 16 | 35 | 36) => "desktop",
        Ok(17 | 23 | 28 | 29) => "server",
        _ => "FIXME:laptop|desktop|workstation|server|motherboard",
    }
    .into()
}

/// `key:\n  'value'` with YAML's single-quote escaping.
fn quoted(y: &mut String, key: &str, value: &str, indent: usize) {
    let pad = " ".repeat(indent);
    y.push_str(&format!(
        "{pad}{key}:\n{pad}  '{}'\n",
        value.replace('\'', "''")
    ));
}

/// `key: |` and the value's lines indented below it. Control characters
/// from the machine (DMI strings can hold anything) are dropped.
fn block(y: &mut String, key: &str, value: &str, indent: usize) {
    let pad = " ".repeat(indent);
    y.push_str(&format!("{pad}{key}: |\n"));
    for line in value.lines() {
        let clean: String = line.chars().filter(|c| !c.is_control()).collect();
        y.push_str(&format!("{pad}  {}\n", clean.trim()));
    }
    if value.lines().next().is_none() {
        y.push_str(&format!("{pad}  unknown\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XL_INFO: &str = "host                   : (none)\n\
release                : 6.12.57+deb13-amd64\n\
virt_caps              : pv hvm hvm_directio pv_directio hap shadow\n\
total_memory           : 2047\n\
xen_major              : 4\n\
xen_minor              : 20\n\
xen_extra              : .1\n";

    const PCI_IDS_SAMPLE: &str = "# comment\n\
8086  Intel Corporation\n\
\t29c0  82G33/G31/P35/P31 Express DRAM Controller\n\
\t\t1af4 1100  QEMU Virtual Machine\n\
\t2918  82801IB (ICH9) LPC Interface Controller\n\
1af4  Red Hat, Inc.\n\
\t1042  Virtio 1.0 block device\n\
C 06  Bridge\n\
\t00  Host bridge\n";

    fn facts() -> HclFacts {
        HclFacts {
            xl_info: parse_xl_info(XL_INFO),
            xen_log: "(XEN) HVM: Hardware Assisted Paging (HAP) detected\n\
                      (XEN) Intel VT-d Interrupt Remapping enabled\n"
                .into(),
            cpu: "QEMU Virtual CPU version 2.5+".into(),
            kernel: "6.12.57+deb13-amd64".into(),
            dmi: parse_pairs("sys_vendor=QEMU\nproduct_name=Standard PC (Q35 + ICH9, 2009)\nbios_version=0.0.0\nchassis_type=1\nbios_date=\n"),
            tpm_major: None,
            pci: parse_pci(
                "0000:00:00.0 0x060000 0x8086 0x29c0 0x00\n\
                 0000:00:1f.0 0x060100 0x8086 0x2918 0x02\n\
                 0000:00:02.0 0x010000 0x1af4 0x1042 0x01\n\
                 garbage line\n",
            ),
            image_version: "0.1.0".into(),
        }
    }

    #[test]
    fn sysfs_and_xl_output_parse() {
        let f = facts();
        assert_eq!(f.xen_version(), "4.20.1");
        assert_eq!(f.memory_mib(), "2047");
        assert_eq!(f.pci.len(), 3);
        assert_eq!(f.pci[0].class, 0x060000);
        assert_eq!(f.dmi.get("bios_date"), None, "empty values are dropped");
        assert_eq!(
            f.capabilities(),
            Capabilities {
                hvm: true,
                iommu: true,
                slat: true,
                remap: true
            }
        );
    }

    #[test]
    fn tcg_without_vmx_reports_no_hvm_and_no_iommu() {
        let mut f = facts();
        f.xl_info
            .insert("virt_caps".into(), "pv shadow gnttab-v1 gnttab-v2".into());
        f.xen_log.clear();
        assert_eq!(
            f.capabilities(),
            Capabilities {
                hvm: false,
                iommu: false,
                slat: false,
                remap: false
            }
        );
    }

    #[test]
    fn pci_names_come_from_the_database() {
        let names = PciNames::parse(PCI_IDS_SAMPLE);
        let f = facts();
        assert_eq!(
            names.describe(&f.pci[0]),
            "Intel Corporation 82G33/G31/P35/P31 Express DRAM Controller [8086:29c0] (rev 00)"
        );
        let unknown = PciDevice {
            slot: "x".into(),
            class: 0,
            vendor: 0xabcd,
            device: 1,
            revision: 0,
        };
        assert_eq!(
            names.describe(&unknown),
            "Unknown vendor Device [abcd:0001] (rev 00)"
        );
    }

    #[test]
    fn the_yaml_has_the_hcl_layout() {
        let names = PciNames::parse(PCI_IDS_SAMPLE);
        let outcomes = [
            Outcome {
                scenario: "boot".into(),
                passed: true,
            },
            Outcome {
                scenario: "update".into(),
                passed: false,
            },
        ];
        let y = facts().to_yaml(&names, &outcomes, "qubes-dom0-appliance");
        for want in [
            "---\nlayout:\n  'hcl'\n",
            "hvm:\n  'yes'\n",
            "tpm:\n  'no'\n",
            "brand: |\n  QEMU\n",
            "chipset: |\n  Intel Corporation 82G33/G31/P35/P31 Express DRAM Controller [8086:29c0] (rev 00)\n",
            "scsi: |\n  Red Hat, Inc. Virtio 1.0 block device [1af4:1042] (rev 01)\n",
            "versions:\n- works:\n    'partial'\n  qubes: |\n    qubes-dom0-appliance 0.1.0\n",
            "  xen: |\n    4.20.1\n",
            "  remark: |\n    boot: passed\n    update: FAILED\n",
        ] {
            assert!(y.contains(want), "missing {want:?} in\n{y}");
        }
        // The LPC bridge is not the chipset's host bridge.
        assert!(!y.contains("ICH9) LPC"), "{y}");
    }

    #[test]
    fn odd_machine_strings_cannot_break_the_yaml() {
        let mut f = facts();
        f.dmi.insert("sys_vendor".into(), "Bad\u{7}Vendor's".into());
        f.dmi.insert("chassis_type".into(), "10".into());
        let y = f.to_yaml(&PciNames::default(), &[], "p");
        assert!(y.contains("brand: |\n  BadVendor's\n"), "{y}");
        assert!(y.contains("type:\n  'laptop'\n"), "{y}");
    }
}
