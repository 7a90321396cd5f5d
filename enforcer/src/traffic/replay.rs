//! `policy replay`: every recorded request and connection judged again under a new policy.
//!
//! Time windows are judged at the record's time; rate limits are simulated over the
//! recorded timestamps (one limiter per agent, records in order). A request whose decision
//! hinges on what the audit does not keep (a body field, a header value, the query) is
//! undetermined, with the rule named. Only decisions the policy made are judged again: a
//! malformed request or a refused internal destination stays what it was.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;

use super::{Kind, Observed};
use crate::policy::{Decision, DecisionKind, Policy, RateLimiter, Request, Scheme};

/// Examples kept per transition.
pub const EXAMPLES: usize = 5;

/// One request or connection that changes.
#[derive(Debug, Clone, Serialize)]
pub struct Example {
    pub seq: u64,
    pub time: String,
    pub agent: String,
    /// `request` or `connection`.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    pub host: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub old_rule: Option<String>,
    pub new_rule: Option<String>,
    pub new_reason: String,
}

/// What changes from one result to another.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Transition {
    pub count: u64,
    /// How many under each new rule (`(none)` for the default).
    pub by_rule: BTreeMap<String, u64>,
    pub examples: Vec<Example>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    /// Records judged again.
    pub judged: u64,
    pub unchanged: u64,
    /// `"allow -> deny"` and the like.
    pub transitions: BTreeMap<String, Transition>,
    /// Requests whose new decision needs data the audit does not keep, by the rule that
    /// needs it.
    pub undetermined: BTreeMap<String, Transition>,
    /// Records not judged again: not a policy decision, or too old to hold what replay needs
    /// (written before records kept scheme and port).
    pub skipped: u64,
}

impl Report {
    pub fn changed(&self) -> bool {
        !self.transitions.is_empty() || !self.undetermined.is_empty()
    }
}

/// The result of a decision as replay compares them.
fn result_of(d: &Decision) -> &'static str {
    match d.kind {
        DecisionKind::Allow => "allow",
        DecisionKind::RateLimited => "rate_limited",
        DecisionKind::Ask => "ask",
        DecisionKind::Deny | DecisionKind::DefaultDeny => "deny",
    }
}

fn recorded_result(o: &Observed) -> &str {
    match o.result.as_str() {
        // What the policy said, even though dry run let it through.
        "would_deny" => "deny",
        r => r,
    }
}

/// Judges `records` (in order) under `policy`.
pub fn replay(policy: &Policy, records: &[Observed]) -> Report {
    let mut report = Report::default();
    let mut limiters: BTreeMap<String, RateLimiter> = BTreeMap::new();
    for o in records {
        if !matches!(o.kind, Kind::Request | Kind::Connection) {
            continue;
        }
        if !o.is_policy_decision() {
            report.skipped += o.count;
            continue;
        }
        let limiter = limiters.entry(o.agent.clone()).or_default();
        let outcome = match o.kind {
            Kind::Request => judge_request(policy, o, limiter),
            _ => judge_connection(policy, o),
        };
        let Some(outcome) = outcome else {
            report.skipped += o.count;
            continue;
        };
        report.judged += o.count;
        let example = |new_rule: Option<String>, new_reason: String| Example {
            seq: o.seq,
            time: o.time.to_string(),
            agent: o.agent.clone(),
            kind: if o.kind == Kind::Request {
                "request"
            } else {
                "connection"
            },
            method: o.method.clone(),
            host: o.host.clone().unwrap_or_default(),
            port: o.port,
            path: o.path.clone(),
            old_rule: o.rule.clone(),
            new_rule,
            new_reason,
        };
        let add = |t: &mut Transition, ex: Example| {
            t.count += o.count;
            *t.by_rule
                .entry(ex.new_rule.clone().unwrap_or_else(|| "(none)".into()))
                .or_default() += o.count;
            if t.examples.len() < EXAMPLES {
                t.examples.push(ex);
            }
        };
        match outcome {
            Outcome::Undetermined(rule) => {
                let why = format!("rule '{rule}' needs data the audit log does not keep");
                let t = report.undetermined.entry(rule.clone()).or_default();
                add(t, example(Some(rule), why));
            }
            Outcome::Decided(d) => {
                let (old, new) = (recorded_result(o), result_of(&d));
                if old == new {
                    report.unchanged += o.count;
                } else {
                    let t = report
                        .transitions
                        .entry(format!("{old} -> {new}"))
                        .or_default();
                    add(
                        t,
                        example(d.rule.as_deref().map(str::to_owned), d.reason.clone()),
                    );
                }
            }
        }
    }
    report
}

enum Outcome {
    Decided(Decision),
    Undetermined(String),
}

fn judge_request(policy: &Policy, o: &Observed, limiter: &RateLimiter) -> Option<Outcome> {
    let scheme = match o.scheme.as_deref()? {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => return None,
    };
    let host = o.host.as_deref()?;
    let port = o.port.unwrap_or(scheme.default_port());
    let path = o.path.as_deref().unwrap_or("/");
    let method = o.method.as_deref()?;
    // The names only: a header rule then knows whether the header was there.
    let mut headers = HeaderMap::new();
    for n in &o.header_names {
        if let Ok(name) = HeaderName::from_bytes(n.as_bytes()) {
            headers.append(name, HeaderValue::from_static(""));
        }
    }
    let req = Request {
        scheme,
        method,
        host,
        port,
        path_and_query: path,
        headers: &headers,
        body: None,
        body_truncated: false,
        now: o.time,
        exe: None,
    };
    if let Some(rule) = policy.unrecorded_dependency(&req) {
        return Some(Outcome::Undetermined(rule.to_string()));
    }
    Some(Outcome::Decided(policy.evaluate(&req, limiter)))
}

fn judge_connection(policy: &Policy, o: &Observed) -> Option<Outcome> {
    let host = o.host.as_deref()?;
    let port = o.port?;
    let d = match o.scheme.as_deref()? {
        "https" => policy.host_decision(Scheme::Https, host, port, o.time, None),
        "tcp" => policy
            .tcp_decision(&[host.to_owned()], port, None)
            .unwrap_or_else(|| policy.refusal(format!("no tcp rule allows {host}:{port}"))),
        _ => return None,
    };
    Some(Outcome::Decided(d))
}

/// The report as text: counts per transition, then examples grouped by rule.
pub fn render(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "judged {} recorded decisions: {} unchanged, {} changed, {} undetermined ({} not \
         judged: not policy decisions)",
        r.judged,
        r.unchanged,
        r.transitions.values().map(|t| t.count).sum::<u64>(),
        r.undetermined.values().map(|t| t.count).sum::<u64>(),
        r.skipped
    );
    for (what, t) in &r.transitions {
        let _ = writeln!(s, "\n{what}: {}", t.count);
        for (rule, n) in &t.by_rule {
            let _ = writeln!(s, "  rule {rule}: {n}");
        }
        for e in &t.examples {
            let _ = writeln!(s, "    {}", example_line(e));
        }
    }
    for (rule, t) in &r.undetermined {
        let _ = writeln!(
            s,
            "\nundetermined: {} (rule '{rule}' needs a body field, a header value or the \
             query, which the audit log does not keep)",
            t.count
        );
        for e in &t.examples {
            let _ = writeln!(s, "    {}", example_line(e));
        }
    }
    s
}

fn example_line(e: &Example) -> String {
    let target = match (&e.method, &e.path) {
        (Some(m), Some(p)) => format!("{m} {}{p}", e.host),
        _ => match e.port {
            Some(p) => format!("{} {}:{p}", e.kind, e.host),
            None => format!("{} {}", e.kind, e.host),
        },
    };
    format!(
        "#{} {} {target} (was {}, now {}: {})",
        e.seq,
        e.time,
        e.old_rule.as_deref().unwrap_or("no rule"),
        e.new_rule.as_deref().unwrap_or("no rule"),
        e.new_reason
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, secs: i64, method: &str, path: &str, reason: &str) -> Observed {
        Observed {
            seq,
            time: "2026-12-01T10:00:00Z".parse::<jiff::Timestamp>().unwrap()
                + jiff::SignedDuration::from_secs(secs),
            kind: Kind::Request,
            agent: "a".into(),
            result: if reason.starts_with("allowed") {
                "allow".into()
            } else {
                "deny".into()
            },
            rule: reason.split('\'').nth(1).map(str::to_owned),
            reason: reason.into(),
            scheme: Some("https".into()),
            method: Some(method.into()),
            host: Some("api.test".into()),
            port: Some(443),
            path: Some(path.into()),
            header_names: vec!["content-type".into()],
            dest: None,
            dns_name: None,
            count: 1,
        }
    }

    const NEW: &str = r#"
default: deny
rules:
  - name: reads
    allow: { method: GET, url: "api.test/v1/**" }
  - name: two-reads-a-minute
    limit: { calls_per_minute: 2, url: "api.test/v1/**" }
  - name: small-charges
    allow: { method: POST, url: "api.test/v1/charges" }
    body: { jsonpath: "$.amount", max: 100 }
  - name: versioned
    allow: { method: PUT, url: "api.test/v1/items/*", headers: { x-api-version: "2024-*" } }
"#;

    #[test]
    fn a_tightened_policy_reports_each_change_and_what_it_cannot_tell() {
        let p = Policy::from_yaml(NEW.as_bytes(), "new").unwrap();
        let old = "allowed by rule 'everything'";
        let records = vec![
            rec(1, 0, "GET", "/v1/items", old),
            rec(2, 1, "DELETE", "/v1/items/1", old),
            rec(3, 2, "POST", "/v1/charges", old),
            // The header the rule needs was not sent: surely not allowed by it.
            rec(4, 3, "PUT", "/v1/items/1", old),
            rec(5, 4, "GET", "/v1/items", old),
            // The third GET within a minute.
            rec(6, 5, "GET", "/v1/items", old),
            // Not a policy decision: not judged again.
            rec(7, 6, "GET", "/x", "malformed request: no Host header"),
        ];
        let r = replay(&p, &records);
        assert_eq!(r.judged, 6);
        assert_eq!(r.skipped, 1);
        assert_eq!(r.unchanged, 2, "{r:#?}");
        let deny = &r.transitions["allow -> deny"];
        assert_eq!(deny.count, 2, "{r:#?}");
        assert_eq!(deny.by_rule.get("(none)"), Some(&2));
        assert_eq!(r.transitions["allow -> rate_limited"].count, 1);
        assert_eq!(
            r.transitions["allow -> rate_limited"]
                .by_rule
                .get("two-reads-a-minute"),
            Some(&1)
        );
        let undetermined = &r.undetermined["small-charges"];
        assert_eq!(undetermined.count, 1);
        assert_eq!(undetermined.examples[0].seq, 3);
        assert!(r.changed());
        let text = render(&r);
        assert!(text.contains("allow -> deny: 2"), "{text}");
        assert!(
            text.contains("undetermined: 1 (rule 'small-charges'"),
            "{text}"
        );
        // The same records under the policy that allowed them: nothing changes.
        let same = Policy::from_yaml(
            b"rules:\n  - name: everything\n    allow: { url: \"api.test/**\" }\n",
            "old",
        )
        .unwrap();
        let r = replay(&same, &records);
        assert!(!r.changed(), "{r:#?}");
    }

    #[test]
    fn a_header_that_was_sent_leaves_its_rule_undetermined() {
        let p = Policy::from_yaml(NEW.as_bytes(), "new").unwrap();
        let mut put = rec(1, 0, "PUT", "/v1/items/1", "allowed by rule 'x'");
        put.header_names.push("x-api-version".into());
        let r = replay(&p, &[put]);
        assert_eq!(r.undetermined["versioned"].count, 1, "{r:#?}");
    }

    #[test]
    fn time_windows_are_judged_at_the_records_time() {
        let p = Policy::from_yaml(
            b"rules:\n  - name: office\n    allow: { url: \"api.test/**\", time_inside: \"09:00-17:00\" }\n",
            "w",
        )
        .unwrap();
        let mut night = rec(1, 0, "GET", "/v1", "allowed by rule 'x'");
        night.time = "2026-12-01T23:00:00Z".parse().unwrap();
        let day = rec(2, 0, "GET", "/v1", "allowed by rule 'x'");
        let r = replay(&p, &[night, day]);
        assert_eq!(r.unchanged, 1);
        assert_eq!(r.transitions["allow -> deny"].examples[0].seq, 1);
    }
}
