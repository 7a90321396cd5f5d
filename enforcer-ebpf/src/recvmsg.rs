//! `cgroup/recvmsg4` and `cgroup/recvmsg6`: a DNS reply from the local resolver is reported
//! as coming from the server the client asked, so resolver libraries that check the source
//! (glibc does) accept it.

use aya_ebpf::{EbpfContext, helpers::generated::bpf_get_socket_cookie, programs::SockAddrContext};
use enforcer_common::orig_flags;

use crate::{
    common::config,
    connect::{requested, set_peer},
    maps::ORIG_BY_COOKIE,
};

/// `V6` selects the hook family, as in `connect.rs`.
pub fn try_recvmsg<const V6: bool>(ctx: &SockAddrContext) -> Result<(), ()> {
    let cfg = config().ok_or(())?;
    // On recvmsg, user_ip*/user_port hold the datagram's source.
    let (src, port) = requested::<V6>(ctx);
    if !src.is_local() || port != cfg.dns_port {
        return Ok(());
    }
    // SAFETY: plain helper call on a valid context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the record is copied out before use.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(cookie) }) else {
        return Ok(());
    };
    if orig.flags & orig_flags::DNS == 0 || orig.flags & orig_flags::DIRECT != 0 {
        return Ok(());
    }
    let (addr, orig_port) = (orig.addr, orig.port);
    set_peer::<V6>(ctx, &addr, orig_port)
}
