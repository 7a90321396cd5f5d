//! `sk_skb/stream_verdict` on `SPLICE_SOCKS`: moves the bytes of a connection the proxy has
//! decided to splice (TLS judged on its SNI, `tcp:` rules) from one of the daemon's sockets to
//! the other without a copy through user space, as Cilium and Merbridge accelerate local
//! traffic. Each skb received on an end is sent out of its peer (the egress path of the
//! other socket), counted, or dropped while the agent's kill switch is engaged.
//!
//! The daemon writes both ends' `SPLICE_ENDS` records before it puts either socket in the
//! sockhash, so a socket in the map without a record is a daemon bug or a race on teardown:
//! its data is handed to the socket's own queue (`SK_PASS`), where user space sees it.

use aya_ebpf::{
    EbpfContext, bindings::sk_action, helpers::generated::bpf_get_socket_cookie,
    programs::SkBuffContext,
};

use crate::{
    common::{agent_state, config, killed},
    maps::{SPLICE_ENDS, SPLICE_SOCKS},
};

pub fn verdict(ctx: &SkBuffContext) -> u32 {
    // SAFETY: plain helper call on a valid skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(end) = SPLICE_ENDS.get_ptr_mut(cookie) else {
        return sk_action::SK_PASS;
    };
    let len = u64::from(ctx.len());
    if len == 0 {
        // A bare FIN: there is nothing to send, and the kernel's sender treats a zero-length
        // skb as a broken pipe on the peer. User space passes the FIN on (`shutdown`).
        return sk_action::SK_DROP;
    }
    // SAFETY: `end` points into a live map value. Only this end's own socket's verdict
    // writes it, and the kernel runs a socket's data-ready callback (and so this program)
    // under that socket's lock, one skb batch at a time: the plain additions below never race
    // each other. User space only reads. (The BPF target has no atomic read-modify-write in
    // core.)
    let (peer, agent) = unsafe { ((*end).peer, (*end).agent) };
    let add = |field: *mut u64| {
        // SAFETY: see above; `field` points into the same map value.
        unsafe { field.write_volatile(field.read_volatile() + len) }
    };
    // SAFETY: raw field pointers into the live value, no reference is made.
    let (bytes, dropped) = unsafe { (&raw mut (*end).bytes, &raw mut (*end).dropped) };
    // No configuration or no such agent: nothing may pass. (Early returns, not a match on the
    // pair: LLVM turns that into pointer masking, which the verifier refuses.)
    let stopped = match config() {
        None => true,
        Some(cfg) => match agent_state(agent) {
            None => true,
            Some(state) => killed(cfg, state),
        },
    };
    if stopped {
        add(dropped);
        return sk_action::SK_DROP;
    }
    let mut key = peer;
    // Flags 0: out of the peer socket (its egress), not into its receive queue.
    let action = SPLICE_SOCKS.redirect_skb(ctx, &mut key, 0);
    if action == i64::from(sk_action::SK_PASS) {
        add(bytes);
        sk_action::SK_PASS
    } else {
        // The peer is not (or no longer) in the sockhash: the bytes cannot go anywhere.
        add(dropped);
        sk_action::SK_DROP
    }
}
