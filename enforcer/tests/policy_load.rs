//! Loading policies: what is refused, and how the error names file, line, column and rule.

use std::time::{Duration, Instant};

use enforcer::policy::{MAX_POLICY_BYTES, Mode, Policy, PolicyError};

fn load_err(yaml: &str) -> String {
    match Policy::from_yaml(yaml.as_bytes(), "policies/x.yaml") {
        Ok(_) => panic!("should be refused:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn load_errors_name_file_line_column_rule_and_fault() {
    for (yaml, want) in [
        (
            "rules:\n  - name: x\n    allow: { url: \"a.com\" }\n    body: { jsonpath: \"$.a\", maxx: 5 }\n",
            "policies/x.yaml:4:30: rule 'x': unknown operator 'maxx' (expected one of max, min, eq, in, not_in, prefix, suffix, contains, regex, exists)",
        ),
        (
            "rules:\n  - name: x\n    allow:\n      methd: [GET]\n",
            "policies/x.yaml:4:7: rule 'x': allow: unknown key 'methd', expected one of 'method', 'url', 'headers', 'time_outside', 'time_inside', 'timezone', 'tcp'",
        ),
        (
            "rules:\n  - name: a\n    allow: { url: a.com }\n  - name: a\n    deny: { url: b.com }\n",
            "policies/x.yaml:4:5: rule 'a': duplicate rule name 'a' (rule names must be unique)",
        ),
        (
            "rules:\n  - name: x\n    allow: { url: a.com }\n    deny: { url: b.com }\n",
            "policies/x.yaml:2:5: rule 'x': a rule takes exactly one of allow, deny, limit or ask; split it into several rules",
        ),
        (
            "rules:\n  - name: x\n",
            "policies/x.yaml:2:5: rule 'x': a rule needs one of allow, deny, limit or ask",
        ),
        (
            "rules:\n  - allow: { url: a.com }\n",
            "policies/x.yaml:2:5: rule '#1': missing key 'name'",
        ),
        (
            "rules:\n  - name: x\n    allow: { method: [] }\n",
            "policies/x.yaml:3:22: rule 'x': empty list (leave the key out to mean any)",
        ),
        (
            "rules:\n  - name: x\n    allow: { method: [GET, FETCH] }\n",
            "policies/x.yaml:3:28: rule 'x': unknown method 'FETCH' (expected one of GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, CONNECT, TRACE)",
        ),
        (
            "rules:\n  - name: x\n    allow: { url: \"a.com/[\" }\n",
            "policies/x.yaml:3:19: rule 'x': url pattern 'a.com/[': invalid glob: unclosed character class; missing ']'",
        ),
        (
            "rules:\n  - name: x\n    allow: { url: \"api-*.a.com\" }\n",
            "policies/x.yaml:3:19: rule 'x': url pattern 'api-*.a.com': host 'api-*.a.com': '*' must be the whole leftmost label ('*.example.com') or the whole host",
        ),
        (
            "rules:\n  - name: x\n    allow: { url: \"2130706433/x\" }\n",
            "policies/x.yaml:3:19: rule 'x': url pattern '2130706433/x': host '2130706433': non-canonical IPv4 address (write it as four decimal numbers, a.b.c.d)",
        ),
        (
            "rules:\n  - name: x\n    allow: { tcp: \"0x7f.1:22\" }\n",
            "policies/x.yaml:3:19: rule 'x': tcp target '0x7f.1:22': host '0x7f.1': non-canonical IPv4 address (write it as four decimal numbers, a.b.c.d)",
        ),
        (
            "rules:\n  - name: x\n    allow: { url: a.com }\n    body: { jsonpath: \"$.a\", regex: \"(\" }\n",
            "policies/x.yaml:4:37: rule 'x': invalid regex '(': unclosed group",
        ),
        (
            "rules:\n  - name: x\n    allow: { url: a.com }\n    body: { jsonpath: \"$.a\", regex: \"\\\\w{1000}{1000}\" }\n",
            "policies/x.yaml:4:37: rule 'x': regex '\\w{1000}{1000}' compiles to more than 1024 KiB; simplify it",
        ),
        (
            "rules:\n  - name: x\n    allow: { url: a.com }\n    body: { jsonpath: \"$..a\", max: 1 }\n",
            "policies/x.yaml:4:23: rule 'x': JSONPath '$..a' at offset 1: recursive descent '..' is not supported",
        ),
        (
            "rules:\n  - name: x\n    allow: { url: a.com }\n    body: { max: 1 }\n",
            "policies/x.yaml:4:11: rule 'x': a body constraint needs jsonpath (e.g. \"$.amount\")",
        ),
        (
            "rules:\n  - name: x\n    allow: { url: a.com }\n    body: { jsonpath: \"$.a\", max: one }\n",
            "policies/x.yaml:4:35: rule 'x': expected a number, got \"one\"",
        ),
        (
            "rules:\n  - name: x\n    deny: { time_outside: \"9-17\" }\n",
            "policies/x.yaml:3:27: rule 'x': time window '9-17': '9' is not a time of day HH:MM (expected two digit hour, but found end of input)",
        ),
        (
            "rules:\n  - name: x\n    deny: { time_outside: \"09:00-17:00\", timezone: \"Mars/Olympus\" }\n",
            "policies/x.yaml:3:52: rule 'x': unknown time zone 'Mars/Olympus' (use an IANA name such as \"Europe/Paris\", or \"UTC\")",
        ),
        (
            "rules:\n  - name: x\n    deny: { timezone: UTC }\n",
            "policies/x.yaml:3:11: rule 'x': timezone needs time_outside or time_inside",
        ),
        (
            "rules:\n  - name: x\n    limit: { calls_per_minute: 5, per: body_field }\n",
            "policies/x.yaml:3:12: rule 'x': per: body_field needs field: JSONPATH (e.g. \"$.model\")",
        ),
        (
            "rules:\n  - name: x\n    limit: { calls_per_minute: 5, calls_per_hour: 9 }\n",
            "policies/x.yaml:3:12: rule 'x': a limit takes one of calls_per_second, calls_per_minute, calls_per_hour; use one rule per rate",
        ),
        (
            "rules:\n  - name: x\n    allow: { tcp: \"db:5432\", method: [GET] }\n",
            "policies/x.yaml:3:12: rule 'x': tcp takes no other key (method, url, headers and time windows are HTTP)",
        ),
        (
            "rules:\n  - name: x\n    allow: { headers: { \"bad header\": x } }\n",
            "policies/x.yaml:3:25: rule 'x': 'bad header' is not a valid header name",
        ),
        (
            "rulez: []\n",
            "policies/x.yaml:1:1: unknown key 'rulez', expected one of 'agent', 'default', 'mode', 'rules'",
        ),
        (
            "default: allw\n",
            "policies/x.yaml:1:10: default: unknown variant 'allw', expected 'allow' or 'deny'",
        ),
        (
            "mode: dry-run\n",
            "policies/x.yaml:1:7: mode: unknown variant 'dry-run', expected 'enforce' or 'dry_run'",
        ),
        (
            "",
            "policies/x.yaml:1:1: the policy is empty (write at least \"default: deny\")",
        ),
        (
            "- a\n",
            "policies/x.yaml:1:1: the top level of a policy must be a mapping (agent, default, mode, rules)",
        ),
        (
            "rules: [\n",
            "policies/x.yaml:2:1: invalid YAML: did not find expected node content, while parsing a flow node",
        ),
        (
            "a: 1\n---\nb: 2\n",
            "policies/x.yaml: invalid YAML: deserializing from YAML containing more than one document is not supported",
        ),
        (
            "rules: !tag []\n",
            "policies/x.yaml:1:8: YAML tags (!name) are not supported in policies",
        ),
    ] {
        assert_eq!(load_err(yaml), want, "{yaml}");
    }
}

#[test]
fn error_variants_carry_the_location() {
    let err = Policy::from_yaml(
        b"rules:\n  - name: x\n    allow: { method: [GRT] }\n",
        "p.yaml",
    )
    .unwrap_err();
    match err {
        PolicyError::Invalid {
            file,
            line,
            column,
            rule,
            ..
        } => {
            assert_eq!((file.as_str(), line, column), ("p.yaml", 3, 23));
            assert_eq!(rule.as_deref(), Some("x"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn oversized_and_non_utf8_files_are_refused() {
    let big = format!("# {}\ndefault: deny\n", "x".repeat(MAX_POLICY_BYTES));
    assert_eq!(
        load_err(&big),
        format!(
            "policies/x.yaml: policy is {} bytes, over the 1048576-byte limit; is it the right file?",
            big.len()
        )
    );
    let err = Policy::from_yaml(b"default: deny\nagent: caf\xe9\n", "p.yaml").unwrap_err();
    assert_eq!(
        err.to_string(),
        "p.yaml:2:11: policy is not valid UTF-8; save it as UTF-8"
    );
}

/// The classic "billion laughs": nine levels of nine aliases.
fn billion_laughs() -> String {
    let mut s = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        let prev = format!("*a{}", i - 1);
        s += &format!("a{i}: &a{i} [{}]\n", vec![prev; 9].join(", "));
    }
    s
}

/// A large anchor used many times: few jumps, many nodes (serde_yaml's own repetition limit
/// counts jumps, so this variant is what the node budget is for).
fn quadratic_blowup() -> String {
    let anchor = vec!["x"; 20_000].join(",");
    let uses = vec!["*a"; 60_000].join(",");
    format!("anchor: &a [{anchor}]\nrules: [{uses}]\n")
}

#[test]
fn alias_bombs_fail_fast_with_bounded_memory() {
    // Timing bound only catches a hang; the bench measures the real figure.
    for bomb in [billion_laughs(), quadratic_blowup()] {
        assert!(bomb.len() < MAX_POLICY_BYTES);
        let start = Instant::now();
        let err = Policy::from_yaml(bomb.as_bytes(), "bomb.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "took {:?}",
            start.elapsed()
        );
        assert!(err.contains("(a YAML alias bomb?)"), "{err}");
    }
    // A document dense with nodes but without aliases is within the budget.
    let dense = format!("rulez: [{}a]\n", "a,".repeat(400_000));
    assert!(dense.len() < MAX_POLICY_BYTES);
    let err = Policy::from_yaml(dense.as_bytes(), "dense.yaml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown key 'rulez'"), "{err}");
    // Policies may still use a few aliases.
    let p = Policy::from_yaml(
        b"rules:\n  - name: a\n    allow: { method: &ro [GET, HEAD], url: a.com }\n  - name: b\n    allow: { method: *ro, url: b.com }\n",
        "p.yaml",
    )
    .unwrap();
    assert_eq!(p.rule_count(), 2);
}

#[test]
fn load_reads_a_file_and_reports_sha256() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.yaml");
    std::fs::write(&path, "agent: a\nmode: dry_run\ndefault: allow\n").unwrap();
    let p = Policy::load(&path).unwrap();
    // sha256 of the file bytes, lowercase hex.
    assert_eq!(
        p.sha256(),
        sha256_hex(b"agent: a\nmode: dry_run\ndefault: allow\n")
    );
    assert_eq!(
        (p.agent(), p.mode(), p.rule_count()),
        (Some("a"), Mode::DryRun, 0)
    );

    let big = dir.path().join("big.yaml");
    std::fs::write(&big, vec![b'#'; 3 << 20]).unwrap();
    let err = Policy::load(&big).unwrap_err().to_string();
    assert!(
        err.ends_with(
            "policy is 3145728 bytes, over the 1048576-byte limit; is it the right file?"
        ),
        "{err}"
    );

    let missing = dir.path().join("missing.yaml");
    let err = Policy::load(&missing).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("cannot read policy {}: ", missing.display())),
        "{err}"
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[test]
fn policy_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Policy>();
    assert_send_sync::<enforcer::policy::RateLimiter>();
}

#[test]
fn check_reports_every_bad_rule_at_its_line_not_only_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.yaml");
    std::fs::write(
        &path,
        "default: deny\nrules:\n  - name: ok\n    allow: { url: \"a.example.com\" }\n\
         \x20 - name: bad-method\n    allow: { method: [FETCH], url: \"b.example.com\" }\n\
         \x20 - name: bad-url\n    allow: { url: \"http://\" }\n\
         \x20 # a comment between rules\n\
         \x20 - name: no-verb\n  - name: fine\n    deny: { url: \"*\" }\n",
    )
    .unwrap();
    let errors: Vec<String> = Policy::check(&path)
        .expect_err("three bad rules")
        .iter()
        .map(ToString::to_string)
        .collect();
    let file = path.display();
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(
        errors[0].starts_with(&format!("{file}:6:")),
        "{}",
        errors[0]
    );
    assert!(errors[0].contains("rule 'bad-method': unknown method 'FETCH'"));
    assert!(
        errors[1].starts_with(&format!("{file}:7:3: rule 'bad-url'")),
        "{}",
        errors[1]
    );
    assert!(
        errors[2].starts_with(&format!("{file}:10:3: rule 'no-verb'")),
        "{}",
        errors[2]
    );
    // A file with one error reports one; a good one loads.
    std::fs::write(
        &path,
        "rules:\n  - name: x\n    allow: { method: [NOPE] }\n",
    )
    .unwrap();
    assert_eq!(Policy::check(&path).unwrap_err().len(), 1);
    std::fs::write(
        &path,
        "rules:\n  - name: x\n    allow: { url: \"a.com\" }\n",
    )
    .unwrap();
    assert_eq!(Policy::check(&path).unwrap().rule_count(), 1);
}

#[test]
fn deeply_nested_flow_collections_are_refused_before_parsing() {
    // 80 KB of nested flow sequences took the YAML parser 17 s; the depth scan refuses them at
    // once, and a realistic depth (and brackets inside strings and comments) still loads.
    let bomb = format!(
        "rules:\n  - name: x\n    allow: {{ url: {}\"a.com\"{} }}\n",
        "[".repeat(40_000),
        "]".repeat(40_000)
    );
    let started = Instant::now();
    let err = load_err(&bomb);
    assert!(err.contains("nested deeper than 64"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let fine = "rules:\n  - name: \"x [[[[\" # [[[[ not nesting\n    allow: { url: [\"a.com/x\", 'b.com/y'], headers: { x-q: \"v\" }, method: [GET] }\n";
    if let Err(e) = Policy::from_yaml(fine.as_bytes(), "t") {
        panic!("{e}");
    }
}
