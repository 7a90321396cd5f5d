//! Policies that write and check themselves, end to end: traffic recorded by a real daemon in
//! dry run, `enforcer policy suggest` on its audit log, the suggestion in force, then `policy
//! replay` of a tightened policy. Needs root (see the harness docs).

use enforcer_tests::{Scenario, TestDaemon, eventually, stderr, stdout, web::WebUpstream};

/// Runs the agent's requests with curl (one process, `--next` between them), as nobody;
/// one status code a line.
fn traffic(d: &TestDaemon, p: u16) -> String {
    let base = format!("http://api.test:{p}");
    let urls = [
        format!("{base}/v1/customers/cus_NffrFeUfNV2Hib"),
        format!("{base}/v1/customers/cus_Q2rTyUiOp9aSdF"),
        format!("{base}/v1/items/42"),
        format!("{base}/v1/items/43"),
    ];
    let mut args: Vec<&str> = Vec::new();
    for u in &urls {
        args.extend([
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            u.as_str(),
            "--next",
        ]);
    }
    let charges = format!("{base}/v1/charges");
    args.extend([
        "-sS",
        "--noproxy",
        "*",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\n",
        "-d",
        "amount=500",
        charges.as_str(),
    ]);
    let out = d.curl("a", &args);
    format!("{}{}", stdout(&out), stderr(&out))
}

#[test]
fn suggest_writes_a_policy_from_dry_run_traffic_and_replay_tells_what_a_tighter_one_changes() {
    // Scenario: agent `a` runs in dry run with a policy that allows nothing: every request is
    // `would_deny` and goes through. `policy suggest` turns the audit log into a policy with
    // ids generalised; it loads, and replaying the same records against it denies nothing.
    // The suggestion is put in force: the same traffic is now allowed. A tightened policy
    // (no items, charges only with a small amount) replayed against the log reports the items
    // as allow -> deny and the charge as undetermined (the audit keeps no bodies), exit 1.
    let Some(s) = Scenario::new("suggest_replay") else {
        return;
    };
    let up = WebUpstream::http("127.0.0.5", "api");
    let p = up.addr.port();
    let d = s
        .daemon()
        .agent("a", "mode: dry_run\ndefault: deny\nrules: []\n")
        .resolve("api.test", "127.0.0.5")
        // No rule names api.test in dry run, and its address is a loopback one: let such
        // answers through, as an operator trying a policy on an internal API would.
        .dns_lines("  allow_internal_answers: [\"127.0.0.0/8\"]\n")
        .start();
    let codes = traffic(&d, p);
    assert_eq!(codes.lines().filter(|l| *l == "200").count(), 5, "{codes}");
    assert_eq!(up.hits().len(), 5);

    // The audit writer batches: wait until the five requests are on disk before reading it.
    let requests = |log: &str| {
        log.lines()
            .filter(|l| l.contains("\"event\":\"request\""))
            .count()
    };
    assert!(
        eventually(10, || requests(&d.audit_log()) == 5),
        "{}",
        d.audit_log()
    );
    let agent = d.agent("a").to_owned();
    let out = d.cli(&["policy", "suggest", "--agent", &agent]);
    assert!(out.status.success(), "{}", stderr(&out));
    let suggested = stdout(&out);
    for want in [
        format!(r#"allow: {{ method: [GET], url: "http://api.test:{p}/v1/customers/*" }}"#),
        format!(r#"allow: {{ method: [GET], url: "http://api.test:{p}/v1/items/*" }}"#),
        format!(r#"allow: {{ method: [POST], url: "http://api.test:{p}/v1/charges" }}"#),
        "# 2 requests, first ".to_owned(),
    ] {
        assert!(suggested.contains(&want), "no {want} in:\n{suggested}");
    }
    let file = d.dir.path().join("suggested.yaml");
    std::fs::write(&file, &suggested).unwrap();
    let check = d.cli(&["policy", "check", file.to_str().unwrap()]);
    assert!(check.status.success(), "{}", stderr(&check));
    let replay = d.cli(&[
        "policy",
        "replay",
        "--policy",
        file.to_str().unwrap(),
        "--agent",
        &agent,
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&replay.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(&replay), stderr(&replay)));
    let transitions = report["transitions"].as_object().unwrap();
    assert!(
        transitions.keys().all(|k| k == "deny -> allow"),
        "{report:#}"
    );
    assert_eq!(transitions["deny -> allow"]["count"], 5, "{report:#}");
    assert!(
        report["undetermined"].as_object().unwrap().is_empty(),
        "{report:#}"
    );

    // In force: allowed, not would_deny.
    std::fs::write(d.policy_path("a"), &suggested).unwrap();
    assert!(eventually(15, || {
        d.agent_status("a")["last_reload"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("reloaded"))
    }));
    let codes = traffic(&d, p);
    assert_eq!(codes.lines().filter(|l| *l == "200").count(), 5, "{codes}");
    let log = d.audit_log();
    let allowed = log
        .lines()
        .filter(|l| {
            l.contains("\"event\":\"request\"") && l.contains("\"policy_result\":\"allow\"")
        })
        .count();
    assert_eq!(allowed, 5, "{log}");

    // Tightened: the log's allowed items become denials, the charge cannot be told.
    let tight = d.dir.path().join("tight.yaml");
    std::fs::write(
        &tight,
        format!(
            "default: deny\nrules:\n  - name: customers\n    allow: {{ method: GET, url: \"api.test:{p}/v1/customers/*\" }}\n\
             \x20 - name: small-charges\n    allow: {{ method: POST, url: \"api.test:{p}/v1/charges\" }}\n\
             \x20   body: {{ jsonpath: \"$.amount\", max: 100 }}\n"
        ),
    )
    .unwrap();
    let out = d.cli(&[
        "policy",
        "replay",
        "--policy",
        tight.to_str().unwrap(),
        "--agent",
        &agent,
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let text = stdout(&out);
    assert!(text.contains("allow -> deny: 2"), "{text}");
    assert!(text.contains("/v1/items/42"), "{text}");
    assert!(
        text.contains("undetermined: 2 (rule 'small-charges'"),
        "{text}"
    );
}
