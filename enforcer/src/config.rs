//! The daemon's configuration file (YAML).
//!
//! One struct, every key optional with its default documented on the field. Unknown keys are
//! rejected with their line and column. Relative paths are resolved against the directory of
//! the config file. Every subcommand honours `--config FILE` and `ENFORCER_CONFIG`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Where the daemon looks when neither `--config` nor `ENFORCER_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/enforcer/enforcer.yaml";
/// Largest config file accepted.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read config {path}: {}; pass --config FILE or set ENFORCER_CONFIG",
        crate::sys::io_text(source)
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} is larger than 1 MiB; is it the right file?")]
    TooLarge { path: PathBuf },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// What to do when enforcer itself fails (an internal error, an unwritable audit log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SecurityMode {
    /// Internal errors deny (the default).
    #[default]
    Strict,
    /// Internal errors are logged and traffic passes.
    Permissive,
}

/// How the proxy treats TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// Intercept hosts whose rules need L7 inspection; splice the rest after an SNI check.
    #[default]
    Auto,
    /// Never intercept: SNI-level decisions only.
    Sni,
    /// Intercept every host.
    Intercept,
}

/// `tls:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// `auto` (default), `sni` or `intercept`.
    pub mode: TlsMode,
    /// Extra PEM files of CAs trusted for upstream connections, besides the system roots.
    /// Default: none.
    pub extra_upstream_roots: Vec<PathBuf>,
    /// Hosts never intercepted (mTLS clients, pinned certificates): exact names, IP literals
    /// or `*.example.com` (subdomains at any depth). Default: none.
    pub passthrough_hosts: Vec<String>,
    /// A TLS connection refused on its server name gets a handshake with a leaf for that
    /// name and a JSON 403 to every request, so an agent that trusts the local CA reads why.
    /// Default: true.
    pub deny_in_band: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            mode: TlsMode::default(),
            extra_upstream_roots: Vec::new(),
            passthrough_hosts: Vec::new(),
            deny_in_band: true,
        }
    }
}

/// `approvals:` section.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalsConfig {
    /// `[COMMAND, ARG...]` run for each new held request, with one JSON line on stdin (5 s
    /// limit). Default: none.
    pub notify: Vec<String>,
}

/// `http:` section.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// A request body on GET, HEAD, OPTIONS or TRACE: `refuse` (default, a 400) or `forward`
    /// (for APIs that search with GET bodies; the request then goes upstream with
    /// `Connection: close` and that upstream connection is never reused).
    pub bodies_on_safe_methods: SafeMethodBodies,
}

/// What to do with a body on a method that has no body semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SafeMethodBodies {
    /// 400: an upstream that ignores such a body would read it as the next request.
    #[default]
    Refuse,
    /// Forwarded, on an upstream connection closed after the response.
    Forward,
}

/// `dns:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Upstream resolvers (`IP` or `IP:PORT`). Default: the nameservers in
    /// `/etc/resolv.conf`, read by the daemon at start.
    pub upstream: Vec<String>,
    /// Static answers: name → addresses. Consulted before any upstream. Default: empty.
    #[serde(rename = "static")]
    pub static_hosts: BTreeMap<String, Vec<IpAddr>>,
    /// Longest time a learned address stays in the kernel allowlist, in seconds. Default: 300.
    pub max_ttl: u32,
    /// Most learned addresses one agent may hold in the kernel allowlist at once (the map is
    /// shared by every agent). Past it that agent's new answers get SERVFAIL, while other
    /// agents keep learning. Default: 4096.
    pub max_learned_per_agent: usize,
    /// CIDRs that wildcard-matched names may resolve to despite the rebinding guard.
    /// Default: none.
    pub allow_internal_answers: Vec<ipnet::IpNet>,
    /// Distinct names one agent may ask a minute under each wildcard (names written exactly
    /// do not count); past it, NXDOMAIN. 0 lifts the budget. Default: 120.
    pub wildcard_names_per_minute: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            upstream: Vec::new(),
            static_hosts: BTreeMap::new(),
            max_ttl: 300,
            max_learned_per_agent: 4096,
            allow_internal_answers: Vec::new(),
            wildcard_names_per_minute: 120,
        }
    }
}

/// One `agents:` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Agent name: `[A-Za-z0-9_.-]`, 1 to 64 characters. Required.
    pub name: String,
    /// Policy file. Required.
    pub policy: PathBuf,
    /// Existing cgroups (absolute, or relative to the cgroup2 mount) enrolled at start, such
    /// as a systemd service or slice. Default: none.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
    /// Cgroup for processes started with `enforcer exec`. Default:
    /// `enforcer.slice/<name>` under the cgroup2 mount.
    #[serde(default)]
    pub exec_cgroup: Option<PathBuf>,
    /// Secrets the proxy injects for this agent (`credentials:`). Default: none.
    #[serde(default)]
    pub credentials: Vec<CredentialConfig>,
}

/// One `credentials:` entry of an agent: a secret the agent never holds. It gets a
/// placeholder; the proxy swaps the real value in only toward `hosts`, only for this agent's
/// connections (and, with `binaries`, only those the kernel saw made by these executables).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    /// `[A-Za-z0-9_-]`, 1 to 64 characters, unique within the agent. Required.
    pub name: String,
    /// A root-owned file, not readable by group or others, not a symlink, holding the secret
    /// (one trailing newline is dropped). This or `systemd_credential`.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// A systemd credential (`LoadCredential=`), read from `$CREDENTIALS_DIRECTORY/<name>`.
    #[serde(default)]
    pub systemd_credential: Option<String>,
    /// The variable `enforcer exec` sets to the placeholder. Required.
    pub env: String,
    /// Where the real value may go: exact names, `*.example.com` (subdomains), IP literals.
    /// Required, at least one.
    pub hosts: Vec<String>,
    /// Only connections made by these executables (resolved to device and inode). Default:
    /// any executable of the agent.
    #[serde(default)]
    pub binaries: Vec<PathBuf>,
    /// Put before the random part, for clients that check a key's shape (`sk-`).
    /// `[A-Za-z0-9_-]`, at most 32 characters. Default: none.
    #[serde(default)]
    pub placeholder_prefix: String,
}

impl AgentConfig {
    /// The cgroup `enforcer exec` puts this agent's commands in.
    pub fn exec_cgroup(&self) -> PathBuf {
        self.exec_cgroup
            .clone()
            .unwrap_or_else(|| default_exec_cgroup(&self.name))
    }
}

/// `enforcer.slice/<agent>`, relative to the cgroup2 mount.
pub fn default_exec_cgroup(agent: &str) -> PathBuf {
    PathBuf::from("enforcer.slice").join(agent)
}

/// Most proxy threads: past a few dozen, more threads only add memory.
pub const MAX_PROXY_THREADS: usize = 256;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Persistent state: ad-hoc agents, enrolments, CA, audit key. Default: `/var/lib/enforcer`.
    pub state_dir: PathBuf,
    /// Runtime files: the admin socket and the pid file. Default: `/run/enforcer`.
    pub runtime_dir: PathBuf,
    /// bpffs directory for pinned maps and links. Default: `/sys/fs/bpf/enforcer`.
    pub bpffs_dir: PathBuf,
    /// Group whose members may enrol their own processes through the admin socket.
    /// Default: none (root only).
    pub admin_group: Option<String>,
    /// Transparent proxy port on 127.0.0.1 and `[::1]`. Default: 1001 (below 1024, so no
    /// unprivileged user can take it while the daemon restarts).
    pub proxy_port: u16,
    /// Local DNS resolver port on 127.0.0.1 and `[::1]`. Default: 1002.
    pub dns_port: u16,
    /// Allow `proxy_port` or `dns_port` at or above `net.ipv4.ip_unprivileged_port_start`
    /// (any user could then take the port while the daemon restarts, and receive what agents
    /// send there: a warning is logged at every start). Default: `false`, such ports are
    /// refused.
    pub allow_unprivileged_ports: bool,
    /// Proxy threads, each running its own connections. Default: one per CPU the daemon may
    /// run on.
    pub proxy_threads: Option<usize>,
    /// Move the bytes of spliced connections (TLS decided on its SNI, `tcp:` rules) in the
    /// kernel, with a sockhash and an `sk_skb` verdict, instead of copying them through the
    /// daemon. A kernel that refuses the program falls back to copying, with a warning.
    /// Default: `true`.
    pub kernel_splice: bool,
    /// Proxied connections one agent may hold open; past it its new connections are reset
    /// and recorded, while other agents are unaffected. 0: no cap. Default: 4096.
    pub max_connections_per_agent: usize,
    /// Connections of one agent that may be in their opening at once (first bytes, TLS
    /// handshake, first request head); past it its new connections are reset. 0: no cap.
    /// Default: 256.
    pub max_pending_per_agent: usize,
    /// Prometheus metrics and health. Default: `127.0.0.1:15090`.
    pub metrics_listen: SocketAddr,
    /// Global kill-switch file. Default: `<state_dir>/killswitch`.
    pub kill_switch: Option<PathBuf>,
    /// Audit log (JSON Lines). Default: `/var/log/enforcer/audit.jsonl`.
    pub audit_log: PathBuf,
    /// Ed25519 signing key for audit checkpoints. Default: `<state_dir>/audit.key`.
    pub audit_key: Option<PathBuf>,
    /// Rotate the audit log when it grows past this many bytes. Default: 104857600 (100 MiB).
    pub audit_rotate_bytes: u64,
    /// Write a signed checkpoint after this many records (and at least every second).
    /// Default: 1000.
    pub audit_checkpoint_records: u64,
    /// Keep the rotated audit files within this many bytes in total: past it, the oldest are
    /// removed (and a record says so). 0 keeps every file. Default: 1073741824 (1 GiB).
    pub audit_max_bytes: u64,
    /// Denial records (DNS and HTTP) each agent may write one by one a minute; past it, until
    /// the minute is over, that agent's denials are folded into one record a second per kind
    /// with a count, and other agents' records are untouched. 0: no budget. Default: 300.
    pub audit_agent_budget: u64,
    /// `strict` (default): internal errors deny. `permissive`: they log and pass.
    pub security_mode: SecurityMode,
    /// TLS handling.
    pub tls: TlsConfig,
    /// HTTP handling.
    pub http: HttpConfig,
    /// DNS resolver.
    pub dns: DnsConfig,
    /// Configured agents. Default: none.
    pub agents: Vec<AgentConfig>,
    /// `enforcer.internal`: every agent may read its own refusals and ask its own policy.
    /// Default: true.
    pub agent_api: bool,
    /// Requests held by `ask` rules.
    pub approvals: ApprovalsConfig,
    /// The file this configuration was read from (not a key: set by [`Config::load`]).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/enforcer"),
            runtime_dir: PathBuf::from("/run/enforcer"),
            bpffs_dir: PathBuf::from("/sys/fs/bpf/enforcer"),
            admin_group: None,
            proxy_port: 1001,
            dns_port: 1002,
            allow_unprivileged_ports: false,
            proxy_threads: None,
            kernel_splice: true,
            max_connections_per_agent: 4096,
            max_pending_per_agent: 256,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 15090)),
            kill_switch: None,
            audit_log: PathBuf::from("/var/log/enforcer/audit.jsonl"),
            audit_key: None,
            audit_rotate_bytes: 100 << 20,
            audit_checkpoint_records: 1000,
            audit_max_bytes: 1 << 30,
            audit_agent_budget: 300,
            security_mode: SecurityMode::Strict,
            tls: TlsConfig::default(),
            http: HttpConfig::default(),
            dns: DnsConfig::default(),
            agents: Vec::new(),
            agent_api: true,
            approvals: ApprovalsConfig::default(),
            source: None,
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut config = Self::parse(&text, path, &base)?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// The daemon's ports must be privileged (below `ip_unprivileged_port_start`), or no
    /// unprivileged process may squat them while the daemon restarts. `Ok(Some(warning))` when
    /// `allow_unprivileged_ports` lets unprivileged ones through.
    pub fn check_port_privilege(&self) -> Result<Option<String>, ConfigError> {
        let start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1024);
        let low = [("proxy_port", self.proxy_port), ("dns_port", self.dns_port)]
            .into_iter()
            .filter(|(_, p)| *p >= start)
            .map(|(k, p)| format!("{k} {p}"))
            .collect::<Vec<_>>();
        if low.is_empty() {
            return Ok(None);
        }
        let what = format!(
            "{} at or above net.ipv4.ip_unprivileged_port_start ({start}): any user can bind it \
             while the daemon is down or restarting, and receive agents' requests",
            low.join(" and ")
        );
        if self.allow_unprivileged_ports {
            Ok(Some(format!(
                "{what} (allowed by allow_unprivileged_ports)"
            )))
        } else {
            Err(ConfigError::Invalid {
                path: self.source.clone().unwrap_or_default(),
                message: format!(
                    "{what}; use ports below {start} (the defaults are 1001 and 1002), or set \
                     allow_unprivileged_ports: true to accept the risk"
                ),
            })
        }
    }

    /// How to start the daemon on this configuration, for hints in error messages.
    pub fn start_hint(&self) -> String {
        match &self.source {
            Some(p) if p != Path::new(DEFAULT_CONFIG_PATH) => format!(
                "`enforcer --config {} daemon` (or `systemctl start enforcer`)",
                p.display()
            ),
            _ => "`enforcer daemon` or `systemctl start enforcer`".to_owned(),
        }
    }

    /// Parses config text; `base` is the directory relative paths are resolved against.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_yaml::from_str(text).map_err(|err| ConfigError::Parse {
                path: path.to_owned(),
                message: describe_yaml_error(&err),
            })?
        };
        config.resolve_paths(base);
        config.validate(path)?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut self.state_dir);
        abs(&mut self.runtime_dir);
        abs(&mut self.bpffs_dir);
        abs(&mut self.audit_log);
        if let Some(p) = self.kill_switch.as_mut() {
            abs(p);
        }
        if let Some(p) = self.audit_key.as_mut() {
            abs(p);
        }
        for p in &mut self.tls.extra_upstream_roots {
            abs(p);
        }
        for agent in &mut self.agents {
            abs(&mut agent.policy);
            for c in &mut agent.credentials {
                if let Some(p) = c.secret_file.as_mut() {
                    abs(p);
                }
            }
        }
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        if self.proxy_port == 0 || self.dns_port == 0 {
            return Err(invalid(
                "proxy_port and dns_port must be set to a real port (1-65535)".into(),
            ));
        }
        if self.proxy_port == self.dns_port {
            return Err(invalid(format!(
                "proxy_port and dns_port are both {}; give each its own port",
                self.proxy_port
            )));
        }
        if let Some(n) = self.proxy_threads
            && !(1..=MAX_PROXY_THREADS).contains(&n)
        {
            return Err(invalid(format!(
                "proxy_threads is {n}; give 1 to {MAX_PROXY_THREADS}, or leave it out for one per CPU"
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for agent in &self.agents {
            validate_agent_name(&agent.name).map_err(|m| invalid(format!("agents: {m}")))?;
            if !seen.insert(agent.name.as_str()) {
                return Err(invalid(format!(
                    "agents: '{}' is listed twice; agent names must be unique",
                    agent.name
                )));
            }
        }
        for upstream in &self.dns.upstream {
            parse_dns_upstream(upstream).map_err(|m| invalid(format!("dns.upstream: {m}")))?;
        }
        for agent in &self.agents {
            self.validate_credentials(agent)
                .map_err(|m| invalid(format!("agents: '{}': credentials: {m}", agent.name)))?;
        }
        Ok(())
    }

    fn validate_credentials(&self, agent: &AgentConfig) -> Result<(), String> {
        let token = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        let mut names = std::collections::BTreeSet::new();
        let mut envs = std::collections::BTreeSet::new();
        for c in &agent.credentials {
            if c.name.is_empty() || c.name.len() > 64 || !token(&c.name) {
                return Err(format!(
                    "'{}' is not a credential name; use 1 to 64 of [A-Za-z0-9_-]",
                    c.name
                ));
            }
            if !names.insert(c.name.as_str()) {
                return Err(format!(
                    "'{}' is listed twice; names must be unique",
                    c.name
                ));
            }
            match (&c.secret_file, &c.systemd_credential) {
                (Some(_), None) => {}
                (None, Some(n)) if !n.is_empty() && token(n) => {}
                (None, Some(n)) => {
                    return Err(format!(
                        "'{}': systemd_credential '{n}' is not a credential name",
                        c.name
                    ));
                }
                _ => {
                    return Err(format!(
                        "'{}': give exactly one of secret_file and systemd_credential",
                        c.name
                    ));
                }
            }
            let env_ok = c
                .env
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && c.env
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !env_ok {
                return Err(format!(
                    "'{}': env '{}' is not a variable name ([A-Za-z_][A-Za-z0-9_]*)",
                    c.name, c.env
                ));
            }
            if !envs.insert(c.env.as_str()) {
                return Err(format!(
                    "'{}': env {} is set by another credential of this agent",
                    c.name, c.env
                ));
            }
            if c.placeholder_prefix.len() > 32 || !token(&c.placeholder_prefix) {
                return Err(format!(
                    "'{}': placeholder_prefix '{}' must be at most 32 of [A-Za-z0-9_-]",
                    c.name, c.placeholder_prefix
                ));
            }
            if c.hosts.is_empty() {
                return Err(format!(
                    "'{}': hosts is empty; name where the secret may be sent",
                    c.name
                ));
            }
            for b in &c.binaries {
                if !b.is_absolute() {
                    return Err(format!(
                        "'{}': binaries: '{}' is not an absolute path",
                        c.name,
                        b.display()
                    ));
                }
            }
            for h in &c.hosts {
                let bound = crate::credentials::HostPattern::parse(h)
                    .map_err(|e| format!("'{}': hosts: {e}", c.name))?;
                if self.tls.mode == TlsMode::Sni {
                    return Err(format!(
                        "'{}': tls.mode is sni, so the proxy never sees a request to swap the \
                         secret into; use tls.mode auto or intercept",
                        c.name
                    ));
                }
                for p in &self.tls.passthrough_hosts {
                    if crate::credentials::HostPattern::parse(p).is_ok_and(|p| p.overlaps(&bound)) {
                        return Err(format!(
                            "'{}': host '{h}' is also covered by tls.passthrough_hosts '{p}'; \
                             a bound host must be intercepted to swap the secret in, so take \
                             it out of one of them",
                            c.name
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The global kill-switch file.
    pub fn kill_switch_path(&self) -> PathBuf {
        self.kill_switch
            .clone()
            .unwrap_or_else(|| self.state_dir.join("killswitch"))
    }

    /// The per-agent kill-switch file.
    pub fn agent_kill_path(&self, agent: &str) -> PathBuf {
        self.state_dir.join("kill").join(agent)
    }

    /// The audit signing key.
    pub fn audit_key_path(&self) -> PathBuf {
        self.audit_key
            .clone()
            .unwrap_or_else(|| self.state_dir.join("audit.key"))
    }

    /// How many proxy threads to run: `proxy_threads`, or one per CPU.
    pub fn proxy_threads(&self) -> usize {
        self.proxy_threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_PROXY_THREADS)
        })
    }

    /// The admin API socket.
    /// The trust bundle `enforcer exec` points TLS clients at: `runtime_dir/ca-bundle.pem`,
    /// readable by every user (the state directory is root's alone).
    pub fn ca_bundle_path(&self) -> PathBuf {
        self.runtime_dir.join("ca-bundle.pem")
    }

    pub fn admin_socket_path(&self) -> PathBuf {
        self.runtime_dir.join("admin.sock")
    }

    pub fn agent(&self, name: &str) -> Option<&AgentConfig> {
        self.agents.iter().find(|a| a.name == name)
    }

    /// Upstream DNS servers: the configured ones, or `/etc/resolv.conf`'s.
    pub fn dns_upstreams(&self) -> Vec<SocketAddr> {
        if self.dns.upstream.is_empty() {
            return system_nameservers();
        }
        self.dns
            .upstream
            .iter()
            .filter_map(|u| parse_dns_upstream(u).ok())
            .collect()
    }
}

/// Checks an agent name: `[A-Za-z0-9_.-]{1,64}`, not `.` or `..`. Names become file and
/// cgroup names, so nothing else is allowed.
pub fn validate_agent_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if name.is_empty() || name.len() > 64 || !ok_chars || name == "." || name == ".." {
        return Err(format!(
            "agent name '{name}' is invalid: use 1 to 64 characters from A-Z a-z 0-9 _ . -"
        ));
    }
    Ok(())
}

/// `IP` or `IP:PORT` (`[v6]:PORT` for IPv6 with a port).
pub fn parse_dns_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    Err(format!(
        "'{s}' is not an address; write an IP such as 192.0.2.53 or IP:PORT such as [2001:db8::53]:53"
    ))
}

/// The `nameserver` lines of `/etc/resolv.conf`.
fn system_nameservers() -> Vec<SocketAddr> {
    let Ok(text) = std::fs::read_to_string("/etc/resolv.conf") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Turns a serde_yaml error into "line L column C: message".
pub fn describe_yaml_error(err: &serde_yaml::Error) -> String {
    match err.location() {
        Some(loc) => format!("line {} column {}: {err}", loc.line(), loc.column()),
        None => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(
            text,
            Path::new("/etc/enforcer/enforcer.yaml"),
            Path::new("/etc/enforcer"),
        )
    }

    #[test]
    fn empty_config_gets_documented_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.proxy_port, 1001);
        assert_eq!(c.dns_port, 1002);
        assert_eq!(c.state_dir, Path::new("/var/lib/enforcer"));
        assert_eq!(
            c.kill_switch_path(),
            Path::new("/var/lib/enforcer/killswitch")
        );
        assert_eq!(c.audit_key_path(), Path::new("/var/lib/enforcer/audit.key"));
        assert_eq!(c.security_mode, SecurityMode::Strict);
        assert_eq!(c.tls.mode, TlsMode::Auto);
        assert_eq!(c.dns.max_ttl, 300);
    }

    #[test]
    fn unknown_key_is_rejected_with_location() {
        let err = parse("proxy_port: 1001\nproxy_prot: 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("proxy_prot"), "{err}");
        let err = parse("agents:\n  - name: a\n    policy: p.yaml\n    cgroup: []\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cgroup"), "{err}");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let c =
            parse("state_dir: state\nagents:\n  - name: demo\n    policy: policies/demo.yaml\n")
                .unwrap();
        assert_eq!(c.state_dir, Path::new("/etc/enforcer/state"));
        assert_eq!(
            c.agents[0].policy,
            Path::new("/etc/enforcer/policies/demo.yaml")
        );
    }

    #[test]
    fn bad_agents_are_rejected() {
        assert!(parse("agents:\n  - {name: 'a/b', policy: p}\n").is_err());
        assert!(parse("agents:\n  - {name: a, policy: p}\n  - {name: a, policy: q}\n").is_err());
        assert!(parse("proxy_port: 5\ndns_port: 5\n").is_err());
        assert!(parse("dns: {upstream: [not-an-ip]}\n").is_err());
    }

    #[test]
    fn proxy_threads_default_to_one_per_cpu_and_are_bounded() {
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(parse("").unwrap().proxy_threads(), cpus);
        assert_eq!(parse("proxy_threads: 3\n").unwrap().proxy_threads(), 3);
        for bad in ["proxy_threads: 0\n", "proxy_threads: 257\n"] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains("give 1 to 256"), "{bad}: {err}");
        }
    }

    #[test]
    fn dns_upstream_forms() {
        assert_eq!(parse_dns_upstream("127.0.0.53").unwrap().port(), 53);
        assert_eq!(parse_dns_upstream("127.0.0.53:5353").unwrap().port(), 5353);
        assert_eq!(parse_dns_upstream("[::1]:5353").unwrap().port(), 5353);
    }
}
