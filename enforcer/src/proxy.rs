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
    agents::{Agent, Registry},
    audit::{AuditEvent, AuditLog, EventKind, PolicyResult},
    bpf::{Kernel, ip_of},
    config::SecurityMode,
    policy::{Decision, DecisionKind, Scheme, canonical_host},
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

pub mod deny;
pub mod deputy;
pub mod http;
pub mod peek;
pub mod rewind;
pub mod scope;
pub mod tls;

use deputy::Deputy;
use peek::Opening;

/// Longest wait for the upstream TCP handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the agent's side of an intercepted TLS handshake.
pub const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection handler needs.
pub struct ProxyContext {
    pub kernel: Arc<Kernel>,
    pub registry: Arc<Registry>,
    pub audit: AuditLog,
    pub security_mode: SecurityMode,
    pub deputy: Deputy,
    /// TLS modes, the local CA, interception.
    pub tls: Arc<tls::TlsContext>,
    /// What served (L7) connections need.
    pub l7: Arc<http::L7Env>,
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

async fn handle(ctx: Arc<ProxyContext>, mut client: TcpStream, peer: SocketAddr) {
    let Some(orig) = ctx.kernel.take_orig(peer) else {
        tracing::debug!(%peer, "closing a connection the kernel did not redirect");
        return;
    };
    if orig.flags & enforcer_common::orig_flags::DIRECT != 0 {
        tracing::debug!(%peer, "closing a direct connection to the proxy port");
        return;
    }
    let Some(agent) = ctx.registry.by_id(orig.agent) else {
        tracing::warn!(agent_id = orig.agent, %peer, "redirected connection of an unknown agent; closing");
        return;
    };
    let dst = SocketAddr::new(ip_of(&orig.addr), orig.port);
    let conn = Conn {
        request_id: uuid::Uuid::now_v7().to_string(),
        comm: comm_str(&orig),
        pid: orig.pid,
        dst,
        started: Instant::now(),
    };
    if agent.is_killed() {
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
    let guard = agent.conns.register(our_socket);

    let policy = agent.policy();
    agent.touch_eval();
    let dst_ip = deputy::canonical(dst.ip());
    let ip_text = dst_ip.to_string();

    // Step 2: tcp: rules, judged on the destination alone, before any byte is read.
    let mut names = agent.names_for(dst_ip);
    names.push(ip_text.clone());
    if let Some(rule) = names.iter().find_map(|n| policy.tcp_allowed(n, dst.port())) {
        let decision = Decision {
            allowed: true,
            kind: DecisionKind::Allow,
            rule: Some(Arc::from(rule)),
            reason: format!("allowed by rule '{rule}'"),
            dry_run: false,
            retry_after: None,
        };
        let host = names.first().cloned().unwrap_or(ip_text);
        let verdict = Verdict {
            decision,
            scheme: None,
            host,
        };
        forward(&ctx, &agent, &conn, verdict, client, Vec::new(), guard).await;
        return;
    }

    // Step 3: what does the client speak?
    let (opening, prefix) = peek::classify(&mut client).await;
    let sni = match &opening {
        Opening::Tls { sni } => sni.clone(),
        // Step 4: plain HTTP, every request judged on its own.
        Opening::Http { .. } => {
            serve_plain(&ctx, &agent, &conn, client, prefix, guard).await;
            return;
        }
        Opening::Opaque { why } => {
            let reason = format!("opaque TCP to {dst} is not allowed by any tcp: rule ({why})");
            let decision = deny_decision(&policy.mode(), reason);
            let verdict = Verdict {
                decision,
                scheme: None,
                host: ip_text,
            };
            refuse_or_forward(&ctx, &agent, &conn, verdict, client, prefix, guard).await;
            return;
        }
    };

    // Step 5: TLS. The SNI (or, without one, the address) must belong to the address.
    let host = sni.clone().unwrap_or_else(|| ip_text.clone());
    let canonical = match host_matches_address(&agent, &host, dst_ip) {
        Ok(c) => c,
        Err(reason) => {
            let verdict = Verdict {
                decision: deny_decision(&policy.mode(), reason),
                scheme: Some(Scheme::Https),
                host,
            };
            refuse_or_forward(&ctx, &agent, &conn, verdict, client, prefix, guard).await;
            return;
        }
    };
    let host_decision = |canonical: &str| {
        let mut d =
            policy.host_decision(Scheme::Https, canonical, dst.port(), jiff::Timestamp::now());
        // Without SNI the host is the address; say so when that fails.
        if !d.allowed && sni.is_none() {
            d.reason = format!(
                "{} (no server name given; judged by address {ip_text})",
                d.reason
            );
        }
        d
    };
    let decision = match ctx.tls.route(&policy, &canonical, dst.port()) {
        tls::Route::Intercept => {
            let sni = sni.as_ref().map(|_| canonical);
            intercept(&ctx, &agent, &conn, client, prefix, sni, guard).await;
            return;
        }
        tls::Route::Splice => host_decision(&canonical),
        tls::Route::NotIntercepted(why) => {
            let d = host_decision(&canonical);
            let reason = format!(
                "{canonical} has rules that judge each request (method, path, header, body, \
                 time window or rate limit), but {why}"
            );
            if !d.allowed {
                d
            } else if ctx.security_mode == SecurityMode::Strict {
                deny_decision(&policy.mode(), format!("{reason}; denied in strict mode"))
            } else {
                tracing::warn!(agent = %agent.name, host = %canonical,
                    "{reason}; decided at host level (permissive mode)");
                Decision {
                    reason: format!(
                        "{} ({reason}; decided at host level in permissive mode)",
                        d.reason
                    ),
                    ..d
                }
            }
        }
    };
    let verdict = Verdict {
        decision,
        scheme: Some(Scheme::Https),
        host,
    };
    refuse_or_forward(&ctx, &agent, &conn, verdict, client, prefix, guard).await;
}

/// Why the proxy will not connect to this destination for the agent (an internal address
/// the policy does not name explicitly), if it will not.
fn deputy_refusal(ctx: &ProxyContext, agent: &Agent, dst: SocketAddr) -> Option<String> {
    let why = ctx.deputy.internal(dst.ip())?;
    if agent.is_explicit(deputy::canonical(dst.ip()), dst.port()) {
        return None;
    }
    Some(format!(
        "destination {dst} is {why}; only a policy that names it explicitly may reach it"
    ))
}

/// Plain HTTP: served by [`http`], one decision per request.
async fn serve_plain(
    ctx: &Arc<ProxyContext>,
    agent: &Arc<Agent>,
    conn: &Conn,
    client: TcpStream,
    prefix: Vec<u8>,
    guard: crate::agents::conns::ConnGuard<'_>,
) {
    if let Some(reason) = deputy_refusal(ctx, agent, conn.dst) {
        let host = match peek::recognise(&prefix) {
            Some(Opening::Http { host: Some(h) }) => h,
            _ => conn.dst.ip().to_string(),
        };
        refuse_internal(ctx, agent, conn, Some(Scheme::Http), host, reason, client).await;
        return;
    }
    let _ = client.set_nodelay(true);
    let scope = scope::Scope::new();
    let io = rewind::Rewind::new(prefix, scope::Tracked::new(client, scope.clone()));
    let served = http::ClientConn {
        agent: agent.clone(),
        pid: conn.pid,
        comm: conn.comm.clone(),
        dst: conn.dst,
        scheme: Scheme::Http,
        sni: None,
    };
    let killed = guard.killed.clone();
    http::serve(
        ctx.l7.clone(),
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
    ctx: &Arc<ProxyContext>,
    agent: &Arc<Agent>,
    conn: &Conn,
    client: TcpStream,
    prefix: Vec<u8>,
    sni: Option<String>,
    mut guard: crate::agents::conns::ConnGuard<'_>,
) {
    let host = sni.clone().unwrap_or_else(|| conn.dst.ip().to_string());
    if let Some(reason) = deputy_refusal(ctx, agent, conn.dst) {
        refuse_internal(ctx, agent, conn, Some(Scheme::Https), host, reason, client).await;
        return;
    }
    let dst_ip = deputy::canonical(conn.dst.ip());
    let Some(config) = ctx.tls.server_config(sni.as_deref(), dst_ip) else {
        let reason = format!("cannot mint a certificate to intercept TLS for {host}");
        tracing::error!(agent = %agent.name, dst = %conn.dst, "{reason}");
        refuse_internal(ctx, agent, conn, Some(Scheme::Https), host, reason, client).await;
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
                    agent = %agent.name, pid = conn.pid, comm = %conn.comm, host = %host,
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
    tracing::debug!(agent = %agent.name, host = %host, dst = %conn.dst, ?proto, "intercepting TLS");
    let served = http::ClientConn {
        agent: agent.clone(),
        pid: conn.pid,
        comm: conn.comm.clone(),
        dst: conn.dst,
        scheme: Scheme::Https,
        sni,
    };
    let killed = guard.killed.clone();
    http::serve(ctx.l7.clone(), served, stream, proto, scope, killed).await;
    drop(guard);
}

/// Refuses a connection to an internal destination (recorded; plain HTTP gets a 403).
async fn refuse_internal(
    ctx: &ProxyContext,
    agent: &Agent,
    conn: &Conn,
    scheme: Option<Scheme>,
    host: String,
    reason: String,
    mut client: TcpStream,
) {
    tracing::info!(agent = %agent.name, dst = %conn.dst, "connection denied: {reason}");
    let verdict = Verdict {
        decision: deny_decision(&crate::policy::Mode::Enforce, reason),
        scheme,
        host,
    };
    record(ctx, agent, conn, &verdict, PolicyResult::Deny);
    if scheme == Some(Scheme::Http) {
        let response = deny::http_403(
            &agent.name,
            &conn.request_id,
            None,
            &verdict.decision.reason,
        );
        let _ = client.write_all(&response).await;
        let _ = client.shutdown().await;
    }
}

/// One connection's identity.
struct Conn {
    request_id: String,
    comm: String,
    pid: u32,
    dst: SocketAddr,
    started: Instant,
}

fn deny_decision(mode: &crate::policy::Mode, reason: String) -> Decision {
    Decision {
        allowed: false,
        kind: DecisionKind::Deny,
        rule: None,
        reason,
        dry_run: *mode == crate::policy::Mode::DryRun,
        retry_after: None,
    }
}

/// The SNI/Host must name the address the agent connected to: an IP literal must be that
/// address, and a name must be one the agent's DNS answers associated with it. Returns the
/// canonical host.
fn host_matches_address(agent: &Agent, host: &str, dst: IpAddr) -> Result<String, String> {
    let canonical = canonical_host(host).map_err(|e| e.to_string())?;
    if let Ok(ip) = canonical.parse::<IpAddr>() {
        // An IPv4-mapped literal is judged as its IPv4 form, like the kernel does.
        let ip = deputy::canonical(ip);
        if ip != dst {
            return Err(format!(
                "destination address not associated with host: {host} is not {dst}"
            ));
        }
        return Ok(ip.to_string());
    }
    // A name must be one the agent resolved (through us) to this very address.
    if !agent.names_for(dst).contains(&canonical) {
        return Err(format!(
            "destination address not associated with host: {canonical} was not resolved to {dst}"
        ));
    }
    Ok(canonical)
}

async fn refuse_or_forward(
    ctx: &ProxyContext,
    agent: &Agent,
    conn: &Conn,
    verdict: Verdict,
    mut client: TcpStream,
    prefix: Vec<u8>,
    guard: crate::agents::conns::ConnGuard<'_>,
) {
    if verdict.decision.forward() {
        if !verdict.decision.allowed {
            tracing::warn!(
                agent = %agent.name, dst = %conn.dst, host = %verdict.host,
                "would be denied (dry-run): {}", verdict.decision.reason
            );
        }
        forward(ctx, agent, conn, verdict, client, prefix, guard).await;
        return;
    }
    tracing::info!(
        agent = %agent.name, pid = conn.pid, comm = %conn.comm, dst = %conn.dst,
        host = %verdict.host, "connection denied: {}", verdict.decision.reason
    );
    record(ctx, agent, conn, &verdict, PolicyResult::Deny);
    if verdict.scheme == Some(Scheme::Http) {
        let response = deny::http_403(
            &agent.name,
            &conn.request_id,
            verdict.decision.rule.as_deref(),
            &verdict.decision.reason,
        );
        let _ = client.write_all(&response).await;
        let _ = client.shutdown().await;
    }
}

async fn forward(
    ctx: &ProxyContext,
    agent: &Agent,
    conn: &Conn,
    verdict: Verdict,
    mut client: TcpStream,
    prefix: Vec<u8>,
    mut guard: crate::agents::conns::ConnGuard<'_>,
) {
    // Step 6: no confused deputy.
    if let Some(reason) = deputy_refusal(ctx, agent, conn.dst) {
        tracing::info!(agent = %agent.name, dst = %conn.dst, "connection denied: {reason}");
        let v = Verdict {
            decision: deny_decision(&crate::policy::Mode::Enforce, reason),
            ..verdict
        };
        record(ctx, agent, conn, &v, PolicyResult::Deny);
        return;
    }
    let result = if verdict.decision.allowed {
        PolicyResult::Allow
    } else {
        PolicyResult::WouldDeny
    };
    if !record(ctx, agent, conn, &verdict, result) {
        return;
    }

    let upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(conn.dst)).await;
    let mut upstream = match upstream {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(agent = %agent.name, dst = %conn.dst, "upstream connect failed: {e}");
            crate::sys::reset_on_close(&client);
            return;
        }
        Err(_) => {
            tracing::info!(agent = %agent.name, dst = %conn.dst, "upstream connect timed out");
            crate::sys::reset_on_close(&client);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    if !prefix.is_empty() && upstream.write_all(&prefix).await.is_err() {
        return;
    }

    // Step 7: splice until either side closes, or the kill switch cuts it.
    let (mut up, mut down) = (prefix.len() as u64, 0u64);
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
            tracing::debug!(agent = %agent.name, dst = %conn.dst, "connection cut by the kill switch");
        }
    }
    // Close both ends now (with a reset if the kill switch cut them), before bookkeeping.
    drop(client);
    drop(upstream);
    let mut ev = AuditEvent::new(EventKind::Completion)
        .request_id(conn.request_id.clone())
        .agent_id(agent.name.clone())
        .pid(conn.pid)
        .comm(conn.comm.clone())
        .url_host(verdict.host.clone())
        .dest(conn.dst.to_string())
        .latency_ms(u64::try_from(conn.started.elapsed().as_millis()).unwrap_or(u64::MAX))
        .bytes_up(up)
        .bytes_down(down);
    if let Some(rule) = &verdict.decision.rule {
        ev = ev.matched_rule(rule.to_string());
    }
    let _ = ctx.audit.record(ev);
}

/// Writes the connection decision to the audit log. False when the log is failing and the
/// security mode is strict: the connection must then be refused.
fn record(
    ctx: &ProxyContext,
    agent: &Agent,
    conn: &Conn,
    verdict: &Verdict,
    result: PolicyResult,
) -> bool {
    let mut ev = AuditEvent::new(EventKind::Connection)
        .request_id(conn.request_id.clone())
        .agent_id(agent.name.clone())
        .pid(conn.pid)
        .comm(conn.comm.clone())
        .policy_result(result)
        .reason(verdict.decision.reason.clone())
        .url_host(verdict.host.clone())
        .dest(conn.dst.to_string());
    if let Some(rule) = &verdict.decision.rule {
        ev = ev.matched_rule(rule.to_string());
    }
    match ctx.audit.record(ev) {
        Ok(()) => true,
        Err(e) if ctx.security_mode == SecurityMode::Strict => {
            tracing::error!("audit log unavailable, refusing connection (strict mode): {e}");
            false
        }
        Err(e) => {
            tracing::warn!("audit log unavailable, continuing (permissive mode): {e}");
            true
        }
    }
}

fn comm_str(orig: &OrigDst) -> String {
    let end = orig
        .comm
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(orig.comm.len());
    String::from_utf8_lossy(&orig.comm[..end]).into_owned()
}
