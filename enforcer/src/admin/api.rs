//! Request and response bodies of the admin API.

use serde::{Deserialize, Serialize};

/// What to enrol or unenrol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The calling process (`enforcer exec`).
    SelfProcess,
    /// A running process with its threads and descendants.
    Pid(u32),
    /// A cgroup, absolute or relative to the cgroup2 mount.
    Cgroup(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrolRequest {
    pub agent: String,
    pub target: Target,
    /// An ad-hoc agent's policy (the file's bytes), registering `agent` if it is not
    /// configured.
    #[serde(default)]
    pub policy_yaml: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrolResponse {
    pub agent: String,
    /// Absolute cgroup path the target is now in (or that was enrolled).
    pub cgroup: String,
    /// Things the operator should know (sockets opened before enrolment).
    pub warnings: Vec<String>,
    /// Path of a PEM bundle of the system roots plus the enforcer CA (readable by every
    /// user), when TLS may be intercepted. `enforcer exec` points the usual CA-file variables
    /// (`SSL_CERT_FILE`, `CURL_CA_BUNDLE`, ...) at it.
    #[serde(default)]
    pub ca_bundle: Option<String>,
    /// The id of the cgroup the daemon moved the process into, after it asked the kernel that
    /// every program is attached to exactly that cgroup.
    #[serde(default)]
    pub cgroup_id: u64,
    /// The agent's kill switch (or the global one) is engaged: the command's connections will
    /// be refused.
    #[serde(default)]
    pub killed: bool,
    /// The agent's credentials as the variables `enforcer exec` sets: each `env` to its
    /// placeholder (never a secret).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
}

/// `POST /v1/approvals/answer`: approve or reject a held request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApprovalAnswer {
    pub id: String,
    pub approve: bool,
    /// Approve: also grant the same rule, method and host for this many seconds.
    #[serde(default)]
    pub for_secs: Option<u64>,
    /// Reject: the reason the agent reads.
    #[serde(default)]
    pub reason: Option<String>,
}

/// `GET /v1/approvals`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApprovalsReport {
    pub approvals: Vec<crate::approvals::ApprovalView>,
}

/// `GET /v1/credentials`: every credential, never a secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CredentialsReport {
    pub credentials: Vec<CredentialView>,
}

/// One credential of one agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CredentialView {
    pub agent: String,
    pub name: String,
    pub env: String,
    pub hosts: Vec<String>,
    pub binaries: Vec<String>,
    /// The secret file (or systemd credential) it is read from.
    pub source: String,
    /// The secret could be read, and is sent where it may go.
    pub available: bool,
    /// Why not, when it is unavailable.
    #[serde(default)]
    pub reason: Option<String>,
    /// When it was last swapped in (RFC 3339), if ever since the daemon started.
    #[serde(default)]
    pub last_used: Option<String>,
    /// What the agent holds instead.
    pub placeholder: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnenrolRequest {
    pub target: Target,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnenrolResponse {
    /// Where the process went, or the cgroup that was released.
    pub cgroup: String,
}

/// `/v1/reload`: what happened to each agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadResponse {
    pub agents: Vec<crate::agents::lifecycle::ReloadResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
