//! `cgroup/getpeername4` and `cgroup/getpeername6`: a redirected socket reports the peer it
//! asked for, not the proxy.

use aya_ebpf::{EbpfContext, helpers::generated::bpf_get_socket_cookie, programs::SockAddrContext};
use enforcer_common::orig_flags;

use crate::{connect::set_peer, maps::ORIG_BY_COOKIE};

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
    set_peer::<V6>(ctx, &addr, port)
}
