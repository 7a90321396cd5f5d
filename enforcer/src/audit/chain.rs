//! The record format and the hash chain: how a line is built, hashed, signed and read back.
//!
//! A record is one JSON object on one line, keys in this order: `seq`, `timestamp`, `event`,
//! the event's fields, then for checkpoints `head_hash`, `key_id`, `signature`, and last
//! `prev_hash`. Verification hashes the raw bytes of each line, so it never depends on how
//! the JSON is laid out; only the fields named here are read back.

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::event::{AuditEvent, EventKind};

/// `prev_hash` of the first record ever.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The first `seq` of a new chain.
pub const FIRST_SEQ: u64 = 1;

/// Lowercase hex SHA-256 of one line, without its newline.
pub fn line_hash(line: &[u8]) -> String {
    let mut hex = [0u8; 64];
    // 32 bytes always fit 64 hex digits, and hex digits are ASCII.
    hex::encode_to_slice(Sha256::digest(line), &mut hex).expect("64 hex digits");
    std::str::from_utf8(&hex).expect("hex is ASCII").to_owned()
}

/// The exact bytes a checkpoint signs: `enforcer-audit-v1:{seq}:{head_hash}`, where `seq` is
/// the checkpoint's own `seq` and `head_hash` the hash of the record just before it.
pub fn checkpoint_message(seq: u64, head_hash: &str) -> String {
    format!("enforcer-audit-v1:{seq}:{head_hash}")
}

/// The `key_id` of a public key: the first 16 hex digits of SHA-256 over its raw 32 bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    hex::encode(&digest[..8])
}

/// Now, as RFC 3339 UTC with milliseconds: `2026-03-14T02:14:37.512Z`.
pub fn timestamp_now() -> String {
    format_timestamp(jiff::Timestamp::now())
}

fn format_timestamp(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// [`timestamp_now`] for a busy writer: the text is formatted once per millisecond.
#[derive(Debug, Default)]
pub struct Clock {
    millis: i64,
    text: String,
}

impl Clock {
    pub fn now(&mut self) -> &str {
        let now = jiff::Timestamp::now();
        let millis = now.as_millisecond();
        if self.text.is_empty() || millis != self.millis {
            self.millis = millis;
            self.text = format_timestamp(now);
        }
        &self.text
    }
}

/// The fields only a checkpoint has.
#[derive(Debug, Clone, Serialize)]
struct CheckpointFields<'a> {
    head_hash: &'a str,
    key_id: &'a str,
    signature: &'a str,
}

#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    timestamp: &'a str,
    #[serde(flatten)]
    event: &'a AuditEvent,
    #[serde(flatten)]
    checkpoint: Option<CheckpointFields<'a>>,
    prev_hash: &'a str,
}

/// One event as a line (no newline).
#[cfg(test)]
pub fn render_event(seq: u64, timestamp: &str, event: &AuditEvent, prev_hash: &str) -> Vec<u8> {
    render(&Line {
        seq,
        timestamp,
        event,
        checkpoint: None,
        prev_hash,
    })
}

/// A signed checkpoint as a line (no newline). `head_hash` is the hash of the record before
/// it, which is also its `prev_hash`.
pub fn render_checkpoint(
    seq: u64,
    timestamp: &str,
    head_hash: &str,
    key: &SigningKey,
    key_id: &str,
) -> Vec<u8> {
    let signature = key.sign(checkpoint_message(seq, head_hash).as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(signature.to_bytes());
    let event = AuditEvent::new(EventKind::Checkpoint);
    render(&Line {
        seq,
        timestamp,
        event: &event,
        checkpoint: Some(CheckpointFields {
            head_hash,
            key_id,
            signature: &signature,
        }),
        prev_hash: head_hash,
    })
}

/// [`render_event`], appended to `buf`.
pub fn render_event_into(
    buf: &mut Vec<u8>,
    seq: u64,
    timestamp: &str,
    event: &AuditEvent,
    prev_hash: &str,
) {
    render_into(
        buf,
        &Line {
            seq,
            timestamp,
            event,
            checkpoint: None,
            prev_hash,
        },
    );
}

fn render(line: &Line<'_>) -> Vec<u8> {
    let mut buf = Vec::with_capacity(512);
    render_into(&mut buf, line);
    buf
}

fn render_into(buf: &mut Vec<u8>, line: &Line<'_>) {
    // Serializing plain strings, integers and unit enums into a Vec cannot fail.
    serde_json::to_writer(buf, line).expect("an audit record always serializes");
}

/// The fields verification and recovery read back from a line.
#[derive(Debug, Deserialize)]
pub struct RecordView {
    pub seq: u64,
    pub event: String,
    pub prev_hash: String,
    #[serde(default)]
    pub head_hash: Option<String>,
    #[serde(default)]
    pub key_id: Option<String>,
    #[serde(default)]
    pub signature: Option<String>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub first_seq: Option<u64>,
    #[serde(default)]
    pub last_seq: Option<u64>,
}

impl RecordView {
    pub fn parse(line: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(line)
    }

    pub fn is_checkpoint(&self) -> bool {
        self.event == EventKind::Checkpoint.as_str()
    }

    /// A `daemon` record saying which records it found unsealed at open.
    pub fn unsealed_range(&self) -> Option<(Option<u64>, Option<u64>)> {
        (self.event == EventKind::Daemon.as_str() && self.action.as_deref() == Some("unsealed"))
            .then_some((self.first_seq, self.last_seq))
    }
}

/// Why a checkpoint's signature does not check.
#[derive(Debug, PartialEq, Eq)]
pub enum SignatureProblem {
    NotBase64,
    BadSignature,
}

/// Checks a checkpoint's signature over its `seq` and `head_hash`.
pub fn check_signature(
    seq: u64,
    head_hash: &str,
    signature_b64: &str,
    key: &VerifyingKey,
) -> Result<(), SignatureProblem> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(signature_b64)
        .map_err(|_| SignatureProblem::NotBase64)?;
    let raw: [u8; 64] = raw.try_into().map_err(|_| SignatureProblem::NotBase64)?;
    let signature = Signature::from_bytes(&raw);
    key.verify_strict(checkpoint_message(seq, head_hash).as_bytes(), &signature)
        .map_err(|_| SignatureProblem::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::PolicyResult;

    #[test]
    fn record_layout_is_seq_timestamp_event_fields_prev_hash() {
        let ev = AuditEvent::new(EventKind::Request)
            .agent_id("demo")
            .policy_result(PolicyResult::Allow);
        let line = render_event(7, "2026-03-14T02:14:37.512Z", &ev, GENESIS_HASH);
        let text = String::from_utf8(line).unwrap();
        assert_eq!(
            text,
            format!(
                r#"{{"seq":7,"timestamp":"2026-03-14T02:14:37.512Z","event":"request","agent_id":"demo","policy_result":"allow","prev_hash":"{GENESIS_HASH}"}}"#
            )
        );
    }

    #[test]
    fn control_characters_in_fields_cannot_break_the_line() {
        let ev = AuditEvent::new(EventKind::Request).reason("a\nb\r\u{0}c\u{2028}");
        let line = render_event(1, "t", &ev, GENESIS_HASH);
        assert!(!line.contains(&b'\n') && !line.contains(&b'\r'));
        let back: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(back["reason"], "a\nb\r\u{0}c\u{2028}");
    }

    #[test]
    fn checkpoint_signs_seq_and_head_and_reads_back() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let vk = key.verifying_key();
        let head = line_hash(b"previous");
        let line = render_checkpoint(9, "2026-03-14T02:14:37.512Z", &head, &key, &key_id(&vk));
        let view = RecordView::parse(&line).unwrap();
        assert!(view.is_checkpoint());
        assert_eq!(view.seq, 9);
        assert_eq!(view.prev_hash, head);
        assert_eq!(view.head_hash.as_deref(), Some(head.as_str()));
        let sig = view.signature.unwrap();
        assert_eq!(check_signature(9, &head, &sig, &vk), Ok(()));
        assert_eq!(
            check_signature(10, &head, &sig, &vk),
            Err(SignatureProblem::BadSignature)
        );
    }

    #[test]
    fn line_hash_is_lowercase_hex_sha256() {
        assert_eq!(
            line_hash(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn clock_matches_timestamp_format() {
        let mut clock = Clock::default();
        let a = clock.now().to_owned();
        assert_eq!(a.len(), "2026-03-14T02:14:37.512Z".len(), "{a}");
        std::thread::sleep(std::time::Duration::from_millis(3));
        let b = clock.now().to_owned();
        assert!(b > a, "{a} then {b}");
    }

    #[test]
    fn timestamp_has_milliseconds_and_z() {
        let ts = timestamp_now();
        assert_eq!(ts.len(), "2026-03-14T02:14:37.512Z".len(), "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[19] == b'.', "{ts}");
    }
}
