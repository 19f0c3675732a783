//! The watch-driven state machine against a fake xenstore: a fake `xl`
//! adds and removes domains in the store, each change goes through
//! `xs::snapshot` and `Tracker` as a watch firing would, and the guest's
//! readiness key through `xs::is_ready`.

#![allow(clippy::unwrap_used)] // test fixtures

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use qdomd::definition::{parse, Domain};
use qdomd::lifecycle::{Action, Event, Phase, Supervisor, TimerKind};
use qdomd::xs::{self, Tracker};
use qxenstore::XsError;

#[derive(Default)]
struct FakeXs {
    nodes: Mutex<BTreeMap<String, String>>,
}

impl xs::Store for FakeXs {
    fn directory(&mut self, path: &str) -> Result<Vec<String>, XsError> {
        let nodes = self.nodes.lock().unwrap();
        let prefix = format!("{path}/");
        let mut children: Vec<String> = nodes
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .map(|rest| rest.split('/').next().unwrap_or(rest).into())
            .collect();
        children.dedup();
        Ok(children)
    }

    fn read(&mut self, path: &str) -> Result<Option<Vec<u8>>, XsError> {
        Ok(self
            .nodes
            .lock()
            .unwrap()
            .get(path)
            .map(|v| v.clone().into_bytes()))
    }
}

impl FakeXs {
    fn write(&self, path: &str, data: &str) {
        self.nodes.lock().unwrap().insert(path.into(), data.into());
    }

    fn rm(&self, path: &str) {
        self.nodes
            .lock()
            .unwrap()
            .retain(|k, _| k != path && !k.starts_with(&format!("{path}/")));
    }
}

/// Supervisor, tracker, store and a fake `xl` that numbers domains.
struct World {
    sup: Supervisor,
    tracker: Tracker,
    xs: FakeXs,
    next_domid: u32,
    now: Instant,
    timers: Vec<Action>,
    log: Vec<Action>,
}

fn gui(policy: &str) -> Domain {
    parse(
        std::path::Path::new("/etc/qdomd/domains/gui.toml"),
        &format!(
            "type = \"pv\"\nkernel = \"/k\"\nmemory_mib = 256\nrole = \"gui\"\nautostart = true\n\
             [restart]\npolicy = \"{policy}\"\ninitial_delay_ms = 1000\nmax_delay_ms = 8000\n"
        ),
        None,
    )
    .unwrap()
}

impl World {
    fn new(policy: &str) -> Self {
        let xs = FakeXs::default();
        xs.nodes
            .lock()
            .unwrap()
            .insert("/local/domain/0/name".into(), "Domain-0".into());
        Self {
            sup: Supervisor::new([gui(policy)]),
            tracker: Tracker::default(),
            xs,
            next_domid: 1,
            now: Instant::now(),
            timers: Vec::new(),
            log: Vec::new(),
        }
    }

    /// Feeds an event and carries out the actions the way the daemon does,
    /// with `xl` faked on the store. Returns the actions.
    async fn feed(&mut self, ev: Event) -> Vec<Action> {
        let mut actions = self.sup.handle(ev, self.now);
        let mut follow = Vec::new();
        for a in &actions {
            match a {
                Action::Create { name } => {
                    let domid = self.next_domid;
                    self.next_domid += 1;
                    self.xs.write(&format!("/local/domain/{domid}/name"), name);
                }
                Action::Destroy { domid, .. } => self.xl_destroy(*domid).await,
                Action::Timer { .. } => self.timers.push(a.clone()),
                // The daemon starts and fills QubesDB, then unpauses.
                Action::StartQubesDb { domid, .. } => follow.push(Event::QubesDbUp {
                    domid: *domid,
                    result: Ok(()),
                }),
                _ => {}
            }
        }
        self.log.extend(actions.iter().cloned());
        for ev in follow {
            actions.extend(Box::pin(self.feed(ev)).await);
        }
        actions
    }

    /// The domain watch fired: read the list, feed what changed.
    async fn watch_fired(&mut self) -> Vec<Action> {
        let snap = xs::snapshot(&mut self.xs).unwrap();
        let mut out = Vec::new();
        for ev in self.tracker.update(snap) {
            out.extend(Box::pin(self.feed(ev)).await);
        }
        out
    }

    async fn xl_destroy(&self, domid: u32) {
        self.xs.rm(&format!("/local/domain/{domid}"));
    }

    async fn guest_writes_ready(&mut self, domid: u32) -> Vec<Action> {
        self.xs.write(&xs::ready_path(domid), "1");
        assert!(xs::is_ready(&mut self.xs, domid).unwrap());
        self.feed(Event::ReadyKey { domid }).await
    }

    /// Lets the earliest pending timer fire.
    async fn fire_timer(&mut self) -> (Duration, Vec<Action>) {
        let Action::Timer {
            name,
            kind,
            generation,
            after,
        } = self.timers.remove(0)
        else {
            unreachable!()
        };
        self.now += after;
        let out = self
            .feed(Event::Timer {
                name,
                kind,
                generation,
            })
            .await;
        (after, out)
    }

    fn phase(&self) -> Phase {
        self.sup.get("gui").unwrap().phase
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn gui_vm_starts_becomes_ready_and_is_restarted_with_backoff_after_xl_destroy() {
    rt().block_on(async {
        let mut w = World::new("always");
        for ev in w.sup.autostart() {
            w.feed(ev).await;
        }
        assert_eq!(w.phase(), Phase::Starting);
        let acts = w.watch_fired().await;
        assert!(
            acts.contains(&Action::WatchReady {
                name: "gui".into(),
                domid: 1
            }),
            "{acts:?}"
        );
        assert_eq!(w.phase(), Phase::Running);
        // Not ready before the guest says so.
        assert!(!xs::is_ready(&mut w.xs, 1).unwrap());
        let acts = w.guest_writes_ready(1).await;
        assert!(
            acts.contains(&Action::Ready {
                name: "gui".into(),
                domid: 1,
                gui: true
            }),
            "{acts:?}"
        );

        // `xl destroy` from a shell: the release watch fires.
        w.xl_destroy(1).await;
        w.watch_fired().await;
        assert_eq!(w.phase(), Phase::Backoff);
        let (delay, acts) = w.fire_timer().await;
        assert_eq!(delay, Duration::from_millis(1000));
        assert!(
            acts.contains(&Action::Create { name: "gui".into() }),
            "{acts:?}"
        );
        w.watch_fired().await;
        assert_eq!(w.sup.get("gui").unwrap().domid, Some(2));
        w.guest_writes_ready(2).await;
        assert_eq!(w.phase(), Phase::Ready);

        // Killed again soon after: the next delay doubles.
        w.xl_destroy(2).await;
        w.watch_fired().await;
        let (delay, _) = w.fire_timer().await;
        assert_eq!(delay, Duration::from_millis(2000));
        w.watch_fired().await;
        assert_eq!(w.phase(), Phase::Running);
    });
}

#[test]
fn stop_shuts_down_cleanly_or_destroys_after_the_timeout() {
    rt().block_on(async {
        let mut w = World::new("always");
        w.feed(Event::Start("gui".into())).await;
        w.watch_fired().await;
        w.guest_writes_ready(1).await;

        // Clean: the guest goes away after the shutdown request.
        let acts = w.feed(Event::Stop("gui".into())).await;
        assert!(
            acts.contains(&Action::Shutdown {
                name: "gui".into(),
                domid: 1
            }),
            "{acts:?}"
        );
        w.xl_destroy(1).await;
        w.watch_fired().await;
        assert_eq!(w.phase(), Phase::Stopped);
        // The stale stop timer does nothing.
        let (_, acts) = w.fire_timer().await;
        assert!(acts.is_empty(), "{acts:?}");
        assert!(w.sup.all_stopped());

        // A guest that ignores the shutdown is destroyed after the timeout.
        w.feed(Event::Start("gui".into())).await;
        w.watch_fired().await;
        w.feed(Event::Stop("gui".into())).await;
        let (after, acts) = w.fire_timer().await;
        assert_eq!(after, qdomd::lifecycle::STOP_TIMEOUT);
        assert!(
            acts.contains(&Action::Destroy {
                name: "gui".into(),
                domid: 2
            }),
            "{acts:?}"
        );
        w.watch_fired().await;
        assert_eq!(w.phase(), Phase::Stopped);
        assert!(w.timers.is_empty());
    });
}

#[test]
fn never_policy_failed_create_and_a_domain_started_by_hand() {
    rt().block_on(async {
        let mut w = World::new("never");
        w.feed(Event::Start("gui".into())).await;
        w.watch_fired().await;
        w.xl_destroy(1).await;
        w.watch_fired().await;
        assert_eq!(w.phase(), Phase::Stopped);
        assert!(w.timers.is_empty());

        // Somebody runs `xl create` by hand: qdomd follows the domain.
        w.xs.write("/local/domain/7/name", "gui");
        w.watch_fired().await;
        assert_eq!(
            (w.phase(), w.sup.get("gui").unwrap().domid),
            (Phase::Running, Some(7))
        );

        // A failed `xl create` with a restart policy backs off.
        let mut w = World::new("on-failure");
        let acts = w.sup.handle(Event::Start("gui".into()), w.now);
        assert!(acts.contains(&Action::Create { name: "gui".into() }));
        let acts = w
            .feed(Event::Created {
                name: "gui".into(),
                result: Err("xl: out of memory".into()),
            })
            .await;
        assert!(
            acts.iter().any(|a| matches!(
                a,
                Action::Timer {
                    kind: TimerKind::Restart,
                    ..
                }
            )),
            "{acts:?}"
        );
        assert_eq!(w.phase(), Phase::Backoff);
        // Stop during the backoff: no restart.
        w.feed(Event::Stop("gui".into())).await;
        let (_, acts) = w.fire_timer().await;
        assert!(acts.is_empty(), "{acts:?}");
        assert_eq!(w.phase(), Phase::Stopped);
    });
}

#[test]
fn qubesdb_is_filled_before_unpause_and_its_daemon_is_restarted_a_bounded_number_of_times() {
    let now = Instant::now();
    let mut sup = Supervisor::new([gui("always")]);
    sup.handle(Event::Start("gui".into()), now);
    let acts = sup.handle(
        Event::Appeared {
            name: "gui".into(),
            domid: 4,
        },
        now,
    );
    assert_eq!(
        acts,
        [Action::StartQubesDb {
            name: "gui".into(),
            domid: 4,
            gui_domid: None,
            unpause: true
        }]
    );
    assert_eq!(
        sup.get("gui").unwrap().phase,
        Phase::Starting,
        "paused until filled"
    );
    let acts = sup.handle(
        Event::QubesDbUp {
            domid: 4,
            result: Ok(()),
        },
        now,
    );
    assert!(acts.contains(&Action::WatchReady {
        name: "gui".into(),
        domid: 4
    }));
    for _ in 0..qdomd::lifecycle::MAX_DAEMON_RESTARTS {
        let acts = sup.handle(
            Event::QubesDbExited {
                domid: 4,
                clean: false,
            },
            now,
        );
        assert!(
            matches!(
                acts.as_slice(),
                [Action::StartQubesDb { unpause: false, .. }]
            ),
            "{acts:?}"
        );
    }
    assert!(sup
        .handle(
            Event::QubesDbExited {
                domid: 4,
                clean: false
            },
            now
        )
        .is_empty());
    assert_eq!(
        sup.get("gui").unwrap().phase,
        Phase::Running,
        "the VM is left alone"
    );
}

#[test]
fn a_vm_whose_qubesdb_fails_is_destroyed_not_run_without_it() {
    let now = Instant::now();
    let mut sup = Supervisor::new([gui("always")]);
    sup.handle(Event::Start("gui".into()), now);
    sup.handle(
        Event::Appeared {
            name: "gui".into(),
            domid: 2,
        },
        now,
    );
    let acts = sup.handle(
        Event::QubesDbUp {
            domid: 2,
            result: Err("no daemon".into()),
        },
        now,
    );
    assert_eq!(
        acts,
        [Action::Destroy {
            name: "gui".into(),
            domid: 2
        }]
    );
    // Stopped while paused: a paused domain cannot shut down, so destroy.
    let mut sup = Supervisor::new([gui("always")]);
    sup.handle(Event::Start("gui".into()), now);
    sup.handle(
        Event::Appeared {
            name: "gui".into(),
            domid: 3,
        },
        now,
    );
    let acts = sup.handle(Event::Stop("gui".into()), now);
    assert!(acts.contains(&Action::Destroy {
        name: "gui".into(),
        domid: 3
    }));
}
