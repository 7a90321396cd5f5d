//! Matchers of a rule: methods, URL patterns, header globs and `tcp:` targets.

use globset::{GlobBuilder, GlobMatcher};
use http::{HeaderMap, HeaderName};
use ipnet::IpNet;

use super::{Scheme, host::HostPattern, path};

/// The methods a rule may name.
pub(crate) const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];

/// A set of [`METHODS`], as bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MethodSet(u16);

impl MethodSet {
    pub(crate) const EMPTY: MethodSet = MethodSet(0);

    pub(crate) fn parse_one(text: &str) -> Result<MethodSet, String> {
        method_bit(text).map(MethodSet).ok_or_else(|| {
            format!(
                "unknown method '{}' (expected one of {})",
                text.escape_debug(),
                METHODS.join(", ")
            )
        })
    }

    pub(crate) fn union(self, other: MethodSet) -> MethodSet {
        MethodSet(self.0 | other.0)
    }

    /// Does the set hold this request method (compared case-insensitively, so `delete`
    /// cannot slip past a deny on DELETE)?
    pub(crate) fn contains(self, method: &str) -> bool {
        method_bit(method).is_some_and(|b| self.0 & b != 0)
    }
}

fn method_bit(method: &str) -> Option<u16> {
    METHODS
        .iter()
        .position(|m| m.eq_ignore_ascii_case(method))
        .map(|i| 1 << i)
}

/// Port part of a URL pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PortSpec {
    /// No port written: the scheme's default port only.
    Default,
    Exact(u16),
    Any,
}

/// Path part of a URL pattern.
#[derive(Debug, Clone)]
pub(crate) enum PathPattern {
    Exact(String),
    Glob(GlobMatcher),
}

impl PathPattern {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(p) => p == path,
            PathPattern::Glob(g) => g.is_match(path),
        }
    }
}

/// `[scheme://]host[:port][/path-glob]`, or a lone `*`.
#[derive(Debug, Clone)]
pub(crate) struct UrlPattern {
    pub(crate) scheme: Option<Scheme>,
    pub(crate) host: HostPattern,
    pub(crate) port: PortSpec,
    /// `None`: any path (the pattern constrains the host only).
    pub(crate) path: Option<PathPattern>,
}

impl UrlPattern {
    pub(crate) fn parse(text: &str) -> Result<UrlPattern, String> {
        if text == "*" {
            return Ok(UrlPattern {
                scheme: None,
                host: HostPattern::Any,
                port: PortSpec::Any,
                path: None,
            });
        }
        let lower = text.get(..8).unwrap_or(text).to_ascii_lowercase();
        let (scheme, rest) = if lower.starts_with("https://") {
            (Some(Scheme::Https), &text[8..])
        } else if lower.starts_with("http://") {
            (Some(Scheme::Http), &text[7..])
        } else if text.contains("://") {
            return Err(format!(
                "url pattern '{text}': only http:// and https:// schemes can be written"
            ));
        } else {
            (None, text)
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i..])),
            None => (rest, None),
        };
        if authority.is_empty() {
            return Err(format!(
                "url pattern '{text}' has no host (write \"*/path\" for any host)"
            ));
        }
        if authority.contains('@') {
            return Err(format!("url pattern '{text}': user info is not allowed"));
        }
        let (host, port) =
            split_port(authority).map_err(|e| format!("url pattern '{text}': {e}"))?;
        let port = match port {
            None => PortSpec::Default,
            Some(None) => PortSpec::Any,
            Some(Some(p)) => PortSpec::Exact(p),
        };
        let host = HostPattern::parse(host).map_err(|e| format!("url pattern '{text}': {e}"))?;
        let path = match path {
            None => None,
            Some(p) => {
                let p =
                    path::normalize_pattern(p).map_err(|e| format!("url pattern '{text}': {e}"))?;
                if p.contains(['*', '[', '{']) {
                    let glob = GlobBuilder::new(&p)
                        .literal_separator(true)
                        .backslash_escape(false)
                        .build()
                        .map_err(|e| format!("url pattern '{text}': invalid glob: {}", e.kind()))?;
                    Some(PathPattern::Glob(glob.compile_matcher()))
                } else {
                    Some(PathPattern::Exact(p))
                }
            }
        };
        Ok(UrlPattern {
            scheme,
            host,
            port,
            path,
        })
    }

    /// Does the pattern match this host and port (any path)? `host` must be canonical.
    pub(crate) fn matches_host(&self, scheme: Scheme, host: &str, port: u16) -> bool {
        self.scheme.is_none_or(|s| s == scheme)
            && match self.port {
                PortSpec::Default => port == scheme.default_port(),
                PortSpec::Exact(p) => port == p,
                PortSpec::Any => true,
            }
            && self.host.matches(host)
    }

    /// `path` must be normalised.
    pub(crate) fn matches(&self, scheme: Scheme, host: &str, port: u16, path: &str) -> bool {
        self.matches_host(scheme, host, port) && self.path.as_ref().is_none_or(|p| p.matches(path))
    }

    /// The ports a kernel allowlist needs for this pattern (`None` = any port).
    pub(crate) fn kernel_ports(&self) -> Vec<Option<u16>> {
        match (self.port, self.scheme) {
            (PortSpec::Any, _) => vec![None],
            (PortSpec::Exact(p), _) => vec![Some(p)],
            (PortSpec::Default, Some(s)) => vec![Some(s.default_port())],
            (PortSpec::Default, None) => vec![Some(80), Some(443)],
        }
    }
}

/// Splits `host[:port]` (IPv6 in brackets). `Some(None)` is the port `*`.
fn split_port(authority: &str) -> Result<(&str, Option<Option<u16>>), String> {
    let (host, port) = if authority.starts_with('[') {
        let end = authority
            .find(']')
            .ok_or("unbalanced '[' in IPv6 literal")?;
        let after = &authority[end + 1..];
        match after.strip_prefix(':') {
            Some(port) => (&authority[..=end], Some(port)),
            None if after.is_empty() => (authority, None),
            None => return Err(format!("unexpected '{after}' after the IPv6 literal")),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => None,
        Some("*") => Some(None),
        Some(p) => Some(Some(parse_port(p)?)),
    };
    Ok((host, port))
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(p) if p > 0 && !text.starts_with(['+', '0']) => Ok(p),
        _ => Err(format!(
            "port '{text}' is not a number from 1 to 65535 or '*'"
        )),
    }
}

/// A header constraint: a name and a value glob.
#[derive(Debug, Clone)]
pub(crate) struct HeaderMatch {
    pub(crate) name: HeaderName,
    glob: GlobMatcher,
}

impl HeaderMatch {
    pub(crate) fn parse_name(text: &str) -> Result<HeaderName, String> {
        HeaderName::from_bytes(text.as_bytes())
            .map_err(|_| format!("'{}' is not a valid header name", text.escape_debug()))
    }

    /// Compiles a header value glob: `*` matches anything, `/` included.
    pub(crate) fn value_glob(text: &str) -> Result<GlobMatcher, String> {
        GlobBuilder::new(text)
            .literal_separator(false)
            .backslash_escape(true)
            .build()
            .map(|g| g.compile_matcher())
            .map_err(|e| format!("invalid header value glob '{text}': {}", e.kind()))
    }

    pub(crate) fn new(name: HeaderName, glob: GlobMatcher) -> HeaderMatch {
        HeaderMatch { name, glob }
    }

    /// For an allow rule: the header is present and every value matches. A value that is not
    /// UTF-8 cannot be matched, so it fails.
    pub(crate) fn holds_all(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(&self.name).iter().peekable();
        values.peek().is_some()
            && values
                .all(|v| std::str::from_utf8(v.as_bytes()).is_ok_and(|s| self.glob.is_match(s)))
    }

    /// For a deny rule: some value matches. A value that is not UTF-8 counts as matching
    /// (fails closed).
    pub(crate) fn holds_any(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(&self.name)
            .iter()
            .any(|v| std::str::from_utf8(v.as_bytes()).map_or(true, |s| self.glob.is_match(s)))
    }
}

/// The host of a `tcp:` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TcpHost {
    Name(HostPattern),
    Net(IpNet),
}

/// `HOST:PORT` of a `tcp:` rule (`None` port = any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TcpTarget {
    pub(crate) host: TcpHost,
    pub(crate) port: Option<u16>,
}

impl TcpTarget {
    pub(crate) fn parse(text: &str) -> Result<TcpTarget, String> {
        let err = |e: String| format!("tcp target '{text}': {e}");
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (inner, after) = rest
                .split_once(']')
                .ok_or_else(|| err("unbalanced '[' in IPv6 literal".into()))?;
            (inner, after.strip_prefix(':'))
        } else {
            match text.rsplit_once(':') {
                Some((h, _)) if h.contains(':') => {
                    return Err(err("write an IPv6 address in brackets: [ADDR]:PORT".into()));
                }
                Some((h, p)) => (h, Some(p)),
                None => (text, None),
            }
        };
        let port = match port {
            None => {
                return Err(err("needs a port: HOST:PORT, or HOST:* for any port".into()));
            }
            Some("*") => None,
            Some(p) => Some(parse_port(p).map_err(err)?),
        };
        let host = if host.contains('/') {
            let net: IpNet = host
                .parse()
                .map_err(|_| err(format!("'{host}' is not an IP network like 10.0.0.0/8")))?;
            if net != net.trunc() {
                return Err(err(format!(
                    "'{host}' has host bits set; write {}",
                    net.trunc()
                )));
            }
            TcpHost::Net(net)
        } else {
            match HostPattern::parse(host).map_err(err)? {
                HostPattern::Exact(h) => match h.parse::<std::net::IpAddr>() {
                    Ok(ip) => TcpHost::Net(IpNet::from(ip)),
                    Err(_) => TcpHost::Name(HostPattern::Exact(h)),
                },
                other => TcpHost::Name(other),
            }
        };
        Ok(TcpTarget { host, port })
    }

    /// `host` must be canonical; `ip` is it parsed, if it is an IP literal.
    pub(crate) fn matches(&self, host: &str, ip: Option<std::net::IpAddr>, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
            && match (&self.host, ip) {
                (TcpHost::Net(net), Some(ip)) => net.contains(&ip),
                (TcpHost::Net(_), None) => false,
                (TcpHost::Name(HostPattern::Any), _) => true,
                (TcpHost::Name(pattern), None) => pattern.matches(host),
                (TcpHost::Name(_), Some(_)) => false,
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, scheme: Scheme, host: &str, port: u16, path: &str) -> bool {
        UrlPattern::parse(pattern)
            .unwrap()
            .matches(scheme, host, port, path)
    }

    #[test]
    fn url_patterns() {
        use Scheme::{Http, Https};
        for (pattern, scheme, host, port, path, want) in [
            ("*", Https, "a.com", 8443, "/x/y", true),
            (
                "api.stripe.com/v1/charges",
                Https,
                "api.stripe.com",
                443,
                "/v1/charges",
                true,
            ),
            (
                "api.stripe.com/v1/charges",
                Https,
                "api.stripe.com",
                443,
                "/v1/charges/x",
                false,
            ),
            (
                "api.stripe.com/v1/charges",
                Http,
                "api.stripe.com",
                80,
                "/v1/charges",
                true,
            ),
            (
                "api.stripe.com/v1/charges",
                Https,
                "api.stripe.com",
                8443,
                "/v1/charges",
                false,
            ),
            (
                "api.stripe.com/v1/charges",
                Http,
                "api.stripe.com",
                443,
                "/v1/charges",
                false,
            ),
            (
                "api.x.com:8443/v1/*",
                Https,
                "api.x.com",
                8443,
                "/v1/a",
                true,
            ),
            (
                "api.x.com:8443/v1/*",
                Https,
                "api.x.com",
                443,
                "/v1/a",
                false,
            ),
            ("api.x.com:*", Http, "api.x.com", 1234, "/", true),
            ("https://api.x.com", Http, "api.x.com", 80, "/", false),
            ("https://api.x.com", Https, "api.x.com", 443, "/", true),
            ("HTTP://API.X.COM/A", Http, "api.x.com", 80, "/A", true),
            (
                "a.com/*/sobjects/Contact/*",
                Https,
                "a.com",
                443,
                "/v5/sobjects/Contact/1",
                true,
            ),
            (
                "a.com/*/sobjects/Contact/*",
                Https,
                "a.com",
                443,
                "/v5/x/sobjects/Contact/1",
                false,
            ),
            (
                "a.com/**/Contact/*",
                Https,
                "a.com",
                443,
                "/v5/x/sobjects/Contact/1",
                true,
            ),
            ("a.com/v1/**", Https, "a.com", 443, "/v1/a/b/c", true),
            ("a.com/v1/**", Https, "a.com", 443, "/v2/a", false),
            ("a.com/v1/{a,b}", Https, "a.com", 443, "/v1/b", true),
            ("a.com/v1/%7euser", Https, "a.com", 443, "/v1/~user", true),
            (
                "*.openai.com",
                Https,
                "api.openai.com",
                443,
                "/anything/at/all",
                true,
            ),
            ("*.openai.com", Https, "openai.com", 443, "/", false),
            ("*.openai.com", Https, "a.b.openai.com", 443, "/", true),
            (
                "*.openai.com",
                Https,
                "openai.com.evil.net",
                443,
                "/",
                false,
            ),
            ("*/admin/*", Https, "any.host", 443, "/admin/x", true),
            ("[::1]:8080/x", Http, "::1", 8080, "/x", true),
            ("10.0.0.1", Https, "10.0.0.1", 443, "/", true),
        ] {
            assert_eq!(
                m(pattern, scheme, host, port, path),
                want,
                "{pattern} vs {host}:{port}{path}"
            );
        }
    }

    #[test]
    fn bad_url_patterns() {
        for p in [
            "",
            "/v1",
            "ftp://a.com",
            "a.com:0",
            "a.com:99999",
            "a.com:x",
            "u@a.com",
            "api-*.a.com",
            "a.com/x?y",
            "a.com/a/../b",
            "a.com/[",
            "127.1/x",
            "0x7f.1",
            "2130706433",
            "[::1",
            "a.com/x\\y",
        ] {
            assert!(UrlPattern::parse(p).is_err(), "{p} should be refused");
        }
    }

    #[test]
    fn methods() {
        let s = MethodSet::parse_one("get")
            .unwrap()
            .union(MethodSet::parse_one("DELETE").unwrap());
        assert!(s.contains("GET"));
        assert!(s.contains("delete"));
        assert!(!s.contains("POST"));
        assert!(!s.contains("FOO"));
        assert!(MethodSet::parse_one("GRT").is_err());
    }

    #[test]
    fn headers_multi_value() {
        let h = HeaderMatch::new(
            HeaderName::from_static("x-tenant"),
            HeaderMatch::value_glob("acme-*").unwrap(),
        );
        let mut map = HeaderMap::new();
        assert!(!h.holds_all(&map));
        assert!(!h.holds_any(&map));
        map.append("x-tenant", "acme-1".parse().unwrap());
        assert!(h.holds_all(&map));
        map.append("x-tenant", "evil".parse().unwrap());
        assert!(!h.holds_all(&map));
        assert!(h.holds_any(&map));
        let mut odd = HeaderMap::new();
        odd.append(
            "x-tenant",
            http::HeaderValue::from_bytes(b"acme-\xff").unwrap(),
        );
        assert!(!h.holds_all(&odd));
        assert!(h.holds_any(&odd));
    }

    #[test]
    fn tcp_targets() {
        let t = TcpTarget::parse("db.internal:5432").unwrap();
        assert!(t.matches("db.internal", None, 5432));
        assert!(!t.matches("db.internal", None, 5433));
        let t = TcpTarget::parse("10.0.0.0/8:*").unwrap();
        assert!(t.matches("10.1.2.3", "10.1.2.3".parse().ok(), 22));
        assert!(!t.matches("11.1.2.3", "11.1.2.3".parse().ok(), 22));
        let t = TcpTarget::parse("[fd00::1]:5432").unwrap();
        assert!(t.matches("fd00::1", "fd00::1".parse().ok(), 5432));
        for bad in [
            "db.internal",
            "10.0.0.1/8:1",
            "127.1:5",
            "db:0",
            "[::1:5",
            "fd00::1:5432",
        ] {
            assert!(TcpTarget::parse(bad).is_err(), "{bad}");
        }
    }
}
