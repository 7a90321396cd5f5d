//! DNS under policy, end to end: the kernel sends every enrolled DNS query to our resolver,
//! which answers only names the policy can allow, and teaches the kernel their addresses.
//! The upstream is a test resolver on 127.0.0.x; enrolled commands see a resolv.conf that
//! points at loopback. Needs root (see the harness docs).

use std::time::Duration;

use enforcer_tests::{DnsUpstream, Lines, Scenario, Upstream, eventually, reap, stderr, stdout};

fn policy(port: u16) -> String {
    format!(
        "default: deny\nrules:\n\
         \x20 - name: api\n    allow: {{ url: \"api.test:{port}\" }}\n\
         \x20 - name: svc\n    allow: {{ url: \"*.svc.test:{port}\" }}\n"
    )
}

#[test]
fn an_allowed_name_resolves_and_its_address_is_then_reachable() {
    let Some(s) = Scenario::new("dns_allowed") else {
        return;
    };
    let up = Upstream::http("127.0.0.5", "api");
    let dns = DnsUpstream::start("127.0.0.54", &[("api.test", "A", "127.0.0.5", 60)]);
    let d = s
        .daemon()
        .agent("a", &policy(up.addr.port()))
        .dns_upstream(dns.addr)
        .start();
    let addr = format!("api.test:{}", up.addr.port());
    let out = d.probe("a", &["tcp", &addr, &addr]);
    assert!(
        stdout(&out).contains("hello from api"),
        "{}\n{}",
        stdout(&out),
        d.log()
    );
    assert!(dns.was_asked("api.test"));
}

#[test]
fn a_disallowed_name_gets_nxdomain_and_nothing_is_sent_upstream() {
    let Some(s) = Scenario::new("dns_nxdomain") else {
        return;
    };
    let dns = DnsUpstream::start("127.0.0.54", &[("evil.test", "A", "192.0.2.66", 60)]);
    let d = s
        .daemon()
        .agent("a", &policy(443))
        .dns_upstream(dns.addr)
        .start();
    let out = d.probe("a", &["dns", "127.0.0.53:53", "evil.test", "A"]);
    assert!(
        stdout(&out).contains("rcode Non-Existent Domain")
            || stdout(&out).contains("rcode NXDomain"),
        "{}",
        stdout(&out)
    );
    assert!(
        !dns.was_asked("evil.test"),
        "the name must not leak upstream: {:?}",
        dns.queries()
    );
    let audit = d.audit_log();
    assert!(
        audit.lines().any(|l| l.contains("\"event\":\"dns\"")
            && l.contains("\"dns_name\":\"evil.test\"")
            && l.contains("\"policy_result\":\"deny\"")),
        "{audit}"
    );
}

#[test]
fn a_connect_to_an_address_never_resolved_is_refused() {
    let Some(s) = Scenario::new("dns_unresolved") else {
        return;
    };
    let up = Upstream::http("127.0.0.5", "api");
    let dns = DnsUpstream::start("127.0.0.54", &[("api.test", "A", "127.0.0.5", 60)]);
    let d = s
        .daemon()
        .agent("a", &policy(up.addr.port()))
        .dns_upstream(dns.addr)
        .start();
    let out = d.probe("a", &["tcp", &up.addr.to_string()]);
    assert!(
        stdout(&out).contains("(os error 1)"),
        "expected EPERM: {}",
        stdout(&out)
    );
    assert_eq!(up.accepted(), 0);
}

#[test]
fn after_the_ttl_new_connects_are_refused_while_an_open_connection_keeps_working() {
    // Scenario: the answer's TTL is 1 s (floored to 5 s). A connection opened right after the
    // lookup keeps working past that; a new connect to the address afterwards gets EPERM.
    let Some(s) = Scenario::new("dns_ttl") else {
        return;
    };
    let up = Upstream::http("127.0.0.5", "api");
    let dns = DnsUpstream::start("127.0.0.54", &[("api.test", "A", "127.0.0.5", 1)]);
    let d = s
        .daemon()
        .agent("a", &policy(up.addr.port()))
        .dns_upstream(dns.addr)
        .start();
    let addr = format!("api.test:{}", up.addr.port());
    let mut child = d.probe_spawn("a", &["again", &addr, &addr, "8"]);
    let lines = Lines::of(&mut child);
    assert_eq!(
        lines.next(Duration::from_secs(10)).as_deref(),
        Some("first ok"),
        "{}",
        d.log()
    );
    assert!(
        eventually(10, || stdout(&d.probe("a", &["tcp", &up.addr.to_string()]))
            .contains("(os error 1)")),
        "the learned address must expire"
    );
    assert_eq!(
        lines.next(Duration::from_secs(15)).as_deref(),
        Some("second ok"),
        "the open connection must keep working"
    );
    reap(child);
}

#[test]
fn dns_over_tcp_and_queries_to_other_resolvers_are_redirected() {
    // Scenario: a query over TCP, and UDP and TCP queries sent straight to some other
    // resolver address, all reach our resolver; the reply names the server that was asked.
    let Some(s) = Scenario::new("dns_redirect") else {
        return;
    };
    let dns = DnsUpstream::start("127.0.0.54", &[("api.test", "A", "192.0.2.10", 60)]);
    let d = s
        .daemon()
        .agent("a", &policy(443))
        .dns_upstream(dns.addr)
        .start();
    for (server, proto) in [
        ("127.0.0.98:53", "udp"),
        ("127.0.0.98:53", "tcp"),
        ("[::1]:53", "udp"),
    ] {
        let out = d.probe("a", &["dns", server, "api.test", "A", proto]);
        let text = stdout(&out);
        assert!(
            text.contains("[192.0.2.10]"),
            "{server} {proto}: {text}\n{}",
            d.log()
        );
        assert!(
            text.contains(&format!("from {server}")),
            "the reply must come from the server asked: {text}"
        );
        let out = d.probe("a", &["dns", server, "evil.test", "A", proto]);
        assert!(stdout(&out).contains("answers 0"), "{}", stdout(&out));
    }
    // DNS over TLS is refused outright.
    let out = d.probe("a", &["tcp", "127.0.0.98:853"]);
    assert!(stdout(&out).contains("(os error 1)"), "{}", stdout(&out));
}

#[test]
fn a_wildcard_allows_subdomains_and_not_lookalikes() {
    let Some(s) = Scenario::new("dns_wildcard") else {
        return;
    };
    let dns = DnsUpstream::start(
        "127.0.0.54",
        &[
            ("a.svc.test", "A", "192.0.2.20", 60),
            ("svc.test.evil.test", "A", "192.0.2.21", 60),
        ],
    );
    // The answers are documentation addresses, internal to the rebinding filter: allowed here.
    let d = s
        .daemon()
        .agent("a", &policy(443))
        .dns_upstream(dns.addr)
        .dns_lines("  allow_internal_answers: [192.0.2.0/24]")
        .start();
    let ok = d.probe("a", &["dns", "127.0.0.53:53", "a.svc.test", "A"]);
    assert!(stdout(&ok).contains("[192.0.2.20]"), "{}", stdout(&ok));
    let no = d.probe("a", &["dns", "127.0.0.53:53", "svc.test.evil.test", "A"]);
    assert!(stdout(&no).contains("answers 0"), "{}", stdout(&no));
    assert!(!dns.was_asked("svc.test.evil.test"));
}

#[test]
fn a_rebinding_answer_through_a_wildcard_is_stripped_unless_allowed() {
    let Some(s) = Scenario::new("dns_rebinding") else {
        return;
    };
    let dns = DnsUpstream::start("127.0.0.54", &[("r.svc.test", "A", "127.0.0.1", 60)]);
    let strict = s
        .daemon()
        .agent("a", &policy(443))
        .dns_upstream(dns.addr)
        .start();
    let out = strict.probe("a", &["dns", "127.0.0.53:53", "r.svc.test", "A"]);
    assert!(stdout(&out).contains("answers 0"), "{}", stdout(&out));
    assert!(
        strict
            .audit_log()
            .contains("stripped internal answer 127.0.0.1"),
        "{}",
        strict.audit_log()
    );
    let lenient = s
        .daemon()
        .agent("a", &policy(443))
        .dns_upstream(dns.addr)
        .dns_lines("  allow_internal_answers: [127.0.0.0/8]")
        .start();
    let out = lenient.probe("a", &["dns", "127.0.0.53:53", "r.svc.test", "A"]);
    assert!(stdout(&out).contains("[127.0.0.1]"), "{}", stdout(&out));
}

#[test]
fn static_names_are_answered_without_any_upstream_and_https_queries_get_nothing() {
    let Some(s) = Scenario::new("dns_static") else {
        return;
    };
    // No upstream at all: 127.0.0.53 has no listener.
    let d = s
        .daemon()
        .agent("a", &policy(443))
        .resolve("api.test", "192.0.2.30")
        .start();
    let out = d.probe("a", &["dns", "127.0.0.53:53", "api.test", "A"]);
    assert!(
        stdout(&out).contains("[192.0.2.30]"),
        "{}\n{}",
        stdout(&out),
        d.log()
    );
    let dns = DnsUpstream::start("127.0.0.54", &[("api.test", "A", "192.0.2.31", 60)]);
    let d2 = s
        .daemon()
        .agent("a", &policy(443))
        .dns_upstream(dns.addr)
        .start();
    let out = d2.probe("a", &["dns", "127.0.0.53:53", "api.test", "HTTPS"]);
    assert!(
        stdout(&out).contains("rcode No Error answers 0") || stdout(&out).contains("answers 0"),
        "{}",
        stdout(&out)
    );
    assert!(
        !dns.queries().iter().any(|(_, t)| t == "HTTPS"),
        "{:?}",
        dns.queries()
    );
}

#[test]
fn data_in_names_under_a_wildcard_never_reaches_the_upstream_and_exact_names_are_not_limited() {
    // Scenario: an agent allowed `*.svc.test` tries to carry data out in the labels it
    // chooses: a TXT query, a 41-character label, a base32 label, and more distinct names a
    // minute than the budget. Each is refused by the resolver (the upstream is never asked,
    // and the same query for an exactly named host is forwarded, so the refusal is ours).
    // Ordinary names under the wildcard still resolve, and a rule with `dns_labels: any`
    // lets long labels through.
    let Some(s) = Scenario::new("dns_exfil") else {
        return;
    };
    let dns = DnsUpstream::start(
        "127.0.0.54",
        &[
            ("api.test", "TXT", "v=spf1 -all", 60),
            ("api.test", "A", "192.0.2.30", 60),
            ("ok.svc.test", "A", "192.0.2.20", 60),
            ("n1.svc.test", "A", "192.0.2.21", 60),
            ("n2.svc.test", "A", "192.0.2.22", 60),
        ],
    );
    let policy = "default: deny\nrules:\n\
        \x20 - name: api\n    allow: { url: \"api.test\" }\n\
        \x20 - name: svc\n    allow: { url: \"*.svc.test\" }\n\
        \x20 - name: cdn\n    allow: { url: \"*.cdn.test\" }\n    dns_labels: any\n";
    let d = s
        .daemon()
        .agent("a", policy)
        .dns_upstream(dns.addr)
        .dns_lines("  allow_internal_answers: [192.0.2.0/24]\n  wildcard_names_per_minute: 3")
        .start();
    let ask = |name: &str, kind: &str| {
        let out = d.probe("a", &["dns", "127.0.0.53:53", name, kind]);
        stdout(&out)
    };
    // Control: TXT for a host written exactly is forwarded and answered.
    assert!(ask("api.test", "TXT").contains("answers 1"));
    assert!(dns.queries().contains(&("api.test".into(), "TXT".into())));

    // 189 bytes of data, hex in labels of 42 characters, asked as TXT.
    let data: String = (0..189u32).map(|i| format!("{:02x}", i % 256)).collect();
    let labels: Vec<&str> = data
        .as_bytes()
        .chunks(42)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let txt = format!("{}.svc.test", labels[..5].join("."));
    let out = ask(&txt, "TXT");
    assert!(out.contains("Refused"), "{out}");
    let long = format!("{}.svc.test", "a".repeat(41));
    assert!(ask(&long, "A").contains("answers 0"));
    let encoded = "mfrggzdfmztwq2lknnwg23tpobyxe43u.svc.test";
    assert!(ask(encoded, "A").contains("answers 0"));
    for name in [&txt, &long, &encoded.to_owned()] {
        assert!(
            !dns.was_asked(name),
            "{name} reached the upstream: {:?}",
            dns.queries()
        );
    }

    // Ordinary names resolve, up to the budget of distinct names a minute.
    assert!(ask("ok.svc.test", "A").contains("[192.0.2.20]"));
    assert!(ask("n1.svc.test", "A").contains("[192.0.2.21]"));
    assert!(ask("n2.svc.test", "A").contains("[192.0.2.22]"));
    // A name already asked this minute costs nothing; a fourth distinct one is refused.
    assert!(ask("ok.svc.test", "A").contains("[192.0.2.20]"));
    assert!(ask("n3.svc.test", "A").contains("answers 0"));
    assert!(!dns.was_asked("n3.svc.test"));
    // Names written exactly are not limited.
    assert!(ask("api.test", "A").contains("[192.0.2.30]"));
    // `dns_labels: any`: a long label is asked upstream.
    let cdn = format!("{}.cdn.test", "b".repeat(41));
    ask(&cdn, "A");
    assert!(dns.was_asked(&cdn), "{:?}", dns.queries());

    let audit = d.audit_log();
    for why in [
        "TXT queries are not answered",
        "a label of 41 characters",
        "reads as encoded data",
        "more than 3 distinct names a minute",
    ] {
        assert!(
            audit
                .lines()
                .any(|l| l.contains("\"event\":\"dns\"") && l.contains(why)),
            "no dns record saying '{why}':\n{audit}"
        );
    }
}

#[test]
fn an_internal_answer_let_through_is_reachable_on_the_ports_the_policy_allows_only() {
    // Scenario: `dns.allow_internal_answers: [127.0.0.60/32]` lets r.svc.test resolve to
    // 127.0.0.60 through `*.svc.test:P1`. The answer is kept and P1 is reached through the
    // proxy (the guard agrees with the filter); P2 on the same address is not, while an
    // unenrolled process reaches both.
    let Some(s) = Scenario::new("dns_internal_ports") else {
        return;
    };
    let p1 = Upstream::http("127.0.0.60", "p1");
    let p2 = Upstream::http("127.0.0.60", "p2");
    let dns = DnsUpstream::start("127.0.0.54", &[("r.svc.test", "A", "127.0.0.60", 60)]);
    let d = s
        .daemon()
        .agent("a", &policy(p1.addr.port()))
        .dns_upstream(dns.addr)
        .dns_lines("  allow_internal_answers: [127.0.0.60/32]")
        .start();
    let get = |port: u16| {
        let out = d.curl("a", &["-s", &format!("http://r.svc.test:{port}/")]);
        stdout(&out)
    };
    let body = get(p1.addr.port());
    assert!(body.contains("hello from p1"), "{body}\n{}", d.log());
    let body = get(p2.addr.port());
    assert!(!body.contains("hello from p2"), "P2 was reached: {body}");
    assert_eq!(p2.hits().len(), 0);
    let direct = std::process::Command::new("curl")
        .args([
            "-s",
            "--noproxy",
            "*",
            &format!("http://127.0.0.60:{}/", p2.addr.port()),
        ])
        .output()
        .unwrap();
    assert!(stdout(&direct).contains("hello from p2"));
}

#[test]
fn a_static_name_counts_as_resolved_without_a_query() {
    // Scenario: `api.test` is declared in dns.static and named exactly by the policy. curl
    // --resolve (as /etc/hosts would) connects to its address without asking any resolver:
    // plain HTTP and HTTPS (SNI) are both served. A static name the policy does not allow
    // stays refused in the kernel.
    let Some(s) = Scenario::new("static_resolve") else {
        return;
    };
    let ca = enforcer_tests::web::TestCa::new("enforcer test upstream CA");
    let plain = enforcer_tests::web::WebUpstream::http("127.0.0.5", "plain");
    let tls = enforcer_tests::web::WebUpstream::https(
        "127.0.0.6",
        "tls",
        ca.server_config(&["secure.test"]),
    );
    let (p, t) = (plain.addr.port(), tls.addr.port());
    let policy = format!(
        "rules:\n  - name: api\n    allow: {{ method: GET, url: \"api.test:{p}/v1/**\" }}\n\
         \x20 - name: secure\n    allow: {{ method: GET, url: \"secure.test:{t}/v1/**\" }}\n"
    );
    let d = s
        .daemon()
        .agent("a", &policy)
        .resolve("api.test", "127.0.0.5")
        .resolve("secure.test", "127.0.0.6")
        .resolve("other.test", "127.0.0.7")
        .upstream_ca(&ca, "")
        .start();
    let other = Upstream::http("127.0.0.7", "other");
    let out = d.curl(
        "a",
        &[
            "-w",
            "\n%{http_code}\n",
            "--resolve",
            &format!("api.test:{p}:127.0.0.5"),
            &format!("http://api.test:{p}/v1/x"),
        ],
    );
    assert!(
        stdout(&out).trim_end().ends_with("200"),
        "{}{}\n{}",
        stdout(&out),
        stderr(&out),
        d.log()
    );
    let out = d.curl(
        "a",
        &[
            "-w",
            "\n%{http_code}\n",
            "--resolve",
            &format!("secure.test:{t}:127.0.0.6"),
            &format!("https://secure.test:{t}/v1/x"),
        ],
    );
    assert!(
        stdout(&out).trim_end().ends_with("200"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(plain.hits().len(), 1);
    assert_eq!(tls.hits().len(), 1);
    // Declared, but no rule allows it: the kernel refuses the connect.
    let out = d.probe("a", &["tcp", &other.addr.to_string()]);
    assert!(stdout(&out).contains("(os error 1)"), "{}", stdout(&out));
    assert!(other.hits().is_empty());
}
