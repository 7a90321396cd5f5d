//! Enrolment: which cgroups are enforced, and for which agent.
//!
//! Three sources, all attached the same way (programs attached and pinned, cgroup id mapped
//! to the agent id):
//! - every agent's exec cgroup (`enforcer.slice/<agent>` by default), where `enforcer exec` and
//!   `enforcer enrol --pid` put processes;
//! - cgroups listed under an agent's `cgroups:` in the config;
//! - cgroups enrolled with `enforcer enrol --cgroup`, persisted in
//!   `<state_dir>/enrolments.json` so they survive a restart.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};

use crate::{
    agents::{Agent, Registry, write_atomic},
    bpf::{BpfError, Kernel},
    cgroup::{CgroupError, Hierarchy, cgroup_id, is_within, process_tree},
};

#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error(
        "refusing to enrol {0}: it is the root cgroup, and enrolling it would enforce the whole host"
    )]
    Root(PathBuf),
    #[error(
        "refusing to enrol {path}: the daemon itself runs in {own}; enrolling it (or an \
         ancestor) would cut the proxy off. Enrol a cgroup below it instead"
    )]
    OwnCgroup { path: PathBuf, own: PathBuf },
    #[error("refusing to enrol process {0}: it is the enforcer daemon or one of its ancestors")]
    OwnProcess(u32),
    #[error("refusing to enrol process {0}: it is init")]
    Init(u32),
    #[error("process {0} does not exist")]
    NoProcess(u32),
    #[error("{path} is already enrolled for agent '{agent}'; unenrol it first")]
    Taken { path: PathBuf, agent: String },
    #[error("{0} is not enrolled")]
    NotEnrolled(PathBuf),
    #[error("process {pid} is not in an enrolled cgroup (it is in {cgroup})")]
    PidNotEnrolled { pid: u32, cgroup: PathBuf },
    #[error(
        "the kernel reports {} not attached to {path} (cgroup id {id}); refusing to run anything \
         there. `enforcer status` shows the links",
        missing.join(", ")
    )]
    NotAttached {
        path: PathBuf,
        id: u64,
        missing: Vec<&'static str>,
    },
    #[error("cannot save enrolments to {path}: {io}", io = crate::sys::io_text(source))]
    Persist {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Serialize, Deserialize, Default)]
struct EnrolFile {
    /// Absolute cgroup path → agent name.
    cgroups: BTreeMap<PathBuf, String>,
    /// Pid → the cgroup it came from, so `unenrol --pid` can put it back.
    origins: BTreeMap<u32, PathBuf>,
}

/// Where an enrolled cgroup comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Exec,
    Config,
    Enrolled,
}

/// An enrolled cgroup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enrolled {
    pub path: PathBuf,
    pub agent: String,
    pub source: Source,
    /// The cgroup id the programs were attached to. A cgroup removed and created again at
    /// the same path has a new id, and none of the programs.
    #[serde(default)]
    pub id: u64,
}

pub struct Enroller {
    pub hierarchy: Hierarchy,
    kernel: Arc<Kernel>,
    registry: Arc<Registry>,
    file: PathBuf,
    own_cgroup: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    persisted: EnrolFile,
    /// Every enrolled cgroup, whatever its source.
    all: BTreeMap<PathBuf, Enrolled>,
}

impl Enroller {
    pub fn new(
        hierarchy: Hierarchy,
        kernel: Arc<Kernel>,
        registry: Arc<Registry>,
        state_dir: &Path,
    ) -> Result<Self, EnrolError> {
        let own_cgroup = hierarchy.of_pid(std::process::id())?;
        let file = state_dir.join("enrolments.json");
        let persisted = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(
                    "{} is corrupt ({e}); starting with no saved enrolments",
                    file.display()
                );
                EnrolFile::default()
            }),
            Err(_) => EnrolFile::default(),
        };
        Ok(Self {
            hierarchy,
            kernel,
            registry,
            file,
            own_cgroup,
            state: Mutex::new(State {
                persisted,
                all: BTreeMap::new(),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cgroup the daemon runs in.
    pub fn own_cgroup(&self) -> &Path {
        &self.own_cgroup
    }

    fn check_target(&self, path: &Path) -> Result<(), EnrolError> {
        if path == self.hierarchy.mount() {
            return Err(EnrolError::Root(path.to_owned()));
        }
        if is_within(&self.own_cgroup, path) {
            return Err(EnrolError::OwnCgroup {
                path: path.to_owned(),
                own: self.own_cgroup.clone(),
            });
        }
        Ok(())
    }

    /// Attaches the programs to `path` and maps it to `agent`. When the path was enrolled
    /// before under another cgroup id (removed and created again), the old id's pins and
    /// mapping go.
    fn attach(&self, path: &Path, agent: &Agent, source: Source) -> Result<u64, EnrolError> {
        self.check_target(path)?;
        let id = cgroup_id(path)?;
        let outcome = self.kernel.attach_cgroup(path, id)?;
        self.kernel.map_cgroup(id, agent.id)?;
        tracing::info!(
            cgroup = %path.display(), agent = %agent.name, id,
            attached = outcome.attached, updated = outcome.updated, reused = outcome.reused,
            "cgroup enrolled"
        );
        let before = self.state().all.insert(
            path.to_owned(),
            Enrolled {
                path: path.to_owned(),
                agent: agent.name.clone(),
                source,
                id,
            },
        );
        if let Some(old) = before
            && old.id != 0
            && old.id != id
        {
            tracing::warn!(cgroup = %path.display(), old = old.id, new = id,
                "the cgroup was removed and created again; its programs are attached anew");
            let _ = self.kernel.detach_cgroup(old.id);
            let _ = self.kernel.unmap_cgroup(old.id);
        }
        Ok(id)
    }

    /// Creates (when missing) and enrols the agent's exec cgroup: its programs are attached
    /// to the cgroup that is there now, whatever happened to an earlier one at that path.
    pub fn enrol_exec_cgroup(&self, agent: &Agent) -> Result<u64, EnrolError> {
        let path = self.hierarchy.ensure(&agent.exec_cgroup)?;
        self.attach(&path, agent, Source::Exec)
    }

    /// Puts enrolments right after changes behind the daemon's back: an agent's exec cgroup
    /// that was removed is created and attached again, and any enrolled path whose cgroup was
    /// created anew (a new id: a restarted service's cgroup) gets the programs again. Returns
    /// what it did, for the log.
    pub fn reconcile(&self) -> Vec<String> {
        let mut done = Vec::new();
        for e in self.list() {
            let Some(agent) = self.registry.get(&e.agent) else {
                continue;
            };
            let now = cgroup_id(&e.path).ok();
            let result = match (now, e.source) {
                (Some(id), _) if id == e.id => continue,
                (None, Source::Exec) => self.enrol_exec_cgroup(&agent),
                (None, _) => continue,
                (Some(_), source) => self.attach(&e.path, &agent, source),
            };
            match result {
                Ok(id) => done.push(format!(
                    "{} (agent '{}') re-enrolled as cgroup id {id}",
                    e.path.display(),
                    e.agent
                )),
                Err(err) => done.push(format!(
                    "cannot re-enrol {} (agent '{}'): {err}",
                    e.path.display(),
                    e.agent
                )),
            }
        }
        done
    }

    /// Enrols a cgroup named in the config.
    pub fn enrol_configured(&self, path: &Path, agent: &Agent) -> Result<(), EnrolError> {
        let path = self.hierarchy.resolve(path)?;
        self.attach(&path, agent, Source::Config).map(|_| ())
    }

    /// Re-attaches the cgroups saved by `enrol --cgroup`. Ones whose agent is gone or whose
    /// cgroup vanished are reported and dropped.
    pub fn restore(&self) -> Vec<String> {
        let saved: Vec<(PathBuf, String)> = self
            .state()
            .persisted
            .cgroups
            .iter()
            .map(|(p, a)| (p.clone(), a.clone()))
            .collect();
        let mut problems = Vec::new();
        for (path, name) in saved {
            let result = match self.registry.get(&name) {
                Some(agent) => self.attach(&path, &agent, Source::Enrolled).map(|_| ()),
                None => {
                    problems.push(format!(
                        "saved enrolment of {} names agent '{name}', which no longer exists; \
                         its links stay attached and refuse everything until `enforcer unenrol \
                         --cgroup {}`",
                        path.display(),
                        path.display()
                    ));
                    continue;
                }
            };
            if let Err(e) = result {
                problems.push(format!(
                    "cannot restore enrolment of {}: {e}",
                    path.display()
                ));
            }
        }
        problems
    }

    /// `enforcer enrol --cgroup`.
    pub fn enrol_cgroup(&self, path: &Path, agent: &Agent) -> Result<PathBuf, EnrolError> {
        let path = self.hierarchy.resolve(path)?;
        if !path.is_dir() {
            return Err(CgroupError::Missing { path }.into());
        }
        if let Some(e) = self.state().all.get(&path)
            && e.agent != agent.name
        {
            return Err(EnrolError::Taken {
                path,
                agent: e.agent.clone(),
            });
        }
        self.attach(&path, agent, Source::Enrolled)?;
        let mut state = self.state();
        state
            .persisted
            .cgroups
            .insert(path.clone(), agent.name.clone());
        self.save(&state)?;
        Ok(path)
    }

    /// `enforcer unenrol --cgroup`: detaches the programs and forgets the mapping.
    pub fn unenrol_cgroup(&self, path: &Path) -> Result<PathBuf, EnrolError> {
        let path = self.hierarchy.resolve(path)?;
        let known = self.state().all.get(&path).cloned();
        match known {
            Some(e) if e.source == Source::Enrolled => {}
            Some(e) => {
                return Err(EnrolError::Taken {
                    path,
                    agent: format!(
                        "{} (from {:?}; change the config instead)",
                        e.agent, e.source
                    ),
                });
            }
            None if self.state().persisted.cgroups.contains_key(&path) => {}
            None => return Err(EnrolError::NotEnrolled(path)),
        }
        if let Ok(id) = cgroup_id(&path) {
            self.kernel.detach_cgroup(id)?;
            self.kernel.unmap_cgroup(id)?;
        }
        let mut state = self.state();
        state.all.remove(&path);
        state.persisted.cgroups.remove(&path);
        self.save(&state)?;
        Ok(path)
    }

    /// Moves a process, with all its threads and descendants, into the agent's exec cgroup.
    /// Returns the cgroup and warnings about sockets opened before, which escape the hooks.
    pub fn enrol_pid(&self, pid: u32, agent: &Agent) -> Result<(PathBuf, Vec<String>), EnrolError> {
        if pid == 1 {
            return Err(EnrolError::Init(pid));
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(EnrolError::NoProcess(pid));
        }
        let me = std::process::id();
        let tree = process_tree(pid);
        if tree.contains(&me) {
            return Err(EnrolError::OwnProcess(pid));
        }
        // The exec cgroup may have been removed (or removed and created again) behind the
        // daemon's back: make sure the one there now exists and has every program before
        // anything is moved into it.
        self.enrol_exec_cgroup(agent)?;
        let target = self.hierarchy.resolve(&agent.exec_cgroup)?;
        let warnings = preexisting_sockets(&tree);
        let origin = self.hierarchy.of_pid(pid)?;
        // Move the parent first: children forked afterwards are born inside. Then sweep the
        // tree again for children forked while we moved.
        for round in 0..3 {
            for p in process_tree(pid) {
                match self.hierarchy.move_pid(p, &target) {
                    Ok(()) => {}
                    // Exited meanwhile.
                    Err(_) if !Path::new(&format!("/proc/{p}")).exists() => {}
                    Err(e) if p == pid || round == 2 => return Err(e.into()),
                    Err(_) => {}
                }
            }
        }
        let mut state = self.state();
        if !self.is_enrolled_locked(&state, &origin) {
            state.persisted.origins.insert(pid, origin);
            self.save(&state)?;
        }
        Ok((target, warnings))
    }

    /// The id of the cgroup at `path`, once the kernel confirms that every program is
    /// attached to exactly that cgroup (by id, not by path).
    pub fn verified_id(&self, path: &Path) -> Result<u64, EnrolError> {
        let id = cgroup_id(path)?;
        let missing: Vec<&'static str> = self
            .kernel
            .link_states(id)
            .into_iter()
            .filter(|(_, state)| *state != crate::bpf::LinkState::Attached)
            .map(|(name, _)| name)
            .collect();
        if missing.is_empty() {
            Ok(id)
        } else {
            Err(EnrolError::NotAttached {
                path: path.to_owned(),
                id,
                missing,
            })
        }
    }

    /// Moves a process and its descendants back where it came from (or to the root cgroup).
    pub fn unenrol_pid(&self, pid: u32) -> Result<PathBuf, EnrolError> {
        let current = self.hierarchy.of_pid(pid)?;
        if !self.is_enrolled(&current) {
            return Err(EnrolError::PidNotEnrolled {
                pid,
                cgroup: current,
            });
        }
        let mut state = self.state();
        let back = state
            .persisted
            .origins
            .remove(&pid)
            .filter(|p| p.is_dir() && !self.is_enrolled_locked(&state, p))
            .unwrap_or_else(|| self.hierarchy.mount().to_owned());
        for p in process_tree(pid) {
            let cg = self.hierarchy.of_pid(p).unwrap_or_default();
            if self.is_enrolled_locked(&state, &cg) {
                let _ = self.hierarchy.move_pid(p, &back);
            }
        }
        self.save(&state)?;
        Ok(back)
    }

    /// Is `cgroup` (absolute) an enrolled cgroup or below one?
    pub fn is_enrolled(&self, cgroup: &Path) -> bool {
        let state = self.state();
        self.is_enrolled_locked(&state, cgroup)
    }

    fn is_enrolled_locked(&self, state: &State, cgroup: &Path) -> bool {
        state.all.keys().any(|e| is_within(cgroup, e))
    }

    /// Every enrolled cgroup.
    pub fn list(&self) -> Vec<Enrolled> {
        self.state().all.values().cloned().collect()
    }

    /// Forgets (in memory) the cgroups of an agent that is being removed.
    pub fn forget_agent(&self, agent: &str) {
        self.state().all.retain(|_, e| e.agent != agent);
    }

    fn save(&self, state: &State) -> Result<(), EnrolError> {
        let bytes = serde_json::to_vec_pretty(&state.persisted).expect("enrolments serialise");
        write_atomic(&self.file, &bytes).map_err(|source| EnrolError::Persist {
            path: self.file.clone(),
            source,
        })
    }
}

/// TCP and UDP sockets the processes already hold: they were created in the old cgroup and
/// are not enforced until closed.
fn preexisting_sockets(pids: &[u32]) -> Vec<String> {
    let mut inodes: BTreeMap<u64, u32> = BTreeMap::new();
    for &pid in pids {
        let Ok(proc) = procfs::process::Process::new(pid as i32) else {
            continue;
        };
        if let Ok(fds) = proc.fd() {
            for fd in fds.flatten() {
                if let procfs::process::FDTarget::Socket(inode) = fd.target {
                    inodes.insert(inode, pid);
                }
            }
        }
    }
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut describe =
        |proto: &str, local: std::net::SocketAddr, remote: std::net::SocketAddr, inode: u64| {
            if let Some(pid) = inodes.get(&inode) {
                out.push(format!(
                "process {pid} already holds a {proto} socket {local} -> {remote}, opened before \
                 enrolment: it is not enforced until it is closed"
            ));
            }
        };
    for (proto, entries) in [("TCP", procfs::net::tcp()), ("TCP", procfs::net::tcp6())] {
        for e in entries.into_iter().flatten() {
            describe(proto, e.local_address, e.remote_address, e.inode);
        }
    }
    for (proto, entries) in [("UDP", procfs::net::udp()), ("UDP", procfs::net::udp6())] {
        for e in entries.into_iter().flatten() {
            describe(proto, e.local_address, e.remote_address, e.inode);
        }
    }
    out
}
