//! `audit verify` against tampered logs, and the `enforcer audit` / `enforcer keygen` CLI
//! through their `run` functions. Unprivileged.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use base64::Engine as _;
use clap::Parser as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use enforcer::{
    audit::{
        self, Anchor, AuditEvent, AuditLog, AuditOptions, EventKind, FailureKind, PolicyResult,
        VerifyFailure, VerifyOptions,
    },
    cmd::audit::{AuditCommand, KeygenArgs, keygen_with_output, run_with_output},
    config::Config,
};

/// A log of 30 requests with a checkpoint every 10: lines 1-10 requests, 11 checkpoint,
/// 12-21, 22 checkpoint, 23-32, 33 checkpoint. Line number equals seq.
struct Fixture {
    _dir: tempfile::TempDir,
    log: PathBuf,
    key: VerifyingKey,
    config: Config,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        state_dir: dir.path().join("state"),
        audit_log: dir.path().join("log/audit.jsonl"),
        ..Config::default()
    };
    let key = audit::generate_key_file(&config.audit_key_path()).unwrap();
    let log = AuditLog::open(AuditOptions {
        checkpoint_records: 10,
        checkpoint_interval: Duration::from_secs(3600),
        ..AuditOptions::from_config(&config)
    })
    .unwrap();
    for i in 0..30 {
        log.record(
            AuditEvent::new(EventKind::Request)
                .agent_id(if i % 2 == 0 { "alpha" } else { "beta" })
                .policy_result(PolicyResult::Deny)
                .url_host("api.example.com")
                .method("POST")
                .url_path(format!("/v1/x/{i}")),
        )
        .unwrap();
    }
    log.close();
    Fixture {
        log: config.audit_log.clone(),
        _dir: dir,
        key,
        config,
    }
}

impl Fixture {
    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(&self, lines: &[String]) {
        std::fs::write(&self.log, lines.join("\n") + "\n").unwrap();
    }

    fn verify(&self) -> Result<audit::VerifySummary, VerifyFailure> {
        audit::verify(std::slice::from_ref(&self.log), &self.key)
    }

    fn cli(&self, args: &[&str]) -> (u8, String, String) {
        cli(&self.config, args)
    }
}

#[derive(clap::Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: AuditCommand,
}

fn cli(config: &Config, args: &[&str]) -> (u8, String, String) {
    let cli = Cli::try_parse_from(std::iter::once("audit").chain(args.iter().copied())).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run_with_output(cli.cmd, config, &mut out, &mut err);
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

fn expect_failure(f: &Fixture, kind: FailureKind, line: u64) -> VerifyFailure {
    let err = f.verify().unwrap_err();
    assert_eq!((err.kind, err.line), (kind, line), "{err}");
    let (code, _, stderr) = f.cli(&["verify", f.log.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&format!("line {line}")), "{stderr}");
    err
}

#[test]
fn a_clean_log_verifies_and_the_summary_says_what_is_sealed() {
    let f = fixture();
    let s = f.verify().unwrap();
    assert_eq!((s.records, s.checkpoints), (33, 3));
    assert_eq!((s.first_seq, s.last_seq), (Some(1), Some(33)));
    assert_eq!(s.last_sealed_seq, Some(33));
    assert_eq!(s.unsealed_tail, 0);

    // Default key (the configured audit_key) and default files (the configured audit_log).
    let (code, out, err) = f.cli(&["verify"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("audit log intact: 33 records"), "{out}");
    assert!(out.contains("last sealed seq: 33"), "{out}");
    assert!(out.contains("unsealed tail:   0"), "{out}");
    assert!(out.contains(s.head_hash.as_deref().unwrap()), "{out}");
    assert!(out.contains("cannot be detected"), "{out}");
}

#[test]
fn the_key_may_be_base64_a_base64_file_or_a_pem_public_key() {
    let f = fixture();
    let log = f.log.to_str().unwrap();
    let b64 = audit::public_key_base64(&f.key);
    assert_eq!(f.cli(&["verify", "--key", &b64, log]).0, 0);

    let dir = tempfile::tempdir().unwrap();
    let b64_file = dir.path().join("key.b64");
    std::fs::write(&b64_file, format!("{b64}\n")).unwrap();
    assert_eq!(
        f.cli(&["verify", "--key", b64_file.to_str().unwrap(), log])
            .0,
        0
    );

    use ed25519_dalek::pkcs8::{EncodePublicKey as _, spki::der::pem::LineEnding};
    let pem_file = dir.path().join("key.pem");
    std::fs::write(&pem_file, f.key.to_public_key_pem(LineEnding::LF).unwrap()).unwrap();
    assert_eq!(
        f.cli(&["verify", "--key", pem_file.to_str().unwrap(), log])
            .0,
        0
    );

    let (code, _, err) = f.cli(&["verify", "--key", "not-a-key", log]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn a_changed_byte_is_caught_and_the_changed_record_named() {
    let f = fixture();
    let mut lines = f.lines();
    lines[4] = lines[4].replace("\"alpha\"", "\"alphA\"");
    f.write_lines(&lines);
    let err = expect_failure(&f, FailureKind::Link, 5);
    assert_eq!(err.seq, Some(5));
    assert!(err.what.contains("altered"), "{err}");
}

#[test]
fn a_deleted_line_is_caught() {
    let f = fixture();
    let mut lines = f.lines();
    lines.remove(4);
    f.write_lines(&lines);
    let err = expect_failure(&f, FailureKind::Sequence, 5);
    assert_eq!(err.seq, Some(6));
    assert!(err.what.contains("deleted"), "{err}");
}

#[test]
fn two_swapped_lines_are_caught() {
    let f = fixture();
    let mut lines = f.lines();
    lines.swap(4, 5);
    f.write_lines(&lines);
    expect_failure(&f, FailureKind::Sequence, 5);
}

#[test]
fn an_inserted_line_is_caught() {
    let f = fixture();
    let mut lines = f.lines();
    // A copy of an earlier record.
    let copy = lines[2].clone();
    lines.insert(7, copy);
    f.write_lines(&lines);
    expect_failure(&f, FailureKind::Sequence, 8);

    // A forged record that knows the format: right seq, right link. The next record's seq
    // no longer fits.
    let f = fixture();
    let mut lines = f.lines();
    let forged = format!(
        r#"{{"seq":8,"timestamp":"2026-03-14T02:14:37.512Z","event":"request","agent_id":"alpha","policy_result":"allow","prev_hash":"{}"}}"#,
        audit::line_hash(lines[6].as_bytes())
    );
    lines.insert(7, forged);
    f.write_lines(&lines);
    expect_failure(&f, FailureKind::Sequence, 9);
}

#[test]
fn a_file_truncated_mid_record_is_caught() {
    let f = fixture();
    let bytes = std::fs::read(&f.log).unwrap();
    std::fs::write(&f.log, &bytes[..bytes.len() - 40]).unwrap();
    let err = expect_failure(&f, FailureKind::Truncated, 33);
    assert!(err.what.contains("mid-record"), "{err}");
}

#[test]
fn records_cut_from_the_end_are_caught_with_an_anchor_and_reported_without_one() {
    let f = fixture();
    let full = f.verify().unwrap();
    let anchor = format!("{}:{}", full.last_seq.unwrap(), full.head_hash.unwrap());
    let mut lines = f.lines();
    lines.truncate(28);
    f.write_lines(&lines);

    // Without an anchor the shorter chain is valid as far as it goes; the summary shows the
    // unsealed tail.
    let cut = f.verify().unwrap();
    assert_eq!(cut.last_seq, Some(28));
    assert_eq!(cut.last_sealed_seq, Some(22));
    assert_eq!(cut.unsealed_tail, 6);
    let (code, out, _) = f.cli(&["verify"]);
    assert_eq!(code, 0);
    assert!(out.contains("unsealed tail:   6"), "{out}");

    let options = VerifyOptions {
        allow_partial: false,
        anchor: Some(anchor.parse::<Anchor>().unwrap()),
    };
    let err = audit::verify_with(std::slice::from_ref(&f.log), &f.key, &options).unwrap_err();
    assert_eq!(err.kind, FailureKind::Anchor, "{err}");
    assert!(err.what.contains("cut from the end"), "{err}");
    let (code, _, stderr) = f.cli(&["verify", "--anchor", &anchor]);
    assert_eq!(code, 1, "{stderr}");
}

#[test]
fn a_bad_signature_is_caught() {
    let f = fixture();
    let mut lines = f.lines();
    let mut cp: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&lines[10]).unwrap();
    // One bit of the signature flipped.
    let sig = cp["signature"].as_str().unwrap().to_owned();
    let mut raw = base64::engine::general_purpose::STANDARD
        .decode(sig)
        .unwrap();
    raw[10] ^= 0x01;
    cp["signature"] = base64::engine::general_purpose::STANDARD.encode(raw).into();
    lines[10] = serde_json::to_string(&cp).unwrap();
    f.write_lines(&lines);
    let err = expect_failure(&f, FailureKind::Signature, 11);
    assert_eq!(err.seq, Some(11));
}

#[test]
fn a_checkpoint_forged_with_another_key_or_checked_with_the_wrong_key_fails() {
    let f = fixture();
    let wrong = SigningKey::from_bytes(&[9; 32]);
    let err = audit::verify(std::slice::from_ref(&f.log), &wrong.verifying_key()).unwrap_err();
    assert_eq!((err.kind, err.line), (FailureKind::WrongKey, 11), "{err}");
    let b64 = audit::public_key_base64(&wrong.verifying_key());
    assert_eq!(f.cli(&["verify", "--key", &b64]).0, 1);

    // An attacker re-signs a checkpoint with their own key but claims the real key_id.
    let mut lines = f.lines();
    let mut cp: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&lines[10]).unwrap();
    let msg = audit::checkpoint_message(11, cp["head_hash"].as_str().unwrap());
    let sig = wrong.sign(msg.as_bytes());
    cp["signature"] = base64::engine::general_purpose::STANDARD
        .encode(sig.to_bytes())
        .into();
    lines[10] = serde_json::to_string(&cp).unwrap();
    f.write_lines(&lines);
    expect_failure(&f, FailureKind::Signature, 11);
}

#[test]
fn a_checkpoint_whose_head_hash_was_changed_is_caught() {
    let f = fixture();
    let mut lines = f.lines();
    let mut cp: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&lines[21]).unwrap();
    cp["head_hash"] = "ab".repeat(32).into();
    lines[21] = serde_json::to_string(&cp).unwrap();
    f.write_lines(&lines);
    expect_failure(&f, FailureKind::HeadHash, 22);
}

#[test]
fn deleting_the_first_line_is_caught() {
    let f = fixture();
    let mut lines = f.lines();
    lines.remove(0);
    f.write_lines(&lines);
    expect_failure(&f, FailureKind::Start, 1);
}

#[test]
fn verify_without_any_key_or_with_a_missing_file_exits_2() {
    let f = fixture();
    let config = Config {
        state_dir: PathBuf::from("/nonexistent/enforcer-state"),
        ..f.config.clone()
    };
    let (code, _, err) = cli(&config, &["verify", f.log.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("--key"), "{err}");
    let (code, _, err) = f.cli(&["verify", "/nonexistent/audit.jsonl"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn keygen_writes_a_0600_key_prints_its_public_half_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        state_dir: dir.path().join("state"),
        ..Config::default()
    };
    let key_path = config.audit_key_path();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(
        keygen_with_output(KeygenArgs { public: false }, &config, &mut out, &mut err),
        0
    );
    let printed = String::from_utf8(out).unwrap();
    let public = audit::load_public_half(&key_path).unwrap();
    assert_eq!(printed.trim(), audit::public_key_base64(&public));
    let raw = base64::engine::general_purpose::STANDARD
        .decode(printed.trim())
        .unwrap();
    assert_eq!(raw.len(), 32);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key_path), 0o600);
    assert_eq!(mode(key_path.parent().unwrap()), 0o700);
    let pem = std::fs::read(&key_path).unwrap();

    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(
        keygen_with_output(KeygenArgs { public: false }, &config, &mut out, &mut err),
        1
    );
    let err = String::from_utf8(err).unwrap();
    assert!(err.contains("already exists"), "{err}");
    assert!(out.is_empty());
    assert_eq!(
        std::fs::read(&key_path).unwrap(),
        pem,
        "the key was overwritten"
    );

    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(
        keygen_with_output(KeygenArgs { public: true }, &config, &mut out, &mut err),
        0
    );
    assert_eq!(String::from_utf8(out).unwrap(), printed);
}

#[test]
fn tail_prints_the_last_records_of_one_agent_one_line_each() {
    let f = fixture();
    let (code, out, err) = f.cli(&["tail", "--agent", "beta", "-n", "3"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    for (line, i) in lines.iter().zip([25, 27, 29]) {
        assert!(line.contains(" beta POST api.example.com/v1/x/"), "{line}");
        assert!(line.ends_with(&format!("/v1/x/{i}")), "{line}");
        assert!(
            line.contains(" request ") && line.contains(" deny "),
            "{line}"
        );
    }
    let (code, out, _) = f.cli(&["tail", "-n", "1", "--json"]);
    assert_eq!(code, 0);
    let last: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(last["event"], "checkpoint");
    let (code, _, _) = f.cli(&["tail", "/nonexistent/audit.jsonl"]);
    assert_eq!(code, 1);
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Any one byte changed anywhere before the last line is caught: the line no longer
        /// parses, its seq is wrong, or its hash no longer matches the next record's
        /// prev_hash.
        #[test]
        fn any_changed_byte_before_the_last_line_is_caught(pos in any::<prop::sample::Index>(), xor in 1u8..=255) {
            let f = fixture();
            let mut bytes = std::fs::read(&f.log).unwrap();
            let last_line_start = bytes[..bytes.len() - 1].iter().rposition(|&b| b == b'\n').unwrap() + 1;
            let pos = pos.index(last_line_start);
            bytes[pos] ^= xor;
            std::fs::write(&f.log, &bytes).unwrap();
            prop_assert!(f.verify().is_err(), "byte {pos} ^ {xor:#x} went unnoticed");
        }

        /// A cut anywhere but at a line boundary is reported as a truncated file.
        #[test]
        fn a_cut_inside_a_line_is_reported_as_truncation(pos in any::<prop::sample::Index>()) {
            let f = fixture();
            let bytes = std::fs::read(&f.log).unwrap();
            let cut = pos.index(bytes.len() - 1) + 1;
            prop_assume!(bytes[cut - 1] != b'\n');
            std::fs::write(&f.log, &bytes[..cut]).unwrap();
            let err = f.verify().unwrap_err();
            prop_assert_eq!(err.kind, FailureKind::Truncated, "{}", err);
        }
    }
}

/// Appends a record a hostile operator writes while the daemon is stopped: a valid link in
/// the chain (anyone can hash), but no key to sign it.
fn forge(f: &Fixture, what: &str) -> u64 {
    let lines = f.lines();
    let last = lines.last().unwrap();
    let seq = serde_json::from_str::<serde_json::Value>(last).unwrap()["seq"]
        .as_u64()
        .unwrap()
        + 1;
    let forged = serde_json::json!({
        "seq": seq,
        "timestamp": "2026-12-03T03:00:00.000Z",
        "event": "request",
        "agent_id": "alpha",
        "policy_result": "allow",
        "method": "POST",
        "url_host": "api.example.com",
        "url_path": what,
        "prev_hash": audit::line_hash(last.as_bytes()),
    })
    .to_string();
    let mut all = lines;
    all.push(forged);
    f.write_lines(&all);
    seq
}

fn restart(f: &Fixture) {
    let log = AuditLog::open(AuditOptions {
        checkpoint_records: 10,
        checkpoint_interval: Duration::from_secs(3600),
        ..AuditOptions::from_config(&f.config)
    })
    .unwrap();
    log.record(AuditEvent::new(EventKind::Daemon).action(audit::Action::Start))
        .unwrap();
    log.close();
}

#[test]
fn records_forged_while_the_daemon_was_stopped_are_never_attested_by_the_next_start() {
    let f = fixture();
    let first = forge(&f, "/v1/refunds/forged-1");
    let second = forge(&f, "/v1/refunds/forged-2");
    // Before a restart the chain holds, and the forgery is the unsealed tail.
    let s = f.verify().unwrap();
    assert_eq!(s.unsealed_tail, 2);

    restart(&f);
    let lines = f.lines();
    let noted: serde_json::Value = serde_json::from_str(&lines[second as usize]).unwrap();
    assert_eq!(noted["event"], "daemon");
    assert_eq!(noted["action"], "unsealed");
    assert_eq!(
        (noted["first_seq"].as_u64(), noted["last_seq"].as_u64()),
        (Some(first), Some(second))
    );
    // The next start signed the chain through the forgery, but says it does not vouch for it.
    let s = f.verify().unwrap();
    assert_eq!(s.unsealed_tail, 0);
    assert_eq!(
        s.unsealed,
        [audit::UnsealedRange {
            first,
            last: second,
            noted_at: second + 1
        }]
    );
    let (code, out, err) = f.cli(&["verify"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains(&format!("records {first}..{second}")), "{err}");
    assert!(err.contains("--accept-unsealed"), "{err}");
    assert!(
        out.contains(&format!("UNSEALED:        seq {first}..{second}")),
        "{out}"
    );
    let (code, out, err) = f.cli(&["verify", "--accept-unsealed"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("UNSEALED"), "{out}");

    // A clean stop leaves nothing unsealed: the next start names no range.
    restart(&f);
    assert_eq!(f.verify().unwrap().unsealed.len(), 1);
}

#[test]
fn an_unsealed_record_that_names_less_than_the_unattested_records_is_caught() {
    let f = fixture();
    let first = forge(&f, "/v1/a");
    let second = forge(&f, "/v1/b");
    // The forger also writes the daemon's note, claiming only the second record.
    let mut lines = f.lines();
    let note = serde_json::json!({
        "seq": second + 1,
        "timestamp": "2026-12-03T03:00:00.000Z",
        "event": "daemon",
        "action": "unsealed",
        "first_seq": second,
        "last_seq": second,
        "prev_hash": audit::line_hash(lines.last().unwrap().as_bytes()),
    })
    .to_string();
    lines.push(note);
    f.write_lines(&lines);
    let err = f.verify().unwrap_err();
    assert_eq!(err.kind, FailureKind::Malformed, "{err}");
    assert!(
        err.to_string().contains(&format!("{first}..{second}")),
        "{err}"
    );
}
