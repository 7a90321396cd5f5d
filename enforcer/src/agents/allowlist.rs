//! From a policy to the agent's static kernel allowlist.
//!
//! IP literals in rules (url hosts and `tcp:` hosts and networks) become static entries.
//! Host names are not resolved here: the agent's own DNS queries, answered by our resolver,
//! teach the kernel their addresses for the TTL (see `dns::server`). An agent in dry-run is
//! marked "redirect all TCP": the proxy forwards everything and records what would have been
//! denied.

use std::collections::BTreeSet;

use enforcer_common::allow_flags;

use crate::{
    bpf::AllowEntry,
    policy::{Mode, Policy},
};

/// The kernel's static view of one policy.
#[derive(Debug, Default)]
pub struct Computed {
    pub entries: Vec<AllowEntry>,
    pub redirect_all: bool,
}

/// Computes the static allowlist of `policy`. With `agent_api`, `enforcer.internal`'s address
/// on ports 80 and 443 too: the proxy answers it itself (see `proxy::agent_api`).
pub fn compute(policy: &Policy, agent_api: bool) -> Computed {
    let targets = policy.kernel_targets();
    let mut entries: BTreeSet<AllowEntry> = targets
        .ip_literals
        .iter()
        .map(|(net, port)| AllowEntry {
            net: *net,
            port: *port,
            expires_boot_ns: 0,
            flags: allow_flags::EXPLICIT,
        })
        .collect();
    if agent_api {
        for port in [80, 443] {
            entries.insert(AllowEntry {
                net: ipnet::IpNet::from(std::net::IpAddr::V4(crate::proxy::agent_api::ADDR)),
                port: Some(port),
                expires_boot_ns: 0,
                flags: allow_flags::EXPLICIT,
            });
        }
    }
    Computed {
        entries: entries.into_iter().collect(),
        redirect_all: policy.mode() == Mode::DryRun,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_become_entries_and_names_do_not() {
        let policy = Policy::from_yaml(
            br#"
rules:
  - name: api
    allow: { method: [GET], url: "upstream.test/v1/*" }
  - name: lit
    allow: { url: "127.0.0.9:8080/x" }
  - name: db
    allow: { tcp: "10.0.0.0/8:5432" }
"#,
            "t.yaml",
        )
        .unwrap();
        let c = compute(&policy, false);
        assert!(!c.redirect_all);
        let has = |net: &str, port: Option<u16>| {
            c.entries
                .iter()
                .any(|e| e.net == net.parse::<ipnet::IpNet>().unwrap() && e.port == port)
        };
        assert!(has("127.0.0.9/32", Some(8080)));
        assert!(has("10.0.0.0/8", Some(5432)));
        assert_eq!(c.entries.len(), 2, "{:?}", c.entries);
        assert!(
            c.entries
                .iter()
                .all(|e| e.flags & allow_flags::EXPLICIT != 0)
        );
    }

    #[test]
    fn only_dry_run_redirects_everything() {
        let wild = Policy::from_yaml(
            b"rules:\n  - name: w\n    allow: { url: \"*.example.com\" }\n",
            "w.yaml",
        )
        .unwrap();
        assert!(
            !compute(&wild, false).redirect_all,
            "wildcards are learned from DNS, not redirected"
        );
        let dry = Policy::from_yaml(b"mode: dry_run\nrules: []\n", "d.yaml").unwrap();
        assert!(compute(&dry, false).redirect_all);
    }
}
