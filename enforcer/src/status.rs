//! What the daemon reports about itself: one typed report behind `/v1/status` (and so
//! `enforcer status`) and `/healthz`. The CLI reads the same types back, so a renamed field is
//! a compile error rather than a silently empty column.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use enforcer_common::{agent_flags, global_flags};
use serde::{Deserialize, Serialize};

use crate::{
    agents::{Origin, Registry, ReloadStatus},
    audit::AuditLog,
    bpf::{Kernel, LinkState},
    config::SecurityMode,
    enrol::{Enrolled, Enroller},
    policy::Mode,
};

/// `/v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The same verdict `/healthz` gives.
    pub health: HealthState,
    /// Every problem `/healthz` lists.
    pub problems: Vec<String>,
    pub daemon: DaemonInfo,
    pub kill_switch: KillSwitchStatus,
    pub audit: AuditStatus,
    pub agents: Vec<AgentStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub pid: u32,
    pub version: String,
    /// RFC 3339.
    pub started: String,
    pub proxy_port: u16,
    pub dns_port: u16,
    pub security_mode: SecurityMode,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KillSwitchStatus {
    /// The global switch, as the kernel flag says.
    pub global: bool,
    /// The global file.
    pub file: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditStatus {
    pub records_written: u64,
    pub head_hash: String,
    pub healthy: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentStatus {
    pub name: String,
    pub id: u32,
    pub origin: Origin,
    pub policy: PathBuf,
    pub policy_sha256: String,
    pub rules: usize,
    pub mode: Mode,
    pub last_reload: ReloadStatus,
    pub killed: bool,
    pub redirect_all_tcp: bool,
    pub open_connections: usize,
    pub cgroups: Vec<Enrolled>,
    pub counters: Counters,
}

/// An agent's kernel counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Counters {
    pub redirected: u64,
    pub refused: u64,
    pub dropped_packets: u64,
    pub dns_redirected: u64,
    /// Refusals the kernel could not report one by one (its event ring was full); the audit
    /// log records their number.
    #[serde(default)]
    pub events_lost: u64,
}

/// `/healthz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: HealthState,
    pub problems: Vec<String>,
    pub engine_loaded: bool,
    pub agents: Vec<AgentHealth>,
    pub kill_switch: KillSwitchHealth,
    /// Every agent enforces (none in dry-run).
    pub enforce: bool,
    pub security_mode: SecurityMode,
    /// RFC 3339 time of the last decision, if any.
    pub last_eval_at: Option<String>,
    pub audit: AuditStatus,
    pub cgroups: Vec<CgroupHealth>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    Healthy,
    /// A program is missing from an enrolled cgroup, or the audit log cannot be written.
    Degraded,
    /// No agent is loaded, so nothing is enforced.
    Disabled,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentHealth {
    pub name: String,
    pub policy_sha256: String,
    pub mode: Mode,
    pub enforce: bool,
    pub killed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KillSwitchHealth {
    pub global: bool,
    /// Agents cut off (by their own file or the global one).
    pub agents: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CgroupHealth {
    pub path: PathBuf,
    pub agent: String,
    /// Each program's state as the kernel reports it now.
    pub programs: BTreeMap<String, LinkState>,
}

/// One agent's live values, read at scrape time by the metrics collector.
#[derive(Debug, Clone)]
pub struct AgentLive {
    pub name: String,
    pub counters: Counters,
    pub open_connections: usize,
    pub killed: bool,
}

/// Fixed facts about this daemon, for the report.
#[derive(Debug, Clone)]
pub struct Facts {
    pub started: jiff::Timestamp,
    pub proxy_port: u16,
    pub dns_port: u16,
    pub security_mode: SecurityMode,
    pub kill_switch_file: PathBuf,
}

/// Builds the report from what the daemon holds.
pub struct Reporter {
    pub facts: Facts,
    pub registry: Arc<Registry>,
    pub kernel: Arc<Kernel>,
    pub enroller: Arc<Enroller>,
    pub audit: AuditLog,
    pub credentials: Arc<crate::credentials::Vault>,
}

impl Reporter {
    pub fn status(&self) -> Status {
        let enrolled = self.enroller.list();
        let agents = self
            .registry
            .all()
            .iter()
            .map(|a| {
                let policy = a.policy();
                let flags = self.kernel.agent_flags(a.id).unwrap_or(0);
                AgentStatus {
                    name: a.name.clone(),
                    id: a.id,
                    origin: a.origin.clone(),
                    // The canonical path: relative and `..` parts of the config resolved.
                    policy: std::fs::canonicalize(&a.policy_path)
                        .unwrap_or_else(|_| a.policy_path.clone()),
                    policy_sha256: policy.sha256().to_owned(),
                    rules: policy.rule_count(),
                    mode: policy.mode(),
                    last_reload: a.reload_status(),
                    killed: a.is_killed() || flags & agent_flags::KILLED != 0,
                    redirect_all_tcp: flags & agent_flags::REDIRECT_ALL_TCP != 0,
                    open_connections: a.conns.count(),
                    cgroups: enrolled
                        .iter()
                        .filter(|e| e.agent == a.name)
                        .cloned()
                        .collect(),
                    counters: self.counters(a.id),
                }
            })
            .collect();
        let health = self.health();
        Status {
            health: health.status,
            problems: health.problems,
            daemon: DaemonInfo {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                started: self.facts.started.to_string(),
                proxy_port: self.facts.proxy_port,
                dns_port: self.facts.dns_port,
                security_mode: self.facts.security_mode,
            },
            kill_switch: KillSwitchStatus {
                global: self.global_kill(),
                file: self.facts.kill_switch_file.clone(),
            },
            audit: self.audit_status(),
            agents,
        }
    }

    /// The health report. The programs attached to each enrolled cgroup are read from the
    /// kernel now.
    pub fn health(&self) -> Health {
        let agents = self.registry.all();
        let mut problems = Vec::new();
        let cgroups = self
            .enroller
            .list()
            .iter()
            .map(|e| {
                let programs = match crate::cgroup::cgroup_id(&e.path) {
                    Ok(id) if e.id != 0 && id != e.id => {
                        problems.push(format!(
                            "{}: the cgroup was removed and created again (id {id}, enrolled as \
                             {}); its programs are being attached again",
                            e.path.display(),
                            e.id
                        ));
                        BTreeMap::new()
                    }
                    Ok(id) => self
                        .kernel
                        .link_states(id)
                        .into_iter()
                        .map(|(name, state)| {
                            if state != LinkState::Attached {
                                problems.push(format!("{}: {name} is {state:?}", e.path.display()));
                            }
                            (name.to_string(), state)
                        })
                        .collect(),
                    Err(_) => {
                        problems.push(format!("{}: cgroup is gone", e.path.display()));
                        BTreeMap::new()
                    }
                };
                CgroupHealth {
                    path: e.path.clone(),
                    agent: e.agent.clone(),
                    programs,
                }
            })
            .collect();
        if !self.audit.healthy() {
            problems.push("audit log cannot be written".into());
        }
        problems.extend(self.kernel.missing_protections());
        // Never the secret: only which credential and why it cannot be had.
        for c in self.credentials.all() {
            if let Some(why) = c.unavailable() {
                problems.push(format!(
                    "credential '{}' of agent '{}' is unavailable (requests that need it are \
                     refused): {why}",
                    c.name, c.agent
                ));
            }
        }
        let status = if !problems.is_empty() {
            HealthState::Degraded
        } else if agents.is_empty() {
            HealthState::Disabled
        } else {
            HealthState::Healthy
        };
        let last_eval_at = agents
            .iter()
            .map(|a| a.last_eval_ms())
            .max()
            .filter(|ms| *ms > 0)
            .and_then(|ms| jiff::Timestamp::from_millisecond(ms as i64).ok())
            .map(|t| t.to_string());
        Health {
            status,
            problems,
            engine_loaded: !agents.is_empty(),
            agents: agents
                .iter()
                .map(|a| {
                    let p = a.policy();
                    AgentHealth {
                        name: a.name.clone(),
                        policy_sha256: p.sha256().to_owned(),
                        mode: p.mode(),
                        enforce: p.mode() == Mode::Enforce,
                        killed: a.is_killed(),
                    }
                })
                .collect(),
            kill_switch: KillSwitchHealth {
                global: self.global_kill(),
                agents: agents
                    .iter()
                    .filter(|a| a.is_killed())
                    .map(|a| a.name.clone())
                    .collect(),
            },
            enforce: agents.iter().all(|a| a.policy().mode() == Mode::Enforce),
            security_mode: self.facts.security_mode,
            last_eval_at,
            audit: self.audit_status(),
            cgroups,
        }
    }

    /// Every agent's live values.
    pub fn live(&self) -> Vec<AgentLive> {
        self.registry
            .all()
            .iter()
            .map(|a| AgentLive {
                name: a.name.clone(),
                counters: self.counters(a.id),
                open_connections: a.conns.count(),
                killed: a.is_killed(),
            })
            .collect()
    }

    /// The global kill flag as the kernel has it.
    pub fn global_kill(&self) -> bool {
        self.kernel
            .config()
            .map(|c| c.flags & global_flags::KILLED != 0)
            .unwrap_or(false)
    }

    pub fn audit_status(&self) -> AuditStatus {
        let stats = self.audit.stats();
        AuditStatus {
            records_written: stats.records_written,
            head_hash: stats.head_hash,
            healthy: self.audit.healthy(),
        }
    }

    fn counters(&self, agent: u32) -> Counters {
        let c = self.kernel.counters(agent);
        Counters {
            redirected: c.redirected,
            refused: c.refused,
            dropped_packets: c.dropped_packets,
            dns_redirected: c.dns_redirected,
            events_lost: c.events_lost,
        }
    }
}
