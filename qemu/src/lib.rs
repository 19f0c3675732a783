//! Boots a disk image in QEMU the way the product boots on hardware:
//! OVMF firmware (code read-only, a private copy of the variables), the
//! disk as a virtio drive, the first serial port captured to a file and
//! optionally the terminal, and a QMP socket for power control.
//!
//! Test VMs also get the command channel: a virtio-serial port named
//! [`qcmdchan::VIRTIO_PORT_NAME`] on a socket of its own, which only
//! dom0's `qcmd serve` reads and writes. The kernel console and the
//! services' logs stay on the serial port, so commands and their output
//! never share a line with them.
//!
//! The CPU model matters under TCG (see docs/architecture.md): Xen's PV
//! dom0 needs a plain Intel-like model.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use qconsole::{Console, ConsoleError};

/// The CPU model measured to run Xen 4.20 with a PV dom0 under TCG.
pub const CPU_MODEL: &str = "qemu64,+sse4.2,+popcnt,+ssse3,+sse4.1,+cx16,+rdrand";
/// The same CPU without RDRAND (see [`VmConfig::rdrand`]).
pub const CPU_MODEL_NO_RDRAND: &str = "qemu64,+sse4.2,+popcnt,+ssse3,+sse4.1,+cx16";
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{what}: {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")]
    NoQemu,
    #[error("OVMF firmware {0} is missing (Debian package ovmf)")]
    NoFirmware(PathBuf),
    #[error("QEMU exited before its serial socket appeared ({status:?}); see {log}")]
    EarlyExit {
        status: Option<ExitStatus>,
        log: PathBuf,
    },
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error("QEMU exited ({status}) while waiting for {wanted:?}; last output:\n{tail}")]
    Exited {
        wanted: Vec<String>,
        status: ExitStatus,
        tail: String,
    },
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("a detached VM needs its serial port on TCP (--serial-tcp)")]
    NoTcpSerial,
    #[error("the VM was started without a command channel")]
    CommandChannelOff,
    #[error("QEMU's command channel socket {path} did not accept a connection")]
    NoCommandChannel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The command channel's socket in the work directory.
const COMMAND_SOCKET: &str = "cmd.sock";
/// The serial port's socket in the work directory.
const SERIAL_SOCKET: &str = "serial.sock";

/// How to start a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub disk: PathBuf,
    /// More raw drives (an update bundle on a second disk, say).
    pub extra_disks: Vec<PathBuf>,
    /// Holds the firmware variables, sockets and the serial log.
    pub work_dir: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Copy the serial console to stdout as it arrives.
    pub echo: bool,
    /// Exit instead of rebooting (for one-shot runs).
    pub no_reboot: bool,
    /// The serial port on a TCP server at this address (`host:port`), as a
    /// lab's ser2net would offer it, instead of a socket in the work dir.
    pub serial_tcp: Option<String>,
    /// The CPU has RDRAND, as real x86 machines since about 2013 do. Off:
    /// the kernel's pool must be seeded some other way (the entropy
    /// scenario).
    pub rdrand: bool,
    /// A hardware RNG (virtio-rng), as a real machine has in its TPM.
    pub hwrng: bool,
    /// Give dom0 the dedicated command channel (a virtio-serial port on
    /// `cmd.sock` in the work dir). Off for a VM that plays a lab machine,
    /// which has only its serial line.
    pub command_channel: bool,
}

impl VmConfig {
    pub fn new(disk: &Path, work_dir: &Path) -> Self {
        Self {
            disk: disk.to_owned(),
            extra_disks: Vec::new(),
            work_dir: work_dir.to_owned(),
            memory_mib: 2048,
            cpus: 2,
            echo: false,
            no_reboot: false,
            serial_tcp: None,
            rdrand: true,
            hwrng: true,
            command_channel: true,
        }
    }

    /// The QEMU command line for this configuration.
    pub fn args(&self) -> Vec<String> {
        let w = |f: &str| self.work_dir.join(f).to_string_lossy().into_owned();
        let mut a: Vec<String> = [
            "-machine",
            "q35",
            "-cpu",
            if self.rdrand {
                CPU_MODEL
            } else {
                CPU_MODEL_NO_RDRAND
            },
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-nic",
            "none",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        a.extend(["-m".into(), self.memory_mib.to_string()]);
        a.extend(["-smp".into(), self.cpus.to_string()]);
        a.extend([
            "-drive".into(),
            format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
            "-drive".into(),
            format!("if=pflash,format=raw,unit=1,file={}", w("OVMF_VARS.fd")),
        ]);
        for (i, d) in std::iter::once(&self.disk)
            .chain(&self.extra_disks)
            .enumerate()
        {
            a.extend([
                "-drive".into(),
                format!(
                    "file={},format=raw,if=none,id=disk{i},cache=writeback",
                    d.display()
                ),
                "-device".into(),
                if i == 0 {
                    format!("virtio-blk-pci,drive=disk{i},bootindex=1")
                } else {
                    format!("virtio-blk-pci,drive=disk{i}")
                },
            ]);
        }
        if self.command_channel {
            // Before the serial chardev: with `wait=on` there, QEMU stops
            // at it until the host connects, and this socket must exist
            // by then. `wait=off`: requests the host writes before dom0
            // opens the port wait in the socket.
            a.extend([
                "-device".into(),
                "virtio-serial-pci,id=vser0".into(),
                "-chardev".into(),
                format!(
                    "socket,id=qcmd0,path={},server=on,wait=off",
                    w(COMMAND_SOCKET)
                ),
                "-device".into(),
                format!(
                    "virtserialport,bus=vser0.0,chardev=qcmd0,name={}",
                    qcmdchan::VIRTIO_PORT_NAME
                ),
            ]);
        }
        let serial = match &self.serial_tcp {
            // Like a serial server, the port is there whether or not anyone
            // listens: output nobody reads is lost.
            Some(addr) => format!(
                "socket,id=ser0,host={},port={},server=on,wait=off",
                host_of(addr),
                port_of(addr)
            ),
            None => format!("socket,id=ser0,path={},server=on,wait=on", w(SERIAL_SOCKET)),
        };
        a.extend([
            "-chardev".into(),
            serial,
            "-serial".into(),
            "chardev:ser0".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", w("qmp.sock")),
        ]);
        if self.hwrng {
            a.extend(["-device".into(), "virtio-rng-pci".into()]);
        }
        if self.no_reboot {
            a.push("-no-reboot".into());
        }
        a
    }
}

fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h)
}

fn port_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(_, p)| p)
}

/// Checks the firmware and readies the work directory: a fresh copy of
/// the firmware variables, no stale sockets. Returns QEMU's log path.
fn prepare_work_dir(cfg: &VmConfig) -> Result<PathBuf, VmError> {
    for fw in [OVMF_CODE, OVMF_VARS] {
        if !Path::new(fw).exists() {
            return Err(VmError::NoFirmware(fw.into()));
        }
    }
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |source| VmError::Io { what, path, source }
    };
    std::fs::create_dir_all(&cfg.work_dir).map_err(io("create work dir", &cfg.work_dir))?;
    let vars = cfg.work_dir.join("OVMF_VARS.fd");
    std::fs::copy(OVMF_VARS, &vars).map_err(io("copy firmware variables", &vars))?;
    for s in [SERIAL_SOCKET, COMMAND_SOCKET, "qmp.sock"] {
        let _ = std::fs::remove_file(cfg.work_dir.join(s));
    }
    Ok(cfg.work_dir.join("qemu.log"))
}

/// Starts QEMU in the background as a lab's power switch would, with the
/// serial port on TCP (`cfg.serial_tcp`), and returns once it runs; its
/// pid is written to `pidfile`. Stopping it is the caller's business
/// (`kill`), as pulling a plug is.
pub fn power_on_detached(cfg: &VmConfig, pidfile: &Path) -> Result<(), VmError> {
    if cfg.serial_tcp.is_none() {
        return Err(VmError::NoTcpSerial);
    }
    let qemu_log = prepare_work_dir(cfg)?;
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |source| VmError::Io { what, path, source }
    };
    let status = Command::new("qemu-system-x86_64")
        .args(cfg.args())
        .arg("-daemonize")
        .arg("-pidfile")
        .arg(pidfile)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&qemu_log).map_err(io("create", &qemu_log))?)
        .status()
        .map_err(spawn_error)?;
    if !status.success() {
        return Err(VmError::EarlyExit {
            status: Some(status),
            log: qemu_log,
        });
    }
    Ok(())
}

/// A QEMU process and its QMP socket, without the console: the caller
/// attaches the serial stream to a console of its own (the hardware-lab
/// target keeps one transcript across power cycles).
#[derive(Debug)]
pub struct Machine {
    child: Child,
    started: Instant,
    qmp_path: PathBuf,
    /// The command channel's socket, for a VM that has one.
    command_path: Option<PathBuf>,
}

impl Machine {
    /// Starts QEMU and connects to its serial socket.
    pub fn spawn(cfg: &VmConfig) -> Result<(Self, UnixStream), VmError> {
        let qemu_log = prepare_work_dir(cfg)?;
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| VmError::Io { what, path, source }
        };
        let log_file = std::fs::File::create(&qemu_log).map_err(io("create", &qemu_log))?;
        let log_err = log_file.try_clone().map_err(io("dup", &qemu_log))?;
        let started = Instant::now();
        let mut child = Command::new("qemu-system-x86_64")
            .args(cfg.args())
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .map_err(spawn_error)?;
        let sock_path = cfg.work_dir.join(SERIAL_SOCKET);
        let serial = loop {
            if let Ok(s) = UnixStream::connect(&sock_path) {
                break s;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(VmError::EarlyExit {
                    status: Some(status),
                    log: qemu_log,
                });
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                return Err(VmError::EarlyExit {
                    status: None,
                    log: qemu_log,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let machine = Self {
            child,
            started,
            qmp_path: cfg.work_dir.join("qmp.sock"),
            command_path: cfg
                .command_channel
                .then(|| cfg.work_dir.join(COMMAND_SOCKET)),
        };
        Ok((machine, serial))
    }

    /// Connects to the command channel. QEMU made its socket before the
    /// serial one, so it is there once `spawn` returned.
    pub fn command_channel(&self) -> Result<UnixStream, VmError> {
        let path = self
            .command_path
            .as_ref()
            .ok_or(VmError::CommandChannelOff)?;
        UnixStream::connect(path).map_err(|source| VmError::NoCommandChannel {
            path: path.clone(),
            source,
        })
    }

    /// Time since QEMU was started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// QEMU's exit status, if it has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Connects to QMP and runs one command.
    pub fn qmp(&self, command: &str) -> Result<serde_json::Value, VmError> {
        qmp(&self.qmp_path, command)
    }

    /// Waits for QEMU to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.exit_status() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    /// Hard power cut: QEMU is killed at once.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks QEMU to quit (power off without guest involvement).
    pub fn quit(&mut self) {
        if self.qmp("quit").is_err() {
            self.kill();
        }
        if self.wait_exit(Duration::from_secs(10)).is_none() {
            self.kill();
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

fn spawn_error(e: std::io::Error) -> VmError {
    if e.kind() == std::io::ErrorKind::NotFound {
        VmError::NoQemu
    } else {
        VmError::Io {
            what: "spawn",
            path: "qemu-system-x86_64".into(),
            source: e,
        }
    }
}

/// A running VM with its serial console and, if it has one, its command
/// channel.
#[derive(Debug)]
pub struct Vm {
    machine: Machine,
    pub console: Console,
    /// Where commands go: the dedicated channel, if the VM has one.
    commands: Option<Console>,
    pub serial_log: PathBuf,
}

impl Vm {
    /// Starts QEMU and connects to its serial console, which is logged to
    /// `serial.log` in the work directory.
    pub fn start(cfg: &VmConfig) -> Result<Self, VmError> {
        let serial_log = cfg.work_dir.join("serial.log");
        std::fs::create_dir_all(&cfg.work_dir).map_err(|source| VmError::Io {
            what: "create work dir",
            path: cfg.work_dir.clone(),
            source,
        })?;
        let console = Console::new(Some(&serial_log), cfg.echo)?;
        let (machine, serial) = Machine::spawn(cfg)?;
        attach_stream(&console, serial, &cfg.work_dir)?;
        let commands = if cfg.command_channel {
            let console = command_console(&cfg.work_dir)?;
            attach_stream(&console, machine.command_channel()?, &cfg.work_dir)?;
            Some(console)
        } else {
            None
        };
        Ok(Self {
            machine,
            console,
            commands,
            serial_log,
        })
    }

    /// Time since QEMU was started.
    pub fn uptime(&self) -> Duration {
        self.machine.uptime()
    }

    /// Everything the console printed so far.
    pub fn output(&self) -> String {
        self.console.output()
    }

    /// Waits for the first of `needles` to appear after the last match;
    /// returns its index and the whole line it is on.
    pub fn wait_for_any(
        &mut self,
        needles: &[&str],
        timeout: Duration,
    ) -> Result<(usize, String), VmError> {
        match self.console.wait_for_any(needles, timeout) {
            Ok(found) => Ok(found),
            Err(ConsoleError::Closed {
                console,
                wanted,
                tail,
            }) => match self.machine.wait_exit(Duration::from_secs(5)) {
                Some(status) => Err(VmError::Exited {
                    wanted,
                    status,
                    tail,
                }),
                None => Err(ConsoleError::Closed {
                    console,
                    wanted,
                    tail,
                }
                .into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// Waits for `needle`; returns the line it is on.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String, VmError> {
        self.wait_for_any(&[needle], timeout).map(|(_, l)| l)
    }

    /// Types a line on the serial console.
    pub fn send_line(&mut self, line: &str) -> Result<(), VmError> {
        Ok(self.console.send_line(line)?)
    }

    /// Runs a shell command in dom0 (over the command channel, else the
    /// serial shell) and returns what it printed and its exit status.
    pub fn shell(&mut self, command: &str, timeout: Duration) -> Result<(String, i32), VmError> {
        let c = self.commands.as_mut().unwrap_or(&mut self.console);
        Ok(c.shell(command, timeout)?)
    }

    /// Connects to QMP and runs one command.
    pub fn qmp(&self, command: &str) -> Result<serde_json::Value, VmError> {
        self.machine.qmp(command)
    }

    /// Waits for QEMU to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.machine.wait_exit(timeout)
    }

    /// Hard power cut: QEMU is killed at once.
    pub fn kill(&mut self) {
        self.machine.kill();
    }

    /// Asks QEMU to quit (power off without guest involvement).
    pub fn quit(&mut self) {
        self.machine.quit();
    }
}

/// A console for the command channel, not yet attached: commands only,
/// its bytes logged to `channel.log` in `work_dir` (the frames as they
/// came). Attach each power-on's stream with [`attach_stream`].
pub fn command_console(work_dir: &Path) -> Result<Console, ConsoleError> {
    Ok(Console::new(Some(&work_dir.join("channel.log")), false)?
        .with_channel(qconsole::Channel::Dedicated))
}

/// Attaches both halves of `stream` to `console`.
pub fn attach_stream(
    console: &Console,
    stream: UnixStream,
    work_dir: &Path,
) -> Result<(), VmError> {
    let reader = stream.try_clone().map_err(|source| VmError::Io {
        what: "duplicating a socket in",
        path: work_dir.to_owned(),
        source,
    })?;
    console.attach(reader, stream)?;
    Ok(())
}

/// Runs one QMP command on the socket at `path`.
pub fn qmp(path: &Path, command: &str) -> Result<serde_json::Value, VmError> {
    let stream = UnixStream::connect(path).map_err(|e| VmError::Qmp(e.to_string()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| VmError::Qmp(e.to_string()))?;
    let mut writer = stream
        .try_clone()
        .map_err(|e| VmError::Qmp(e.to_string()))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| VmError::Qmp(format!("greeting: {e}")))?;
    for cmd in ["qmp_capabilities", command] {
        writer
            .write_all(format!("{{\"execute\":\"{cmd}\"}}\n").as_bytes())
            .map_err(|e| VmError::Qmp(e.to_string()))?;
        loop {
            line.clear();
            let n = reader
                .read_line(&mut line)
                .map_err(|e| VmError::Qmp(format!("{cmd}: {e}")))?;
            if n == 0 {
                // `quit` closes the connection instead of answering.
                return Ok(serde_json::Value::Null);
            }
            let v: serde_json::Value = serde_json::from_str(&line)
                .map_err(|e| VmError::Qmp(format!("{cmd}: bad reply {line:?}: {e}")))?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(err) = v.get("error") {
                return Err(VmError::Qmp(format!("{cmd}: {err}")));
            }
            if cmd == command {
                return Ok(v.get("return").cloned().unwrap_or(serde_json::Value::Null));
            }
            break;
        }
    }
    Ok(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_has_the_measured_cpu_and_firmware() {
        let cfg = VmConfig::new(Path::new("/d/disk.img"), Path::new("/w"));
        let a = cfg.args().join(" ");
        assert!(a.contains(&format!("-cpu {CPU_MODEL} ")));
        assert!(a.contains("-device virtio-rng-pci"));
        let bare = VmConfig {
            rdrand: false,
            hwrng: false,
            ..cfg.clone()
        };
        let b = bare.args().join(" ");
        assert!(b.contains(&format!("-cpu {CPU_MODEL_NO_RDRAND} ")));
        assert!(!b.contains("rdrand") && !b.contains("virtio-rng"), "{b}");
        assert!(a.contains("readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"));
        assert!(a.contains("unit=1,file=/w/OVMF_VARS.fd"));
        assert!(a.contains("file=/d/disk.img,format=raw"));
        assert!(a.contains("bootindex=1"));
        assert!(a.contains("-qmp unix:/w/qmp.sock"));
        assert!(!a.contains("-no-reboot"));
        assert!(!a.contains("-kernel"), "the product boots through firmware");
        assert!(a.contains("path=/w/serial.sock,server=on,wait=on"));
        let port = format!("chardev=qcmd0,name={}", qcmdchan::VIRTIO_PORT_NAME);
        assert!(a.contains(&port), "{a}");
        let channel = a
            .find("path=/w/cmd.sock,server=on,wait=off")
            .expect("channel");
        assert!(
            channel < a.find("serial.sock").expect("serial"),
            "the channel's socket must exist while QEMU waits at the serial one"
        );
    }

    #[test]
    fn a_vm_without_the_channel_has_only_its_serial_port() {
        let mut cfg = VmConfig::new(Path::new("/d/disk.img"), Path::new("/w"));
        cfg.command_channel = false;
        let a = cfg.args().join(" ");
        assert!(!a.contains("virtio-serial"), "{a}");
        assert!(!a.contains("cmd.sock"), "{a}");
    }

    #[test]
    fn a_lab_style_vm_serves_its_serial_port_on_tcp() {
        let mut cfg = VmConfig::new(Path::new("/d/disk.img"), Path::new("/w"));
        cfg.serial_tcp = Some("127.0.0.1:4555".into());
        let a = cfg.args().join(" ");
        assert!(
            a.contains("socket,id=ser0,host=127.0.0.1,port=4555,server=on,wait=off"),
            "{a}"
        );
        assert!(!a.contains("serial.sock"));
    }
}
