//! Requests held for a human (`ask` rules): pending until approved, rejected or timed out;
//! grants that let later requests of the same rule, method and host through for a while.
//!
//! - A held request waits in its own task; other streams of its HTTP/2 connection go on.
//! - `approve` answers it (and with `--for`, grants the same rule, method and host for that
//!   long); `reject` answers a 403 with the reason; the timeout answers a 403 with
//!   `retryable` and the approval id. An approval given after the timeout becomes a grant the
//!   retry uses (one use with `--once`).
//! - Every step is audited (`ask`, `approved` with the approver's uid, `rejected`, `expired`).
//! - `approvals.notify` runs a command (outside every enrolled cgroup: the daemon's own)
//!   with one JSON line on stdin for each new pending request; 5 s, failures logged.
//! - At most [`MAX_PER_AGENT`] held requests per agent.
//! - A restart fails held requests closed: their connections end with the daemon.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::audit::{AuditEvent, AuditLog, EventKind};

/// Most requests one agent may have held at once.
pub const MAX_PER_AGENT: usize = 1000;
/// How long an answered-too-late approval waits for the retry it grants (`--once`).
const EXPIRED_KEPT: Duration = Duration::from_secs(3600);
/// The notify command's time limit.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("no pending or expired approval '{0}'; `enforcer approvals` lists them")]
    NotFound(String),
    #[error(
        "agent '{agent}' already has {MAX_PER_AGENT} requests waiting for approval; answer some \
         (`enforcer approvals`)"
    )]
    Full { agent: String },
}

/// What a human sees of a held request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApprovalView {
    pub id: String,
    pub agent: String,
    pub pid: u32,
    pub comm: String,
    #[serde(default)]
    pub exe: Option<String>,
    pub method: String,
    /// Without the query.
    pub url: String,
    pub rule: String,
    /// The values of the body fields the rule names (JSONPath → value).
    #[serde(default)]
    pub fields: Vec<(String, String)>,
    /// RFC 3339.
    pub created: String,
    #[serde(default)]
    pub age_secs: u64,
    /// `pending`, or `expired` (answered with a timeout; an approval now grants the retry).
    pub state: String,
}

/// The answer a held request gets.
#[derive(Debug, Clone)]
pub enum Answer {
    Approved { by_uid: u32 },
    Rejected { by_uid: u32, reason: String },
}

/// How long an approval lasts.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// This request (or, answered late, one retry).
    Once,
    /// Requests matching the same rule, method and host, for this many seconds.
    For(u64),
}

struct Held {
    view: ApprovalView,
    since: Instant,
    /// `None` once expired.
    answer: Option<oneshot::Sender<Answer>>,
    expired_at: Option<Instant>,
    /// rule, method, host: what a grant matches.
    key: (String, String, String),
}

struct Grant {
    agent: String,
    key: (String, String, String),
    until: Instant,
    /// `Some(n)`: uses left.
    uses: Option<u32>,
    by_uid: u32,
}

/// The held requests and the grants, daemon-wide.
pub struct Approvals {
    audit: AuditLog,
    notify: Vec<String>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    held: HashMap<String, Held>,
    grants: Vec<Grant>,
}

/// What a request to hold is.
pub struct Ask {
    pub id: String,
    pub agent: String,
    pub pid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub method: String,
    pub host: String,
    pub url: String,
    pub rule: String,
    pub fields: Vec<(String, String)>,
}

impl Approvals {
    pub fn new(audit: AuditLog, notify: Vec<String>) -> Approvals {
        Approvals {
            audit,
            notify,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A grant that lets this request through now (its use counted), and who gave it.
    pub fn granted(&self, agent: &str, rule: &str, method: &str, host: &str) -> Option<u32> {
        let mut s = self.lock();
        let now = Instant::now();
        s.grants
            .retain(|g| g.until > now && g.uses.is_none_or(|n| n > 0));
        let key = (rule.to_owned(), method.to_owned(), host.to_owned());
        let g = s
            .grants
            .iter_mut()
            .find(|g| g.agent == agent && g.key == key)?;
        if let Some(n) = g.uses.as_mut() {
            *n -= 1;
        }
        Some(g.by_uid)
    }

    /// Holds a request: registered, audited (`ask`), notified. The receiver gets the answer.
    pub fn hold(&self, ask: Ask) -> Result<oneshot::Receiver<Answer>, ApprovalError> {
        let (tx, rx) = oneshot::channel();
        let view = ApprovalView {
            id: ask.id.clone(),
            agent: ask.agent.clone(),
            pid: ask.pid,
            comm: ask.comm.clone(),
            exe: ask.exe.clone(),
            method: ask.method.clone(),
            url: ask.url.clone(),
            rule: ask.rule.clone(),
            fields: ask.fields.clone(),
            created: jiff::Timestamp::now().to_string(),
            age_secs: 0,
            state: "pending".into(),
        };
        {
            let mut s = self.lock();
            let now = Instant::now();
            s.held.retain(|_, h| {
                h.expired_at
                    .is_none_or(|t| now.duration_since(t) < EXPIRED_KEPT)
            });
            let mine = s
                .held
                .values()
                .filter(|h| h.view.agent == ask.agent && h.answer.is_some())
                .count();
            if mine >= MAX_PER_AGENT {
                return Err(ApprovalError::Full { agent: ask.agent });
            }
            s.held.insert(
                ask.id.clone(),
                Held {
                    view: view.clone(),
                    since: now,
                    answer: Some(tx),
                    expired_at: None,
                    key: (ask.rule.clone(), ask.method.clone(), ask.host.clone()),
                },
            );
        }
        crate::metrics::approvals_pending(1);
        let _ = self.audit.record(
            AuditEvent::new(EventKind::Ask)
                .request_id(ask.id)
                .agent_id(ask.agent)
                .pid(ask.pid)
                .comm(ask.comm)
                .method(ask.method)
                .url_host(ask.host)
                .url_path(view.url.clone())
                .matched_rule(ask.rule)
                .reason("held for a human's approval"),
        );
        self.notify(&view);
        Ok(rx)
    }

    /// Runs `approvals.notify` with the pending request as one JSON line on stdin.
    fn notify(&self, view: &ApprovalView) {
        let Some((program, args)) = self.notify.split_first() else {
            return;
        };
        let mut line = serde_json::to_vec(view).unwrap_or_default();
        line.push(b'\n');
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let shown = program.clone();
        tokio::spawn(async move {
            let run = async {
                let mut child = cmd.spawn()?;
                if let Some(mut stdin) = child.stdin.take() {
                    use tokio::io::AsyncWriteExt as _;
                    stdin.write_all(&line).await?;
                }
                child.wait().await
            };
            match tokio::time::timeout(NOTIFY_TIMEOUT, run).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => tracing::warn!("approvals.notify {shown} exited with {status}"),
                Ok(Err(e)) => tracing::warn!("approvals.notify {shown} failed: {e}"),
                Err(_) => tracing::warn!("approvals.notify {shown} took more than 5 s; killed"),
            }
        });
    }

    /// The held request timed out: audited (`expired`); it stays approvable for the retry.
    pub fn expire(&self, id: &str) {
        let mut s = self.lock();
        let Some(h) = s.held.get_mut(id) else {
            return;
        };
        if h.answer.take().is_none() {
            return;
        }
        h.expired_at = Some(Instant::now());
        h.view.state = "expired".into();
        let view = h.view.clone();
        drop(s);
        crate::metrics::approvals_pending(-1);
        crate::metrics::approval_result("expired");
        let _ = self.audit.record(
            AuditEvent::new(EventKind::Expired)
                .request_id(view.id)
                .agent_id(view.agent)
                .matched_rule(view.rule)
                .reason("no answer within the rule's timeout"),
        );
    }

    /// Approves `id` for `scope`, by `uid` (from the admin socket's peer credentials).
    pub fn approve(&self, id: &str, uid: u32, scope: Scope) -> Result<(), ApprovalError> {
        let mut s = self.lock();
        let h = s
            .held
            .get_mut(id)
            .ok_or_else(|| ApprovalError::NotFound(id.to_owned()))?;
        let waiting = h.answer.take();
        let (agent, key) = (h.view.agent.clone(), h.key.clone());
        let view = h.view.clone();
        if waiting.is_none() || matches!(scope, Scope::For(_)) {
            // Answered late (the retry uses it), or for a while: a grant.
            let (until, uses) = match scope {
                Scope::Once => (Instant::now() + EXPIRED_KEPT, Some(1)),
                Scope::For(secs) => (Instant::now() + Duration::from_secs(secs), None),
            };
            s.grants.push(Grant {
                agent: agent.clone(),
                key,
                until,
                uses,
                by_uid: uid,
            });
        }
        s.held.remove(id);
        drop(s);
        if let Some(tx) = waiting {
            crate::metrics::approvals_pending(-1);
            let _ = tx.send(Answer::Approved { by_uid: uid });
        }
        crate::metrics::approval_result("approved");
        let grant = match scope {
            Scope::Once => "once".to_owned(),
            Scope::For(secs) => format!("for {secs} s"),
        };
        let _ = self.audit.record(
            AuditEvent::new(EventKind::Approved)
                .request_id(view.id)
                .agent_id(agent)
                .matched_rule(view.rule)
                .url_path(view.url)
                .method(view.method)
                .reason(format!("approved by uid {uid} ({grant})")),
        );
        Ok(())
    }

    /// Rejects `id` with `reason`, by `uid`.
    pub fn reject(&self, id: &str, uid: u32, reason: &str) -> Result<(), ApprovalError> {
        let mut s = self.lock();
        let h = s
            .held
            .remove(id)
            .ok_or_else(|| ApprovalError::NotFound(id.to_owned()))?;
        drop(s);
        if let Some(tx) = h.answer {
            crate::metrics::approvals_pending(-1);
            let _ = tx.send(Answer::Rejected {
                by_uid: uid,
                reason: reason.to_owned(),
            });
        }
        crate::metrics::approval_result("rejected");
        let _ = self.audit.record(
            AuditEvent::new(EventKind::Rejected)
                .request_id(h.view.id)
                .agent_id(h.view.agent)
                .matched_rule(h.view.rule)
                .reason(format!("rejected by uid {uid}: {reason}")),
        );
        Ok(())
    }

    /// Everything pending or expired-but-approvable, oldest first.
    pub fn list(&self) -> Vec<ApprovalView> {
        let s = self.lock();
        let mut v: Vec<ApprovalView> = s
            .held
            .values()
            .map(|h| {
                let mut view = h.view.clone();
                view.age_secs = h.since.elapsed().as_secs();
                view
            })
            .collect();
        v.sort_by(|a, b| a.created.cmp(&b.created));
        v
    }
}
