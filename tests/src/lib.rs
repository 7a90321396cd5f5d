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
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found; build it first (cargo xtask test does: cargo build -p enforcer -p enforcer-tests)",
        path.display()
    );
    path
}

/// Checks root, BPF and cgroup2. `None` means skip (and says why).
pub fn prerequisites(test: &str) -> Option<()> {
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

/// A TCP port free on both 127.0.0.1 and ::1.
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local addr").port();
        if TcpListener::bind(("::1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port found");
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
    pub bpffs: PathBuf,
    agents: Vec<(String, String)>,
    child: Option<Child>,
}

impl TestDaemon {
    /// Starts a daemon with these agents, `dns.static` entries and extra top-level config
    /// lines.
    pub fn start(agents: &[(&str, &str)], statics: &[(&str, &str)], extra: &str) -> TestDaemon {
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
        let mut names = Vec::new();
        let mut config = format!(
            "state_dir: state\nruntime_dir: run\nbpffs_dir: {}\nproxy_port: {proxy_port}\n\
             dns_port: {dns_port}\naudit_log: audit/audit.jsonl\n\
             metrics_listen: 127.0.0.1:{}\n{extra}\n",
            bpffs.display(),
            free_port()
        );
        config.push_str("dns:\n  upstream: [127.0.0.53]\n  static:\n");
        for (name, ip) in statics {
            config.push_str(&format!("    {name}: [{ip}]\n"));
        }
        config.push_str("agents:\n");
        for (logical, policy) in agents {
            let name = unique(&format!("t{logical}-"));
            let file = dir.path().join(format!("{logical}.yaml"));
            std::fs::write(&file, policy).expect("write policy");
            config.push_str(&format!("  - name: {name}\n    policy: {logical}.yaml\n"));
            names.push((logical.to_string(), name));
        }
        let config_path = dir.path().join("enforcer.yaml");
        std::fs::write(&config_path, config).expect("write config");
        let mut d = TestDaemon {
            dir,
            config: config_path,
            proxy_port,
            dns_port,
            bpffs,
            agents: names,
            child: None,
        };
        d.spawn();
        d
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

    pub fn audit_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("audit/audit.jsonl")).unwrap_or_default()
    }

    /// Starts (or restarts) the daemon process and waits until it answers.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("daemon log");
        let child = Command::new(enforcer_bin())
            .args(["--config"])
            .arg(&self.config)
            .arg("daemon")
            .env("RUST_LOG", "info,enforcer=debug")
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn enforcer daemon");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("daemon exited with {status} during start:\n{}", self.log());
            }
            if self.cli(&["status", "--json"]).status.success() {
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
        let mut c = Command::new(enforcer_bin());
        c.arg("--config")
            .arg(&self.config)
            .args([
                "exec",
                "--agent",
                self.agent(agent),
                "--user",
                "nobody",
                "--",
            ])
            .args(argv);
        c.env_remove("SUDO_UID").env_remove("SUDO_GID");
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
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
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
