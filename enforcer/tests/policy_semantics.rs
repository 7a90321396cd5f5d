//! Table-driven tests of the policy engine's matchers and semantics, through the public API.

use std::{io::Write, time::Duration};

mod common;

use common::{MONDAY_10, Req, kind_rule, policy, req};
use enforcer::policy::{DecisionKind, Policy, RateLimiter, Scheme, canonical_host};

#[test]
fn deny_overrides_whatever_the_rule_order() {
    // The same two rules in both orders give the same decisions.
    let allow = "  - name: allow-stripe\n    allow: { url: \"api.stripe.com/**\" }\n";
    let deny = "  - name: no-deletes\n    deny: { method: [DELETE], url: \"*\" }\n";
    for rules in [format!("{allow}{deny}"), format!("{deny}{allow}")] {
        let p = policy(&format!("rules:\n{rules}"));
        let d = req("DELETE", "https://api.stripe.com/v1/charges/ch_1").check(&p);
        assert_eq!(kind_rule(&d), (DecisionKind::Deny, Some("no-deletes")));
        assert_eq!(d.reason, "denied by rule 'no-deletes'");
        assert!(!d.allowed && !d.forward());
        let d = req("GET", "https://api.stripe.com/v1/charges/ch_1").check(&p);
        assert_eq!(kind_rule(&d), (DecisionKind::Allow, Some("allow-stripe")));
        assert_eq!(d.reason, "allowed by rule 'allow-stripe'");
        // Lower-case methods do not slip past the deny.
        let d = req("delete", "https://api.stripe.com/v1/charges/ch_1").check(&p);
        assert_eq!(d.kind, DecisionKind::Deny);
    }
}

#[test]
fn first_matching_deny_in_file_order_is_named() {
    let p = policy(
        "rules:\n  - name: d1\n    deny: { url: \"*.x.com\" }\n  - name: d2\n    deny: { url: \"a.x.com\" }\n",
    );
    assert_eq!(
        req("GET", "https://a.x.com/").check(&p).rule.as_deref(),
        Some("d1")
    );
    let p = policy(
        "rules:\n  - name: d1\n    deny: { url: \"a.x.com\" }\n  - name: d2\n    deny: { url: \"*.x.com\" }\n",
    );
    assert_eq!(
        req("GET", "https://a.x.com/").check(&p).rule.as_deref(),
        Some("d1")
    );
}

#[test]
fn default_deny_and_default_allow() {
    let p = policy("default: deny\n");
    let d = req("DELETE", "https://api.stripe.com/v1/charges?id=1").check(&p);
    assert_eq!(kind_rule(&d), (DecisionKind::DefaultDeny, None));
    assert_eq!(
        d.reason,
        "no rule allows DELETE api.stripe.com/v1/charges (default deny)"
    );
    let d = req("GET", "http://api.x.com:8080/a").check(&p);
    assert_eq!(
        d.reason,
        "no rule allows GET api.x.com:8080/a (default deny)"
    );

    let p = policy("default: allow\nrules:\n  - name: no-evil\n    deny: { url: evil.com }\n");
    let d = req("GET", "https://ok.com/").check(&p);
    assert_eq!(kind_rule(&d), (DecisionKind::Allow, None));
    assert_eq!(d.reason, "allowed by default (no rule matched)");
    assert_eq!(
        req("GET", "https://evil.com/x").check(&p).kind,
        DecisionKind::Deny
    );

    // An IPv4-mapped IPv6 literal is the IPv4 host it reaches: a deny on the IPv4 address
    // cannot be stepped around by writing it as [::ffff:a.b.c.d].
    let p = policy(
        "default: allow\nrules:\n  - name: no-meta\n    deny: { url: \"169.254.169.254/**\" }\n",
    );
    for url in [
        "http://169.254.169.254/latest",
        "http://[::ffff:169.254.169.254]/latest",
        "http://[::ffff:a9fe:a9fe]/latest",
    ] {
        let d = req("GET", url).check(&p);
        assert_eq!(
            kind_rule(&d),
            (DecisionKind::Deny, Some("no-meta")),
            "{url}"
        );
    }
}

#[test]
fn url_matching_table() {
    let p = policy(
        r#"
rules:
  - name: stripe
    allow: { url: "api.stripe.com/v1/charges" }
  - name: salesforce
    allow: { url: "api.salesforce.com/*/sobjects/Contact/*" }
  - name: deep
    allow: { url: "files.x.com/v1/**" }
  - name: openai-any-path
    allow: { url: "*.openai.com" }
  - name: alt-port
    allow: { url: "api.x.com:8443/v1/*" }
  - name: any-port
    allow: { url: "dev.x.com:*" }
  - name: tls-only
    allow: { url: "https://secure.x.com" }
  - name: ipv4
    allow: { url: "10.0.0.1/health" }
  - name: ipv6
    allow: { url: "[::1]:8080" }
  - name: idn
    allow: { url: "bücher.example/*" }
"#,
    );
    for (method, url, want) in [
        ("GET", "https://api.stripe.com/v1/charges", Some("stripe")),
        (
            "GET",
            "https://api.stripe.com/v1/charges?limit=3",
            Some("stripe"),
        ),
        ("GET", "http://api.stripe.com/v1/charges", Some("stripe")),
        ("GET", "https://api.stripe.com:8443/v1/charges", None),
        ("GET", "http://api.stripe.com:443/v1/charges", None),
        ("GET", "https://API.Stripe.COM./v1/charges", Some("stripe")),
        ("GET", "https://api.stripe.com/v1/charges/", None),
        ("GET", "https://api.stripe.com/v1/./charges", Some("stripe")),
        (
            "GET",
            "https://api.stripe.com/v1/x/../charges",
            Some("stripe"),
        ),
        ("GET", "https://api.stripe.com/v1//charges", Some("stripe")),
        ("GET", "https://api.stripe.com/%761/charges", Some("stripe")),
        (
            "GET",
            "https://api.salesforce.com/v59/sobjects/Contact/003",
            Some("salesforce"),
        ),
        (
            "GET",
            "https://api.salesforce.com/a/b/sobjects/Contact/003",
            None,
        ),
        (
            "GET",
            "https://api.salesforce.com/v59/sobjects/contact/003",
            None,
        ),
        ("GET", "https://files.x.com/v1/a/b/c", Some("deep")),
        ("GET", "https://files.x.com/v2/a", None),
        (
            "POST",
            "https://api.openai.com/v1/chat/completions",
            Some("openai-any-path"),
        ),
        ("GET", "https://a.b.openai.com/", Some("openai-any-path")),
        ("GET", "https://openai.com/", None),
        ("GET", "https://openai.com.evil.net/", None),
        ("GET", "https://evilopenai.com/", None),
        ("GET", "https://api.x.com:8443/v1/a", Some("alt-port")),
        ("GET", "https://api.x.com/v1/a", None),
        ("GET", "http://dev.x.com:3000/", Some("any-port")),
        ("GET", "https://secure.x.com/a", Some("tls-only")),
        ("GET", "http://secure.x.com/a", None),
        ("GET", "https://10.0.0.1/health", Some("ipv4")),
        ("GET", "http://[::1]:8080/x", Some("ipv6")),
        ("GET", "https://xn--bcher-kva.example/a", Some("idn")),
        ("GET", "https://bücher.example/a", Some("idn")),
    ] {
        let d = req(method, url).check(&p);
        assert_eq!(d.rule.as_deref(), want, "{method} {url}: {}", d.reason);
        assert_eq!(d.allowed, want.is_some(), "{method} {url}");
    }
}

#[test]
fn ambiguous_paths_and_bad_hosts_are_denied_with_a_reason() {
    // Even under default allow: these requests cannot be judged reliably.
    let p = policy("default: allow\n");
    for (url, reason) in [
        (
            "https://a.com/admin%2Fusers",
            "ambiguous request path '/admin%2Fusers': encoded '/' (%2F)",
        ),
        (
            "https://a.com/a%5cb",
            "ambiguous request path '/a%5cb': encoded '\\' (%5C)",
        ),
        (
            "https://a.com/a%00",
            "ambiguous request path '/a%00': encoded NUL (%00)",
        ),
        (
            "https://a.com/a\\b",
            "ambiguous request path '/a\\\\b': raw '\\'",
        ),
        (
            "https://a.com/a%G1",
            "ambiguous request path '/a%G1': malformed percent-encoding",
        ),
        (
            "https://2130706433/",
            "invalid host '2130706433': non-canonical IPv4 address (write it as four decimal numbers, a.b.c.d)",
        ),
        (
            "https://0x7f.1/",
            "invalid host '0x7f.1': non-canonical IPv4 address (write it as four decimal numbers, a.b.c.d)",
        ),
        (
            "https://127.1/",
            "invalid host '127.1': non-canonical IPv4 address (write it as four decimal numbers, a.b.c.d)",
        ),
    ] {
        let d = req("GET", url).check(&p);
        assert_eq!(kind_rule(&d), (DecisionKind::Deny, None), "{url}");
        assert_eq!(d.reason, reason, "{url}");
    }
}

#[test]
fn canonical_host_table() {
    for (input, want) in [
        ("Example.COM.", Some("example.com")),
        ("bücher.example", Some("xn--bcher-kva.example")),
        ("[2001:db8::1]", Some("2001:db8::1")),
        ("2001:DB8::1", Some("2001:db8::1")),
        ("[::ffff:192.168.0.1]", Some("192.168.0.1")),
        ("192.168.0.1", Some("192.168.0.1")),
        ("2130706433", None),
        ("0x7f.1", None),
        ("127.1", None),
        ("0177.0.0.1", None),
        ("a.com:443", None),
        ("", None),
    ] {
        assert_eq!(canonical_host(input).ok().as_deref(), want, "{input}");
    }
    let err = canonical_host("127.1").unwrap_err().to_string();
    assert!(
        err.starts_with("invalid host '127.1': non-canonical IPv4"),
        "{err}"
    );
}

#[test]
fn method_and_header_matchers() {
    let p = policy(
        r#"
rules:
  - name: tenant-read
    allow:
      method: [get, HEAD]
      url: "api.x.com/**"
      headers: { X-Tenant: "acme-*" }
  - name: no-debug
    deny:
      url: "api.x.com/**"
      headers: { x-debug: "*" }
"#,
    );
    let base = || req("GET", "https://api.x.com/v1/a");
    for (r, want) in [
        (base().header("x-tenant", "acme-1"), DecisionKind::Allow),
        (base().header("X-TENANT", "acme-/odd/"), DecisionKind::Allow),
        (
            base().header("x-tenant", "other"),
            DecisionKind::DefaultDeny,
        ),
        (base(), DecisionKind::DefaultDeny),
        // Every value of a repeated header must match an allow rule...
        (
            base()
                .header("x-tenant", "acme-1")
                .header("x-tenant", "evil"),
            DecisionKind::DefaultDeny,
        ),
        // ...and any value of it fires a deny rule.
        (
            base().header("x-tenant", "acme-1").header("x-debug", "1"),
            DecisionKind::Deny,
        ),
        (
            req("HEAD", "https://api.x.com/v1/a").header("x-tenant", "acme-1"),
            DecisionKind::Allow,
        ),
        (
            req("POST", "https://api.x.com/v1/a").header("x-tenant", "acme-1"),
            DecisionKind::DefaultDeny,
        ),
        (
            req("BREW", "https://api.x.com/v1/a").header("x-tenant", "acme-1"),
            DecisionKind::DefaultDeny,
        ),
    ] {
        let d = r.check(&p);
        assert_eq!(d.kind, want, "{} {:?}: {}", r.method, r.headers, d.reason);
    }
}

const CHARGES: &str = r#"
rules:
  - name: create-small-charges
    allow: { method: [POST], url: "api.stripe.com/v1/charges" }
    body:
      jsonpath: "$.amount"
      max: 50000
  - name: no-big-refunds
    deny: { method: [POST], url: "api.stripe.com/v1/refunds" }
    body:
      - jsonpath: "$.amount"
        min: 100000
  - name: refunds
    allow: { method: [POST], url: "api.stripe.com/v1/refunds" }
"#;

#[test]
fn body_constraints_on_allow_and_deny_rules() {
    let p = policy(CHARGES);
    let charge = || req("POST", "https://api.stripe.com/v1/charges");
    let refund = || req("POST", "https://api.stripe.com/v1/refunds");
    for (r, kind, rule, reason) in [
        (
            charge().json(r#"{"amount": 50000}"#),
            DecisionKind::Allow,
            Some("create-small-charges"),
            "allowed by rule 'create-small-charges'",
        ),
        (
            charge().json(r#"{"amount": 60000}"#),
            DecisionKind::DefaultDeny,
            Some("create-small-charges"),
            "rule 'create-small-charges' requires $.amount <= 50000, got 60000",
        ),
        (
            charge().json(r#"{"amount": "100"}"#),
            DecisionKind::DefaultDeny,
            Some("create-small-charges"),
            "rule 'create-small-charges' requires $.amount <= 50000, got \"100\"",
        ),
        (
            charge().json(r#"{"currency": "usd"}"#),
            DecisionKind::DefaultDeny,
            Some("create-small-charges"),
            "rule 'create-small-charges' requires $.amount <= 50000, got nothing",
        ),
        (
            charge().json("{not json"),
            DecisionKind::DefaultDeny,
            Some("create-small-charges"),
            "rule 'create-small-charges' requires $.amount <= 50000, but the body could not be inspected: not JSON",
        ),
        // Stripe's real API sends forms; numeric operators read numeric strings there.
        (
            charge().form("amount=2000&currency=usd"),
            DecisionKind::Allow,
            Some("create-small-charges"),
            "allowed by rule 'create-small-charges'",
        ),
        (
            charge().form("amount=60000&currency=usd"),
            DecisionKind::DefaultDeny,
            Some("create-small-charges"),
            "rule 'create-small-charges' requires $.amount <= 50000, got \"60000\"",
        ),
        // A repeated form key: every value must pass an allow rule.
        (
            charge().form("amount=1&amount=60000"),
            DecisionKind::DefaultDeny,
            Some("create-small-charges"),
            "rule 'create-small-charges' requires $.amount <= 50000, got \"60000\"",
        ),
        (
            refund().json(r#"{"amount": 150000}"#),
            DecisionKind::Deny,
            Some("no-big-refunds"),
            "denied by rule 'no-big-refunds': $.amount >= 100000, got 150000",
        ),
        (
            refund().json(r#"{"amount": 500}"#),
            DecisionKind::Allow,
            Some("refunds"),
            "allowed by rule 'refunds'",
        ),
        // ...and any value fires a deny rule.
        (
            refund().form("amount=500&amount=150000"),
            DecisionKind::Deny,
            Some("no-big-refunds"),
            "denied by rule 'no-big-refunds': $.amount >= 100000, got \"150000\"",
        ),
        // A deny rule whose body cannot be inspected counts as matched.
        (
            refund().body("text/plain", b"amount=5"),
            DecisionKind::Deny,
            Some("no-big-refunds"),
            "denied by rule 'no-big-refunds': body could not be inspected: unsupported Content-Type 'text/plain' (only JSON and form bodies are inspected)",
        ),
        (
            refund(),
            DecisionKind::Deny,
            Some("no-big-refunds"),
            "denied by rule 'no-big-refunds': body could not be inspected: no body",
        ),
    ] {
        let d = r.check(&p);
        assert_eq!(
            (d.kind, d.rule.as_deref(), d.reason.as_str()),
            (kind, rule, reason)
        );
    }
}

#[test]
fn uninspectable_bodies_fail_closed_with_the_reason() {
    let p = policy(CHARGES);
    let charge = || req("POST", "https://api.stripe.com/v1/charges");
    // Nesting is refused where values are built (on a path a rule reads)...
    let deep = format!(
        r#"{{"amount": {}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let mut big = charge().json(r#"{"amount": 1}"#);
    big.truncated = true;
    let cases: Vec<(Req, &str)> = vec![
        (charge().json("{not json"), "not JSON"),
        (charge().json(&deep), "JSON nested deeper than 128 levels"),
        (
            charge().json(r#"{"amount": 1, "amount": 99999999}"#),
            "JSON object has a duplicate key 'amount'",
        ),
        (big, "body exceeds the 1 MiB inspection limit"),
        (
            charge()
                .header("content-encoding", "br")
                .json(r#"{"amount": 1}"#),
            "unsupported Content-Encoding 'br'",
        ),
        (
            charge().body("application/json; charset=latin1", br#"{"amount": 1}"#),
            "unsupported charset 'latin1' (only UTF-8 is inspected)",
        ),
        (charge().form("amount=%FF"), "form body is not UTF-8"),
        (
            {
                let mut r = charge();
                r.body = Some(br#"{"amount": 1}"#.to_vec());
                r
            },
            "no Content-Type",
        ),
    ];
    for (r, why) in cases {
        let d = r.check(&p);
        assert_eq!(d.kind, DecisionKind::DefaultDeny, "{why}");
        assert!(
            d.reason
                .ends_with(&format!("body could not be inspected: {why}")),
            "{why}: {}",
            d.reason
        );
        let mut as_refund = r.clone();
        as_refund.target = "/v1/refunds".to_owned();
        let d = as_refund.check(&p);
        assert_eq!(d.kind, DecisionKind::Deny, "{why}");
        assert_eq!(
            d.reason,
            format!("denied by rule 'no-big-refunds': body could not be inspected: {why}")
        );
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn deep_nesting_elsewhere_is_skipped_without_recursion() {
    // ...and skipped elsewhere by serde_json's iterative skipper: no stack overflow.
    let p = policy(CHARGES);
    let body = format!(
        r#"{{"metadata": {}{}, "amount": 10}}"#,
        "[".repeat(400_000),
        "]".repeat(400_000)
    );
    let d = req("POST", "https://api.stripe.com/v1/charges")
        .json(&body)
        .check(&p);
    assert_eq!(d.kind, DecisionKind::Allow, "{}", d.reason);
}

#[test]
fn gzip_and_deflate_bodies_are_decoded() {
    let p = policy(CHARGES);
    for (encoding, bytes, kind) in [
        ("gzip", gzip(br#"{"amount": 100}"#), DecisionKind::Allow),
        ("x-gzip", gzip(br#"{"amount": 100}"#), DecisionKind::Allow),
        (
            "gzip",
            gzip(br#"{"amount": 100000}"#),
            DecisionKind::DefaultDeny,
        ),
        ("deflate", zlib(br#"{"amount": 100}"#), DecisionKind::Allow),
        (
            "deflate",
            zlib(br#"{"amount": 100000}"#),
            DecisionKind::DefaultDeny,
        ),
        (
            "identity",
            br#"{"amount": 100}"#.to_vec(),
            DecisionKind::Allow,
        ),
    ] {
        let r = req("POST", "https://api.stripe.com/v1/charges")
            .header("content-encoding", encoding)
            .body("application/json", &bytes);
        assert_eq!(r.check(&p).kind, kind, "{encoding}");
    }
    // A gzip bomb stops at the inspection limit.
    let bomb = gzip(&vec![b' '; 3 << 20]);
    let r = req("POST", "https://api.stripe.com/v1/charges")
        .header("content-encoding", "gzip")
        .body("application/json", &bomb);
    assert!(
        r.check(&p).reason.ends_with(
            "body could not be inspected: decoded body exceeds the 1 MiB inspection limit"
        )
    );
}

#[test]
fn every_body_operator() {
    let ops = [
        ("max: 10", r#"{"v": 10}"#, true),
        ("max: 10", r#"{"v": 10.5}"#, false),
        ("max: 10", r#"{"v": "5"}"#, false),
        ("min: -1.5", r#"{"v": -1.5}"#, true),
        ("min: -1.5", r#"{"v": -2}"#, false),
        ("eq: gpt-4o", r#"{"v": "gpt-4o"}"#, true),
        ("eq: 5", r#"{"v": 5.0}"#, true),
        ("eq: 5", r#"{"v": "5"}"#, false),
        ("eq: true", r#"{"v": true}"#, true),
        ("eq: null", r#"{"v": null}"#, true),
        ("in: [a, b]", r#"{"v": "b"}"#, true),
        ("in: [a, b]", r#"{"v": "c"}"#, false),
        ("in: [1, 2]", r#"{"v": "1"}"#, false),
        ("not_in: [a, b]", r#"{"v": "c"}"#, true),
        ("not_in: [a, b]", r#"{"v": "a"}"#, false),
        ("prefix: gpt-", r#"{"v": "gpt-4o"}"#, true),
        ("prefix: gpt-", r#"{"v": 5}"#, false),
        ("suffix: -mini", r#"{"v": "gpt-4o-mini"}"#, true),
        ("suffix: -mini", r#"{"v": "gpt-4o"}"#, false),
        ("contains: secret", r#"{"v": "top secret doc"}"#, true),
        ("contains: secret", r#"{"v": "public"}"#, false),
        (r#"regex: "^[a-z]+-\\d$""#, r#"{"v": "abc-1"}"#, true),
        (r#"regex: "^[a-z]+-\\d$""#, r#"{"v": "abc-12"}"#, false),
        ("exists: true", r#"{"v": null}"#, true),
        ("exists: true", r#"{"w": 1}"#, false),
        ("exists: false", r#"{"w": 1}"#, true),
        ("exists: false", r#"{"v": 1}"#, false),
    ];
    for (op, body, allowed) in ops {
        let yaml = format!(
            "rules:\n  - name: r\n    allow: {{ url: \"x.com/*\" }}\n    body:\n      - jsonpath: \"$.v\"\n        {op}\n"
        );
        let p = policy(&yaml);
        let d = req("POST", "https://x.com/a").json(body).check(&p);
        assert_eq!(d.allowed, allowed, "{op} on {body}: {}", d.reason);
    }
}

#[test]
fn multi_value_paths_fail_closed_both_ways() {
    let p = policy(
        r#"
rules:
  - name: only-user-and-assistant
    allow: { method: [POST], url: "api.x.com/chat" }
    body:
      jsonpath: "$.messages[*].role"
      in: [user, assistant]
  - name: no-tool-calls
    deny: { method: [POST], url: "api.x.com/chat" }
    body:
      jsonpath: "$.tools[*].name"
      eq: shell
"#,
    );
    let chat = |body: &str| req("POST", "https://api.x.com/chat").json(body).check(&p);
    for (body, kind) in [
        (
            r#"{"messages":[{"role":"user"},{"role":"assistant"}]}"#,
            DecisionKind::Allow,
        ),
        (
            r#"{"messages":[{"role":"user"},{"role":"system"}]}"#,
            DecisionKind::DefaultDeny,
        ),
        // An allow constraint needs at least one selected value.
        (r#"{"messages":[]}"#, DecisionKind::DefaultDeny),
        (
            r#"{"messages":[{"role":"user"}],"tools":[{"name":"web"},{"name":"shell"}]}"#,
            DecisionKind::Deny,
        ),
        (
            r#"{"messages":[{"role":"user"}],"tools":[{"name":"web"}]}"#,
            DecisionKind::Allow,
        ),
    ] {
        assert_eq!(chat(body).kind, kind, "{body}");
    }
}

#[test]
fn form_bodies_with_bracketed_keys() {
    let p = policy(
        r#"
rules:
  - name: tagged-charges
    allow: { method: [POST], url: "api.stripe.com/v1/charges" }
    body:
      - jsonpath: "$['metadata[order_id]']"
        prefix: "ord_"
      - jsonpath: "$.amount"
        max: 50000
      - jsonpath: "$.capture"
        eq: true
"#,
    );
    let charge = |body: &str| {
        req("POST", "https://api.stripe.com/v1/charges")
            .form(body)
            .check(&p)
    };
    assert!(charge("amount=100&metadata%5Border_id%5D=ord_42&capture=true").allowed);
    assert!(charge("amount=100&metadata[order_id]=ord_42&capture=true").allowed);
    let d = charge("amount=100&metadata[order_id]=x_42&capture=true");
    assert_eq!(
        d.reason,
        "rule 'tagged-charges' requires $['metadata[order_id]'] starts with \"ord_\", got \"x_42\""
    );
    assert!(!charge("amount=1e9&metadata[order_id]=ord_1&capture=true").allowed);
    assert!(!charge("amount=abc&metadata[order_id]=ord_1&capture=true").allowed);
}

const LIMITS: &str = r#"
default: deny
rules:
  - name: api
    allow: { url: "api.x.com/**" }
  - name: per-endpoint
    limit: { calls_per_minute: 2, per: endpoint }
"#;

#[test]
fn limit_per_endpoint() {
    let p = policy(LIMITS);
    let l = RateLimiter::new();
    let a = req("GET", "https://api.x.com/a");
    assert!(a.eval(&p, &l).allowed);
    assert!(a.eval(&p, &l).allowed);
    let d = a.eval(&p, &l);
    assert_eq!(
        kind_rule(&d),
        (DecisionKind::RateLimited, Some("per-endpoint"))
    );
    assert_eq!(d.retry_after, Some(Duration::from_secs(30)));
    assert_eq!(
        d.reason,
        "rate limited by rule 'per-endpoint' (2 calls per minute per endpoint); retry after 30.0s"
    );
    // Another path, another method, the query ignored: separate endpoints or the same one.
    assert!(req("GET", "https://api.x.com/b").eval(&p, &l).allowed);
    assert!(req("POST", "https://api.x.com/a").eval(&p, &l).allowed);
    assert!(
        !req("GET", "https://api.x.com/a?page=2")
            .eval(&p, &l)
            .allowed
    );
    // Tokens come back with time.
    assert!(a.clone().at("2025-01-06T10:00:30Z").eval(&p, &l).allowed);
    // Denied requests never count.
    for _ in 0..5 {
        assert_eq!(
            req("GET", "https://other.com/a").eval(&p, &l).kind,
            DecisionKind::DefaultDeny
        );
    }
}

#[test]
fn limit_per_body_field_per_agent_and_per_header() {
    let p = policy(
        r#"
default: allow
rules:
  - name: per-model
    limit: { per: body_field, field: "$.model", calls_per_minute: 1, method: [POST] }
  - name: per-key
    limit: { per: header, header: x-api-key, calls_per_hour: 1, url: "keys.x.com" }
  - name: whole-agent
    limit: { per: agent, calls_per_second: 5, url: "agent.x.com/**" }
"#,
    );
    let l = RateLimiter::new();
    let chat = |model: &str| {
        req("POST", "https://api.x.com/chat").json(&format!(r#"{{"model":"{model}"}}"#))
    };
    assert!(chat("a").eval(&p, &l).allowed);
    assert!(chat("b").eval(&p, &l).allowed);
    let d = chat("a").eval(&p, &l);
    assert_eq!(
        kind_rule(&d),
        (DecisionKind::RateLimited, Some("per-model"))
    );
    // Requests without the field share one bucket.
    assert!(
        req("POST", "https://api.x.com/chat")
            .json("{}")
            .eval(&p, &l)
            .allowed
    );
    assert!(
        !req("POST", "https://api.x.com/chat")
            .json("[]")
            .eval(&p, &l)
            .allowed
    );
    // GETs are outside the limit's scope.
    for _ in 0..3 {
        assert!(req("GET", "https://api.x.com/chat").eval(&p, &l).allowed);
    }

    let key = |k: &str| req("GET", "https://keys.x.com/").header("x-api-key", k);
    assert!(key("k1").eval(&p, &l).allowed);
    assert!(key("k2").eval(&p, &l).allowed);
    assert_eq!(key("k1").eval(&p, &l).kind, DecisionKind::RateLimited);
    assert!(req("GET", "https://keys.x.com/").eval(&p, &l).allowed);
    assert!(!req("GET", "https://keys.x.com/").eval(&p, &l).allowed);

    for i in 0..5 {
        assert!(
            req("GET", &format!("https://agent.x.com/{i}"))
                .eval(&p, &l)
                .allowed
        );
    }
    let d = req("GET", "https://agent.x.com/6").eval(&p, &l);
    assert_eq!(
        kind_rule(&d),
        (DecisionKind::RateLimited, Some("whole-agent"))
    );
    assert_eq!(d.retry_after, Some(Duration::from_millis(200)));
}

#[test]
fn limits_are_shared_across_reloads_and_bounded() {
    let l = RateLimiter::with_capacity(3);
    let p1 = policy(LIMITS);
    let a = req("GET", "https://api.x.com/a");
    assert!(a.eval(&p1, &l).allowed);
    assert!(a.eval(&p1, &l).allowed);
    // A reloaded policy with the same rule keeps the bucket.
    let p2 = policy(LIMITS);
    assert_eq!(a.eval(&p2, &l).kind, DecisionKind::RateLimited);
    // The table never grows past its cap; evicted buckets start full.
    for i in 0..10 {
        assert!(
            req("GET", &format!("https://api.x.com/p{i}"))
                .eval(&p2, &l)
                .allowed
        );
    }
    assert_eq!(l.len(), 3);
    assert!(a.eval(&p2, &l).allowed);
}

#[test]
fn time_windows_across_midnight_and_dst() {
    let p = policy(
        r#"
default: allow
rules:
  - name: business-hours-only
    deny: { time_outside: "09:00-17:00", timezone: "America/New_York" }
  - name: tokyo-night-maintenance
    deny: { time_inside: "23:00-02:00", timezone: "Asia/Tokyo", url: "maint.x.com" }
"#,
    );
    let at = |t: &str, url: &str| req("GET", url).at(t).check(&p);
    for (t, url, allowed) in [
        // 13:30Z is 08:30 EST before the change (closed)...
        ("2024-03-08T13:30:00Z", "https://a.com/", false),
        // ...and 09:30 EDT after it (open).
        ("2024-03-11T13:30:00Z", "https://a.com/", true),
        ("2024-03-11T20:59:59Z", "https://a.com/", true),
        ("2024-03-11T21:00:00Z", "https://a.com/", false),
        // Autumn: 21:30Z is 17:30 EDT before (closed), 16:30 EST after (open).
        ("2024-11-01T21:30:00Z", "https://a.com/", false),
        ("2024-11-04T21:30:00Z", "https://a.com/", true),
        // Tokyo window crossing midnight (UTC+9): 23:30, 01:59 inside; 02:00 outside.
        ("2024-05-01T14:30:00Z", "https://maint.x.com/", false),
        ("2024-05-01T16:59:00Z", "https://maint.x.com/", false),
        ("2024-05-01T17:00:00Z", "https://maint.x.com/", true),
        ("2024-05-01T13:59:00Z", "https://maint.x.com/", true),
    ] {
        let d = at(t, url);
        assert_eq!(d.allowed, allowed, "{t} {url}: {}", d.reason);
    }
}

#[test]
fn allow_rules_with_time_windows() {
    let p = policy(
        r#"
rules:
  - name: office-hours
    allow: { url: "intranet.x.com", time_inside: "08:30-18:00", timezone: "Europe/Paris" }
"#,
    );
    let now = |t: &str| req("GET", "https://intranet.x.com/").at(t).check(&p);
    // Paris is UTC+1 in winter and UTC+2 in summer.
    assert!(now("2025-01-06T07:30:00Z").allowed);
    assert!(!now("2025-01-06T07:29:59Z").allowed);
    assert!(now("2025-07-07T06:30:00Z").allowed);
    assert!(!now("2025-07-07T16:00:00Z").allowed);
    let t = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
    let hd = |s: &str| {
        p.host_decision(Scheme::Https, "intranet.x.com", 443, t(s), None)
            .kind
    };
    assert_eq!(hd("2025-01-06T10:00:00Z"), DecisionKind::Allow);
    assert_eq!(hd("2025-01-06T22:00:00Z"), DecisionKind::DefaultDeny);
    assert!(p.host_needs_l7(Scheme::Https, "intranet.x.com", 443));
}

#[test]
fn dry_run_computes_the_same_decision_but_forwards() {
    let p = policy("mode: dry_run\nrules:\n  - name: d\n    deny: { method: [DELETE] }\n");
    let d = req("DELETE", "https://a.com/x").check(&p);
    assert_eq!(kind_rule(&d), (DecisionKind::Deny, Some("d")));
    assert!(!d.allowed && d.dry_run && d.forward());
    let d = req("GET", "https://a.com/x").check(&p);
    assert_eq!(d.kind, DecisionKind::DefaultDeny);
    assert!(d.forward());
    assert!(p.kernel_targets().redirect_all_tcp);
}

#[test]
fn needs_body_only_where_a_body_rule_applies() {
    let p = policy(CHARGES);
    let nb = |m: &str, host: &str, path: &str| p.needs_body(Scheme::Https, host, 443, m, path);
    assert!(nb("POST", "api.stripe.com", "/v1/charges"));
    assert!(nb("POST", "api.stripe.com", "/v1/refunds?x=1"));
    assert!(!nb("GET", "api.stripe.com", "/v1/charges"));
    assert!(!nb("POST", "api.stripe.com", "/v1/customers"));
    assert!(!nb("POST", "other.com", "/v1/charges"));
    assert!(!p.needs_body(Scheme::Https, "api.stripe.com", 8443, "POST", "/v1/charges"));
    let p = policy(LIMITS);
    assert!(!p.needs_body(Scheme::Https, "api.x.com", 443, "POST", "/a"));
    let p = policy(
        "default: allow\nrules:\n  - name: m\n    limit: { per: body_field, field: \"$.model\", calls_per_minute: 1 }\n",
    );
    assert!(p.needs_body(Scheme::Https, "any.com", 443, "POST", "/a"));
}

#[test]
fn host_level_questions() {
    use enforcer::policy::HostMatch;
    let p = policy(
        r#"
default: deny
rules:
  - name: openai
    allow: { url: "*.openai.com" }
  - name: stripe-charges
    allow: { method: [POST], url: "api.stripe.com/v1/charges" }
  - name: github
    allow: { url: "github.com" }
  - name: no-uploads
    deny: { url: "uploads.github.com" }
  - name: blocked
    deny: { url: "api.openai.com:*" }
  - name: db
    allow: { tcp: ["db.internal:5432", "10.1.0.0/16:*"] }
  - name: no-db-admin
    deny: { tcp: "10.1.2.3:5432" }
"#,
    );
    for (host, want) in [
        ("chat.openai.com", HostMatch::Wildcard),
        ("api.stripe.com", HostMatch::Exact),
        ("GitHub.com.", HostMatch::Exact),
        ("db.internal", HostMatch::Exact),
        ("example.com", HostMatch::None),
        ("127.1", HostMatch::None),
    ] {
        assert_eq!(p.host_match(host), want, "{host}");
    }

    let l7 = |host: &str, port: u16| p.host_needs_l7(Scheme::Https, host, port);
    assert!(!l7("chat.openai.com", 443));
    assert!(l7("api.stripe.com", 443));
    assert!(!l7("github.com", 443));
    assert!(!l7("example.com", 443));

    let now: jiff::Timestamp = MONDAY_10.parse().unwrap();
    let hd = |host: &str, port: u16| {
        let d = p.host_decision(Scheme::Https, host, port, now, None);
        (d.kind, d.rule.as_deref().map(str::to_owned))
    };
    assert_eq!(
        hd("chat.openai.com", 443),
        (DecisionKind::Allow, Some("openai".into()))
    );
    assert_eq!(
        hd("api.openai.com", 443),
        (DecisionKind::Deny, Some("blocked".into()))
    );
    assert_eq!(
        hd("api.stripe.com", 443),
        (DecisionKind::Allow, Some("stripe-charges".into()))
    );
    assert_eq!(
        hd("api.stripe.com", 8443),
        (DecisionKind::DefaultDeny, None)
    );
    assert_eq!(hd("example.com", 443), (DecisionKind::DefaultDeny, None));
    assert_eq!(
        hd("uploads.github.com", 443),
        (DecisionKind::Deny, Some("no-uploads".into()))
    );
    assert_eq!(hd("0x7f.1", 443).0, DecisionKind::Deny);
    let d = p.host_decision(Scheme::Https, "example.com", 443, now, None);
    assert_eq!(
        d.reason,
        "no rule allows connections to example.com:443 (default deny)"
    );

    assert_eq!(p.tcp_allowed("db.internal", 5432, None), Some("db"));
    assert_eq!(p.tcp_allowed("DB.internal.", 5432, None), Some("db"));
    assert_eq!(p.tcp_allowed("db.internal", 5433, None), None);
    assert_eq!(p.tcp_allowed("10.1.9.9", 22, None), Some("db"));
    assert_eq!(p.tcp_allowed("10.1.2.3", 5432, None), None);
    assert_eq!(p.tcp_allowed("10.2.0.1", 22, None), None);
    assert_eq!(p.tcp_allowed("github.com", 443, None), None);

    let k = p.kernel_targets();
    assert!(k.redirect_all_tcp, "*.openai.com cannot be listed");
    assert_eq!(
        k.exact_hosts,
        vec![
            ("api.stripe.com".to_owned(), Some(80)),
            ("api.stripe.com".to_owned(), Some(443)),
            ("db.internal".to_owned(), Some(5432)),
            ("github.com".to_owned(), Some(80)),
            ("github.com".to_owned(), Some(443)),
        ]
    );
    assert_eq!(k.ip_literals, vec![("10.1.0.0/16".parse().unwrap(), None)]);
}

#[test]
fn kernel_targets_of_listable_policies() {
    let p = policy(
        "rules:\n  - name: a\n    allow: { url: [\"https://api.x.com\", \"10.0.0.1:8080/x\", \"[::1]\"] }\n",
    );
    let k = p.kernel_targets();
    assert!(!k.redirect_all_tcp);
    assert_eq!(k.exact_hosts, vec![("api.x.com".to_owned(), Some(443))]);
    assert_eq!(
        k.ip_literals,
        vec![
            ("10.0.0.1/32".parse().unwrap(), Some(8080)),
            ("::1/128".parse().unwrap(), Some(80)),
            ("::1/128".parse().unwrap(), Some(443)),
        ]
    );
    // A deny-only policy under default allow, or a rule without url, cannot be listed.
    assert!(policy("default: allow\n").kernel_targets().redirect_all_tcp);
    assert!(
        policy("rules:\n  - name: a\n    allow: { method: [GET] }\n")
            .kernel_targets()
            .redirect_all_tcp
    );
    assert_eq!(
        policy("default: deny\n").kernel_targets(),
        Default::default()
    );
}

#[test]
fn host_needs_l7_for_limits_windows_and_deny_rules() {
    let p = policy(
        r#"
rules:
  - name: a
    allow: { url: ["a.com", "b.com", "c.com", "d.com"] }
  - name: limit-b
    limit: { calls_per_minute: 5, url: "b.com" }
  - name: night-c
    deny: { time_outside: "09:00-17:00", url: "c.com" }
  - name: no-delete-d
    deny: { method: [DELETE], url: "d.com" }
"#,
    );
    for (host, want) in [
        ("a.com", false),
        ("b.com", true),
        ("c.com", true),
        ("d.com", true),
    ] {
        assert_eq!(p.host_needs_l7(Scheme::Https, host, 443), want, "{host}");
    }
}

#[test]
fn a_name_written_exactly_is_explicit_only_on_the_ports_written() {
    let p = Policy::from_yaml(
        b"rules:\n  - name: db\n    allow: { tcp: \"db.internal:5432\" }\n\
          \x20 - name: any\n    allow: { url: \"*\" }\n\
          \x20 - name: api\n    allow: { url: \"https://api.internal/v1/*\" }\n\
          \x20 - name: alt\n    allow: { url: \"alt.internal:8443\" }\n\
          \x20 - name: wild\n    allow: { url: \"*.svc.internal:*\" }\n",
        "t",
    )
    .unwrap();
    assert!(p.names_exactly("db.internal", 5432));
    assert!(
        !p.names_exactly("db.internal", 8080),
        "url: * names no host"
    );
    assert!(p.names_exactly("api.internal", 443));
    assert!(
        !p.names_exactly("api.internal", 80),
        "https:// means 443 only"
    );
    assert!(p.names_exactly("alt.internal", 8443));
    assert!(!p.names_exactly("alt.internal", 443));
    assert!(
        !p.names_exactly("x.svc.internal", 80),
        "a wildcard is not exact"
    );
    assert!(
        !p.names_exactly("DB.internal.", 1),
        "canonicalised, port still checked"
    );
    assert!(p.names_exactly("DB.internal.", 5432));
}
