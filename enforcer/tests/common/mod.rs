//! What the policy tests share: a request under construction, evaluated through the public
//! API.

#![allow(dead_code, reason = "each test file uses part of it")]

use enforcer::policy::{Decision, DecisionKind, Policy, RateLimiter, Request, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue};

/// A request under construction; `url` is split by hand so paths reach the engine raw.
#[derive(Clone)]
pub struct Req {
    pub scheme: Scheme,
    pub method: String,
    pub host: String,
    pub port: u16,
    pub target: String,
    pub headers: HeaderMap,
    pub body: Option<Vec<u8>>,
    pub truncated: bool,
    pub now: jiff::Timestamp,
    /// The executable that made the connection, for `binaries:` rules.
    pub exe: Option<enforcer::sys::FileId>,
}

/// A Monday at 10:00 UTC, inside business hours.
pub const MONDAY_10: &str = "2025-01-06T10:00:00Z";

pub fn req(method: &str, url: &str) -> Req {
    let (scheme, rest) = if let Some(r) = url.strip_prefix("https://") {
        (Scheme::Https, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (Scheme::Http, r)
    } else {
        panic!("test url needs a scheme: {url}")
    };
    let (authority, target) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && p.parse::<u16>().is_ok() => {
            (h.to_owned(), p.parse().unwrap())
        }
        _ => (authority.to_owned(), scheme.default_port()),
    };
    Req {
        scheme,
        method: method.to_owned(),
        host,
        port,
        target: target.to_owned(),
        headers: HeaderMap::new(),
        body: None,
        truncated: false,
        now: MONDAY_10.parse().unwrap(),
        exe: None,
    }
}

impl Req {
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
        self
    }

    pub fn body(mut self, content_type: &str, body: &[u8]) -> Self {
        self = self.header("content-type", content_type);
        self.body = Some(body.to_vec());
        self
    }

    pub fn json(self, body: &str) -> Self {
        self.body("application/json", body.as_bytes())
    }

    pub fn form(self, body: &str) -> Self {
        self.body("application/x-www-form-urlencoded", body.as_bytes())
    }

    /// Made by the executable at `path` (its device and inode).
    pub fn exe(mut self, path: &str) -> Self {
        self.exe = Some(enforcer::sys::FileId::of_path(std::path::Path::new(path)).unwrap());
        self
    }

    pub fn at(mut self, rfc3339: &str) -> Self {
        self.now = rfc3339.parse().unwrap();
        self
    }

    pub fn eval(&self, policy: &Policy, limiter: &RateLimiter) -> Decision {
        policy.evaluate(
            &Request {
                scheme: self.scheme,
                method: &self.method,
                host: &self.host,
                port: self.port,
                path_and_query: &self.target,
                headers: &self.headers,
                body: self.body.as_deref(),
                body_truncated: self.truncated,
                now: self.now,
                exe: self.exe,
            },
            limiter,
        )
    }

    pub fn check(&self, policy: &Policy) -> Decision {
        self.eval(policy, &RateLimiter::new())
    }
}

pub fn policy(yaml: &str) -> Policy {
    Policy::from_yaml(yaml.as_bytes(), "test.yaml").unwrap_or_else(|e| panic!("{e}"))
}

pub fn kind_rule(d: &Decision) -> (DecisionKind, Option<&str>) {
    (d.kind, d.rule.as_deref())
}
