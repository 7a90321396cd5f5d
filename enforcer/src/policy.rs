//! The policy language: parsing, compilation and evaluation.
//!
//! A policy is a YAML file, a compatible superset of checkrd's format. It is loaded once
//! ([`Policy::load`], [`Policy::from_yaml`]), checked strictly (unknown keys, bad globs, bad
//! regexes, unknown time zones, non-canonical IPv4 hosts and YAML alias bombs are errors that
//! name the file, line, column and rule), compiled into an immutable [`Policy`] shared as
//! `Arc<Policy>`, and then asked questions: the proxy calls [`Policy::evaluate`] for every
//! request, the DNS resolver calls [`Policy::host_match`], the TLS layer
//! [`Policy::host_needs_l7`] and [`Policy::host_decision`], the TCP path
//! [`Policy::tcp_allowed`], and the kernel allowlist [`Policy::kernel_targets`].
//!
//! # Format
//!
//! ```yaml
//! agent: sales-agent          # optional, informational
//! default: deny               # allow | deny (default: deny)
//! mode: enforce               # enforce | dry_run (default: enforce)
//! rules:
//!   - name: read-contacts     # required, unique
//!     allow:                  # exactly one of allow | deny | limit
//!       method: [GET]
//!       url: "api.salesforce.com/*/sobjects/Contact/*"
//!   - name: create-small-charges
//!     allow: { method: [POST], url: "api.stripe.com/v1/charges" }
//!     body: { jsonpath: "$.amount", max: 50000 }
//!   - name: block-all-deletes
//!     deny: { method: [DELETE], url: "*" }
//!   - name: rate-limit
//!     limit: { calls_per_minute: 60, per: endpoint }
//!   - name: business-hours-only
//!     deny: { time_outside: "09:00-17:00", timezone: "UTC" }
//!   - name: postgres
//!     allow: { tcp: "db.internal:5432" }
//! ```
//!
//! ## Top-level keys
//! - `agent`: informational name of the agent. Default: none.
//! - `default`: `allow` or `deny`, the verdict for an HTTP request no rule decides.
//!   Default: `deny`. It does not apply to raw TCP streams (see `tcp` below).
//! - `mode`: `enforce` or `dry_run`. In `dry_run` every decision is computed the same way but
//!   flagged as not enforced ([`Decision::dry_run`]). Default: `enforce`.
//! - `rules`: the list of rules. Default: empty. At most [`MAX_RULES`] rules.
//!
//! ## Rule keys
//! - `name` (required): unique, 1 to 128 characters, no control characters.
//! - exactly one of `allow`, `deny` (a *match*, below) or `limit` (a rate limit, below).
//! - `body` (only with `allow`/`deny` on HTTP): one body constraint or a list; all must hold.
//!
//! ## Match keys (`allow:` / `deny:`)
//! - `method`: a method or a list, case-insensitive, from GET, HEAD, POST, PUT, DELETE, PATCH,
//!   OPTIONS, CONNECT, TRACE. Default: any method. An empty list is an error.
//! - `url`: a URL pattern or a list (any may match). Default: every URL (like `"*"`).
//! - `headers`: map of header name (case-insensitive) to a value glob (`*` matches anything).
//!   In an `allow`, every listed header must be present and each of its values match; in a
//!   `deny`, a header fires when any of its values matches. Default: none.
//! - `time_outside` / `time_inside`: a window `"HH:MM-HH:MM"` (start inclusive, end
//!   exclusive; a window whose end is before its start crosses midnight). The rule only
//!   applies outside / inside the window. At most one of the two. Default: always.
//! - `timezone`: IANA zone name (`"Europe/Paris"`) or `"UTC"` for the window, DST-aware.
//!   Default: `UTC`. Only with a window.
//! - `tcp` (extension): `"HOST:PORT"`, `"HOST:*"`, `"[IPv6]:PORT"`, `"10.0.0.0/8:5432"` or a
//!   list. A `tcp` match judges raw TCP streams only and takes no other key and no `body`.
//!
//! ## URL patterns
//! `[http://|https://]HOST[:PORT][/PATH-GLOB]`, matched against `host[:port]/path` where the
//! port is present only when it is not the scheme's default (80 for `http`, 443 for `https`).
//! - A lone `*` matches every URL, on every port.
//! - HOST is an exact name (IDNA, lowercased), an IP literal (`[v6]` in brackets), `*` (any
//!   host) or `*.example.com` (subdomains at any depth, not `example.com` itself).
//! - PORT is a number or `*`; without it, only the scheme's default port matches.
//! - Without a path, the pattern constrains the host only (any path).
//! - PATH-GLOB: `*` matches within a segment, `**` also crosses `/`, plus `[abc]` and `{a,b}`.
//!   `?`, `#`, `\`, dot segments and `//` are rejected. The query string is never matched.
//! - Request paths are normalised first: `%XX` of unreserved characters decoded, other
//!   escapes upper-cased, `//` collapsed, dot segments removed. A path holding an encoded `/`,
//!   `\` or NUL, a raw `\` or `#`, or a malformed escape is denied as ambiguous.
//!
//! ## Body constraints (`body:`)
//! `jsonpath` (required; `$` then `.name`, `['name']`, `[n]`, `[*]`, `.*`) and at least one
//! operator; all operators of a constraint must hold:
//! `max`, `min` (numbers, inclusive), `eq`, `in`, `not_in` (JSON scalars), `prefix`, `suffix`,
//! `contains` (strings), `regex` (unanchored search, compiled at load, size-limited),
//! `exists` (bool; cannot be combined). There is no type coercion, except in form bodies.
//! A path selecting several values: an `allow` constraint holds when at least one value is
//! selected and every one satisfies it; a `deny` constraint fires when any value satisfies it.
//!
//! Bodies: JSON (`application/json`, `*/*+json`) and `application/x-www-form-urlencoded` (a
//! flat object of strings; a repeated key selects all its values; numeric operators parse
//! numeric strings), optionally gzip- or deflate-encoded, at most [`BODY_INSPECTION_LIMIT`]
//! bytes before and after decoding, parsed at most once per request. A JSON body must be
//! valid JSON throughout; along the paths rules read, objects may not repeat a key and
//! nesting may not pass 128 levels (elsewhere it is only checked for syntax). A body that
//! cannot be inspected (no body, another type, charset or encoding, malformed, too large)
//! makes an `allow` rule with body constraints not match and a `deny` rule with body
//! constraints match; the reason says "body could not be inspected: ...".
//!
//! ## Limits (`limit:`)
//! - exactly one of `calls_per_second`, `calls_per_minute`, `calls_per_hour` (1 to 1,000,000);
//!   a token bucket of that capacity, refilled continuously.
//! - `per`: `agent` (one bucket, the default), `endpoint` (method + `host[:port]` + normalised
//!   path), `body_field` (with `field: JSONPATH`; the selected value) or `header` (with
//!   `header: NAME`; its value). A request without the field or header shares one bucket.
//! - `method`, `url`: only matching requests count. Default: every request.
//!
//! Limits apply to every request that is not denied (also under `default: allow`); buckets
//! live in a [`RateLimiter`] owned by the agent, at most [`MAX_RATE_LIMIT_BUCKETS`] of them.
//!
//! # Semantics
//! Deny overrides: a matching `deny` rule wins whatever its position. Otherwise, if an
//! `allow` rule matches (or `default: allow`), the limits in scope are applied; one over its
//! budget means [`DecisionKind::RateLimited`] with a retry-after. Otherwise the request is
//! [`DecisionKind::DefaultDeny`].

pub mod binaries;
mod body;
mod engine;
mod host;
mod json;
mod jsonpath;
mod limit;
mod load;
mod path;
mod pattern;
mod window;

use std::{fmt, path::PathBuf, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

pub use limit::{MAX_RATE_LIMIT_BUCKETS, RateLimiter};

/// Largest body the engine inspects, before and after decoding. Larger bodies are
/// uninspectable (and fail closed where a body constraint applies).
pub const BODY_INSPECTION_LIMIT: usize = 1 << 20;
/// Largest policy file accepted, in bytes.
pub const MAX_POLICY_BYTES: usize = 1 << 20;
/// Most rules a policy may hold.
pub const MAX_RULES: usize = 10_000;
/// A policy may expand to at most one YAML node per two bytes of its text plus this many,
/// aliases counted at every use. Every document without aliases fits (a node takes at least
/// two bytes); alias bombs ("billion laughs") fail fast with bounded memory.
pub const YAML_NODE_SLACK: usize = 4096;
/// Deepest nesting of flow collections (`[...]`, `{...}`) a policy may have. A real policy
/// nests a few levels; the YAML parser's time grows faster than linearly with flow depth
/// (80 KB of nested `[` took 17 s), so deeper documents are refused by a scan before parsing.
pub const MAX_YAML_DEPTH: usize = 64;

/// A compiled policy: immutable, `Send + Sync`, shared as `Arc<Policy>`.
pub struct Policy {
    file: String,
    sha256: String,
    agent: Option<String>,
    default_allow: bool,
    mode: Mode,
    rules: Vec<engine::Rule>,
    index: engine::Index,
}

/// Whether decisions are enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Decisions are enforced (the default).
    Enforce,
    /// Decisions are computed and logged, never enforced.
    DryRun,
}

/// The scheme of a connection: `Http` for plain connections, `Https` for TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    /// 80 for `Http`, 443 for `Https`.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// Every error of the policy module. Messages name the file, line:column and rule, the fault
/// and what to do.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy {}: {io}; check the path and its permissions", path.display(), io = crate::sys::io_text(source))]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{file}: policy is {size} bytes, over the {MAX_POLICY_BYTES}-byte limit; is it the right file?"
    )]
    TooLarge { file: String, size: usize },
    #[error("{file}:{line}:{column}: policy is not valid UTF-8; save it as UTF-8")]
    NotUtf8 {
        file: String,
        line: usize,
        column: usize,
    },
    #[error("{file}:{line}:{column}: {}{message}", RulePrefix(.rule))]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        rule: Option<String>,
        message: String,
    },
    #[error("{file}: {message}")]
    Document { file: String, message: String },
    #[error("invalid host '{host}': {reason}")]
    InvalidHost { host: String, reason: String },
}

struct RulePrefix<'a>(&'a Option<String>);

impl fmt::Display for RulePrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(rule) => write!(f, "rule '{rule}': "),
            None => Ok(()),
        }
    }
}

/// Answer of [`Policy::host_match`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostMatch {
    /// No rule could allow this host.
    None,
    /// Only a pattern (`*.example.com`, `*`, or `default: allow`) could allow it.
    Wildcard,
    /// An allow rule names this host exactly (a url host or a `tcp:` host).
    Exact,
}

/// The wildcard a name is allowed through, for the resolver's exfiltration limits. See
/// [`Policy::wildcard_scope`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WildcardScope {
    /// The most specific pattern that can allow the name: `*.example.com`, or `*` (url `*`,
    /// a rule without url, or `default: allow`).
    pub pattern: String,
    /// The part of the name the agent chose: the labels left of the pattern's suffix (the
    /// whole name under `*`).
    pub chosen: String,
    /// Some rule that can allow the name says `dns_labels: any`.
    pub labels_any: bool,
}

/// What the kernel allowlist needs. See [`Policy::kernel_targets`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelTargets {
    /// Some rule can allow hosts that cannot be listed (url `*`, `*.example.com`, an allow
    /// rule without url, `default: allow`, a deny-only policy under `default: allow`) or mode
    /// is `dry_run`: the kernel must redirect every TCP destination to the proxy.
    pub redirect_all_tcp: bool,
    /// IP literals and `tcp:` networks (CIDR) named by allow rules, with the port when the
    /// rule fixes one (`None` = any port). A url pattern without a port gives both 80 and 443
    /// (or only the default port of the scheme it names); `HOST:*` gives `None`.
    pub ip_literals: Vec<(ipnet::IpNet, Option<u16>)>,
    /// Exact host names named by allow rules, with ports as above.
    pub exact_hosts: Vec<(String, Option<u16>)>,
}

/// One HTTP request, as the proxy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub scheme: Scheme,
    pub method: &'a str,
    /// From Host / :authority / SNI, without port; the engine canonicalises it.
    pub host: &'a str,
    pub port: u16,
    /// The raw request target; the engine strips the query and normalises the path.
    pub path_and_query: &'a str,
    pub headers: &'a http::HeaderMap,
    /// `None` = not buffered or no body.
    pub body: Option<&'a [u8]>,
    /// True when the body exceeded [`BODY_INSPECTION_LIMIT`] and was cut.
    pub body_truncated: bool,
    pub now: jiff::Timestamp,
    /// The executable that made the connection, as the kernel recorded it (`None`: unknown),
    /// for rules with `binaries:`.
    pub exe: Option<crate::sys::FileId>,
}

/// The kind of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    /// Allowed by a rule or by `default: allow`.
    Allow,
    /// Denied by a deny rule, or by the engine itself (invalid host, ambiguous path).
    Deny,
    /// An allow matched but a limit is over budget.
    RateLimited,
    /// No rule allows it and `default` is `deny`.
    DefaultDeny,
    /// An `ask` rule holds it for a human's approval (`retry_after` is how long).
    Ask,
}

/// The verdict on a request or connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The policy's verdict (computed the same in dry_run).
    pub allowed: bool,
    pub kind: DecisionKind,
    /// The deciding rule. For `default_deny`, the allow rule that matched everything but its
    /// body constraints, if any.
    pub rule: Option<Arc<str>>,
    /// For humans: "denied by rule 'block-all-deletes'" and the like.
    pub reason: String,
    /// Mode is dry_run: the verdict is not enforced.
    pub dry_run: bool,
    /// For `rate_limited`: when a retry could pass. For `ask`: how long the request is held.
    pub retry_after: Option<Duration>,
}

impl Decision {
    /// Should the request be forwarded: allowed, or not enforced (dry_run).
    pub fn forward(&self) -> bool {
        self.allowed || self.dry_run
    }

    /// A denial that holds in every mode, dry run included: the proxy will not act for the
    /// agent towards this destination (an internal address the policy does not name).
    pub fn refused(reason: String) -> Decision {
        Decision {
            allowed: false,
            kind: DecisionKind::Deny,
            rule: None,
            reason,
            dry_run: false,
            retry_after: None,
        }
    }
}

/// Canonical host form used everywhere: ASCII-lowercase, IDNA to punycode, trailing dot
/// removed, IPv6 without brackets. Rejects non-canonical IPv4 forms such as `2130706433`,
/// `0x7f.1` or `127.1`, hosts with a port, and percent-encoded hosts.
pub fn canonical_host(host: &str) -> Result<String, PolicyError> {
    host::canonicalize(host)
        .map(|h| h.into_owned())
        .map_err(|reason| PolicyError::InvalidHost {
            host: host.escape_debug().to_string(),
            reason: reason.to_owned(),
        })
}

impl Policy {
    /// Parses and compiles a policy. `file` names the source in error messages.
    pub fn from_yaml(bytes: &[u8], file: &str) -> Result<Policy, PolicyError> {
        load::from_yaml(bytes, file)
    }

    /// Like [`Policy::load`], but reports every error in the file, not only the first (for
    /// `enforcer policy check`): the first exactly where it is, then each other rule with an
    /// error, checked on its own, at the line where that rule starts.
    pub fn check(path: &std::path::Path) -> Result<Policy, Vec<PolicyError>> {
        let bytes = match Self::read(path) {
            Ok(b) => b,
            Err(e) => return Err(vec![e]),
        };
        let name = path.display().to_string();
        match Self::from_yaml(&bytes, &name) {
            Ok(p) => Ok(p),
            Err(first) => Err(load::all_errors(first, &bytes, &name)),
        }
    }

    /// Reads, parses and compiles a policy file.
    pub fn load(path: &std::path::Path) -> Result<Policy, PolicyError> {
        let bytes = Self::read(path)?;
        Self::from_yaml(&bytes, &path.display().to_string())
    }

    /// A policy file's bytes, refused past [`MAX_POLICY_BYTES`] without reading it all.
    fn read(path: &std::path::Path) -> Result<Vec<u8>, PolicyError> {
        use std::io::Read;
        let read_err = |source| PolicyError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let size = file.metadata().map_or(0, |m| m.len());
        // Read one byte past the cap so an oversized file is refused without reading it all.
        let mut bytes = Vec::new();
        file.take(MAX_POLICY_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        let name = path.display().to_string();
        if bytes.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge {
                file: name,
                size: usize::try_from(size).unwrap_or(usize::MAX).max(bytes.len()),
            });
        }
        Ok(bytes)
    }

    /// Lowercase hex SHA-256 of the policy file's bytes.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The file name given at load time.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The rules' names, in file order.
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| &*r.name)
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Does this policy allow nothing at all: `default: deny`, enforced, and no allow rule?
    pub fn denies_everything(&self) -> bool {
        !self.default_allow
            && self.mode == Mode::Enforce
            && !self.rules.iter().any(|r| r.action.may_allow())
    }

    pub fn agent(&self) -> Option<&str> {
        self.agent.as_deref()
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Full per-request decision. `limiter` holds rate-limit state; it belongs to the agent,
    /// is shared by all its connections and survives policy reloads (buckets are keyed by
    /// rule name).
    pub fn evaluate(&self, req: &Request<'_>, limiter: &RateLimiter) -> Decision {
        engine::evaluate(self, req, limiter)
    }

    /// Does any rule need the request body for this request, so the proxy buffers bodies
    /// only when needed? Conservative: header and time conditions are not looked at. `path`
    /// is the raw request target.
    pub fn needs_body(
        &self,
        scheme: Scheme,
        host: &str,
        port: u16,
        method: &str,
        path: &str,
    ) -> bool {
        engine::needs_body(self, scheme, host, port, method, path)
    }

    /// DNS: could an allow rule (or `default: allow`) allow this host name, on some port?
    /// `Exact` when an allow rule names it exactly (url host or `tcp:` host), `Wildcard` when
    /// only a pattern could. Deny rules are not looked at, and neither is the mode: a caller
    /// that enforces on this answer must check [`Policy::mode`] for `dry_run` itself.
    pub fn host_match(&self, host: &str) -> HostMatch {
        engine::host_match(self, host)
    }

    /// DNS: for a name [`host_match`](Self::host_match) answers `Wildcard` for, the pattern
    /// it is allowed through and whether labels there are unrestricted.
    pub fn wildcard_scope(&self, host: &str) -> WildcardScope {
        engine::wildcard_scope(self, host)
    }

    /// Does an allow rule name `host` exactly (not through a wildcard) for `port`: a URL
    /// pattern with that host and a port spec covering it (no port: 80 or 443), or a `tcp:`
    /// target with that host and port?
    pub fn names_exactly(&self, host: &str, port: u16) -> bool {
        engine::names_exactly(self, host, port)
    }

    /// TLS: does this host need L7 inspection (a method, path, header, body, time-window or
    /// limit rule could apply to it) or is a host-level decision enough (SNI splice)?
    pub fn host_needs_l7(&self, scheme: Scheme, host: &str, port: u16) -> bool {
        engine::host_needs_l7(self, scheme, host, port)
    }

    /// Host-level decision for a connection (SNI or first Host header) at time `now`:
    /// allowed when some allow rule could match this host:port (its time window active) and
    /// no deny rule that applies to every request on it (no method, path, header or body
    /// constraint, time window active) matches.
    pub fn host_decision(
        &self,
        scheme: Scheme,
        host: &str,
        port: u16,
        now: jiff::Timestamp,
        exe: Option<crate::sys::FileId>,
    ) -> Decision {
        engine::host_decision(self, scheme, host, port, now, exe)
    }

    /// `tcp:` rules: is this destination (host name or IP literal, port) allowed? Returns the
    /// allowing rule's name. A `tcp:` deny rule wins; `default` does not apply (a stream the
    /// proxy cannot parse is allowed only by an explicit `tcp:` rule).
    pub fn tcp_allowed(
        &self,
        host: &str,
        port: u16,
        exe: Option<crate::sys::FileId>,
    ) -> Option<&str> {
        engine::tcp_allowed(self, host, port, exe)
    }

    /// `tcp:` rules as a decision: allowed by the first rule that allows one of `hosts` (the
    /// names the destination address was resolved for, and the address itself) on `port`.
    pub fn tcp_decision(
        &self,
        hosts: &[String],
        port: u16,
        exe: Option<crate::sys::FileId>,
    ) -> Option<Decision> {
        let rule: Arc<str> = Arc::from(hosts.iter().find_map(|h| self.tcp_allowed(h, port, exe))?);
        let reason = format!("allowed by rule '{rule}'");
        Some(self.decision(DecisionKind::Allow, Some(&rule), reason, None))
    }

    /// For a request rebuilt from the audit log (header names only, no body, no query): the
    /// rule whose verdict needs data the log does not keep, if the decision hinges on one
    /// (`policy replay` reports such a request as undetermined).
    pub fn unrecorded_dependency(&self, req: &Request<'_>) -> Option<Arc<str>> {
        engine::unrecorded_dependency(self, req)
    }

    /// The values of the body fields rule `rule` names, in `req` (for a held request).
    pub fn rule_fields(&self, rule: &str, req: &Request<'_>) -> Vec<(String, String)> {
        engine::rule_fields(self, rule, req)
    }

    /// A denial made outside the rules (the host does not belong to the address, opaque TCP,
    /// TLS that cannot be inspected), flagged for dry run like the engine's own.
    pub fn refusal(&self, reason: String) -> Decision {
        self.decision(DecisionKind::Deny, None, reason, None)
    }

    /// What the kernel allowlist needs. Only allow rules name destinations; deny and limit
    /// rules are judged by the proxy.
    pub fn kernel_targets(&self) -> KernelTargets {
        engine::kernel_targets(self)
    }

    fn decision(
        &self,
        kind: DecisionKind,
        rule: Option<&Arc<str>>,
        reason: String,
        retry_after: Option<Duration>,
    ) -> Decision {
        Decision {
            allowed: kind == DecisionKind::Allow,
            kind,
            rule: rule.cloned(),
            reason,
            dry_run: self.mode == Mode::DryRun,
            retry_after,
        }
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("file", &self.file)
            .field("sha256", &self.sha256)
            .field("agent", &self.agent)
            .field("default_allow", &self.default_allow)
            .field("mode", &self.mode)
            .field("rules", &self.rules.len())
            .finish()
    }
}
