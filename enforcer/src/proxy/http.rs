//! L7: every HTTP request is judged by the policy on its own method, host, path, headers and
//! body, whether it arrives on plain HTTP/1.x or inside an intercepted TLS connection
//! (HTTP/1.1 or HTTP/2), first on its connection or tenth on a keep-alive one.
//!
//! For each request:
//! 1. the host is the `Host` header (HTTP/1) or `:authority` (HTTP/2); they must agree when
//!    both are present. Over TLS it must be the SNI (or, without SNI, the destination
//!    address): anything else is domain fronting and gets a 421;
//! 2. the host must belong to the address the agent connected to (an IP literal must be it,
//!    a name resolved for the agent must have resolved to it); the port judged is the
//!    destination's;
//! 3. the body is read only when [`Policy::needs_body`] says a rule wants it, up to
//!    [`BODY_INSPECTION_LIMIT`] (past it the engine sees a truncated body and fails closed);
//! 4. [`Policy::evaluate`] decides, with the agent's shared [`RateLimiter`]; the decision is
//!    written to the audit log (`request` record) before anything else happens;
//! 5. a denial is a JSON 403 (429 with `Retry-After` for a rate limit); in `dry_run` the
//!    request goes through and the response carries `x-enforcer-decision: would_deny`;
//! 6. an allowed request goes to the original destination through the connection's own
//!    hyper client; the response streams back frame by frame, and a `completion` record
//!    follows when it ends;
//! 7. a WebSocket upgrade (a GET the policy allows) or an allowed CONNECT becomes a spliced
//!    tunnel once the upstream agrees; an `h2c` (or any other) upgrade is declined and the
//!    request served as plain HTTP/1.1.
//!
//! HTTP/1 requests first pass the [`guard`] (smuggling shapes, oversized or slow heads).
//! HTTP/2 runs with a header-list cap, a concurrent-stream cap and hyper's rapid-reset
//! guard. Everything a connection spawns lives in its [`Scope`], so the kill switch cuts the
//! whole of it with resets.
//!
//! [`RateLimiter`]: crate::policy::RateLimiter
//! [`Policy::needs_body`]: crate::policy::Policy::needs_body
//! [`Policy::evaluate`]: crate::policy::Policy::evaluate

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant},
};

use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header,
};
use hyper::{body::Incoming, upgrade::OnUpgrade};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{mpsc, watch},
};

use super::{
    deny::{self, DECISION_HEADER, DenyBody, REQUEST_ID_HEADER, Refusal},
    peek::strip_port,
    scope::{self, Scope, ScopeExec},
    tls::UpstreamTls,
};
use crate::{
    agents::Caller,
    audit::{Decisions, EventKind, PolicyResult, path_without_query},
    config::SafeMethodBodies,
    policy::{BODY_INSPECTION_LIMIT, Decision, DecisionKind, Scheme, canonical_host},
};

pub mod body;
pub mod guard;
pub mod upstream;

use body::{Buffered, Completion, DownBody, UpBody};
use upstream::{Connector, Upstream, UpstreamError};

/// Longest wait for a request body being read for inspection.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// An HTTP/1 connection waiting this long for its next request is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// HTTP/2: most concurrent streams on one connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
/// HTTP/2: most streams the client may open and reset before the proxy accepted them
/// (the "rapid reset" guard); past it the connection is closed with `ENHANCE_YOUR_CALM`.
pub const MAX_PENDING_RESET_STREAMS: usize = 20;
/// HTTP/2: most streams the proxy may reset for protocol errors before closing the
/// connection.
pub const MAX_LOCAL_ERROR_RESETS: usize = 256;
/// HTTP/2: largest header list (as the peer advertises sizes), like HTTP/1's head cap.
pub const MAX_HEADER_LIST_BYTES: u32 = guard::MAX_HEAD_BYTES as u32;

/// What every served connection needs from the daemon.
pub struct L7Env {
    pub decisions: Decisions,
    /// `http.bodies_on_safe_methods`.
    pub safe_method_bodies: SafeMethodBodies,
    /// Upstream TLS client configurations; `None` when they could not be built (then
    /// intercepted requests fail with 502).
    pub upstream_tls: Option<Arc<UpstreamTls>>,
    /// The credentials swapped in for their placeholders.
    pub credentials: Arc<crate::credentials::Vault>,
    /// Requests held by `ask` rules.
    pub approvals: Arc<crate::approvals::Approvals>,
}

/// One client connection, as the kernel recorded it.
pub struct ClientConn {
    pub caller: Caller,
    /// The original destination.
    pub dst: SocketAddr,
    /// `Http` for plain connections, `Https` for intercepted TLS.
    pub scheme: Scheme,
    /// The canonical SNI of an intercepted connection.
    pub sni: Option<String>,
    /// The connection's place among the agent's openings, given back at its first request.
    pub opening: std::sync::Mutex<Option<crate::agents::conns::Pending>>,
}

/// The protocol spoken on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

/// Serves one client connection until it closes or the agent's kill switch cuts it.
pub async fn serve<IO>(
    env: Arc<L7Env>,
    conn: ClientConn,
    io: IO,
    proto: Proto,
    scope: Arc<Scope>,
    mut killed: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let upstream_tls = match (conn.scheme, &env.upstream_tls) {
        (Scheme::Http, _) => None,
        (Scheme::Https, Some(t)) if proto == Proto::Http2 => Some(t.h2.clone()),
        (Scheme::Https, Some(t)) => Some(t.h1.clone()),
        // Without upstream TLS nothing can be forwarded; the connector fails with a
        // verification error for lack of roots.
        (Scheme::Https, None) => Some(no_roots_config()),
    };
    let drivers = (proto == Proto::Http1).then(|| Arc::new(upstream::Drivers::default()));
    let client = Upstream::new(
        Connector::new(conn.dst, upstream_tls, scope.clone()),
        scope.clone(),
        drivers.clone(),
    );
    // Upgraded tunnels hold a clone; the channel closes when the last one ends.
    let (tunnels, mut tunnels_done) = mpsc::channel::<()>(1);
    let agent = conn.caller.agent.clone();
    let dst = conn.dst;
    let svc = Arc::new(Service {
        env,
        dst_ip: crate::addr::canonical(conn.dst.ip()),
        conn,
        client,
        scope: scope.clone(),
        tunnels,
        last_host: std::sync::Mutex::new(None),
    });
    let served = async {
        match &drivers {
            Some(d) => d.drive(run(svc, io, proto, scope.clone())).await,
            None => run(svc, io, proto, scope.clone()).await,
        }
    };
    // The scope is killed before the served future is dropped, so its sockets reset.
    let cut = tokio::select! {
        () = served => false,
        () = scope::killed(&mut killed, &scope) => true,
    };
    // Upgraded tunnels outlive hyper's connection; wait for them, still killable.
    let cut = cut
        || tokio::select! {
            _ = tunnels_done.recv() => false,
            () = scope::killed(&mut killed, &scope) => true,
        };
    if cut {
        tracing::info!(agent = %agent.name, %dst, "connection cut by the kill switch");
    }
    scope.abort_all();
}

async fn run<IO>(svc: Arc<Service>, io: IO, proto: Proto, scope: Arc<Scope>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handler = svc.clone();
    let service = hyper::service::service_fn(move |req| {
        let s = handler.clone();
        async move { Ok::<_, Infallible>(s.handle(req).await) }
    });
    let result = match proto {
        Proto::Http1 => {
            let io = TokioIo::new(guard::Guard::new(io, svc.reporter()));
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(IDLE_TIMEOUT)
                // A client may half-close after its request; the responses in flight still
                // go out (and the guard relies on it to answer after a refused head).
                .half_close(true)
                .max_header_size(guard::MAX_HEAD_BYTES + 1)
                .serve_connection(io, service)
                .with_upgrades()
                .await
        }
        Proto::Http2 => {
            hyper::server::conn::http2::Builder::new(ScopeExec(scope))
                .timer(TokioTimer::new())
                .max_header_list_size(MAX_HEADER_LIST_BYTES)
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                .max_pending_accept_reset_streams(MAX_PENDING_RESET_STREAMS)
                .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS)
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(20))
                .serve_connection(TokioIo::new(io), service)
                .await
        }
    };
    if let Err(e) = result {
        tracing::debug!(agent = %svc.conn.caller.agent.name, dst = %svc.conn.dst, "client connection ended: {e}");
    }
}

/// A client configuration that trusts nothing, so every upstream handshake fails
/// verification (used only when the real ones could not be built).
fn no_roots_config() -> Arc<rustls::ClientConfig> {
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth(),
    )
}

/// The per-connection request handler.
struct Service {
    env: Arc<L7Env>,
    conn: ClientConn,
    /// The destination address, IPv4-mapped IPv6 as IPv4.
    dst_ip: IpAddr,
    client: Upstream,
    scope: Arc<Scope>,
    tunnels: mpsc::Sender<()>,
    /// The last host that passed the address check on this connection, and its canonical
    /// form: the destination is fixed, so the same host passes again.
    last_host: std::sync::Mutex<Option<(String, String)>>,
}

/// One request being handled, for logs and audit records.
struct Ask {
    id: String,
    started: Instant,
    method: Method,
    /// The host without port, as the request named it.
    host: String,
    /// The request target as sent (the audit log drops its query).
    path: String,
    /// Close the connection after the response (an HTTP/1 request that asked to switch
    /// protocols and was not switched).
    close: bool,
    /// The port judged (0 until known).
    port: u16,
    /// The request's header names (for the record: `policy replay` needs them).
    header_names: Vec<String>,
}

/// What the request asks to upgrade to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upgrade {
    None,
    WebSocket,
    /// `h2c` or anything else: declined.
    Declined,
}

impl Upgrade {
    fn of(req: &Request<Incoming>) -> Upgrade {
        let Some(v) = req.headers().get(header::UPGRADE) else {
            return Upgrade::None;
        };
        let websocket = v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().to_ascii_lowercase().starts_with("websocket"))
        });
        if websocket && req.method() == Method::GET && req.version() == Version::HTTP_11 {
            Upgrade::WebSocket
        } else {
            Upgrade::Declined
        }
    }
}

/// A request body: streamed unless it was read for inspection.
enum ReqBody {
    Streamed(Incoming),
    Read(Buffered),
}

impl ReqBody {
    /// What the policy can see of it: the bytes read (if it was read) and whether they were
    /// cut at the inspection limit.
    fn read(&self) -> (Option<bytes::Bytes>, bool) {
        match self {
            ReqBody::Read(b) => (Some(b.joined()), b.truncated),
            ReqBody::Streamed(_) => (None, false),
        }
    }
}

impl Service {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<DownBody> {
        // A whole request head arrived: the connection's opening is over.
        drop(
            self.conn
                .opening
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
        let is_connect = req.method() == Method::CONNECT;
        let upgrade = Upgrade::of(&req);
        let mut ask = Ask {
            id: uuid::Uuid::now_v7().to_string(),
            started: Instant::now(),
            method: req.method().clone(),
            host: String::new(),
            path: if is_connect {
                "/".to_owned()
            } else {
                req.uri()
                    .path_and_query()
                    .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned())
            },
            close: req.version() < Version::HTTP_2
                && (is_connect || req.headers().contains_key(header::UPGRADE)),
            port: 0,
            header_names: req
                .headers()
                .keys()
                .take(crate::audit::MAX_HEADER_NAMES)
                .map(|n| n.as_str().to_owned())
                .collect(),
        };
        let agent = self.conn.caller.agent.clone();
        let policy = agent.policy();
        agent.touch_eval();

        // 1. Which host is asked, on which port.
        let authority = match self.authority(&req, is_connect) {
            Ok(a) => a,
            Err(why) => return self.malformed(&ask, &why),
        };
        ask.host = strip_port(&authority).to_owned();
        let port = if is_connect {
            match authority
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
            {
                Some(p) => p,
                None => return self.malformed(&ask, "CONNECT target without a port"),
            }
        } else {
            self.conn.dst.port()
        };
        ask.port = port;
        if let Some(resp) = self.misdirected(&ask) {
            return resp;
        }

        // A body on a method without body semantics: an upstream that ignores it would read it
        // as the next request (request smuggling past the policy), so it is refused, or, when
        // the operator allows it, sent on a connection closed after the response.
        let safe_method = matches!(
            *req.method(),
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        );
        let safe_method_body = safe_method && !hyper::body::Body::is_end_stream(req.body());
        if safe_method_body && self.env.safe_method_bodies == SafeMethodBodies::Refuse {
            return self.malformed(
                &ask,
                &format!(
                    "a {} request with a body is refused: an upstream may read the body as \
                     another request (set http.bodies_on_safe_methods: forward for APIs that \
                     search with GET bodies)",
                    ask.method
                ),
            );
        }

        // 2-4. The decision.
        let (mut parts, incoming) = req.into_parts();
        let on_upgrade = parts.extensions.remove::<OnUpgrade>();
        let mut body = ReqBody::Streamed(incoming);
        let decision = if is_connect && self.conn.scheme == Scheme::Https {
            policy.refusal("CONNECT inside an intercepted TLS connection is not supported".into())
        } else if let Some(reason) = self.canonicalize(&mut ask, is_connect) {
            policy.refusal(reason)
        } else {
            let needs = policy.needs_body(
                self.conn.scheme,
                &ask.host,
                port,
                parts.method.as_str(),
                &ask.path,
            );
            if needs && let ReqBody::Streamed(incoming) = body {
                match tokio::time::timeout(
                    BODY_TIMEOUT,
                    body::buffer(incoming, BODY_INSPECTION_LIMIT),
                )
                .await
                {
                    Ok(Ok(read)) => body = ReqBody::Read(read),
                    Ok(Err(e)) => {
                        return self.malformed(&ask, &format!("cannot read the body: {e}"));
                    }
                    Err(_) => {
                        return self.refuse(
                            &ask,
                            StatusCode::REQUEST_TIMEOUT,
                            &format!(
                                "request body not received within {}s",
                                BODY_TIMEOUT.as_secs()
                            ),
                            None,
                            None,
                        );
                    }
                }
            }
            let read = body.read();
            crate::metrics::timed(|| {
                policy.evaluate(
                    &self.judged(&ask, &parts, port, &read, jiff::Timestamp::now()),
                    &agent.limiter,
                )
            })
        };

        // An ask rule holds the request for a human (not in dry run: there it goes through,
        // recorded `would_ask`).
        let decision = if decision.kind == DecisionKind::Ask && !decision.dry_run {
            match self.held(&ask, &parts, &mut body, &decision, port).await {
                Ok(approved) => approved,
                Err(response) => return response,
            }
        } else {
            decision
        };

        // Credentials: placeholders become secrets where they may go and are refused
        // anywhere else, before anything is recorded as allowed or sent. The policy judged
        // the request as the agent wrote it, with placeholders.
        let mut target = ask.path.clone();
        let mut injection = None;
        let mut body_watch = None;
        if decision.forward() && !self.env.credentials.is_empty() {
            match self.env.credentials.inject(
                &self.conn.caller,
                &ask.host,
                &mut parts.headers,
                &mut target,
            ) {
                Ok(i) => injection = Some(i),
                Err(r) => return self.credential_refused(&ask, &r),
            }
            let has_body = match &body {
                ReqBody::Streamed(b) => !hyper::body::Body::is_end_stream(b),
                ReqBody::Read(_) => true,
            };
            if has_body {
                let mut watch = self
                    .env
                    .credentials
                    .body_watch(&self.conn.caller, &ask.host);
                if let (Some(w), ReqBody::Read(b)) = (watch.as_mut(), &body) {
                    for chunk in &b.chunks {
                        if let Some(r) = w.push(chunk) {
                            return self.credential_refused(&ask, &r);
                        }
                    }
                }
                body_watch = watch;
            }
        }

        let result = PolicyResult::of(&decision);
        if !self.record(&ask, result, decision.rule.as_deref(), &decision.reason) {
            return self.audit_unavailable(&ask);
        }

        // 5. Denied.
        if !decision.forward() {
            return self.denied(&ask, &decision);
        }
        if !decision.allowed {
            tracing::warn!(
                agent = %agent.name, pid = self.conn.caller.pid, comm = %self.conn.caller.comm, exe = %self.conn.caller.exe_display(),
                method = %ask.method, host = %ask.host, path = %path_without_query(&ask.path),
                request_id = %ask.id,
                "would be denied (dry-run): {}", decision.reason
            );
        } else {
            tracing::debug!(
                agent = %agent.name, pid = self.conn.caller.pid, comm = %self.conn.caller.comm, exe = %self.conn.caller.exe_display(),
                method = %ask.method, host = %ask.host, path = %path_without_query(&ask.path),
                request_id = %ask.id, "request allowed: {}", decision.reason
            );
        }

        // 6-7. Forward.
        let tunnel = is_connect || upgrade == Upgrade::WebSocket;
        strip_hop_by_hop(&mut parts.headers, tunnel);
        if !is_connect {
            let scheme = match self.conn.scheme {
                Scheme::Http => "http",
                Scheme::Https => "https",
            };
            let uri = Uri::builder()
                .scheme(scheme)
                .authority(authority.as_str())
                .path_and_query(target.as_str())
                .build();
            match uri {
                Ok(u) => parts.uri = u,
                Err(e) => return self.malformed(&ask, &format!("invalid request target: {e}")),
            }
        }
        parts.version = Version::HTTP_11;
        if safe_method_body {
            // Never reused: whatever the upstream makes of the body ends with this connection.
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let sent = Arc::new(AtomicU64::new(0));
        let up_body = match body {
            ReqBody::Streamed(b) => UpBody::streamed(b, sent.clone()),
            ReqBody::Read(b) => UpBody::replay(b, sent.clone()),
        };
        // The replayed part was scanned above; the watch goes on with what streams.
        let (up_body, leaked) = match body_watch {
            Some(w) => up_body.watched(w),
            None => (up_body, None),
        };
        let would_deny = !decision.allowed;
        let mut completion = self.completion(&ask, &decision, sent);
        let response = match self
            .client
            .request(Request::from_parts(parts, up_body))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                // A placeholder in the streamed body cut the request short.
                if let Some(r) = leaked.as_ref().and_then(body::take_leak) {
                    completion.status = StatusCode::FORBIDDEN.as_u16();
                    completion.reason = Some(r.reason().to_owned());
                    completion.record(0);
                    return self.credential_refused(&ask, &r);
                }
                return self.upstream_failed(&ask, &e, completion);
            }
        };
        completion.status = response.status().as_u16();
        let switched = match (is_connect, upgrade) {
            (true, _) => response.status().is_success(),
            (false, Upgrade::WebSocket) => response.status() == StatusCode::SWITCHING_PROTOCOLS,
            _ => false,
        };
        let mut response = if switched {
            self.tunnel(response, on_upgrade, completion)
        } else {
            let (mut head, incoming) = response.into_parts();
            strip_hop_by_hop(&mut head.headers, false);
            // A secret an upstream echoes goes back to the agent as its placeholder.
            let masker = injection.as_ref().and_then(|i| i.masker());
            let mut down = DownBody::upstream(incoming, completion);
            if let Some(m) = masker {
                for value in head.headers.values_mut() {
                    if let Some(masked) = m.replace_all(value.as_bytes())
                        && let Ok(v) = HeaderValue::from_bytes(&masked)
                    {
                        *value = v;
                    }
                }
                let bodiless = ask.method == Method::HEAD
                    || head.status == StatusCode::NO_CONTENT
                    || head.status == StatusCode::NOT_MODIFIED;
                if !bodiless {
                    // The masked length is not known in advance: chunked (or close-delimited).
                    head.headers.remove(header::CONTENT_LENGTH);
                    down = down.masked(m);
                }
            }
            Response::from_parts(head, down)
        };
        let headers = response.headers_mut();
        if would_deny {
            headers.insert(DECISION_HEADER, HeaderValue::from_static("would_deny"));
            if let Ok(v) = HeaderValue::from_str(&ask.id) {
                headers.insert(REQUEST_ID_HEADER, v);
            }
        }
        if ask.close && !switched {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    /// The authority the request names: `:authority` or the absolute-form target, and the
    /// `Host` header, which must agree when both are present.
    fn authority(&self, req: &Request<Incoming>, is_connect: bool) -> Result<String, String> {
        let mut hosts = req.headers().get_all(header::HOST).iter();
        let host = hosts.next();
        if hosts.next().is_some() {
            return Err("more than one Host header".into());
        }
        let host = host
            .map(|h| h.to_str().map(str::trim))
            .transpose()
            .map_err(|_| "the Host header is not ASCII".to_owned())?;
        let target = req.uri().authority().map(|a| a.as_str());
        match (target, host) {
            (Some(t), _) if is_connect => Ok(t.to_owned()),
            (Some(t), Some(h)) if !t.eq_ignore_ascii_case(h) => Err(format!(
                "the request target names '{t}' but the Host header says '{h}'"
            )),
            (Some(t), _) => Ok(t.to_owned()),
            (None, Some(h)) if !h.is_empty() => Ok(h.to_owned()),
            (None, _) if req.version() == Version::HTTP_10 => Ok(match &self.conn.sni {
                Some(sni) => sni.clone(),
                None => match self.dst_ip {
                    IpAddr::V6(v6) => format!("[{v6}]"),
                    v4 => v4.to_string(),
                },
            }),
            (None, _) => Err("no Host header".into()),
        }
    }

    /// Replaces the request's host by its canonical form (an IPv4-mapped address as IPv4,
    /// like the kernel judges it), after checking that it belongs to the destination (not
    /// for CONNECT, whose target is elsewhere by design). `Some(reason)` when it does not.
    fn canonicalize(&self, ask: &mut Ask, is_connect: bool) -> Option<String> {
        if is_connect {
            if let Ok(c) = canonical_host(&ask.host) {
                ask.host = c;
            }
            return None;
        }
        let mut last = self.last_host.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((raw, canonical)) = last.as_ref()
            && *raw == ask.host
        {
            ask.host = canonical.clone();
            return None;
        }
        match self.conn.caller.agent.check_host(&ask.host, self.dst_ip) {
            Ok(canonical) => {
                let raw = std::mem::replace(&mut ask.host, canonical.clone());
                *last = Some((raw, canonical));
                None
            }
            Err(reason) => Some(reason),
        }
    }

    /// Over TLS, the request's host must be the SNI (or the address when there was none).
    fn misdirected(&self, ask: &Ask) -> Option<Response<DownBody>> {
        if self.conn.scheme != Scheme::Https {
            return None;
        }
        let host = match ask.host.parse::<IpAddr>() {
            Ok(ip) => crate::addr::canonical(ip).to_string(),
            Err(_) => canonical_host(&ask.host).unwrap_or_else(|_| ask.host.to_ascii_lowercase()),
        };
        let reason = match &self.conn.sni {
            Some(sni) if *sni == host => return None,
            Some(sni) => format!(
                "domain fronting refused: the TLS server name is '{sni}' but the request is for '{}'",
                ask.host
            ),
            None if host == self.dst_ip.to_string() => return None,
            None => format!(
                "misdirected request: no TLS server name was sent, so this connection only \
                 serves {}; the request is for '{}'",
                self.dst_ip, ask.host
            ),
        };
        Some(self.refuse(
            &ask_closing(ask),
            StatusCode::MISDIRECTED_REQUEST,
            &reason,
            None,
            None,
        ))
    }

    /// Writes a `request` record. False when the log is failing in strict mode: the request
    /// must then be refused.
    fn record(&self, ask: &Ask, result: PolicyResult, rule: Option<&str>, reason: &str) -> bool {
        let mut ev = self
            .conn
            .caller
            .event(EventKind::Request)
            .request_id(ask.id.clone())
            .policy_result(result)
            .reason(reason)
            .url_host(ask.host.clone())
            .method(ask.method.as_str())
            .url_path(ask.path.clone())
            .dest(self.conn.dst.to_string())
            .scheme(match self.conn.scheme {
                Scheme::Http => "http",
                Scheme::Https => "https",
            })
            .header_names(ask.header_names.clone());
        if ask.port != 0 {
            ev = ev.port(ask.port);
        }
        if let Some(rule) = rule {
            ev = ev.matched_rule(rule);
        }
        self.env.decisions.record(ev)
    }

    /// The request as the policy judges it, at `now`.
    fn judged<'a>(
        &'a self,
        ask: &'a Ask,
        parts: &'a http::request::Parts,
        port: u16,
        (body, truncated): &'a (Option<bytes::Bytes>, bool),
        now: jiff::Timestamp,
    ) -> crate::policy::Request<'a> {
        crate::policy::Request {
            scheme: self.conn.scheme,
            method: parts.method.as_str(),
            host: &ask.host,
            port,
            path_and_query: &ask.path,
            headers: &parts.headers,
            body: body.as_deref(),
            body_truncated: *truncated,
            now,
            exe: self.conn.caller.exe.as_ref().map(|e| e.id),
        }
    }

    /// An `ask` decision: the request waits for a human. `Ok` with an allow decision when it
    /// may go on (approved now, or an earlier approval's grant covers it), `Err` with the
    /// response otherwise (rejected, timed out, too many held, or denied by the policy in
    /// force when the approval came).
    async fn held(
        &self,
        ask: &Ask,
        parts: &http::request::Parts,
        body: &mut ReqBody,
        decision: &Decision,
        port: u16,
    ) -> Result<Decision, Response<DownBody>> {
        let agent = &self.conn.caller.agent;
        let rule = decision.rule.as_deref().unwrap_or_default().to_owned();
        let approved = |reason: String| {
            let mut d = decision.clone();
            d.allowed = true;
            d.kind = DecisionKind::Allow;
            d.reason = reason;
            d.retry_after = None;
            d
        };
        if let Some(uid) =
            self.env
                .approvals
                .granted(&agent.name, &rule, ask.method.as_str(), &ask.host)
        {
            return Ok(approved(format!(
                "allowed by rule '{rule}': a grant approved by uid {uid}"
            )));
        }
        // The body is held with the request, within the inspection limit.
        if matches!(body, ReqBody::Streamed(_))
            && let ReqBody::Streamed(incoming) =
                std::mem::replace(body, ReqBody::Read(Buffered::empty()))
        {
            match tokio::time::timeout(BODY_TIMEOUT, body::buffer(incoming, BODY_INSPECTION_LIMIT))
                .await
            {
                Ok(Ok(read)) => *body = ReqBody::Read(read),
                _ => return Err(self.malformed(ask, "cannot read the body of a held request")),
            }
        }
        let read = body.read();
        let request = |now| self.judged(ask, parts, port, &read, now);
        let policy = agent.policy();
        let fields = policy.rule_fields(&rule, &request(jiff::Timestamp::now()));
        let shown_url = format!(
            "{}://{}{}",
            match self.conn.scheme {
                Scheme::Http => "http",
                Scheme::Https => "https",
            },
            ask.host,
            path_without_query(&ask.path)
        );
        let answer = self.env.approvals.hold(crate::approvals::Ask {
            id: ask.id.clone(),
            agent: agent.name.clone(),
            pid: self.conn.caller.pid,
            comm: self.conn.caller.comm.to_string(),
            exe: self.conn.caller.exe.as_ref().map(|e| e.display()),
            method: ask.method.to_string(),
            host: ask.host.clone(),
            url: shown_url,
            rule: rule.clone(),
            fields,
        });
        let rx = match answer {
            Ok(rx) => rx,
            Err(e) => {
                return Err(self.refuse(
                    ask,
                    StatusCode::SERVICE_UNAVAILABLE,
                    &e.to_string(),
                    Some(&rule),
                    Some(Duration::from_secs(5)),
                ));
            }
        };
        tracing::info!(
            agent = %agent.name, pid = self.conn.caller.pid, comm = %self.conn.caller.comm,
            method = %ask.method, host = %ask.host, path = %path_without_query(&ask.path),
            approval_id = %ask.id, "request held for approval by rule '{rule}'"
        );
        // Expired when dropped unanswered (a timeout, or the agent going away).
        struct Waiting<'a>(&'a crate::approvals::Approvals, &'a str);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.expire(self.1);
            }
        }
        let waiting = Waiting(&self.env.approvals, &ask.id);
        let timeout = decision.retry_after.unwrap_or(Duration::from_secs(60));
        let outcome = tokio::time::timeout(timeout, rx).await;
        drop(waiting);
        match outcome {
            Ok(Ok(crate::approvals::Answer::Approved { by_uid })) => {
                // The policy in force now decides: a reload may have denied it meanwhile.
                let now = agent
                    .policy()
                    .evaluate(&request(jiff::Timestamp::now()), &agent.limiter);
                match now.kind {
                    DecisionKind::Allow | DecisionKind::Ask => Ok(approved(format!(
                        "allowed by rule '{rule}': approved by uid {by_uid}"
                    ))),
                    _ => {
                        let _ = self.record(
                            ask,
                            PolicyResult::of(&now),
                            now.rule.as_deref(),
                            &now.reason,
                        );
                        Err(self.denied(ask, &now))
                    }
                }
            }
            Ok(Ok(crate::approvals::Answer::Rejected { by_uid, reason })) => Err(self.refuse(
                ask,
                StatusCode::FORBIDDEN,
                &format!("rule '{rule}': rejected by uid {by_uid}: {reason}"),
                Some(&rule),
                None,
            )),
            Ok(Err(_)) | Err(_) => {
                let reason = format!(
                    "rule '{rule}' holds this request for a human's approval and none came within                      {}s; retry after `enforcer approve {}`",
                    timeout.as_secs(),
                    ask.id
                );
                let _ = self.record(ask, PolicyResult::Deny, Some(&rule), &reason);
                Err(deny::response(&Refusal {
                    status: StatusCode::FORBIDDEN,
                    decision: Some("deny"),
                    body: DenyBody {
                        kind: deny::Kind::AwaitingApproval,
                        reason: &reason,
                        rule: Some(&rule),
                        agent_id: &agent.name,
                        request_id: &ask.id,
                        retryable: true,
                    },
                    retry_after: None,
                    close: ask.close,
                }))
            }
        }
    }

    /// A request carrying a credential's placeholder where it may not go (`credential_leak`),
    /// or needing a secret that cannot be had (a denied `request`): 403 either way.
    fn credential_refused(&self, ask: &Ask, r: &crate::credentials::Refusal) -> Response<DownBody> {
        let rule = format!("credential:{}", r.credential());
        if let crate::credentials::Refusal::Unavailable { .. } = r {
            return self.refuse(ask, StatusCode::FORBIDDEN, r.reason(), Some(&rule), None);
        }
        let ev = self
            .conn
            .caller
            .event(EventKind::CredentialLeak)
            .request_id(ask.id.clone())
            .policy_result(PolicyResult::Deny)
            .reason(r.reason())
            .url_host(ask.host.clone())
            .method(ask.method.as_str())
            .url_path(ask.path.clone())
            .dest(self.conn.dst.to_string())
            .matched_rule(rule.clone());
        if !self.env.decisions.record(ev) {
            return self.audit_unavailable(ask);
        }
        tracing::warn!(
            agent = %self.conn.caller.agent.name, pid = self.conn.caller.pid, comm = %self.conn.caller.comm, exe = %self.conn.caller.exe_display(),
            method = %ask.method, host = %ask.host, path = %path_without_query(&ask.path),
            request_id = %ask.id, "credential leak refused: {}", r.reason()
        );
        deny::response(&Refusal {
            status: StatusCode::FORBIDDEN,
            decision: Some("deny"),
            body: DenyBody {
                kind: deny::Kind::Denied,
                reason: r.reason(),
                rule: Some(&rule),
                agent_id: &self.conn.caller.agent.name,
                request_id: &ask.id,
                retryable: false,
            },
            retry_after: None,
            close: ask.close,
        })
    }

    /// A policy denial: 403, or 429 for a rate limit.
    fn denied(&self, ask: &Ask, decision: &Decision) -> Response<DownBody> {
        tracing::info!(
            agent = %self.conn.caller.agent.name, pid = self.conn.caller.pid, comm = %self.conn.caller.comm, exe = %self.conn.caller.exe_display(),
            method = %ask.method, host = %ask.host, path = %path_without_query(&ask.path),
            request_id = %ask.id, "request denied: {}", decision.reason
        );
        let limited = decision.kind == DecisionKind::RateLimited;
        deny::response(&Refusal {
            status: if limited {
                StatusCode::TOO_MANY_REQUESTS
            } else {
                StatusCode::FORBIDDEN
            },
            decision: Some(if limited { "rate_limited" } else { "deny" }),
            body: DenyBody {
                kind: if limited {
                    deny::Kind::RateLimited
                } else {
                    deny::Kind::Denied
                },
                reason: &decision.reason,
                rule: decision.rule.as_deref(),
                agent_id: &self.conn.caller.agent.name,
                request_id: &ask.id,
                retryable: limited,
            },
            retry_after: if limited {
                Some(decision.retry_after.unwrap_or(Duration::from_secs(1)))
            } else {
                None
            },
            close: ask.close,
        })
    }

    /// A refusal that is not a policy verdict (malformed, misdirected, too slow): recorded
    /// as a deny, answered with `status`.
    fn refuse(
        &self,
        ask: &Ask,
        status: StatusCode,
        reason: &str,
        rule: Option<&str>,
        retry_after: Option<Duration>,
    ) -> Response<DownBody> {
        let _ = self.record(ask, PolicyResult::Deny, rule, reason);
        tracing::info!(
            agent = %self.conn.caller.agent.name, pid = self.conn.caller.pid, comm = %self.conn.caller.comm, exe = %self.conn.caller.exe_display(),
            method = %ask.method, host = %ask.host, path = %path_without_query(&ask.path),
            request_id = %ask.id, "request refused ({}): {reason}", status.as_u16()
        );
        deny::response(&Refusal {
            status,
            decision: Some("deny"),
            body: DenyBody {
                kind: if status == StatusCode::FORBIDDEN {
                    deny::Kind::Denied
                } else {
                    deny::Kind::Refused
                },
                reason,
                rule,
                agent_id: &self.conn.caller.agent.name,
                request_id: &ask.id,
                retryable: false,
            },
            retry_after,
            close: ask.close,
        })
    }

    fn malformed(&self, ask: &Ask, why: &str) -> Response<DownBody> {
        self.refuse(
            &ask_closing(ask),
            StatusCode::BAD_REQUEST,
            &format!("malformed request: {why}"),
            None,
            None,
        )
    }

    fn audit_unavailable(&self, ask: &Ask) -> Response<DownBody> {
        deny::response(&Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            decision: Some("deny"),
            body: DenyBody {
                kind: deny::Kind::AuditUnavailable,
                reason: "the audit log cannot be written, and security_mode is strict",
                rule: None,
                agent_id: &self.conn.caller.agent.name,
                request_id: &ask.id,
                retryable: true,
            },
            retry_after: Some(Duration::from_secs(1)),
            close: ask.close,
        })
    }

    fn completion(&self, ask: &Ask, decision: &Decision, sent: Arc<AtomicU64>) -> Completion {
        Completion {
            audit: self.env.decisions.log().clone(),
            request_id: ask.id.clone(),
            caller: self.conn.caller.clone(),
            host: ask.host.clone(),
            dest: self.conn.dst.to_string(),
            method: ask.method.as_str().to_owned(),
            path: ask.path.clone(),
            rule: decision.rule.clone(),
            started: ask.started,
            status: 0,
            bytes_up: sent,
            reason: None,
        }
    }

    /// 502: the upstream could not be reached, or its certificate failed verification (the
    /// request never reaches it; bytes are never passed through unverified).
    fn upstream_failed(
        &self,
        ask: &Ask,
        err: &body::BoxError,
        mut completion: Completion,
    ) -> Response<DownBody> {
        let cause = UpstreamError::find(err.as_ref());
        let verify = matches!(cause, Some(UpstreamError::Verify { .. }));
        let reason = match cause {
            Some(e) => e.to_string(),
            None => format!("upstream request failed: {err}"),
        };
        if verify {
            tracing::warn!(
                agent = %self.conn.caller.agent.name, pid = self.conn.caller.pid, comm = %self.conn.caller.comm, exe = %self.conn.caller.exe_display(),
                host = %ask.host, request_id = %ask.id, "{reason}"
            );
        } else {
            tracing::info!(
                agent = %self.conn.caller.agent.name, host = %ask.host, dst = %self.conn.dst,
                request_id = %ask.id, "{reason}"
            );
        }
        completion.status = StatusCode::BAD_GATEWAY.as_u16();
        completion.reason = Some(reason.clone());
        completion.record(0);
        deny::response(&Refusal {
            status: StatusCode::BAD_GATEWAY,
            decision: verify.then_some("deny"),
            body: DenyBody {
                kind: if verify {
                    deny::Kind::UpstreamCertificate
                } else {
                    deny::Kind::UpstreamUnreachable
                },
                reason: &reason,
                rule: None,
                agent_id: &self.conn.caller.agent.name,
                request_id: &ask.id,
                retryable: !verify,
            },
            retry_after: None,
            close: ask.close,
        })
    }

    /// The upstream switched protocols: relay its answer, then splice both upgraded streams
    /// in a task of the connection's scope.
    fn tunnel(
        &self,
        mut response: Response<Incoming>,
        client_side: Option<OnUpgrade>,
        completion: Completion,
    ) -> Response<DownBody> {
        let upstream_side = hyper::upgrade::on(&mut response);
        let token = self.tunnels.clone();
        let agent = self.conn.caller.agent.name.clone();
        self.scope.spawn(async move {
            let _token = token;
            let client_side = match client_side {
                Some(c) => c.await,
                None => return completion.record(0),
            };
            let (Ok(down), Ok(up)) = (client_side, upstream_side.await) else {
                tracing::debug!(%agent, "upgrade failed on one side");
                return completion.record(0);
            };
            let mut down = TokioIo::new(down);
            let mut up = TokioIo::new(up);
            let (u, d) = tokio::io::copy_bidirectional(&mut down, &mut up)
                .await
                .unwrap_or((0, 0));
            completion
                .bytes_up
                .fetch_add(u, std::sync::atomic::Ordering::Relaxed);
            completion.record(d);
        });
        let (head, _) = response.into_parts();
        Response::from_parts(head, DownBody::empty())
    }

    /// The guard's answer to a refused HTTP/1 head: recorded, rendered.
    fn reporter(self: &Arc<Self>) -> guard::Reporter {
        let svc = self.clone();
        Box::new(move |v: &guard::Violation| {
            let ask = Ask {
                id: uuid::Uuid::now_v7().to_string(),
                started: Instant::now(),
                method: Method::GET,
                host: String::new(),
                path: String::new(),
                close: true,
                port: 0,
                header_names: Vec::new(),
            };
            let reason = v.reason();
            let mut ev = svc
                .conn
                .caller
                .event(EventKind::Request)
                .request_id(ask.id.clone())
                .policy_result(PolicyResult::Deny)
                .reason(reason.clone())
                .dest(svc.conn.dst.to_string());
            if let Some(sni) = &svc.conn.sni {
                ev = ev.url_host(sni.clone());
            }
            let _ = svc.env.decisions.record(ev);
            tracing::info!(
                agent = %svc.conn.caller.agent.name, pid = svc.conn.caller.pid, comm = %svc.conn.caller.comm,
                dst = %svc.conn.dst, request_id = %ask.id,
                "request refused ({}): {reason}", v.status().as_u16()
            );
            deny::http1_bytes(&Refusal {
                status: v.status(),
                decision: Some("deny"),
                body: DenyBody {
                    kind: deny::Kind::Refused,
                    reason: &reason,
                    rule: None,
                    agent_id: &svc.conn.caller.agent.name,
                    request_id: &ask.id,
                    retryable: false,
                },
                retry_after: None,
                close: true,
            })
        })
    }
}

fn ask_closing(ask: &Ask) -> Ask {
    Ask {
        id: ask.id.clone(),
        started: ask.started,
        method: ask.method.clone(),
        host: ask.host.clone(),
        path: ask.path.clone(),
        close: true,
        port: ask.port,
        header_names: ask.header_names.clone(),
    }
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1) and those the `Connection` header lists.
/// For an upgrade being relayed, `Upgrade` and `Connection: upgrade` stay.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        if keep_upgrade && name == header::UPGRADE {
            continue;
        }
        headers.remove(name);
    }
    for name in [
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        HeaderName::from_static("http2-settings"),
    ] {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

#[cfg(test)]
mod tests;
