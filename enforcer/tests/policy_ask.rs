//! `ask` rules: deny overrides ask, ask overrides allow, body constraints decide whether an
//! ask applies, dry run makes it `would_ask`, and bad timeouts are refused at load.

mod common;

use common::{kind_rule, policy, req};
use enforcer::{
    audit::PolicyResult,
    policy::{DecisionKind, Policy},
};

const REFUNDS: &str = r#"
rules:
  - name: refunds
    allow: { method: POST, url: "api.stripe.com/v1/refunds" }
  - name: big-refunds
    ask: { method: POST, url: "api.stripe.com/v1/refunds" }
    body: { jsonpath: "$.amount", min: 10000 }
    timeout: 120s
  - name: frozen
    deny: { url: "api.stripe.com/v1/refunds", headers: { x-frozen: "yes" } }
"#;

#[test]
fn ask_overrides_allow_and_deny_overrides_ask() {
    let p = policy(REFUNDS);
    let big = req("POST", "https://api.stripe.com/v1/refunds").json(r#"{"amount": 50000}"#);
    let d = big.clone().check(&p);
    assert_eq!(kind_rule(&d), (DecisionKind::Ask, Some("big-refunds")));
    assert!(!d.allowed && !d.forward());
    assert_eq!(d.retry_after, Some(std::time::Duration::from_secs(120)));
    let small = req("POST", "https://api.stripe.com/v1/refunds").json(r#"{"amount": 50}"#);
    assert_eq!(
        kind_rule(&small.check(&p)),
        (DecisionKind::Allow, Some("refunds"))
    );
    let frozen = big.header("x-frozen", "yes").check(&p);
    assert_eq!(kind_rule(&frozen), (DecisionKind::Deny, Some("frozen")));
    // The host must be seen per request for an ask to hold one.
    assert!(p.host_needs_l7(enforcer::policy::Scheme::Https, "api.stripe.com", 443));
}

#[test]
fn in_dry_run_an_ask_is_would_ask_and_forwarded() {
    let p = policy(&format!("mode: dry_run\n{REFUNDS}"));
    let d = req("POST", "https://api.stripe.com/v1/refunds")
        .json(r#"{"amount": 50000}"#)
        .check(&p);
    assert_eq!(d.kind, DecisionKind::Ask);
    assert!(d.forward());
    assert_eq!(PolicyResult::of(&d), PolicyResult::WouldAsk);
}

#[test]
fn bad_ask_rules_are_refused_with_the_fix() {
    for (yaml, want) in [
        (
            "rules:\n  - name: a\n    ask: { url: \"x.test\" }\n    timeout: 11m\n",
            "between 1s and 600s",
        ),
        (
            "rules:\n  - name: a\n    ask: { url: \"x.test\" }\n    timeout: soon\n",
            "write it like 120s",
        ),
        (
            "rules:\n  - name: a\n    allow: { url: \"x.test\" }\n    timeout: 5s\n",
            "timeout goes with ask",
        ),
        (
            "rules:\n  - name: a\n    ask: { tcp: \"db.test:5432\" }\n",
            "cannot take tcp",
        ),
        (
            "rules:\n  - name: a\n    ask: { url: \"x.test\" }\n    allow: { url: \"x.test\" }\n",
            "exactly one of allow, deny, limit or ask",
        ),
    ] {
        let e = Policy::from_yaml(yaml.as_bytes(), "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{yaml}: {e}");
    }
}
