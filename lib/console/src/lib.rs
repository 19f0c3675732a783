//! A serial console as the test scenarios and the hardware lab see it.
//!
//! Bytes from the machine's first serial port are appended to one growing
//! transcript (and a log file) by a reader thread; the caller waits for
//! marker lines past a cursor that only moves forward, and types commands
//! into the test image's shell. The byte stream comes from anywhere: QEMU's
//! socket, a TCP port (ser2net), a serial device, or a command's pipes
//! (`labgrid-client console`).
//!
//! A console outlives the connection under it. A machine that is powered
//! off and on again keeps one transcript, so a scenario's log tells the
//! whole story. [`Console::attach`] takes one stream (the link is down once
//! it ends); [`Console::follow`] keeps reconnecting to an endpoint, as a lab
//! console must when a power cut drops the connection.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

mod shell;

pub use shell::{Channel, ChannelStats};

/// How long [`Console::follow`] waits between connection attempts.
const RECONNECT_DELAY: Duration = Duration::from_millis(200);

/// Typed input goes out in pieces this big with a pause after each: a
/// serial line has no flow control, and Xen keeps only 128 bytes of
/// console input for dom0. A long command typed at once while dom0 is
/// busy (the GUI VM starting) lost characters in the middle.
const TYPE_CHUNK: usize = 32;
const TYPE_PAUSE: Duration = Duration::from_millis(25);

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("console log {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "timed out after {waited:?} waiting for {wanted:?} on the {console}; last output:\n{tail}"
    )]
    Timeout {
        console: &'static str,
        wanted: Vec<String>,
        waited: Duration,
        tail: String,
    },
    #[error("the {console} closed while waiting for {wanted:?}; last output:\n{tail}")]
    Closed {
        console: &'static str,
        wanted: Vec<String>,
        tail: String,
    },
    #[error("the serial console is not connected")]
    NotConnected,
    #[error("writing to the serial console: {0}")]
    Write(#[source] std::io::Error),
    #[error("console state lock poisoned")]
    Poisoned,
    #[error(
        "command `{command}`: {len} bytes is more than the {max} this channel takes in one request"
    )]
    CommandTooLong {
        command: String,
        len: usize,
        max: usize,
    },
    #[error("command `{command}`: dom0's qcmd did not acknowledge it after {sends} sends ({waited:?}); last output:\n{tail}")]
    NoAck {
        command: String,
        sends: u32,
        waited: Duration,
        tail: String,
    },
    #[error("command `{command}`: dom0's qcmd refused it {sends} times, last: {reason}")]
    Refused {
        command: String,
        sends: u32,
        reason: String,
    },
    #[error("command `{command}`: frames {missing:?} still missing after {resends} resends")]
    Lost {
        command: String,
        missing: Vec<u32>,
        resends: u32,
    },
    #[error("command `{command}`: printed more than dom0 keeps ({dropped} bytes dropped)")]
    OutputTooLarge { command: String, dropped: u64 },
    #[error("command `{command}`: dom0 could not start it: {reason}")]
    NotStarted { command: String, reason: String },
}

/// A source of console connections that can be opened again after the
/// machine drops one (a TCP port, a device, a command).
pub trait Link: Send + 'static {
    /// Opens one connection: its reading and writing halves.
    #[allow(clippy::type_complexity)]
    fn open(&mut self) -> std::io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)>;
}

/// Whether bytes can arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkState {
    Up,
    /// Between connections of a followed endpoint: more may come.
    Reconnecting,
    /// Nothing more will come until the next `attach`.
    Down,
}

struct State {
    bytes: Vec<u8>,
    writer: Option<Box<dyn Write + Send>>,
    link: LinkState,
    /// Bumped by every connection, so a stale reader cannot mark a newer
    /// connection down.
    generation: u64,
    log: Option<File>,
    echo: bool,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> Result<MutexGuard<'_, State>, ConsoleError> {
        self.state.lock().map_err(|_| ConsoleError::Poisoned)
    }

    /// A new connection replaces the old one.
    fn connected(&self, writer: Box<dyn Write + Send>) -> Result<u64, ConsoleError> {
        let mut s = self.lock()?;
        s.generation += 1;
        s.writer = Some(writer);
        s.link = LinkState::Up;
        self.cv.notify_all();
        Ok(s.generation)
    }

    /// Copies one connection's bytes into the transcript until it ends.
    fn pump(&self, mut reader: Box<dyn Read + Send>, generation: u64, after: LinkState) {
        let mut buf = [0u8; 4096];
        loop {
            // A read error ends the connection as its end of file does:
            // the transcript keeps what came, the link state says the rest.
            let n = reader.read(&mut buf).unwrap_or(0);
            let Ok(mut s) = self.state.lock() else { return };
            if n == 0 {
                if s.generation == generation {
                    s.writer = None;
                    s.link = after;
                }
                self.cv.notify_all();
                return;
            }
            s.bytes.extend_from_slice(&buf[..n]);
            // The log is best effort: a full disk must not stop the test
            // from seeing the console.
            if let Some(log) = s.log.as_mut() {
                let _ = log.write_all(&buf[..n]);
            }
            if s.echo {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&buf[..n]);
                let _ = out.flush();
            }
            self.cv.notify_all();
        }
    }
}

/// One machine's serial console, or its dedicated command channel.
pub struct Console {
    shared: Arc<Shared>,
    cursor: usize,
    started: Instant,
    log_path: Option<PathBuf>,
    /// How commands reach dom0's `qcmd` over this console.
    channel: Channel,
    /// What makes this console's command ids unique in its transcript.
    ids: shell::Ids,
    /// A readable record of every command and its outcome.
    journal: String,
    stats: ChannelStats,
    timing: shell::Timing,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("cursor", &self.cursor)
            .field("log", &self.log_path)
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console with no connection yet. Its bytes also go to `log` (a
    /// new file) and, with `echo`, to stdout.
    pub fn new(log: Option<&Path>, echo: bool) -> Result<Self, ConsoleError> {
        let file = log
            .map(|p| {
                File::create(p).map_err(|source| ConsoleError::Log {
                    path: p.to_owned(),
                    source,
                })
            })
            .transpose()?;
        Ok(Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    bytes: Vec::new(),
                    writer: None,
                    link: LinkState::Down,
                    generation: 0,
                    log: file,
                    echo,
                }),
                cv: Condvar::new(),
            }),
            cursor: 0,
            started: Instant::now(),
            log_path: log.map(Path::to_owned),
            channel: Channel::SerialShell,
            ids: shell::Ids::new(),
            journal: String::new(),
            stats: ChannelStats::default(),
            timing: shell::Timing::DEFAULT,
        })
    }

    /// The same console, for commands over `channel`.
    pub fn with_channel(mut self, channel: Channel) -> Self {
        self.channel = channel;
        self
    }

    /// The log file, if there is one.
    pub fn log_path(&self) -> Option<&Path> {
        self.log_path.as_deref()
    }

    /// Reads one stream into the transcript; once it ends, the console is
    /// closed until the next `attach` (QEMU exited).
    pub fn attach(
        &self,
        reader: impl Read + Send + 'static,
        writer: impl Write + Send + 'static,
    ) -> Result<(), ConsoleError> {
        let generation = self.shared.connected(Box::new(writer))?;
        let shared = Arc::clone(&self.shared);
        std::thread::spawn(move || shared.pump(Box::new(reader), generation, LinkState::Down));
        Ok(())
    }

    /// Keeps connecting to `link` for as long as the process runs: a lab
    /// console survives the machine's power cycles.
    pub fn follow(&self, mut link: impl Link) -> Result<(), ConsoleError> {
        self.shared.lock()?.link = LinkState::Reconnecting;
        let shared = Arc::clone(&self.shared);
        std::thread::spawn(move || loop {
            match link.open() {
                Ok((reader, writer)) => {
                    let Ok(generation) = shared.connected(writer) else {
                        return;
                    };
                    shared.pump(reader, generation, LinkState::Reconnecting);
                }
                Err(_) => std::thread::sleep(RECONNECT_DELAY),
            }
        });
        Ok(())
    }

    /// Whether a connection is up right now.
    pub fn is_connected(&self) -> bool {
        self.shared
            .lock()
            .map(|s| s.link == LinkState::Up)
            .unwrap_or(false)
    }

    /// Waits up to `timeout` for a connection.
    pub fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let Ok(mut s) = self.shared.lock() else {
            return false;
        };
        while s.link != LinkState::Up {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            match self.shared.cv.wait_timeout(s, deadline - now) {
                Ok((g, _)) => s = g,
                Err(_) => return false,
            }
        }
        true
    }

    /// Time since the console was made.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Everything the console printed so far.
    pub fn output(&self) -> String {
        self.output_from(0)
    }

    /// What the console printed from byte `mark` on (see [`Console::mark`]).
    pub fn output_from(&self, mark: usize) -> String {
        self.shared
            .lock()
            .map(|s| String::from_utf8_lossy(s.bytes.get(mark..).unwrap_or_default()).into_owned())
            .unwrap_or_default()
    }

    /// The transcript's length now, to slice it later.
    pub fn mark(&self) -> usize {
        self.shared.lock().map(|s| s.bytes.len()).unwrap_or(0)
    }

    /// The last `lines` lines a person wants to read: the command
    /// channel's own lines (requests typed, reply frames) are left out;
    /// [`Console::journal`] has the commands and their output.
    pub fn tail(&self, lines: usize) -> String {
        let out = self.output();
        let v: Vec<&str> = out.lines().filter(|l| !shell::is_channel_line(l)).collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// Moves the cursor to the end: later waits only see new output (a
    /// fresh boot after a power cycle must not match the last one's
    /// markers).
    pub fn skip_to_end(&mut self) {
        self.cursor = self.mark();
    }

    /// Waits for the first of `needles` to appear after the last match;
    /// returns its index and the whole line it is on.
    pub fn wait_for_any(
        &mut self,
        needles: &[&str],
        timeout: Duration,
    ) -> Result<(usize, String), ConsoleError> {
        let wanted = || needles.iter().map(|s| (*s).to_owned()).collect();
        let deadline = Instant::now() + timeout;
        let mut guard = self.shared.lock()?;
        loop {
            if let Some((i, line, cursor)) = find_line(&guard, self.cursor, needles) {
                self.cursor = cursor;
                return Ok((i, line));
            }
            let now = Instant::now();
            if guard.link == LinkState::Down {
                drop(guard);
                return Err(ConsoleError::Closed {
                    console: self.channel.console_name(),
                    wanted: wanted(),
                    tail: self.tail(40),
                });
            }
            if now >= deadline {
                drop(guard);
                return Err(ConsoleError::Timeout {
                    console: self.channel.console_name(),
                    wanted: wanted(),
                    waited: timeout,
                    tail: self.tail(40),
                });
            }
            let (g, _) = self
                .shared
                .cv
                .wait_timeout(guard, deadline - now)
                .map_err(|_| ConsoleError::Poisoned)?;
            guard = g;
        }
    }

    /// Waits for `needle`; returns the line it is on.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String, ConsoleError> {
        self.wait_for_any(&[needle], timeout).map(|(_, l)| l)
    }

    /// Types a line on the console, paced like a person at a keyboard
    /// (see [`TYPE_CHUNK`]).
    pub fn send_line(&mut self, line: &str) -> Result<(), ConsoleError> {
        let bytes = format!("{line}\n").into_bytes();
        for (i, chunk) in bytes.chunks(TYPE_CHUNK).enumerate() {
            if i > 0 {
                std::thread::sleep(self.timing.type_pause);
            }
            // The lock is not held across the pause: the reader thread
            // must go on filling the transcript.
            let mut s = self.shared.lock()?;
            let w = s.writer.as_mut().ok_or(ConsoleError::NotConnected)?;
            w.write_all(chunk)
                .and_then(|()| w.flush())
                .map_err(ConsoleError::Write)?;
        }
        Ok(())
    }
}

/// The first needle found past `cursor` on a complete line: its index,
/// the line, and the cursor after it.
fn find_line(s: &State, cursor: usize, needles: &[&str]) -> Option<(usize, String, usize)> {
    let bytes = &s.bytes;
    let hay = bytes.get(cursor..)?;
    let (pos, i) = needles
        .iter()
        .enumerate()
        .filter_map(|(i, n)| find(hay, n.as_bytes()).map(|p| (p, i)))
        .min()?;
    let abs = cursor + pos;
    let after = abs + needles[i].len();
    // Only a whole line counts: the rest of a marker line may still be on
    // its way.
    if s.link == LinkState::Up && !bytes[after..].contains(&b'\n') {
        return None;
    }
    let start = bytes[..abs]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |p| p + 1);
    let end = bytes[abs..]
        .iter()
        .position(|b| *b == b'\n')
        .map_or(bytes.len(), |p| abs + p);
    let line = String::from_utf8_lossy(&bytes[start..end])
        .trim_end_matches('\r')
        .to_owned();
    Some((i, line, after))
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
    use std::os::unix::net::UnixStream;

    #[test]
    fn find_locates_needles() {
        assert_eq!(find(b"abcQINIT-READY", b"QINIT"), Some(3));
        assert_eq!(find(b"ab", b"abc"), None);
    }

    #[test]
    fn a_closed_link_ends_the_wait_and_a_new_one_continues_the_transcript() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("serial.log");
        let mut c = Console::new(Some(&log), false).expect("console");
        let (ours, mut theirs) = UnixStream::pair().expect("pair");
        c.attach(ours.try_clone().expect("clone"), ours)
            .expect("attach");
        theirs
            .write_all(b"boot one\nQINIT-READY slot=A\n")
            .expect("write");
        let line = c
            .wait_for("QINIT-READY", Duration::from_secs(5))
            .expect("ready");
        assert_eq!(line, "QINIT-READY slot=A");
        drop(theirs);
        let err = c.wait_for("never", Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, ConsoleError::Closed { .. }), "{err}");
        assert!(matches!(c.send_line("x"), Err(ConsoleError::NotConnected)));

        // Power on again: the same transcript goes on, the cursor does not
        // match the old marker twice.
        let (ours, mut theirs) = UnixStream::pair().expect("pair");
        c.attach(ours.try_clone().expect("clone"), ours)
            .expect("attach");
        theirs.write_all(b"QINIT-READY slot=B\n").expect("write");
        let line = c
            .wait_for("QINIT-READY", Duration::from_secs(5))
            .expect("ready");
        assert_eq!(line, "QINIT-READY slot=B");
        drop(theirs);
        let _ = c.wait_for("never", Duration::from_secs(5));
        let logged = std::fs::read_to_string(&log).expect("log");
        assert_eq!(logged, "boot one\nQINIT-READY slot=A\nQINIT-READY slot=B\n");
    }

    #[test]
    fn a_marker_counts_only_once_its_line_is_complete() {
        let (ours, mut theirs) = UnixStream::pair().expect("pair");
        let mut c = Console::new(None, false).expect("console");
        c.attach(ours.try_clone().expect("clone"), ours)
            .expect("attach");
        theirs.write_all(b"QINIT-READY slot=A ver").expect("write");
        let err = c
            .wait_for("QINIT-READY", Duration::from_millis(300))
            .unwrap_err();
        assert!(matches!(err, ConsoleError::Timeout { .. }), "{err}");
        theirs.write_all(b"sion=0.1.0\n").expect("write");
        let line = c
            .wait_for("QINIT-READY", Duration::from_secs(5))
            .expect("ready");
        assert_eq!(line, "QINIT-READY slot=A version=0.1.0");
    }

    /// Serves one connection per entry of `sessions` on a socket pair.
    struct Sessions(std::sync::mpsc::Receiver<UnixStream>);

    impl Link for Sessions {
        fn open(&mut self) -> std::io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)> {
            let s = self
                .0
                .recv_timeout(Duration::from_millis(50))
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::ConnectionRefused))?;
            Ok((Box::new(s.try_clone()?), Box::new(s)))
        }
    }

    #[test]
    fn a_followed_link_reconnects_and_waits_across_the_gap() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut c = Console::new(None, false).expect("console");
        c.follow(Sessions(rx)).expect("follow");
        let (ours, mut theirs) = UnixStream::pair().expect("pair");
        tx.send(ours).expect("send");
        assert!(c.wait_connected(Duration::from_secs(5)));
        theirs.write_all(b"first\n").expect("write");
        c.wait_for("first", Duration::from_secs(5)).expect("first");
        drop(theirs);
        // The machine is off for a while; the wait goes on through it.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            let (ours, mut theirs) = UnixStream::pair().expect("pair");
            tx.send(ours).expect("send");
            std::thread::sleep(Duration::from_millis(100));
            theirs.write_all(b"second\n").expect("write");
            std::thread::sleep(Duration::from_millis(500));
        });
        c.wait_for("second", Duration::from_secs(10))
            .expect("second");
    }
}
