//! TLS: which connections are intercepted, the server side of an interception (leaf
//! certificates from the local [`Ca`], ALPN `h2` and `http/1.1`), and the client side towards
//! upstreams (system roots plus `tls.extra_upstream_roots`).
//!
//! # Modes (`tls.mode`)
//! - `auto` (default): a host whose rules need the request itself (method, path, header,
//!   body, time-window or limit rules: [`Policy::host_needs_l7`]) is intercepted; any other
//!   host is spliced after a host-level decision on its SNI, never decrypted.
//! - `sni`: never intercept. A host that needs L7 rules is then denied in strict mode (its
//!   rules cannot be applied), and decided at host level in permissive mode.
//! - `intercept`: intercept every host.
//!
//! `tls.passthrough_hosts` (exact names, IP literals or `*.example.com`) are never
//! intercepted, for clients that pin certificates or use client certificates; they are
//! treated like every host under `sni`.

use std::{net::IpAddr, path::PathBuf, sync::Arc};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, pem::PemObject as _};

use crate::{
    ca::Ca,
    config::{TlsConfig, TlsMode},
    policy::{Policy, Scheme, canonical_host},
};

/// ALPN protocols offered to agents on an intercepted connection.
pub const ALPN_SERVER: [&[u8]; 2] = [b"h2", b"http/1.1"];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.extra_upstream_roots: cannot read {path}: {io}", io = crate::sys::io_text(source))]
    RootsRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "tls.extra_upstream_roots: {path} holds no usable PEM certificate ({message}); it must \
         be a PEM file of CA certificates"
    )]
    RootsParse { path: PathBuf, message: String },
    #[error(
        "no trusted roots for upstream TLS: the system store is empty or unreadable and \
         tls.extra_upstream_roots names none; install ca-certificates"
    )]
    NoRoots,
    #[error("tls.passthrough_hosts: '{host}' is not a host name or address: {reason}")]
    Passthrough { host: String, reason: String },
    #[error("building the TLS configuration failed: {0}")]
    Build(#[from] rustls::Error),
}

/// Client configurations towards upstreams.
pub struct UpstreamTls {
    /// ALPN `http/1.1` only: for agents speaking HTTP/1 (upgrades need HTTP/1 upstream).
    pub h1: Arc<ClientConfig>,
    /// ALPN `h2` and `http/1.1`: for agents speaking HTTP/2.
    pub h2: Arc<ClientConfig>,
    /// How many roots are trusted.
    pub roots: usize,
}

impl UpstreamTls {
    /// The daemon's upstream TLS: `None` when no root at all is available, which is logged
    /// (intercepted requests then fail with 502, never unverified).
    pub fn for_daemon(config: &TlsConfig) -> Result<Option<Arc<Self>>, TlsError> {
        match UpstreamTls::new(&config.extra_upstream_roots) {
            Ok(t) => {
                tracing::debug!(roots = t.roots, "upstream TLS roots loaded");
                Ok(Some(Arc::new(t)))
            }
            Err(e @ TlsError::NoRoots) => {
                tracing::warn!("{e}; intercepted requests will fail with 502");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The system roots (rustls-native-certs) plus the PEM files in `extra`.
    pub fn new(extra: &[PathBuf]) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!("reading the system roots: {e}");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        if ignored > 0 {
            tracing::debug!("{ignored} system roots could not be parsed and are ignored");
        }
        let mut count = added;
        for path in extra {
            let bytes = std::fs::read(path).map_err(|source| TlsError::RootsRead {
                path: path.clone(),
                source,
            })?;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError::RootsParse {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            let (ok, bad) = roots.add_parsable_certificates(certs);
            if ok == 0 {
                return Err(TlsError::RootsParse {
                    path: path.clone(),
                    message: format!("{bad} unparsable certificates"),
                });
            }
            count += ok;
        }
        if count == 0 {
            return Err(TlsError::NoRoots);
        }
        let roots = Arc::new(roots);
        let build = |alpn: &[&[u8]]| -> Result<Arc<ClientConfig>, TlsError> {
            let mut c = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(c))
        };
        Ok(Self {
            h1: build(&[b"http/1.1"])?,
            h2: build(&[b"h2", b"http/1.1"])?,
            roots: count,
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What to do with one TLS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Decide at host level on the SNI, then splice.
    Splice,
    /// Terminate TLS and judge every request.
    Intercept,
    /// The host needs L7 rules, but is not intercepted (the reason says why).
    NotIntercepted(String),
}

/// What an agent's credentials ask of one TLS connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inspect {
    /// The agent has no credentials.
    No,
    /// The agent has credentials, none bound to this host: its requests are seen (where TLS
    /// may be decrypted) so that a placeholder leaving is caught.
    Leaks,
    /// A credential of the agent is bound to this host: its requests must be seen to swap the
    /// secret in.
    Bound,
}

/// Daemon-wide TLS settings.
pub struct TlsContext {
    pub mode: TlsMode,
    /// `tls.deny_in_band`.
    pub deny_in_band: bool,
    passthrough: Vec<Passthrough>,
    ca: Option<Arc<Ca>>,
    /// Server configuration for connections with SNI (certificates by name).
    server: Option<Arc<ServerConfig>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Passthrough {
    Exact(String),
    /// `*.example.com`: subdomains at any depth, stored as `.example.com`.
    Suffix(String),
}

impl TlsContext {
    /// `ca` is required for interception; without it nothing is intercepted.
    pub fn new(config: &TlsConfig, ca: Option<Arc<Ca>>) -> Result<Self, TlsError> {
        let mut passthrough = Vec::new();
        for host in &config.passthrough_hosts {
            let (wild, name) = match host.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, host.as_str()),
            };
            let canonical = canonical_host(name).map_err(|e| TlsError::Passthrough {
                host: host.clone(),
                reason: e.to_string(),
            })?;
            passthrough.push(if wild {
                Passthrough::Suffix(format!(".{canonical}"))
            } else {
                Passthrough::Exact(canonical)
            });
        }
        let server = match &ca {
            Some(ca) => Some(server_config(Arc::new(ByName(ca.clone())))?),
            None => None,
        };
        Ok(Self {
            mode: config.mode,
            deny_in_band: config.deny_in_band,
            passthrough,
            ca,
            server,
        })
    }

    /// Is `host` (canonical) in `tls.passthrough_hosts`?
    pub fn is_passthrough(&self, host: &str) -> bool {
        self.passthrough.iter().any(|p| match p {
            Passthrough::Exact(h) => h == host,
            Passthrough::Suffix(s) => host.ends_with(s.as_str()),
        })
    }

    /// Intercept or splice a TLS connection to `host` (canonical; the address when there is
    /// no SNI) on `port`.
    /// `inspect`: what the agent's credentials ask of this connection.
    pub fn route(&self, policy: &Policy, host: &str, port: u16, inspect: Inspect) -> Route {
        let needs_l7 =
            || inspect == Inspect::Bound || policy.host_needs_l7(Scheme::Https, host, port);
        if self.is_passthrough(host) {
            return if needs_l7() {
                Route::NotIntercepted(format!(
                    "{host} is listed in tls.passthrough_hosts, so its TLS is not decrypted"
                ))
            } else {
                Route::Splice
            };
        }
        let wanted = match self.mode {
            TlsMode::Sni => {
                return if needs_l7() {
                    Route::NotIntercepted("tls.mode is sni, so TLS is never decrypted".into())
                } else {
                    Route::Splice
                };
            }
            TlsMode::Intercept => true,
            TlsMode::Auto => inspect == Inspect::Leaks || needs_l7(),
        };
        match (wanted, &self.server) {
            (false, _) => Route::Splice,
            (true, Some(_)) => Route::Intercept,
            // Watching for leaked placeholders is worth decrypting for, not refusing over.
            (true, None) if !needs_l7() => Route::Splice,
            (true, None) => Route::NotIntercepted(
                "there is no local CA to intercept TLS with (see `enforcer ca init`)".into(),
            ),
        }
    }

    /// Can TLS be decrypted at all (a local CA, and the server configuration built)?
    pub fn can_intercept(&self) -> bool {
        self.server.is_some()
    }

    /// The server configuration for an intercepted connection: by SNI, or a certificate for
    /// the destination address when the client sent none.
    pub fn server_config(&self, sni: Option<&str>, dst: IpAddr) -> Option<Arc<ServerConfig>> {
        let server = self.server.as_ref()?;
        if sni.is_some() {
            return Some(server.clone());
        }
        let ca = self.ca.as_ref()?;
        let leaf = match ca.leaf(&dst.to_string()) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("{e}");
                return None;
            }
        };
        server_config(Arc::new(Fixed(leaf))).ok()
    }

    pub fn ca(&self) -> Option<&Arc<Ca>> {
        self.ca.as_ref()
    }

    /// Mints the leaf an intercepted handshake for `sni` (or, without one, the destination
    /// address) will need, on the blocking pool, when the cache has none: a mint signs a
    /// certificate, which would stall every other connection of the proxy thread the
    /// handshake runs on. With the leaf cached, the handshake's certificate lookup is a hit.
    /// A failure is left for the handshake to report.
    pub async fn prepare_leaf(&self, sni: Option<&str>, dst: IpAddr) {
        let Some(ca) = &self.ca else {
            return;
        };
        let name = sni.map_or_else(|| dst.to_string(), str::to_owned);
        if ca.cached(&name).is_some() {
            return;
        }
        let ca = ca.clone();
        let _ = tokio::task::spawn_blocking(move || ca.leaf(&name)).await;
    }
}

fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    c.alpn_protocols = ALPN_SERVER.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(c))
}

/// Leaves by SNI.
#[derive(Debug)]
struct ByName(Arc<Ca>);

impl ResolvesServerCert for ByName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        match self.0.leaf(name) {
            Ok(leaf) => Some(leaf),
            Err(e) => {
                tracing::warn!("{e}");
                None
            }
        }
    }
}

/// One leaf for every hello (connections without SNI).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Policy {
        Policy::from_yaml(yaml.as_bytes(), "test").unwrap()
    }

    fn ctx(mode: TlsMode, passthrough: &[&str], with_ca: bool) -> (TlsContext, tempfile::TempDir) {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let ca = with_ca.then(|| Arc::new(Ca::open_or_create(&dir.path().join("ca")).unwrap().0));
        let config = TlsConfig {
            mode,
            extra_upstream_roots: Vec::new(),
            passthrough_hosts: passthrough.iter().map(|s| s.to_string()).collect(),
            deny_in_band: true,
        };
        (TlsContext::new(&config, ca).unwrap(), dir)
    }

    const POLICY: &str = "rules:\n\
        \x20 - name: l7\n    allow: { method: [GET], url: \"l7.test/v1/*\" }\n\
        \x20 - name: host\n    allow: { url: \"host.test\" }\n";

    #[test]
    fn auto_intercepts_only_hosts_with_request_rules() {
        let p = policy(POLICY);
        let (c, _d) = ctx(TlsMode::Auto, &[], true);
        assert_eq!(c.route(&p, "l7.test", 443, Inspect::No), Route::Intercept);
        assert_eq!(c.route(&p, "host.test", 443, Inspect::No), Route::Splice);
        // A host a credential is bound to is always intercepted, to swap the secret in.
        assert_eq!(
            c.route(&p, "host.test", 443, Inspect::Bound),
            Route::Intercept
        );
        assert_eq!(c.route(&p, "other.test", 443, Inspect::No), Route::Splice);
    }

    #[test]
    fn sni_mode_and_passthrough_never_intercept_and_say_why() {
        let p = policy(POLICY);
        let (c, _d) = ctx(TlsMode::Sni, &[], false);
        assert!(
            matches!(c.route(&p, "l7.test", 443, Inspect::No), Route::NotIntercepted(r) if r.contains("sni"))
        );
        assert_eq!(c.route(&p, "host.test", 443, Inspect::No), Route::Splice);
        let (c, _d) = ctx(TlsMode::Intercept, &["*.test"], true);
        assert!(
            matches!(c.route(&p, "l7.test", 443, Inspect::No), Route::NotIntercepted(r) if r.contains("passthrough"))
        );
        assert_eq!(c.route(&p, "host.test", 443, Inspect::No), Route::Splice);
        assert_eq!(
            c.route(&p, "example.com", 443, Inspect::No),
            Route::Intercept
        );
    }

    #[test]
    fn connections_without_sni_get_a_certificate_for_the_address() {
        let (c, _d) = ctx(TlsMode::Intercept, &[], true);
        assert!(
            c.server_config(None, "127.0.0.9".parse().unwrap())
                .is_some()
        );
        assert!(
            c.server_config(Some("a.test"), "127.0.0.9".parse().unwrap())
                .is_some()
        );
        let (c, _d) = ctx(TlsMode::Sni, &[], false);
        assert!(
            c.server_config(Some("a.test"), "127.0.0.9".parse().unwrap())
                .is_none()
        );
    }

    #[test]
    fn a_leaf_is_minted_off_the_calling_thread_before_the_handshake_needs_it() {
        let (c, _d) = ctx(TlsMode::Intercept, &[], true);
        let ca = c.ca().unwrap().clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(ca.cached("new.test").is_none());
        rt.block_on(c.prepare_leaf(Some("New.Test."), "127.0.0.9".parse().unwrap()));
        let minted = ca.cached("new.test").expect("minted by prepare_leaf");
        // The handshake's lookup is a hit on the same leaf, and so is a second prepare.
        assert!(Arc::ptr_eq(&minted, &ca.leaf("new.test").unwrap()));
        rt.block_on(c.prepare_leaf(Some("new.test"), "127.0.0.9".parse().unwrap()));
        assert!(Arc::ptr_eq(&minted, &ca.cached("new.test").unwrap()));
        // Without SNI, the address's leaf.
        rt.block_on(c.prepare_leaf(None, "127.0.0.9".parse().unwrap()));
        assert!(ca.cached("127.0.0.9").is_some());
    }

    #[test]
    fn bad_extra_roots_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        assert!(matches!(
            UpstreamTls::new(std::slice::from_ref(&missing)),
            Err(TlsError::RootsRead { .. })
        ));
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        assert!(matches!(
            UpstreamTls::new(&[junk]),
            Err(TlsError::RootsParse { .. })
        ));
    }
}
