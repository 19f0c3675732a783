//! What reaches dom0's policy and Admin API sockets: a query to the policy
//! daemon (`qpolicy::query`, also the answer qrexec-daemon parses) and an
//! Admin API request (`qdomd::admin`), whose names come from a VM. The
//! input is tried as each. Nothing panics; a query that parses renders
//! back to one that parses the same; an admin call is planned against a
//! fixed domain list, and only known domains are ever acted on.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use qdomd::admin::{parse, plan, Plan};
use qdomd::daemon::VmView;
use qdomd::lifecycle::Phase;
use qpolicy::query::{Answer, Query};

fuzz_target!(|data: &[u8]| {
    if let Ok(q) = Query::parse(data) {
        let again = Query::parse(&q.render().expect("a parsed query renders")).expect("and parses");
        assert_eq!(again, q);
    }
    if let Ok(a) = Answer::parse(data) {
        if let Ok(bytes) = a.render() {
            assert_eq!(Answer::parse(&bytes).ok(), Some(a));
        }
    }
    let vms: Vec<VmView> = [("guivm", Phase::Ready), ("work", Phase::Stopped)]
        .into_iter()
        .map(|(name, phase)| VmView {
            name: name.into(),
            class: "AppVM",
            label: "red".into(),
            memory_mib: 256,
            tags: BTreeSet::new(),
            phase,
            domid: None,
            guivm: None,
        })
        .collect();
    if let Ok(call) = parse(data) {
        let known = |n: &str| n == "guivm" || n == "work";
        match plan(&call, &vms) {
            Plan::Start(vm) | Plan::Kill(vm) | Plan::Shutdown { vm, .. } => assert!(known(&vm)),
            Plan::Events { only: Some(vm) } => assert!(known(&vm)),
            Plan::Events { only: None } | Plan::Reply(_) => {}
        }
    }
});
