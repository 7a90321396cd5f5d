//! `cgroup/getpeername4` and `cgroup/getpeername6`: a redirected socket reports the peer it
//! asked for, not the proxy.

use aya_ebpf::{EbpfContext, helpers::generated::bpf_get_socket_cookie, programs::SockAddrContext};
use enforcer_common::orig_flags;

use crate::{connect::write_user_ip6, maps::ORIG_BY_COOKIE};

/// `V6` selects the hook family, as in `connect.rs`.
pub fn try_getpeername<const V6: bool>(ctx: &SockAddrContext) -> Result<(), ()> {
    // SAFETY: plain helper call on a valid context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the record is copied out before use.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(cookie) }) else {
        return Ok(());
    };
    if orig.flags & orig_flags::DIRECT != 0 {
        return Ok(());
    }
    let (addr, port) = (orig.addr, orig.port);
    if V6 {
        write_user_ip6(ctx, addr.words);
    } else {
        if !addr.is_ipv4_mapped() {
            return Err(());
        }
        // SAFETY: user_ip4 is writable in getpeername4.
        unsafe { (*ctx.sock_addr).user_ip4 = addr.ipv4_word() };
    }
    // SAFETY: user_port is writable in getpeername hooks.
    let sa = unsafe { &mut *ctx.sock_addr };
    sa.user_port = u32::from(port.to_be());
    Ok(())
}
