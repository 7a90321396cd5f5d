//! The composition root: `enforcer daemon` wires config, kernel, agents, proxy, admin API and
//! audit log together.
//!
//! Start-up order matters for fail-closed behaviour: the kernel maps are written (agents,
//! allowlists, flags) before any cgroup is attached, and the proxy listens before the global
//! READY flag lets redirected connects through.

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use enforcer_common::{
    DenyEvent, GlobalConfig, LAYOUT_VERSION, agent_flags, deny_reason, global_flags,
};
use tokio::net::{TcpListener, TcpSocket};

use crate::{
    admin::{
        self, Peer,
        api::{EnrolRequest, EnrolResponse, Target, UnenrolRequest, UnenrolResponse},
    },
    agents::{Agent, IdTable, Origin, RESOLVE_INTERVAL, Registry, allowlist},
    audit::{Action, AuditEvent, AuditLog, AuditOptions, EventKind},
    bpf::{Kernel, ip_of},
    ca::{self, Ca},
    cgroup::Hierarchy,
    config::{Config, TlsMode, validate_agent_name},
    enrol::Enroller,
    policy::Policy,
    proxy::{
        self, ProxyContext,
        deputy::Deputy,
        http::L7Env,
        tls::{TlsContext, TlsError, UpstreamTls},
    },
};

/// Everything the running daemon holds.
pub struct Daemon {
    pub config: Config,
    pub kernel: Arc<Kernel>,
    pub registry: Arc<Registry>,
    pub enroller: Arc<Enroller>,
    pub audit: AuditLog,
    /// The system roots plus the local CA, for `enforcer exec` to point TLS clients at.
    pub ca_bundle: Option<PathBuf>,
    ids: Mutex<IdTable>,
    started: jiff::Timestamp,
}

/// Checks what the daemon cannot run without, naming what is missing and what to do.
pub fn preflight() -> anyhow::Result<Hierarchy> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "enforcer daemon must run as root: it loads eBPF programs, attaches them to cgroups \
             and moves processes between cgroups. Run it with sudo, or as the systemd unit"
        );
    }
    Ok(Hierarchy::discover()?)
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let hierarchy = preflight()?;
    for dir in [&config.state_dir, &config.runtime_dir] {
        create_private_dir(dir)?;
    }
    create_private_dir(&config.state_dir.join("agents"))?;

    let audit = open_audit(&config)?;
    let ca = open_ca(&config)?;
    let tls = Arc::new(TlsContext::new(&config.tls, ca.clone())?);
    let upstream_tls = match UpstreamTls::new(&config.tls.extra_upstream_roots) {
        Ok(t) => {
            tracing::debug!(roots = t.roots, "upstream TLS roots loaded");
            Some(Arc::new(t))
        }
        Err(e @ TlsError::NoRoots) => {
            tracing::warn!("{e}; intercepted requests will fail with 502");
            None
        }
        Err(e) => return Err(e.into()),
    };
    let ca_bundle = match &ca {
        Some(ca) => {
            let (path, roots) = ca
                .write_bundle()
                .context("writing the CA bundle for enrolled commands")?;
            tracing::debug!(bundle = %path.display(), system_roots = roots, "CA bundle written");
            Some(path)
        }
        None => None,
    };
    let kernel = Arc::new(Kernel::open(&config.bpffs_dir, crate::bpf::EBPF_OBJECT)?);
    let registry = Arc::new(Registry::default());
    let enroller = Arc::new(Enroller::new(
        hierarchy,
        kernel.clone(),
        registry.clone(),
        &config.state_dir,
    )?);
    let ids = Mutex::new(IdTable::load(&config.state_dir)?);
    let daemon = Arc::new(Daemon {
        config,
        kernel,
        registry,
        enroller,
        audit,
        ca_bundle,
        ids,
        started: jiff::Timestamp::now(),
    });

    // Kernel-wide settings first. READY stays as it was (set by a previous run, or clear on
    // a first start, which refuses everything) until the proxy listens.
    let previous = daemon.kernel.config().unwrap_or_default();
    daemon.kernel.set_config(GlobalConfig {
        layout_version: LAYOUT_VERSION,
        flags: previous.flags & global_flags::READY,
        proxy_port: daemon.config.proxy_port,
        dns_port: daemon.config.dns_port,
        _pad0: 0,
        netns_cookie: netns_cookie()?,
    })?;
    let dns_servers: Vec<IpAddr> = daemon
        .config
        .dns_upstreams()
        .iter()
        .map(|s| s.ip())
        .collect();
    daemon.kernel.set_dns_servers(&dns_servers)?;

    daemon.load_agents().await?;

    let proxy_ctx = Arc::new(ProxyContext {
        kernel: daemon.kernel.clone(),
        registry: daemon.registry.clone(),
        audit: daemon.audit.clone(),
        security_mode: daemon.config.security_mode,
        deputy: Deputy::new(),
        tls,
        l7: Arc::new(L7Env {
            audit: daemon.audit.clone(),
            security_mode: daemon.config.security_mode,
            upstream_tls,
        }),
    });
    let port = daemon.config.proxy_port;
    let v4 = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    let v6 = listen(SocketAddr::from((Ipv6Addr::LOCALHOST, port)))?;
    tokio::spawn(proxy::serve(v4, proxy_ctx.clone()));
    tokio::spawn(proxy::serve(v6, proxy_ctx));

    let admin_path = daemon.config.admin_socket_path();
    let admin_listener = admin::bind(&admin_path, daemon.config.admin_group.as_deref())?;
    tokio::spawn(admin::serve(admin_listener, daemon.clone()));

    if let Some(ring) = daemon.kernel.take_events() {
        tokio::spawn(read_deny_events(
            ring,
            daemon.registry.clone(),
            daemon.audit.clone(),
        ));
    }
    tokio::spawn(refresh_names(daemon.clone()));

    daemon
        .kernel
        .update_config(|c| c.flags |= global_flags::READY)?;
    let _ = daemon.audit.record(
        AuditEvent::new(EventKind::Daemon)
            .action(Action::Start)
            .detail(format!(
                "enforcer {} pid {} agents [{}]",
                env!("CARGO_PKG_VERSION"),
                std::process::id(),
                daemon.registry.names_list()
            )),
    );
    tracing::info!(
        proxy_port = port,
        admin = %admin_path.display(),
        agents = %daemon.registry.names_list(),
        "enforcer daemon ready"
    );

    wait_for_shutdown().await;
    tracing::info!(
        "shutting down; enrolled cgroups stay enforced (pinned programs refuse everything the proxy would have judged)"
    );
    let _ = daemon
        .audit
        .record(AuditEvent::new(EventKind::Daemon).action(Action::Stop));
    daemon.audit.close();
    let _ = std::fs::remove_file(&admin_path);
    Ok(())
}

fn open_audit(config: &Config) -> anyhow::Result<AuditLog> {
    let opts = AuditOptions::from_config(config);
    if !opts.key_path.exists() {
        // Like an sshd host key: a first start makes one. The public half is logged so the
        // operator can keep it for `enforcer audit verify`.
        let public = crate::audit::generate_key_file(&opts.key_path)
            .with_context(|| format!("creating the audit key {}", opts.key_path.display()))?;
        tracing::warn!(
            key = %opts.key_path.display(),
            public_key = %crate::audit::public_key_base64(&public),
            "created a new audit signing key; keep the public key to verify the log"
        );
    }
    if let Some(dir) = opts.path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the audit log directory {}", dir.display()))?;
    }
    Ok(AuditLog::open(opts)?)
}

/// The local CA, created at the first start, when TLS may be intercepted (`tls.mode` other
/// than `sni`).
fn open_ca(config: &Config) -> anyhow::Result<Option<Arc<Ca>>> {
    if config.tls.mode == TlsMode::Sni {
        return Ok(None);
    }
    let dir = Ca::dir_in(&config.state_dir);
    let (ca, origin) = Ca::open_or_create(&dir)?;
    if origin == ca::Origin::Created {
        tracing::warn!(
            cert = %dir.join(ca::CERT_FILE).display(),
            sha256 = %ca.fingerprint(),
            "created the local CA that signs intercepted TLS; `enforcer exec` makes enrolled \
             commands trust it, `enforcer ca export` prints it for anything else"
        );
    }
    Ok(Some(Arc::new(ca)))
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

fn listen(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr).with_context(|| {
        format!("binding the proxy to {addr}; is another enforcer running, or is proxy_port taken?")
    })?;
    Ok(socket.listen(4096)?)
}

/// The daemon's network namespace cookie (`SO_NETNS_COOKIE`).
fn netns_cookie() -> anyhow::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if r != 0 {
        anyhow::bail!(
            "reading the network namespace cookie failed ({}); Linux 5.14 or newer is needed",
            std::io::Error::last_os_error()
        );
    }
    Ok(cookie)
}

async fn wait_for_shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

impl Daemon {
    /// Loads every configured and ad-hoc agent, and marks agents of earlier runs that are
    /// gone as inactive (their cgroups then refuse everything).
    async fn load_agents(&self) -> anyhow::Result<()> {
        for agent in self.config.agents.clone() {
            let policy = Policy::load(&agent.policy).with_context(|| {
                format!("agent '{}': fix the policy and start again", agent.name)
            })?;
            let exec = agent
                .exec_cgroup
                .clone()
                .unwrap_or_else(|| default_exec_cgroup(&agent.name));
            let a = self
                .add_agent(
                    &agent.name,
                    Origin::Configured,
                    agent.policy.clone(),
                    exec,
                    Arc::new(policy),
                )
                .await?;
            for cg in &agent.cgroups {
                if let Err(e) = self.enroller.enrol_configured(cg, &a) {
                    anyhow::bail!(
                        "agent '{}': cannot enrol cgroup {}: {e}",
                        agent.name,
                        cg.display()
                    );
                }
            }
        }
        for (name, path) in self.saved_adhoc_agents() {
            if self.registry.get(&name).is_some() {
                tracing::warn!(
                    "ad-hoc agent '{name}' is now configured; the saved policy {} is ignored",
                    path.display()
                );
                continue;
            }
            match Policy::load(&path) {
                Ok(policy) => {
                    self.add_agent(
                        &name,
                        Origin::AdHoc,
                        path,
                        default_exec_cgroup(&name),
                        Arc::new(policy),
                    )
                    .await?;
                }
                Err(e) => tracing::error!("ad-hoc agent '{name}' not restored: {e}"),
            }
        }
        for problem in self.enroller.restore() {
            tracing::warn!("{problem}");
        }
        let known = self.registry.names();
        let stale = lock(&self.ids).others(&known);
        for (name, id) in stale {
            // Keep the slot's cgroups refusing everything: clearing ACTIVE does that.
            tracing::warn!(
                "agent '{name}' (id {id}) is no longer configured; its cgroups refuse all traffic until unenrolled"
            );
            self.kernel.set_agent_flags(id, 0)?;
        }
        Ok(())
    }

    fn saved_adhoc_agents(&self) -> Vec<(String, PathBuf)> {
        let dir = self.config.state_dir.join("agents");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let path = e.path();
                (path.extension()? == "yaml")
                    .then(|| Some((path.file_stem()?.to_str()?.to_owned(), path.clone())))?
            })
            .collect()
    }

    /// Registers an agent: kernel id, allowlist and flags, then its exec cgroup.
    async fn add_agent(
        &self,
        name: &str,
        origin: Origin,
        policy_path: PathBuf,
        exec_cgroup: PathBuf,
        policy: Arc<Policy>,
    ) -> anyhow::Result<Arc<Agent>> {
        let id = lock(&self.ids).id_for(name)?;
        let agent = Arc::new(Agent::new(
            name.to_owned(),
            id,
            origin,
            policy_path,
            exec_cgroup,
            policy,
        ));
        self.apply_policy(&agent).await?;
        self.registry.insert(agent.clone());
        self.enroller.enrol_exec_cgroup(&agent)?;
        let _ = self.audit.record(
            AuditEvent::new(EventKind::Policy)
                .action(Action::Loaded)
                .agent_id(name)
                .policy_sha256(agent.policy().sha256())
                .detail(agent.policy_path.display().to_string()),
        );
        Ok(agent)
    }

    /// Writes the agent's current policy into the kernel: allowlist first, then flags, so a
    /// change never opens more than either policy allows.
    pub async fn apply_policy(&self, agent: &Agent) -> anyhow::Result<()> {
        let policy = agent.policy();
        let upstreams = self.config.dns_upstreams();
        let computed = allowlist::compute(&policy, &self.config.dns.static_hosts, &upstreams).await;
        for (name, why) in &computed.unresolved {
            tracing::warn!(agent = %agent.name, "cannot resolve {name}: {why}; connections to it are refused until it resolves");
        }
        self.kernel.replace_allowlist(agent.id, &computed.entries)?;
        agent.set_associations(computed.associations);
        agent.set_explicit(computed.entries);
        let mut flags = agent_flags::ACTIVE;
        if computed.redirect_all {
            flags |= agent_flags::REDIRECT_ALL_TCP;
        }
        if agent.is_killed() {
            flags |= agent_flags::KILLED;
        }
        self.kernel.set_agent_flags(agent.id, flags)?;
        Ok(())
    }

    fn status_json(&self) -> serde_json::Value {
        let enrolled = self.enroller.list();
        let global = self.kernel.config().unwrap_or_default();
        let agents: Vec<serde_json::Value> = self
            .registry
            .all()
            .iter()
            .map(|a| {
                let policy = a.policy();
                let counters = self.kernel.counters(a.id);
                let flags = self.kernel.agent_flags(a.id).unwrap_or(0);
                serde_json::json!({
                    "name": a.name,
                    "id": a.id,
                    "origin": match a.origin { Origin::Configured => "configured", Origin::AdHoc => "ad-hoc" },
                    "policy": a.policy_path,
                    "policy_sha256": policy.sha256(),
                    "rules": policy.rule_count(),
                    "mode": policy.mode(),
                    "last_reload": a.reload_status(),
                    "killed": a.is_killed() || flags & agent_flags::KILLED != 0,
                    "redirect_all_tcp": flags & agent_flags::REDIRECT_ALL_TCP != 0,
                    "open_connections": a.conns.count(),
                    "cgroups": enrolled.iter().filter(|e| e.agent == a.name).collect::<Vec<_>>(),
                    "counters": {
                        "redirected": counters.redirected,
                        "refused": counters.refused,
                        "dropped_packets": counters.dropped_packets,
                        "dns_redirected": counters.dns_redirected,
                    },
                })
            })
            .collect();
        let audit = self.audit.stats();
        serde_json::json!({
            "daemon": {
                "pid": std::process::id(),
                "version": env!("CARGO_PKG_VERSION"),
                "started": self.started.to_string(),
                "proxy_port": self.config.proxy_port,
                "dns_port": self.config.dns_port,
                "security_mode": format!("{:?}", self.config.security_mode).to_lowercase(),
            },
            "kill_switch": {
                "global": global.flags & global_flags::KILLED != 0,
                "file": self.config.kill_switch_path(),
            },
            "audit": {
                "records_written": audit.records_written,
                "head_hash": audit.head_hash,
                "healthy": self.audit.healthy(),
            },
            "agents": agents,
        })
    }

    async fn enrol_request(&self, peer: &Peer, req: EnrolRequest) -> Result<EnrolResponse, String> {
        validate_agent_name(&req.agent)?;
        let agent = match (&req.policy_yaml, self.registry.get(&req.agent)) {
            (Some(_), Some(a)) if a.origin == Origin::Configured => {
                return Err(format!(
                    "agent '{}' is configured in {}; --policy is only for ad-hoc agents (drop --policy, or pick another name)",
                    req.agent,
                    a.policy_path.display()
                ));
            }
            (Some(yaml), existing) => self.adhoc_agent(peer, &req.agent, yaml, existing).await?,
            (None, Some(a)) => a,
            (None, None) => {
                return Err(format!(
                    "no agent named '{}'; configured agents: {} (or pass --policy FILE to register an ad-hoc agent)",
                    req.agent,
                    self.registry.names_list()
                ));
            }
        };
        let (cgroup, warnings) = match &req.target {
            Target::SelfProcess => {
                if !peer.still_alive() {
                    return Err("the calling process went away".into());
                }
                let (cg, w) = self
                    .enroller
                    .enrol_pid(peer.pid, &agent)
                    .map_err(|e| e.to_string())?;
                // The pid could have been recycled between the move and now only if the
                // caller died; then its pidfd says so.
                if !peer.still_alive() {
                    return Err("the calling process went away during enrolment".into());
                }
                (cg, w)
            }
            Target::Pid(pid) => self
                .enroller
                .enrol_pid(*pid, &agent)
                .map_err(|e| e.to_string())?,
            Target::Cgroup(path) => (
                self.enroller
                    .enrol_cgroup(Path::new(path), &agent)
                    .map_err(|e| e.to_string())?,
                Vec::new(),
            ),
        };
        for w in &warnings {
            tracing::warn!(agent = %agent.name, "{w}");
        }
        Ok(EnrolResponse {
            agent: agent.name.clone(),
            cgroup: cgroup.display().to_string(),
            warnings,
            ca_bundle: self.ca_bundle.as_ref().map(|p| p.display().to_string()),
        })
    }

    /// Registers (or reuses) an ad-hoc agent from policy bytes sent by the CLI.
    async fn adhoc_agent(
        &self,
        peer: &Peer,
        name: &str,
        yaml: &str,
        existing: Option<Arc<Agent>>,
    ) -> Result<Arc<Agent>, String> {
        let policy = Policy::from_yaml(yaml.as_bytes(), &format!("{name} (ad-hoc)"))
            .map_err(|e| e.to_string())?;
        if let Some(agent) = existing {
            if agent.policy().sha256() == policy.sha256() {
                return Ok(agent);
            }
            if !peer.is_root() {
                return Err(format!(
                    "ad-hoc agent '{name}' already exists with a different policy; only root may replace it (or pick another name)"
                ));
            }
        }
        let path = self
            .config
            .state_dir
            .join("agents")
            .join(format!("{name}.yaml"));
        crate::agents::write_atomic(&path, yaml.as_bytes())
            .map_err(|e| format!("saving {}: {e}", path.display()))?;
        if let Some(agent) = self.registry.get(name) {
            agent.set_policy(Arc::new(policy));
            self.apply_policy(&agent).await.map_err(|e| e.to_string())?;
            agent.set_reload_status(true, "replaced by enforcer exec --policy".into());
            return Ok(agent);
        }
        self.add_agent(
            name,
            Origin::AdHoc,
            path,
            default_exec_cgroup(name),
            Arc::new(policy),
        )
        .await
        .map_err(|e| format!("{e:#}"))
    }

    fn unenrol_request(&self, req: UnenrolRequest) -> Result<UnenrolResponse, String> {
        let cgroup = match req.target {
            Target::Pid(pid) => self.enroller.unenrol_pid(pid),
            Target::Cgroup(path) => self.enroller.unenrol_cgroup(Path::new(&path)),
            Target::SelfProcess => return Err("a process cannot unenrol itself".into()),
        }
        .map_err(|e| e.to_string())?;
        Ok(UnenrolResponse {
            cgroup: cgroup.display().to_string(),
        })
    }
}

impl admin::Handler for Daemon {
    fn peer_is_enrolled(&self, pid: u32) -> bool {
        match self.enroller.hierarchy.of_pid(pid) {
            Ok(cg) => self.enroller.is_enrolled(&cg),
            // Cannot tell: refuse (fail closed).
            Err(_) => true,
        }
    }

    fn status(&self) -> serde_json::Value {
        self.status_json()
    }

    fn enrol(
        &self,
        peer: &Peer,
        req: EnrolRequest,
    ) -> impl Future<Output = Result<EnrolResponse, String>> + Send {
        self.enrol_request(peer, req)
    }

    fn unenrol(&self, _peer: &Peer, req: UnenrolRequest) -> Result<UnenrolResponse, String> {
        self.unenrol_request(req)
    }

    fn reload(&self) -> Result<serde_json::Value, String> {
        Err("reload is not available yet; restart the daemon".into())
    }
}

/// `enforcer.slice/<agent>`, relative to the cgroup2 mount.
pub fn default_exec_cgroup(agent: &str) -> PathBuf {
    PathBuf::from("enforcer.slice").join(agent)
}

/// Reads kernel refusals and writes them (aggregated) to the audit log.
async fn read_deny_events(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    registry: Arc<Registry>,
    audit: AuditLog,
) {
    // SAFETY: the ring owns its descriptor and lives inside the AsyncFd until both drop
    // together, so the fd is never closed while registered.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(
                "cannot poll the kernel event ring: {}; kernel refusals are not audited",
                e
            );
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<DenyEvent>() {
                continue;
            }
            // SAFETY: the ring holds DenyEvent records written by the kernel programs; the
            // length was checked and read_unaligned copes with any alignment.
            let ev: DenyEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let agent = registry
                .by_id(ev.agent)
                .map(|a| a.name.clone())
                .unwrap_or_else(|| format!("#{}", ev.agent));
            let end = ev
                .comm
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(ev.comm.len());
            let comm = String::from_utf8_lossy(&ev.comm[..end]).into_owned();
            let dest = SocketAddr::new(ip_of(&ev.addr), ev.port);
            tracing::debug!(%agent, pid = ev.pid, %comm, %dest, reason = reason_name(ev.reason), "kernel refused");
            if ev.reason == deny_reason::OTHER_NETNS {
                tracing::warn!(%agent, pid = ev.pid, %comm, %dest,
                    "refused a socket in another network namespace: containers with their own network namespace are not supported yet");
            }
            audit.kernel_deny(&agent, ev.pid, &comm, dest);
        }
        guard.clear_ready();
    }
}

fn reason_name(reason: u32) -> &'static str {
    match reason {
        deny_reason::NOT_ALLOWED => "not_allowed",
        deny_reason::KILLED => "killed",
        deny_reason::LOOPBACK => "loopback",
        deny_reason::UDP => "udp",
        deny_reason::BOUND_TO_DEVICE => "bound_to_device",
        deny_reason::OTHER_NETNS => "other_netns",
        deny_reason::NO_AGENT => "no_agent",
        deny_reason::NOT_READY => "not_ready",
        deny_reason::DNS_OVER_TLS => "dns_over_tls",
        _ => "unknown",
    }
}

/// Re-resolves the names in every agent's policy before their addresses go stale.
async fn refresh_names(daemon: Arc<Daemon>) {
    let mut tick = tokio::time::interval(RESOLVE_INTERVAL);
    tick.tick().await;
    loop {
        tick.tick().await;
        for agent in daemon.registry.all() {
            if let Err(e) = daemon.apply_policy(&agent).await {
                tracing::warn!(agent = %agent.name, "refreshing the allowlist failed: {e:#}");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
