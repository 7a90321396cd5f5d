//! From a policy to the agent's kernel allowlist.
//!
//! IP literals in rules become static entries. Exact host names are resolved by the daemon:
//! first through `dns.static`, then the `dns.upstream` servers (never `getaddrinfo`), and
//! re-resolved every [`super::RESOLVE_INTERVAL`]. An agent whose policy can allow hosts that cannot be listed
//! (wildcards, `url: "*"`, `default: allow`) or that runs in dry-run is marked "redirect all
//! TCP", and the proxy decides.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use enforcer_common::allow_flags;

use crate::{
    bpf::AllowEntry,
    policy::{Mode, Policy, canonical_host},
};

/// The kernel's view of one policy.
#[derive(Debug, Default)]
pub struct Computed {
    pub entries: Vec<AllowEntry>,
    pub redirect_all: bool,
    /// Name → addresses, for the proxy's address/name check.
    pub associations: BTreeMap<String, BTreeSet<IpAddr>>,
    /// Names that did not resolve, with why.
    pub unresolved: Vec<(String, String)>,
}

/// Resolves a name: `dns.static` first, then the upstream servers.
pub async fn resolve(
    name: &str,
    statics: &BTreeMap<String, Vec<IpAddr>>,
    upstreams: &[SocketAddr],
) -> Result<Vec<IpAddr>, String> {
    if let Some(ips) = static_lookup(name, statics) {
        return Ok(ips);
    }
    let addrs = crate::dns::client::lookup(name, upstreams)
        .await
        .map_err(|e| e.to_string())?;
    let ips: BTreeSet<IpAddr> = addrs.into_iter().map(|a| a.ip).collect();
    if ips.is_empty() {
        return Err("no A or AAAA records".into());
    }
    Ok(ips.into_iter().collect())
}

/// `dns.static` lookup by canonical name.
pub fn static_lookup(name: &str, statics: &BTreeMap<String, Vec<IpAddr>>) -> Option<Vec<IpAddr>> {
    let want = canonical_host(name).ok()?;
    statics
        .iter()
        .find(|(k, _)| canonical_host(k).ok().as_deref() == Some(want.as_str()))
        .map(|(_, v)| v.clone())
}

/// Computes the allowlist of `policy`.
pub async fn compute(
    policy: &Policy,
    statics: &BTreeMap<String, Vec<IpAddr>>,
    upstreams: &[SocketAddr],
) -> Computed {
    let targets = policy.kernel_targets();
    let mut out = Computed {
        redirect_all: targets.redirect_all_tcp || policy.mode() == Mode::DryRun,
        ..Computed::default()
    };
    let mut entries = BTreeSet::new();
    for (net, port) in &targets.ip_literals {
        entries.insert(AllowEntry {
            net: *net,
            port: *port,
            expires_boot_ns: 0,
            flags: allow_flags::EXPLICIT,
        });
    }
    let mut names: BTreeMap<String, Vec<Option<u16>>> = BTreeMap::new();
    for (host, port) in &targets.exact_hosts {
        names.entry(host.clone()).or_default().push(*port);
    }
    for (name, ports) in names {
        match resolve(&name, statics, upstreams).await {
            Ok(ips) => {
                for ip in &ips {
                    for port in &ports {
                        entries.insert(AllowEntry {
                            net: ipnet::IpNet::from(*ip),
                            port: *port,
                            expires_boot_ns: 0,
                            flags: allow_flags::EXPLICIT,
                        });
                    }
                }
                out.associations.insert(name, ips.into_iter().collect());
            }
            Err(why) => out.unresolved.push((name, why)),
        }
    }
    out.entries = entries.into_iter().collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_and_static_names_become_entries() {
        let policy = Policy::from_yaml(
            br#"
rules:
  - name: api
    allow: { method: [GET], url: "upstream.test/v1/*" }
  - name: lit
    allow: { url: "127.0.0.9:8080/x" }
  - name: db
    allow: { tcp: "db.test:5432" }
"#,
            "t.yaml",
        )
        .unwrap();
        let statics = BTreeMap::from([
            (
                "Upstream.Test".to_string(),
                vec!["127.0.0.5".parse().unwrap()],
            ),
            ("db.test".to_string(), vec!["127.0.0.7".parse().unwrap()]),
        ]);
        let c = compute(&policy, &statics, &[]).await;
        assert!(!c.redirect_all);
        assert!(c.unresolved.is_empty(), "{:?}", c.unresolved);
        let has = |ip: &str, port: Option<u16>| {
            c.entries.iter().any(|e| {
                e.net == ipnet::IpNet::from(ip.parse::<IpAddr>().unwrap()) && e.port == port
            })
        };
        assert!(has("127.0.0.9", Some(8080)));
        assert!(has("127.0.0.7", Some(5432)));
        assert!(
            has("127.0.0.5", Some(80)) || has("127.0.0.5", Some(443)) || has("127.0.0.5", None)
        );
        assert!(c.associations.contains_key("upstream.test"));
    }

    #[tokio::test]
    async fn wildcards_and_dry_run_redirect_everything() {
        let wild = Policy::from_yaml(
            b"rules:\n  - name: w\n    allow: { url: \"*.example.com\" }\n",
            "w.yaml",
        )
        .unwrap();
        assert!(compute(&wild, &BTreeMap::new(), &[]).await.redirect_all);
        let dry = Policy::from_yaml(b"mode: dry_run\nrules: []\n", "d.yaml").unwrap();
        assert!(compute(&dry, &BTreeMap::new(), &[]).await.redirect_all);
        let none = Policy::from_yaml(b"rules: []\n", "n.yaml").unwrap();
        let c = compute(&none, &BTreeMap::new(), &[]).await;
        assert!(!c.redirect_all);
        assert!(c.entries.is_empty());
    }

    #[tokio::test]
    async fn unresolvable_names_are_reported_not_guessed() {
        let p = Policy::from_yaml(
            b"rules:\n  - name: a\n    allow: { url: \"nowhere.test/x\" }\n",
            "a.yaml",
        )
        .unwrap();
        let c = compute(&p, &BTreeMap::new(), &[]).await;
        assert!(c.entries.is_empty());
        assert_eq!(c.unresolved.len(), 1);
    }
}
