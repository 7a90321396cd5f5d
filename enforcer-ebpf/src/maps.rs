//! Every map the programs use. All but the log ring and the splice maps are pinned by name under the daemon's
//! bpffs directory, so enforcement state outlives the daemon process and a restarted daemon
//! picks up the same maps. Layouts live in `enforcer-common`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash},
};
use enforcer_common::{
    AgentCounters, AgentState, AllowKey, AllowValue, DnsClient, GlobalConfig, MAX_AGENTS, OrigDst,
    SockKey, SpliceEnd,
};

/// Element 0: ports, global flags (kill, ready) and the daemon's netns cookie. Host order
/// ports; see `GlobalConfig`.
#[map]
pub static CONFIG: Array<GlobalConfig> = Array::pinned(1, 0);

/// Cgroup id (`u64`, as `bpf_get_current_ancestor_cgroup_id` returns it) → agent id (`u32`).
/// A cgroup and all its descendants belong to the agent; the deepest enrolled ancestor wins.
#[map]
pub static CGROUP_AGENT: HashMap<u64, u32> = HashMap::pinned(4096, 0);

/// Agent id → flags (active, killed, redirect-all). Index 0 is never a valid agent.
#[map]
pub static AGENTS: Array<AgentState> = Array::pinned(MAX_AGENTS, 0);

/// Per-agent allowlist: (agent, port or 0, address prefix) → expiry and flags. Addresses are
/// IPv4-mapped IPv6 in network order; ports in host order. A miss means deny.
#[map]
pub static ALLOW: LpmTrie<AllowKey, AllowValue> = LpmTrie::pinned(65536, 0);

/// Socket cookie → original destination of a redirected (or direct-to-proxy) socket.
/// Written at connect, read by getpeername, removed at socket release; LRU bounds it.
#[map]
pub static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65536, 0);

/// Client (address, port, proto) → original destination. Written by sock_ops once the local
/// port is bound; the proxy looks up its accepted peer here and deletes what it consumed.
#[map]
pub static ORIG_BY_TUPLE: LruHashMap<SockKey, OrigDst> = LruHashMap::pinned(65536, 0);

/// Client (address, port, proto) of a UDP DNS query, as the resolver sees its peer → agent,
/// process and the server the client addressed. Written by the egress hook.
#[map]
pub static DNS_CLIENTS: LruHashMap<SockKey, DnsClient> = LruHashMap::pinned(16384, 0);

/// Agent id → counters, one copy per CPU; user space sums them.
#[map]
pub static COUNTERS: PerCpuArray<AgentCounters> = PerCpuArray::pinned(MAX_AGENTS, 0);

/// `DenyEvent` records for the daemon (kernel refusals, for the audit log and metrics).
#[map]
pub static EVENTS: RingBuf = RingBuf::pinned(256 * 1024, 0);

/// Socket cookie → socket, for both ends of every connection the kernel splices. The verdict
/// program is attached here. Not pinned: the sockets are the daemon's and close with it.
#[map]
pub static SPLICE_SOCKS: SockHash<u64> = SockHash::with_max_entries(65536, 0);

/// Socket cookie → where its bytes go and how many went (`SpliceEnd`). Not pinned.
#[map]
pub static SPLICE_ENDS: HashMap<u64, SpliceEnd> = HashMap::with_max_entries(65536, 0);
