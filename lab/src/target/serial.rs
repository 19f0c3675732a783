//! The ways a lab reaches a machine's serial port, each a
//! [`qconsole::Link`] the console reconnects through when the machine's
//! power cycle (or a flaky USB adapter) drops it.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

type Halves = (Box<dyn Read + Send>, Box<dyn Write + Send>);

/// A TCP port that carries the serial line (ser2net, a console server,
/// QEMU's `-serial tcp:`).
#[derive(Debug)]
pub struct TcpLink {
    pub addr: String,
}

impl qconsole::Link for TcpLink {
    fn open(&mut self) -> std::io::Result<Halves> {
        let addr =
            self.addr.to_socket_addrs()?.next().ok_or_else(|| {
                std::io::Error::other(format!("{} resolves to nothing", self.addr))
            })?;
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_nodelay(true)?;
        detect_dead_peer(&s)?;
        Ok((Box::new(s.try_clone()?), Box::new(s)))
    }
}

/// Keepalive probes every few seconds, so a connection whose other end
/// is gone without a word ends with a reset instead of staying silent
/// forever. Seen in a soak: a connect that raced a power cycle came up
/// established on our side with no socket on the serial server's (the
/// kernel had dropped the half-made connection when the machine went
/// away), and the host, which only listens while a machine boots, waited
/// 420 s for output that could never arrive. A live peer answers the
/// probes in its kernel, with nothing on the line.
fn detect_dead_peer(s: &TcpStream) -> std::io::Result<()> {
    use rustix::net::sockopt;
    sockopt::set_socket_keepalive(s, true)?;
    sockopt::set_tcp_keepidle(s, Duration::from_secs(5))?;
    sockopt::set_tcp_keepintvl(s, Duration::from_secs(2))?;
    sockopt::set_tcp_keepcnt(s, 3)?;
    Ok(())
}

/// A serial device on the lab host (`/dev/ttyUSB0`), set raw at `baud`.
#[derive(Debug)]
pub struct DeviceLink {
    pub path: PathBuf,
    pub baud: u32,
}

impl qconsole::Link for DeviceLink {
    fn open(&mut self) -> std::io::Result<Halves> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc_o_noctty())
            .open(&self.path)?;
        let mut t = rustix::termios::tcgetattr(&f)?;
        t.make_raw();
        t.set_speed(self.baud)?;
        rustix::termios::tcsetattr(&f, rustix::termios::OptionalActions::Now, &t)?;
        Ok((Box::new(f.try_clone()?), Box::new(f)))
    }
}

/// `O_NOCTTY`: the lab runner must not make the target's console its own
/// controlling terminal.
fn libc_o_noctty() -> i32 {
    // The flag's value comes from rustix so no libc dependency is needed.
    i32::try_from(rustix::fs::OFlags::NOCTTY.bits()).unwrap_or(0)
}

/// A command whose stdin and stdout are the console
/// (`labgrid-client -p place console`, `picocom -q /dev/ttyUSB0`).
#[derive(Debug)]
pub struct CommandLink {
    pub command: String,
    pub dir: PathBuf,
}

/// The command's stdout; the command is reaped when the stream ends.
struct ChildOut {
    out: std::process::ChildStdout,
    child: Child,
}

impl Read for ChildOut {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.out.read(buf)
    }
}

impl Drop for ChildOut {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl qconsole::Link for CommandLink {
    fn open(&mut self) -> std::io::Result<Halves> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .current_dir(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let (Some(stdin), Some(out)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            return Err(std::io::Error::other("console command without pipes"));
        };
        Ok((Box::new(ChildOut { out, child }), Box::new(stdin)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qconsole::Link;
    use std::io::BufRead;

    #[test]
    fn a_command_console_is_its_stdin_and_stdout() {
        let mut link = CommandLink {
            command: "while read l; do echo \"got $l\"; done".into(),
            dir: std::env::temp_dir(),
        };
        let (r, mut w) = link.open().expect("open");
        w.write_all(b"hello\n").expect("write");
        w.flush().expect("flush");
        let mut line = String::new();
        std::io::BufReader::new(r)
            .read_line(&mut line)
            .expect("read");
        assert_eq!(line, "got hello\n");
    }

    #[test]
    fn a_tcp_console_connects_and_a_closed_port_is_an_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let _ = s.write_all(b"QINIT-READY\n");
            }
        });
        let mut link = TcpLink { addr: addr.clone() };
        let (r, _w) = link.open().expect("open");
        let mut line = String::new();
        std::io::BufReader::new(r)
            .read_line(&mut line)
            .expect("read");
        assert_eq!(line, "QINIT-READY\n");
        // Nobody listens once the server is gone: the console retries later.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while (TcpLink { addr: addr.clone() }).open().is_ok() {
            assert!(std::time::Instant::now() < deadline, "{addr} still open");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn a_tcp_console_probes_for_a_dead_peer() {
        use rustix::net::sockopt;
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let s = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        detect_dead_peer(&s).expect("keepalive");
        assert!(sockopt::socket_keepalive(&s).expect("get"));
        assert_eq!(
            sockopt::tcp_keepidle(&s).expect("idle"),
            Duration::from_secs(5)
        );
        assert_eq!(sockopt::tcp_keepcnt(&s).expect("cnt"), 3);
    }
}
