//! No confused deputy: the proxy runs outside every enrolled cgroup, so the kernel's loopback
//! rule does not protect what the proxy itself connects to. Internal destinations
//! ([`crate::addr::internal`], and the host's own addresses) are refused here unless the
//! agent's policy names them explicitly, or `dns.allow_internal_answers` covers them (the
//! operator let such answers through the rebinding filter, so they are reachable too).
//!
//! The host's own addresses are followed as they change (DHCP, SLAAC temporary addresses, a
//! new interface): [`Deputy::follow`] subscribes to rtnetlink's address groups and lists the
//! addresses again on every change. The unit starts after `local-fs.target`, before the
//! network may be up; an address added later is refused from the moment the kernel announces
//! it.

use std::{
    net::IpAddr,
    sync::{Arc, RwLock},
};

use ipnet::IpNet;

use crate::addr::canonical;

/// Checks destinations against the internal ranges and the host's own addresses.
pub struct Deputy {
    own: Arc<RwLock<Vec<IpAddr>>>,
    /// `dns.allow_internal_answers`.
    allowed: Vec<IpNet>,
}

/// The host's interface addresses now.
fn own_addresses() -> Vec<IpAddr> {
    nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs
                .filter_map(|a| a.address)
                .filter_map(|s| {
                    if let Some(v4) = s.as_sockaddr_in() {
                        Some(IpAddr::V4(v4.ip()))
                    } else {
                        s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                    }
                })
                .map(canonical)
                .collect()
        })
        .unwrap_or_default()
}

impl Deputy {
    /// With the host's current interface addresses; `allowed` internal ranges are reachable.
    pub fn new(allowed: Vec<IpNet>) -> Self {
        Self {
            own: Arc::new(RwLock::new(own_addresses())),
            allowed,
        }
    }

    pub fn with_own(own: Vec<IpAddr>) -> Self {
        Self {
            own: Arc::new(RwLock::new(own)),
            allowed: Vec::new(),
        }
    }

    /// Follows the host's addresses: a thread listens on rtnetlink's address groups and lists
    /// the addresses again whenever one is added or removed. Fails when the subscription
    /// cannot be made (the addresses are then those of the start, and the caller says so).
    pub fn follow(&self) -> std::io::Result<()> {
        use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
        const RTMGRP_IPV4_IFADDR: u32 = 0x10;
        const RTMGRP_IPV6_IFADDR: u32 = 0x100;
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind(&SocketAddr::new(0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))?;
        let own = self.own.clone();
        // Listed again after subscribing: a change between the first listing and now is not
        // lost.
        *own.write().unwrap_or_else(|e| e.into_inner()) = own_addresses();
        std::thread::Builder::new()
            .name("addr-watch".into())
            .spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match socket.recv(&mut &mut buf[..], 0) {
                        Ok(_) => {
                            let now = own_addresses();
                            tracing::debug!(count = now.len(), "host addresses changed");
                            *own.write().unwrap_or_else(|e| e.into_inner()) = now;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            // ENOBUFS: events were dropped; list again and go on.
                            tracing::debug!("address events: {e}; listing the addresses again");
                            *own.write().unwrap_or_else(|e| e.into_inner()) = own_addresses();
                        }
                    }
                }
            })?;
        Ok(())
    }

    /// Why `ip` is internal, or `None` for a public destination.
    pub fn internal(&self, ip: IpAddr) -> Option<&'static str> {
        let ip = canonical(ip);
        if self
            .own
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&ip)
        {
            return Some("one of this host's own addresses");
        }
        crate::addr::internal(ip)
    }

    /// Why the proxy must not connect to `ip`: internal, and not covered by
    /// `dns.allow_internal_answers`. (A policy naming it explicitly is the caller's check.)
    pub fn refuses(&self, ip: IpAddr) -> Option<&'static str> {
        let why = self.internal(ip)?;
        (!crate::addr::within(ip, &self.allowed)).then_some(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_ranges_and_own_addresses_are_refused_unless_allowed() {
        let d = Deputy {
            own: Arc::new(RwLock::new(vec!["93.184.216.99".parse().unwrap()])),
            allowed: vec!["10.20.0.0/16".parse().unwrap()],
        };
        for ip in [
            "127.0.0.1",
            "::ffff:127.0.0.6",
            "64:ff9b::a9fe:a9fe",
            "10.1.2.3",
            "93.184.216.99",
            "::ffff:93.184.216.99",
        ] {
            assert!(d.refuses(ip.parse().unwrap()).is_some(), "{ip}");
        }
        for ip in [
            "10.20.1.1",
            "::ffff:10.20.1.1",
            "93.184.216.34",
            "2606:2800:220:1::1",
        ] {
            assert!(d.refuses(ip.parse().unwrap()).is_none(), "{ip}");
        }
    }
}
