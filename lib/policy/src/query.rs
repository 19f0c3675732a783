//! The policy daemon's socket (`/run/qubes/policy.sock`), as Qubes R4.2
//! speaks it (`qrexec_policy_daemon.py` `handle_client_connection`, and
//! `parse_policy_response` of `qrexec-daemon.c`):
//!
//! ```text
//! request:  source=work\nintended_target=guivm\nservice_and_arg=qubes.Echo+\n\n
//! allow:    user=DEFAULT\nresult=allow\ntarget=guivm\nautostart=True\nrequested_target=guivm
//! deny:     result=deny
//! ```
//!
//! then EOF. One parser and one renderer for each side: qrexec-daemon
//! renders queries and parses answers, the policy service the reverse.
//! Both sides treat the other's bytes as hostile and refuse anything
//! malformed: a query that does not parse gets no answer, an answer that
//! does not parse is a refusal.

use std::collections::BTreeMap;

/// The longest query or answer either side reads (the C daemon reads up
/// to 4096 bytes of answer; a query is three names of at most 65000).
pub const MAX_QUERY: usize = 3 * 65536;
pub const MAX_ANSWER: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("policy {what}: not ASCII text without NUL bytes")]
    NotText { what: &'static str },
    #[error("policy {what}: {len} bytes, over the limit of {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("policy {what}: line {line:?} is not key=value")]
    Line { what: &'static str, line: String },
    #[error("policy {what}: key {key:?} given twice")]
    Duplicate { what: &'static str, key: String },
    #[error("policy {what}: unknown key {key:?}")]
    Unknown { what: &'static str, key: String },
    #[error("policy {what}: {key} is missing")]
    Missing {
        what: &'static str,
        key: &'static str,
    },
    #[error("policy {what}: {key}={value:?} is not allowed")]
    Value {
        what: &'static str,
        key: &'static str,
        value: String,
    },
    #[error("policy query: no empty line at its end")]
    Unterminated,
}

/// What qrexec-daemon asks: may `source` call `service_and_arg` on
/// `intended_target` (as the caller wrote it, `@default` when empty)?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub source: String,
    pub intended_target: String,
    pub service_and_arg: String,
    /// Take an `ask` as the caller's choice of its own target.
    pub assume_yes_for_ask: bool,
    /// Only evaluate: `ask` is a refusal.
    pub just_evaluate: bool,
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Allow {
        /// `DEFAULT` when the rule names none.
        user: String,
        /// A VM's name, `dom0`, or `@dispvm:<template>`.
        target: String,
        autostart: bool,
        /// The caller's target as the policy read it (`@adminvm`,
        /// `@default`, a name).
        requested_target: String,
    },
    Deny,
}

/// `key=value` lines; an empty value is allowed, a line without `=` is
/// not, nor is a key twice.
fn lines<'a>(what: &'static str, text: &'a str) -> Result<BTreeMap<&'a str, &'a str>, QueryError> {
    let mut map = BTreeMap::new();
    for line in text.split('\n') {
        let Some((k, v)) = line.split_once('=') else {
            return Err(QueryError::Line {
                what,
                line: line.chars().take(80).collect(),
            });
        };
        if map.insert(k, v).is_some() {
            return Err(QueryError::Duplicate {
                what,
                key: k.to_owned(),
            });
        }
    }
    Ok(map)
}

fn text<'a>(what: &'static str, bytes: &'a [u8], max: usize) -> Result<&'a str, QueryError> {
    if bytes.len() > max {
        return Err(QueryError::TooLong {
            what,
            len: bytes.len(),
            max,
        });
    }
    if !bytes.is_ascii() || bytes.contains(&0) {
        return Err(QueryError::NotText { what });
    }
    // ASCII is UTF-8.
    std::str::from_utf8(bytes).map_err(|_| QueryError::NotText { what })
}

/// A value that goes on one line: no newline, and no `=`-less surprises
/// for the reader on the other side.
fn one_line(s: &str) -> bool {
    !s.contains('\n') && !s.contains('\0') && s.is_ascii()
}

fn yes_no(key: &'static str, v: Option<&&str>) -> Result<bool, QueryError> {
    match v.copied() {
        None | Some("no") => Ok(false),
        Some("yes") => Ok(true),
        Some(other) => Err(QueryError::Value {
            what: "query",
            key,
            value: other.to_owned(),
        }),
    }
}

impl Query {
    /// The query's bytes. Fields with a newline cannot be rendered (the
    /// daemon checks names before it asks); they are refused.
    pub fn render(&self) -> Result<Vec<u8>, QueryError> {
        for (key, v) in [
            ("source", &self.source),
            ("intended_target", &self.intended_target),
            ("service_and_arg", &self.service_and_arg),
        ] {
            if !one_line(v) {
                return Err(QueryError::Value {
                    what: "query",
                    key,
                    value: v.clone(),
                });
            }
        }
        let mut s = format!(
            "source={}\nintended_target={}\nservice_and_arg={}\n",
            self.source, self.intended_target, self.service_and_arg
        );
        if self.assume_yes_for_ask {
            s.push_str("assume_yes_for_ask=yes\n");
        }
        if self.just_evaluate {
            s.push_str("just_evaluate=yes\n");
        }
        s.push('\n');
        Ok(s.into_bytes())
    }

    /// Parses a whole query, its closing empty line included.
    pub fn parse(bytes: &[u8]) -> Result<Query, QueryError> {
        let t = text("query", bytes, MAX_QUERY)?;
        let body = t.strip_suffix("\n\n").ok_or(QueryError::Unterminated)?;
        let map = lines("query", body)?;
        for k in map.keys() {
            if !matches!(
                *k,
                "source"
                    | "intended_target"
                    | "service_and_arg"
                    | "assume_yes_for_ask"
                    | "just_evaluate"
            ) {
                return Err(QueryError::Unknown {
                    what: "query",
                    key: (*k).to_owned(),
                });
            }
        }
        let get = |key: &'static str| {
            map.get(key)
                .map(|v| (*v).to_owned())
                .ok_or(QueryError::Missing { what: "query", key })
        };
        Ok(Query {
            source: get("source")?,
            intended_target: get("intended_target")?,
            service_and_arg: get("service_and_arg")?,
            assume_yes_for_ask: yes_no("assume_yes_for_ask", map.get("assume_yes_for_ask"))?,
            just_evaluate: yes_no("just_evaluate", map.get("just_evaluate"))?,
        })
    }

    /// Where a query ends: the empty line after its last `key=value`.
    pub fn complete(buf: &[u8]) -> bool {
        buf.ends_with(b"\n\n")
    }
}

impl Answer {
    /// The answer's bytes, in R4.2's key order.
    pub fn render(&self) -> Result<Vec<u8>, QueryError> {
        match self {
            Answer::Deny => Ok(b"result=deny\n".to_vec()),
            Answer::Allow {
                user,
                target,
                autostart,
                requested_target,
            } => {
                for (key, v) in [
                    ("user", user),
                    ("target", target),
                    ("requested_target", requested_target),
                ] {
                    if !one_line(v) || v.is_empty() {
                        return Err(QueryError::Value {
                            what: "answer",
                            key,
                            value: v.clone(),
                        });
                    }
                }
                let autostart = if *autostart { "True" } else { "False" };
                Ok(format!(
                    "user={user}\nresult=allow\ntarget={target}\nautostart={autostart}\nrequested_target={requested_target}\n"
                )
                .into_bytes())
            }
        }
    }

    /// Parses a whole answer (everything up to EOF), as
    /// `parse_policy_response` does: one trailing newline is dropped, keys
    /// do not repeat, an allow carries user, target, autostart and
    /// requested_target and a deny none of them. Unknown keys are ignored
    /// (newer daemons add `target_uuid=`).
    pub fn parse(bytes: &[u8]) -> Result<Answer, QueryError> {
        const W: &str = "answer";
        let t = text(W, bytes, MAX_ANSWER)?;
        let t = t.strip_suffix('\n').unwrap_or(t);
        let map = lines(W, t)?;
        let fields = ["user", "target", "autostart", "requested_target"];
        match map.get("result").copied() {
            Some("deny") => {
                if let Some(k) = fields.iter().find(|k| map.contains_key(*k)) {
                    return Err(QueryError::Value {
                        what: W,
                        key: k,
                        value: "(with result=deny)".into(),
                    });
                }
                Ok(Answer::Deny)
            }
            Some("allow") => {
                let get = |key: &'static str| match map.get(key) {
                    Some(v) if !v.is_empty() => Ok((*v).to_owned()),
                    Some(_) => Err(QueryError::Value {
                        what: W,
                        key,
                        value: String::new(),
                    }),
                    None => Err(QueryError::Missing { what: W, key }),
                };
                let autostart = match get("autostart")?.as_str() {
                    "True" => true,
                    "False" => false,
                    other => {
                        return Err(QueryError::Value {
                            what: W,
                            key: "autostart",
                            value: other.to_owned(),
                        })
                    }
                };
                Ok(Answer::Allow {
                    user: get("user")?,
                    target: get("target")?,
                    autostart,
                    requested_target: get("requested_target")?,
                })
            }
            Some(other) => Err(QueryError::Value {
                what: W,
                key: "result",
                value: other.to_owned(),
            }),
            None => Err(QueryError::Missing {
                what: W,
                key: "result",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q() -> Query {
        Query {
            source: "work".into(),
            intended_target: "guivm".into(),
            service_and_arg: "qubes.Echo+".into(),
            assume_yes_for_ask: false,
            just_evaluate: false,
        }
    }

    #[test]
    fn query_bytes_are_qubes() {
        assert_eq!(
            q().render().unwrap(),
            b"source=work\nintended_target=guivm\nservice_and_arg=qubes.Echo+\n\n"
        );
        assert_eq!(Query::parse(&q().render().unwrap()).unwrap(), q());
        let mut flags = q();
        flags.just_evaluate = true;
        flags.assume_yes_for_ask = true;
        assert_eq!(Query::parse(&flags.render().unwrap()).unwrap(), flags);
    }

    #[test]
    fn bad_queries_are_refused() {
        for (bytes, want) in [
            (
                &b"source=a\nintended_target=b\n\n"[..],
                "service_and_arg is missing",
            ),
            (b"source=a\nsource=b\n\n", "given twice"),
            (
                b"source=a\nintended_target=b\nservice_and_arg=c\ndomain_id=3\n\n",
                "unknown key",
            ),
            (
                b"source=a\nintended_target=b\nservice_and_arg=c\njust_evaluate=1\n\n",
                "not allowed",
            ),
            (
                b"source=a\nintended_target=b\nservice_and_arg=c\n",
                "no empty line",
            ),
            (
                b"source=a\0\nintended_target=b\nservice_and_arg=c\n\n",
                "NUL",
            ),
            (
                b"source\nintended_target=b\nservice_and_arg=c\n\n",
                "not key=value",
            ),
        ] {
            let e = Query::parse(bytes).unwrap_err().to_string();
            assert!(e.contains(want), "{e} for {bytes:?}");
        }
        let mut nl = q();
        nl.source = "a\nresult=allow".into();
        assert!(nl.render().is_err());
    }

    #[test]
    fn answers_round_trip_and_match_r42() {
        let allow = Answer::Allow {
            user: "DEFAULT".into(),
            target: "guivm".into(),
            autostart: true,
            requested_target: "guivm".into(),
        };
        let bytes = allow.render().unwrap();
        assert_eq!(
            bytes,
            b"user=DEFAULT\nresult=allow\ntarget=guivm\nautostart=True\nrequested_target=guivm\n"
        );
        assert_eq!(Answer::parse(&bytes).unwrap(), allow);
        // R4.2 writes no trailing newline; newer daemons add target_uuid.
        assert_eq!(
            Answer::parse(b"user=DEFAULT\nresult=allow\ntarget=guivm\nautostart=True\nrequested_target=guivm\ntarget_uuid=uuid:x").unwrap(),
            allow
        );
        assert_eq!(Answer::parse(b"result=deny").unwrap(), Answer::Deny);
        assert_eq!(Answer::parse(b"result=deny\n").unwrap(), Answer::Deny);
    }

    #[test]
    fn bad_answers_are_refusals() {
        for bytes in [
            &b""[..],
            b"result=maybe",
            b"result=deny\ntarget=work",
            b"result=allow\ntarget=work",
            b"user=u\nresult=allow\ntarget=w\nautostart=yes\nrequested_target=w",
            b"user=u\nresult=allow\ntarget=\nautostart=True\nrequested_target=w",
            b"result=deny\nresult=allow",
            b"result=deny\n\n",
        ] {
            assert!(Answer::parse(bytes).is_err(), "{bytes:?}");
        }
        assert!(Answer::parse(&vec![b'a'; MAX_ANSWER + 1]).is_err());
    }
}
