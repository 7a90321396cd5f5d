//! Host names: the canonical form, and the host part of patterns.

use std::{borrow::Cow, net::Ipv6Addr};

/// Longest host name accepted (DNS limit).
const MAX_HOST_LEN: usize = 253;

/// Canonical form of a host (see [`super::canonical_host`]). Borrows when the input is
/// already canonical, which is the common case on the request path.
pub(crate) fn canonicalize(host: &str) -> Result<Cow<'_, str>, &'static str> {
    let trimmed = host.strip_suffix('.').unwrap_or(host);
    if trimmed.is_empty() {
        return Err("empty host name");
    }
    if is_plain_ldh(trimmed) {
        return Ok(Cow::Borrowed(trimmed));
    }
    // A dotted quad is canonical when it prints back the same (std reads only four decimal
    // octets, without leading zeros); the URL parser below would only confirm it, slowly.
    if let Ok(v4) = trimmed.parse::<std::net::Ipv4Addr>()
        && v4.to_string() == trimmed
    {
        return Ok(Cow::Borrowed(trimmed));
    }
    if let Some(inner) = trimmed.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or("unbalanced '[' in IPv6 literal")?;
        return ipv6(inner);
    }
    if trimmed.contains(':') {
        // Either a bare IPv6 literal or a host with a port; the latter is refused so that a
        // port can never hide inside the name.
        return ipv6(trimmed).map_err(|_| "contains ':' (give the host without a port)");
    }
    if trimmed.contains('%') {
        // The URL standard would percent-decode it; a name that needs decoding is ambiguous.
        return Err("percent-encoded host names are not accepted");
    }
    if trimmed.len() > MAX_HOST_LEN * 4 {
        return Err("host name longer than 253 bytes");
    }
    match url::Host::parse(trimmed) {
        Ok(url::Host::Domain(domain)) => {
            if domain.len() > MAX_HOST_LEN {
                return Err("host name longer than 253 bytes");
            }
            if domain.split('.').any(|l| l.is_empty() || l.len() > 63) {
                return Err("empty label or label longer than 63 bytes");
            }
            Ok(Cow::Owned(domain))
        }
        Ok(url::Host::Ipv4(addr)) => {
            // The URL standard reads 2130706433, 0x7f.1 and 127.1 as 127.0.0.1. Other
            // software reads them differently, so only the dotted-quad form is accepted.
            let canonical = addr.to_string();
            if canonical == trimmed {
                Ok(Cow::Owned(canonical))
            } else {
                Err("non-canonical IPv4 address (write it as four decimal numbers, a.b.c.d)")
            }
        }
        Ok(url::Host::Ipv6(_)) => Err("IPv6 literal in an unexpected form"),
        Err(url::ParseError::InvalidIpv4Address) => Err("invalid IPv4 address"),
        Err(url::ParseError::IdnaError) => Err("invalid internationalised domain name"),
        Err(_) => Err("invalid host name"),
    }
}

fn ipv6(text: &str) -> Result<Cow<'static, str>, &'static str> {
    // std's parser refuses zone ids and other non-address forms; its Display is RFC 5952.
    // An IPv4-mapped address is the IPv4 host it reaches, so it is written as that: a rule on
    // 192.0.2.1 must also judge [::ffff:192.0.2.1] (the proxy maps socket addresses alike).
    text.parse::<Ipv6Addr>()
        .map(|a| match a.to_ipv4_mapped() {
            Some(v4) => Cow::Owned(v4.to_string()),
            None => Cow::Owned(a.to_string()),
        })
        .map_err(|_| "invalid IPv6 address")
}

/// Lowercase LDH labels, none punycode, the last one starting with a letter (so it cannot be
/// read as a number): already canonical, and `url::Host::parse` would return it unchanged.
fn is_plain_ldh(host: &str) -> bool {
    if host.len() > MAX_HOST_LEN {
        return false;
    }
    let mut last_label = "";
    for label in host.split('.') {
        if label.is_empty()
            || label.len() > 63
            || label.starts_with("xn--")
            || !label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return false;
        }
        last_label = label;
    }
    last_label.as_bytes()[0].is_ascii_lowercase()
}

/// The host part of a URL pattern or `tcp:` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostPattern {
    /// `*`: every host.
    Any,
    /// A canonical host name or IP literal.
    Exact(String),
    /// `*.example.com`, stored as `example.com`: subdomains at any depth.
    Suffix(String),
}

impl HostPattern {
    pub(crate) fn parse(text: &str) -> Result<HostPattern, String> {
        if text == "*" {
            return Ok(HostPattern::Any);
        }
        if let Some(suffix) = text.strip_prefix("*.") {
            if suffix.contains('*') {
                return Err(format!(
                    "host '{text}': '*' must be the whole leftmost label ('*.example.com') or the whole host"
                ));
            }
            let canonical = canonicalize(suffix).map_err(|e| format!("host '{text}': {e}"))?;
            if canonical.parse::<std::net::IpAddr>().is_ok() {
                return Err(format!(
                    "host '{text}': a wildcard cannot stand in front of an IP address"
                ));
            }
            return Ok(HostPattern::Suffix(canonical.into_owned()));
        }
        if text.contains('*') {
            return Err(format!(
                "host '{text}': '*' must be the whole leftmost label ('*.example.com') or the whole host"
            ));
        }
        let canonical = canonicalize(text).map_err(|e| format!("host '{text}': {e}"))?;
        Ok(HostPattern::Exact(canonical.into_owned()))
    }

    /// `host` must be canonical.
    pub(crate) fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(h) => h == host,
            HostPattern::Suffix(s) => {
                host.len() > s.len() + 1
                    && host.ends_with(s.as_str())
                    && host.as_bytes()[host.len() - s.len() - 1] == b'.'
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms() {
        for (input, want) in [
            ("example.com", "example.com"),
            ("Example.COM.", "example.com"),
            ("bücher.example", "xn--bcher-kva.example"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("127.0.0.1", "127.0.0.1"),
            ("[::1]", "::1"),
            ("::1", "::1"),
            ("[2001:DB8:0:0:0:0:0:1]", "2001:db8::1"),
            ("[::ffff:192.0.2.1]", "192.0.2.1"),
            ("::FFFF:c000:0201", "192.0.2.1"),
            ("a_b.example", "a_b.example"),
            ("1a.example", "1a.example"),
        ] {
            assert_eq!(canonicalize(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn rejected_forms() {
        for input in [
            "",
            ".",
            "2130706433",
            "0x7f.1",
            "127.1",
            "0177.0.0.1",
            "127.000.0.1",
            "1.2.3.4.5",
            "example.com:443",
            "[::1",
            "fe80::1%eth0",
            "ex%61mple.com",
            "a..b",
            "exa mple.com",
            "a/b",
        ] {
            assert!(canonicalize(input).is_err(), "{input} should be rejected");
        }
    }

    #[test]
    fn suffix_pattern_depth() {
        let p = HostPattern::parse("*.example.com").unwrap();
        assert!(p.matches("a.example.com"));
        assert!(p.matches("a.b.example.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("badexample.com"));
        assert!(!p.matches("example.com.evil.net"));
        assert!(HostPattern::parse("api-*.example.com").is_err());
        assert!(HostPattern::parse("a.*.com").is_err());
        assert!(HostPattern::parse("*.10.0.0.1").is_err());
    }
}
