//! The lines of a policy file (`Rule.from_line` and `VMToken` in
//! core-qrexec's `qrexec/policy/parser.py`, R4.2).
//!
//! ```text
//! # comment
//! !include other.policy
//! !include-dir dir
//! qubes.Filecopy  *   work   @anyvm   ask default_target=vault
//! admin.vm.List   +   guivm  @adminvm allow
//! ```

use std::fmt;

/// `RPCNAME_ALLOWED_CHARSET`: `[A-Za-z0-9+-._]`.
pub fn rpcname_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "+-._".contains(c)
}

/// A source or target token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// `*`: anything, dom0 included.
    Wildcard,
    /// `@adminvm` (also written `dom0`).
    AdminVm,
    /// `@anyvm`: anything but dom0.
    AnyVm,
    /// `@default`: the caller named no target.
    Default,
    /// `@dispvm`: a new disposable VM from the caller's default template.
    DispVm,
    /// `@dispvm:<template>`.
    DispVmOf(String),
    /// `@dispvm:@tag:<tag>`: a disposable VM from any template with the tag.
    DispVmTag(String),
    /// `@tag:<tag>`.
    Tag(String),
    /// `@type:<type>` (`AppVM`, `TemplateVM`, `AdminVM`, ...).
    Type(String),
    /// A VM's name.
    Name(String),
}

/// Where a token stands; each place allows some tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Source,
    Target,
    /// `target=` and `default_target=`.
    Redirect,
    /// The target a caller asked for.
    Intended,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Place::Source => "source",
            Place::Target => "target",
            Place::Redirect => "redirect",
            Place::Intended => "intendedtarget",
        })
    }
}

type MakeToken = fn(String) -> Token;

/// The tokens with a value after their keyword.
const PREFIXED: [(&str, MakeToken); 4] = [
    ("@type:", Token::Type),
    ("@tag:", Token::Tag),
    ("@dispvm:@tag:", Token::DispVmTag),
    ("@dispvm:", Token::DispVmOf),
];

impl Token {
    /// Parses a token for `place`, with the tables of R4.2's `VMToken`
    /// classes: what a place does not allow is an error.
    pub fn parse(s: &str, place: Place) -> Result<Token, String> {
        let s = if s == "dom0" { "@adminvm" } else { s };
        let invalid = || format!("invalid {place} token: {s:?}");
        let empty = |prefix: &str| format!("invalid empty {prefix} token: {s:?}");
        let t = match s {
            "*" => Token::Wildcard,
            "@adminvm" => Token::AdminVm,
            "@anyvm" => Token::AnyVm,
            "@default" => Token::Default,
            "@dispvm" => Token::DispVm,
            _ => {
                // Longest prefix first: `@dispvm:@tag:` before `@dispvm:`.
                let prefixed = PREFIXED
                    .iter()
                    .find_map(|(prefix, make)| s.strip_prefix(prefix).map(|v| (*prefix, v, make)));
                match prefixed {
                    Some((prefix, "", _)) => return Err(empty(prefix)),
                    // A template's name, not another keyword.
                    Some(("@dispvm:", v, _)) if v.starts_with('@') => return Err(invalid()),
                    Some((_, v, make)) => make(v.to_owned()),
                    None if s.starts_with('@') || s.is_empty() => return Err(invalid()),
                    None => Token::Name(s.to_owned()),
                }
            }
        };
        let allowed = match (&t, place) {
            (Token::Name(_) | Token::AdminVm | Token::DispVmOf(_), _) => true,
            (
                Token::AnyVm
                | Token::Wildcard
                | Token::Tag(_)
                | Token::Type(_)
                | Token::DispVmTag(_),
                p,
            ) => {
                matches!(p, Place::Source | Place::Target)
            }
            (Token::Default, p) => matches!(p, Place::Target | Place::Intended),
            (Token::DispVm, p) => p != Place::Source,
        };
        if !allowed {
            return Err(invalid());
        }
        Ok(t)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Wildcard => f.write_str("*"),
            Token::AdminVm => f.write_str("@adminvm"),
            Token::AnyVm => f.write_str("@anyvm"),
            Token::Default => f.write_str("@default"),
            Token::DispVm => f.write_str("@dispvm"),
            Token::DispVmOf(t) => write!(f, "@dispvm:{t}"),
            Token::DispVmTag(t) => write!(f, "@dispvm:@tag:{t}"),
            Token::Tag(t) => write!(f, "@tag:{t}"),
            Token::Type(t) => write!(f, "@type:{t}"),
            Token::Name(n) => f.write_str(n),
        }
    }
}

/// What a matching rule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Allow {
        target: Option<Token>,
        user: Option<String>,
        notify: bool,
        autostart: bool,
    },
    Deny {
        notify: bool,
    },
    Ask {
        target: Option<Token>,
        default_target: Option<Token>,
        user: Option<String>,
        notify: bool,
        autostart: bool,
    },
}

/// One rule, with where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `None`: `*`.
    pub service: Option<String>,
    /// `None`: `*`; `Some("+")` is the empty argument.
    pub argument: Option<String>,
    pub source: Token,
    pub target: Token,
    pub action: Action,
    pub file: String,
    pub line: usize,
}

/// What a line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Blank,
    Rule(Box<Rule>),
    Include(String),
    IncludeDir(String),
}

/// `service` and `argument` as `validate_service_and_argument` checks
/// them.
pub fn service_and_argument(
    service: &str,
    argument: &str,
) -> Result<(Option<String>, Option<String>), String> {
    let service = if service == "*" {
        None
    } else {
        if let Some(bad) = service.chars().find(|c| !rpcname_char(*c) || *c == '+') {
            return Err(format!(
                "service {service:?} contains invalid character {bad:?}"
            ));
        }
        Some(service.to_owned())
    };
    let argument = if argument == "*" {
        None
    } else {
        if let Some(bad) = argument.chars().find(|c| !rpcname_char(*c)) {
            return Err(format!(
                "argument {argument:?} contains invalid character {bad:?}"
            ));
        }
        if !argument.starts_with('+') {
            return Err(format!("argument {argument:?} does not start with +"));
        }
        Some(argument.to_owned())
    };
    if service.is_none() && argument.is_some() {
        return Err("only * argument allowed for * service".into());
    }
    Ok((service, argument))
}

fn yes_no(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => Err(format!("{key:?} is {v:?}, but can be only 'yes' or 'no'")),
    }
}

/// Parses one line of `file` (1-based `line`).
pub fn line(text: &str, file: &str, line: usize) -> Result<Line, String> {
    let text = text.trim();
    if text.is_empty() || text.starts_with('#') {
        return Ok(Line::Blank);
    }
    let fields: Vec<&str> = text.split_whitespace().collect();
    if let Some(directive) = fields[0].strip_prefix('!') {
        return match (directive, &fields[1..]) {
            ("include", [p]) => Ok(Line::Include((*p).to_owned())),
            ("include-dir", [p]) => Ok(Line::IncludeDir((*p).to_owned())),
            ("include" | "include-dir", _) => Err("invalid number of params".into()),
            ("include-service" | "compat-4.0", _) => Err(format!(
                "!{directive} (the Qubes 4.0 policy format) is not supported here"
            )),
            _ => Err("invalid directive".into()),
        };
    }
    let [service, argument, source, target, action, params @ ..] = fields.as_slice() else {
        return Err("wrong number of fields".into());
    };
    let (service, argument) = service_and_argument(service, argument)?;
    let source = Token::parse(source, Place::Source)?;
    let target = Token::parse(target, Place::Target)?;
    let mut kv: Vec<(&str, &str)> = Vec::new();
    for p in params {
        let Some((k, v)) = p.split_once('=') else {
            return Err(format!("invalid action parameter syntax: {p:?}"));
        };
        if kv.iter().any(|(seen, _)| *seen == k) {
            return Err(format!("parameter given twice: {k:?}"));
        }
        kv.push((k, v));
    }
    let get = |k: &str| kv.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
    let allowed: &[&str] = match *action {
        "allow" => &["target", "user", "notify", "autostart"],
        "deny" => &["notify"],
        "ask" => &["target", "default_target", "user", "notify", "autostart"],
        other => return Err(format!("invalid action: {other}")),
    };
    if let Some((k, _)) = kv.iter().find(|(k, _)| !allowed.contains(k)) {
        return Err(format!("invalid parameter {k:?} for action {action}"));
    }
    let redirect = |k: &str| get(k).map(|v| Token::parse(v, Place::Redirect)).transpose();
    let flag = |k: &str, default: bool| get(k).map_or(Ok(default), |v| yes_no(k, v));
    let user = get("user").map(str::to_owned);
    let action = match *action {
        "allow" => Action::Allow {
            target: redirect("target")?,
            user,
            notify: flag("notify", false)?,
            autostart: flag("autostart", true)?,
        },
        "deny" => Action::Deny {
            notify: flag("notify", true)?,
        },
        _ => Action::Ask {
            target: redirect("target")?,
            default_target: redirect("default_target")?,
            user,
            notify: flag("notify", false)?,
            autostart: flag("autostart", true)?,
        },
    };
    if target == Token::Default && matches!(action, Action::Allow { target: None, .. }) {
        return Err("allow action for @default rule must specify target= option".into());
    }
    Ok(Line::Rule(Box::new(Rule {
        service,
        argument,
        source,
        target,
        action,
        file: file.to_owned(),
        line,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Rule {
        match line(s, "t.policy", 1).unwrap() {
            Line::Rule(r) => *r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rules_directives_and_comments() {
        let r = rule("qubes.Filecopy * work @anyvm ask default_target=vault notify=yes");
        assert_eq!(r.service.as_deref(), Some("qubes.Filecopy"));
        assert_eq!(r.argument, None);
        assert_eq!(r.source, Token::Name("work".into()));
        assert_eq!(r.target, Token::AnyVm);
        assert_eq!(
            r.action,
            Action::Ask {
                target: None,
                default_target: Some(Token::Name("vault".into())),
                user: None,
                notify: true,
                autostart: true
            }
        );
        let r = rule("admin.vm.List + guivm dom0 allow user=root autostart=no");
        assert_eq!(r.target, Token::AdminVm);
        assert_eq!(r.argument.as_deref(), Some("+"));
        assert!(matches!(
            r.action,
            Action::Allow {
                autostart: false,
                ..
            }
        ));
        assert!(matches!(
            rule("* * @anyvm @anyvm deny").action,
            Action::Deny { notify: true }
        ));
        assert_eq!(line("  # x", "f", 1).unwrap(), Line::Blank);
        assert_eq!(line("", "f", 1).unwrap(), Line::Blank);
        assert_eq!(
            line("!include a.policy", "f", 1).unwrap(),
            Line::Include("a.policy".into())
        );
        assert_eq!(
            line("!include-dir d", "f", 1).unwrap(),
            Line::IncludeDir("d".into())
        );
    }

    #[test]
    fn malformed_lines_say_why() {
        for (text, why) in [
            ("a b c d", "wrong number of fields"),
            ("svc/x * a b allow", "invalid character"),
            ("svc arg a b allow", "does not start with +"),
            ("* +x a b allow", "only * argument"),
            ("svc * @default b allow", "invalid source token"),
            ("svc * a @nope allow", "invalid target token"),
            ("svc * a b permit", "invalid action"),
            ("svc * a b allow # c", "invalid action parameter syntax"),
            ("svc * a b allow notify=maybe", "only 'yes' or 'no'"),
            ("svc * a b deny target=x", "invalid parameter"),
            ("svc * a b allow target=@anyvm", "invalid redirect token"),
            ("svc * a b allow user=x user=y", "given twice"),
            ("svc * a @default allow", "must specify target="),
            ("!include", "invalid number of params"),
            ("!compat-4.0", "not supported"),
            ("!frobnicate x", "invalid directive"),
            ("svc * @tag: b allow", "invalid empty @tag: token"),
        ] {
            let e = line(text, "f", 3).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }
}
