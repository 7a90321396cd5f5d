//! Denials an agent can read: a JSON body naming the reason, the rule, the agent and the
//! request id, with `x-enforcer-decision` and `x-enforcer-request-id` headers.
//!
//! `error` is an object shaped the way the OpenAI and Anthropic SDKs (and most API clients)
//! read errors, so the reason reaches the agent's exception text, not only `Error code: 403`:
//!
//! ```json
//! {"error":{"message":"denied by rule 'block-all-deletes'","type":"egress_policy_denied",
//!   "code":"deny"},
//!  "reason":"denied by rule 'block-all-deletes'","rule":"block-all-deletes",
//!  "agent_id":"sales-agent","request_id":"…","retryable":false}
//! ```

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

use super::http::body::DownBody;

/// `x-enforcer-decision`: `deny`, `rate_limited` or `would_deny`.
pub const DECISION_HEADER: &str = "x-enforcer-decision";
/// `x-enforcer-request-id`: the `request_id` of the audit record.
pub const REQUEST_ID_HEADER: &str = "x-enforcer-request-id";

/// What kind of refusal a response is: its `error.type` and `error.code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The policy denied the request (`code: deny`).
    Denied,
    /// A rate limit of the policy (`code: rate_limited`).
    RateLimited,
    /// The proxy refused a request it cannot judge safely: malformed, misdirected, too slow
    /// or too large (`code: refused`).
    Refused,
    /// The audit log cannot be written in strict mode (`code: audit_unavailable`).
    AuditUnavailable,
    /// The upstream's certificate failed verification (`code: upstream_certificate`).
    UpstreamCertificate,
    /// The upstream could not be reached (`code: upstream_unreachable`).
    UpstreamUnreachable,
    /// An `ask` rule held the request and no one answered in time (`code:
    /// approval_required`); `approval_id` names it, and an approval applies to the retry.
    AwaitingApproval,
}

impl Kind {
    fn type_and_code(self) -> (&'static str, &'static str) {
        match self {
            Kind::Denied => ("egress_policy_denied", "deny"),
            Kind::RateLimited => ("egress_policy_denied", "rate_limited"),
            Kind::Refused => ("egress_policy_denied", "refused"),
            Kind::AuditUnavailable => ("egress_proxy_error", "audit_unavailable"),
            Kind::UpstreamCertificate => ("egress_proxy_error", "upstream_certificate"),
            Kind::UpstreamUnreachable => ("egress_proxy_error", "upstream_unreachable"),
            Kind::AwaitingApproval => ("egress_policy_denied", "approval_required"),
        }
    }

    /// What happened, in a few words, before the reason.
    fn headline(self) -> &'static str {
        match self {
            Kind::Denied | Kind::Refused => "request denied by egress policy",
            Kind::AwaitingApproval => "request waiting for a human's approval",
            Kind::RateLimited => "request rate limited by egress policy",
            Kind::AuditUnavailable => "audit log unavailable",
            Kind::UpstreamCertificate => "upstream certificate verification failed",
            Kind::UpstreamUnreachable => "upstream connection failed",
        }
    }
}

/// The JSON body of a denial.
#[derive(Debug)]
pub struct DenyBody<'a> {
    pub kind: Kind,
    pub reason: &'a str,
    pub rule: Option<&'a str>,
    pub agent_id: &'a str,
    pub request_id: &'a str,
    pub retryable: bool,
}

/// The wire form of [`DenyBody`].
#[derive(Serialize)]
struct Wire<'a> {
    error: ErrorObject<'a>,
    reason: &'a str,
    rule: Option<&'a str>,
    agent_id: &'a str,
    request_id: &'a str,
    retryable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    approval_id: Option<&'a str>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'a str,
    code: &'a str,
}

impl DenyBody<'_> {
    fn to_vec(&self) -> Vec<u8> {
        let (kind, code) = self.kind.type_and_code();
        let message = match self.kind {
            // The reason says it all: "denied by rule 'x'", "no rule allows ...".
            Kind::Denied | Kind::RateLimited | Kind::Refused => self.reason.to_owned(),
            _ => format!("{}: {}", self.kind.headline(), self.reason),
        };
        serde_json::to_vec(&Wire {
            error: ErrorObject {
                message,
                kind,
                code,
            },
            reason: self.reason,
            rule: self.rule,
            agent_id: self.agent_id,
            request_id: self.request_id,
            retryable: self.retryable,
            approval_id: (self.kind == Kind::AwaitingApproval).then_some(self.request_id),
        })
        .expect("deny body serialises")
    }
}

/// What a proxy-made response says.
pub struct Refusal<'a> {
    pub status: StatusCode,
    /// `x-enforcer-decision`, when the response is a decision of the proxy.
    pub decision: Option<&'static str>,
    pub body: DenyBody<'a>,
    /// `Retry-After`, rounded up to whole seconds (at least 1).
    pub retry_after: Option<Duration>,
    /// Close the connection after this response (HTTP/1).
    pub close: bool,
}

/// A hyper response for a refusal.
pub fn response(r: &Refusal<'_>) -> Response<DownBody> {
    let body = r.body.to_vec();
    let mut resp = Response::new(DownBody::local(body));
    *resp.status_mut() = r.status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(d) = r.decision {
        h.insert(DECISION_HEADER, HeaderValue::from_static(d));
    }
    if let Ok(v) = HeaderValue::from_str(r.body.request_id) {
        h.insert(REQUEST_ID_HEADER, v);
    }
    if let Some(wait) = r.retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(retry_secs(wait)));
    }
    if r.close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// The complete bytes of an HTTP/1.1 refusal that closes the connection, for answers written
/// outside hyper (host-level denials, malformed requests).
pub fn http1_bytes(r: &Refusal<'_>) -> Vec<u8> {
    let body = r.body.to_vec();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncache-control: no-store\r\n",
        r.status.as_u16(),
        r.status.canonical_reason().unwrap_or("")
    );
    if let Some(d) = r.decision {
        out.push_str(&format!("{DECISION_HEADER}: {d}\r\n"));
    }
    out.push_str(&format!(
        "{REQUEST_ID_HEADER}: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        r.body.request_id,
        body.len()
    ));
    let mut out = out.into_bytes();
    out.extend_from_slice(&body);
    out
}

/// A complete `HTTP/1.1 403` response that closes the connection, for host-level denials of
/// plain HTTP (written before any bytes reach an upstream).
pub fn http_403(agent: &str, request_id: &str, rule: Option<&str>, reason: &str) -> Vec<u8> {
    http1_bytes(&Refusal {
        status: StatusCode::FORBIDDEN,
        decision: Some("deny"),
        body: DenyBody {
            kind: Kind::Denied,
            reason,
            rule,
            agent_id: agent,
            request_id,
            retryable: false,
        },
        retry_after: None,
        close: true,
    })
}

/// Seconds for `Retry-After`: rounded up, at least 1.
pub fn retry_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_403_is_json_with_the_decision_headers() {
        let bytes = http_403(
            "sales-agent",
            "r-1",
            Some("block"),
            "denied by rule 'block'",
        );
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{head}");
        assert!(head.contains("x-enforcer-decision: deny"));
        assert!(head.contains("x-enforcer-request-id: r-1"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error":{"message":"denied by rule 'block'",
                "type":"egress_policy_denied","code":"deny"},
                "reason":"denied by rule 'block'","rule":"block","agent_id":"sales-agent",
                "request_id":"r-1","retryable":false})
        );
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_secs(Duration::ZERO), 1);
    }
}
