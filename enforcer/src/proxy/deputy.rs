//! No confused deputy: the proxy runs outside every enrolled cgroup, so the kernel's loopback
//! rule does not protect what the proxy itself connects to. Internal destinations are refused
//! here unless the agent's policy names them explicitly.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::addr::canonical;

/// Ranges the proxy will not connect to on an agent's behalf unless named explicitly.
const INTERNAL: &[(&str, &str)] = &[
    ("127.0.0.0/8", "loopback"),
    ("0.0.0.0/8", "this-network (0.0.0.0)"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared address space (100.64/10)"),
    ("169.254.0.0/16", "link-local, cloud metadata"),
    ("168.63.129.16/32", "Azure metadata"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("::1/128", "loopback"),
    ("::/128", "unspecified"),
    ("fc00::/7", "unique local (fc00::/7)"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
];

/// Checks destinations against the internal ranges and the host's own addresses.
pub struct Deputy {
    ranges: Vec<(IpNet, &'static str)>,
    own: Vec<IpAddr>,
}

impl Deputy {
    /// With the host's current interface addresses.
    pub fn new() -> Self {
        let own = nix::ifaddrs::getifaddrs()
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
                    .collect()
            })
            .unwrap_or_default();
        Self::with_own(own)
    }

    pub fn with_own(own: Vec<IpAddr>) -> Self {
        let ranges = INTERNAL
            .iter()
            .map(|(net, why)| (net.parse().expect("static CIDR"), *why))
            .collect();
        Self { ranges, own }
    }

    /// Why `ip` is internal, or `None` for a public destination. IPv4-mapped IPv6 is judged
    /// as its IPv4 form.
    pub fn internal(&self, ip: IpAddr) -> Option<&'static str> {
        let ip = canonical(ip);
        if self.own.iter().any(|o| canonical(*o) == ip) {
            return Some("one of this host's own addresses");
        }
        self.ranges
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|(_, why)| *why)
    }
}

impl Default for Deputy {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_ranges_are_refused_in_every_form() {
        let d = Deputy::with_own(vec!["192.0.2.10".parse().unwrap()]);
        for ip in [
            "127.0.0.1",
            "::ffff:127.0.0.6",
            "0.0.0.0",
            "::",
            "::1",
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "168.63.129.16",
            "fd00::1",
            "fe80::1",
            "192.0.2.10",
        ] {
            assert!(d.internal(ip.parse().unwrap()).is_some(), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "2606:2800:220:1::1",
            "172.32.0.1",
            "100.128.0.1",
        ] {
            assert!(d.internal(ip.parse().unwrap()).is_none(), "{ip}");
        }
    }
}
