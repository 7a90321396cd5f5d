//! `cgroup/bind4` and `cgroup/bind6`: no enrolled process may bind the proxy or DNS port
//! number, on any address. Bound there, a socket could receive what another agent sends to
//! that port (a channel between agents with different policies), or take the daemon's port
//! while it restarts.

use aya_ebpf::programs::SockAddrContext;
use enforcer_common::deny_reason;

use crate::{
    common::{
        ALLOW_CALL, DENY_CALL, IPPROTO_TCP, IPPROTO_UDP, SOCK_DGRAM, config, current_agent,
        report_deny,
    },
    connect::requested,
};

pub fn try_bind<const V6: bool>(ctx: &SockAddrContext) -> Result<i32, i32> {
    let (addr, port) = requested::<V6>(ctx);
    let Some(cfg) = config() else {
        // Before the daemon configured the programs, the ports are not known: refuse only
        // those binds that could matter, which is all of them.
        return Err(deny_reason::NOT_READY as i32);
    };
    if port == 0 || (port != cfg.proxy_port && port != cfg.dns_port) {
        return Ok(ALLOW_CALL);
    }
    // SAFETY: valid context pointer; type_ is readable.
    let proto = if unsafe { (*ctx.sock_addr).type_ } == SOCK_DGRAM {
        IPPROTO_UDP as u16
    } else {
        IPPROTO_TCP as u16
    };
    report_deny(
        current_agent().unwrap_or(0),
        &addr,
        port,
        proto,
        deny_reason::BIND,
    );
    Ok(DENY_CALL)
}
