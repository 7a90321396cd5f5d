//! Who is calling: an agent's process as the kernel recorded it at `connect()` (or at the
//! send of a DNS query). Built once per connection, query or refusal from the kernel record,
//! it flows one way (proxy → HTTP service → completion; resolver) and every audit record
//! about the caller is made from it.

use std::sync::Arc;

use enforcer_common::{ExeId, OrigDst};

use super::{Agent, Registry, exe::Exe};
use crate::audit::{AuditEvent, EventKind};

/// An agent's process, as the kernel saw it.
#[derive(Clone)]
pub struct Caller {
    pub agent: Arc<Agent>,
    pub pid: u32,
    /// The task's `comm` at the time of the record.
    pub comm: Arc<str>,
    /// The executable the task ran at `connect()`, read by the kernel then; `None` when the
    /// kernel could not name it (no BTF offsets, a failed read) or the record has none (DNS
    /// over UDP). Anything that depends on it must treat `None` as "not that executable".
    pub exe: Option<Exe>,
}

impl Caller {
    /// The caller of a kernel record: `None` when the record names no agent known here (a
    /// removed agent's slot, or a record from before a restart that no agent kept).
    pub fn from_record(
        registry: &Registry,
        agent_id: u32,
        pid: u32,
        comm: &[u8; 16],
    ) -> Option<Caller> {
        Some(Caller {
            agent: registry.by_id(agent_id)?,
            pid,
            comm: Arc::from(crate::bpf::comm_str(comm)),
            exe: None,
        })
    }

    /// The caller of a connection's kernel record, with the executable the kernel named at
    /// `connect()` (and its display path, from `/proc/PID/exe` if that is still the same
    /// file). `None` as for [`Caller::from_record`].
    pub fn from_orig(registry: &Registry, orig: &OrigDst) -> Option<Caller> {
        let caller = Self::from_record(registry, orig.agent, orig.pid, &orig.comm)?;
        Some(caller.with_exe(orig.exe))
    }

    /// This caller with the executable the kernel recorded (`None` if unknown).
    #[must_use]
    pub fn with_exe(mut self, exe: ExeId) -> Caller {
        self.exe = Exe::of_record(exe, self.pid);
        self
    }

    /// The executable for logs: its path, `dev:ino`, or `-` when unknown.
    pub fn exe_display(&self) -> String {
        self.exe
            .as_ref()
            .map_or_else(|| "-".to_owned(), Exe::display)
    }

    /// A record about this caller: agent, pid, comm and (when known) exe filled in.
    pub fn event(&self, kind: EventKind) -> AuditEvent {
        let event = AuditEvent::new(kind)
            .agent_id(self.agent.name.clone())
            .pid(self.pid)
            .comm(self.comm.to_string());
        match &self.exe {
            Some(exe) => event.exe(exe.display()),
            None => event,
        }
    }
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("agent", &self.agent.name)
            .field("pid", &self.pid)
            .field("comm", &self.comm)
            .field("exe", &self.exe)
            .finish()
    }
}
