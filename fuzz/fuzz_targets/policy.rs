//! Policy files from anyone who can write one (the owner's directory on
//! /var is on a disk an attacker may hold): every line through the parser,
//! and the rules that parse evaluated for a request the input also picks.
//! Nothing panics; an allow never names the caller itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qpolicy::eval::{evaluate, Domain, Request, Resolution, System};
use qpolicy::parse::{line, Line};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut rules = Vec::new();
    let mut last = "";
    for (i, l) in text.lines().enumerate() {
        last = l;
        if let Ok(Line::Rule(r)) = line(l, "fuzz.policy", i + 1) {
            rules.push(*r);
        }
    }
    let mut sys = System::default();
    for (name, class) in [("dom0", "AdminVM"), ("work", "AppVM"), ("guivm", "AppVM"), ("dvm", "AppVM")] {
        let mut d = Domain {
            class: class.into(),
            running: name != "dvm",
            ..Domain::default()
        };
        d.tags.insert(name.into());
        d.template_for_dispvms = name == "dvm";
        sys.domains.insert(name.into(), d);
    }
    // The last line, split, is the request.
    let mut w = last.split_whitespace();
    let req = Request {
        service: w.next().unwrap_or("svc").into(),
        argument: format!("+{}", w.next().unwrap_or("")),
        source: w.next().unwrap_or("work").into(),
        target: w.next().unwrap_or("").into(),
    };
    if let Resolution::Allow { target, .. } = evaluate(&rules, &sys, &req) {
        assert_ne!(target, req.source);
    }
});
