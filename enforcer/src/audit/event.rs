//! What a caller hands to [`AuditLog::record`](super::AuditLog::record): one event, with every
//! field but `event` optional, and the scrubbing that keeps secrets out of the log.

use serde::Serialize;

/// Longest string field kept, in bytes; longer values are cut on a character boundary and end
/// with [`TRUNCATED_MARK`]. Keeps one record, and so the torn-record scan, bounded.
pub const MAX_FIELD_BYTES: usize = 2048;
/// Most header names kept in one record (the guard caps a head at 64 KiB; names past this are
/// left out).
pub const MAX_HEADER_NAMES: usize = 64;
/// Appended to a string field that was cut at [`MAX_FIELD_BYTES`].
pub const TRUNCATED_MARK: &str = "…[truncated]";

/// The `event` field: what kind of record this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// An HTTP request decision (the default, being the most common).
    #[default]
    Request,
    /// A TLS or TCP connection decided at host level.
    Connection,
    /// A DNS denial.
    Dns,
    /// Kernel connect refusals, aggregated per agent and destination per second (`count`).
    KernelDeny,
    /// The kill switch was engaged or lifted (`action`, `scope`).
    KillSwitch,
    /// A policy was loaded or rejected (`action`, `policy_sha256`, `reason`).
    Policy,
    /// The daemon started or stopped, or the audit log itself reports something (`action`).
    Daemon,
    /// An allowed request or connection ended; links to its decision by `request_id`.
    Completion,
    /// A request or DNS query carrying a credential's placeholder where it may not go
    /// (`reason` says where it may); refused.
    CredentialLeak,
    /// An `ask` rule held a request for a human (`request_id` is the approval id).
    Ask,
    /// A held request was approved (`reason` names the approver's uid and the grant).
    Approved,
    /// A held request was rejected.
    Rejected,
    /// A held request got no answer within its rule's timeout.
    Expired,
    /// A signed checkpoint. Written by the audit log itself; [`AuditLog::record`] refuses it.
    ///
    /// [`AuditLog::record`]: super::AuditLog::record
    Checkpoint,
}

impl EventKind {
    /// The name written in the `event` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Connection => "connection",
            Self::Dns => "dns",
            Self::KernelDeny => "kernel_deny",
            Self::KillSwitch => "kill_switch",
            Self::Policy => "policy",
            Self::Daemon => "daemon",
            Self::Completion => "completion",
            Self::Checkpoint => "checkpoint",
            Self::CredentialLeak => "credential_leak",
            Self::Ask => "ask",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
        }
    }
}

/// The `policy_result` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyResult {
    Allow,
    Deny,
    /// Dry-run mode: the policy would have denied, the request went through.
    WouldDeny,
    RateLimited,
    /// Dry-run mode: an `ask` rule would have held the request; it went through.
    WouldAsk,
}

impl PolicyResult {
    /// How a decision is recorded: allowed; not enforced (dry run) and so `would_deny`;
    /// rate-limited; or denied.
    pub fn of(d: &crate::policy::Decision) -> PolicyResult {
        if d.allowed {
            PolicyResult::Allow
        } else if d.dry_run && d.kind == crate::policy::DecisionKind::Ask {
            PolicyResult::WouldAsk
        } else if d.dry_run {
            PolicyResult::WouldDeny
        } else if d.kind == crate::policy::DecisionKind::RateLimited {
            PolicyResult::RateLimited
        } else {
            PolicyResult::Deny
        }
    }
}

/// The `action` field of `kill_switch`, `policy` and `daemon` records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// `kill_switch`: the switch was engaged.
    Engaged,
    /// `kill_switch`: the switch was lifted.
    Lifted,
    /// `policy`: a policy was loaded (at start or on reload).
    Loaded,
    /// `policy`: a policy was rejected; the previous one stays.
    Rejected,
    /// `daemon`: the daemon started.
    Start,
    /// `daemon`: the daemon is stopping.
    Stop,
    /// `daemon`, written by the audit log: a torn final record was sealed off at open.
    Sealed,
    /// `daemon`, written by the audit log: writes succeed again after a failure.
    Resumed,
    /// `daemon`, written by the audit log: the oldest rotated files were removed to stay
    /// within `audit_max_bytes`.
    Pruned,
    /// `kernel_deny`: refusals the kernel counted but could not report (its event ring was
    /// full); `count` says how many.
    Lost,
    /// `daemon`, written by the audit log: the live file was deleted or replaced under it; it
    /// was recreated at its path with every record restored from the open file.
    Reopened,
    /// `connection`: a spliced connection cut because a reloaded policy no longer allows it.
    Revoked,
    /// `daemon`, written by the audit log at open: records `first_seq..=last_seq` followed the
    /// last checkpoint, so no signature vouches for them (a crash, or records added while the
    /// daemon was stopped). The checkpoint after this record does not attest them either;
    /// `audit verify` reports them apart.
    Unsealed,
}

/// The `scope` field of `kill_switch` records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// The global switch: every agent.
    Global,
    /// One agent's switch (`agent_id` names it).
    Agent,
}

/// One audit event. `seq`, `timestamp` and `prev_hash` are added by the writer.
///
/// Build it with a struct literal and `..Default::default()`, or with the setters:
/// `AuditEvent::new(EventKind::Request).agent_id("demo").policy_result(PolicyResult::Deny)`.
/// Every `None` field is left out of the record.
///
/// Never put bodies, query strings, header values or credentials in any field. The log
/// enforces what it can: `url_path` loses any query string or fragment (and any scheme and
/// authority, if a whole URL is passed), `url_host` loses any `user:password@`, and every
/// string is cut at [`MAX_FIELD_BYTES`]. Free-text fields (`reason`, `detail`, `matched_rule`)
/// are the caller's responsibility.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct AuditEvent {
    pub event: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// The executable that made the connection, as the kernel named it at `connect()`: its
    /// path when that could be confirmed, else `st_dev:st_ino`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_result: Option<PolicyResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched_rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Path only: a query string or fragment is removed before the record is written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_path: Option<String>,
    /// `http` or `https` (`request`, `connection` of plain HTTP or TLS), or `tcp` (a
    /// connection judged by `tcp:` rules): what `policy replay` judges it as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// The port the decision judged (the destination's, or a CONNECT target's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The request's header names, lowercase, in order, each once (never a value), so that
    /// `policy replay` can tell which header rules could apply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_names: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
    /// The query type of a `dns` record (`A`, `AAAA`, `TXT`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_type: Option<String>,
    /// Destination as `ip:port` (`[v6]:port`), for `connection` and `kernel_deny`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_up: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_down: Option<u64>,
    /// How many occurrences one record stands for (`kernel_deny`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// First `seq` of the range a `daemon` record speaks of (`unsealed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_seq: Option<u64>,
    /// Last `seq` of that range.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    /// Lowercase hex SHA-256 of the policy file (`policy` records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_sha256: Option<String>,
    /// Free text for anything the other fields do not cover.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Builder setters: strings take anything `Into<String>`, the rest their own type (so
/// integer literals infer).
macro_rules! setters {
    (strings: $($s:ident),* ; values: $($v:ident: $ty:ty),* $(,)?) => {
        $(
            #[must_use]
            pub fn $s(mut self, value: impl Into<String>) -> Self {
                self.$s = Some(value.into());
                self
            }
        )*
        $(
            #[must_use]
            pub fn $v(mut self, value: $ty) -> Self {
                self.$v = Some(value);
                self
            }
        )*
    };
}

impl AuditEvent {
    /// An event of `kind` with every other field empty.
    pub fn new(kind: EventKind) -> Self {
        Self {
            event: kind,
            ..Self::default()
        }
    }

    setters! {
        strings: request_id, agent_id, comm, exe, matched_rule, reason, url_host, method,
            url_path, dns_name, dns_type, dest, policy_sha256, detail, scheme;
        values: pid: u32, port: u16, header_names: Vec<String>, policy_result: PolicyResult, status_code: u16, latency_ms: u64,
            bytes_up: u64, bytes_down: u64, count: u64, first_seq: u64, last_seq: u64, action: Action,
            scope: Scope,
    }

    /// Removes what must never reach the log and bounds every string. Called by
    /// [`AuditLog::record`](super::AuditLog::record) on every event.
    pub fn scrub(&mut self) {
        if let Some(path) = self.url_path.as_mut() {
            *path = path_without_query(path).to_owned();
        }
        if let Some(host) = self.url_host.as_mut() {
            *host = host_without_userinfo(host).to_owned();
        }
        if let Some(names) = self.header_names.as_mut() {
            names.truncate(MAX_HEADER_NAMES);
            for n in names.iter_mut() {
                truncate_field(n);
            }
        }
        for field in [
            &mut self.scheme,
            &mut self.request_id,
            &mut self.agent_id,
            &mut self.comm,
            &mut self.exe,
            &mut self.matched_rule,
            &mut self.reason,
            &mut self.url_host,
            &mut self.method,
            &mut self.url_path,
            &mut self.dns_name,
            &mut self.dns_type,
            &mut self.dest,
            &mut self.policy_sha256,
            &mut self.detail,
        ]
        .into_iter()
        .flatten()
        {
            truncate_field(field);
        }
    }
}

/// The path part of `raw`: no scheme, no authority, no query string, no fragment.
///
/// `/v1/chat?key=secret#x` → `/v1/chat`; `https://u:p@h/p?q` → `/p`.
pub fn path_without_query(raw: &str) -> &str {
    let mut s = raw;
    if let Some(idx) = s.find("://")
        && idx > 0
        && s[..idx]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    {
        let after = &s[idx + 3..];
        s = after.find('/').map_or("", |slash| &after[slash..]);
    }
    let end = s.find(['?', '#']).unwrap_or(s.len());
    &s[..end]
}

/// `user:password@host:port` → `host:port`.
fn host_without_userinfo(raw: &str) -> &str {
    raw.rsplit_once('@').map_or(raw, |(_, host)| host)
}

fn truncate_field(s: &mut String) {
    if s.len() <= MAX_FIELD_BYTES {
        return;
    }
    let mut cut = MAX_FIELD_BYTES - TRUNCATED_MARK.len();
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    s.push_str(TRUNCATED_MARK);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_and_fragments_never_survive_scrubbing() {
        assert_eq!(path_without_query("/v1/chat?api_key=secret"), "/v1/chat");
        assert_eq!(path_without_query("/a#frag"), "/a");
        assert_eq!(path_without_query("/a?x=1#f"), "/a");
        assert_eq!(path_without_query("?only=query"), "");
        assert_eq!(path_without_query("https://u:p@h.example/p/q?t=1"), "/p/q");
        assert_eq!(path_without_query("https://h.example"), "");
        assert_eq!(path_without_query("/plain/path"), "/plain/path");
        // A "://" inside the path is not a scheme.
        assert_eq!(
            path_without_query("/redirect/http://x/?a"),
            "/redirect/http://x/"
        );
    }

    #[test]
    fn scrub_strips_credentials_and_bounds_fields() {
        let mut ev = AuditEvent::new(EventKind::Request)
            .url_host("user:hunter2@api.example.com:443")
            .url_path("/v1/x?token=abc")
            .reason("é".repeat(MAX_FIELD_BYTES));
        ev.scrub();
        assert_eq!(ev.url_host.as_deref(), Some("api.example.com:443"));
        assert_eq!(ev.url_path.as_deref(), Some("/v1/x"));
        let reason = ev.reason.unwrap();
        assert!(reason.len() <= MAX_FIELD_BYTES, "{}", reason.len());
        assert!(reason.ends_with(TRUNCATED_MARK));
    }

    #[test]
    fn none_fields_are_left_out_and_names_follow_checkrd() {
        let ev = AuditEvent::new(EventKind::KernelDeny)
            .agent_id("demo")
            .count(3)
            .policy_result(PolicyResult::WouldDeny);
        let json = serde_json::to_string(&ev).unwrap();
        assert_eq!(
            json,
            r#"{"event":"kernel_deny","agent_id":"demo","policy_result":"would_deny","count":3}"#
        );
    }
}
