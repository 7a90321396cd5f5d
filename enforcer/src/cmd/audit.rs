//! `enforcer audit verify`, `enforcer audit tail` and `enforcer keygen`.
//!
//! Exit codes of `audit verify`: 0 the log is intact; 1 it is not (the first bad record is
//! named); 2 it could not be checked (no key, unreadable file, bad arguments).

use std::{
    collections::VecDeque,
    fmt::Write as _,
    fs::File,
    io::{self, BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use ed25519_dalek::VerifyingKey;
use serde_json::{Map, Value};

use crate::{
    audit::{
        self, Anchor, AuditError, FailureKind, VerifyOptions, VerifySummary, load_public_half,
        parse_public_key, public_key_base64,
    },
    config::Config,
};

/// Largest key file `--key FILE` reads.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;
/// How often `tail -f` looks for new records.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

#[derive(clap::Subcommand, Debug)]
pub enum AuditCommand {
    /// Check the hash chain and checkpoint signatures of audit log files.
    ///
    /// Exit 0: intact; 1: a record was edited, deleted, inserted or reordered, a signature is
    /// bad, a file is truncated mid-record, or a daemon found records it could not attest
    /// (see --accept-unsealed); 2: the log could not be checked. Records cut from the end of
    /// the last file cannot be detected without --anchor.
    Verify(VerifyArgs),
    /// Print audit records, one human-readable line each.
    Tail(TailArgs),
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// Public key: base64 of the raw 32 bytes (as `enforcer keygen` prints it), or a file
    /// holding that or a PEM public key. Default: the public half of the configured
    /// `audit_key`.
    #[arg(long, value_name = "PUBKEY")]
    pub key: Option<String>,
    /// Accept a chain that starts after seq 1, when older rotated files were removed on
    /// purpose; its first record is then taken on trust.
    #[arg(long)]
    pub partial: bool,
    /// A record known from elsewhere, as SEQ:HASH (the `seq` and head hash reported by
    /// `enforcer status` or a previous verify). Fails if it is missing or different, which
    /// catches records cut from the end.
    #[arg(long, value_name = "SEQ:HASH")]
    pub anchor: Option<Anchor>,
    /// Exit 0 even when a daemon found records after the last checkpoint at start (a crash,
    /// or records added while it was stopped). They are still listed: no signature attests
    /// them, so read them as claims, not evidence.
    #[arg(long)]
    pub accept_unsealed: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Log files, oldest first (`audit.jsonl.* audit.jsonl`). Default: the configured
    /// `audit_log`'s rotated files, then `audit_log` itself.
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct TailArgs {
    /// Keep printing records as they are written; follows rotation.
    #[arg(short, long)]
    pub follow: bool,
    /// Only records of this agent.
    #[arg(long, value_name = "NAME")]
    pub agent: Option<String>,
    /// How many of the last records to print first.
    #[arg(short = 'n', long, value_name = "N", default_value_t = 20)]
    pub lines: usize,
    /// Print the raw JSON lines.
    #[arg(long)]
    pub json: bool,
    /// Log file. Default: the configured `audit_log`.
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct KeygenArgs {
    /// Print the public key of the existing key instead of creating one.
    #[arg(long)]
    pub public: bool,
}

/// Runs an `enforcer audit` subcommand.
pub fn run(cmd: AuditCommand, config: &Config) -> ExitCode {
    ExitCode::from(run_with_output(
        cmd,
        config,
        &mut io::stdout().lock(),
        &mut io::stderr().lock(),
    ))
}

/// [`run`], writing to `out` and `err`, returning the exit status as a number.
pub fn run_with_output(
    cmd: AuditCommand,
    config: &Config,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    let status = match cmd {
        AuditCommand::Verify(args) => verify_cmd(args, config, out, err),
        AuditCommand::Tail(args) => tail_cmd(args, config, out, err),
    };
    let _ = out.flush();
    status
}

/// `enforcer keygen`: writes a new signing key to the configured `audit_key` (mode 0600,
/// PKCS#8 PEM; its directory is created 0700), never overwriting one, and prints the public
/// key as standard base64 of its raw 32 bytes. Exit 0 on success, 1 otherwise.
pub fn keygen(args: KeygenArgs, config: &Config) -> ExitCode {
    ExitCode::from(keygen_with_output(
        args,
        config,
        &mut io::stdout().lock(),
        &mut io::stderr().lock(),
    ))
}

/// [`keygen`], writing to `out` and `err`, returning the exit status as a number.
pub fn keygen_with_output(
    args: KeygenArgs,
    config: &Config,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    let path = config.audit_key_path();
    let result = if args.public {
        load_public_half(&path)
    } else {
        audit::generate_key_file(&path).inspect(|_| {
            let _ = writeln!(
                err,
                "enforcer: wrote a new audit signing key to {} (mode 0600, PKCS#8 PEM). Its \
                 public key, for `enforcer audit verify --key`, is:",
                path.display()
            );
        })
    };
    match result {
        Ok(public) => {
            let _ = writeln!(out, "{}", public_key_base64(&public));
            let _ = out.flush();
            0
        }
        Err(e) => {
            let _ = writeln!(err, "enforcer keygen: {e}");
            1
        }
    }
}

fn verify_cmd(args: VerifyArgs, config: &Config, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let key = match resolve_key(args.key.as_deref(), config) {
        Ok(key) => key,
        Err(message) => {
            let _ = writeln!(err, "enforcer audit verify: {message}");
            return 2;
        }
    };
    let files = if args.files.is_empty() {
        match default_files(&config.audit_log) {
            Ok(files) => files,
            Err(e) => {
                let _ = writeln!(
                    err,
                    "enforcer audit verify: cannot list the rotated files of {}: {e}",
                    config.audit_log.display()
                );
                return 2;
            }
        }
    } else {
        args.files
    };
    let options = VerifyOptions {
        allow_partial: args.partial,
        anchor: args.anchor,
    };
    match audit::verify_with(&files, &key, &options) {
        Ok(summary) => {
            let text = if args.json {
                serde_json::to_string_pretty(&summary).expect("summary serializes") + "\n"
            } else {
                describe_summary(&summary, &options)
            };
            let _ = out.write_all(text.as_bytes());
            if summary.unsealed.is_empty() || args.accept_unsealed {
                0
            } else {
                let ranges: Vec<String> = summary
                    .unsealed
                    .iter()
                    .map(|r| format!("{}..{}", r.first, r.last))
                    .collect();
                let _ = writeln!(
                    err,
                    "audit log NOT attested in full: records {} were found unsealed by a \
                     starting daemon (it crashed, or they were added while it was stopped), and \
                     no signature vouches for them. Check them against another copy, then pass \
                     --accept-unsealed to accept the rest of the log",
                    ranges.join(", ")
                );
                1
            }
        }
        Err(failure) if failure.kind == FailureKind::Io => {
            let _ = writeln!(
                err,
                "enforcer audit verify: cannot read {}: {}",
                failure.file.display(),
                failure.what
            );
            2
        }
        Err(failure) => {
            let _ = writeln!(err, "audit log NOT intact: {failure}");
            1
        }
    }
}

/// The rotated files of `live`, oldest first, then `live`.
fn default_files(live: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = audit::rotated_files(live)?;
    files.push(live.to_owned());
    Ok(files)
}

/// `--key` as base64 or a file; without it, the configured key's public half.
fn resolve_key(arg: Option<&str>, config: &Config) -> Result<VerifyingKey, String> {
    let Some(arg) = arg else {
        let path = config.audit_key_path();
        return load_public_half(&path).map_err(|e| match e {
            AuditError::KeyMissing { .. } => format!(
                "no key to verify with: pass --key PUBKEY (the base64 `enforcer keygen` \
                 printed), or run where the configured audit_key {} exists",
                path.display()
            ),
            other => format!("{other}; or pass --key PUBKEY"),
        });
    };
    let path = Path::new(arg);
    if path.is_file() {
        let mut text = String::new();
        File::open(path)
            .and_then(|f| f.take(MAX_KEY_FILE_BYTES).read_to_string(&mut text))
            .map_err(|e| format!("cannot read key file {arg}: {e}"))?;
        return parse_public_key(&text).map_err(|e| format!("key file {arg}: {e}"));
    }
    parse_public_key(arg).map_err(|e| format!("--key is neither a readable file nor a key: {e}"))
}

/// The human summary of an intact log, with what it cannot vouch for.
pub fn describe_summary(s: &VerifySummary, options: &VerifyOptions) -> String {
    let mut text = String::new();
    let seqs = match (s.first_seq, s.last_seq) {
        (Some(first), Some(last)) => format!("seq {first}..{last}"),
        _ => "no records".to_owned(),
    };
    let _ = writeln!(
        text,
        "audit log intact: {} records in {} file(s), {seqs}, {} checkpoint(s), key_id {}",
        s.records, s.files, s.checkpoints, s.key_id
    );
    let _ = writeln!(
        text,
        "head hash:       {}",
        s.head_hash.as_deref().unwrap_or("-")
    );
    let _ = writeln!(
        text,
        "last sealed seq: {}",
        s.last_sealed_seq
            .map_or("none".to_owned(), |q| q.to_string())
    );
    let _ = writeln!(text, "unsealed tail:   {} record(s)", s.unsealed_tail);
    if s.records > 0 && s.checkpoints == 0 {
        let _ = writeln!(
            text,
            "warning: no checkpoint: no record here is signed, so the chain proves order but not \
             origin"
        );
    }
    if s.unsealed_tail > 0
        && let Some(last) = s.last_seq
    {
        let _ = writeln!(
            text,
            "note: the last {} record(s) (up to seq {last}) follow the last checkpoint; no \
             signature covers them yet (the daemon is running, or did not stop cleanly)",
            s.unsealed_tail
        );
    }
    for range in &s.unsealed {
        let _ = writeln!(
            text,
            "UNSEALED:        seq {}..{} not attested (named by the daemon record at seq {})",
            range.first, range.last, range.noted_at
        );
    }
    if !s.starts_at_genesis && s.records > 0 {
        let _ = writeln!(
            text,
            "note: the chain starts at seq {}; records before it were not checked (--partial)",
            s.first_seq.unwrap_or_default()
        );
    }
    match &options.anchor {
        Some(anchor) => {
            let _ = writeln!(text, "anchor:          seq {} matches", anchor.seq);
        }
        None => {
            let _ = writeln!(
                text,
                "note: whole records cut from the end of the last file cannot be detected without \
                 an outside copy of the head; keep `{}:{}` elsewhere and pass it as --anchor",
                s.last_seq.unwrap_or_default(),
                s.head_hash.as_deref().unwrap_or("-")
            );
        }
    }
    text
}

fn tail_cmd(args: TailArgs, config: &Config, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let path = args
        .file
        .clone()
        .unwrap_or_else(|| config.audit_log.clone());
    let filter = Filter {
        agent: args.agent.clone(),
        json: args.json,
    };
    let result = print_last(&path, &filter, args.lines, out).and_then(|offset| {
        if args.follow {
            follow(&path, &filter, offset, out, &|| false)
        } else {
            Ok(())
        }
    });
    match result {
        Ok(()) => 0,
        // `enforcer audit tail | head` closing the pipe is not an error.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            let _ = writeln!(err, "enforcer audit tail: {}: {e}", path.display());
            1
        }
    }
}

struct Filter {
    agent: Option<String>,
    json: bool,
}

impl Filter {
    /// The text to print for one line, if it passes the filter.
    fn render(&self, line: &str) -> Option<String> {
        let parsed: Option<Map<String, Value>> = serde_json::from_str(line).ok();
        if let Some(agent) = &self.agent {
            let record_agent = parsed
                .as_ref()
                .and_then(|m| m.get("agent_id"))
                .and_then(Value::as_str);
            if record_agent != Some(agent.as_str()) {
                return None;
            }
        }
        Some(if self.json {
            line.to_owned()
        } else {
            match parsed {
                Some(map) => format_record(&map),
                None => format!("? {line}"),
            }
        })
    }
}

/// Prints the last `n` matching records of `path`; returns the offset after the last whole
/// line, where following continues.
fn print_last(path: &Path, filter: &Filter, n: usize, out: &mut dyn Write) -> io::Result<u64> {
    let mut reader = BufReader::new(File::open(path)?);
    let mut last = VecDeque::with_capacity(n.min(4096));
    let mut offset = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let read = reader.read_until(b'\n', &mut buf)?;
        if read == 0 || buf.last() != Some(&b'\n') {
            break;
        }
        offset += read as u64;
        if n == 0 {
            continue;
        }
        if let Some(text) = filter.render(String::from_utf8_lossy(&buf[..read - 1]).trim_end()) {
            if last.len() == n {
                last.pop_front();
            }
            last.push_back(text);
        }
    }
    for text in last {
        writeln!(out, "{text}")?;
    }
    out.flush()?;
    Ok(offset)
}

/// Prints records appended to `path` from `offset` on, polling, until `stop` says so. When
/// the file is rotated (another inode at the path) or cut (shorter than what was read), the
/// rest of the old file is printed and the new one is read from its start.
fn follow(
    path: &Path,
    filter: &Filter,
    mut offset: u64,
    out: &mut dyn Write,
    stop: &dyn Fn() -> bool,
) -> io::Result<()> {
    let mut file = File::open(path)?;
    let mut inode = file.metadata()?.ino();
    let mut pending = Vec::new();
    loop {
        file.seek(SeekFrom::Start(offset))?;
        let mut fresh = Vec::new();
        offset += file.read_to_end(&mut fresh)? as u64;
        pending.extend_from_slice(&fresh);
        let mut printed = false;
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            if let Some(text) = filter.render(String::from_utf8_lossy(&line[..nl]).trim_end()) {
                writeln!(out, "{text}")?;
                printed = true;
            }
        }
        if printed {
            out.flush()?;
        }
        if stop() {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_POLL);
        match std::fs::metadata(path) {
            Ok(meta) if meta.ino() != inode || meta.len() < offset => {
                // Read what the old file still has before moving on.
                file.seek(SeekFrom::Start(offset))?;
                let mut rest = Vec::new();
                file.read_to_end(&mut rest)?;
                if meta.ino() == inode {
                    // Cut in place (a torn record sealed off): drop the partial line.
                    pending.clear();
                } else {
                    pending.extend_from_slice(&rest);
                    for line in pending.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                        if let Some(text) = filter.render(String::from_utf8_lossy(line).trim_end())
                        {
                            writeln!(out, "{text}")?;
                        }
                    }
                    pending.clear();
                }
                file = File::open(path)?;
                inode = file.metadata()?.ino();
                offset = 0;
            }
            // Between a rotation's rename and the new file: wait.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
            Ok(_) => {}
        }
    }
}

/// One record as one line: time, seq, event, outcome, agent, then the other fields.
pub fn format_record(map: &Map<String, Value>) -> String {
    let s = |key: &str| map.get(key).map(plain);
    let mut line = format!(
        "{} {:>7} {:<11}",
        s("timestamp").unwrap_or_else(|| "-".into()),
        s("seq").unwrap_or_else(|| "?".into()),
        s("event").unwrap_or_else(|| "?".into()),
    );
    let outcome = s("policy_result")
        .or_else(|| s("action"))
        .unwrap_or_default();
    let _ = write!(line, " {outcome:<12}");
    if let Some(agent) = s("agent_id") {
        let _ = write!(line, " {agent}");
    }
    let mut shown = vec![
        "timestamp",
        "seq",
        "event",
        "policy_result",
        "action",
        "agent_id",
        "prev_hash",
        "signature",
    ];
    if s("event").as_deref() == Some("checkpoint") {
        let head = s("head_hash").unwrap_or_default();
        let _ = write!(
            line,
            " signs records up to here, head={}… key_id={}",
            head.get(..16).unwrap_or(&head),
            s("key_id").unwrap_or_default()
        );
        shown.extend(["head_hash", "key_id"]);
    }
    if map.contains_key("method") || map.contains_key("url_host") || map.contains_key("url_path") {
        let _ = write!(
            line,
            " {} {}{}",
            s("method").unwrap_or_else(|| "-".into()),
            s("url_host").unwrap_or_default(),
            s("url_path").unwrap_or_default()
        );
        shown.extend(["method", "url_host", "url_path"]);
    }
    if let Some(latency) = s("latency_ms") {
        let _ = write!(line, " {latency}ms");
        shown.push("latency_ms");
    }
    for (key, value) in map {
        if shown.contains(&key.as_str()) {
            continue;
        }
        let value = plain(value);
        if key == "policy_sha256" {
            let _ = write!(line, " {key}={}", value.get(..12).unwrap_or(&value));
        } else if value.contains(' ') || value.is_empty() {
            let _ = write!(line, " {key}={value:?}");
        } else {
            let _ = write!(line, " {key}={value}");
        }
    }
    line.truncate(line.trim_end().len());
    line
}

/// A JSON value as text, strings without quotes.
fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        time::Instant,
    };

    use super::*;

    #[test]
    fn a_request_prints_on_one_readable_line() {
        let map: Map<String, Value> = serde_json::from_str(
            r#"{"seq":42,"timestamp":"2026-03-14T02:14:37.512Z","event":"request","agent_id":"demo","pid":7,"policy_result":"deny","matched_rule":"no_uploads","reason":"body too big","url_host":"api.example.com","method":"POST","url_path":"/v1/up","prev_hash":"00"}"#,
        )
        .unwrap();
        let line = format_record(&map);
        assert!(
            line.starts_with("2026-03-14T02:14:37.512Z      42 request     deny"),
            "{line}"
        );
        assert!(line.contains(" demo POST api.example.com/v1/up"), "{line}");
        assert!(line.contains("matched_rule=no_uploads"), "{line}");
        assert!(line.contains(r#"reason="body too big""#), "{line}");
        assert!(!line.contains("prev_hash"), "{line}");
    }

    #[test]
    fn follow_prints_appended_records_and_survives_rotation() {
        // Scenario: tail -f is running when records are appended, then the file is rotated.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let rec = |seq: u64, agent: &str| {
            format!(
                "{{\"seq\":{seq},\"timestamp\":\"t\",\"event\":\"request\",\"agent_id\":\"{agent}\",\"prev_hash\":\"x\"}}\n"
            )
        };
        std::fs::write(&path, rec(1, "a")).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let output = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let offset = std::fs::metadata(&path).unwrap().len();
        let handle = {
            let (path, stop, output) = (path.clone(), stop.clone(), output.clone());
            std::thread::spawn(move || {
                let filter = Filter {
                    agent: Some("a".into()),
                    json: true,
                };
                let mut buf = Vec::new();
                follow(&path, &filter, offset, &mut buf, &|| {
                    stop.load(Ordering::SeqCst)
                })
                .unwrap();
                output.lock().unwrap().extend(buf);
            })
        };
        let append = |text: String| {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap();
            f.write_all(text.as_bytes()).unwrap();
        };
        append(rec(2, "a"));
        append(rec(3, "b"));
        std::thread::sleep(Duration::from_millis(500));
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        std::fs::write(&path, rec(4, "a")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::SeqCst);
        handle.join().unwrap();
        let text = String::from_utf8(output.lock().unwrap().clone()).unwrap();
        let seqs: Vec<_> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(seqs, [2, 4], "{text}");
    }
}
