//! Compiled rules, the host index, and every question the policy answers.

use crate::policy::pattern::PortSpec;
use std::{cell::OnceCell, collections::HashMap, net::IpAddr, sync::Arc};

use http::HeaderName;
use ipnet::IpNet;

use super::{
    Decision, DecisionKind, HostMatch, KernelTargets, Mode, Policy, RateLimiter, Request, Scheme,
    body::{self, Constraint, Doc},
    host::{HostPattern, canonicalize},
    json,
    jsonpath::JsonPath,
    limit::{Rate, cut_key},
    path::normalize_target,
    pattern::{HeaderMatch, MethodSet, TcpHost, TcpTarget, UrlPattern},
    window::TimeWindow,
};

/// A compiled rule.
#[derive(Debug)]
pub(crate) struct Rule {
    pub(crate) name: Arc<str>,
    pub(crate) action: Action,
    pub(crate) scope: Scope,
    /// `dns_labels: any`: names this rule allows through a wildcard may have long or
    /// encoded-looking labels.
    pub(crate) dns_labels_any: bool,
    /// `binaries:`: only connections made by these executables.
    pub(crate) binaries: Option<super::binaries::Binaries>,
    /// `except:` on a deny rule: what the deny does not cover (it falls through to the
    /// allows and `default`; the exception allows nothing by itself).
    pub(crate) except: Option<Scope>,
}

impl Rule {
    /// Does the deny's `except:` cover this request (its method, URL, headers and time
    /// window)?
    fn excepted(&self, ctx: &Ctx<'_, '_>) -> bool {
        match &self.except {
            Some(Scope::Http(e)) => {
                ctx.targets(e)
                    && e.headers.iter().all(|h| h.holds_all(ctx.req.headers))
                    && e.window_active(ctx.req.now)
            }
            _ => false,
        }
    }

    /// Could the deny's `except:` cover a request to this host and port? Then the deny is
    /// not host-wide: each request decides.
    fn except_covers_host(&self, scheme: Scheme, host: &str, port: u16) -> bool {
        matches!(&self.except, Some(Scope::Http(e)) if e.matches_host(scheme, host, port))
    }

    /// Does the `tcp:` deny's `except:` cover this destination?
    fn except_covers_tcp(&self, host: &str, ip: Option<IpAddr>, port: u16) -> bool {
        matches!(&self.except, Some(Scope::Tcp(t)) if t.iter().any(|t| t.matches(host, ip, port)))
    }

    /// Does the rule apply to a connection made by `exe`? An unknown executable counts as
    /// `unknown` (false for allows, true for denies and limits: fail closed).
    fn for_exe(&self, exe: Option<crate::sys::FileId>, unknown: bool) -> bool {
        self.binaries
            .as_ref()
            .is_none_or(|b| b.matches(exe, unknown))
    }
}

#[derive(Debug)]
pub(crate) enum Action {
    Allow,
    Deny,
    Limit(Limit),
    /// Held for a human's approval, at most this long.
    Ask(std::time::Duration),
}

impl Action {
    /// Could the rule let a request through (an allow, or an ask once approved)? Host-level
    /// questions (DNS, the kernel allowlist, interception) treat both alike.
    pub(crate) fn may_allow(&self) -> bool {
        matches!(self, Action::Allow | Action::Ask(_))
    }
}

/// What a rule applies to.
#[derive(Debug)]
pub(crate) enum Scope {
    Http(HttpScope),
    Tcp(Vec<TcpTarget>),
}

/// The conditions of an HTTP rule; all must hold. For limits only `methods` and `urls` are
/// set.
#[derive(Debug, Default)]
pub(crate) struct HttpScope {
    /// `None`: any method.
    pub(crate) methods: Option<MethodSet>,
    /// `None`: every URL, every port.
    pub(crate) urls: Option<Vec<UrlPattern>>,
    pub(crate) headers: Vec<HeaderMatch>,
    pub(crate) window: Option<TimeWindow>,
    pub(crate) body: Vec<Constraint>,
    /// `query:` constraints, on the parameters of the query string.
    pub(crate) query: Vec<Constraint>,
    /// `query: none`: the request has no query string.
    pub(crate) query_none: bool,
}

/// A rate limit rule.
#[derive(Debug)]
pub(crate) struct Limit {
    pub(crate) rate: Rate,
    pub(crate) per: Per,
    /// "60 calls per minute per endpoint".
    pub(crate) describe: String,
}

#[derive(Debug)]
pub(crate) enum Per {
    Agent,
    Endpoint,
    BodyField(JsonPath),
    Header(HeaderName),
}

impl HttpScope {
    /// Method, scheme, host, port and path (not headers, window or body).
    fn matches_target(
        &self,
        scheme: Scheme,
        host: &str,
        port: u16,
        method: &str,
        path: &str,
    ) -> bool {
        self.methods.is_none_or(|m| m.contains(method))
            && self
                .urls
                .as_ref()
                .is_none_or(|urls| urls.iter().any(|u| u.matches(scheme, host, port, path)))
    }

    /// Some url pattern (or none written) matches this host and port, whatever the path.
    fn matches_host(&self, scheme: Scheme, host: &str, port: u16) -> bool {
        self.urls
            .as_ref()
            .is_none_or(|urls| urls.iter().any(|u| u.matches_host(scheme, host, port)))
    }

    /// The rule applies to every request on this host and port: no method, header, body or
    /// path condition.
    fn host_wide(&self, scheme: Scheme, host: &str, port: u16) -> bool {
        self.methods.is_none()
            && self.headers.is_empty()
            && self.body.is_empty()
            && self.query.is_empty()
            && !self.query_none
            && self.urls.as_ref().is_none_or(|urls| {
                urls.iter()
                    .any(|u| u.path.is_none() && u.matches_host(scheme, host, port))
            })
    }

    fn window_active(&self, now: jiff::Timestamp) -> bool {
        self.window.as_ref().is_none_or(|w| w.active(now))
    }
}

/// Rule ids by kind, in file order.
#[derive(Debug, Default)]
struct Bucket {
    deny: Vec<u32>,
    allow: Vec<u32>,
    limit: Vec<u32>,
}

/// HTTP rules by the host part of their url patterns, so a request looks at the rules of
/// its host only.
#[derive(Debug, Default)]
pub(crate) struct Index {
    exact: HashMap<String, Bucket>,
    /// `*.example.com` rules under `example.com`.
    suffix: HashMap<String, Bucket>,
    /// Rules for any host (`*`, `*/path`, or no url).
    any: Bucket,
    tcp: Vec<u32>,
    /// Some rule has body constraints or a `per: body_field` limit.
    any_body: bool,
    any_limit: bool,
    /// Every JSONPath the rules read in bodies; parsing keeps only what they select.
    body_paths: body::BodyPaths,
}

impl Index {
    pub(crate) fn build(rules: &[Rule]) -> Index {
        let mut index = Index::default();
        for (id, rule) in (0u32..).zip(rules) {
            let scope = match &rule.scope {
                Scope::Tcp(_) => {
                    index.tcp.push(id);
                    continue;
                }
                Scope::Http(scope) => scope,
            };
            index.any_body |= !scope.body.is_empty()
                || matches!(
                    &rule.action,
                    Action::Limit(Limit {
                        per: Per::BodyField(_),
                        ..
                    })
                );
            index.any_limit |= matches!(rule.action, Action::Limit(_));
            for c in &scope.body {
                index.body_paths.add(&c.path);
            }
            if let Action::Limit(Limit {
                per: Per::BodyField(path),
                ..
            }) = &rule.action
            {
                index.body_paths.add(path);
            }
            let hosts: Vec<&HostPattern> = match &scope.urls {
                None => vec![&HostPattern::Any],
                Some(urls) => urls.iter().map(|u| &u.host).collect(),
            };
            for host in hosts {
                let bucket = match host {
                    HostPattern::Any => &mut index.any,
                    HostPattern::Exact(h) => index.exact.entry(h.clone()).or_default(),
                    HostPattern::Suffix(s) => index.suffix.entry(s.clone()).or_default(),
                };
                let ids = match rule.action {
                    // Asks sit with the allows: every host-level question treats them alike;
                    // `evaluate` tells them apart (an ask overrides an allow).
                    Action::Allow | Action::Ask(_) => &mut bucket.allow,
                    Action::Deny => &mut bucket.deny,
                    Action::Limit(_) => &mut bucket.limit,
                };
                if ids.last() != Some(&id) {
                    ids.push(id);
                }
            }
        }
        index
    }

    /// Calls `f` with every bucket that may hold rules for `host` (canonical).
    fn for_each(&self, host: &str, mut f: impl FnMut(&Bucket)) {
        if let Some(bucket) = self.exact.get(host) {
            f(bucket);
        }
        if !self.suffix.is_empty() {
            let mut rest = host;
            while let Some((_, tail)) = rest.split_once('.') {
                if let Some(bucket) = self.suffix.get(tail) {
                    f(bucket);
                }
                rest = tail;
            }
        }
        f(&self.any);
    }
}

fn http(rule: &Rule) -> Option<&HttpScope> {
    match &rule.scope {
        Scope::Http(s) => Some(s),
        Scope::Tcp(_) => None,
    }
}

/// One request being judged; the body is parsed at most once, when a rule first needs it.
struct Ctx<'r, 'a> {
    req: &'r Request<'a>,
    paths: &'r body::BodyPaths,
    host: &'r str,
    path: &'r str,
    body: OnceCell<Result<Doc<'a>, String>>,
    /// The raw query string (after `?`), empty without one.
    query: &'a str,
    query_doc: OnceCell<Result<Doc<'static>, String>>,
}

impl<'a> Ctx<'_, 'a> {
    /// The query string as a form: parameters in order, a repeated one as several values.
    fn query_doc(&self) -> &Result<Doc<'static>, String> {
        self.query_doc.get_or_init(|| {
            json::parse_form(self.query.as_bytes())
                .map(Doc::Form)
                .map_err(|e| e.replace("form body", "query string"))
        })
    }

    /// Whether the query string holds parameter `name`.
    fn query_has(&self, name: &str) -> bool {
        !self.query.is_empty()
            && matches!(self.query_doc(), Ok(Doc::Form(pairs)) if pairs.iter().any(|(k, _)| k == name))
    }

    fn doc(&self) -> &Result<Doc<'a>, String> {
        self.body.get_or_init(|| {
            body::parse(
                self.req.headers,
                self.req.body,
                self.req.body_truncated,
                self.paths,
            )
        })
    }

    fn targets(&self, scope: &HttpScope) -> bool {
        scope.matches_target(
            self.req.scheme,
            self.host,
            self.req.port,
            self.req.method,
            self.path,
        )
    }

    /// `host[:port]/path`, the port only when not the scheme's default.
    fn url(&self) -> String {
        if self.req.port == self.req.scheme.default_port() {
            format!("{}{}", self.host, self.path)
        } else if self.host.contains(':') {
            format!("[{}]:{}{}", self.host, self.req.port, self.path)
        } else {
            format!("{}:{}{}", self.host, self.req.port, self.path)
        }
    }
}

/// A deny rule fires: `Some(detail)` (empty when it has no body constraint).
fn deny_fires(scope: &HttpScope, ctx: &Ctx<'_, '_>) -> Option<String> {
    if !ctx.targets(scope)
        || !scope.headers.iter().all(|h| h.holds_any(ctx.req.headers))
        || !scope.window_active(ctx.req.now)
    {
        return None;
    }
    let mut details = Vec::new();
    if scope.query_none {
        if !ctx.query.is_empty() {
            return None;
        }
        details.push("no query string".to_owned());
    }
    if !scope.query.is_empty() {
        match ctx.query_doc() {
            // Fail closed, as for bodies.
            Err(reason) => return Some(format!("query could not be inspected: {reason}")),
            Ok(q) => {
                for c in &scope.query {
                    details.push(format!("query {}, {}", c.describe(), c.check_deny(q)?));
                }
            }
        }
    }
    if scope.body.is_empty() {
        return Some(details.join("; "));
    }
    match ctx.doc() {
        // Fail closed: a deny rule whose body cannot be checked counts as matched.
        Err(reason) => Some(format!("body could not be inspected: {reason}")),
        Ok(doc) => {
            for c in &scope.body {
                // A query parameter named like the field is judged as that field: it fires
                // the rule as the field would.
                let fired = c.check_deny(doc).or_else(|| {
                    let name = c.path.top_level_name()?;
                    if !ctx.query_has(name) {
                        return None;
                    }
                    let Ok(q) = ctx.query_doc() else { return None };
                    c.check_deny(q)
                        .map(|got| format!("{got} in the query string"))
                });
                details.push(format!("{}, {}", c.describe(), fired?));
            }
            Some(details.join("; "))
        }
    }
}

enum AllowOutcome {
    Match,
    NoMatch,
    /// Everything matched but a body constraint: "requires ..., got ...".
    BodyFailed(String),
}

fn allow_matches(scope: &HttpScope, ctx: &Ctx<'_, '_>) -> AllowOutcome {
    if !ctx.targets(scope)
        || !scope.headers.iter().all(|h| h.holds_all(ctx.req.headers))
        || !scope.window_active(ctx.req.now)
    {
        return AllowOutcome::NoMatch;
    }
    if scope.query_none && !ctx.query.is_empty() {
        return AllowOutcome::BodyFailed("requires no query string, got one".to_owned());
    }
    if !scope.query.is_empty() {
        match ctx.query_doc() {
            Err(reason) => {
                return AllowOutcome::BodyFailed(format!(
                    "requires query {}, but the query string could not be inspected: {reason}",
                    scope.query[0].describe()
                ));
            }
            Ok(q) => {
                for c in &scope.query {
                    if let Err(got) = c.check_allow(q) {
                        return AllowOutcome::BodyFailed(format!(
                            "requires query {}, {got}",
                            c.describe()
                        ));
                    }
                }
            }
        }
    }
    let Some(first) = scope.body.first() else {
        return AllowOutcome::Match;
    };
    // A query parameter named like a constrained field is judged as that field: an upstream
    // that reads either must not be handed a value the rule would refuse.
    for c in &scope.body {
        let Some(name) = c.path.top_level_name() else {
            continue;
        };
        if !ctx.query_has(name) {
            continue;
        }
        if let Ok(q) = ctx.query_doc()
            && let Err(got) = c.check_allow(q)
        {
            return AllowOutcome::BodyFailed(format!(
                "requires {}, {got} in the query string (a query parameter named like the field \
                 is judged as that field)",
                c.describe()
            ));
        }
    }
    match ctx.doc() {
        // Fail closed: an allow rule whose body cannot be checked does not match.
        Err(reason) => AllowOutcome::BodyFailed(format!(
            "requires {}, but the body could not be inspected: {reason}",
            first.describe()
        )),
        Ok(doc) => {
            for c in &scope.body {
                if let Err(got) = c.check_allow(doc) {
                    return AllowOutcome::BodyFailed(format!("requires {}, {got}", c.describe()));
                }
            }
            AllowOutcome::Match
        }
    }
}

fn printable(s: &str) -> String {
    let shown: String = s.chars().take(256).collect();
    shown.escape_debug().to_string()
}

pub(crate) fn evaluate(policy: &Policy, req: &Request<'_>, limiter: &RateLimiter) -> Decision {
    let deny = |reason: String| policy.decision(DecisionKind::Deny, None, reason, None);
    let host = match canonicalize(req.host) {
        Ok(h) => h,
        Err(e) => return deny(format!("invalid host '{}': {e}", printable(req.host))),
    };
    let path = match normalize_target(req.path_and_query) {
        Ok(p) => p,
        Err(e) => {
            return deny(format!(
                "ambiguous request path '{}': {e}",
                printable(req.path_and_query)
            ));
        }
    };
    let ctx = Ctx {
        req,
        paths: &policy.index.body_paths,
        host: &host,
        path: &path,
        body: OnceCell::new(),
        query: req.path_and_query.split_once('?').map_or("", |(_, q)| q),
        query_doc: OnceCell::new(),
    };
    let rules = &policy.rules;

    // Deny overrides, whatever the order; the first matching deny in file order is named.
    let mut denied: Option<(u32, String)> = None;
    policy.index.for_each(&host, |bucket| {
        for &id in &bucket.deny {
            if denied.as_ref().is_some_and(|(d, _)| *d < id) {
                break;
            }
            let rule = &rules[id as usize];
            if let Some(detail) = http(rule)
                .filter(|_| rule.for_exe(req.exe, true) && !rule.excepted(&ctx))
                .and_then(|s| deny_fires(s, &ctx))
            {
                denied = Some((id, detail));
            }
        }
    });
    if let Some((id, detail)) = denied {
        let rule = &rules[id as usize];
        let reason = if detail.is_empty() {
            format!("denied by rule '{}'", rule.name)
        } else {
            format!("denied by rule '{}': {detail}", rule.name)
        };
        return policy.decision(DecisionKind::Deny, Some(&rule.name), reason, None);
    }

    // Ask overrides allow: the first ask rule that matches holds the request.
    let mut asked: Option<u32> = None;
    policy.index.for_each(&host, |bucket| {
        for &id in &bucket.allow {
            let rule = &rules[id as usize];
            if !matches!(rule.action, Action::Ask(_)) || asked.is_some_and(|a| a < id) {
                continue;
            }
            if let Some(scope) = http(rule)
                && rule.for_exe(req.exe, false)
                && matches!(allow_matches(scope, &ctx), AllowOutcome::Match)
            {
                asked = Some(id);
            }
        }
    });
    if let Some(id) = asked {
        let rule = &rules[id as usize];
        let Action::Ask(timeout) = rule.action else {
            unreachable!("only ask rules are taken");
        };
        let reason = format!(
            "rule '{}' holds this request for a human's approval",
            rule.name
        );
        return policy.decision(DecisionKind::Ask, Some(&rule.name), reason, Some(timeout));
    }

    let mut allowed: Option<u32> = None;
    let mut near_miss: Option<(u32, String)> = None;
    policy.index.for_each(&host, |bucket| {
        for &id in &bucket.allow {
            if allowed.is_some_and(|a| a < id) {
                break;
            }
            let rule = &rules[id as usize];
            if matches!(rule.action, Action::Ask(_)) {
                continue;
            }
            let outcome = http(rule).map(|s| match allow_matches(s, &ctx) {
                AllowOutcome::Match if !rule.for_exe(req.exe, false) => {
                    AllowOutcome::BodyFailed(format!(
                        "applies only to connections made by {}",
                        rule.binaries
                            .as_ref()
                            .map(|b| b.describe())
                            .unwrap_or_default()
                    ))
                }
                other => other,
            });
            match outcome {
                Some(AllowOutcome::Match) => allowed = Some(id),
                Some(AllowOutcome::BodyFailed(why)) => {
                    if near_miss.as_ref().is_none_or(|(n, _)| id < *n) {
                        near_miss = Some((id, why));
                    }
                }
                Some(AllowOutcome::NoMatch) | None => {}
            }
        }
    });
    let allowed_by = match (allowed, policy.default_allow) {
        (Some(id), _) => Some(&rules[id as usize].name),
        (None, true) => None,
        (None, false) => {
            return match near_miss {
                Some((id, why)) => {
                    let rule = &rules[id as usize];
                    let reason = format!("rule '{}' {why}", rule.name);
                    policy.decision(DecisionKind::DefaultDeny, Some(&rule.name), reason, None)
                }
                None => {
                    let reason = format!(
                        "no rule allows {} {} (default deny)",
                        printable(req.method),
                        ctx.url()
                    );
                    policy.decision(DecisionKind::DefaultDeny, None, reason, None)
                }
            };
        }
    };

    if policy.index.any_limit
        && let Some(decision) = apply_limits(policy, &ctx, limiter)
    {
        return decision;
    }
    let reason = match allowed_by {
        Some(name) => format!("allowed by rule '{name}'"),
        None => "allowed by default (no rule matched)".to_owned(),
    };
    policy.decision(DecisionKind::Allow, allowed_by, reason, None)
}

/// For a request rebuilt from the audit log (header names without values, no body, no query):
/// the rule whose verdict would need what the log does not keep, when the decision hinges on
/// one. `None`: [`evaluate`] of the rebuilt request decides as the original would have.
///
/// A header constraint whose header is absent is decided (an allow needs it present, a deny
/// needs a matching value); one whose header is present needs its value. Body and query
/// constraints always need what was not kept.
pub(crate) fn unrecorded_dependency(policy: &Policy, req: &Request<'_>) -> Option<Arc<str>> {
    let host = canonicalize(req.host).ok()?;
    let path = normalize_target(req.path_and_query).ok()?;
    let ctx = Ctx {
        req,
        paths: &policy.index.body_paths,
        host: &host,
        path: &path,
        body: OnceCell::new(),
        query: "",
        query_doc: OnceCell::new(),
    };
    let rules = &policy.rules;
    // What a scope's constraints make of the rebuilt request: Some(true) surely holds,
    // Some(false) surely not, None unknown.
    let constraints = |scope: &HttpScope| -> Option<bool> {
        let mut unknown = !scope.body.is_empty() || !scope.query.is_empty() || scope.query_none;
        for h in &scope.headers {
            if req.headers.contains_key(&h.name) {
                unknown = true;
            } else {
                return Some(false);
            }
        }
        if unknown { None } else { Some(true) }
    };
    let applies = |id: u32, unknown_exe: bool| -> Option<&HttpScope> {
        let rule = &rules[id as usize];
        let scope = http(rule)?;
        (rule.for_exe(req.exe, unknown_exe) && ctx.targets(scope) && scope.window_active(req.now))
            .then_some(scope)
    };
    let (mut sure_deny, mut maybe_deny) = (false, None::<u32>);
    let (mut sure_allow, mut maybe_allow) = (None::<u32>, None::<u32>);
    policy.index.for_each(&host, |bucket| {
        for &id in &bucket.deny {
            if let Some(scope) = applies(id, true) {
                // An exception that surely covers it: no deny. One that needs a header value:
                // unknown.
                let except = match &rules[id as usize].except {
                    Some(Scope::Http(e)) if ctx.targets(e) && e.window_active(req.now) => {
                        if e.headers.is_empty() {
                            Some(true)
                        } else if e.headers.iter().all(|h| req.headers.contains_key(&h.name)) {
                            None
                        } else {
                            Some(false)
                        }
                    }
                    _ => Some(false),
                };
                let deny = match (except, constraints(scope)) {
                    (Some(true), _) => Some(false),
                    (None, _) => None,
                    (Some(false), c) => c,
                };
                match deny {
                    Some(true) => sure_deny = true,
                    Some(false) => {}
                    None => maybe_deny = Some(maybe_deny.map_or(id, |m| m.min(id))),
                }
            }
        }
        for &id in &bucket.allow {
            if let Some(scope) = applies(id, false) {
                match constraints(scope) {
                    Some(true) => sure_allow = Some(sure_allow.map_or(id, |a| a.min(id))),
                    Some(false) => {}
                    None => maybe_allow = Some(maybe_allow.map_or(id, |m| m.min(id))),
                }
            }
        }
    });
    if sure_deny {
        return None;
    }
    if let Some(id) = maybe_deny {
        return Some(rules[id as usize].name.clone());
    }
    match (sure_allow, maybe_allow) {
        // Something surely allows: allowed whatever the unknown ones make of it.
        (Some(_), _) | (None, None) => None,
        // Nothing surely allows: the unknown one decides between allow and default.
        (None, Some(m)) => Some(rules[m as usize].name.clone()),
    }
}

/// The values, in `req`'s body, of the fields rule `rule`'s body constraints name (for a
/// human deciding on a held request): `(jsonpath, value)`.
pub(crate) fn rule_fields(policy: &Policy, rule: &str, req: &Request<'_>) -> Vec<(String, String)> {
    let Some(scope) = policy
        .rules
        .iter()
        .find(|r| &*r.name == rule)
        .and_then(http)
    else {
        return Vec::new();
    };
    let Ok(doc) = body::parse(
        req.headers,
        req.body,
        req.body_truncated,
        &policy.index.body_paths,
    ) else {
        return Vec::new();
    };
    scope
        .body
        .iter()
        .map(|c| {
            let values = doc.select(&c.path);
            let text = match values.as_slice() {
                [] => "(absent)".to_owned(),
                [one] => body::json_text(one),
                many => body::json_text(many),
            };
            (c.path.to_string(), text)
        })
        .collect()
}

/// Takes a token from every limit in scope; `Some` rate-limited decision when one is out.
fn apply_limits(policy: &Policy, ctx: &Ctx<'_, '_>, limiter: &RateLimiter) -> Option<Decision> {
    let rules = &policy.rules;
    let mut ids: Vec<u32> = Vec::new();
    policy.index.for_each(ctx.host, |bucket| {
        ids.extend(bucket.limit.iter().filter(|&&id| {
            let rule = &rules[id as usize];
            rule.for_exe(ctx.req.exe, true) && http(rule).is_some_and(|s| ctx.targets(s))
        }));
    });
    if ids.is_empty() {
        return None;
    }
    ids.sort_unstable();
    ids.dedup();
    let mut keys = Vec::with_capacity(ids.len());
    for &id in &ids {
        let rule = &rules[id as usize];
        let Action::Limit(limit) = &rule.action else {
            continue;
        };
        keys.push((
            cut_key(format!("{}\0{}", rule.name, limit_key(limit, ctx))),
            limit.rate,
        ));
    }
    let (i, wait) = limiter.acquire(&keys, ctx.req.now).err()?;
    let rule = &rules[ids[i] as usize];
    let Action::Limit(limit) = &rule.action else {
        return None;
    };
    let reason = format!(
        "rate limited by rule '{}' ({}); retry after {:.1}s",
        rule.name,
        limit.describe,
        wait.as_secs_f64()
    );
    Some(policy.decision(
        DecisionKind::RateLimited,
        Some(&rule.name),
        reason,
        Some(wait),
    ))
}

/// The bucket key of a request under a limit. Requests without the body field or header
/// share one bucket (an agent cannot escape a limit by leaving the field out).
fn limit_key(limit: &Limit, ctx: &Ctx<'_, '_>) -> String {
    const NONE: &str = "\u{1}none";
    match &limit.per {
        Per::Agent => String::new(),
        Per::Endpoint => format!("{} {}", ctx.req.method.to_ascii_uppercase(), ctx.url()),
        Per::BodyField(path) => match ctx.doc() {
            Ok(doc) => match doc.select(path).as_slice() {
                [] => NONE.to_owned(),
                [one] => body::json_text(one),
                many => body::json_text(many),
            },
            Err(_) => NONE.to_owned(),
        },
        Per::Header(name) => {
            let values: Vec<&[u8]> = ctx
                .req
                .headers
                .get_all(name)
                .iter()
                .map(|v| v.as_bytes())
                .collect();
            if values.is_empty() {
                NONE.to_owned()
            } else {
                String::from_utf8_lossy(&values.join(&b"\0"[..])).into_owned()
            }
        }
    }
}

pub(crate) fn needs_body(
    policy: &Policy,
    scheme: Scheme,
    host: &str,
    port: u16,
    method: &str,
    path: &str,
) -> bool {
    if !policy.index.any_body {
        return false;
    }
    // An invalid host or ambiguous path is denied before any body is looked at.
    let (Ok(host), Ok(path)) = (canonicalize(host), normalize_target(path)) else {
        return false;
    };
    let rules = &policy.rules;
    let mut needed = false;
    policy.index.for_each(&host, |bucket| {
        for &id in bucket.deny.iter().chain(&bucket.allow).chain(&bucket.limit) {
            let rule = &rules[id as usize];
            let Some(scope) = http(rule) else { continue };
            let wants_body = !scope.body.is_empty()
                || matches!(
                    &rule.action,
                    Action::Limit(Limit {
                        per: Per::BodyField(_),
                        ..
                    })
                );
            if wants_body && scope.matches_target(scheme, &host, port, method, &path) {
                needed = true;
            }
        }
    });
    needed
}

pub(crate) fn names_exactly(policy: &Policy, host: &str, port: u16) -> bool {
    let Ok(host) = canonicalize(host) else {
        return false;
    };
    let covers = |scheme: Option<Scheme>, spec: &PortSpec| match spec {
        PortSpec::Any => true,
        PortSpec::Exact(p) => *p == port,
        PortSpec::Default => match scheme {
            Some(s) => s.default_port() == port,
            None => port == 80 || port == 443,
        },
    };
    if let Some(bucket) = policy.index.exact.get(host.as_ref()) {
        for &id in &bucket.allow {
            let rule = &policy.rules[id as usize];
            if let (a, Scope::Http(h)) = (&rule.action, &rule.scope)
                && a.may_allow()
                && let Some(urls) = &h.urls
                && urls.iter().any(|u| {
                    matches!(&u.host, HostPattern::Exact(h) if *h == *host)
                        && covers(u.scheme, &u.port)
                })
            {
                return true;
            }
        }
    }
    policy.index.tcp.iter().any(|&id| {
        let rule = &policy.rules[id as usize];
        let (Action::Allow, Scope::Tcp(targets)) = (&rule.action, &rule.scope) else {
            return false;
        };
        targets.iter().any(|t| {
            matches!(&t.host, TcpHost::Name(HostPattern::Exact(h)) if *h == *host)
                && t.port.is_none_or(|p| p == port)
        })
    })
}

pub(crate) fn host_match(policy: &Policy, host: &str) -> HostMatch {
    let Ok(host) = canonicalize(host) else {
        return HostMatch::None;
    };
    let ip = host.parse::<IpAddr>().ok();
    let mut exact = policy
        .index
        .exact
        .get(host.as_ref())
        .is_some_and(|b| !b.allow.is_empty());
    let mut wildcard = policy.default_allow || !policy.index.any.allow.is_empty();
    policy.index.for_each(&host, |bucket| {
        wildcard |= !bucket.allow.is_empty();
    });
    for &id in &policy.index.tcp {
        let rule = &policy.rules[id as usize];
        let (Action::Allow, Scope::Tcp(targets)) = (&rule.action, &rule.scope) else {
            continue;
        };
        for t in targets {
            match (&t.host, ip) {
                (TcpHost::Name(HostPattern::Exact(h)), _) if *h == *host => exact = true,
                (TcpHost::Name(HostPattern::Exact(_)), _) => {}
                (TcpHost::Name(p), None) => wildcard |= p.matches(&host),
                (TcpHost::Name(p), Some(_)) => wildcard |= *p == HostPattern::Any,
                (TcpHost::Net(net), Some(ip)) if net.contains(&ip) => {
                    if net.prefix_len() == net.max_prefix_len() {
                        exact = true;
                    } else {
                        wildcard = true;
                    }
                }
                (TcpHost::Net(_), _) => {}
            }
        }
    }
    if exact {
        HostMatch::Exact
    } else if wildcard {
        HostMatch::Wildcard
    } else {
        HostMatch::None
    }
}

pub(crate) fn wildcard_scope(policy: &Policy, host: &str) -> super::WildcardScope {
    let host = canonicalize(host).map_or_else(|_| host.to_owned(), |h| h.into_owned());
    let any_label = |ids: &[u32]| {
        ids.iter()
            .any(|&id| policy.rules[id as usize].dns_labels_any)
    };
    let mut labels_any = any_label(&policy.index.any.allow);
    // The longest suffix that an allow rule names is the scope.
    let mut scope: Option<String> = None;
    let mut rest = host.as_str();
    while let Some((_, tail)) = rest.split_once('.') {
        if let Some(bucket) = policy.index.suffix.get(tail)
            && !bucket.allow.is_empty()
        {
            labels_any |= any_label(&bucket.allow);
            scope.get_or_insert_with(|| tail.to_owned());
        }
        rest = tail;
    }
    for &id in &policy.index.tcp {
        let rule = &policy.rules[id as usize];
        let (Action::Allow, Scope::Tcp(targets)) = (&rule.action, &rule.scope) else {
            continue;
        };
        for t in targets {
            let TcpHost::Name(pattern) = &t.host else {
                continue;
            };
            match pattern {
                HostPattern::Suffix(tail) if pattern.matches(&host) => {
                    labels_any |= rule.dns_labels_any;
                    if scope.as_ref().is_none_or(|s| s.len() < tail.len()) {
                        scope = Some(tail.clone());
                    }
                }
                HostPattern::Any => labels_any |= rule.dns_labels_any,
                _ => {}
            }
        }
    }
    match scope {
        Some(tail) => super::WildcardScope {
            pattern: format!("*.{tail}"),
            chosen: host
                .strip_suffix(tail.as_str())
                .and_then(|h| h.strip_suffix('.'))
                .unwrap_or(&host)
                .to_owned(),
            labels_any,
        },
        None => super::WildcardScope {
            pattern: "*".to_owned(),
            chosen: host.clone(),
            labels_any,
        },
    }
}

/// Could some allow rule (or `default: allow`) allow a connection to this host and port?
fn could_allow(policy: &Policy, scheme: Scheme, host: &str, port: u16) -> bool {
    if policy.default_allow {
        return true;
    }
    let mut could = false;
    policy.index.for_each(host, |bucket| {
        could |= bucket.allow.iter().any(|&id| {
            http(&policy.rules[id as usize]).is_some_and(|s| s.matches_host(scheme, host, port))
        });
    });
    could
}

pub(crate) fn host_needs_l7(policy: &Policy, scheme: Scheme, host: &str, port: u16) -> bool {
    // An invalid host gets a host-level deny from host_decision.
    let Ok(host) = canonicalize(host) else {
        return false;
    };
    // Nothing can allow it: a host-level deny is the whole answer.
    if !could_allow(policy, scheme, &host, port) {
        return false;
    }
    let rules = &policy.rules;
    let mut needs = false;
    policy.index.for_each(&host, |bucket| {
        for &id in bucket.deny.iter().chain(&bucket.allow).chain(&bucket.limit) {
            let rule = &rules[id as usize];
            let Some(scope) = http(rule) else { continue };
            if !scope.matches_host(scheme, &host, port) {
                continue;
            }
            // Limits count requests; time windows can open or close during a long
            // connection; the other conditions need the request itself.
            // An ask must see the request to hold it.
            needs |= matches!(rule.action, Action::Limit(_) | Action::Ask(_))
                || rule.except_covers_host(scheme, &host, port)
                || scope.window.is_some()
                || !scope.host_wide(scheme, &host, port);
        }
    });
    needs
}

pub(crate) fn host_decision(
    policy: &Policy,
    scheme: Scheme,
    host: &str,
    port: u16,
    now: jiff::Timestamp,
    exe: Option<crate::sys::FileId>,
) -> Decision {
    let host = match canonicalize(host) {
        Ok(h) => h,
        Err(e) => {
            let reason = format!("invalid host '{}': {e}", printable(host));
            return policy.decision(DecisionKind::Deny, None, reason, None);
        }
    };
    let rules = &policy.rules;
    let mut denied: Option<u32> = None;
    let mut allowed: Option<u32> = None;
    policy.index.for_each(&host, |bucket| {
        for &id in &bucket.deny {
            let Some(scope) = http(&rules[id as usize]) else {
                continue;
            };
            if rules[id as usize].for_exe(exe, true)
                && !rules[id as usize].except_covers_host(scheme, &host, port)
                && scope.host_wide(scheme, &host, port)
                && scope.window_active(now)
                && denied.is_none_or(|d| id < d)
            {
                denied = Some(id);
            }
        }
        for &id in &bucket.allow {
            let Some(scope) = http(&rules[id as usize]) else {
                continue;
            };
            if rules[id as usize].for_exe(exe, false)
                && scope.matches_host(scheme, &host, port)
                && scope.window_active(now)
                && allowed.is_none_or(|a| id < a)
            {
                allowed = Some(id);
            }
        }
    });
    if let Some(id) = denied {
        let rule = &rules[id as usize];
        let reason = format!("denied by rule '{}'", rule.name);
        return policy.decision(DecisionKind::Deny, Some(&rule.name), reason, None);
    }
    if let Some(id) = allowed {
        let rule = &rules[id as usize];
        let reason = format!("allowed by rule '{}'", rule.name);
        return policy.decision(DecisionKind::Allow, Some(&rule.name), reason, None);
    }
    if policy.default_allow {
        let reason = "allowed by default (no rule matched)".to_owned();
        return policy.decision(DecisionKind::Allow, None, reason, None);
    }
    let shown = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let reason = format!("no rule allows connections to {shown} (default deny)");
    policy.decision(DecisionKind::DefaultDeny, None, reason, None)
}

pub(crate) fn tcp_allowed<'p>(
    policy: &'p Policy,
    host: &str,
    port: u16,
    exe: Option<crate::sys::FileId>,
) -> Option<&'p str> {
    let host = canonicalize(host).ok()?;
    let ip = host.parse::<IpAddr>().ok();
    let mut allowed = None;
    for &id in &policy.index.tcp {
        let rule = &policy.rules[id as usize];
        let Scope::Tcp(targets) = &rule.scope else {
            continue;
        };
        if targets.iter().any(|t| t.matches(&host, ip, port)) {
            match rule.action {
                Action::Deny
                    if rule.for_exe(exe, true) && !rule.except_covers_tcp(&host, ip, port) =>
                {
                    return None;
                }
                Action::Allow if allowed.is_none() && rule.for_exe(exe, false) => {
                    allowed = Some(&*rule.name)
                }
                _ => {}
            }
        }
    }
    allowed
}

pub(crate) fn kernel_targets(policy: &Policy) -> KernelTargets {
    let mut out = KernelTargets {
        redirect_all_tcp: policy.mode == Mode::DryRun || policy.default_allow,
        ..KernelTargets::default()
    };
    let add = |out: &mut KernelTargets, host: &str, port: Option<u16>| match host.parse::<IpAddr>()
    {
        Ok(ip) => out.ip_literals.push((IpNet::from(ip), port)),
        Err(_) => out.exact_hosts.push((host.to_owned(), port)),
    };
    for rule in &policy.rules {
        if !rule.action.may_allow() {
            continue;
        }
        match &rule.scope {
            Scope::Http(HttpScope { urls: None, .. }) => out.redirect_all_tcp = true,
            Scope::Http(HttpScope {
                urls: Some(urls), ..
            }) => {
                for url in urls {
                    match &url.host {
                        HostPattern::Exact(h) => {
                            for port in url.kernel_ports() {
                                add(&mut out, h, port);
                            }
                        }
                        HostPattern::Any | HostPattern::Suffix(_) => out.redirect_all_tcp = true,
                    }
                }
            }
            Scope::Tcp(targets) => {
                for t in targets {
                    match &t.host {
                        TcpHost::Net(net) => out.ip_literals.push((*net, t.port)),
                        TcpHost::Name(HostPattern::Exact(h)) => add(&mut out, h, t.port),
                        TcpHost::Name(_) => out.redirect_all_tcp = true,
                    }
                }
            }
        }
    }
    out.ip_literals.sort_unstable();
    out.ip_literals.dedup();
    out.exact_hosts.sort_unstable();
    out.exact_hosts.dedup();
    out
}
