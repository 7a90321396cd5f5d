//! The kernel enforcement path, end to end: real daemon, real eBPF on real cgroups, loopback
//! upstreams. Needs root (see the harness docs).

use std::{net::TcpStream, time::Duration};

use enforcer_tests::{Counter, Lines, Scenario, Upstream, reap, stderr, stdout};

/// A policy allowing GETs to `upstream.test` (port fixed per test) and the literal
/// 127.0.0.6 on any port.
fn policy(port: u16) -> String {
    format!(
        "agent: test\ndefault: deny\nrules:\n\
         \x20 - name: upstream-get\n    allow: {{ method: [GET], url: \"upstream.test:{port}/**\" }}\n\
         \x20 - name: literal\n    allow: {{ url: \"127.0.0.6:*\" }}\n"
    )
}

#[test]
fn allowed_upstream_is_reached_through_the_proxy_and_getpeername_shows_the_original() {
    // Scenario: an enrolled process connects to a destination its policy names; the kernel
    // redirects it to the proxy, which splices it to the upstream, and getpeername still
    // reports the upstream's address.
    let Some(s) = Scenario::new("allowed_upstream") else {
        return;
    };
    let up = Upstream::http("127.0.0.5", "up5");
    let d = s
        .daemon()
        .agent("a", &policy(up.addr.port()))
        .resolve("upstream.test", "127.0.0.5")
        .start();
    // The name goes through the system resolver; the kernel sends the query to our
    // resolver, which answers from dns.static and teaches the kernel the address.
    let name = format!("upstream.test:{}", up.addr.port());
    let out = d.probe("a", &["tcp", &name, &name]);
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "probe failed: {text} {}\n{}",
        stderr(&out),
        d.log()
    );
    assert!(
        text.contains(&format!("peer {}", up.addr)),
        "getpeername must show the original destination: {text}"
    );
    assert!(
        text.contains("200 OK") && text.contains("hello from up5"),
        "{text}"
    );
    assert_eq!(up.hits().len(), 1);
    assert_eq!(
        up.hits()[0].host,
        format!("upstream.test:{}", up.addr.port())
    );
    let counters = &d.agent_status("a")["counters"];
    assert!(counters["redirected"].as_u64().unwrap() >= 1, "{counters}");
    // The decision is in the audit log, with the agent, process and rule (plain HTTP is
    // judged per request).
    let audit = d.audit_log();
    assert!(
        audit.lines().any(|l| l.contains("\"event\":\"request\"")
            && l.contains("\"policy_result\":\"allow\"")
            && l.contains("\"matched_rule\":\"upstream-get\"")
            && l.contains("\"comm\":\"enforcer-probe\"")),
        "{audit}"
    );
}

#[test]
fn connect_to_an_address_the_policy_does_not_name_fails_with_eperm_and_reaches_nothing() {
    // Scenario: 127.0.0.7 is in no rule: connect() fails with EPERM in the kernel, and the
    // listener there never sees a connection.
    let Some(s) = Scenario::new("unlisted_address") else {
        return;
    };
    let target = Counter::new("127.0.0.7");
    let d = s.daemon().agent("a", &policy(80)).start();
    let out = d.probe("a", &["tcp", &target.addr.to_string()]);
    let text = stdout(&out);
    assert!(!out.status.success());
    assert!(text.contains("(os error 1)"), "expected EPERM: {text}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(target.accepted(), 0, "the upstream must see nothing");
    assert!(d.agent_status("a")["counters"]["refused"].as_u64().unwrap() >= 1);
}

#[test]
fn a_process_outside_the_cgroup_is_unaffected() {
    // Scenario: with a daemon enforcing an agent, the test process itself (not enrolled)
    // still reaches an address the agent may not.
    let Some(s) = Scenario::new("outside_unaffected") else {
        return;
    };
    let target = Counter::new("127.0.0.7");
    let _d = s.daemon().agent("a", &policy(80)).start();
    let conn = TcpStream::connect_timeout(&target.addr, Duration::from_secs(5));
    assert!(conn.is_ok(), "{conn:?}");
}

#[test]
fn ipv4_mapped_ipv6_gets_the_verdict_of_its_ipv4_form() {
    // Scenario: [::ffff:127.0.0.6] is allowed like 127.0.0.6, and [::ffff:127.0.0.7] is
    // refused like 127.0.0.7.
    let Some(s) = Scenario::new("mapped_ipv6") else {
        return;
    };
    let allowed = Upstream::http("127.0.0.6", "up6");
    let denied = Counter::new("127.0.0.7");
    let d = s.daemon().agent("a", &policy(80)).start();
    let v4 = d.probe("a", &["tcp", &allowed.addr.to_string()]);
    let mapped_addr = format!("[::ffff:127.0.0.6]:{}", allowed.addr.port());
    let mapped = d.probe("a", &["tcp", &mapped_addr]);
    assert!(v4.status.success(), "{}", stdout(&v4));
    assert!(mapped.status.success(), "{}\n{}", stdout(&mapped), d.log());
    assert!(
        stdout(&mapped).contains("hello from up6"),
        "{}\n{}",
        stdout(&mapped),
        d.log()
    );
    assert!(
        stdout(&mapped).contains(&format!("peer {mapped_addr}")),
        "{}",
        stdout(&mapped)
    );
    let denied_v4 = d.probe("a", &["tcp", &denied.addr.to_string()]);
    let denied_mapped = d.probe(
        "a",
        &["tcp", &format!("[::ffff:127.0.0.7]:{}", denied.addr.port())],
    );
    assert!(
        stdout(&denied_v4).contains("(os error 1)"),
        "{}",
        stdout(&denied_v4)
    );
    assert!(
        stdout(&denied_mapped).contains("(os error 1)"),
        "{}",
        stdout(&denied_mapped)
    );
    assert_eq!(denied.accepted(), 0);
}

#[test]
fn udp_to_a_port_other_than_53_fails() {
    let Some(s) = Scenario::new("udp_refused") else {
        return;
    };
    let d = s.daemon().agent("a", &policy(80)).start();
    let sink = std::net::UdpSocket::bind("127.0.0.5:0").unwrap();
    sink.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let out = d.probe("a", &["udp", &sink.local_addr().unwrap().to_string()]);
    assert!(
        stdout(&out).contains("(os error 1)"),
        "expected EPERM: {}",
        stdout(&out)
    );
    let mut buf = [0u8; 16];
    assert!(
        sink.recv_from(&mut buf).is_err(),
        "the datagram must not arrive"
    );
    // Also for an address the TCP policy allows.
    let out = d.probe("a", &["udp", "127.0.0.6:9999"]);
    assert!(stdout(&out).contains("(os error 1)"), "{}", stdout(&out));
}

#[test]
fn children_of_the_enrolled_command_are_enrolled_too() {
    // Scenario: the probe spawns a child; the child is in the agent's cgroup and its
    // disallowed connect is refused like the parent's would be.
    let Some(s) = Scenario::new("children_enrolled") else {
        return;
    };
    let target = Counter::new("127.0.0.7");
    let d = s.daemon().agent("a", &policy(80)).start();
    let out = d.probe("a", &["child", "tcp", &target.addr.to_string()]);
    let text = stdout(&out);
    let cgroup = d.cgroup("a");
    let rel = cgroup.file_name().unwrap().to_str().unwrap();
    assert!(
        text.contains(&format!("child cgroup /enforcer.slice/{rel}")),
        "{text}"
    );
    assert!(text.contains("(os error 1)"), "{text}");
    assert_eq!(target.accepted(), 0);
}

#[test]
fn raw_and_ping_sockets_from_inside_get_nothing_out() {
    // Scenario: a root process inside the cgroup sends ICMP echo on a raw socket; a nobody
    // process sends it on a ping socket in a network namespace where ping sockets are open.
    // Neither gets a reply, while the same probes outside the cgroup do (so the check is not
    // vacuous).
    let Some(s) = Scenario::new("raw_and_ping") else {
        return;
    };
    let d = s.daemon().agent("a", &policy(80)).start();
    let probe = enforcer_tests::probe_bin();
    let outside = std::process::Command::new(&probe)
        .args(["raw-icmp", "127.0.0.1"])
        .output()
        .unwrap();
    assert!(
        stdout(&outside).contains("reply"),
        "control: {}",
        stdout(&outside)
    );

    let mut cmd = std::process::Command::new(enforcer_tests::enforcer_bin());
    cmd.arg("--config")
        .arg(&d.config)
        .args(["exec", "--agent", d.agent("a"), "--allow-root", "--"])
        .arg(&probe)
        .args(["raw-icmp", "127.0.0.1"]);
    let inside = cmd.output().unwrap();
    assert!(
        !stdout(&inside).contains("reply"),
        "raw ICMP escaped: {}",
        stdout(&inside)
    );
    assert!(
        d.agent_status("a")["counters"]["dropped_packets"]
            .as_u64()
            .unwrap()
            >= 1
    );

    // Ping sockets, in a namespace of our own with ping_group_range open.
    let ns = enforcer_tests::unique("enfping");
    let ip = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !ip(&["netns", "add", &ns]) {
        panic!("`ip netns add` failed; install iproute2 (cargo xtask test does)");
    }
    struct NetnsGuard(String);
    impl Drop for NetnsGuard {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }
    let _guard = NetnsGuard(ns.clone());
    assert!(ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]));
    assert!(ip(&[
        "netns",
        "exec",
        &ns,
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.ping_group_range=0 2147483647"
    ]));
    let control = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .arg(&probe)
        .args(["ping", "127.0.0.1"])
        .output()
        .unwrap();
    assert!(
        stdout(&control).contains("reply"),
        "control ping as nobody: {} {}",
        stdout(&control),
        stderr(&control)
    );
    // nsenter --net, not `ip netns exec`: the latter remounts /sys, hiding the cgroup2 mount.
    let inside = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(enforcer_tests::enforcer_bin())
        .arg("--config")
        .arg(&d.config)
        .args(["exec", "--agent", d.agent("a"), "--user", "nobody", "--"])
        .arg(&probe)
        .args(["ping", "127.0.0.1"])
        .env_remove("SUDO_UID")
        .output()
        .unwrap();
    // The probe really ran (enforcer exec succeeded), and nothing came back.
    let text = stdout(&inside);
    assert!(
        text.starts_with("error"),
        "the probe did not run: {text} {}",
        stderr(&inside)
    );
    assert!(
        !text.contains("reply") || text.contains("no reply"),
        "ping socket escaped: {text}"
    );
    eprintln!("ping probe inside the cgroup said: {text}");
}

#[test]
fn a_connection_to_the_proxy_port_that_was_not_redirected_is_closed() {
    // Scenario: a process outside any cgroup talks to the proxy port directly; with no
    // kernel record for it the proxy closes the connection without forwarding anything.
    let Some(s) = Scenario::new("unredirected_proxy") else {
        return;
    };
    let up = Upstream::http("127.0.0.5", "up");
    let d = s
        .daemon()
        .agent("a", &policy(up.addr.port()))
        .resolve("upstream.test", "127.0.0.5")
        .start();
    let mut s = TcpStream::connect(("127.0.0.1", d.proxy_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    use std::io::{Read as _, Write as _};
    let _ = s.write_all(
        format!(
            "GET / HTTP/1.1\r\nHost: upstream.test:{}\r\n\r\n",
            up.addr.port()
        )
        .as_bytes(),
    );
    let mut buf = Vec::new();
    let n = s.read_to_end(&mut buf);
    assert!(
        buf.is_empty(),
        "got a response: {:?} {}",
        n,
        String::from_utf8_lossy(&buf)
    );
    assert_eq!(up.accepted(), 0);
}

#[test]
fn after_sigkill_enrolled_processes_reach_nothing_and_a_restart_restores_everything() {
    // Scenario: an enrolled loop fetches the upstream every 100 ms. SIGKILL of the daemon
    // leaves the programs attached: every attempt fails (no proxy), none reaches the
    // upstream directly. A restarted daemon reuses the pinned state; the same process
    // (never re-enrolled) succeeds again, and no second copy of the programs is attached.
    let Some(s) = Scenario::new("sigkill_fail_closed") else {
        return;
    };
    let up = Upstream::http("127.0.0.5", "up");
    let mut d = s
        .daemon()
        .agent("a", &policy(up.addr.port()))
        .resolve("upstream.test", "127.0.0.5")
        .start();
    let host = format!("upstream.test:{}", up.addr.port());
    // The loop resolves the name on every attempt, as a client without a DNS cache would.
    let mut child = d.probe_spawn("a", &["loop", &host, &host, "100"]);
    let lines = Lines::of(&mut child);
    assert!(
        lines
            .wait_for(Duration::from_secs(10), |l| l.starts_with("ok "))
            .is_some(),
        "{}",
        d.log()
    );

    d.kill9();
    // Drain what was in flight, then every attempt must fail.
    std::thread::sleep(Duration::from_millis(300));
    while lines.next(Duration::from_millis(10)).is_some() {}
    let hits_before = up.hits().len();
    for _ in 0..5 {
        let line = lines.next(Duration::from_secs(10)).expect("loop output");
        assert!(
            line.starts_with("fail "),
            "reached something with the daemon dead: {line}"
        );
    }
    assert_eq!(
        up.hits().len(),
        hits_before,
        "the upstream must see nothing while the daemon is dead"
    );

    d.spawn();
    assert!(
        lines
            .wait_for(Duration::from_secs(10), |l| l.starts_with("ok "))
            .is_some(),
        "the enrolled process did not recover after restart:\n{}",
        d.log()
    );
    assert!(
        d.log().contains("attached=0 updated=13"),
        "restart must reuse pinned links:\n{}",
        d.log()
    );
    reap(child);
}

#[test]
fn an_enrolled_process_cannot_unenrol_itself() {
    // Scenario: even as root (--allow-root), a process inside the cgroup asking the admin
    // socket to unenrol it is refused.
    let Some(s) = Scenario::new("no_self_unenrol") else {
        return;
    };
    let d = s.daemon().agent("a", &policy(80)).start();
    let mut cmd = std::process::Command::new(enforcer_tests::enforcer_bin());
    cmd.arg("--config")
        .arg(&d.config)
        .args([
            "exec",
            "--agent",
            d.agent("a"),
            "--allow-root",
            "--",
            "sh",
            "-c",
        ])
        .arg(format!(
            "{} --config {} unenrol --pid $$",
            enforcer_tests::enforcer_bin().display(),
            d.config.display()
        ));
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("inside an enrolled cgroup"),
        "{}",
        stderr(&out)
    );
    // The status call from inside is refused too.
    let mut cmd = std::process::Command::new(enforcer_tests::enforcer_bin());
    cmd.arg("--config")
        .arg(&d.config)
        .args(["exec", "--agent", d.agent("a"), "--allow-root", "--"])
        .arg(enforcer_tests::enforcer_bin())
        .arg("--config")
        .arg(&d.config)
        .arg("status");
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{}", stdout(&out));
}

#[test]
fn exec_as_root_needs_user_or_allow_root_and_user_nobody_gets_no_new_privs() {
    let Some(s) = Scenario::new("exec_identity") else {
        return;
    };
    let d = s.daemon().agent("a", &policy(80)).start();
    let mut cmd = std::process::Command::new(enforcer_tests::enforcer_bin());
    cmd.arg("--config")
        .arg(&d.config)
        .args(["exec", "--agent", d.agent("a"), "--", "true"])
        .env_remove("SUDO_UID");
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(stderr(&out).contains("--allow-root"), "{}", stderr(&out));

    let out = d.probe("a", &["whoami"]);
    assert_eq!(stdout(&out).trim(), "uid 65534 no_new_privs 1");

    // env(1)-style exit codes.
    let out = d.exec_cmd("a", &["no-such-command-xyz"]).output().unwrap();
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    let out = d.exec_cmd("a", &["/etc/hostname"]).output().unwrap();
    assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
    let out = d.exec_cmd("a", &["sh", "-c", "exit 7"]).output().unwrap();
    assert_eq!(out.status.code(), Some(7));
    // An unknown agent lists the configured ones.
    let mut cmd = d.exec_cmd("a", &["true"]);
    let _ = &mut cmd;
    let out = std::process::Command::new(enforcer_tests::enforcer_bin())
        .arg("--config")
        .arg(&d.config)
        .args(["exec", "--agent", "nope", "--user", "nobody", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains(d.agent("a")), "{}", stderr(&out));
}

#[test]
fn the_policy_decides_at_host_level_in_the_proxy() {
    // Scenario: a wildcard policy; names resolve through our resolver (dns.static, internal
    // answers allowed for the test's loopback upstream). The proxy applies the policy to the
    // Host: an allowed host reaches the upstream, a denied one gets a readable 403 naming the
    // rule (deny overrides the wildcard allow whatever the order), a name outside the policy
    // does not even resolve, and a Host the agent never resolved to that address is refused.
    let Some(s) = Scenario::new("proxy_policy") else {
        return;
    };
    let up = Upstream::http("127.0.0.5", "up");
    let port = up.addr.port();
    let policy = format!(
        "default: deny\nrules:\n\
         \x20 - name: block-evil\n    deny: {{ url: \"evil.test:{port}\" }}\n\
         \x20 - name: any-test\n    allow: {{ url: \"*.test:{port}\" }}\n\
         \x20 - name: internal-ok\n    allow: {{ url: \"127.0.0.5:{port}\" }}\n"
    );
    let d = s
        .daemon()
        .agent("a", &policy)
        .resolve("good.test", "127.0.0.5")
        .resolve("evil.test", "127.0.0.5")
        .resolve("other.example", "127.0.0.5")
        .dns_lines("  allow_internal_answers: [127.0.0.0/8]")
        .start();
    let good = format!("good.test:{port}");
    let ok = d.probe("a", &["tcp", &good, &good]);
    assert!(
        stdout(&ok).contains("hello from up"),
        "{}\n{}",
        stdout(&ok),
        d.log()
    );
    let evil = format!("evil.test:{port}");
    let text = stdout(&d.probe("a", &["tcp", &evil, &evil]));
    assert!(text.contains("403 Forbidden"), "{text}");
    assert!(text.contains("\"rule\":\"block-evil\""), "{text}");
    assert!(text.contains("denied by rule 'block-evil'"), "{text}");
    let other = format!("other.example:{port}");
    let text = stdout(&d.probe("a", &["tcp", &other, &other]));
    assert!(
        text.starts_with("error resolve"),
        "a name no rule allows must not resolve: {text}"
    );
    let text = stdout(&d.probe("a", &["tcp", &up.addr.to_string(), &other]));
    assert!(text.contains("not associated with host"), "{text}");
    assert_eq!(
        up.hits().len(),
        1,
        "only the allowed request reached the upstream"
    );
    let audit = d.audit_log();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"policy_result\":\"deny\"") && l.contains("block-evil")),
        "{audit}"
    );
}

#[test]
fn enrol_and_unenrol_by_pid_and_by_cgroup() {
    // Scenario: a running process (not started by enforcer) is enrolled by pid: its later
    // connect to an unnamed address is refused, and unenrol puts it back. An existing cgroup
    // is enrolled: a process inside is refused, and after unenrol it is not. Enrolling the
    // root cgroup or the daemon's own is refused.
    let Some(s) = Scenario::new("enrol") else {
        return;
    };
    let target = Counter::new("127.0.0.7");
    let d = s.daemon().agent("a", &policy(80)).start();
    let probe = enforcer_tests::probe_bin();
    let addr = target.addr.to_string();

    // By pid: the process connects 1.5 s after it starts; it is enrolled in between.
    let child = std::process::Command::new(&probe)
        .args(["delay", "1500", "tcp", &addr])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let before = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let out = d.cli(&["enrol", "--agent", d.agent("a"), "--pid", &pid]);
    assert!(out.status.success(), "{}", stderr(&out));
    let now = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        now.contains(&format!("/enforcer.slice/{}", d.agent("a"))),
        "{now}"
    );
    let out = child.wait_with_output().unwrap();
    assert!(stdout(&out).contains("(os error 1)"), "{}", stdout(&out));
    assert_eq!(target.accepted(), 0);

    let sleeper = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let spid = sleeper.id().to_string();
    assert!(
        d.cli(&["enrol", "--agent", d.agent("a"), "--pid", &spid])
            .status
            .success()
    );
    let out = d.cli(&["unenrol", "--pid", &spid]);
    assert!(out.status.success(), "{}", stderr(&out));
    let back = std::fs::read_to_string(format!("/proc/{spid}/cgroup")).unwrap();
    assert_eq!(back, before, "unenrol must restore the original cgroup");
    reap(sleeper);

    // By cgroup.
    let mount = enforcer_tests::cgroup2_mount().unwrap();
    let cg = mount.join(enforcer_tests::unique("enforcer-enrol-test-"));
    std::fs::create_dir(&cg).unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            enforcer_tests::remove_cgroup(&self.0);
        }
    }
    let _cleanup = Cleanup(cg.clone());
    let out = d.cli(&[
        "enrol",
        "--agent",
        d.agent("a"),
        "--cgroup",
        cg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run_in_cgroup = || {
        use std::os::unix::process::CommandExt as _;
        let procs = cg.join("cgroup.procs");
        let mut c = std::process::Command::new(&probe);
        c.args(["tcp", &addr]);
        // SAFETY: only a write(2) between fork and exec.
        unsafe {
            c.pre_exec(move || std::fs::write(&procs, std::process::id().to_string()));
        }
        c.output().unwrap()
    };
    assert!(stdout(&run_in_cgroup()).contains("(os error 1)"));
    let status = d.status().to_string();
    assert!(status.contains(cg.to_str().unwrap()), "{status}");
    let out = d.cli(&["unenrol", "--cgroup", cg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The links go with their pins; their release can take a moment, during which the
    // unmapped cgroup is refused (fail closed).
    assert!(
        enforcer_tests::eventually(5, || run_in_cgroup().status.success()),
        "after unenrol the cgroup must be free"
    );
    assert!(
        out.status.success(),
        "after unenrol the cgroup is free: {}",
        stdout(&out)
    );

    // Never the root cgroup or the daemon's own.
    let out = d.cli(&["enrol", "--agent", d.agent("a"), "--cgroup", "/"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("root cgroup"), "{}", stderr(&out));
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", d.pid().unwrap())).unwrap();
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap()
        .to_owned();
    let out = d.cli(&["enrol", "--agent", d.agent("a"), "--cgroup", &own]);
    assert!(!out.status.success());
    // Where the daemon runs in the root cgroup (as here without systemd), the root check
    // answers first.
    let why = if own == "/" {
        "root cgroup"
    } else {
        "daemon itself runs"
    };
    assert!(stderr(&out).contains(why), "{}", stderr(&out));
}

#[test]
fn mptcp_is_treated_as_tcp_and_device_bound_sockets_are_refused() {
    // Scenario: an MPTCP socket reaches an allowed upstream through the proxy like TCP, and is
    // refused like TCP elsewhere. A socket bound to a device (SO_BINDTODEVICE) cannot be
    // redirected, so it is refused even towards an allowed destination.
    let Some(s) = Scenario::new("mptcp_bindtodevice") else {
        return;
    };
    let up = Upstream::http("127.0.0.6", "up6");
    let refused = Counter::new("127.0.0.7");
    let d = s.daemon().agent("a", &policy(80)).start();
    let addr = up.addr.to_string();
    let out = d.probe("a", &["mptcp", &addr, &addr]);
    assert!(
        stdout(&out).contains("200 OK"),
        "{}\n{}",
        stdout(&out),
        d.log()
    );
    let out = d.probe("a", &["mptcp", &refused.addr.to_string(), "x"]);
    assert!(stdout(&out).contains("(os error 1)"), "{}", stdout(&out));
    // SO_BINDTODEVICE needs CAP_NET_RAW, so this one runs as root.
    let out = d
        .exec_as(
            "a",
            &["--allow-root"],
            &[
                enforcer_tests::probe_bin().to_str().unwrap(),
                "bound",
                "lo",
                &addr,
            ],
        )
        .output()
        .unwrap();
    assert!(stdout(&out).contains("(os error 1)"), "{}", stdout(&out));
    assert_eq!(refused.accepted(), 0);
}

#[test]
fn a_socket_in_another_network_namespace_is_refused_and_the_daemon_says_why() {
    let Some(s) = Scenario::new("other_netns") else {
        return;
    };
    let d = s.daemon().agent("a", &policy(80)).start();
    let ns = enforcer_tests::unique("enfns");
    let ip = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    assert!(ip(&["netns", "add", &ns]), "`ip netns add` failed");
    struct NetnsGuard(String);
    impl Drop for NetnsGuard {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }
    let _guard = NetnsGuard(ns.clone());
    assert!(ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]));
    // Inside the namespace a listener stands on 127.0.0.6; the enrolled connect must not
    // reach it even though the policy allows that address.
    let mut listener = std::process::Command::new("ip")
        .args(["netns", "exec", &ns, "python3", "-c",
            "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.6',8099))\ns.listen()\ntime.sleep(20)"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(enforcer_tests::enforcer_bin())
        .arg("--config")
        .arg(&d.config)
        .args(["exec", "--agent", d.agent("a"), "--user", "nobody", "--"])
        .arg(enforcer_tests::probe_bin())
        .args(["tcp", "127.0.0.6:8099"])
        .env_remove("SUDO_UID")
        .output()
        .unwrap();
    let _ = listener.kill();
    let _ = listener.wait();
    assert!(
        stdout(&out).contains("(os error 1)"),
        "{} {}",
        stdout(&out),
        stderr(&out)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(d.log().contains("another network namespace"), "{}", d.log());
}

#[test]
fn every_proxied_record_names_the_executable_that_called_connect() {
    // Scenario: curl and python, enrolled, fetch the same allowed upstream. The kernel reads
    // the executable of the task calling connect() (task->mm->exe_file, at offsets from the
    // kernel's BTF), so each request's audit record names its own binary, symlinks resolved
    // (/usr/bin/python3 is a link to the versioned interpreter).
    let Some(s) = Scenario::new("caller_exe") else {
        return;
    };
    let up = Upstream::http("127.0.0.6", "up6");
    let d = s.daemon().agent("a", &policy(up.addr.port())).start();
    let url = |path: &str| format!("http://{}/{path}", up.addr);

    let out = d
        .exec_cmd(
            "a",
            &[
                "/usr/bin/curl",
                "-sS",
                "--noproxy",
                "*",
                "--max-time",
                "15",
                &url("from-curl"),
            ],
        )
        .output()
        .unwrap();
    assert!(
        stdout(&out).contains("hello from up6"),
        "{} {}\n{}",
        stdout(&out),
        stderr(&out),
        d.log()
    );
    let script = format!(
        "import urllib.request\n\
         h = urllib.request.ProxyHandler({{}})\n\
         print(urllib.request.build_opener(h).open('{}', timeout=15).read().decode())",
        url("from-python")
    );
    let out = d
        .exec_cmd("a", &["/usr/bin/python3", "-c", &script])
        .output()
        .unwrap();
    assert!(
        stdout(&out).contains("hello from up6"),
        "{} {}\n{}",
        stdout(&out),
        stderr(&out),
        d.log()
    );

    let audit = d.audit_log();
    let records: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let exe_of = |path: &str| {
        records
            .iter()
            .find(|r| r["event"] == "request" && r["url_path"] == path)
            .unwrap_or_else(|| panic!("no request record for {path}: {audit}"))["exe"]
            .as_str()
            .map(str::to_owned)
    };
    let canonical = |p: &str| {
        std::fs::canonicalize(p)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        exe_of("/from-curl"),
        Some(canonical("/usr/bin/curl")),
        "{audit}"
    );
    assert_eq!(
        exe_of("/from-python"),
        Some(canonical("/usr/bin/python3")),
        "{audit}"
    );
    // Every record made for a caller of these connections carries it (the completions too).
    for r in records
        .iter()
        .filter(|r| r["agent_id"].is_string() && r["pid"].is_u64())
    {
        if r["event"] == "request" || r["event"] == "completion" {
            assert!(r["exe"].is_string(), "{r}");
        }
    }
}
