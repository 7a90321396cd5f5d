//! The first hour of an operator: what a new user meets, tried the way they would. Needs root
//! (see the harness docs).

use std::{path::Path, time::Duration};

use enforcer_tests::{
    Scenario, Upstream, cgroup2_mount, eventually, stderr, stdout, web::TestCa, web::WebUpstream,
};

/// The venv `cargo xtask test` makes with the agent SDKs (see xtask's bootstrap).
const TEST_VENV: &str = "/opt/enforcer-test/venv";

fn lit_policy(ip: &str) -> String {
    format!("default: deny\nrules:\n  - name: lit\n    allow: {{ url: \"{ip}:*\" }}\n")
}

#[test]
fn root_is_refused_the_same_way_with_or_without_user_root() {
    // Scenario: a root shell runs `enforcer exec` with no --user, and with --user root. Both
    // stop before anything runs, pointing at --allow-root; --user nobody works.
    let Some(s) = Scenario::new("exec_root") else {
        return;
    };
    let d = s.daemon().agent("a", &lit_policy("127.0.0.6")).start();
    for identity in [&[][..], &["--user", "root"][..]] {
        let out = d.exec_as("a", identity, &["true"]).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(125),
            "{identity:?}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("refusing to run the command as root (uid 0)")
                && stderr(&out).contains("--allow-root"),
            "{identity:?}: {}",
            stderr(&out)
        );
    }
    let out = d.exec_cmd("a", &["true"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn exec_sets_variables_names_the_user_and_warns_of_a_kill() {
    // Scenario: --env reaches the command; a command that cannot run names the user it ran
    // as; exec into an agent whose kill switch is engaged says so before the command runs.
    let Some(s) = Scenario::new("exec_details") else {
        return;
    };
    let d = s.daemon().agent("a", &lit_policy("127.0.0.6")).start();
    let out = d
        .exec_as(
            "a",
            &[
                "--user",
                "nobody",
                "--env",
                "AGENT_MODE=test",
                "--env",
                "EMPTY=",
            ],
            &["sh", "-c", "echo \"$AGENT_MODE|$EMPTY|$USER|$HOME\""],
        )
        .output()
        .unwrap();
    assert_eq!(
        stdout(&out).trim(),
        "test||nobody|/nonexistent",
        "{}",
        stderr(&out)
    );
    let out = d.exec_cmd("a", &["/etc/hostname"]).output().unwrap();
    assert_eq!(out.status.code(), Some(126));
    assert!(
        stderr(&out).contains("(as user nobody)"),
        "{}",
        stderr(&out)
    );
    std::fs::write(d.agent_kill_path("a"), b"").unwrap();
    assert!(eventually(10, || d.agent_status("a")["killed"] == true));
    let out = d.exec_cmd("a", &["true"]).output().unwrap();
    assert!(
        stderr(&out).contains("is stopped by the kill switch"),
        "{}",
        stderr(&out)
    );
    let help = d.cli(&["exec", "--help"]);
    let help = stdout(&help);
    for want in ["--allow-root", "125", "126", "127", "--env", "HOME"] {
        assert!(help.contains(want), "exec --help lacks {want}:\n{help}");
    }
}

#[test]
fn a_spliced_host_with_a_private_ca_verifies_through_the_bundle_exec_hands_out() {
    // Scenario: an internal host's certificate comes from the operator's own CA, listed in
    // tls.extra_upstream_roots; the host is spliced (host-level rule). curl trusts only what
    // `enforcer exec` points it at, with no --cacert, and completes TLS with the upstream.
    let Some(s) = Scenario::new("private_ca_splice") else {
        return;
    };
    let ca = TestCa::new("operator private CA");
    let up = WebUpstream::https(
        "127.0.0.6",
        "internal",
        ca.server_config(&["internal.test"]),
    );
    let p = up.addr.port();
    let d = s
        .daemon()
        .agent(
            "a",
            &format!("rules:\n  - name: host\n    allow: {{ url: \"internal.test:{p}\" }}\n"),
        )
        .resolve("internal.test", "127.0.0.6")
        .upstream_ca(&ca, "")
        .start();
    let out = d.curl("a", &[&format!("https://internal.test:{p}/x")]);
    assert!(
        stdout(&out).starts_with("hello from internal GET /x"),
        "{}{}\n{}",
        stdout(&out),
        stderr(&out),
        d.log()
    );
    // Spliced, not intercepted: the upstream saw HTTP from curl itself.
    assert_eq!(up.hits().len(), 1);
}

#[test]
fn a_removed_or_recreated_exec_cgroup_is_made_again_and_enforced() {
    // Scenario: the agent's exec cgroup is removed behind the daemon's back, then removed and
    // created again (a new cgroup id, no programs). Each time, the next exec works, and what
    // it runs is enforced: a refused address gets EPERM, an allowed one is reached.
    let Some(s) = Scenario::new("exec_cgroup_recreated") else {
        return;
    };
    let up = Upstream::http("127.0.0.6", "ok");
    let d = s.daemon().agent("a", &lit_policy("127.0.0.6")).start();
    let exec_cgroup = cgroup2_mount()
        .unwrap()
        .join("enforcer.slice")
        .join(d.agent("a"));
    let addr = up.addr.to_string();
    for recreate in [false, true] {
        std::fs::remove_dir(&exec_cgroup).expect("remove the (empty) exec cgroup");
        if recreate {
            std::fs::create_dir(&exec_cgroup).unwrap();
        }
        let out = d.probe("a", &["tcp", "127.0.0.7:9"]);
        assert!(
            stdout(&out).contains("(os error 1)"),
            "recreate={recreate}: {}{}\n{}",
            stdout(&out),
            stderr(&out),
            d.log()
        );
        let out = d.probe("a", &["tcp", &addr, &addr]);
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
        assert!(
            eventually(10, || d.problems().is_empty()),
            "{:?}",
            d.problems()
        );
    }
}

#[test]
fn status_shows_the_problems_healthz_shows_and_exits_4() {
    // Scenario: a pinned link is removed behind the daemon's back. /healthz turns degraded;
    // `enforcer status` lists the same problem and exits 4.
    let Some(s) = Scenario::new("status_degraded") else {
        return;
    };
    let d = s.daemon().agent("a", &lit_policy("127.0.0.6")).start();
    let out = d.cli(&["status"]);
    // 0 healthy; 4 on a kernel without BPF LSM, which reports its missing protections.
    let expected = if d.has_bpf_lsm() { 0 } else { 4 };
    assert_eq!(out.status.code(), Some(expected), "{}", stdout(&out));
    assert!(d.problems().is_empty(), "{:?}", d.problems());
    let links = d.bpffs.join("links");
    let cgroup_links = std::fs::read_dir(&links)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let victim = std::fs::read_dir(&cgroup_links)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    std::fs::remove_file(&victim).unwrap();
    let out = d.cli(&["status"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(text.lines().next().unwrap().contains("DEGRADED"), "{text}");
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert!(text.contains("problem: ") && text.contains(name), "{text}");
    let (_, health) = enforcer_tests::http_get(d.metrics_port, "/healthz");
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    let json = d.status();
    assert_eq!(json["problems"], health["problems"]);
}

#[test]
fn a_start_that_fails_changes_nothing() {
    // Scenario 1: a second daemon is started on ports the first one holds. It fails, and has
    // created no key, no CA, no pins, no audit log.
    // Scenario 2: a daemon that ran is stopped, one agent's policy file removed, and started
    // again. It fails naming the policy, before touching the kernel or the log: no cgroup is
    // enrolled again, and the audit log is as it was.
    let Some(s) = Scenario::new("failed_start") else {
        return;
    };
    let first = s.daemon().agent("a", &lit_policy("127.0.0.6")).start();
    let second = s.daemon().agent("b", &lit_policy("127.0.0.6")).build();
    second.set_config("proxy_port", &first.proxy_port.to_string());
    let (status, text) = second.start_failing();
    assert!(!status.success(), "{text}");
    assert!(text.contains("binding proxy-v4"), "{text}");
    let state = second.dir.path().join("state");
    for left in ["audit.key", "ca", "agent-ids.json", "kill"] {
        assert!(
            !state.join(left).exists(),
            "a failed start created {left}: {text}"
        );
    }
    assert!(
        !second.bpffs.exists(),
        "a failed start created pins: {text}"
    );
    assert!(!second.dir.path().join("audit/audit.jsonl").exists());

    let mut d = s
        .daemon()
        .agent("a", &lit_policy("127.0.0.6"))
        .agent("b", &lit_policy("127.0.0.6"))
        .start();
    d.stop();
    let audit_before = std::fs::read_to_string(d.dir.path().join("audit/audit.jsonl")).unwrap();
    let links_before = listing(&d.bpffs.join("links"));
    std::fs::remove_file(d.policy_path("b")).unwrap();
    let (status, text) = d.start_failing();
    assert!(!status.success(), "{text}");
    assert!(text.contains("b.yaml"), "{text}");
    assert!(!text.contains("cgroup enrolled"), "{text}");
    assert_eq!(
        std::fs::read_to_string(d.dir.path().join("audit/audit.jsonl")).unwrap(),
        audit_before
    );
    assert_eq!(listing(&d.bpffs.join("links")), links_before);
}

/// Every path below `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            out.push(e.path().display().to_string());
            if e.path().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_openai_and_anthropic_sdks_show_the_denial_reason() {
    // Scenario: an agent's SDK (the real `openai` and `anthropic` packages, from PyPI, run as
    // nobody under /usr/bin/python3's venv) posts to a host whose policy allows only GET. The
    // exception text carries the reason, and nothing reached the upstream.
    let Some(s) = Scenario::new("sdk_denials") else {
        return;
    };
    let python = Path::new(TEST_VENV).join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: `cargo xtask test` creates it",
        python.display()
    );
    let up = WebUpstream::http("127.0.0.5", "api");
    let p = up.addr.port();
    let d = s
        .daemon()
        .agent(
            "a",
            &format!(
                "rules:\n  - name: reads\n    allow: {{ method: [GET], url: \"api.test:{p}/**\" }}\n"
            ),
        )
        .resolve("api.test", "127.0.0.5")
        .start();
    let script = format!(
        "import openai, anthropic\n\
         base = 'http://api.test:{p}'\n\
         c = openai.OpenAI(base_url=base + '/v1', api_key='sk-test', max_retries=0)\n\
         try:\n    c.chat.completions.create(model='m', messages=[{{'role': 'user', 'content': 'hi'}}])\n\
         except openai.PermissionDeniedError as e:\n    print('openai:', e)\n\
         a = anthropic.Anthropic(base_url=base, api_key='sk-test', max_retries=0)\n\
         try:\n    a.messages.create(model='m', max_tokens=5, messages=[{{'role': 'user', 'content': 'hi'}}])\n\
         except anthropic.PermissionDeniedError as e:\n    print('anthropic:', e)\n"
    );
    let out = d
        .exec_cmd("a", &[python.to_str().unwrap(), "-c", &script])
        .output()
        .unwrap();
    let text = stdout(&out);
    for sdk in ["openai", "anthropic"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{sdk}:")))
            .unwrap_or_else(|| panic!("no {sdk} line: {text}{}", stderr(&out)));
        assert!(
            line.contains("no rule allows POST api.test"),
            "{sdk} shows no reason: {line}"
        );
    }
    assert!(up.hits().is_empty(), "{:?}", up.hits());
    std::thread::sleep(Duration::from_millis(10));
}
