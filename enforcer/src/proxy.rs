//! The transparent proxy: every TCP connection the kernel redirected lands here.
//!
//! For each connection:
//! 1. recover the original destination and the process from the kernel's record (a
//!    connection without one was not redirected, and is closed: its "destination" could be
//!    spoofed);
//! 2. a destination a `tcp:` rule allows is spliced at once, with no peeking, so
//!    server-speaks-first protocols work;
//! 3. otherwise the first bytes are read (bounded in time and size): a TLS ClientHello gives
//!    the SNI, an HTTP/1.x request gives the Host;
//! 4. the policy decides at host level; opaque TCP that no `tcp:` rule allows is refused;
//! 5. internal destinations are refused unless the policy names them (no confused deputy);
//! 6. the bytes are spliced to the original destination, and the splice is cut with a reset
//!    when the kill switch engages.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
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

pub mod deny;
pub mod deputy;
pub mod peek;

use deputy::Deputy;
use peek::Opening;

/// Longest wait for the upstream TCP handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection handler needs.
pub struct ProxyContext {
    pub kernel: Arc<Kernel>,
    pub registry: Arc<Registry>,
    pub audit: AuditLog,
    pub security_mode: SecurityMode,
    pub deputy: Deputy,
}

/// Accepts redirected connections until the listener fails.
pub async fn serve(listener: TcpListener, ctx: Arc<ProxyContext>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let ctx = ctx.clone();
                tokio::spawn(async move { handle(ctx, stream, peer).await });
            }
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
    let guard = agent.conns.register();

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
    let (scheme, host) = match &opening {
        Opening::Tls { sni } => (
            Scheme::Https,
            sni.clone().unwrap_or_else(|| ip_text.clone()),
        ),
        Opening::Http { host } => (
            Scheme::Http,
            host.clone().unwrap_or_else(|| ip_text.clone()),
        ),
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

    // Step 4: the host-level decision, after checking the host belongs to the address.
    let decision = match host_matches_address(&agent, &host, dst_ip) {
        Err(reason) => deny_decision(&policy.mode(), reason),
        Ok(canonical) => {
            let mut d =
                policy.host_decision(scheme, &canonical, dst.port(), jiff::Timestamp::now());
            // Without SNI or Host the host is the address; say so when that fails.
            if !d.allowed && canonical == ip_text {
                d.reason = format!(
                    "{} (no server name given; judged by address {ip_text})",
                    d.reason
                );
            }
            d
        }
    };
    let verdict = Verdict {
        decision,
        scheme: Some(scheme),
        host,
    };
    refuse_or_forward(&ctx, &agent, &conn, verdict, client, prefix, guard).await;
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
    // Step 5: no confused deputy.
    if let Some(why) = ctx.deputy.internal(conn.dst.ip())
        && !agent.is_explicit(deputy::canonical(conn.dst.ip()), conn.dst.port())
    {
        let reason = format!(
            "destination {} is {why}; only a policy that names it explicitly may reach it",
            conn.dst
        );
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
            reset(&client);
            return;
        }
        Err(_) => {
            tracing::info!(agent = %agent.name, dst = %conn.dst, "upstream connect timed out");
            reset(&client);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    if !prefix.is_empty() && upstream.write_all(&prefix).await.is_err() {
        return;
    }

    // Step 6: splice until either side closes, or the kill switch cuts it.
    let (mut up, mut down) = (prefix.len() as u64, 0u64);
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Ok((u, d)) = r {
                up += u;
                down += d;
            }
        }
        _ = guard.killed.wait_for(|k| *k) => {
            reset(&client);
            reset(&upstream);
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

/// Makes the socket's close send a reset (`SO_LINGER` 0) instead of a FIN. The reset goes
/// out when the stream is dropped.
pub fn reset(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ =
        nix::sys::socket::setsockopt(&stream.as_fd(), nix::sys::socket::sockopt::Linger, &linger);
}

fn comm_str(orig: &OrigDst) -> String {
    let end = orig
        .comm
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(orig.comm.len());
    String::from_utf8_lossy(&orig.comm[..end]).into_owned()
}
