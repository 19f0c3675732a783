//! What to answer a request with, given what is known of its id: no I/O
//! here. The two executors (the serial shell's one-shot `qcmd` and the
//! daemon on the virtio port) differ only in where they keep replies and
//! how they run the job this returns.

use std::collections::VecDeque;

#[cfg(test)]
use qcmdchan::Resend;
use qcmdchan::{Frame, Kind, Op, Request};

/// What is known of one id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// The command runs; its reply is not ready.
    Running,
    /// The reply, every frame after the ack.
    Done(Vec<Frame>),
}

/// Where replies are kept so a request that arrives again, or a resend,
/// is answered without running anything twice.
pub trait Store {
    type Error: std::fmt::Display;
    /// Claims `id` for a new command. `None` if the id was new; otherwise
    /// what is known of it (nothing is claimed).
    fn claim(&mut self, id: &str, command: &str) -> Result<Option<Entry>, Self::Error>;
    /// What is known of `id`, if anything.
    fn get(&self, id: &str) -> Result<Option<Entry>, Self::Error>;
}

/// Work the executor must do after printing the answer's frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// Run to the end, then store and print the reply.
    Run { id: String, command: String },
    /// Start and do not wait; then store and print [`start_reply`]'s reply.
    Spawn { id: String, command: String },
}

/// The answer to one request line: frames to print now, and the job to do
/// after, if any. A line that cannot be answered (not a request, or too
/// garbled to name its id) gives nothing; the error says why.
pub fn respond<S: Store>(line: &str, store: &mut S) -> Result<(Vec<Frame>, Option<Job>), String> {
    let req = match Request::parse(line) {
        Ok(r) => r,
        Err(e) => {
            // A garbled request whose id survived is told so: the host
            // sends it again at once instead of waiting for an ack.
            return match e.id() {
                Some(id) => Ok((vec![Frame::err(id, &e.to_string())], None)),
                None => Err(e.to_string()),
            };
        }
    };
    let id = req.id.clone();
    let store_err = |e: S::Error| format!("request {id}: reply store: {e}");
    match req.op {
        Op::Run | Op::Spawn => {
            let command = req.command().map_err(|e| e.to_string())?.to_owned();
            match store.claim(&id, &command).map_err(store_err)? {
                None => {
                    let ack = vec![Frame::ack(&id)];
                    let job = match req.op {
                        Op::Spawn => Job::Spawn { id, command },
                        _ => Job::Run { id, command },
                    };
                    Ok((ack, Some(job)))
                }
                // The same request again: its ack was lost, or its typing
                // was slow. Never run it twice.
                Some(Entry::Running) => Ok((vec![Frame::ack(&id)], None)),
                Some(Entry::Done(frames)) => {
                    let mut all = vec![Frame::ack(&id)];
                    all.extend(frames);
                    Ok((all, None))
                }
            }
        }
        Op::Resend => {
            let which = req.resend_which().map_err(|e| e.to_string())?;
            match store.get(&id).map_err(store_err)? {
                None => Ok((vec![Frame::err(&id, "resend: no such request")], None)),
                Some(Entry::Running) => Ok((vec![Frame::wait(&id)], None)),
                Some(Entry::Done(frames)) => Ok((
                    frames.into_iter().filter(|f| which.wants(f.seq)).collect(),
                    None,
                )),
            }
        }
    }
}

/// The reply for a process that was to be started (a spawn's command, or
/// the worker of a run): status 0 once it started, 127 and the reason when
/// it could not be.
pub fn start_reply(id: &str, result: Result<(), String>) -> Vec<Frame> {
    let outcome = match result {
        Ok(()) => qcmdchan::Outcome {
            output: Vec::new(),
            rc: 0,
            dropped: 0,
        },
        Err(reason) => qcmdchan::Outcome {
            output: reason.into_bytes(),
            rc: 127,
            dropped: 0,
        },
    };
    qcmdchan::reply_frames(id, &outcome)
}

/// Replies in memory, for the daemon: the last [`MemStore::CAPACITY`] ids.
#[derive(Debug, Default)]
pub struct MemStore {
    entries: VecDeque<(String, Entry)>,
}

impl MemStore {
    pub const CAPACITY: usize = 256;

    /// Stores the reply of a finished command.
    pub fn finish(&mut self, id: &str, frames: Vec<Frame>) {
        debug_assert!(frames.iter().all(|f| f.kind != Kind::Ack));
        if let Some((_, e)) = self.entries.iter_mut().find(|(i, _)| i == id) {
            *e = Entry::Done(frames);
        }
    }
}

impl Store for MemStore {
    type Error = std::convert::Infallible;

    fn claim(&mut self, id: &str, _command: &str) -> Result<Option<Entry>, Self::Error> {
        if let Some(e) = self.get(id)? {
            return Ok(Some(e));
        }
        if self.entries.len() >= Self::CAPACITY {
            // Forget the oldest finished reply; a running one stays.
            if let Some(pos) = self
                .entries
                .iter()
                .position(|(_, e)| matches!(e, Entry::Done(_)))
            {
                self.entries.remove(pos);
            }
        }
        self.entries.push_back((id.to_owned(), Entry::Running));
        Ok(None)
    }

    fn get(&self, id: &str) -> Result<Option<Entry>, Self::Error> {
        Ok(self
            .entries
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, e)| e.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcmdchan::{reply_frames, Outcome};

    fn done(id: &str) -> Vec<Frame> {
        reply_frames(
            id,
            &Outcome {
                output: vec![b'x'; 200],
                rc: 1,
                dropped: 0,
            },
        )
    }

    #[test]
    fn a_run_is_acked_and_claimed_once() {
        let mut s = MemStore::default();
        let line = Request::run("a1", "echo hi").render();
        let (frames, job) = respond(&line, &mut s).expect("respond");
        assert_eq!(frames, vec![Frame::ack("a1")]);
        assert_eq!(
            job,
            Some(Job::Run {
                id: "a1".into(),
                command: "echo hi".into()
            })
        );
        // The same request while it runs: acked again, not run again.
        assert_eq!(
            respond(&line, &mut s).expect("respond"),
            (vec![Frame::ack("a1")], None)
        );
        // A resend while it runs says so.
        let resend = Request::resend("a1", &Resend::all()).render();
        assert_eq!(
            respond(&resend, &mut s).expect("respond"),
            (vec![Frame::wait("a1")], None)
        );
        s.finish("a1", done("a1"));
        let (frames, job) = respond(&line, &mut s).expect("respond");
        assert_eq!(frames.len(), 1 + done("a1").len());
        assert_eq!(job, None);
        let (frames, _) = respond(
            &Request::resend(
                "a1",
                &Resend {
                    seqs: vec![2],
                    from: None,
                },
            )
            .render(),
            &mut s,
        )
        .expect("respond");
        assert_eq!(frames, vec![done("a1")[1].clone()]);
        let (frames, _) = respond(&resend, &mut s).expect("respond");
        assert_eq!(frames, done("a1"));
    }

    #[test]
    fn garbled_and_unknown_requests() {
        let mut s = MemStore::default();
        let mut line = Request::run("a1", "echo hi").render();
        line.remove(15);
        let (frames, job) = respond(&line, &mut s).expect("respond");
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].kind, Kind::Err);
        assert_eq!(job, None);
        assert!(respond("echo hi", &mut s).is_err());
        let (frames, _) =
            respond(&Request::resend("zz", &Resend::all()).render(), &mut s).expect("respond");
        assert_eq!(frames[0].kind, Kind::Err);
    }

    #[test]
    fn a_spawn_replies_with_its_start() {
        let mut s = MemStore::default();
        let (_, job) = respond(&Request::spawn("b", "reboot").render(), &mut s).expect("respond");
        assert!(matches!(job, Some(Job::Spawn { .. })));
        let ok = start_reply("b", Ok(()));
        assert_eq!(ok.len(), 1);
        let failed = start_reply("b", Err("no sh".into()));
        assert_eq!(failed.len(), 2);
    }

    #[test]
    fn the_store_keeps_a_bounded_number_of_replies() {
        let mut s = MemStore::default();
        for i in 0..MemStore::CAPACITY + 10 {
            let id = format!("i{i}");
            s.claim(&id, "true").expect("claim");
            s.finish(&id, done(&id));
        }
        assert_eq!(s.entries.len(), MemStore::CAPACITY);
        assert_eq!(s.get("i0").expect("get"), None);
    }
}
