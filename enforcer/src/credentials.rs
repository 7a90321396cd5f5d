//! Credentials the agent never holds.
//!
//! Each `credentials:` entry of an agent gets a random placeholder (kept in `state_dir`, so it
//! survives restarts). `enforcer exec` sets the entry's `env` to it. On plain HTTP and
//! intercepted HTTPS the proxy swaps the real value in for the placeholder, in header values
//! (Basic credentials decoded and re-encoded) and query values, only when the request goes to
//! one of the entry's `hosts`, on a connection the kernel recorded for the entry's agent (and,
//! with `binaries`, made by one of those executables). Anywhere else a placeholder is a leak:
//! the request is refused and recorded (`credential_leak`). Responses to a request that got a
//! secret have the secret masked back to the placeholder.
//!
//! The placeholder is worth nothing on its own: a leaked one carries no secret. What keeps the
//! secret where it belongs is that it is only ever written into requests bound for its hosts;
//! the leak check is the signal that something (a prompt injection, say) tried.
//!
//! The real value lives in a [`Secret`] (zeroized on drop, no `Debug` that shows it) and is
//! never written to a log, record, status, metric or error message.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
};

use aho_corasick::AhoCorasick;
use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderValue, header};
use secrecy::{ExposeSecret as _, SecretSlice};
use serde::{Deserialize, Serialize};

use crate::{
    agents::{Caller, exe::FileId},
    config::{Config, CredentialConfig},
};

pub mod scan;

/// A secret's bytes: zeroized when dropped, never printed.
pub type Secret = SecretSlice<u8>;

/// Largest secret file read.
const MAX_SECRET_BYTES: u64 = 64 * 1024;
/// Random bytes in a placeholder (after its prefix): 128 bits.
const PLACEHOLDER_RANDOM_BYTES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(
        "cannot write the credential placeholders to {path}: {source}; check that state_dir is \
         writable by the daemon"
    )]
    Store {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the credential placeholders in {path} are unreadable ({reason}); move the file away to \
         issue new placeholders (agents then need the new ones: restart them)"
    )]
    Corrupt { path: PathBuf, reason: String },
}

/// Where a credential may be sent: an exact name, the subdomains of a name, or an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// `*.example.com`: subdomains at any depth, stored as `.example.com`.
    Suffix(String),
    Ip(IpAddr),
}

impl HostPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bare = s
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(Self::Ip(crate::addr::canonical(ip)));
        }
        let (wild, name) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let canonical = crate::policy::canonical_host(name)
            .map_err(|e| format!("'{s}' is not a host name, *.name or address: {e}"))?;
        Ok(if wild {
            Self::Suffix(format!(".{canonical}"))
        } else {
            Self::Exact(canonical)
        })
    }

    /// Does the canonical request host match?
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(h) => h == host,
            Self::Suffix(s) => host.ends_with(s.as_str()),
            Self::Ip(ip) => host
                .parse::<IpAddr>()
                .is_ok_and(|h| crate::addr::canonical(h) == *ip),
        }
    }

    /// Could a host match both?
    pub fn overlaps(&self, other: &HostPattern) -> bool {
        match (self, other) {
            (Self::Suffix(a), Self::Suffix(b)) => {
                a.ends_with(b.as_str()) || b.ends_with(a.as_str())
            }
            (suffix @ Self::Suffix(_), Self::Exact(h))
            | (Self::Exact(h), suffix @ Self::Suffix(_)) => suffix.matches(h),
            (Self::Suffix(_), Self::Ip(_)) | (Self::Ip(_), Self::Suffix(_)) => false,
            (a, b) => a == b,
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(h) => f.write_str(h),
            Self::Suffix(s) => write!(f, "*{s}"),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// A credential's secret as last read: the value, or why there is none.
enum SecretState {
    Available(Arc<Secret>),
    Unavailable(String),
}

/// One credential of one agent.
pub struct Credential {
    pub agent: String,
    pub name: String,
    pub env: String,
    pub hosts: Vec<HostPattern>,
    pub binaries: Vec<PathBuf>,
    pub placeholder: String,
    /// The same, shared by the requests that swap it.
    placeholder_bytes: Arc<[u8]>,
    /// Where the secret is read from.
    pub source: PathBuf,
    secret: ArcSwap<SecretState>,
    /// The `binaries` as (device, inode), resolved at load and at every refresh; a path that
    /// cannot be resolved matches nothing.
    binary_ids: ArcSwap<Vec<FileId>>,
    /// Unix seconds of the last substitution, 0 for never.
    last_used: AtomicI64,
}

impl Credential {
    /// `api.openai.com, *.openai.org`
    pub fn hosts_text(&self) -> String {
        let hosts: Vec<String> = self.hosts.iter().map(ToString::to_string).collect();
        hosts.join(", ")
    }

    /// Why the secret is unavailable, if it is.
    pub fn unavailable(&self) -> Option<String> {
        match &**self.secret.load() {
            SecretState::Available(_) => None,
            SecretState::Unavailable(why) => Some(why.clone()),
        }
    }

    pub fn last_used(&self) -> Option<i64> {
        Some(self.last_used.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }

    fn refresh(&self) {
        let state = match read_secret(&self.source) {
            Ok(s) => SecretState::Available(Arc::new(s)),
            Err(why) => SecretState::Unavailable(why),
        };
        if let (SecretState::Unavailable(new), SecretState::Available(_)) =
            (&state, &**self.secret.load())
        {
            tracing::warn!(agent = %self.agent, credential = %self.name, "credential now unavailable: {new}");
        }
        self.secret.store(Arc::new(state));
        let ids = self
            .binaries
            .iter()
            .filter_map(|b| match FileId::of_path(b) {
                Ok(id) => Some(id),
                Err(e) => {
                    tracing::warn!(agent = %self.agent, credential = %self.name,
                        "binaries: cannot stat {}: {e}; it matches no connection", b.display());
                    None
                }
            })
            .collect();
        self.binary_ids.store(Arc::new(ids));
    }
}

/// Reads a secret file: root-owned, no access for group or others, not a symlink, a regular
/// file of at most 64 KiB, one line (a trailing newline is dropped). `Err` says what is wrong
/// and how to fix it, and never contains the secret.
pub fn read_secret(path: &Path) -> Result<Secret, String> {
    use std::{
        io::Read as _,
        os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    };
    let shown = path.display();
    // O_NOFOLLOW: a symlink could point the daemon (root) at any file; refuse it.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => {
                format!("secret file {shown} is a symlink; point secret_file at the file itself")
            }
            _ => format!(
                "cannot open secret file {shown}: {}",
                crate::sys::io_text(&e)
            ),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat secret file {shown}: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!("secret file {shown} is not a regular file"));
    }
    if meta.uid() != 0 {
        return Err(format!(
            "secret file {shown} is owned by uid {}, not root; chown root {shown}",
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "secret file {shown} can be read by group or others (mode {:04o}); chmod 600 {shown}",
            meta.mode() & 0o7777
        ));
    }
    if meta.len() > MAX_SECRET_BYTES {
        return Err(format!("secret file {shown} is larger than 64 KiB"));
    }
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    (&mut file)
        .take(MAX_SECRET_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read secret file {shown}: {e}"))?;
    let mut len = bytes.len();
    if bytes[..len].ends_with(b"\n") {
        len -= 1;
        if bytes[..len].ends_with(b"\r") {
            len -= 1;
        }
    }
    if len == 0 {
        return Err(format!("secret file {shown} is empty"));
    }
    // It goes into header values: no line breaks or other control characters.
    if bytes[..len]
        .iter()
        .any(|&b| b < 0x20 && b != b'\t' || b == 0x7f)
    {
        return Err(format!(
            "secret file {shown} holds a line break or a control character; keep one line"
        ));
    }
    Ok(Secret::from(bytes[..len].to_vec().into_boxed_slice()))
}

/// The placeholders of every agent's credentials, as kept in `state_dir`.
#[derive(Default, Serialize, Deserialize)]
struct Placeholders {
    /// `agent` → credential name → placeholder.
    agents: BTreeMap<String, BTreeMap<String, String>>,
}

impl Placeholders {
    fn load(path: &Path) -> Result<Self, CredentialError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| CredentialError::Corrupt {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(CredentialError::Corrupt {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
        }
    }

    fn save(&self, path: &Path) -> Result<(), CredentialError> {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        let err = |source| CredentialError::Store {
            path: path.to_owned(),
            source,
        };
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(&serde_json::to_vec_pretty(self).unwrap_or_default())
            .and_then(|()| f.sync_all())
            .map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}

fn new_placeholder(prefix: &str) -> String {
    use rand::RngCore as _;
    let mut random = [0u8; PLACEHOLDER_RANDOM_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut random);
    format!("{prefix}{}", hex::encode(random))
}

/// Every configured credential, and a finder over all their placeholders.
#[derive(Default)]
struct Table {
    creds: Vec<Arc<Credential>>,
    /// Over every credential's placeholder; pattern i is `creds[i]`.
    finder: Option<AhoCorasick>,
    /// The same, for streamed bodies.
    patterns: Option<Arc<scan::Patterns>>,
}

/// The daemon's credentials: configured from the config, refreshed from their files.
pub struct Vault {
    table: ArcSwap<Table>,
    store: PathBuf,
    /// `$CREDENTIALS_DIRECTORY`, for `systemd_credential` entries.
    systemd_dir: Option<PathBuf>,
}

/// Why a request that carries a placeholder is refused.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// The placeholder may not go here (another host, another agent, another executable).
    Leak { credential: String, reason: String },
    /// The request could get the secret, but there is none to give.
    Unavailable { credential: String, reason: String },
}

impl Refusal {
    pub fn reason(&self) -> &str {
        match self {
            Refusal::Leak { reason, .. } | Refusal::Unavailable { reason, .. } => reason,
        }
    }

    pub fn credential(&self) -> &str {
        match self {
            Refusal::Leak { credential, .. } | Refusal::Unavailable { credential, .. } => {
                credential
            }
        }
    }
}

/// What was done to one request: the secrets it got (to mask in the response), and a watch
/// for placeholders that may not leave in its body.
pub struct Injection {
    /// (secret, placeholder) of every credential swapped in.
    pub masks: Vec<(Arc<Secret>, Arc<[u8]>)>,
    /// Names of the credentials swapped in.
    pub used: Vec<String>,
}

impl Injection {
    /// The response masker: the secrets back to their placeholders. `None` when no secret was
    /// sent.
    pub fn masker(&self) -> Option<scan::Replacer> {
        scan::Replacer::new(
            self.masks
                .iter()
                .map(|(s, p)| {
                    (
                        scan::Piece::Secret(s.clone()),
                        scan::Piece::Plain(p.clone()),
                    )
                })
                .collect(),
        )
    }
}

/// Watches a request body for placeholders that may not be sent with it.
pub struct BodyWatch {
    finder: scan::Finder,
    table: Arc<Table>,
    caller: Caller,
    host: String,
}

impl BodyWatch {
    /// `Some(refusal)` when this chunk (with the end of the previous one) holds a placeholder
    /// that may not go with this request.
    pub fn push(&mut self, chunk: &[u8]) -> Option<Refusal> {
        for i in self.finder.push(chunk) {
            // Its own credential toward its host is not a leak (bodies are not substituted).
            if let Err(r @ Refusal::Leak { .. }) =
                Vault::judge(&self.table.creds[i], &self.caller, &self.host)
            {
                return Some(r);
            }
        }
        None
    }
}

impl Vault {
    /// Builds the vault from the config: placeholders loaded or issued (and saved), secrets
    /// read. A credential whose secret cannot be read is unavailable, not fatal.
    pub fn new(config: &Config) -> Result<Vault, CredentialError> {
        let vault = Vault {
            table: ArcSwap::default(),
            store: config.state_dir.join("credentials.json"),
            systemd_dir: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
        };
        vault.configure(config)?;
        Ok(vault)
    }

    /// No credentials at all.
    pub fn empty() -> Vault {
        Vault {
            table: ArcSwap::default(),
            store: PathBuf::new(),
            systemd_dir: None,
        }
    }

    /// Takes a new config (a reload): keeps every existing placeholder.
    pub fn configure(&self, config: &Config) -> Result<(), CredentialError> {
        let mut stored = Placeholders::load(&self.store)?;
        let mut changed = false;
        let mut creds = Vec::new();
        for agent in &config.agents {
            for c in &agent.credentials {
                let mine = stored.agents.entry(agent.name.clone()).or_default();
                let placeholder = match mine.get(&c.name) {
                    // A changed prefix gets a new placeholder, in the new shape.
                    Some(p) if p.starts_with(&c.placeholder_prefix) => p.clone(),
                    _ => {
                        changed = true;
                        let p = new_placeholder(&c.placeholder_prefix);
                        mine.insert(c.name.clone(), p.clone());
                        p
                    }
                };
                let cred = self.credential(&agent.name, c, placeholder);
                let table = self.table.load();
                let old = table
                    .creds
                    .iter()
                    .find(|o| o.agent == cred.agent && o.name == cred.name);
                match old {
                    // Unchanged: the same credential goes on (its secret, its last use), so
                    // a reload never races a request that is updating it.
                    Some(old)
                        if old.env == cred.env
                            && old.hosts == cred.hosts
                            && old.binaries == cred.binaries
                            && old.placeholder == cred.placeholder
                            && old.source == cred.source =>
                    {
                        creds.push(old.clone());
                    }
                    Some(old) => {
                        cred.last_used
                            .store(old.last_used.load(Ordering::Relaxed), Ordering::Relaxed);
                        creds.push(Arc::new(cred));
                    }
                    None => creds.push(Arc::new(cred)),
                }
            }
        }
        if changed {
            stored.save(&self.store)?;
        }
        for c in &creds {
            c.refresh();
        }
        // Case-insensitive: a placeholder with its case changed (a DNS name is lowercased) is
        // still found as a leak; only the exact one is swapped.
        let finder = if creds.is_empty() {
            None
        } else {
            AhoCorasick::builder()
                .ascii_case_insensitive(true)
                .build(creds.iter().map(|c| c.placeholder.as_bytes()))
                .ok()
        };
        let patterns = scan::Patterns::new(
            creds
                .iter()
                .map(|c| c.placeholder.as_bytes().to_vec())
                .collect(),
        )
        .map(Arc::new);
        self.table.store(Arc::new(Table {
            creds,
            finder,
            patterns,
        }));
        Ok(())
    }

    fn credential(&self, agent: &str, c: &CredentialConfig, placeholder: String) -> Credential {
        let source = match (&c.secret_file, &c.systemd_credential) {
            (Some(p), _) => p.clone(),
            (None, Some(name)) => self
                .systemd_dir
                .as_ref()
                .map_or_else(|| PathBuf::from("$CREDENTIALS_DIRECTORY"), Clone::clone)
                .join(name),
            (None, None) => PathBuf::new(),
        };
        Credential {
            agent: agent.to_owned(),
            name: c.name.clone(),
            env: c.env.clone(),
            // Validated with the config.
            hosts: c
                .hosts
                .iter()
                .filter_map(|h| HostPattern::parse(h).ok())
                .collect(),
            binaries: c.binaries.clone(),
            placeholder_bytes: Arc::from(placeholder.as_bytes()),
            placeholder,
            source,
            secret: ArcSwap::new(Arc::new(SecretState::Unavailable("not read yet".into()))),
            binary_ids: ArcSwap::default(),
            last_used: AtomicI64::new(0),
        }
    }

    /// Re-reads every secret file and re-resolves every `binaries` path (a rotation applies
    /// from the next request).
    pub fn refresh(&self) {
        for c in &self.table.load().creds {
            c.refresh();
        }
    }

    /// Every credential.
    pub fn all(&self) -> Vec<Arc<Credential>> {
        self.table.load().creds.clone()
    }

    /// The directories holding secret files, to watch.
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self
            .all()
            .iter()
            .filter_map(|c| c.source.parent().map(Path::to_path_buf))
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// `VAR=placeholder` for each credential of `agent`.
    pub fn env_of(&self, agent: &str) -> Vec<(String, String)> {
        self.all()
            .iter()
            .filter(|c| c.agent == agent)
            .map(|c| (c.env.clone(), c.placeholder.clone()))
            .collect()
    }

    /// What `agent`'s credentials ask of its TLS to `host`: bound hosts must be intercepted
    /// to swap secrets in; an agent with credentials is intercepted everywhere TLS may be
    /// decrypted, so a placeholder cannot leave unseen.
    pub fn inspect(&self, agent: &str, host: &str) -> crate::proxy::tls::Inspect {
        use crate::proxy::tls::Inspect;
        let table = self.table.load();
        let mut mine = table.creds.iter().filter(|c| c.agent == agent).peekable();
        if mine.peek().is_none() {
            return Inspect::No;
        }
        if mine.any(|c| c.hosts.iter().any(|h| h.matches(host))) {
            Inspect::Bound
        } else {
            Inspect::Leaks
        }
    }

    pub fn is_empty(&self) -> bool {
        self.table.load().creds.is_empty()
    }

    /// Is `text` carrying a placeholder? The credential, for a DNS name.
    pub fn placeholder_in(&self, text: &[u8]) -> Option<Arc<Credential>> {
        let table = self.table.load();
        let m = table.finder.as_ref()?.find(text)?;
        table.creds.get(m.pattern().as_usize()).cloned()
    }

    /// May `caller` send credential `c` to `host`? `Err(refusal)` when not.
    fn judge(c: &Credential, caller: &Caller, host: &str) -> Result<Arc<Secret>, Refusal> {
        let leak = |reason: String| Refusal::Leak {
            credential: c.name.clone(),
            reason,
        };
        if c.agent != caller.agent.name {
            return Err(leak(format!(
                "credential '{}' belongs to another agent and is never sent for this one",
                c.name
            )));
        }
        if !c.hosts.iter().any(|h| h.matches(host)) {
            return Err(leak(format!(
                "credential '{}' may only be sent to {}",
                c.name,
                c.hosts_text()
            )));
        }
        if !c.binaries.is_empty() {
            let ids = c.binary_ids.load();
            // No identity from the kernel: fail closed.
            let ok = caller.exe.as_ref().is_some_and(|exe| ids.contains(&exe.id));
            if !ok {
                let list: Vec<String> =
                    c.binaries.iter().map(|b| b.display().to_string()).collect();
                let by = caller.exe.as_ref().map_or_else(
                    || "an executable the kernel did not name".to_owned(),
                    |e| e.display(),
                );
                return Err(leak(format!(
                    "credential '{}' may only be sent by {}; this connection was made by {by}",
                    c.name,
                    list.join(", ")
                )));
            }
        }
        match &**c.secret.load() {
            SecretState::Available(s) => Ok(s.clone()),
            SecretState::Unavailable(why) => Err(Refusal::Unavailable {
                credential: c.name.clone(),
                reason: format!("credential '{}' is unavailable: {why}", c.name),
            }),
        }
    }

    /// Swaps placeholders for secrets in `headers` and in the query of `path_and_query`
    /// (rewritten in place) for a request of `caller` to `host` (canonical). `Err` when the
    /// request carries a placeholder that may not go there, in its headers or anywhere in
    /// its (percent-decoded) target.
    pub fn inject(
        &self,
        caller: &Caller,
        host: &str,
        headers: &mut HeaderMap,
        path_and_query: &mut String,
    ) -> Result<Injection, Refusal> {
        let table = self.table.load();
        let mut injection = Injection {
            masks: Vec::new(),
            used: Vec::new(),
        };
        let Some(finder) = table.finder.as_ref() else {
            return Ok(injection);
        };
        // Which credentials this request carries, judged once each.
        let mut judged: Vec<(usize, Arc<Secret>)> = Vec::new();
        let mut judge = |i: usize| -> Result<(), Refusal> {
            if judged.iter().any(|(j, _)| *j == i) {
                return Ok(());
            }
            let secret = Self::judge(&table.creds[i], caller, host)?;
            judged.push((i, secret));
            Ok(())
        };
        // 1. Find them all first: a refusal must come before anything is rewritten.
        for value in headers.values() {
            let bytes = value.as_bytes();
            for m in finder.find_iter(bytes) {
                judge(m.pattern().as_usize())?;
            }
            if let Some(decoded) = basic_decoded(bytes) {
                for m in finder.find_iter(&decoded[..]) {
                    judge(m.pattern().as_usize())?;
                }
            }
        }
        let decoded_target =
            percent_encoding::percent_decode(path_and_query.as_bytes()).collect::<Vec<u8>>();
        for m in finder.find_iter(&decoded_target) {
            judge(m.pattern().as_usize())?;
        }
        if judged.is_empty() {
            return Ok(injection);
        }
        // 2. Swap: every credential found may go here.
        let swap = scan::Replacer::new(
            judged
                .iter()
                .map(|(i, secret)| {
                    (
                        scan::Piece::Plain(table.creds[*i].placeholder_bytes.clone()),
                        scan::Piece::Secret(secret.clone()),
                    )
                })
                .collect(),
        )
        .expect("placeholders are never empty");
        for value in headers.values_mut() {
            let mut replaced = swap.replace_all(value.as_bytes());
            if replaced.is_none()
                && let Some(decoded) = basic_decoded(value.as_bytes())
                && let Some(swapped) = swap.replace_all(&decoded)
            {
                use base64::Engine as _;
                let swapped = zeroize::Zeroizing::new(swapped);
                let raw = value.as_bytes();
                let mut v = raw[..raw.len() - trimmed_basic(raw).len()].to_vec();
                v.extend_from_slice(
                    base64::engine::general_purpose::STANDARD
                        .encode(&swapped[..])
                        .as_bytes(),
                );
                replaced = Some(v);
            }
            if let Some(bytes) = replaced {
                // Validated at read: no control characters, so this cannot fail.
                if let Ok(mut v) = HeaderValue::from_bytes(&bytes) {
                    // Never indexed by HPACK: a secret stays out of compression tables.
                    v.set_sensitive(true);
                    *value = v;
                }
            }
        }
        if let Some((path, query)) = path_and_query.split_once('?') {
            let mut q = query.to_owned();
            for (i, secret) in &judged {
                let placeholder = &table.creds[*i].placeholder;
                if q.contains(placeholder.as_str()) {
                    let encoded = zeroize::Zeroizing::new(
                        percent_encoding::percent_encode(secret.expose_secret(), QUERY_VALUE)
                            .to_string(),
                    );
                    q = q.replace(placeholder.as_str(), &encoded);
                }
            }
            if q != query {
                *path_and_query = format!("{path}?{q}");
            }
        }
        let now = jiff::Timestamp::now().as_second();
        for (i, secret) in judged {
            let c = &table.creds[i];
            c.last_used.store(now, Ordering::Relaxed);
            injection.masks.push((secret, c.placeholder_bytes.clone()));
            injection.used.push(c.name.clone());
        }
        // Secrets in the response are only readable by the agent if not compressed.
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        Ok(injection)
    }

    /// A watch for the request body of `caller` to `host`. `None` when there is no
    /// credential at all.
    pub fn body_watch(&self, caller: &Caller, host: &str) -> Option<BodyWatch> {
        let table = self.table.load_full();
        let patterns = table.patterns.clone()?;
        Some(BodyWatch {
            finder: scan::Finder::new(patterns),
            table,
            caller: caller.clone(),
            host: host.to_owned(),
        })
    }
}

/// Characters escaped in a query value: everything but unreserved ones.
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The base64 part of a `Basic` credential value (after the scheme and spaces).
fn trimmed_basic(value: &[u8]) -> &[u8] {
    let Some(rest) = value
        .get(..6)
        .filter(|s| s.eq_ignore_ascii_case(b"basic "))
        .map(|_| &value[6..])
    else {
        return &[];
    };
    let start = rest.iter().position(|&b| b != b' ').unwrap_or(rest.len());
    &rest[start..]
}

/// `Basic base64(user:password)` decoded, for a value that is one.
fn basic_decoded(value: &[u8]) -> Option<zeroize::Zeroizing<Vec<u8>>> {
    use base64::Engine as _;
    let b64 = trimmed_basic(value);
    if b64.is_empty() {
        return None;
    }
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()
        .map(zeroize::Zeroizing::new)
}

/// Watches secret files: a rotated secret applies from the next request. inotify on their
/// directories (editors and `install` replace files), and a re-read every 5 s in case an
/// event is missed.
pub async fn watch(vault: Arc<Vault>) {
    use notify::Watcher as _;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
        let _ = tx.try_send(());
    })
    .ok();
    let mut watched = Vec::new();
    let mut rewatch = |watcher: &mut Option<notify::RecommendedWatcher>| {
        let Some(w) = watcher.as_mut() else {
            return;
        };
        for dir in vault.watched_dirs() {
            if !watched.contains(&dir) && w.watch(&dir, notify::RecursiveMode::NonRecursive).is_ok()
            {
                watched.push(dir);
            }
        }
    };
    rewatch(&mut watcher);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = rx.recv() => {}
            _ = tick.tick() => {}
        }
        vault.refresh();
        rewatch(&mut watcher);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_match_exact_names_subdomains_and_addresses() {
        let exact = HostPattern::parse("API.OpenAI.com").unwrap();
        assert!(exact.matches("api.openai.com"));
        assert!(!exact.matches("evil.api.openai.com"));
        let sub = HostPattern::parse("*.example.com").unwrap();
        assert!(sub.matches("a.b.example.com"));
        assert!(!sub.matches("example.com"));
        assert!(!sub.matches("badexample.com"));
        let ip = HostPattern::parse("[::ffff:127.0.0.9]").unwrap();
        assert!(ip.matches("127.0.0.9"));
        assert!(sub.overlaps(&HostPattern::parse("x.example.com").unwrap()));
        assert!(sub.overlaps(&HostPattern::parse("*.a.example.com").unwrap()));
        assert!(!sub.overlaps(&exact));
        assert!(HostPattern::parse("bad host").is_err());
    }

    #[test]
    fn basic_credentials_are_found_and_rebuilt() {
        use base64::Engine as _;
        let v = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("user:ph123")
        );
        assert_eq!(&basic_decoded(v.as_bytes()).unwrap()[..], b"user:ph123");
        assert!(basic_decoded(b"Bearer abc").is_none());
        assert_eq!(trimmed_basic(b"basic   dXNlcg=="), b"dXNlcg==");
    }

    fn caller(agent: &str) -> Caller {
        let policy = crate::policy::Policy::from_yaml(b"rules: []\n", "t").unwrap();
        Caller {
            agent: Arc::new(crate::agents::Agent::new(
                agent.into(),
                1,
                crate::agents::Origin::Configured,
                PathBuf::from("t.yaml"),
                PathBuf::from("/"),
                Arc::new(policy),
            )),
            pid: 1,
            comm: Arc::from("t"),
            exe: None,
        }
    }

    fn vault(dir: &Path, extra: &str) -> (Vault, Config) {
        use std::os::unix::fs::PermissionsExt as _;
        let secret = dir.join("k");
        std::fs::write(&secret, "s3cr/t+v\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = format!(
            "state_dir: {}\nagents:\n  - name: a\n    policy: a.yaml\n    credentials:\n      \
             - name: k\n        secret_file: k\n        env: K\n        hosts: [api.test]\n\
             {extra}  - name: b\n    policy: b.yaml\n",
            dir.display()
        );
        let config = Config::parse(&text, &dir.join("c.yaml"), dir).unwrap();
        (Vault::new(&config).unwrap(), config)
    }

    #[test]
    fn placeholders_become_secrets_only_for_their_agent_and_host_and_survive_restarts() {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        let (v, config) = vault(dir.path(), "");
        let ph = v.env_of("a")[0].1.clone();
        assert_eq!(ph.len(), 32);
        let mut headers = HeaderMap::new();
        headers.insert("authorization", format!("Bearer {ph}").parse().unwrap());
        let b64 = base64::engine::general_purpose::STANDARD;
        headers.insert(
            "proxy-authorization",
            format!("Basic {}", b64.encode(format!("u:{ph}")))
                .parse()
                .unwrap(),
        );
        let mut target = format!("/v1?key={ph}&x=1");
        let i = v
            .inject(&caller("a"), "api.test", &mut headers, &mut target)
            .unwrap();
        assert_eq!(i.used, vec!["k".to_owned()]);
        assert_eq!(headers["authorization"], "Bearer s3cr/t+v");
        assert!(headers["authorization"].is_sensitive());
        assert_eq!(
            headers["proxy-authorization"],
            format!("Basic {}", b64.encode("u:s3cr/t+v")).as_str()
        );
        assert_eq!(target, "/v1?key=s3cr%2Ft%2Bv&x=1");
        let mut masker = i.masker().unwrap();
        assert_eq!(
            &masker.push(&bytes::Bytes::from_static(b"echo s3cr/t+v"))[..],
            format!("echo {ph}").as_bytes()
        );
        // Elsewhere: refused, nothing rewritten.
        for (who, host, why) in [
            ("b", "api.test", "belongs to another agent"),
            ("a", "paste.test", "may only be sent to api.test"),
        ] {
            let mut h = HeaderMap::new();
            h.insert("x-api-key", ph.parse().unwrap());
            let mut t = "/".to_owned();
            let e = v.inject(&caller(who), host, &mut h, &mut t).err().unwrap();
            assert!(
                matches!(e, Refusal::Leak { .. }) && e.reason().contains(why),
                "{e:?}"
            );
            assert_eq!(h["x-api-key"], ph.as_str());
        }
        // Percent-encoded in the target, or in another case: still found.
        let mut t = format!("/x?q=%{:02x}{}", ph.as_bytes()[0], &ph[1..]);
        let e = v.inject(&caller("a"), "paste.test", &mut HeaderMap::new(), &mut t);
        assert!(e.is_err());
        let mut h = HeaderMap::new();
        h.insert("x-note", ph.to_ascii_uppercase().parse().unwrap());
        assert!(
            v.inject(&caller("a"), "paste.test", &mut h, &mut "/".to_owned())
                .is_err()
        );
        // The body of a request to another host.
        let mut w = v.body_watch(&caller("a"), "paste.test").unwrap();
        assert!(w.push(&ph.as_bytes()[..10]).is_none());
        assert!(w.push(&ph.as_bytes()[10..]).is_some());
        let mut w = v.body_watch(&caller("a"), "api.test").unwrap();
        assert!(w.push(ph.as_bytes()).is_none());
        // A restart keeps the placeholder; a missing file makes the credential unavailable.
        let again = Vault::new(&config).unwrap();
        assert_eq!(again.env_of("a")[0].1, ph);
        std::fs::remove_file(dir.path().join("k")).unwrap();
        again.refresh();
        let mut h = HeaderMap::new();
        h.insert("x-api-key", ph.parse().unwrap());
        let e = again.inject(&caller("a"), "api.test", &mut h, &mut "/".to_owned());
        assert!(
            matches!(e, Err(Refusal::Unavailable { .. })),
            "{:?}",
            e.err()
        );
    }

    #[test]
    fn bound_hosts_must_not_be_passed_through_and_sni_mode_cannot_inject() {
        let dir = tempfile::tempdir().unwrap();
        let text = |tls: &str| {
            format!(
                "{tls}agents:\n  - name: a\n    policy: a.yaml\n    credentials:\n      \
                 - name: k\n        secret_file: /k\n        env: K\n        hosts: [api.openai.com]\n"
            )
        };
        let parse = |t: &str| Config::parse(t, &dir.path().join("c.yaml"), dir.path());
        assert!(parse(&text("")).is_ok());
        let e = parse(&text("tls:\n  passthrough_hosts: [\"*.openai.com\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("passthrough_hosts"), "{e}");
        let e = parse(&text("tls:\n  mode: sni\n")).unwrap_err().to_string();
        assert!(e.contains("tls.mode is sni"), "{e}");
    }

    #[test]
    fn unsafe_secret_files_are_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, "sk-real\n").unwrap();
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = read_secret(&good).unwrap();
        assert_eq!(s.expose_secret(), b"sk-real");
        let open = dir.path().join("open");
        std::fs::write(&open, "sk-real").unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_secret(&open).unwrap_err();
        assert!(e.contains("chmod 600") && !e.contains("sk-real"), "{e}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        assert!(read_secret(&link).unwrap_err().contains("symlink"));
        let two = dir.path().join("two");
        std::fs::write(&two, "a\nb").unwrap();
        std::fs::set_permissions(&two, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_secret(&two).unwrap_err().contains("line break"));
    }
}
