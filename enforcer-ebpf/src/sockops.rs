//! `sock_ops`: once a redirected TCP socket has its local port (`TCP_CONNECT_CB`, run inside
//! `connect()` just before the SYN), copy its record to the (address, port) key the proxy
//! will see as its peer.

use aya_ebpf::{EbpfContext, helpers::generated::bpf_get_socket_cookie, programs::SockOpsContext};
use enforcer_common::{Addr, SockKey};

use crate::{
    common::{AF_INET, IPPROTO_TCP},
    maps::{ORIG_BY_COOKIE, ORIG_BY_TUPLE},
};

/// `BPF_SOCK_OPS_TCP_CONNECT_CB`.
const TCP_CONNECT_CB: u32 = 3;

pub fn try_track(ctx: &SockOpsContext) -> Result<(), i64> {
    if ctx.op() != TCP_CONNECT_CB {
        return Ok(());
    }
    // SAFETY: plain helper call on a valid context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the record is copied out before use.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(cookie) }) else {
        return Ok(());
    };
    let orig = *orig;
    // Read both forms with fixed-offset volatile loads: the verifier rejects a context
    // access at an offset computed from a branch, which is what LLVM makes of a plain `if`.
    // SAFETY: the context pointer is valid; local_ip4/local_ip6 are readable in sock_ops.
    let (ip4, ip6) = unsafe {
        let ops = ctx.ops;
        (
            core::ptr::read_volatile(&raw const (*ops).local_ip4),
            [
                core::ptr::read_volatile(&raw const (*ops).local_ip6[0]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[1]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[2]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[3]),
            ],
        )
    };
    let addr = if ctx.family() == u32::from(AF_INET) {
        Addr::from_ipv4_word(ip4)
    } else {
        Addr { words: ip6 }
    };
    let key = SockKey {
        addr,
        // local_port is in host order in sock_ops.
        port: ctx.local_port() as u16,
        proto: IPPROTO_TCP as u16,
    };
    ORIG_BY_TUPLE.insert(key, orig, 0).map_err(i64::from)
}
