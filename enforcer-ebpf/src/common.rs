//! Helpers shared by the hooks: configuration, agent identity, the allowlist, counters and
//! deny events.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_probe_read_kernel,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_task, bpf_ktime_get_boot_ns,
        },
    },
    maps::lpm_trie::Key,
};
use enforcer_common::{
    Addr, AgentCounters, AgentState, AllowKey, AllowValue, DenyEvent, ExeId, GlobalConfig,
    MAX_CGROUP_DEPTH, TaskOffsets, agent_flags, global_flags,
};

use crate::maps::{AGENTS, ALLOW, CGROUP_AGENT, CONFIG, COUNTERS, EVENTS};

/// `sock_addr` verdicts: 1 lets the call proceed, 0 fails it with EPERM.
pub const ALLOW_CALL: i32 = 1;
pub const DENY_CALL: i32 = 0;

pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;
pub const SOCK_STREAM: u32 = 1;
pub const SOCK_DGRAM: u32 = 2;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// The global configuration, or `None` before the daemon wrote it.
#[inline(always)]
pub fn config() -> Option<&'static GlobalConfig> {
    let cfg = CONFIG.get(0)?;
    (cfg.flags & global_flags::READY != 0).then_some(cfg)
}

/// The agent owning the deepest enrolled cgroup among the ancestors `ancestor(level)` gives
/// (level 0 is the root; 0 past the last level).
#[inline(always)]
pub fn deepest_agent(ancestor: impl Fn(i32) -> u64) -> Option<u32> {
    let mut found = None;
    let mut level = 0u32;
    while level < MAX_CGROUP_DEPTH {
        let id = ancestor(level as i32);
        if id == 0 {
            break;
        }
        // SAFETY: the value is a plain u32 copied out immediately.
        if let Some(agent) = unsafe { CGROUP_AGENT.get(id) } {
            found = Some(*agent);
        }
        level += 1;
    }
    found
}

/// The agent of the calling task: the deepest ancestor cgroup (the task's own cgroup
/// included) that is enrolled.
///
/// Used only in syscall context (connect, sendmsg), where the current task is the caller.
/// Softirq paths (skb) use the socket's cgroup instead; see `skb.rs`.
#[inline(always)]
pub fn current_agent() -> Option<u32> {
    // SAFETY: plain helper call; returns 0 past the task's depth.
    deepest_agent(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) })
}

/// The state of an active agent, `None` for unknown or inactive ids.
#[inline(always)]
pub fn agent_state(agent: u32) -> Option<&'static AgentState> {
    let state = AGENTS.get(agent)?;
    (state.flags & agent_flags::ACTIVE != 0).then_some(state)
}

/// Global or per-agent kill switch engaged.
#[inline(always)]
pub fn killed(cfg: &GlobalConfig, state: &AgentState) -> bool {
    cfg.flags & global_flags::KILLED != 0 || state.flags & agent_flags::KILLED != 0
}

/// Looks up (agent, addr, port) in the allowlist: first the entry for this exact port, then
/// the any-port entry. Expired entries do not count.
#[inline(always)]
pub fn allowlisted(agent: u32, addr: &Addr, port: u16) -> Option<&'static AllowValue> {
    let exact = lookup_allow(agent, addr, port);
    if exact.is_some() {
        return exact;
    }
    lookup_allow(agent, addr, 0)
}

#[inline(always)]
fn lookup_allow(agent: u32, addr: &Addr, port: u16) -> Option<&'static AllowValue> {
    let key = Key::new(
        AllowKey::FIXED_PREFIX_BITS + 128,
        AllowKey {
            agent,
            port,
            _pad0: 0,
            addr: *addr,
        },
    );
    let value = ALLOW.get(&key)?;
    if value.expires_boot_ns != 0 {
        // SAFETY: plain helper call.
        let now = unsafe { bpf_ktime_get_boot_ns() };
        if now >= value.expires_boot_ns {
            return None;
        }
    }
    Some(value)
}

/// Which counter to bump.
#[derive(Clone, Copy)]
pub enum Counter {
    Redirected,
    Refused,
    DroppedPacket,
    DnsRedirected,
    EventLost,
}

#[inline(always)]
pub fn count(agent: u32, counter: Counter) {
    let Some(ptr) = COUNTERS.get_ptr_mut(agent) else {
        return;
    };
    // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
    let counters: &mut AgentCounters = unsafe { &mut *ptr };
    match counter {
        Counter::Redirected => counters.redirected += 1,
        Counter::Refused => counters.refused += 1,
        Counter::DroppedPacket => counters.dropped_packets += 1,
        Counter::DnsRedirected => counters.dns_redirected += 1,
        Counter::EventLost => counters.events_lost += 1,
    }
}

/// Counts a refusal and pushes a `DenyEvent` for the daemon. A full ring drops the event and
/// counts it as lost, so the daemon can account for it; the refusal itself never depends on
/// the ring.
#[inline(always)]
pub fn report_deny(agent: u32, addr: &Addr, port: u16, proto: u16, reason: u32) {
    count(agent, Counter::Refused);
    let Some(mut entry) = EVENTS.reserve::<DenyEvent>(0) else {
        count(agent, Counter::EventLost);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    entry.write(DenyEvent {
        addr: *addr,
        port,
        proto,
        agent,
        pid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        reason,
        _pad0: 0,
        comm: bpf_get_current_comm().unwrap_or_default(),
    });
    entry.submit(0);
}

/// The caller's pid (tgid), uid, gid and comm.
#[inline(always)]
pub fn caller() -> (u32, u32, u32, [u8; 16]) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    (
        (pid_tgid >> 32) as u32,
        uid_gid as u32,
        (uid_gid >> 32) as u32,
        bpf_get_current_comm().unwrap_or_default(),
    )
}

/// The executable of the calling task: `current->mm->exe_file->f_inode`'s inode number and
/// its superblock's `s_dev`, read at the moment of the call, so neither a later `exec` nor a
/// reused pid can change the answer.
///
/// aya's Rust eBPF has no CO-RE field relocations, so the offsets come from user space, which
/// computes them from the running kernel's BTF (`GlobalConfig::task_offsets`). Every pointer
/// is read with `bpf_probe_read_kernel`, which fails cleanly on a bad address; any failed
/// read, a null pointer (a kernel thread has no `mm`, an `mm` may have no `exe_file`), or
/// unknown offsets give [`ExeId::default`] (unknown).
///
/// Used only in syscall context (connect, sendmsg), where the current task is the caller.
#[inline(always)]
pub fn caller_exe(offsets: &TaskOffsets) -> ExeId {
    if offsets.known == 0 {
        return ExeId::default();
    }
    read_exe(offsets).unwrap_or_default()
}

#[inline(always)]
fn read_exe(o: &TaskOffsets) -> Option<ExeId> {
    // SAFETY: plain helper call; the result is only ever used as an address for
    // bpf_probe_read_kernel, never dereferenced directly.
    let task = unsafe { bpf_get_current_task() };
    let mm = read_kernel_ptr(task, o.task_mm)?;
    let file = read_kernel_ptr(mm, o.mm_exe_file)?;
    let inode = read_kernel_ptr(file, o.file_inode)?;
    let sb = read_kernel_ptr(inode, o.inode_sb)?;
    // SAFETY: bpf_probe_read_kernel copies from any kernel address and fails on a bad one.
    let ino =
        unsafe { bpf_probe_read_kernel((inode + u64::from(o.inode_ino)) as *const u64) }.ok()?;
    // SAFETY: as above.
    let dev = unsafe { bpf_probe_read_kernel((sb + u64::from(o.sb_dev)) as *const u32) }.ok()?;
    Some(ExeId { ino, dev, _pad: 0 })
}

/// The pointer stored at `base + offset` in kernel memory; `None` for a failed read or null.
#[inline(always)]
fn read_kernel_ptr(base: u64, offset: u32) -> Option<u64> {
    if base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel copies from any kernel address and fails on a bad one.
    let ptr = unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const u64) }.ok()?;
    (ptr != 0).then_some(ptr)
}

/// Boot-clock nanoseconds.
#[inline(always)]
pub fn now_boot_ns() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_boot_ns() }
}
