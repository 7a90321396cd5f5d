//! `query:` constraints, `query: none`, and query parameters judged as the body fields they
//! are named like: the query string cannot side-step a body rule.

mod common;

use common::{kind_rule, policy, req};
use enforcer::policy::{DecisionKind, Policy};

const PAY: &str = r#"
default: deny
rules:
  - name: small-payments
    allow: { method: POST, url: "api.pay.test/pay" }
    body: { jsonpath: "$.amount", max: 100 }
  - name: search
    allow: { method: GET, url: "api.pay.test/search" }
    query:
      - { param: limit, max: 50 }
      - { param: sort, in: [asc, desc] }
  - name: plain-status
    allow: { method: GET, url: "api.pay.test/status" }
    query: none
  - name: no-admin-scope
    deny: { url: "api.pay.test/*" }
    query: { param: scope, eq: admin }
"#;

fn check(p: &Policy, method: &str, target: &str, body: Option<&str>) -> (DecisionKind, String) {
    let mut r = req(method, &format!("https://api.pay.test{target}"));
    if let Some(b) = body {
        r = r.json(b);
    }
    let d = r.check(p);
    (d.kind, d.reason)
}

#[test]
fn a_query_parameter_named_like_a_constrained_field_is_judged_as_that_field() {
    let p = policy(PAY);
    // The attack: the body says 50, the query says 5000.
    let (kind, reason) = check(&p, "POST", "/pay?amount=5000", Some(r#"{"amount": 50}"#));
    assert_eq!(kind, DecisionKind::DefaultDeny, "{reason}");
    assert!(
        reason.contains("$.amount <= 100, got \"5000\" in the query string"),
        "{reason}"
    );
    // Repeated parameters count as several values: one bad one is enough.
    let (kind, _) = check(
        &p,
        "POST",
        "/pay?amount=5&amount=5000",
        Some(r#"{"amount": 50}"#),
    );
    assert_eq!(kind, DecisionKind::DefaultDeny);
    // The legitimate uses: no query, an unrelated parameter, the same value in both.
    for target in ["/pay", "/pay?idempotency=abc", "/pay?amount=50"] {
        let (kind, reason) = check(&p, "POST", target, Some(r#"{"amount": 50}"#));
        assert_eq!(kind, DecisionKind::Allow, "{target}: {reason}");
    }
}

#[test]
fn query_constraints_take_the_body_operators_with_repeated_values() {
    let p = policy(PAY);
    for (target, kind) in [
        ("/search?limit=10&sort=asc", DecisionKind::Allow),
        ("/search?limit=10", DecisionKind::DefaultDeny), // sort missing
        ("/search?limit=500&sort=asc", DecisionKind::DefaultDeny), // over the max
        ("/search?limit=10&sort=random", DecisionKind::DefaultDeny),
        (
            "/search?limit=10&limit=99&sort=asc",
            DecisionKind::DefaultDeny,
        ),
        ("/search?limit=ten&sort=asc", DecisionKind::DefaultDeny),
        ("/search?limit=1%30&sort=asc", DecisionKind::Allow), // "10", percent-encoded
        ("/search?limit=10&sort=asc&sort=desc", DecisionKind::Allow),
    ] {
        let (got, reason) = check(&p, "GET", target, None);
        assert_eq!(got, kind, "{target}: {reason}");
    }
    let (_, reason) = check(&p, "GET", "/search?limit=500&sort=asc", None);
    assert!(
        reason.contains("requires query limit <= 50, got \"500\""),
        "{reason}"
    );
    // Not UTF-8 once decoded: not inspectable, so the deny rule on the query fires (fail
    // closed), as an allow rule would not match.
    let (kind, reason) = check(&p, "GET", "/search?limit=%ff&sort=asc", None);
    assert_eq!(kind, DecisionKind::Deny);
    assert!(reason.contains("query could not be inspected"), "{reason}");
}

#[test]
fn query_none_allows_only_requests_without_a_query_string() {
    let p = policy(PAY);
    assert_eq!(check(&p, "GET", "/status", None).0, DecisionKind::Allow);
    let (kind, reason) = check(&p, "GET", "/status?x=1", None);
    assert_eq!(kind, DecisionKind::DefaultDeny);
    assert!(reason.contains("requires no query string"), "{reason}");
}

#[test]
fn a_deny_rule_fires_on_a_query_parameter() {
    let p = policy(PAY);
    let d = req("GET", "https://api.pay.test/status?scope=admin").check(&p);
    assert_eq!(kind_rule(&d), (DecisionKind::Deny, Some("no-admin-scope")));
    let d = req(
        "GET",
        "https://api.pay.test/search?limit=1&sort=asc&scope=user",
    )
    .check(&p);
    assert_eq!(d.kind, DecisionKind::Allow, "{}", d.reason);
    // A deny body constraint fires on the query parameter named like its field.
    let p = policy(
        r#"
default: allow
rules:
  - name: no-big-refunds
    deny: { url: "api.pay.test/refund" }
    body: { jsonpath: "$.amount", min: 1000 }
"#,
    );
    let d = req("POST", "https://api.pay.test/refund?amount=5000")
        .json(r#"{"amount": 10}"#)
        .check(&p);
    assert_eq!(kind_rule(&d), (DecisionKind::Deny, Some("no-big-refunds")));
    let d = req("POST", "https://api.pay.test/refund?amount=5")
        .json(r#"{"amount": 10}"#)
        .check(&p);
    assert_eq!(d.kind, DecisionKind::Allow);
}

#[test]
fn query_keys_are_checked_at_load() {
    for (yaml, want) in [
        (
            "rules:\n  - name: a\n    allow: { url: \"*\" }\n    query: some\n",
            "is not none or a constraint",
        ),
        (
            "rules:\n  - name: a\n    allow: { url: \"*\" }\n    query: { jsonpath: \"$.a\", max: 1 }\n",
            "param, not jsonpath",
        ),
        (
            "rules:\n  - name: a\n    allow: { url: \"*\" }\n    body: { param: a, max: 1 }\n",
            "param goes in query:",
        ),
        (
            "rules:\n  - name: a\n    limit: { calls_per_minute: 1 }\n    query: none\n",
            "not limit",
        ),
        (
            "rules:\n  - name: a\n    allow: { tcp: \"db.test:5432\" }\n    query: none\n",
            "tcp rule cannot have query",
        ),
    ] {
        let err = Policy::from_yaml(yaml.as_bytes(), "q.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{yaml}\n{err}");
    }
}
