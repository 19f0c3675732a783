//! Results as JUnit XML, the format CI systems (GitLab, Jenkins, GitHub
//! test reporters) read: one `<testsuite>` per run and target, one
//! `<testcase>` per scenario.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

/// One scenario's result.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub time: Duration,
    /// The error chain, for a failed scenario.
    pub failure: Option<String>,
    /// Notes and the serial log's path.
    pub output: String,
}

/// The XML document for `cases` run on `target`.
pub fn render(target: &str, description: &str, started: SystemTime, cases: &[Case]) -> String {
    let failures = cases.iter().filter(|c| c.failure.is_some()).count();
    let total: f64 = cases.iter().map(|c| c.time.as_secs_f64()).sum();
    let suite = format!("qlab.{target}");
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"qlab\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" time=\"{total:.3}\">",
        cases.len()
    );
    let _ = writeln!(
        x,
        "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"0\" time=\"{total:.3}\" timestamp=\"{}\" hostname=\"{}\">",
        escape(&suite),
        cases.len(),
        timestamp(started),
        escape(target)
    );
    let _ = writeln!(
        x,
        "    <properties>\n      <property name=\"target\" value=\"{}\"/>\n    </properties>",
        escape(description)
    );
    for c in cases {
        let _ = write!(
            x,
            "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\">",
            escape(&suite),
            escape(&c.name),
            c.time.as_secs_f64()
        );
        if let Some(f) = &c.failure {
            let first = f.lines().next().unwrap_or("failed");
            let _ = write!(
                x,
                "\n      <failure message=\"{}\" type=\"ScenarioFailed\">{}</failure>",
                escape(first),
                escape(f)
            );
        }
        if !c.output.is_empty() {
            let _ = write!(x, "\n      <system-out>{}</system-out>", escape(&c.output));
        }
        x.push_str("\n    </testcase>\n");
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}

/// Escapes text for XML content and attributes; characters XML 1.0
/// cannot carry at all (most control characters, which a serial console
/// is full of) are dropped.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' | '\t' => out.push(c),
            '\r' => {}
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => {}
            c => out.push(c),
        }
    }
    out
}

/// ISO 8601 in UTC (`2026-12-01T18:44:36`), as JUnit's schema wants it.
pub fn timestamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_iso_dates() {
        assert_eq!(timestamp(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_150_676);
        assert_eq!(timestamp(t), "2026-12-01T18:44:36");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(timestamp(leap), "2000-02-29T00:00:00");
    }

    #[test]
    fn console_bytes_are_escaped_or_dropped() {
        assert_eq!(
            escape("a<b>&\"'\u{1b}[0m\r\n"),
            "a&lt;b&gt;&amp;&quot;&apos;[0m\n"
        );
    }

    #[test]
    fn a_failed_case_carries_its_first_line_as_the_message() {
        let cases = [
            Case {
                name: "boot".into(),
                time: Duration::from_millis(1500),
                failure: None,
                output: String::new(),
            },
            Case {
                name: "update".into(),
                time: Duration::from_secs(2),
                failure: Some("boot failed: QINIT-FAILED reason=x\n--- serial ---\n<tail>".into()),
                output: "serial log: runs/x/update/serial.log".into(),
            },
        ];
        let x = render("qemu", "QEMU", SystemTime::UNIX_EPOCH, &cases);
        assert!(
            x.contains("<testsuites name=\"qlab\" tests=\"2\" failures=\"1\""),
            "{x}"
        );
        assert!(
            x.contains(
                "<testcase classname=\"qlab.qemu\" name=\"boot\" time=\"1.500\">\n    </testcase>"
            ),
            "{x}"
        );
        assert!(
            x.contains(
                "<failure message=\"boot failed: QINIT-FAILED reason=x\" type=\"ScenarioFailed\">"
            ),
            "{x}"
        );
        assert!(x.contains("&lt;tail&gt;</failure>"), "{x}");
    }
}
