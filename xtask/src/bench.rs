//! `cargo xtask bench`: the benchmarks, each written to its own section of `BENCHMARKS.md`:
//! `## Policy engine` (criterion), `## Proxy` and `## Kill switch`. `--only NAME` runs one.
//!
//! The policy engine: `cargo bench -p enforcer --bench policy`, a generated 1,000-rule policy;
//! the medians are read from criterion's `estimates.json`.
//!
//! The kill switch: `enforcer-bench-kill`, 1,000 proxied streams open, from the kill file's
//! creation until every stream has ended as its client sees it and a new connect is refused.
//!
//! The proxy:
//! Two loopback upstreams (`enforcer-upstream`, hyper on one worker thread): plain HTTP on
//! 127.0.0.5 and HTTPS on 127.0.0.6 (a certificate from a throwaway CA, which the daemon
//! trusts through `tls.extra_upstream_roots`). A daemon enforces one agent whose policy has
//! a method+path rule for each, so every request is judged: plain HTTP always is, and the
//! HTTPS host is intercepted (`tls.mode: auto`). The audit log is on: two records per
//! request.
//!
//! A third, reference path for plain HTTP: `enforcer-upstream relay`, a bare tokio TCP relay
//! (no policy, no audit), which prices one more hop on the machine apart from enforcer.
//!
//! Each load tool runs once directly and once enrolled (`enforcer exec`), same arguments:
//! - throughput: `wrk -t1 -c16 -d<secs>s` (keep-alive), Debian's wrk;
//! - latency at a fixed 1,000 requests/s: `oha -q 1000 --latency-correction -c16`, because
//!   wrk cannot hold a fixed rate (wrk2 is not packaged) and oha corrects for coordinated
//!   omission. Installed with `cargo install oha --locked` when missing.
//!
//! Needs root (the daemon loads eBPF; the enrolled runs go through its cgroup).

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{cargo, display, is_root, run_cmd};

/// The fixed rate of the latency runs.
const RATE: u32 = 1000;
/// Connections of every run.
const CONNECTIONS: u32 = 16;

/// Which benchmarks to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Policy,
    Credentials,
    Proxy,
    Splice,
    Memory,
    Kill,
}

pub fn run(root: &Path, secs: u64, runs: usize, only: Option<Part>) -> anyhow::Result<()> {
    let wanted = |p: Part| only.is_none_or(|o| o == p);
    if (wanted(Part::Proxy) || wanted(Part::Splice) || wanted(Part::Memory) || wanted(Part::Kill))
        && !is_root()
    {
        bail!(
            "the proxy and kill-switch benchmarks start the daemon (eBPF): run \
             `sudo -E cargo xtask bench`, or `cargo xtask bench --only policy`"
        );
    }
    if wanted(Part::Policy) {
        policy(root)?;
    }
    if wanted(Part::Credentials) {
        credentials(root, secs, runs)?;
    }
    if wanted(Part::Proxy) {
        proxy(root, secs, runs)?;
    }
    if wanted(Part::Splice) {
        splice(root, runs)?;
    }
    if wanted(Part::Memory) {
        memory(root)?;
    }
    if wanted(Part::Kill) {
        kill(root)?;
    }
    Ok(())
}

/// Resident memory of a process, in bytes (`VmRSS` of /proc/PID/status).
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Idle keep-alive connections the memory benchmark holds: 10,000, or fewer when the
/// descriptor hard limit (two per connection in the daemon) cannot hold them.
fn idle_connections() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let budget = (lim.rlim_max.saturating_sub(2048) / 2) as usize;
    budget.min(10_000) / 1000 * 1000
}

/// The daemon's resident memory: idle after start with 3 agents, and per idle keep-alive
/// connection with thousands open, plain HTTP and intercepted HTTPS (a fresh daemon each).
fn memory(root: &Path) -> anyhow::Result<()> {
    build_release()?;
    let bins = root.join("target/release");
    let probe = bins.join("enforcer-probe");
    let n = idle_connections();
    let opts = Opts {
        extra_agents: 2,
        uncapped: true,
        ..Opts::default()
    };
    let hold = |env: &Env, mode: &str, addr: &str, host: &str| -> anyhow::Result<(u64, u64)> {
        std::thread::sleep(Duration::from_secs(2));
        let before = rss(env.daemon_pid);
        let mut cmd = env.command(&probe, true);
        cmd.args([mode, &n.to_string(), addr, host])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        eprintln!("xtask: {}", display(&cmd));
        let mut child = cmd.spawn().context("starting the probe")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("probe stdout")?).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            bail!("the probe did not hold {n} connections: {line}");
        }
        std::thread::sleep(Duration::from_secs(2));
        let after = rss(env.daemon_pid);
        let _ = child.kill();
        let _ = child.wait();
        Ok((before, after))
    };
    let env = Env::start(&bins, opts)?;
    std::thread::sleep(Duration::from_secs(1));
    let idle = rss(env.daemon_pid);
    let (plain_before, plain_after) = hold(&env, "streams", &env.plain, &env.plain)?;
    drop(env);
    let env = Env::start(&bins, opts)?;
    let (tls_before, tls_after) = hold(&env, "tls-streams", &env.tls, &env.tls)?;
    drop(env);
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / 1024.0 / n as f64;
    let (plain, tls) = (per(plain_after, plain_before), per(tls_after, tls_before));
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    let section = format!(
        "## Memory\n\n\
         Measured {} with `sudo -E cargo xtask bench --only memory` on {}. The daemon's \
         resident memory (`VmRSS`), with 3 agents configured. Idle: 1 s after it is ready. Per \
         connection: {n} idle keep-alive connections of one agent, each with one request \
         answered, opened by `enforcer-probe` enrolled (plain HTTP/1.1 to the bench upstream; \
         HTTPS intercepted with a leaf from the local CA), RSS 2 s after the last opened \
         minus RSS 2 s after start, divided by {n}; a fresh daemon for each.{}\n\n\
         | | measured | goal | |\n|---|---:|---|---|\n\
         | idle, 3 agents | {:.1} MiB | ≤ 20 MiB | {} |\n\
         | per idle keep-alive connection, plain HTTP | {plain:.1} KiB | ≤ 64 KiB | {} |\n\
         | per idle keep-alive connection, intercepted HTTPS | {tls:.1} KiB | ≤ 96 KiB | {} |\n",
        today(),
        machine(),
        if n < 10_000 {
            format!(
                " ({n}, not 10,000: this machine's descriptor hard limit cannot hold two \
                 descriptors per connection for 10,000)"
            )
        } else {
            String::new()
        },
        mib(idle),
        verdict(mib(idle) <= 20.0),
        verdict(plain <= 64.0),
        verdict(tls <= 96.0),
    );
    eprintln!("{section}");
    write_section(&root.join("BENCHMARKS.md"), "Memory", &section)?;
    eprintln!("xtask: wrote the Memory section of BENCHMARKS.md");
    Ok(())
}

/// The size of the spliced transfer.
const SPLICE_BYTES: u64 = 1 << 30;

/// One bulk download: bytes per second as curl saw them, the daemon's CPU for it and the
/// whole machine's (seconds).
struct Transfer {
    bytes_per_sec: f64,
    daemon_secs: f64,
    /// Of the daemon's CPU, its connection threads' (proxy threads, splice watcher).
    conn_secs: f64,
    host_secs: f64,
}

/// Busy time of all CPUs so far (user, nice, system, irq, softirq, steal), in ticks, from
/// the first line of /proc/stat.
fn host_busy_ticks() -> u64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum()
}

/// `curl` downloads 1 GiB over TLS from an upstream the policy allows at host level, so the
/// connection is spliced on its ClientHello: directly, through a daemon that splices in the
/// kernel, and through one that copies in user space (`kernel_splice: false`, the path of
/// every earlier release). Alternating rounds; medians.
fn splice(root: &Path, runs: usize) -> anyhow::Result<()> {
    build_release()?;
    let bins = root.join("target/release");
    let kernel = Env::start(&bins, Opts::default())?;
    let copy = Env::start(
        &bins,
        Opts {
            kernel_splice: false,
            tag: "c",
            ..Opts::default()
        },
    )?;
    let curl = which("curl").context("curl is needed for the splice benchmark")?;
    let fetch = |env: &Env, enrolled: bool| -> anyhow::Result<Transfer> {
        let mut cmd = env.command(&curl, enrolled);
        cmd.args(["-sS", "--noproxy", "*", "-o", "/dev/null", "-w"])
            .arg("%{speed_download} %{size_download}")
            .arg("--cacert")
            .arg(env.dir.join("spliced-ca.pem"))
            .arg(format!("https://{}/zeros/{SPLICE_BYTES}", env.spliced));
        eprintln!("xtask: {}", display(&cmd));
        let (before, conn_before, host_before) = (
            env.daemon_cpu().0,
            env.connection_threads_cpu(),
            host_busy_ticks(),
        );
        let out = cmd.output().context("running curl")?;
        let (after, conn_after, host_after) = (
            env.daemon_cpu().0,
            env.connection_threads_cpu(),
            host_busy_ticks(),
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut fields = text.split_whitespace();
        let speed: f64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let size: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        if !out.status.success() || size != SPLICE_BYTES {
            bail!(
                "the download failed ({} of {SPLICE_BYTES} bytes): {text}{}",
                size,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Transfer {
            bytes_per_sec: speed,
            daemon_secs: after.saturating_sub(before) as f64 / ticks_per_second(),
            conn_secs: conn_after.saturating_sub(conn_before) as f64 / ticks_per_second(),
            host_secs: host_after.saturating_sub(host_before) as f64 / ticks_per_second(),
        })
    };
    let runs = runs.max(1);
    let (mut direct, mut spliced, mut copied) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        direct.push(fetch(&kernel, false)?);
        spliced.push(fetch(&kernel, true)?);
        copied.push(fetch(&copy, true)?);
    }
    let speed = |v: &[Transfer]| median(v.iter().map(|t| t.bytes_per_sec).collect());
    let cpu = |v: &[Transfer]| median(v.iter().map(|t| t.daemon_secs).collect());
    let mib = |b: f64| b / f64::from(1u32 << 20);
    let (d, k, c) = (speed(&direct), speed(&spliced), speed(&copied));
    let (k_cpu, c_cpu) = (cpu(&spliced), cpu(&copied));
    let conn = |v: &[Transfer]| median(v.iter().map(|t| t.conn_secs).collect());
    let (k_conn, c_conn) = (conn(&spliced), conn(&copied));
    let host = |v: &[Transfer]| median(v.iter().map(|t| t.host_secs).collect());
    let (d_host, k_host, c_host) = (host(&direct), host(&spliced), host(&copied));
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    let cpu_share = if c_conn > 0.0 { k_conn / c_conn } else { 0.0 };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let section = format!(
        "## Splice\n\n\
         Measured {} with `sudo -E cargo xtask bench --only splice` on {}. `curl` downloads \
         1 GiB over TLS (a shared zero chunk, so the upstream costs only its TLS) from \
         `enforcer-upstream` on 127.0.0.7, which the policy allows at host level: the \
         connection is judged on its ClientHello and spliced, never decrypted. Direct, \
         through a daemon that splices in the kernel (sockhash + `sk_skb` verdict, the \
         default), and through one that copies in user space (`kernel_splice: false`, as \
         before); {runs} alternating rounds, medians. Daemon CPU is the daemon process's \
         user and system time over the transfer (`/proc/PID/stat`); the kernel's own work \
         (softirq, the sockmap's sender) is not the daemon's.\n\n\
         | | MiB/s | ratio to direct | daemon CPU for 1 GiB | of it, connection threads | all CPUs' busy time for 1 GiB | goal | |\n\
         |---|---:|---:|---:|---:|---:|---|---|\n\
         | direct | {:.0} | 1.00 | | | {:.2} s | | |\n\
         | spliced in the kernel | {:.0} | {:.2} | {:.0} ms | {:.0} ms | {:.2} s | ≥ 0.9× direct | {} |\n\
         | copied in user space | {:.0} | {:.2} | {:.0} ms | {:.0} ms | {:.2} s | | |\n\n\
         Connection threads' CPU (the proxy threads and the splice watcher; the rest of the \
         daemon, such as the audit writer's checkpoint every second, runs whatever the path), \
         kernel splice / user-space copy: {:.3} (goal ≤ 0.05: {}). Ticks are 10 ms.\n\n\
         Direct, the machine's {} cores were {:.0}% busy over the transfer (client, upstream \
         and the kernel share them): a hop costs CPU the direct path does not spend, here a \
         second loopback TCP connection whichever way its bytes move, so the ratio to direct \
         is bounded by the machine, not by the hop alone.\n",
        today(),
        machine(),
        mib(d),
        d_host,
        mib(k),
        k / d,
        k_cpu * 1e3,
        k_conn * 1e3,
        k_host,
        verdict(k / d >= 0.9),
        mib(c),
        c / d,
        c_cpu * 1e3,
        c_conn * 1e3,
        c_host,
        cpu_share,
        verdict(cpu_share <= 0.05),
        cores,
        100.0 * d_host / (SPLICE_BYTES as f64 / d) / cores as f64,
    );
    drop(copy);
    drop(kernel);
    eprintln!("{section}");
    write_section(&root.join("BENCHMARKS.md"), "Splice", &section)?;
    eprintln!("xtask: wrote the Splice section of BENCHMARKS.md");
    Ok(())
}

/// Criterion's benchmark ids (as directories under `target/criterion`) and what they measure.
const POLICY_BENCHES: [(&str, &str, Option<f64>); 5] = [
    (
        "evaluate_host_method_path",
        "evaluate: host, method and path rules",
        Some(1_000.0),
    ),
    (
        "evaluate_json_body_1k",
        "evaluate: a rule with a 1 KB JSON body constraint",
        Some(5_000.0),
    ),
    ("load_1000_rules", "load and compile the 1,000 rules", None),
    (
        "load_alias_bomb_billion_laughs",
        "refuse a YAML alias bomb (billion laughs)",
        Some(100e6),
    ),
    (
        "load_alias_bomb_quadratic",
        "refuse a YAML alias bomb (quadratic blow-up)",
        Some(100e6),
    ),
];

/// Criterion's median of benchmark `id` and its 95% confidence interval, in ns.
fn criterion_median(root: &Path, id: &str) -> anyhow::Result<(f64, f64, f64)> {
    let path = root
        .join("target/criterion")
        .join(id)
        .join("new/estimates.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("criterion wrote no {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let median = &v["median"];
    let ns = |x: &serde_json::Value| x.as_f64().context("a number in estimates.json");
    Ok((
        ns(&median["point_estimate"])?,
        ns(&median["confidence_interval"]["lower_bound"])?,
        ns(&median["confidence_interval"]["upper_bound"])?,
    ))
}

/// The secret of the masking benchmark's credential.
const BENCH_SECRET: &str = "sk-bench-0123456789abcdefghijklmnopqrstuvwxyz";

/// Through the daemon: 1 MiB responses over intercepted HTTPS, fetched with the placeholder
/// (swapped in, the response masked: the upstream echoes the secret) and with another token
/// (nothing swapped, nothing masked). Alternating runs; medians.
fn masked_throughput(root: &Path, secs: u64, runs: usize) -> anyhow::Result<String> {
    let wrk = ensure_wrk()?;
    build_release()?;
    let env = Env::start(
        &root.join("target/release"),
        Opts {
            credential: true,
            ..Opts::default()
        },
    )?;
    let out = Command::new(&env.enforcer)
        .arg("--config")
        .arg(&env.config)
        .args(["credentials", "env", "--agent", &env.agent])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let placeholder = text
        .trim()
        .strip_prefix("BENCH_KEY=")
        .with_context(|| format!("no placeholder from `credentials env`: {text}"))?
        .to_owned();
    let url = format!("https://{}/v1/big", env.tls);
    let with = format!("Authorization: Bearer {placeholder}");
    let without = "Authorization: Bearer not-a-placeholder".to_owned();
    let (mut masked, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        masked.push(env.wrk(&wrk, &url, secs, true, &["-H", &with])?.rps);
        plain.push(env.wrk(&wrk, &url, secs, true, &["-H", &without])?.rps);
    }
    let (m, p) = (median(masked), median(plain));
    let ratio = m / p;
    Ok(format!(
        "Through the daemon (`sudo -E cargo xtask bench --only credentials`): 1 MiB responses \
         over intercepted HTTPS, `wrk -t1 -c{CONNECTIONS} -d{secs}s`, {runs} alternating runs, \
         medians. With the placeholder (swapped in; the upstream echoes the secret, which is \
         masked): {:.0} MiB/s. With a token that is no placeholder (nothing swapped or \
         masked): {:.0} MiB/s. Masked / unmasked: {ratio:.2} (goal ≥ 0.90: {}).\n",
        m,
        p,
        if ratio >= 0.90 { "met" } else { "**missed**" }
    ))
}

/// `cargo bench -p enforcer --bench credentials`: the swap of one placeholder, and masking a
/// streamed 1 MiB response; as root also the masked throughput through the daemon.
fn credentials(root: &Path, secs: u64, runs: usize) -> anyhow::Result<()> {
    run_cmd(cargo().args([
        "bench",
        "-p",
        "enforcer",
        "--bench",
        "credentials",
        "--",
        "--noplot",
    ]))?;
    let (one, one_lo, one_hi) = criterion_median(root, "credentials_inject_one")?;
    let (none, none_lo, none_hi) = criterion_median(root, "credentials_inject_none")?;
    let (masked, m_lo, m_hi) = criterion_median(root, "credentials_stream_1mib/masked")?;
    let (copied, c_lo, c_hi) = criterion_median(root, "credentials_stream_1mib/copied")?;
    let added = one - none;
    let mut s = String::from("## Credentials\n\n");
    s.push_str(&format!(
        "Measured {} with `cargo bench -p enforcer --bench credentials` (run by `cargo xtask \
         bench`) on {}; criterion, 30 samples, medians with 95% confidence intervals.\n\n\
         | | median | 95% CI |\n|---|---:|---|\n\
         | `Vault::inject`, ten-header request, one Bearer placeholder swapped | {} | {} – {} |\n\
         | the same request through a vault with no credentials | {} | {} – {} |\n\
         | 1 MiB response in 16 KiB chunks, masked (the secret twice, once across a chunk edge) | {} | {} – {} |\n\
         | the same chunks copied | {} | {} – {} |\n\n\
         Added CPU for one substitution: {} (goal ≤ 1 µs: {}). Masking costs {} per MiB \
         streamed (about {:.0} GiB/s on one core); this isolates the masker, not the whole \
         proxy path.\n",
        today(),
        machine(),
        human_ns(one),
        human_ns(one_lo),
        human_ns(one_hi),
        human_ns(none),
        human_ns(none_lo),
        human_ns(none_hi),
        human_ns(masked),
        human_ns(m_lo),
        human_ns(m_hi),
        human_ns(copied),
        human_ns(c_lo),
        human_ns(c_hi),
        human_ns(added),
        if added <= 1_000.0 { "met" } else { "**missed**" },
        human_ns(masked - copied),
        // 1 MiB in `masked` ns, as GiB per second.
        (1.0 / 1024.0) / (masked / 1e9),
    ));
    if is_root() {
        s.push('\n');
        s.push_str(&masked_throughput(root, secs, runs)?);
    } else {
        s.push_str("\n(The throughput through the daemon needs root; not measured.)\n");
    }
    eprintln!("{s}");
    write_section(&root.join("BENCHMARKS.md"), "Credentials", &s)?;
    eprintln!("xtask: wrote the Credentials section of BENCHMARKS.md");
    Ok(())
}

fn policy(root: &Path) -> anyhow::Result<()> {
    run_cmd(cargo().args([
        "bench", "-p", "enforcer", "--bench", "policy", "--", "--noplot",
    ]))?;
    let mut s = String::from("## Policy engine\n\n");
    s.push_str(&format!(
        "Measured {} with `cargo bench -p enforcer --bench policy` (run by `cargo xtask bench`) \
         on {}. A generated policy of 1,000 rules; criterion, 30 samples; the median and its \
         95% confidence interval.\n\n\
         | | median | 95% CI | goal | |\n|---|---:|---|---|---|\n",
        today(),
        machine()
    ));
    for (id, what, goal_ns) in POLICY_BENCHES {
        let path = root
            .join("target/criterion")
            .join(id)
            .join("new/estimates.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("criterion wrote no {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let median = &v["median"];
        let ns = |x: &serde_json::Value| x.as_f64().context("a number in estimates.json");
        let (m, lo, hi) = (
            ns(&median["point_estimate"])?,
            ns(&median["confidence_interval"]["lower_bound"])?,
            ns(&median["confidence_interval"]["upper_bound"])?,
        );
        let (goal, verdict) = match goal_ns {
            Some(g) => (
                format!("≤ {}", human_ns(g)),
                if m <= g { "met" } else { "**missed**" },
            ),
            None => (String::new(), ""),
        };
        s.push_str(&format!(
            "| {what} | {} | {} – {} | {goal} | {verdict} |\n",
            human_ns(m),
            human_ns(lo),
            human_ns(hi)
        ));
    }
    eprintln!("{s}");
    write_section(&root.join("BENCHMARKS.md"), "Policy engine", &s)?;
    eprintln!("xtask: wrote the Policy engine section of BENCHMARKS.md");
    Ok(())
}

fn human_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.1} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

/// Kill-switch benchmark runs: of 1,000, the p99 lies among ten slower runs instead of being
/// the slowest of one hundred, so one noisy run no longer decides it (about 3.5 minutes).
const KILL_RUNS: &str = "1000";

fn kill(root: &Path) -> anyhow::Result<()> {
    build_release()?;
    clean_stale();
    let bin = root.join("target/release/enforcer-bench-kill");
    eprintln!("xtask: {} {KILL_RUNS} 1000", bin.display());
    let out = Command::new(&bin)
        .args([KILL_RUNS, "1000"])
        .env("ENFORCER_BIN", root.join("target/release/enforcer"))
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!("the kill-switch benchmark failed ({})", out.status);
    }
    let body = String::from_utf8(out.stdout).context("the kill-switch benchmark's output")?;
    let section = format!(
        "{}\n\nMeasured {} with `sudo -E cargo xtask bench` on {}.\n",
        body.trim_end(),
        today(),
        machine()
    );
    eprintln!("{section}");
    write_section(&root.join("BENCHMARKS.md"), "Kill switch", &section)?;
    eprintln!("xtask: wrote the Kill switch section of BENCHMARKS.md");

    eprintln!("xtask: {} 100 0", bin.display());
    let out = Command::new(&bin)
        .args(["100", "0"])
        .env("ENFORCER_BIN", root.join("target/release/enforcer"))
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "the kill-switch benchmark without streams failed ({})",
            out.status
        );
    }
    let body = String::from_utf8(out.stdout).context("the kill-switch benchmark's output")?;
    let section = format!(
        "{}\n\nMeasured {} with `sudo -E cargo xtask bench --only kill` on {}.\n",
        body.trim_end(),
        today(),
        machine()
    );
    eprintln!("{section}");
    write_section(
        &root.join("BENCHMARKS.md"),
        "Kill switch, no streams open",
        &section,
    )?;
    eprintln!("xtask: wrote the Kill switch, no streams open section of BENCHMARKS.md");
    Ok(())
}

/// The daemon and the test binaries the benchmarks run, optimised.
fn build_release() -> anyhow::Result<()> {
    run_cmd(cargo().args([
        "build",
        "--release",
        "-p",
        "enforcer",
        "-p",
        "enforcer-tests",
    ]))
}

fn proxy(root: &Path, secs: u64, runs: usize) -> anyhow::Result<()> {
    let wrk = ensure_wrk()?;
    let oha = ensure_oha()?;
    build_release()?;
    let bins = root.join("target/release");
    let env = Env::start(&bins, Opts::default())?;
    eprintln!("xtask: bench environment ready in {}", env.dir.display());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let haproxy = Peer::haproxy(&env.dir, &env.plain, threads)?;
    let nginx = Peer::nginx(&env.dir, &env.plain, threads)?;

    let plain = format!("http://{}/v1/bench", env.plain);
    let tls = format!("https://{}/v1/bench", env.tls);
    let mut results = Vec::new();
    let mut peers = Vec::new();
    let runs = runs.max(1);
    for (label, url) in [("plain HTTP/1.1", &plain), ("HTTPS", &tls)] {
        // Every path of a round runs once, one after the other, so a noisy neighbour hits
        // them alike; the median of the rounds is reported.
        let (mut direct_rps, mut proxied_rps) = (Vec::new(), Vec::new());
        let (mut direct_lat, mut proxied_lat) = (Vec::new(), Vec::new());
        // Plain HTTP also goes through the bare relay (the cost of one more hop alone) and the
        // reverse proxies a user would otherwise pick.
        let is_plain = url == &plain;
        let relay_url = is_plain.then(|| format!("http://{}/v1/bench", env.relay));
        let (mut relay_rps, mut relay_lat) = (Vec::new(), Vec::new());
        let mut peer_rps: Vec<Vec<Thru>> = vec![Vec::new(); 2];
        for _ in 0..runs {
            direct_rps.push(env.wrk(&wrk, url, secs, false, &[])?);
            if is_plain {
                for (i, peer) in [&haproxy, &nginx].into_iter().enumerate() {
                    let peer_url = format!("http://{}/v1/bench", peer.addr);
                    let cpu = || (peer.cpu(), 0);
                    peer_rps[i].push(env.wrk_measuring(&wrk, &peer_url, secs, false, &[], &cpu)?);
                }
            }
            if let Some(r) = &relay_url {
                let relay = PathBuf::from(format!("/proc/{}/stat", env.relay_pid));
                let cpu = || (proc_ticks(&relay), 0);
                relay_rps.push(env.wrk_measuring(&wrk, r, secs, false, &[], &cpu)?);
            }
            proxied_rps.push(env.wrk(&wrk, url, secs, true, &[])?);
        }
        for _ in 0..runs {
            direct_lat.push(env.oha(&oha, url, secs, false)?);
            proxied_lat.push(env.oha(&oha, url, secs, true)?);
            if let Some(r) = &relay_url {
                relay_lat.push(env.oha(&oha, r, secs, false)?);
            }
        }
        let rps_of = |v: &[Thru]| median(v.iter().map(|t| t.rps).collect());
        let cpu_of = |v: &[Thru]| median(v.iter().map(|t| t.daemon_us).collect());
        if is_plain {
            for (i, peer) in [&haproxy, &nginx].into_iter().enumerate() {
                peers.push(PeerRow {
                    label: peer.name,
                    rps: rps_of(&peer_rps[i]),
                    cpu_us: cpu_of(&peer_rps[i]),
                });
            }
            peers.push(PeerRow {
                label: "bare TCP relay (`enforcer-upstream relay`)",
                rps: rps_of(&relay_rps),
                cpu_us: cpu_of(&relay_rps),
            });
        }
        let proxied: Vec<Thru> = proxied_rps;
        results.push(Row {
            label,
            direct_rps: rps_of(&direct_rps),
            proxied_rps: rps_of(&proxied),
            daemon_us: cpu_of(&proxied),
            audit_us: median(proxied.iter().map(|t| t.audit_us).collect()),
            direct_lat: Latency::median(&direct_lat),
            proxied_lat: Latency::median(&proxied_lat),
            relay: relay_url.map(|_| (rps_of(&relay_rps), Latency::median(&relay_lat))),
        });
    }
    // New connections per second: every request on a new connection (`Connection: close`);
    // over HTTPS each is a new TLS handshake with the proxy's cached leaf.
    let close = ["-H", "Connection: close"];
    let haproxy_url = format!("http://{}/v1/bench", haproxy.addr);
    let haproxy_cpu = || (haproxy.cpu(), 0);
    let mut rates: [Vec<Thru>; 5] = Default::default();
    for _ in 0..runs {
        rates[0].push(env.wrk(&wrk, &plain, secs, false, &close)?);
        rates[1].push(env.wrk_measuring(&wrk, &haproxy_url, secs, false, &close, &haproxy_cpu)?);
        rates[2].push(env.wrk(&wrk, &plain, secs, true, &close)?);
        rates[3].push(env.wrk(&wrk, &tls, secs, false, &close)?);
        rates[4].push(env.wrk(&wrk, &tls, secs, true, &close)?);
    }
    let rate = |v: &[Thru]| ConnRate {
        per_sec: median(v.iter().map(|t| t.rps).collect()),
        cpu_us: median(v.iter().map(|t| t.daemon_us).collect()),
    };
    let conn_rates: Vec<ConnRate> = rates.iter().map(|v| rate(v)).collect();
    drop(haproxy);
    drop(nginx);
    let (requests, completions) = env.audit_counts();
    if requests == 0 {
        bail!("the enrolled runs left no request records: they did not go through the proxy");
    }
    // The bench proves nothing was skipped to win: every request was audited and the chain
    // verifies.
    let verify = Command::new(&env.enforcer)
        .arg("--config")
        .arg(&env.config)
        .args(["audit", "verify"])
        .output()
        .context("running `enforcer audit verify`")?;
    let verified = String::from_utf8_lossy(&verify.stdout).trim().to_owned();
    if !verify.status.success() {
        bail!(
            "`enforcer audit verify` failed on the bench's log: {verified}{}",
            String::from_utf8_lossy(&verify.stderr)
        );
    }
    let section = render(&Report {
        rows: &results,
        peers: &peers,
        rates: &conn_rates,
        threads,
        secs,
        runs,
        records: (requests, completions),
        verified: &verified,
    });
    eprintln!("{section}");
    write_section(&root.join("BENCHMARKS.md"), "Proxy", &section)?;
    eprintln!("xtask: wrote the Proxy section of BENCHMARKS.md");
    Ok(())
}

/// New connections per second, and the CPU per connection of what was measured.
struct ConnRate {
    per_sec: f64,
    cpu_us: f64,
}

/// A reverse proxy's (or the relay's) plain HTTP/1.1 throughput and CPU per request.
struct PeerRow {
    label: &'static str,
    rps: f64,
    cpu_us: f64,
}

/// A Debian package's program, installed when missing.
fn ensure_apt(package: &str, program: &str) -> anyhow::Result<PathBuf> {
    let found = || {
        which(program).or_else(|| {
            ["/usr/sbin", "/usr/bin"]
                .iter()
                .map(|d| Path::new(d).join(program))
                .find(|p| p.is_file())
        })
    };
    if let Some(p) = found() {
        return Ok(p);
    }
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!("{program} is missing and this is not a Debian system; install {package}");
    }
    eprintln!("xtask: installing {package} (apt-get install -y {package})");
    let install = || {
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", package])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    install()
        .or_else(|_| {
            run_cmd(Command::new("apt-get").arg("update"))?;
            install()
        })
        .with_context(|| {
            format!("installing {package} failed; run `apt-get install -y {package}`")
        })?;
    // Debian starts the service it installs; the bench runs its own instance.
    let _ = Command::new("systemctl")
        .args(["disable", "--now", package])
        .output();
    found().with_context(|| format!("{program} still not found after installing {package}"))
}

/// A reverse proxy the bench compares enforcer with, run with the configuration the bench
/// writes, on loopback in front of the plain upstream.
struct Peer {
    name: &'static str,
    /// Where wrk connects.
    addr: String,
    /// Whose CPU counts: the process, and for nginx its workers.
    pid: u32,
    child: Child,
}

impl Peer {
    /// HAProxy with `nbthread` equal to the daemon's proxy threads and a Host check (a
    /// request for another host gets a 403), keep-alive to the upstream.
    fn haproxy(dir: &Path, upstream: &str, threads: usize) -> anyhow::Result<Peer> {
        let bin = ensure_apt("haproxy", "haproxy")?;
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let config = format!(
            "global\n  nbthread {threads}\n  maxconn 4096\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  \
             timeout server 30s\n  option http-keep-alive\n\
             frontend bench\n  bind {addr}\n  acl known_host hdr(host) -i {addr}\n  \
             http-request deny if !known_host\n  default_backend upstream\n\
             backend upstream\n  http-reuse always\n  server up {upstream} maxconn 64\n"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config)?;
        let child = Command::new(&bin)
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("haproxy.log"))?)
            .spawn()
            .context("starting haproxy")?;
        let pid = child.id();
        let peer = Peer {
            name: "HAProxy",
            addr,
            pid,
            child,
        };
        peer.wait_listening()?;
        Ok(peer)
    }

    /// nginx as a reverse proxy with `workers` worker processes and keep-alive to the
    /// upstream.
    fn nginx(dir: &Path, upstream: &str, workers: usize) -> anyhow::Result<Peer> {
        let bin = ensure_apt("nginx", "nginx")?;
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let d = dir.display();
        let config = format!(
            "daemon off;\nmaster_process on;\nworker_processes {workers};\npid {d}/nginx.pid;\n\
             error_log {d}/nginx-error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/nginx-body;\n  \
             proxy_temp_path {d}/nginx-proxy;\n  fastcgi_temp_path {d}/nginx-fcgi;\n  \
             uwsgi_temp_path {d}/nginx-uwsgi;\n  scgi_temp_path {d}/nginx-scgi;\n  \
             upstream up {{ server {upstream}; keepalive 64; }}\n  \
             server {{\n    listen {addr};\n    location / {{\n      proxy_pass http://up;\n      \
             proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, config)?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("nginx.log"))?)
            .spawn()
            .context("starting nginx")?;
        let pid = child.id();
        let peer = Peer {
            name: "nginx",
            addr,
            pid,
            child,
        };
        peer.wait_listening()?;
        Ok(peer)
    }

    fn wait_listening(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&self.addr).is_err() {
            if Instant::now() > deadline {
                bail!("{} did not listen on {}", self.name, self.addr);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// CPU ticks of the process and its children (nginx's workers).
    fn cpu(&self) -> u64 {
        let mut total = proc_ticks(&PathBuf::from(format!("/proc/{}/stat", self.pid)));
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let stat = entry.path().join("stat");
            let Ok(text) = std::fs::read_to_string(&stat) else {
                continue;
            };
            let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
            // Field 4 is the parent's pid.
            if rest.split_whitespace().nth(1) == Some(self.pid.to_string().as_str()) {
                total += proc_ticks(&stat);
            }
        }
        total
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        std::thread::sleep(Duration::from_millis(200));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User plus system ticks of one `/proc/.../stat` file (0 when unreadable).
fn proc_ticks(stat: &Path) -> u64 {
    let text = std::fs::read_to_string(stat).unwrap_or_default();
    // Fields after the command name (which may hold spaces), from field 3 (state): utime is
    // field 14, stime field 15.
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| {
        f.get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(14) + field(15)
}

/// Debian's wrk, installed when missing.
fn ensure_wrk() -> anyhow::Result<PathBuf> {
    if let Some(p) = which("wrk") {
        return Ok(p);
    }
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!("wrk is missing and this is not a Debian system; install wrk");
    }
    eprintln!("xtask: installing wrk (apt-get install -y wrk)");
    run_cmd(Command::new("apt-get").args(["install", "-y", "wrk"]))
        .or_else(|_| {
            run_cmd(Command::new("apt-get").arg("update"))?;
            run_cmd(Command::new("apt-get").args(["install", "-y", "wrk"]))
        })
        .context("installing wrk failed; run `apt-get install -y wrk`")?;
    which("wrk").context("wrk still not found after installing it")
}

/// oha, installed with cargo when missing.
fn ensure_oha() -> anyhow::Result<PathBuf> {
    if let Some(p) = which("oha") {
        return Ok(p);
    }
    eprintln!("xtask: installing oha (cargo install oha --locked; a few minutes on 2 cores)");
    run_cmd(cargo().args(["install", "oha", "--locked"]))
        .context("installing oha failed; run `cargo install oha --locked`")?;
    which("oha")
        .context("oha not found on PATH after `cargo install oha` (is ~/.cargo/bin on PATH?)")
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let home_bin = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"));
    std::env::split_paths(&path)
        .chain(home_bin)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Latency at the fixed rate, in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Latency {
    p50: f64,
    p99: f64,
    rps: f64,
}

impl Latency {
    /// Each figure's median over the runs.
    fn median(runs: &[Latency]) -> Latency {
        Latency {
            p50: median(runs.iter().map(|l| l.p50).collect()),
            p99: median(runs.iter().map(|l| l.p99).collect()),
            rps: median(runs.iter().map(|l| l.rps).collect()),
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One throughput run: requests per second, and the daemon's CPU per request (all of it,
/// and its audit writer's part), in microseconds.
#[derive(Debug, Clone, Copy)]
struct Thru {
    rps: f64,
    daemon_us: f64,
    audit_us: f64,
}

struct Row {
    label: &'static str,
    direct_rps: f64,
    proxied_rps: f64,
    daemon_us: f64,
    audit_us: f64,
    direct_lat: Latency,
    proxied_lat: Latency,
    /// The bare relay's throughput and latency, for plain HTTP.
    relay: Option<(f64, Latency)>,
}

/// Upstreams and daemon; stopped and cleaned up on drop.
struct Env {
    dir: PathBuf,
    enforcer: PathBuf,
    config: PathBuf,
    daemon_pid: u32,
    agent: String,
    bpffs: PathBuf,
    plain: String,
    tls: String,
    /// A bare TCP relay to `plain` (`enforcer-upstream relay`), the reference hop.
    relay: String,
    relay_pid: u32,
    /// An HTTPS upstream the policy allows at host level: spliced, never decrypted.
    spliced: String,
    children: Vec<Child>,
}

/// How a bench daemon is configured.
#[derive(Clone, Copy)]
struct Opts {
    /// The bench agent gets a credential bound to the HTTPS upstream.
    credential: bool,
    /// `kernel_splice` in the daemon's configuration.
    kernel_splice: bool,
    /// Tells apart two environments running at once.
    tag: &'static str,
    /// Agents besides the bench agent, with the same policy (idle, for the memory figure).
    extra_agents: usize,
    /// No cap on one agent's connections (the memory benchmark holds thousands).
    uncapped: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            credential: false,
            kernel_splice: true,
            tag: "a",
            extra_agents: 0,
            uncapped: false,
        }
    }
}

impl Env {
    /// `credential`: the bench agent gets a credential bound to the HTTPS upstream (secret
    /// file `bench-secret`), for the masking benchmark.
    fn start(bins: &Path, opts: Opts) -> anyhow::Result<Env> {
        if opts.tag == "a" {
            clean_stale();
        }
        let pid = std::process::id();
        let tag = opts.tag;
        let dir = std::env::temp_dir().join(format!("enforcer-bench-{pid}-{tag}"));
        std::fs::create_dir_all(&dir)?;
        let agent = format!("bench{pid}{tag}");
        let bpffs = PathBuf::from(format!("/sys/fs/bpf/enforcer-bench-{pid}-{tag}"));
        let mut env = Env {
            dir: dir.clone(),
            enforcer: bins.join("enforcer"),
            config: dir.join("enforcer.yaml"),
            daemon_pid: 0,
            agent: agent.clone(),
            bpffs: bpffs.clone(),
            plain: String::new(),
            tls: String::new(),
            relay: String::new(),
            relay_pid: 0,
            spliced: String::new(),
            children: Vec::new(),
        };
        let upstream = bins.join("enforcer-upstream");
        let ca = dir.join("upstream-ca.pem");
        env.plain =
            env.spawn_upstream(Command::new(&upstream).args(["http", "127.0.0.5:0", "1"]))?;
        env.relay = env.spawn_upstream(Command::new(&upstream).args([
            "relay",
            "127.0.0.1:0",
            env.plain.as_str(),
        ]))?;
        env.relay_pid = env.children.last().map_or(0, Child::id);
        env.tls = env.spawn_upstream(
            Command::new(&upstream)
                .args(["https", "127.0.0.6:0", "1"])
                .arg(&ca)
                .arg("127.0.0.6"),
        )?;
        env.spliced = env.spawn_upstream(
            Command::new(&upstream)
                .args(["https", "127.0.0.7:0", "1"])
                .arg(dir.join("spliced-ca.pem"))
                .arg("127.0.0.7"),
        )?;
        let policy = format!(
            "rules:\n\
             \x20 - name: plain\n    allow: {{ method: [GET], url: \"http://{}/v1/**\" }}\n\
             \x20 - name: tls\n    allow: {{ method: [GET], url: \"https://{}/v1/**\" }}\n\
             \x20 - name: spliced\n    allow: {{ url: \"{}\" }}\n\
             \x20 - name: plain-root\n    allow: {{ method: [GET], url: \"http://{}/\" }}\n",
            env.plain, env.tls, env.spliced, env.plain
        );
        std::fs::write(dir.join("bench.yaml"), policy)?;
        let credentials = if opts.credential {
            use std::os::unix::fs::PermissionsExt as _;
            let secret = dir.join("bench-secret");
            std::fs::write(&secret, format!("{BENCH_SECRET}\n"))?;
            std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;
            format!(
                "    credentials:\n      - name: bench\n        secret_file: {}\n        \
                 env: BENCH_KEY\n        hosts: [\"127.0.0.6\"]\n",
                secret.display()
            )
        } else {
            String::new()
        };
        let config = format!(
            "state_dir: state\nruntime_dir: run\nbpffs_dir: {}\nproxy_port: {}\ndns_port: {}\n\
             allow_unprivileged_ports: true\nkernel_splice: {}\n\
             audit_max_bytes: 0\n\
             audit_log: audit/audit.jsonl\nmetrics_listen: 127.0.0.1:{}\n\
             dns:\n  upstream: [127.0.0.53]\n\
             tls:\n  extra_upstream_roots: [{}]\n\
             {}agents:\n  - name: {agent}\n    policy: bench.yaml\n{credentials}{}",
            bpffs.display(),
            free_port()?,
            free_port()?,
            opts.kernel_splice,
            free_port()?,
            ca.display(),
            if opts.uncapped {
                "max_connections_per_agent: 0\nmax_pending_per_agent: 0\n"
            } else {
                ""
            },
            (1..=opts.extra_agents)
                .map(|i| format!("  - name: {agent}x{i}\n    policy: bench.yaml\n"))
                .collect::<String>(),
        );
        std::fs::write(&env.config, config)?;
        let log = std::fs::File::create(dir.join("daemon.log"))?;
        let daemon = Command::new(&env.enforcer)
            .arg("--config")
            .arg(&env.config)
            .arg("daemon")
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the daemon")?;
        env.daemon_pid = daemon.id();
        env.children.push(daemon);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = Command::new(&env.enforcer)
                .arg("--config")
                .arg(&env.config)
                .arg("status")
                .output()?;
            // 4: running but degraded, as on hosts without BPF LSM; still ready.
            if matches!(status.status.code(), Some(0 | 4)) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the daemon did not become ready; see {}",
                    dir.join("daemon.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(env)
    }

    /// Starts an upstream and returns the address it printed.
    fn spawn_upstream(&mut self, cmd: &mut Command) -> anyhow::Result<String> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", display(cmd)))?;
        let stdout = child.stdout.take().context("upstream stdout")?;
        self.children.push(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        line.trim()
            .strip_prefix("ready ")
            .map(str::to_owned)
            .with_context(|| format!("upstream did not start: {line:?}"))
    }

    /// The command, run directly or enrolled under the bench agent.
    fn command(&self, program: &Path, enrolled: bool) -> Command {
        if enrolled {
            let mut c = Command::new(&self.enforcer);
            c.arg("--config")
                .arg(&self.config)
                .args(["exec", "--agent", &self.agent, "--allow-root", "--"])
                .arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    /// Requests per second with keep-alive, and the daemon's CPU per request.
    fn wrk(
        &self,
        wrk: &Path,
        url: &str,
        secs: u64,
        enrolled: bool,
        extra: &[&str],
    ) -> anyhow::Result<Thru> {
        self.wrk_measuring(wrk, url, secs, enrolled, extra, &|| self.daemon_cpu())
    }

    /// Requests per second with keep-alive, with the CPU per request of what `cpu` reads
    /// (total ticks, and a part of them).
    fn wrk_measuring(
        &self,
        wrk: &Path,
        url: &str,
        secs: u64,
        enrolled: bool,
        extra: &[&str],
        cpu: &dyn Fn() -> (u64, u64),
    ) -> anyhow::Result<Thru> {
        // Warm-up: connections, leaf certificates, upstream pools.
        let _ = self
            .command(wrk, enrolled)
            .args(["-t1", "-c4", "-d1s"])
            .args(extra)
            .arg(url)
            .output();
        let mut cmd = self.command(wrk, enrolled);
        cmd.args(["-t1", &format!("-c{CONNECTIONS}"), &format!("-d{secs}s")])
            .args(extra)
            .arg(url);
        eprintln!("xtask: {}", display(&cmd));
        let before = cpu();
        let out = cmd.output().context("running wrk")?;
        let after = cpu();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() || text.contains("Non-2xx") || text.contains("Socket errors") {
            bail!(
                "wrk reported failures:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let rps = text
            .lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
        let requests: f64 = text
            .lines()
            .find(|l| l.contains(" requests in "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no request count in wrk's output:\n{text}"))?;
        let per_request = |ticks: u64| ticks as f64 * 1e6 / ticks_per_second() / requests;
        Ok(Thru {
            rps,
            daemon_us: per_request(after.0.saturating_sub(before.0)),
            audit_us: per_request(after.1.saturating_sub(before.1)),
        })
    }

    /// CPU ticks of the daemon, and of its audit-writer thread.
    fn daemon_cpu(&self) -> (u64, u64) {
        let ticks = proc_ticks;
        let proc = PathBuf::from(format!("/proc/{}", self.daemon_pid));
        let total = ticks(&proc.join("stat"));
        let audit = std::fs::read_dir(proc.join("task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "audit-writer")
            })
            .map(|t| ticks(&t.path().join("stat")))
            .sum();
        (total, audit)
    }

    /// CPU ticks of the daemon's connection threads: the proxy threads (which copy in user
    /// space) and the splice watcher.
    fn connection_threads_cpu(&self) -> u64 {
        let proc = PathBuf::from(format!("/proc/{}", self.daemon_pid));
        std::fs::read_dir(proc.join("task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| {
                    let c = c.trim();
                    c.starts_with("proxy-") || c == "splice-watch"
                })
            })
            .map(|t| proc_ticks(&t.path().join("stat")))
            .sum()
    }

    /// Latency percentiles at the fixed rate.
    fn oha(&self, oha: &Path, url: &str, secs: u64, enrolled: bool) -> anyhow::Result<Latency> {
        let mut cmd = self.command(oha, enrolled);
        cmd.args([
            "--no-tui",
            "--output-format",
            "json",
            "--insecure",
            "--latency-correction",
            "--worker-threads",
            "1",
            "-q",
            &RATE.to_string(),
            "-c",
            &CONNECTIONS.to_string(),
            "-z",
            &format!("{secs}s"),
            url,
        ]);
        eprintln!("xtask: {}", display(&cmd));
        let out = cmd.output().context("running oha")?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "oha printed no JSON: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let codes = &v["statusCodeDistribution"];
        let ok = codes["200"].as_u64().unwrap_or(0);
        let all: u64 = codes
            .as_object()
            .map(|m| m.values().filter_map(serde_json::Value::as_u64).sum())
            .unwrap_or(0);
        if ok == 0 || ok != all {
            bail!("oha saw responses other than 200: {codes}");
        }
        let secs_to_ms = |p: &str| v["latencyPercentiles"][p].as_f64().map(|s| s * 1000.0);
        Ok(Latency {
            p50: secs_to_ms("p50").context("no p50 in oha's output")?,
            p99: secs_to_ms("p99").context("no p99 in oha's output")?,
            rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        })
    }

    /// `request` and `completion` records in the audit log, rotated files included.
    fn audit_counts(&self) -> (usize, usize) {
        let (mut requests, mut completions) = (0, 0);
        let files = std::fs::read_dir(self.dir.join("audit"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("audit.jsonl"));
        for file in files {
            let text = std::fs::read_to_string(file.path()).unwrap_or_default();
            for line in text.lines() {
                if line.contains("\"event\":\"request\"") {
                    requests += 1;
                } else if line.contains("\"event\":\"completion\"") {
                    completions += 1;
                }
            }
        }
        (requests, completions)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // The daemon first (SIGTERM: it writes its last checkpoint), then the upstreams.
        for child in self.children.iter_mut().rev() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(slice) = cgroup2_mount().map(|m| m.join("enforcer.slice")) {
            // The bench agent's cgroup and those of its extra agents (`<agent>x<i>`).
            let mine: Vec<PathBuf> = std::fs::read_dir(&slice)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&self.agent))
                .map(|e| e.path())
                .collect();
            for cg in &mine {
                let _ = std::fs::write(cg.join("cgroup.kill"), "1");
            }
            std::thread::sleep(Duration::from_millis(100));
            for cg in &mine {
                let _ = std::fs::remove_dir(cg);
            }
        }
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes what an interrupted run (whose xtask process is gone) left behind: its pinned
/// programs and maps, its cgroup and its directory. Its daemon and upstreams got the same
/// Ctrl-C and are gone.
fn clean_stale() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((pid, tag)) = name
            .strip_prefix("enforcer-bench-")
            .and_then(|rest| rest.split_once('-'))
        else {
            continue;
        };
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        eprintln!("xtask: cleaning up after an interrupted bench run ({name})");
        if let Some(cg) =
            cgroup2_mount().map(|m| m.join("enforcer.slice").join(format!("bench{pid}{tag}")))
        {
            let _ = std::fs::write(cg.join("cgroup.kill"), "1");
            std::thread::sleep(Duration::from_millis(100));
            let _ = std::fs::remove_dir(&cg);
        }
        let _ = std::fs::remove_dir_all(entry.path());
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(&name));
    }
}

fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        (fields.get(sep + 1) == Some(&"cgroup2")).then(|| PathBuf::from(fields[4]))
    })
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {kernel} (VM)")
}

fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Everything the Proxy section reports.
struct Report<'a> {
    rows: &'a [Row],
    peers: &'a [PeerRow],
    rates: &'a [ConnRate],
    threads: usize,
    secs: u64,
    runs: usize,
    /// Request and completion records in the audit log.
    records: (usize, usize),
    /// What `enforcer audit verify` printed.
    verified: &'a str,
}

fn render(report: &Report<'_>) -> String {
    let Report {
        rows,
        peers,
        rates,
        threads,
        secs,
        runs,
        records: (requests, completions),
        verified,
    } = *report;
    let date = today();
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    let mut s = String::new();
    s.push_str("## Proxy\n\n");
    s.push_str(&format!(
        "Measured {date} with `sudo -E cargo xtask bench` on {}; client, proxy and upstream \
         share the machine. Upstream: `enforcer-upstream` (hyper, one worker thread) on \
         loopback, HTTP on 127.0.0.5 and HTTPS on 127.0.0.6. Through enforcer, every request \
         is judged by a method+path rule (plain HTTP is always served; the HTTPS host is \
         intercepted in `tls.mode: auto`), with the audit log on ({requests} request and \
         {completions} completion records in this run). Same client and arguments direct and \
         enrolled (`enforcer exec`), alternating; each figure is the median of {runs} runs of \
         {secs} s (each after a 1 s warm-up), {CONNECTIONS} keep-alive connections. \
         `enforcer audit verify` on the run's log: {verified}\n\n\
         Ratios measured on one machine in one run are the figures that hold; absolute \
         requests per second vary between runs and machines.\n\n",
        machine()
    ));
    if let (Some(plain), Some(haproxy)) = (rows.first(), peers.first()) {
        s.push_str(&format!(
            "Plain HTTP/1.1 against the proxies a user would otherwise pick, in front of the \
             same upstream, `wrk -t1 -c{CONNECTIONS} -d{secs}s` (1 s warm-up), one round \
             running every path in turn. HAProxy 2-thread (`nbthread {threads}`, a Host \
             check: any other Host gets a 403, keep-alive to the upstream); nginx as a \
             reverse proxy with {threads} workers and `keepalive 64` to the upstream. CPU \
             per request is the proxy's user and system time over the run \
             (`/proc/PID/stat`, nginx's workers included) divided by the requests wrk \
             counted.\n\n\
             | path | rps | ratio to direct | ratio to HAProxy | CPU per request | CPU vs HAProxy |\n\
             |---|---:|---:|---:|---:|---:|\n\
             | direct | {:.0} | 1.00 | | | |\n",
            plain.direct_rps
        ));
        let line = |label: &str, rps: f64, cpu: f64| {
            format!(
                "| {label} | {rps:.0} | {:.2} | {:.2} | {cpu:.1} µs | {:.1}× |\n",
                rps / plain.direct_rps,
                rps / haproxy.rps,
                cpu / haproxy.cpu_us
            )
        };
        for p in peers {
            s.push_str(&line(p.label, p.rps, p.cpu_us));
        }
        s.push_str(&line(
            "**enforcer** (method+path rule, signed audit)",
            plain.proxied_rps,
            plain.daemon_us,
        ));
        let (r, c) = (
            plain.proxied_rps / haproxy.rps,
            plain.daemon_us / haproxy.cpu_us,
        );
        s.push_str(&format!(
            "\nGoal: ≥ 1.0× HAProxy's rps ({r:.2}: {}) and no more CPU per request than \
             HAProxy ({c:.1}×: {}).\n\n",
            verdict(r >= 1.0),
            verdict(c <= 1.0)
        ));
    }
    s.push_str(&format!(
        "Throughput: `wrk -t1 -c{CONNECTIONS} -d{secs}s`.\n\n\
         | | direct rps | through enforcer rps | ratio | goal | | daemon CPU per request (audit writer) |\n\
         |---|---:|---:|---:|---|---|---:|\n"
    ));
    let goals = [0.5, 0.3];
    for (row, goal) in rows.iter().zip(goals) {
        let ratio = row.proxied_rps / row.direct_rps;
        let what = if row.label == "HTTPS" {
            "HTTPS, intercepted vs direct TLS"
        } else {
            row.label
        };
        s.push_str(&format!(
            "| {what} | {:.0} | {:.0} | {ratio:.2} | ≥ {goal} | {} | {:.1} µs ({:.1} µs) |\n",
            row.direct_rps,
            row.proxied_rps,
            verdict(ratio >= goal),
            row.daemon_us,
            row.audit_us,
        ));
        if let Some((rps, _)) = row.relay {
            s.push_str(&format!(
                "| {what}, bare TCP relay (reference) | {:.0} | {rps:.0} | {:.2} | | | |\n",
                row.direct_rps,
                rps / row.direct_rps,
            ));
        }
    }
    if let [direct, haproxy, enforcer, tls_direct, tls_enforcer] = rates {
        let per_core = |r: &ConnRate| {
            if r.cpu_us > 0.0 { 1e6 / r.cpu_us } else { 0.0 }
        };
        let (plain_ratio, handshakes) =
            (enforcer.per_sec / haproxy.per_sec, per_core(tls_enforcer));
        s.push_str(&format!(
            "\nConnection rate: `wrk -t1 -c{CONNECTIONS} -d{secs}s -H 'Connection: close'`, \
             so every request opens a connection (over HTTPS, a TLS handshake with the proxy, \
             whose leaf for the host is cached after the first). CPU per connection is the \
             proxy's; handshakes per core is 1 s of the daemon's CPU divided by its CPU per \
             connection.\n\n\
             | | connections/s | ratio | CPU per connection | per core of the proxy's CPU | goal | |\n\
             |---|---:|---:|---:|---:|---|---|\n\
             | plain, direct | {:.0} | | | | | |\n\
             | plain, HAProxy | {:.0} | 1.00 | {:.1} µs | {:.0}/s | | |\n\
             | plain, enforcer | {:.0} | {plain_ratio:.2} | {:.1} µs | {:.0}/s | ≥ 0.8× HAProxy | {} |\n\
             | HTTPS, direct TLS | {:.0} | | | | | |\n\
             | HTTPS, intercepted by enforcer | {:.0} | {:.2} of direct | {:.1} µs | {handshakes:.0}/s | ≥ 1,000 handshakes/s per core | {} |\n",
            direct.per_sec,
            haproxy.per_sec,
            haproxy.cpu_us,
            per_core(haproxy),
            enforcer.per_sec,
            enforcer.cpu_us,
            per_core(enforcer),
            verdict(plain_ratio >= 0.8),
            tls_direct.per_sec,
            tls_enforcer.per_sec,
            tls_enforcer.per_sec / tls_direct.per_sec,
            tls_enforcer.cpu_us,
            verdict(handshakes >= 1000.0),
        ));
    }
    s.push_str(&format!(
        "\nLatency at a fixed {RATE} requests/s: `oha -q {RATE} --latency-correction \
         -c{CONNECTIONS} -z{secs}s --worker-threads 1` (milliseconds; added = through \
         enforcer minus direct).\n\n\
         | | direct p50 | enforcer p50 | added p50 | direct p99 | enforcer p99 | added p99 | goal (added p99) | |\n\
         |---|---:|---:|---:|---:|---:|---:|---|---|\n"
    ));
    for row in rows {
        let (d, p) = (row.direct_lat, row.proxied_lat);
        let added99 = p.p99 - d.p99;
        let goal = if row.label == "HTTPS" {
            "none set".to_owned()
        } else {
            "≤ 0.200".to_owned()
        };
        let met = if row.label == "HTTPS" {
            String::new()
        } else {
            verdict(added99 <= 0.2).to_owned()
        };
        s.push_str(&format!(
            "| {} ({:.0} rps held) | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {goal} | {met} |\n",
            row.label,
            p.rps,
            d.p50,
            p.p50,
            p.p50 - d.p50,
            d.p99,
            p.p99,
            added99
        ));
        if let Some((_, r)) = row.relay {
            s.push_str(&format!(
                "| {}, bare TCP relay (reference) | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | | |\n",
                row.label,
                d.p50,
                r.p50,
                r.p50 - d.p50,
                d.p99,
                r.p99,
                r.p99 - d.p99
            ));
        }
    }
    s.push_str(
        "\nThe reference rows go through `enforcer-upstream relay` instead: a bare TCP relay \
         threaded like the daemon's proxy (one single-threaded tokio runtime per CPU, \
         `copy_bidirectional`, no policy, no audit, not enrolled). It is the cost of one more hop on this machine, where the client, the hop \
         and the upstream share 2 cores; enforcer's figures include that hop.\n",
    );
    s
}

/// Replaces (or appends) the `## {title}` section, leaving the rest of the file alone.
fn write_section(path: &Path, title: &str, section: &str) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".to_owned());
    let new = match old.find(&format!("## {title}\n")) {
        Some(start) => match old[start + 1..].find("\n## ") {
            // Another section follows: keep it, one blank line apart.
            Some(e) => format!("{}{section}\n{}", &old[..start], &old[start + 1 + e + 1..]),
            None => format!("{}{section}", &old[..start]),
        },
        None => format!("{}\n\n{section}", old.trim_end_matches('\n')),
    };
    std::fs::write(path, new)?;
    Ok(())
}
