//! A lab target: a machine described by a TOML file whose commands are the
//! lab's own. We never hard-code a lab's tools: labgrid places,
//! pdudaemon, a USB SD-mux or a relay board all fit behind a command.
//!
//! ```toml
//! name = "t480"
//! [power]
//! on = "labgrid-client -p t480 power on"
//! off = "labgrid-client -p t480 power off"
//! [flash]
//! command = "labgrid-client -p t480 write-image \"$QLAB_IMAGE\""
//! [console]
//! tcp = "ser2net.lab:4001"   # or device = "/dev/ttyUSB0", or command = "..."
//! [timeouts]
//! boot_s = 300
//! ```
//!
//! Commands run with `sh -c` in the file's directory. Their environment
//! holds `QLAB_TARGET` (the name), `QLAB_WORK` (a directory the runner
//! keeps for this target, for state such as a pid file), with a `tcp`
//! console `QLAB_CONSOLE_ADDR` (its `host:port`) and, for flash,
//! `QLAB_IMAGE` (the disk image to write).
//!
//! A `tcp` console on port 0 (`"127.0.0.1:0"`) is one the lab's own
//! commands serve (a VM playing a lab machine, a ser2net started by
//! `power.on`): qlab picks a free port for it when the run starts and
//! passes it in `QLAB_CONSOLE_ADDR`, so two runs on one host never
//! collide on a fixed port.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qconsole::Console;
use serde::Deserialize;

use super::serial::{CommandLink, DeviceLink, TcpLink};
use super::{Target, TargetError, Timeouts};

/// Lab files are small; a bigger one is not a lab file.
const MAX_CONFIG_BYTES: u64 = 64 * 1024;
const BAUD_RATES: &[u32] = &[
    9600, 19200, 38400, 57600, 115_200, 230_400, 460_800, 921_600,
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("lab target {path}: cannot read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lab target {path}: larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("lab target {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("lab target {path}: field `{field}`: {reason}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: String,
    power: RawPower,
    flash: RawFlash,
    console: RawConsole,
    #[serde(default)]
    timeouts: RawTimeouts,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPower {
    on: String,
    off: String,
    #[serde(default = "default_power_timeout")]
    timeout_s: u64,
}

fn default_power_timeout() -> u64 {
    120
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlash {
    command: String,
    #[serde(default = "default_flash_timeout")]
    timeout_s: u64,
}

fn default_flash_timeout() -> u64 {
    1800
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsole {
    tcp: Option<String>,
    device: Option<PathBuf>,
    baud: Option<u32>,
    command: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    boot_s: Option<u64>,
    shell_s: Option<u64>,
    apply_s: Option<u64>,
    guivm_s: Option<u64>,
}

/// How the runner reaches the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleSpec {
    Tcp(String),
    Device { path: PathBuf, baud: u32 },
    Command(String),
}

/// A validated lab file.
#[derive(Debug, Clone)]
pub struct LabConfig {
    pub path: PathBuf,
    pub name: String,
    /// Commands run in this directory (the file's).
    pub dir: PathBuf,
    pub power_on: String,
    pub power_off: String,
    pub power_timeout: Duration,
    pub flash: String,
    pub flash_timeout: Duration,
    pub console: ConsoleSpec,
    pub timeouts: Timeouts,
}

impl LabConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read)?.len();
        if len > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned();
        Self::parse(path, &dir, &text)
    }

    /// Parses and checks a lab file's text; `path` names it in errors.
    pub fn parse(path: &Path, dir: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |field, reason: &str| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason: reason.to_owned(),
        };
        let valid_name = !raw.name.is_empty()
            && raw.name.len() <= 64
            && raw
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !valid_name {
            return Err(invalid(
                "name",
                "1 to 64 characters of letters, digits, '-', '_' and '.'",
            ));
        }
        for (field, cmd) in [
            ("power.on", &raw.power.on),
            ("power.off", &raw.power.off),
            ("flash.command", &raw.flash.command),
        ] {
            if cmd.trim().is_empty() {
                return Err(invalid(field, "empty command"));
            }
        }
        let RawConsole {
            tcp,
            device,
            baud,
            command,
        } = raw.console;
        if baud.is_some() && device.is_none() {
            return Err(invalid("console.baud", "only meaningful with `device`"));
        }
        let console = match (tcp, device, command) {
            (Some(addr), None, None) => {
                let port_ok = addr
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
                if !port_ok {
                    return Err(invalid(
                        "console.tcp",
                        "expected host:port (port 0: qlab picks a free one)",
                    ));
                }
                ConsoleSpec::Tcp(addr)
            }
            (None, Some(device), None) => {
                let baud = baud.unwrap_or(115_200);
                if !BAUD_RATES.contains(&baud) {
                    return Err(invalid(
                        "console.baud",
                        &format!("{baud} is not one of {BAUD_RATES:?}"),
                    ));
                }
                if !device.is_absolute() {
                    return Err(invalid("console.device", "must be an absolute path"));
                }
                ConsoleSpec::Device { path: device, baud }
            }
            (None, None, Some(cmd)) if !cmd.trim().is_empty() => ConsoleSpec::Command(cmd),
            (None, None, Some(_)) => return Err(invalid("console.command", "empty command")),
            _ => {
                return Err(invalid(
                    "console",
                    "exactly one of `tcp`, `device` or `command`",
                ))
            }
        };
        let mut timeouts = Timeouts::default();
        for (field, value, slot) in [
            ("timeouts.boot_s", raw.timeouts.boot_s, &mut timeouts.boot),
            (
                "timeouts.shell_s",
                raw.timeouts.shell_s,
                &mut timeouts.shell,
            ),
            (
                "timeouts.apply_s",
                raw.timeouts.apply_s,
                &mut timeouts.apply,
            ),
            (
                "timeouts.guivm_s",
                raw.timeouts.guivm_s,
                &mut timeouts.guivm,
            ),
        ] {
            match value {
                Some(0) => return Err(invalid(field, "must be at least 1")),
                Some(s) if s > 86_400 => return Err(invalid(field, "more than a day")),
                Some(s) => *slot = Duration::from_secs(s),
                None => {}
            }
        }
        for (field, s) in [
            ("power.timeout_s", raw.power.timeout_s),
            ("flash.timeout_s", raw.flash.timeout_s),
        ] {
            if s == 0 || s > 86_400 {
                return Err(invalid(field, "between 1 and 86400 seconds"));
            }
        }
        Ok(Self {
            path: path.to_owned(),
            name: raw.name,
            dir: dir.to_owned(),
            power_on: raw.power.on,
            power_off: raw.power.off,
            power_timeout: Duration::from_secs(raw.power.timeout_s),
            flash: raw.flash.command,
            flash_timeout: Duration::from_secs(raw.flash.timeout_s),
            console,
            timeouts,
        })
    }
}

/// A machine in a lab.
#[derive(Debug)]
pub struct LabTarget {
    cfg: LabConfig,
    work: PathBuf,
    console: Console,
    /// The `tcp` console's address, its port picked if the file said 0.
    console_addr: Option<String>,
}

impl LabTarget {
    /// Connects the console (it keeps reconnecting for the whole run).
    pub fn new(cfg: LabConfig, work: &Path, echo: bool) -> Result<Self, TargetError> {
        std::fs::create_dir_all(work).map_err(|source| TargetError::Io {
            target: cfg.name.clone(),
            what: "creating",
            path: work.to_owned(),
            source,
        })?;
        // The lab's commands run in the file's directory: they need the
        // work directory as an absolute path.
        let work = std::path::absolute(work).map_err(|source| TargetError::Io {
            target: cfg.name.clone(),
            what: "resolving",
            path: work.to_owned(),
            source,
        })?;
        let console = Console::new(Some(&work.join("serial.log")), echo)?;
        let mut console_addr = None;
        match &cfg.console {
            ConsoleSpec::Tcp(addr) => {
                let addr = pick_port(addr).map_err(|source| TargetError::Io {
                    target: cfg.name.clone(),
                    what: "picking a free port for the console at",
                    path: addr.into(),
                    source,
                })?;
                console.follow(TcpLink { addr: addr.clone() })?;
                console_addr = Some(addr);
            }
            ConsoleSpec::Device { path, baud } => console.follow(DeviceLink {
                path: path.clone(),
                baud: *baud,
            })?,
            ConsoleSpec::Command(command) => console.follow(CommandLink {
                command: command.clone(),
                dir: cfg.dir.clone(),
            })?,
        }
        Ok(Self {
            cfg,
            work,
            console,
            console_addr,
        })
    }

    /// Runs one of the lab's commands to its end, within `timeout`.
    fn run(
        &self,
        action: &'static str,
        command: &str,
        timeout: Duration,
        image: Option<&Path>,
    ) -> Result<(), TargetError> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(command)
            .current_dir(&self.cfg.dir)
            .env("QLAB_TARGET", &self.cfg.name)
            .env("QLAB_WORK", &self.work)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(addr) = &self.console_addr {
            cmd.env("QLAB_CONSOLE_ADDR", addr);
        }
        if let Some(image) = image {
            cmd.env("QLAB_IMAGE", image);
        }
        let io = |source| TargetError::Io {
            target: self.cfg.name.clone(),
            what: "running a command in",
            path: self.cfg.dir.clone(),
            source,
        };
        let mut child = cmd.spawn().map_err(io)?;
        // Drain both pipes in threads so a chatty command cannot block on
        // a full pipe while we wait for it.
        let out = drain(child.stdout.take());
        let err = drain(child.stderr.take());
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().map_err(io)? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(TargetError::CommandTimeout {
                    target: self.cfg.name.clone(),
                    action,
                    command: command.to_owned(),
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if status.success() {
            return Ok(());
        }
        let mut output = out.join().unwrap_or_default();
        output.extend(err.join().unwrap_or_default());
        Err(TargetError::Command {
            target: self.cfg.name.clone(),
            action,
            command: command.to_owned(),
            status: status.to_string(),
            output: String::from_utf8_lossy(&output).trim_end().to_owned(),
        })
    }
}

/// `addr` as it is, or with port 0 replaced by one that is free now: the
/// kernel hands out an unused port for a listener bound to port 0, and
/// the lab command that serves the console binds it again moments later.
fn pick_port(addr: &str) -> std::io::Result<String> {
    match addr.rsplit_once(':') {
        Some((host, "0")) => {
            let l = std::net::TcpListener::bind((host, 0))?;
            Ok(format!("{host}:{}", l.local_addr()?.port()))
        }
        _ => Ok(addr.to_owned()),
    }
}

/// Reads a pipe to its end in a thread.
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut bytes);
        }
        bytes
    })
}

impl Target for LabTarget {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn flash(&mut self, image: &Path) -> Result<(), TargetError> {
        let image = std::path::absolute(image).map_err(|source| TargetError::Io {
            target: self.cfg.name.clone(),
            what: "resolving",
            path: image.to_owned(),
            source,
        })?;
        self.run(
            "flash",
            &self.cfg.flash,
            self.cfg.flash_timeout,
            Some(&image),
        )
    }

    fn power_on(&mut self) -> Result<(), TargetError> {
        self.run("power on", &self.cfg.power_on, self.cfg.power_timeout, None)
    }

    fn power_off(&mut self) -> Result<(), TargetError> {
        self.run(
            "power off",
            &self.cfg.power_off,
            self.cfg.power_timeout,
            None,
        )
    }

    fn console(&mut self) -> &mut Console {
        &mut self.console
    }

    fn powered_off_by_itself(&mut self, _within: Duration) -> Option<bool> {
        None
    }

    fn timeouts(&self) -> Timeouts {
        self.cfg.timeouts
    }

    fn describe(&self) -> String {
        let console = match &self.cfg.console {
            ConsoleSpec::Tcp(a) => {
                format!(
                    "serial over TCP {}",
                    self.console_addr.as_deref().unwrap_or(a)
                )
            }
            ConsoleSpec::Device { path, baud } => {
                format!("serial device {} at {baud}", path.display())
            }
            ConsoleSpec::Command(c) => format!("console command `{c}`"),
        };
        format!(
            "lab target from {}: power `{}` / `{}`, flash `{}`, {console}",
            self.cfg.path.display(),
            self.cfg.power_on,
            self.cfg.power_off,
            self.cfg.flash
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t480"
[power]
on = "pdu on 3"
off = "pdu off 3"
[flash]
command = "sdmux write \"$QLAB_IMAGE\""
[console]
tcp = "ser2net.lab:4001"
[timeouts]
boot_s = 200
"#;

    fn parse(text: &str) -> Result<LabConfig, ConfigError> {
        LabConfig::parse(Path::new("lab/t480.toml"), Path::new("lab"), text)
    }

    #[test]
    fn a_good_file_loads_with_defaults_filled_in() {
        let c = parse(GOOD).expect("good");
        assert_eq!(c.name, "t480");
        assert_eq!(c.console, ConsoleSpec::Tcp("ser2net.lab:4001".into()));
        assert_eq!(c.timeouts.boot, Duration::from_secs(200));
        assert_eq!(c.timeouts.apply, Timeouts::default().apply);
        assert_eq!(c.flash_timeout, Duration::from_secs(1800));
    }

    #[test]
    fn bad_files_name_the_field_and_reason() {
        let cases: &[(&str, &str, &str)] = &[
            ("name = \"t480\"\n", "", "missing field `power`"),
            (
                &GOOD.replace("name = \"t480\"", "name = \"a b\""),
                "name",
                "letters",
            ),
            (
                &GOOD.replace("on = \"pdu on 3\"", "on = \" \""),
                "power.on",
                "empty",
            ),
            (
                &GOOD.replace("ser2net.lab:4001", "ser2net.lab"),
                "console.tcp",
                "host:port",
            ),
            (
                &GOOD.replace("ser2net.lab:4001", "h:65536"),
                "console.tcp",
                "host:port",
            ),
            (
                &GOOD.replace(
                    "tcp = \"ser2net.lab:4001\"",
                    "tcp = \"a:1\"\ncommand = \"x\"",
                ),
                "console",
                "exactly one",
            ),
            (
                &GOOD.replace(
                    "tcp = \"ser2net.lab:4001\"",
                    "device = \"/dev/ttyUSB0\"\nbaud = 1234",
                ),
                "console.baud",
                "1234",
            ),
            (
                &GOOD.replace("tcp = \"ser2net.lab:4001\"", "device = \"ttyUSB0\""),
                "console.device",
                "absolute",
            ),
            (
                &GOOD.replace("boot_s = 200", "boot_s = 0"),
                "timeouts.boot_s",
                "at least 1",
            ),
            (
                &GOOD.replace("boot_s = 200", "reboot_s = 3"),
                "",
                "unknown field `reboot_s`",
            ),
            ("name = [", "", "TOML"),
        ];
        for (text, field, reason) in cases {
            let e = parse(text).expect_err(text);
            let msg = e.to_string();
            assert!(msg.starts_with("lab target lab/t480.toml: "), "{msg}");
            if !field.is_empty() {
                assert!(msg.contains(&format!("field `{field}`")), "{msg}");
            }
            let lower = msg.to_lowercase();
            assert!(
                lower.contains(&reason.to_lowercase()),
                "{msg} lacks {reason}"
            );
        }
    }

    #[test]
    fn port_zero_is_a_free_port_that_the_commands_are_told() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = r#"
name = "vm"
[power]
on = "echo \"$QLAB_CONSOLE_ADDR\" > addr"
off = "true"
[flash]
command = "true"
[console]
tcp = "127.0.0.1:0"
"#;
        let cfg = LabConfig::parse(&dir.path().join("vm.toml"), dir.path(), text).expect("cfg");
        let mut t = LabTarget::new(cfg, &dir.path().join("work"), false).expect("target");
        t.power_on().expect("on");
        let addr = std::fs::read_to_string(dir.path().join("addr")).expect("addr");
        let port: u16 = addr
            .trim()
            .strip_prefix("127.0.0.1:")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{addr}"));
        assert_ne!(port, 0);
        assert!(t.describe().contains(addr.trim()), "{}", t.describe());
        // The port is free again: the lab's command can serve it.
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("port free");
    }

    #[test]
    fn the_shipped_lab_files_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("targets");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("lab/targets") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "toml") {
                LabConfig::load(&p).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 3, "{n} lab files");
    }

    #[test]
    fn commands_get_the_image_and_their_failures_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = r#"
name = "fake"
[power]
on = "echo on >> log"
off = "echo off >> log; echo 'relay stuck' >&2; exit 3"
[flash]
command = "cp \"$QLAB_IMAGE\" disk.img && echo \"$QLAB_TARGET $QLAB_WORK\" > env"
[console]
command = "cat"
"#;
        let cfg = LabConfig::parse(&dir.path().join("fake.toml"), dir.path(), text).expect("cfg");
        let work = dir.path().join("work");
        let mut t = LabTarget::new(cfg, &work, false).expect("target");
        let image = dir.path().join("image");
        std::fs::write(&image, b"disk bytes").expect("image");
        t.flash(&image).expect("flash");
        assert_eq!(
            std::fs::read(dir.path().join("disk.img")).expect("disk"),
            b"disk bytes"
        );
        let env = std::fs::read_to_string(dir.path().join("env")).expect("env");
        assert_eq!(env.trim(), format!("fake {}", work.display()));
        t.power_on().expect("on");
        let e = t.power_off().expect_err("off fails");
        let msg = e.to_string();
        assert!(
            msg.contains("power off") && msg.contains("relay stuck"),
            "{msg}"
        );
        // The console command echoes what is typed.
        assert!(t.console().wait_connected(Duration::from_secs(5)));
        t.console().send_line("ping-from-lab").expect("send");
        t.console()
            .wait_for("ping-from-lab", Duration::from_secs(5))
            .expect("echo");
    }
}
