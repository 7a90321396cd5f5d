//! Containment: what an enrolled process can reach besides its own sockets' connects, tried
//! as a hostile agent would (as nobody, with /usr/bin/python3), each against a control that
//! shows the same attempt works without enforcer. Needs root (see the harness docs).

use std::{
    io::Write as _,
    net::{TcpListener, UdpSocket},
    process::{Command, Stdio},
    time::Duration,
};

use enforcer_tests::{Counter, Lines, Scenario, Upstream, reap, stderr, stdout};

const PY: &str = "/usr/bin/python3";

fn deny_all() -> String {
    "default: deny\nrules: []\n".to_owned()
}

/// `cmd` as nobody, not enrolled: the control of each attack.
fn as_nobody(args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .args(args);
    c
}

#[test]
fn the_daemons_port_numbers_on_other_loopback_addresses_are_other_services() {
    // Scenario: services listen on 127.0.0.20 at the proxy's and the resolver's port numbers.
    // A deny-all agent tries TCP to both and UDP to the DNS one: EPERM each time, while an
    // unenrolled process reaches them. The agent may not bind those port numbers either, on
    // any address, so two agents cannot make a channel out of them.
    let Some(s) = Scenario::new("loopback_ports") else {
        return;
    };
    let d = s.daemon().agent("a", &deny_all()).start();
    let tcp_proxy = TcpListener::bind(("127.0.0.20", d.proxy_port)).unwrap();
    let tcp_dns = TcpListener::bind(("127.0.0.20", d.dns_port)).unwrap();
    let udp_dns = UdpSocket::bind(("127.0.0.20", d.dns_port)).unwrap();
    udp_dns
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    for port in [d.proxy_port, d.dns_port] {
        let addr = format!("127.0.0.20:{port}");
        let out = d.probe("a", &["tcp", &addr]);
        assert!(
            stdout(&out).contains("(os error 1)"),
            "{addr}: {}",
            stdout(&out)
        );
        // Control: the service is there.
        let control = as_nobody(&[enforcer_tests::probe_bin().to_str().unwrap(), "tcp", &addr])
            .output()
            .unwrap();
        assert!(
            !stdout(&control).contains("(os error 1)"),
            "control {addr}: {}",
            stdout(&control)
        );
    }
    let dns = format!("127.0.0.20:{}", d.dns_port);
    let out = d.probe("a", &["udp", &dns]);
    assert!(stdout(&out).contains("(os error 1)"), "{}", stdout(&out));
    let mut buf = [0u8; 16];
    assert!(udp_dns.recv_from(&mut buf).is_err(), "the datagram arrived");
    // Binding the port numbers: refused on any address; another port is fine.
    for (addr, proto) in [
        (format!("127.0.0.21:{}", d.dns_port), "udp"),
        (format!("127.0.0.21:{}", d.proxy_port), "tcp"),
        (format!("0.0.0.0:{}", d.dns_port), "tcp"),
        (format!("[::1]:{}", d.proxy_port), "tcp"),
    ] {
        let out = d.probe("a", &["bind", &addr, proto]);
        assert!(
            stdout(&out).contains("(os error 1)"),
            "bind {addr} {proto}: {}",
            stdout(&out)
        );
    }
    let out = d.probe("a", &["bind", "127.0.0.21:0", "udp"]);
    assert_eq!(stdout(&out).trim(), "bound");
    drop((tcp_proxy, tcp_dns));
    let audit = d.audit_log();
    assert!(
        audit.contains("\"event\":\"kernel_deny\""),
        "refusals are audited:\n{audit}"
    );
}

#[test]
fn unprivileged_daemon_ports_are_refused_unless_allowed() {
    // Scenario: a config whose ports any user could take (at or above
    // ip_unprivileged_port_start) does not start without allow_unprivileged_ports.
    let Some(s) = Scenario::new("unprivileged_ports") else {
        return;
    };
    let d = s.daemon().agent("a", &deny_all()).build();
    d.set_config("allow_unprivileged_ports", "false");
    let (status, text) = d.start_failing();
    assert!(!status.success());
    assert!(
        text.contains("ip_unprivileged_port_start") && text.contains("allow_unprivileged_ports"),
        "{text}"
    );
}

/// A python script, run as nobody outside enforcer, that holds a TCP socket connected to
/// `addr` and prints its pid and the socket's fd, then waits.
fn socket_holder(addr: &str) -> std::process::Child {
    let script = format!(
        "import socket, os, sys, time\n\
         s = socket.create_connection(('{}', {}))\n\
         print(os.getpid(), s.fileno(), flush=True)\n\
         time.sleep(30)\n",
        addr.split(':').next().unwrap(),
        addr.rsplit(':').next().unwrap()
    );
    as_nobody(&[PY, "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Takes fd `fd` of process `pid` with pidfd_getfd and sends on it; prints the outcome.
const BORROW: &str = "import os, sys, socket\n\
    pid, fd = int(sys.argv[1]), int(sys.argv[2])\n\
    try:\n\
    \x20   pfd = os.pidfd_open(pid)\n\
    \x20   import ctypes\n\
    \x20   libc = ctypes.CDLL(None, use_errno=True)\n\
    \x20   got = libc.syscall(438, pfd, fd, 0)\n\
    \x20   if got < 0:\n\
    \x20       print('refused', ctypes.get_errno())\n\
    \x20   else:\n\
    \x20       socket.socket(fileno=got).send(b'GET / HTTP/1.0\\r\\n\\r\\n')\n\
    \x20       print('borrowed')\n\
    except OSError as e:\n\
    \x20   print('refused', e.errno)\n";

#[test]
fn a_socket_borrowed_from_a_process_outside_is_refused() {
    // Scenario: a same-uid process outside the agent's cgroup holds a socket connected to an
    // address the agent may not reach. The agent tries pidfd_getfd on it: EPERM. An
    // unenrolled process of the same user can (so the kernel alone would allow it).
    let Some(s) = Scenario::new("pidfd_getfd") else {
        return;
    };
    let refused = Counter::new("127.0.0.7");
    let d = s.daemon().agent("a", &deny_all()).start();
    let addr = refused.addr.to_string();
    let mut holder = socket_holder(&addr);
    let lines = Lines::of(&mut holder);
    let first = lines
        .next(Duration::from_secs(10))
        .expect("the holder's pid and fd");
    let (pid, fd) = first.split_once(' ').unwrap();
    let control = as_nobody(&[PY, "-c", BORROW, pid, fd]).output().unwrap();
    assert_eq!(stdout(&control).trim(), "borrowed", "{}", stderr(&control));
    let out = d
        .exec_cmd("a", &[PY, "-c", BORROW, pid, fd])
        .output()
        .unwrap();
    assert_eq!(stdout(&out).trim(), "refused 1", "{}", stderr(&out));
    reap(holder);
}

#[test]
fn a_socket_on_stdin_is_refused_unless_allowed() {
    // Scenario: `enforcer exec` is started with a TCP socket (made outside any enrolled
    // cgroup) on its stdin. It refuses to run the command (125), unless
    // --allow-socket-stdio.
    let Some(s) = Scenario::new("socket_stdio") else {
        return;
    };
    let up = Upstream::http("127.0.0.6", "ok");
    let d = s.daemon().agent("a", &deny_all()).start();
    for allow in [false, true] {
        let sock = std::net::TcpStream::connect(up.addr).unwrap();
        let fd = std::os::fd::OwnedFd::from(sock);
        let identity: &[&str] = if allow {
            &["--user", "nobody", "--allow-socket-stdio"]
        } else {
            &["--user", "nobody"]
        };
        let out = d
            .exec_as("a", identity, &["true"])
            .stdin(Stdio::from(fd))
            .output()
            .unwrap();
        if allow {
            assert!(out.status.success(), "{}", stderr(&out));
        } else {
            assert_eq!(out.status.code(), Some(125));
            assert!(
                stderr(&out).contains("fd 0 is an AF_INET socket"),
                "{}",
                stderr(&out)
            );
        }
    }
}

/// Opens a socket of `family`, `type` and `protocol`, printing "ok" or the errno.
const SOCKET: &str = "import socket, sys\n\
    try:\n\
    \x20   socket.socket(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])).close()\n\
    \x20   print('ok')\n\
    except OSError as e:\n\
    \x20   print('refused', e.errno)\n";

#[test]
fn address_families_no_hook_sees_are_refused() {
    // Scenario: AF_VSOCK (a VM guest reaches the hypervisor's services with it) and a netlink
    // protocol other than route and diag: EPERM under enforcer exec, while an unenrolled
    // process of the same user may open both. AF_INET and AF_UNIX stay available.
    let Some(s) = Scenario::new("socket_families") else {
        return;
    };
    let d = s.daemon().agent("a", &deny_all()).start();
    // AF_VSOCK stream; AF_NETLINK with NETLINK_KOBJECT_UEVENT (15).
    for (family, ty, proto) in [("40", "1", "0"), ("16", "2", "15")] {
        let control = as_nobody(&[PY, "-c", SOCKET, family, ty, proto])
            .output()
            .unwrap();
        assert_eq!(
            stdout(&control).trim(),
            "ok",
            "control {family}/{ty}/{proto}"
        );
        let out = d
            .exec_cmd("a", &[PY, "-c", SOCKET, family, ty, proto])
            .output()
            .unwrap();
        assert_eq!(
            stdout(&out).trim(),
            "refused 1",
            "{family}/{ty}/{proto}: {}",
            stderr(&out)
        );
    }
    // TCP, UDP over IPv6, unix, and netlink route stay available.
    for (family, ty, proto) in [
        ("2", "1", "0"),
        ("10", "2", "0"),
        ("1", "1", "0"),
        ("16", "2", "0"),
    ] {
        let out = d
            .exec_cmd("a", &[PY, "-c", SOCKET, family, ty, proto])
            .output()
            .unwrap();
        assert_eq!(
            stdout(&out).trim(),
            "ok",
            "{family}/{ty}/{proto}: {}",
            stderr(&out)
        );
    }
}

/// Connects to the abstract unix socket `@NAME`, printing "connected" or the errno.
const ABSTRACT: &str = "import socket, sys\n\
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
    try:\n\
    \x20   s.connect('\\0' + sys.argv[1])\n\
    \x20   print('connected')\n\
    except OSError as e:\n\
    \x20   print('refused', e.errno)\n";

#[test]
fn an_abstract_unix_socket_outside_the_agent_is_refused_one_inside_is_not() {
    // Scenario: a service outside listens on an abstract unix socket (as D-Bus and session
    // managers do, and could act for the agent). The agent's connect gets EPERM; an
    // unenrolled process connects. A listener the agent's own command opens is reachable.
    let Some(s) = Scenario::new("abstract_unix") else {
        return;
    };
    let d = s.daemon().agent("a", &deny_all()).start();
    let name = enforcer_tests::unique("enforcer-test-abstract-");
    let listener = {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        std::os::unix::net::UnixListener::bind_addr(&addr).unwrap()
    };
    let control = as_nobody(&[PY, "-c", ABSTRACT, &name]).output().unwrap();
    assert_eq!(stdout(&control).trim(), "connected");
    let out = d
        .exec_cmd("a", &[PY, "-c", ABSTRACT, &name])
        .output()
        .unwrap();
    assert_eq!(stdout(&out).trim(), "refused 1", "{}", stderr(&out));
    drop(listener);
    let inside = format!(
        "import socket, threading\n\
         srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         srv.bind('\\0{name}-inside'); srv.listen(1)\n\
         c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         c.connect('\\0{name}-inside')\n\
         print('connected')\n"
    );
    let out = d.exec_cmd("a", &[PY, "-c", &inside]).output().unwrap();
    assert_eq!(stdout(&out).trim(), "connected", "{}", stderr(&out));
}

#[test]
fn real_clients_still_work_in_the_sandbox() {
    // Scenario: node's fetch, python's urllib, git and pip run under enforcer exec (seccomp
    // filter, Landlock domain), against a local upstream the policy allows.
    let Some(s) = Scenario::new("clients_in_sandbox") else {
        return;
    };
    let up = enforcer_tests::web::WebUpstream::http("127.0.0.5", "api");
    let p = up.addr.port();
    let d = s
        .daemon()
        .agent(
            "a",
            &format!("rules:\n  - name: api\n    allow: {{ url: \"api.test:{p}/**\" }}\n"),
        )
        .resolve("api.test", "127.0.0.5")
        .start();
    let url = format!("http://api.test:{p}/v1/x");
    let node = d
        .exec_cmd(
            "a",
            &[
                "node",
                "-e",
                &format!("fetch('{url}').then(r => r.text()).then(t => console.log(t))"),
            ],
        )
        .output()
        .unwrap();
    assert!(
        stdout(&node).contains("hello from api GET /v1/x"),
        "node: {}{}",
        stdout(&node),
        stderr(&node)
    );
    let py = d
        .exec_cmd(
            "a",
            &[
                PY,
                "-c",
                &format!(
                    "import urllib.request; print(urllib.request.urlopen('{url}').read().decode())"
                ),
            ],
        )
        .output()
        .unwrap();
    assert!(
        stdout(&py).contains("hello from api"),
        "python: {}",
        stderr(&py)
    );
    let git = d.exec_cmd("a", &["git", "--version"]).output().unwrap();
    assert!(git.status.success(), "git: {}", stderr(&git));
    let pip = d
        .exec_cmd("a", &[PY, "-m", "pip", "--version"])
        .output()
        .unwrap();
    // pip may be absent from the system Python; when present it must run.
    if !stderr(&pip).contains("No module named pip") {
        assert!(pip.status.success(), "pip: {}", stderr(&pip));
    }
    let mut f = std::fs::File::create(d.dir.path().join("touched")).unwrap();
    let _ = f.write_all(b"");
}

/// A system group for the test, removed when dropped.
struct TestGroup {
    name: String,
}

impl TestGroup {
    fn new() -> TestGroup {
        let name = enforcer_tests::unique("enft");
        let ok = Command::new("groupadd")
            .args(["--system", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "groupadd {name}");
        TestGroup { name }
    }

    fn gid(&self) -> String {
        let out = Command::new("getent")
            .args(["group", &self.name])
            .output()
            .unwrap();
        stdout(&out).split(':').nth(2).unwrap().to_owned()
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.name).status();
    }
}

#[test]
fn an_admin_group_member_cannot_take_a_removed_agents_name_or_widen_an_ad_hoc_policy() {
    // Scenario: agent `victim` is configured with a cgroup enrolled for it, then removed from
    // the config (its cgroup keeps refusing everything). A member of admin_group (nobody,
    // with the group) registers an ad-hoc agent under the victim's name with a permissive
    // policy: refused. So is a name outside `user-nobody-...`, and a permissive policy under
    // that prefix; a deny-all one under it is accepted. A process in the victim's cgroup still
    // reaches nothing, and a new ad-hoc agent never gets the victim's kernel id.
    let Some(s) = Scenario::new("adhoc_names") else {
        return;
    };
    let group = TestGroup::new();
    let up = Upstream::http("127.0.0.6", "ok");
    let open = format!(
        "rules:\n  - name: up\n    allow: {{ url: \"127.0.0.6:{}\" }}\n",
        up.addr.port()
    );
    let mut d = s
        .daemon()
        .agent("victim", &open)
        .agent("other", &deny_all())
        .config(&format!("admin_group: {}", group.name))
        .start();
    let victim = d.agent("victim").to_owned();
    let victim_id = d.agent_status("victim")["id"].as_u64().unwrap();
    let mount = enforcer_tests::cgroup2_mount().unwrap();
    let service_dir = enforcer_tests::CgroupDir::create(
        mount.join("enforcer.slice").join(format!("{victim}-svc")),
    );
    let service = service_dir.0.clone();
    let _adhoc_cgroup =
        enforcer_tests::CgroupDir::later(mount.join("enforcer.slice").join("user-nobody-task"));
    let out = d.cli(&[
        "enrol",
        "--agent",
        &victim,
        "--cgroup",
        service.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Remove the victim from the config.
    let config = std::fs::read_to_string(&d.config).unwrap();
    let kept: String = {
        let mut out = String::new();
        let mut skip = false;
        for line in config.lines() {
            if line.starts_with("  - name: ") {
                skip = line.contains(&victim);
            }
            if !skip {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    };
    std::fs::write(&d.config, kept).unwrap();
    assert!(enforcer_tests::eventually(15, || {
        d.status()["agents"]
            .as_array()
            .is_some_and(|a| a.iter().all(|x| x["name"] != victim.as_str()))
    }));
    let policy_file = d.dir.path().join("open-adhoc.yaml");
    std::fs::write(&policy_file, &open).unwrap();
    let deny_file = d.dir.path().join("deny-adhoc.yaml");
    std::fs::write(&deny_file, deny_all()).unwrap();
    let member_exec = |agent: &str, policy: &std::path::Path| {
        Command::new("setpriv")
            .args([
                "--reuid=nobody",
                "--regid=nogroup",
                &format!("--groups={}", group.gid()),
                "--",
            ])
            .arg(enforcer_tests::enforcer_bin())
            .arg("--config")
            .arg(&d.config)
            .args(["exec", "--agent", agent, "--policy"])
            .arg(policy)
            .args(["--", "true"])
            .env_remove("SUDO_UID")
            .output()
            .unwrap()
    };
    let out = member_exec(&victim, &policy_file);
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("was a configured agent"),
        "{}",
        stderr(&out)
    );
    let out = member_exec("elsewhere", &deny_file);
    assert!(stderr(&out).contains("user-nobody-"), "{}", stderr(&out));
    let out = member_exec("user-nobody-wide", &policy_file);
    assert!(
        stderr(&out).contains("policy must deny everything"),
        "{}",
        stderr(&out)
    );
    let out = member_exec("user-nobody-task", &deny_file);
    assert!(out.status.success(), "{}", stderr(&out));
    let adhoc = d.status()["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "user-nobody-task")
        .cloned()
        .expect("the ad-hoc agent");
    assert_ne!(adhoc["id"].as_u64().unwrap(), victim_id);
    // The victim's cgroup still refuses everything.
    let probe = enforcer_tests::probe_bin();
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec setpriv --reuid=nobody --regid=nogroup \
             --clear-groups {} tcp {}",
            service.display(),
            probe.display(),
            up.addr
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let status = child.wait().unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut text).unwrap();
    assert!(!status.success() && text.contains("(os error 1)"), "{text}");
    assert_eq!(up.hits().len(), 0);
    d.stop();
    let _ = d.cli(&["unenrol", "--cgroup", service.to_str().unwrap()]);
    let _ = std::fs::remove_file(d.dir.path().join("state/agents/user-nobody-task.yaml"));
}

#[test]
fn one_agent_flooding_wildcard_answers_cannot_starve_another() {
    // Scenario: agent `flood` resolves ever new names under its wildcard, past its quota of
    // learned addresses (20 here): past it, its answers are SERVFAIL. Agent `steady` goes on
    // learning names and connecting all along.
    let Some(s) = Scenario::new("allowlist_quota") else {
        return;
    };
    let up = Upstream::http("127.0.0.6", "ok");
    let mut b = s
        .daemon()
        .agent(
            "flood",
            "rules:\n  - name: any\n    allow: { url: \"*.flood.test\" }\n",
        )
        .agent(
            "steady",
            &format!(
                "rules:\n  - name: any\n    allow: {{ url: \"*.steady.test\" }}\n  - name: up\n    \
                 allow: {{ url: \"127.0.0.6:{}\" }}\n",
                up.addr.port()
            ),
        )
        .dns_lines("  max_learned_per_agent: 20\n  allow_internal_answers: [198.18.0.0/15]");
    // Answers from a resolver, not dns.static: declared names are the operator's and do not
    // count against an agent's quota.
    let names: Vec<(String, String)> = (0..40)
        .flat_map(|i| {
            [
                (format!("n{i}.flood.test"), format!("198.18.0.{}", i + 1)),
                (format!("n{i}.steady.test"), format!("198.19.0.{}", i + 1)),
            ]
        })
        .collect();
    let records: Vec<enforcer_tests::DnsRecord<'_>> = names
        .iter()
        .map(|(n, ip)| (n.as_str(), "A", ip.as_str(), 60))
        .collect();
    let dns = enforcer_tests::DnsUpstream::start("127.0.0.54", &records);
    b = b.dns_upstream(dns.addr);
    let d = b.start();
    let rcode = |agent: &str, name: &str| {
        let out = d.probe(agent, &["dns", "127.0.0.53:53", name, "A"]);
        stdout(&out)
    };
    let mut refused = 0;
    for i in 0..30 {
        let text = rcode("flood", &format!("n{i}.flood.test"));
        if i < 20 {
            assert!(text.contains("rcode No Error"), "{i}: {text}");
        } else if text.contains("rcode Server Failure") {
            refused += 1;
        }
        if i % 10 == 9 {
            let s = rcode("steady", &format!("n{i}.steady.test"));
            assert!(s.contains("rcode No Error"), "steady {i}: {s}");
            let addr = up.addr.to_string();
            let out = d.probe("steady", &["tcp", &addr, &addr]);
            assert!(out.status.success(), "steady connect {i}: {}", stdout(&out));
        }
    }
    assert_eq!(refused, 10, "flood's answers past its quota");
    let audit = d.audit_log();
    assert!(audit.contains("max_learned_per_agent"), "{audit}");
}

#[test]
fn a_kernel_without_bpf_lsm_is_reported_by_name_everywhere() {
    // Scenario: where per-cgroup BPF LSM programs cannot run (as on this machine kind), the
    // daemon still starts, and names each protection it cannot give in its start-up log, in
    // `status` (which exits 4) and in /healthz (degraded, 503). Where they can, none is
    // reported.
    let Some(s) = Scenario::new("lsm_report") else {
        return;
    };
    let d = s.daemon().agent("a", &deny_all()).start();
    let status = d.status();
    let missing: Vec<&str> = status["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p.as_str())
        .filter(|p| p.starts_with("missing protection"))
        .collect();
    if d.has_bpf_lsm() {
        assert!(missing.is_empty());
        return;
    }
    for what in ["unix sockets", "borrowed sockets", "socket families"] {
        assert!(
            missing.iter().any(|p| p.contains(what)),
            "{what} not reported: {missing:?}"
        );
        assert!(d.log().contains(what), "{what} not in the start-up log");
    }
    assert_eq!(status["health"], "degraded");
    assert_eq!(d.cli(&["status"]).status.code(), Some(4));
    let (code, body) = enforcer_tests::http_get(d.metrics_port, "/healthz");
    assert_eq!(code, 503);
    assert!(body.contains("missing protection"), "{body}");
}
