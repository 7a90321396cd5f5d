//! Kill switch and hot policy reload, end to end. Needs root (see the harness docs).

use std::time::Duration;

use enforcer_tests::{Counter, Lines, Scenario, Upstream, eventually, reap, stdout};

fn allow_literal(ip: &str) -> String {
    format!("default: deny\nrules:\n  - name: lit\n    allow: {{ url: \"{ip}:*\" }}\n")
}

/// A thread's nice value, from `/proc/PID/task/TID/stat` (or `/proc/PID/stat`).
fn nice_in(stat: &std::path::Path) -> Option<i64> {
    let stat = std::fs::read_to_string(stat).ok()?;
    // "TID (COMM) STATE ...": the nice value is the 19th field, the 17th after COMM.
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(16)?.parse().ok()
}

/// The nice value of each of the daemon's `proxy-*` threads, by thread name, and that of its
/// main thread.
fn proxy_thread_nice(pid: u32) -> (std::collections::BTreeMap<String, i64>, i64) {
    let main =
        nice_in(std::path::Path::new(&format!("/proc/{pid}/stat"))).expect("the daemon's stat");
    let threads = enforcer_tests::proxy_threads(pid)
        .into_iter()
        .filter_map(|(name, task)| Some((name, nice_in(&task.join("stat"))?)))
        .collect();
    (threads, main)
}

#[test]
fn kill_switch_resets_open_streams_refuses_new_connects_and_lifts() {
    // Scenario: an enrolled process holds a proxied keep-alive stream. `enforcer kill` cuts it
    // with a reset and new connects fail with EPERM; `enforcer revive` lets them through again.
    let Some(s) = Scenario::new("kill_switch") else {
        return;
    };
    let up = Upstream::http("127.0.0.6", "up6");
    let d = s.daemon().agent("a", &allow_literal("127.0.0.6")).start();
    let mut child = d.probe_spawn("a", &["stream", &up.addr.to_string(), &up.addr.to_string()]);
    let lines = Lines::of(&mut child);
    assert_eq!(
        lines.next(Duration::from_secs(10)).as_deref(),
        Some("connected"),
        "{}",
        d.log()
    );

    let out = d.cli(&["kill", "--agent", d.agent("a")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ended = lines
        .next(Duration::from_secs(5))
        .expect("the stream must end");
    assert_eq!(
        ended,
        "ended reset",
        "the client must see a reset\n{}",
        d.log()
    );
    // The reset came from the kernel destroying our end of the stream by its addresses.
    assert!(
        eventually(5, || d.log().contains("streams_destroyed=1")),
        "{}",
        d.log()
    );
    // The proxy threads were lowered for the tear-down, and are back at their priority.
    assert!(
        eventually(5, || d
            .log()
            .contains("proxy threads back to their priority")),
        "{}",
        d.log()
    );
    let pid = d.pid().expect("the daemon runs");
    let (threads, main) = proxy_thread_nice(pid);
    assert!(
        !threads.is_empty() && threads.values().all(|&n| n == main),
        "{threads:?}, main thread at {main}"
    );
    let refused = d.probe("a", &["tcp", &up.addr.to_string()]);
    assert!(
        stdout(&refused).contains("(os error 1)"),
        "{}",
        stdout(&refused)
    );
    assert_eq!(d.agent_status("a")["killed"], true);
    let audit = d.audit_log();
    assert!(
        audit.lines().any(
            |l| l.contains("\"event\":\"kill_switch\"") && l.contains("\"action\":\"engaged\"")
        ),
        "{audit}"
    );

    let out = d.cli(&["revive", "--agent", d.agent("a")]);
    assert!(out.status.success());
    assert!(
        eventually(5, || d
            .probe("a", &["tcp", &up.addr.to_string()])
            .status
            .success()),
        "connects must work again after revive"
    );
    assert!(d.audit_log().lines().any(|l| l.contains("\"event\":\"kill_switch\"") && l.contains("\"action\":\"lifted\"")));
    reap(child);
}

#[test]
fn a_per_agent_kill_leaves_other_agents_untouched() {
    let Some(s) = Scenario::new("per_agent_kill") else {
        return;
    };
    let up = Upstream::http("127.0.0.6", "up6");
    let d = s
        .daemon()
        .agent("a", &allow_literal("127.0.0.6"))
        .agent("b", &allow_literal("127.0.0.6"))
        .start();
    let mut ca = d.probe_spawn("a", &["stream", &up.addr.to_string(), &up.addr.to_string()]);
    let mut cb = d.probe_spawn("b", &["stream", &up.addr.to_string(), &up.addr.to_string()]);
    let (la, lb) = (Lines::of(&mut ca), Lines::of(&mut cb));
    assert_eq!(
        la.next(Duration::from_secs(10)).as_deref(),
        Some("connected")
    );
    assert_eq!(
        lb.next(Duration::from_secs(10)).as_deref(),
        Some("connected")
    );
    std::fs::create_dir_all(d.agent_kill_path("a").parent().unwrap()).unwrap();
    std::fs::write(d.agent_kill_path("a"), b"").unwrap();
    assert_eq!(
        la.next(Duration::from_secs(5)).as_deref(),
        Some("ended reset")
    );
    // b's stream is still open and b can still connect.
    assert!(
        lb.next(Duration::from_millis(500)).is_none(),
        "b's stream must stay open"
    );
    let ok = d.probe("b", &["tcp", &up.addr.to_string()]);
    assert!(ok.status.success(), "{}", stdout(&ok));
    let refused = d.probe("a", &["tcp", &up.addr.to_string()]);
    assert!(stdout(&refused).contains("(os error 1)"));
    reap(ca);
    reap(cb);
}

#[test]
fn a_symlinked_kill_path_counts_as_engaged() {
    // Scenario: the per-agent kill path is a dangling symlink. It is not followed, and it
    // engages the switch all the same.
    let Some(s) = Scenario::new("symlink_kill") else {
        return;
    };
    let up = Upstream::http("127.0.0.6", "up6");
    let d = s.daemon().agent("a", &allow_literal("127.0.0.6")).start();
    let path = d.agent_kill_path("a");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", &path).unwrap();
    assert!(
        eventually(5, || stdout(&d.probe("a", &["tcp", &up.addr.to_string()]))
            .contains("(os error 1)")),
        "a symlink must engage the switch"
    );
    assert_eq!(up.accepted(), 0);
}

#[test]
fn a_global_kill_file_present_at_start_holds_from_the_first_instant() {
    let Some(s) = Scenario::new("kill_at_start") else {
        return;
    };
    let up = Upstream::http("127.0.0.6", "up6");
    let mut d = s.daemon().agent("a", &allow_literal("127.0.0.6")).build();
    std::fs::create_dir_all(d.global_kill_path().parent().unwrap()).unwrap();
    std::fs::write(d.global_kill_path(), b"").unwrap();
    d.spawn();
    let out = d.probe("a", &["tcp", &up.addr.to_string()]);
    assert!(stdout(&out).contains("(os error 1)"), "{}", stdout(&out));
    assert_eq!(d.status()["kill_switch"]["global"], true);
    let out = d.cli(&["revive"]);
    assert!(out.status.success());
    assert!(eventually(5, || d
        .probe("a", &["tcp", &up.addr.to_string()])
        .status
        .success()));
}

#[test]
fn kill_destroys_other_tcp_sockets_of_the_cgroup() {
    // Scenario: an enrolled process holds a TCP connection that does not go through the
    // proxy: DNS over TCP, redirected from port 53 to the resolver. Dropped packets alone
    // would only stall it; the kill switch destroys it with sock_diag.
    let Some(s) = Scenario::new("kill_sock_destroy") else {
        return;
    };
    let d = s.daemon().agent("a", &allow_literal("127.0.0.6")).start();
    let mut child = d.probe_spawn("a", &["hold", "127.0.0.98:53"]);
    let lines = Lines::of(&mut child);
    assert_eq!(
        lines.next(Duration::from_secs(10)).as_deref(),
        Some("connected"),
        "{}",
        d.log()
    );
    d.cli(&["kill", "--agent", d.agent("a")]);
    let ended = lines
        .next(Duration::from_secs(5))
        .expect("the held socket must be destroyed");
    assert!(
        ended == "ended aborted" || ended == "ended reset",
        "{ended}"
    );
    reap(child);
}

#[test]
fn a_valid_policy_is_reloaded_and_an_invalid_one_is_rejected() {
    // Scenario: the policy file is rewritten to allow 127.0.0.7: the kernel allowlist and the
    // proxy follow without a restart. Then a broken policy is written: it is rejected, the
    // previous one stays in force, status and the audit log say so.
    let Some(s) = Scenario::new("reload") else {
        return;
    };
    let up7 = Upstream::http("127.0.0.7", "up7");
    let d = s.daemon().agent("a", &allow_literal("127.0.0.6")).start();
    let before = d.agent_status("a")["policy_sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(stdout(&d.probe("a", &["tcp", &up7.addr.to_string()])).contains("(os error 1)"));

    std::fs::write(d.policy_path("a"), allow_literal("127.0.0.7")).unwrap();
    assert!(
        eventually(10, || d
            .probe("a", &["tcp", &up7.addr.to_string()])
            .status
            .success()),
        "the new policy must take effect:\n{}",
        d.log()
    );
    let st = d.agent_status("a");
    assert_ne!(st["policy_sha256"].as_str().unwrap(), before);
    assert_eq!(st["last_reload"]["ok"], true);

    std::fs::write(
        d.policy_path("a"),
        "rules:\n  - name: x\n    allow: { url: \"a\", maxx: 1 }\n",
    )
    .unwrap();
    assert!(
        eventually(10, || d.agent_status("a")["last_reload"]["ok"] == false),
        "the broken policy must be reported"
    );
    assert!(
        d.probe("a", &["tcp", &up7.addr.to_string()])
            .status
            .success(),
        "the previous policy must stay"
    );
    let audit = d.audit_log();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"event\":\"policy\"") && l.contains("\"action\":\"rejected\"")),
        "{audit}"
    );
    assert!(
        d.log().contains("policy reload rejected"),
        "a WARN must give the error"
    );
}

#[test]
fn sighup_reloads_and_the_audit_log_of_a_run_verifies() {
    let Some(s) = Scenario::new("sighup") else {
        return;
    };
    let target = Counter::new("127.0.0.7");
    let mut d = s.daemon().agent("a", &allow_literal("127.0.0.6")).start();
    // Change the file and signal at once: the reload must not wait for the periodic check.
    std::fs::write(d.policy_path("a"), allow_literal("127.0.0.7")).unwrap();
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(d.pid().unwrap() as i32, libc::SIGHUP) };
    assert!(eventually(5, || d
        .probe("a", &["tcp", &target.addr.to_string()])
        .status
        .success()));
    d.stop();
    // The whole run's log verifies with the daemon's key.
    let log = d.dir.path().join("audit/audit.jsonl");
    let out = d.cli(&["audit", "verify", log.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}\n{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_hostile_policy_reload_never_holds_up_another_agents_kill_switch() {
    // Scenario: agent b's policy file is replaced by hostile YAML (deeply nested flow
    // sequences, which once took the parser tens of seconds) while agent a's kill switch is
    // engaged. The kill applies at once (new connects refused well within a second; the
    // bound only catches a hang), the hostile policy is refused, and b keeps its old one.
    let Some(s) = Scenario::new("hostile_reload") else {
        return;
    };
    let up = Upstream::http("127.0.0.6", "ok");
    let d = s
        .daemon()
        .agent("a", &allow_literal("127.0.0.6"))
        .agent("b", &allow_literal("127.0.0.6"))
        .start();
    let addr = up.addr.to_string();
    let sha_b = d.agent_status("b")["policy_sha256"].clone();
    let hostile = format!(
        "rules:\n  - name: x\n    allow: {{ url: {}\"a.com\"{} }}\n",
        "[".repeat(160_000),
        "]".repeat(160_000)
    );
    std::fs::write(d.policy_path("b"), hostile).unwrap();
    let started = std::time::Instant::now();
    std::fs::write(d.agent_kill_path("a"), b"").unwrap();
    let refused = eventually(5, || {
        stdout(&d.probe("a", &["tcp", &addr, &addr])).contains("(os error 1)")
    });
    let took = started.elapsed();
    assert!(refused, "the kill did not apply");
    assert!(took < Duration::from_secs(2), "the kill took {took:?}");
    assert!(eventually(10, || {
        d.agent_status("b")["last_reload"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nested deeper than 64"))
    }));
    assert_eq!(d.agent_status("b")["policy_sha256"], sha_b);
    let out = d.probe("b", &["tcp", &addr, &addr]);
    assert!(out.status.success(), "b still works: {}", stdout(&out));
}

#[test]
fn a_narrowing_reload_resets_the_spliced_streams_it_no_longer_allows() {
    // Scenario: two `tcp:` splices are open (to 127.0.0.6 and 127.0.0.7). The policy is
    // reloaded without the rule for .6: that stream is reset (the agent reads ECONNRESET) and
    // audited as revoked; the stream to .7, still allowed, stays open.
    let Some(s) = Scenario::new("revoke") else {
        return;
    };
    let up6 = Upstream::http("127.0.0.6", "up6");
    let up7 = Upstream::http("127.0.0.7", "up7");
    let both = format!(
        "rules:\n  - name: six\n    allow: {{ tcp: \"{}\" }}\n  - name: seven\n    allow: {{ tcp: \"{}\" }}\n",
        up6.addr, up7.addr
    );
    let d = s.daemon().agent("a", &both).start();
    let mut six = d.probe_spawn("a", &["hold", &up6.addr.to_string()]);
    let mut seven = d.probe_spawn("a", &["hold", &up7.addr.to_string()]);
    let (six_lines, seven_lines) = (Lines::of(&mut six), Lines::of(&mut seven));
    for l in [&six_lines, &seven_lines] {
        assert_eq!(
            l.next(Duration::from_secs(10)).as_deref(),
            Some("connected"),
            "{}",
            d.log()
        );
    }
    assert!(eventually(10, || d.agent_status("a")["open_connections"] == 2));
    std::fs::write(
        d.policy_path("a"),
        format!(
            "rules:\n  - name: seven\n    allow: {{ tcp: \"{}\" }}\n",
            up7.addr
        ),
    )
    .unwrap();
    assert_eq!(
        six_lines.next(Duration::from_secs(15)).as_deref(),
        Some("ended reset"),
        "{}",
        d.log()
    );
    assert!(
        seven_lines.next(Duration::from_secs(2)).is_none(),
        "the allowed stream must stay open"
    );
    assert_eq!(d.agent_status("a")["open_connections"], 1);
    let log = d.audit_log();
    let revoked = log
        .lines()
        .find(|l| l.contains("\"action\":\"revoked\""))
        .unwrap_or_else(|| panic!("no revoked record:\n{log}"));
    assert!(
        revoked.contains(&up6.addr.to_string()) && revoked.contains("no tcp rule allows"),
        "{revoked}"
    );
    reap(six);
    reap(seven);
}
