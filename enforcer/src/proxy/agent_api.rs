//! `enforcer.internal`: a read-only view, for each agent, of its own refusals and of its own
//! policy's verdicts, so that an agent (an LLM told so in its system prompt) can tell a
//! policy denial from a network fault: "if a connection fails, GET
//! http://enforcer.internal/v1/denials".
//!
//! The resolver answers `enforcer.internal` with [`ADDR`] for enrolled processes; every
//! agent's kernel allowlist holds `ADDR` on ports 80 and 443, so the connect is redirected
//! to the proxy like any other, which serves this API itself (plain HTTP, or TLS with a leaf
//! from the local CA) and never forwards anything. The caller is the kernel record, so an
//! agent sees its own records only: nothing of other agents, of secrets or of the config.
//!
//! - `GET /v1/denials?limit=N`: the most recent refusals (at most [`KEPT`], newest first):
//!   time, kind (`kernel`, `dns`, `http`, `connection`, `credential`), pid, comm, executable,
//!   destination, port, reason, rule.
//! - `GET /v1/explain?method=M&url=U`: the agent's policy's decision for that request (its
//!   rate limits untouched).

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr},
    sync::Mutex,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use serde::Serialize;

use crate::{
    agents::Caller,
    audit::{AuditEvent, EventKind, PolicyResult},
    policy::{RateLimiter, Scheme},
};

/// The reserved name.
pub const NAME: &str = "enforcer.internal";
/// The address the resolver gives it: on loopback, so nothing outside the host is ever
/// addressed; the proxy answers it and never forwards a byte to a service there.
pub const ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 254);
/// Refusals kept per agent.
pub const KEPT: usize = 200;

/// One refusal, as the agent reads it.
#[derive(Debug, Clone, Serialize)]
pub struct Denial {
    pub time: String,
    /// `kernel`, `dns`, `http`, `connection` or `credential`.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// The host, name or address refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Refusals this one stands for (folded kernel refusals).
    pub count: u64,
}

/// The recent refusals of every agent, fed from the audit log's observer.
#[derive(Default)]
pub struct Denials {
    by_agent: Mutex<HashMap<String, VecDeque<Denial>>>,
}

impl Denials {
    /// Takes a record as it is audited; keeps it when it is a refusal.
    pub fn observe(&self, ev: &AuditEvent) {
        let refused = matches!(
            ev.policy_result,
            Some(PolicyResult::Deny | PolicyResult::RateLimited)
        );
        let kind = match ev.event {
            EventKind::KernelDeny => "kernel",
            EventKind::Dns if refused => "dns",
            EventKind::Request if refused => "http",
            EventKind::Connection if refused => "connection",
            EventKind::CredentialLeak => "credential",
            _ => return,
        };
        let Some(agent) = ev.agent_id.clone() else {
            return;
        };
        let destination = ev
            .url_host
            .clone()
            .or_else(|| ev.dns_name.clone())
            .or_else(|| ev.dest.clone());
        let port = ev.port.or_else(|| {
            ev.dest
                .as_deref()
                .and_then(|d| d.parse::<std::net::SocketAddr>().ok())
                .map(|s| s.port())
        });
        let d = Denial {
            time: jiff::Timestamp::now().to_string(),
            kind,
            pid: ev.pid,
            comm: ev.comm.clone(),
            exe: ev.exe.clone(),
            destination,
            port,
            method: ev.method.clone(),
            path: ev.url_path.clone(),
            reason: ev.reason.clone().unwrap_or_default(),
            rule: ev.matched_rule.clone(),
            count: ev.count.unwrap_or(1),
        };
        let mut map = self.by_agent.lock().unwrap_or_else(|e| e.into_inner());
        let list = map.entry(agent).or_default();
        if list.len() == KEPT {
            list.pop_front();
        }
        list.push_back(d);
    }

    /// The agent's most recent refusals, newest first.
    pub fn recent(&self, agent: &str, limit: usize) -> Vec<Denial> {
        let map = self.by_agent.lock().unwrap_or_else(|e| e.into_inner());
        map.get(agent)
            .map(|l| l.iter().rev().take(limit).cloned().collect())
            .unwrap_or_default()
    }
}

/// Is this destination the agent API?
pub fn is_api(ip: IpAddr) -> bool {
    crate::addr::canonical(ip) == IpAddr::V4(ADDR)
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec_pretty(value).unwrap_or_default(),
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message }))
}

/// The query parameters of a request target.
fn params(req: &Request<hyper::body::Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Answers one request of `caller` (from the kernel record of its connection).
pub fn handle(
    denials: &Denials,
    caller: &Caller,
    req: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "enforcer.internal is read-only: GET /v1/denials or /v1/explain",
        );
    }
    let q = params(req);
    let param = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    match req.uri().path() {
        "/v1/denials" => {
            let limit = param("limit")
                .and_then(|l| l.parse::<usize>().ok())
                .unwrap_or(20)
                .clamp(1, KEPT);
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "agent": caller.agent.name,
                    "denials": denials.recent(&caller.agent.name, limit),
                }),
            )
        }
        "/v1/explain" => {
            let (Some(method), Some(url)) = (param("method"), param("url")) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "give method and url, e.g. /v1/explain?method=POST&url=https://api.example.com/v1/x",
                );
            };
            let Ok(parsed) = url::Url::parse(url) else {
                return error(StatusCode::BAD_REQUEST, "url is not an absolute URL");
            };
            let scheme = match parsed.scheme() {
                "http" => Scheme::Http,
                "https" => Scheme::Https,
                _ => return error(StatusCode::BAD_REQUEST, "url must be http or https"),
            };
            let Some(host) = parsed.host_str() else {
                return error(StatusCode::BAD_REQUEST, "url has no host");
            };
            let target = match parsed.query() {
                Some(q) => format!("{}?{q}", parsed.path()),
                None => parsed.path().to_owned(),
            };
            let headers = http::HeaderMap::new();
            let d = caller.agent.policy().evaluate(
                &crate::policy::Request {
                    scheme,
                    method,
                    host: host.trim_matches(['[', ']']),
                    port: parsed
                        .port_or_known_default()
                        .unwrap_or(scheme.default_port()),
                    path_and_query: &target,
                    headers: &headers,
                    body: None,
                    body_truncated: false,
                    now: jiff::Timestamp::now(),
                    exe: caller.exe.as_ref().map(|e| e.id),
                },
                // A fresh limiter: asking must not spend the agent's budget.
                &RateLimiter::new(),
            );
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "agent": caller.agent.name,
                    "decision": if d.allowed { "allow" } else { "deny" },
                    "kind": d.kind,
                    "rule": d.rule.as_deref(),
                    "reason": d.reason,
                    "note": "headers and body are not known here: rules on them are judged as if absent",
                }),
            )
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "enforcer.internal serves GET /v1/denials?limit=N and GET /v1/explain?method=M&url=U",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_kept_per_agent_newest_first_and_bounded() {
        let d = Denials::default();
        for i in 0..(KEPT + 5) {
            d.observe(
                &AuditEvent::new(EventKind::KernelDeny)
                    .agent_id("a")
                    .dest(format!("203.0.113.7:{}", 1000 + i))
                    .reason("not in the allowlist"),
            );
        }
        d.observe(
            &AuditEvent::new(EventKind::Request)
                .agent_id("b")
                .policy_result(PolicyResult::Allow),
        );
        let a = d.recent("a", 1000);
        assert_eq!(a.len(), KEPT);
        assert_eq!(a[0].port, Some(1000 + KEPT as u16 + 4));
        assert_eq!(a[0].kind, "kernel");
        assert!(
            d.recent("b", 10).is_empty(),
            "an allowed request is no refusal"
        );
        assert!(d.recent("c", 10).is_empty());
    }
}
