//! The life of an agent: added at start or by a reload, its policy applied to the kernel,
//! reloaded when its file changes, registered ad hoc by `enforcer exec --policy`, and cut off
//! when it leaves the config.
//!
//! Order matters for fail-closed behaviour: an agent's allowlist and flags reach the kernel
//! before its exec cgroup is attached, and a removed agent's cgroups stay attached with its
//! slot inactive, so they refuse everything until they are unenrolled.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use enforcer_common::agent_flags;
use sha2::Digest as _;

use super::{
    Agent, AgentError, IdTable, KillFlags, LearnedFile, LearnedName, Origin, Registry, allowlist,
};
use crate::{
    audit::{Action, AuditEvent, AuditLog, EventKind},
    bpf::{AllowEntry, BpfError, Kernel},
    config::{AgentConfig, Config, ConfigError},
    enrol::{EnrolError, Enroller},
    policy::{HostMatch, Mode, Policy, PolicyError},
};

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("agent '{agent}': {source}; fix the policy and start again")]
    Policy {
        agent: String,
        #[source]
        source: PolicyError,
    },
    #[error("agent '{agent}': cannot enrol cgroup {cgroup}: {source}")]
    Enrol {
        agent: String,
        cgroup: PathBuf,
        #[source]
        source: Box<EnrolError>,
    },
    #[error("agent '{agent}': cannot attach its exec cgroup: {source}")]
    ExecCgroup {
        agent: String,
        #[source]
        source: Box<EnrolError>,
    },
    #[error(
        "{} of the configured policies cannot be loaded; fix them and start again:\n  {}",
        .0.len(),
        .0.join("\n  ")
    )]
    Policies(Vec<String>),
    #[error(
        "agent '{agent}': cgroup {} does not exist; start its unit (or create it) first, or \
         remove it from the config",
        cgroup.display()
    )]
    MissingCgroup { agent: String, cgroup: PathBuf },
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("saving the ad-hoc policy {path}: {io}", io = crate::sys::io_text(source))]
    SaveAdHoc {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Result of reloading one agent.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReloadResult {
    pub agent: String,
    pub ok: bool,
    pub message: String,
}

/// Why an ad-hoc registration was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdHocRefusal {
    #[error(
        "agent '{name}' is configured in {}; --policy is only for ad-hoc agents (drop --policy, or pick another name)",
        policy.display()
    )]
    Configured { name: String, policy: PathBuf },
    #[error(
        "ad-hoc agent '{0}' already exists with a different policy; only root may replace it (or pick another name)"
    )]
    NotRoot(String),
    #[error(
        "'{0}' was a configured agent (its cgroups may still be enrolled and refusing); an \
         ad-hoc agent cannot take its name. Pick another name"
    )]
    WasConfigured(String),
    #[error(
        "only root may name an ad-hoc agent freely: as {user}, name it {prefix}... (for \
         example {prefix}task)"
    )]
    Prefix { user: String, prefix: String },
    #[error(
        "only root may register an ad-hoc agent whose policy allows anything; as {0}, the \
         policy must deny everything (default: deny, no allow rules, mode: enforce)"
    )]
    NotDenyAll(String),
    #[error("{0}")]
    BadPolicy(PolicyError),
    #[error(transparent)]
    Failed(#[from] LifecycleError),
}

/// Loads every configured agent's policy and checks that the cgroups the config names exist,
/// changing nothing: the daemon does this before it touches any state, so that a
/// configuration that cannot start leaves everything as it was. Every failing policy is
/// reported, not only the first.
pub fn check_policies(
    config: &Config,
    hierarchy: &crate::cgroup::Hierarchy,
) -> Result<Vec<Policy>, LifecycleError> {
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    for agent in &config.agents {
        match Policy::load(&agent.policy) {
            Ok(p) => policies.push(p),
            Err(e) => errors.push(format!("agent '{}': {e}", agent.name)),
        }
        for cg in &agent.cgroups {
            let path = hierarchy.resolve(cg).map_err(|e| LifecycleError::Enrol {
                agent: agent.name.clone(),
                cgroup: cg.clone(),
                source: Box::new(e.into()),
            })?;
            if !path.is_dir() {
                return Err(LifecycleError::MissingCgroup {
                    agent: agent.name.clone(),
                    cgroup: path,
                });
            }
        }
    }
    if errors.is_empty() {
        Ok(policies)
    } else {
        Err(LifecycleError::Policies(errors))
    }
}

/// Adds, reloads and removes agents; owns the agent list in force and the kernel id table.
pub struct Lifecycle {
    kernel: Arc<Kernel>,
    registry: Arc<Registry>,
    enroller: Arc<Enroller>,
    audit: AuditLog,
    kill_flags: Arc<dyn KillFlags>,
    credentials: Arc<crate::credentials::Vault>,
    /// `agent_api`: every agent's allowlist holds `enforcer.internal`.
    agent_api: bool,
    /// `dns.static` by canonical name: declared by the operator, so they count as resolved
    /// for every agent whose policy allows the name.
    statics: BTreeMap<String, Vec<std::net::IpAddr>>,
    /// `dns.allow_internal_answers`, as the resolver applies it.
    allow_internal: Vec<ipnet::IpNet>,
    state_dir: PathBuf,
    /// The file the config came from, watched for agent-list changes.
    config_path: Option<PathBuf>,
    /// The agent list currently in force (the config's, as last loaded successfully).
    agent_configs: Mutex<Vec<AgentConfig>>,
    /// SHA-256 of the config file as last loaded.
    config_sha: Mutex<Option<String>>,
    ids: Mutex<IdTable>,
    /// Names learned by the previous run, handed to agents as they are added.
    saved_learned: Mutex<BTreeMap<String, Vec<LearnedName>>>,
    reloading: tokio::sync::Mutex<()>,
}

/// What a [`Lifecycle`] acts on.
pub struct Parts {
    pub kernel: Arc<Kernel>,
    pub registry: Arc<Registry>,
    pub enroller: Arc<Enroller>,
    pub audit: AuditLog,
    pub kill_flags: Arc<dyn KillFlags>,
    /// Follows the config's `credentials:` on reload.
    pub credentials: Arc<crate::credentials::Vault>,
}

impl Lifecycle {
    pub fn new(
        config: &Config,
        config_path: Option<PathBuf>,
        parts: Parts,
    ) -> Result<Self, LifecycleError> {
        let config_sha = config_path.as_deref().and_then(file_sha256);
        Ok(Self {
            kernel: parts.kernel,
            registry: parts.registry,
            enroller: parts.enroller,
            audit: parts.audit,
            kill_flags: parts.kill_flags,
            credentials: parts.credentials,
            agent_api: config.agent_api,
            statics: config
                .dns
                .static_hosts
                .iter()
                .filter_map(|(k, v)| Some((crate::policy::canonical_host(k).ok()?, v.clone())))
                .collect(),
            allow_internal: config.dns.allow_internal_answers.clone(),
            state_dir: config.state_dir.clone(),
            config_path,
            agent_configs: Mutex::new(config.agents.clone()),
            config_sha: Mutex::new(config_sha),
            ids: Mutex::new(IdTable::load(&config.state_dir)?),
            saved_learned: Mutex::new(LearnedFile::load(&config.state_dir).agents),
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    /// Loads every configured and ad-hoc agent, and marks agents of earlier runs that are
    /// gone as inactive (their cgroups then refuse everything).
    /// `policies` are the configured agents' policies, as [`check_policies`] loaded them
    /// before anything was changed.
    pub async fn load_all(&self, policies: Vec<Policy>) -> Result<(), LifecycleError> {
        let configured = lock(&self.agent_configs).clone();
        for (agent, policy) in configured.iter().zip(policies) {
            let a = self
                .add(
                    &agent.name,
                    Origin::Configured,
                    agent.policy.clone(),
                    agent.exec_cgroup(),
                    Arc::new(policy),
                )
                .await?;
            for cg in &agent.cgroups {
                self.enroller
                    .enrol_configured(cg, &a)
                    .map_err(|source| LifecycleError::Enrol {
                        agent: agent.name.clone(),
                        cgroup: cg.clone(),
                        source: Box::new(source),
                    })?;
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
                    self.add(
                        &name,
                        Origin::AdHoc,
                        path,
                        crate::config::default_exec_cgroup(&name),
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
        let dir = self.state_dir.join("agents");
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
    async fn add(
        &self,
        name: &str,
        origin: Origin,
        policy_path: PathBuf,
        exec_cgroup: PathBuf,
        policy: Arc<Policy>,
    ) -> Result<Arc<Agent>, LifecycleError> {
        let in_use: Vec<u32> = self
            .kernel
            .cgroup_agents()
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        let id = {
            let mut ids = lock(&self.ids);
            if origin == Origin::Configured {
                ids.mark_configured(name)?;
            }
            ids.id_for(name, &in_use)?
        };
        let agent = Arc::new(Agent::new(
            name.to_owned(),
            id,
            origin,
            policy_path,
            exec_cgroup,
            policy,
        ));
        // Names learned before a restart, for addresses the kernel may still allow.
        if let Some(saved) = lock(&self.saved_learned).remove(name) {
            let now = crate::bpf::boot_ns();
            for l in saved.into_iter().filter(|l| l.expires_boot_ns > now) {
                agent.learn(&l.name, l.ip, l.expires_boot_ns, l.exact);
            }
        }
        // The kill state is set before the agent's flags reach the kernel.
        agent.set_killed(self.kill_flags.engaged_for(name));
        self.apply_policy(&agent)?;
        self.registry.insert(agent.clone());
        self.enroller
            .enrol_exec_cgroup(&agent)
            .map_err(|source| LifecycleError::ExecCgroup {
                agent: name.to_owned(),
                source: Box::new(source),
            })?;
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
    pub fn apply_policy(&self, agent: &Agent) -> Result<(), BpfError> {
        let policy = agent.policy();
        let computed = allowlist::compute(&policy, self.agent_api);
        let statics = self.static_names(&policy);
        let mut entries = computed.entries.clone();
        entries.extend(statics.iter().map(|(_, _, _, e)| *e));
        self.kernel.replace_allowlist(agent.id, &entries)?;
        // The proxy's explicit list is the policy's literals only: a static name is explicit
        // per (name, port) as written, through its association below.
        agent.set_explicit(computed.entries);
        for (name, ip, exact, _) in &statics {
            agent.learn(name, *ip, u64::MAX, *exact);
        }
        // Addresses learned for names this policy no longer allows go at once.
        let dry_run = policy.mode() == Mode::DryRun;
        let orphaned =
            agent.forget_disallowed(|name| dry_run || policy.host_match(name) != HostMatch::None);
        for ip in orphaned {
            self.kernel.remove_allow(
                agent.id,
                &AllowEntry {
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
        self.kernel.set_agent_flags(agent.id, flags)
    }

    /// The `dns.static` names the policy allows count as resolved, with no query: a client
    /// that uses `/etc/hosts` or `curl --resolve` for them is served like one that asked our
    /// resolver. Their addresses go into the agent's static kernel allowlist (declared by the
    /// operator, so outside the learned-address quota), explicit for the kernel as an answer
    /// would be, and the names are associated with them for the proxy's host check. An
    /// internal address of a name allowed only by a wildcard is left out (unless
    /// `dns.allow_internal_answers` covers it), as in an answer.
    fn static_names(&self, policy: &Policy) -> Vec<(String, std::net::IpAddr, bool, AllowEntry)> {
        let dry_run = policy.mode() == Mode::DryRun;
        let mut out = Vec::new();
        for (name, ips) in &self.statics {
            let matched = policy.host_match(name);
            if matched == HostMatch::None && !dry_run {
                continue;
            }
            let exact = matched == HostMatch::Exact;
            for ip in ips {
                let ip = crate::addr::canonical(*ip);
                let internal = crate::addr::internal(ip).is_some();
                let internal_ok = crate::addr::within(ip, &self.allow_internal);
                if !exact && internal && !internal_ok {
                    continue;
                }
                let explicit = exact || (internal && internal_ok);
                out.push((
                    name.clone(),
                    ip,
                    exact,
                    AllowEntry {
                        net: ipnet::IpNet::from(ip),
                        port: None,
                        expires_boot_ns: 0,
                        flags: if explicit {
                            enforcer_common::allow_flags::EXPLICIT
                        } else {
                            0
                        },
                    },
                ));
            }
        }
        out
    }

    /// Registers (or reuses) an ad-hoc agent from policy bytes sent by `enforcer exec
    /// --policy`; only root may replace an existing one's policy.
    ///
    /// `caller` is `None` for root, else the calling user's name: such a caller may only name
    /// the agent `user-<name>-...` and give it a policy that denies everything.
    pub async fn register_adhoc(
        &self,
        name: &str,
        yaml: &str,
        caller: Option<&str>,
    ) -> Result<Arc<Agent>, AdHocRefusal> {
        let caller_is_root = caller.is_none();
        let existing = self.registry.get(name);
        if let Some(a) = &existing
            && a.origin == Origin::Configured
        {
            return Err(AdHocRefusal::Configured {
                name: name.to_owned(),
                policy: a.policy_path.clone(),
            });
        }
        if lock(&self.ids).was_configured(name) {
            return Err(AdHocRefusal::WasConfigured(name.to_owned()));
        }
        if let Some(user) = caller {
            let prefix = format!("user-{user}-");
            if !name.starts_with(&prefix) || name.len() == prefix.len() {
                return Err(AdHocRefusal::Prefix {
                    user: user.to_owned(),
                    prefix,
                });
            }
        }
        let source = format!("{name} (ad-hoc)");
        let bytes = yaml.as_bytes().to_vec();
        let label = source.clone();
        let policy = parse_off_runtime(Path::new(&source), move || {
            Policy::from_yaml(&bytes, &label)
        })
        .await
        .map_err(AdHocRefusal::BadPolicy)?;
        if let Some(user) = caller
            && !policy.denies_everything()
        {
            return Err(AdHocRefusal::NotDenyAll(user.to_owned()));
        }
        if let Some(agent) = existing {
            if agent.policy().sha256() == policy.sha256() {
                return Ok(agent);
            }
            if !caller_is_root {
                return Err(AdHocRefusal::NotRoot(name.to_owned()));
            }
        }
        let path = self.state_dir.join("agents").join(format!("{name}.yaml"));
        super::write_atomic(&path, yaml.as_bytes()).map_err(|source| {
            LifecycleError::SaveAdHoc {
                path: path.clone(),
                source,
            }
        })?;
        if let Some(agent) = self.registry.get(name) {
            agent.set_policy(Arc::new(policy));
            self.apply_policy(&agent).map_err(LifecycleError::from)?;
            agent.set_reload_status(true, "replaced by enforcer exec --policy".into());
            return Ok(agent);
        }
        Ok(self
            .add(
                name,
                Origin::AdHoc,
                path,
                crate::config::default_exec_cgroup(name),
                Arc::new(policy),
            )
            .await?)
    }

    /// Directories holding the config file and every configured policy file.
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        if let Some(dir) = self.config_path.as_deref().and_then(Path::parent) {
            dirs.push(dir.to_owned());
        }
        for a in lock(&self.agent_configs).iter() {
            if let Some(dir) = a.policy.parent() {
                dirs.push(dir.to_owned());
            }
        }
        dirs
    }

    /// Is `path` the config file or a configured policy file?
    pub fn is_watched_config(&self, path: &Path) -> bool {
        self.config_path.as_deref() == Some(path)
            || lock(&self.agent_configs).iter().any(|a| a.policy == path)
    }

    /// Did the config file or a configured policy file change content since it was loaded?
    pub fn changed(&self) -> bool {
        let config_changed = match self.config_path.as_deref() {
            Some(p) => {
                let now = file_sha256(p);
                now.is_some() && now != *lock(&self.config_sha)
            }
            None => false,
        };
        let policy_changed = self.registry.all().iter().any(|a| {
            a.origin == Origin::Configured
                && file_sha256(&a.policy_path).is_some_and(|sha| sha != a.policy().sha256())
        });
        config_changed || policy_changed
    }

    /// Re-reads the config's agent list and every configured policy. A valid changed policy is
    /// swapped in atomically (requests in flight finish under the old one) and the kernel
    /// allowlist follows; an invalid one is rejected and the previous one stays.
    pub async fn reload(&self, why: &str) -> Vec<ReloadResult> {
        // One reload at a time (file watcher, SIGHUP and the admin API can all ask).
        let _one = self.reloading.lock().await;
        let mut results = Vec::new();
        if let Some(path) = self.config_path.clone() {
            match Config::load(&path) {
                Ok(new) => {
                    *lock(&self.config_sha) = file_sha256(&path);
                    if let Err(e) = self.credentials.configure(&new) {
                        tracing::warn!("credentials not reloaded, the previous ones stay: {e}");
                    }
                    results.extend(self.apply_agent_list(new.agents).await);
                }
                Err(e) => results.push(self.config_rejected(&path, &e)),
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

    fn config_rejected(&self, path: &Path, e: &ConfigError) -> ReloadResult {
        tracing::warn!("config reload rejected, keeping the previous agent list: {e}");
        let _ = self.audit.record(
            AuditEvent::new(EventKind::Policy)
                .action(Action::Rejected)
                .reason(e.to_string())
                .detail(path.display().to_string()),
        );
        ReloadResult {
            agent: "(config)".into(),
            ok: false,
            message: e.to_string(),
        }
    }

    /// Cuts the agent's spliced connections whose host-level decision the policy now in force
    /// no longer gives (TLS spliced on its server name, `tcp:` splices), each audited as a
    /// `connection` with `action: revoked`. Served connections need nothing: every request on
    /// them is judged under the new policy already.
    fn revoke_spliced(&self, agent: &Arc<Agent>) {
        let policy = agent.policy();
        let revoked = agent.conns.revoke(|s| s.refused_by(&policy));
        for (s, reason) in revoked {
            tracing::info!(agent = %agent.name, dst = %s.dest, host = %s.hosts[0], "spliced connection cut: {reason}");
            let _ = self.audit.record(
                AuditEvent::new(EventKind::Connection)
                    .action(Action::Revoked)
                    .agent_id(agent.name.clone())
                    .request_id(s.request_id)
                    .policy_result(crate::audit::PolicyResult::Deny)
                    .url_host(s.hosts[0].clone())
                    .dest(s.dest)
                    .port(s.port)
                    .reason(reason),
            );
        }
    }

    async fn reload_policy(&self, agent: &Arc<Agent>, why: &str) -> ReloadResult {
        let result = |ok, message: String| ReloadResult {
            agent: agent.name.clone(),
            ok,
            message,
        };
        match load_policy(&agent.policy_path).await {
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
                if let Err(e) = self.apply_policy(agent) {
                    tracing::error!(agent = %agent.name, "updating the kernel allowlist failed: {e}");
                }
                self.revoke_spliced(agent);
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
            match (before, self.registry.get(&a.name)) {
                (Some(b), Some(agent)) if b.policy == a.policy => {
                    for cg in a.cgroups.iter().filter(|c| !b.cgroups.contains(c)) {
                        self.enrol_logged(a, cg, &agent);
                    }
                }
                (_, existing) => results.push(self.replace_agent(a, existing).await),
            }
        }
        for gone in old.iter().filter(|o| !new.iter().any(|n| n.name == o.name)) {
            if let Some(r) = self.remove(&gone.name) {
                results.push(r);
            }
        }
        *lock(&self.agent_configs) = new;
        results
    }

    /// A configured agent that is new, or whose policy file changed: (re)added.
    async fn replace_agent(&self, a: &AgentConfig, existing: Option<Arc<Agent>>) -> ReloadResult {
        if let Some(agent) = existing {
            if agent.origin == Origin::AdHoc {
                tracing::warn!(agent = %a.name, "ad-hoc agent is now configured; switching to the configured policy");
            }
            self.registry.remove(&a.name);
        }
        let outcome = match load_policy(&a.policy).await {
            Ok(p) => self
                .add(
                    &a.name,
                    Origin::Configured,
                    a.policy.clone(),
                    a.exec_cgroup(),
                    Arc::new(p),
                )
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(agent) => {
                for cg in &a.cgroups {
                    self.enrol_logged(a, cg, &agent);
                }
                ReloadResult {
                    agent: a.name.clone(),
                    ok: true,
                    message: "added".into(),
                }
            }
            Err(message) => {
                tracing::warn!(agent = %a.name, "new agent not added: {message}");
                let _ = self.audit.record(
                    AuditEvent::new(EventKind::Policy)
                        .action(Action::Rejected)
                        .agent_id(a.name.clone())
                        .reason(message.clone()),
                );
                ReloadResult {
                    agent: a.name.clone(),
                    ok: false,
                    message,
                }
            }
        }
    }

    fn enrol_logged(&self, a: &AgentConfig, cgroup: &Path, agent: &Agent) {
        if let Err(e) = self.enroller.enrol_configured(cgroup, agent) {
            tracing::warn!(agent = %a.name, "cannot enrol {}: {e}", cgroup.display());
        }
    }

    /// An agent gone from the config: cut off, its cgroups left refusing everything.
    fn remove(&self, name: &str) -> Option<ReloadResult> {
        let agent = self.registry.remove(name)?;
        // Fail closed: the agent's cgroups keep their programs and refuse everything.
        if let Err(e) = self.kernel.set_agent_flags(agent.id, 0) {
            tracing::error!(agent = %name, "cannot deactivate in the kernel: {e}");
        }
        agent.conns.kill_all();
        tracing::warn!(agent = %name, "agent removed from the config: its cgroups now refuse all traffic until unenrolled");
        let _ = self.audit.record(
            AuditEvent::new(EventKind::Policy)
                .action(Action::Rejected)
                .agent_id(name.to_owned())
                .reason(
                    "agent removed from the config; its cgroups refuse all traffic".to_string(),
                ),
        );
        Some(ReloadResult {
            agent: name.to_owned(),
            ok: true,
            message: "removed".into(),
        })
    }
}

/// Longest a policy may take to load on a reload or an ad-hoc registration: past it the
/// policy is refused (the depth scan and size cap keep real ones far below).
const POLICY_LOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Loads a policy file on a blocking thread, within [`POLICY_LOAD_TIMEOUT`]: parsing never runs
/// on the runtime's threads, where it would hold up DNS, the admin API or the kill switch.
async fn load_policy(path: &Path) -> Result<Policy, PolicyError> {
    let owned = path.to_owned();
    parse_off_runtime(path, move || Policy::load(&owned)).await
}

async fn parse_off_runtime(
    path: &Path,
    parse: impl FnOnce() -> Result<Policy, PolicyError> + Send + 'static,
) -> Result<Policy, PolicyError> {
    match tokio::time::timeout(POLICY_LOAD_TIMEOUT, tokio::task::spawn_blocking(parse)).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(PolicyError::Document {
            file: path.display().to_string(),
            message: format!("loading failed: {e}"),
        }),
        Err(_) => Err(PolicyError::Document {
            file: path.display().to_string(),
            message: format!(
                "took longer than {}s to load, refused; simplify the policy",
                POLICY_LOAD_TIMEOUT.as_secs()
            ),
        }),
    }
}

fn file_sha256(path: &Path) -> Option<String> {
    std::fs::read(path)
        .ok()
        .map(|b| hex::encode(sha2::Sha256::digest(b)))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
