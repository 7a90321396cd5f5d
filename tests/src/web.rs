//! HTTP and HTTPS upstreams for the L7 tests and the benchmark: hyper on a runtime of their
//! own, HTTP/1.1 and (over TLS, by ALPN) HTTP/2, with a test CA made by rcgen.
//!
//! Routes:
//! - `…/stream`: `text/event-stream`; `data: first` at once, `data: second` only after
//!   [`WebUpstream::release`], then the end.
//! - `…/ws`: a WebSocket-style upgrade (101) that echoes every byte.
//! - anything else: `200 hello from NAME METHOD PATH`, with `x-upstream: NAME`.
//!
//! Every request is recorded ([`WebHit`]).

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Either, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::{Notify, mpsc},
};

/// One request an upstream saw.
#[derive(Debug, Clone)]
pub struct WebHit {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// `Host`, or `:authority` over HTTP/2.
    pub host: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    pub body: String,
    /// Every header, name lowercase.
    pub headers: Vec<(String, String)>,
}

impl WebHit {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A hyper upstream on a loopback address.
pub struct WebUpstream {
    pub addr: SocketAddr,
    hits: Arc<Mutex<Vec<WebHit>>>,
    release: Arc<Notify>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl WebUpstream {
    /// Plain HTTP/1.1 on `ip` at a free port.
    pub fn http(ip: &str, name: &str) -> WebUpstream {
        Self::start(ip, 0, name, None, 1)
    }

    /// HTTPS (HTTP/2 or HTTP/1.1 by ALPN) on `ip` at a free port.
    pub fn https(ip: &str, name: &str, tls: Arc<rustls::ServerConfig>) -> WebUpstream {
        Self::start(ip, 0, name, Some(tls), 1)
    }

    /// The general form: `port` 0 for a free one, `threads` runtime workers.
    pub fn start(
        ip: &str,
        port: u16,
        name: &str,
        tls: Option<Arc<rustls::ServerConfig>>,
        threads: usize,
    ) -> WebUpstream {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .enable_all()
            .build()
            .expect("upstream runtime");
        let listener = std::net::TcpListener::bind((ip, port)).expect("bind upstream");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("upstream addr");
        let hits = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            hits: hits.clone(),
            release: release.clone(),
        });
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (shared, tls) = (shared.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => serve(shared, stream, false).await,
                        Some(config) => {
                            let Ok(stream) =
                                tokio_rustls::TlsAcceptor::from(config).accept(stream).await
                            else {
                                return;
                            };
                            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                            serve(shared, stream, h2).await;
                        }
                    }
                });
            }
        });
        WebUpstream {
            addr,
            hits,
            release,
            runtime: Some(runtime),
        }
    }

    pub fn hits(&self) -> Vec<WebHit> {
        self.hits.lock().unwrap().clone()
    }

    /// Lets one held `/stream` response finish.
    pub fn release(&self) {
        self.release.notify_one();
    }
}

impl Drop for WebUpstream {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

struct Shared {
    name: String,
    hits: Arc<Mutex<Vec<WebHit>>>,
    release: Arc<Notify>,
}

async fn serve<IO>(shared: Arc<Shared>, io: IO, h2: bool)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, req).await) }
    });
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(io), svc)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades()
            .await;
    }
}

/// A body fed from a channel, frame by frame.
struct ChanBody(mpsc::Receiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

type Resp = Response<Either<Full<Bytes>, ChanBody>>;

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Resp {
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let method = req.method().to_string();
    let version = format!("{:?}", req.version());
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let route = req.uri().path().to_owned();
    if route.ends_with("/ws") {
        shared.hits.lock().unwrap().push(WebHit {
            method,
            path,
            host,
            version,
            body: String::new(),
            headers,
        });
        let on = hyper::upgrade::on(req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "Upgrade")
            .body(Either::Left(Full::new(Bytes::new())))
            .expect("response");
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    shared.hits.lock().unwrap().push(WebHit {
        method: method.clone(),
        path: path.clone(),
        host,
        version,
        body,
        headers: headers.clone(),
    });
    if route.ends_with("/echo") {
        // What a careless API does: the credential it got, back in a header and in a chunked
        // body, split across two chunks.
        let auth = headers
            .iter()
            .find(|(n, _)| n == "authorization")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let (tx, rx) = mpsc::channel(4);
        let text = format!("you sent: {auth}\n");
        let cut = text.len() / 2 + 3;
        tokio::spawn(async move {
            let _ = tx.send(Bytes::from(text[..cut].to_owned())).await;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let _ = tx.send(Bytes::from(text[cut..].to_owned())).await;
        });
        return Response::builder()
            .header(header::CONTENT_TYPE, "text/plain")
            .header("x-echo", auth.as_str())
            .body(Either::Right(ChanBody(rx)))
            .expect("response");
    }
    if route.ends_with("/big") {
        // 1 MiB in 16 KiB chunks, streamed; the Authorization value it got appears once, near
        // the start (what masking has to find), for the credentials benchmark.
        let auth = headers
            .iter()
            .find(|(n, _)| n == "authorization")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            const CHUNK: usize = 16 * 1024;
            let mut first = format!("echo: {auth}\n").into_bytes();
            first.resize(CHUNK, b'x');
            let _ = tx.send(Bytes::from(first)).await;
            let filler = Bytes::from(vec![b'y'; CHUNK]);
            for _ in 1..64 {
                if tx.send(filler.clone()).await.is_err() {
                    return;
                }
            }
        });
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(Either::Right(ChanBody(rx)))
            .expect("response");
    }
    if let Some(n) = route
        .rsplit_once("/zeros/")
        .and_then(|(_, n)| n.parse::<u64>().ok())
    {
        // N zero bytes, one shared 256 KiB chunk sent again and again: a bulk transfer whose
        // upstream costs only its TLS, for the splice benchmark.
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            let chunk = Bytes::from(vec![0u8; 256 << 10]);
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len() as u64) as usize;
                if tx.send(chunk.slice(..k)).await.is_err() {
                    return;
                }
                left -= k as u64;
            }
        });
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, n)
            .body(Either::Right(ChanBody(rx)))
            .expect("response");
    }
    if let Some(n) = route
        .rsplit_once("/blob/")
        .and_then(|(_, n)| n.parse::<u64>().ok())
    {
        // The first N bytes of `BlobBytes`, in 64 KiB chunks, for transfers checked by sha256.
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            let mut bytes = crate::BlobBytes::default();
            let mut left = n;
            while left > 0 {
                let k = left.min(1 << 16) as usize;
                let mut chunk = vec![0u8; k];
                bytes.fill(&mut chunk);
                if tx.send(Bytes::from(chunk)).await.is_err() {
                    return;
                }
                left -= k as u64;
            }
        });
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, n)
            .body(Either::Right(ChanBody(rx)))
            .expect("response");
    }
    if route.ends_with("/stream") {
        let (tx, rx) = mpsc::channel(4);
        let release = shared.release.clone();
        tokio::spawn(async move {
            let _ = tx.send(Bytes::from_static(b"data: first\n\n")).await;
            release.notified().await;
            let _ = tx.send(Bytes::from_static(b"data: second\n\n")).await;
        });
        return Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(Either::Right(ChanBody(rx)))
            .expect("response");
    }
    let text = format!("hello from {} {method} {route}", shared.name);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain")
        .header("x-upstream", shared.name.as_str())
        .body(Either::Left(Full::new(Bytes::from(text))))
        .expect("response")
}

/// A CA for test upstreams.
pub struct TestCa {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes the CA certificate (PEM), readable by everyone.
    pub fn write_pem(&self, path: &Path) {
        std::fs::write(path, &self.cert_pem).expect("write CA PEM");
    }

    /// A server configuration with a leaf for `names` (DNS names or IP literals), offering
    /// ALPN `h2` and `http/1.1`.
    pub fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().expect("DNS name")),
            })
            .collect();
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        let chain = vec![cert.der().clone()];
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server certificate");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}
