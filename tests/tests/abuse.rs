//! Abuse: what a hostile agent does to the daemon's resources and records (floods, storms,
//! deleting the log), each checked against what the kernel counted or a legitimate agent
//! saw. Needs root (see the harness docs).

use enforcer_tests::{Counter, Scenario, eventually, stdout};

/// `kernel_deny` counts of `agent` in the audit log: (records, sum of `count`, of which lost).
fn kernel_deny_counts(audit: &str, agent: &str) -> (u64, u64, u64) {
    let (mut records, mut total, mut lost) = (0, 0, 0);
    for line in audit.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("audit record");
        if v["event"] == "kernel_deny" && v["agent_id"] == agent {
            let count = v["count"].as_u64().unwrap_or(1);
            records += 1;
            total += count;
            if v["action"] == "lost" {
                lost += count;
            }
        }
    }
    (records, total, lost)
}

#[test]
fn a_refusal_storm_is_recorded_in_full_even_when_the_kernel_ring_overflows() {
    // Scenario: a deny-all agent connects 400,000 times, from two threads, to a listener on
    // loopback, far faster than the daemon drains the kernel's event ring. Every refusal is
    // EPERM and none reaches the listener; the audit log's kernel_deny counts for the agent
    // add up to the kernel's `refused` counter, the refusals the ring could not hold coming
    // as `lost` records.
    let Some(s) = Scenario::new("refusal_storm") else {
        return;
    };
    let d = s.daemon().agent("a", "default: deny\nrules: []\n").start();
    let target = Counter::new("127.0.0.30");
    let name = d.agent("a").to_owned();
    let at_start = d.agent_status("a")["counters"].clone();
    let before = at_start["refused"].as_u64().unwrap();
    let lost_before = at_start["events_lost"].as_u64().unwrap();

    let out = d.probe("a", &["storm", &target.addr.to_string(), "400000", "2"]);
    assert_eq!(stdout(&out).trim(), "refused 400000 other 0", "{out:?}");
    assert_eq!(
        target.accepted(),
        0,
        "a refused connect reached the listener"
    );
    // Control: the listener is there for a process outside enforcer.
    assert!(std::net::TcpStream::connect(target.addr).is_ok());

    let counters = d.agent_status("a")["counters"].clone();
    let refused = counters["refused"].as_u64().unwrap() - before;
    assert_eq!(refused, 400_000, "{counters}");
    let mut seen = (0, 0, 0);
    let adds_up = eventually(15, || {
        seen = kernel_deny_counts(&d.audit_log(), &name);
        seen.1 == refused
    });
    let (records, total, lost) = seen;
    assert!(
        adds_up,
        "the audit log counts {total} refusals in {records} records ({lost} lost), the \
         kernel {refused}"
    );
    // Aggregated: one destination and reason per second, not one record per refusal.
    assert!(records < 100, "{records} records for one destination");
    eprintln!(
        "storm: {refused} refusals, {records} kernel_deny records, {lost} lost at the ring \
         (status events_lost {})",
        counters["events_lost"]
    );
    assert_eq!(
        lost,
        counters["events_lost"].as_u64().unwrap() - lost_before,
        "lost records match the kernel's lost counter"
    );
}

/// Bytes of the audit log's files: (live file, rotated files).
fn audit_bytes(dir: &std::path::Path) -> (u64, u64) {
    let (mut live, mut rotated) = (0, 0);
    for entry in std::fs::read_dir(dir).expect("audit dir") {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let len = entry.metadata().unwrap().len();
        if name == "audit.jsonl" {
            live = len;
        } else if name.starts_with("audit.jsonl.") {
            rotated += len;
        }
    }
    (live, rotated)
}

#[test]
fn a_dns_flood_stays_within_the_disk_budget_and_another_agent_is_recorded_in_full() {
    // Scenario: a deny-all agent asks 30,000 distinct denied names as fast as its resolver
    // answers, while a second agent makes allowed requests. The flooding agent's denials are
    // folded (its first 100 a second one by one, the rest counted, all 30,000 accounted for),
    // so the whole log stays within a disk budget of 1 MiB that one record per denial
    // (about 10 MB) would overrun many times, and every request of the other agent succeeds
    // and is recorded by itself.
    let Some(s) = Scenario::new("dns_flood") else {
        return;
    };
    let up = enforcer_tests::Upstream::http("127.0.0.5", "calm");
    let d = s
        .daemon()
        .agent("flood", "default: deny\nrules: []\n")
        .agent(
            "calm",
            &format!(
                "default: deny\nrules:\n  - name: up\n    allow: {{ url: \"http://127.0.0.5:{}/*\" }}\n",
                up.addr.port()
            ),
        )
        .config("audit_rotate_bytes: 65536\naudit_max_bytes: 1048576")
        .start();
    let mut flood = d
        .exec_cmd(
            "flood",
            &[
                enforcer_tests::probe_bin().to_str().unwrap(),
                "dns-flood",
                "127.0.0.53:53",
                "30000",
                "exfil.test",
            ],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.5:{}/calm", up.addr.port());
    let mut calm_ok = 0;
    while flood.try_wait().unwrap().is_none() {
        let started = std::time::Instant::now();
        let out = d.curl("calm", &["-sS", "--max-time", "5", &url]);
        assert!(
            stdout(&out).contains("hello from calm"),
            "the other agent's request failed during the flood: {out:?}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        calm_ok += 1;
    }
    let flood_out = flood.wait_with_output().unwrap();
    let flooded = stdout(&flood_out);
    assert!(flooded.contains("replies 30000 of 30000"), "{flooded}");
    assert!(calm_ok > 0);

    let audit_dir = d.audit_dir();
    let flood_name = d.agent("flood").to_owned();
    let calm_name = d.agent("calm").to_owned();
    // (records of the flooding agent, the denials they count, records of the other agent).
    let tally = || {
        let (mut records, mut counted, mut calm) = (0u64, 0u64, 0u64);
        for f in std::fs::read_dir(&audit_dir).unwrap() {
            let path = f.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.starts_with("audit.jsonl") || name.contains("-torn-") {
                continue;
            }
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue; // a line being written
                };
                if v["event"] == "dns" && v["agent_id"] == flood_name.as_str() {
                    records += 1;
                    counted += v["count"].as_u64().unwrap_or(1);
                }
                if v["event"] == "request" && v["agent_id"] == calm_name.as_str() {
                    calm += 1;
                }
            }
        }
        (records, counted, calm)
    };
    // The last second's folded records are written when that second ends.
    let mut seen = (0, 0, 0);
    eventually(10, || {
        seen = tally();
        seen.1 >= 30_000
    });
    let (records, counted, calm_records) = seen;
    let (live, rotated) = audit_bytes(&audit_dir);
    assert!(
        live + rotated < 1_048_576,
        "the log holds {} bytes, over the 1 MiB budget",
        live + rotated
    );
    assert!(
        !d.audit_log().contains("\"action\":\"pruned\""),
        "the flood pushed old records out"
    );
    eprintln!(
        "dns flood: 30000 denials, {records} records counting {counted} in what is left; live \
         {live} bytes, rotated {rotated} bytes; the other agent made {calm_ok} requests, \
         {calm_records} recorded"
    );
    assert!(
        records < 3_000,
        "{records} records for 30000 denials: not folded"
    );
    assert_eq!(counted, 30_000, "the records account for every denial");
    assert!(
        calm_records >= calm_ok,
        "{calm_records} of {calm_ok} requests recorded"
    );
}

/// Opens `n` connections to `host:port` one after the other; on each sends a keep-alive GET
/// and reads its answer (or, `silent`, sends nothing and looks at all of them a second
/// later), and holds them. Prints "ok A reset R other O", then waits for stdin to close.
const HOLDER: &str = r#"
import socket, sys, time
host, port, n, silent = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "silent"
socks, ok, reset, other = [], 0, 0, 0
for i in range(n):
    try:
        s = socket.create_connection((host, port), timeout=5)
    except ConnectionResetError:
        reset += 1  # reset before connect() returned
        continue
    socks.append(s)
    if silent:
        continue
    # One at a time: each connection has had its answer before the next opens.
    try:
        s.sendall(b"GET /hold HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (host.encode(), port))
        data = s.recv(65536)
        if data.startswith(b"HTTP/1.1 200"):
            ok += 1
        elif not data:
            reset += 1  # closed before an answer
        else:
            other += 1
    except (ConnectionResetError, BrokenPipeError):
        reset += 1
if silent:
    time.sleep(1.0)
    for s in socks:
        try:
            # Short: the proxy closes an opening that sends nothing for 10 s.
            s.settimeout(0.05)
            s.recv(65536)
            other += 1  # data or a close: not a connection still waiting
        except ConnectionResetError:
            reset += 1
        except socket.timeout:
            ok += 1  # still open, waiting for its first request
print("ok", ok, "reset", reset, "other", other, flush=True)
sys.stdin.read()
"#;

#[test]
fn one_agents_connection_flood_is_capped_and_another_agent_is_served_meanwhile() {
    // Scenario: with max_connections_per_agent 100 and max_pending_per_agent 20, agent
    // "flood" opens 150 keep-alive connections to an allowed upstream, then (from another
    // process) 40 connections that never send a byte. Past each cap its new connections are
    // reset and recorded; the connections within the caps work; agent "calm" is served all
    // along; and once flood lets go, it is served again.
    let Some(s) = Scenario::new("conn_caps") else {
        return;
    };
    let up = enforcer_tests::Upstream::http("127.0.0.5", "up");
    let policy = format!(
        "default: deny\nrules:\n  - name: up\n    allow: {{ url: \"http://127.0.0.5:{}/*\" }}\n",
        up.addr.port()
    );
    let d = s
        .daemon()
        .agent("flood", &policy)
        .agent("calm", &policy)
        .config("max_connections_per_agent: 100\nmax_pending_per_agent: 20")
        .start();
    let port = up.addr.port().to_string();
    let url = format!("http://127.0.0.5:{port}/calm");
    let hold = |n: &str, mode: &str| {
        let mut child = d
            .exec_cmd(
                "flood",
                &[
                    "/usr/bin/python3",
                    "-c",
                    HOLDER,
                    "127.0.0.5",
                    &port,
                    n,
                    mode,
                ],
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        (child, line)
    };
    let (mut open, line) = hold("150", "get");
    assert_eq!(line.trim(), "ok 100 reset 50 other 0", "{}", d.log());
    let calm = d.curl("calm", &["-sS", "--max-time", "5", &url]);
    assert!(stdout(&calm).contains("hello from up"), "{calm:?}");

    // Openings: the flooding agent is at its open cap already, so first let those go.
    drop(open.stdin.take());
    let _ = open.wait();
    let (mut silent, line) = hold("40", "silent");
    assert_eq!(
        line.trim(),
        "ok 20 reset 20 other 0",
        "{}",
        d.log()
            .lines()
            .filter(|l| !l.contains("DEBUG enforcer::audit"))
            .filter(|l| l.contains("clos") || l.contains("refused") || l.contains("timed out"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let calm = d.curl("calm", &["-sS", "--max-time", "5", &url]);
    assert!(stdout(&calm).contains("hello from up"), "{calm:?}");
    drop(silent.stdin.take());
    let _ = silent.wait();
    let flood = d.curl("flood", &["-sS", "--max-time", "5", &url]);
    assert!(stdout(&flood).contains("hello from up"), "{flood:?}");

    let audit = d.audit_log();
    for why in ["max_connections_per_agent", "max_pending_per_agent"] {
        assert!(
            audit.lines().any(|l| l.contains("\"event\":\"connection\"")
                && l.contains("\"policy_result\":\"deny\"")
                && l.contains(why)),
            "no refusal naming {why}:\n{audit}"
        );
    }
}

#[test]
fn the_live_audit_log_deleted_under_traffic_is_recreated_and_still_verifies() {
    // Scenario: an agent makes requests while the live audit file is deleted. Within a
    // second the daemon recreates it with every record it still had open, says so in a
    // `daemon` record, stays healthy, and `enforcer audit verify` passes on the result.
    let Some(s) = Scenario::new("audit_deleted") else {
        return;
    };
    let up = enforcer_tests::Upstream::http("127.0.0.5", "up");
    let mut d = s
        .daemon()
        .agent(
            "a",
            &format!(
                "default: deny\nrules:\n  - name: up\n    allow: {{ url: \"http://127.0.0.5:{}/*\" }}\n",
                up.addr.port()
            ),
        )
        .start();
    let url = format!("http://127.0.0.5:{}/n", up.addr.port());
    let get = |i: usize| {
        let out = d.curl("a", &["-sS", "--max-time", "5", &format!("{url}{i}")]);
        assert!(stdout(&out).contains("hello from up"), "{out:?}");
    };
    for i in 0..3 {
        get(i);
    }
    let live = d.audit_dir().join("audit.jsonl");
    std::fs::remove_file(&live).unwrap();
    for i in 3..6 {
        get(i);
    }
    assert!(
        eventually(5, || live.exists()
            && d.audit_log().contains("\"action\":\"reopened\"")),
        "the live file was not recreated:\n{}",
        d.log()
    );
    get(6);
    let audit = d.audit_log();
    for i in 0..7 {
        assert!(
            audit.contains(&format!("\"url_path\":\"/n{i}\"")),
            "request {i} missing:\n{audit}"
        );
    }
    let status = d.status();
    assert_eq!(status["audit"]["healthy"], true, "{status}");
    d.stop();
    let out = d.cli(&["audit", "verify"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        enforcer_tests::stderr(&out)
    );
}

#[test]
fn a_record_forged_while_the_daemon_is_stopped_is_reported_unattested_after_the_restart() {
    // Scenario: with the daemon stopped cleanly, someone appends a well-linked record (an
    // allowed refund that never happened). The next start names it unsealed before anything
    // else, and `audit verify` exits 1 naming its seq, unless --accept-unsealed.
    let Some(s) = Scenario::new("audit_forged") else {
        return;
    };
    let mut d = s.daemon().agent("a", "default: deny\nrules: []\n").start();
    d.stop();
    let live = d.audit_dir().join("audit.jsonl");
    let text = std::fs::read_to_string(&live).unwrap();
    let last = text.lines().last().unwrap();
    let last_v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(
        last_v["event"], "checkpoint",
        "a clean stop ends with a checkpoint"
    );
    let seq = last_v["seq"].as_u64().unwrap() + 1;
    let forged = serde_json::json!({
        "seq": seq,
        "timestamp": "2026-12-03T03:00:00.000Z",
        "event": "request",
        "agent_id": "a",
        "policy_result": "allow",
        "method": "POST",
        "url_host": "api.stripe.com",
        "url_path": "/v1/refunds",
        "prev_hash": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(last.as_bytes())),
    });
    std::fs::write(&live, format!("{text}{forged}\n")).unwrap();
    // Before the restart the chain holds; the forgery is the unsealed tail.
    let out = d.cli(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("unsealed tail:   1 record"),
        "{}",
        stdout(&out)
    );

    d.spawn();
    let audit = d.audit_log();
    let noted = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["seq"] == seq + 1)
        .expect("a record after the forgery");
    assert_eq!(noted["action"], "unsealed", "{noted}");
    assert_eq!(
        (noted["first_seq"].as_u64(), noted["last_seq"].as_u64()),
        (Some(seq), Some(seq))
    );
    d.stop();
    let out = d.cli(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = enforcer_tests::stderr(&out);
    assert!(err.contains(&format!("records {seq}..{seq}")), "{err}");
    let out = d.cli(&["audit", "verify", "--accept-unsealed"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        enforcer_tests::stderr(&out)
    );
}

#[test]
fn a_name_written_exactly_for_one_port_makes_only_that_port_of_its_internal_address_explicit() {
    // Scenario: `tcp: "db.internal:P1"` beside `url: "*"`, db.internal at 127.0.0.40, where
    // services listen on P1 and P2. P1 is reached; P2 is not (its address is internal and
    // only P1 was written), though an unenrolled process reaches both.
    let Some(s) = Scenario::new("exact_port") else {
        return;
    };
    let db = Counter::new("127.0.0.40");
    let other = enforcer_tests::Upstream::http("127.0.0.40", "other");
    let policy = format!(
        "default: deny\nrules:\n\
         \x20 - name: db\n    allow: {{ tcp: \"db.internal:{}\" }}\n\
         \x20 - name: web\n    allow: {{ url: \"*\" }}\n",
        db.addr.port()
    );
    let d = s
        .daemon()
        .agent("a", &policy)
        .resolve("db.internal", "127.0.0.40")
        .start();
    let out = d.probe("a", &["tcp", &format!("db.internal:{}", db.addr.port())]);
    assert!(
        eventually(5, || db.accepted() == 1),
        "P1 not reached: {}",
        stdout(&out)
    );
    let url = format!("http://db.internal:{}/", other.addr.port());
    let out = d.curl("a", &["-s", "-o", "/dev/null", "-w", "%{http_code}", &url]);
    assert!(
        !stdout(&out).contains("200"),
        "P2 of an internal address was reached: {}",
        stdout(&out)
    );
    assert_eq!(other.hits().len(), 0, "P2 saw a request");
    // Control: P2 answers a process outside enforcer.
    let direct = std::process::Command::new("curl")
        .args([
            "-s",
            "--noproxy",
            "*",
            &format!("http://127.0.0.40:{}/", other.addr.port()),
        ])
        .output()
        .unwrap();
    assert!(stdout(&direct).contains("hello from other"));
}

/// An address added to the host for the test (on `lo`: this kernel has no dummy links);
/// removed on drop, even on a failed assertion.
struct Gained(&'static str);

impl Gained {
    fn add(cidr: &'static str) -> Gained {
        let _ = std::process::Command::new("ip")
            .args(["addr", "del", cidr, "dev", "lo"])
            .output();
        let out = std::process::Command::new("ip")
            .args(["addr", "add", cidr, "dev", "lo"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip addr add: {}",
            enforcer_tests::stderr(&out)
        );
        Gained(cidr)
    }
}

impl Drop for Gained {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["addr", "del", self.0, "dev", "lo"])
            .output();
    }
}

#[test]
fn an_address_the_host_gains_after_start_is_refused_like_its_others() {
    // Scenario: after the daemon started, the host gains an address (as DHCP or SLAAC would
    // give it): 45.33.77.7, on the loopback interface so nothing leaves the host. A
    // service listens there. An agent allowed `url: "*"` cannot reach it through the proxy
    // (it is the host's own address), while a process outside enforcer can. (On `lo`: the
    // kernel announces it over rtnetlink like any other.)
    let Some(s) = Scenario::new("own_address") else {
        return;
    };
    let d = s
        .daemon()
        .agent(
            "a",
            "default: deny\nrules:\n  - name: web\n    allow: { url: \"*\" }\n",
        )
        .resolve("gained.test", "45.33.77.7")
        .start();
    let _gained = Gained::add("45.33.77.7/32");
    let up = enforcer_tests::Upstream::http("45.33.77.7", "gained");
    let url = format!("http://gained.test:{}/", up.addr.port());
    let direct = std::process::Command::new("curl")
        .args([
            "-s",
            "--noproxy",
            "*",
            &format!("http://45.33.77.7:{}/", up.addr.port()),
        ])
        .output()
        .unwrap();
    assert!(
        stdout(&direct).contains("hello from gained"),
        "control: {direct:?}"
    );
    let control_hits = up.hits().len();
    let mut body = String::new();
    let refused = eventually(5, || {
        let out = d.curl("a", &["-s", &url]);
        body = stdout(&out);
        body.contains("one of this host's own addresses")
    });
    assert!(
        refused,
        "the host's new address was reachable: {body}\n{}",
        d.log()
    );
    assert_eq!(
        up.hits().len(),
        control_hits,
        "the service saw the agent's request"
    );
}
