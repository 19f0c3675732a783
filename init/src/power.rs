//! Leaving the system: sync with a time cap, then reboot or power off.

use std::time::Duration;

/// sync(2) in a helper thread, so a hung disk cannot stall shutdown past
/// `cap` (Talos caps it the same way).
pub fn sync_with_cap(cap: Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        rustix::fs::sync();
        let _ = tx.send(());
    });
    if rx.recv_timeout(cap).is_err() {
        log::warn!("sync did not finish within {cap:?}; going on");
    }
}

/// Reboots or powers off. Never returns: PID 1 must not exit.
pub fn power(reboot: bool) -> ! {
    let cmd = if reboot {
        rustix::system::RebootCommand::Restart
    } else {
        rustix::system::RebootCommand::PowerOff
    };
    loop {
        if let Err(e) = rustix::system::reboot(cmd) {
            log::error!("reboot(2): {e}");
        }
        std::thread::sleep(Duration::from_secs(5));
    }
}
