//! `qubesdb-read [-d <vm>] <path>...`: dom0's tool that reads a VM's
//! QubesDB entries through its daemon's local socket, with Qubes' own
//! command line. Each value is printed on a line of its own; a missing
//! entry is an error (exit 1), as with Qubes' tool.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    let mut vm = None;
    if args.peek().map(String::as_str) == Some("-d") {
        args.next();
        vm = args.next();
        if vm.is_none() {
            return usage();
        }
    }
    let paths: Vec<String> = args.collect();
    if paths.is_empty() || paths.iter().any(|p| p.starts_with('-')) {
        return usage();
    }
    if let Some(v) = &vm {
        if !qcontract::vm::valid_vm_name(v) {
            eprintln!("qubesdb-read: {v:?} is not a VM name");
            return ExitCode::from(2);
        }
    }
    let socket = qubesdb::socket_path(vm.as_deref());
    if qubesdb::client::read_tool(&socket, &paths) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: qubesdb-read [-d <vm>] <path>...");
    ExitCode::from(2)
}
