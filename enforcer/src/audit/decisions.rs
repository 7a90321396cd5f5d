//! The audit log as the deciding paths use it: a decision is recorded before it takes effect,
//! and in strict mode a decision that cannot be recorded does not take effect.

use super::{AuditEvent, AuditLog, EventKind};
use crate::config::SecurityMode;

/// Records decisions and applies `security_mode` to a failed write, in one place for the
/// proxy, the HTTP service and the resolver.
#[derive(Clone)]
pub struct Decisions {
    log: AuditLog,
    mode: SecurityMode,
}

impl Decisions {
    pub fn new(log: AuditLog, mode: SecurityMode) -> Self {
        Self { log, mode }
    }

    /// The log itself, for records that are not decisions (completions).
    pub fn log(&self) -> &AuditLog {
        &self.log
    }

    pub fn mode(&self) -> SecurityMode {
        self.mode
    }

    /// Records a decision. `false` when it could not be written and the mode is strict: what
    /// was decided must then be refused. In permissive mode a failed write is logged and the
    /// decision stands.
    pub fn record(&self, ev: AuditEvent) -> bool {
        let what = match ev.event {
            EventKind::Request => "the request",
            EventKind::Connection => "the connection",
            EventKind::Dns => "the DNS answer",
            _ => "the decision",
        };
        match self.log.record(ev) {
            Ok(()) => true,
            Err(e) if self.mode == SecurityMode::Strict => {
                tracing::error!("audit log unavailable, refusing {what} (strict mode): {e}");
                false
            }
            Err(e) => {
                tracing::warn!("audit log unavailable, continuing (permissive mode): {e}");
                true
            }
        }
    }
}
