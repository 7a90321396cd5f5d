//! `cgroup/sendmsg4` and `cgroup/sendmsg6`: unconnected UDP sends with an explicit address
//! (`sendto`, `sendmsg`). Connected sockets were judged at connect.

use aya_ebpf::{EbpfContext, helpers::generated::bpf_get_netns_cookie, programs::SockAddrContext};
use enforcer_common::deny_reason;

use crate::{
    common::{DENY_CALL, IPPROTO_UDP, agent_state, config, current_agent, killed, report_deny},
    connect::{requested, udp_verdict},
};

pub fn try_sendmsg<const V6: bool>(ctx: &SockAddrContext) -> Result<i32, i32> {
    let (dst, port) = requested::<V6>(ctx);
    let proto = IPPROTO_UDP as u16;
    let Some(cfg) = config() else {
        return Err(deny_reason::NOT_READY as i32);
    };
    let Some(agent) = current_agent() else {
        report_deny(0, &dst, port, proto, deny_reason::NO_AGENT);
        return Ok(DENY_CALL);
    };
    let Some(state) = agent_state(agent) else {
        report_deny(agent, &dst, port, proto, deny_reason::NO_AGENT);
        return Ok(DENY_CALL);
    };
    // SAFETY: plain helper call on a valid context.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != cfg.netns_cookie {
        report_deny(agent, &dst, port, proto, deny_reason::OTHER_NETNS);
        return Ok(DENY_CALL);
    }
    if killed(cfg, state) {
        report_deny(agent, &dst, port, proto, deny_reason::KILLED);
        return Ok(DENY_CALL);
    }
    Ok(udp_verdict::<V6>(ctx, cfg, agent, &dst, port))
}
