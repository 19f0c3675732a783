//! The boot's timeline: when each stage-1 step and each service started,
//! got ready and exited, on the kernel's monotonic clock (the one its log
//! timestamps count, from 0 when the kernel starts), so a boot can be read
//! as one picture.
//!
//! Stage 1 records its steps ([`Stage1Recorder`]) and leaves them in the
//! new root's `/run` ([`paths::STAGE1_TIMELINE`]); stage 2 adds the
//! services once every boot-critical one is up and writes the whole
//! [`Timeline`] to [`paths::BOOT_TIMELINE`]. `qinit ctl analyze` reads it
//! and prints the critical chain to `QINIT-READY` and the blame list, in
//! the spirit of `systemd-analyze critical-chain` and `blame`.
//!
//! [`paths::STAGE1_TIMELINE`]: qcontract::paths::STAGE1_TIMELINE
//! [`paths::BOOT_TIMELINE`]: qcontract::paths::BOOT_TIMELINE

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Milliseconds on CLOCK_MONOTONIC.
pub fn now_ms() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let ms = i128::from(t.tv_sec) * 1000 + i128::from(t.tv_nsec) / 1_000_000;
    u64::try_from(ms).unwrap_or(0)
}

/// `t` in [`now_ms`]'s terms (`Instant` is CLOCK_MONOTONIC on Linux, but
/// opaque).
pub fn instant_ms(t: Instant) -> u64 {
    Clock::now().ms(t)
}

/// One reading of both clocks, to turn many instants into milliseconds
/// consistently: an earlier instant never comes out later, and none comes
/// out after the reading itself (each conversion reading the clocks anew
/// could put two instants a millisecond out of order).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    instant: Instant,
    ms: u64,
}

impl Clock {
    pub fn now() -> Self {
        Self {
            instant: Instant::now(),
            ms: now_ms(),
        }
    }

    /// The reading itself.
    pub fn at(&self) -> u64 {
        self.ms
    }

    /// `t` (at or before the reading) in milliseconds.
    pub fn ms(&self, t: Instant) -> u64 {
        let ago = self.instant.saturating_duration_since(t).as_millis();
        self.ms
            .saturating_sub(u64::try_from(ago).unwrap_or(u64::MAX))
    }
}

/// One step of stage 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// What stage 1 hands to stage 2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage1 {
    /// When the kernel ran `/init`: the kernel's own time is `0..init_ms`.
    pub init_ms: u64,
    pub steps: Vec<Step>,
}

/// Records stage 1's steps: each [`Stage1Recorder::step`] ends the one
/// before it.
#[derive(Debug)]
pub struct Stage1Recorder {
    stage1: Stage1,
    current: Option<(String, u64)>,
}

impl Stage1Recorder {
    pub fn new(init_ms: u64) -> Self {
        Self {
            stage1: Stage1 {
                init_ms,
                steps: Vec::new(),
            },
            current: None,
        }
    }

    /// Ends the current step now and begins `name`.
    pub fn step(&mut self, name: &str) {
        self.step_at(name, now_ms());
    }

    fn step_at(&mut self, name: &str, at: u64) {
        self.end_at(at);
        self.current = Some((name.to_owned(), at));
    }

    fn end_at(&mut self, at: u64) {
        if let Some((name, start_ms)) = self.current.take() {
            self.stage1.steps.push(Step {
                name,
                start_ms,
                end_ms: at,
            });
        }
    }

    /// Ends the last step now.
    pub fn finish(mut self) -> Stage1 {
        self.end_at(now_ms());
        self.stage1
    }
}

/// One service over the boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpan {
    pub name: String,
    /// What it starts after (`after` and `requires`).
    pub after: Vec<String>,
    pub boot_critical: bool,
    /// Its first start, its first readiness (for a oneshot: its exit 0),
    /// its first exit; `None`: not yet when the timeline was written.
    pub start_ms: Option<u64>,
    pub ready_ms: Option<u64>,
    pub exit_ms: Option<u64>,
    pub restarts: u32,
}

/// The whole boot, as `/run/qinit/boot.json` holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    /// Stage 1; `None` when stage 2 was started some other way (a test
    /// sandbox, or stage 1 left nothing).
    pub stage1: Option<Stage1>,
    /// Stage 2 began (PID 1 in the root).
    pub stage2_ms: u64,
    /// Stage 2's system setup was done and the supervisor began.
    pub supervisor_ms: u64,
    pub services: Vec<ServiceSpan>,
    /// Every boot-critical service was up: `QINIT-READY`.
    pub ready_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    #[error("{path}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a timeline")]
    Parse {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Writes `value` as JSON to `path` through a temporary file and a rename,
/// so a reader never sees half of it.
pub fn store<T: Serialize>(path: &Path, value: &T) -> Result<(), TimelineError> {
    let io = |source| TimelineError::Io {
        path: path.to_owned(),
        source,
    };
    let text = serde_json::to_string_pretty(value).map_err(|source| TimelineError::Parse {
        path: path.to_owned(),
        source,
    })?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text + "\n").map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads what [`store`] wrote; at most 1 MiB.
pub fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, TimelineError> {
    use std::io::Read as _;
    let io = |source| TimelineError::Io {
        path: path.to_owned(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(1 << 20)
        .read_to_string(&mut text)
        .map_err(io)?;
    serde_json::from_str(&text).map_err(|source| TimelineError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// One link of the critical chain: what was ready (or done) `at_ms`, after
/// taking `took_ms` itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub at_ms: u64,
    pub took_ms: u64,
}

impl Timeline {
    /// The chain of what `QINIT-READY` waited for, last first: the
    /// boot-critical service that got ready last, then, each time, the
    /// service it starts after that got ready last before it started, and
    /// then stage 2's setup, stage 1 and the kernel.
    pub fn critical_chain(&self) -> Vec<Link> {
        let by_name = |n: &str| self.services.iter().find(|s| s.name == n);
        let up = |s: &ServiceSpan| match (s.start_ms, s.ready_ms) {
            (Some(start), Some(ready)) if ready <= self.ready_ms => Some((start, ready)),
            _ => None,
        };
        let mut chain = Vec::new();
        let mut current = self
            .services
            .iter()
            .filter(|s| s.boot_critical)
            .filter_map(|s| up(s).map(|t| (s, t)))
            .max_by_key(|(_, (_, ready))| *ready);
        // Each step goes to a service ready strictly earlier: it ends.
        while let Some((s, (start, ready))) = current {
            chain.push(Link {
                name: s.name.clone(),
                at_ms: ready,
                took_ms: ready - start.min(ready),
            });
            current = s
                .after
                .iter()
                .filter_map(|n| by_name(n))
                .filter_map(|p| up(p).map(|t| (p, t)))
                .filter(|(_, (_, r))| *r <= start && *r < ready)
                .max_by_key(|(_, (_, r))| *r);
        }
        chain.push(Link {
            name: "stage 2 setup".into(),
            at_ms: self.supervisor_ms,
            took_ms: self.supervisor_ms.saturating_sub(self.stage2_ms),
        });
        if let Some(s1) = &self.stage1 {
            chain.push(Link {
                name: "stage 1".into(),
                at_ms: self.stage2_ms,
                took_ms: self.stage2_ms.saturating_sub(s1.init_ms),
            });
            chain.push(Link {
                name: "kernel".into(),
                at_ms: s1.init_ms,
                took_ms: s1.init_ms,
            });
        }
        chain
    }

    /// Everything that took time, longest first: stage 1's steps and each
    /// service's start to ready.
    pub fn blame(&self) -> Vec<Link> {
        let mut all: Vec<Link> = self
            .stage1
            .iter()
            .flat_map(|s| &s.steps)
            .map(|st| Link {
                name: format!("stage 1: {}", st.name),
                at_ms: st.end_ms,
                took_ms: st.end_ms.saturating_sub(st.start_ms),
            })
            .chain(self.services.iter().filter_map(|s| {
                let (start, ready) = (s.start_ms?, s.ready_ms?);
                Some(Link {
                    name: s.name.clone(),
                    at_ms: ready,
                    took_ms: ready.saturating_sub(start),
                })
            }))
            .collect();
        all.sort_by(|a, b| b.took_ms.cmp(&a.took_ms).then_with(|| a.name.cmp(&b.name)));
        all
    }

    /// `qinit ctl analyze`'s text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(
            s,
            "critical chain to QINIT-READY (@ when ready, on the kernel's clock; + how long it took):"
        );
        let _ = writeln!(s, "QINIT-READY @{}ms", self.ready_ms);
        for (depth, link) in self.critical_chain().iter().enumerate() {
            let _ = writeln!(
                s,
                "{}└─{} @{}ms +{}ms",
                "  ".repeat(depth),
                link.name,
                link.at_ms,
                link.took_ms
            );
        }
        let _ = writeln!(s, "\nblame (longest first):");
        for link in self.blame() {
            let _ = writeln!(s, "{:>8}ms {}", link.took_ms, link.name);
        }
        let late: Vec<&str> = self
            .services
            .iter()
            .filter(|x| x.ready_ms.is_none_or(|r| r > self.ready_ms))
            .map(|x| x.name.as_str())
            .collect();
        if !late.is_empty() {
            let _ = writeln!(
                s,
                "\nnot ready by QINIT-READY (boot-complete hooks start after it): {}",
                late.join(", ")
            );
        }
        s
    }
}

/// Escapes text for SVG.
fn xml(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '&' => "&amp;".to_owned(),
            '"' => "&quot;".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

impl Timeline {
    /// The boot as an SVG chart: one bar per stage and service on the
    /// kernel's clock, from 0 (the kernel starts) to `QINIT-READY` and
    /// what came after, a line at `QINIT-READY`. A service's bar is dark
    /// from start to ready and light from ready to its exit; stage 1's
    /// steps and stage 2's setup are their own rows.
    pub fn svg(&self) -> String {
        struct Row {
            name: String,
            start: u64,
            ready: u64,
            end: Option<u64>,
            class: &'static str,
        }
        let mut rows = Vec::new();
        if let Some(s1) = &self.stage1 {
            rows.push(Row {
                name: "kernel".into(),
                start: 0,
                ready: s1.init_ms,
                end: None,
                class: "kernel",
            });
            for st in &s1.steps {
                rows.push(Row {
                    name: format!("stage 1: {}", st.name),
                    start: st.start_ms,
                    ready: st.end_ms,
                    end: None,
                    class: "stage1",
                });
            }
        }
        rows.push(Row {
            name: "stage 2 setup".into(),
            start: self.stage2_ms,
            ready: self.supervisor_ms,
            end: None,
            class: "stage2",
        });
        for s in &self.services {
            let Some(start) = s.start_ms else { continue };
            let ready = s.ready_ms.unwrap_or(self.ready_ms.max(start));
            rows.push(Row {
                name: if s.boot_critical {
                    format!("{} (boot-critical)", s.name)
                } else {
                    s.name.clone()
                },
                start,
                ready,
                end: s.exit_ms.filter(|e| *e > ready),
                class: if s.ready_ms.is_some() {
                    "service"
                } else {
                    "late"
                },
            });
        }
        let last = rows
            .iter()
            .map(|r| r.end.unwrap_or(r.ready))
            .chain(std::iter::once(self.ready_ms))
            .max()
            .unwrap_or(0)
            .max(1);
        let (left, width, row_h, top) = (10.0, 1000.0, 22.0, 40.0);
        let x = |ms: u64| left + width * ms as f64 / last as f64;
        let height = top + row_h * rows.len() as f64 + 30.0;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" \
             font-family=\"sans-serif\" font-size=\"12\">",
            left * 2.0 + width + 300.0
        );
        s.push_str(
            "<style>.kernel{fill:#9e9e9e}.stage1{fill:#6d8fc9}.stage2{fill:#4a6fb0}\
             .service{fill:#e0883a}.late{fill:#c9c9c9}.after{fill:#f6d2b0}\
             .ready{stroke:#c62828;stroke-width:2}</style>\n",
        );
        let _ = writeln!(
            s,
            "<text x=\"{left}\" y=\"20\">qinit boot: kernel start to QINIT-READY at {} ms (the kernel's clock)</text>",
            self.ready_ms
        );
        for (i, r) in rows.iter().enumerate() {
            let y = top + row_h * i as f64;
            let w = (x(r.ready) - x(r.start)).max(1.0);
            let _ = writeln!(
                s,
                "<rect class=\"{}\" x=\"{:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{:.1}\"/>",
                r.class,
                x(r.start),
                row_h - 6.0
            );
            if let Some(end) = r.end {
                let _ = writeln!(
                    s,
                    "<rect class=\"after\" x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\"/>",
                    x(r.ready),
                    (x(end) - x(r.ready)).max(1.0),
                    row_h - 6.0
                );
            }
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\">{} +{}ms</text>",
                x(r.end.unwrap_or(r.ready)) + 4.0,
                y + row_h - 10.0,
                xml(&r.name),
                r.ready.saturating_sub(r.start)
            );
        }
        let rx = x(self.ready_ms);
        let _ = writeln!(
            s,
            "<line class=\"ready\" x1=\"{rx:.1}\" y1=\"{:.1}\" x2=\"{rx:.1}\" y2=\"{:.1}\"/>",
            top - 6.0,
            height - 20.0
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\">QINIT-READY</text>",
            rx + 4.0,
            height - 8.0
        );
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(
        name: &str,
        after: &[&str],
        critical: bool,
        start: u64,
        ready: Option<u64>,
    ) -> ServiceSpan {
        ServiceSpan {
            name: name.into(),
            after: after.iter().map(|s| (*s).to_owned()).collect(),
            boot_critical: critical,
            start_ms: Some(start),
            ready_ms: ready,
            exit_ms: None,
            restarts: 0,
        }
    }

    fn sample() -> Timeline {
        let mut rec = Stage1Recorder::new(2000);
        rec.step_at("modules", 2000);
        rec.step_at("verity", 2600);
        rec.end_at(2700);
        let stage1 = rec.stage1;
        Timeline {
            stage1: Some(stage1),
            stage2_ms: 2750,
            supervisor_ms: 2800,
            services: vec![
                svc("xenstored", &[], true, 2800, Some(2900)),
                svc("xen-init-dom0", &["xenstored"], true, 2900, Some(3000)),
                svc("dbus", &[], true, 2800, Some(3100)),
                // Starts after both; dbus got ready last: it is the link.
                svc(
                    "qdomd",
                    &["xenstored", "dbus", "xen-init-dom0"],
                    true,
                    3100,
                    Some(3500),
                ),
                svc("qcmd", &[], false, 2800, Some(2801)),
                svc("random-seed", &[], false, 2800, None),
            ],
            ready_ms: 3500,
        }
    }

    #[test]
    fn the_chain_follows_what_got_ready_last() {
        let names: Vec<_> = sample()
            .critical_chain()
            .into_iter()
            .map(|l| (l.name, l.at_ms, l.took_ms))
            .collect();
        assert_eq!(
            names,
            [
                ("qdomd".to_owned(), 3500, 400),
                ("dbus".to_owned(), 3100, 300),
                ("stage 2 setup".to_owned(), 2800, 50),
                ("stage 1".to_owned(), 2750, 750),
                ("kernel".to_owned(), 2000, 2000),
            ]
        );
    }

    #[test]
    fn blame_and_the_rendered_text() {
        let t = sample();
        let blame: Vec<_> = t.blame().into_iter().map(|l| (l.name, l.took_ms)).collect();
        assert_eq!(blame[0], ("stage 1: modules".into(), 600));
        assert_eq!(blame[1], ("qdomd".into(), 400));
        let text = t.render();
        assert!(
            text.contains("QINIT-READY @3500ms\n└─qdomd @3500ms +400ms\n  └─dbus @3100ms +300ms\n"),
            "{text}"
        );
        assert!(text.contains("     600ms stage 1: modules\n"), "{text}");
        assert!(
            text.contains("QINIT-READY (boot-complete hooks start after it): random-seed"),
            "{text}"
        );
    }

    #[test]
    fn a_timeline_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/qinit/boot.json");
        let t = sample();
        store(&path, &t).unwrap();
        assert_eq!(load::<Timeline>(&path).unwrap(), t);
        std::fs::write(&path, "{").unwrap();
        let e = load::<Timeline>(&path).unwrap_err();
        assert!(e.to_string().contains("not a timeline"), "{e}");
    }

    #[test]
    fn a_cycle_or_a_clock_oddity_cannot_loop_the_chain() {
        let mut t = sample();
        // Two services that name each other, ready at the same instant.
        t.services = vec![
            svc("a", &["b"], true, 3000, Some(3400)),
            svc("b", &["a"], true, 3000, Some(3400)),
        ];
        t.ready_ms = 3400;
        let chain = t.critical_chain();
        assert_eq!(chain.len(), 4, "{chain:?}");
    }

    /// One bar per row, every name on it (escaped), the ready line, and a
    /// document whose tags all close.
    #[test]
    fn the_chart_shows_every_stage_and_service() {
        let mut t = sample();
        t.services[4].name = "a<b&c".into();
        let svg = t.svg();
        assert!(
            svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""),
            "{svg}"
        );
        assert!(svg.ends_with("</svg>\n"));
        for name in [
            "kernel +2000ms",
            "stage 1: modules +600ms",
            "stage 1: verity +100ms",
            "stage 2 setup +50ms",
            "qdomd (boot-critical) +400ms",
            "a&lt;b&amp;c +1ms",
            "random-seed",
            "QINIT-READY",
        ] {
            assert!(svg.contains(name), "no {name} in {svg}");
        }
        assert!(!svg.contains("a<b"));
        // kernel, 2 steps, stage 2, 6 services: a bar each.
        assert_eq!(svg.matches("<rect ").count(), 10, "{svg}");
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        assert_eq!(svg.matches("class=\"late\"").count(), 1);
    }

    /// Instants converted against one reading keep their order and never
    /// pass the reading: the service ready last is ready by QINIT-READY.
    #[test]
    fn one_reading_keeps_instants_in_order() {
        let earlier: Vec<Instant> = (0..200).map(|_| Instant::now()).collect();
        let clock = Clock::now();
        let ms: Vec<u64> = earlier.iter().map(|t| clock.ms(*t)).collect();
        assert!(ms.windows(2).all(|w| w[0] <= w[1]), "{ms:?}");
        assert!(ms.iter().all(|m| *m <= clock.at()));
        assert_eq!(clock.ms(clock.instant), clock.at());
    }

    #[test]
    fn the_monotonic_clock_and_instants_agree() {
        let t = Instant::now();
        let a = instant_ms(t);
        let b = now_ms();
        assert!(b >= a && b - a < 1000, "{a} {b}");
    }
}
