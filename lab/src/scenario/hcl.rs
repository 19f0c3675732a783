//! The hardware report: boots to ready and collects, from inside dom0,
//! what the HCL report needs. The runner writes `hcl.yml` from it at the
//! end of the run, with the other scenarios' results.

use anyhow::{ensure, Result};

use super::{field, Ctx, Scenario};
use crate::hcl::{self, HclFacts};

pub const HCL: Scenario = Scenario {
    name: "hcl",
    about: "collect a hardware report (CPU, chipset, IOMMU, TPM, HVM, SLAT, versions) from dom0",
    run: collect,
};

// What dom0 is asked; the LAVA export asks the same.
pub const XL_INFO: &str = "xl info";
pub const XEN_LOG: &str = "xl dmesg";
pub const CPU: &str = "grep -m1 'model name' /proc/cpuinfo";
pub const KERNEL: &str = "cat /proc/sys/kernel/osrelease";
pub const DMI: &str = "for f in sys_vendor product_name bios_version bios_date chassis_type; do \
     echo \"$f=$(cat /sys/class/dmi/id/$f 2>/dev/null)\"; done";
pub const TPM: &str = "cat /sys/class/tpm/tpm0/tpm_version_major 2>/dev/null || echo none";
pub const PCI: &str = "for d in /sys/bus/pci/devices/*; do \
     echo \"${d##*/} $(cat $d/class) $(cat $d/vendor) $(cat $d/device) $(cat $d/revision)\"; done";

fn collect(ctx: &mut Ctx<'_>) -> Result<()> {
    let image = ctx.image;
    ctx.boot(image)?;
    let ready = ctx.wait_ready()?;
    let xl_info = hcl::parse_xl_info(&ctx.sh(XL_INFO)?);
    ensure!(
        xl_info.contains_key("xen_major"),
        "`xl info` without xen_major: {xl_info:?}"
    );
    let xen_log = ctx.sh(XEN_LOG)?;
    let cpu = ctx.sh(CPU)?;
    let cpu = cpu
        .split_once(':')
        .map_or(cpu.as_str(), |(_, v)| v)
        .trim()
        .to_owned();
    let kernel = ctx.sh(KERNEL)?.trim().to_owned();
    let dmi = hcl::parse_pairs(&ctx.sh(DMI)?);
    let tpm = ctx.sh(TPM)?;
    let tpm_major = Some(tpm.trim().to_owned()).filter(|t| t != "none" && !t.is_empty());
    let pci = hcl::parse_pci(&ctx.sh(PCI)?);
    ensure!(!pci.is_empty(), "dom0 sees no PCI devices");
    let facts = HclFacts {
        xl_info,
        xen_log,
        cpu,
        kernel,
        dmi,
        tpm_major,
        pci,
        image_version: field(&ready, "version=").unwrap_or("unknown").to_owned(),
    };
    let caps = facts.capabilities();
    ctx.note(format!(
        "hcl: Xen {} kernel {} cpu {:?} hvm={} iommu={} slat={} memory={} MiB, {} PCI functions",
        facts.xen_version(),
        facts.kernel,
        facts.cpu,
        caps.hvm,
        caps.iommu,
        caps.slat,
        facts.memory_mib(),
        facts.pci.len()
    ));
    ctx.hcl = Some(facts);
    ctx.target.power_off()?;
    Ok(())
}
