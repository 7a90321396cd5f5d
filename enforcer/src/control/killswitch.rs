//! The kill switch as a service: it reads the kill-switch files ([`killfiles`]) and applies
//! any change to the kernel, the open streams and the audit log.
//!
//! Engaging the switch for an agent, in this order:
//! 1. the kernel flag (new connects refused, egress dropped);
//! 2. the proxy threads lowered ([`Yielders`]) while they tear down the cut streams;
//! 3. the proxy's end of every open proxied stream destroyed in the kernel, under
//!    `SCHED_FIFO` ([`sockdiag::destroy_tcp_urgently`]);
//! 4. the agent's proxy tasks signalled;
//! 5. every other TCP socket of the agent's cgroups destroyed ([`sockdiag::destroy_tcp_in`]);
//! 6. a `kill_switch` audit record.
//!
//! [`killfiles`]: super::killfiles

use std::{
    collections::HashSet,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use enforcer_common::{agent_flags, global_flags};

use super::killfiles::{KillFiles, KillState, changes};
use crate::{
    agents::{Agent, KillFlags, Registry},
    audit::{Action, AuditEvent, AuditLog, EventKind, Scope},
    bpf::Kernel,
    enrol::Enroller,
    sys::{sched::Yielders, sockdiag},
};

/// How long the proxy threads may stay lowered after the kill switch cut streams, at most:
/// tearing down 1,000 streams takes them about 20 ms of CPU. Past it they get their priority
/// back whether or not every killed stream is gone, so that other agents' traffic is never
/// held back for long.
const DEFER_TEARDOWN_MAX: Duration = Duration::from_millis(250);

/// The kill switch: the files, the state applied, and what it acts on.
pub struct KillSwitch {
    files: KillFiles,
    /// The state currently applied; the async lock serialises changes.
    state: tokio::sync::Mutex<KillState>,
    kernel: Arc<Kernel>,
    registry: Arc<Registry>,
    enroller: Arc<Enroller>,
    audit: AuditLog,
    /// The proxy threads, lowered while they tear down streams the switch cut; unset until
    /// they start, or when the daemon may not raise their priority back.
    proxy_threads: OnceLock<Arc<Yielders>>,
}

impl KillSwitch {
    /// `initial` is the state read before anything was attached, already in the kernel.
    pub fn new(
        files: KillFiles,
        initial: KillState,
        kernel: Arc<Kernel>,
        registry: Arc<Registry>,
        enroller: Arc<Enroller>,
        audit: AuditLog,
    ) -> Self {
        Self {
            files,
            state: tokio::sync::Mutex::new(initial),
            kernel,
            registry,
            enroller,
            audit,
            proxy_threads: OnceLock::new(),
        }
    }

    /// Where the files are.
    pub fn files(&self) -> &KillFiles {
        &self.files
    }

    /// Hands over the proxy threads, to be lowered while they tear down cut streams.
    pub fn set_proxy_threads(&self, threads: Arc<Yielders>) {
        let _ = self.proxy_threads.set(threads);
    }

    /// Reads the kill-switch files and applies any change.
    pub async fn check(&self) {
        let mut current = self.state.lock().await;
        let names = self.registry.names();
        let next = self.files.read(&names);
        if next == *current {
            return;
        }
        let started = Instant::now();
        let changed = changes(&current, &next, &names);
        if next.global != current.global {
            self.set_global_flag(next.global);
        }
        let mut cgroups = HashSet::new();
        let mut proxied = Vec::new();
        let mut cut_agents = Vec::new();
        for (name, killed) in &changed {
            let Some(agent) = self.registry.get(name) else {
                continue;
            };
            // Kernel first: from here on new connects fail and egress is dropped.
            self.set_agent_flag(&agent, *killed);
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
        let streams_destroyed = match sockdiag::destroy_tcp_urgently(&proxied) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("destroying the proxied streams of killed agents failed: {e}");
                0
            }
        };
        let destroyed_at = started.elapsed();
        // Then every open proxied stream, mid-flight, with a reset, from our side (streams the
        // kernel could not destroy, and our upstream ends).
        let cut: usize = cut_agents.iter().map(|a| a.conns.kill_all()).sum();
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
        let others_destroyed = destroy_cgroup_sockets(cgroups).await;
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
        self.audit_change(&current, &next, cut, streams_destroyed + others_destroyed);
        *current = next;
    }

    fn set_global_flag(&self, killed: bool) {
        let result = self.kernel.update_config(|c| {
            if killed {
                c.flags |= global_flags::KILLED;
            } else {
                c.flags &= !global_flags::KILLED;
            }
        });
        if let Err(e) = result {
            tracing::error!("cannot set the global kill flag in the kernel: {e}");
        }
    }

    fn set_agent_flag(&self, agent: &Agent, killed: bool) {
        agent.set_killed(killed);
        let result = self.kernel.agent_flags(agent.id).and_then(|flags| {
            let flags = if killed {
                flags | agent_flags::KILLED
            } else {
                flags & !agent_flags::KILLED
            };
            self.kernel.set_agent_flags(agent.id, flags)
        });
        if let Err(e) = result {
            tracing::error!(agent = %agent.name, "cannot set the kill flag in the kernel: {e}");
        }
    }

    fn audit_change(&self, before: &KillState, after: &KillState, cut: usize, destroyed: usize) {
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
                        self.files.global.display()
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
                        self.files.agent(&name).display()
                    )),
            );
        }
    }
}

impl KillFlags for KillSwitch {
    fn engaged_for(&self, agent: &str) -> bool {
        // While a change is being applied, the files say what it will be.
        match self.state.try_lock() {
            Ok(state) => state.kills(agent),
            Err(_) => self.files.read(&[agent.to_owned()]).kills(agent),
        }
    }
}

/// Destroys every TCP socket of these cgroups, found by a sock_diag dump (on a blocking
/// thread: the dump takes about 1 ms, more on a host with many sockets).
async fn destroy_cgroup_sockets(cgroups: HashSet<u64>) -> usize {
    if cgroups.is_empty() {
        return 0;
    }
    match tokio::task::spawn_blocking(move || sockdiag::destroy_tcp_in(&cgroups)).await {
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
}
