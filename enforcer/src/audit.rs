//! The audit log: every decision, one JSON line each, hash-chained and signed.
//!
//! # Format
//! JSON Lines at `audit_log`. Each record is one object on one line, in this key order:
//! `seq`, `timestamp` (RFC 3339 UTC with milliseconds), `event`, the event's fields (see
//! [`AuditEvent`]; absent fields are left out), and last `prev_hash`.
//!
//! # Chain
//! `prev_hash` is the lowercase hex SHA-256 of the previous record's line without its
//! newline. The first record ever has `seq` 1 and links to 64 zeros. Every record takes the
//! next `seq`, checkpoints included. The first record of a rotated-to file links to the last
//! record of the file before it, and a restarted daemon continues the chain of the file it
//! finds.
//!
//! # Checkpoints
//! A `checkpoint` record carries `head_hash` (the hash of the record just before it, so also
//! its `prev_hash`), `key_id` (first 16 hex digits of SHA-256 over the raw public key) and
//! `signature`: standard base64 of the 64-byte Ed25519 signature over the ASCII string
//! `enforcer-audit-v1:{seq}:{head_hash}`, where `seq` is the checkpoint's own `seq`. One is
//! written after every `audit_checkpoint_records` records, within `checkpoint_interval`
//! (1 s) of any record left unsealed, before each rotation and at close. The file is fsynced
//! after every checkpoint.
//!
//! # Rotation
//! When the live file reaches `audit_rotate_bytes`, a checkpoint is written, and the file is
//! renamed to `<audit_log>.<first seq, 20 digits>` (for example
//! `audit.jsonl.00000000000000000001`), so the shell's sorted glob lists rotated files
//! oldest first: `enforcer audit verify audit.jsonl.* audit.jsonl` checks the whole chain.
//! A rotated file always ends with a checkpoint. `audit_rotate_bytes: 0` disables rotation.
//!
//! # Torn records
//! A crash can leave a partial final record (bytes after the last newline, or trailing lines
//! that are not records, such as the zero-filled block a crash can leave). [`AuditLog::open`]
//! moves those bytes to `<audit_log>-torn-<unix ms>` (the evidence is kept, fsynced), cuts
//! them from the live file, and writes a `daemon` record with `action: sealed` whose
//! `reason` says how many bytes were sealed, after which `seq`, and where they went. The
//! chain stays verifiable.
//!
//! # Failure
//! When a write or fsync fails (disk full, EIO), the partial bytes are cut off, the log turns
//! unhealthy and [`AuditLog::record`] returns [`AuditError::Failing`], so strict mode can
//! deny. The writer retries every 250 ms; on success it writes a `daemon` record with
//! `action: resumed` saying how long it failed and how many records were refused.
//!
//! # Layout
//! - `event`: [`AuditEvent`] and its enums, and the scrubbing of secrets.
//! - `chain`: record lines, hashing, checkpoint signing.
//! - `key`: the Ed25519 key file.
//! - `recover`: opening the live file, sealing a torn tail, finding the chain head.
//! - `writer`: [`AuditLog`] and its writer thread.
//! - `aggregate`: [`KernelDenyAggregator`].
//! - `fold`: [`Folder`], folding repeated denials under a per-agent budget.
//! - `decisions`: [`Decisions`], recording a decision under `security_mode`.
//! - `verify`: [`verify`], used by `enforcer audit verify`.

use std::{path::PathBuf, time::Duration};

mod aggregate;
mod chain;
mod decisions;
mod event;
mod fold;
mod key;
mod recover;
mod verify;
mod writer;

pub use aggregate::{KernelDenyAggregator, MAX_DESTINATIONS_PER_WINDOW};
pub use chain::{FIRST_SEQ, GENESIS_HASH, checkpoint_message, key_id, line_hash, timestamp_now};
pub use decisions::Decisions;
pub use event::{
    Action, AuditEvent, EventKind, MAX_FIELD_BYTES, MAX_HEADER_NAMES, PolicyResult, Scope,
    TRUNCATED_MARK, path_without_query,
};
pub use fold::Folder;
pub use key::{
    generate_key_file, load_public_half, load_signing_key, parse_public_key, public_key_base64,
};
pub use recover::{rotated_file_name, rotated_files, torn_file_prefix};
pub use verify::{
    Anchor, FailureKind, UnsealedRange, VerifyFailure, VerifyOptions, VerifySummary, verify,
    verify_with,
};
pub use writer::{AuditLog, AuditStats};

/// How [`AuditLog::open`] sets up the log.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// The live file (config `audit_log`).
    pub path: PathBuf,
    /// The signing key (config `audit_key`, default `<state_dir>/audit.key`).
    pub key_path: PathBuf,
    /// Rotate at this many bytes (config `audit_rotate_bytes`); 0 never rotates.
    pub rotate_bytes: u64,
    /// Checkpoint after this many records (config `audit_checkpoint_records`); 0 leaves
    /// only the time-based checkpoints.
    pub checkpoint_records: u64,
    /// Checkpoint at least this often while records are unsealed. Default 1 s.
    pub checkpoint_interval: Duration,
    /// Keep the rotated files within this many bytes, removing the oldest (config
    /// `audit_max_bytes`); 0 keeps them all.
    pub max_bytes: u64,
    /// Denial records per agent per minute written one by one (config
    /// `audit_agent_budget`); 0: no budget. See [`Folder`].
    pub agent_budget: u64,
}

impl AuditOptions {
    /// The options the daemon's configuration asks for.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            path: config.audit_log.clone(),
            key_path: config.audit_key_path(),
            rotate_bytes: config.audit_rotate_bytes,
            checkpoint_records: config.audit_checkpoint_records,
            checkpoint_interval: Duration::from_secs(1),
            max_bytes: config.audit_max_bytes,
            agent_budget: config.audit_agent_budget,
        }
    }
}

/// Checks, changing nothing, that the daemon's signing key is usable when it exists (a
/// missing one is created at start).
pub fn check_daemon_key(config: &crate::config::Config) -> Result<(), AuditError> {
    let path = config.audit_key_path();
    if path.exists() {
        load_signing_key(&path)?;
    }
    Ok(())
}

/// Opens the daemon's audit log. A first start creates the signing key, like an sshd host
/// key, and logs its public half for the operator to keep for `enforcer audit verify`.
pub fn open_daemon_log(config: &crate::config::Config) -> Result<AuditLog, AuditError> {
    let opts = AuditOptions::from_config(config);
    if !opts.key_path.exists() {
        let public = generate_key_file(&opts.key_path)?;
        tracing::warn!(
            key = %opts.key_path.display(),
            public_key = %public_key_base64(&public),
            "created a new audit signing key; keep the public key to verify the log"
        );
    }
    if let Some(dir) = opts.path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| AuditError::Open {
            path: dir.to_owned(),
            source,
        })?;
    }
    AuditLog::open(opts)
}

/// Logs for in-process tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::{path::Path, time::Duration};

    use super::{AuditLog, AuditOptions, generate_key_file};

    /// A log in `dir` with a fresh key, no rotation, and checkpoints only at close.
    pub fn open(dir: &Path) -> AuditLog {
        let key = dir.join("audit.key");
        generate_key_file(&key).unwrap();
        AuditLog::open(AuditOptions {
            path: dir.join("audit.jsonl"),
            key_path: key,
            rotate_bytes: 0,
            checkpoint_records: 0,
            checkpoint_interval: Duration::from_secs(3600),
            max_bytes: 0,
            agent_budget: 0,
        })
        .unwrap()
    }

    /// Every record `open(dir)`'s log holds so far.
    pub async fn records(log: &AuditLog, dir: &Path) -> Vec<serde_json::Value> {
        let log = log.clone();
        tokio::task::spawn_blocking(move || log.flush())
            .await
            .unwrap()
            .unwrap();
        std::fs::read_to_string(dir.join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit key {path} does not exist; create it with `enforcer keygen`")]
    KeyMissing { path: PathBuf },
    #[error(
        "audit key {path} has mode {mode:04o}, readable by group or others; run `chmod 600 {path}` \
         (and consider the key exposed: `enforcer keygen` a new one if others could read it)"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error(
        "audit key {path} is owned by uid {owner}, but enforcer runs as uid {euid}; \
         `chown` it to the daemon's user"
    )]
    KeyOwner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error("cannot read audit key {path}: {io}", io = crate::sys::io_text(source))]
    KeyRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit key {path}: {message}; create a new key with `enforcer keygen`")]
    KeyFormat { path: PathBuf, message: String },
    #[error(
        "audit key {path} already exists; keygen never overwrites a key. Move it aside first \
         if you mean to replace it (checkpoints signed by the old key then need its public key \
         to verify)"
    )]
    KeyExists { path: PathBuf },
    #[error("cannot write audit key {path}: {io}", io = crate::sys::io_text(source))]
    KeyWrite {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot open audit log {path}: {io}; check that its directory exists or can be \
         created, and is writable by the daemon", io = crate::sys::io_text(source))]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "audit log {path} is locked by another process; is another enforcer daemon running \
         with the same audit_log?"
    )]
    Locked { path: PathBuf },
    #[error("audit log {path}: {message}")]
    Recover { path: PathBuf, message: String },
    #[error("cannot start the audit writer thread: {0}")]
    Spawn(std::io::Error),
    #[error(
        "audit log is failing ({reason}); records are refused until writes succeed again: \
         check free space and errors on the log's filesystem"
    )]
    Failing { reason: String },
    #[error(
        "audit log writer is {capacity} records behind; record refused (is the log's disk \
         stalled?)"
    )]
    Backlog { capacity: usize },
    #[error("audit log is closed")]
    Closed,
    #[error("checkpoint records are written by the audit log itself, not by callers")]
    Reserved,
}
