//! The serial-shell executor: `qcmd <request>` typed into the test shell
//! of a machine with one serial line.
//!
//! The foreground process answers at once (the ack, or what a repeated
//! request or a resend asks for) and returns the shell to its prompt, so
//! later requests are answered while a long command runs. A `run` goes on
//! in a `qcmd worker <id>` process that prints the reply when the command
//! ends. Replies are kept in [`STATE_DIR`], one directory per id, so a
//! request typed again never runs its command twice.

use std::io::Write;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use qcmdchan::Frame;

use crate::dispatch::{respond, start_reply, Entry, Job, Store};
use crate::error::{io, Error};
use crate::exec;

/// Where the one-shot processes keep requests and replies (a tmpfs).
pub const STATE_DIR: &str = "/run/qcmd";

/// Replies as files: `<dir>/<id>/command` and, once done, `<dir>/<id>/reply`
/// (the frames, a line each, written to a temporary name and renamed).
#[derive(Debug)]
pub struct DirStore {
    dir: PathBuf,
}

impl DirStore {
    pub fn new(dir: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn entry_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// The command stored for `id`.
    pub fn command(&self, id: &str) -> Result<String, Error> {
        let p = self.entry_dir(id).join("command");
        std::fs::read_to_string(&p).map_err(io("reading", &p))
    }

    /// Stores the reply of a finished command.
    pub fn finish(&self, id: &str, frames: &[Frame]) -> Result<(), Error> {
        let d = self.entry_dir(id);
        let tmp = d.join("reply.tmp");
        let text: String = frames.iter().map(|f| f.render() + "\n").collect();
        std::fs::write(&tmp, text).map_err(io("writing", &tmp))?;
        let reply = d.join("reply");
        std::fs::rename(&tmp, &reply).map_err(io("renaming to", &reply))
    }
}

impl Store for DirStore {
    type Error = Error;

    fn claim(&mut self, id: &str, command: &str) -> Result<Option<Entry>, Error> {
        let d = self.entry_dir(id);
        match std::fs::create_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return self.get(id),
            Err(e) => return Err(io("creating", &d)(e)),
        }
        let p = d.join("command");
        std::fs::write(&p, command).map_err(io("writing", &p))?;
        Ok(None)
    }

    fn get(&self, id: &str) -> Result<Option<Entry>, Error> {
        let d = self.entry_dir(id);
        if !d.is_dir() {
            return Ok(None);
        }
        let reply = d.join("reply");
        match std::fs::read_to_string(&reply) {
            Ok(text) => {
                // Our own file: a line that does not parse is a bug or a
                // damaged tmpfs, and must not be sent as if whole.
                let frames = text
                    .lines()
                    .map(|l| Frame::parse(l.as_bytes()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        io("parsing", &reply)(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            e,
                        ))
                    })?;
                Ok(Some(Entry::Done(frames)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Some(Entry::Running)),
            Err(e) => Err(io("reading", &reply)(e)),
        }
    }
}

/// Prints frames, one line and one write each (a write is not split by
/// another process's write to the same terminal, though the kernel's own
/// console output may still land inside it).
pub fn print(out: &mut impl Write, frames: &[Frame]) -> std::io::Result<()> {
    for f in frames {
        out.write_all(format!("{}\n", f.render()).as_bytes())?;
        out.flush()?;
    }
    Ok(())
}

/// `qcmd <request>`: answers, and starts the worker of a new `run`.
pub fn request(line: &str, dir: &Path, self_exe: &Path) -> Result<(), Error> {
    let mut store = DirStore::new(dir)?;
    let (frames, job) = respond(line, &mut store).map_err(Error::Request)?;
    let mut out = std::io::stdout().lock();
    let stdout = Path::new("standard output");
    print(&mut out, &frames).map_err(io("writing to", stdout))?;
    match job {
        None => Ok(()),
        Some(Job::Run { id, .. }) => {
            // The worker's stdout is this terminal; it reports by itself.
            // Its own process group keeps the shell's job control away.
            let started = Command::new(self_exe)
                .arg("worker")
                .arg(&id)
                .arg(dir)
                .stdin(Stdio::null())
                .process_group(0)
                .spawn();
            if let Err(e) = started {
                let frames = start_reply(&id, Err(format!("qcmd: cannot start the worker: {e}")));
                store.finish(&id, &frames)?;
                print(&mut out, &frames).map_err(io("writing to", stdout))?;
            }
            Ok(())
        }
        Some(Job::Spawn { id, command }) => {
            // PID 1 reaps the spawned command once this process is gone.
            let frames = start_reply(&id, exec::spawn(&command).map(drop));
            store.finish(&id, &frames)?;
            print(&mut out, &frames).map_err(io("writing to", stdout))
        }
    }
}

/// `qcmd worker <id> <dir>`: runs a claimed command, stores and prints
/// its reply.
pub fn worker(id: &str, dir: &Path) -> Result<(), Error> {
    if !qcmdchan::valid_id(id) {
        return Err(Error::BadId(id.to_owned()));
    }
    let store = DirStore::new(dir)?;
    let command = store.command(id)?;
    let outcome = exec::run(&command);
    let frames = qcmdchan::reply_frames(id, &outcome);
    store.finish(id, &frames)?;
    print(&mut std::io::stdout().lock(), &frames)
        .map_err(io("writing to", Path::new("standard output")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcmdchan::Request;

    #[test]
    fn a_directory_store_claims_once_and_keeps_the_reply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = DirStore::new(dir.path()).expect("store");
        assert_eq!(s.get("a1").expect("get"), None);
        assert_eq!(s.claim("a1", "echo hi").expect("claim"), None);
        assert_eq!(
            s.claim("a1", "echo hi").expect("claim"),
            Some(Entry::Running)
        );
        assert_eq!(s.command("a1").expect("command"), "echo hi");
        let frames = qcmdchan::reply_frames(
            "a1",
            &qcmdchan::Outcome {
                output: b"hi\n".to_vec(),
                rc: 0,
                dropped: 0,
            },
        );
        s.finish("a1", &frames).expect("finish");
        assert_eq!(s.get("a1").expect("get"), Some(Entry::Done(frames)));
    }

    #[test]
    fn a_damaged_reply_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = DirStore::new(dir.path()).expect("store");
        s.claim("a1", "true").expect("claim");
        std::fs::write(dir.path().join("a1/reply"), "{QF1 nonsense}\n").expect("write");
        assert!(s.get("a1").is_err());
    }

    #[test]
    fn the_worker_runs_the_claimed_command() {
        if !Path::new("/usr/bin/sh").exists() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = DirStore::new(dir.path()).expect("store");
        let line = Request::run("w1", "echo from-worker; exit 4").render();
        let (_, job) = respond(&line, &mut s).expect("respond");
        assert!(matches!(job, Some(Job::Run { .. })));
        worker("w1", dir.path()).expect("worker");
        let Some(Entry::Done(frames)) = s.get("w1").expect("get") else {
            panic!("no reply");
        };
        let mut c = qcmdchan::Collector::new("w1");
        for f in &frames {
            c.accept(f);
        }
        let Ok(qcmdchan::Progress::Complete(o)) = c.progress() else {
            panic!("incomplete");
        };
        assert_eq!((o.output.as_slice(), o.rc), (&b"from-worker\n"[..], 4));
        assert!(worker("../x", dir.path()).is_err());
    }
}
