//! Address forms and the one classifier of internal addresses. The DNS rebinding filter, the
//! proxy's internal-destination guard and the policy's view of IP literals all ask
//! [`internal`], so an address cannot be internal to one of them and public to another, and
//! every IPv6 spelling of an IPv4 address is judged as that IPv4 address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// IPv4-mapped IPv6 as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// IPv4 ranges that are not the public internet, with what they are.
const INTERNAL_V4: &[(&str, &str)] = &[
    ("0.0.0.0/8", "this-network (0.0.0.0/8)"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared address space (100.64/10)"),
    ("127.0.0.0/8", "loopback"),
    ("168.63.129.16/32", "Azure metadata"),
    ("169.254.0.0/16", "link-local, cloud metadata"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments (192.0.0/24)"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking (198.18/15)"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved (240/4), broadcast"),
];

/// IPv6 ranges that are not the public internet (forms embedding IPv4 are handled apart).
const INTERNAL_V6: &[(&str, &str)] = &[
    ("::1/128", "loopback"),
    ("::/128", "unspecified"),
    ("100::/64", "discard-only (100::/64)"),
    ("2001:2::/48", "benchmarking (2001:2::/48)"),
    ("2001:db8::/32", "documentation (2001:db8::/32)"),
    ("3fff::/20", "documentation (3fff::/20)"),
    ("64:ff9b:1::/48", "local-use NAT64 (64:ff9b:1::/48)"),
    ("fc00::/7", "unique local (fc00::/7)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated, fec0::/10)"),
    ("ff00::/8", "multicast"),
];

/// The IPv4 addresses an IPv6 address carries, by the form that carries them: IPv4-mapped
/// (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), NAT64 well-known (`64:ff9b::/96`), 6to4
/// (`2002:AABB:CCDD::/48`) and Teredo (`2001::/32`: the server, and the client obfuscated in
/// the last 32 bits).
pub fn embedded_v4(v6: Ipv6Addr) -> Vec<Ipv4Addr> {
    let o = v6.octets();
    let last = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    let seg = v6.segments();
    if let Some(v4) = v6.to_ipv4_mapped() {
        return vec![v4];
    }
    // IPv4-compatible: 96 zero bits then the address (:: and ::1 are not IPv4).
    if seg[..6] == [0; 6] && (seg[6] != 0 || seg[7] > 1) {
        return vec![last];
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return vec![last];
    }
    if seg[0] == 0x2002 {
        return vec![Ipv4Addr::new(o[2], o[3], o[4], o[5])];
    }
    if seg[0] == 0x2001 && seg[1] == 0 {
        let server = Ipv4Addr::new(o[4], o[5], o[6], o[7]);
        let client = Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15]);
        return vec![server, client];
    }
    Vec::new()
}

/// Why `ip` is internal (loopback, private, link-local and metadata, documentation,
/// multicast, ...), or `None` for a public address. An IPv6 address that embeds an IPv4
/// address (see [`embedded_v4`]) is internal when that address is.
pub fn internal(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => {
            for v4 in embedded_v4(v6) {
                if let Some(why) = internal_v4(v4) {
                    return Some(why);
                }
            }
            INTERNAL_V6.iter().find_map(|(net, why)| {
                let net: Ipv6Net = net.parse().expect("static CIDR");
                net.contains(&v6).then_some(*why)
            })
        }
    }
}

fn internal_v4(v4: Ipv4Addr) -> Option<&'static str> {
    INTERNAL_V4.iter().find_map(|(net, why)| {
        let net: Ipv4Net = net.parse().expect("static CIDR");
        net.contains(&v4).then_some(*why)
    })
}

/// Is `ip` within one of `nets`, in any of its spellings (IPv4-mapped, or an IPv4 address an
/// IPv6 form embeds)?
pub fn within(ip: IpAddr, nets: &[IpNet]) -> bool {
    let ip = canonical(ip);
    let mut forms = vec![ip];
    if let IpAddr::V6(v6) = ip {
        forms.extend(embedded_v4(v6).into_iter().map(IpAddr::V4));
    }
    forms.iter().any(|f| nets.iter().any(|n| n.contains(f)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_an_internal_address_is_internal() {
        // (address, internal?)
        let table: &[(&str, bool)] = &[
            ("169.254.169.254", true),
            ("::ffff:169.254.169.254", true),
            ("::169.254.169.254", true),
            ("64:ff9b::a9fe:a9fe", true),
            ("64:ff9b::7f00:1", true),
            ("64:ff9b:1::1", true),
            ("2002:a9fe:a9fe::1", true),
            ("2002:7f00:1::", true),
            // Teredo, client 127.0.0.1 obfuscated (XOR ff): 80ff:fffe.
            ("2001:0:5db8:5db8::80ff:fffe", true),
            // Teredo, server 10.0.0.1.
            ("2001:0:a00:1::", true),
            ("10.1.2.3", true),
            ("172.31.255.255", true),
            ("192.168.0.1", true),
            ("100.64.0.1", true),
            ("127.0.0.53", true),
            ("0.0.0.0", true),
            ("192.0.2.1", true),
            ("198.51.100.7", true),
            ("203.0.113.9", true),
            ("198.18.0.1", true),
            ("224.0.0.251", true),
            ("255.255.255.255", true),
            ("::1", true),
            ("::", true),
            ("fe80::1", true),
            ("fec0::1", true),
            ("fd12::1", true),
            ("ff02::1", true),
            ("2001:db8::1", true),
            ("3fff::1", true),
            ("100::1", true),
            // Public, in every form.
            ("93.184.216.34", false),
            ("::ffff:93.184.216.34", false),
            ("64:ff9b::5db8:d822", false),
            ("2002:5db8:d822::1", false),
            ("2606:2800:220:1::1", false),
            ("172.32.0.1", false),
            ("100.128.0.1", false),
            ("8.8.8.8", false),
        ];
        for (ip, want) in table {
            let got = internal(ip.parse().unwrap());
            assert_eq!(got.is_some(), *want, "{ip}: {got:?}");
        }
    }

    #[test]
    fn within_sees_embedded_addresses() {
        let nets: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(within("10.9.9.9".parse().unwrap(), &nets));
        assert!(within("::ffff:10.9.9.9".parse().unwrap(), &nets));
        assert!(within("64:ff9b::a09:909".parse().unwrap(), &nets));
        assert!(!within("11.0.0.1".parse().unwrap(), &nets));
    }
}
