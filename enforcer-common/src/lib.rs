//! Types shared by the enforcer eBPF programs (`enforcer-ebpf`) and user space (`enforcer`).
//!
//! Everything that crosses the kernel/user boundary is declared here once: map and program
//! names, map key and value layouts, flag bits and event records. Every struct is `#[repr(C)]`
//! with explicit padding fields so both sides agree on every byte; user space gets
//! `aya::Pod` implementations behind the `user` feature.
//!
//! # Byte order
//! - Addresses are [`Addr`]: 16 bytes in network order, as in `struct in6_addr`. IPv4 is stored
//!   in its IPv4-mapped IPv6 form (`::ffff:a.b.c.d`), so one key type serves both families and
//!   a mapped IPv6 destination gets exactly the verdict of its IPv4 form.
//! - Ports are in host byte order unless a field's doc says otherwise.
#![no_std]

/// Version of the pinned map layout. Bump it whenever a key or value type below changes;
/// the daemon refuses (or migrates) pinned maps written with another version.
pub const LAYOUT_VERSION: u32 = 3;

/// Highest number of agents the kernel tables hold. Agent id 0 means "no agent".
pub const MAX_AGENTS: u32 = 1024;
/// Deepest cgroup level searched for an enrolled ancestor.
pub const MAX_CGROUP_DEPTH: u32 = 32;

/// Map names, as the eBPF object and the bpffs pins call them.
pub mod maps {
    /// `Array<GlobalConfig>` with one element.
    pub const CONFIG: &str = "CONFIG";
    /// `HashMap<u64 cgroup id, u32 agent id>`.
    pub const CGROUP_AGENT: &str = "CGROUP_AGENT";
    /// `Array<AgentState>` indexed by agent id.
    pub const AGENTS: &str = "AGENTS";
    /// `LpmTrie<AllowKey, AllowValue>`: per-agent kernel allowlist.
    pub const ALLOW: &str = "ALLOW";
    /// `LruHashMap<u64 socket cookie, OrigDst>`: original destination of a redirected socket.
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    /// `LruHashMap<SockKey, OrigDst>`: the same record, keyed by the client's local address.
    pub const ORIG_BY_TUPLE: &str = "ORIG_BY_TUPLE";
    /// `LruHashMap<SockKey, DnsClient>`: which agent sent a UDP DNS query from which address.
    pub const DNS_CLIENTS: &str = "DNS_CLIENTS";
    /// `PerCpuArray<AgentCounters>` indexed by agent id.
    pub const COUNTERS: &str = "COUNTERS";
    /// `RingBuf` of [`crate::DenyEvent`] records.
    pub const EVENTS: &str = "EVENTS";
    /// `SockHash<u64 socket cookie>`: both ends of every connection spliced in the kernel.
    /// Not pinned: the sockets belong to the daemon process and die with it.
    pub const SPLICE_SOCKS: &str = "SPLICE_SOCKS";
    /// `HashMap<u64 socket cookie, SpliceEnd>`: where each spliced end's bytes go, and how
    /// many went. Not pinned, like `SPLICE_SOCKS`.
    pub const SPLICE_ENDS: &str = "SPLICE_ENDS";
}

/// Program names (the eBPF function names), as user space finds them in the object.
///
/// They must not equal the section names the aya macros emit (`sockops` collides), hence
/// the descriptive names.
pub mod programs {
    pub const CONNECT4: &str = "redirect_connect4";
    pub const CONNECT6: &str = "redirect_connect6";
    pub const SENDMSG4: &str = "check_sendmsg4";
    pub const SENDMSG6: &str = "check_sendmsg6";
    pub const RECVMSG4: &str = "restore_recvmsg4";
    pub const RECVMSG6: &str = "restore_recvmsg6";
    pub const GETPEERNAME4: &str = "restore_getpeername4";
    pub const GETPEERNAME6: &str = "restore_getpeername6";
    pub const SOCK_OPS: &str = "track_connect";
    pub const SOCK_RELEASE: &str = "forget_released";
    pub const SKB_EGRESS: &str = "filter_egress";
    pub const BIND4: &str = "refuse_bind4";
    pub const BIND6: &str = "refuse_bind6";
    /// The `sk_skb/stream_verdict` program on [`super::maps::SPLICE_SOCKS`]. Attached to the
    /// map, not to cgroups, so it is not in [`ALL`].
    pub const SPLICE_VERDICT: &str = "splice_verdict";

    /// Every program, in attach order. Attach order matters little (each hook is independent),
    /// but sock_ops and sock_release go first so no redirected socket misses its record, and
    /// the connect hooks come last.
    pub const ALL: [&str; 13] = [
        SOCK_OPS,
        SOCK_RELEASE,
        BIND4,
        BIND6,
        GETPEERNAME4,
        GETPEERNAME6,
        RECVMSG4,
        RECVMSG6,
        SENDMSG4,
        SENDMSG6,
        SKB_EGRESS,
        CONNECT4,
        CONNECT6,
    ];
}

/// A 16-byte address in network byte order. IPv4 is stored as `::ffff:a.b.c.d`.
///
/// Kept as four `u32` words (each holding four bytes in memory order) because that is how
/// `bpf_sock_addr.user_ip6` presents it; the words are *not* host-order integers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Addr {
    pub words: [u32; 4],
}

impl Addr {
    /// The third word of an IPv4-mapped address: bytes `00 00 ff ff`.
    pub const MAPPED_MARKER: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

    /// From the raw IPv4 word of `bpf_sock_addr.user_ip4` (network order in memory).
    pub const fn from_ipv4_word(word: u32) -> Self {
        Self {
            words: [0, 0, Self::MAPPED_MARKER, word],
        }
    }

    pub const fn from_octets(octets: [u8; 16]) -> Self {
        Self {
            words: [
                u32::from_ne_bytes([octets[0], octets[1], octets[2], octets[3]]),
                u32::from_ne_bytes([octets[4], octets[5], octets[6], octets[7]]),
                u32::from_ne_bytes([octets[8], octets[9], octets[10], octets[11]]),
                u32::from_ne_bytes([octets[12], octets[13], octets[14], octets[15]]),
            ],
        }
    }

    pub const fn octets(&self) -> [u8; 16] {
        let a = self.words[0].to_ne_bytes();
        let b = self.words[1].to_ne_bytes();
        let c = self.words[2].to_ne_bytes();
        let d = self.words[3].to_ne_bytes();
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]
    }

    /// True for `::ffff:a.b.c.d`.
    pub const fn is_ipv4_mapped(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == Self::MAPPED_MARKER
    }

    /// The IPv4 word (network order in memory) of a mapped address.
    pub const fn ipv4_word(&self) -> u32 {
        self.words[3]
    }

    /// Loopback or unspecified: 127.0.0.0/8, 0.0.0.0, ::1 and ::.
    ///
    /// A connect to `0.0.0.0` or `::` reaches the local host, so it counts as loopback.
    /// Exactly where the daemon listens: `127.0.0.1` (IPv4 or IPv4-mapped) or `::1`. Only
    /// these, with the proxy and DNS ports, are "the daemon"; other loopback addresses with the
    /// same port numbers are other services.
    pub const fn is_daemon_listener(&self) -> bool {
        if self.is_ipv4_mapped() {
            return self.words[3] == u32::from_ne_bytes([127, 0, 0, 1]);
        }
        self.words[0] == 0
            && self.words[1] == 0
            && self.words[2] == 0
            && self.words[3] == u32::from_ne_bytes([0, 0, 0, 1])
    }

    pub const fn is_local(&self) -> bool {
        if self.is_ipv4_mapped() {
            let first = self.words[3].to_ne_bytes()[0];
            return first == 127 || self.words[3] == 0;
        }
        let last = self.words[3].to_ne_bytes();
        self.words[0] == 0
            && self.words[1] == 0
            && self.words[2] == 0
            && last[0] == 0
            && last[1] == 0
            && last[2] == 0
            && (last[3] == 1 || last[3] == 0)
    }
}

/// [`maps::CONFIG`] element 0: settings the daemon writes for every program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GlobalConfig {
    /// Set to [`LAYOUT_VERSION`] by the daemon that created the maps.
    pub layout_version: u32,
    /// [`global_flags`] bits.
    pub flags: u32,
    /// Transparent proxy port, host order.
    pub proxy_port: u16,
    /// Local DNS resolver port, host order.
    pub dns_port: u16,
    pub _pad0: u32,
    /// `bpf_get_netns_cookie` of the daemon's network namespace. Sockets in any other
    /// namespace are refused.
    pub netns_cookie: u64,
    /// Where the connect hooks find the caller's executable in kernel memory.
    pub task_offsets: TaskOffsets,
}

/// Byte offsets of the kernel fields on the path `task_struct->mm->exe_file->f_inode->
/// {i_ino, i_sb->s_dev}`, which the connect hooks follow to name the executable of the task
/// that called `connect()` ([`ExeId`]).
///
/// aya's Rust eBPF has no CO-RE field relocations, so user space computes these from the
/// running kernel's BTF (`/sys/kernel/btf/vmlinux`) and writes them here. `known` is 1 only
/// when every offset was found; otherwise (all zero) the hooks read nothing and record an
/// unknown executable.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskOffsets {
    /// `task_struct.mm` (`struct mm_struct *`).
    pub task_mm: u32,
    /// `mm_struct.exe_file` (`struct file *`).
    pub mm_exe_file: u32,
    /// `file.f_inode` (`struct inode *`).
    pub file_inode: u32,
    /// `inode.i_ino` (8 bytes).
    pub inode_ino: u32,
    /// `inode.i_sb` (`struct super_block *`).
    pub inode_sb: u32,
    /// `super_block.s_dev` (4-byte kernel `dev_t`).
    pub sb_dev: u32,
    /// 1 when every offset above is known; 0 means "unknown, do not read".
    pub known: u32,
    pub _pad0: u32,
}

/// The identity of an executable file as the kernel holds it: its inode number and the
/// `s_dev` of its filesystem, in the kernel's internal `dev_t` encoding
/// (`major << 20 | minor`, not the `st_dev` encoding of `stat(2)`). All zero means unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExeId {
    pub ino: u64,
    pub dev: u32,
    pub _pad: u32,
}

impl ExeId {
    /// Bits of the kernel `dev_t` that hold the minor number.
    pub const MINOR_BITS: u32 = 20;

    pub const fn is_unknown(&self) -> bool {
        self.ino == 0 && self.dev == 0
    }

    pub const fn major(&self) -> u32 {
        self.dev >> Self::MINOR_BITS
    }

    pub const fn minor(&self) -> u32 {
        self.dev & ((1 << Self::MINOR_BITS) - 1)
    }
}

/// Bits of [`GlobalConfig::flags`].
pub mod global_flags {
    /// The global kill switch is engaged: every enrolled cgroup is cut off.
    pub const KILLED: u32 = 1 << 0;
    /// Programs are configured (set once the daemon has written the config). Until then
    /// everything is refused.
    pub const READY: u32 = 1 << 1;
    /// The local resolver listens: enrolled DNS (port 53, UDP and TCP, any address) is
    /// redirected to it. Without the flag, port-53 traffic is refused.
    pub const DNS_REDIRECT: u32 = 1 << 2;
}

/// [`maps::AGENTS`] element: per-agent state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AgentState {
    /// [`agent_flags`] bits. An element with `ACTIVE` clear is an unknown agent: deny.
    pub flags: u32,
    pub _pad0: u32,
}

/// Bits of [`AgentState::flags`].
pub mod agent_flags {
    /// The slot holds a configured agent.
    pub const ACTIVE: u32 = 1 << 0;
    /// This agent's kill switch is engaged.
    pub const KILLED: u32 = 1 << 1;
    /// Every TCP destination outside loopback is redirected to the proxy, which decides
    /// (wildcard hosts, `url: "*"`, dry-run).
    pub const REDIRECT_ALL_TCP: u32 = 1 << 2;
}

/// [`maps::ALLOW`] key. The LPM prefix covers `agent`, `port` and `_pad0` in full (64 bits)
/// plus the first bits of `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowKey {
    pub agent: u32,
    /// Destination port in host order; 0 means any port.
    pub port: u16,
    pub _pad0: u16,
    pub addr: Addr,
}

impl AllowKey {
    /// Bits of the key that come before `addr`.
    pub const FIXED_PREFIX_BITS: u32 = 64;
}

/// [`maps::ALLOW`] value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowValue {
    /// `bpf_ktime_get_boot_ns` after which the entry no longer allows; 0 means never expires.
    pub expires_boot_ns: u64,
    /// [`allow_flags`] bits.
    pub flags: u32,
    pub _pad0: u32,
}

/// Bits of [`AllowValue::flags`].
pub mod allow_flags {
    /// Named explicitly in the policy (an IP literal or an exact host); loopback destinations
    /// need this flag to be reachable.
    pub const EXPLICIT: u32 = 1 << 0;
    /// Learned from a DNS answer.
    pub const LEARNED: u32 = 1 << 1;
}

/// [`maps::ORIG_BY_TUPLE`] key: the client end of a redirected connection, as the proxy sees
/// its peer. Also the key of [`maps::DNS_CLIENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub addr: Addr,
    /// Host order.
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u16,
}

/// The original destination of a redirected connection and who asked for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OrigDst {
    pub addr: Addr,
    /// Host order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`: the family the client used (a mapped address on an AF_INET6
    /// socket reports `AF_INET6`).
    pub family: u16,
    pub agent: u32,
    /// Thread-group id (the process id user space sees).
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// [`orig_flags`] bits.
    pub flags: u32,
    pub comm: [u8; 16],
    /// `bpf_ktime_get_boot_ns` at connect.
    pub created_boot_ns: u64,
    pub cookie: u64,
    /// The executable of the task that called `connect()`, read in the kernel at that
    /// moment (zero when unknown: no offsets, a kernel thread, a failed read).
    pub exe: ExeId,
}

/// Bits of [`OrigDst::flags`].
pub mod orig_flags {
    /// The socket connected straight to the proxy or resolver port, without a redirect. The
    /// proxy closes such connections: their "original destination" is not trustworthy.
    pub const DIRECT: u32 = 1 << 0;
    /// The destination is in the kernel allowlist (not only redirected by REDIRECT_ALL_TCP).
    pub const LISTED: u32 = 1 << 1;
    /// A DNS query (port 53, or straight to the resolver port) redirected to the resolver;
    /// `addr`/`port` are the server the client addressed.
    pub const DNS: u32 = 1 << 2;
}

/// [`maps::DNS_CLIENTS`] value: which agent's socket sent a DNS query, and to which server.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DnsClient {
    pub agent: u32,
    pub pid: u32,
    /// The server the client addressed, restored as the reply's source.
    pub server: Addr,
    /// Host order.
    pub server_port: u16,
    pub family: u16,
    pub _pad0: u32,
    pub comm: [u8; 16],
}

/// [`maps::COUNTERS`] element: per-agent counters, summed over CPUs by user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AgentCounters {
    /// TCP connects redirected to the proxy.
    pub redirected: u64,
    /// Connects (and UDP sends) refused with EPERM.
    pub refused: u64,
    /// Egress packets dropped by `cgroup_skb`.
    pub dropped_packets: u64,
    /// DNS queries redirected to the local resolver.
    pub dns_redirected: u64,
    /// Refusals whose [`DenyEvent`] found the event ring full: counted in `refused`, never
    /// reported one by one. The daemon writes their number to the audit log, so the log's
    /// `kernel_deny` counts add up to `refused`.
    pub events_lost: u64,
}

/// Why a [`DenyEvent`] was raised.
pub mod deny_reason {
    /// Destination not in the agent's allowlist.
    pub const NOT_ALLOWED: u32 = 1;
    /// The agent or global kill switch is engaged.
    pub const KILLED: u32 = 2;
    /// A loopback destination the policy does not name.
    pub const LOOPBACK: u32 = 3;
    /// UDP other than DNS.
    pub const UDP: u32 = 4;
    /// The socket is bound to a device (`SO_BINDTODEVICE`) and cannot be redirected.
    pub const BOUND_TO_DEVICE: u32 = 5;
    /// The socket lives in another network namespace.
    pub const OTHER_NETNS: u32 = 6;
    /// The calling task belongs to no enrolled agent (a socket handed across cgroups).
    pub const NO_AGENT: u32 = 7;
    /// The daemon has not configured the programs yet.
    pub const NOT_READY: u32 = 8;
    /// DNS over TLS (port 853).
    pub const DNS_OVER_TLS: u32 = 9;
    /// `bind()` to the proxy or DNS port number, on any address: an enrolled process could
    /// otherwise receive what other agents send there, or squat the port while the daemon
    /// restarts.
    pub const BIND: u32 = 10;
}

/// [`maps::SPLICE_ENDS`] value: one end of a connection the kernel splices. The daemon writes
/// both ends' records before it puts either socket in [`maps::SPLICE_SOCKS`]; the verdict
/// program adds to `bytes` and never writes anything else.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SpliceEnd {
    /// Cookie of the socket that this end's bytes are sent out of.
    pub peer: u64,
    /// Bytes received on this end and sent out of `peer`.
    pub bytes: u64,
    /// Bytes received on this end that could not be sent on (the peer was not in the
    /// sockhash, or the kill switch was engaged) and were dropped. Non-zero means the stream is
    /// broken, and the daemon resets it.
    pub dropped: u64,
    /// The agent the connection belongs to, whose kill switch stops it.
    pub agent: u32,
    pub _pad0: u32,
}

/// Record pushed on [`maps::EVENTS`] for each refused connect or send.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DenyEvent {
    pub addr: Addr,
    /// Host order.
    pub port: u16,
    /// `IPPROTO_TCP`, `IPPROTO_UDP`, ...
    pub proto: u16,
    pub agent: u32,
    pub pid: u32,
    pub uid: u32,
    /// [`deny_reason`] value.
    pub reason: u32,
    pub _pad0: u32,
    pub comm: [u8; 16],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;

    /// Marks shared types as plain old data for aya's map APIs.
    macro_rules! pod {
        ($($t:ty),* $(,)?) => {$(
            // SAFETY: the type is `repr(C)`, `Copy`, made only of integers and arrays of
            // integers, with explicit padding fields, so any bit pattern is valid and there are
            // no holes (`layouts_have_no_implicit_padding` checks the sizes).
            unsafe impl aya::Pod for $t {}
        )*};
    }

    pod!(
        Addr,
        GlobalConfig,
        TaskOffsets,
        ExeId,
        AgentState,
        AllowKey,
        AllowValue,
        SockKey,
        OrigDst,
        DnsClient,
        AgentCounters,
        DenyEvent,
        SpliceEnd,
    );
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Addr>(), 16);
        assert_eq!(size_of::<TaskOffsets>(), 4 * 8);
        assert_eq!(size_of::<ExeId>(), 16);
        // version, flags, ports, pad, netns cookie, task offsets.
        assert_eq!(size_of::<GlobalConfig>(), 4 + 4 + 2 + 2 + 4 + 8 + 32);
        assert_eq!(size_of::<AgentState>(), 8);
        assert_eq!(size_of::<AllowKey>(), 24);
        assert_eq!(size_of::<AllowValue>(), 16);
        assert_eq!(size_of::<SockKey>(), 20);
        assert_eq!(size_of::<SpliceEnd>(), 8 * 3 + 4 + 4);
        // addr, port + family, agent/pid/uid/gid/flags, comm, two u64s, exe.
        assert_eq!(size_of::<OrigDst>(), 16 + 2 + 2 + 4 * 5 + 16 + 8 + 8 + 16);
        assert_eq!(size_of::<DnsClient>(), 8 + 16 + 8 + 16);
        assert_eq!(size_of::<AgentCounters>(), 40);
        // addr, port + proto, agent/pid/uid/reason/pad, comm.
        assert_eq!(size_of::<DenyEvent>(), 16 + 2 + 2 + 4 * 5 + 16);
    }

    #[test]
    fn mapped_ipv4_round_trips_and_is_recognised() {
        let v4 = std::net::Ipv4Addr::new(127, 0, 0, 6);
        let mapped = v4.to_ipv6_mapped();
        let from_word = Addr::from_ipv4_word(u32::from_ne_bytes(v4.octets()));
        assert_eq!(from_word, Addr::from_octets(mapped.octets()));
        assert!(from_word.is_ipv4_mapped());
        assert_eq!(from_word.octets(), mapped.octets());
        assert!(from_word.is_local());
    }

    #[test]
    fn local_addresses() {
        let local = |s: &str| {
            let ip: std::net::IpAddr = s.parse().unwrap();
            let v6 = match ip {
                std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                std::net::IpAddr::V6(v6) => v6,
            };
            Addr::from_octets(v6.octets()).is_local()
        };
        assert!(local("127.0.0.1"));
        assert!(local("127.200.3.4"));
        assert!(local("0.0.0.0"));
        assert!(local("::1"));
        assert!(local("::"));
        assert!(local("::ffff:127.0.0.6"));
        assert!(!local("10.0.0.1"));
        assert!(!local("::2"));
        assert!(!local("2001:db8::1"));
        assert!(!local("128.0.0.1"));
    }
}
