//! Prometheus metrics and health, served on `metrics_listen`.
//!
//! - `/metrics`: Prometheus text format, every name prefixed `enforcer_`. Decisions are counted
//!   as they are audited (one choke point for the proxy, the L7 path and the resolver); kernel
//!   counters, open connections, kill-switch state and audit totals are read at scrape time.
//! - `/healthz`: JSON in the spirit of checkrd's `healthy()`. The programs attached to each
//!   enrolled cgroup are read from the kernel on every request; a missing or detached link
//!   makes the status `degraded`, answered with HTTP 503.

use std::{
    convert::Infallible,
    sync::{Arc, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::{
    audit::{AuditEvent, EventKind, PolicyResult},
    status::{AgentLive, AuditStatus, Counters, Health, HealthState},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    agent: String,
    /// `request` (L7) or `connection` (host level).
    event: String,
    result: String,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    agent: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WhyLabels {
    agent: String,
    /// `type`, `label` or `budget`.
    why: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApprovalLabels {
    /// `approved`, `rejected` or `expired`.
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredentialLabels {
    agent: String,
    /// The credential's name (never its value).
    credential: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    agent: String,
    result: String,
}

/// Counters fed as decisions happen.
pub struct Metrics {
    decisions: Family<DecisionLabels, Counter>,
    dns_denials: Family<AgentLabels, Counter>,
    dns_wildcard_refused: Family<WhyLabels, Counter>,
    credential_leaks: Family<CredentialLabels, Counter>,
    approvals_pending: prometheus_client::metrics::gauge::Gauge,
    approvals: Family<ApprovalLabels, Counter>,
    policy_reloads: Family<ResultLabels, Counter>,
    kill_switch_changes: Family<ResultLabels, Counter>,
    evaluation: Histogram,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    METRICS.get_or_init(|| Metrics {
        decisions: Family::default(),
        dns_denials: Family::default(),
        dns_wildcard_refused: Family::default(),
        credential_leaks: Family::default(),
        approvals_pending: Default::default(),
        approvals: Family::default(),
        policy_reloads: Family::default(),
        kill_switch_changes: Family::default(),
        // 1 µs .. ~0.5 s.
        evaluation: Histogram::new(exponential_buckets(1e-6, 2.0, 20)),
    })
}

/// Records how long one policy evaluation took.
pub fn observe_evaluation(took: Duration) {
    global().evaluation.observe(took.as_secs_f64());
}

/// Runs one policy evaluation and records its duration in
/// `enforcer_policy_evaluation_seconds` (two clock reads and a histogram update: about 0.1 µs
/// against the tens of µs a proxied request costs).
pub fn timed<T>(evaluate: impl FnOnce() -> T) -> T {
    let started = std::time::Instant::now();
    let out = evaluate();
    observe_evaluation(started.elapsed());
    out
}

/// Counts a query refused by the limits on wildcard-matched names.
pub fn dns_wildcard_refused(agent: &str, why: &str) {
    global()
        .dns_wildcard_refused
        .get_or_create(&WhyLabels {
            agent: agent.to_owned(),
            why: why.to_owned(),
        })
        .inc();
}

/// Requests held for approval: `delta` more (or fewer) now.
pub fn approvals_pending(delta: i64) {
    global().approvals_pending.inc_by(delta);
}

/// Exports the approval outcomes at 0, so the series exist before the first answer.
pub fn approvals_known() {
    for result in ["approved", "rejected", "expired"] {
        let _ = global().approvals.get_or_create(&ApprovalLabels {
            result: result.to_owned(),
        });
    }
}

/// Counts an approval's outcome.
pub fn approval_result(result: &str) {
    global()
        .approvals
        .get_or_create(&ApprovalLabels {
            result: result.to_owned(),
        })
        .inc();
}

/// Exports a credential's leak counter at 0, so the series exists before any leak.
pub fn credential_known(agent: &str, credential: &str) {
    let _ = global().credential_leaks.get_or_create(&CredentialLabels {
        agent: agent.to_owned(),
        credential: credential.to_owned(),
    });
}

/// Counts a decision or control event as it is audited.
pub fn observe(event: &AuditEvent) {
    let m = global();
    let agent = event.agent_id.clone().unwrap_or_default();
    let result = event.policy_result.map(result_name).unwrap_or("");
    match event.event {
        EventKind::Request | EventKind::Connection => {
            m.decisions
                .get_or_create(&DecisionLabels {
                    agent,
                    event: if event.event == EventKind::Request {
                        "request"
                    } else {
                        "connection"
                    }
                    .into(),
                    result: result.into(),
                    rule: event.matched_rule.clone().unwrap_or_default(),
                })
                .inc();
        }
        EventKind::Dns
            if matches!(
                event.policy_result,
                Some(PolicyResult::Deny | PolicyResult::WouldDeny)
            ) =>
        {
            m.dns_denials.get_or_create(&AgentLabels { agent }).inc();
        }
        EventKind::CredentialLeak => {
            m.credential_leaks
                .get_or_create(&CredentialLabels {
                    agent,
                    credential: event
                        .matched_rule
                        .as_deref()
                        .and_then(|r| r.strip_prefix("credential:"))
                        .unwrap_or_default()
                        .to_owned(),
                })
                .inc();
        }
        EventKind::Policy => {
            let result = match event.action {
                Some(crate::audit::Action::Rejected) => "rejected",
                _ => "loaded",
            };
            m.policy_reloads
                .get_or_create(&ResultLabels {
                    agent,
                    result: result.into(),
                })
                .inc();
        }
        EventKind::KillSwitch => {
            let result = match event.action {
                Some(crate::audit::Action::Engaged) => "engaged",
                _ => "lifted",
            };
            m.kill_switch_changes
                .get_or_create(&ResultLabels {
                    agent,
                    result: result.into(),
                })
                .inc();
        }
        _ => {}
    }
}

fn result_name(r: PolicyResult) -> &'static str {
    match r {
        PolicyResult::Allow => "allow",
        PolicyResult::Deny => "deny",
        PolicyResult::WouldDeny => "would_deny",
        PolicyResult::RateLimited => "rate_limited",
        PolicyResult::WouldAsk => "would_ask",
    }
}

/// Picks one kernel counter.
type CounterOf = fn(&Counters) -> u64;

/// What the endpoint reads at scrape time; implemented by [`status::Reporter`].
///
/// [`status::Reporter`]: crate::status::Reporter
pub trait Source: Send + Sync + 'static {
    /// Every agent's live values.
    fn live(&self) -> Vec<AgentLive>;
    /// The global kill flag.
    fn global_kill(&self) -> bool;
    fn audit(&self) -> AuditStatus;
    /// The `/healthz` report.
    fn health(&self) -> Health;
}

impl Source for crate::status::Reporter {
    fn live(&self) -> Vec<AgentLive> {
        crate::status::Reporter::live(self)
    }

    fn global_kill(&self) -> bool {
        crate::status::Reporter::global_kill(self)
    }

    fn audit(&self) -> AuditStatus {
        self.audit_status()
    }

    fn health(&self) -> Health {
        crate::status::Reporter::health(self)
    }
}

/// Values read from the daemon at scrape time.
struct Live {
    source: Arc<dyn Source>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live")
    }
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let per_agent = self.source.live();
        let counters: [(&str, &str, CounterOf); 5] = [
            (
                "enforcer_kernel_refused",
                "connects and sends refused in the kernel (EPERM)",
                |c| c.refused,
            ),
            (
                "enforcer_kernel_redirected",
                "TCP connects redirected to the proxy",
                |c| c.redirected,
            ),
            (
                "enforcer_kernel_dropped_packets",
                "egress packets dropped by cgroup_skb",
                |c| c.dropped_packets,
            ),
            (
                "enforcer_dns_redirected",
                "DNS queries redirected to the resolver",
                |c| c.dns_redirected,
            ),
            (
                "enforcer_kernel_events_lost",
                "kernel refusals not reported one by one (event ring full); the audit log counts them",
                |c| c.events_lost,
            ),
        ];
        for (name, help, get) in counters {
            let mut m = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for a in &per_agent {
                let labels = AgentLabels {
                    agent: a.name.clone(),
                };
                ConstCounter::new(get(&a.counters)).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut open = encoder.encode_descriptor(
            "enforcer_open_connections",
            "proxied connections open now",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for a in &per_agent {
            ConstGauge::new(a.open_connections as i64).encode(open.encode_family(
                &AgentLabels {
                    agent: a.name.clone(),
                },
            )?)?;
        }
        let mut killed = encoder.encode_descriptor(
            "enforcer_kill_switch_engaged",
            "1 when the agent is cut off (its own file or the global one)",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for a in &per_agent {
            ConstGauge::new(i64::from(a.killed)).encode(killed.encode_family(&AgentLabels {
                agent: a.name.clone(),
            })?)?;
        }
        ConstGauge::new(i64::from(self.source.global_kill())).encode(
            encoder.encode_descriptor(
                "enforcer_kill_switch_global_engaged",
                "1 when the global kill switch is engaged",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?,
        )?;
        let audit = self.source.audit();
        ConstCounter::new(audit.records_written).encode(encoder.encode_descriptor(
            "enforcer_audit_records_written",
            "audit records written, checkpoints included",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?)?;
        ConstGauge::new(i64::from(audit.healthy)).encode(encoder.encode_descriptor(
            "enforcer_audit_healthy",
            "1 while the audit log can be written",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?)?;
        Ok(())
    }
}

fn registry(source: Arc<dyn Source>) -> Registry {
    let m = global();
    let mut r = Registry::default();
    r.register(
        "enforcer_decisions",
        "policy decisions on requests and connections, by agent, result and rule",
        m.decisions.clone(),
    );
    r.register(
        "enforcer_dns_denials",
        "DNS names refused (NXDOMAIN) or that would be in dry-run",
        m.dns_denials.clone(),
    );
    r.register(
        "enforcer_approvals_pending",
        "requests held by ask rules, waiting for a human",
        m.approvals_pending.clone(),
    );
    r.register(
        "enforcer_approvals",
        "held requests by outcome: approved, rejected, expired",
        m.approvals.clone(),
    );
    r.register(
        "enforcer_credential_leaks",
        "Requests and DNS queries refused for carrying a credential's placeholder where it may not go",
        m.credential_leaks.clone(),
    );
    r.register(
        "enforcer_dns_wildcard_refused",
        "queries refused under a wildcard: a type other than A/AAAA/CNAME, labels that read as data, or past the distinct-name budget",
        m.dns_wildcard_refused.clone(),
    );
    r.register(
        "enforcer_policy_reloads",
        "policy loads and rejected reloads",
        m.policy_reloads.clone(),
    );
    r.register(
        "enforcer_kill_switch_changes",
        "kill switch engaged or lifted",
        m.kill_switch_changes.clone(),
    );
    r.register(
        "enforcer_policy_evaluation_seconds",
        "time to evaluate one decision",
        m.evaluation.clone(),
    );
    r.register_collector(Box::new(Live { source }));
    r
}

/// Serves `/metrics` and `/healthz` until the listener fails.
pub async fn serve(listener: TcpListener, source: Arc<dyn Source>) {
    let registry = Arc::new(registry(source.clone()));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (registry, source) = (registry.clone(), source.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (registry, source) = (registry.clone(), source.clone());
                async move { Ok::<_, Infallible>(route(&registry, &*source, &req)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

fn route(
    registry: &Registry,
    source: &dyn Source,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => response(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(_) => response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "encoding failed".into(),
                ),
            }
        }
        "/healthz" => {
            let health = source.health();
            let status = if health.status == HealthState::Degraded {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            response(
                status,
                "application/json",
                serde_json::to_string(&health).unwrap_or_default(),
            )
        }
        _ => response(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics or /healthz\n".into(),
        ),
    }
}

fn response(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}
