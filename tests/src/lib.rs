//! Harness for the privileged end-to-end tests.
//!
//! Each test starts its own `enforcer daemon` with unique ports, agent names (hence cgroups)
//! and bpffs directory, and its own upstream servers on 127.0.0.x. Everything a test creates
//! is removed in `Drop`, which also runs when the test panics: daemon processes, enrolled
//! processes (through `cgroup.kill`), cgroups, bpffs pins and temporary files.
//!
//! The tests need root, BPF and cgroup2. Without them they skip with a message, unless
//! `ENFORCER_E2E=require` is set (as `cargo xtask test` does), in which case they fail: a
//! suite that silently skips proves nothing.
//!
//! Traffic only ever goes to 127.0.0.0/8, ::1, or network namespaces a test creates.
//!
//! [`web`] holds hyper upstreams (HTTP, HTTPS with HTTP/2, streaming, WebSocket echo) and a
//! test CA for the L7 tests; enrolled clients are the probe and `curl`.

pub mod web;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// The `enforcer` binary under test.
pub fn enforcer_bin() -> PathBuf {
    bin("ENFORCER_BIN", "enforcer")
}

/// The socket probe.
pub fn probe_bin() -> PathBuf {
    bin("ENFORCER_PROBE_BIN", "enforcer-probe")
}

fn bin(var: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    // A test runs from target/<profile>/deps/, a harness binary from target/<profile>/.
    let exe = std::env::current_exe().expect("test executable path");
    let here = exe.parent().expect("executable dir");
    let path = [here.join(name), here.parent().unwrap_or(here).join(name)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| here.join(name));
    assert!(
        path.exists(),
        "{} not found; build it first (cargo xtask test does: cargo build -p enforcer -p enforcer-tests)",
        path.display()
    );
    path
}

/// Checks root, BPF and cgroup2. `None` means skip (and says why).
pub fn prerequisites(test: &str) -> Option<()> {
    // SAFETY: geteuid cannot fail and touches no memory.
    let missing = if unsafe { libc::geteuid() } != 0 {
        Some("root")
    } else if !Path::new("/sys/fs/bpf").exists() {
        Some("bpffs (/sys/fs/bpf)")
    } else if cgroup2_mount().is_none() {
        Some("a cgroup2 mount")
    } else {
        None
    };
    match missing {
        None => Some(()),
        Some(what) if std::env::var("ENFORCER_E2E").as_deref() == Ok("require") => {
            panic!("{test}: needs {what}, and ENFORCER_E2E=require is set")
        }
        Some(what) => {
            eprintln!("skipping {test}: needs {what} (run `cargo xtask test` as root)");
            None
        }
    }
}

/// Where cgroup2 is mounted.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        (fields.get(sep + 1) == Some(&"cgroup2")).then(|| PathBuf::from(fields[4]))
    })
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name unique to this test process and call.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}{}x{n}", std::process::id())
}

/// A TCP port free on both 127.0.0.1 and ::1 (and for UDP on 127.0.0.1), for a daemon to
/// bind later. It is taken below the kernel's ephemeral range: a port from that range (what
/// binding port 0 gives) can be taken by any outgoing connection of a parallel test before
/// the daemon binds it, which made daemon starts fail now and then with "address in use".
/// A per-process counter, started at an offset from the pid, keeps parallel tests apart.
pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    const FIRST: usize = 10_000;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<usize>().ok())
        .unwrap_or(32_768);
    let span = low.saturating_sub(FIRST).max(1_000);
    let offset = std::process::id() as usize * 997;
    for _ in 0..span {
        let port = FIRST + (offset + NEXT.fetch_add(1, Ordering::SeqCst)) % span;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("::1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port found below the ephemeral range (from {FIRST} to {low})");
}

/// One request an upstream saw.
#[derive(Debug, Clone)]
pub struct Hit {
    pub method: String,
    pub path: String,
    pub host: String,
}

/// A tiny HTTP/1.1 upstream on a loopback address. It answers every request with
/// `200 hello from NAME` and records what it saw; `accepted()` counts TCP connections.
pub struct Upstream {
    pub addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    /// Listens on `ip` (e.g. "127.0.0.5") at a free port.
    pub fn http(ip: &str, name: &str) -> Upstream {
        let listener = TcpListener::bind((ip, 0)).expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let hits = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, a, s, name) = (
            hits.clone(),
            accepted.clone(),
            stop.clone(),
            name.to_owned(),
        );
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        a.fetch_add(1, Ordering::SeqCst);
                        let (h, name) = (h.clone(), name.clone());
                        std::thread::spawn(move || serve_http(stream, &h, &name));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Upstream {
            addr,
            hits,
            accepted,
            stop,
        }
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve_http(mut stream: TcpStream, hits: &Mutex<Vec<Hit>>, name: &str) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            let Ok(httparse::Status::Complete(len)) = req.parse(&buf) else {
                break;
            };
            let host = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
                .unwrap_or_default();
            let close = req.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close")
            });
            hits.lock().unwrap().push(Hit {
                method: req.method.unwrap_or("").to_owned(),
                path: req.path.unwrap_or("").to_owned(),
                host,
            });
            let body = format!("hello from {name}");
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if stream.write_all(resp.as_bytes()).is_err() || close {
                return;
            }
            buf.drain(..len);
        }
    }
}

/// A TCP listener that only counts connections (for "the upstream saw nothing").
pub struct Counter {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Counter {
    pub fn new(ip: &str) -> Counter {
        let listener = TcpListener::bind((ip, 0)).expect("bind counter");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if listener.accept().is_ok() {
                    a.fetch_add(1, Ordering::SeqCst);
                } else {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
        Counter {
            addr,
            accepted,
            stop,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The deterministic bytes of a blob transfer: a xorshift64 stream from a fixed seed, eight
/// bytes per step, so sender and checker agree on every byte without sharing a file.
pub struct BlobBytes {
    state: u64,
    pending: [u8; 8],
    used: usize,
}

impl Default for BlobBytes {
    fn default() -> Self {
        Self {
            state: 0x9e37_79b9_7f4a_7c15,
            pending: [0; 8],
            used: 8,
        }
    }
}

impl BlobBytes {
    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.used == 8 {
                let mut x = self.state;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                self.state = x;
                self.pending = x.to_le_bytes();
                self.used = 0;
            }
            *b = self.pending[self.used];
            self.used += 1;
        }
    }

    /// The sha256 (hex) of the first `len` bytes of the stream.
    pub fn sha256_of(len: u64) -> String {
        use sha2::Digest as _;
        let mut bytes = BlobBytes::default();
        let mut hash = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            bytes.fill(&mut buf[..n]);
            hash.update(&buf[..n]);
            left -= n as u64;
        }
        hex::encode(hash.finalize())
    }
}

/// A TCP upstream for bulk transfers. Each connection's first line says what to do:
/// - `sink`: read until EOF, answer `COUNT SHA256` and close;
/// - `source N`: send the first N bytes of [`BlobBytes`] (N = 0: without end) and close.
pub struct Blob {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Blob {
    pub fn start(ip: &str) -> Blob {
        let listener = TcpListener::bind((ip, 0)).expect("bind blob upstream");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        std::thread::spawn(move || Blob::serve(conn));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Blob { addr, stop }
    }

    fn serve(conn: TcpStream) {
        use sha2::Digest as _;
        let _ = conn.set_nonblocking(false);
        let mut reader = BufReader::new(conn.try_clone().expect("clone"));
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        let mut conn = conn;
        let mut buf = vec![0u8; 1 << 16];
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["sink"] => {
                let mut hash = sha2::Sha256::new();
                let mut count = 0u64;
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            hash.update(&buf[..n]);
                            count += n as u64;
                        }
                        Err(_) => return,
                    }
                }
                let _ = writeln!(conn, "{count} {}", hex::encode(hash.finalize()));
            }
            ["source", n] => {
                let total: u64 = n.parse().unwrap_or(0);
                let mut bytes = BlobBytes::default();
                let mut sent = 0u64;
                while total == 0 || sent < total {
                    let n = if total == 0 {
                        buf.len()
                    } else {
                        (total - sent).min(buf.len() as u64) as usize
                    };
                    bytes.fill(&mut buf[..n]);
                    if conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    sent += n as u64;
                }
            }
            _ => {}
        }
    }
}

impl Drop for Blob {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A scenario of a privileged test: made only when the prerequisites hold (root, bpffs,
/// cgroup2; otherwise the test skips, or fails under `ENFORCER_E2E=require`), it builds the
/// daemons the test runs:
///
/// ```ignore
/// let Some(s) = Scenario::new("l7_plain_rules") else { return };
/// let up = WebUpstream::http("127.0.0.5", "api");
/// let d = s.daemon().agent("a", &policy).resolve("api.test", "127.0.0.5").start();
/// ```
pub struct Scenario {
    name: String,
}

impl Scenario {
    /// `None` (the test returns) when the prerequisites are missing and not required.
    pub fn new(name: &str) -> Option<Scenario> {
        prerequisites(name).map(|()| Scenario {
            name: name.to_owned(),
        })
    }

    /// The scenario's name, as `prerequisites` got it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A daemon to configure.
    pub fn daemon(&self) -> DaemonBuilder {
        DaemonBuilder::default()
    }
}

/// The configuration of one test daemon; see [`Scenario`].
#[derive(Default, Clone)]
pub struct DaemonBuilder {
    agents: Vec<(String, String)>,
    statics: Vec<(String, String)>,
    dns_upstream: Option<SocketAddr>,
    dns_extra: String,
    extra: String,
    /// More lines under an agent's entry (logical name → lines indented four spaces).
    agent_extra: Vec<(String, String)>,
    _tmp: Option<Arc<tempfile::TempDir>>,
}

impl DaemonBuilder {
    /// An agent under `logical` (the real name is made unique) with this policy.
    pub fn agent(mut self, logical: &str, policy: &str) -> Self {
        self.agents.push((logical.to_owned(), policy.to_owned()));
        self
    }

    /// More lines under agent `logical`'s entry in the config, indented four spaces (e.g.
    /// `credentials:`).
    pub fn agent_lines(mut self, logical: &str, lines: &str) -> Self {
        self.agent_extra
            .push((logical.to_owned(), lines.to_owned()));
        self
    }

    /// A `dns.static` entry.
    pub fn resolve(mut self, name: &str, ip: &str) -> Self {
        self.statics.push((name.to_owned(), ip.to_owned()));
        self
    }

    /// The resolver's upstream (default 127.0.0.53, where nothing listens).
    pub fn dns_upstream(mut self, addr: SocketAddr) -> Self {
        self.dns_upstream = Some(addr);
        self
    }

    /// More lines of the `dns:` section, indented two spaces.
    pub fn dns_lines(mut self, lines: &str) -> Self {
        self.dns_extra.push_str(lines);
        self
    }

    /// More top-level configuration lines.
    pub fn config(mut self, lines: &str) -> Self {
        self.extra.push_str(lines);
        self.extra.push('\n');
        self
    }

    /// Upstream TLS trusts this CA (`tls.extra_upstream_roots`), besides the system roots;
    /// `tls_lines` are more lines of the `tls:` section, indented two spaces.
    pub fn upstream_ca(mut self, ca: &web::TestCa, tls_lines: &str) -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod temp dir");
        }
        let path = tmp.path().join("upstream-ca.pem");
        ca.write_pem(&path);
        self.extra.push_str(&format!(
            "tls:\n  extra_upstream_roots: [{}]\n{tls_lines}\n",
            path.display()
        ));
        self._tmp = Some(Arc::new(tmp));
        self
    }

    /// Writes the configuration without starting the daemon (call `spawn`).
    pub fn build(self) -> TestDaemon {
        let agents: Vec<(&str, &str)> = self
            .agents
            .iter()
            .map(|(a, p)| (a.as_str(), p.as_str()))
            .collect();
        let statics: Vec<(&str, &str)> = self
            .statics
            .iter()
            .map(|(n, ip)| (n.as_str(), ip.as_str()))
            .collect();
        let agent_extra: Vec<(&str, &str)> = self
            .agent_extra
            .iter()
            .map(|(a, l)| (a.as_str(), l.as_str()))
            .collect();
        let mut d = TestDaemon::with_dns(
            &agents,
            &statics,
            self.dns_upstream,
            &self.dns_extra,
            &self.extra,
            &agent_extra,
        );
        d.keep = self._tmp;
        d
    }

    /// Writes the configuration and starts the daemon.
    pub fn start(self) -> TestDaemon {
        let mut d = self.build();
        d.spawn();
        d
    }
}

/// One agent of a test daemon.
pub struct AgentSpec {
    /// Name used in the test; the real agent name is made unique.
    pub logical: String,
    pub policy: String,
}

/// A running `enforcer daemon` with its own everything.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub proxy_port: u16,
    pub dns_port: u16,
    pub metrics_port: u16,
    pub bpffs: PathBuf,
    agents: Vec<(String, String)>,
    child: Option<Child>,
    /// Files the configuration names outside `dir` (an upstream CA), kept while it runs.
    keep: Option<Arc<tempfile::TempDir>>,
}

impl TestDaemon {
    /// Writes the configuration: `upstream` is the test resolver (`None`: 127.0.0.53, where
    /// nothing listens), `dns_extra` more lines of the `dns:` section (indented two spaces).
    /// Tests use [`Scenario::daemon`].
    fn with_dns(
        agents: &[(&str, &str)],
        statics: &[(&str, &str)],
        upstream: Option<SocketAddr>,
        dns_extra: &str,
        extra: &str,
        agent_extra: &[(&str, &str)],
    ) -> TestDaemon {
        let dir = tempfile::Builder::new()
            .prefix("enforcer-e2e-")
            .tempdir()
            .expect("temp dir");
        // Enrolled commands run as nobody and read the daemon's CA bundle (and test CA files)
        // from here.
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod temp dir");
        }
        let proxy_port = free_port();
        let mut dns_port = free_port();
        while dns_port == proxy_port {
            dns_port = free_port();
        }
        let bpffs = PathBuf::from(format!("/sys/fs/bpf/{}", unique("enforcer-test-")));
        let metrics_port = free_port();
        let mut names = Vec::new();
        let mut config = format!(
            "state_dir: state\nruntime_dir: run\nbpffs_dir: {}\nproxy_port: {proxy_port}\n\
             allow_unprivileged_ports: true\n\
             dns_port: {dns_port}\naudit_log: audit/audit.jsonl\n\
             metrics_listen: 127.0.0.1:{metrics_port}\n{extra}\n",
            bpffs.display(),
        );
        let upstream = upstream.map_or("127.0.0.53".to_string(), |a| a.to_string());
        config.push_str(&format!(
            "dns:\n  upstream: [\"{upstream}\"]\n{dns_extra}\n  static:\n"
        ));
        for (name, ip) in statics {
            config.push_str(&format!("    {name}: [{ip}]\n"));
        }
        config.push_str("agents:\n");
        for (logical, policy) in agents {
            let name = unique(&format!("t{logical}-"));
            let file = dir.path().join(format!("{logical}.yaml"));
            std::fs::write(&file, policy).expect("write policy");
            config.push_str(&format!("  - name: {name}\n    policy: {logical}.yaml\n"));
            for (_, lines) in agent_extra.iter().filter(|(a, _)| a == logical) {
                config.push_str(lines);
                if !lines.ends_with('\n') {
                    config.push('\n');
                }
            }
            names.push((logical.to_string(), name));
        }
        // What enrolled commands see as /etc/resolv.conf (bind-mounted in a private mount
        // namespace): loopback only, so even a broken redirect reaches no real resolver.
        std::fs::write(
            dir.path().join("resolv.conf"),
            "nameserver 127.0.0.53\noptions timeout:2 attempts:1\n",
        )
        .expect("write resolv.conf");
        // The state directory as `cargo xtask install` and the unit make it: root's alone.
        {
            use std::os::unix::{fs::DirBuilderExt as _, fs::PermissionsExt as _};
            let state = dir.path().join("state");
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&state)
                .expect("state dir");
            std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700))
                .expect("chmod state dir");
        }
        let config_path = dir.path().join("enforcer.yaml");
        std::fs::write(&config_path, config).expect("write config");
        TestDaemon {
            dir,
            config: config_path,
            proxy_port,
            dns_port,
            metrics_port,
            bpffs,
            agents: names,
            child: None,
            keep: None,
        }
    }

    /// The policy file of a test agent (rewrite it to test reloads).
    pub fn policy_path(&self, logical: &str) -> PathBuf {
        self.dir.path().join(format!("{logical}.yaml"))
    }

    /// The global kill-switch file.
    pub fn global_kill_path(&self) -> PathBuf {
        self.dir.path().join("state/killswitch")
    }

    /// A test agent's kill-switch file.
    pub fn agent_kill_path(&self, logical: &str) -> PathBuf {
        self.dir.path().join("state/kill").join(self.agent(logical))
    }

    /// The real name of a test agent.
    pub fn agent(&self, logical: &str) -> &str {
        &self
            .agents
            .iter()
            .find(|(l, _)| l == logical)
            .unwrap_or_else(|| panic!("no agent {logical}"))
            .1
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// The audit log, once it has stopped growing: the daemon's writer takes queued records
    /// in batches every 10 ms, so a record of something that just happened (a completion
    /// written as a response ends) may land a little after the client is done. Read until
    /// two reads 50 ms apart agree (at most 5 s, for a daemon that keeps writing).
    /// The directory of the audit log and its rotated files.
    pub fn audit_dir(&self) -> PathBuf {
        self.dir.path().join("audit")
    }

    pub fn audit_log(&self) -> String {
        let path = self.dir.path().join("audit/audit.jsonl");
        let read = || std::fs::read_to_string(&path).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut text = read();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let again = read();
            if again == text || Instant::now() > deadline {
                return again;
            }
            text = again;
        }
    }

    /// Starts (or restarts) the daemon process and waits until it answers.
    pub fn spawn(&mut self) {
        self.spawn_with(None, &[]);
    }

    /// Starts the daemon the way systemd would: `NOTIFY_SOCKET` set to `notify`, and the
    /// sockets `fds` (name, descriptor) passed as `LISTEN_FDS` 3, 4, ...
    pub fn spawn_as_systemd(&mut self, notify: &Path, fds: &[(String, std::os::fd::RawFd)]) {
        self.spawn_with(Some(notify), fds);
    }

    fn spawn_with(&mut self, notify: Option<&Path>, fds: &[(String, std::os::fd::RawFd)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("daemon log");
        // bash sets LISTEN_PID to its own pid and moves the descriptors to 3, 4, ...
        // before exec'ing the daemon, like systemd does.
        let mut script = String::new();
        // Through a parking range first, so a source numbered 3, 4, ... is never clobbered.
        for (i, (_, fd)) in fds.iter().enumerate() {
            // SAFETY: clearing FD_CLOEXEC on a descriptor we own, so the shell inherits it.
            unsafe { libc::fcntl(*fd, libc::F_SETFD, 0) };
            script.push_str(&format!("exec {}<&{fd}; ", 200 + i));
        }
        for (_, fd) in fds {
            script.push_str(&format!("exec {fd}<&-; "));
        }
        for i in 0..fds.len() {
            script.push_str(&format!(
                "exec {}<&{}; exec {}<&-; ",
                3 + i,
                200 + i,
                200 + i
            ));
        }
        if !fds.is_empty() {
            script.push_str("export LISTEN_PID=$$; ");
        }
        // As the systemd unit runs it: UMask=0077, so everything the daemon creates is private
        // unless it sets the mode itself (the CA bundle must stay readable by agents).
        script.push_str("umask 077; exec \"$0\" \"$@\"");
        // bash, not sh: dash cannot redirect descriptors above 9.
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(&script)
            .arg(enforcer_bin())
            .arg("--config")
            .arg(&self.config)
            .arg("daemon")
            .env(
                "RUST_LOG",
                "info,enforcer=debug,enforcer::proxy::sockmap=trace",
            )
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        if let Some(notify) = notify {
            cmd.env("NOTIFY_SOCKET", notify);
        }
        if !fds.is_empty() {
            cmd.env("LISTEN_FDS", fds.len().to_string());
            let names: Vec<&str> = fds.iter().map(|(n, _)| n.as_str()).collect();
            cmd.env("LISTEN_FDNAMES", names.join(":"));
        }
        let child = cmd.spawn().expect("spawn enforcer daemon");
        for (_, fd) in fds {
            // SAFETY: restoring FD_CLOEXEC on our own descriptor.
            unsafe { libc::fcntl(*fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("daemon exited with {status} during start:\n{}", self.log());
            }
            // 0 healthy, 4 running but degraded: either way it answers.
            if matches!(self.cli(&["status", "--json"]).status.code(), Some(0 | 4)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not become ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs the daemon in the foreground when its start is meant to fail: its exit status and
    /// everything it printed (it must exit within 30 s).
    pub fn start_failing(&self) -> (std::process::ExitStatus, String) {
        let mut child = Command::new("bash")
            .arg("-c")
            .arg("umask 077; exec \"$0\" \"$@\"")
            .arg(enforcer_bin())
            .arg("--config")
            .arg(&self.config)
            .arg("daemon")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn enforcer daemon");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the daemon did not exit: its start was expected to fail");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut text = String::new();
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read>),
        ]
        .into_iter()
        .flatten()
        {
            let mut pipe = pipe;
            let _ = pipe.read_to_string(&mut text);
        }
        (status, text)
    }

    /// Rewrites one top-level `key: value` line of the configuration (before a start).
    pub fn set_config(&self, key: &str, value: &str) {
        let text = std::fs::read_to_string(&self.config).expect("read config");
        let prefix = format!("{key}: ");
        let out: Vec<String> = text
            .lines()
            .map(|l| {
                if l.starts_with(&prefix) {
                    format!("{prefix}{value}")
                } else {
                    l.to_owned()
                }
            })
            .collect();
        std::fs::write(&self.config, out.join("\n") + "\n").expect("write config");
    }

    /// SIGKILLs the daemon (no clean-up of its own).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERMs the daemon and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `enforcer --config CFG ARGS...`
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(enforcer_bin())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("run enforcer")
    }

    /// The enforcer command line for `exec` under an agent, as user nobody.
    pub fn exec_cmd(&self, agent: &str, argv: &[&str]) -> Command {
        self.exec_as(agent, &["--user", "nobody"], argv)
    }

    /// `enforcer exec --agent A IDENTITY... -- ARGV`, in a mount namespace whose
    /// /etc/resolv.conf points at loopback.
    pub fn exec_as(&self, agent: &str, identity: &[&str], argv: &[&str]) -> Command {
        let mut c = Command::new(enforcer_bin());
        c.arg("--config")
            .arg(&self.config)
            .args(["exec", "--agent", self.agent(agent)])
            .args(identity)
            .arg("--")
            .args(argv);
        c.env_remove("SUDO_UID").env_remove("SUDO_GID");
        with_test_resolv_conf(&mut c, self.dir.path().join("resolv.conf"));
        c
    }

    /// Runs the probe enrolled under an agent, as nobody.
    pub fn probe(&self, agent: &str, args: &[&str]) -> Output {
        let probe = probe_bin();
        let mut argv = vec![probe.to_str().expect("utf-8 path")];
        argv.extend_from_slice(args);
        self.exec_cmd(agent, &argv)
            .output()
            .expect("run enforcer exec")
    }

    /// Starts the probe enrolled, with piped stdout, for long-running modes.
    pub fn probe_spawn(&self, agent: &str, args: &[&str]) -> Child {
        let probe = probe_bin();
        let mut argv = vec![probe.to_str().expect("utf-8 path")];
        argv.extend_from_slice(args);
        self.exec_cmd(agent, &argv)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn enforcer exec")
    }

    /// Runs `curl` enrolled under an agent, as nobody: silent but for errors, no proxy from
    /// the environment, at most 15 s.
    pub fn curl(&self, agent: &str, args: &[&str]) -> Output {
        self.curl_cmd(agent, args)
            .output()
            .expect("run enforcer exec curl")
    }

    /// The command line of [`TestDaemon::curl`], for spawning.
    pub fn curl_cmd(&self, agent: &str, args: &[&str]) -> Command {
        let mut argv = vec!["curl", "-sS", "--noproxy", "*", "--max-time", "15"];
        argv.extend_from_slice(args);
        self.exec_cmd(agent, &argv)
    }

    /// Agent's status object.
    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            matches!(out.status.code(), Some(0 | 4)),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// The problems `status` lists, but for the protections this kernel cannot give (no BPF
    /// LSM), which the daemon reports from its first instant: what a test's own action caused.
    pub fn problems(&self) -> Vec<String> {
        self.status()["problems"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str())
            .filter(|p| !p.starts_with("missing protection"))
            .map(str::to_owned)
            .collect()
    }

    /// Whether this kernel runs per-cgroup BPF LSM programs, as the daemon found.
    pub fn has_bpf_lsm(&self) -> bool {
        !self.status()["problems"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| {
                p.as_str()
                    .is_some_and(|p| p.starts_with("missing protection"))
            })
    }

    pub fn agent_status(&self, logical: &str) -> serde_json::Value {
        let name = self.agent(logical).to_owned();
        self.status()["agents"]
            .as_array()
            .expect("agents")
            .iter()
            .find(|a| a["name"] == name.as_str())
            .cloned()
            .expect("agent in status")
    }

    /// The agent's exec cgroup.
    pub fn cgroup(&self, logical: &str) -> PathBuf {
        cgroup2_mount()
            .expect("cgroup2")
            .join("enforcer.slice")
            .join(self.agent(logical))
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.stop();
        for (_, name) in &self.agents {
            if let Some(mount) = cgroup2_mount() {
                remove_cgroup(&mount.join("enforcer.slice").join(name));
            }
        }
        let _ = std::fs::remove_dir_all(&self.bpffs);
    }
}

/// Runs the command in a private mount namespace with `resolv` bind-mounted over
/// /etc/resolv.conf.
pub fn with_test_resolv_conf(cmd: &mut Command, resolv: PathBuf) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            use nix::mount::{MsFlags, mount};
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )?;
            mount(
                Some(&resolv),
                "/etc/resolv.conf",
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            Ok(())
        });
    }
}

/// A test DNS server on a loopback address: answers from its records, NXDOMAIN otherwise,
/// and remembers every question it was asked. UDP and TCP on the same port.
pub struct DnsUpstream {
    pub addr: SocketAddr,
    queries: Arc<Mutex<Vec<(String, String)>>>,
    stop: Arc<AtomicBool>,
}

/// One record: owner, type ("A", "AAAA", "CNAME" or "TXT"), value, TTL.
pub type DnsRecord<'a> = (&'a str, &'a str, &'a str, u32);

impl DnsUpstream {
    pub fn start(ip: &str, records: &[DnsRecord<'_>]) -> DnsUpstream {
        use hickory_proto::rr::{Name, RData, Record, rdata};
        let udp = std::net::UdpSocket::bind((ip, 0)).expect("bind test resolver");
        let addr = udp.local_addr().expect("addr");
        let tcp = TcpListener::bind(addr).expect("bind test resolver tcp");
        udp.set_read_timeout(Some(Duration::from_millis(100))).ok();
        tcp.set_nonblocking(true).ok();
        let records: Vec<Record> = records
            .iter()
            .map(|(name, kind, value, ttl)| {
                let name = Name::from_ascii(format!("{name}.")).expect("name");
                let data = match *kind {
                    "A" => RData::A(rdata::A(value.parse().expect("v4"))),
                    "AAAA" => RData::AAAA(rdata::AAAA(value.parse().expect("v6"))),
                    "CNAME" => RData::CNAME(rdata::CNAME(
                        Name::from_ascii(format!("{value}.")).expect("target"),
                    )),
                    "TXT" => RData::TXT(rdata::TXT::new(vec![(*value).to_owned()])),
                    other => panic!("record type {other}"),
                };
                Record::from_rdata(name, *ttl, data)
            })
            .collect();
        let records = Arc::new(records);
        let queries = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (records, queries, stop) = (records.clone(), queries.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((n, peer)) = udp.recv_from(&mut buf)
                        && let Some(reply) = dns_reply(&buf[..n], &records, &queries)
                    {
                        let _ = udp.send_to(&reply, peer);
                    }
                }
            });
        }
        {
            let (records, queries, stop) = (records, queries.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok((mut s, _)) = tcp.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut len = [0u8; 2];
                    if s.read_exact(&mut len).is_err() {
                        continue;
                    }
                    let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if s.read_exact(&mut q).is_err() {
                        continue;
                    }
                    if let Some(reply) = dns_reply(&q, &records, &queries) {
                        let _ = s.write_all(&(reply.len() as u16).to_be_bytes());
                        let _ = s.write_all(&reply);
                    }
                }
            });
        }
        DnsUpstream {
            addr,
            queries,
            stop,
        }
    }

    /// Every (name, type) asked, names without the trailing dot.
    pub fn queries(&self) -> Vec<(String, String)> {
        self.queries.lock().unwrap().clone()
    }

    pub fn was_asked(&self, name: &str) -> bool {
        self.queries()
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
    }
}

impl Drop for DnsUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn dns_reply(
    bytes: &[u8],
    records: &[hickory_proto::rr::Record],
    queries: &Mutex<Vec<(String, String)>>,
) -> Option<Vec<u8>> {
    use hickory_proto::{
        op::{Message, OpCode, ResponseCode},
        rr::RData,
    };
    let request = Message::from_vec(bytes).ok()?;
    let q = request.queries.first()?.clone();
    queries.lock().unwrap().push((
        q.name().to_ascii().trim_end_matches('.').to_owned(),
        q.query_type().to_string(),
    ));
    let mut reply = Message::response(request.metadata.id, OpCode::Query);
    reply.metadata.recursion_available = true;
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.add_query(q.clone());
    // Follow CNAMEs within our own records, like a recursive resolver would.
    let mut name = q.name().to_lowercase();
    let mut found = false;
    for _ in 0..8 {
        let mut next = None;
        for r in records.iter().filter(|r| r.name.to_lowercase() == name) {
            found = true;
            if r.record_type() == q.query_type() {
                reply.add_answer(r.clone());
            } else if let RData::CNAME(t) = &r.data {
                reply.add_answer(r.clone());
                next = Some(t.0.to_lowercase());
            }
        }
        match next {
            Some(n) => name = n,
            None => break,
        }
    }
    if !found {
        reply.metadata.response_code = ResponseCode::NXDomain;
    }
    reply.to_vec().ok()
}

/// A plain HTTP GET to 127.0.0.1:port (for /metrics and /healthz). Returns status and body.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).expect("write");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(&buf) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => panic!("bad response: {}", String::from_utf8_lossy(&buf)),
    };
    (
        resp.code.unwrap_or(0),
        String::from_utf8_lossy(&buf[len..]).into_owned(),
    )
}

/// A cgroup a test makes or causes, removed (its processes killed) when the guard drops,
/// so a failed test leaves none behind.
pub struct CgroupDir(pub PathBuf);

impl CgroupDir {
    /// Guards `path` without creating it (for a cgroup the daemon will create).
    pub fn later(path: PathBuf) -> Self {
        Self(path)
    }

    /// Creates `path` (and its parents) and guards it.
    pub fn create(path: PathBuf) -> Self {
        std::fs::create_dir_all(&path).expect("create cgroup");
        Self(path)
    }
}

impl Drop for CgroupDir {
    fn drop(&mut self) {
        remove_cgroup(&self.0);
    }
}

/// Kills every process in a cgroup and removes it.
pub fn remove_cgroup(path: &Path) {
    if !path.exists() {
        return;
    }
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir(path);
}

/// Reads lines from a child's stdout on a thread.
pub struct Lines {
    rx: std::sync::mpsc::Receiver<String>,
}

impl Lines {
    pub fn of(child: &mut Child) -> Lines {
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines { rx }
    }

    /// The next line, waiting at most `timeout` (a bound against hangs, not a measurement).
    pub fn next(&self, timeout: Duration) -> Option<String> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Waits for a line satisfying `pred`.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(line) if pred(&line) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }
}

/// Polls `f` until it holds, for at most `secs` seconds (a bound against hangs, not a
/// measurement).
pub fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The daemon's `proxy-*` threads: each name, with its `/proc/PID/task/TID` directory.
pub fn proxy_threads(pid: u32) -> std::collections::BTreeMap<String, PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|task| {
            let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
            let comm = comm.trim();
            comm.starts_with("proxy-")
                .then(|| (comm.to_owned(), task.path()))
        })
        .collect()
}

/// CLOCK_MONOTONIC in nanoseconds (comparable across processes, for benchmarks).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Kills a child and waits for it.
pub fn reap(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// stdout of an output as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr of an output as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
