//! The transparent proxy: every TCP connection the kernel redirected lands here.
//!
//! For each connection:
//! 1. recover the original destination and the process from the kernel's record (a
//!    connection without one was not redirected, and is closed: its "destination" could be
//!    spoofed);
//! 2. a destination a `tcp:` rule allows is spliced at once, with no peeking, so
//!    server-speaks-first protocols work;
//! 3. otherwise the first bytes are read (bounded in time and size): a TLS ClientHello gives
//!    the SNI, an HTTP/1.x request line marks plain HTTP; opaque TCP that no `tcp:` rule
//!    allows is refused;
//! 4. plain HTTP is served by [`http`]: every request is judged by the policy on its own;
//! 5. TLS is routed by [`tls`]: a host that needs only a host-level decision is judged on its
//!    SNI and spliced, one with request-level rules is intercepted (TLS terminated with a
//!    leaf from the local CA) and served by [`http`] like plain HTTP;
//! 6. internal destinations are refused unless the policy names them (no confused deputy);
//! 7. spliced bytes go to the original destination, and every connection (spliced or
//!    served) is cut with a reset when the kill switch engages.
//!
//! # Layout
//! - [`peek`]: classifying the first bytes.
//! - [`http`]: serving HTTP/1.x and HTTP/2 with a decision per request.
//! - [`tls`]: TLS modes, interception and upstream TLS configuration.
//! - [`deny`]: the JSON denials.
//! - [`deputy`]: internal destinations.
//! - [`limits`]: connections per agent and the file-descriptor budget.
//! - [`sockmap`]: spliced bytes moved in the kernel (sockhash and `sk_skb` verdict).
//! - [`scope`], [`rewind`]: what a served connection owns; replaying peeked bytes.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use enforcer_common::OrigDst;
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
};

use crate::{
    agents::{
        Caller, Registry,
        conns::{ConnGuard, Pending},
    },
    audit::{AuditEvent, Decisions, EventKind, PolicyResult},
    bpf::{Kernel, ip_of},
    config::SecurityMode,
    policy::{Decision, Policy, Scheme},
};

/// The `AsyncWrite` methods of a wrapper that only watches or prefixes reads: each forwards to
/// the wrapped stream in the field `inner`. Use inside `impl AsyncWrite for ...`.
macro_rules! forward_async_write {
    () => {
        fn poll_write(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            buf: &[u8],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            ::std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            bufs: &[::std::io::IoSlice<'_>],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            ::std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.inner.is_write_vectored()
        }

        fn poll_flush(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            ::std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            ::std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    };
}

pub mod agent_api;
pub mod deny;
pub mod deputy;
pub mod http;
pub mod limits;
pub mod peek;
pub mod rewind;
pub mod scope;
pub mod sockmap;
pub mod tls;

#[cfg(test)]
mod tests;

use deputy::Deputy;
use peek::Opening;

/// Longest wait for the upstream TCP handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the agent's side of an intercepted TLS handshake.
pub const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the proxy learns who connected and where they meant to go: the kernel's record of
/// the redirected connect, looked up by the client's address as the proxy sees it, and
/// deleted. A trait, so the connection path can be tested without root.
pub trait Records: Send + Sync + 'static {
    fn take_orig(&self, peer: SocketAddr) -> Option<OrigDst>;
}

impl Records for Kernel {
    fn take_orig(&self, peer: SocketAddr) -> Option<OrigDst> {
        Kernel::take_orig(self, peer)
    }
}

/// What every connection handler needs.
pub struct ProxyContext {
    /// The kernel's records of redirected connects.
    pub records: Arc<dyn Records>,
    pub registry: Arc<Registry>,
    pub decisions: Decisions,
    pub deputy: Deputy,
    /// TLS modes, the local CA, interception.
    pub tls: Arc<tls::TlsContext>,
    /// What served (L7) connections need.
    pub l7: Arc<http::L7Env>,
    /// Connections per agent, and the file-descriptor budget.
    pub limits: limits::Limits,
    /// The in-kernel splice, when the kernel runs it; `None` copies spliced bytes in user
    /// space.
    pub splicer: Option<Arc<sockmap::Splicer>>,
    /// `enforcer.internal`, when `agent_api` is on: the refusals it shows.
    pub agent_api: Option<Arc<agent_api::Denials>>,
}

/// The proxy threads: each runs the connections handed to it on a single-threaded runtime
/// of its own, until the process exits.
///
/// Why not the daemon's multi-threaded runtime: a proxied request wakes a task for the
/// client side, one for the upstream side and hyper's dispatch between them. On a
/// work-stealing runtime those wake-ups hop between workers; on a thread of its own a
/// connection's tasks stay in one cache and need no cross-thread wake-ups. Measured on a
/// 2-vCPU VM (BENCHMARKS.md): about half the daemon CPU per request.
pub struct Workers {
    queues: Vec<tokio::sync::mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr)>>,
    next: std::sync::atomic::AtomicUsize,
    /// The threads' kernel ids, for the kill switch to lower their priority while they tear
    /// down killed streams.
    tids: Vec<libc::pid_t>,
}

impl Workers {
    /// Starts `count` threads. Fails when a runtime or a thread cannot be set up.
    pub fn start(count: usize, ctx: Arc<ProxyContext>) -> std::io::Result<Arc<Workers>> {
        let mut queues = Vec::with_capacity(count);
        let mut tids = Vec::with_capacity(count);
        for i in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let ctx = ctx.clone();
            let (tid_tx, tid_rx) = std::sync::mpsc::sync_channel(1);
            std::thread::Builder::new()
                .name(format!("proxy-{i}"))
                .spawn(move || {
                    let _ = tid_tx.send(nix::unistd::gettid().as_raw());
                    runtime.block_on(async move {
                        while let Some((stream, peer)) = rx.recv().await {
                            let ctx = ctx.clone();
                            tokio::spawn(async move {
                                match TcpStream::from_std(stream) {
                                    Ok(stream) => handle(ctx, stream, peer).await,
                                    Err(e) => tracing::warn!(%peer, "proxy thread cannot take a connection: {e}"),
                                }
                            });
                        }
                    });
                })?;
            queues.push(tx);
            tids.extend(tid_rx.recv().ok());
        }
        Ok(Arc::new(Workers {
            queues,
            next: std::sync::atomic::AtomicUsize::new(0),
            tids,
        }))
    }

    /// The proxy threads' kernel thread ids.
    pub fn thread_ids(&self) -> &[libc::pid_t] {
        &self.tids
    }

    /// Hands a connection to the next thread, round robin (connections, not requests, are
    /// balanced: a keep-alive connection stays where it landed).
    fn dispatch(&self, stream: TcpStream, peer: SocketAddr) {
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, "cannot hand a connection to a proxy thread: {e}");
                return;
            }
        };
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.queues.len();
        // A send fails only when the thread has died; the connection is then dropped
        // (closed) rather than served by nobody.
        if self.queues[i].send((stream, peer)).is_err() {
            tracing::error!(%peer, "proxy thread {i} is gone; closing the connection");
        }
    }
}

/// Accepts redirected connections and hands them to the proxy threads, until the listener
/// fails.
pub async fn accept(listener: TcpListener, workers: Arc<Workers>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => workers.dispatch(stream, peer),
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("proxy accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The decision on one connection, with what is needed to record it.
struct Verdict {
    decision: Decision,
    scheme: Option<Scheme>,
    host: String,
}

/// Where a connection goes once its first bytes (or its destination alone) are known.
enum Route {
    /// A host-level decision: spliced to the destination if it forwards, refused otherwise.
    Decided { verdict: Verdict, prefix: Vec<u8> },
    /// Plain HTTP, served: every request judged on its own.
    Serve { prefix: Vec<u8> },
    /// TLS intercepted with a leaf from the local CA, then served.
    Intercept {
        prefix: Vec<u8>,
        /// The canonical SNI, if the client sent one.
        sni: Option<String>,
    },
}

async fn handle(ctx: Arc<ProxyContext>, client: TcpStream, peer: SocketAddr) {
    let Some(orig) = ctx.records.take_orig(peer) else {
        tracing::debug!(%peer, "closing a connection the kernel did not redirect");
        return;
    };
    if orig.flags & enforcer_common::orig_flags::DIRECT != 0 {
        tracing::debug!(%peer, "closing a direct connection to the proxy port");
        return;
    }
    let Some(caller) = Caller::from_orig(&ctx.registry, &orig) else {
        tracing::warn!(agent_id = orig.agent, %peer, "redirected connection of an unknown agent; closing");
        return;
    };
    if caller.agent.is_killed() {
        // The kernel refuses new connects once the flag is set; this closes the race with a
        // connect that got through just before.
        return;
    }
    // Our end of the agent's stream, for the kill switch to destroy in the kernel. Without
    // it (its cookie unreadable) the kill switch still cuts the stream from this task.
    let our_socket = client
        .local_addr()
        .ok()
        .and_then(|local| crate::sys::sockdiag::SocketRef::new(&client, local, peer));
    let agent = caller.agent.clone();
    let dst = SocketAddr::new(ip_of(&orig.addr), orig.port);
    let admitted = match ctx.limits.fds.take() {
        None => Err(format!(
            "the proxy holds {} connections, all the file descriptors it may use (the rest are \
             kept for the admin socket, the audit log and the resolver); raise LimitNOFILE",
            ctx.limits.fds.max()
        )),
        Some(slot) => agent
            .conns
            .admit(
                our_socket,
                ctx.limits.per_agent_open,
                ctx.limits.per_agent_pending,
            )
            .map(|(guard, opening)| (slot, guard, opening))
            .map_err(|full| full.describe(&agent.name)),
    };
    let (_slot, guard, opening) = match admitted {
        Ok(admitted) => admitted,
        Err(reason) => {
            // Reset at once: the agent's flood must not hold descriptors while it waits.
            crate::sys::reset_on_close(&client);
            drop(client);
            tracing::debug!(agent = %agent.name, %dst, "connection refused: {reason}");
            let _ = ctx.decisions.record(
                caller
                    .event(EventKind::Connection)
                    .dest(dst.to_string())
                    .policy_result(PolicyResult::Deny)
                    .reason(reason),
            );
            return;
        }
    };
    let conn = Connection {
        policy: agent.policy(),
        dst,
        caller,
        request_id: uuid::Uuid::now_v7().to_string(),
        started: Instant::now(),
        ctx,
    };
    conn.run(client, guard, opening).await;
}

/// One redirected connection: who made it, where it was going, and the policy it is judged
/// by (loaded once, so a reload mid-connection does not change its verdict).
struct Connection {
    ctx: Arc<ProxyContext>,
    caller: Caller,
    /// The original destination.
    dst: SocketAddr,
    policy: Arc<Policy>,
    request_id: String,
    started: Instant,
}

impl Connection {
    async fn run(self, mut client: TcpStream, guard: ConnGuard<'_>, opening: Pending) {
        self.caller.agent.touch_eval();
        if let Some(denials) = self.ctx.agent_api.clone()
            && agent_api::is_api(self.dst.ip())
        {
            drop(opening);
            self.serve_agent_api(client, denials, guard).await;
            return;
        }
        let route = self.route(&mut client).await;
        // Step 6, once for every route that reaches the destination: no confused deputy.
        let upstream = match &route {
            Route::Decided { verdict, .. } if verdict.decision.forward() => {
                Some((verdict.scheme, verdict.host.clone()))
            }
            Route::Decided { .. } => None,
            Route::Serve { prefix } => Some((
                Some(Scheme::Http),
                match peek::recognise(prefix) {
                    Some(Opening::Http { host: Some(h) }) => h,
                    _ => self.dst.ip().to_string(),
                },
            )),
            Route::Intercept { sni, .. } => Some((
                Some(Scheme::Https),
                sni.clone().unwrap_or_else(|| self.dst.ip().to_string()),
            )),
        };
        if let Some((scheme, host)) = upstream
            && let Some(reason) = self.internal_destination()
        {
            tracing::info!(agent = %self.caller.agent.name, dst = %self.dst, "connection denied: {reason}");
            let verdict = Verdict {
                decision: Decision::refused(reason),
                scheme,
                host,
            };
            self.refuse(client, &verdict).await;
            return;
        }
        match route {
            Route::Decided { verdict, prefix } if verdict.decision.forward() => {
                drop(opening);
                self.splice(client, verdict, prefix, guard).await;
            }
            Route::Decided { verdict, prefix } => {
                tracing::info!(
                    agent = %self.caller.agent.name, pid = self.caller.pid, comm = %self.caller.comm,
                    exe = %self.caller.exe_display(), dst = %self.dst, host = %verdict.host,
                    "connection denied: {}", verdict.decision.reason
                );
                if self.in_band(&verdict) {
                    self.deny_in_band(client, verdict, prefix, guard).await;
                } else {
                    self.refuse(client, &verdict).await;
                }
            }
            Route::Serve { prefix } => self.serve_plain(client, prefix, guard, opening).await,
            Route::Intercept { prefix, sni } => {
                self.intercept(client, prefix, sni, guard, opening).await;
            }
        }
    }

    /// Steps 2-5: the route, from the destination alone (`tcp:` rules) or from the first
    /// bytes.
    async fn route(&self, client: &mut TcpStream) -> Route {
        let dst_ip = crate::addr::canonical(self.dst.ip());
        let ip_text = dst_ip.to_string();

        // Step 2: tcp: rules, judged on the destination alone, before any byte is read.
        let mut names = self.caller.agent.names_for(dst_ip);
        names.push(ip_text.clone());
        let exe = self.caller.exe.as_ref().map(|e| e.id);
        let tcp = crate::metrics::timed(|| self.policy.tcp_decision(&names, self.dst.port(), exe));
        if let Some(decision) = tcp {
            let host = names.first().cloned().unwrap_or(ip_text);
            return Route::Decided {
                verdict: Verdict {
                    decision,
                    scheme: None,
                    host,
                },
                prefix: Vec::new(),
            };
        }

        // Step 3: what does the client speak?
        let (opening, prefix) = peek::classify(client).await;
        match opening {
            // Step 4: plain HTTP, every request judged on its own.
            Opening::Http { .. } => Route::Serve { prefix },
            Opening::Opaque { why } => {
                let reason = format!(
                    "opaque TCP to {} is not allowed by any tcp: rule ({why})",
                    self.dst
                );
                Route::Decided {
                    verdict: Verdict {
                        decision: self.policy.refusal(reason),
                        scheme: None,
                        host: ip_text,
                    },
                    prefix,
                }
            }
            Opening::Tls { sni } => self.route_tls(sni, prefix, dst_ip),
        }
    }

    /// Step 5: TLS. The SNI (or, without one, the address) must belong to the address; then
    /// `tls.mode` and the policy choose splicing after a host-level decision, or interception.
    fn route_tls(&self, sni: Option<String>, prefix: Vec<u8>, dst_ip: IpAddr) -> Route {
        let ip_text = dst_ip.to_string();
        let host = sni.clone().unwrap_or_else(|| ip_text.clone());
        let decided = |decision| Route::Decided {
            verdict: Verdict {
                decision,
                scheme: Some(Scheme::Https),
                host: host.clone(),
            },
            prefix: prefix.clone(),
        };
        let canonical = match self.caller.agent.check_host(&host, dst_ip) {
            Ok(c) => c,
            Err(reason) => return decided(self.policy.refusal(reason)),
        };
        let host_decision = |canonical: &str| {
            let mut d = crate::metrics::timed(|| {
                self.policy.host_decision(
                    Scheme::Https,
                    canonical,
                    self.dst.port(),
                    jiff::Timestamp::now(),
                    self.caller.exe.as_ref().map(|e| e.id),
                )
            });
            // Without SNI the host is the address; say so when that fails.
            if !d.allowed && sni.is_none() {
                d.reason = format!(
                    "{} (no server name given; judged by address {ip_text})",
                    d.reason
                );
            }
            d
        };
        let decision = match self.ctx.tls.route(
            &self.policy,
            &canonical,
            self.dst.port(),
            self.ctx
                .l7
                .credentials
                .inspect(&self.caller.agent.name, &canonical),
        ) {
            tls::Route::Intercept => {
                let sni = sni.as_ref().map(|_| canonical);
                return Route::Intercept { prefix, sni };
            }
            tls::Route::Splice => host_decision(&canonical),
            tls::Route::NotIntercepted(why) => {
                let mut d = host_decision(&canonical);
                let reason = format!(
                    "{canonical} has rules that judge each request (method, path, header, body, \
                     time window or rate limit), but {why}"
                );
                if !d.allowed {
                    d
                } else if self.ctx.decisions.mode() == SecurityMode::Strict {
                    self.policy
                        .refusal(format!("{reason}; denied in strict mode"))
                } else {
                    tracing::warn!(agent = %self.caller.agent.name, host = %canonical,
                        "{reason}; decided at host level (permissive mode)");
                    d.reason = format!(
                        "{} ({reason}; decided at host level in permissive mode)",
                        d.reason
                    );
                    d
                }
            }
        };
        decided(decision)
    }

    /// Why the proxy will not connect to this destination for the agent (an internal address
    /// the policy does not name explicitly), if it will not.
    fn internal_destination(&self) -> Option<String> {
        let why = self.ctx.deputy.refuses(self.dst.ip())?;
        if self
            .caller
            .agent
            .is_explicit(crate::addr::canonical(self.dst.ip()), self.dst.port())
        {
            return None;
        }
        Some(format!(
            "destination {} is {why}; only a policy that names it explicitly may reach it",
            self.dst
        ))
    }

    /// A record about this connection: the caller and the destination filled in.
    fn event(&self, kind: EventKind) -> AuditEvent {
        self.caller
            .event(kind)
            .request_id(self.request_id.clone())
            .dest(self.dst.to_string())
    }

    /// Writes the connection decision to the audit log. False when it cannot be written in
    /// strict mode: the connection must then be refused.
    fn record(&self, verdict: &Verdict) -> bool {
        let mut ev = self
            .event(EventKind::Connection)
            .policy_result(PolicyResult::of(&verdict.decision))
            .reason(verdict.decision.reason.clone())
            .url_host(verdict.host.clone())
            .port(self.dst.port())
            .scheme(match verdict.scheme {
                Some(Scheme::Http) => "http",
                Some(Scheme::Https) => "https",
                None => "tcp",
            });
        if let Some(rule) = &verdict.decision.rule {
            ev = ev.matched_rule(rule.to_string());
        }
        self.ctx.decisions.record(ev)
    }

    /// Refuses the connection: recorded; plain HTTP gets a 403, anything else is closed.
    async fn refuse(&self, mut client: TcpStream, verdict: &Verdict) {
        let _ = self.record(verdict);
        if verdict.scheme == Some(Scheme::Http) {
            let response = deny::http_403(
                &self.caller.agent.name,
                &self.request_id,
                verdict.decision.rule.as_deref(),
                &verdict.decision.reason,
            );
            let _ = client.write_all(&response).await;
            let _ = client.shutdown().await;
        }
    }

    /// `enforcer.internal`: the agent API, answered here (plain HTTP, or TLS with a leaf from
    /// the local CA), never forwarded.
    async fn serve_agent_api(
        &self,
        client: TcpStream,
        denials: Arc<agent_api::Denials>,
        mut guard: ConnGuard<'_>,
    ) {
        let mut first = [0u8; 1];
        let peeked = tokio::time::timeout(Duration::from_secs(10), client.peek(&mut first)).await;
        if !matches!(peeked, Ok(Ok(1))) {
            return;
        }
        let scope = scope::Scope::new();
        let caller = self.caller.clone();
        let service = hyper::service::service_fn(move |req| {
            let response = agent_api::handle(&denials, &caller, &req);
            async move { Ok::<_, std::convert::Infallible>(response) }
        });
        let tracked = scope::Tracked::new(client, scope.clone());
        let served = async {
            if first[0] == 0x16 {
                let Some(config) = self
                    .ctx
                    .tls
                    .server_config(Some(agent_api::NAME), crate::addr::canonical(self.dst.ip()))
                else {
                    return;
                };
                let Ok(Ok(tls)) = tokio::time::timeout(
                    CLIENT_HANDSHAKE_TIMEOUT,
                    tokio_rustls::TlsAcceptor::from(config).accept(tracked),
                )
                .await
                else {
                    return;
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                answer_locally(tls, h2, &scope, service).await;
            } else {
                answer_locally(tracked, false, &scope, service).await;
            }
        };
        // Bounded: an agent cannot hold a proxy slot open on the API.
        tokio::select! {
            _ = tokio::time::timeout(Duration::from_secs(60), served) => {}
            () = scope::killed(&mut guard.killed, &scope) => {}
        }
        scope.abort_all();
    }

    /// Is a TLS refusal answered in band (a handshake, then a JSON 403)? Only where TLS may
    /// be decrypted at all: `tls.deny_in_band`, a local CA, not `sni` mode, not a passthrough
    /// host (those get a reset, as their clients may pin certificates).
    fn in_band(&self, verdict: &Verdict) -> bool {
        let tls = &self.ctx.tls;
        verdict.scheme == Some(Scheme::Https)
            && tls.deny_in_band
            && tls.mode != crate::config::TlsMode::Sni
            && !tls.is_passthrough(&verdict.host)
            && tls.can_intercept()
    }

    /// A TLS connection refused on its server name: recorded, then a handshake with a leaf
    /// for that name and the JSON 403 for every request on it (HTTP/1.1 with `Connection:
    /// close`, or each HTTP/2 stream), so an agent that trusts the CA reads the reason
    /// instead of a reset. An agent that does not trust the CA fails its handshake, as it
    /// would have against a reset.
    async fn deny_in_band(
        &self,
        client: TcpStream,
        verdict: Verdict,
        prefix: Vec<u8>,
        mut guard: ConnGuard<'_>,
    ) {
        if !self.record(&verdict) {
            return;
        }
        let dst_ip = crate::addr::canonical(self.dst.ip());
        let sni = verdict
            .host
            .parse::<IpAddr>()
            .is_err()
            .then_some(verdict.host.as_str());
        self.ctx.tls.prepare_leaf(sni, dst_ip).await;
        let Some(config) = self.ctx.tls.server_config(sni, dst_ip) else {
            return;
        };
        let scope = scope::Scope::new();
        let io = rewind::Rewind::new(prefix, scope::Tracked::new(client, scope.clone()));
        let handshake = tokio::time::timeout(
            CLIENT_HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsAcceptor::from(config).accept(io),
        );
        let stream = tokio::select! {
            r = handshake => match r {
                Ok(Ok(s)) => s,
                _ => return,
            },
            () = scope::killed(&mut guard.killed, &scope) => return,
        };
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        let agent = self.caller.agent.name.clone();
        let request_id = self.request_id.clone();
        let decision = verdict.decision;
        let service = hyper::service::service_fn(move |_req| {
            let rule = decision.rule.as_deref();
            let response = deny::response(&deny::Refusal {
                status: ::http::StatusCode::FORBIDDEN,
                decision: Some("deny"),
                body: deny::DenyBody {
                    kind: deny::Kind::Denied,
                    reason: &decision.reason,
                    rule,
                    agent_id: &agent,
                    request_id: &request_id,
                    retryable: false,
                },
                retry_after: None,
                close: !h2,
            });
            async move { Ok::<_, std::convert::Infallible>(response) }
        });
        // Bounded: the answer is the same for every request; the connection ends soon.
        let served = answer_locally(stream, h2, &scope, service);
        tokio::select! {
            _ = tokio::time::timeout(Duration::from_secs(30), served) => {}
            () = scope::killed(&mut guard.killed, &scope) => {}
        }
        scope.abort_all();
    }

    /// Plain HTTP: served by [`http`], one decision per request.
    async fn serve_plain(
        &self,
        client: TcpStream,
        prefix: Vec<u8>,
        guard: ConnGuard<'_>,
        opening: Pending,
    ) {
        let _ = client.set_nodelay(true);
        let scope = scope::Scope::new();
        let io = rewind::Rewind::new(prefix, scope::Tracked::new(client, scope.clone()));
        let served = http::ClientConn {
            caller: self.caller.clone(),
            dst: self.dst,
            scheme: Scheme::Http,
            sni: None,
            opening: std::sync::Mutex::new(Some(opening)),
        };
        let killed = guard.killed.clone();
        http::serve(
            self.ctx.l7.clone(),
            served,
            io,
            http::Proto::Http1,
            scope,
            killed,
        )
        .await;
        drop(guard);
    }

    /// TLS interception: the agent's handshake is completed with a leaf certificate from the
    /// local CA, then the connection is served by [`http`] (HTTP/2 or HTTP/1.1, by ALPN).
    async fn intercept(
        &self,
        client: TcpStream,
        prefix: Vec<u8>,
        sni: Option<String>,
        mut guard: ConnGuard<'_>,
        opening: Pending,
    ) {
        let agent = &self.caller.agent;
        let host = sni.clone().unwrap_or_else(|| self.dst.ip().to_string());
        let dst_ip = crate::addr::canonical(self.dst.ip());
        self.ctx.tls.prepare_leaf(sni.as_deref(), dst_ip).await;
        let Some(config) = self.ctx.tls.server_config(sni.as_deref(), dst_ip) else {
            let reason = format!("cannot mint a certificate to intercept TLS for {host}");
            tracing::error!(agent = %agent.name, dst = %self.dst, "{reason}");
            let verdict = Verdict {
                decision: Decision::refused(reason),
                scheme: Some(Scheme::Https),
                host,
            };
            self.refuse(client, &verdict).await;
            return;
        };
        let _ = client.set_nodelay(true);
        let scope = scope::Scope::new();
        let io = rewind::Rewind::new(prefix, scope::Tracked::new(client, scope.clone()));
        let handshake = tokio::time::timeout(
            CLIENT_HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsAcceptor::from(config).accept(io),
        );
        let stream = tokio::select! {
            r = handshake => match r {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(
                        agent = %agent.name, pid = self.caller.pid, comm = %self.caller.comm, host = %host,
                        "TLS handshake with the agent failed: {e} (an agent that does not trust the \
                         enforcer CA fails here: see `enforcer ca export`, or list the host in \
                         tls.passthrough_hosts if it pins certificates)"
                    );
                    return;
                }
                Err(_) => {
                    tracing::info!(agent = %agent.name, host = %host, "TLS handshake with the agent timed out");
                    return;
                }
            },
            () = scope::killed(&mut guard.killed, &scope) => return,
        };
        let proto = if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            http::Proto::Http2
        } else {
            http::Proto::Http1
        };
        tracing::debug!(agent = %agent.name, host = %host, dst = %self.dst, ?proto, "intercepting TLS");
        let served = http::ClientConn {
            caller: self.caller.clone(),
            dst: self.dst,
            scheme: Scheme::Https,
            sni,
            opening: std::sync::Mutex::new(Some(opening)),
        };
        let killed = guard.killed.clone();
        http::serve(self.ctx.l7.clone(), served, stream, proto, scope, killed).await;
        drop(guard);
    }

    /// Step 7: records the decision, connects to the original destination and splices both
    /// ways until either side closes or the kill switch cuts it.
    async fn splice(
        &self,
        client: TcpStream,
        verdict: Verdict,
        prefix: Vec<u8>,
        mut guard: ConnGuard<'_>,
    ) {
        let agent = &self.caller.agent;
        if !verdict.decision.allowed {
            tracing::warn!(
                agent = %agent.name, dst = %self.dst, host = %verdict.host,
                "would be denied (dry-run): {}", verdict.decision.reason
            );
        }
        if !self.record(&verdict) {
            return;
        }
        // A reload that narrows the policy judges this decision again (no request on the
        // stream ever will be).
        if matches!(verdict.scheme, None | Some(Scheme::Https)) {
            let splice = crate::agents::conns::Splice {
                scheme: verdict.scheme,
                hosts: vec![
                    verdict.host.clone(),
                    crate::addr::canonical(self.dst.ip()).to_string(),
                ],
                port: self.dst.port(),
                exe: self.caller.exe.as_ref().map(|e| e.id),
                dest: self.dst.to_string(),
                request_id: self.request_id.clone(),
            };
            guard.mark_splice(splice.clone());
            // A reload between the decision and the mark would have missed this stream.
            let current = agent.policy();
            if !Arc::ptr_eq(&current, &self.policy)
                && let Some(reason) = splice.refused_by(&current)
            {
                crate::sys::reset_on_close(&client);
                let _ = self.ctx.decisions.record(
                    self.event(EventKind::Connection)
                        .action(crate::audit::Action::Revoked)
                        .policy_result(PolicyResult::Deny)
                        .url_host(verdict.host.clone())
                        .port(self.dst.port())
                        .reason(reason),
                );
                return;
            }
        }
        let upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.dst)).await;
        let mut upstream = match upstream {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::info!(agent = %agent.name, dst = %self.dst, "upstream connect failed: {e}");
                crate::sys::reset_on_close(&client);
                return;
            }
            Err(_) => {
                tracing::info!(agent = %agent.name, dst = %self.dst, "upstream connect timed out");
                crate::sys::reset_on_close(&client);
                return;
            }
        };
        let _ = upstream.set_nodelay(true);
        let _ = client.set_nodelay(true);
        if !prefix.is_empty() && upstream.write_all(&prefix).await.is_err() {
            return;
        }

        let (up, down) = match &self.ctx.splicer {
            Some(splicer) => {
                match splicer.start(client, upstream, prefix.len() as u64, agent.id) {
                    sockmap::Start::Spliced(session) => {
                        let done = session.run(&mut guard.killed).await;
                        match &done.ended {
                            sockmap::Ended::Closed => {}
                            // One summary line is logged by the kill switch.
                            sockmap::Ended::Cut => tracing::debug!(
                                agent = %agent.name, dst = %self.dst,
                                "spliced connection cut by the kill switch"
                            ),
                            sockmap::Ended::Reset(why) => tracing::debug!(
                                agent = %agent.name, dst = %self.dst,
                                "spliced connection reset: {why}"
                            ),
                        }
                        (done.up, done.down)
                    }
                    sockmap::Start::Copy(client, upstream, why) => {
                        tracing::debug!(
                            agent = %agent.name, dst = %self.dst,
                            "splicing in user space: the kernel would not take the sockets: {why}"
                        );
                        copy_until_cut(client, upstream, prefix.len() as u64, &mut guard).await
                    }
                    sockmap::Start::Lost(why) => {
                        tracing::warn!(
                            agent = %agent.name, dst = %self.dst,
                            "spliced connection lost while handing it to the kernel: {why}"
                        );
                        (prefix.len() as u64, 0)
                    }
                }
            }
            None => copy_until_cut(client, upstream, prefix.len() as u64, &mut guard).await,
        };
        let mut ev = self
            .event(EventKind::Completion)
            .url_host(verdict.host.clone())
            .latency_ms(u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX))
            .bytes_up(up)
            .bytes_down(down);
        if let Some(rule) = &verdict.decision.rule {
            ev = ev.matched_rule(rule.to_string());
        }
        let _ = self.ctx.decisions.log().record(ev);
    }
}

/// Copies both ways in user space until either side closes or the kill switch cuts the
/// connection; the byte counts include the `prefix` already written upstream.
async fn copy_until_cut(
    mut client: TcpStream,
    mut upstream: TcpStream,
    prefix: u64,
    guard: &mut ConnGuard<'_>,
) -> (u64, u64) {
    let (mut up, mut down) = (prefix, 0u64);
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Ok((u, d)) = r {
                up += u;
                down += d;
            }
        }
        _ = guard.killed.wait_for(|k| *k) => {
            crate::sys::reset_on_close(&client);
            crate::sys::reset_on_close(&upstream);
            // One summary line is logged by the kill switch, not one per connection.
            tracing::debug!("connection cut by the kill switch");
        }
    }
    // Both ends close here (with a reset if the kill switch cut them), before bookkeeping.
    (up, down)
}

/// Serves a connection the proxy answers itself (an in-band denial, the agent API) with
/// `service`: HTTP/2 when ALPN chose it, else HTTP/1.1 with a 10 s head timeout. Nothing is
/// forwarded.
async fn answer_locally<IO, S, B>(io: IO, h2: bool, scope: &Arc<scope::Scope>, service: S)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            ::http::Request<hyper::body::Incoming>,
            Response = ::http::Response<B>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = hyper_util::rt::TokioIo::new(io);
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(scope::ScopeExec(scope.clone()))
            .timer(hyper_util::rt::TokioTimer::new())
            .serve_connection(io, service)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .serve_connection(io, service)
            .await;
    }
}
