//! Classifying the first bytes of a redirected connection: a TLS ClientHello (for its SNI) or
//! an HTTP/1.x request (for its Host), read within a time and size bound. The bytes read are
//! kept and replayed to the upstream, so classification is a peek from the upstream's view.

use std::time::Duration;

use tokio::{io::AsyncReadExt as _, net::TcpStream};

/// Largest prefix read while classifying.
pub const PEEK_LIMIT: usize = 32 * 1024;
/// Longest wait for the client's first bytes.
pub const PEEK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the first bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// A TLS ClientHello; `sni` is the server name it asks for, if any.
    Tls { sni: Option<String> },
    /// An HTTP/1.x request with its Host header (without port), if any.
    Http { host: Option<String> },
    /// Something else, or nothing in time.
    Opaque { why: String },
}

/// Reads from `client` until the opening is recognised. Returns it and the bytes read.
pub async fn classify(client: &mut TcpStream) -> (Opening, Vec<u8>) {
    let mut buf = Vec::with_capacity(4096);
    let deadline = tokio::time::Instant::now() + PEEK_TIMEOUT;
    loop {
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout_at(deadline, client.read(&mut chunk)).await;
        match read {
            Err(_) => {
                let why = format!(
                    "no recognisable opening within {}s ({} bytes)",
                    PEEK_TIMEOUT.as_secs(),
                    buf.len()
                );
                return (Opening::Opaque { why }, buf);
            }
            Ok(Err(e)) => return (Opening::Opaque { why: e.to_string() }, buf),
            Ok(Ok(0)) => {
                let why = format!("client closed after {} bytes", buf.len());
                return (Opening::Opaque { why }, buf);
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        if let Some(opening) = recognise(&buf) {
            return (opening, buf);
        }
        if buf.len() >= PEEK_LIMIT {
            // An HTTP head this large is still HTTP: the server answers it with a 431.
            if request_line(&buf) {
                return (Opening::Http { host: None }, buf);
            }
            let why = format!("opening larger than {PEEK_LIMIT} bytes");
            return (Opening::Opaque { why }, buf);
        }
    }
}

/// `Some` once `buf` is enough to decide.
pub fn recognise(buf: &[u8]) -> Option<Opening> {
    match buf.first()? {
        // TLS handshake record.
        0x16 => tls(buf),
        _ => http(buf),
    }
}

fn tls(buf: &[u8]) -> Option<Opening> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = buf;
    while !rd.is_empty() {
        if acceptor.read_tls(&mut rd).is_err() {
            return Some(Opening::Opaque {
                why: "malformed TLS record".into(),
            });
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Some(Opening::Tls {
            sni: accepted.client_hello().server_name().map(str::to_owned),
        }),
        Ok(None) => None,
        Err((err, _)) => Some(Opening::Opaque {
            why: format!("invalid TLS ClientHello: {err}"),
        }),
    }
}

/// The HTTP/2 connection preface: cleartext HTTP/2 with prior knowledge.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn http(buf: &[u8]) -> Option<Opening> {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then(|| Opening::Opaque {
            why: "cleartext HTTP/2 (h2c) is refused; use HTTPS or HTTP/1.1".into(),
        });
    }
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {
            let host = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(|v| strip_port(v.trim()).to_owned());
            Some(Opening::Http { host })
        }
        Ok(httparse::Status::Partial) => None,
        // A malformed head after a valid request line is still HTTP: the HTTP server
        // answers it (400) rather than the connection being dropped as opaque.
        Err(_) if request_line(buf) => Some(Opening::Http { host: None }),
        Err(e) => Some(Opening::Opaque {
            why: format!("not HTTP or TLS ({e})"),
        }),
    }
}

/// Does `buf` start with a complete, valid HTTP/1.x request line?
fn request_line(buf: &[u8]) -> bool {
    let Some(lf) = buf.iter().position(|b| *b == b'\n') else {
        return false;
    };
    let mut line = buf[..=lf].to_vec();
    line.extend_from_slice(b"\r\n");
    let mut headers = [httparse::EMPTY_HEADER; 1];
    matches!(
        httparse::Request::new(&mut headers).parse(&line),
        Ok(httparse::Status::Complete(_))
    )
}

/// `host[:port]` or `[v6][:port]` → host (IPv6 without brackets).
pub fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_host_is_found_only_when_the_head_is_complete() {
        assert_eq!(recognise(b"GET / HTTP/1.1\r\nHost: a.test"), None);
        assert_eq!(
            recognise(b"GET / HTTP/1.1\r\nHost: A.test:8080\r\n\r\n"),
            Some(Opening::Http {
                host: Some("A.test".into())
            })
        );
        assert_eq!(
            recognise(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"),
            Some(Opening::Http {
                host: Some("::1".into())
            })
        );
        assert_eq!(
            recognise(b"GET / HTTP/1.0\r\n\r\n"),
            Some(Opening::Http { host: None })
        );
        assert!(matches!(
            recognise(b"SSH-2.0-OpenSSH_9.2\r\n"),
            Some(Opening::Opaque { .. })
        ));
        assert_eq!(
            recognise(b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n"),
            Some(Opening::Http { host: None })
        );
        assert_eq!(recognise(b"PRI * HTTP/2.0\r\n"), None);
        assert!(matches!(
            recognise(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some(Opening::Opaque { why }) if why.contains("h2c")
        ));
    }

    #[test]
    fn tls_client_hello_gives_its_sni() {
        let hello = client_hello("api.example.test");
        // Any prefix short of the whole record is not yet decidable.
        assert_eq!(recognise(&hello[..20]), None);
        assert_eq!(
            recognise(&hello),
            Some(Opening::Tls {
                sni: Some("api.example.test".into())
            })
        );
        assert!(matches!(
            recognise(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]),
            Some(Opening::Opaque { .. })
        ));
    }

    /// A real ClientHello, produced by rustls.
    fn client_hello(name: &str) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(
            std::sync::Arc::new(config),
            name.to_owned().try_into().unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }
}
