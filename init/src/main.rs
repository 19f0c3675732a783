//! `qinit`: `/init` in the initramfs (stage 1), `qinit stage2` as PID 1 in
//! the root.

use std::time::{Duration, Instant};

use qcontract::OnFailure;
use qinit::kmsg::{marker, KmsgLogger};

fn main() {
    let started = Instant::now();
    install_panic_hook();
    let args: Vec<String> = std::env::args().collect();
    let argv0 = args.first().map(String::as_str).unwrap_or("");
    if argv0 == "/init" {
        KmsgLogger::install("qinit", log::LevelFilter::Info);
        stage1(started);
    }
    match args.get(1).map(String::as_str) {
        Some("stage2") => {
            KmsgLogger::install("qinit", log::LevelFilter::Info);
            let offset = args
                .iter()
                .find_map(|a| a.strip_prefix("--started-ms-ago="))
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_millis)
                .unwrap_or_default();
            qinit::stage2::run(offset)
        }
        Some("ctl") => std::process::exit(qinit::control::main(&args[2..])),
        Some("save-seed") => {
            KmsgLogger::install("random-seed", log::LevelFilter::Info);
            std::process::exit(qinit::seed::save_when_ready())
        }
        _ => {
            eprintln!(
                "usage: qinit ctl status|start <svc>|stop <svc>|restart <svc>|reboot|poweroff\n       \
                 qinit ctl analyze [--json|--svg]   (the boot's critical chain and blame)\n       \
                 qinit save-seed   (waits for the kernel's pool, then saves a creditable seed)\n       \
                 qinit stage2   (PID 1; as /init in an initramfs it runs stage 1)"
            );
            std::process::exit(2);
        }
    }
}

fn stage1(started: Instant) -> ! {
    let (err, on_failure) = match qinit::stage1::run(started) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let chain = qcontract::error_chain(&err);
    marker(&format!("QINIT-FAILED reason=stage1: {chain}"));
    let action = on_failure.unwrap_or(OnFailure::Reboot);
    if action == OnFailure::Halt {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    // Give the console time to drain before the machine goes away.
    std::thread::sleep(Duration::from_secs(2));
    qinit::power::sync_with_cap(Duration::from_secs(10));
    qinit::power::power(action == OnFailure::Reboot)
}

/// PID 1 must never die: a panic is logged, disks are synced and the
/// machine reboots (the boot loader then spends a try of this slot).
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        marker(&format!("QINIT-FAILED reason=panic: {info}"));
        if rustix::process::getpid().is_init() {
            qinit::power::sync_with_cap(Duration::from_secs(10));
            qinit::power::power(true);
        }
    }));
}
