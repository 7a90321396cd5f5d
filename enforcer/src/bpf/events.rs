//! The kernel's rings, read as they fill: refusals ([`read_denials`]) and the programs'
//! aya-log records ([`forward_logs`]).

use std::net::SocketAddr;

use enforcer_common::{DenyEvent, deny_reason};

use super::{comm_str, ip_of};

/// One kernel refusal, as the programs reported it.
#[derive(Debug, Clone)]
pub struct Denial {
    pub agent_id: u32,
    pub pid: u32,
    pub comm: String,
    pub dest: SocketAddr,
    pub reason: u32,
}

impl Denial {
    fn of(ev: &DenyEvent) -> Denial {
        Denial {
            agent_id: ev.agent,
            pid: ev.pid,
            comm: comm_str(&ev.comm),
            dest: SocketAddr::new(ip_of(&ev.addr), ev.port),
            reason: ev.reason,
        }
    }

    /// The reason's name, as logs and records give it.
    pub fn reason_name(&self) -> &'static str {
        match self.reason {
            deny_reason::NOT_ALLOWED => "not_allowed",
            deny_reason::KILLED => "killed",
            deny_reason::LOOPBACK => "loopback",
            deny_reason::UDP => "udp",
            deny_reason::BOUND_TO_DEVICE => "bound_to_device",
            deny_reason::OTHER_NETNS => "other_netns",
            deny_reason::NO_AGENT => "no_agent",
            deny_reason::NOT_READY => "not_ready",
            deny_reason::DNS_OVER_TLS => "dns_over_tls",
            deny_reason::BIND => "bind",
            _ => "unknown",
        }
    }
}

/// Reads kernel refusals from the event ring and hands each to `sink`, until the ring fails.
pub async fn read_denials(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    mut sink: impl FnMut(Denial),
) {
    // SAFETY: the ring owns its descriptor and lives inside the AsyncFd until both drop
    // together, so the fd is never closed while registered.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(
                "cannot poll the kernel event ring: {}; kernel refusals are not audited",
                e
            );
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < size_of::<DenyEvent>() {
                continue;
            }
            // SAFETY: the ring holds DenyEvent records written by the kernel programs; the
            // length was checked and read_unaligned copes with any alignment.
            let ev: DenyEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            sink(Denial::of(&ev));
        }
        guard.clear_ready();
    }
}

/// Forwards the eBPF programs' aya-log records to the daemon's log.
pub async fn forward_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring's descriptor and lives inside the AsyncFd.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut fd) = registered else {
        tracing::debug!("cannot poll the eBPF log ring; kernel diagnostics are not logged");
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
