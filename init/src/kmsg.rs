//! Logging to the kernel log, so one `dmesg` or serial capture tells the
//! whole boot, and the console markers tests and the lab wait for.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

/// A `log` backend writing `<prio>qinit: message` records to /dev/kmsg.
/// Falls back to stderr while /dev/kmsg is not open (before stage 1 has
/// mounted /dev, and in host tests).
#[derive(Debug)]
pub struct KmsgLogger {
    prefix: &'static str,
    /// Opened at install, and again by [`KmsgLogger::retry_open`].
    kmsg: Mutex<Option<File>>,
}

/// The installed logger, kept typed (`log::logger()` is a `dyn Log`) so
/// [`KmsgLogger::retry_open`] can reach it.
static LOGGER: OnceLock<KmsgLogger> = OnceLock::new();

/// Kernel log priority for a `log` level. Informational lines use NOTICE
/// so the appliance's `loglevel=6` shows them on the console while the
/// kernel's own INFO chatter stays in the ring buffer.
pub fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 5,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// Formats one kmsg record. The kernel splits records on newlines, so
/// embedded newlines are replaced to keep one event per record.
pub fn format_record(prio: u8, prefix: &str, msg: &str) -> String {
    let clean: String = msg
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    format!("<{prio}>{prefix}: {clean}\n")
}

impl KmsgLogger {
    /// Installs the logger as the global `log` backend. Only the first
    /// call in a process takes effect.
    pub fn install(prefix: &'static str, level: log::LevelFilter) {
        let logger = LOGGER.get_or_init(|| KmsgLogger {
            prefix,
            kmsg: Mutex::new(open_kmsg()),
        });
        if log::set_logger(logger).is_ok() {
            log::set_max_level(level);
        }
    }

    /// Opens /dev/kmsg if it was missing when the logger was installed,
    /// as in stage 1 before /dev is mounted. A no-op once it is open or
    /// when no logger is installed.
    pub fn retry_open() {
        if let Some(logger) = LOGGER.get() {
            let mut kmsg = logger.lock();
            if kmsg.is_none() {
                *kmsg = open_kmsg();
            }
        }
    }

    /// The file, also after a panic elsewhere while it was held: a
    /// poisoned lock must not silence PID 1's log.
    fn lock(&self) -> MutexGuard<'_, Option<File>> {
        self.kmsg.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_line(&self, prio: u8, msg: &str) {
        let rec = format_record(prio, self.prefix, msg);
        let wrote = self
            .lock()
            .as_mut()
            .is_some_and(|f| f.write_all(rec.as_bytes()).is_ok());
        if !wrote {
            // Without the `<prio>` tag, which only the kernel reads.
            eprint!("{}", &rec[3..]);
        }
    }
}

impl log::Log for KmsgLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            self.write_line(priority(record.level()), &record.args().to_string());
        }
    }

    /// Nothing to flush: each record is one unbuffered write.
    fn flush(&self) {}
}

/// /dev/kmsg, unless running in a test sandbox on a build host (whose
/// kernel log is not ours to write): then stderr is used.
pub fn open_kmsg() -> Option<File> {
    if std::env::var_os(crate::stage2::SANDBOX_ENV).is_some() {
        return None;
    }
    OpenOptions::new().write(true).open("/dev/kmsg").ok()
}

/// Writes a contract marker line to the console (stdout, which the kernel
/// gave PID 1) and to the kernel log, whatever the console log level.
pub fn marker(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    if let Some(mut f) = open_kmsg() {
        // INFO: kept in the kernel log, but not printed a second time on
        // the console (loglevel=6), so each marker appears there once.
        let _ = f.write_all(format_record(6, "qinit", line).as_bytes());
    }
}

/// Writes a service's output line to the kernel log under its own prefix.
pub fn service_line(kmsg: &mut Option<File>, service: &str, line: &str) {
    let rec = format_record(5, service, line);
    match kmsg {
        Some(f) => {
            let _ = f.write_all(rec.as_bytes());
        }
        None => eprint!("{}", &rec[3..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_single_lines_with_priority() {
        assert_eq!(format_record(5, "qinit", "a\nb"), "<5>qinit: a b\n");
        assert_eq!(priority(log::Level::Error), 3);
        assert_eq!(priority(log::Level::Info), 5);
    }
}
