//! Connections spliced in the kernel (#19): once a `tcp:` rule or an SNI decision splices a
//! connection, its bytes move between the daemon's two sockets through the sockhash verdict,
//! never through the daemon's reads and writes. Checked with the probe as nobody against the
//! blob upstream, which hashes what it gets and sends a known stream.

use std::time::Duration;

use enforcer_tests::{
    Blob, BlobBytes, Lines, Scenario, eventually, proxy_threads, stderr, stdout,
    web::{TestCa, WebUpstream},
};

const HUNDRED_MIB: u64 = 100 << 20;

fn tcp_rule(addr: std::net::SocketAddr) -> String {
    format!("rules:\n  - name: blob\n    allow: {{ tcp: \"{addr}\" }}\n")
}

/// CPU time the daemon's connection threads (the proxy threads, which copy in user space,
/// and the splice watcher) have used, user and system, in clock ticks. The rest of the daemon
/// (audit checkpoints, watchers) is left out: it runs whatever the path.
fn cpu_ticks(pid: u32) -> u64 {
    let mut threads: Vec<std::path::PathBuf> = proxy_threads(pid).into_values().collect();
    threads.extend(
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .map(|t| t.path())
            .filter(|t| {
                std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() == "splice-watch")
            }),
    );
    threads.iter().map(|t| task_ticks(&t.join("stat"))).sum()
}

fn task_ticks(path: &std::path::Path) -> u64 {
    let stat = std::fs::read_to_string(path).expect("read the thread's stat");
    // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// The completion records of the agent's connections to `addr`.
fn completions(audit: &str, addr: &str) -> Vec<serde_json::Value> {
    audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| {
            r["event"] == "completion"
                && r["url_host"].as_str().is_some_and(|h| addr.starts_with(h))
        })
        .collect()
}

#[test]
fn spliced_bytes_are_exact_both_ways_counted_in_the_kernel_and_never_copied_by_the_daemon() {
    let Some(s) = Scenario::new("splice_exact") else {
        return;
    };
    let blob = Blob::start("127.0.0.6");
    let d = s.daemon().agent("a", &tcp_rule(blob.addr)).start();
    assert!(
        !d.log().contains("copied through user space"),
        "the kernel refused the splice: {}",
        d.log()
    );
    let pid = d.pid().expect("daemon pid");
    let addr = blob.addr.to_string();
    let before = cpu_ticks(pid);

    let up = d.probe("a", &["blob-up", &addr, &HUNDRED_MIB.to_string()]);
    let line = stdout(&up);
    let want = BlobBytes::sha256_of(HUNDRED_MIB);
    assert!(up.status.success(), "upload failed: {line}\n{}", d.log());
    assert_eq!(
        line.trim(),
        format!("sent {HUNDRED_MIB} {want} reply {HUNDRED_MIB} {want}"),
        "the upstream must get every byte, in order"
    );

    let down = d.probe("a", &["blob-down", &addr, &HUNDRED_MIB.to_string()]);
    assert!(down.status.success(), "download failed: {}", stdout(&down));
    assert_eq!(stdout(&down).trim(), format!("got {HUNDRED_MIB} {want}"));

    let spliced_cpu = cpu_ticks(pid) - before;
    eprintln!("connection threads: {spliced_cpu} ticks for 200 MiB spliced in the kernel");

    // Byte counts, counted in the kernel, land in the completion records.
    let audit = d.audit_log();
    let done = completions(&audit, &addr);
    assert_eq!(done.len(), 2, "{audit}");
    // "sink\n", then the blob; the reply line is "COUNT SHA\n".
    let reply = format!("{HUNDRED_MIB} {want}\n").len() as u64;
    assert_eq!(done[0]["bytes_up"], 5 + HUNDRED_MIB, "{}", done[0]);
    assert_eq!(done[0]["bytes_down"], reply, "{}", done[0]);
    let request = format!("source {HUNDRED_MIB}\n").len() as u64;
    assert_eq!(done[1]["bytes_up"], request, "{}", done[1]);
    assert_eq!(done[1]["bytes_down"], HUNDRED_MIB, "{}", done[1]);

    // The same 200 MiB copied through user space (`kernel_splice: false`), for the daemon's
    // CPU to compare: the kernel splice costs the daemon next to nothing.
    let copy = s
        .daemon()
        .agent("a", &tcp_rule(blob.addr))
        .config("kernel_splice: false")
        .start();
    let copy_pid = copy.pid().expect("daemon pid");
    let before = cpu_ticks(copy_pid);
    let up = copy.probe("a", &["blob-up", &addr, &HUNDRED_MIB.to_string()]);
    assert!(up.status.success(), "{}", stdout(&up));
    let down = copy.probe("a", &["blob-down", &addr, &HUNDRED_MIB.to_string()]);
    assert_eq!(stdout(&down).trim(), format!("got {HUNDRED_MIB} {want}"));
    let copied_cpu = cpu_ticks(copy_pid) - before;
    eprintln!("connection threads: {copied_cpu} ticks for 200 MiB copied");
    assert!(
        spliced_cpu * 4 < copied_cpu,
        "the daemon used {spliced_cpu} ticks splicing 200 MiB in the kernel and {copied_cpu} \
         copying them: the spliced bytes went through user space"
    );
}

#[test]
fn the_kill_switch_cuts_a_spliced_stream_mid_transfer() {
    let Some(s) = Scenario::new("splice_kill") else {
        return;
    };
    let blob = Blob::start("127.0.0.6");
    let d = s.daemon().agent("a", &tcp_rule(blob.addr)).start();
    let addr = blob.addr.to_string();
    let mut child = d.probe_spawn("a", &["blob-down", &addr, "0"]);
    let lines = Lines::of(&mut child);
    assert_eq!(
        lines.next(Duration::from_secs(10)).as_deref(),
        Some("flowing"),
        "{}",
        d.log()
    );
    std::fs::write(d.agent_kill_path("a"), b"").unwrap();
    let ended = lines.next(Duration::from_secs(5));
    let ended = ended.expect("the stream did not end within 5 s of the kill");
    assert!(ended.starts_with("ended reset after "), "{ended}");
    let _ = child.wait();
    // The refusal came from the kill switch: before it, the stream flowed; a new connect now
    // gets EPERM from the kernel.
    let again = d.probe("a", &["blob-down", &addr, "1"]);
    assert!(
        stdout(&again).contains("(os error 1)"),
        "{}",
        stdout(&again)
    );
    assert!(
        eventually(5, || {
            let done = completions(&d.audit_log(), &addr);
            done.len() == 1 && done[0]["bytes_down"].as_u64().is_some_and(|b| b >= 1 << 20)
        }),
        "{}\n{}",
        d.audit_log(),
        d.log()
    );
}

#[test]
fn a_daemon_restart_mid_stream_loses_no_byte_of_a_new_connection() {
    let Some(s) = Scenario::new("splice_restart") else {
        return;
    };
    let blob = Blob::start("127.0.0.6");
    let mut d = s.daemon().agent("a", &tcp_rule(blob.addr)).start();
    let addr = blob.addr.to_string();
    let mut child = d.probe_spawn("a", &["blob-down", &addr, "0"]);
    let lines = Lines::of(&mut child);
    assert_eq!(
        lines.next(Duration::from_secs(10)).as_deref(),
        Some("flowing")
    );
    d.stop();
    // The daemon held both sockets: the stream ends with it.
    let ended = lines
        .next(Duration::from_secs(10))
        .expect("the stream outlived the daemon");
    assert!(ended.starts_with("ended "), "{ended}");
    let _ = child.wait();
    d.spawn();
    let want = BlobBytes::sha256_of(HUNDRED_MIB);
    let down = d.probe("a", &["blob-down", &addr, &HUNDRED_MIB.to_string()]);
    assert_eq!(
        stdout(&down).trim(),
        format!("got {HUNDRED_MIB} {want}"),
        "{}",
        d.log()
    );
    let up = d.probe("a", &["blob-up", &addr, &HUNDRED_MIB.to_string()]);
    assert_eq!(
        stdout(&up).trim(),
        format!("sent {HUNDRED_MIB} {want} reply {HUNDRED_MIB} {want}")
    );
}

#[test]
fn tls_spliced_on_its_sni_reaches_curl_intact() {
    // Scenario: a host allowed at host level is spliced after its ClientHello (which the
    // proxy read and wrote upstream itself); curl, trusting only the upstream's CA, downloads
    // 32 MiB over the kernel splice and the file's sha256 is the upstream's.
    let Some(s) = Scenario::new("splice_tls") else {
        return;
    };
    let ca = TestCa::new("enforcer test upstream CA");
    let up = WebUpstream::https("127.0.0.6", "splice", ca.server_config(&["splice.test"]));
    let p = up.addr.port();
    let policy =
        format!("rules:\n  - name: whole-host\n    allow: {{ url: \"splice.test:{p}\" }}\n");
    let d = s
        .daemon()
        .agent("a", &policy)
        .resolve("splice.test", "127.0.0.6")
        .upstream_ca(&ca, "")
        .start();
    let ca_file = d.dir.path().join("only-upstream-ca.pem");
    ca.write_pem(&ca_file);
    let n: u64 = 32 << 20;
    let out = d.curl(
        "a",
        &[
            "--cacert",
            ca_file.to_str().unwrap(),
            "-o",
            "-",
            &format!("https://splice.test:{p}/blob/{n}"),
        ],
    );
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    use sha2::Digest as _;
    assert_eq!(out.stdout.len() as u64, n);
    assert_eq!(
        hex::encode(sha2::Sha256::digest(&out.stdout)),
        BlobBytes::sha256_of(n)
    );
    let audit = d.audit_log();
    let done = completions(&audit, "splice.test");
    assert_eq!(done.len(), 1, "{audit}");
    assert!(
        done[0]["bytes_down"].as_u64().is_some_and(|b| b > n),
        "{}",
        done[0]
    );
}
