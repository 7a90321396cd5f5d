//! Recorded traffic: the request, connection, kernel-refusal and DNS-denial records of the
//! audit log read back (`read`), judged again under another policy (`replay`), and generalised
//! into a policy that allows them (`suggest`).
//!
//! The audit keeps no bodies, query strings or header values, only header names. A decision
//! that hinges on what was not kept is reported as undetermined, never guessed.

use std::{
    io::BufRead as _,
    path::{Path, PathBuf},
};

pub mod replay;
pub mod suggest;

#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error("cannot read audit file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no audit records of agent '{0}' in the files read; check --agent and the files")]
    NoRecords(String),
}

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// An HTTP request judged by the proxy.
    Request,
    /// A connection decided at host level: TLS on its SNI, or `tcp:`.
    Connection,
    /// Connects the kernel refused (`count` of them).
    KernelDeny,
    /// A DNS name refused.
    Dns,
}

/// One recorded decision about an agent's traffic.
#[derive(Debug, Clone)]
pub struct Observed {
    pub seq: u64,
    pub time: jiff::Timestamp,
    pub kind: Kind,
    pub agent: String,
    /// `allow`, `deny`, `would_deny` or `rate_limited`.
    pub result: String,
    pub rule: Option<String>,
    pub reason: String,
    /// `http`, `https` or `tcp`.
    pub scheme: Option<String>,
    pub method: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub header_names: Vec<String>,
    /// `ip:port`.
    pub dest: Option<String>,
    pub dns_name: Option<String>,
    /// How many occurrences the record stands for (folded records).
    pub count: u64,
}

impl Observed {
    /// Was this decided by the policy's rules (not a malformed request, an internal
    /// destination, a credential leak, the audit log failing, ...)? Only those are judged
    /// again: the reasons are the engine's own.
    pub fn is_policy_decision(&self) -> bool {
        [
            "allowed by ",
            "denied by rule",
            "no rule allows",
            "rule '",
            "rate limited by rule",
        ]
        .iter()
        .any(|p| self.reason.starts_with(p))
    }

    fn parse(line: &[u8]) -> Option<Observed> {
        let v: serde_json::Value = serde_json::from_slice(line).ok()?;
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        let kind = match v.get("event")?.as_str()? {
            "request" => Kind::Request,
            "connection" => Kind::Connection,
            "kernel_deny" => Kind::KernelDeny,
            "dns" => Kind::Dns,
            _ => return None,
        };
        Some(Observed {
            seq: v
                .get("seq")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
            time: s("timestamp")?.parse().ok()?,
            kind,
            agent: s("agent_id")?,
            result: s("policy_result").unwrap_or_default(),
            rule: s("matched_rule"),
            reason: s("reason").unwrap_or_default(),
            scheme: s("scheme"),
            method: s("method"),
            host: s("url_host"),
            port: v
                .get("port")
                .and_then(serde_json::Value::as_u64)
                .and_then(|p| u16::try_from(p).ok()),
            path: s("url_path"),
            header_names: v
                .get("header_names")
                .and_then(|h| h.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            dest: s("dest"),
            dns_name: s("dns_name"),
            count: v
                .get("count")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(1),
        })
    }
}

/// The records of `agent` (every agent's when `None`) in `files`, in file order, from `since`
/// on. Lines that are not such records (checkpoints, other kinds, torn lines) are skipped.
pub fn read(
    files: &[PathBuf],
    agent: Option<&str>,
    since: Option<jiff::Timestamp>,
) -> Result<Vec<Observed>, TrafficError> {
    let mut out = Vec::new();
    for path in files {
        let file = std::fs::File::open(path).map_err(|source| TrafficError::Read {
            path: path.clone(),
            source,
        })?;
        for line in std::io::BufReader::new(file).split(b'\n') {
            let line = line.map_err(|source| TrafficError::Read {
                path: path.clone(),
                source,
            })?;
            let Some(o) = Observed::parse(&line) else {
                continue;
            };
            if agent.is_some_and(|a| a != o.agent) || since.is_some_and(|t| o.time < t) {
                continue;
            }
            out.push(o);
        }
    }
    Ok(out)
}

/// The audit files of a live log: its rotated files, oldest first, then the log itself.
pub fn default_files(live: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = crate::audit::rotated_files(live)?;
    if live.exists() {
        files.push(live.to_owned());
    }
    Ok(files)
}
