//! `policy suggest`: a policy that allows what an agent was seen doing.
//!
//! - Hosts stay exact; ports are kept where not the scheme's default; methods are grouped per
//!   path pattern.
//! - Path segments that are identifiers become `*`: all digits, UUIDs, hex of 8 or more,
//!   long mixed tokens, prefixed ids (`ch_…`, `cus_…`). A prefix with more than
//!   [`FAN_OUT`] distinct next segments becomes `prefix/**`.
//! - Raw TCP becomes `tcp:` rules; TLS decided on its SNI, a host-level `url:` rule. Kernel
//!   refusals (a destination the agent reached without resolving it through enforcer) become
//!   `tcp:` rules on the address. DNS names refused and never connected to are written
//!   commented out. Internal addresses are left out, and listed as left out.
//! - No body rules: the audit keeps no bodies.
//! - Each rule carries its count and its first and last sighting.
//! - With a base policy, only what the base does not allow is added, in a marked section at
//!   the end of its `rules:`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use super::{Kind, Observed};
use crate::policy::{Policy, Scheme};

/// Distinct next segments past which a prefix becomes `prefix/**`.
pub const FAN_OUT: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum SuggestError {
    #[error(
        "cannot add the suggestions to the base policy: {0}. Its `rules:` list must be its \
         last top-level key, written as a block list"
    )]
    Merge(String),
    #[error("the suggested policy does not load ({0}); this is a bug, please report it")]
    Invalid(String),
}

/// Is this path segment an identifier (a value, not a name)?
pub fn is_identifier(seg: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    if seg.is_empty() {
        return false;
    }
    if seg.chars().all(|c| c.is_ascii_digit()) {
        return true;
    }
    // UUID: 8-4-4-4-12 hex.
    let parts: Vec<&str> = seg.split('-').collect();
    if parts.len() == 5
        && parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return true;
    }
    if seg.len() >= 8 && seg.chars().all(|c| c.is_ascii_hexdigit()) {
        return true;
    }
    // A prefixed id: a short lowercase prefix, `_`, then a token of 8 or more with a digit or
    // a capital (`ch_3Mml…`, `cus_Nffr…`; not `my_project`).
    if let Some((prefix, rest)) = seg.split_once('_')
        && (1..=6).contains(&prefix.len())
        && prefix.chars().all(|c| c.is_ascii_lowercase())
        && rest.len() >= 8
        && rest.chars().all(alnum)
        && rest
            .chars()
            .any(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
    {
        return true;
    }
    // A long mixed token: letters and digits together.
    seg.len() >= 16
        && seg.chars().all(|c| alnum(c) || c == '-' || c == '_')
        && seg.chars().any(|c| c.is_ascii_digit())
        && seg.chars().any(|c| c.is_ascii_alphabetic())
}

/// Counts and times of what one rule stands for.
#[derive(Debug, Clone)]
struct Seen {
    count: u64,
    first: jiff::Timestamp,
    last: jiff::Timestamp,
}

impl Seen {
    fn new(o: &Observed) -> Seen {
        Seen {
            count: 0,
            first: o.time,
            last: o.time,
        }
    }

    fn add(&mut self, o: &Observed) {
        self.count += o.count;
        self.first = self.first.min(o.time);
        self.last = self.last.max(o.time);
    }

    fn comment(&self, what: &str) -> String {
        format!(
            "{} {what}{}, first {}, last {}",
            self.count,
            if self.count == 1 { "" } else { "s" },
            self.first,
            self.last
        )
    }
}

/// `https://host`, with the port when not the scheme's default.
fn origin(scheme: &str, host: &str, port: u16) -> String {
    let default = match scheme {
        "http" => Scheme::Http.default_port(),
        _ => Scheme::Https.default_port(),
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    if port == default {
        format!("{scheme}://{host}")
    } else {
        format!("{scheme}://{host}:{port}")
    }
}

fn internal_host(host: &str) -> Option<&'static str> {
    host.trim_matches(['[', ']'])
        .parse::<IpAddr>()
        .ok()
        .and_then(crate::addr::internal)
}

/// What the records ask for, generalised.
#[derive(Default)]
struct Suggestions {
    /// (origin, path pattern) → methods, seen.
    http: BTreeMap<(String, String), (BTreeSet<String>, Seen)>,
    /// Host-level TLS: origin → seen.
    hosts: BTreeMap<String, Seen>,
    /// `tcp:` targets → seen, and what they came from.
    tcp: BTreeMap<String, (Seen, &'static str)>,
    /// Names refused by DNS and never connected to.
    names: BTreeMap<String, Seen>,
    /// Left out, and why.
    left_out: BTreeMap<String, (Seen, String)>,
}

impl Suggestions {
    /// `key` is not suggested: an internal address (`why` says which kind).
    fn leave_out(&mut self, key: String, o: &Observed, why: &str) {
        self.left_out
            .entry(key)
            .or_insert_with(|| (Seen::new(o), format!("{why} address")))
            .0
            .add(o);
    }
}

/// The records of one agent, generalised. `covered` says whether the base already allows
/// a record (then it adds nothing).
fn collect(records: &[Observed], covered: &dyn Fn(&Observed) -> bool) -> Suggestions {
    let mut s = Suggestions::default();
    // Paths per origin first, to find fan-out.
    let mut paths: BTreeMap<String, Vec<(Vec<String>, &Observed)>> = BTreeMap::new();
    let mut connected: BTreeSet<String> = BTreeSet::new();
    for o in records {
        if let Some(h) = &o.host {
            connected.insert(h.clone());
        }
        let policy_or_kernel =
            matches!(o.kind, Kind::KernelDeny | Kind::Dns) || o.is_policy_decision();
        if !policy_or_kernel || covered(o) {
            continue;
        }
        match o.kind {
            Kind::Request => {
                let (Some(host), Some(scheme)) = (&o.host, &o.scheme) else {
                    continue;
                };
                if let Some(why) = internal_host(host) {
                    s.leave_out(host.clone(), o, why);
                    continue;
                }
                let port = o.port.unwrap_or(if scheme == "http" { 80 } else { 443 });
                let segs: Vec<String> = o
                    .path
                    .as_deref()
                    .unwrap_or("/")
                    .split('/')
                    .filter(|x| !x.is_empty())
                    .map(|x| {
                        if is_identifier(x) {
                            "*".to_owned()
                        } else {
                            x.to_owned()
                        }
                    })
                    .collect();
                paths
                    .entry(origin(scheme, host, port))
                    .or_default()
                    .push((segs, o));
            }
            Kind::Connection => {
                let (Some(host), Some(port)) = (&o.host, o.port) else {
                    continue;
                };
                if let Some(why) = internal_host(host) {
                    s.leave_out(host.clone(), o, why);
                    continue;
                }
                match o.scheme.as_deref() {
                    Some("tcp") => {
                        let target = if host.contains(':') {
                            format!("[{host}]:{port}")
                        } else {
                            format!("{host}:{port}")
                        };
                        s.tcp
                            .entry(target)
                            .or_insert_with(|| (Seen::new(o), "raw TCP"))
                            .0
                            .add(o);
                    }
                    Some(scheme) => s
                        .hosts
                        .entry(origin(scheme, host, port))
                        .or_insert_with(|| Seen::new(o))
                        .add(o),
                    None => {}
                }
            }
            Kind::KernelDeny => {
                let Some(dest) = o.dest.as_deref().and_then(|d| d.parse::<SocketAddr>().ok())
                else {
                    continue;
                };
                let ip = crate::addr::canonical(dest.ip());
                if let Some(why) = crate::addr::internal(ip) {
                    s.leave_out(dest.to_string(), o, why);
                    continue;
                }
                let target = SocketAddr::new(ip, dest.port()).to_string();
                s.tcp
                    .entry(target)
                    .or_insert_with(|| {
                        (
                            Seen::new(o),
                            "refused in the kernel: connected by address, no name resolved",
                        )
                    })
                    .0
                    .add(o);
            }
            Kind::Dns => {
                if let Some(name) = &o.dns_name {
                    s.names
                        .entry(name.clone())
                        .or_insert_with(|| Seen::new(o))
                        .add(o);
                }
            }
        }
    }
    s.names.retain(|n, _| !connected.contains(n));
    for (origin, list) in paths {
        // Distinct next segments under each prefix.
        let mut fan: BTreeMap<Vec<String>, BTreeSet<String>> = BTreeMap::new();
        for (segs, _) in &list {
            for k in 0..segs.len() {
                fan.entry(segs[..k].to_vec())
                    .or_default()
                    .insert(segs[k].clone());
            }
        }
        for (segs, o) in list {
            let cut =
                (0..segs.len()).find(|&k| fan.get(&segs[..k]).is_some_and(|n| n.len() > FAN_OUT));
            let pattern = match cut {
                Some(k) => format!("/{}", [&segs[..k], &["**".to_owned()]].concat().join("/")),
                None => format!("/{}", segs.join("/")),
            };
            let entry = s
                .http
                .entry((origin.clone(), pattern))
                .or_insert_with(|| (BTreeSet::new(), Seen::new(o)));
            if let Some(m) = &o.method {
                entry.0.insert(m.to_ascii_uppercase());
            }
            entry.1.add(o);
        }
    }
    s
}

/// A rule name from a URL pattern: its words, joined by `-`, unique.
fn rule_name(base: &str, taken: &mut BTreeSet<String>) -> String {
    let mut name: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while name.contains("--") {
        name = name.replace("--", "-");
    }
    let mut name = name.trim_matches('-').to_owned();
    name.truncate(100);
    if name.is_empty() {
        name = "rule".into();
    }
    let mut candidate = name.clone();
    let mut n = 2;
    while !taken.insert(candidate.clone()) {
        candidate = format!("{name}-{n}");
        n += 1;
    }
    candidate
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The rules (indented as items of `rules:`), and the comment lines for what is left out.
fn render_rules(s: &Suggestions, taken: &mut BTreeSet<String>) -> String {
    let mut out = String::new();
    for ((origin, path), (methods, seen)) in &s.http {
        let url = format!("{origin}{path}");
        let name = rule_name(url.split_once("://").map_or(&url[..], |(_, r)| r), taken);
        let methods: Vec<&str> = methods.iter().map(String::as_str).collect();
        let _ = writeln!(out, "  # {}", seen.comment("request"));
        let _ = writeln!(out, "  - name: {name}");
        let _ = writeln!(
            out,
            "    allow: {{ method: [{}], url: {} }}",
            methods.join(", "),
            quoted(&url)
        );
    }
    for (origin, seen) in &s.hosts {
        let name = rule_name(
            origin.split_once("://").map_or(&origin[..], |(_, r)| r),
            taken,
        );
        let _ = writeln!(
            out,
            "  # {} (TLS decided on its server name)",
            seen.comment("connection")
        );
        let _ = writeln!(out, "  - name: {name}");
        let _ = writeln!(out, "    allow: {{ url: {} }}", quoted(origin));
    }
    for (target, (seen, what)) in &s.tcp {
        let name = rule_name(&format!("tcp-{target}"), taken);
        let _ = writeln!(out, "  # {} ({what})", seen.comment("connection"));
        let _ = writeln!(out, "  - name: {name}");
        let _ = writeln!(out, "    allow: {{ tcp: {} }}", quoted(target));
    }
    for (name, seen) in &s.names {
        let rule = rule_name(&format!("name-{name}"), taken);
        let _ = writeln!(
            out,
            "  # {}; resolved but never connected to, so left commented out:",
            seen.comment("DNS denial")
        );
        let _ = writeln!(out, "  # - name: {rule}");
        let _ = writeln!(out, "  #   allow: {{ url: {} }}", quoted(name));
    }
    if !s.left_out.is_empty() {
        let _ = writeln!(
            out,
            "  # Left out on purpose (an internal destination must be named by hand):"
        );
        for (what, (seen, why)) in &s.left_out {
            let _ = writeln!(out, "  #   {what}: {why}, {}", seen.comment("decision"));
        }
    }
    out
}

/// The suggested policy for `agent`'s `records`: a whole policy, or `base` with the
/// additions at the end of its rules. The text loads (checked here).
pub fn suggest(
    agent: &str,
    records: &[Observed],
    base: Option<(&str, &Policy)>,
) -> Result<String, SuggestError> {
    let covered = |o: &Observed| base.is_some_and(|(_, policy)| covered_by(policy, o));
    let s = collect(records, &covered);
    let mut taken = BTreeSet::new();
    let text = match base {
        None => {
            let rules = render_rules(&s, &mut taken);
            format!(
                "# Suggested by `enforcer policy suggest` from {} audit records of agent \
                 '{agent}'.\n# Review every rule before using it: it allows what was seen, \
                 nothing more.\ndefault: deny\nrules:\n{rules}",
                records.len()
            )
        }
        Some((text, policy)) => {
            for name in policy.rule_names() {
                taken.insert(name.to_owned());
            }
            let rules = render_rules(&s, &mut taken);
            merge(text, &rules)?
        }
    };
    Policy::from_yaml(text.as_bytes(), "suggested")
        .map_err(|e| SuggestError::Invalid(e.to_string()))?;
    Ok(text)
}

/// Would the base policy allow what this record records (rate limits aside)?
fn covered_by(policy: &Policy, o: &Observed) -> bool {
    let one = vec![o.clone()];
    let report = super::replay::replay(policy, &one);
    // Judged again as allowed (from whatever it was), or unchanged and it was allowed.
    report.transitions.keys().any(|k| k.ends_with("-> allow"))
        || (report.unchanged > 0 && o.result == "allow")
}

/// `base` with `rules` appended to its `rules:` list, in a marked section.
fn merge(base: &str, rules: &str) -> Result<String, SuggestError> {
    let lines: Vec<&str> = base.lines().collect();
    let at = lines
        .iter()
        .rposition(|l| l.starts_with("rules:"))
        .ok_or_else(|| SuggestError::Merge("it has no top-level `rules:`".into()))?;
    if lines[at].trim_end() != "rules:" {
        return Err(SuggestError::Merge(
            "its `rules:` is a flow list, not a block list".into(),
        ));
    }
    if let Some(later) = lines[at + 1..]
        .iter()
        .find(|l| !l.is_empty() && !l.starts_with([' ', '#', '-']))
    {
        return Err(SuggestError::Merge(format!(
            "`{later}` follows `rules:` at the top level"
        )));
    }
    let mut out = base.trim_end().to_owned();
    out.push('\n');
    if rules.trim().is_empty() {
        out.push_str(
            "  # --- enforcer policy suggest: the base already allows everything seen ---\n",
        );
    } else {
        out.push_str("  # --- suggested by `enforcer policy suggest`: review before use ---\n");
        out.push_str(rules);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_told_from_names() {
        for id in [
            "42",
            "0",
            "7f3a9c21",
            "3f2b8c1e-9d4a-4b7e-8f00-1234567890ab",
            "ch_3MmlLrLkdIwHu7ix0snN0B15",
            "cus_NffrFeUfNV2Hib",
            "aB3dE5fG7hJ9kL1mN",
        ] {
            assert!(is_identifier(id), "{id}");
        }
        for name in [
            "v1",
            "repos",
            "charges",
            "git-upload-pack",
            "chat",
            "completions",
            "deadbee",
            "my_project",
            "info",
        ] {
            assert!(!is_identifier(name), "{name}");
        }
    }

    fn rec(seq: u64, method: &str, path: &str) -> Observed {
        Observed {
            seq,
            time: "2026-12-01T10:00:00Z".parse::<jiff::Timestamp>().unwrap()
                + jiff::SignedDuration::from_secs(seq as i64),
            kind: Kind::Request,
            agent: "a".into(),
            result: "would_deny".into(),
            rule: None,
            reason: "no rule allows GET x (default deny)".into(),
            scheme: Some("https".into()),
            method: Some(method.into()),
            host: Some("api.stripe.com".into()),
            port: Some(443),
            path: Some(path.into()),
            header_names: vec![],
            dest: Some("198.51.100.7:443".into()),
            dns_name: None,
            count: 1,
        }
    }

    #[test]
    fn ids_become_stars_methods_group_and_fan_out_becomes_a_double_star() {
        let mut records = vec![
            rec(1, "GET", "/v1/customers/cus_NffrFeUfNV2Hib"),
            rec(2, "POST", "/v1/customers/cus_Q2rTyUiOp9aS"),
            rec(3, "GET", "/v1/charges/42"),
        ];
        // 25 distinct names under /v1/docs: more than FAN_OUT.
        for i in 0..25 {
            records.push(rec(
                10 + i,
                "GET",
                &format!("/v1/docs/page{}x", char::from(b'a' + i as u8)),
            ));
        }
        let text = suggest("a", &records, None).unwrap();
        assert!(
            text.contains(
                r#"allow: { method: [GET, POST], url: "https://api.stripe.com/v1/customers/*" }"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"url: "https://api.stripe.com/v1/charges/*""#),
            "{text}"
        );
        assert!(
            text.contains(r#"url: "https://api.stripe.com/v1/docs/**""#),
            "{text}"
        );
        assert!(
            text.contains("# 2 requests, first 2026-12-01T10:00:01Z"),
            "{text}"
        );
        assert!(!text.contains("page"), "{text}");
        // It allows what was seen.
        let p = Policy::from_yaml(text.as_bytes(), "s").unwrap();
        let report = super::super::replay::replay(&p, &records);
        assert_eq!(
            report.transitions.keys().collect::<Vec<_>>(),
            vec!["deny -> allow"]
        );
        assert_eq!(report.unchanged, 0);
    }

    #[test]
    fn internal_addresses_are_left_out_and_names_never_connected_are_commented() {
        let mut k = rec(1, "GET", "/");
        k.kind = Kind::KernelDeny;
        k.dest = Some("169.254.169.254:80".into());
        let mut k2 = k.clone();
        k2.dest = Some("93.184.216.34:5432".into());
        let mut d = rec(2, "GET", "/");
        d.kind = Kind::Dns;
        d.dns_name = Some("pastebin.example".into());
        let text = suggest("a", &[k, k2, d], None).unwrap();
        assert!(text.contains("#   169.254.169.254:80: "), "{text}");
        assert!(
            text.contains(r#"allow: { tcp: "93.184.216.34:5432" }"#),
            "{text}"
        );
        assert!(
            text.contains(r#"#   allow: { url: "pastebin.example" }"#),
            "{text}"
        );
    }

    #[test]
    fn a_base_keeps_its_rules_and_gets_only_what_it_does_not_cover() {
        let base = "default: deny\nrules:\n  - name: reads\n    allow: { method: [GET], url: \"api.stripe.com/**\" }\n";
        let policy = Policy::from_yaml(base.as_bytes(), "b").unwrap();
        let records = vec![
            rec(1, "GET", "/v1/charges/42"),
            rec(2, "POST", "/v1/refunds"),
        ];
        let text = suggest("a", &records, Some((base, &policy))).unwrap();
        assert!(text.starts_with(base.trim_end()), "{text}");
        assert!(text.contains("--- suggested by"), "{text}");
        assert!(
            text.contains(r#"method: [POST], url: "https://api.stripe.com/v1/refunds""#),
            "{text}"
        );
        assert!(!text.contains("charges"), "{text}");
        let e = merge(
            "rules:\n  - name: x\n    allow: { url: \"a.test\" }\nmode: dry_run\n",
            "  - name: y\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("follows `rules:`"), "{e}");
    }
}
