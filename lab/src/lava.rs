//! Job definitions for LAVA, for labs with many machines: LAVA's
//! scheduler hands each job to a free device, and we write no scheduler
//! of our own.
//!
//! A job flashes the run's image (`deploy: to: flasher`, with the
//! device dictionary's flash command), powers the device on and waits for
//! the ready marker (`boot: method: minimal`), then types the scenario's
//! commands on the serial shell and matches their output (`test:
//! interactive`). The commands, markers and expected strings are the
//! scenarios' own (`scenario::boot::CHECKS`, `scenario::update`, ...).
//!
//! Only scenarios that are a straight line of console exchanges can
//! become a LAVA job: `boot`, `guivm`, `update` and `hcl`. The others need
//! the runner in the loop (cutting power at a chosen moment, flashing a
//! modified image, polling) and run under `qlab run`.

use std::fmt::Write as _;

use crate::flash::FlashImage;
use crate::scenario::{boot, guivm, hcl, update, Check};
use crate::target::Timeouts;

/// The scenarios a LAVA job can express.
pub const EXPORTABLE: &[&str] = &["boot", "guivm", "update", "hcl"];

/// What the jobs need to know about the lab.
#[derive(Debug, Clone)]
pub struct LavaOptions {
    /// The lab's device type for the machines (`device_type:`).
    pub device_type: String,
    /// Where the lab's dispatchers fetch the flash image from.
    pub image_url: String,
    pub timeouts: Timeouts,
}

/// The shell's end marker. The command line says `$((40+2))`, so its
/// echo cannot match; only the shell's output says `42`.
const DONE: &str = "QLAB-42 rc=";

/// One exchange on the serial console.
struct Step {
    name: String,
    /// What to type; `None` only waits for the block's prompt.
    command: Option<String>,
    successes: Vec<String>,
    failures: Vec<String>,
}

/// A run of steps that end on the same prompt.
struct Block {
    name: String,
    prompts: Vec<String>,
    steps: Vec<Step>,
}

/// A shell command that must exit 0 and print `expect`.
fn shell_step(name: &str, command: &str, expect: Option<&str>) -> Step {
    Step {
        name: name.to_owned(),
        command: Some(format!("{command}; echo QLAB-$((40+2)) rc=$?")),
        successes: expect.map(|e| vec![regex_escape(e)]).unwrap_or_default(),
        failures: vec![format!("{DONE}[1-9]")],
    }
}

fn shell_block(name: &str, steps: Vec<Step>) -> Block {
    Block {
        name: name.to_owned(),
        prompts: vec![format!("{DONE}0")],
        steps,
    }
}

fn checks(name: &str, checks: &[Check]) -> Block {
    shell_block(
        name,
        checks
            .iter()
            .map(|c| shell_step(c.name, c.command, Some(c.expect)))
            .collect(),
    )
}

/// Waits for a marker line (no command).
fn wait_block(name: &str, marker: &str, failure: Option<&str>) -> Block {
    Block {
        name: name.to_owned(),
        prompts: vec![regex_escape(marker)],
        steps: vec![Step {
            name: name.to_owned(),
            command: None,
            successes: Vec::new(),
            failures: failure.map(|f| vec![regex_escape(f)]).unwrap_or_default(),
        }],
    }
}

/// The blocks of `scenario`, or `None` when it needs the runner.
fn plan(scenario: &str, image: &FlashImage) -> Option<Vec<Block>> {
    Some(match scenario {
        "boot" => vec![checks("boot-checks", boot::CHECKS)],
        "guivm" => vec![
            wait_block("guivm-ready", guivm::READY, None),
            shell_block(
                "guivm-listed",
                vec![
                    shell_step(
                        "qdom-list",
                        "qdom list | grep '^guivm  *ready '",
                        Some("guivm"),
                    ),
                    shell_step("xl-list", "xl list", Some("guivm")),
                ],
            ),
        ],
        "update" => {
            let next = image.payload("next")?;
            vec![
                shell_block(
                    "apply",
                    vec![shell_step(
                        "apply-next",
                        &update::apply_command(next, " 2>&1"),
                        Some(update::APPLIED),
                    )],
                ),
                Block {
                    name: "reboot-into-b".into(),
                    prompts: vec![regex_escape(update::READY_B)],
                    steps: vec![Step {
                        name: "reboot-into-b".into(),
                        command: Some("qinit ctl reboot".into()),
                        successes: Vec::new(),
                        failures: vec![regex_escape("QINIT-FAILED")],
                    }],
                },
                shell_block(
                    "marked-good",
                    vec![shell_step(
                        "floor-raised",
                        "i=0; until qupdate status --json | tr -d ' \\n' | grep -q '\"floor\":1'; \
                         do i=$((i+1)); [ $i -lt 120 ] || break; sleep 1; done; \
                         qupdate status --json | tr -d ' \\n' | grep '\"booted\":\"B\"'",
                        Some("\"floor\":1"),
                    )],
                ),
            ]
        }
        "hcl" => vec![shell_block(
            "hcl-facts",
            vec![
                shell_step("xl-info", hcl::XL_INFO, Some("xen_major")),
                shell_step("xen-log", hcl::XEN_LOG, None),
                shell_step("cpu", hcl::CPU, Some("model name")),
                shell_step("kernel", hcl::KERNEL, None),
                shell_step("dmi", hcl::DMI, None),
                shell_step("tpm", hcl::TPM, None),
                shell_step("pci", hcl::PCI, None),
            ],
        )],
        _ => return None,
    })
}

/// A LAVA job for `scenario`, or `None` when it cannot be one.
pub fn job(scenario: &str, about: &str, image: &FlashImage, opts: &LavaOptions) -> Option<String> {
    let blocks = plan(scenario, image)?;
    let minutes = |d: std::time::Duration| d.as_secs().div_ceil(60).max(1);
    let t = &opts.timeouts;
    let test_minutes = match scenario {
        "update" => minutes(t.apply) + minutes(t.boot) + 3,
        "guivm" => minutes(t.guivm) + 2,
        _ => 10,
    };
    let job_minutes = 30 + minutes(t.boot) + test_minutes;
    let mut y = String::new();
    let _ = writeln!(
        y,
        "# Generated by `qlab export lava` from the scenario {scenario}:"
    );
    let _ = writeln!(y, "# {about}");
    let _ = writeln!(y, "device_type: {}", quote(&opts.device_type));
    let _ = writeln!(y, "job_name: {}", quote(&format!("qubes-dom0 {scenario}")));
    y.push_str("priority: medium\nvisibility: public\n");
    let _ = writeln!(
        y,
        "timeouts:\n  job:\n    minutes: {job_minutes}\n  action:\n    minutes: {test_minutes}\n  connection:\n    minutes: 2"
    );
    y.push_str("actions:\n");
    let _ = writeln!(
        y,
        "- deploy:\n    to: flasher\n    timeout:\n      minutes: 30\n    images:\n      image:\n        url: {}",
        quote(&opts.image_url)
    );
    let _ = writeln!(
        y,
        "- boot:\n    method: minimal\n    timeout:\n      minutes: {}\n    prompts:\n    - {}",
        minutes(t.boot),
        quote("QINIT-READY slot=A")
    );
    let _ = writeln!(
        y,
        "- test:\n    timeout:\n      minutes: {test_minutes}\n    interactive:"
    );
    for b in &blocks {
        let _ = writeln!(y, "    - name: {}", quote(&b.name));
        y.push_str("      prompts:\n");
        for p in &b.prompts {
            let _ = writeln!(y, "      - {}", quote(p));
        }
        y.push_str("      echo: discard\n      script:\n");
        for s in &b.steps {
            let _ = writeln!(y, "      - name: {}", quote(&s.name));
            match &s.command {
                Some(c) => {
                    let _ = writeln!(y, "        command: {}", quote(c));
                }
                None => y.push_str("        command: null\n"),
            }
            if !s.successes.is_empty() {
                y.push_str("        successes:\n");
                for m in &s.successes {
                    let _ = writeln!(y, "        - message: {}", quote(m));
                }
            }
            if !s.failures.is_empty() {
                y.push_str("        failures:\n");
                for m in &s.failures {
                    let _ = writeln!(
                        y,
                        "        - message: {}\n          exception: TestError\n          error: {}",
                        quote(m),
                        quote(&format!("{} failed", s.name))
                    );
                }
            }
        }
    }
    Some(y)
}

/// LAVA's own job validation (`lava_common.schemas.validate`, strict),
/// run with Debian's python3 and its `lava-common` package.
pub const VALIDATOR: &str = r"import sys, yaml
from lava_common.schemas import validate
for f in sys.argv[1:]:
    with open(f) as y:
        validate(yaml.safe_load(y), strict=True)
    print('valid LAVA job: ' + f)
";

/// Checks `files` with LAVA's validator; the error carries its verdict.
pub fn validate(files: &[std::path::PathBuf]) -> Result<String, String> {
    let out = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(VALIDATOR)
        .args(files)
        .output()
        .map_err(|e| {
            format!("running /usr/bin/python3: {e} (Debian packages python3 and lava-common)")
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// A YAML single-quoted scalar.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `s` as a literal regular expression (LAVA matches with pexpect).
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.^$|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flash::Payload;

    fn image() -> FlashImage {
        FlashImage {
            path: "flash.img".into(),
            payloads: vec![Payload {
                name: "next".into(),
                offset: 618 << 20,
                len: 88_000_000,
            }],
        }
    }

    fn opts() -> LavaOptions {
        LavaOptions {
            device_type: "x86-xen".into(),
            image_url: "https://lab.example/qubes/flash.img".into(),
            timeouts: Timeouts::default(),
        }
    }

    #[test]
    fn only_straight_line_scenarios_become_jobs() {
        for s in crate::scenario::ALL {
            let j = job(s.name, s.about, &image(), &opts());
            assert_eq!(j.is_some(), EXPORTABLE.contains(&s.name), "{}", s.name);
        }
        let no_bundle = FlashImage {
            path: "f".into(),
            payloads: Vec::new(),
        };
        assert!(job("update", "", &no_bundle, &opts()).is_none());
    }

    #[test]
    fn a_boot_job_flashes_boots_and_checks_what_the_scenario_checks() {
        let y = job("boot", "about", &image(), &opts()).expect("boot");
        assert!(y.contains("- deploy:\n    to: flasher\n"), "{y}");
        assert!(
            y.contains("url: 'https://lab.example/qubes/flash.img'"),
            "{y}"
        );
        assert!(y.contains("method: minimal"), "{y}");
        for c in boot::CHECKS {
            assert!(
                y.contains(&quote(&format!("{}; echo QLAB-$((40+2)) rc=$?", c.command))),
                "{y}"
            );
        }
        assert!(y.contains("- message: 'Domain-0'"), "{y}");
        assert!(y.contains("- message: '/dev/dm-0 / squashfs ro'"), "{y}");
    }

    #[test]
    fn the_update_job_reads_the_bundle_where_the_flash_image_put_it() {
        let y = job("update", "about", &image(), &opts()).expect("update");
        assert!(y.contains("dd if=$d bs=1048576 skip=618 count=84"), "{y}");
        assert!(y.contains("'QINIT-READY slot=B version=0\\.2\\.0'"), "{y}");
    }

    #[test]
    fn regex_and_yaml_quoting() {
        assert_eq!(regex_escape("a.b (c)"), "a\\.b \\(c\\)");
        assert_eq!(quote("it's"), "'it''s'");
    }
}
