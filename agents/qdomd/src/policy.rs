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
/// How long the user has to answer an `ask` (then: deny).
const ASK_TIMEOUT: Duration = Duration::from_secs(120);
/// `policy.Ask` answers `deny` or `allow:<target>`.
const MAX_ASK_ANSWER: usize = 256;
/// Questions in flight at once, over every VM: each holds a dom0
/// qrexec-client and a prompt in the GUI VM. More are denied at once.
const MAX_ASKS: usize = 8;

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
    /// The rule says ask: the answer above (deny) stands unless the
    /// source's GUI VM answers `policy.Ask` ([`after_ask`]).
    pub ask: Option<AskSpec>,
}

/// What an `ask` offers the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AskSpec {
    pub service: String,
    /// With its `+`.
    pub argument: String,
    pub targets: Vec<String>,
    pub default_target: Option<String>,
    pub user: Option<String>,
    pub autostart: bool,
    pub rule: String,
}

/// The request `policy.Ask` reads on its stdin (`AgentAskResolution` of
/// R4.2: JSON with the source, service, argument, the targets offered,
/// the default one, and an icon per domain).
#[derive(Debug, serde::Serialize)]
struct AskParams<'a> {
    source: &'a str,
    service: &'a str,
    argument: &'a str,
    targets: &'a [String],
    default_target: &'a str,
    icons: std::collections::BTreeMap<String, String>,
}

/// The JSON for the GUI VM's `policy.Ask`.
pub fn ask_params(spec: &AskSpec, source: &str, vms: &[VmView]) -> Result<String, String> {
    let mut icons: std::collections::BTreeMap<String, String> = vms
        .iter()
        .map(|v| {
            let prefix = v.class.to_ascii_lowercase();
            (v.name.clone(), format!("{prefix}-{}", v.label))
        })
        .collect();
    icons.insert(qpolicy::eval::DOM0.into(), "adminvm-black".into());
    let p = AskParams {
        source,
        service: &spec.service,
        argument: &spec.argument,
        targets: &spec.targets,
        default_target: spec.default_target.as_deref().unwrap_or(""),
        icons,
    };
    serde_json::to_string(&p).map_err(|e| format!("the policy.Ask request: {e}"))
}

/// The decision once the GUI VM answered (`deny`, or `allow:<target>`
/// with one of the targets offered), or did not (`Err`).
pub fn after_ask(
    spec: &AskSpec,
    sys: &System,
    q: &Query,
    response: Result<&str, String>,
) -> Decision {
    let denied = |reason: String| denied(q, &reason);
    let response = match response {
        Ok(r) => r,
        Err(e) => return denied(format!("ask at {}: nobody answered ({e})", spec.rule)),
    };
    if response == "deny" {
        return denied(format!("ask at {}: the user said no", spec.rule));
    }
    match response.strip_prefix("allow:") {
        Some(t) if spec.targets.iter().any(|x| x == t) => {
            let requested = match sys.requested_target(&q.intended_target) {
                Ok(r) => r,
                Err(reason) => return denied(reason),
            };
            allowed(
                sys,
                q,
                &format!("{}{}", spec.service, spec.argument),
                requested,
                t.to_owned(),
                spec.user.clone(),
                spec.autostart,
            )
        }
        _ => denied(format!(
            "ask at {}: an invalid answer from policy.Ask ({:?})",
            spec.rule,
            printable(response)
        )),
    }
}

/// A denial and R4.2's log line for it.
fn denied(q: &Query, reason: &str) -> Decision {
    Decision {
        answer: Answer::Deny,
        log: format!(
            "qrexec: {}: {} -> {}: denied: {reason}",
            q.service_and_arg, q.source, q.intended_target
        ),
        autostart: None,
        ask: None,
    }
}

/// At most 64 characters of `s`, control characters escaped, for a log.
fn printable(s: &str) -> String {
    s.chars().take(64).flat_map(char::escape_debug).collect()
}

/// The allow decision and its log line.
fn allowed(
    sys: &System,
    q: &Query,
    service_and_arg: &str,
    requested: String,
    target: String,
    user: Option<String>,
    autostart: bool,
) -> Decision {
    let needs_start = autostart
        && target != qpolicy::eval::DOM0
        && sys.domains.get(&target).is_some_and(|d| !d.running);
    Decision {
        log: format!(
            "qrexec: {service_and_arg}: {} -> {requested}: allowed to {target}",
            q.source
        ),
        autostart: needs_start.then(|| target.clone()),
        answer: Answer::Allow {
            user: user.unwrap_or_else(|| "DEFAULT".into()),
            target,
            autostart,
            requested_target: requested,
        },
        ask: None,
    }
}

/// Decides one query (`handle_request` of R4.2).
pub fn decide(rules: &[qpolicy::Rule], sys: &System, q: &Query) -> Decision {
    let (service, argument) = match q.service_and_arg.split_once('+') {
        Some((s, a)) => (s.to_owned(), format!("+{a}")),
        None => (q.service_and_arg.clone(), "+".to_owned()),
    };
    let denied = |reason: &str| denied(q, reason);
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
            default_target,
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
                    let mut d = denied(&format!("ask at {rule}: nobody to ask"));
                    d.ask = Some(AskSpec {
                        service,
                        argument,
                        targets,
                        default_target,
                        user,
                        autostart,
                        rule,
                    });
                    return d;
                }
            }
        }
    };
    allowed(
        sys,
        q,
        &format!("{service}{argument}"),
        requested,
        target,
        user,
        autostart,
    )
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
    qrexec_client: PathBuf,
    shared: Arc<Mutex<Shared>>,
    requests: mpsc::UnboundedSender<Request>,
) {
    let reported = Arc::new(Mutex::new(BTreeSet::<String>::new()));
    let asks = Arc::new(tokio::sync::Semaphore::new(MAX_ASKS));
    crate::rootsock::serve(listener, "policy socket", move |stream| {
        let asker = Asker {
            qrexec_client: qrexec_client.clone(),
            slots: asks.clone(),
        };
        client(
            stream,
            dirs.clone(),
            asker,
            shared.clone(),
            requests.clone(),
            reported.clone(),
        )
    })
    .await;
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

/// How questions are put to a GUI VM, and how many at once.
struct Asker {
    qrexec_client: PathBuf,
    slots: Arc<tokio::sync::Semaphore>,
}

async fn client(
    mut stream: tokio::net::UnixStream,
    dirs: Dirs,
    asker: Asker,
    shared: Arc<Mutex<Shared>>,
    requests: mpsc::UnboundedSender<Request>,
    reported: Arc<Mutex<BTreeSet<String>>>,
) -> Result<(), String> {
    let query = tokio::time::timeout(QUERY_TIMEOUT, read_query(&mut stream))
        .await
        .map_err(|_| "a client sent no query in time".to_string())??;
    let vms = crate::daemon::vms_now(&shared)?;
    let policy = tokio::task::spawn_blocking(move || {
        let paths: Vec<&std::path::Path> = dirs.0.iter().map(PathBuf::as_path).collect();
        qpolicy::load(&paths)
    })
    .await
    .map_err(|e| format!("loading the policy: {e}"))?;
    report_errors(&policy.errors, &reported);
    let sys = system(&vms);
    let mut d = decide(&policy.rules, &sys, &query);
    if let Some(spec) = d.ask.take() {
        let guivm = vms
            .iter()
            .find(|v| v.name == query.source)
            .and_then(|v| v.guivm.clone());
        d = match guivm {
            None => after_ask(&spec, &sys, &query, Err("the source has no GUI VM".into())),
            Some(g) => {
                let response = match (
                    asker.slots.try_acquire(),
                    ask_params(&spec, &query.source, &vms),
                ) {
                    (Err(_), _) => Err(format!("{MAX_ASKS} questions are pending already")),
                    (Ok(_slot), Ok(params)) => ask(&asker.qrexec_client, &g, &params).await,
                    (Ok(_), Err(e)) => Err(e),
                };
                // The user may have taken a while: decide against the
                // domains as they are now (a target may have stopped).
                let now = crate::daemon::vms_now(&shared)?;
                after_ask(
                    &spec,
                    &system(&now),
                    &query,
                    response.as_deref().map_err(Clone::clone),
                )
            }
        };
    }
    if let Some(vm) = d.autostart.take() {
        if let Err(e) = autostart(&vm, &shared, &requests).await {
            d = denied(&query, &format!("target {vm} did not start: {e}"));
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

/// Calls `policy.Ask` in `guivm` as R4.2's policy daemon does
/// (`qrexec-client -d <guivm> 'DEFAULT:QUBESRPC policy.Ask dom0'`, the
/// JSON on its stdin) and returns what it printed.
async fn ask(qrexec_client: &std::path::Path, guivm: &str, params: &str) -> Result<String, String> {
    use tokio::process::Command;
    let mut child = Command::new(qrexec_client)
        .args(["-d", guivm, "DEFAULT:QUBESRPC policy.Ask dom0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{}: {e}", qrexec_client.display()))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let child = &mut child;
    let talk = async {
        stdin
            .write_all(params.as_bytes())
            .await
            .map_err(|e| format!("writing the request: {e}"))?;
        drop(stdin);
        let mut out = Vec::new();
        (&mut stdout)
            .take(MAX_ASK_ANSWER as u64 + 1)
            .read_to_end(&mut out)
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        if out.len() > MAX_ASK_ANSWER {
            return Err(format!("an answer over {MAX_ASK_ANSWER} bytes"));
        }
        let text = String::from_utf8(out).map_err(|_| "an answer that is not text".to_string())?;
        // The answer counts once qrexec-client is done with the call.
        child
            .wait()
            .await
            .map_err(|e| format!("waiting for qrexec-client: {e}"))?;
        Ok(text)
    };
    // On a timeout the child is dropped, and so killed (kill_on_drop).
    tokio::time::timeout(ASK_TIMEOUT, talk)
        .await
        .map_err(|_| format!("no answer from {guivm} within {ASK_TIMEOUT:?}"))?
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
    fn ask_goes_to_the_gui_vm_and_its_answer_counts() {
        let r = rules("qubes.Filecopy * work @anyvm ask default_target=guivm\n");
        let vms = [vm("guivm", true), vm("work", true)];
        let sys = system(&vms);
        let q = query("work", "guivm", "qubes.Filecopy");
        let d = decide(&r, &sys, &q);
        assert_eq!(d.answer, Answer::Deny);
        let spec = d.ask.expect("an ask");
        assert_eq!(spec.default_target.as_deref(), Some("guivm"));
        let json: serde_json::Value =
            serde_json::from_str(&ask_params(&spec, "work", &vms).unwrap()).unwrap();
        assert_eq!(json["source"], "work");
        assert_eq!(json["service"], "qubes.Filecopy");
        assert_eq!(json["argument"], "+");
        assert_eq!(json["default_target"], "guivm");
        assert!(json["targets"]
            .as_array()
            .unwrap()
            .contains(&"guivm".into()));
        assert_eq!(json["icons"]["work"], "appvm-red");
        assert_eq!(json["icons"]["dom0"], "adminvm-black");
        let allow = after_ask(&spec, &sys, &q, Ok("allow:guivm"));
        assert!(
            matches!(allow.answer, Answer::Allow { ref target, .. } if target == "guivm"),
            "{}",
            allow.log
        );
        for (resp, why) in [
            (Ok("deny"), "the user said no"),
            (Ok("allow:ghost"), "an invalid answer"),
            (Ok("allow:guivm\n"), "an invalid answer"),
            (Err("timeout".to_string()), "nobody answered"),
        ] {
            let d = after_ask(&spec, &sys, &q, resp.as_deref().map_err(Clone::clone));
            assert_eq!(d.answer, Answer::Deny);
            assert!(d.log.contains(why), "{}", d.log);
        }
        let mut q = query("work", "guivm", "qubes.Filecopy");
        q.assume_yes_for_ask = true;
        assert!(matches!(decide(&r, &sys, &q).answer, Answer::Allow { .. }));
        q.just_evaluate = true;
        let d = decide(&r, &sys, &q);
        assert_eq!((d.answer, d.ask), (Answer::Deny, None));
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
