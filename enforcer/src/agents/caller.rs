//! Who is calling: an agent's process as the kernel recorded it at `connect()` (or at the
//! send of a DNS query). Built once per connection, query or refusal from the kernel record,
//! it flows one way (proxy → HTTP service → completion; resolver) and every audit record
//! about the caller is made from it.

use std::sync::Arc;

use super::{Agent, Registry};
use crate::audit::{AuditEvent, EventKind};

/// An agent's process, as the kernel saw it.
#[derive(Clone)]
pub struct Caller {
    pub agent: Arc<Agent>,
    pub pid: u32,
    /// The task's `comm` at the time of the record.
    pub comm: Arc<str>,
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
        })
    }

    /// A record about this caller: agent, pid and comm filled in.
    pub fn event(&self, kind: EventKind) -> AuditEvent {
        AuditEvent::new(kind)
            .agent_id(self.agent.name.clone())
            .pid(self.pid)
            .comm(self.comm.to_string())
    }
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("agent", &self.agent.name)
            .field("pid", &self.pid)
            .field("comm", &self.comm)
            .finish()
    }
}
