//! Threads for work a VM's programs or dom0 start (a local call, a
//! QubesDB client, a data connection), each kind bounded: past its limit,
//! or when no thread can be made, the work is refused rather than the
//! agent brought down. The count goes down when a thread ends, however it
//! ends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// At most `max` threads of one kind at once.
#[derive(Debug, Clone)]
pub struct Bounded {
    running: Arc<AtomicUsize>,
    max: usize,
}

impl Bounded {
    pub fn new(max: usize) -> Bounded {
        Bounded {
            running: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// Runs `f` on a thread of its own; false (and `f` dropped) if `max`
    /// are running already or no thread could be made.
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) -> bool {
        if self.running.fetch_add(1, Ordering::SeqCst) >= self.max {
            self.running.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        let done = Done(self.running.clone());
        std::thread::Builder::new()
            .spawn(move || {
                let _done = done;
                f();
            })
            .is_ok()
    }
}

/// Counts a thread out when dropped: at its end, or with the closure of
/// a thread that could not be made.
struct Done(Arc<AtomicUsize>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn no_more_than_max_and_the_count_comes_back() {
        let b = Bounded::new(2);
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go_rx = Arc::new(std::sync::Mutex::new(go_rx));
        let (done_tx, done_rx) = mpsc::channel::<()>();
        for _ in 0..2 {
            let (rx, tx) = (go_rx.clone(), done_tx.clone());
            assert!(b.spawn(move || {
                let _ = rx.lock().unwrap().recv();
                let _ = tx.send(());
            }));
        }
        assert!(!b.spawn(|| {}));
        for _ in 0..2 {
            go_tx.send(()).unwrap();
            done_rx.recv().unwrap();
        }
        // Both counted out (a thread drops its count as it ends).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while b.running.load(Ordering::SeqCst) != 0 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::yield_now();
        }
        assert!(b.spawn(|| {}));
    }
}
