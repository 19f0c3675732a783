//! Deciding a call (`Request.evaluate`, `Allow`, `Deny`, `Ask` and
//! `collect_targets_for_ask` of R4.2's parser): the first rule whose
//! service, argument, source and target match decides; no match denies.
//!
//! Two places where R4.2's code and its documentation disagree follow the
//! documentation, which is the stricter reading: `@anyvm` as a source does
//! not match dom0, and an `ask` whose `default_target` is not among the
//! targets offered has no default (R4.2 fails an assertion and answers
//! nothing).

use std::collections::{BTreeMap, BTreeSet};

use crate::parse::{Action, Place, Rule, Token};

/// dom0's name in requests and results.
pub const DOM0: &str = "dom0";

/// What the policy knows of one domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Domain {
    /// Its Qubes class: `AppVM`, `TemplateVM`, `StandaloneVM`, `DispVM`,
    /// `AdminVM`.
    pub class: String,
    pub tags: BTreeSet<String>,
    pub running: bool,
    /// The template its `@dispvm` calls use.
    pub default_dispvm: Option<String>,
    /// Whether disposable VMs can be made from it.
    pub template_for_dispvms: bool,
}

/// Every domain by name, dom0 (`AdminVM`) included.
#[derive(Debug, Clone, Default)]
pub struct System {
    pub domains: BTreeMap<String, Domain>,
}

/// A call to decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub service: String,
    /// `+` for none, else `+<argument>`.
    pub argument: String,
    pub source: String,
    /// What the caller asked for, as it sent it (empty: `@default`).
    pub target: String,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Allow {
        /// A VM name, `dom0`, or `@dispvm:<template>`.
        target: String,
        user: Option<String>,
        autostart: bool,
        notify: bool,
        /// `file:line` of the rule.
        rule: String,
    },
    /// Ask the user (the GUI VM's `policy.Ask`), offering `targets`.
    Ask {
        targets: Vec<String>,
        default_target: Option<String>,
        user: Option<String>,
        autostart: bool,
        notify: bool,
        rule: String,
    },
    Deny {
        reason: String,
        notify: bool,
    },
}

fn deny(reason: String, notify: bool) -> Resolution {
    Resolution::Deny { reason, notify }
}

impl System {
    fn has(&self, name: &str) -> bool {
        self.domains.contains_key(name)
    }

    fn is_template(&self, name: &str) -> bool {
        self.domains
            .get(name)
            .is_some_and(|d| d.template_for_dispvms)
    }

    /// The caller's target as the policy reads it (`requested_target` of
    /// an answer): `@adminvm` for dom0, `@default` for a name that does
    /// not exist.
    pub fn requested_target(&self, raw: &str) -> Result<String, String> {
        self.intended(raw).map(|t| t.to_string())
    }

    /// The request's target as a token (`IntendedTarget.verify`).
    fn intended(&self, raw: &str) -> Result<Token, String> {
        if raw.is_empty() {
            return Ok(Token::Default);
        }
        match Token::parse(raw, Place::Intended)? {
            // A target that does not exist is `@default` (with a warning in
            // Qubes), so nobody learns which names exist.
            Token::Name(n) if !self.has(&n) => Ok(Token::Default),
            Token::DispVmOf(t) if !self.is_template(&t) => {
                Err(format!("not a template for dispvm: {t}"))
            }
            t => Ok(t),
        }
    }

    /// Whether the domain `name` is one that `t` (`@type:`, `@tag:`,
    /// `@dispvm:@tag:`) picks out; the one place these tokens are read.
    fn selects(&self, t: &Token, name: &str) -> bool {
        self.domains.get(name).is_some_and(|d| match t {
            Token::Type(ty) => &d.class == ty,
            Token::Tag(tag) => d.tags.contains(tag),
            Token::DispVmTag(tag) => d.template_for_dispvms && d.tags.contains(tag),
            _ => false,
        })
    }

    /// Every domain `t` picks out (see [`System::selects`]).
    fn selected<'a>(&'a self, t: &'a Token) -> impl Iterator<Item = &'a str> + 'a {
        self.domains
            .keys()
            .filter(move |n| self.selects(t, n))
            .map(String::as_str)
    }

    fn source_matches(&self, t: &Token, source: &str) -> bool {
        match t {
            Token::Wildcard => true,
            Token::AnyVm => source != DOM0,
            Token::AdminVm => source == DOM0,
            Token::Name(n) => n == source,
            Token::Type(_) | Token::Tag(_) => self.selects(t, source),
            // Not sources in R4.2's matching: never match.
            Token::DispVmOf(_) | Token::DispVmTag(_) | Token::DispVm | Token::Default => false,
        }
    }

    fn dispvm_base(&self, source: &str) -> Option<&str> {
        self.domains
            .get(source)
            .and_then(|d| d.default_dispvm.as_deref())
    }

    fn target_matches(&self, t: &Token, intended: &Token, source: &str) -> bool {
        match t {
            Token::Wildcard => true,
            Token::AnyVm => *intended != Token::AdminVm,
            Token::Type(_) | Token::Tag(_) => {
                matches!(intended, Token::Name(n) if self.selects(t, n))
            }
            Token::DispVmOf(x) => {
                intended == t || (*intended == Token::DispVm && self.dispvm_base(source) == Some(x))
            }
            Token::DispVmTag(_) => {
                let base = match intended {
                    Token::DispVmOf(x) => Some(x.as_str()),
                    Token::DispVm => self.dispvm_base(source),
                    _ => None,
                };
                base.is_some_and(|b| self.selects(t, b))
            }
            other => other == intended,
        }
    }

    /// What a token stands for, as offered targets (`expand`).
    fn expand(&self, t: &Token, out: &mut BTreeSet<String>) {
        let vms = || self.domains.iter().filter(|(_, d)| d.class != "AdminVM");
        let dispvms = |out: &mut BTreeSet<String>| {
            for (n, d) in &self.domains {
                if d.template_for_dispvms {
                    out.insert(format!("@dispvm:{n}"));
                }
            }
            out.insert("@dispvm".into());
        };
        match t {
            Token::Name(n) if self.has(n) => {
                out.insert(n.clone());
            }
            Token::Name(_) | Token::Default => {}
            Token::AdminVm => {
                out.insert(DOM0.into());
            }
            Token::AnyVm => {
                out.extend(vms().map(|(n, _)| n.clone()));
                dispvms(out);
            }
            Token::Wildcard => {
                out.extend(self.domains.keys().cloned());
                dispvms(out);
            }
            Token::Type(_) | Token::Tag(_) => {
                out.extend(self.selected(t).map(str::to_owned));
            }
            Token::DispVm => {
                out.insert("@dispvm".into());
            }
            Token::DispVmOf(x) if self.is_template(x) => {
                out.insert(format!("@dispvm:{x}"));
            }
            Token::DispVmOf(_) => {}
            Token::DispVmTag(_) => out.extend(self.selected(t).map(|n| format!("@dispvm:{n}"))),
        }
    }

    fn may_skip_autostart(&self, target: &str) -> bool {
        target == DOM0
            || (!target.starts_with("@dispvm")
                && self.domains.get(target).is_some_and(|d| d.running))
    }
}

fn rule_at(r: &Rule) -> String {
    format!("{}:{}", r.file, r.line)
}

fn head_matches(r: &Rule, req: &Request) -> bool {
    r.service.as_deref().is_none_or(|s| s == req.service)
        && r.argument.as_deref().is_none_or(|a| a == req.argument)
}

/// Decides `req` by `rules` (in order) against `sys`.
pub fn evaluate(rules: &[Rule], sys: &System, req: &Request) -> Resolution {
    let intended = match sys.intended(&req.target) {
        Ok(t) => t,
        Err(reason) => return deny(reason, true),
    };
    let Some(rule) = rules.iter().find(|r| {
        head_matches(r, req)
            && sys.source_matches(&r.source, &req.source)
            && sys.target_matches(&r.target, &intended, &req.source)
    }) else {
        return deny("no matching rule found".into(), true);
    };
    let at = rule_at(rule);
    match &rule.action {
        Action::Deny { notify } => deny(format!("denied by policy {at}"), *notify),
        Action::Allow {
            target,
            user,
            notify,
            autostart,
        } => {
            let chosen = match target {
                // A redirect is checked like a caller's target.
                Some(t) => match sys.intended(&t.to_string()) {
                    Ok(t) => t,
                    Err(reason) => return deny(reason, *notify),
                },
                None => intended,
            };
            let target = match chosen {
                Token::Default => {
                    return deny(
                        format!("policy define 'allow' action at {at} but no target is specified by caller or policy"),
                        *notify,
                    )
                }
                Token::DispVm => match sys.dispvm_base(&req.source) {
                    Some(b) => format!("@dispvm:{b}"),
                    None => {
                        return deny(
                            format!("policy define 'allow' action to @dispvm at {at} but no DispVM base is set for this VM"),
                            *notify,
                        )
                    }
                },
                Token::AdminVm => DOM0.to_owned(),
                other => other.to_string(),
            };
            if !autostart && !sys.may_skip_autostart(&target) {
                return deny(
                    format!("target {target} is denied because it would require autostart"),
                    *notify,
                );
            }
            if target == req.source {
                return deny("loopback qrexec connection not supported".into(), *notify);
            }
            Resolution::Allow {
                target,
                user: user.clone(),
                autostart: *autostart,
                notify: *notify,
                rule: at,
            }
        }
        Action::Ask {
            target,
            default_target,
            user,
            notify,
            autostart,
        } => {
            let mut targets = BTreeSet::new();
            match target {
                Some(t) => sys.expand(t, &mut targets),
                None => {
                    // Later rules first, so that earlier ones win: a deny
                    // takes away what a later allow or ask offered.
                    for r in rules.iter().rev() {
                        if !head_matches(r, req) || !sys.source_matches(&r.source, &req.source) {
                            continue;
                        }
                        let t = match &r.action {
                            Action::Allow {
                                target: Some(t), ..
                            }
                            | Action::Ask {
                                target: Some(t), ..
                            } => t,
                            _ => &r.target,
                        };
                        let mut set = BTreeSet::new();
                        sys.expand(t, &mut set);
                        if matches!(r.action, Action::Deny { .. }) {
                            targets.retain(|x| !set.contains(x));
                        } else {
                            targets.extend(set);
                        }
                    }
                }
            }
            let base = sys.dispvm_base(&req.source).map(|b| format!("@dispvm:{b}"));
            let mut offered: BTreeSet<String> = targets
                .into_iter()
                .filter_map(|t| {
                    if t == "@dispvm" {
                        base.clone()
                    } else {
                        Some(t)
                    }
                })
                .filter(|t| *t != req.source)
                .collect();
            if !autostart {
                offered.retain(|t| sys.may_skip_autostart(t));
            }
            if offered.is_empty() {
                return deny(
                    format!("policy define 'ask' action at {at} but no target is available to choose from"),
                    *notify,
                );
            }
            let default_target = default_target
                .as_ref()
                .and_then(|t| match t {
                    Token::DispVm => base.clone(),
                    Token::AdminVm => Some(DOM0.to_owned()),
                    other => Some(other.to_string()),
                })
                .filter(|t| offered.contains(t));
            Resolution::Ask {
                targets: offered.into_iter().collect(),
                default_target,
                user: user.clone(),
                autostart: *autostart,
                notify: *notify,
                rule: at,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{line, Line};

    fn rules(text: &str) -> Vec<Rule> {
        text.lines()
            .enumerate()
            .filter_map(|(i, l)| match line(l, "t.policy", i + 1).unwrap() {
                Line::Rule(r) => Some(*r),
                _ => None,
            })
            .collect()
    }

    fn system() -> System {
        let mut s = System::default();
        let d = |class: &str, tags: &[&str], running: bool| Domain {
            class: class.into(),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            running,
            ..Domain::default()
        };
        s.domains.insert("dom0".into(), d("AdminVM", &[], true));
        s.domains
            .insert("guivm".into(), d("AppVM", &["guivm"], true));
        s.domains.insert("work".into(), d("AppVM", &["work"], true));
        s.domains.insert("vault".into(), d("AppVM", &[], false));
        let mut dvm = d("AppVM", &["dvm"], false);
        dvm.template_for_dispvms = true;
        s.domains.insert("default-dvm".into(), dvm);
        s.domains.get_mut("work").unwrap().default_dispvm = Some("default-dvm".into());
        s
    }

    fn req(service: &str, arg: &str, source: &str, target: &str) -> Request {
        Request {
            service: service.into(),
            argument: arg.into(),
            source: source.into(),
            target: target.into(),
        }
    }

    #[test]
    fn first_match_wins_and_no_match_denies() {
        let r = rules(
            "admin.vm.List * guivm @adminvm allow\n\
             admin.vm.List * @anyvm @adminvm deny notify=no\n\
             * * @anyvm @anyvm deny\n",
        );
        let s = system();
        assert!(matches!(
            evaluate(&r, &s, &req("admin.vm.List", "+", "guivm", "dom0")),
            Resolution::Allow { ref target, .. } if target == "dom0"
        ));
        assert_eq!(
            evaluate(&r, &s, &req("admin.vm.List", "+", "work", "@adminvm")),
            Resolution::Deny {
                reason: "denied by policy t.policy:2".into(),
                notify: false
            }
        );
        assert!(matches!(
            evaluate(&r, &s, &req("qubes.Gpg", "+", "work", "dom0")),
            Resolution::Deny { ref reason, notify: true } if reason == "no matching rule found"
        ));
    }

    #[test]
    fn arguments_tags_types_redirects_and_defaults() {
        let s = system();
        let r = rules(
            "test.Svc +only @tag:work @type:AppVM allow\n\
             test.Svc + work @default allow target=guivm\n\
             test.Loop * work work allow\n\
             test.Dvm * work @dispvm allow\n\
             test.Sleepy * work vault allow autostart=no\n",
        );
        assert!(matches!(
            evaluate(&r, &s, &req("test.Svc", "+only", "work", "guivm")),
            Resolution::Allow { .. }
        ));
        // `+` matches only the empty argument.
        assert!(matches!(
            evaluate(&r, &s, &req("test.Svc", "+other", "work", "guivm")),
            Resolution::Deny { .. }
        ));
        // A target that does not exist is @default, which the redirect serves.
        assert!(matches!(
            evaluate(&r, &s, &req("test.Svc", "+", "work", "no-such-vm")),
            Resolution::Allow { ref target, .. } if target == "guivm"
        ));
        assert!(matches!(
            evaluate(&r, &s, &req("test.Loop", "+", "work", "work")),
            Resolution::Deny { ref reason, .. } if reason.contains("loopback")
        ));
        assert!(matches!(
            evaluate(&r, &s, &req("test.Dvm", "+", "work", "@dispvm")),
            Resolution::Allow { ref target, .. } if target == "@dispvm:default-dvm"
        ));
        assert!(matches!(
            evaluate(&r, &s, &req("test.Sleepy", "+", "work", "vault")),
            Resolution::Deny { ref reason, .. } if reason.contains("autostart")
        ));
        // @anyvm as a source is not dom0; a bad intended target is denied.
        let any = rules("* * @anyvm @anyvm allow\n");
        assert!(matches!(
            evaluate(&any, &s, &req("x", "+", "dom0", "work")),
            Resolution::Deny { .. }
        ));
        assert!(matches!(
            evaluate(&any, &s, &req("x", "+", "work", "@anyvm")),
            Resolution::Deny { .. }
        ));
        assert!(matches!(
            evaluate(&any, &s, &req("x", "+", "work", "dom0")),
            Resolution::Deny { .. }
        ));
    }

    #[test]
    fn ask_offers_what_the_rules_allow_minus_what_they_deny() {
        let s = system();
        let r = rules(
            "qubes.Filecopy * work vault deny\n\
             qubes.Filecopy * work @anyvm ask default_target=guivm\n\
             qubes.Open * work @anyvm ask default_target=nope\n",
        );
        let Resolution::Ask {
            targets,
            default_target,
            ..
        } = evaluate(&r, &s, &req("qubes.Filecopy", "+", "work", "@default"))
        else {
            panic!()
        };
        assert_eq!(targets, ["@dispvm:default-dvm", "default-dvm", "guivm"]);
        assert_eq!(default_target.as_deref(), Some("guivm"));
        let Resolution::Ask { default_target, .. } =
            evaluate(&r, &s, &req("qubes.Open", "+", "work", ""))
        else {
            panic!()
        };
        assert_eq!(
            default_target, None,
            "a default that is not offered is dropped"
        );
    }
}
