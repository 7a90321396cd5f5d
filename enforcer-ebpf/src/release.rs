//! `cgroup/sock_release`: forget the cookie record of a closed socket.
//!
//! The (address, port) record is left to the proxy (which deletes what it consumes) and to
//! LRU eviction: a client may close its socket before the proxy has accepted the connection,
//! and the proxy still needs the record then.

use aya_ebpf::{EbpfContext, helpers::generated::bpf_get_socket_cookie, programs::SockContext};

use crate::maps::ORIG_BY_COOKIE;

pub fn try_release(ctx: &SockContext) {
    // SAFETY: plain helper call on a valid context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A miss is the common case (sockets that were never redirected).
    let _ = ORIG_BY_COOKIE.remove(cookie);
}
