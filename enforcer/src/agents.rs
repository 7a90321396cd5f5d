//! Agents at run time: name, kernel id, current policy, rate-limit state, the addresses the
//! policy's names resolve to, and the proxied connections that are open.
//!
//! Kernel ids are persisted in `<state_dir>/agent-ids.json`, so a restarted daemon gives every
//! agent the id the pinned maps already use: no moment where a cgroup maps to the wrong agent.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use enforcer_common::MAX_AGENTS;
use serde::{Deserialize, Serialize};

use crate::{
    bpf::AllowEntry,
    policy::{Policy, RateLimiter},
};

pub mod allowlist;
pub mod caller;
pub mod conns;
pub mod exe;
pub mod lifecycle;
pub mod sweeper;

pub use caller::Caller;
pub use conns::ConnTracker;

/// Records a kernel refusal in the audit log under its agent's name (aggregated there per
/// destination and second).
pub fn record_denial(
    registry: &Registry,
    audit: &crate::audit::AuditLog,
    d: crate::bpf::events::Denial,
) {
    let agent = registry
        .by_id(d.agent_id)
        .map(|a| a.name.clone())
        .unwrap_or_else(|| format!("#{}", d.agent_id));
    tracing::debug!(%agent, pid = d.pid, comm = %d.comm, dest = %d.dest, reason = d.reason_name(), "kernel refused");
    if d.reason == enforcer_common::deny_reason::OTHER_NETNS {
        tracing::warn!(%agent, pid = d.pid, comm = %d.comm, dest = %d.dest,
            "refused a socket in another network namespace: containers with their own network namespace are not supported yet");
    }
    audit.kernel_deny(&agent, d.pid, &d.comm, d.dest, d.reason_name());
}

/// How often the kernel's lost-event counters are read.
const LOST_EVERY: Duration = Duration::from_secs(1);

/// Writes, once a second, the refusals the kernel counted but could not report (its event
/// ring was full) as `kernel_deny` records with `action: lost`, so that each agent's records
/// add up to its `refused` counter. What was lost before this daemon started is its baseline.
pub async fn account_lost_denials(
    kernel: Arc<crate::bpf::Kernel>,
    registry: Arc<Registry>,
    audit: crate::audit::AuditLog,
) {
    let mut seen: HashMap<u32, u64> = HashMap::new();
    let mut tick = tokio::time::interval(LOST_EVERY);
    loop {
        tick.tick().await;
        // Id 0: refusals of tasks that belong to no agent.
        let ids = std::iter::once((0, "#0".to_owned()))
            .chain(registry.all().into_iter().map(|a| (a.id, a.name.clone())));
        for (id, name) in ids {
            let lost = kernel.counters(id).events_lost;
            let before = seen.insert(id, lost);
            let delta = match before {
                Some(before) => lost.saturating_sub(before),
                None => 0,
            };
            if delta > 0 {
                tracing::warn!(agent = %name, lost = delta, "kernel refusals not reported: the event ring was full");
                audit.kernel_lost(&name, delta);
            }
        }
    }
}

/// Whether the kill switch holds an agent, asked when the agent is added (so its flags reach
/// the kernel already killed). Implemented by the kill switch, which sits above this module.
pub trait KillFlags: Send + Sync {
    fn engaged_for(&self, agent: &str) -> bool;
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no agent named '{name}'; configured agents: {known}")]
    Unknown { name: String, known: String },
    #[error("all {max} agent slots are in use; remove agents from the config or state dir", max = MAX_AGENTS - 1)]
    Full,
    #[error("cannot write {path}: {io}", io = crate::sys::io_text(source))]
    Persist {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt ({message}); move it aside and restart the daemon")]
    Corrupt { path: PathBuf, message: String },
}

/// Where an agent's policy comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// Listed in the config file.
    #[serde(rename = "configured")]
    Configured,
    /// Registered by `enforcer exec --policy`, kept in `<state_dir>/agents/`.
    #[serde(rename = "ad-hoc")]
    AdHoc,
}

/// Result of the last (re)load of an agent's policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadStatus {
    /// RFC 3339.
    pub at: String,
    pub ok: bool,
    pub message: String,
}

/// One agent.
pub struct Agent {
    pub name: String,
    pub id: u32,
    pub origin: Origin,
    pub policy_path: PathBuf,
    /// Cgroup for `enforcer exec` (absolute).
    pub exec_cgroup: PathBuf,
    policy: ArcSwap<Policy>,
    pub limiter: RateLimiter,
    names: Mutex<Associations>,
    /// Entries named explicitly by the policy (IP literals, exact names' addresses).
    explicit: Mutex<Vec<AllowEntry>>,
    pub conns: ConnTracker,
    killed: AtomicBool,
    reload: Mutex<ReloadStatus>,
    last_eval: AtomicU64,
    /// Answers refused for the learned-address quota since the last notice, and when that
    /// notice was (Unix ms).
    quota_refused: AtomicU64,
    quota_noticed_ms: AtomicU64,
}

impl Agent {
    pub fn new(
        name: String,
        id: u32,
        origin: Origin,
        policy_path: PathBuf,
        exec_cgroup: PathBuf,
        policy: Arc<Policy>,
    ) -> Self {
        Self {
            name,
            id,
            origin,
            policy_path,
            exec_cgroup,
            policy: ArcSwap::new(policy),
            limiter: RateLimiter::new(),
            names: Mutex::new(Associations::default()),
            explicit: Mutex::new(Vec::new()),
            conns: ConnTracker::default(),
            killed: AtomicBool::new(false),
            reload: Mutex::new(ReloadStatus {
                at: jiff::Timestamp::now().to_string(),
                ok: true,
                message: "loaded at start".into(),
            }),
            last_eval: AtomicU64::new(0),
            quota_refused: AtomicU64::new(0),
            quota_noticed_ms: AtomicU64::new(0),
        }
    }

    /// The current policy. Requests already holding the previous one finish under it.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Atomically swaps in a new policy.
    pub fn set_policy(&self, policy: Arc<Policy>) {
        self.policy.store(policy);
    }

    pub fn set_reload_status(&self, ok: bool, message: String) {
        *lock(&self.reload) = ReloadStatus {
            at: jiff::Timestamp::now().to_string(),
            ok,
            message,
        };
    }

    pub fn reload_status(&self) -> ReloadStatus {
        lock(&self.reload).clone()
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    pub fn set_killed(&self, killed: bool) {
        self.killed.store(killed, Ordering::SeqCst);
    }

    /// Counts an answer refused for the learned-address quota; `Some(count)` at most once per
    /// [`QUOTA_NOTICE_EVERY`], with how many were refused since the last notice.
    pub fn quota_notice(&self) -> Option<u64> {
        let refused = self.quota_refused.fetch_add(1, Ordering::Relaxed) + 1;
        let now = u64::try_from(jiff::Timestamp::now().as_millisecond()).unwrap_or(0);
        let last = self.quota_noticed_ms.load(Ordering::Relaxed);
        let every = u64::try_from(QUOTA_NOTICE_EVERY.as_millis()).unwrap_or(u64::MAX);
        if now.saturating_sub(last) < every
            || self
                .quota_noticed_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        self.quota_refused.fetch_sub(refused, Ordering::Relaxed);
        Some(refused)
    }

    /// Notes that a decision was just made (for health reports).
    pub fn touch_eval(&self) {
        let now = jiff::Timestamp::now().as_millisecond();
        self.last_eval
            .store(u64::try_from(now).unwrap_or(0), Ordering::Relaxed);
    }

    /// Unix milliseconds of the last decision, 0 if none.
    pub fn last_eval_ms(&self) -> u64 {
        self.last_eval.load(Ordering::Relaxed)
    }

    /// Names the address was learned for (unexpired).
    pub fn names_for(&self, ip: IpAddr) -> Vec<String> {
        lock(&self.names).names_for(ip, crate::bpf::boot_ns())
    }

    /// Records that `name` resolved to `ip` until `expires_boot_ns`. `exact`: the policy
    /// names `name` exactly (it may then be an internal address).
    pub fn learn(&self, name: &str, ip: IpAddr, expires_boot_ns: u64, exact: bool) {
        lock(&self.names).learn(name, ip, expires_boot_ns, exact);
    }

    /// Drops expired associations.
    pub fn sweep(&self, now_boot_ns: u64) {
        lock(&self.names).sweep(now_boot_ns);
    }

    /// Every unexpired learned association: (name, address, expiry, exact).
    pub fn learned(&self) -> Vec<LearnedName> {
        let now = crate::bpf::boot_ns();
        let names = lock(&self.names);
        names
            .by_ip
            .iter()
            .flat_map(|(ip, m)| {
                m.iter()
                    .filter(|(_, l)| l.expires_boot_ns > now)
                    .map(|(n, l)| LearnedName {
                        name: n.clone(),
                        ip: *ip,
                        expires_boot_ns: l.expires_boot_ns,
                        exact: l.exact,
                    })
            })
            .collect()
    }

    /// Forgets learned addresses whose names the current policy no longer allows; returns
    /// the addresses left without any allowed name.
    pub fn forget_disallowed(&self, allowed: impl Fn(&str) -> bool) -> Vec<IpAddr> {
        lock(&self.names).retain_names(allowed)
    }

    /// The SNI or Host must name the address the agent connected to: an IP literal must be
    /// that address, and a name must be one the agent's DNS answers associated with it.
    /// Returns the canonical host, or why it does not belong to `dst`.
    pub fn check_host(&self, host: &str, dst: IpAddr) -> Result<String, String> {
        let canonical = crate::policy::canonical_host(host).map_err(|e| e.to_string())?;
        if let Ok(ip) = canonical.parse::<IpAddr>() {
            // An IPv4-mapped literal is judged as its IPv4 form, like the kernel does.
            let ip = crate::addr::canonical(ip);
            if ip != dst {
                return Err(format!(
                    "destination address not associated with host: {host} is not {dst}"
                ));
            }
            return Ok(ip.to_string());
        }
        // A name must be one the agent resolved (through us) to this very address.
        if !self.names_for(dst).contains(&canonical) {
            return Err(format!(
                "destination address not associated with host: {canonical} was not resolved to {dst}"
            ));
        }
        Ok(canonical)
    }

    /// Records the destinations the policy names explicitly.
    pub fn set_explicit(&self, entries: Vec<AllowEntry>) {
        *lock(&self.explicit) = entries;
    }

    /// Does the policy name this destination explicitly (an IP literal, or the address a
    /// name written exactly resolved to)? Only such destinations may be internal ones.
    ///
    /// "Explicit" is per (name, port) as written: a name written exactly for port 5432 makes
    /// its address explicit on 5432 only, not on every port of that address.
    pub fn is_explicit(&self, ip: IpAddr, port: u16) -> bool {
        let literal = lock(&self.explicit).iter().any(|e| {
            e.flags & enforcer_common::allow_flags::EXPLICIT != 0
                && e.net.contains(&ip)
                && e.port.is_none_or(|p| p == port)
        });
        if literal {
            return true;
        }
        let policy = self.policy();
        lock(&self.names)
            .exact_names(ip, crate::bpf::boot_ns())
            .iter()
            .any(|name| policy.names_exactly(name, port))
    }
}

/// One learned association, as saved across daemon restarts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LearnedName {
    pub name: String,
    pub ip: IpAddr,
    pub expires_boot_ns: u64,
    pub exact: bool,
}

/// The learned names of every agent, saved so a restarted daemon keeps honouring addresses
/// the kernel still allows. Tied to the boot: `bpf_ktime_get_boot_ns` restarts at a reboot.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LearnedFile {
    pub boot_id: String,
    pub agents: BTreeMap<String, Vec<LearnedName>>,
}

impl LearnedFile {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("learned.json")
    }

    /// This boot's id.
    pub fn current_boot_id() -> String {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    }

    /// The saved names of this boot (nothing from another boot, or from a corrupt file).
    pub fn load(state_dir: &Path) -> LearnedFile {
        let Ok(bytes) = std::fs::read(Self::path(state_dir)) else {
            return LearnedFile::default();
        };
        match serde_json::from_slice::<LearnedFile>(&bytes) {
            Ok(f) if f.boot_id == Self::current_boot_id() && !f.boot_id.is_empty() => f,
            _ => LearnedFile::default(),
        }
    }

    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        write_atomic(&Self::path(state_dir), &bytes)
    }
}

/// Which names each address belongs to, as learned from DNS answers for one agent.
#[derive(Debug, Default)]
struct Associations {
    by_ip: HashMap<IpAddr, HashMap<String, Learned>>,
}

#[derive(Debug, Clone, Copy)]
struct Learned {
    expires_boot_ns: u64,
    exact: bool,
}

impl Associations {
    fn learn(&mut self, name: &str, ip: IpAddr, expires_boot_ns: u64, exact: bool) {
        let e = self
            .by_ip
            .entry(ip)
            .or_default()
            .entry(name.to_owned())
            .or_insert(Learned {
                expires_boot_ns,
                exact,
            });
        e.expires_boot_ns = e.expires_boot_ns.max(expires_boot_ns);
        e.exact |= exact;
    }

    fn names_for(&self, ip: IpAddr, now: u64) -> Vec<String> {
        self.by_ip
            .get(&ip)
            .map(|m| {
                m.iter()
                    .filter(|(_, l)| l.expires_boot_ns > now)
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[cfg(test)]
    fn exact_for(&self, ip: IpAddr, now: u64) -> bool {
        !self.exact_names(ip, now).is_empty()
    }

    /// The unexpired names written exactly in the policy that resolved to `ip`.
    fn exact_names(&self, ip: IpAddr, now: u64) -> Vec<String> {
        self.by_ip
            .get(&ip)
            .map(|m| {
                m.iter()
                    .filter(|(_, l)| l.exact && l.expires_boot_ns > now)
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn sweep(&mut self, now: u64) {
        self.by_ip.retain(|_, names| {
            names.retain(|_, l| l.expires_boot_ns > now);
            !names.is_empty()
        });
    }

    fn retain_names(&mut self, allowed: impl Fn(&str) -> bool) -> Vec<IpAddr> {
        let mut orphaned = Vec::new();
        self.by_ip.retain(|ip, names| {
            names.retain(|n, _| allowed(n));
            if names.is_empty() {
                orphaned.push(*ip);
            }
            !names.is_empty()
        });
        orphaned
    }
}

/// All agents, by name and by kernel id.
#[derive(Default)]
pub struct Registry {
    agents: RwLock<BTreeMap<String, Arc<Agent>>>,
}

impl Registry {
    pub fn insert(&self, agent: Arc<Agent>) {
        write(&self.agents).insert(agent.name.clone(), agent);
    }

    pub fn remove(&self, name: &str) -> Option<Arc<Agent>> {
        write(&self.agents).remove(name)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Agent>> {
        read(&self.agents).get(name).cloned()
    }

    pub fn by_id(&self, id: u32) -> Option<Arc<Agent>> {
        read(&self.agents).values().find(|a| a.id == id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Agent>> {
        read(&self.agents).values().cloned().collect()
    }

    pub fn names(&self) -> Vec<String> {
        read(&self.agents).keys().cloned().collect()
    }

    /// "a, b, c" or "(none)", for error messages.
    pub fn names_list(&self) -> String {
        let names = self.names();
        if names.is_empty() {
            "(none)".into()
        } else {
            names.join(", ")
        }
    }
}

/// Persistent name → kernel id table. An id stays with its name (and reserved) for as long as
/// the table holds it, so a cgroup still mapped to a removed agent's id never falls to another
/// agent; names that were ever configured are remembered, so an ad-hoc agent cannot take one.
pub struct IdTable {
    path: PathBuf,
    ids: BTreeMap<String, u32>,
    configured: BTreeSet<String>,
}

#[derive(Serialize, Deserialize)]
struct IdFile {
    ids: BTreeMap<String, u32>,
    #[serde(default)]
    configured: BTreeSet<String>,
}

impl IdTable {
    pub fn load(state_dir: &Path) -> Result<Self, AgentError> {
        let path = state_dir.join("agent-ids.json");
        let (ids, configured) = match std::fs::read(&path) {
            Ok(bytes) => {
                let file: IdFile =
                    serde_json::from_slice(&bytes).map_err(|e| AgentError::Corrupt {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                (file.ids, file.configured)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(source) => return Err(AgentError::Persist { path, source }),
        };
        Ok(Self {
            path,
            ids,
            configured,
        })
    }

    /// Was `name` ever a configured agent (present in the config now, or removed from it
    /// while its id is still held)?
    pub fn was_configured(&self, name: &str) -> bool {
        self.configured.contains(name)
    }

    /// Remembers that `name` is a configured agent.
    pub fn mark_configured(&mut self, name: &str) -> Result<(), AgentError> {
        if self.configured.insert(name.to_owned()) {
            self.save()?;
        }
        Ok(())
    }

    /// The agent's id, allocating (and persisting) the smallest free one. `in_use` are ids
    /// the kernel still maps some cgroup to: never handed out again, whatever the table says.
    pub fn id_for(&mut self, name: &str, in_use: &[u32]) -> Result<u32, AgentError> {
        if let Some(id) = self.ids.get(name) {
            return Ok(*id);
        }
        let mut used: BTreeSet<u32> = self.ids.values().copied().collect();
        used.extend(in_use);
        let id = (1..MAX_AGENTS)
            .find(|i| !used.contains(i))
            .ok_or(AgentError::Full)?;
        self.ids.insert(name.to_owned(), id);
        self.save()?;
        Ok(id)
    }

    /// Ids of names not in `keep`: their slots stay reserved until `forget` is called.
    pub fn others(&self, keep: &[String]) -> Vec<(String, u32)> {
        self.ids
            .iter()
            .filter(|(n, _)| !keep.contains(n))
            .map(|(n, i)| (n.clone(), *i))
            .collect()
    }

    pub fn forget(&mut self, name: &str) -> Result<(), AgentError> {
        if self.ids.remove(name).is_some() | self.configured.remove(name) {
            self.save()?;
        }
        Ok(())
    }

    fn save(&self) -> Result<(), AgentError> {
        let file = IdFile {
            ids: self.ids.clone(),
            configured: self.configured.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).expect("id table serialises");
        write_atomic(&self.path, &bytes).map_err(|source| AgentError::Persist {
            path: self.path.clone(),
            source,
        })
    }
}

/// Writes a file through a temporary sibling and a rename, so a crash leaves the old or the
/// new content, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// How often an agent over its learned-address quota gets a log line and an audit record.
pub const QUOTA_NOTICE_EVERY: Duration = Duration::from_secs(10);

/// How often names from the policy are resolved again (resolve-at-load has no TTLs).
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_smallest_free() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = IdTable::load(dir.path()).unwrap();
        assert_eq!(t.id_for("a", &[]).unwrap(), 1);
        assert_eq!(t.id_for("b", &[]).unwrap(), 2);
        assert_eq!(t.id_for("a", &[]).unwrap(), 1);
        t.mark_configured("b").unwrap();
        t.forget("a").unwrap();
        // An id the kernel still maps a cgroup to is never handed out, table or not.
        assert_eq!(t.id_for("c", &[1]).unwrap(), 3);
        assert_eq!(t.id_for("d", &[]).unwrap(), 1);
        let mut again = IdTable::load(dir.path()).unwrap();
        assert_eq!(again.id_for("b", &[]).unwrap(), 2);
        assert_eq!(again.id_for("c", &[]).unwrap(), 3);
        assert!(again.was_configured("b") && !again.was_configured("c"));
    }

    #[test]
    fn learned_names_expire_and_follow_the_policy() {
        let mut a = Associations::default();
        let ip: IpAddr = "192.0.2.5".parse().unwrap();
        a.learn("a.svc.test", ip, 100, false);
        a.learn("db.test", ip, 50, true);
        assert_eq!(a.names_for(ip, 10).len(), 2);
        assert!(a.exact_for(ip, 10));
        assert!(!a.exact_for(ip, 60), "the exact name expired");
        assert_eq!(a.names_for(ip, 60), vec!["a.svc.test".to_string()]);
        a.sweep(200);
        assert!(a.names_for(ip, 0).is_empty());
        a.learn("a.svc.test", ip, 100, false);
        assert_eq!(a.retain_names(|n| n != "a.svc.test"), vec![ip]);
    }
}
