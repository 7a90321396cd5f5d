//! Loading the kernel programs, attaching them to cgroups, and reading and writing their maps.
//!
//! Maps and links are pinned under the bpffs directory (`bpffs_dir`):
//! - `maps/<NAME>`: every map but the log ring, so state outlives the daemon;
//! - `links/<cgroup id>/<program>`: one link per program per enrolled cgroup.
//!
//! Enforcement therefore continues while the daemon is down: the programs stay attached and
//! keep refusing, and redirected connects find no proxy and fail. A restarted daemon reuses the
//! pinned maps (same agent ids, same allowlists) and never attaches a second copy to a cgroup
//! whose pinned links are alive.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuArray, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSkbAttachType, Program,
        links::{FdLink, Link as _},
    },
};
use enforcer_common::{
    Addr, AgentCounters, AgentState, AllowKey, AllowValue, DnsClient, GlobalConfig, LAYOUT_VERSION,
    MAX_AGENTS, OrigDst, SockKey, allow_flags, global_flags, maps, programs,
};

pub mod btf;
pub mod events;
pub mod layout;
pub mod splice;
pub mod sys;

/// The kernel object built by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const IPPROTO_TCP: u16 = 6;
const IPPROTO_UDP: u16 = 17;

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "this enforcer binary was built without its eBPF programs (AYA_BUILD_SKIP was set); \
         rebuild it with `cargo xtask build`"
    )]
    NoObject,
    #[error(
        "loading the eBPF programs failed: {0}. enforcer needs root (CAP_BPF, CAP_NET_ADMIN, \
         CAP_SYS_ADMIN) and a kernel with BPF, BTF and cgroup-bpf (Linux 5.8 or newer)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the kernel rejected program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("the eBPF object has no program {0}; the binary and enforcer-common disagree")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0}; the binary and enforcer-common disagree")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot prepare bpffs at {path}: {message}")]
    Bpffs { path: PathBuf, message: String },
    #[error("cannot open cgroup {path}: {io}", io = crate::sys::io_text(source))]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot pin {what} at {path}: {message}")]
    Pin {
        what: String,
        path: PathBuf,
        message: String,
    },
    #[error(
        "the pinned maps under {} were written with layout version {found}, this enforcer uses \
         {LAYOUT_VERSION}; refusing to misread them. Stop the old daemon, run `enforcer detach \
         --all --force`, then start this one",
        dir.display()
    )]
    ConfigLayout { dir: PathBuf, found: u32 },
    #[error(
        "agent id {agent} holds {quota} learned addresses, its dns.max_learned_per_agent; new \
         names are refused until some expire (raise the quota if the agent needs more)"
    )]
    Quota { agent: u32, quota: usize },
    #[error("agent id {0} is out of range (at most {max} agents)", max = MAX_AGENTS - 1)]
    AgentId(u32),
    #[error(
        "pinned map {map} under {dir} has {found}, but this enforcer expects {expected} (layout \
         version {version}): it was created by an incompatible enforcer and would be misread. \
         Refusing to start. Stop the old daemon and run `enforcer detach --all --force` to \
         remove the old pins (enrolled cgroups are unenforced until the new daemon starts), \
         then start the new daemon"
    )]
    Layout {
        map: &'static str,
        dir: PathBuf,
        found: String,
        expected: String,
        version: u32,
    },
}

/// One allowlist entry: an address prefix and a port (`None` = any port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllowEntry {
    pub net: ipnet::IpNet,
    pub port: Option<u16>,
    /// `bpf_ktime_get_boot_ns` deadline; 0 = never expires.
    pub expires_boot_ns: u64,
    pub flags: u32,
}

/// What `attach_cgroup` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AttachOutcome {
    /// New links created (nothing was attached, or a pinned link had been detached).
    pub attached: usize,
    /// Live pinned links switched to this daemon's programs with `BPF_LINK_UPDATE`.
    pub updated: usize,
    /// Live pinned links already running this daemon's programs.
    pub reused: usize,
}

/// The state of one program on one cgroup, as the kernel reports it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// The pinned link is attached to this cgroup.
    Attached,
    /// No pinned link.
    Missing,
    /// The link exists but is detached (or attached elsewhere).
    Detached,
}

struct ControlMaps {
    config: Array<MapData, GlobalConfig>,
    agents: Array<MapData, AgentState>,
    cgroup_agent: HashMap<MapData, u64, u32>,
    allow: LpmTrie<MapData, AllowKey, AllowValue>,
}

/// The loaded programs and their maps.
pub struct Kernel {
    dir: PathBuf,
    ebpf: Mutex<Ebpf>,
    control: Mutex<ControlMaps>,
    orig: Mutex<HashMap<MapData, SockKey, OrigDst>>,
    /// The learned (expiring) allowlist entries as user space tracks them.
    learned: Mutex<LearnedIndex>,
    /// Why per-cgroup BPF LSM programs cannot run here, when they cannot.
    lsm: Result<(), String>,
    /// The in-kernel splice, or why the kernel refused it (the proxy then copies).
    splice: Result<splice::SpliceMaps, String>,
    dns_clients: HashMap<MapData, SockKey, DnsClient>,
    counters: PerCpuArray<MapData, AgentCounters>,
    events: Mutex<Option<RingBuf<MapData>>>,
    logger: Mutex<Option<aya_log::EbpfLogger<&'static dyn log::Log>>>,
}

impl Kernel {
    /// Mounts bpffs if needed, loads the object reusing pinned maps, and loads every program
    /// into the kernel (which runs the verifier).
    pub fn open(dir: &Path, object: &[u8]) -> Result<Self, BpfError> {
        if object.is_empty() {
            return Err(BpfError::NoObject);
        }
        prepare_bpffs(dir)?;
        let maps_dir = dir.join("maps");
        mkdir(&maps_dir)?;
        // Pinned maps from an enforcer with another layout would be misread: refuse them.
        layout::check_pinned(&maps_dir)?;
        mkdir(&dir.join("links"))?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(object)
            .map_err(BpfError::Load)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(err) => {
                tracing::debug!("eBPF logging unavailable: {err}");
                None
            }
        };
        for name in programs::ALL {
            load_program(&mut ebpf, name)?;
        }

        let control = ControlMaps {
            config: take_map(&mut ebpf, maps::CONFIG)?,
            agents: take_map(&mut ebpf, maps::AGENTS)?,
            cgroup_agent: take_map(&mut ebpf, maps::CGROUP_AGENT)?,
            allow: take_map(&mut ebpf, maps::ALLOW)?,
        };
        let orig = take_map(&mut ebpf, maps::ORIG_BY_TUPLE)?;
        let dns_clients = take_map(&mut ebpf, maps::DNS_CLIENTS)?;
        let counters = take_map(&mut ebpf, maps::COUNTERS)?;
        let events = take_map(&mut ebpf, maps::EVENTS)?;
        let splice = splice::SpliceMaps::open(&mut ebpf);
        if let Err(why) = &splice {
            tracing::warn!(
                "spliced connections are copied through user space: {why} (needs                  BPF_PROG_TYPE_SK_SKB and sockhash, Linux 5.10 or newer)"
            );
        }
        // The one walk of the allowlist: what an earlier daemon learned, to expire it on time
        // and count it against each agent's quota.
        let learned = LearnedIndex::from_map(&control.allow);
        Ok(Self {
            dir: dir.to_owned(),
            ebpf: Mutex::new(ebpf),
            control: Mutex::new(control),
            orig: Mutex::new(orig),
            learned: Mutex::new(learned),
            lsm: sys::probe_lsm_cgroup(),
            splice,
            dns_clients,
            counters,
            events: Mutex::new(Some(events)),
            logger: Mutex::new(logger),
        })
    }

    /// The protections that need per-cgroup BPF LSM programs, by name, with what is exposed
    /// without them: empty when the kernel runs such programs. On such a kernel `enforcer
    /// exec` still contains its commands with Landlock and seccomp; these name what remains.
    pub fn missing_protections(&self) -> Vec<String> {
        let Err(why) = &self.lsm else {
            return Vec::new();
        };
        [
            "unix sockets: enrolled processes may connect to unix-socket services outside \
             their cgroup (D-Bus, docker.sock, systemd --user, tmux, nscd), which can act for \
             them (needs the unix_stream_connect and unix_may_send hooks)",
            "borrowed sockets in enrolled services: processes not started by `enforcer exec` \
             may take sockets from outside with pidfd_getfd or SCM_RIGHTS, or ptrace an outside \
             process (needs file_receive and ptrace_access_check; `enforcer exec` contains its \
             commands with Landlock)",
            "socket families in enrolled services: processes not started by `enforcer exec` may \
             open AF_VSOCK, AF_PACKET and other sockets no hook sees (needs socket_create; \
             `enforcer exec` refuses them with seccomp; give services \
             RestrictAddressFamilies=)",
        ]
        .into_iter()
        .map(|what| format!("missing protection, {why}: {what}"))
        .collect()
    }

    /// The in-kernel splice, when this kernel runs it.
    pub fn splice(&self) -> Option<&splice::SpliceMaps> {
        self.splice.as_ref().ok()
    }

    fn links_dir(&self, cgroup_id: u64) -> PathBuf {
        self.dir.join("links").join(cgroup_id.to_string())
    }

    /// Attaches every program to `cgroup` (id `cgroup_id`) and pins the links. A live pinned
    /// link is never detached: when it runs another program (an earlier daemon's), it is
    /// switched to this daemon's with `BPF_LINK_UPDATE`, atomically, so the hook is never
    /// without a program. A restart or an upgrade therefore never doubles the programs and
    /// never opens a gap.
    pub fn attach_cgroup(&self, cgroup: &Path, cgroup_id: u64) -> Result<AttachOutcome, BpfError> {
        let dir = self.links_dir(cgroup_id);
        mkdir(&dir)?;
        let cgroup_file = std::fs::File::open(cgroup).map_err(|source| BpfError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let mut outcome = AttachOutcome::default();
        let mut ebpf = lock(&self.ebpf);
        for name in programs::ALL {
            let pin = dir.join(name);
            if let Ok(link) = sys::obj_get(&pin) {
                let info = sys::link_info(link.as_fd()).map_err(|e| BpfError::Pin {
                    what: format!("link {name}"),
                    path: pin.clone(),
                    message: format!("reading link info: {e}"),
                })?;
                if info.cgroup_id == Some(cgroup_id) {
                    let (prog_fd, prog_id) = program_fd(&ebpf, name)?;
                    if info.prog_id == prog_id {
                        outcome.reused += 1;
                    } else {
                        let old = sys::prog_fd_by_id(info.prog_id).ok();
                        sys::link_update(link.as_fd(), prog_fd, old.as_ref().map(|f| f.as_fd()))
                            .map_err(|e| BpfError::Pin {
                                what: format!("link {name}"),
                                path: pin.clone(),
                                message: format!("BPF_LINK_UPDATE failed: {e}"),
                            })?;
                        outcome.updated += 1;
                    }
                    continue;
                }
                tracing::warn!(cgroup = %cgroup.display(), program = name, "pinned link was detached; attaching again");
            }
            // No live link (never attached, or detached behind our back): attach and pin.
            let _ = std::fs::remove_file(&pin);
            let link = attach_program(&mut ebpf, name, cgroup_file.as_fd())?;
            link.pin(&pin).map_err(|e| BpfError::Pin {
                what: format!("link {name}"),
                path: pin.clone(),
                message: e.to_string(),
            })?;
            outcome.attached += 1;
        }
        Ok(outcome)
    }

    /// What the kernel reports now for each program on this cgroup.
    pub fn link_states(&self, cgroup_id: u64) -> Vec<(&'static str, LinkState)> {
        let dir = self.links_dir(cgroup_id);
        programs::ALL
            .into_iter()
            .map(|name| {
                let state = match sys::obj_get(&dir.join(name)) {
                    Err(_) => LinkState::Missing,
                    Ok(fd) => match sys::link_info(fd.as_fd()) {
                        Ok(info) if info.cgroup_id == Some(cgroup_id) => LinkState::Attached,
                        _ => LinkState::Detached,
                    },
                };
                (name, state)
            })
            .collect()
    }

    /// Detaches every program from a cgroup by removing its pinned links.
    pub fn detach_cgroup(&self, cgroup_id: u64) -> Result<(), BpfError> {
        let dir = self.links_dir(cgroup_id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BpfError::Pin {
                what: "links".into(),
                path: dir,
                message: e.to_string(),
            }),
        }
    }

    /// Cgroup ids with pinned links.
    pub fn attached_cgroups(&self) -> Vec<u64> {
        std::fs::read_dir(self.dir.join("links"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Writes the kernel-wide settings at start, keeping READY as it was (set by a previous
    /// run, or clear on a first start, which refuses everything) until the proxy listens.
    /// Refuses pins written with another layout rather than misread them.
    pub fn start_config(
        &self,
        proxy_port: u16,
        dns_port: u16,
        netns_cookie: u64,
        globally_killed: bool,
    ) -> Result<(), BpfError> {
        let previous = self.config().unwrap_or_default();
        if previous.layout_version != 0 && previous.layout_version != LAYOUT_VERSION {
            return Err(BpfError::ConfigLayout {
                dir: self.dir.clone(),
                found: previous.layout_version,
            });
        }
        let mut flags = previous.flags & global_flags::READY;
        if globally_killed {
            flags |= global_flags::KILLED;
        }
        self.set_config(GlobalConfig {
            layout_version: LAYOUT_VERSION,
            flags,
            proxy_port,
            dns_port,
            _pad0: 0,
            netns_cookie,
            // Where the connect hooks find the caller's executable; all zero (unknown, and a
            // warning) when the kernel's BTF lacks a member.
            task_offsets: btf::running_kernel(),
        })
    }

    pub fn config(&self) -> Result<GlobalConfig, BpfError> {
        let control = lock(&self.control);
        control.config.get(&0, 0).map_err(map_error(maps::CONFIG))
    }

    pub fn set_config(&self, cfg: GlobalConfig) -> Result<(), BpfError> {
        let mut control = lock(&self.control);
        control
            .config
            .set(0, cfg, 0)
            .map_err(map_error(maps::CONFIG))
    }

    /// Reads, changes and writes the global config under one lock.
    pub fn update_config(&self, f: impl FnOnce(&mut GlobalConfig)) -> Result<(), BpfError> {
        let mut control = lock(&self.control);
        let mut cfg = control.config.get(&0, 0).map_err(map_error(maps::CONFIG))?;
        f(&mut cfg);
        control
            .config
            .set(0, cfg, 0)
            .map_err(map_error(maps::CONFIG))
    }

    pub fn agent_flags(&self, agent: u32) -> Result<u32, BpfError> {
        check_agent(agent)?;
        let control = lock(&self.control);
        control
            .agents
            .get(&agent, 0)
            .map(|s| s.flags)
            .map_err(map_error(maps::AGENTS))
    }

    pub fn set_agent_flags(&self, agent: u32, flags: u32) -> Result<(), BpfError> {
        check_agent(agent)?;
        let mut control = lock(&self.control);
        control
            .agents
            .set(agent, AgentState { flags, _pad0: 0 }, 0)
            .map_err(map_error(maps::AGENTS))
    }

    pub fn map_cgroup(&self, cgroup_id: u64, agent: u32) -> Result<(), BpfError> {
        check_agent(agent)?;
        let mut control = lock(&self.control);
        control
            .cgroup_agent
            .insert(cgroup_id, agent, 0)
            .map_err(map_error(maps::CGROUP_AGENT))
    }

    pub fn unmap_cgroup(&self, cgroup_id: u64) -> Result<(), BpfError> {
        let mut control = lock(&self.control);
        match control.cgroup_agent.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(map_error(maps::CGROUP_AGENT)(source)),
        }
    }

    /// Cgroup id → agent id, as the kernel holds it.
    pub fn cgroup_agents(&self) -> Vec<(u64, u32)> {
        let control = lock(&self.control);
        control.cgroup_agent.iter().flatten().collect()
    }

    /// Makes the agent's static allowlist (entries not learned from DNS) exactly `entries`:
    /// adds what is new, removes what is gone. Entries are replaced in place, so there is no
    /// moment where a kept entry is missing. Learned entries are left alone.
    pub fn replace_allowlist(&self, agent: u32, entries: &[AllowEntry]) -> Result<(), BpfError> {
        check_agent(agent)?;
        let mut control = lock(&self.control);
        let wanted: Vec<(Key<AllowKey>, AllowValue)> =
            entries.iter().map(|e| allow_key_value(agent, e)).collect();
        let existing: Vec<Key<AllowKey>> = control
            .allow
            .iter()
            .flatten()
            .filter(|(k, v)| k.data().agent == agent && v.flags & allow_flags::LEARNED == 0)
            .map(|(k, _)| k)
            .collect();
        for (key, value) in &wanted {
            control
                .allow
                .insert(key, *value, 0)
                .map_err(map_error(maps::ALLOW))?;
        }
        for key in existing {
            let keep = wanted
                .iter()
                .any(|(k, _)| k.prefix_len() == key.prefix_len() && k.data() == key.data());
            if !keep {
                let _ = control.allow.remove(&key);
            }
        }
        Ok(())
    }

    /// Adds or refreshes entries without touching the others.
    pub fn upsert_allow(&self, agent: u32, entries: &[AllowEntry]) -> Result<(), BpfError> {
        check_agent(agent)?;
        let mut control = lock(&self.control);
        for e in entries {
            let (key, value) = allow_key_value(agent, e);
            control
                .allow
                .insert(&key, value, 0)
                .map_err(map_error(maps::ALLOW))?;
        }
        Ok(())
    }

    /// Learns an address from a DNS answer: allowed (any port) until `expires_boot_ns`. A
    /// static entry for the same address is kept as it is (it never expires); a learned one is
    /// extended, never shortened.
    /// Learns an address from a DNS answer (see above). An agent holding `quota` learned
    /// addresses already may not add another (refreshing one it holds is fine): the map is
    /// shared, and one agent must not starve the others.
    pub fn learn_allow(
        &self,
        agent: u32,
        ip: IpAddr,
        expires_boot_ns: u64,
        exact: bool,
        quota: usize,
    ) -> Result<(), BpfError> {
        check_agent(agent)?;
        let entry = AllowEntry {
            net: ipnet::IpNet::from(ip),
            port: None,
            expires_boot_ns,
            flags: allow_flags::LEARNED | if exact { allow_flags::EXPLICIT } else { 0 },
        };
        let (key, mut value) = allow_key_value(agent, &entry);
        let mut control = lock(&self.control);
        if let Ok(existing) = control.allow.get(&key, 0) {
            if existing.expires_boot_ns == 0 {
                return Ok(());
            }
            value.expires_boot_ns = value.expires_boot_ns.max(existing.expires_boot_ns);
            value.flags |= existing.flags & allow_flags::EXPLICIT;
        }
        let mut learned = lock(&self.learned);
        if !learned.holds(agent, ip) && learned.count(agent) >= quota {
            return Err(BpfError::Quota { agent, quota });
        }
        control
            .allow
            .insert(&key, value, 0)
            .map_err(map_error(maps::ALLOW))?;
        learned.note(agent, ip, value.expires_boot_ns);
        Ok(())
    }

    /// How many learned addresses the agent holds now.
    pub fn learned_count(&self, agent: u32) -> usize {
        lock(&self.learned).count(agent)
    }

    /// Removes one entry.
    pub fn remove_allow(&self, agent: u32, entry: &AllowEntry) {
        let mut control = lock(&self.control);
        let (key, _) = allow_key_value(agent, entry);
        let _ = control.allow.remove(&key);
        if entry.net.prefix_len() == entry.net.max_prefix_len() && entry.port.is_none() {
            lock(&self.learned).forget(agent, entry.net.addr());
        }
    }

    /// The agent's allowlist as the kernel holds it.
    pub fn allowlist(&self, agent: u32) -> Vec<AllowEntry> {
        let control = lock(&self.control);
        control
            .allow
            .iter()
            .flatten()
            .filter(|(k, _)| k.data().agent == agent)
            .map(|(k, v)| {
                let data = k.data();
                let bits = k.prefix_len().saturating_sub(AllowKey::FIXED_PREFIX_BITS) as u8;
                AllowEntry {
                    net: addr_net(&data.addr, bits),
                    port: (data.port != 0).then_some(data.port),
                    expires_boot_ns: v.expires_boot_ns,
                    flags: v.flags,
                }
            })
            .collect()
    }

    /// Removes every entry whose expiry has passed; returns what was removed, per agent.
    /// Removes learned entries whose time has come, from the expiry queue: the cost follows
    /// what expires, not the size of the map (a walk of 65,536 entries every second took most
    /// of a CPU). The kernel already ignores expired entries on lookup; this frees their
    /// slots.
    pub fn sweep_expired(&self, now_boot_ns: u64) -> Vec<(u32, AllowEntry)> {
        let mut control = lock(&self.control);
        let due = lock(&self.learned).take_due(now_boot_ns);
        let mut out = Vec::new();
        for (agent, ip, expires_boot_ns) in due {
            let entry = AllowEntry {
                net: ipnet::IpNet::from(ip),
                port: None,
                expires_boot_ns,
                flags: allow_flags::LEARNED,
            };
            let (key, _) = allow_key_value(agent, &entry);
            // A static entry for the same address may have replaced it: keep that one.
            match control.allow.get(&key, 0) {
                Ok(v) if v.expires_boot_ns == 0 || v.expires_boot_ns > now_boot_ns => continue,
                _ => {}
            }
            if control.allow.remove(&key).is_ok() {
                out.push((agent, entry));
            }
        }
        out
    }

    /// Who sent the UDP DNS query the resolver received from `peer` (not consumed: one socket
    /// asks several questions).
    pub fn dns_client(&self, peer: SocketAddr) -> Option<DnsClient> {
        let key = SockKey {
            addr: addr_of(peer.ip()),
            port: peer.port(),
            proto: IPPROTO_UDP,
        };
        self.dns_clients.get(&key, 0).ok()
    }

    /// Takes (reads and deletes) the record of a redirected TCP connection whose client end,
    /// as the proxy sees it, is `peer`.
    pub fn take_orig(&self, peer: SocketAddr) -> Option<OrigDst> {
        let key = SockKey {
            addr: addr_of(peer.ip()),
            port: peer.port(),
            proto: IPPROTO_TCP,
        };
        let mut orig = lock(&self.orig);
        let value = orig.get(&key, 0).ok()?;
        let _ = orig.remove(&key);
        Some(value)
    }

    /// The agent's counters summed over CPUs.
    pub fn counters(&self, agent: u32) -> AgentCounters {
        let mut sum = AgentCounters::default();
        if let Ok(per_cpu) = self.counters.get(&agent, 0) {
            for c in per_cpu.iter() {
                sum.redirected += c.redirected;
                sum.refused += c.refused;
                sum.dropped_packets += c.dropped_packets;
                sum.dns_redirected += c.dns_redirected;
                sum.events_lost += c.events_lost;
            }
        }
        sum
    }

    /// The eBPF programs' log ring (aya-log); it can be taken once. Its records reach the
    /// daemon's log (target `enforcer`, level debug).
    pub fn take_logger(&self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        lock(&self.logger).take()
    }

    /// The deny-event ring; it can be taken once.
    pub fn take_events(&self) -> Option<RingBuf<MapData>> {
        lock(&self.events).take()
    }
}

/// The learned allowlist entries: each agent's addresses with their current expiry (for the
/// quota), and a queue of expiries (for the sweep). A refreshed address leaves its earlier
/// queue entry behind; it is skipped when it comes up.
#[derive(Default)]
struct LearnedIndex {
    by_agent: std::collections::HashMap<u32, std::collections::HashMap<IpAddr, u64>>,
    queue: std::collections::BinaryHeap<std::cmp::Reverse<(u64, u32, IpAddr)>>,
}

impl LearnedIndex {
    fn from_map(allow: &LpmTrie<MapData, AllowKey, AllowValue>) -> Self {
        let mut index = Self::default();
        for (key, value) in allow.iter().flatten() {
            let data = key.data();
            let full = key.prefix_len() == AllowKey::FIXED_PREFIX_BITS + 128;
            if value.flags & allow_flags::LEARNED != 0
                && value.expires_boot_ns != 0
                && full
                && data.port == 0
            {
                index.note(data.agent, ip_of(&data.addr), value.expires_boot_ns);
            }
        }
        index
    }

    fn holds(&self, agent: u32, ip: IpAddr) -> bool {
        self.by_agent
            .get(&agent)
            .is_some_and(|m| m.contains_key(&ip))
    }

    fn count(&self, agent: u32) -> usize {
        self.by_agent.get(&agent).map_or(0, |m| m.len())
    }

    fn note(&mut self, agent: u32, ip: IpAddr, expires: u64) {
        let current = self
            .by_agent
            .entry(agent)
            .or_default()
            .entry(ip)
            .or_insert(0);
        if expires > *current {
            *current = expires;
            self.queue.push(std::cmp::Reverse((expires, agent, ip)));
        }
    }

    fn forget(&mut self, agent: u32, ip: IpAddr) {
        if let Some(m) = self.by_agent.get_mut(&agent) {
            m.remove(&ip);
        }
    }

    /// Entries due by `now` whose expiry was not pushed back since.
    fn take_due(&mut self, now: u64) -> Vec<(u32, IpAddr, u64)> {
        let mut due = Vec::new();
        while let Some(std::cmp::Reverse((expires, agent, ip))) = self.queue.peek().copied() {
            if expires > now {
                break;
            }
            self.queue.pop();
            let Some(m) = self.by_agent.get_mut(&agent) else {
                continue;
            };
            if m.get(&ip) == Some(&expires) {
                m.remove(&ip);
                due.push((agent, ip, expires));
            }
        }
        due
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain map handles behind; they stay usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The error of a failed operation on map `name`.
fn map_error(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> BpfError {
    move |source| BpfError::Map { name, source }
}

fn check_agent(agent: u32) -> Result<(), BpfError> {
    if agent == 0 || agent >= MAX_AGENTS {
        return Err(BpfError::AgentId(agent));
    }
    Ok(())
}

/// The 16-byte form of an address (IPv4 as IPv4-mapped IPv6).
pub fn addr_of(ip: IpAddr) -> Addr {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    Addr::from_octets(v6.octets())
}

/// A task's `comm` as the kernel recorded it (NUL-padded, not always UTF-8).
pub fn comm_str(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// The address of a 16-byte form (IPv4-mapped back to IPv4).
pub fn ip_of(addr: &Addr) -> IpAddr {
    let v6 = Ipv6Addr::from(addr.octets());
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn addr_net(addr: &Addr, bits: u8) -> ipnet::IpNet {
    let ip = ip_of(addr);
    let bits = if ip.is_ipv4() {
        bits.saturating_sub(96)
    } else {
        bits
    };
    ipnet::IpNet::new(ip, bits).unwrap_or_else(|_| ipnet::IpNet::from(ip))
}

fn allow_key_value(agent: u32, e: &AllowEntry) -> (Key<AllowKey>, AllowValue) {
    let net = e.net.trunc();
    let bits = match net {
        ipnet::IpNet::V4(n) => 96 + u32::from(n.prefix_len()),
        ipnet::IpNet::V6(n) => u32::from(n.prefix_len()),
    };
    let key = Key::new(
        AllowKey::FIXED_PREFIX_BITS + bits,
        AllowKey {
            agent,
            port: e.port.unwrap_or(0),
            _pad0: 0,
            addr: addr_of(net.addr()),
        },
    );
    let value = AllowValue {
        expires_boot_ns: e.expires_boot_ns,
        flags: e.flags,
        _pad0: 0,
    };
    (key, value)
}

/// A loaded program's descriptor and kernel id.
fn program_fd<'a>(
    ebpf: &'a Ebpf,
    name: &'static str,
) -> Result<(std::os::fd::BorrowedFd<'a>, u32), BpfError> {
    let program = ebpf.program(name).ok_or(BpfError::MissingProgram(name))?;
    let err = |source| BpfError::Program { name, source };
    let fd = program.fd().map_err(err)?;
    let id = program.info().map_err(err)?.id();
    Ok((fd.as_fd(), id))
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(BpfError::MissingMap(name))?;
    T::try_from(map).map_err(|source| BpfError::Map { name, source })
}

fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), BpfError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(BpfError::MissingProgram(name))?;
    let result = match program {
        Program::CgroupSockAddr(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        Program::CgroupSkb(p) => p.load(),
        _ => return Err(BpfError::MissingProgram(name)),
    };
    result.map_err(|source| BpfError::Program { name, source })
}

/// Attaches one program to a cgroup and hands back its link, detached from aya's bookkeeping
/// so that dropping the `Ebpf` does not detach it.
fn attach_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: std::os::fd::BorrowedFd<'_>,
) -> Result<FdLink, BpfError> {
    // aya attaches through BPF_LINK_CREATE, which takes no flags for cgroups (a cgroup
    // bpf_link is always multi-attach, so it coexists with systemd's own programs); `Single`
    // is the mode that passes 0.
    let mode = CgroupAttachMode::Single;
    let program = ebpf
        .program_mut(name)
        .ok_or(BpfError::MissingProgram(name))?;
    let err = |source| BpfError::Program { name, source };
    // Every program type attaches and hands back its link the same way; only the attach
    // arguments differ.
    macro_rules! attach {
        ($p:expr $(, $arg:expr)*) => {{
            let id = $p.attach(cgroup $(, $arg)*, mode).map_err(err)?;
            $p.take_link(id).map_err(err)?.try_into().map_err(link_err(name))?
        }};
    }
    let link: FdLink = match program {
        Program::CgroupSockAddr(p) => attach!(p),
        Program::SockOps(p) => attach!(p),
        Program::CgroupSock(p) => attach!(p),
        Program::CgroupSkb(p) => attach!(p, CgroupSkbAttachType::Egress),
        _ => return Err(BpfError::MissingProgram(name)),
    };
    let _ = link.id();
    Ok(link)
}

fn link_err(name: &'static str) -> impl Fn(aya::programs::links::LinkError) -> BpfError {
    move |e| BpfError::Pin {
        what: format!("link {name}"),
        path: PathBuf::new(),
        message: format!("the kernel attached it without a bpf_link ({e}); Linux 5.7+ is needed"),
    }
}

fn mkdir(path: &Path) -> Result<(), BpfError> {
    std::fs::create_dir_all(path).map_err(|e| BpfError::Bpffs {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Makes sure `dir` lies on a bpffs, mounting one on its parent when the parent is not.
fn prepare_bpffs(dir: &Path) -> Result<(), BpfError> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let is_bpffs = |p: &Path| {
        nix::sys::statfs::statfs(p)
            .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
            .unwrap_or(false)
    };
    if dir.exists() {
        if is_bpffs(dir) {
            return Ok(());
        }
    } else if is_bpffs(parent) {
        return Ok(());
    }
    if !parent.exists() {
        return Err(BpfError::Bpffs {
            path: dir.to_owned(),
            message: format!("{} does not exist", parent.display()),
        });
    }
    nix::mount::mount(
        Some("bpf"),
        parent,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| BpfError::Bpffs {
        path: parent.to_owned(),
        message: format!("`mount -t bpf bpf {}` failed: {e}", parent.display()),
    })?;
    tracing::info!(path = %parent.display(), "mounted bpffs");
    Ok(())
}

/// `bpf_ktime_get_boot_ns` from user space: CLOCK_BOOTTIME in nanoseconds.
pub fn boot_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .expect("CLOCK_BOOTTIME is always available on Linux");
    u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_learned_index_expires_from_its_queue_and_counts_per_agent() {
        let mut idx = LearnedIndex::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        idx.note(1, a, 100);
        idx.note(1, b, 50);
        idx.note(2, a, 70);
        assert_eq!((idx.count(1), idx.count(2)), (2, 1));
        // Refreshed: its first expiry no longer counts.
        idx.note(1, a, 300);
        assert_eq!(idx.take_due(60), vec![(1, b, 50)]);
        assert_eq!(idx.take_due(120), vec![(2, a, 70)]);
        assert!(idx.holds(1, a) && !idx.holds(1, b));
        assert_eq!(idx.take_due(300), vec![(1, a, 300)]);
        assert_eq!(idx.count(1), 0);
        // A shorter expiry never shortens a longer one.
        idx.note(3, a, 500);
        idx.note(3, a, 400);
        assert!(idx.take_due(450).is_empty());
    }

    #[test]
    fn addresses_round_trip_through_the_kernel_form() {
        for s in [
            "127.0.0.6",
            "10.1.2.3",
            "::1",
            "2001:db8::5",
            "::ffff:127.0.0.6",
        ] {
            let ip: IpAddr = s.parse().unwrap();
            let back = ip_of(&addr_of(ip));
            let expect = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
                v4 => v4,
            };
            assert_eq!(back, expect, "{s}");
        }
    }

    #[test]
    fn allow_keys_cover_agent_port_and_prefix() {
        let e = AllowEntry {
            net: "10.0.0.0/8".parse().unwrap(),
            port: Some(443),
            expires_boot_ns: 0,
            flags: 1,
        };
        let (k, v) = allow_key_value(7, &e);
        assert_eq!(k.prefix_len(), 64 + 96 + 8);
        assert_eq!(k.data().agent, 7);
        assert_eq!(k.data().port, 443);
        assert_eq!(v.flags, 1);
        assert_eq!(addr_net(&k.data().addr, 96 + 8), e.net);
        let e6 = AllowEntry {
            net: "2001:db8::/32".parse().unwrap(),
            port: None,
            expires_boot_ns: 0,
            flags: 0,
        };
        let (k6, _) = allow_key_value(7, &e6);
        assert_eq!(k6.prefix_len(), 64 + 32);
        assert_eq!(k6.data().port, 0);
    }
}
