//! Property tests: no input makes the policy engine panic, at load time or request time.

use std::sync::LazyLock;

use enforcer::policy::{DecisionKind, Policy, RateLimiter, Request, Scheme, canonical_host};
use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;

/// A policy using every feature, so every matcher runs.
static POLICY: LazyLock<Policy> = LazyLock::new(|| {
    Policy::from_yaml(
        br#"
agent: fuzz
default: deny
rules:
  - name: read
    allow: { method: [GET, HEAD], url: ["*.example.com", "a.com/v1/**", "[::1]:8080/x/*"] }
  - name: tenant
    allow: { url: "t.com/*", headers: { x-tenant: "acme-*" } }
  - name: charges
    allow: { method: [POST], url: ["a.com/v1/charges", "*/any/*"] }
    body:
      - jsonpath: "$.amount"
        max: 50000
      - jsonpath: "$['metadata[order_id]']"
        prefix: ord_
  - name: models
    allow: { method: [POST], url: "a.com/chat" }
    body:
      - jsonpath: "$.messages[*].role"
        in: [user, assistant]
      - jsonpath: "$.model"
        regex: "^gpt-4o(-mini)?$"
  - name: no-shell
    deny: { url: "*" }
    body:
      - jsonpath: "$.tools[*].name"
        eq: shell
  - name: no-deletes
    deny: { method: [DELETE], url: "*" }
  - name: nights
    deny: { time_inside: "22:00-06:00", timezone: "Europe/Paris", url: "a.com:*" }
  - name: per-model
    limit: { per: body_field, field: "$.model", calls_per_minute: 3 }
  - name: per-endpoint
    limit: { per: endpoint, calls_per_second: 5, method: [GET] }
  - name: per-header
    limit: { per: header, header: x-key, calls_per_hour: 10, url: "t.com/*" }
  - name: db
    allow: { tcp: ["db.internal:5432", "10.0.0.0/8:*", "*.svc:*"] }
"#,
        "fuzz.yaml",
    )
    .unwrap()
});

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec!["GET", "POST", "DELETE", "delete", "HEAD", ""])
            .prop_map(String::from),
        "\\PC{0,12}",
    ]
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "a.com",
            "x.example.com",
            "t.com",
            "::1",
            "[::1]",
            "127.1",
            "0x7f.1",
            "2130706433",
            "A.COM.",
            "bücher.example",
            "xn--bcher-kva.example",
            "a..com",
            "",
        ])
        .prop_map(String::from),
        "[a-z0-9.-]{0,30}",
        "\\PC{0,40}",
    ]
}

fn target() -> impl Strategy<Value = String> {
    prop_oneof![
        "/[a-zA-Z0-9/._~%?=&*-]{0,60}",
        "(/(\\.|\\.\\.|%2[eEfF]|%5[cC]|%00|%|[a-z]{1,4})){0,8}(\\?.{0,10})?",
        "\\PC{0,80}",
    ]
}

fn body() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        Just(None),
        prop::collection::vec(any::<u8>(), 0..200).prop_map(Some),
        prop::sample::select(vec![
            r#"{"amount": 100, "metadata[order_id]": "ord_1"}"#,
            r#"{"model": "gpt-4o", "messages": [{"role": "user"}], "tools": [{"name": "shell"}]}"#,
            r#"{"amount": 1, "amount": 2}"#,
            "amount=1&metadata%5Border_id%5D=ord_2&amount=70000",
            "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
        ])
        .prop_map(|s| Some(s.as_bytes().to_vec())),
        "\\{\"(amount|model|messages|tools)\": ?(\\d{1,8}|\"[a-z-]{0,8}\"|\\[\\]|null|true)\\}"
            .prop_map(|s| Some(s.into_bytes())),
    ]
}

fn headers() -> impl Strategy<Value = HeaderMap> {
    let name = prop::sample::select(vec![
        "content-type",
        "content-encoding",
        "x-tenant",
        "x-key",
        "host",
    ]);
    let value = prop_oneof![
        prop::sample::select(vec![
            "application/json",
            "application/x-www-form-urlencoded",
            "application/merge-patch+json; charset=utf-8",
            "text/plain",
            "gzip",
            "deflate",
            "br",
            "gzip, deflate",
            "acme-1",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 0..20),
    ];
    prop::collection::vec((name, value), 0..5).prop_map(|pairs| {
        let mut map = HeaderMap::new();
        for (n, v) in pairs {
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                map.append(HeaderName::from_static(n), v);
            }
        }
        map
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn evaluate_never_panics(
        https in any::<bool>(),
        method in method(),
        host in host(),
        port in prop_oneof![Just(80u16), Just(443u16), Just(8080u16), any::<u16>()],
        target in target(),
        headers in headers(),
        body in body(),
        truncated in any::<bool>(),
        secs in jiff::Timestamp::MIN.as_second()..=jiff::Timestamp::MAX.as_second(),
    ) {
        let scheme = if https { Scheme::Https } else { Scheme::Http };
        let now = jiff::Timestamp::from_second(secs).unwrap();
        let limiter = RateLimiter::with_capacity(8);
        let req = Request {
            scheme,
            method: &method,
            host: &host,
            port,
            path_and_query: &target,
            headers: &headers,
            body: body.as_deref(),
            body_truncated: truncated,
            now,
            exe: None,
        };
        for _ in 0..3 {
            let d = POLICY.evaluate(&req, &limiter);
            prop_assert_eq!(d.allowed, d.kind == DecisionKind::Allow);
            prop_assert_eq!(d.retry_after.is_some(), d.kind == DecisionKind::RateLimited);
            prop_assert!(!d.reason.is_empty());
        }
        prop_assert!(limiter.len() <= 8);
        let _ = POLICY.needs_body(scheme, &host, port, &method, &target);
        let _ = POLICY.host_match(&host);
        let _ = POLICY.host_needs_l7(scheme, &host, port);
        let d = POLICY.host_decision(scheme, &host, port, now, None);
        prop_assert_eq!(d.allowed, d.kind == DecisionKind::Allow);
        let _ = POLICY.tcp_allowed(&host, port, None);
    }

    #[test]
    fn loading_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = Policy::from_yaml(&bytes, "fuzz.yaml");
    }

    #[test]
    fn loading_policy_shaped_text_never_panics(
        parts in prop::collection::vec(prop::sample::select(vec![
            "rules:\n", "  - name: r\n", "    allow:\n", "    deny:\n", "    limit:\n", "    body:\n",
            "      method: [GET]\n", "      url: \"*\"\n", "      url: \"a.com/*\"\n", "      tcp: db:1\n",
            "      - jsonpath: \"$.a\"\n", "        max: 1\n", "        in: [a]\n", "        regex: \"(\"\n",
            "      calls_per_minute: 1\n", "      per: body_field\n", "      field: \"$.m\"\n",
            "      time_outside: \"09:00-17:00\"\n", "      timezone: Europe/Paris\n",
            "default: allow\n", "mode: dry_run\n", "agent: x\n", "&a ", "*a\n", "- ", "{", "}", "[", "]",
            ": ", "\n", "  ", "'", "\"",
        ]), 0..40),
    ) {
        let text: String = parts.concat();
        let _ = Policy::from_yaml(text.as_bytes(), "fuzz.yaml");
    }

    #[test]
    fn loading_fuzzed_leaves_never_panics(
        leaf in prop_oneof![
            "\\PC{0,24}",
            "[$.\\[\\]*'\"a-z0-9\\\\-]{0,16}",
            "[a-z0-9.*:/\\[\\]%-]{0,24}",
            "[0-9:-]{0,12}",
        ],
        slot in 0usize..9,
    ) {
        // Every place a policy takes a free-form string, fed arbitrary text.
        let q = serde_json::to_string(&leaf).unwrap();
        let rule = match slot {
            0 => format!("allow: {{ url: {q} }}"),
            1 => format!("allow: {{ tcp: {q} }}"),
            2 => format!("allow: {{ method: [{q}] }}"),
            3 => format!("allow: {{ headers: {{ {q}: {q} }} }}"),
            4 => format!("deny: {{ time_outside: {q}, timezone: UTC }}"),
            5 => format!("deny: {{ time_inside: \"09:00-10:00\", timezone: {q} }}"),
            6 => format!("allow: {{ url: a.com }}\n    body: {{ jsonpath: {q}, exists: true }}"),
            7 => format!("allow: {{ url: a.com }}\n    body: {{ jsonpath: \"$.a\", regex: {q} }}"),
            _ => format!("limit: {{ calls_per_minute: 1, per: body_field, field: {q} }}"),
        };
        let yaml = format!("rules:\n  - name: r\n    {rule}\n");
        let _ = Policy::from_yaml(yaml.as_bytes(), "fuzz.yaml");
    }

    #[test]
    fn canonical_ldh_hosts_match_the_url_standard(
        labels in prop::collection::vec("[a-z0-9-]{1,12}", 1..5),
        tld in "[a-z][a-z0-9-]{0,8}",
    ) {
        // The fast path for already-canonical names must agree with url::Host::parse.
        let host = format!("{}.{tld}", labels.join("."));
        let ours = canonical_host(&host).ok();
        let theirs = match url::Host::parse(&host) {
            Ok(url::Host::Domain(d)) => Some(d),
            _ => None,
        };
        prop_assert_eq!(ours, theirs);
    }
}
