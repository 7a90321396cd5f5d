//! Opening the live file: locking it, sealing off a torn tail, and finding the chain head
//! (in the live file, or in the newest rotated file when the live one is empty).

use std::{
    ffi::OsString,
    fs::{DirBuilder, File, OpenOptions},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, FileExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use super::{
    AuditError,
    chain::{FIRST_SEQ, GENESIS_HASH, RecordView, line_hash},
    key::fsync_parent,
};

/// How far back from the end the torn-tail scan looks for the last complete record. A record
/// is bounded by the field caps to a few tens of KiB, so this is generous.
const TAIL_SCAN_BYTES: u64 = 4 << 20;
/// Digits in a rotated file's suffix: enough for any `u64`, so names sort in `seq` order.
const ROTATED_DIGITS: usize = 20;

/// `(first_seq, last_seq)`, inclusive.
type SeqRange = (u64, u64);

/// The live file, opened and recovered.
pub(super) struct Live {
    pub file: File,
    /// Bytes of whole records in the file.
    pub len: u64,
    /// `seq` of the file's first record, if it has one.
    pub first_seq: Option<u64>,
    /// `seq` the next record takes.
    pub next_seq: u64,
    /// Hash of the last record (the next record's `prev_hash`).
    pub head: String,
    /// What was sealed off, if anything.
    pub sealed: Option<Sealed>,
    /// Records after the last checkpoint, found at open: `(first_seq, last_seq)`.
    pub unsealed: Option<SeqRange>,
}

/// A torn tail moved out of the live file.
pub(super) struct Sealed {
    pub bytes: u64,
    pub after_seq: Option<u64>,
    pub moved_to: PathBuf,
}

impl Sealed {
    pub fn describe(&self) -> String {
        let after = match self.after_seq {
            Some(seq) => format!("after seq {seq}"),
            None => "before any record in the file".to_owned(),
        };
        format!(
            "sealed off a torn final record at open: {} bytes {after} moved to {}",
            self.bytes,
            self.moved_to.display()
        )
    }
}

/// `<audit_log>.<first_seq, 20 digits>`.
pub fn rotated_file_name(live: &Path, first_seq: u64) -> PathBuf {
    let mut name = live.as_os_str().to_owned();
    name.push(format!(".{first_seq:0ROTATED_DIGITS$}"));
    PathBuf::from(name)
}

/// The rotated files of `live`, oldest first (by the `seq` in their names).
pub fn rotated_files(live: &Path) -> std::io::Result<Vec<PathBuf>> {
    let (dir, base) = split(live);
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(suffix) = name
            .strip_prefix(base.to_str().unwrap_or("\0"))
            .and_then(|rest| rest.strip_prefix('.'))
        else {
            continue;
        };
        if suffix.len() == ROTATED_DIGITS
            && suffix.bytes().all(|b| b.is_ascii_digit())
            && let Ok(seq) = suffix.parse::<u64>()
        {
            found.push((seq, entry.path()));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// `<audit_log>-torn-`: the prefix of files holding sealed-off torn tails.
pub fn torn_file_prefix(live: &Path) -> PathBuf {
    let mut name = live.as_os_str().to_owned();
    name.push("-torn-");
    PathBuf::from(name)
}

fn split(live: &Path) -> (&Path, OsString) {
    let dir = match live.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let base = live.file_name().map(OsString::from).unwrap_or_default();
    (dir, base)
}

/// Opens (creating) and locks the live file, without looking at its contents.
pub(super) fn open_locked(path: &Path) -> Result<File, AuditError> {
    let open_err = |source| AuditError::Open {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !dir.exists()
    {
        DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(open_err)?;
    }
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
        .map_err(open_err)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(AuditError::Locked {
            path: path.to_owned(),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(open_err(source)),
    }
}

/// Opens, locks and recovers the live file.
pub(super) fn open_live(path: &Path) -> Result<Live, AuditError> {
    let file = open_locked(path)?;
    let io_err = |e: std::io::Error| AuditError::Recover {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let meta = file.metadata().map_err(io_err)?;
    // Anything but a regular file (a test's /dev/full, a FIFO) has no history to recover.
    let len = if meta.is_file() { meta.len() } else { 0 };
    let tail = scan_tail(&file, len).map_err(io_err)?;
    if tail.last.is_none() && tail.scanned_from > 0 {
        return Err(AuditError::Recover {
            path: path.to_owned(),
            message: format!(
                "the last {TAIL_SCAN_BYTES} bytes hold no complete record, so the chain head \
                 cannot be found; move the file aside (keep it as evidence) and start again"
            ),
        });
    }
    let mut sealed = None;
    if tail.good_len < len {
        let moved_to = seal(path, &file, tail.good_len, len).map_err(io_err)?;
        sealed = Some(Sealed {
            bytes: len - tail.good_len,
            after_seq: tail.last.as_ref().map(|(view, _)| view.seq),
            moved_to,
        });
    }
    let (next_seq, head, first_seq, unsealed) = match &tail.last {
        Some((view, hash)) => {
            let first = first_seq(&file, tail.good_len).map_err(io_err)?;
            let unsealed = unsealed_after(&file, tail.good_len, view, first).map_err(io_err)?;
            (view.seq.saturating_add(1), hash.clone(), first, unsealed)
        }
        None => {
            let (next, head, unsealed) = head_from_rotated(path).map_err(io_err)?;
            (next, head, None, unsealed)
        }
    };
    Ok(Live {
        file,
        len: tail.good_len,
        first_seq,
        next_seq,
        head,
        sealed,
        unsealed,
    })
}

struct Tail {
    /// End of the last complete record (its newline included).
    good_len: u64,
    /// The last complete record and its hash.
    last: Option<(RecordView, String)>,
    /// Where the scan started.
    scanned_from: u64,
}

/// Finds the last line that is a record; everything after it is torn.
fn scan_tail(file: &File, len: u64) -> std::io::Result<Tail> {
    let from = len.saturating_sub(TAIL_SCAN_BYTES);
    let mut buf = vec![0; usize::try_from(len - from).expect("bounded by TAIL_SCAN_BYTES")];
    file.read_exact_at(&mut buf, from)?;
    // Complete lines end with '\n'. Walk them from the end; when the scan did not start at
    // the beginning of the file, the first piece may be the end of a longer line, so it is
    // never taken as a record.
    let mut end = buf.iter().rposition(|&b| b == b'\n');
    while let Some(nl) = end {
        let start = buf[..nl].iter().rposition(|&b| b == b'\n').map(|i| i + 1);
        if start.is_none() && from > 0 {
            break;
        }
        let line = &buf[start.unwrap_or(0)..nl];
        if let Ok(view) = RecordView::parse(line)
            && is_hash(&view.prev_hash)
        {
            return Ok(Tail {
                good_len: from + nl as u64 + 1,
                last: Some((view, line_hash(line))),
                scanned_from: from,
            });
        }
        end = start.and_then(|s| s.checked_sub(1));
    }
    Ok(Tail {
        good_len: 0,
        last: None,
        scanned_from: from,
    })
}

fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Copies `[good_len, len)` to a new `-torn-` file, fsyncs it, and cuts it from the live file.
fn seal(path: &Path, file: &File, good_len: u64, len: u64) -> std::io::Result<PathBuf> {
    let mut torn = vec![0; usize::try_from(len - good_len).expect("bounded by TAIL_SCAN_BYTES")];
    file.read_exact_at(&mut torn, good_len)?;
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let prefix = torn_file_prefix(path);
    let mut attempt = 0u32;
    let (mut out, moved_to) = loop {
        let mut name = prefix.as_os_str().to_owned();
        name.push(now_ms.to_string());
        if attempt > 0 {
            name.push(format!(".{attempt}"));
        }
        let candidate = PathBuf::from(name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&candidate)
        {
            Ok(f) => break (f, candidate),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    };
    out.write_all(&torn)?;
    out.sync_all()?;
    fsync_parent(&moved_to)?;
    file.set_len(good_len)?;
    file.sync_all()?;
    Ok(moved_to)
}

/// `seq` of the file's first record.
fn first_seq(file: &File, len: u64) -> std::io::Result<Option<u64>> {
    let mut buf = vec![0; usize::try_from(len.min(TAIL_SCAN_BYTES)).expect("bounded")];
    file.read_exact_at(&mut buf, 0)?;
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    Ok(RecordView::parse(&buf[..nl]).ok().map(|v| v.seq))
}

/// The chain head when the live file holds no record: the last record of the newest rotated
/// file, or the start of a new chain; and what follows that file's last checkpoint.
fn head_from_rotated(path: &Path) -> std::io::Result<(u64, String, Option<SeqRange>)> {
    if let Some(newest) = rotated_files(path)?.pop() {
        let file = File::open(&newest)?;
        let len = file.metadata()?.len();
        if let Some((view, hash)) = scan_tail(&file, len)?.last {
            let first = first_seq(&file, len)?;
            let unsealed = unsealed_after(&file, len, &view, first)?;
            return Ok((view.seq.saturating_add(1), hash, unsealed));
        }
    }
    Ok((FIRST_SEQ, GENESIS_HASH.to_owned(), None))
}

/// The records after the last checkpoint of a file whose last record is `last`, as
/// `(first_seq, last_seq)`; `None` when `last` is a checkpoint. Without a checkpoint in the
/// file the range starts at the file's first record: rotation checkpoints before it renames,
/// so an older file cannot hold part of the range (and `audit verify` checks that it does
/// not).
fn unsealed_after(
    file: &File,
    len: u64,
    last: &RecordView,
    file_first: Option<u64>,
) -> std::io::Result<Option<SeqRange>> {
    if last.is_checkpoint() {
        return Ok(None);
    }
    let from = match last_checkpoint_seq(file, len)? {
        Some(seq) => seq + 1,
        None => file_first.unwrap_or(last.seq),
    };
    Ok(Some((from, last.seq)))
}

/// `seq` of the last checkpoint in `[0, len)`, reading backwards in chunks so that the usual
/// case (a checkpoint within the last thousand records) reads little.
fn last_checkpoint_seq(file: &File, len: u64) -> std::io::Result<Option<u64>> {
    const CHUNK: u64 = 1 << 20;
    const MARK: &[u8] = b"\"event\":\"checkpoint\"";
    let mut end = len;
    // The start of a line cut by the previous (later) chunk's beginning.
    let mut carry: Vec<u8> = Vec::new();
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let mut buf = vec![0; usize::try_from(end - start).expect("bounded by CHUNK")];
        file.read_exact_at(&mut buf, start)?;
        buf.extend_from_slice(&carry);
        let mut pieces: Vec<&[u8]> = buf.rsplit(|&b| b == b'\n').collect();
        // The front piece may be the end of a line that began in an earlier chunk.
        let front = if start > 0 { pieces.pop() } else { None };
        for line in pieces {
            if line.windows(MARK.len()).any(|w| w == MARK)
                && let Ok(view) = RecordView::parse(line)
                && view.is_checkpoint()
            {
                return Ok(Some(view.seq));
            }
        }
        carry = front.map(<[u8]>::to_vec).unwrap_or_default();
        end = start;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_names_sort_by_seq_and_ignore_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("audit.jsonl");
        for seq in [1000u64, 1, 20] {
            std::fs::write(rotated_file_name(&live, seq), b"").unwrap();
        }
        std::fs::write(dir.path().join("audit.jsonl-torn-123"), b"").unwrap();
        std::fs::write(dir.path().join("audit.jsonl.5"), b"").unwrap();
        std::fs::write(dir.path().join("other.jsonl.00000000000000000001"), b"").unwrap();
        let names: Vec<_> = rotated_files(&live)
            .unwrap()
            .into_iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "audit.jsonl.00000000000000000001",
                "audit.jsonl.00000000000000000020",
                "audit.jsonl.00000000000000001000"
            ]
        );
    }
}
