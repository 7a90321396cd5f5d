//! The local CA that signs the certificates the proxy shows an agent when it intercepts TLS.
//!
//! # Files
//! In `<state_dir>/ca/` (a directory owned by the daemon's user, root, and writable by it
//! alone):
//! - `ca-key.pem`: the CA's ECDSA P-256 key, PKCS#8 PEM, mode 0600. Refused if group or
//!   others can read it.
//! - `ca-cert.pem`: the CA certificate, mode 0644 (`enforcer ca export` prints it).
//! - `bundle.pem`: the system roots plus the CA certificate, mode 0644, rewritten at every
//!   daemon start. `enforcer exec` points `SSL_CERT_FILE`, `CURL_CA_BUNDLE` and friends at it.
//!
//! The CA is created by `enforcer ca init`, or at the first daemon start when TLS may be
//! intercepted. It is never replaced: move the files aside to get a new one.
//!
//! # Leaves
//! One leaf certificate per server name (an IP address when the client sent no SNI), minted
//! on first use with one leaf key generated at start, valid for [`LEAF_VALIDITY_DAYS`] days
//! and re-minted after a day. At most [`LEAF_CACHE_CAPACITY`] leaves are cached (least
//! recently used evicted), about 1.5 KiB each.
//!
//! The CA's subject is `CN=enforcer local CA <16 hex digits of the SHA-256 of its public
//! key>, O=enforcer`: unique per installation, and derived from the key, so the issuer of a
//! leaf is rebuilt exactly from the key file alone.

use std::{
    io::Write as _,
    net::IpAddr,
    num::NonZeroUsize,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lru::LruCache;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _};
use sha2::Digest as _;

/// Most leaf certificates kept in memory.
pub const LEAF_CACHE_CAPACITY: usize = 1024;
/// How long a leaf certificate is valid.
pub const LEAF_VALIDITY_DAYS: i64 = 30;
/// A cached leaf older than this is minted again.
const LEAF_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// How long the CA certificate is valid.
const CA_VALIDITY_YEARS: i16 = 10;

pub const KEY_FILE: &str = "ca-key.pem";
pub const CERT_FILE: &str = "ca-cert.pem";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot create the CA directory {path}: {io}", io = crate::sys::io_text(source))]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "CA directory {path} is owned by uid {owner}, but enforcer runs as uid {euid}; \
         `chown {euid} {path}` (it holds the key that signs what agents trust)"
    )]
    DirOwner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error(
        "CA directory {path} has mode {mode:04o}, writable by group or others; run \
         `chmod go-w {path}`"
    )]
    DirMode { path: PathBuf, mode: u32 },
    #[error(
        "CA key {path} has mode {mode:04o}, readable by group or others; run `chmod 600 {path}` \
         and consider the key exposed: move {dir} aside and run `enforcer ca init` for a new CA"
    )]
    KeyMode {
        path: PathBuf,
        mode: u32,
        dir: PathBuf,
    },
    #[error("CA key {path} is owned by uid {owner}, but enforcer runs as uid {euid}")]
    KeyOwner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error(
        "{present} exists but {missing} does not; restore it, or move {dir} aside and run \
         `enforcer ca init` for a new CA"
    )]
    Half {
        present: PathBuf,
        missing: PathBuf,
        dir: PathBuf,
    },
    #[error("no CA in {dir}; create one with `enforcer ca init` (the daemon also creates it)")]
    Missing { dir: PathBuf },
    #[error("cannot read {path}: {io}", io = crate::sys::io_text(source))]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {io}", io = crate::sys::io_text(source))]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid {what}: {message}; move {dir} aside and run `enforcer ca init`")]
    Corrupt {
        path: PathBuf,
        what: &'static str,
        dir: PathBuf,
        message: String,
    },
    #[error("cannot sign a certificate for '{name}': {message}")]
    Sign { name: String, message: String },
    #[error("{path} (in tls.extra_upstream_roots) is not a PEM certificate file: {message}")]
    Parse { path: PathBuf, message: String },
}

/// The local CA: its certificate, its issuer, the leaf key and the leaf cache.
pub struct Ca {
    dir: PathBuf,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    leaf_key: KeyPair,
    leaf_signer: Arc<dyn rustls::sign::SigningKey>,
    cache: Mutex<LruCache<String, (Arc<CertifiedKey>, Instant)>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("dir", &self.dir).finish()
    }
}

/// Whether [`Ca::open_or_create`] found a CA or made one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Existing,
    Created,
}

/// Checks, changing nothing, that the daemon's CA is usable when there is one (a missing one
/// is created at start, unless `tls.mode` is `sni`).
pub fn check_for_daemon(config: &crate::config::Config) -> Result<(), CaError> {
    let dir = Ca::dir_in(&config.state_dir);
    if config.tls.mode == crate::config::TlsMode::Sni || !dir.exists() {
        return Ok(());
    }
    match Ca::open(&dir) {
        Ok(_) | Err(CaError::Missing { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The daemon's CA, created at the first start, when TLS may be intercepted (`tls.mode` other
/// than `sni`).
pub fn for_daemon(config: &crate::config::Config) -> Result<Option<Arc<Ca>>, CaError> {
    if config.tls.mode == crate::config::TlsMode::Sni {
        return Ok(None);
    }
    let dir = Ca::dir_in(&config.state_dir);
    let (ca, origin) = Ca::open_or_create(&dir)?;
    if origin == Origin::Created {
        tracing::warn!(
            cert = %dir.join(CERT_FILE).display(),
            sha256 = %ca.fingerprint(),
            "created the local CA that signs intercepted TLS; `enforcer exec` makes enrolled \
             commands trust it, `enforcer ca export` prints it for anything else"
        );
    }
    Ok(Some(Arc::new(ca)))
}

impl Ca {
    /// `<state_dir>/ca`.
    pub fn dir_in(state_dir: &Path) -> PathBuf {
        state_dir.join("ca")
    }

    /// Opens the CA in `dir`, creating it (and the directory) when there is none.
    pub fn open_or_create(dir: &Path) -> Result<(Ca, Origin), CaError> {
        create_dir(dir)?;
        check_dir(dir)?;
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        match (key_path.exists(), cert_path.exists()) {
            (true, true) => Ok((Self::open(dir)?, Origin::Existing)),
            (false, false) => Ok((Self::create(dir)?, Origin::Created)),
            (true, false) => Err(CaError::Half {
                present: key_path,
                missing: cert_path,
                dir: dir.to_owned(),
            }),
            (false, true) => Err(CaError::Half {
                present: cert_path,
                missing: key_path,
                dir: dir.to_owned(),
            }),
        }
    }

    /// Opens an existing CA.
    pub fn open(dir: &Path) -> Result<Ca, CaError> {
        check_dir(dir)?;
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        if !key_path.exists() && !cert_path.exists() {
            return Err(CaError::Missing {
                dir: dir.to_owned(),
            });
        }
        check_key_file(&key_path, dir)?;
        let corrupt = |path: &Path, what, message: String| CaError::Corrupt {
            path: path.to_owned(),
            what,
            dir: dir.to_owned(),
            message,
        };
        let key_pem = std::fs::read_to_string(&key_path).map_err(|source| CaError::Read {
            path: key_path.clone(),
            source,
        })?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| corrupt(&key_path, "ECDSA P-256 key", e.to_string()))?;
        if !key.is_compatible(&PKCS_ECDSA_P256_SHA256) {
            return Err(corrupt(
                &key_path,
                "ECDSA P-256 key",
                "another key type".into(),
            ));
        }
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(|source| CaError::Read {
            path: cert_path.clone(),
            source,
        })?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| corrupt(&cert_path, "PEM certificate", e.to_string()))?;
        // The certificate must carry this key (its SubjectPublicKeyInfo holds the raw point).
        if !contains(cert_der.as_ref(), key.public_key_raw()) {
            return Err(corrupt(
                &cert_path,
                "CA certificate",
                format!("it does not belong to the key in {}", key_path.display()),
            ));
        }
        Self::assemble(dir, key, cert_pem, cert_der)
    }

    fn create(dir: &Path) -> Result<Ca, CaError> {
        let sign_err = |e: rcgen::Error| CaError::Sign {
            name: "the CA".into(),
            message: e.to_string(),
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
        let mut params = issuer_params(&key);
        set_validity(&mut params, jiff::Span::new().years(CA_VALIDITY_YEARS));
        let cert = params.self_signed(&key).map_err(sign_err)?;
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_replacing(&cert_path, cert.pem().as_bytes(), 0o644)?;
        Self::assemble(dir, key, cert.pem(), cert.der().clone())
    }

    fn assemble(
        dir: &Path,
        key: KeyPair,
        cert_pem: String,
        cert_der: CertificateDer<'static>,
    ) -> Result<Ca, CaError> {
        let sign_err = |e: String| CaError::Sign {
            name: "the leaf key".into(),
            message: e,
        };
        let issuer = Issuer::new(issuer_params(&key), key);
        let leaf_key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| sign_err(e.to_string()))?;
        let leaf_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let leaf_signer = rustls::crypto::ring::sign::any_ecdsa_type(&leaf_der)
            .map_err(|e| sign_err(e.to_string()))?;
        Ok(Ca {
            dir: dir.to_owned(),
            cert_pem,
            cert_der,
            issuer,
            leaf_key,
            leaf_signer,
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(LEAF_CACHE_CAPACITY).expect("non-zero"),
            )),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Lowercase hex SHA-256 of the CA certificate (as `openssl x509 -fingerprint -sha256`
    /// shows it, without colons).
    pub fn fingerprint(&self) -> String {
        hex::encode(sha2::Sha256::digest(self.cert_der.as_ref()))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes the trust bundle that enrolled commands point their CA variables at: the
    /// system roots (as rustls-native-certs finds them, honouring `SSL_CERT_FILE` and
    /// `SSL_CERT_DIR`), the operator's `tls.extra_upstream_roots` (already trusted for
    /// upstreams, so a spliced internal host with a private CA verifies too) and the CA
    /// certificate. The file is mode 0644 and its directory 0755, set explicitly after the
    /// write, so any enrolled user can read it whatever the umask; it holds no secret (the CA
    /// key stays 0600 in the root-only `state_dir`). Returns how many roots it holds
    /// besides the CA.
    pub fn write_bundle(&self, path: &Path, extra_roots: &[PathBuf]) -> Result<usize, CaError> {
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!("reading the system roots for the CA bundle: {e}");
        }
        let mut certs: Vec<CertificateDer<'static>> = native.certs;
        for extra in extra_roots {
            let bytes = std::fs::read(extra).map_err(|source| CaError::Read {
                path: extra.clone(),
                source,
            })?;
            for cert in CertificateDer::pem_slice_iter(&bytes) {
                certs.push(cert.map_err(|e| CaError::Parse {
                    path: extra.clone(),
                    message: e.to_string(),
                })?);
            }
        }
        let mut out = String::new();
        for cert in &certs {
            out.push_str(&pem::encode_config(
                &pem::Pem::new("CERTIFICATE", cert.as_ref().to_vec()),
                pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
            ));
        }
        out.push_str(&self.cert_pem);
        if let Some(dir) = path.parent() {
            create_dir(dir)?;
            // Readable by every enrolled user, whatever the umask made of it.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(
                |source| CaError::Write {
                    path: dir.to_owned(),
                    source,
                },
            )?;
        }
        write_replacing(path, out.as_bytes(), 0o644)?;
        Ok(certs.len())
    }

    /// The certificate chain and key for a server name (a DNS name, or an IP address
    /// literal), from the cache or minted now.
    pub fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(key) = self.cached_normalized(&name) {
            return Ok(key);
        }
        let key = Arc::new(self.mint(&name)?);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(name, (key.clone(), Instant::now()));
        Ok(key)
    }

    /// The leaf for `name` when the cache holds a fresh one; never mints.
    pub fn cached(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.cached_normalized(&name.trim_end_matches('.').to_ascii_lowercase())
    }

    fn cached_normalized(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(name)
            .filter(|(_, minted)| minted.elapsed() < LEAF_REFRESH)
            .map(|(key, _)| key.clone())
    }

    fn mint(&self, name: &str) -> Result<CertifiedKey, CaError> {
        let sign_err = |message: String| CaError::Sign {
            name: name.to_owned(),
            message,
        };
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                name.try_into()
                    .map_err(|e: rcgen::Error| sign_err(e.to_string()))?,
            ),
        }];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, jiff::Span::new().days(LEAF_VALIDITY_DAYS));
        let cert = params
            .signed_by(&self.leaf_key, &self.issuer)
            .map_err(|e| sign_err(e.to_string()))?;
        Ok(CertifiedKey::new(
            vec![cert.der().clone(), self.cert_der.clone()],
            self.leaf_signer.clone(),
        ))
    }
}

/// The issuer's parameters, derived from its key alone.
fn issuer_params(key: &KeyPair) -> CertificateParams {
    let id = hex::encode(&sha2::Sha256::digest(key.public_key_raw())[..8]);
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("enforcer local CA {id}"));
    dn.push(DnType::OrganizationName, "enforcer");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Valid from yesterday (UTC, so clocks a little behind still accept it) for `span`, with a
/// fresh random serial.
fn set_validity(params: &mut CertificateParams, span: jiff::Span) {
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    let ymd = |d: jiff::civil::Date| {
        rcgen::date_time_ymd(
            i32::from(d.year()),
            u8::try_from(d.month()).unwrap_or(1),
            u8::try_from(d.day()).unwrap_or(1),
        )
    };
    params.not_before = ymd(today.yesterday().unwrap_or(today));
    params.not_after = ymd(today.checked_add(span).unwrap_or(today));
    params.serial_number = Some(random_serial());
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, and without a leading zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn create_dir(dir: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::DirBuilderExt as _;
    if dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|source| CaError::CreateDir {
            path: dir.to_owned(),
            source,
        })
}

/// Owned by us, writable by nobody else.
fn check_dir(dir: &Path) -> Result<(), CaError> {
    let meta = std::fs::metadata(dir).map_err(|source| CaError::Read {
        path: dir.to_owned(),
        source,
    })?;
    if meta.uid() != euid() {
        return Err(CaError::DirOwner {
            path: dir.to_owned(),
            owner: meta.uid(),
            euid: euid(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(CaError::DirMode {
            path: dir.to_owned(),
            mode,
        });
    }
    Ok(())
}

fn check_key_file(path: &Path, dir: &Path) -> Result<(), CaError> {
    let meta = std::fs::metadata(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })?;
    if meta.uid() != euid() {
        return Err(CaError::KeyOwner {
            path: path.to_owned(),
            owner: meta.uid(),
            euid: euid(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CaError::KeyMode {
            path: path.to_owned(),
            mode,
            dir: dir.to_owned(),
        });
    }
    Ok(())
}

/// Creates `path` (never replacing it) with `mode`, and fsyncs it.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let err = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Replaces `path` atomically (temporary sibling, rename) with `mode`.
fn write_replacing(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let err = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    // The umask may have narrowed the mode.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = t.path().join("ca");
        (t, d)
    }

    #[test]
    fn a_ca_is_created_once_with_a_private_key_and_reopened_the_same() {
        let (_t, d) = dir();
        let (ca, origin) = Ca::open_or_create(&d).unwrap();
        assert_eq!(origin, Origin::Created);
        let key_mode = std::fs::metadata(d.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(&d).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o022, 0);
        let (again, origin) = Ca::open_or_create(&d).unwrap();
        assert_eq!(origin, Origin::Existing);
        assert_eq!(again.cert_pem(), ca.cert_pem());
        assert_eq!(again.fingerprint(), ca.fingerprint());
    }

    #[test]
    fn an_exposed_key_or_a_writable_directory_is_refused() {
        let (_t, d) = dir();
        Ca::open_or_create(&d).unwrap();
        std::fs::set_permissions(d.join(KEY_FILE), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Ca::open(&d), Err(CaError::KeyMode { .. })));
        std::fs::set_permissions(d.join(KEY_FILE), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(Ca::open(&d), Err(CaError::DirMode { .. })));
    }

    #[test]
    fn half_a_ca_is_refused() {
        let (_t, d) = dir();
        Ca::open_or_create(&d).unwrap();
        std::fs::remove_file(d.join(CERT_FILE)).unwrap();
        assert!(matches!(Ca::open_or_create(&d), Err(CaError::Half { .. })));
    }

    #[test]
    fn leaves_verify_against_the_ca_for_names_and_addresses_and_are_cached() {
        let (_t, d) = dir();
        let (ca, _) = Ca::open_or_create(&d).unwrap();
        // Reopened: the issuer is rebuilt from the key file, and must still chain.
        let ca = {
            drop(ca);
            Ca::open(&d).unwrap()
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        for name in ["api.example.test", "127.0.0.9", "::1"] {
            let leaf = ca.leaf(name).unwrap();
            let server_name = rustls_pki_types::ServerName::try_from(name).unwrap();
            rustls::client::danger::ServerCertVerifier::verify_server_cert(
                verifier.as_ref(),
                &leaf.cert[0],
                &leaf.cert[1..],
                &server_name,
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(Arc::ptr_eq(&leaf, &ca.leaf(name).unwrap()), "cached");
        }
        // A leaf for one name is not valid for another.
        let leaf = ca.leaf("a.example.test").unwrap();
        let other = rustls_pki_types::ServerName::try_from("b.example.test").unwrap();
        assert!(
            rustls::client::danger::ServerCertVerifier::verify_server_cert(
                verifier.as_ref(),
                &leaf.cert[0],
                &leaf.cert[1..],
                &other,
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .is_err()
        );
    }

    #[test]
    fn the_bundle_holds_the_extra_roots_and_the_ca_and_is_readable_whatever_the_umask() {
        let (t, d) = dir();
        let (ca, _) = Ca::open_or_create(&d).unwrap();
        // An operator's private root, as tls.extra_upstream_roots names it.
        let (other_t, other_d) = dir();
        let (other, _) = Ca::open_or_create(&other_d).unwrap();
        let extra = other_t.path().join("private-root.pem");
        std::fs::write(&extra, other.cert_pem()).unwrap();
        let run = t.path().join("run");
        // SAFETY: umask only changes this process's file-creation mask.
        let old = unsafe { libc::umask(0o077) };
        let written = ca.write_bundle(&run.join("ca-bundle.pem"), &[extra]);
        // SAFETY: as above, restoring it.
        unsafe { libc::umask(old) };
        let roots = written.unwrap();
        let path = run.join("ca-bundle.pem");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with(ca.cert_pem()));
        assert!(roots >= 1);
        let other_b64: String = other
            .cert_pem()
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        assert!(
            text.lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>()
                .contains(&other_b64),
            "the extra root is in the bundle"
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o644);
        assert_eq!(mode(&run), 0o755);
        assert!(
            ca.write_bundle(&path, &[t.path().join("missing.pem")])
                .is_err(),
            "an unreadable extra root is an error, not silently left out"
        );
    }
}
