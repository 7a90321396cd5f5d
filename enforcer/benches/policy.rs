//! Policy engine benchmarks on a generated 1,000-rule policy:
//! - evaluation of a request decided by host, method and path rules (goal: median <= 1 us);
//! - evaluation when a rule with a JSON body constraint applies to a 1 KB body (<= 5 us);
//! - load time of YAML alias bombs (goal: < 100 ms) and of the 1,000-rule policy.
//!
//! Run: `AYA_BUILD_SKIP=1 cargo bench -p enforcer --bench policy`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use enforcer::policy::{DecisionKind, Policy, RateLimiter, Request, Scheme};
use http::{HeaderMap, HeaderValue, header::CONTENT_TYPE};

/// 1,000 rules: 700 exact-host allows, 100 wildcard allows, 100 denies, 50 body-constrained
/// allows and 50 scoped limits.
fn thousand_rules() -> String {
    let mut y = String::from("agent: bench\ndefault: deny\nrules:\n");
    for i in 0..700 {
        y += &format!(
            "  - name: read-{i}\n    allow: {{ method: [GET, HEAD], url: \"api{i}.svc{}.example.com/v1/items/*\" }}\n",
            i % 50
        );
    }
    for i in 0..100 {
        y += &format!("  - name: zone-{i}\n    allow: {{ url: \"*.zone{i}.example.net\" }}\n");
    }
    for i in 0..100 {
        y += &format!(
            "  - name: no-admin-{i}\n    deny: {{ url: \"api{i}.svc{}.example.com/v1/admin/**\" }}\n",
            i % 50
        );
    }
    for i in 0..50 {
        y += &format!(
            "  - name: pay-{i}\n    allow: {{ method: [POST], url: \"pay{i}.example.com/v1/charges\" }}\n    body:\n      - jsonpath: \"$.amount\"\n        max: 50000\n      - jsonpath: \"$.items[*].sku\"\n        prefix: \"sku_\"\n"
        );
    }
    for i in 0..50 {
        y += &format!(
            "  - name: limit-{i}\n    limit: {{ calls_per_minute: 100, per: endpoint, url: \"limited{i}.example.org/**\" }}\n"
        );
    }
    y
}

/// A JSON body of about 1 KB.
fn body_1k() -> Vec<u8> {
    let items: Vec<String> = (0..16)
        .map(|i| format!(r#"{{"sku":"sku_{i:04}","qty":{i},"note":"standard shipping item"}}"#))
        .collect();
    let body = format!(
        r#"{{"amount":42000,"currency":"usd","customer":"cus_0123456789","items":[{}],"metadata":{{"order":"ord_123"}}}}"#,
        items.join(",")
    );
    assert!((900..1200).contains(&body.len()), "{}", body.len());
    body.into_bytes()
}

fn billion_laughs() -> String {
    let mut s = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        s += &format!(
            "a{i}: &a{i} [{}]\n",
            vec![format!("*a{}", i - 1); 9].join(", ")
        );
    }
    s
}

fn quadratic_blowup() -> String {
    let anchor = vec!["x"; 20_000].join(",");
    let uses = vec!["*a"; 60_000].join(",");
    format!("anchor: &a [{anchor}]\nrules: [{uses}]\n")
}

fn bench(c: &mut Criterion) {
    let yaml = thousand_rules();
    let policy = Policy::from_yaml(yaml.as_bytes(), "bench.yaml").unwrap();
    assert_eq!(policy.rule_count(), 1000);
    let limiter = RateLimiter::new();
    let now: jiff::Timestamp = "2025-01-06T10:00:00Z".parse().unwrap();
    let no_headers = HeaderMap::new();

    let get = Request {
        scheme: Scheme::Https,
        method: "GET",
        host: "api500.svc0.example.com",
        port: 443,
        path_and_query: "/v1/items/42?expand=true",
        headers: &no_headers,
        body: None,
        body_truncated: false,
        now,
        exe: None,
    };
    assert_eq!(policy.evaluate(&get, &limiter).kind, DecisionKind::Allow);
    c.bench_function("evaluate/host_method_path", |b| {
        b.iter(|| policy.evaluate(black_box(&get), &limiter))
    });

    let mut json = HeaderMap::new();
    json.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let body = body_1k();
    let post = Request {
        scheme: Scheme::Https,
        method: "POST",
        host: "pay25.example.com",
        port: 443,
        path_and_query: "/v1/charges",
        headers: &json,
        body: Some(&body),
        body_truncated: false,
        now,
        exe: None,
    };
    assert_eq!(policy.evaluate(&post, &limiter).kind, DecisionKind::Allow);
    c.bench_function("evaluate/json_body_1k", |b| {
        b.iter(|| policy.evaluate(black_box(&post), &limiter))
    });

    c.bench_function("load/1000_rules", |b| {
        b.iter(|| Policy::from_yaml(black_box(yaml.as_bytes()), "bench.yaml").unwrap())
    });

    for (name, bomb) in [
        ("load/alias_bomb_billion_laughs", billion_laughs()),
        ("load/alias_bomb_quadratic", quadratic_blowup()),
    ] {
        assert!(Policy::from_yaml(bomb.as_bytes(), "bomb.yaml").is_err());
        c.bench_function(name, |b| {
            b.iter(|| Policy::from_yaml(black_box(bomb.as_bytes()), "bomb.yaml").is_err())
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = bench
}
criterion_main!(benches);
