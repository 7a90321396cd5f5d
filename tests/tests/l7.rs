//! L7 enforcement end to end: real daemon, real eBPF redirect, enrolled `curl` and probe,
//! loopback HTTP and HTTPS upstreams (the HTTPS ones signed by a test CA passed through
//! `tls.extra_upstream_roots`). Needs root (see the harness docs).
//!
//! Addresses: 127.0.0.5 plain HTTP (`api.test`), 127.0.0.6 HTTPS (`secure.test`,
//! `splice.test`), 127.0.0.7 HTTPS with a certificate nobody trusts (`bad.test`).

use std::time::Duration;

use enforcer_tests::{
    Lines, Scenario, TestDaemon, reap, stderr, stdout,
    web::{TestCa, WebUpstream},
};

/// `-i` (headers first) and a summary line per transfer.
const SUMMARY: &str = "\n==> %{http_code} %{num_connects} %{http_version}\n";

/// The summary lines of a curl run: (status, new connections, HTTP version).
fn summaries(text: &str) -> Vec<(u16, u32, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("==> "))
        .map(|l| {
            let mut f = l.split(' ');
            (
                f.next().unwrap().parse().unwrap(),
                f.next().unwrap().parse().unwrap(),
                f.next().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Runs curl (headers included, summary line) and returns stdout; curl failing is fine
/// (the summary says 000).
fn curl(d: &TestDaemon, agent: &str, args: &[&str]) -> String {
    let mut argv = vec!["-i", "-w", SUMMARY];
    argv.extend_from_slice(args);
    let out = d.curl(agent, &argv);
    let text = stdout(&out);
    assert!(
        !summaries(&text).is_empty(),
        "curl printed no summary: {text} {}\n{}",
        stderr(&out),
        d.log()
    );
    format!("{text}\n[curl stderr] {}", stderr(&out))
}

fn status_of(text: &str) -> u16 {
    summaries(text)[0].0
}

/// A plain-HTTP policy on `api.test:{port}`.
fn api_policy(port: u16) -> String {
    format!(
        "default: deny\nrules:\n\
         \x20 - name: read-v1\n    allow: {{ method: [GET], url: \"api.test:{port}/v1/**\" }}\n\
         \x20 - name: block-all-deletes\n    deny: {{ method: [DELETE], url: \"*\" }}\n\
         \x20 - name: delete-v1\n    allow: {{ method: [DELETE], url: \"api.test:{port}/v1/**\" }}\n\
         \x20 - name: small-charges\n    allow: {{ method: [POST], url: \"api.test:{port}/v1/charges\" }}\n\
         \x20   body: {{ jsonpath: \"$.amount\", max: 50000 }}\n\
         \x20 - name: known-currency\n    allow: {{ method: [POST], url: \"api.test:{port}/v1/convert\" }}\n\
         \x20   body: {{ jsonpath: \"$.currency\", in: [eur, usd] }}\n\
         \x20 - name: form-colour\n    allow: {{ method: [POST], url: \"api.test:{port}/v1/form\" }}\n\
         \x20   body: {{ jsonpath: \"$.colour\", in: [red, blue] }}\n\
         \x20 - name: versioned-put\n    allow: {{ method: [PUT], url: \"api.test:{port}/v1/items/*\", headers: {{ x-api-version: \"2024-*\" }} }}\n\
         \x20 - name: chat\n    allow: {{ method: [GET], url: \"api.test:{port}/ws\" }}\n"
    )
}

#[test]
fn plain_http_requests_are_judged_by_method_path_header_and_body() {
    // Scenario: one policy with method, path-glob, header and body rules (JSON max, JSON
    // in, form-encoded in), a deny that overrides an allow, and default deny; each request
    // gets its own verdict and only the allowed ones reach the upstream.
    let Some(s) = Scenario::new("l7_plain_rules") else {
        return;
    };
    let up = WebUpstream::http("127.0.0.5", "api");
    let p = up.addr.port();
    let d = s
        .daemon()
        .agent("a", &api_policy(p))
        .resolve("api.test", "127.0.0.5")
        .start();
    let base = format!("http://api.test:{p}");
    let run = |extra: &[&str], path: &str| {
        let url = format!("{base}{path}");
        let mut args = vec![];
        args.extend_from_slice(extra);
        args.push(url.as_str());
        curl(&d, "a", &args)
    };
    let json = "content-type: application/json";
    let form = "content-type: application/x-www-form-urlencoded";
    let cases: Vec<(Vec<&str>, &str, u16, &str)> = vec![
        (vec![], "/v1/contacts?page=2", 200, ""),
        (vec![], "/v2/contacts", 403, "no rule allows GET"),
        (
            vec!["-X", "DELETE"],
            "/v1/contacts/7",
            403,
            "block-all-deletes",
        ),
        (
            vec!["-H", json, "-d", r#"{"amount":100}"#],
            "/v1/charges",
            200,
            "",
        ),
        (
            vec!["-H", json, "-d", r#"{"amount":90000}"#],
            "/v1/charges",
            403,
            "small-charges",
        ),
        (
            vec!["-H", json, "-d", r#"{"currency":"eur"}"#],
            "/v1/convert",
            200,
            "",
        ),
        (
            vec!["-H", json, "-d", r#"{"currency":"gbp"}"#],
            "/v1/convert",
            403,
            "known-currency",
        ),
        (
            vec!["-H", form, "-d", "colour=blue&size=2"],
            "/v1/form",
            200,
            "",
        ),
        (
            vec!["-H", form, "-d", "colour=green"],
            "/v1/form",
            403,
            "form-colour",
        ),
        (
            vec!["-X", "PUT", "-H", "x-api-version: 2024-05"],
            "/v1/items/1",
            200,
            "",
        ),
        (
            vec!["-X", "PUT", "-H", "x-api-version: 2023-01"],
            "/v1/items/1",
            403,
            "",
        ),
        (vec!["-X", "PUT"], "/v1/items/1", 403, ""),
    ];
    let mut allowed = 0;
    for (extra, path, want, mention) in &cases {
        let text = run(extra, path);
        assert_eq!(
            status_of(&text),
            *want,
            "{extra:?} {path}: {text}\n{}",
            d.log()
        );
        assert!(
            text.contains(mention),
            "{extra:?} {path} should mention {mention}: {text}"
        );
        if *want == 200 {
            allowed += 1;
            assert!(text.contains("hello from api"), "{text}");
        } else {
            assert!(text.contains("x-enforcer-decision: deny"), "{text}");
            assert!(text.contains("content-type: application/json"), "{text}");
            assert!(text.contains("\"type\":\"egress_policy_denied\""), "{text}");
        }
    }
    let hits = up.hits();
    assert_eq!(
        hits.len(),
        allowed,
        "only allowed requests went up: {hits:?}"
    );
    assert_eq!(hits[0].path, "/v1/contacts?page=2");
    assert_eq!(hits[1].body, r#"{"amount":100}"#);
    // One request record per decision, with the process, no query string.
    let audit = d.audit_log();
    let requests: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"event\":\"request\""))
        .collect();
    assert_eq!(requests.len(), cases.len(), "{audit}");
    assert!(
        requests.iter().all(|l| l.contains("\"comm\":\"curl\"")),
        "{audit}"
    );
    assert!(
        !audit.contains("page=2"),
        "query strings stay out of the log"
    );
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"event\":\"completion\"") && l.contains("\"status_code\":200")),
        "{audit}"
    );
}

#[test]
fn an_allowed_then_a_denied_request_share_one_keep_alive_connection() {
    // Scenario: curl fetches two URLs on one connection; the first is allowed, the second
    // denied, each on its own merits.
    let Some(s) = Scenario::new("l7_keep_alive") else {
        return;
    };
    let up = WebUpstream::http("127.0.0.5", "api");
    let p = up.addr.port();
    let d = s
        .daemon()
        .agent("a", &api_policy(p))
        .resolve("api.test", "127.0.0.5")
        .start();
    let text = curl(
        &d,
        "a",
        &[
            &format!("http://api.test:{p}/v1/ok"),
            &format!("http://api.test:{p}/admin"),
            &format!("http://api.test:{p}/v1/again"),
        ],
    );
    let s = summaries(&text);
    assert_eq!(
        s.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>(),
        vec![(200, 1), (403, 0), (200, 0)],
        "one connection, three verdicts: {text}"
    );
    assert_eq!(up.hits().len(), 2);
}

#[test]
fn dry_run_forwards_what_it_would_deny_and_says_so() {
    // Scenario: the same policy in dry_run: a request the policy denies goes through, the
    // response says would_deny, the daemon logs it at WARN and the audit log says would_deny.
    let Some(s) = Scenario::new("l7_dry_run") else {
        return;
    };
    let up = WebUpstream::http("127.0.0.5", "api");
    let p = up.addr.port();
    let policy = format!("mode: dry_run\n{}", api_policy(p));
    let d = s
        .daemon()
        .agent("a", &policy)
        .resolve("api.test", "127.0.0.5")
        .start();
    let text = curl(
        &d,
        "a",
        &["-X", "DELETE", &format!("http://api.test:{p}/v1/x")],
    );
    assert_eq!(status_of(&text), 200, "{text}");
    assert!(text.contains("x-enforcer-decision: would_deny"), "{text}");
    assert_eq!(up.hits().len(), 1);
    assert!(
        d.log()
            .contains("would be denied (dry-run): denied by rule 'block-all-deletes'"),
        "{}",
        d.log()
    );
    assert!(
        d.audit_log()
            .lines()
            .any(|l| l.contains("\"policy_result\":\"would_deny\"")),
        "{}",
        d.audit_log()
    );
}

#[test]
fn a_rate_limit_gives_429_with_retry_after_across_connections() {
    // Scenario: two calls per minute for the agent; the third, on a new connection, is a
    // 429 with Retry-After and never reaches the upstream.
    let Some(s) = Scenario::new("l7_rate_limit") else {
        return;
    };
    let up = WebUpstream::http("127.0.0.5", "api");
    let p = up.addr.port();
    let policy = format!(
        "rules:\n\
         \x20 - name: api\n    allow: {{ url: \"api.test:{p}\" }}\n\
         \x20 - name: two-a-minute\n    limit: {{ calls_per_minute: 2 }}\n"
    );
    let d = s
        .daemon()
        .agent("a", &policy)
        .resolve("api.test", "127.0.0.5")
        .start();
    let url = format!("http://api.test:{p}/");
    let codes: Vec<String> = (0..3).map(|_| curl(&d, "a", &[&url])).collect();
    assert_eq!(status_of(&codes[0]), 200, "{}", codes[0]);
    assert_eq!(status_of(&codes[1]), 200, "{}", codes[1]);
    let third = &codes[2];
    assert_eq!(status_of(third), 429, "{third}");
    assert!(
        third.contains("x-enforcer-decision: rate_limited"),
        "{third}"
    );
    assert!(
        third.to_ascii_lowercase().contains("retry-after: "),
        "{third}"
    );
    assert!(third.contains("\"retryable\":true"), "{third}");
    assert_eq!(up.hits().len(), 2);
}

#[test]
fn http2_through_interception_is_judged_per_request() {
    // Scenario: a host with path rules is intercepted; curl speaks HTTP/2 to the proxy
    // (trusting the enforcer CA through the variables `enforcer exec` sets), and each
    // request on the connection gets its own verdict; the upstream gets HTTP/2 too.
    let Some(s) = Scenario::new("l7_http2") else {
        return;
    };
    let ca = TestCa::new("enforcer test upstream CA");
    let up = WebUpstream::https("127.0.0.6", "secure", ca.server_config(&["secure.test"]));
    let p = up.addr.port();
    let policy = format!(
        "rules:\n  - name: v1\n    allow: {{ method: [GET], url: \"secure.test:{p}/v1/**\" }}\n"
    );
    let d = s
        .daemon()
        .agent("a", &policy)
        .resolve("secure.test", "127.0.0.6")
        .upstream_ca(&ca, "")
        .start();
    let text = curl(
        &d,
        "a",
        &[
            "--http2",
            &format!("https://secure.test:{p}/v1/ok"),
            &format!("https://secure.test:{p}/admin"),
        ],
    );
    let s = summaries(&text);
    assert_eq!(s.len(), 2, "{text}\n{}", d.log());
    assert_eq!((s[0].0, s[0].2.as_str()), (200, "2"), "{text}\n{}", d.log());
    assert_eq!((s[1].0, s[1].1), (403, 0), "{text}");
    assert!(text.contains("x-enforcer-decision: deny"), "{text}");
    let hits = up.hits();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0].version, "HTTP/2.0");
    assert_eq!(hits[0].host, format!("secure.test:{p}"));
}

#[test]
fn a_host_without_request_rules_is_spliced_on_its_sni() {
    // Scenario: a host allowed at host level only is not decrypted: curl, trusting only the
    // upstream's own CA, completes TLS with the upstream itself through the proxy.
    let Some(s) = Scenario::new("l7_sni_splice") else {
        return;
    };
    let ca = TestCa::new("enforcer test upstream CA");
    let up = WebUpstream::https("127.0.0.6", "splice", ca.server_config(&["splice.test"]));
    let p = up.addr.port();
    let policy =
        format!("rules:\n  - name: whole-host\n    allow: {{ url: \"splice.test:{p}\" }}\n");
    let d = s
        .daemon()
        .agent("a", &policy)
        .resolve("splice.test", "127.0.0.6")
        .upstream_ca(&ca, "")
        .start();
    let ca_file = d.dir.path().join("only-upstream-ca.pem");
    ca.write_pem(&ca_file);
    let text = curl(
        &d,
        "a",
        &[
            "--cacert",
            ca_file.to_str().unwrap(),
            &format!("https://splice.test:{p}/anything"),
        ],
    );
    assert_eq!(status_of(&text), 200, "{text}\n{}", d.log());
    assert!(text.contains("hello from splice"), "{text}");
    let audit = d.audit_log();
    assert!(
        audit.lines().any(|l| l.contains("\"event\":\"connection\"")
            && l.contains("\"matched_rule\":\"whole-host\"")),
        "{audit}"
    );
    assert!(
        !audit.lines().any(|l| l.contains("\"event\":\"request\"")),
        "a spliced connection has no per-request records: {audit}"
    );
}

#[test]
fn domain_fronting_is_refused_with_421() {
    // Scenario: TLS to secure.test (SNI), then a request whose Host names another host.
    let Some(s) = Scenario::new("l7_fronting") else {
        return;
    };
    let ca = TestCa::new("enforcer test upstream CA");
    let up = WebUpstream::https("127.0.0.6", "secure", ca.server_config(&["secure.test"]));
    let p = up.addr.port();
    let policy = format!(
        "rules:\n  - name: get\n    allow: {{ method: [GET], url: \"secure.test:{p}/**\" }}\n"
    );
    let d = s
        .daemon()
        .agent("a", &policy)
        .resolve("secure.test", "127.0.0.6")
        .upstream_ca(&ca, "")
        .start();
    let text = curl(
        &d,
        "a",
        &[
            "--http1.1",
            "-H",
            &format!("Host: elsewhere.test:{p}"),
            &format!("https://secure.test:{p}/"),
        ],
    );
    assert_eq!(status_of(&text), 421, "{text}\n{}", d.log());
    assert!(text.contains("domain fronting"), "{text}");
    assert!(up.hits().is_empty());
}

#[test]
fn an_untrusted_upstream_certificate_gives_a_502_and_nothing_passes() {
    // Scenario: the upstream's certificate comes from a CA the daemon does not trust; the
    // agent gets a JSON 502, the event is audited, and no request reaches the upstream.
    let Some(s) = Scenario::new("l7_untrusted_upstream") else {
        return;
    };
    let ca = TestCa::new("enforcer test upstream CA");
    let rogue = TestCa::new("a CA nobody trusts");
    let up = WebUpstream::https("127.0.0.7", "bad", rogue.server_config(&["bad.test"]));
    let p = up.addr.port();
    let policy = format!(
        "rules:\n  - name: bad-get\n    allow: {{ method: [GET], url: \"bad.test:{p}/**\" }}\n"
    );
    let d = s
        .daemon()
        .agent("a", &policy)
        .resolve("bad.test", "127.0.0.7")
        .upstream_ca(&ca, "")
        .start();
    let text = curl(&d, "a", &[&format!("https://bad.test:{p}/x")]);
    assert_eq!(status_of(&text), 502, "{text}\n{}", d.log());
    assert!(
        text.contains("\"message\":\"upstream certificate verification failed: "),
        "{text}"
    );
    assert!(up.hits().is_empty());
    let audit = d.audit_log();
    assert!(
        audit.lines().any(|l| l.contains("\"event\":\"completion\"")
            && l.contains("\"status_code\":502")
            && l.contains("failed verification")),
        "{audit}"
    );
}

#[test]
fn in_sni_mode_a_host_with_request_rules_is_denied_with_the_reason() {
    // Scenario: tls.mode sni never decrypts, so a host whose rules need each request is
    // refused in strict mode, and the audit log says why.
    let Some(s) = Scenario::new("l7_sni_mode") else {
        return;
    };
    let ca = TestCa::new("enforcer test upstream CA");
    let up = WebUpstream::https("127.0.0.6", "secure", ca.server_config(&["secure.test"]));
    let p = up.addr.port();
    let policy = format!(
        "rules:\n  - name: v1\n    allow: {{ method: [GET], url: \"secure.test:{p}/v1/**\" }}\n"
    );
    let d = s
        .daemon()
        .agent("a", &policy)
        .resolve("secure.test", "127.0.0.6")
        .upstream_ca(&ca, "  mode: sni")
        .start();
    let out = d.curl("a", &[&format!("https://secure.test:{p}/v1/ok")]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(up.hits().is_empty());
    let audit = d.audit_log();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"policy_result\":\"deny\"") && l.contains("tls.mode is sni")),
        "{audit}"
    );
    // No CA is made in sni mode.
    assert!(!d.dir.path().join("state/ca").exists());
}

#[test]
fn smuggling_attempts_get_400_and_a_huge_header_431() {
    // Scenario: framing tricks on plain HTTP are refused with a 400 and the connection is
    // closed; a 70 KiB header gets a 431; nothing reaches the upstream.
    let Some(s) = Scenario::new("l7_smuggling") else {
        return;
    };
    let up = WebUpstream::http("127.0.0.5", "api");
    let p = up.addr.port();
    let d = s
        .daemon()
        .agent("a", &api_policy(p))
        .resolve("api.test", "127.0.0.5")
        .start();
    let addr = up.addr.to_string();
    let host = format!("api.test:{p}");
    let attempts = [
        format!(
            "POST /v1/charges HTTP/1.1\\r\\nHost: {host}\\r\\nContent-Length: 4\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n0\\r\\n\\r\\n"
        ),
        format!(
            "POST /v1/charges HTTP/1.1\\r\\nHost: {host}\\r\\nContent-Length: 1\\r\\nContent-Length: 1\\r\\n\\r\\nx"
        ),
        format!("POST /v1/charges HTTP/1.1\\r\\nHost: {host}\\r\\nContent-Length: -1\\r\\n\\r\\n"),
        format!("GET /v1/a HTTP/1.1\\r\\nHost: {host}\\r\\nX-Fold: a\\r\\n b\\r\\n\\r\\n"),
        format!("GET /v1/a HTTP/1.1\\r\\nHost: {host}\\nX: y\\r\\n\\r\\n"),
    ];
    for attempt in &attempts {
        let out = d.probe("a", &["raw", &host, attempt]);
        let text = stdout(&out);
        assert!(
            text.starts_with("HTTP/1.1 400 "),
            "{attempt} → {text}\n{}",
            d.log()
        );
        assert!(text.contains("connection closed"), "{text}");
    }
    let big = d.dir.path().join("big-header.txt");
    std::fs::write(
        &big,
        format!(
            "GET /v1/a HTTP/1.1\r\nHost: {host}\r\nX-Big: {}\r\n\r\n",
            "a".repeat(70 * 1024)
        ),
    )
    .unwrap();
    let out = d.probe("a", &["raw", &addr, &format!("@{}", big.display())]);
    assert!(
        stdout(&out).starts_with("HTTP/1.1 431 "),
        "{}",
        stdout(&out)
    );
    assert!(up.hits().is_empty(), "{:?}", up.hits());
}

#[test]
fn a_slow_streamed_response_reaches_the_agent_chunk_by_chunk() {
    // Scenario: the upstream sends one SSE event and holds the rest; the agent must see the
    // first event while the upstream is still holding (nothing is buffered to the end).
    let Some(s) = Scenario::new("l7_streaming") else {
        return;
    };
    let up = WebUpstream::http("127.0.0.5", "api");
    let p = up.addr.port();
    let d = s
        .daemon()
        .agent("a", &api_policy(p))
        .resolve("api.test", "127.0.0.5")
        .start();
    let mut child = d
        .curl_cmd("a", &["-N", &format!("http://api.test:{p}/v1/stream")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Lines::of(&mut child);
    let first = lines.wait_for(Duration::from_secs(15), |l| l.contains("data: first"));
    assert!(
        first.is_some(),
        "first event not delivered early\n{}",
        d.log()
    );
    up.release();
    let second = lines.wait_for(Duration::from_secs(15), |l| l.contains("data: second"));
    assert!(second.is_some(), "{}", d.log());
    reap(child);
}

#[test]
fn websockets_are_spliced_only_when_their_get_is_allowed() {
    // Scenario: an upgrade on /ws (a GET the policy allows) becomes a two-way byte stream;
    // the same upgrade elsewhere is a 403.
    let Some(s) = Scenario::new("l7_websocket") else {
        return;
    };
    let up = WebUpstream::http("127.0.0.5", "api");
    let p = up.addr.port();
    let d = s
        .daemon()
        .agent("a", &api_policy(p))
        .resolve("api.test", "127.0.0.5")
        .start();
    let host = format!("api.test:{p}");
    let out = d.probe("a", &["ws", &host, &host, "/ws"]);
    let text = stdout(&out);
    assert!(text.contains("status HTTP/1.1 101"), "{text}\n{}", d.log());
    assert!(text.contains("echo ping"), "{text}");
    let out = d.probe("a", &["ws", &host, &host, "/ws-elsewhere"]);
    let text = stdout(&out);
    assert!(text.contains("status HTTP/1.1 403"), "{text}");
    assert!(text.contains("no rule allows GET"), "{text}");
    let ws_hits: Vec<_> = up
        .hits()
        .into_iter()
        .filter(|h| h.path.starts_with("/ws"))
        .collect();
    assert_eq!(ws_hits.len(), 1, "{ws_hits:?}");
}

#[test]
fn the_enrolled_command_gets_the_ca_bundle_variables() {
    // Scenario: with interception possible, `enforcer exec` points the CA-file variables at
    // the daemon's bundle (system roots plus the enforcer CA). The daemon runs under umask
    // 077 with a 0700 state directory, as the unit runs it, and the bundle is still readable
    // by the command's user (nobody).
    let Some(s) = Scenario::new("l7_bundle_env") else {
        return;
    };
    let d = s.daemon().agent("a", "rules: []\n").start();
    let out = d
        .exec_cmd("a", &["sh", "-c", "echo $SSL_CERT_FILE; echo $NODE_EXTRA_CA_CERTS; echo $DENO_CERT; tail -c 200 \"$CURL_CA_BUNDLE\""])
        .output()
        .unwrap();
    let text = stdout(&out);
    let bundle = d.dir.path().join("run/ca-bundle.pem");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.dir.path().join("state")), 0o700);
    assert_eq!(mode(&bundle), 0o644);
    assert_eq!(
        text.lines().next(),
        Some(bundle.to_str().unwrap()),
        "{text} {}",
        stderr(&out)
    );
    assert!(text.contains("-----END CERTIFICATE-----"), "{text}");
    let export = d.cli(&["ca", "export"]);
    let pem = stdout(&export);
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    assert!(std::fs::read_to_string(&bundle).unwrap().ends_with(&pem));
}

#[test]
fn a_rule_for_one_executable_serves_it_and_not_curl() {
    // Scenario: `binaries: [/usr/bin/python3]` on the rule that allows POST. The kernel names
    // the executable at connect(): python's POST is allowed and reaches the upstream; curl's
    // same POST is denied, the reason says which executables the rule serves, and the audit
    // record names curl.
    let Some(s) = Scenario::new("l7_binaries") else {
        return;
    };
    let up = WebUpstream::http("127.0.0.5", "api");
    let p = up.addr.port();
    let policy = format!(
        "rules:\n  - name: python-posts\n    allow: {{ method: [POST], url: \"api.test:{p}/v1/**\" }}\n\
         \x20   binaries: [/usr/bin/python3]\n"
    );
    let d = s
        .daemon()
        .agent("a", &policy)
        .resolve("api.test", "127.0.0.5")
        .start();
    let text = curl(
        &d,
        "a",
        &[
            "-X",
            "POST",
            "-d",
            "x=1",
            &format!("http://api.test:{p}/v1/items"),
        ],
    );
    assert_eq!(status_of(&text), 403, "{text}");
    assert!(
        text.contains("applies only to connections made by /usr/bin/python3"),
        "{text}"
    );
    let script = format!(
        "import urllib.request as u\n\
         print(u.urlopen(u.Request('http://api.test:{p}/v1/items', data=b'x=1'), timeout=15).status)"
    );
    let out = d
        .exec_cmd("a", &["/usr/bin/python3", "-c", &script])
        .output()
        .unwrap();
    assert_eq!(stdout(&out).trim(), "200", "{}", stderr(&out));
    let hits = up.hits();
    assert_eq!(hits.len(), 1, "{hits:?}");
    let log = d.audit_log();
    assert!(
        log.lines()
            .any(|l| l.contains("\"policy_result\":\"deny\"")
                && l.contains("\"exe\":\"/usr/bin/curl\"")),
        "{log}"
    );
}

#[test]
fn https_refused_on_its_server_name_is_answered_in_band_with_the_reason() {
    // Scenario: a wildcard allows *.inband.test, a host-wide deny refuses blocked.inband.test.
    // The name resolves (the wildcard allows it) and the connect goes through; the proxy
    // refuses on the SNI. With tls.deny_in_band (the default) curl and the openai SDK, which
    // trust the local CA through exec, read the JSON 403 and its reason; the upstream, which
    // is up, gets nothing.
    let Some(s) = Scenario::new("l7_in_band") else {
        return;
    };
    let ca = TestCa::new("enforcer test upstream CA");
    let up = WebUpstream::https(
        "127.0.0.6",
        "blocked",
        ca.server_config(&["blocked.inband.test"]),
    );
    let p = up.addr.port();
    let policy = "rules:\n  - name: zone\n    allow: { url: \"*.inband.test:*\" }\n\
                  \x20 - name: blocked\n    deny: { url: \"blocked.inband.test:*\" }\n";
    let d = s
        .daemon()
        .agent("a", policy)
        .resolve("blocked.inband.test", "127.0.0.6")
        .dns_lines("  allow_internal_answers: [\"127.0.0.0/8\"]\n")
        .upstream_ca(&ca, "")
        .start();
    for http in ["--http1.1", "--http2"] {
        let text = curl(
            &d,
            "a",
            &[http, &format!("https://blocked.inband.test:{p}/v1/x")],
        );
        assert_eq!(status_of(&text), 403, "{http}: {text}\n{}", d.log());
        assert!(text.contains("denied by rule 'blocked'"), "{text}");
    }
    let python = std::path::Path::new("/opt/enforcer-test/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: `cargo xtask test` creates it",
        python.display()
    );
    let script = format!(
        "import openai\n\
         c = openai.OpenAI(base_url='https://blocked.inband.test:{p}/v1', api_key='k', max_retries=0)\n\
         try:\n    c.models.list()\n\
         except openai.PermissionDeniedError as e:\n    print('openai:', e)\n"
    );
    let out = d
        .exec_cmd("a", &[python.to_str().unwrap(), "-c", &script])
        .output()
        .unwrap();
    assert!(
        stdout(&out).contains("denied by rule 'blocked'"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(up.hits().is_empty(), "{:?}", up.hits());
}

#[test]
fn an_agent_reads_its_own_refusals_and_only_its_own_at_enforcer_internal() {
    // Scenario: agents `a` and `b` each get a kernel EPERM (a loopback port no rule names).
    // `a` then asks http://enforcer.internal/v1/denials (and over HTTPS, trusting the local CA
    // through exec): it reads its own refusal, with reason, and nothing of b's. /v1/explain
    // gives its own policy's verdict.
    let Some(s) = Scenario::new("agent_api") else {
        return;
    };
    let policy = "rules:\n  - name: api\n    allow: { method: GET, url: \"api.test/v1/**\" }\n";
    let d = s.daemon().agent("a", policy).agent("b", policy).start();
    // Something listens there, so a refusal is ours, not a closed port.
    let up7 = enforcer_tests::Upstream::http("127.0.0.7", "seven");
    let up8 = enforcer_tests::Upstream::http("127.0.0.8", "eight");
    for (agent, up) in [("a", &up7), ("b", &up8)] {
        let out = d.probe(agent, &["tcp", &up.addr.to_string()]);
        assert!(stdout(&out).contains("(os error 1)"), "{}", stdout(&out));
    }
    assert!(up7.hits().is_empty() && up8.hits().is_empty());
    let mut text = String::new();
    assert!(
        enforcer_tests::eventually(10, || {
            let out = d.curl("a", &["http://enforcer.internal/v1/denials"]);
            text = stdout(&out);
            text.contains(&up7.addr.to_string())
        }),
        "{text}\n{}",
        d.log()
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["agent"], d.agent("a"));
    let first = &v["denials"][0];
    assert_eq!(first["kind"], "kernel", "{v:#}");
    assert!(
        first["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{v:#}"
    );
    assert!(
        !text.contains(&up8.addr.to_string()),
        "b's refusal leaked: {text}"
    );
    // The same over HTTPS.
    let out = d.curl("a", &["https://enforcer.internal/v1/denials?limit=1"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(&out), stderr(&out)));
    assert_eq!(v["denials"].as_array().unwrap().len(), 1, "{v:#}");
    // Its own policy's verdict.
    let out = d.curl(
        "a",
        &["http://enforcer.internal/v1/explain?method=DELETE&url=https://api.test/v1/x"],
    );
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["decision"], "deny", "{v:#}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("no rule allows DELETE"),
        "{v:#}"
    );
}

#[test]
fn a_deny_with_an_exception_lets_the_excepted_host_fall_through_to_its_allow() {
    // Scenario: `*.foo.test` is allowed, and denied except for `jira.foo.test`. The agent
    // reaches jira (allowed by the wildcard allow, not by the exception) and is denied wiki;
    // both names resolve to the same upstream, which sees only jira's request.
    let Some(s) = Scenario::new("l7_except") else {
        return;
    };
    let up = WebUpstream::http("127.0.0.5", "foo");
    let p = up.addr.port();
    let policy = "rules:\n  - name: no-foo-except-jira\n    deny: { url: \"*.foo.test:*\" }\n\
                  \x20   except: { url: \"jira.foo.test:*\" }\n\
                  \x20 - name: foo\n    allow: { url: \"*.foo.test:*\" }\n";
    let d = s
        .daemon()
        .agent("a", policy)
        .resolve("jira.foo.test", "127.0.0.5")
        .resolve("wiki.foo.test", "127.0.0.5")
        .dns_lines("  allow_internal_answers: [\"127.0.0.0/8\"]\n")
        .start();
    let jira = curl(&d, "a", &[&format!("http://jira.foo.test:{p}/browse/X-1")]);
    assert_eq!(status_of(&jira), 200, "{jira}\n{}", d.log());
    let wiki = curl(&d, "a", &[&format!("http://wiki.foo.test:{p}/")]);
    assert_eq!(status_of(&wiki), 403, "{wiki}");
    assert!(
        wiki.contains("denied by rule 'no-foo-except-jira'"),
        "{wiki}"
    );
    let hits = up.hits();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert!(hits[0].host.starts_with("jira.foo.test"), "{hits:?}");
}
