//! Runs scenarios on one target, one after another, and writes what a
//! person and a CI system each want to read: a live progress line, the
//! serial log of each scenario, `junit.xml`, `summary.txt` and, when the
//! hardware report ran, `hcl.yml`.
//!
//! A run's directory is `<out>/<UTC time>-<target>/`; `<out>/latest`
//! points at the newest.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result};
use qconsole::ChannelStats;

use crate::flash;
use crate::hcl::{HclFacts, Outcome, PciNames};
use crate::junit;
use crate::scenario::{Ctx, Scenario};
use crate::target;

/// The product name in reports.
pub const PRODUCT: &str = "qubes-dom0-appliance";

/// What to run, and on what.
#[derive(Debug)]
pub struct RunOptions {
    /// `qemu` or a lab target's TOML file.
    pub target: String,
    pub scenarios: Vec<&'static Scenario>,
    /// The test disk image (the `qemu-test` profile's `disk.img`).
    pub disk: PathBuf,
    /// Update bundles the scenarios install, by name (`next`, `broken`).
    pub bundles: Vec<(String, PathBuf)>,
    /// Where run directories go.
    pub out: PathBuf,
    /// Copy the serial console to stdout.
    pub echo: bool,
}

#[derive(Debug, Clone)]
pub struct ScenarioResult {
    pub name: String,
    pub error: Option<String>,
    pub time: Duration,
    pub notes: Vec<String>,
    pub serial_log: PathBuf,
}

#[derive(Debug)]
pub struct RunReport {
    pub dir: PathBuf,
    pub target: String,
    pub results: Vec<ScenarioResult>,
}

impl RunReport {
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.error.is_none()).count()
    }

    pub fn failed(&self) -> usize {
        self.results.len() - self.passed()
    }
}

/// The live progress line: rewritten in place on a terminal, one line
/// per step otherwise (a CI log).
struct Progress {
    tty: bool,
    index: usize,
    count: usize,
    name: &'static str,
    started: Instant,
    last: String,
}

impl Progress {
    fn show(&mut self, what: &str) {
        if what == self.last {
            return;
        }
        what.clone_into(&mut self.last);
        let t = self.started.elapsed().as_secs();
        let line = format!(
            "[{}/{}] {:<13} {:>3}:{:02}  {what}",
            self.index + 1,
            self.count,
            self.name,
            t / 60,
            t % 60
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let width = 110;
            let clipped: String = line.chars().take(width).collect();
            let _ = write!(err, "\r\x1b[2K{clipped}");
        } else {
            let _ = writeln!(err, "qlab: {line}");
        }
        let _ = err.flush();
    }

    fn finish(&self, ok: bool) {
        let t = self.started.elapsed().as_secs_f64();
        let mut err = std::io::stderr().lock();
        let verdict = if ok { "passed" } else { "FAILED" };
        if self.tty {
            let _ = write!(err, "\r\x1b[2K");
        }
        let _ = writeln!(
            err,
            "qlab: [{}/{}] {} {verdict} in {t:.0} s",
            self.index + 1,
            self.count,
            self.name
        );
    }
}

/// Runs `opts.scenarios` in order on the target; every scenario runs even
/// when an earlier one failed.
pub fn run(opts: &RunOptions) -> Result<RunReport> {
    let started_at = SystemTime::now();
    let stamp = junit::timestamp(started_at).replace(':', "");
    let label = target_label(&opts.target);
    let dir = opts.out.join(format!("{stamp}-{label}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let latest = opts.out.join("latest");
    let _ = std::fs::remove_file(&latest);
    let _ = std::os::unix::fs::symlink(dir.file_name().unwrap_or_default(), &latest);

    eprintln!("qlab: composing the flash image (disk image + bundles)");
    let bundles: Vec<(&str, &Path)> = opts
        .bundles
        .iter()
        .map(|(n, p)| (n.as_str(), p.as_path()))
        .collect();
    let image = flash::compose(&opts.disk, &bundles, &dir.join("flash.img"))?;
    let mut target = target::open(&opts.target, &dir.join("target"), opts.echo)?;
    let description = target.describe();
    eprintln!("qlab: target {}: {description}", target.name());

    let tty = std::io::stderr().is_terminal();
    let mut results = Vec::new();
    let mut hcl: Option<HclFacts> = None;
    for (index, scenario) in opts.scenarios.iter().enumerate() {
        let work = dir.join(scenario.name);
        std::fs::create_dir_all(&work)?;
        let mark = target.console().mark();
        let journal_mark = target.commands().journal_mark();
        let stats_before = target.commands().stats();
        let mut progress = Progress {
            tty,
            index,
            count: opts.scenarios.len(),
            name: scenario.name,
            started: Instant::now(),
            last: String::new(),
        };
        let mut show = |what: &str| progress.show(what);
        let mut ctx = Ctx::new(target.as_mut(), &image, work.clone(), &mut show);
        let t = Instant::now();
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (scenario.run)(&mut ctx)));
        let time = t.elapsed();
        let mut notes = std::mem::take(&mut ctx.notes);
        if let Some(f) = ctx.hcl.take() {
            hcl = Some(f);
        }
        drop(ctx);
        notes.push(channel_note(stats_before, target.commands().stats()));
        let error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(_) => Some("the scenario panicked".to_owned()),
        };
        // Whatever happened, the next scenario starts from power off.
        if let Err(e) = target.power_off() {
            eprintln!(
                "qlab: {}: power off after {}: {e}",
                target.name(),
                scenario.name
            );
        }
        let serial_log = work.join("serial.log");
        std::fs::write(&serial_log, target.console().output_from(mark))
            .with_context(|| format!("writing {}", serial_log.display()))?;
        let commands_log = work.join("commands.log");
        let journal = target.commands().journal_from(journal_mark).to_owned();
        std::fs::write(&commands_log, &journal)
            .with_context(|| format!("writing {}", commands_log.display()))?;
        progress.finish(error.is_none());
        if let Some(e) = &error {
            eprintln!("qlab: {} failed: {e}", scenario.name);
            let lines: Vec<&str> = journal.lines().collect();
            eprintln!(
                "qlab: --- its last commands ({}) ---\n{}\n---",
                commands_log.display(),
                lines[lines.len().saturating_sub(20)..].join("\n")
            );
            eprintln!(
                "qlab: --- last lines of its serial console ({}) ---\n{}\n---",
                serial_log.display(),
                target.console().tail(40)
            );
        }
        for n in &notes {
            eprintln!("qlab:   {n}");
        }
        results.push(ScenarioResult {
            name: scenario.name.to_owned(),
            error,
            time,
            notes,
            serial_log,
        });
    }
    let report = RunReport {
        dir: dir.clone(),
        target: target.name().to_owned(),
        results,
    };
    drop(target);
    // The composed image is as big as the disk; the scenarios' logs are
    // what is worth keeping.
    let _ = std::fs::remove_file(&image.path);
    write_reports(&report, &description, started_at, hcl.as_ref())?;
    Ok(report)
}

/// A file-name-safe label for the target spec.
fn target_label(spec: &str) -> String {
    let stem = Path::new(spec)
        .file_stem()
        .map_or_else(|| spec.to_owned(), |s| s.to_string_lossy().into_owned());
    stem.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn write_reports(
    report: &RunReport,
    description: &str,
    started: SystemTime,
    hcl: Option<&HclFacts>,
) -> Result<()> {
    let cases: Vec<junit::Case> = report
        .results
        .iter()
        .map(|r| {
            let mut output = r.notes.join("\n");
            if !output.is_empty() {
                output.push('\n');
            }
            output.push_str(&format!("serial log: {}", r.serial_log.display()));
            junit::Case {
                name: r.name.clone(),
                time: r.time,
                failure: r.error.clone(),
                output,
            }
        })
        .collect();
    write_atomic(
        &report.dir.join("junit.xml"),
        &junit::render(&report.target, description, started, &cases),
    )?;

    let mut s = format!(
        "qlab run on {} ({description})\nstarted {} UTC\n\n",
        report.target,
        junit::timestamp(started)
    );
    for r in &report.results {
        let verdict = if r.error.is_none() {
            "passed"
        } else {
            "FAILED"
        };
        s.push_str(&format!(
            "{:<14} {verdict:<7} {:>6.0} s\n",
            r.name,
            r.time.as_secs_f64()
        ));
        for n in &r.notes {
            s.push_str(&format!("    {n}\n"));
        }
        if let Some(e) = &r.error {
            for l in e.lines().take(12) {
                s.push_str(&format!("    ! {l}\n"));
            }
        }
    }
    s.push_str(&format!(
        "\n{} passed, {} failed\n",
        report.passed(),
        report.failed()
    ));
    if let Some(f) = hcl {
        let outcomes: Vec<Outcome> = report
            .results
            .iter()
            .map(|r| Outcome {
                scenario: r.name.clone(),
                passed: r.error.is_none(),
            })
            .collect();
        let names = PciNames::load(Path::new(crate::hcl::PCI_IDS));
        write_atomic(
            &report.dir.join("hcl.yml"),
            &f.to_yaml(&names, &outcomes, PRODUCT),
        )?;
        s.push_str("hardware report: hcl.yml\n");
    }
    write_atomic(&report.dir.join("summary.txt"), &s)?;
    Ok(())
}

/// What the command channel had to repeat during one scenario: zero on a
/// clean line; the flake budget's early warning on a shared one.
pub fn channel_note(before: ChannelStats, after: ChannelStats) -> String {
    format!(
        "{CHANNEL_NOTE}{} commands, {} requests repeated, {} frames resent",
        after.commands - before.commands,
        after.requests_repeated - before.requests_repeated,
        after.frames_resent - before.frames_resent
    )
}

/// How [`channel_note`]'s line starts.
const CHANNEL_NOTE: &str = "channel: ";

/// One scenario as `summary.txt` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryLine {
    pub scenario: String,
    pub passed: bool,
    pub seconds: f64,
    /// Requests sent again and frames asked for again (its channel note).
    pub requests_repeated: u64,
    pub frames_resent: u64,
}

/// Reads the scenario lines of a `summary.txt` written by this runner
/// (`<scenario> <passed|FAILED> <seconds> s`, then indented notes, one of
/// them the channel note). `cargo xtask soak` counts a run's outcomes
/// with it.
pub fn parse_summary(text: &str) -> Result<Vec<SummaryLine>> {
    let mut out: Vec<SummaryLine> = Vec::new();
    for line in text.lines() {
        if let Some(note) = line.trim_start().strip_prefix(CHANNEL_NOTE) {
            let Some(last) = out.last_mut().filter(|_| line.starts_with(' ')) else {
                continue;
            };
            let words: Vec<&str> = note.split_whitespace().collect();
            if let [_, "commands,", r, "requests", "repeated,", f, "frames", "resent"] = words[..] {
                last.requests_repeated = r.parse().with_context(|| format!("{line:?}"))?;
                last.frames_resent = f.parse().with_context(|| format!("{line:?}"))?;
            }
            continue;
        }
        if line.starts_with(char::is_whitespace) {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let [scenario, verdict, seconds, "s"] = words[..] else {
            continue;
        };
        let passed = match verdict {
            "passed" => true,
            "FAILED" => false,
            _ => continue,
        };
        let seconds = seconds
            .parse()
            .with_context(|| format!("summary line {line:?}: seconds"))?;
        out.push(SummaryLine {
            scenario: scenario.to_owned(),
            passed,
            seconds,
            requests_repeated: 0,
            frames_resent: 0,
        });
    }
    anyhow::ensure!(!out.is_empty(), "no scenario lines in the summary");
    Ok(out)
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_reads_back_with_verdicts_times_and_channel_counts() {
        let before = ChannelStats::default();
        let after = ChannelStats {
            commands: 9,
            requests_repeated: 1,
            frames_resent: 4,
        };
        let text = format!(
            "qlab run on qemu (x)\nstarted 2026-12-02T10:00:00Z UTC\n\n\
             boot           passed      36 s\n    QINIT-READY slot=A\n    {}\n\
             power-cut      FAILED     129 s\n    ! timed out\n\n1 passed, 1 failed\n",
            channel_note(before, after)
        );
        let lines = parse_summary(&text).expect("summary");
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            SummaryLine {
                scenario: "boot".into(),
                passed: true,
                seconds: 36.0,
                requests_repeated: 1,
                frames_resent: 4,
            }
        );
        assert!(!lines[1].passed);
        assert_eq!(lines[1].frames_resent, 0);
        assert!(parse_summary("qlab run on qemu\n\n0 passed, 0 failed\n").is_err());
        assert!(parse_summary("boot passed many s\n").is_err());
    }

    #[test]
    fn target_labels_are_file_name_safe() {
        assert_eq!(target_label("qemu"), "qemu");
        assert_eq!(target_label("lab/targets/qemu-lab.toml"), "qemu-lab");
        assert_eq!(target_label("a b.toml"), "a_b");
    }
}
