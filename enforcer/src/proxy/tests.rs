//! In-process tests of the connection path (kernel record, peek, `tcp:` splice, SNI
//! decision and splice, interception, the internal-destination guard), with a fake kernel
//! record table in place of the pinned map. No kernel and no privileges: the end-to-end tests
//! in `tests/` run the same paths behind the eBPF redirect.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use enforcer_common::{OrigDst, orig_flags};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
};

use super::*;
use crate::{
    agents::{Agent, Origin, allowlist},
    audit::AuditLog,
    ca::Ca,
    config::{SecurityMode, TlsConfig},
};

/// Bound against hangs only.
const WAIT: Duration = Duration::from_secs(10);

/// The kernel's record table, as a map the test fills.
#[derive(Default)]
struct FakeRecords(Mutex<HashMap<SocketAddr, OrigDst>>);

impl Records for FakeRecords {
    fn take_orig(&self, peer: SocketAddr) -> Option<OrigDst> {
        self.0.lock().unwrap().remove(&peer)
    }
}

/// A proxy listener on 127.0.0.1 serving one agent (id 1) under `policy`.
struct Harness {
    addr: SocketAddr,
    records: Arc<FakeRecords>,
    agent: Arc<Agent>,
    audit: AuditLog,
    ca: Arc<Ca>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(policy: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let audit = crate::audit::testing::open(dir.path());
        let ca_dir = dir.path().join("ca");
        let (ca, _) = Ca::open_or_create(&ca_dir).unwrap();
        let ca = Arc::new(ca);
        let policy = Arc::new(Policy::from_yaml(policy.as_bytes(), "test").unwrap());
        let agent = Arc::new(Agent::new(
            "conn-agent".into(),
            1,
            Origin::Configured,
            PathBuf::from("test.yaml"),
            PathBuf::from("/"),
            policy.clone(),
        ));
        agent.set_explicit(allowlist::compute(&policy, false).entries);
        let registry = Arc::new(Registry::default());
        registry.insert(agent.clone());
        let records = Arc::new(FakeRecords::default());
        let decisions = Decisions::new(audit.clone(), SecurityMode::Strict);
        let ctx = Arc::new(ProxyContext {
            records: records.clone(),
            registry,
            decisions: decisions.clone(),
            deputy: Deputy::with_own(Vec::new()),
            tls: Arc::new(tls::TlsContext::new(&TlsConfig::default(), Some(ca.clone())).unwrap()),
            l7: Arc::new(http::L7Env {
                decisions,
                safe_method_bodies: crate::config::SafeMethodBodies::Refuse,
                upstream_tls: None,
                credentials: Arc::new(crate::credentials::Vault::empty()),
                approvals: Arc::new(crate::approvals::Approvals::new(audit.clone(), Vec::new())),
            }),
            limits: limits::Limits {
                per_agent_open: 4096,
                per_agent_pending: 256,
                fds: limits::FdBudget::new(1 << 16),
            },
            agent_api: None,
            splicer: None,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                tokio::spawn(handle(ctx.clone(), stream, peer));
            }
        });
        Harness {
            addr,
            records,
            agent,
            audit,
            ca,
            _dir: dir,
        }
    }

    /// Connects to the proxy as the agent's process `tester` (pid 4242) would after a
    /// redirected `connect(dst)`: the record is in the table before the connect, as the
    /// kernel's is.
    async fn connect(&self, dst: SocketAddr, agent: u32, flags: u32) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let local = socket.local_addr().unwrap();
        let mut comm = [0u8; 16];
        comm[..6].copy_from_slice(b"tester");
        self.records.0.lock().unwrap().insert(
            local,
            OrigDst {
                addr: crate::bpf::addr_of(dst.ip()),
                port: dst.port(),
                agent,
                pid: 4242,
                flags,
                comm,
                ..OrigDst::default()
            },
        );
        socket.connect(self.addr).await.unwrap()
    }

    /// The audit records so far.
    async fn records(&self) -> Vec<serde_json::Value> {
        crate::audit::testing::records(&self.audit, self._dir.path()).await
    }

    /// The first record of `event`.
    async fn record_of(&self, event: &str) -> serde_json::Value {
        self.records()
            .await
            .into_iter()
            .find(|r| r["event"] == event)
            .unwrap_or_else(|| panic!("no {event} record"))
    }
}

/// A raw TCP upstream that records the bytes of its first connection and answers them with
/// `greeting` first (a server that speaks first).
struct RawUpstream {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<u8>>>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
}

impl RawUpstream {
    async fn start(greeting: &'static [u8]) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (g, a) = (got.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let g = g.clone();
                tokio::spawn(async move {
                    let _ = s.write_all(greeting).await;
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        g.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        RawUpstream {
            addr,
            got,
            accepted,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Reads until the proxy closes the connection (or resets it).
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("the proxy closes the connection");
    out
}

/// A ClientHello for `sni` (rustls, so it is the real thing), as bytes.
fn client_hello(sni: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

#[tokio::test]
async fn a_connection_without_a_kernel_record_is_closed_unserved() {
    let h = Harness::start("rules:\n  - name: all\n    allow: { tcp: \"127.0.0.1:*\" }\n").await;
    let up = RawUpstream::start(b"banner").await;
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    assert!(read_to_close(&mut s).await.is_empty());
    // A direct connect to the proxy port, and a record of an agent nobody knows, likewise.
    let mut s = h.connect(up.addr, 1, orig_flags::DIRECT).await;
    assert!(read_to_close(&mut s).await.is_empty());
    let mut s = h.connect(up.addr, 7, 0).await;
    assert!(read_to_close(&mut s).await.is_empty());
    assert_eq!(up.accepted(), 0, "nothing reached the upstream");
    assert!(h.records().await.iter().all(|r| r["event"] != "connection"));
}

#[tokio::test]
async fn a_tcp_rule_splices_at_once_so_the_server_may_speak_first() {
    let h = Harness::start("rules:\n  - name: db\n    allow: { tcp: \"127.0.0.1:*\" }\n").await;
    let up = RawUpstream::start(b"220 ready\r\n").await;
    let mut s = h.connect(up.addr, 1, 0).await;
    let mut banner = [0u8; 11];
    tokio::time::timeout(WAIT, s.read_exact(&mut banner))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&banner, b"220 ready\r\n");
    s.write_all(b"QUIT\r\n").await.unwrap();
    drop(s);
    let r = h.record_of("connection").await;
    assert_eq!(r["policy_result"], "allow");
    assert_eq!(r["matched_rule"], "db");
    assert_eq!(r["pid"], 4242);
    assert_eq!(r["comm"], "tester");
    assert_eq!(r["dest"], up.addr.to_string());
    assert!(
        tokio::time::timeout(WAIT, async {
            while !h.records().await.iter().any(|r| r["event"] == "completion") {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .is_ok(),
        "a completion record follows"
    );
    let c = h.record_of("completion").await;
    assert_eq!(c["request_id"], r["request_id"]);
    assert_eq!(c["bytes_up"], 6);
    assert_eq!(c["bytes_down"], 11);
}

#[tokio::test]
async fn opaque_tcp_without_a_tcp_rule_is_refused_before_the_upstream() {
    let h = Harness::start("rules:\n  - name: web\n    allow: { url: \"127.0.0.1:*\" }\n").await;
    let up = RawUpstream::start(b"").await;
    let mut s = h.connect(up.addr, 1, 0).await;
    s.write_all(b"\x00\x01binary protocol\r\n").await.unwrap();
    read_to_close(&mut s).await;
    assert_eq!(up.accepted(), 0);
    let r = h.record_of("connection").await;
    assert_eq!(r["policy_result"], "deny");
    assert!(r["reason"].as_str().unwrap().contains("opaque TCP"), "{r}");
}

#[tokio::test]
async fn tls_judged_by_its_sni_is_spliced_byte_for_byte() {
    let h = Harness::start("rules:\n  - name: api\n    allow: { url: \"api.test:*\" }\n").await;
    let up = RawUpstream::start(b"").await;
    // As if the agent had resolved api.test through our resolver.
    h.agent.learn("api.test", up.addr.ip(), u64::MAX, true);
    let hello = client_hello("api.test");
    let mut s = h.connect(up.addr, 1, 0).await;
    s.write_all(&hello).await.unwrap();
    assert!(
        tokio::time::timeout(WAIT, async {
            while up.got.lock().unwrap().len() < hello.len() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .is_ok(),
        "the ClientHello reaches the upstream"
    );
    assert_eq!(*up.got.lock().unwrap(), hello, "spliced, not re-encoded");
    let r = h.record_of("connection").await;
    assert_eq!(r["policy_result"], "allow");
    assert_eq!(r["url_host"], "api.test");
}

#[tokio::test]
async fn an_sni_the_agent_never_resolved_to_that_address_is_refused() {
    let h = Harness::start("rules:\n  - name: api\n    allow: { url: \"api.test:*\" }\n").await;
    let up = RawUpstream::start(b"").await;
    let mut s = h.connect(up.addr, 1, 0).await;
    s.write_all(&client_hello("api.test")).await.unwrap();
    // Refused on the SNI, answered in band: the proxy goes on with the handshake (a TLS
    // handshake record comes back) to serve the JSON 403; nothing reaches the upstream.
    let mut first = [0u8; 1];
    tokio::time::timeout(WAIT, s.read_exact(&mut first))
        .await
        .expect("the proxy answers")
        .unwrap();
    assert_eq!(first[0], 0x16, "a TLS handshake record");
    assert_eq!(up.accepted(), 0);
    let r = h.record_of("connection").await;
    assert_eq!(r["policy_result"], "deny");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("destination address not associated with host"),
        "{r}"
    );
}

#[tokio::test]
async fn an_internal_destination_a_wildcard_reached_is_refused_on_every_route() {
    // The upstream is on loopback: internal. A name allowed only by a wildcard does not make
    // it explicit, so neither plain HTTP, nor TLS spliced on its SNI, may reach it.
    let h = Harness::start("rules:\n  - name: any\n    allow: { url: \"*.test:*\" }\n").await;
    let up = RawUpstream::start(b"").await;
    h.agent.learn("up.test", up.addr.ip(), u64::MAX, false);
    let mut s = h.connect(up.addr, 1, 0).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: up.test\r\n\r\n")
        .await
        .unwrap();
    let answer = String::from_utf8(read_to_close(&mut s).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("loopback"), "{answer}");
    let mut s = h.connect(up.addr, 1, 0).await;
    s.write_all(&client_hello("up.test")).await.unwrap();
    read_to_close(&mut s).await;
    assert_eq!(
        up.accepted(),
        0,
        "the guard refused before any upstream connect"
    );
    let denials: Vec<_> = h
        .records()
        .await
        .into_iter()
        .filter(|r| r["event"] == "connection" && r["policy_result"] == "deny")
        .collect();
    assert_eq!(denials.len(), 2, "{denials:?}");
    assert!(denials.iter().all(|r| {
        r["reason"]
            .as_str()
            .unwrap()
            .contains("names it explicitly")
    }));
}

#[tokio::test]
async fn a_host_with_request_rules_is_intercepted_and_judged_per_request() {
    let h = Harness::start(
        "rules:\n  - name: read\n    allow: { method: [GET], url: \"api.test:*/v1/*\" }\n",
    )
    .await;
    let up = RawUpstream::start(b"").await;
    h.agent.learn("api.test", up.addr.ip(), u64::MAX, true);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(h.ca.cert_der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = h.connect(up.addr, 1, 0).await;
    let name = rustls_pki_types::ServerName::try_from("api.test").unwrap();
    let mut tls = tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .unwrap()
    .expect("the handshake completes with a leaf for api.test from the local CA");
    tls.write_all(b"DELETE /v1/x HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert_eq!(
        up.accepted(),
        0,
        "a denied request never reaches the upstream"
    );
    let r = h.record_of("request").await;
    assert_eq!(r["method"], "DELETE");
    assert_eq!(r["url_host"], "api.test");
    assert_eq!(r["policy_result"], "deny");
    assert_eq!(r["pid"], 4242);
}
