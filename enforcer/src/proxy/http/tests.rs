//! In-process tests of the L7 service: a real hyper upstream on loopback, the proxy's
//! `serve` on an accepted socket (the upstream is `enforcer_tests::web`'s, the same one the
//! end-to-end tests use), and raw or hyper clients. No kernel and no privileges: the
//! end-to-end tests in `tests/` run the same paths behind the eBPF redirect.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use enforcer_tests::web::WebUpstream;

use super::*;
use crate::{
    agents::{Agent, Origin},
    audit::AuditLog,
    policy::Policy,
    proxy::{rewind::Rewind, scope::Tracked},
};

/// Bound against hangs only.
const WAIT: Duration = Duration::from_secs(10);

/// A caller of `agent`, as the kernel would have recorded it.
fn caller(agent: Arc<Agent>, pid: u32, comm: &str) -> Caller {
    Caller {
        agent,
        pid,
        comm: Arc::from(comm),
        exe: None,
    }
}

/// The proxy side: accepts connections and serves them as if the kernel had redirected them
/// to `dst`.
struct Proxy {
    addr: SocketAddr,
    agent: Arc<Agent>,
    env: Arc<L7Env>,
    audit: AuditLog,
    _dir: tempfile::TempDir,
}

impl Proxy {
    async fn start(policy: &str, dst: SocketAddr) -> Proxy {
        Self::start_speaking(policy, dst, Proto::Http1).await
    }

    /// As [`start`](Self::start), with clients speaking `proto` (HTTP/2: prior knowledge).
    async fn start_speaking(policy: &str, dst: SocketAddr, proto: Proto) -> Proxy {
        Self::start_with(policy, dst, proto, SafeMethodBodies::Refuse).await
    }

    /// As [`start_speaking`](Self::start_speaking), with `http.bodies_on_safe_methods`.
    async fn start_with(
        policy: &str,
        dst: SocketAddr,
        proto: Proto,
        safe_method_bodies: SafeMethodBodies,
    ) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let audit = crate::audit::testing::open(dir.path());
        let policy = Policy::from_yaml(policy.as_bytes(), "test").unwrap();
        let agent = Arc::new(Agent::new(
            "test-agent".into(),
            1,
            Origin::Configured,
            PathBuf::from("test.yaml"),
            PathBuf::from("/"),
            Arc::new(policy),
        ));
        // As if the agent had resolved up.test through our resolver: the proxy only accepts
        // names the agent's DNS answers tied to the destination address.
        agent.learn("up.test", dst.ip(), u64::MAX, true);
        agent.learn("elsewhere.test", dst.ip(), u64::MAX, false);
        let env = Arc::new(L7Env {
            decisions: Decisions::new(audit.clone(), crate::config::SecurityMode::Strict),
            safe_method_bodies,
            upstream_tls: None,
            credentials: Arc::new(crate::credentials::Vault::empty()),
            approvals: Arc::new(crate::approvals::Approvals::new(audit.clone(), Vec::new())),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, e) = (agent.clone(), env.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (env, agent) = (e.clone(), a.clone());
                tokio::spawn(async move {
                    let guard = agent.conns.register(None);
                    let scope = Scope::new();
                    let io = Rewind::new(Bytes::new(), Tracked::new(stream, scope.clone()));
                    let conn = ClientConn {
                        caller: caller(agent.clone(), 4242, "tester"),
                        dst,
                        scheme: Scheme::Http,
                        sni: None,
                        opening: std::sync::Mutex::new(None),
                    };
                    serve(env, conn, io, proto, scope, guard.killed.clone()).await;
                });
            }
        });
        Proxy {
            addr,
            agent,
            env,
            audit,
            _dir: dir,
        }
    }

    /// The audit records so far.
    async fn records(&self) -> Vec<serde_json::Value> {
        crate::audit::testing::records(&self.audit, self._dir.path()).await
    }
}

/// A hyper HTTP/1 client on one connection to the proxy.
async fn client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    send
}

fn get(host: &str, path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(path)
        .header(header::HOST, host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn post(host: &str, path: &str, content_type: &str, body: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::HOST, host)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

async fn send(
    c: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> (StatusCode, HeaderMap, String) {
    let resp = tokio::time::timeout(WAIT, c.send_request(req))
        .await
        .expect("response in time")
        .unwrap();
    let (head, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        head.status,
        head.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// Writes raw bytes, reads until the proxy closes.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("the proxy closes the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

const POLICY: &str = "default: deny\nrules:\n\
    \x20 - name: read\n    allow: { method: [GET], url: \"up.test:*/**\" }\n\
    \x20 - name: block-admin\n    deny: { url: \"up.test:*/admin/**\" }\n\
    \x20 - name: small-charges\n    allow: { method: [POST], url: \"up.test:*/charges\" }\n\
    \x20   body: { jsonpath: \"$.amount\", max: 100 }\n\
    \x20 - name: form-colour\n    allow: { method: [POST], url: \"up.test:*/form\" }\n\
    \x20   body: { jsonpath: \"$.colour\", in: [red, blue] }\n\
    \x20 - name: versioned\n    allow: { method: [PUT], url: \"up.test:*/v/*\", headers: { x-api-version: \"2024-*\" } }\n";

#[tokio::test]
async fn an_allowed_then_a_denied_request_on_one_keep_alive_connection() {
    let up = WebUpstream::http("127.0.0.1", "up");
    let p = Proxy::start(POLICY, up.addr).await;
    let mut c = client(p.addr).await;
    let (status, headers, body) = send(&mut c, get("up.test", "/ok?q=secret")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "hello from up GET /ok");
    assert_eq!(headers.get("x-upstream").unwrap(), "up");
    let (status, headers, body) = send(&mut c, get("up.test", "/admin/users")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers.get(DECISION_HEADER).unwrap(), "deny");
    assert_eq!(
        headers.get(header::CONTENT_TYPE).unwrap(),
        "application/json"
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["message"], "denied by rule 'block-admin'");
    assert_eq!(v["error"]["type"], "egress_policy_denied");
    assert_eq!(v["error"]["code"], "deny");
    assert_eq!(v["reason"], "denied by rule 'block-admin'");
    assert_eq!(v["rule"], "block-admin");
    assert_eq!(v["agent_id"], "test-agent");
    assert_eq!(v["retryable"], false);
    assert_eq!(
        headers.get(REQUEST_ID_HEADER).unwrap().to_str().unwrap(),
        v["request_id"]
    );
    // Still the same connection: a third request goes through.
    let (status, _, _) = send(&mut c, get("up.test", "/again")).await;
    assert_eq!(status, StatusCode::OK);
    let seen = up.hits();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].host, "up.test");
    drop(c);

    // One request record per decision, a completion per forwarded request, linked by id;
    // no query string anywhere.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let records = p.records().await;
    let text = serde_json::to_string(&records).unwrap();
    assert!(!text.contains("secret"), "{text}");
    let requests: Vec<_> = records.iter().filter(|r| r["event"] == "request").collect();
    assert_eq!(requests.len(), 3, "{records:?}");
    assert_eq!(requests[0]["policy_result"], "allow");
    assert_eq!(requests[0]["matched_rule"], "read");
    assert_eq!(requests[0]["pid"], 4242);
    assert_eq!(requests[0]["comm"], "tester");
    assert_eq!(requests[0]["url_path"], "/ok");
    assert_eq!(requests[1]["policy_result"], "deny");
    let done = records
        .iter()
        .find(|r| r["event"] == "completion" && r["request_id"] == requests[0]["request_id"])
        .expect("completion of the first request");
    assert_eq!(done["status_code"], 200);
    assert_eq!(done["bytes_down"], "hello from up GET /ok".len());
    assert!(
        !records
            .iter()
            .any(|r| r["event"] == "completion" && r["request_id"] == requests[1]["request_id"])
    );
}

#[tokio::test]
async fn bodies_headers_and_default_deny_are_judged() {
    let up = WebUpstream::http("127.0.0.1", "up");
    let p = Proxy::start(POLICY, up.addr).await;
    let mut c = client(p.addr).await;
    let json = "application/json";
    let (s, _, _) = send(
        &mut c,
        post("up.test", "/charges", json, r#"{"amount":50}"#),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, body) = send(
        &mut c,
        post("up.test", "/charges", json, r#"{"amount":500}"#),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(body.contains("small-charges"), "{body}");
    let form = "application/x-www-form-urlencoded";
    let (s, _, _) = send(&mut c, post("up.test", "/form", form, "colour=red&x=1")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = send(&mut c, post("up.test", "/form", form, "colour=green")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let put = |v: &str| {
        Request::builder()
            .method(Method::PUT)
            .uri("/v/1")
            .header(header::HOST, "up.test")
            .header("x-api-version", v)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let (s, _, _) = send(&mut c, put("2024-01")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = send(&mut c, put("2023-01")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, body) = send(&mut c, get("elsewhere.test", "/")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("no rule allows GET elsewhere.test"),
        "{v}"
    );
    // The allowed bodies reached the upstream whole.
    let seen = up.hits();
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].body, r#"{"amount":50}"#);
    assert_eq!(seen[1].body, "colour=red&x=1");
    assert_eq!(seen.len(), 3);
}

#[tokio::test]
async fn a_body_over_the_inspection_limit_fails_closed_and_is_never_forwarded() {
    let up = WebUpstream::http("127.0.0.1", "up");
    let p = Proxy::start(POLICY, up.addr).await;
    let mut c = client(p.addr).await;
    let big = format!(
        r#"{{"amount":1,"pad":"{}"}}"#,
        "x".repeat(BODY_INSPECTION_LIMIT)
    );
    let (s, _, body) = send(
        &mut c,
        post("up.test", "/charges", "application/json", &big),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("inspection limit"), "{body}");
    assert!(up.hits().is_empty());
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let policy = "rules:\n\
        \x20 - name: all\n    allow: { url: \"up.test:*/**\" }\n\
        \x20 - name: two-per-minute\n    limit: { calls_per_minute: 2 }\n";
    let up = WebUpstream::http("127.0.0.1", "up");
    let p = Proxy::start(policy, up.addr).await;
    let mut c = client(p.addr).await;
    for _ in 0..2 {
        assert_eq!(send(&mut c, get("up.test", "/")).await.0, StatusCode::OK);
    }
    // The limit holds across connections of the agent.
    let mut other = client(p.addr).await;
    let (s, h, body) = send(&mut other, get("up.test", "/")).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(h.get(DECISION_HEADER).unwrap(), "rate_limited");
    let retry: u64 = h
        .get(header::RETRY_AFTER)
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["retryable"], true);
    assert_eq!(v["rule"], "two-per-minute");
    let records = p.records().await;
    assert!(
        records
            .iter()
            .any(|r| r["event"] == "request" && r["policy_result"] == "rate_limited")
    );
}

#[tokio::test]
async fn dry_run_forwards_what_it_would_deny_and_says_so() {
    let policy = format!("mode: dry_run\n{POLICY}");
    let up = WebUpstream::http("127.0.0.1", "up");
    let p = Proxy::start(&policy, up.addr).await;
    let mut c = client(p.addr).await;
    let (s, h, body) = send(&mut c, get("up.test", "/admin/x")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body, "hello from up GET /admin/x");
    assert_eq!(h.get(DECISION_HEADER).unwrap(), "would_deny");
    assert!(h.get(REQUEST_ID_HEADER).is_some());
    let (_, h, _) = send(&mut c, get("up.test", "/fine")).await;
    assert!(h.get(DECISION_HEADER).is_none());
    let records = p.records().await;
    assert!(
        records
            .iter()
            .any(|r| r["policy_result"] == "would_deny" && r["matched_rule"] == "block-admin")
    );
}

#[tokio::test]
async fn smuggling_shapes_get_a_400_and_the_connection_closes() {
    let up = WebUpstream::http("127.0.0.1", "up");
    let p = Proxy::start(POLICY, up.addr).await;
    for attempt in [
        "POST /charges HTTP/1.1\r\nHost: up.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /charges HTTP/1.1\r\nHost: up.test\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        "POST /charges HTTP/1.1\r\nHost: up.test\r\nContent-Length: 1x\r\n\r\nx",
        "GET / HTTP/1.1\r\nHost: up.test\r\nX: a\r\n folded\r\n\r\n",
        "GET / HTTP/1.1\nHost: up.test\n\n",
    ] {
        let answer = raw(p.addr, attempt.as_bytes()).await;
        assert!(
            answer.starts_with("HTTP/1.1 400 "),
            "{attempt:?} → {answer}"
        );
        assert!(answer.contains("\"code\":\"refused\""), "{answer}");
    }
    // After a good request on the same connection: its answer, then the 400, then the end.
    let answer = raw(
        p.addr,
        b"GET /ok HTTP/1.1\r\nHost: up.test\r\n\r\nGET /x HTTP/1.1\r\nHost: up.test\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await;
    let first = answer.find("HTTP/1.1 200 ").expect(&answer);
    let second = answer.find("HTTP/1.1 400 ").expect(&answer);
    assert!(first < second, "{answer}");
    assert_eq!(up.hits().len(), 1, "only the good request went up");
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: up.test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let answer = raw(p.addr, huge.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
}

#[tokio::test]
async fn a_streamed_response_reaches_the_client_before_the_upstream_finishes() {
    let up = WebUpstream::http("127.0.0.1", "up");
    let p = Proxy::start(POLICY, up.addr).await;
    let mut c = client(p.addr).await;
    let resp = tokio::time::timeout(WAIT, c.send_request(get("up.test", "/stream")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // The upstream holds its second chunk until released: the first must arrive alone.
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("first chunk before the upstream finished")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "data: first\n\n");
    up.release();
    let rest = tokio::time::timeout(WAIT, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(rest, "data: second\n\n");
}

#[tokio::test]
async fn the_kill_switch_cuts_a_served_connection_with_a_reset() {
    let up = WebUpstream::http("127.0.0.1", "up");
    let p = Proxy::start(POLICY, up.addr).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /stream HTTP/1.1\r\nHost: up.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    // The head and the first event may come in separate segments.
    while !String::from_utf8_lossy(&got).contains("data: first") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the stream ended early");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(p.agent.conns.kill_all(), 1);
    let err = tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(e),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        err.map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionReset)
    );
}

#[tokio::test]
async fn a_websocket_upgrade_is_spliced_only_when_its_get_is_allowed() {
    let policy = "rules:\n\
        \x20 - name: chat\n    allow: { method: [GET], url: \"up.test:*/ws\" }\n";
    let up = WebUpstream::http("127.0.0.1", "up");
    let p = Proxy::start(policy, up.addr).await;
    let upgrade = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: up.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(upgrade("/ws").as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    s.write_all(b"ping\r\n\x00bytes").await.unwrap();
    let mut echo = vec![0u8; 12];
    tokio::time::timeout(WAIT, s.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echo, b"ping\r\n\x00bytes");

    let answer = raw(p.addr, upgrade("/other").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");

    // The open tunnel is still the agent's: the kill switch resets it.
    assert_eq!(p.agent.conns.kill_all(), 1);
    let err = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn h2c_upgrades_are_declined_and_connect_is_denied_by_default() {
    let up = WebUpstream::http("127.0.0.1", "up");
    let p = Proxy::start(POLICY, up.addr).await;
    let answer = raw(
        p.addr,
        b"GET /h2c HTTP/1.1\r\nHost: up.test\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.contains("hello from up GET /h2c"));
    let answer = raw(
        p.addr,
        b"CONNECT up.test:443 HTTP/1.1\r\nHost: up.test:443\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    assert!(answer.contains("no rule allows CONNECT"), "{answer}");
    let seen = up.hits();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, "HTTP/1.1");
}

/// A TLS server configuration from the test CA, for an intercepted connection.
fn tls_pair(
    sni: &str,
) -> (
    Arc<rustls::ServerConfig>,
    Arc<rustls::ClientConfig>,
    tempfile::TempDir,
) {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ca = Arc::new(
        crate::ca::Ca::open_or_create(&dir.path().join("ca"))
            .unwrap()
            .0,
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let config = crate::config::TlsConfig {
        mode: crate::config::TlsMode::Intercept,
        extra_upstream_roots: Vec::new(),
        passthrough_hosts: Vec::new(),
        deny_in_band: true,
    };
    let tls = super::super::tls::TlsContext::new(&config, Some(ca)).unwrap();
    let server = tls
        .server_config(Some(sni), "127.0.0.1".parse().unwrap())
        .unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    (server, Arc::new(client), dir)
}

#[tokio::test]
async fn http2_through_interception_judges_each_stream_and_refuses_fronting() {
    // The upstream is plain HTTP here (the connection's scheme decides what the policy sees;
    // upstream TLS is covered end to end).
    let up = WebUpstream::http("127.0.0.1", "up");
    let p = Proxy::start(POLICY, up.addr).await;
    let (server, client_config, _dir) = tls_pair("up.test");
    let conn = ClientConn {
        caller: caller(p.agent.clone(), 1, "h2"),
        dst: up.addr,
        // Judged as plain HTTP so the plain upstream can answer; the SNI check applies
        // to Https only, so it is exercised below with its own connection.
        scheme: Scheme::Http,
        sni: None,
        opening: std::sync::Mutex::new(None),
    };
    let addr = serve_tls_once(&p, server, Proto::Http2, conn).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_config)
        .connect("up.test".try_into().unwrap(), stream)
        .await
        .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = |path: &str| {
        Request::builder()
            .uri(format!("https://up.test{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    // Two concurrent streams on one connection, judged apart.
    let (a, b) = tokio::join!(
        send.send_request(req("/ok")),
        send.clone().send_request(req("/admin/x"))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.status(), StatusCode::OK);
    assert_eq!(a.version(), Version::HTTP_2);
    assert_eq!(b.status(), StatusCode::FORBIDDEN);
    assert_eq!(b.headers().get(DECISION_HEADER).unwrap(), "deny");
    let seen = up.hits();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/ok");
}

#[tokio::test]
async fn over_tls_a_host_other_than_the_sni_is_misdirected() {
    let up = WebUpstream::http("127.0.0.1", "up");
    let p = Proxy::start(POLICY, up.addr).await;
    let (server, mut client_config, _dir) = tls_pair("up.test");
    Arc::get_mut(&mut client_config).unwrap().alpn_protocols = vec![b"http/1.1".to_vec()];
    let conn = ClientConn {
        caller: caller(p.agent.clone(), 1, "fronting"),
        dst: up.addr,
        scheme: Scheme::Https,
        sni: Some("up.test".into()),
        opening: std::sync::Mutex::new(None),
    };
    let addr = serve_tls_once(&p, server, Proto::Http1, conn).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_config)
        .connect("up.test".try_into().unwrap(), stream)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (s, h, body) = send(&mut sender, get("other.test", "/ok")).await;
    assert_eq!(s, StatusCode::MISDIRECTED_REQUEST, "{body}");
    assert_eq!(h.get(DECISION_HEADER).unwrap(), "deny");
    assert!(body.contains("domain fronting"), "{body}");
    assert!(up.hits().is_empty());
}

/// Listens for one TLS client on loopback and serves it as an intercepted connection `conn`
/// of `p`'s agent, speaking `proto` (which the client must have chosen by ALPN). Returns the
/// address to connect to.
async fn serve_tls_once(
    p: &Proxy,
    server: Arc<rustls::ServerConfig>,
    proto: Proto,
    conn: ClientConn,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let env = p.env.clone();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(server)
            .accept(stream)
            .await
            .unwrap();
        let alpn: &[u8] = match proto {
            Proto::Http1 => b"http/1.1",
            Proto::Http2 => b"h2",
        };
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
        let agent = conn.caller.agent.clone();
        let guard = agent.conns.register(None);
        serve(env, conn, tls, proto, Scope::new(), guard.killed.clone()).await;
    });
    addr
}

/// An HTTP/2 request for `path` on up.test, as the raw h2 client sends it.
fn h2_get(path: &str) -> Request<()> {
    Request::builder()
        .uri(format!("http://up.test{path}"))
        .body(())
        .unwrap()
}

#[tokio::test]
async fn http2_caps_streams_and_refuses_an_oversized_header_list() {
    let up = WebUpstream::http("127.0.0.1", "up");
    let p = Proxy::start_speaking(POLICY, up.addr, Proto::Http2).await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut h2, mut conn) = h2::client::handshake(stream).await.unwrap();
    // One ordinary request, so that the proxy's SETTINGS have arrived.
    let (resp, _) = h2.send_request(h2_get("/ok"), true).unwrap();
    let resp = tokio::select! {
        r = resp => r.unwrap(),
        _ = &mut conn => panic!("the connection ended before the first response"),
    };
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        conn.max_concurrent_send_streams(),
        MAX_CONCURRENT_STREAMS as usize
    );
    // A header list twice the cap never reaches the upstream.
    let big = "a".repeat(MAX_HEADER_LIST_BYTES as usize * 2);
    let mut req = h2_get("/ok-big");
    req.headers_mut().insert("x-big", big.parse().unwrap());
    let outcome = match h2.send_request(req, true) {
        Err(e) => format!("refused by the client: {e}"),
        Ok((resp, _)) => tokio::time::timeout(WAIT, async {
            tokio::select! {
                r = resp => match r {
                    Ok(r) => {
                        assert!(!r.status().is_success(), "an oversized header list was served");
                        format!("status {}", r.status())
                    }
                    Err(e) => format!("stream error: {e}"),
                },
                r = &mut conn => format!("connection ended: {r:?}"),
            }
        })
        .await
        .expect("the proxy answers an oversized header list"),
    };
    let seen: Vec<String> = up.hits().iter().map(|s| s.path.clone()).collect();
    assert_eq!(seen, ["/ok"], "{outcome}");
}

#[tokio::test]
async fn http2_rapid_reset_closes_the_connection_with_enhance_your_calm() {
    let up = WebUpstream::http("127.0.0.1", "up");
    let p = Proxy::start_speaking(POLICY, up.addr, Proto::Http2).await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(stream).await.unwrap();
    let ended = tokio::spawn(conn);
    // Open streams and reset each at once, far more than the guard allows (CVE-2023-44487).
    let attempts = MAX_PENDING_RESET_STREAMS * 3;
    let mut sent = 0;
    for _ in 0..attempts {
        h2 = match h2.ready().await {
            Ok(h2) => h2,
            Err(_) => break,
        };
        let Ok((_resp, mut body)) = h2.send_request(h2_get("/ok"), false) else {
            break;
        };
        body.send_reset(h2::Reason::CANCEL);
        sent += 1;
    }
    let result = tokio::time::timeout(WAIT, ended)
        .await
        .expect("the proxy closes a rapid-reset connection")
        .unwrap();
    let err = result.expect_err("the connection ends in an error");
    assert!(err.is_go_away(), "{err}");
    assert_eq!(err.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{err}");
    assert!(
        sent > MAX_PENDING_RESET_STREAMS,
        "only {sent} streams were opened"
    );
}

/// A raw HTTP/1.1 upstream that counts its connections, records each request head, and keeps
/// a connection open unless the request said `Connection: close`.
struct CountingUpstream {
    addr: SocketAddr,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    heads: Arc<std::sync::Mutex<Vec<String>>>,
}

impl CountingUpstream {
    async fn start() -> CountingUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, h) = (connections.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let h = h.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        while buf.len() < end + 4 + len {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..end + 4 + len);
                        let close = head.contains("connection: close");
                        h.lock().unwrap().push(head);
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        CountingUpstream {
            addr,
            connections,
            heads,
        }
    }
}

#[tokio::test]
async fn a_body_on_get_is_refused_and_when_allowed_never_shares_an_upstream_connection() {
    // The desync: a GET whose Content-Length body carries a second request. An upstream that
    // ignores GET bodies would run the DELETE the policy denies.
    let smuggle = "GET /search HTTP/1.1\r\nHost: up.test\r\nContent-Length: 46\r\n\r\n\
                   DELETE /admin/wipe HTTP/1.1\r\nHost: up.test\r\n\r\n";
    assert_eq!(smuggle.split_once("\r\n\r\n").unwrap().1.len(), 46);
    let up = CountingUpstream::start().await;
    let p = Proxy::start(POLICY, up.addr).await;
    let answer = raw(p.addr, smuggle.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("bodies_on_safe_methods"), "{answer}");
    assert_eq!(up.connections.load(std::sync::atomic::Ordering::SeqCst), 0);
    // Bodiless GETs share one upstream connection, as before.
    let mut c = client(p.addr).await;
    for _ in 0..2 {
        let (status, _, _) = send(&mut c, get("up.test", "/ok")).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(up.connections.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Forwarded when the operator allows it (search APIs), each on a connection of its own
    // that closes after the response.
    let up = CountingUpstream::start().await;
    let p = Proxy::start_with(POLICY, up.addr, Proto::Http1, SafeMethodBodies::Forward).await;
    let mut c = client(p.addr).await;
    for _ in 0..2 {
        let req = Request::builder()
            .method("GET")
            .uri("/search")
            .header(header::HOST, "up.test")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(
                br#"{"query":{"match_all":{}}}"#,
            )))
            .unwrap();
        let (status, _, _) = send(&mut c, req).await;
        assert_eq!(status, StatusCode::OK);
    }
    let heads = up.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(
        heads.iter().all(|h| h.contains("connection: close")),
        "{heads:?}"
    );
    assert_eq!(up.connections.load(std::sync::atomic::Ordering::SeqCst), 2);
}
