//! `cargo xtask soak --runs N`: the suite's scenario legs N times back to
//! back, and each scenario's pass count: the flake budget of docs/lab.md.
//! A failing run does not stop the soak; it is counted, and its run
//! directory named, so one soak shows the whole flake rate.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};

use qlab::runner::parse_summary;

use crate::{run_qlab, TestTotals, SUITE_LEGS};

/// What one leg's scenario did over the soak.
#[derive(Debug, Default)]
struct Tally {
    runs: u32,
    passed: u32,
    seconds: Vec<f64>,
    /// What the command channel repeated, over all runs.
    requests_repeated: u64,
    frames_resent: u64,
    /// Run directories of the failures.
    failures: Vec<PathBuf>,
}

/// Runs the legs named in `only` (all if empty) `runs` times each, one
/// leg after the other within a run.
pub fn run(root: &Path, runs: u32, only: &[String]) -> Result<()> {
    for name in only {
        if !SUITE_LEGS.iter().any(|l| l.name == name) {
            let known: Vec<&str> = SUITE_LEGS.iter().map(|l| l.name).collect();
            bail!("no suite leg {name:?}; the legs are {known:?}");
        }
    }
    let legs: Vec<_> = SUITE_LEGS
        .iter()
        .filter(|l| only.is_empty() || only.iter().any(|n| n == l.name))
        .collect();
    let started = Instant::now();
    let base = root.join("target/soak");
    // Each run gets a directory of its own, so a run that wrote no
    // summary can never be read as an earlier run's.
    let _ = std::fs::remove_dir_all(&base);
    // In the order the suite runs them.
    let mut tallies: Vec<((&str, String), Tally)> = Vec::new();
    let mut broken_runs = Vec::new();
    for i in 1..=runs {
        for leg in &legs {
            eprintln!("soak: run {i} of {runs}, {}", leg.name);
            let out = base.join(leg.name).join(format!("run-{i}"));
            let mut totals = TestTotals::default();
            // A failure is what the soak counts; it goes on.
            let _ = run_qlab(root, leg.args, &out, &mut totals);
            let run_dir = std::fs::read_link(out.join("latest"))
                .map(|d| out.join(d))
                .unwrap_or_else(|_| out.clone());
            let summary = std::fs::read_to_string(run_dir.join("summary.txt"))
                .map_err(anyhow::Error::from)
                .and_then(|t| parse_summary(&t));
            match summary {
                Ok(outcomes) => {
                    for o in outcomes {
                        let key = (leg.name, o.scenario);
                        let at = match tallies.iter().position(|(k, _)| *k == key) {
                            Some(at) => at,
                            None => {
                                tallies.push((key, Tally::default()));
                                tallies.len() - 1
                            }
                        };
                        let t = &mut tallies[at].1;
                        t.runs += 1;
                        t.seconds.push(o.seconds);
                        t.requests_repeated += o.requests_repeated;
                        t.frames_resent += o.frames_resent;
                        if o.passed {
                            t.passed += 1;
                        } else {
                            t.failures.push(run_dir.clone());
                        }
                    }
                }
                Err(e) => broken_runs.push(format!("{} run {i}: no summary ({e:#})", leg.name)),
            }
        }
    }
    let report = render(
        runs,
        &tallies,
        &broken_runs,
        started.elapsed().as_secs_f64(),
    );
    print!("{report}");
    let path = base.join("report.md");
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("soak: report in {}", path.display());
    let failed: u32 = tallies.iter().map(|(_, t)| t.runs - t.passed).sum();
    if failed > 0 || !broken_runs.is_empty() {
        bail!(
            "{failed} scenario runs failed, {} runs wrote no summary",
            broken_runs.len()
        );
    }
    Ok(())
}

/// The report: a Markdown table, a row per leg and scenario.
fn render(
    runs: u32,
    tallies: &[((&str, String), Tally)],
    broken_runs: &[String],
    seconds: f64,
) -> String {
    let mut s = format!("soak: {runs} runs of the suite's scenarios, {seconds:.0} s in all\n\n");
    s.push_str(
        "| target | scenario | passed | mean s | max s | requests repeated | frames resent |\n",
    );
    s.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: |\n");
    for ((leg, scenario), t) in tallies {
        let mean = t.seconds.iter().sum::<f64>() / f64::from(t.runs.max(1));
        let max = t.seconds.iter().copied().fold(0.0, f64::max);
        let _ = writeln!(
            s,
            "| {leg} | {scenario} | {}/{runs} | {mean:.0} | {max:.0} | {} | {} |",
            t.passed, t.requests_repeated, t.frames_resent
        );
    }
    for ((leg, scenario), t) in tallies {
        for dir in &t.failures {
            let _ = writeln!(s, "\n{leg} {scenario} failed: see {}", dir.display());
        }
    }
    for b in broken_runs {
        let _ = writeln!(s, "\n{b}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_counts_passes_out_of_the_runs() {
        let tallies = vec![(
            ("qemu", "boot".to_owned()),
            Tally {
                runs: 2,
                passed: 1,
                seconds: vec![30.0, 40.0],
                requests_repeated: 0,
                frames_resent: 3,
                failures: vec![PathBuf::from("/r/2")],
            },
        )];
        let r = render(2, &tallies, &[], 80.0);
        assert!(r.contains("| qemu | boot | 1/2 | 35 | 40 | 0 | 3 |"), "{r}");
        assert!(r.contains("qemu boot failed: see /r/2"), "{r}");
    }
}
