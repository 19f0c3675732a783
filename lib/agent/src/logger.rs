//! Logging for a service under qinit: qinit reads the service's stderr and
//! writes each line to the kernel log with the service's name in front, so
//! the agent only writes `level: message` lines.

use std::io::Write;

struct Stderr;

impl log::Log for Stderr {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let mut e = std::io::stderr().lock();
            let _ = writeln!(e, "{}: {}", r.level().as_str().to_lowercase(), r.args());
        }
    }

    fn flush(&self) {}
}

static LOGGER: Stderr = Stderr;

/// Installs the logger at `Info` (`Debug` with `QAGENT_DEBUG=1`). A second
/// call keeps the first logger.
pub fn init() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(if std::env::var_os("QAGENT_DEBUG").is_some() {
            log::LevelFilter::Debug
        } else {
            log::LevelFilter::Info
        });
    }
}
