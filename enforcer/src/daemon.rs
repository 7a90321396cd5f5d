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
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use anyhow::Context as _;
use enforcer_common::{
    DenyEvent, GlobalConfig, LAYOUT_VERSION, agent_flags, deny_reason, global_flags,
};
use std::os::fd::AsFd as _;

use sha2::Digest as _;

use crate::{
    admin::{
        self, Peer,
        api::{EnrolRequest, EnrolResponse, Target, UnenrolRequest, UnenrolResponse},
    },
    agents::{Agent, IdTable, LearnedFile, Origin, Registry, allowlist},
    audit::{Action, AuditEvent, AuditLog, AuditOptions, EventKind, Scope},
    bpf::{Kernel, ip_of},
    ca::{self, Ca},
    cgroup::Hierarchy,
    config::{AgentConfig, Config, TlsMode, validate_agent_name},
    control::{
        killswitch::{KillFiles, KillState, changes},
        sched::Yielders,
    },
    dns::{self, server::Resolver},
    enrol::Enroller,
    policy::Policy,
    proxy::{
        self, ProxyContext,
        deputy::Deputy,
        http::L7Env,
        tls::{TlsContext, TlsError, UpstreamTls},
    },
};

pub mod listeners;

use listeners::Inherited;

/// Everything the running daemon holds.
pub struct Daemon {
    pub config: Config,
    /// The file `config` came from, watched for agent-list changes.
    pub config_path: Option<PathBuf>,
    pub kernel: Arc<Kernel>,
    pub registry: Arc<Registry>,
    pub enroller: Arc<Enroller>,
    pub audit: AuditLog,
    /// The system roots plus the local CA, for `enforcer exec` to point TLS clients at.
    pub ca_bundle: Option<PathBuf>,
    ids: Mutex<IdTable>,
    started: jiff::Timestamp,
    /// The agent list currently in force (the config's, as last loaded successfully).
    agent_configs: Mutex<Vec<AgentConfig>>,
    /// SHA-256 of the config file as last loaded.
    config_sha: Mutex<Option<String>>,
    kill_files: KillFiles,
    /// The kill-switch state currently applied; the async lock serialises changes.
    kill_state: tokio::sync::Mutex<KillState>,
    /// Names learned by the previous run, handed to agents as they are added.
    saved_learned: Mutex<std::collections::BTreeMap<String, Vec<crate::agents::LearnedName>>>,
    /// The proxy threads, lowered while they tear down streams the kill switch cut; unset
    /// until they start, or when the daemon may not raise their priority back.
    proxy_threads: OnceLock<Arc<Yielders>>,
}

/// How long the proxy threads may stay lowered after the kill switch cut streams, at most:
/// tearing down 1,000 streams takes them about 20 ms of CPU. Past it they get their priority
/// back whether or not every killed stream is gone, so that other agents' traffic is never
/// held back for long.
const DEFER_TEARDOWN_MAX: Duration = Duration::from_millis(250);

/// Checks what the daemon cannot run without, naming what is missing and what to do.
pub fn preflight() -> anyhow::Result<Hierarchy> {
    raise_fd_limit();
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "enforcer daemon must run as root: it loads eBPF programs, attaches them to cgroups \
             and moves processes between cgroups. Run it with sudo, or as the systemd unit"
        );
    }
    Ok(Hierarchy::discover()?)
}

/// Every proxied connection holds two descriptors: lift the soft limit to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    inherited: Inherited,
) -> anyhow::Result<()> {
    let hierarchy = preflight()?;
    for dir in [&config.state_dir, &config.runtime_dir] {
        create_private_dir(dir)?;
    }
    create_private_dir(&config.state_dir.join("agents"))?;
    let kill_files = KillFiles {
        global: config.kill_switch_path(),
        agent_dir: config.state_dir.join("kill"),
    };
    create_private_dir(&kill_files.agent_dir)?;
    // Read before anything is attached: a switch engaged at start holds from the first
    // instant.
    let names: Vec<String> = config.agents.iter().map(|a| a.name.clone()).collect();
    let initial_kill = kill_files.read(&names);

    let audit = open_audit(&config)?;
    audit.set_observer(Box::new(crate::metrics::observe));
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
    let config_state_dir = config.state_dir.clone();
    let config_sha = config_path
        .as_deref()
        .and_then(|p| std::fs::read(p).ok())
        .map(|b| hex::encode(sha2::Sha256::digest(b)));
    let daemon = Arc::new(Daemon {
        agent_configs: Mutex::new(config.agents.clone()),
        config,
        config_path,
        kernel,
        registry,
        enroller,
        audit,
        ca_bundle,
        ids,
        started: jiff::Timestamp::now(),
        config_sha: Mutex::new(config_sha),
        kill_files,
        kill_state: tokio::sync::Mutex::new(initial_kill.clone()),
        saved_learned: Mutex::new(LearnedFile::load(&config_state_dir).agents),
        proxy_threads: OnceLock::new(),
    });

    // Kernel-wide settings first. READY stays as it was (set by a previous run, or clear on
    // a first start, which refuses everything) until the proxy listens.
    let previous = daemon.kernel.config().unwrap_or_default();
    if previous.layout_version != 0 && previous.layout_version != LAYOUT_VERSION {
        anyhow::bail!(
            "the pinned maps under {} were written with layout version {}, this enforcer uses {}; \
             refusing to misread them. Stop the old daemon, run `enforcer detach --all --force`, \
             then start this one",
            daemon.config.bpffs_dir.display(),
            previous.layout_version,
            LAYOUT_VERSION
        );
    }
    let mut flags = previous.flags & global_flags::READY;
    if initial_kill.global {
        flags |= global_flags::KILLED;
        tracing::warn!(file = %daemon.kill_files.global.display(), "global kill switch engaged at start");
    }
    daemon.kernel.set_config(GlobalConfig {
        layout_version: LAYOUT_VERSION,
        flags,
        proxy_port: daemon.config.proxy_port,
        dns_port: daemon.config.dns_port,
        _pad0: 0,
        netns_cookie: netns_cookie()?,
    })?;

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
    // Listeners: the ones systemd kept across a restart, or new ones.
    let mut inherited = inherited;
    let port = daemon.config.proxy_port;
    let dns_port = daemon.config.dns_port;
    let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let proxy_v4 = listeners::tcp(&mut inherited, "proxy-v4", SocketAddr::new(v4, port))?;
    let proxy_v6 = listeners::tcp(&mut inherited, "proxy-v6", SocketAddr::new(v6, port))?;
    let dns_udp_v4 = listeners::udp(&mut inherited, "dns-udp-v4", SocketAddr::new(v4, dns_port))?;
    let dns_udp_v6 = listeners::udp(&mut inherited, "dns-udp-v6", SocketAddr::new(v6, dns_port))?;
    let dns_tcp_v4 = listeners::tcp(&mut inherited, "dns-tcp-v4", SocketAddr::new(v4, dns_port))?;
    let dns_tcp_v6 = listeners::tcp(&mut inherited, "dns-tcp-v6", SocketAddr::new(v6, dns_port))?;
    listeners::forget(&inherited.leftovers());
    listeners::store_all(&[
        ("proxy-v4", proxy_v4.as_fd()),
        ("proxy-v6", proxy_v6.as_fd()),
        ("dns-udp-v4", dns_udp_v4.as_fd()),
        ("dns-udp-v6", dns_udp_v6.as_fd()),
        ("dns-tcp-v4", dns_tcp_v4.as_fd()),
        ("dns-tcp-v6", dns_tcp_v6.as_fd()),
    ]);
    let threads = daemon.config.proxy_threads();
    let workers = proxy::Workers::start(threads, proxy_ctx)
        .with_context(|| format!("starting {threads} proxy threads"))?;
    match Yielders::new(workers.thread_ids()) {
        Some(y) => {
            let _ = daemon.proxy_threads.set(y);
        }
        None => tracing::info!(
            "no CAP_SYS_NICE: the kill switch cannot run at real-time priority or let the proxy \
             threads yield while they tear down cut streams; it still works, only slower on a \
             busy host"
        ),
    }
    tokio::spawn(proxy::accept(proxy_v4, workers.clone()));
    tokio::spawn(proxy::accept(proxy_v6, workers));

    let admin_path = daemon.config.admin_socket_path();
    let admin_listener = admin::bind(&admin_path, daemon.config.admin_group.as_deref())?;
    tokio::spawn(admin::serve(admin_listener, daemon.clone()));

    if let Some(logger) = daemon.kernel.take_logger() {
        tokio::spawn(forward_ebpf_logs(logger));
    }
    if let Some(ring) = daemon.kernel.take_events() {
        tokio::spawn(read_deny_events(
            ring,
            daemon.registry.clone(),
            daemon.audit.clone(),
        ));
    }
    let resolver = Arc::new(Resolver::new(
        daemon.kernel.clone(),
        daemon.registry.clone(),
        daemon.audit.clone(),
        &daemon.config.dns.static_hosts,
        daemon.config.dns_upstreams(),
        daemon.config.dns.max_ttl,
        daemon.config.dns.allow_internal_answers.clone(),
    ));
    tokio::spawn(dns::server::serve_udp(dns_udp_v4, resolver.clone()));
    tokio::spawn(dns::server::serve_udp(dns_udp_v6, resolver.clone()));
    tokio::spawn(dns::server::serve_tcp(dns_tcp_v4, resolver.clone()));
    tokio::spawn(dns::server::serve_tcp(dns_tcp_v6, resolver));
    daemon
        .kernel
        .update_config(|c| c.flags |= global_flags::DNS_REDIRECT)?;
    tokio::spawn(sweep_learned(daemon.clone()));
    tokio::spawn(crate::control::run(daemon.clone()));
    let metrics_listener = listeners::tcp(
        &mut Inherited::default(),
        "metrics",
        daemon.config.metrics_listen,
    )?;
    tokio::spawn(crate::metrics::serve(metrics_listener, daemon.clone()));

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
    // Only now: eBPF attached, proxy, resolver and admin listening.
    notify_ready(&daemon);

    wait_for_shutdown().await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
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

/// Tells systemd we are ready (no-op without `NOTIFY_SOCKET`) and keeps its watchdog fed
/// while the kernel maps answer.
fn notify_ready(daemon: &Arc<Daemon>) {
    let status = format!("enforcing {} agent(s)", daemon.registry.all().len());
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);
    if let Some(interval) = sd_notify::watchdog_enabled() {
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tick.tick().await;
                // A daemon that can no longer read its own maps is not healthy: let systemd
                // restart it.
                if daemon.kernel.config().is_ok() {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
            }
        });
    }
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
        // Names learned before a restart, for addresses the kernel may still allow.
        if let Some(saved) = self
            .saved_learned
            .lock()
            .ok()
            .and_then(|mut m| m.remove(name))
        {
            let now = crate::bpf::boot_ns();
            for l in saved.into_iter().filter(|l| l.expires_boot_ns > now) {
                agent.learn(&l.name, l.ip, l.expires_boot_ns, l.exact);
            }
        }
        // The kill state is set before the agent's flags reach the kernel.
        let killed = match self.kill_state.try_lock() {
            Ok(state) => state.kills(name),
            Err(_) => self.kill_files.read(&[name.to_owned()]).kills(name),
        };
        agent.set_killed(killed);
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
        let computed = allowlist::compute(&policy);
        self.kernel.replace_allowlist(agent.id, &computed.entries)?;
        agent.set_explicit(computed.entries);
        // Addresses learned for names this policy no longer allows go at once.
        let dry_run = policy.mode() == crate::policy::Mode::DryRun;
        let orphaned = agent.forget_disallowed(|name| {
            dry_run || policy.host_match(name) != crate::policy::HostMatch::None
        });
        for ip in orphaned {
            self.kernel.remove_allow(
                agent.id,
                &crate::bpf::AllowEntry {
                    net: ipnet::IpNet::from(ip),
                    port: None,
                    expires_boot_ns: 0,
                    flags: 0,
                },
            );
        }
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

/// Result of reloading one agent.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadResult {
    pub agent: String,
    pub ok: bool,
    pub message: String,
}

impl Daemon {
    /// Directories the control loop watches: the kill-switch files', the config's and every
    /// configured policy's.
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = self.kill_files.dirs();
        if let Some(dir) = self.config_path.as_deref().and_then(Path::parent) {
            dirs.push(dir.to_owned());
        }
        for a in lock(&self.agent_configs).iter() {
            if let Some(dir) = a.policy.parent() {
                dirs.push(dir.to_owned());
            }
        }
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// Is `path` a file the control loop reads: a kill-switch file, the config file or a
    /// configured policy file?
    pub fn is_watched_file(&self, path: &Path) -> bool {
        path == self.kill_files.global
            || path.parent() == Some(self.kill_files.agent_dir.as_path())
            || self.is_watched_config(path)
    }

    /// Is `path` the config file or a configured policy file?
    pub fn is_watched_config(&self, path: &Path) -> bool {
        self.config_path.as_deref() == Some(path)
            || lock(&self.agent_configs).iter().any(|a| a.policy == path)
    }

    /// Reads the kill-switch files and applies any change.
    pub async fn check_kill_switch(&self) {
        let mut current = self.kill_state.lock().await;
        let names = self.registry.names();
        let next = self.kill_files.read(&names);
        if next == *current {
            return;
        }
        let started = std::time::Instant::now();
        let changed = changes(&current, &next, &names);
        if next.global != current.global {
            let global = next.global;
            let result = self.kernel.update_config(|c| {
                if global {
                    c.flags |= global_flags::KILLED;
                } else {
                    c.flags &= !global_flags::KILLED;
                }
            });
            if let Err(e) = result {
                tracing::error!("cannot set the global kill flag in the kernel: {e}");
            }
        }
        let mut cut = 0usize;
        let mut cgroups = std::collections::HashSet::new();
        let mut proxied = Vec::new();
        let mut cut_agents = Vec::new();
        for (name, killed) in &changed {
            let Some(agent) = self.registry.get(name) else {
                continue;
            };
            agent.set_killed(*killed);
            // Kernel first: from here on new connects fail and egress is dropped.
            let result = self.kernel.agent_flags(agent.id).and_then(|flags| {
                let flags = if *killed {
                    flags | agent_flags::KILLED
                } else {
                    flags & !agent_flags::KILLED
                };
                self.kernel.set_agent_flags(agent.id, flags)
            });
            if let Err(e) = result {
                tracing::error!(agent = %name, "cannot set the kill flag in the kernel: {e}");
            }
            if *killed {
                proxied.extend(agent.conns.sockets());
                cut_agents.push(agent.clone());
                for e in self.enroller.list().iter().filter(|e| &e.agent == name) {
                    cgroups.extend(crate::cgroup::subtree_ids(&e.path));
                }
            }
        }
        let kernel_at = started.elapsed();
        // Our own tear-down of the streams cut below can wait; the killed agents reading
        // their resets cannot, and on a small host both want the same cores.
        let deferral = if proxied.is_empty() {
            None
        } else {
            self.proxy_threads.get().map(|threads| threads.defer())
        };
        // Then our end of every proxied stream of those agents, destroyed in the kernel by
        // its addresses: the kernel resets each stream at once (the agent sees ECONNRESET)
        // and our task sees its socket fail. This comes before signalling our tasks, which
        // would otherwise compete with it for the CPU to close the same streams one by one.
        // It blocks this task for about 2 ms per 1,000 streams (measured), which is what this
        // moment is for: on every CPU, under SCHED_FIFO, so that neither busy agents nor the
        // readers its resets wake can slow it.
        let streams_destroyed = match crate::control::sockdiag::destroy_tcp_urgently(&proxied) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("destroying the proxied streams of killed agents failed: {e}");
                0
            }
        };
        let destroyed_at = started.elapsed();
        // Then every open proxied stream, mid-flight, with a reset, from our side (streams the
        // kernel could not destroy, and our upstream ends).
        for (name, killed) in &changed {
            if *killed && let Some(agent) = self.registry.get(name) {
                cut += agent.conns.kill_all();
            }
        }
        let cut_at = started.elapsed();
        if let Some(deferral) = deferral {
            tokio::spawn(async move {
                let lowered = tokio::time::Instant::now();
                let deadline = lowered + DEFER_TEARDOWN_MAX;
                let left = || cut_agents.iter().map(|a| a.conns.count()).sum::<usize>();
                while left() > 0 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                drop(deferral);
                tracing::debug!(
                    lowered_ms = lowered.elapsed().as_millis() as u64,
                    connections_left = left(),
                    "proxy threads back to their priority after the kill switch's tear-down"
                );
            });
        }
        // And every other TCP socket of those cgroups (DNS over TCP, accepted sockets, a
        // stream that raced the list above), found by a dump.
        let others_destroyed = if cgroups.is_empty() {
            0
        } else {
            match tokio::task::spawn_blocking(move || {
                crate::control::sockdiag::destroy_tcp_in(&cgroups)
            })
            .await
            {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    tracing::error!("destroying sockets of killed cgroups failed: {e}");
                    0
                }
                Err(e) => {
                    tracing::error!("sock_diag task failed: {e}");
                    0
                }
            }
        };
        tracing::info!(
            kernel_us = kernel_at.as_micros() as u64,
            destroyed_us = destroyed_at.as_micros() as u64,
            cut_us = cut_at.as_micros() as u64,
            total_us = started.elapsed().as_micros() as u64,
            connections_cut = cut,
            streams_destroyed,
            others_destroyed,
            "kill switch change applied"
        );
        self.audit_kill(&current, &next, cut, streams_destroyed + others_destroyed);
        *current = next;
    }

    fn audit_kill(&self, before: &KillState, after: &KillState, cut: usize, destroyed: usize) {
        let action = |on: bool| if on { Action::Engaged } else { Action::Lifted };
        if before.global != after.global {
            tracing::warn!(
                engaged = after.global,
                connections_cut = cut,
                sockets_destroyed = destroyed,
                "global kill switch {}",
                if after.global { "ENGAGED" } else { "lifted" }
            );
            let _ = self.audit.record(
                AuditEvent::new(EventKind::KillSwitch)
                    .action(action(after.global))
                    .scope(Scope::Global)
                    .detail(format!(
                        "{}; {cut} connections cut, {destroyed} sockets destroyed",
                        self.kill_files.global.display()
                    )),
            );
        }
        for name in &after.agents ^ &before.agents {
            let on = after.agents.contains(&name);
            tracing::warn!(agent = %name, "kill switch {}", if on { "ENGAGED" } else { "lifted" });
            let _ = self.audit.record(
                AuditEvent::new(EventKind::KillSwitch)
                    .action(action(on))
                    .scope(Scope::Agent)
                    .agent_id(name.clone())
                    .detail(format!(
                        "{}; {cut} connections cut, {destroyed} sockets destroyed",
                        self.kill_files.agent(&name).display()
                    )),
            );
        }
    }

    /// Reloads when the config file or a policy file changed content.
    pub async fn reload_if_changed(&self) {
        let config_changed = match self.config_path.as_deref() {
            Some(p) => {
                let now = std::fs::read(p)
                    .ok()
                    .map(|b| hex::encode(sha2::Sha256::digest(b)));
                now.is_some() && now != *lock(&self.config_sha)
            }
            None => false,
        };
        let policy_changed = self.registry.all().iter().any(|a| {
            a.origin == Origin::Configured
                && std::fs::read(&a.policy_path)
                    .map(|b| hex::encode(sha2::Sha256::digest(b)) != a.policy().sha256())
                    .unwrap_or(false)
        });
        if config_changed || policy_changed {
            self.reload("periodic check").await;
        }
    }

    /// Re-reads the config's agent list and every configured policy. A valid changed policy is
    /// swapped in atomically (requests in flight finish under the old one) and the kernel
    /// allowlist follows; an invalid one is rejected and the previous one stays.
    pub async fn reload(&self, why: &str) -> Vec<ReloadResult> {
        let mut results = Vec::new();
        if let Some(path) = self.config_path.clone() {
            match Config::load(&path) {
                Ok(new) => {
                    *lock(&self.config_sha) = std::fs::read(&path)
                        .ok()
                        .map(|b| hex::encode(sha2::Sha256::digest(b)));
                    results.extend(self.apply_agent_list(new.agents).await);
                }
                Err(e) => {
                    tracing::warn!("config reload rejected, keeping the previous agent list: {e}");
                    let _ = self.audit.record(
                        AuditEvent::new(EventKind::Policy)
                            .action(Action::Rejected)
                            .reason(e.to_string())
                            .detail(path.display().to_string()),
                    );
                    results.push(ReloadResult {
                        agent: "(config)".into(),
                        ok: false,
                        message: e.to_string(),
                    });
                }
            }
        }
        for agent in self.registry.all() {
            if agent.origin != Origin::Configured {
                continue;
            }
            results.push(self.reload_policy(&agent, why).await);
        }
        results
    }

    async fn reload_policy(&self, agent: &Arc<Agent>, why: &str) -> ReloadResult {
        let result = |ok, message: String| ReloadResult {
            agent: agent.name.clone(),
            ok,
            message,
        };
        match Policy::load(&agent.policy_path) {
            Err(e) => {
                let message = e.to_string();
                // Only report a rejection once per distinct error.
                if agent.reload_status().message != message {
                    tracing::warn!(agent = %agent.name, "policy reload rejected, keeping the previous policy: {message}");
                    let _ = self.audit.record(
                        AuditEvent::new(EventKind::Policy)
                            .action(Action::Rejected)
                            .agent_id(agent.name.clone())
                            .policy_sha256(agent.policy().sha256())
                            .reason(message.clone())
                            .detail(agent.policy_path.display().to_string()),
                    );
                    agent.set_reload_status(false, message.clone());
                }
                result(false, message)
            }
            Ok(policy) if policy.sha256() == agent.policy().sha256() => {
                if !agent.reload_status().ok {
                    agent.set_reload_status(true, format!("unchanged ({why})"));
                }
                result(true, "unchanged".into())
            }
            Ok(policy) => {
                let sha = policy.sha256().to_owned();
                agent.set_policy(Arc::new(policy));
                if let Err(e) = self.apply_policy(agent).await {
                    tracing::error!(agent = %agent.name, "updating the kernel allowlist failed: {e:#}");
                }
                tracing::info!(agent = %agent.name, sha256 = %sha, "policy reloaded ({why})");
                let _ = self.audit.record(
                    AuditEvent::new(EventKind::Policy)
                        .action(Action::Loaded)
                        .agent_id(agent.name.clone())
                        .policy_sha256(sha.clone())
                        .detail(format!("{} ({why})", agent.policy_path.display())),
                );
                agent.set_reload_status(true, format!("reloaded ({why})"));
                result(true, format!("reloaded, sha256 {sha}"))
            }
        }
    }

    /// Applies a new agent list: new agents are added, removed ones are cut off (their cgroups
    /// stay attached and refuse everything), changed ones follow their new policy file and
    /// cgroups.
    async fn apply_agent_list(&self, new: Vec<AgentConfig>) -> Vec<ReloadResult> {
        let old = lock(&self.agent_configs).clone();
        let mut results = Vec::new();
        for a in &new {
            let before = old.iter().find(|o| o.name == a.name);
            let known = self.registry.get(&a.name);
            match (before, known) {
                (Some(b), Some(agent)) if b.policy == a.policy => {
                    for cg in a.cgroups.iter().filter(|c| !b.cgroups.contains(c)) {
                        if let Err(e) = self.enroller.enrol_configured(cg, &agent) {
                            tracing::warn!(agent = %a.name, "cannot enrol {}: {e}", cg.display());
                        }
                    }
                }
                (_, existing) => {
                    if let Some(agent) = existing {
                        if agent.origin == Origin::AdHoc {
                            tracing::warn!(agent = %a.name, "ad-hoc agent is now configured; switching to the configured policy");
                        }
                        self.registry.remove(&a.name);
                    }
                    let exec = a
                        .exec_cgroup
                        .clone()
                        .unwrap_or_else(|| default_exec_cgroup(&a.name));
                    let outcome = match Policy::load(&a.policy) {
                        Ok(p) => self
                            .add_agent(
                                &a.name,
                                Origin::Configured,
                                a.policy.clone(),
                                exec,
                                Arc::new(p),
                            )
                            .await
                            .map_err(|e| format!("{e:#}")),
                        Err(e) => Err(e.to_string()),
                    };
                    match outcome {
                        Ok(agent) => {
                            for cg in &a.cgroups {
                                if let Err(e) = self.enroller.enrol_configured(cg, &agent) {
                                    tracing::warn!(agent = %a.name, "cannot enrol {}: {e}", cg.display());
                                }
                            }
                            results.push(ReloadResult {
                                agent: a.name.clone(),
                                ok: true,
                                message: "added".into(),
                            });
                        }
                        Err(message) => {
                            tracing::warn!(agent = %a.name, "new agent not added: {message}");
                            let _ = self.audit.record(
                                AuditEvent::new(EventKind::Policy)
                                    .action(Action::Rejected)
                                    .agent_id(a.name.clone())
                                    .reason(message.clone()),
                            );
                            results.push(ReloadResult {
                                agent: a.name.clone(),
                                ok: false,
                                message,
                            });
                        }
                    }
                }
            }
        }
        for gone in old.iter().filter(|o| !new.iter().any(|n| n.name == o.name)) {
            if let Some(agent) = self.registry.remove(&gone.name) {
                // Fail closed: the agent's cgroups keep their programs and refuse everything.
                if let Err(e) = self.kernel.set_agent_flags(agent.id, 0) {
                    tracing::error!(agent = %gone.name, "cannot deactivate in the kernel: {e}");
                }
                agent.conns.kill_all();
                tracing::warn!(agent = %gone.name, "agent removed from the config: its cgroups now refuse all traffic until unenrolled");
                let _ = self.audit.record(
                    AuditEvent::new(EventKind::Policy)
                        .action(Action::Rejected)
                        .agent_id(gone.name.clone())
                        .reason(
                            "agent removed from the config; its cgroups refuse all traffic"
                                .to_string(),
                        ),
                );
                results.push(ReloadResult {
                    agent: gone.name.clone(),
                    ok: true,
                    message: "removed".into(),
                });
            }
        }
        *lock(&self.agent_configs) = new;
        results
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

    async fn reload(&self) -> Result<serde_json::Value, String> {
        let results = Daemon::reload(self, "admin API").await;
        Ok(serde_json::json!({ "agents": results }))
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

/// Forwards the eBPF programs' aya-log records to the daemon's log.
async fn forward_ebpf_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring's descriptor and lives inside the AsyncFd.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut fd) = registered else {
        tracing::debug!("cannot poll the eBPF log ring; kernel diagnostics are not logged");
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
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

/// Removes learned addresses whose TTL ran out, from the kernel and the name tables (open
/// connections are unaffected; new connects to those addresses are refused), and saves the
/// learned names so a restarted daemon keeps honouring what the kernel still allows.
async fn sweep_learned(daemon: Arc<Daemon>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut last_saved = None;
    loop {
        tick.tick().await;
        let now = crate::bpf::boot_ns();
        let removed = daemon.kernel.sweep_expired(now);
        let mut file = LearnedFile {
            boot_id: LearnedFile::current_boot_id(),
            ..LearnedFile::default()
        };
        for agent in daemon.registry.all() {
            agent.sweep(now);
            let mut learned = agent.learned();
            learned.sort_by(|a, b| (&a.name, a.ip).cmp(&(&b.name, b.ip)));
            if !learned.is_empty() {
                file.agents.insert(agent.name.clone(), learned);
            }
        }
        if !removed.is_empty() {
            tracing::debug!(count = removed.len(), "expired learned addresses removed");
        }
        let snapshot = serde_json::to_string(&file.agents).unwrap_or_default();
        if last_saved.as_ref() != Some(&snapshot) {
            if let Err(e) = file.save(&daemon.config.state_dir) {
                tracing::warn!("cannot save learned names: {e}");
            }
            last_saved = Some(snapshot);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
