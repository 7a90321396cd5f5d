//! Checking a log: the chain, the `seq` order and every checkpoint signature, across rotated
//! files given oldest first.
//!
//! # What can be detected
//! - Any edit, deletion, insertion or reordering of records before the last record: `seq`
//!   must go up by one per line and each `prev_hash` must be the hash of the line before.
//! - A forged or altered checkpoint, and a checkpoint signed by another key.
//! - A file that ends mid-record (a truncated file, or a torn write not yet sealed).
//! - A chain that does not start at seq 1 with 64 zeros (its start was cut), unless
//!   [`VerifyOptions::allow_partial`] says older files were removed on purpose.
//! - A missing or truncated file between two given files (the link across them breaks).
//!
//! # Records found unsealed
//! Records that followed the last checkpoint when a daemon started (after a crash, or added
//! while it was stopped) are named by that daemon in an `unsealed` record, and the checkpoint
//! after it signs the chain through them without vouching for their content. They are
//! reported in [`VerifySummary::unsealed`]; the CLI fails on them unless told to accept them.
//!
//! # What cannot, without an external anchor
//! Whole records removed from the end of the last file, or edits to the records after the
//! last checkpoint, leave a chain that is valid as far as it goes: nothing later vouches for
//! them. The summary therefore reports the unsealed tail (records after the last checkpoint)
//! and the head hash. A clean shutdown ends the log with a checkpoint. To detect cutting at
//! the end, keep the head (`seq` and hash from `enforcer status`, or a copy of a checkpoint
//! line shipped elsewhere) and pass it as [`VerifyOptions::anchor`]: verification then fails
//! if that record is missing or different.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
};

use ed25519_dalek::VerifyingKey;

use super::chain::{
    FIRST_SEQ, GENESIS_HASH, RecordView, SignatureProblem, check_signature, key_id, line_hash,
};

/// Longest line read; a record is a few KiB at most, so anything longer is not one.
const MAX_LINE_BYTES: usize = 1 << 20;

/// A record known from elsewhere: `seq` and the hash of its line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub seq: u64,
    pub hash: String,
}

impl std::str::FromStr for Anchor {
    type Err = String;

    /// `SEQ:HASH`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (seq, hash) = s
            .split_once(':')
            .ok_or_else(|| format!("anchor '{s}' is not SEQ:HASH"))?;
        let seq = seq
            .trim()
            .parse()
            .map_err(|_| format!("anchor '{s}': '{seq}' is not a seq number"))?;
        let hash = hash.trim().to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "anchor '{s}': the hash must be 64 hex digits (a record's SHA-256)"
            ));
        }
        Ok(Self { seq, hash })
    }
}

/// How strict [`verify_with`] is.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Accept a chain whose first given record is not seq 1 (older rotated files removed on
    /// purpose). Its first record is then taken on trust.
    pub allow_partial: bool,
    /// A record that must be present with this hash.
    pub anchor: Option<Anchor>,
}

/// What an intact log holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifySummary {
    pub files: usize,
    /// Records, checkpoints included.
    pub records: u64,
    pub checkpoints: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Hash of the last record.
    pub head_hash: Option<String>,
    /// `seq` of the last checkpoint: every record up to it is vouched for by its signature.
    pub last_sealed_seq: Option<u64>,
    /// Records after the last checkpoint, which no signature covers yet.
    pub unsealed_tail: u64,
    /// Whether the first record is seq 1 linking to 64 zeros.
    pub starts_at_genesis: bool,
    /// `key_id` of the key used.
    pub key_id: String,
    /// Whether an anchor was given and matched.
    pub anchor_matched: bool,
    /// Ranges a daemon found after the last checkpoint at start: no signature attests them.
    pub unsealed: Vec<UnsealedRange>,
}

/// Records `first..=last`, named unsealed by the daemon record `noted_at`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UnsealedRange {
    pub first: u64,
    pub last: u64,
    pub noted_at: u64,
}

/// What broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// A file could not be read.
    Io,
    /// A file ends mid-record.
    Truncated,
    /// A line is not a record.
    Malformed,
    /// `seq` is not the next number: records deleted, inserted or reordered.
    Sequence,
    /// A record's hash is not what the next record says: it was edited (or the next one was).
    Link,
    /// The chain does not start at seq 1 linking to 64 zeros.
    Start,
    /// A checkpoint's `head_hash` is not its `prev_hash`.
    HeadHash,
    /// A checkpoint is signed by another key.
    WrongKey,
    /// A checkpoint's signature does not verify.
    Signature,
    /// The anchor record is missing or different.
    Anchor,
}

/// The first bad record: where, and what broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} line {line}{}: {what}", file.display(), seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
pub struct VerifyFailure {
    pub file: PathBuf,
    /// 1-based line number; 0 when the file could not be read at all.
    pub line: u64,
    pub seq: Option<u64>,
    pub kind: FailureKind,
    pub what: String,
}

/// [`verify_with`] with default options: the chain must start at seq 1.
pub fn verify(files: &[PathBuf], key: &VerifyingKey) -> Result<VerifySummary, VerifyFailure> {
    verify_with(files, key, &VerifyOptions::default())
}

/// Checks `files`, oldest first, as one chain signed by `key`. Reads each line once; memory
/// does not grow with the log.
pub fn verify_with(
    files: &[PathBuf],
    key: &VerifyingKey,
    options: &VerifyOptions,
) -> Result<VerifySummary, VerifyFailure> {
    let mut state = State {
        key,
        key_id: key_id(key),
        options,
        prev: None,
        summary: VerifySummary {
            files: files.len(),
            records: 0,
            checkpoints: 0,
            first_seq: None,
            last_seq: None,
            head_hash: None,
            last_sealed_seq: None,
            unsealed_tail: 0,
            starts_at_genesis: false,
            key_id: key_id(key),
            anchor_matched: false,
            unsealed: Vec::new(),
        },
    };
    for file in files {
        state.file(file)?;
    }
    state.finish()
}

/// The record before the current one.
struct Prev {
    file: PathBuf,
    line: u64,
    seq: u64,
    hash: String,
}

struct State<'a> {
    key: &'a VerifyingKey,
    key_id: String,
    options: &'a VerifyOptions,
    prev: Option<Prev>,
    summary: VerifySummary,
}

impl State<'_> {
    fn file(&mut self, path: &Path) -> Result<(), VerifyFailure> {
        let fail_at = |line, seq, kind, what: String| VerifyFailure {
            file: path.to_owned(),
            line,
            seq,
            kind,
            what,
        };
        let io = |line, e: std::io::Error| fail_at(line, None, FailureKind::Io, e.to_string());
        let mut reader = BufReader::with_capacity(1 << 16, File::open(path).map_err(|e| io(0, e))?);
        let mut buf = Vec::with_capacity(4096);
        let mut line_no = 0u64;
        loop {
            buf.clear();
            let n = (&mut reader)
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut buf)
                .map_err(|e| io(line_no + 1, e))?;
            if n == 0 {
                return Ok(());
            }
            line_no += 1;
            if buf.last() != Some(&b'\n') {
                let (kind, what) = if n > MAX_LINE_BYTES {
                    (
                        FailureKind::Malformed,
                        format!("line longer than {MAX_LINE_BYTES} bytes: not a record"),
                    )
                } else {
                    (
                        FailureKind::Truncated,
                        format!(
                            "the file ends mid-record ({n} bytes after the last newline): it was \
                             truncated, or a write was torn and not yet sealed (a running daemon \
                             may be writing this line; if so, retry)"
                        ),
                    )
                };
                return Err(fail_at(line_no, None, kind, what));
            }
            let line = &buf[..buf.len() - 1];
            self.record(path, line_no, line)?;
        }
    }

    fn record(&mut self, path: &Path, line_no: u64, line: &[u8]) -> Result<(), VerifyFailure> {
        let here = |seq: Option<u64>, kind, what: String| VerifyFailure {
            file: path.to_owned(),
            line: line_no,
            seq,
            kind,
            what,
        };
        let view = RecordView::parse(line)
            .map_err(|e| here(None, FailureKind::Malformed, format!("not a record: {e}")))?;
        let seq = Some(view.seq);
        match &self.prev {
            Some(prev) => {
                let expected = prev.seq + 1;
                if view.seq != expected {
                    let what = if view.seq > expected {
                        format!(
                            "seq {} where {expected} was expected: {} record(s) before this line \
                             were deleted or moved",
                            view.seq,
                            view.seq - expected
                        )
                    } else {
                        format!(
                            "seq {} where {expected} was expected: this record was inserted, \
                             duplicated or moved here",
                            view.seq
                        )
                    };
                    return Err(here(seq, FailureKind::Sequence, what));
                }
                if view.prev_hash != prev.hash {
                    // The record before no longer hashes to what this one recorded: most
                    // likely it was edited, so it is the one named.
                    return Err(VerifyFailure {
                        file: prev.file.clone(),
                        line: prev.line,
                        seq: Some(prev.seq),
                        kind: FailureKind::Link,
                        what: format!(
                            "this record's hash {} is not the prev_hash {} recorded by the next \
                             record ({} line {line_no}, seq {}): this record was altered (or the \
                             next record's prev_hash was)",
                            prev.hash,
                            view.prev_hash,
                            path.display(),
                            view.seq
                        ),
                    });
                }
            }
            None => {
                let genesis = view.seq == FIRST_SEQ;
                if genesis && view.prev_hash != GENESIS_HASH {
                    return Err(here(
                        seq,
                        FailureKind::Start,
                        "the first record (seq 1) must link to 64 zeros".into(),
                    ));
                }
                if !genesis && !self.options.allow_partial {
                    return Err(here(
                        seq,
                        FailureKind::Start,
                        format!(
                            "the chain starts at seq {}, not {FIRST_SEQ}: earlier records are \
                             missing. Give the rotated files too, oldest first (`audit.jsonl.* \
                             audit.jsonl`), or pass --partial if older files were removed on \
                             purpose",
                            view.seq
                        ),
                    ));
                }
                self.summary.starts_at_genesis = genesis;
                self.summary.first_seq = Some(view.seq);
            }
        }
        if let Some(range) = view.unsealed_range() {
            self.unsealed(view.seq, range)
                .map_err(|what| here(seq, FailureKind::Malformed, what))?;
        }
        if view.is_checkpoint() {
            self.checkpoint(&view)
                .map_err(|(kind, what)| here(seq, kind, what))?;
            self.summary.checkpoints += 1;
            self.summary.last_sealed_seq = Some(view.seq);
            self.summary.unsealed_tail = 0;
        } else {
            self.summary.unsealed_tail += 1;
        }
        let hash = line_hash(line);
        if let Some(anchor) = &self.options.anchor
            && anchor.seq == view.seq
        {
            if anchor.hash != hash {
                return Err(here(
                    seq,
                    FailureKind::Anchor,
                    format!(
                        "this record hashes to {hash}, but the anchor says {}: it was altered",
                        anchor.hash
                    ),
                ));
            }
            self.summary.anchor_matched = true;
        }
        self.summary.records += 1;
        self.summary.last_seq = Some(view.seq);
        self.summary.head_hash = Some(hash.clone());
        self.prev = Some(Prev {
            file: path.to_owned(),
            line: line_no,
            seq: view.seq,
            hash,
        });
        Ok(())
    }

    /// An `unsealed` record must name exactly the records between the last checkpoint (or
    /// the start of what was given) and itself: a range that claims less would hide records.
    fn unsealed(&mut self, seq: u64, range: (Option<u64>, Option<u64>)) -> Result<(), String> {
        let (Some(first), Some(last)) = range else {
            return Err("an `unsealed` record without `first_seq` and `last_seq`".into());
        };
        let expected_first = match self.summary.last_sealed_seq {
            Some(sealed) => sealed + 1,
            None => self.summary.first_seq.unwrap_or(seq),
        };
        let expected_last = seq.saturating_sub(1);
        let claims_everything = last == expected_last
            && (first == expected_first
                // Verifying a partial chain, the range may begin before the first given record.
                || (self.summary.last_sealed_seq.is_none()
                    && !self.summary.starts_at_genesis
                    && first < expected_first));
        if !claims_everything {
            return Err(format!(
                "an `unsealed` record names seq {first}..{last}, but the records since the last \
                 checkpoint are {expected_first}..{expected_last}: it was altered"
            ));
        }
        self.summary.unsealed.push(UnsealedRange {
            first,
            last,
            noted_at: seq,
        });
        Ok(())
    }

    fn checkpoint(&self, view: &RecordView) -> Result<(), (FailureKind, String)> {
        let missing = |field| {
            (
                FailureKind::Malformed,
                format!("checkpoint without `{field}`"),
            )
        };
        let head = view
            .head_hash
            .as_deref()
            .ok_or_else(|| missing("head_hash"))?;
        let id = view.key_id.as_deref().ok_or_else(|| missing("key_id"))?;
        let signature = view
            .signature
            .as_deref()
            .ok_or_else(|| missing("signature"))?;
        if head != view.prev_hash {
            return Err((
                FailureKind::HeadHash,
                format!(
                    "checkpoint head_hash {head} is not its prev_hash {}",
                    view.prev_hash
                ),
            ));
        }
        if id != self.key_id {
            return Err((
                FailureKind::WrongKey,
                format!(
                    "checkpoint signed by key_id {id}, but the key given has key_id {}: wrong \
                     key, or the signing key was replaced (verify older files with the old \
                     public key)",
                    self.key_id
                ),
            ));
        }
        check_signature(view.seq, head, signature, self.key).map_err(|problem| {
            let what = match problem {
                SignatureProblem::NotBase64 => {
                    "checkpoint signature is not base64 of 64 bytes".to_owned()
                }
                SignatureProblem::BadSignature => format!(
                    "checkpoint signature does not verify over \
                     `enforcer-audit-v1:{}:{head}`: the checkpoint was forged or altered",
                    view.seq
                ),
            };
            (FailureKind::Signature, what)
        })
    }

    fn finish(self) -> Result<VerifySummary, VerifyFailure> {
        if let Some(anchor) = &self.options.anchor
            && !self.summary.anchor_matched
        {
            let (file, line, seq) = match &self.prev {
                Some(p) => (p.file.clone(), p.line, Some(p.seq)),
                None => (PathBuf::new(), 0, None),
            };
            let what = match (self.summary.first_seq, self.summary.last_seq) {
                (_, Some(last)) if anchor.seq > last => format!(
                    "the log ends at seq {last}, but the anchor names seq {}: {} record(s) were \
                     cut from the end",
                    anchor.seq,
                    anchor.seq - last
                ),
                (_, None) => format!("the log is empty, but the anchor names seq {}", anchor.seq),
                _ => format!(
                    "the anchor names seq {}, before the first record given; give the older files",
                    anchor.seq
                ),
            };
            return Err(VerifyFailure {
                file,
                line,
                seq,
                kind: FailureKind::Anchor,
                what,
            });
        }
        Ok(self.summary)
    }
}
