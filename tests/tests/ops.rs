//! Running as a service: restarts and upgrades with no enforcement gap, systemd's notify and
//! file-descriptor-store protocol, metrics and health. Needs root (see the harness docs).

use std::{
    os::{fd::AsRawFd as _, unix::net::UnixDatagram},
    time::Duration,
};

use enforcer_tests::{Counter, Lines, Scenario, Upstream, eventually, http_get, reap, stdout};

fn policy() -> String {
    "default: deny\nrules:\n  - name: lit\n    allow: { url: \"127.0.0.6:*\" }\n".to_string()
}

#[test]
fn a_refused_destination_is_never_reached_across_sigkill_restart_and_program_upgrade() {
    // Scenario: two enrolled loops connect every 20 ms, one to a refused address, one to an
    // allowed one. The daemon is SIGKILLed and started again (which swaps every attached
    // program for the new daemon's with BPF_LINK_UPDATE), then stopped cleanly and started
    // again. The refused loop never succeeds once; the allowed loop recovers each time.
    let Some(s) = Scenario::new("no_gap") else {
        return;
    };
    let allowed = Upstream::http("127.0.0.6", "ok");
    let refused = Counter::new("127.0.0.7");
    let mut d = s.daemon().agent("a", &policy()).start();
    let allowed_addr = allowed.addr.to_string();
    let mut good = d.probe_spawn("a", &["loop", &allowed_addr, &allowed_addr, "20"]);
    let mut bad = d.probe_spawn("a", &["loop", &refused.addr.to_string(), "x", "20"]);
    let (good_lines, bad_lines) = (Lines::of(&mut good), Lines::of(&mut bad));
    assert!(
        good_lines
            .wait_for(Duration::from_secs(10), |l| l.starts_with("ok "))
            .is_some()
    );
    // The refused loop must be enrolled and running before the first kill: its `enforcer
    // exec` talks to the daemon, and a kill during that request would end it before its
    // first attempt (seen once in CI as "the refused loop made only 0 attempts").
    let first = bad_lines.next(Duration::from_secs(10));
    assert!(
        first.as_deref().is_some_and(|l| l.starts_with("fail ")),
        "the refused loop did not start: {first:?}\n{}",
        d.log()
    );

    for round in 0..2 {
        if round == 0 {
            d.kill9();
        } else {
            d.stop();
        }
        std::thread::sleep(Duration::from_millis(300));
        d.spawn();
        assert!(
            good_lines
                .wait_for(Duration::from_secs(10), |l| l.starts_with("ok "))
                .is_some(),
            "round {round}: the allowed loop did not recover:\n{}",
            d.log()
        );
    }
    assert!(
        d.log().matches("attached=0 updated=13").count() >= 2,
        "restarts must update links in place:\n{}",
        d.log()
    );
    // Stop the refused loop, then read everything it printed: all failures, and nothing
    // reached the target.
    reap(bad);
    let mut seen = 1;
    while let Some(line) = bad_lines.next(Duration::from_secs(2)) {
        assert!(
            line.starts_with("fail "),
            "the refused destination was reached: {line}"
        );
        seen += 1;
    }
    // Not vacuous: the loop kept trying while the daemon was killed and restarted.
    assert!(seen >= 5, "the refused loop made only {seen} attempts");
    assert_eq!(refused.accepted(), 0);
    reap(good);
}

#[test]
fn metrics_move_with_traffic() {
    let Some(s) = Scenario::new("metrics") else {
        return;
    };
    let up = Upstream::http("127.0.0.6", "ok");
    let d = s.daemon().agent("a", &policy()).start();
    let agent = d.agent("a").to_owned();
    let (code, before) = http_get(d.metrics_port, "/metrics");
    assert_eq!(code, 200);
    assert!(
        before.contains("enforcer_policy_evaluation_seconds"),
        "{before}"
    );
    let addr = up.addr.to_string();
    assert!(d.probe("a", &["tcp", &addr, &addr]).status.success());
    assert!(stdout(&d.probe("a", &["tcp", "127.0.0.7:9"])).contains("(os error 1)"));
    let (_, after) = http_get(d.metrics_port, "/metrics");
    let line = |name: &str| {
        after
            .lines()
            .find(|l| l.starts_with(name) && l.contains(&format!("agent=\"{agent}\"")))
            .map(str::to_owned)
            .unwrap_or_default()
    };
    assert!(
        line("enforcer_decisions_total").contains("result=\"allow\""),
        "{after}"
    );
    assert!(line("enforcer_decisions_total").ends_with(" 1"), "{after}");
    assert!(
        line("enforcer_kernel_refused_total").ends_with(" 1"),
        "{after}"
    );
    assert!(
        line("enforcer_kernel_redirected_total").ends_with(" 1"),
        "{after}"
    );
    assert!(
        after.contains("enforcer_audit_records_written_total"),
        "{after}"
    );
}

/// The metric families the README's table lists, and whether each is event-only.
fn readme_metric_families() -> Vec<(String, bool)> {
    let readme = include_str!("../../README.md");
    let table = readme
        .split("| family | labels | what |")
        .nth(1)
        .expect("the README lists the metric families in a table");
    table
        .lines()
        .skip(2)
        .take_while(|l| l.trim_start().starts_with('|'))
        .map(|row| {
            let name = row
                .split('`')
                .nth(1)
                .expect("a family name in backticks")
                .to_owned();
            (name, row.contains("*event-only*"))
        })
        .collect()
}

/// The sum of a family's samples in a scrape (a histogram by its `_count`); `None` when the
/// family has no sample at all.
fn family_total(scrape: &str, family: &str) -> Option<f64> {
    let count = format!("{family}_count");
    let values: Vec<f64> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, rest) = l.split_at(l.find(['{', ' '])?);
            (name == family || name == count)
                .then(|| rest.rsplit(' ').next()?.parse::<f64>().ok())
                .flatten()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

#[test]
fn every_metric_family_the_readme_lists_moves_under_traffic_or_is_event_only() {
    // Scenario: one of each event the families count (an allowed and a refused connect, a
    // refused DNS name, a TXT query under a wildcard, a raw packet, a held connection, a policy reload, the agent's and
    // the global kill switch); every family the README lists must change, but for those it
    // marks event-only, which must at least be exported.
    let Some(s) = Scenario::new("metrics_families") else {
        return;
    };
    let families = readme_metric_families();
    assert!(families.len() >= 10, "{families:?}");
    let up = Upstream::http("127.0.0.6", "ok");
    let policy = format!(
        "{}  - name: wild\n    allow: {{ url: \"*.wild.test\" }}\n",
        policy()
    );
    // A credential, so that a placeholder can leak (through a DNS name, below).
    let keys = tempfile::tempdir().unwrap();
    let secret = keys.path().join("k");
    std::fs::write(&secret, "ops-secret\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let d = s
        .daemon()
        .agent("a", &policy)
        .agent_lines(
            "a",
            &format!(
                "    credentials:\n      - name: k\n        secret_file: {}\n        env: K\n        \
                 hosts: [api.test]\n",
                secret.display()
            ),
        )
        .start();
    let placeholder = {
        let out = d.cli(&["credentials", "env", "--agent", d.agent("a")]);
        stdout(&out)
            .trim()
            .strip_prefix("K=")
            .unwrap_or_else(|| panic!("{}", stdout(&out)))
            .to_owned()
    };
    let (code, before) = http_get(d.metrics_port, "/metrics");
    assert_eq!(code, 200);
    let addr = up.addr.to_string();
    let held = d.probe_spawn("a", &["tcp-hold", &addr, "20"]);
    assert!(
        eventually(10, || d.agent_status("a")["open_connections"] == 1),
        "the held connection is open"
    );
    let (_, while_open) = http_get(d.metrics_port, "/metrics");
    assert!(stdout(&d.probe("a", &["tcp", "127.0.0.7:9"])).contains("(os error 1)"));
    let out = d.probe("a", &["dns", "127.0.0.53:53", "evil.test", "A"]);
    assert!(
        stdout(&out).contains("rcode Non-Existent Domain"),
        "{}",
        stdout(&out)
    );
    // A TXT query under a wildcard: refused by the exfiltration limits.
    let out = d.probe("a", &["dns", "127.0.0.53:53", "x.wild.test", "TXT"]);
    assert!(stdout(&out).contains("Refused"), "{}", stdout(&out));
    // A placeholder leaving in a DNS name.
    let leak = format!("{placeholder}.wild.test");
    let out = d.probe("a", &["dns", "127.0.0.53:53", &leak, "A"]);
    assert!(
        stdout(&out).contains("rcode Non-Existent Domain"),
        "{}",
        stdout(&out)
    );
    let raw = d
        .exec_as(
            "a",
            &["--allow-root"],
            &[
                enforcer_tests::probe_bin().to_str().unwrap(),
                "raw-icmp",
                "127.0.0.1",
            ],
        )
        .output()
        .unwrap();
    assert!(!stdout(&raw).contains("reply"), "{}", stdout(&raw));
    let policy_file = d.policy_path("a");
    let text = std::fs::read_to_string(&policy_file).unwrap();
    std::fs::write(&policy_file, format!("{text}# edited\n")).unwrap();
    assert!(eventually(15, || {
        d.agent_status("a")["last_reload"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("reloaded"))
    }));
    std::fs::write(d.agent_kill_path("a"), b"").unwrap();
    std::fs::write(d.global_kill_path(), b"").unwrap();
    assert!(eventually(10, || d.status()["kill_switch"]["global"] == true));
    // The switch is counted when its record is written, just after the state changes.
    assert!(eventually(5, || {
        let (_, now) = http_get(d.metrics_port, "/metrics");
        family_total(&now, "enforcer_kill_switch_changes_total").unwrap_or(0.0) >= 2.0
    }));
    let (_, after) = http_get(d.metrics_port, "/metrics");
    reap(held);
    for (family, event_only) in families {
        let b = family_total(&before, &family).unwrap_or(0.0);
        let a = family_total(&after, &family).unwrap_or(0.0);
        let open = family_total(&while_open, &family).unwrap_or(0.0);
        if event_only {
            // A counter's TYPE line names it without `_total` (OpenMetrics).
            let base = family.strip_suffix("_total").unwrap_or(&family);
            assert!(
                after.contains(&format!("# TYPE {base} ")) || after.contains(&family),
                "{family} is not exported:\n{after}"
            );
        } else {
            assert!(
                a != b || open != b,
                "{family} did not move under traffic ({b} before, {open} with a connection \
                 open, {a} after)"
            );
        }
    }
}

/// Each thread's voluntary context switches, by thread name, for the daemon's `proxy-*`
/// threads.
fn proxy_thread_wakeups(pid: u32) -> std::collections::BTreeMap<String, u64> {
    enforcer_tests::proxy_threads(pid)
        .into_iter()
        .map(|(name, task)| {
            let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
            let switches = status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            (name, switches)
        })
        .collect()
}

#[test]
fn proxy_threads_follow_the_config_and_share_the_connections() {
    let Some(s) = Scenario::new("proxy threads") else {
        return;
    };
    let up = Upstream::http("127.0.0.6", "ok");
    let d = s
        .daemon()
        .agent("a", &policy())
        .config("proxy_threads: 3\n")
        .start();
    let pid = d.pid().expect("the daemon runs");
    let before = proxy_thread_wakeups(pid);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        ["proxy-0", "proxy-1", "proxy-2"],
        "proxy_threads: 3 must start exactly three proxy threads"
    );
    // Six connections, handed round robin: every thread serves two, so every thread wakes.
    let addr = up.addr.to_string();
    for i in 0..6 {
        let out = d.probe("a", &["tcp", &addr, &addr]);
        assert!(
            out.status.success(),
            "request {i}: {}\n{}",
            stdout(&out),
            d.log()
        );
    }
    let after = proxy_thread_wakeups(pid);
    for (name, n) in &before {
        assert!(
            after[name] > *n,
            "{name} served nothing: {before:?} -> {after:?}"
        );
    }
}

#[test]
fn healthz_turns_degraded_when_a_link_is_detached_behind_the_daemons_back() {
    let Some(s) = Scenario::new("healthz") else {
        return;
    };
    let d = s.daemon().agent("a", &policy()).start();
    let (code, body) = http_get(d.metrics_port, "/healthz");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    if d.has_bpf_lsm() {
        assert_eq!(code, 200, "{body}");
        assert_eq!(health["status"], "healthy");
    } else {
        // Degraded from the start, for the protections this kernel cannot give, and only
        // for those.
        assert_eq!(code, 503, "{body}");
        assert!(d.problems().is_empty(), "{:?}", d.problems());
    }
    assert_eq!(health["engine_loaded"], true);
    assert!(!body.contains("redirect_connect4 is"), "{body}");
    // Remove one pinned link: the last reference goes, the program is detached.
    let cgroup_id = {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(d.cgroup("a")).unwrap().ino()
    };
    let pin = d
        .bpffs
        .join("links")
        .join(cgroup_id.to_string())
        .join("redirect_connect4");
    std::fs::remove_file(&pin).unwrap();
    let (code, body) = http_get(d.metrics_port, "/healthz");
    assert_eq!(code, 503, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "degraded");
    assert!(body.contains("redirect_connect4"), "{body}");
}

#[test]
fn under_systemd_ready_comes_after_listening_and_stored_sockets_make_connects_wait() {
    // Scenario: the test plays systemd. The daemon reports READY=1 and hands its listening
    // sockets to the fd store. The daemon dies; an enrolled client connects to an allowed
    // destination meanwhile: the connect completes into the stored socket's backlog and the
    // request waits. The daemon comes back with the stored sockets (LISTEN_FDS) and answers
    // it.
    let Some(s) = Scenario::new("systemd_fdstore") else {
        return;
    };
    let up = Upstream::http("127.0.0.6", "ok");
    let mut d = s.daemon().agent("a", &policy()).build();
    let notify_path = d.dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    d.spawn_as_systemd(&notify_path, &[]);

    let mut stored: Vec<(String, std::os::fd::OwnedFd)> = Vec::new();
    let mut ready = false;
    while !ready || stored.len() < 6 {
        let (text, fds) = recv_notify(&notify);
        if text.contains("READY=1") {
            // By now everything must be listening.
            assert_eq!(
                stored.len(),
                6,
                "READY before the sockets were stored: {text}"
            );
            assert!(std::net::TcpStream::connect(("127.0.0.1", d.proxy_port)).is_ok());
            ready = true;
        }
        if text.contains("FDSTORE=1") {
            let name = text
                .lines()
                .find_map(|l| l.strip_prefix("FDNAME="))
                .expect("stored sockets are named")
                .to_owned();
            assert_eq!(fds.len(), 1, "{text}");
            stored.extend(fds.into_iter().map(|fd| (name.clone(), fd)));
        }
    }
    let names: Vec<&str> = stored.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "proxy-v4",
        "proxy-v6",
        "dns-udp-v4",
        "dns-udp-v6",
        "dns-tcp-v4",
        "dns-tcp-v6",
    ] {
        assert!(names.contains(&want), "{names:?}");
    }

    // The client is enrolled now (that needs the daemon) and connects 1 s later, while the
    // daemon is down: the connect completes into the stored socket's backlog and waits.
    let addr = up.addr.to_string();
    let client = d.probe_spawn("a", &["delay", "1000", "tcp", &addr, &addr]);
    std::thread::sleep(Duration::from_millis(300));
    d.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    let fds: Vec<(String, i32)> = stored
        .iter()
        .map(|(n, fd)| (n.clone(), fd.as_raw_fd()))
        .collect();
    d.spawn_as_systemd(&notify_path, &fds);
    let out = client.wait_with_output().unwrap();
    let text = stdout(&out);
    assert!(
        text.contains("hello from ok"),
        "the waiting connect must be served after the restart: {text}\n{}",
        d.log()
    );
    assert!(
        d.log().contains("reusing the socket systemd kept for us"),
        "{}",
        d.log()
    );
    assert!(eventually(5, || recv_notify_nonblocking(&notify).contains("READY=1")));
}

/// One notify datagram: its text and any descriptors passed with it.
fn recv_notify(sock: &UnixDatagram) -> (String, Vec<std::os::fd::OwnedFd>) {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut buf = [0u8; 4096];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 8]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .expect("a notify message");
    let mut fds = Vec::new();
    for c in msg.cmsgs().expect("control messages") {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: SCM_RIGHTS gave us new descriptors we now own.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }),
            );
        }
    }
    let n = msg.bytes;
    (String::from_utf8_lossy(&buf[..n]).into_owned(), fds)
}

fn recv_notify_nonblocking(sock: &UnixDatagram) -> String {
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(_) => String::new(),
    }
}
