//! Address forms: every module that compares or classifies an address sees it in one
//! canonical form, the way the kernel programs judge it.

use std::net::IpAddr;

/// IPv4-mapped IPv6 as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}
