//! Commands on the machine: the host end of the command channel (the
//! protocol is `qcmdchan`'s; dom0's end is `qcmd`).
//!
//! A [`Console`] sends a request and collects the reply frames from its
//! transcript. Over a dedicated channel (nested QEMU's virtio-serial port)
//! nothing else is in that transcript. Over a lab machine's only serial
//! line the request is typed into the test shell, and the reply shares
//! the line with the kernel, Xen and the services: a request garbled on
//! its way in is refused and typed again, and frames broken by other
//! output are asked for again until the output matches its digest.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, Instant};

use qcmdchan::{
    Collector, Op, Outcome, Progress, Request, Resend, Scanner, FRAME_START, REQUEST_START,
};

use crate::{Console, ConsoleError, LinkState};

/// How requests reach dom0's `qcmd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Typed into the test image's serial shell as `qcmd <request>`,
    /// paced; the reply comes back among everything else on the console.
    SerialShell,
    /// Written whole to a port that only `qcmd serve` reads and writes.
    Dedicated,
}

impl Channel {
    /// The text sent for one request.
    fn line(self, request: &Request) -> String {
        match self {
            Channel::SerialShell => format!("qcmd {}", request.render()),
            Channel::Dedicated => request.render(),
        }
    }

    /// What errors call a console of this channel.
    pub(crate) fn console_name(self) -> &'static str {
        match self {
            Channel::SerialShell => "serial console",
            Channel::Dedicated => "command channel",
        }
    }

    /// The longest line this channel takes. Busybox's line editor keeps
    /// 1024 bytes of a typed line; the dedicated port has no such limit
    /// but the protocol's.
    fn max_line(self) -> usize {
        match self {
            Channel::SerialShell => 1000,
            Channel::Dedicated => 2 * qcmdchan::MAX_REQUEST_PAYLOAD + 64,
        }
    }
}

/// Counts of what the channel had to repeat: zero on a clean line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelStats {
    pub commands: u64,
    /// Requests sent again (garbled, or not acknowledged in time).
    pub requests_repeated: u64,
    /// Frames asked for again (lost to other output on the line).
    pub frames_resent: u64,
}

/// The channel's patience.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// No ack in this long: the request was lost or garbled past
    /// recognition; send it again.
    ack: Duration,
    /// With frames missing, ask for them after this pause (a frame
    /// printed just before may still be on its way).
    grace: Duration,
    /// Acknowledged but silent this long: ask (a `wait` comes back while
    /// the command runs, the whole reply if its frames were lost). The
    /// pause doubles after each ask, up to `poll_max`.
    poll_first: Duration,
    poll_max: Duration,
    /// The pause after each piece of typed input (see `TYPE_CHUNK`).
    pub(crate) type_pause: Duration,
}

impl Timing {
    pub(crate) const DEFAULT: Self = Self {
        ack: Duration::from_secs(20),
        grace: Duration::from_millis(500),
        poll_first: Duration::from_secs(3),
        poll_max: Duration::from_secs(30),
        type_pause: crate::TYPE_PAUSE,
    };
}

/// How often a request is sent in all before giving up.
const MAX_SENDS: u32 = 6;
/// How many times missing frames are asked for before giving up.
const MAX_RESENDS: u32 = 40;
/// How often the loop looks at the transcript when nothing arrives.
const TICK: Duration = Duration::from_millis(50);

/// Unique command ids for one console's transcript: a prefix from the
/// clock and the process, then a counter.
#[derive(Debug)]
pub(crate) struct Ids {
    prefix: String,
    next: u64,
}

impl Ids {
    pub(crate) fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let seed = nanos ^ (u128::from(std::process::id()) << 64);
        Self {
            prefix: base36(seed % 36u128.pow(6), 6),
            next: 1,
        }
    }

    fn next(&mut self) -> String {
        let n = self.next;
        self.next += 1;
        format!("{}{}", self.prefix, base36(u128::from(n), 1))
    }
}

fn base36(mut n: u128, min_digits: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    while n > 0 || out.len() < min_digits {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    String::from_utf8(out).expect("base36 digits are ASCII")
}

/// Whether a console line belongs to the command channel (a typed
/// request or a reply frame) rather than to what a person reads.
pub(crate) fn is_channel_line(line: &str) -> bool {
    let frame = std::str::from_utf8(FRAME_START).expect("ASCII");
    line.contains(frame) || line.contains(REQUEST_START)
}

impl Console {
    /// Runs a shell command in dom0 and returns what it printed (stdout
    /// and stderr, trimmed) and its exit status.
    pub fn shell(
        &mut self,
        command: &str,
        timeout: Duration,
    ) -> Result<(String, i32), ConsoleError> {
        let o = self.exchange(Request::run, command, timeout)?;
        if o.dropped > 0 {
            return Err(ConsoleError::OutputTooLarge {
                command: command.to_owned(),
                dropped: o.dropped,
            });
        }
        let text = String::from_utf8_lossy(&o.output).trim().to_owned();
        Ok((text, o.rc))
    }

    /// Starts a shell command in dom0 without waiting for it (a reboot, an
    /// update that a power cut will interrupt): returns once dom0 says it
    /// started. Its output is discarded; redirect it to keep it.
    pub fn spawn(&mut self, command: &str, timeout: Duration) -> Result<(), ConsoleError> {
        let o = self.exchange(Request::spawn, command, timeout)?;
        if o.rc != 0 {
            return Err(ConsoleError::NotStarted {
                command: command.to_owned(),
                reason: String::from_utf8_lossy(&o.output).trim().to_owned(),
            });
        }
        Ok(())
    }

    /// What the commands so far had to repeat.
    pub fn stats(&self) -> ChannelStats {
        self.stats
    }

    /// Every command so far with its output and status, readable.
    pub fn journal(&self) -> &str {
        &self.journal
    }

    /// The journal's length now, to slice it later.
    pub fn journal_mark(&self) -> usize {
        self.journal.len()
    }

    /// The journal from `mark` (see [`Console::journal_mark`]) on.
    pub fn journal_from(&self, mark: usize) -> &str {
        self.journal.get(mark..).unwrap_or_default()
    }

    /// Sends the request `make(id, command)` and collects its reply.
    fn exchange(
        &mut self,
        make: fn(&str, &str) -> Request,
        command: &str,
        timeout: Duration,
    ) -> Result<Outcome, ConsoleError> {
        let id = self.ids.next();
        let request = make(&id, command);
        let op = request.op;
        let line = self.channel.line(&request);
        if line.len() > self.channel.max_line() || command.len() > qcmdchan::MAX_REQUEST_PAYLOAD {
            // The line is the command as hex plus a fixed overhead.
            let fits_line = (self.channel.max_line() - (line.len() - 2 * command.len())) / 2;
            return Err(ConsoleError::CommandTooLong {
                command: command.to_owned(),
                len: command.len(),
                max: fits_line.min(qcmdchan::MAX_REQUEST_PAYLOAD),
            });
        }
        self.stats.commands += 1;
        let t0 = Instant::now();
        let _ = writeln!(
            self.journal,
            "[{:8.1} s] $ {command}{}",
            self.uptime().as_secs_f64(),
            if op == Op::Spawn { " &" } else { "" }
        );
        let result = self.collect(&id, command, &line, timeout);
        match &result {
            Ok(o) => {
                let text = String::from_utf8_lossy(&o.output);
                self.journal.push_str(&text);
                if !text.is_empty() && !text.ends_with('\n') {
                    self.journal.push('\n');
                }
                let _ = writeln!(
                    self.journal,
                    "[{:8.1} s] rc={} in {:.1} s",
                    self.uptime().as_secs_f64(),
                    o.rc,
                    t0.elapsed().as_secs_f64()
                );
            }
            Err(e) => {
                let _ = writeln!(
                    self.journal,
                    "[{:8.1} s] failed: {}",
                    self.uptime().as_secs_f64(),
                    e.to_string().lines().next().unwrap_or_default()
                );
            }
        }
        result
    }

    fn collect(
        &mut self,
        id: &str,
        command: &str,
        line: &str,
        timeout: Duration,
    ) -> Result<Outcome, ConsoleError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut scanner = Scanner::at(self.mark());
        let mut reply = Collector::new(id);
        self.send_request(line)?;
        let mut sends = 1u32;
        let mut sent_at = Instant::now();
        let mut last_news = Instant::now();
        let mut resends = 0u32;
        let mut poll = self.timing.poll_first;
        loop {
            let (frames, seen, link) = {
                let s = self.shared.lock()?;
                (scanner.scan(&s.bytes), s.bytes.len(), s.link)
            };
            for f in &frames {
                if reply.accept(f) {
                    last_news = Instant::now();
                }
            }
            let now = Instant::now();
            match reply.progress() {
                Ok(Progress::Complete(o)) => return Ok(o),
                Err(()) => {
                    // Every frame here, the digest wrong: one of them was
                    // corrupted in a way its checksum missed. Ask for all.
                    reply.restart_data();
                    self.resend(id, Resend::all(), &mut resends, command)?;
                    last_news = now;
                }
                Ok(Progress::Refused(reason)) => {
                    if sends >= MAX_SENDS {
                        return Err(ConsoleError::Refused {
                            command: command.to_owned(),
                            sends,
                            reason,
                        });
                    }
                    reply.retry();
                    self.send_request(line)?;
                    self.stats.requests_repeated += 1;
                    sends += 1;
                    sent_at = now;
                }
                Ok(Progress::Sent) if now.duration_since(sent_at) >= self.timing.ack => {
                    if sends >= MAX_SENDS {
                        return Err(ConsoleError::NoAck {
                            command: command.to_owned(),
                            sends,
                            waited: started.elapsed(),
                            tail: self.tail(20),
                        });
                    }
                    self.send_request(line)?;
                    self.stats.requests_repeated += 1;
                    sends += 1;
                    sent_at = now;
                }
                Ok(Progress::Acked) => {
                    // dom0 prints a reply only once the command has ended:
                    // data without an end frame means the end was lost.
                    if let Some(high) = reply.highest_data() {
                        if now.duration_since(last_news) >= self.timing.grace {
                            let which = Resend {
                                seqs: (1..high).filter(|s| !reply.has_data(*s)).collect(),
                                from: Some(high + 1),
                            };
                            self.resend(id, which, &mut resends, command)?;
                            last_news = now;
                        }
                    } else if now.duration_since(last_news) >= poll {
                        // Still running, or a reply with no output whose
                        // end frame was lost: ask, less often as time goes.
                        self.send_request(
                            &self.channel.line(&Request::resend(id, &Resend::all())),
                        )?;
                        last_news = now;
                        poll = (poll * 2).min(self.timing.poll_max);
                    }
                }
                Ok(Progress::Missing(missing))
                    if now.duration_since(last_news) >= self.timing.grace =>
                {
                    if resends >= MAX_RESENDS {
                        return Err(ConsoleError::Lost {
                            command: command.to_owned(),
                            missing,
                            resends,
                        });
                    }
                    let which = Resend {
                        seqs: missing,
                        from: None,
                    };
                    self.resend(id, which, &mut resends, command)?;
                    last_news = now;
                }
                Ok(_) => {}
            }
            if link == LinkState::Down {
                return Err(ConsoleError::Closed {
                    console: self.channel.console_name(),
                    wanted: vec![format!("the reply to `{command}`")],
                    tail: self.tail(40),
                });
            }
            if now >= deadline {
                return Err(ConsoleError::Timeout {
                    console: self.channel.console_name(),
                    wanted: vec![format!("the reply to `{command}`")],
                    waited: timeout,
                    tail: self.tail(40),
                });
            }
            self.wait_past(seen, TICK.min(deadline - now))?;
        }
    }

    /// Asks for frames of `id` again; a list too long for one line is
    /// cut (what is left is asked for next time).
    fn resend(
        &mut self,
        id: &str,
        mut which: Resend,
        resends: &mut u32,
        command: &str,
    ) -> Result<(), ConsoleError> {
        let line = loop {
            let line = self.channel.line(&Request::resend(id, &which));
            if line.len() <= self.channel.max_line() || which.seqs.len() <= 1 {
                break line;
            }
            let keep = which.seqs.len() / 2;
            which.seqs.truncate(keep);
            which.from = None;
        };
        if line.len() > self.channel.max_line() {
            return Err(ConsoleError::CommandTooLong {
                command: command.to_owned(),
                len: line.len(),
                max: self.channel.max_line(),
            });
        }
        *resends += 1;
        self.stats.frames_resent += which.seqs.len().max(1) as u64;
        self.send_request(&line)
    }

    fn send_request(&mut self, line: &str) -> Result<(), ConsoleError> {
        match self.channel {
            Channel::SerialShell => self.send_line(line),
            Channel::Dedicated => {
                let mut s = self.shared.lock()?;
                let w = s.writer.as_mut().ok_or(ConsoleError::NotConnected)?;
                w.write_all(format!("{line}\n").as_bytes())
                    .and_then(|()| w.flush())
                    .map_err(ConsoleError::Write)
            }
        }
    }

    /// Waits up to `timeout` for the transcript to grow past `len` bytes
    /// (or the link to change).
    fn wait_past(&self, len: usize, timeout: Duration) -> Result<(), ConsoleError> {
        let s = self.shared.lock()?;
        if s.bytes.len() > len || s.link == LinkState::Down {
            return Ok(());
        }
        let _ = self
            .shared
            .cv
            .wait_timeout(s, timeout)
            .map_err(|_| ConsoleError::Poisoned)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex};

    use qcmdchan::{reply_frames, Frame};

    /// The same logic with less patience, so the noisy tests finish in
    /// seconds.
    fn fast(c: Console) -> Console {
        let mut c = c;
        c.timing = Timing {
            ack: Duration::from_millis(400),
            grace: Duration::from_millis(50),
            poll_first: Duration::from_millis(150),
            poll_max: Duration::from_secs(1),
            type_pause: Duration::from_millis(1),
        };
        c
    }

    /// `c` reading and writing `stream`.
    fn attached(c: Console, stream: UnixStream) -> Console {
        c.attach(stream.try_clone().expect("clone"), stream)
            .expect("attach");
        c
    }

    #[test]
    fn ids_are_unique_and_well_formed() {
        let mut ids = Ids::new();
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert!(qcmdchan::valid_id(&a), "{a}");
        assert_eq!(base36(0, 3), "000");
        assert_eq!(base36(36 * 36 + 35, 1), "10z");
    }

    /// What a noisy lab console does to bytes on their way to the host:
    /// kernel-style lines at random points, inside frames too, and now and
    /// then a byte lost (Xen drops console output when its buffer is full).
    struct Noise {
        rng: fastrand::Rng,
        rate: f64,
    }

    const KERNEL: &[&str] = &[
        "\r\n[   12.625996] qinit: qupdated: ready after 1677 ms\r\n",
        "[   13.260911] qinit: xenconsoled: exited (signal 9)",
        "\r\n(XEN) d1v0 Unhandled: vec 14\r\n",
        "[  100.000001] {QF1 ",
        "}",
    ];

    impl Noise {
        fn mangle(&mut self, bytes: &[u8]) -> Vec<u8> {
            let mut out = Vec::with_capacity(bytes.len() + 64);
            for &b in bytes {
                if self.rng.f64() < self.rate {
                    out.extend(KERNEL[self.rng.usize(..KERNEL.len())].bytes());
                }
                if self.rng.f64() < self.rate / 4.0 {
                    continue;
                }
                out.push(b);
            }
            out
        }
    }

    /// A fake dom0 behind a serial shell: it echoes what is typed (with
    /// noise), garbles typed input now and then, and answers `qcmd`
    /// requests through the real dispatch of frames, with kernel text
    /// injected into everything it prints.
    fn noisy_dom0(peer: UnixStream, seed: u64, rate: f64, runs: Arc<Mutex<Vec<String>>>) {
        std::thread::spawn(move || {
            let out = Arc::new(Mutex::new(peer.try_clone().expect("clone")));
            let noise = Arc::new(Mutex::new(Noise {
                rng: fastrand::Rng::with_seed(seed),
                rate,
            }));
            let print = {
                let out = Arc::clone(&out);
                let noise = Arc::clone(&noise);
                move |text: String| {
                    let bytes = noise.lock().expect("noise").mangle(text.as_bytes());
                    let _ = out.lock().expect("out").write_all(&bytes);
                }
            };
            let mut replies: std::collections::HashMap<String, Vec<Frame>> = Default::default();
            let mut input_rng = fastrand::Rng::with_seed(seed ^ 0x5555);
            for line in BufReader::new(peer).lines() {
                let Ok(mut line) = line else { return };
                // Typed input loses a character now and then.
                if input_rng.f64() < rate * 20.0 && line.len() > 10 {
                    line.remove(input_rng.usize(5..line.len()));
                }
                print(format!("{line}\r\n"));
                let Some(req) = line.strip_prefix("qcmd ") else {
                    print("sh: not found\r\ndom0# ".into());
                    continue;
                };
                let frames = match Request::parse(req) {
                    Err(e) => match e.id() {
                        Some(id) => vec![Frame::err(id, &e.to_string())],
                        None => vec![],
                    },
                    Ok(r) => match r.op {
                        Op::Run | Op::Spawn => {
                            let cmd = r.command().expect("command").to_owned();
                            let done = replies.entry(r.id.clone()).or_insert_with(|| {
                                runs.lock().expect("runs").push(cmd.clone());
                                let out = format!("ran: {cmd}\n").repeat(40);
                                reply_frames(
                                    &r.id,
                                    &Outcome {
                                        output: out.into_bytes(),
                                        rc: 7,
                                        dropped: 0,
                                    },
                                )
                            });
                            let mut v = vec![Frame::ack(&r.id)];
                            v.extend(done.iter().cloned());
                            v
                        }
                        Op::Resend => {
                            let which = r.resend_which().expect("which");
                            replies
                                .get(&r.id)
                                .map(|all| {
                                    all.iter().filter(|f| which.wants(f.seq)).cloned().collect()
                                })
                                .unwrap_or_default()
                        }
                    },
                };
                for f in frames {
                    print(format!("{}\r\n", f.render()));
                }
                print("dom0# ".into());
            }
        });
    }

    #[test]
    fn commands_survive_a_noisy_serial_line() {
        for seed in 0..8u64 {
            let (ours, theirs) = UnixStream::pair().expect("pair");
            let runs = Arc::new(Mutex::new(Vec::new()));
            noisy_dom0(theirs, seed, 0.002, Arc::clone(&runs));
            let mut c = attached(fast(Console::new(None, false).expect("console")), ours);
            for i in 0..5 {
                let cmd = format!("echo {seed}-{i}");
                let (out, rc) = c.shell(&cmd, Duration::from_secs(60)).expect("shell");
                assert_eq!(
                    out,
                    format!("ran: {cmd}\n").repeat(40).trim(),
                    "seed {seed}"
                );
                assert_eq!(rc, 7);
            }
            eprintln!("seed {seed}: {:?}", c.stats());
            // Each command ran exactly once, however often it was sent.
            let ran = runs.lock().expect("runs").clone();
            assert_eq!(ran.len(), 5, "seed {seed}: {ran:?}");
            assert!(c.journal().contains(&format!("$ echo {seed}-4")));
        }
    }

    #[test]
    fn the_noise_is_heavy_enough_to_matter() {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        noisy_dom0(theirs, 99, 0.004, Arc::new(Mutex::new(Vec::new())));
        let mut c = attached(fast(Console::new(None, false).expect("console")), ours);
        for i in 0..10 {
            c.shell(&format!("echo {i}"), Duration::from_secs(60))
                .expect("shell");
        }
        let st = c.stats();
        assert_eq!(st.commands, 10);
        assert!(
            st.frames_resent > 0,
            "no frame was ever lost, so the test shows nothing: {st:?}"
        );
    }

    #[test]
    fn a_dedicated_channel_writes_requests_whole() {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let dedicated = Console::new(None, false)
            .expect("console")
            .with_channel(Channel::Dedicated);
        let mut c = attached(dedicated, ours);
        std::thread::spawn(move || {
            let mut out = theirs.try_clone().expect("clone");
            for line in BufReader::new(theirs).lines() {
                let req = Request::parse(&line.expect("line")).expect("a bare request");
                let mut text = format!("{}\n", Frame::ack(&req.id).render());
                for f in reply_frames(
                    &req.id,
                    &Outcome {
                        output: b"  hi  \n".to_vec(),
                        rc: 0,
                        dropped: 0,
                    },
                ) {
                    text.push_str(&format!("{}\n", f.render()));
                }
                out.write_all(text.as_bytes()).expect("write");
            }
        });
        assert_eq!(
            c.shell("greet", Duration::from_secs(10)).expect("shell"),
            ("hi".to_owned(), 0)
        );
        assert_eq!(c.stats().requests_repeated + c.stats().frames_resent, 0);
        c.spawn("reboot", Duration::from_secs(10)).expect("spawn");
    }

    #[test]
    fn a_command_too_long_for_the_shell_line_is_refused_before_sending() {
        let mut c = Console::new(None, false).expect("console");
        let err = c
            .shell(&"x".repeat(600), Duration::from_secs(1))
            .unwrap_err();
        assert!(matches!(err, ConsoleError::CommandTooLong { .. }), "{err}");
    }

    #[test]
    fn silence_is_an_error_that_names_the_command() {
        let (ours, _theirs) = UnixStream::pair().expect("pair");
        let dedicated = Console::new(None, false)
            .expect("console")
            .with_channel(Channel::Dedicated);
        let mut c = attached(dedicated, ours);
        let err = c.shell("true", Duration::from_millis(600)).unwrap_err();
        assert!(err.to_string().contains("the reply to `true`"), "{err}");
    }
}
