//! `cgroup/connect4` and `cgroup/connect6`: every `connect()` of an enrolled socket.
//!
//! TCP (and MPTCP, which is TCP to us) to a destination the agent may reach is rewritten to
//! the local proxy, with the original destination recorded by socket cookie. DNS (port 53,
//! UDP or TCP, to any address) is rewritten to the local resolver; DNS over TLS (853) is
//! refused. Other UDP is refused, so QUIC falls back to TCP. Everything refused fails with
//! EPERM and is reported to the daemon.

use aya_ebpf::{
    EbpfContext,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use enforcer_common::{
    Addr, GlobalConfig, OrigDst, agent_flags, allow_flags, deny_reason, global_flags, orig_flags,
};

use crate::{
    common::{
        AF_INET, AF_INET6, ALLOW_CALL, Counter, DENY_CALL, IPPROTO_TCP, IPPROTO_UDP, SOCK_DGRAM,
        SOCK_STREAM, agent_state, allowlisted, caller, caller_exe, config, count, current_agent,
        killed, now_boot_ns, report_deny,
    },
    maps::ORIG_BY_COOKIE,
};

/// Refuses: a debug log line (aya-log) for the daemon, then the counter and the deny event.
#[inline(always)]
fn refuse(ctx: &SockAddrContext, agent: u32, dst: &Addr, port: u16, proto: u16, reason: u32) {
    debug!(
        ctx,
        "agent {} refused proto {} port {}: reason {}", agent, proto, port, reason
    );
    report_deny(agent, dst, port, proto, reason);
}

/// The hook family is a const generic (`V6`): the verifier only allows `user_ip4` in the
/// *4 hooks and `user_ip6` in the *6 hooks, and rejects context reads at offsets chosen at run
/// time, so each hook gets its own monomorphised code with no family branch.
/// Reads `user_ip6` one word at a time at fixed offsets. A plain array copy becomes a memcpy
/// loop over the context, which the verifier rejects.
#[inline(always)]
pub fn read_user_ip6(ctx: &SockAddrContext) -> [u32; 4] {
    let sa = ctx.sock_addr;
    // SAFETY: valid context pointer; only called from *6 hooks, where user_ip6 is readable.
    unsafe {
        [
            core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
        ]
    }
}

/// Writes `user_ip6` one word at a time; see [`read_user_ip6`].
#[inline(always)]
pub fn write_user_ip6(ctx: &SockAddrContext, words: [u32; 4]) {
    let sa = ctx.sock_addr;
    // SAFETY: valid context pointer; only called from *6 hooks that may write user_ip6.
    unsafe {
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], words[0]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], words[1]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[2], words[2]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], words[3]);
    }
}

/// Makes the socket address `user_ip*`/`user_port` say `addr:port` (getpeername, recvmsg).
/// Err for an IPv6 address in an IPv4 hook.
#[inline(always)]
pub fn set_peer<const V6: bool>(ctx: &SockAddrContext, addr: &Addr, port: u16) -> Result<(), ()> {
    if V6 {
        write_user_ip6(ctx, addr.words);
    } else {
        if !addr.is_ipv4_mapped() {
            return Err(());
        }
        // SAFETY: user_ip4 is writable in the *4 getpeername and recvmsg hooks.
        unsafe { (*ctx.sock_addr).user_ip4 = addr.ipv4_word() };
    }
    // SAFETY: user_port is writable in those hooks.
    unsafe { (*ctx.sock_addr).user_port = u32::from(port.to_be()) };
    Ok(())
}

/// The destination the caller asked for, as an IPv4-mapped or native IPv6 address.
#[inline(always)]
pub fn requested<const V6: bool>(ctx: &SockAddrContext) -> (Addr, u16) {
    // SAFETY: the context pointer is valid for the program's run; user_ip4/user_ip6 and
    // user_port are readable in every sock_addr hook.
    let sa = unsafe { &*ctx.sock_addr };
    let addr = if V6 {
        Addr {
            words: read_user_ip6(ctx),
        }
    } else {
        Addr::from_ipv4_word(sa.user_ip4)
    };
    // user_port holds the port in network order in its low 16 bits.
    let port = u16::from_be(sa.user_port as u16);
    (addr, port)
}

/// Rewrites the destination to `addr:port` on loopback. A mapped destination on an AF_INET6
/// socket goes to `::ffff:127.0.0.1` so it reaches the IPv4 listener, like the original would.
#[inline(always)]
pub fn rewrite_to_loopback<const V6: bool>(ctx: &SockAddrContext, dst: &Addr, port: u16) {
    // SAFETY: writes to user_ip4/user_ip6/user_port are allowed in connect and sendmsg hooks
    // of the matching family.
    let sa = unsafe { &mut *ctx.sock_addr };
    let loopback_v4 = u32::from_ne_bytes([127, 0, 0, 1]);
    if !V6 {
        sa.user_ip4 = loopback_v4;
    } else if dst.is_ipv4_mapped() {
        write_user_ip6(ctx, Addr::from_ipv4_word(loopback_v4).words);
    } else {
        write_user_ip6(ctx, [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]);
    }
    sa.user_port = u32::from(port.to_be());
}

pub fn try_connect<const V6: bool>(ctx: &SockAddrContext) -> Result<i32, i32> {
    let (dst, port) = requested::<V6>(ctx);
    // SAFETY: valid context pointer; type_ is readable.
    let sock_type = unsafe { (*ctx.sock_addr).type_ };
    let proto = if sock_type == SOCK_DGRAM {
        IPPROTO_UDP as u16
    } else {
        IPPROTO_TCP as u16
    };

    let Some(cfg) = config() else {
        // Not configured yet: refuse rather than let anything through unjudged.
        return Err(deny_reason::NOT_READY as i32);
    };
    let Some(agent) = current_agent() else {
        refuse(ctx, 0, &dst, port, proto, deny_reason::NO_AGENT);
        return Ok(DENY_CALL);
    };
    let Some(state) = agent_state(agent) else {
        refuse(ctx, agent, &dst, port, proto, deny_reason::NO_AGENT);
        return Ok(DENY_CALL);
    };
    // SAFETY: plain helper call on a valid context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns != cfg.netns_cookie {
        // The proxy and resolver live in the daemon's namespace; nothing else can be judged.
        refuse(ctx, agent, &dst, port, proto, deny_reason::OTHER_NETNS);
        return Ok(DENY_CALL);
    }
    if killed(cfg, state) {
        refuse(ctx, agent, &dst, port, proto, deny_reason::KILLED);
        return Ok(DENY_CALL);
    }

    match sock_type {
        // MPTCP sockets are SOCK_STREAM too (protocol IPPROTO_MPTCP): same treatment as TCP.
        SOCK_STREAM => connect_stream::<V6>(ctx, cfg, agent, state.flags, &dst, port),
        SOCK_DGRAM => Ok(udp_verdict::<V6>(ctx, cfg, agent, &dst, port)),
        // Raw, SEQPACKET and anything else: nothing we can judge.
        _ => {
            refuse(ctx, agent, &dst, port, proto, deny_reason::UDP);
            Ok(DENY_CALL)
        }
    }
}

fn connect_stream<const V6: bool>(
    ctx: &SockAddrContext,
    cfg: &GlobalConfig,
    agent: u32,
    agent_flags_bits: u32,
    dst: &Addr,
    port: u16,
) -> Result<i32, i32> {
    // Every refusal here is counted and reported the same way.
    let deny = |reason| {
        refuse(ctx, agent, dst, port, IPPROTO_TCP as u16, reason);
        Ok(DENY_CALL)
    };
    // SAFETY: `sk` is a valid socket pointer in sock_addr hooks; bound_dev_if is readable.
    let bound_dev = unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).bound_dev_if };
    if bound_dev != 0 {
        // SO_BINDTODEVICE would send the rewritten connect out of that device, not to us.
        return deny(deny_reason::BOUND_TO_DEVICE);
    }

    if port == 853 {
        // DNS over TLS would carry names past the resolver.
        return deny(deny_reason::DNS_OVER_TLS);
    }
    if port == 53 {
        return Ok(redirect_dns::<V6>(
            ctx,
            cfg,
            agent,
            dst,
            port,
            IPPROTO_TCP as u16,
        ));
    }
    let listed = allowlisted(agent, dst, port);
    if dst.is_local() {
        if (port == cfg.proxy_port || port == cfg.dns_port) && dst.is_daemon_listener() {
            // Straight to our own listeners: let it through unchanged, but mark the socket so
            // the proxy closes it instead of trusting a stale record for its port. The
            // resolver still learns the agent from it.
            let flags = if port == cfg.dns_port {
                orig_flags::DIRECT | orig_flags::DNS
            } else {
                orig_flags::DIRECT
            };
            record::<V6>(ctx, cfg, agent, dst, port, flags);
            return Ok(ALLOW_CALL);
        }
        // Other local services only when the policy names them explicitly.
        match listed {
            Some(v) if v.flags & allow_flags::EXPLICIT != 0 => {}
            _ => return deny(deny_reason::LOOPBACK),
        }
    } else if listed.is_none() && agent_flags_bits & agent_flags::REDIRECT_ALL_TCP == 0 {
        return deny(deny_reason::NOT_ALLOWED);
    }

    let flags = if listed.is_some() {
        orig_flags::LISTED
    } else {
        0
    };
    if !record::<V6>(ctx, cfg, agent, dst, port, flags) {
        // Without the record the proxy cannot know where to go: fail the connect now.
        return deny(deny_reason::NOT_READY);
    }
    rewrite_to_loopback::<V6>(ctx, dst, cfg.proxy_port);
    count(agent, Counter::Redirected);
    debug!(
        ctx,
        "agent {} connect to port {} redirected to the proxy", agent, port
    );
    Ok(ALLOW_CALL)
}

/// UDP: only DNS. Port 53 to any address goes to the local resolver; the resolver itself
/// (exactly 127.0.0.1 or ::1 at the DNS port) is reachable directly.
#[inline(always)]
pub fn udp_verdict<const V6: bool>(
    ctx: &SockAddrContext,
    cfg: &GlobalConfig,
    agent: u32,
    dst: &Addr,
    port: u16,
) -> i32 {
    if port == 53 {
        return redirect_dns::<V6>(ctx, cfg, agent, dst, port, IPPROTO_UDP as u16);
    }
    if dst.is_daemon_listener() && port == cfg.dns_port {
        if !record::<V6>(
            ctx,
            cfg,
            agent,
            dst,
            port,
            orig_flags::DNS | orig_flags::DIRECT,
        ) {
            refuse(
                ctx,
                agent,
                dst,
                port,
                IPPROTO_UDP as u16,
                deny_reason::NOT_READY,
            );
            return DENY_CALL;
        }
        return ALLOW_CALL;
    }
    // Everything else, QUIC included: refused, so clients fall back to TCP.
    refuse(ctx, agent, dst, port, IPPROTO_UDP as u16, deny_reason::UDP);
    DENY_CALL
}

/// Sends a DNS query (UDP or TCP port 53, any address) to the local resolver, remembering
/// the server the client addressed so replies and getpeername can name it.
#[inline(always)]
fn redirect_dns<const V6: bool>(
    ctx: &SockAddrContext,
    cfg: &GlobalConfig,
    agent: u32,
    dst: &Addr,
    port: u16,
    proto: u16,
) -> i32 {
    if cfg.flags & global_flags::DNS_REDIRECT == 0 {
        // No resolver to send it to: refuse rather than let a query out unjudged.
        refuse(ctx, agent, dst, port, proto, deny_reason::NOT_READY);
        return DENY_CALL;
    }
    if !record::<V6>(ctx, cfg, agent, dst, port, orig_flags::DNS) {
        refuse(ctx, agent, dst, port, proto, deny_reason::NOT_READY);
        return DENY_CALL;
    }
    rewrite_to_loopback::<V6>(ctx, dst, cfg.dns_port);
    count(agent, Counter::DnsRedirected);
    ALLOW_CALL
}

/// Stores the original destination, with the caller and its executable, under the socket
/// cookie. False if the map refused it.
#[inline(always)]
fn record<const V6: bool>(
    ctx: &SockAddrContext,
    cfg: &GlobalConfig,
    agent: u32,
    dst: &Addr,
    port: u16,
    flags: u32,
) -> bool {
    // SAFETY: plain helper call on a valid context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let (pid, uid, gid, comm) = caller();
    let orig = OrigDst {
        addr: *dst,
        port,
        family: if V6 { AF_INET6 } else { AF_INET },
        agent,
        pid,
        uid,
        gid,
        flags,
        comm,
        created_boot_ns: now_boot_ns(),
        cookie,
        exe: caller_exe(&cfg.task_offsets),
    };
    ORIG_BY_COOKIE.insert(cookie, orig, 0).is_ok()
}
