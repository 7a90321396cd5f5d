//! `cgroup_skb/egress`: defence in depth. Every packet an enrolled socket sends must go where
//! the socket hooks would have let it: TCP to the proxy or resolver on loopback, UDP to the
//! resolver or an allowed DNS server. Raw sockets, ping sockets and anything else that
//! escaped the socket hooks are dropped. With the kill switch engaged, everything is dropped.
//!
//! Identity comes from the skb's socket (`bpf_skb_ancestor_cgroup_id`), never from the current
//! task: this runs in softirq context too (retransmits, ACKs), where the task is unrelated.

use aya_ebpf::{
    EbpfContext, helpers::generated::bpf_skb_ancestor_cgroup_id, programs::SkBuffContext,
};
use enforcer_common::{Addr, GlobalConfig, MAX_CGROUP_DEPTH};

use crate::{
    common::{Counter, IPPROTO_TCP, IPPROTO_UDP, agent_state, config, count, killed},
    maps::{CGROUP_AGENT, DNS_SERVERS},
};

pub const PASS: i32 = 1;
pub const DROP: i32 = 0;

const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86DD;

/// The agent owning the packet's socket: deepest enrolled ancestor of the socket's cgroup.
#[inline(always)]
fn socket_agent(ctx: &SkBuffContext) -> Option<u32> {
    let mut found = None;
    let mut level = 0u32;
    while level < MAX_CGROUP_DEPTH {
        // SAFETY: plain helper call on a valid skb; returns 0 past the socket cgroup's depth.
        let id = unsafe { bpf_skb_ancestor_cgroup_id(ctx.as_ptr().cast(), level as i32) };
        if id == 0 {
            break;
        }
        // SAFETY: the value is copied out immediately.
        if let Some(agent) = unsafe { CGROUP_AGENT.get(id) } {
            found = Some(*agent);
        }
        level += 1;
    }
    found
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

/// Destination address, L4 protocol and destination port of the packet.
#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Result<Option<(Addr, u32, u16)>, i64> {
    // SAFETY: reading the skb's protocol field is always allowed. It holds a be16.
    let l3 = u32::from(u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16));
    let (dst, proto, l4_offset) = if l3 == ETH_P_IP {
        let version_ihl: u8 = ctx.load(0)?;
        let frag: u16 = u16::from_be(ctx.load(6)?);
        if frag & 0x1fff != 0 {
            // A later fragment carries no port to check.
            return Ok(None);
        }
        let proto: u8 = ctx.load(9)?;
        let daddr: u32 = ctx.load(16)?;
        let ihl = usize::from(version_ihl & 0x0f) * 4;
        (Addr::from_ipv4_word(daddr), u32::from(proto), ihl)
    } else if l3 == ETH_P_IPV6 {
        let next: u8 = ctx.load(6)?;
        let daddr: [u32; 4] = ctx.load(24)?;
        // Extension headers are not walked: such packets fall to the drop below.
        (Addr { words: daddr }, u32::from(next), 40)
    } else {
        return Ok(None);
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Ok(Some((dst, proto, 0)));
    }
    let dport: u16 = u16::from_be(ctx.load(l4_offset + 2)?);
    Ok(Some((dst, proto, dport)))
}

#[inline(always)]
fn packet_verdict(ctx: &SkBuffContext, cfg: &GlobalConfig) -> Result<i32, i64> {
    let Some((dst, proto, port)) = parse(ctx)? else {
        return Ok(DROP);
    };
    let to_us = dst.is_local() && (port == cfg.proxy_port || port == cfg.dns_port);
    let allowed = match proto {
        IPPROTO_TCP => to_us,
        // SAFETY: value is not dereferenced.
        IPPROTO_UDP => to_us || (port == 53 && unsafe { DNS_SERVERS.get(dst) }.is_some()),
        _ => false,
    };
    Ok(if allowed { PASS } else { DROP })
}
