//! `qvchan-cat send <peer> <port>`: offers a vchan to domain `peer` on
//! `port` (64 KiB rings, as qrexec's data connections), writes stdin into
//! it and closes it. `qvchan-cat recv <peer> <port>`: connects to that
//! offer and copies what arrives to stdout until the sender is gone.
//!
//! A test tool (test images only): the raw-vchan baseline that
//! `cargo xtask bench qrexec` measures qrexec against, over the same
//! crate and ring size, with no protocol on top.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use qvchan::Vchan;

const RING: usize = 65536;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
const IO_TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, peer, port) = match args.as_slice() {
        [m, peer, port] => match (peer.parse::<u16>(), port.parse::<u32>()) {
            (Ok(peer), Ok(port)) => (m.as_str(), peer, port),
            _ => return usage(),
        },
        _ => return usage(),
    };
    let result = match mode {
        "send" => send(peer, port),
        "recv" => recv(peer, port),
        _ => return usage(),
    };
    match result {
        Ok(bytes) => {
            eprintln!("qvchan-cat: {mode} {bytes} bytes");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("qvchan-cat: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: qvchan-cat send|recv <peer domid> <port>");
    ExitCode::from(2)
}

fn chain(e: &dyn std::error::Error) -> String {
    qcontract::error_chain(e)
}

fn send(peer: u16, port: u32) -> Result<u64, String> {
    let mut xs = qxenstore::Xs::open().map_err(|e| chain(&e))?;
    let own = xs.own_domid().map_err(|e| chain(&e))?;
    let mut chan = Vchan::server(&mut xs, own, peer, port, RING, RING).map_err(|e| chain(&e))?;
    drop(xs);
    chan.wait_connected(CONNECT_TIMEOUT)
        .map_err(|e| chain(&e))?;
    let mut input = std::io::stdin().lock();
    let mut buf = vec![0u8; RING];
    let mut total = 0u64;
    loop {
        let n = input.read(&mut buf).map_err(|e| format!("stdin: {e}"))?;
        if n == 0 {
            break;
        }
        chan.write_all(&buf[..n], IO_TIMEOUT)
            .map_err(|e| chain(&e))?;
        total += n as u64;
    }
    // What is still in the ring is read before the receiver sees us gone.
    chan.close();
    Ok(total)
}

fn recv(peer: u16, port: u32) -> Result<u64, String> {
    let mut xs = qxenstore::Xs::open().map_err(|e| chain(&e))?;
    let own = xs.own_domid().map_err(|e| chain(&e))?;
    let mut chan =
        Vchan::client(&mut xs, own, peer, port, CONNECT_TIMEOUT).map_err(|e| chain(&e))?;
    drop(xs);
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; RING];
    let mut total = 0u64;
    loop {
        match chan.read(&mut buf, IO_TIMEOUT) {
            Ok(n) => {
                out.write_all(&buf[..n])
                    .map_err(|e| format!("stdout: {e}"))?;
                total += n as u64;
            }
            Err(e) if e.is_peer_gone() => break,
            Err(e) => return Err(chain(&e)),
        }
    }
    out.flush().map_err(|e| format!("stdout: {e}"))?;
    Ok(total)
}
