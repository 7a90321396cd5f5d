//! Kernel side of enforcer. Each entry point below is attached to every enrolled cgroup and
//! calls the `try_…` function of its hook module. The entry point is the one place where an
//! error becomes a verdict, and that verdict always fails closed.
#![no_std]
#![no_main]

mod bind;
mod common;
mod connect;
mod getpeername;
mod maps;
mod recvmsg;
mod release;
mod sendmsg;
mod skb;
mod sockops;
mod splice;

use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, sock_ops, stream_verdict},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
};

use crate::common::DENY_CALL;

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    // An error means we could not judge the connect: refuse it (EPERM).
    connect::try_connect::<false>(&ctx).unwrap_or(DENY_CALL)
}

#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    connect::try_connect::<true>(&ctx).unwrap_or(DENY_CALL)
}

#[cgroup_sock_addr(bind4)]
pub fn refuse_bind4(ctx: SockAddrContext) -> i32 {
    // An error means we could not judge the bind: refuse it (EPERM).
    bind::try_bind::<false>(&ctx).unwrap_or(DENY_CALL)
}

#[cgroup_sock_addr(bind6)]
pub fn refuse_bind6(ctx: SockAddrContext) -> i32 {
    bind::try_bind::<true>(&ctx).unwrap_or(DENY_CALL)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn check_sendmsg4(ctx: SockAddrContext) -> i32 {
    sendmsg::try_sendmsg::<false>(&ctx).unwrap_or(DENY_CALL)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn check_sendmsg6(ctx: SockAddrContext) -> i32 {
    sendmsg::try_sendmsg::<true>(&ctx).unwrap_or(DENY_CALL)
}

#[cgroup_sock_addr(getpeername4)]
pub fn restore_getpeername4(ctx: SockAddrContext) -> i32 {
    // getpeername hooks must return 1; a failure leaves the proxy's address visible, which
    // reveals nothing and blocks nothing.
    let _ = getpeername::try_getpeername::<false>(&ctx);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn restore_getpeername6(ctx: SockAddrContext) -> i32 {
    let _ = getpeername::try_getpeername::<true>(&ctx);
    1
}

#[cgroup_sock_addr(recvmsg4)]
pub fn restore_recvmsg4(ctx: SockAddrContext) -> i32 {
    // recvmsg hooks must return 1; a failure leaves the resolver's address visible, and the
    // client library discards the reply (a retry, never a leak).
    let _ = recvmsg::try_recvmsg::<false>(&ctx);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn restore_recvmsg6(ctx: SockAddrContext) -> i32 {
    let _ = recvmsg::try_recvmsg::<true>(&ctx);
    1
}

#[sock_ops]
pub fn track_connect(ctx: SockOpsContext) -> u32 {
    // A failure here leaves the connection without a record; the proxy then closes it.
    let _ = sockops::try_track(&ctx);
    1
}

#[cgroup_sock(sock_release)]
pub fn forget_released(ctx: SockContext) -> i32 {
    release::try_release(&ctx);
    1
}

#[cgroup_skb]
pub fn filter_egress(ctx: SkBuffContext) -> i32 {
    // A packet we cannot parse is dropped.
    skb::try_egress(&ctx).unwrap_or(skb::DROP)
}

#[stream_verdict]
pub fn splice_verdict(ctx: SkBuffContext) -> u32 {
    // Never fails: an end it cannot place is dropped and counted (see `splice.rs`).
    splice::verdict(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
