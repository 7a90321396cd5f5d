//! `cgroup_skb/egress`: defence in depth. Every packet an enrolled socket sends must go where
//! the socket hooks would have let it: TCP to the proxy or resolver, UDP to the resolver, at
//! exactly the addresses the daemon listens on (127.0.0.1 and ::1). Raw sockets, ping sockets and anything else that escaped the socket hooks are
//! dropped. With the kill switch engaged, everything is dropped.
//!
//! It also tells the resolver who sent a UDP query: the socket's DNS record (written at
//! connect or sendmsg, keyed by cookie) is copied under the packet's (source address, source
//! port), which is what the resolver sees as its peer. The source port is only certain to be
//! bound here, not at connect time.
//!
//! Identity comes from the skb's socket (`bpf_skb_ancestor_cgroup_id`), never from the current
//! task: this runs in softirq context too (retransmits, ACKs), where the task is unrelated.

use aya_ebpf::{
    EbpfContext,
    helpers::generated::{bpf_get_socket_cookie, bpf_skb_ancestor_cgroup_id},
    programs::SkBuffContext,
};
use enforcer_common::{Addr, DnsClient, GlobalConfig, SockKey, orig_flags};

use crate::{
    common::{
        Counter, IPPROTO_TCP, IPPROTO_UDP, agent_state, config, count, deepest_agent, killed,
    },
    maps::{DNS_CLIENTS, ORIG_BY_COOKIE},
};

pub const PASS: i32 = 1;
pub const DROP: i32 = 0;

const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86DD;

/// The agent owning the packet's socket: deepest enrolled ancestor of the socket's cgroup.
#[inline(always)]
fn socket_agent(ctx: &SkBuffContext) -> Option<u32> {
    // SAFETY: plain helper call on a valid skb; returns 0 past the socket cgroup's depth.
    deepest_agent(|level| unsafe { bpf_skb_ancestor_cgroup_id(ctx.as_ptr().cast(), level) })
}

pub fn try_egress(ctx: &SkBuffContext) -> Result<i32, i64> {
    let Some(cfg) = config() else {
        return Ok(DROP);
    };
    let Some(agent) = socket_agent(ctx) else {
        // A socket of an enrolled cgroup whose agent is gone: nothing may leave.
        return Ok(DROP);
    };
    let verdict = match agent_state(agent) {
        Some(state) if !killed(cfg, state) => packet_verdict(ctx, cfg)?,
        _ => DROP,
    };
    if verdict == DROP {
        count(agent, Counter::DroppedPacket);
    }
    Ok(verdict)
}

/// The addresses, L4 protocol and ports of a packet.
struct Packet {
    src: Addr,
    dst: Addr,
    proto: u32,
    sport: u16,
    dport: u16,
}

#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Result<Option<Packet>, i64> {
    // SAFETY: reading the skb's protocol field is always allowed. It holds a be16.
    let l3 = u32::from(u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16));
    let (src, dst, proto, l4_offset) = if l3 == ETH_P_IP {
        let version_ihl: u8 = ctx.load(0)?;
        let frag: u16 = u16::from_be(ctx.load(6)?);
        if frag & 0x1fff != 0 {
            // A later fragment carries no port to check.
            return Ok(None);
        }
        let proto: u8 = ctx.load(9)?;
        let saddr: u32 = ctx.load(12)?;
        let daddr: u32 = ctx.load(16)?;
        let ihl = usize::from(version_ihl & 0x0f) * 4;
        (
            Addr::from_ipv4_word(saddr),
            Addr::from_ipv4_word(daddr),
            u32::from(proto),
            ihl,
        )
    } else if l3 == ETH_P_IPV6 {
        let next: u8 = ctx.load(6)?;
        let saddr: [u32; 4] = ctx.load(8)?;
        let daddr: [u32; 4] = ctx.load(24)?;
        // Extension headers are not walked: such packets fall to the drop below.
        (
            Addr { words: saddr },
            Addr { words: daddr },
            u32::from(next),
            40,
        )
    } else {
        return Ok(None);
    };
    let (sport, dport) = if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        (
            u16::from_be(ctx.load(l4_offset)?),
            u16::from_be(ctx.load(l4_offset + 2)?),
        )
    } else {
        (0, 0)
    };
    Ok(Some(Packet {
        src,
        dst,
        proto,
        sport,
        dport,
    }))
}

#[inline(always)]
fn packet_verdict(ctx: &SkBuffContext, cfg: &GlobalConfig) -> Result<i32, i64> {
    let Some(p) = parse(ctx)? else {
        return Ok(DROP);
    };
    // Only to where the daemon listens: another loopback address with the same port number
    // is another service, or another agent's socket.
    if !p.dst.is_daemon_listener() {
        return Ok(DROP);
    }
    let allowed = match p.proto {
        IPPROTO_TCP => p.dport == cfg.proxy_port || p.dport == cfg.dns_port,
        IPPROTO_UDP if p.dport == cfg.dns_port => {
            note_dns_client(ctx, &p);
            true
        }
        _ => false,
    };
    Ok(if allowed { PASS } else { DROP })
}

/// Copies the socket's DNS record under the packet's source, for the resolver.
#[inline(always)]
fn note_dns_client(ctx: &SkBuffContext, p: &Packet) {
    // SAFETY: plain helper call on a valid skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the record is copied out before use.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(cookie) }) else {
        return;
    };
    if orig.flags & orig_flags::DNS == 0 {
        return;
    }
    let key = SockKey {
        addr: p.src,
        port: p.sport,
        proto: IPPROTO_UDP as u16,
    };
    let client = DnsClient {
        agent: orig.agent,
        pid: orig.pid,
        server: orig.addr,
        server_port: orig.port,
        family: orig.family,
        _pad0: 0,
        comm: orig.comm,
    };
    // A full or failing map only costs the resolver the identity: it then refuses the query.
    let _ = DNS_CLIENTS.insert(key, client, 0);
}
