//! Denials an agent can read.

use serde::Serialize;

/// The JSON body of a denial.
#[derive(Debug, Serialize)]
pub struct DenyBody<'a> {
    pub error: &'a str,
    pub reason: &'a str,
    pub rule: Option<&'a str>,
    pub agent_id: &'a str,
    pub request_id: &'a str,
    pub retryable: bool,
}

/// A complete `HTTP/1.1 403` response that closes the connection, for host-level denials of
/// plain HTTP (written before any bytes reach an upstream).
pub fn http_403(agent: &str, request_id: &str, rule: Option<&str>, reason: &str) -> Vec<u8> {
    let body = serde_json::to_vec(&DenyBody {
        error: "request denied by egress policy",
        reason,
        rule,
        agent_id: agent,
        request_id,
        retryable: false,
    })
    .expect("deny body serialises");
    let mut out = format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\n\
         x-enforcer-decision: deny\r\nx-enforcer-request-id: {request_id}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}
