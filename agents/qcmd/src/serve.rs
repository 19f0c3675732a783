//! The daemon on the dedicated channel: `qcmd serve`, a service of the
//! test images, reading requests from the virtio-serial port that the
//! QEMU launcher names [`qcmdchan::VIRTIO_PORT_NAME`]. Nothing else writes
//! to that port, but the protocol is the same as on the serial line, so
//! one host-side client serves both.
//!
//! Each `run` goes to a thread of its own, so a resend is answered while
//! a long command runs; replies go out under one lock, a frame at a time.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qcmdchan::Frame;

use crate::dispatch::{respond, start_reply, Job, MemStore};
use crate::error::{io, Error};
use crate::exec;

/// Where the kernel lists virtio-serial ports and their names.
const PORTS: &str = "/sys/class/virtio-ports";
/// A line longer than this is not a request (the longest is about 8 KiB).
const MAX_LINE: usize = 16 * 1024;
/// How often to look again for the port, and to read again while the
/// host end is not connected (the port then reads as end-of-file).
const PORT_POLL: Duration = Duration::from_secs(2);
const HOST_POLL: Duration = Duration::from_millis(100);

/// The device of the port named `name`, if the machine has one.
pub fn find_port(sys: &Path, name: &str) -> Option<PathBuf> {
    let mut found: Vec<String> = std::fs::read_dir(sys)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| {
            std::fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim_end() == name)
        })
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    found.sort();
    found.first().map(|dev| Path::new("/dev").join(dev))
}

/// Waits for the port to appear, then serves it until the process ends.
pub fn serve(name: &str) -> Result<(), Error> {
    let mut told = false;
    let path = loop {
        if let Some(p) = find_port(Path::new(PORTS), name) {
            break p;
        }
        if !told {
            // A lab machine has no such port: its commands come over the
            // serial shell. Keep looking, quietly.
            eprintln!("info: no virtio port named {name} yet; commands come over the serial shell meanwhile");
            told = true;
        }
        std::thread::sleep(PORT_POLL);
    };
    let port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io("opening", &path))?;
    let writer = port.try_clone().map_err(io("duplicating", &path))?;
    eprintln!("info: serving commands on {}", path.display());
    serve_stream(port, writer, HOST_POLL);
    Ok(())
}

/// The request loop over any byte stream: `reader` gives request lines,
/// `writer` takes frames. End-of-file means "nobody there yet": read again
/// after `idle` (a virtio port reads as end-of-file while the host end is
/// closed). Returns only if reading fails.
pub fn serve_stream(reader: impl Read, writer: impl Write + Send + 'static, idle: Duration) {
    let out: Arc<Mutex<Box<dyn Write + Send>>> = Arc::new(Mutex::new(Box::new(writer)));
    let store = Arc::new(Mutex::new(MemStore::default()));
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    let mut overlong = false;
    loop {
        line.clear();
        let n = match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("error: reading requests: {e}");
                return;
            }
        };
        if n == 0 {
            std::thread::sleep(idle);
            continue;
        }
        if line.last() != Some(&b'\n') {
            if line.len() >= MAX_LINE {
                // Drop the rest of this line, up to its newline.
                overlong = true;
            }
            // Otherwise the host closed mid-line: what came is dropped.
            continue;
        }
        if std::mem::take(&mut overlong) {
            eprintln!("warn: dropped a request line over {MAX_LINE} bytes");
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        handle(text.trim_end(), &store, &out);
    }
}

fn handle(line: &str, store: &Arc<Mutex<MemStore>>, out: &Arc<Mutex<Box<dyn Write + Send>>>) {
    if line.trim().is_empty() {
        return;
    }
    let answer = {
        let Ok(mut s) = store.lock() else { return };
        respond(line, &mut *s)
    };
    let (frames, job) = match answer {
        Ok(a) => a,
        Err(reason) => {
            eprintln!("warn: ignored a line: {reason}");
            return;
        }
    };
    send(out, &frames);
    match job {
        None => {}
        Some(Job::Run { id, command }) => {
            let store = Arc::clone(store);
            let out = Arc::clone(out);
            std::thread::spawn(move || {
                let frames = qcmdchan::reply_frames(&id, &exec::run(&command));
                if let Ok(mut s) = store.lock() {
                    s.finish(&id, frames.clone());
                }
                send(&out, &frames);
            });
        }
        Some(Job::Spawn { id, command }) => {
            let started = exec::spawn(&command).map(|mut child| {
                // Reap it whenever it ends; nobody waits for its status.
                std::thread::spawn(move || child.wait());
            });
            let frames = start_reply(&id, started);
            if let Ok(mut s) = store.lock() {
                s.finish(&id, frames.clone());
            }
            send(out, &frames);
        }
    }
}

fn send(out: &Arc<Mutex<Box<dyn Write + Send>>>, frames: &[Frame]) {
    let Ok(mut w) = out.lock() else { return };
    for f in frames {
        if let Err(e) = w
            .write_all(format!("{}\n", f.render()).as_bytes())
            .and_then(|()| w.flush())
        {
            // The host went away mid-reply; it asks again when it is back.
            eprintln!("warn: writing a reply: {e}");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcmdchan::{Collector, Progress, Request, Scanner};
    use std::os::unix::net::UnixStream;

    #[test]
    fn the_port_is_found_by_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (dev, name) in [("vport1p1", "other"), ("vport2p1", "org.x.cmd")] {
            std::fs::create_dir(dir.path().join(dev)).expect("mkdir");
            std::fs::write(dir.path().join(dev).join("name"), format!("{name}\n")).expect("name");
        }
        assert_eq!(
            find_port(dir.path(), "org.x.cmd"),
            Some(PathBuf::from("/dev/vport2p1"))
        );
        assert_eq!(find_port(dir.path(), "none"), None);
    }

    #[test]
    fn a_stream_serves_runs_and_resends() {
        if !Path::new("/usr/bin/sh").exists() {
            return;
        }
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let w = theirs.try_clone().expect("clone");
        std::thread::spawn(move || serve_stream(theirs, w, Duration::from_millis(10)));
        let mut ours_w = ours.try_clone().expect("clone");
        let mut oversized = vec![b'x'; MAX_LINE + 5];
        oversized.push(b'\n');
        ours_w.write_all(&oversized).expect("write");
        ours_w.write_all(b"garbage\n").expect("write");
        let req = Request::run("s1", "echo served; exit 2").render();
        ours_w
            .write_all(format!("{req}\n").as_bytes())
            .expect("write");
        let mut c = Collector::new("s1");
        let mut scanner = Scanner::at(0);
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        let mut r = ours;
        r.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let outcome = loop {
            let n = r.read(&mut buf).expect("read");
            assert!(n > 0, "closed");
            bytes.extend_from_slice(&buf[..n]);
            for f in scanner.scan(&bytes) {
                c.accept(&f);
            }
            if let Ok(Progress::Complete(o)) = c.progress() {
                break o;
            }
        };
        assert_eq!(
            (outcome.output.as_slice(), outcome.rc),
            (&b"served\n"[..], 2)
        );
        // Asked again, the reply comes again, without running anything.
        let resend = Request::resend("s1", &qcmdchan::Resend::all()).render();
        ours_w
            .write_all(format!("{resend}\n").as_bytes())
            .expect("write");
        let mut again = Collector::new("s1");
        let mut scanner = Scanner::at(bytes.len());
        loop {
            let n = r.read(&mut buf).expect("read");
            bytes.extend_from_slice(&buf[..n]);
            for f in scanner.scan(&bytes) {
                again.accept(&f);
            }
            if let Ok(Progress::Complete(o)) = again.progress() {
                assert_eq!(o, outcome);
                break;
            }
        }
    }
}
