//! The composition root: `enforcer daemon` builds the parts, hands each the narrow inputs it
//! needs, and waits for termination. Nothing here decides anything.
//!
//! Start-up order matters for fail-closed behaviour: the kill-switch files are read before
//! anything is attached; the kernel maps are written (agents, allowlists, flags) before any
//! cgroup is attached; and the proxy listens before the global READY flag lets redirected
//! connects through.

use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;
use enforcer_common::global_flags;

use crate::{
    admin::{self, service::Service},
    agents::{self, Registry, lifecycle, lifecycle::Lifecycle, sweeper},
    audit::{self, Action, AuditEvent, Decisions, EventKind},
    bpf::{self, Kernel, events},
    ca,
    cgroup::Hierarchy,
    config::Config,
    control::{self, Controls, killfiles::KillFiles, killswitch::KillSwitch},
    dns::{self, server::Resolver},
    enrol::Enroller,
    metrics,
    proxy::{self, ProxyContext, deputy::Deputy, http::L7Env, tls},
    status::{self, Reporter},
    sys::{
        self,
        listeners::{Inherited, Listeners},
        sched::Yielders,
    },
};

/// Checks what the daemon cannot run without, naming what is missing and what to do.
pub fn preflight() -> anyhow::Result<Hierarchy> {
    sys::raise_fd_limit();
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "enforcer daemon must run as root: it loads eBPF programs, attaches them to cgroups \
             and moves processes between cgroups. Run it with sudo, or as the systemd unit"
        );
    }
    Ok(Hierarchy::discover()?)
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    inherited: Inherited,
) -> anyhow::Result<()> {
    let hierarchy = preflight()?;

    // Everything that can fail is checked before anything changes: a start that fails
    // leaves keys, CA, pins and links as they were.
    if let Some(warning) = config.check_port_privilege()? {
        tracing::warn!("{warning}");
    }
    let policies = lifecycle::check_policies(&config, &hierarchy)?;
    agents::IdTable::load(&config.state_dir)?;
    audit::check_daemon_key(&config)?;
    ca::check_for_daemon(&config)?;
    let upstream_tls = tls::UpstreamTls::for_daemon(&config.tls)?;
    let netns_cookie = sys::netns_cookie()?;
    // The ports last among the checks: binding them also proves no other daemon serves them.
    let listeners = Listeners::open(inherited, config.proxy_port, config.dns_port)?;
    let metrics_listener =
        sys::listeners::tcp(&mut Inherited::default(), "metrics", config.metrics_listen)?;

    for dir in [&config.state_dir, &config.runtime_dir] {
        sys::create_dir(dir)?;
    }
    sys::create_dir(&config.state_dir.join("agents"))?;
    let kill_files = KillFiles {
        global: config.kill_switch_path(),
        agent_dir: config.state_dir.join("kill"),
    };
    sys::create_dir(&kill_files.agent_dir)?;
    // Read before anything is attached: a switch engaged at start holds from the first
    // instant.
    let names: Vec<String> = config.agents.iter().map(|a| a.name.clone()).collect();
    let initial_kill = kill_files.read(&names);

    let audit = audit::open_daemon_log(&config)?;
    // The agent API shows each agent its own refusals: kept as they are audited.
    let agent_api = config
        .agent_api
        .then(|| Arc::new(proxy::agent_api::Denials::default()));
    let seen = agent_api.clone();
    audit.set_observer(Box::new(move |ev| {
        metrics::observe(ev);
        if let Some(d) = &seen {
            d.observe(ev);
        }
    }));
    let ca = ca::for_daemon(&config)?;
    let tls = Arc::new(tls::TlsContext::new(&config.tls, ca.clone())?);
    let ca_bundle = match &ca {
        Some(ca) => {
            let path = config.ca_bundle_path();
            let roots = ca
                .write_bundle(&path, &config.tls.extra_upstream_roots)
                .context("writing the CA bundle for enrolled commands")?;
            tracing::debug!(bundle = %path.display(), roots, "CA bundle written");
            Some(path)
        }
        None => None,
    };
    let kernel = Arc::new(Kernel::open(&config.bpffs_dir, bpf::EBPF_OBJECT)?);
    for missing in kernel.missing_protections() {
        tracing::warn!("{missing}");
    }
    let registry = Arc::new(Registry::default());
    let enroller = Arc::new(Enroller::new(
        hierarchy,
        kernel.clone(),
        registry.clone(),
        &config.state_dir,
    )?);
    let kill_switch = Arc::new(KillSwitch::new(
        kill_files,
        initial_kill.clone(),
        kernel.clone(),
        registry.clone(),
        enroller.clone(),
        audit.clone(),
    ));
    let credentials = Arc::new(crate::credentials::Vault::new(&config)?);
    for c in credentials.all() {
        metrics::credential_known(&c.agent, &c.name);
        if let Some(why) = c.unavailable() {
            tracing::warn!(agent = %c.agent, credential = %c.name, "credential unavailable, requests that need it are refused: {why}");
        }
    }
    let lifecycle = Arc::new(Lifecycle::new(
        &config,
        config_path,
        lifecycle::Parts {
            kernel: kernel.clone(),
            registry: registry.clone(),
            enroller: enroller.clone(),
            audit: audit.clone(),
            kill_flags: kill_switch.clone(),
            credentials: credentials.clone(),
        },
    )?);

    // Kernel-wide settings first, then the agents.
    if initial_kill.global {
        tracing::warn!(file = %config.kill_switch_path().display(), "global kill switch engaged at start");
    }
    kernel.start_config(
        config.proxy_port,
        config.dns_port,
        netns_cookie,
        initial_kill.global,
    )?;
    lifecycle.load_all(policies).await?;

    let decisions = Decisions::new(audit.clone(), config.security_mode);
    let deputy = Deputy::new(config.dns.allow_internal_answers.clone());
    if let Err(e) = deputy.follow() {
        tracing::warn!(
            "cannot follow the host's address changes ({e}); the proxy refuses the addresses \
             the host had at start, and an address added later is reachable through wildcard \
             rules until a restart"
        );
    }
    let approvals = Arc::new(crate::approvals::Approvals::new(
        audit.clone(),
        config.approvals.notify.clone(),
    ));
    metrics::approvals_known();
    let proxy_ctx = Arc::new(ProxyContext {
        records: kernel.clone(),
        registry: registry.clone(),
        decisions: decisions.clone(),
        deputy,
        tls,
        l7: Arc::new(L7Env {
            decisions: decisions.clone(),
            safe_method_bodies: config.http.bodies_on_safe_methods,
            upstream_tls,
            credentials: credentials.clone(),
            approvals: approvals.clone(),
        }),
        limits: proxy::limits::Limits {
            per_agent_open: config.max_connections_per_agent,
            per_agent_pending: config.max_pending_per_agent,
            fds: proxy::limits::FdBudget::from_rlimit(),
        },
        agent_api: agent_api.clone(),
        splicer: if config.kernel_splice {
            proxy::sockmap::Splicer::new(kernel.clone())
        } else {
            None
        },
    });
    let threads = config.proxy_threads();
    let workers = proxy::Workers::start(threads, proxy_ctx)
        .with_context(|| format!("starting {threads} proxy threads"))?;
    match Yielders::new(workers.thread_ids()) {
        Some(y) => kill_switch.set_proxy_threads(y),
        None => tracing::info!(
            "no CAP_SYS_NICE: the kill switch cannot run at real-time priority or let the proxy \
             threads yield while they tear down cut streams; it still works, only slower on a \
             busy host"
        ),
    }
    tokio::spawn(proxy::accept(listeners.proxy_v4, workers.clone()));
    tokio::spawn(proxy::accept(listeners.proxy_v6, workers));

    let reporter = Arc::new(Reporter {
        facts: status::Facts {
            started: jiff::Timestamp::now(),
            proxy_port: config.proxy_port,
            dns_port: config.dns_port,
            security_mode: config.security_mode,
            kill_switch_file: config.kill_switch_path(),
        },
        registry: registry.clone(),
        kernel: kernel.clone(),
        enroller: enroller.clone(),
        audit: audit.clone(),
        credentials: credentials.clone(),
    });
    let admin_path = config.admin_socket_path();
    let admin_listener = admin::bind(&admin_path, config.admin_group.as_deref())?;
    tokio::spawn(admin::serve(
        admin_listener,
        Arc::new(Service {
            lifecycle: lifecycle.clone(),
            enroller: enroller.clone(),
            registry: registry.clone(),
            reporter: reporter.clone(),
            ca_bundle,
            credentials: credentials.clone(),
            approvals: approvals.clone(),
        }),
    ));

    if let Some(logger) = kernel.take_logger() {
        tokio::spawn(events::forward_logs(logger));
    }
    if let Some(ring) = kernel.take_events() {
        let (registry, audit) = (registry.clone(), audit.clone());
        tokio::spawn(events::read_denials(ring, move |d| {
            agents::record_denial(&registry, &audit, d)
        }));
    }
    tokio::spawn(agents::account_lost_denials(
        kernel.clone(),
        registry.clone(),
        audit.clone(),
    ));
    let resolver = Arc::new(
        Resolver::new(
            kernel.clone(),
            registry.clone(),
            decisions,
            &config.dns,
            config.dns_upstreams(),
        )
        .with_credentials(credentials.clone())
        .with_agent_api(config.agent_api),
    );
    tokio::spawn(dns::server::serve_udp(
        listeners.dns_udp_v4,
        resolver.clone(),
    ));
    tokio::spawn(dns::server::serve_udp(
        listeners.dns_udp_v6,
        resolver.clone(),
    ));
    tokio::spawn(dns::server::serve_tcp(
        listeners.dns_tcp_v4,
        resolver.clone(),
    ));
    tokio::spawn(dns::server::serve_tcp(listeners.dns_tcp_v6, resolver));
    kernel.update_config(|c| c.flags |= global_flags::DNS_REDIRECT)?;
    tokio::spawn(sweeper::run(
        kernel.clone(),
        registry.clone(),
        config.state_dir.clone(),
    ));
    tokio::spawn(control::run(Controls {
        kill_switch,
        lifecycle,
        enroller: enroller.clone(),
    }));
    tokio::spawn(metrics::serve(metrics_listener, reporter));
    tokio::spawn(crate::credentials::watch(credentials.clone()));

    kernel.update_config(|c| c.flags |= global_flags::READY)?;
    let _ = audit.record(
        AuditEvent::new(EventKind::Daemon)
            .action(Action::Start)
            .detail(format!(
                "enforcer {} pid {} agents [{}]",
                env!("CARGO_PKG_VERSION"),
                std::process::id(),
                registry.names_list()
            )),
    );
    tracing::info!(
        proxy_port = config.proxy_port,
        admin = %admin_path.display(),
        agents = %registry.names_list(),
        "enforcer daemon ready"
    );
    sys::release_startup_memory();
    // Only now: eBPF attached, proxy, resolver and admin listening. A daemon that can no
    // longer read its own maps is not healthy: the watchdog then lets systemd restart it.
    let watched = kernel.clone();
    sys::notify_ready(
        &format!("enforcing {} agent(s)", registry.all().len()),
        move || watched.config().is_ok(),
    );

    sys::termination().await;
    sys::notify_stopping();
    tracing::info!(
        "shutting down; enrolled cgroups stay enforced (pinned programs refuse everything the proxy would have judged)"
    );
    let _ = audit.record(AuditEvent::new(EventKind::Daemon).action(Action::Stop));
    audit.close();
    let _ = std::fs::remove_file(&admin_path);
    Ok(())
}
