//! `ask` rules end to end: a request held for a human, approved, rejected, timed out and
//! approved late for its retry; the notify hook; the approvals API closed to enrolled
//! processes. Needs root (see the harness docs).

use std::{process::Stdio, time::Duration};

use enforcer_tests::{Scenario, TestDaemon, eventually, stderr, stdout, web::WebUpstream};

/// The first held request's id and its view, once one is pending (10 s at most).
fn pending(d: &TestDaemon) -> serde_json::Value {
    let mut found = serde_json::Value::Null;
    assert!(
        eventually(10, || {
            let out = d.cli(&["approvals", "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            match v["approvals"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["state"] == "pending"))
            {
                Some(a) => {
                    found = a.clone();
                    true
                }
                None => false,
            }
        }),
        "nothing held:\n{}",
        d.log()
    );
    found
}

fn post(d: &TestDaemon, p: u16, amount: u64) -> std::process::Child {
    d.curl_cmd(
        "a",
        &[
            "-w",
            "\n%{http_code}\n",
            "-H",
            "content-type: application/json",
            "-d",
            &format!("{{\"amount\": {amount}}}"),
            &format!("http://api.test:{p}/v1/refunds"),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

fn output(child: std::process::Child) -> String {
    let out = child.wait_with_output().unwrap();
    format!("{}{}", stdout(&out), stderr(&out))
}

#[test]
fn a_big_refund_waits_for_a_human_who_approves_rejects_or_answers_late() {
    let Some(s) = Scenario::new("approvals") else {
        return;
    };
    let up = WebUpstream::http("127.0.0.5", "api");
    let p = up.addr.port();
    let hooks = tempfile::tempdir().unwrap();
    let notified = hooks.path().join("notified.jsonl");
    let policy = format!(
        "rules:\n  - name: refunds\n    allow: {{ method: POST, url: \"api.test:{p}/v1/refunds\" }}\n\
         \x20 - name: big-refunds\n    ask: {{ method: POST, url: \"api.test:{p}/v1/refunds\" }}\n\
         \x20   body: {{ jsonpath: \"$.amount\", min: 10000 }}\n    timeout: 3s\n"
    );
    let d = s
        .daemon()
        .agent("a", &policy)
        .resolve("api.test", "127.0.0.5")
        .config(&format!(
            "approvals:\n  notify: [/bin/sh, -c, \"cat >> {}\"]",
            notified.display()
        ))
        .start();

    // A small refund: allowed at once.
    let small = output(post(&d, p, 5));
    assert!(small.trim_end().ends_with("200"), "{small}");
    assert_eq!(up.hits().len(), 1);

    // Approved: held (nothing upstream), listed with the amount, then forwarded.
    let child = post(&d, p, 50_000);
    let held = pending(&d);
    assert_eq!(
        up.hits().len(),
        1,
        "a held request must not reach the upstream"
    );
    assert_eq!(held["rule"], "big-refunds");
    assert_eq!(held["method"], "POST");
    assert!(
        held["url"].as_str().unwrap().ends_with("/v1/refunds"),
        "{held}"
    );
    assert_eq!(held["fields"][0][1], "50000", "{held}");
    assert_eq!(held["comm"], "curl");
    let id = held["id"].as_str().unwrap().to_owned();
    let out = d.cli(&["approve", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = output(child);
    assert!(text.trim_end().ends_with("200"), "{text}\n{}", d.log());
    assert_eq!(up.hits().len(), 2);
    assert_eq!(up.hits()[1].body, "{\"amount\": 50000}");
    // The hook got the held request as one JSON line.
    assert!(eventually(5, || std::fs::read_to_string(&notified)
        .unwrap_or_default()
        .contains(&id)));
    let line = std::fs::read_to_string(&notified).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(v["id"], id.as_str());

    // Rejected: the agent reads why.
    let child = post(&d, p, 70_000);
    let id = pending(&d)["id"].as_str().unwrap().to_owned();
    let out = d.cli(&["reject", &id, "--reason", "too big for today"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = output(child);
    assert!(text.trim_end().ends_with("403"), "{text}");
    assert!(
        text.contains("rejected by uid 0: too big for today"),
        "{text}"
    );
    assert_eq!(up.hits().len(), 2);

    // No answer in time: 403, retryable, with the approval id; approved late, the retry
    // goes through (once).
    let child = post(&d, p, 90_000);
    let id = pending(&d)["id"].as_str().unwrap().to_owned();
    let text = output(child);
    assert!(text.trim_end().ends_with("403"), "{text}");
    assert!(
        text.contains(&format!("\"approval_id\":\"{id}\"")),
        "{text}"
    );
    assert!(text.contains("\"retryable\":true"), "{text}");
    let out = d.cli(&["approve", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let retry = output(post(&d, p, 90_000));
    assert!(retry.trim_end().ends_with("200"), "{retry}");
    assert_eq!(up.hits().len(), 3);

    // Every step is in the audit log.
    let log = d.audit_log();
    for kind in ["ask", "approved", "rejected", "expired"] {
        assert!(
            log.contains(&format!("\"event\":\"{kind}\"")),
            "no {kind} record:\n{log}"
        );
    }
    assert!(log.contains("approved by uid 0"), "{log}");
    let (_, metrics) = enforcer_tests::http_get(d.metrics_port, "/metrics");
    assert!(
        metrics.contains("enforcer_approvals_total{result=\"rejected\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("enforcer_approvals_pending 0"),
        "{metrics}"
    );
}

#[test]
fn an_enrolled_process_cannot_see_or_answer_approvals() {
    // Root inside the agent's cgroup (so the admin socket's permissions are no obstacle):
    // the daemon refuses it because it is enrolled.
    let Some(s) = Scenario::new("approvals_enrolled") else {
        return;
    };
    let d = s.daemon().agent("a", "rules: []\n").start();
    let bin = enforcer_tests::enforcer_bin();
    let config = d.config.to_str().unwrap().to_owned();
    for args in [vec!["approvals"], vec!["approve", "x"]] {
        let mut argv = vec![bin.to_str().unwrap(), "--config", config.as_str()];
        argv.extend(args);
        let out = d.exec_as("a", &["--allow-root"], &argv).output().unwrap();
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("runs inside an enrolled cgroup"),
            "{}{}",
            stdout(&out),
            stderr(&out)
        );
    }
    let _ = Duration::ZERO;
}

#[test]
fn a_request_held_across_a_reload_that_denies_it_stays_denied_on_approval() {
    // Scenario: a big refund is held; meanwhile the policy is reloaded with a deny for
    // refunds. The approval comes: the policy in force decides, and the request is denied,
    // never forwarded.
    let Some(s) = Scenario::new("approvals_reload") else {
        return;
    };
    let up = WebUpstream::http("127.0.0.5", "api");
    let p = up.addr.port();
    let ask = format!(
        "rules:\n  - name: big-refunds\n    ask: {{ method: POST, url: \"api.test:{p}/v1/refunds\" }}\n\
         \x20   timeout: 30s\n"
    );
    let d = s
        .daemon()
        .agent("a", &ask)
        .resolve("api.test", "127.0.0.5")
        .start();
    let child = post(&d, p, 50_000);
    let id = pending(&d)["id"].as_str().unwrap().to_owned();
    std::fs::write(
        d.policy_path("a"),
        format!("{ask}  - name: no-refunds\n    deny: {{ url: \"api.test:{p}/v1/refunds\" }}\n"),
    )
    .unwrap();
    assert!(eventually(15, || {
        d.agent_status("a")["last_reload"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("reloaded"))
    }));
    let out = d.cli(&["approve", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = output(child);
    assert!(text.trim_end().ends_with("403"), "{text}");
    assert!(text.contains("denied by rule 'no-refunds'"), "{text}");
    assert!(up.hits().is_empty(), "{:?}", up.hits());
}
