//! Connections to the upstream: always to the original destination the kernel recorded,
//! never to a fresh resolution of the request's host. Over TLS the server name (SNI and the
//! name the certificate must carry) is the request's host, verified against the system roots
//! plus `tls.extra_upstream_roots`.
//!
//! Each client connection gets its own hyper client (and so its own pool), keyed by the
//! request's scheme and authority: requests for two hosts never share an upstream TLS session
//! with the wrong name, and nothing is shared between agents.

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

use super::body::UpBody;
use crate::proxy::scope::{Scope, ScopeExec, Tracked};

/// Longest wait for the upstream TCP handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the upstream TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an upstream connection failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {dst}: {source}")]
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
    #[error("TLS handshake with {host} ({dst}) failed: {source}")]
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

/// The hyper client of one client connection.
pub type UpstreamClient = Client<Connector, UpBody>;

/// A client for one client connection, whose tasks live in its scope.
pub fn client(connector: Connector, scope: Arc<Scope>) -> UpstreamClient {
    Client::builder(ScopeExec(scope))
        .pool_max_idle_per_host(8)
        .build(connector)
}
