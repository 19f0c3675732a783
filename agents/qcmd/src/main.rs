//! `qcmd`: the dom0 end of the test command channel, in test images only
//! (the `test-tools` profile mixin). See `qcmdchan` for the protocol and
//! docs/lab.md for how the host uses it.
//!
//! ```text
//! qcmd serve [PORT-NAME]     the daemon on the virtio-serial port (a service)
//! qcmd QCMD1 <op> ...        one request, typed into the serial shell
//! qcmd worker <id> <dir>     (internal) runs a request's command
//! ```

mod dispatch;
mod error;
mod exec;
mod serial;
mod serve;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "usage: qcmd serve [PORT-NAME] | qcmd QCMD1 <op> <id> <payload> <crc>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => {
            let name = args
                .get(1)
                .map_or(qcmdchan::VIRTIO_PORT_NAME, String::as_str);
            serve::serve(name).map_err(|e| qcontract::error_chain(&e))
        }
        Some("worker") => match (args.get(1), args.get(2)) {
            (Some(id), Some(dir)) => {
                serial::worker(id, Path::new(dir)).map_err(|e| qcontract::error_chain(&e))
            }
            _ => Err(USAGE.to_owned()),
        },
        Some(first) if first == qcmdchan::REQUEST_START => {
            // The shell split the request line at its spaces.
            let line = args.join(" ");
            let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/usr/bin/qcmd"));
            // Host tests keep their replies elsewhere than dom0's /run.
            let dir = std::env::var_os("QCMD_STATE_DIR")
                .map_or_else(|| PathBuf::from(serial::STATE_DIR), PathBuf::from);
            serial::request(&line, &dir, &exe).map_err(|e| qcontract::error_chain(&e))
        }
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("qcmd: {msg}");
            ExitCode::from(2)
        }
    }
}
