//! Boots a disk image in QEMU the way the product boots on hardware:
//! OVMF firmware (code read-only, a private copy of the variables), the
//! disk as a virtio drive, the first serial port captured to a file and
//! optionally the terminal, and a QMP socket for power control.
//!
//! The CPU model matters under TCG (see docs/architecture.md): Xen's PV
//! dom0 needs a plain Intel-like model.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The CPU model measured to run Xen 4.20 with a PV dom0 under TCG.
pub const CPU_MODEL: &str = "qemu64,+sse4.2,+popcnt,+ssse3,+sse4.1,+cx16,+rdrand";
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
    #[error("timed out after {waited:?} waiting for {wanted:?} on the serial console; last output:\n{tail}")]
    Timeout {
        wanted: Vec<String>,
        waited: Duration,
        tail: String,
    },
    #[error("QEMU exited ({status}) while waiting for {wanted:?}; last output:\n{tail}")]
    Exited {
        wanted: Vec<String>,
        status: ExitStatus,
        tail: String,
    },
    #[error("QMP: {0}")]
    Qmp(String),
}

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
        }
    }

    /// The QEMU command line for this configuration.
    pub fn args(&self) -> Vec<String> {
        let w = |f: &str| self.work_dir.join(f).to_string_lossy().into_owned();
        let mut a: Vec<String> = [
            "-machine",
            "q35",
            "-cpu",
            CPU_MODEL,
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
        a.extend([
            "-chardev".into(),
            format!("socket,id=ser0,path={},server=on,wait=on", w("serial.sock")),
            "-serial".into(),
            "chardev:ser0".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", w("qmp.sock")),
        ]);
        if self.no_reboot {
            a.push("-no-reboot".into());
        }
        a
    }
}

/// What the serial reader thread shares with the test.
#[derive(Debug, Default)]
struct Console {
    bytes: Vec<u8>,
    closed: bool,
}

/// A running VM.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    console: Arc<(Mutex<Console>, Condvar)>,
    serial: UnixStream,
    cursor: usize,
    started: Instant,
    pub serial_log: PathBuf,
    qmp_path: PathBuf,
}

impl Vm {
    /// Starts QEMU and connects to its serial console.
    pub fn start(cfg: &VmConfig) -> Result<Self, VmError> {
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
        for s in ["serial.sock", "qmp.sock"] {
            let _ = std::fs::remove_file(cfg.work_dir.join(s));
        }
        let qemu_log = cfg.work_dir.join("qemu.log");
        let log_file = std::fs::File::create(&qemu_log).map_err(io("create", &qemu_log))?;
        let log_err = log_file.try_clone().map_err(io("dup", &qemu_log))?;
        let started = Instant::now();
        let mut child = Command::new("qemu-system-x86_64")
            .args(cfg.args())
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    VmError::NoQemu
                } else {
                    VmError::Io {
                        what: "spawn",
                        path: "qemu-system-x86_64".into(),
                        source: e,
                    }
                }
            })?;
        let sock_path = cfg.work_dir.join("serial.sock");
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
        let serial_log = cfg.work_dir.join("serial.log");
        let mut log = std::fs::File::create(&serial_log).map_err(io("create", &serial_log))?;
        let console = Arc::new((Mutex::new(Console::default()), Condvar::new()));
        let reader = serial.try_clone().map_err(io("dup", &sock_path))?;
        let shared = Arc::clone(&console);
        let echo = cfg.echo;
        std::thread::spawn(move || {
            let mut reader = reader;
            let mut buf = [0u8; 4096];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) | Err(_) => 0,
                    Ok(n) => n,
                };
                let (lock, cv) = &*shared;
                let Ok(mut c) = lock.lock() else { return };
                if n == 0 {
                    c.closed = true;
                    cv.notify_all();
                    return;
                }
                c.bytes.extend_from_slice(&buf[..n]);
                let _ = log.write_all(&buf[..n]);
                if echo {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&buf[..n]);
                    let _ = out.flush();
                }
                cv.notify_all();
            }
        });
        Ok(Self {
            child,
            console,
            serial,
            cursor: 0,
            started,
            serial_log,
            qmp_path: cfg.work_dir.join("qmp.sock"),
        })
    }

    /// Time since QEMU was started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Everything the console printed so far.
    pub fn output(&self) -> String {
        let (lock, _) = &*self.console;
        lock.lock()
            .map(|c| String::from_utf8_lossy(&c.bytes).into_owned())
            .unwrap_or_default()
    }

    fn tail(&self, lines: usize) -> String {
        let out = self.output();
        let v: Vec<&str> = out.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits for the first of `needles` to appear after the last match;
    /// returns its index and the whole line it is on.
    pub fn wait_for_any(
        &mut self,
        needles: &[&str],
        timeout: Duration,
    ) -> Result<(usize, String), VmError> {
        let wanted: Vec<String> = needles.iter().map(|s| (*s).to_owned()).collect();
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.console;
        let mut guard = lock
            .lock()
            .map_err(|_| VmError::Qmp("console lock poisoned".into()))?;
        loop {
            let hay = &guard.bytes[self.cursor.min(guard.bytes.len())..];
            let best = needles
                .iter()
                .enumerate()
                .filter_map(|(i, n)| find(hay, n.as_bytes()).map(|p| (p, i)))
                .min();
            // Only a whole line counts: the rest of a marker line may
            // still be on its way.
            let complete = best.filter(|(pos, i)| {
                let after = self.cursor + pos + needles[*i].len();
                guard.closed || guard.bytes[after..].contains(&b'\n')
            });
            if let Some((pos, i)) = complete {
                let abs = self.cursor + pos;
                let start = guard.bytes[..abs]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |p| p + 1);
                let end = guard.bytes[abs..]
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(guard.bytes.len(), |p| abs + p);
                let line = String::from_utf8_lossy(&guard.bytes[start..end])
                    .trim_end_matches('\r')
                    .to_owned();
                self.cursor = abs + needles[i].len();
                return Ok((i, line));
            }
            let now = Instant::now();
            if guard.closed || now >= deadline {
                drop(guard);
                if let Ok(Some(status)) = self.child.try_wait() {
                    return Err(VmError::Exited {
                        wanted,
                        status,
                        tail: self.tail(40),
                    });
                }
                if now >= deadline {
                    return Err(VmError::Timeout {
                        wanted,
                        waited: timeout,
                        tail: self.tail(40),
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
                guard = lock
                    .lock()
                    .map_err(|_| VmError::Qmp("console lock poisoned".into()))?;
                continue;
            }
            let (g, _) = cv
                .wait_timeout(guard, deadline - now)
                .map_err(|_| VmError::Qmp("console lock poisoned".into()))?;
            guard = g;
        }
    }

    /// Waits for `needle`; returns the line it is on.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String, VmError> {
        self.wait_for_any(&[needle], timeout).map(|(_, l)| l)
    }

    /// Types a line on the serial console.
    pub fn send_line(&mut self, line: &str) -> Result<(), VmError> {
        self.serial
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|source| VmError::Io {
                what: "serial write",
                path: self.serial_log.clone(),
                source,
            })
    }

    /// Runs a shell command on the serial shell and returns what it
    /// printed, delimited by unique markers so boot noise cannot confuse it.
    pub fn shell(&mut self, command: &str, timeout: Duration) -> Result<(String, i32), VmError> {
        let tag = format!("Q{}", self.started.elapsed().as_nanos() % 1_000_000_007);
        self.send_line(&format!(
            "echo {tag}-BEGIN; {command}; echo {tag}-END rc=$?"
        ))?;
        // The echo of the typed line contains the markers too; skip it by
        // waiting for the marker at the start of a line.
        self.wait_for(&format!("\n{tag}-BEGIN"), timeout)?;
        let begin = self.cursor;
        let line = self.wait_for(&format!("{tag}-END rc="), timeout)?;
        let rc = parse_rc(&line, &tag);
        let out = self.output();
        let body = out
            .get(begin..)
            .unwrap_or("")
            .split(&format!("{tag}-END"))
            .next()
            .unwrap_or("");
        // The shell shares the console with the kernel log: drop the
        // kernel's lines (services starting, a guest booting) from the
        // command's output.
        let body: Vec<&str> = body
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| !is_kernel_line(l))
            .collect();
        Ok((body.join("\n").trim().to_owned(), rc))
    }

    /// Connects to QMP and runs one command.
    pub fn qmp(&self, command: &str) -> Result<serde_json::Value, VmError> {
        let stream =
            UnixStream::connect(&self.qmp_path).map_err(|e| VmError::Qmp(e.to_string()))?;
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

    /// Waits for QEMU to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
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

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_has_the_measured_cpu_and_firmware() {
        let cfg = VmConfig::new(Path::new("/d/disk.img"), Path::new("/w"));
        let a = cfg.args().join(" ");
        assert!(a.contains(&format!("-cpu {CPU_MODEL}")));
        assert!(a.contains("readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"));
        assert!(a.contains("unit=1,file=/w/OVMF_VARS.fd"));
        assert!(a.contains("file=/d/disk.img,format=raw"));
        assert!(a.contains("bootindex=1"));
        assert!(a.contains("-qmp unix:/w/qmp.sock"));
        assert!(!a.contains("-no-reboot"));
        assert!(!a.contains("-kernel"), "the product boots through firmware");
    }

    #[test]
    fn find_locates_needles() {
        assert_eq!(find(b"abcQINIT-READY", b"QINIT"), Some(3));
        assert_eq!(find(b"ab", b"abc"), None);
    }
}

/// A printk line as the console shows it: `[    12.625996] ...`.
fn is_kernel_line(line: &str) -> bool {
    let Some(rest) = line.strip_prefix('[') else {
        return false;
    };
    let Some((stamp, _)) = rest.split_once(']') else {
        return false;
    };
    let stamp = stamp.trim_start();
    matches!(stamp.split_once('.'), Some((s, us))
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
            && us.len() == 6 && us.bytes().all(|b| b.is_ascii_digit()))
}

/// The exit status in a shell marker line `<tag>-END rc=<n>`. The kernel
/// may print onto the same console line right after the number (a service
/// that just died, a guest starting), so only the leading digits count.
fn parse_rc(line: &str, tag: &str) -> i32 {
    line.split(&format!("{tag}-END rc="))
        .nth(1)
        .map(|rest| {
            let end = rest
                .char_indices()
                .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && c == '-')))
                .map_or(rest.len(), |(i, _)| i);
            &rest[..end]
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(-1)
}

#[cfg(test)]
mod rc_tests {
    use super::parse_rc;

    #[test]
    fn kernel_text_after_the_status_is_ignored() {
        assert_eq!(parse_rc("Q1-END rc=0", "Q1"), 0);
        assert_eq!(parse_rc("Q1-END rc=127\r", "Q1"), 127);
        assert_eq!(
            parse_rc("Q1-END rc=0[   13.260911] qinit: xenconsoled: exited", "Q1"),
            0
        );
        assert_eq!(parse_rc("Q1-END rc=", "Q1"), -1);
        assert_eq!(parse_rc("noise", "Q1"), -1);
    }

    #[test]
    fn kernel_lines_are_told_from_command_output() {
        use super::is_kernel_line;
        assert!(is_kernel_line(
            "[   12.625996] qinit: qupdated: ready after 1677 ms"
        ));
        assert!(is_kernel_line("[12345.000001] x"));
        assert!(!is_kernel_line("600 root"));
        assert!(!is_kernel_line("[guivm] ready"));
        assert!(!is_kernel_line("[1.5] short stamp"));
    }
}
