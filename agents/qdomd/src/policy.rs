//! The qrexec policy daemon (Qubes' `qrexec-policy-daemon`), inside qdomd:
//! qrexec-daemon asks at `/run/qubes/policy.sock` ([`qpolicy::query`]),
//! this answers from the policy files and the domain list.
//!
//! It lives here rather than in a daemon of its own because the system
//! it decides against (names, classes, tags, which VMs run) is qdomd's
//! state, and an allowed call with `autostart` means starting a VM, which
//! is qdomd's job: R4.2's policy daemon asks qubesd for both on every
//! call, trusting its answer completely, so a separate process would add
//! a hop and no boundary. The evaluation itself is the `qpolicy` library,
//! free of I/O.
//!
//! The policy is read afresh for every query (a handful of small files),
//! so an edit on /var takes effect with the next call, as R4.2's inotify
//! reload does. Every decision is logged in R4.2's words.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qpolicy::query::{Answer, Query, MAX_QUERY};
use qpolicy::{Resolution, System};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::daemon::{Request, Shared, VmView};

/// How long a client may take to send its query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an autostarted target may take to run.
const AUTOSTART_TIMEOUT: Duration = Duration::from_secs(120);

/// The system the policy decides against: every defined VM, and dom0.
pub fn system(vms: &[VmView]) -> System {
    let mut sys = System::default();
    sys.domains.insert(
        qpolicy::eval::DOM0.into(),
        qpolicy::Domain {
            class: "AdminVM".into(),
            running: true,
            ..Default::default()
        },
    );
    for vm in vms {
        sys.domains.insert(
            vm.name.clone(),
            qpolicy::Domain {
                class: vm.class.into(),
                tags: vm.tags.clone(),
                running: vm.running(),
                default_dispvm: None,
                template_for_dispvms: false,
            },
        );
    }
    sys
}

/// What the policy decided, for the answer and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub answer: Answer,
    /// R4.2's log line.
    pub log: String,
    /// A VM that must be started before the answer is given.
    pub autostart: Option<String>,
}

/// Decides one query (`handle_request` of R4.2).
pub fn decide(rules: &[qpolicy::Rule], sys: &System, q: &Query) -> Decision {
    let (service, argument) = match q.service_and_arg.split_once('+') {
        Some((s, a)) => (s.to_owned(), format!("+{a}")),
        None => (q.service_and_arg.clone(), "+".to_owned()),
    };
    let denied = |reason: &str| Decision {
        answer: Answer::Deny,
        log: format!(
            "qrexec: {}: {} -> {}: denied: {reason}",
            q.service_and_arg, q.source, q.intended_target
        ),
        autostart: None,
    };
    if !sys.domains.contains_key(&q.source) {
        return denied("the source is not a known domain");
    }
    let requested = match sys.requested_target(&q.intended_target) {
        Ok(t) => t,
        Err(reason) => return denied(&reason),
    };
    let req = qpolicy::Request {
        service: service.clone(),
        argument: argument.clone(),
        source: q.source.clone(),
        target: q.intended_target.clone(),
    };
    let (target, user, autostart) = match qpolicy::eval::evaluate(rules, sys, &req) {
        Resolution::Deny { reason, .. } => return denied(&reason),
        Resolution::Allow {
            target,
            user,
            autostart,
            ..
        } => (target, user, autostart),
        Resolution::Ask {
            targets,
            user,
            autostart,
            rule,
            ..
        } => {
            if q.just_evaluate {
                return denied(&format!("ask at {rule}, and this is only an evaluation"));
            }
            // The caller's choice counts as the user's only when asked to
            // assume yes, and only among the targets offered.
            let chosen = sys.requested_target(&q.intended_target).ok();
            match chosen {
                Some(t) if q.assume_yes_for_ask && targets.contains(&t) => (t, user, autostart),
                _ => {
                    return denied(&format!(
                        "ask at {rule}: nobody to ask (policy.Ask is not served here yet)"
                    ))
                }
            }
        }
    };
    let needs_start = autostart
        && target != qpolicy::eval::DOM0
        && sys.domains.get(&target).is_some_and(|d| !d.running);
    Decision {
        log: format!(
            "qrexec: {service}{argument}: {} -> {requested}: allowed to {target}",
            q.source
        ),
        autostart: needs_start.then(|| target.clone()),
        answer: Answer::Allow {
            user: user.unwrap_or_else(|| "DEFAULT".into()),
            target,
            autostart,
            requested_target: requested,
        },
    }
}

/// The policy's directories, the owner's first.
#[derive(Debug, Clone)]
pub struct Dirs(pub Vec<PathBuf>);

impl Default for Dirs {
    fn default() -> Self {
        Dirs(vec![qpolicy::OWNER_DIR.into(), qpolicy::SHIPPED_DIR.into()])
    }
}

/// Serves the policy socket until the task is dropped.
pub async fn serve(
    listener: tokio::net::UnixListener,
    dirs: Dirs,
    shared: Arc<Mutex<Shared>>,
    requests: mpsc::UnboundedSender<Request>,
) {
    let reported = Arc::new(Mutex::new(BTreeSet::<String>::new()));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                log::warn!("policy socket: accepting: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (dirs, shared, requests, reported) = (
            dirs.clone(),
            shared.clone(),
            requests.clone(),
            reported.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = client(stream, dirs, shared, requests, reported).await {
                log::warn!("policy socket: {e}");
            }
        });
    }
}

async fn read_query(stream: &mut tokio::net::UnixStream) -> Result<Query, String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !Query::complete(&buf) {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading a query: {e}"))?;
        if n == 0 {
            return Err("a client left before its query was complete".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_QUERY {
            return Err(format!("a query over {MAX_QUERY} bytes"));
        }
    }
    Query::parse(&buf).map_err(|e| e.to_string())
}

async fn client(
    mut stream: tokio::net::UnixStream,
    dirs: Dirs,
    shared: Arc<Mutex<Shared>>,
    requests: mpsc::UnboundedSender<Request>,
    reported: Arc<Mutex<BTreeSet<String>>>,
) -> Result<(), String> {
    // Only qrexec-daemon (root) asks; the socket is root-only as well.
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("peer credentials: {e}"))?;
    if cred.uid() != 0 {
        return Err(format!("refusing a client of uid {}", cred.uid()));
    }
    let query = tokio::time::timeout(QUERY_TIMEOUT, read_query(&mut stream))
        .await
        .map_err(|_| "a client sent no query in time".to_string())??;
    let vms = shared
        .lock()
        .map_err(|_| "state lock poisoned".to_string())?
        .vms
        .clone();
    let policy = tokio::task::spawn_blocking(move || {
        let paths: Vec<&std::path::Path> = dirs.0.iter().map(PathBuf::as_path).collect();
        qpolicy::load(&paths)
    })
    .await
    .map_err(|e| format!("loading the policy: {e}"))?;
    report_errors(&policy.errors, &reported);
    let mut d = decide(&policy.rules, &system(&vms), &query);
    if let Some(vm) = d.autostart.take() {
        if let Err(e) = autostart(&vm, &shared, &requests).await {
            d.answer = Answer::Deny;
            d.log = format!(
                "qrexec: {}: {} -> {}: denied: target {vm} did not start: {e}",
                query.service_and_arg, query.source, query.intended_target
            );
        }
    }
    log::info!("{}", d.log);
    let bytes = d.answer.render().map_err(|e| e.to_string())?;
    stream
        .write_all(&bytes)
        .await
        .map_err(|e| format!("answering: {e}"))?;
    stream
        .shutdown()
        .await
        .map_err(|e| format!("answering: {e}"))
}

/// Logs each bad policy file once, not once a call.
fn report_errors(errors: &[qpolicy::load::PolicyError], reported: &Mutex<BTreeSet<String>>) {
    let now: BTreeSet<String> = errors.iter().map(ToString::to_string).collect();
    let Ok(mut seen) = reported.lock() else {
        return;
    };
    for e in now.difference(&seen) {
        log::error!("policy: {e}; the rest of the policy stays in force");
    }
    *seen = now;
}

/// Starts `vm` and waits until it runs.
async fn autostart(
    vm: &str,
    shared: &Mutex<Shared>,
    requests: &mpsc::UnboundedSender<Request>,
) -> Result<(), String> {
    log::info!("policy: starting {vm} for a call");
    requests
        .send(Request::Start(vm.to_owned()))
        .map_err(|_| "qdomd is stopping".to_string())?;
    crate::daemon::wait_for_vm(shared, vm, VmView::running, AUTOSTART_TIMEOUT).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::VmClass;
    use crate::lifecycle::Phase;

    fn vm(name: &str, running: bool) -> VmView {
        VmView {
            name: name.into(),
            class: VmClass::AppVM.as_str(),
            label: "red".into(),
            memory_mib: 256,
            tags: BTreeSet::new(),
            phase: if running {
                Phase::Running
            } else {
                Phase::Stopped
            },
            domid: running.then_some(3),
            guivm: None,
        }
    }

    fn rules(text: &str) -> Vec<qpolicy::Rule> {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("50-test.policy"), text).unwrap();
        let p = qpolicy::load(&[d.path()]);
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        p.rules
    }

    fn query(source: &str, target: &str, svc: &str) -> Query {
        Query {
            source: source.into(),
            intended_target: target.into(),
            service_and_arg: svc.into(),
            assume_yes_for_ask: false,
            just_evaluate: false,
        }
    }

    #[test]
    fn admin_calls_from_the_gui_vm_only() {
        let r = rules(
            "admin.vm.List * guivm @adminvm allow\n\
             admin.vm.Start * guivm @anyvm allow target=dom0\n\
             admin.vm.List * @anyvm @adminvm deny\n",
        );
        let sys = system(&[vm("guivm", true), vm("work", false)]);
        let d = decide(&r, &sys, &query("guivm", "dom0", "admin.vm.List"));
        assert_eq!(
            d.answer,
            Answer::Allow {
                user: "DEFAULT".into(),
                target: "dom0".into(),
                autostart: true,
                requested_target: "@adminvm".into()
            }
        );
        assert_eq!(
            d.log,
            "qrexec: admin.vm.List+: guivm -> @adminvm: allowed to dom0"
        );
        // About a VM, the call still goes to dom0, and starts nothing.
        let d = decide(&r, &sys, &query("guivm", "work", "admin.vm.Start+"));
        assert!(
            matches!(d.answer, Answer::Allow { ref target, ref requested_target, .. }
            if target == "dom0" && requested_target == "work")
        );
        assert_eq!(d.autostart, None);
        let d = decide(&r, &sys, &query("work", "dom0", "admin.vm.List"));
        assert_eq!(d.answer, Answer::Deny);
        assert!(
            d.log.contains("work -> dom0: denied: denied by policy"),
            "{}",
            d.log
        );
    }

    #[test]
    fn vm_to_vm_autostarts_a_stopped_target() {
        let r = rules("qguest.Echo * work guivm allow\nqguest.Echo * guivm work allow user=root\n");
        let sys = system(&[vm("guivm", false), vm("work", true)]);
        let d = decide(&r, &sys, &query("work", "guivm", "qguest.Echo"));
        assert_eq!(d.autostart.as_deref(), Some("guivm"));
        let sys = system(&[vm("guivm", true), vm("work", true)]);
        let d = decide(&r, &sys, &query("guivm", "work", "qguest.Echo"));
        assert!(matches!(d.answer, Answer::Allow { ref user, .. } if user == "root"));
        assert_eq!(d.autostart, None);
        // Unknown sources are refused before any rule is read.
        let d = decide(&r, &sys, &query("ghost", "work", "qguest.Echo"));
        assert_eq!(d.answer, Answer::Deny);
        // No rule: denied.
        let d = decide(&r, &sys, &query("work", "guivm", "qubes.Other"));
        assert!(
            d.log.ends_with("denied: no matching rule found"),
            "{}",
            d.log
        );
    }

    #[test]
    fn ask_needs_someone_to_answer() {
        let r = rules("qubes.Filecopy * work @anyvm ask\n");
        let sys = system(&[vm("guivm", true), vm("work", true)]);
        let d = decide(&r, &sys, &query("work", "guivm", "qubes.Filecopy"));
        assert_eq!(d.answer, Answer::Deny);
        let mut q = query("work", "guivm", "qubes.Filecopy");
        q.assume_yes_for_ask = true;
        assert!(matches!(decide(&r, &sys, &q).answer, Answer::Allow { .. }));
        q.just_evaluate = true;
        assert_eq!(decide(&r, &sys, &q).answer, Answer::Deny);
    }

    /// The policy the image ships: the GUI VM has the Admin API, about
    /// dom0 and about VMs, and nobody else has it.
    #[test]
    fn the_shipped_policy_gives_the_admin_api_to_the_gui_vm_only() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../image/overlays/base/etc/qubes/policy.d");
        let p = qpolicy::load(&[dir.as_path()]);
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let sys = system(&[vm("guivm", true), vm("work", true)]);
        for (source, target, svc) in [
            ("guivm", "dom0", "admin.vm.List"),
            ("guivm", "work", "admin.vm.Start"),
            ("guivm", "work", "admin.vm.Shutdown"),
            ("guivm", "work", "admin.vm.Kill"),
            ("guivm", "work", "admin.vm.property.Get+label"),
            ("guivm", "dom0", "admin.Events"),
        ] {
            let d = decide(&p.rules, &sys, &query(source, target, svc));
            assert!(
                matches!(d.answer, Answer::Allow { ref target, .. } if target == "dom0"),
                "{source} -> {target} {svc}: {}",
                d.log
            );
        }
        for (source, target, svc) in [
            ("work", "dom0", "admin.vm.List"),
            ("work", "guivm", "admin.vm.Kill"),
            ("work", "dom0", "admin.Events"),
            ("work", "guivm", "qguest.Echo"),
        ] {
            let d = decide(&p.rules, &sys, &query(source, target, svc));
            assert_eq!(d.answer, Answer::Deny, "{source} -> {target} {svc}");
        }
    }
}
