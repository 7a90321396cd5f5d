//! Connections to the upstream: always to the original destination the kernel recorded,
//! never to a fresh resolution of the request's host. Over TLS the server name (SNI and the
//! name the certificate must carry) is the request's host, verified against the system roots
//! plus `tls.extra_upstream_roots`.
//!
//! Each client connection has its own upstream connections, never shared with another client
//! connection (and so never with another agent):
//! - an HTTP/1 client sends one request at a time, so it gets one upstream HTTP/1 connection,
//!   reused from request to request ([`Serial`]) while the TLS server name stays the same;
//! - an HTTP/2 client multiplexes, so it gets hyper-util's pooled client, keyed by the
//!   request's scheme and authority (requests for two hosts never share a TLS session made
//!   for the wrong name).

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection},
    },
    rt::TokioIo,
};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::body::{BoxError, UpBody};
use crate::proxy::scope::{Scope, ScopeExec, Tracked};

/// Longest wait for the upstream TCP handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the upstream TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an upstream connection failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {dst}: {io}", io = crate::sys::io_text(source))]
    Connect { dst: SocketAddr, source: io::Error },
    #[error("connecting to {dst} timed out after {}s", CONNECT_TIMEOUT.as_secs())]
    ConnectTimeout { dst: SocketAddr },
    #[error(
        "the upstream certificate of {host} ({dst}) failed verification: {reason}; if it is \
         signed by a private CA, add that CA to tls.extra_upstream_roots"
    )]
    Verify {
        host: String,
        dst: SocketAddr,
        reason: String,
    },
    #[error("TLS handshake with {host} ({dst}) failed: {io}", io = crate::sys::io_text(source))]
    Tls {
        host: String,
        dst: SocketAddr,
        source: io::Error,
    },
    #[error("TLS handshake with {host} ({dst}) timed out")]
    TlsTimeout { host: String, dst: SocketAddr },
    #[error("'{0}' is not a valid TLS server name")]
    BadName(String),
}

impl UpstreamError {
    /// Finds this error in a hyper client error's source chain.
    pub fn find<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a UpstreamError> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(u) = e.downcast_ref::<UpstreamError>() {
                return Some(u);
            }
            cur = e.source();
        }
        None
    }
}

/// Connects to one fixed destination, whatever the request URI says (the URI only names
/// the TLS server).
#[derive(Clone)]
pub struct Connector {
    dst: SocketAddr,
    tls: Option<Arc<ClientConfig>>,
    scope: Arc<Scope>,
}

impl Connector {
    pub fn new(dst: SocketAddr, tls: Option<Arc<ClientConfig>>, scope: Arc<Scope>) -> Self {
        Self { dst, tls, scope }
    }

    async fn connect(self, uri: http::Uri) -> Result<TokioIo<UpIo>, UpstreamError> {
        let dst = self.dst;
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(UpstreamError::Connect { dst, source }),
            Err(_) => return Err(UpstreamError::ConnectTimeout { dst }),
        };
        let _ = tcp.set_nodelay(true);
        let tcp = Tracked::new(tcp, self.scope.clone());
        let Some(config) = self.tls else {
            return Ok(TokioIo::new(UpIo::Plain(tcp)));
        };
        let host = uri.host().unwrap_or_default();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_owned();
        let name =
            ServerName::try_from(host.clone()).map_err(|_| UpstreamError::BadName(host.clone()))?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let tls =
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(source)) => {
                    let rustls_err = source
                        .get_ref()
                        .and_then(|e| e.downcast_ref::<rustls::Error>());
                    return Err(match rustls_err {
                        Some(rustls::Error::InvalidCertificate(why)) => UpstreamError::Verify {
                            host,
                            dst,
                            reason: format!("{why:?}"),
                        },
                        _ => UpstreamError::Tls { host, dst, source },
                    });
                }
                Err(_) => return Err(UpstreamError::TlsTimeout { host, dst }),
            };
        Ok(TokioIo::new(UpIo::Tls(Box::new(tls))))
    }
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<UpIo>;
    type Error = UpstreamError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

/// An upstream connection, plain or TLS.
pub enum UpIo {
    Plain(Tracked),
    Tls(Box<tokio_rustls::client::TlsStream<Tracked>>),
}

impl Connection for UpIo {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        match self {
            UpIo::Tls(s) if s.get_ref().1.alpn_protocol() == Some(b"h2") => c.negotiated_h2(),
            _ => c,
        }
    }
}

impl AsyncRead for UpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpIo::Plain(s) => s.is_write_vectored(),
            UpIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Upstream connection drivers polled by the client connection's own task instead of a task
/// of their own: a request then crosses no task boundary (and no thread) between the agent's
/// socket and the upstream's. See [`Drivers::drive`].
#[derive(Default)]
pub struct Drivers {
    inner: std::sync::Mutex<DriversInner>,
}

#[derive(Default)]
struct DriversInner {
    futures: Vec<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// The task polling the drivers, woken when one is added.
    waker: Option<std::task::Waker>,
}

impl Drivers {
    fn add(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.futures.push(Box::pin(fut));
        if let Some(w) = inner.waker.take() {
            w.wake();
        }
    }

    /// Runs `main` while polling every driver added meanwhile, in the same task; then waits
    /// for the drivers still running (a connection handing itself over to an upgraded
    /// tunnel, or closing), which end once their senders are gone with `main`.
    pub async fn drive<F: Future>(&self, main: F) -> F::Output {
        let mut main = std::pin::pin!(main);
        let mut out = None;
        std::future::poll_fn(|cx| {
            let drivers_done = {
                let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                inner.waker = Some(cx.waker().clone());
                inner
                    .futures
                    .retain_mut(|f| f.as_mut().poll(cx).is_pending());
                inner.futures.is_empty()
            };
            if out.is_none()
                && let Poll::Ready(o) = main.as_mut().poll(cx)
            {
                out = Some(o);
                // Its senders are gone now: let the drivers see it.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            match (drivers_done, out.is_some()) {
                (true, true) => Poll::Ready(()),
                _ => Poll::Pending,
            }
        })
        .await;
        out.expect("main finished")
    }
}

/// The upstream side of one client connection.
pub enum Upstream {
    /// For an HTTP/1 client.
    Serial(Serial),
    /// For an HTTP/2 client.
    Pooled(Box<Client<Connector, UpBody>>),
}

impl Upstream {
    /// For an HTTP/1 client (`serial`: connection drivers in `drivers`) or an HTTP/2 one
    /// (tasks in `scope`).
    pub fn new(connector: Connector, scope: Arc<Scope>, serial: Option<Arc<Drivers>>) -> Self {
        if let Some(drivers) = serial {
            Upstream::Serial(Serial {
                connector,
                drivers,
                idle: std::sync::Mutex::new(None),
            })
        } else {
            Upstream::Pooled(Box::new(
                Client::builder(ScopeExec(scope))
                    .pool_max_idle_per_host(8)
                    .build(connector),
            ))
        }
    }

    /// Sends a request (absolute-form URI, or authority-form for CONNECT) and waits for the
    /// response head.
    pub async fn request(
        &self,
        req: http::Request<UpBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, BoxError> {
        match self {
            Upstream::Serial(s) => s.request(req).await,
            Upstream::Pooled(c) => c.request(req).await.map_err(Into::into),
        }
    }
}

/// One upstream HTTP/1 connection at a time, reused while its key (the TLS server name, or
/// nothing for plain HTTP) stays the same.
pub struct Serial {
    connector: Connector,
    drivers: Arc<Drivers>,
    idle: std::sync::Mutex<Option<(String, hyper::client::conn::http1::SendRequest<UpBody>)>>,
}

impl Serial {
    async fn request(
        &self,
        mut req: http::Request<UpBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, BoxError> {
        let target = req.uri().clone();
        let key = match (&self.connector.tls, target.host()) {
            (Some(_), Some(h)) => h.to_owned(),
            _ => String::new(),
        };
        if let Some(authority) = target.authority()
            && !req.headers().contains_key(http::header::HOST)
        {
            let host = http::HeaderValue::from_str(authority.as_str())?;
            req.headers_mut().insert(http::header::HOST, host);
        }
        if req.method() != http::Method::CONNECT {
            let origin = target
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .parse::<http::Uri>()?;
            *req.uri_mut() = origin;
        }
        let switching = req.method() == http::Method::CONNECT
            || req.headers().contains_key(http::header::UPGRADE);
        // A reused connection may have been closed by the upstream meanwhile: one retry on a
        // new connection, when the request was not sent.
        for _ in 0..2 {
            let (mut sender, reused) = match self.take(&key) {
                Some(s) => (s, true),
                None => (self.connect(&target).await?, false),
            };
            if sender.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err("the upstream closed the connection".into());
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    // The next request waits in `ready` until this response's body is done.
                    // A switched connection is the tunnel's now.
                    let switched = switching
                        && (resp.status() == http::StatusCode::SWITCHING_PROTOCOLS
                            || resp.status().is_success());
                    if !switched {
                        *self.idle.lock().unwrap_or_else(|e| e.into_inner()) = Some((key, sender));
                    }
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(e.into_error().into()),
                },
            }
        }
        Err("the upstream closed the connection twice".into())
    }

    fn take(&self, key: &str) -> Option<hyper::client::conn::http1::SendRequest<UpBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        match idle.take() {
            Some((k, s)) if k == key && !s.is_closed() => Some(s),
            _ => None,
        }
    }

    async fn connect(
        &self,
        target: &http::Uri,
    ) -> Result<hyper::client::conn::http1::SendRequest<UpBody>, BoxError> {
        let io = self.connector.clone().connect(target.clone()).await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await?;
        self.drivers.add(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("upstream connection ended: {e}");
            }
        });
        Ok(sender)
    }
}
