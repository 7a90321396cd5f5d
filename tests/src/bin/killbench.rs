//! Kill-switch benchmark, run by `cargo xtask bench`: with 1,000 proxied streams open, how
//! long from the kill file's creation until every stream has ended and a new connect is
//! refused. Needs root. Prints a Markdown section for BENCHMARKS.md on stdout.
//!
//! Usage: enforcer-bench-kill [ITERATIONS] [STREAMS]

use std::time::Duration;

use enforcer_tests::{Lines, Scenario, monotonic_ns, reap, web::WebUpstream};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let iterations = args.first().copied().unwrap_or(30);
    let streams = args.get(1).copied().unwrap_or(1000);
    let Some(scenario) = Scenario::new("kill switch benchmark") else {
        std::process::exit(2);
    };
    if streams == 0 {
        no_streams(&scenario, iterations);
        return;
    }
    // An upstream on tokio, as a real server would be: one thread per connection here would
    // spend the kill's moment waking and ending 1,000 threads on the same two cores.
    let up = WebUpstream::http("127.0.0.6", "bench");
    let policy = "default: deny\nrules:\n  - name: lit\n    allow: { url: \"127.0.0.6:*\" }\n";
    let d = scenario.daemon().agent("a", policy).start();
    let addr = up.addr.to_string();
    let kill = d.agent_kill_path("a");
    std::fs::create_dir_all(kill.parent().unwrap()).unwrap();
    let (mut total, mut closed, mut refused, mut first) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..iterations {
        let mut child = d.probe_spawn("a", &["streams", &streams.to_string(), &addr, &addr]);
        let lines = Lines::of(&mut child);
        let ready = lines.next(Duration::from_secs(120));
        assert_eq!(
            ready.as_deref(),
            Some("ready"),
            "iteration {i}: {ready:?}\n{}",
            d.log()
        );
        let t0 = monotonic_ns();
        std::fs::File::create(&kill).unwrap();
        let line = lines
            .next(Duration::from_secs(60))
            .expect("the probe reports");
        let parts: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(parts.first(), Some(&"closed"), "{line}");
        let (t_closed, t_refused, t_first): (u64, u64, u64) = (
            parts[1].parse().unwrap(),
            parts[3].parse().unwrap(),
            parts[5].parse().unwrap(),
        );
        let ms = |t: u64| t.saturating_sub(t0) as f64 / 1e6;
        first.push(ms(t_first));
        closed.push(ms(t_closed));
        refused.push(ms(t_refused));
        total.push(ms(t_closed.max(t_refused)));
        reap(child);
        std::fs::remove_file(&kill).unwrap();
        // Wait until the switch is lifted before the next round.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while d.agent_status("a")["killed"] == true && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    eprintln!(
        "{}",
        d.log()
            .lines()
            .filter(|l| l.contains("kill switch change applied") || l.contains("sock_diag destroy"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for v in [&mut total, &mut closed, &mut refused, &mut first] {
        v.sort_by(f64::total_cmp);
    }
    println!("## Kill switch\n");
    println!(
        "From the creation of an agent's kill file to all of {streams} open proxied streams \
         ended (as their client sees it) and a new connect refused with EPERM; {iterations} \
         runs, one daemon, upstream on 127.0.0.6.\n"
    );
    println!("| measure | p50 | p90 | p99 | max |\n|---|---|---|---|---|");
    for (name, v) in [
        ("all streams ended and new connects refused", &total),
        ("last stream ended", &closed),
        ("first stream ended", &first),
        ("new connect refused", &refused),
    ] {
        println!(
            "| {name} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            percentile(v, 0.5),
            percentile(v, 0.9),
            percentile(v, 0.99),
            v[v.len() - 1]
        );
    }
    let p99 = percentile(&total, 0.99);
    println!(
        "\nGoal: within 10 ms at p99: **{}** ({p99:.2} ms). The daemon sets the agent's kernel \
         flag, then destroys the proxy's end of every proxied stream by its addresses and \
         cookie with sock_diag `SOCK_DESTROY`, one thread per CPU under `SCHED_FIFO` (the \
         first stream ends when that is done), with the proxy threads at nice 19 until they \
         have torn the streams down; then it signals its own tasks and dumps the agent's \
         cgroups for any other TCP socket. From the first stream ended to the last is the \
         client reading its resets. The daemon's log gives each phase (`kill switch change \
         applied`).",
        if p99 <= 10.0 { "met" } else { "missed" }
    );
}

/// With no stream open: from the kill file's creation to the first `connect()` refused with
/// EPERM, as a client that keeps connecting a UDP socket to port 53 sees it (the hook
/// rewrites that connect without a packet, so the client adds no load on the daemon).
fn no_streams(scenario: &Scenario, iterations: usize) {
    let d = scenario.daemon().agent("a", "default: deny\n").start();
    let kill = d.agent_kill_path("a");
    std::fs::create_dir_all(kill.parent().unwrap()).unwrap();
    let mut refused = Vec::new();
    for i in 0..iterations {
        let mut child = d.probe_spawn("a", &["refused-udp", "192.0.2.53:53"]);
        let lines = Lines::of(&mut child);
        let ready = lines.next(Duration::from_secs(30));
        assert_eq!(ready.as_deref(), Some("ready"), "iteration {i}: {ready:?}");
        // Let the client spin before the switch flips.
        std::thread::sleep(Duration::from_millis(20));
        let t0 = monotonic_ns();
        std::fs::File::create(&kill).unwrap();
        let line = lines
            .next(Duration::from_secs(30))
            .expect("the probe reports");
        let t: u64 = line
            .strip_prefix("refused ")
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("iteration {i}: {line}"));
        refused.push(t.saturating_sub(t0) as f64 / 1e6);
        reap(child);
        std::fs::remove_file(&kill).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while d.agent_status("a")["killed"] == true && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    refused.sort_by(f64::total_cmp);
    println!("## Kill switch, no streams open\n");
    println!(
        "From the creation of an agent's kill file to the first `connect()` refused with EPERM, \
         with no stream open; {iterations} toggles, one daemon. The client connects a UDP \
         socket to port 53 every 20 µs (the hook rewrites such a connect without sending \
         anything, so the client loads neither the daemon nor the network).\n"
    );
    println!("| measure | p50 | p90 | p99 | max |\n|---|---|---|---|---|");
    println!(
        "| first connect refused | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
        percentile(&refused, 0.5),
        percentile(&refused, 0.9),
        percentile(&refused, 0.99),
        refused[refused.len() - 1]
    );
    let p99 = percentile(&refused, 0.99);
    println!(
        "\nGoal: p99 ≤ 1 ms: **{}** ({p99:.2} ms). The daemon learns of the file from inotify \
         (its directory is watched) and sets the agent's kernel flag first, before anything \
         else the kill does.",
        if p99 <= 1.0 { "met" } else { "missed" }
    );
}
