//! The audit writer, end to end on a temporary directory: chain, checkpoints, rotation,
//! torn-record sealing, key checks, concurrency, scrubbing, and checkpoint signatures checked
//! by OpenSSL. Unprivileged.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use base64::Engine as _;
use ed25519_dalek::VerifyingKey;
use enforcer::audit::{
    self, Action, AuditError, AuditEvent, AuditLog, AuditOptions, EventKind, FailureKind,
    PolicyResult, VerifyOptions,
};
use serde_json::Value;

/// A key in `<dir>/state/audit.key` and options for `<dir>/log/audit.jsonl` that checkpoint
/// only by count (the time-based checkpoint is an hour away, so tests are deterministic).
fn setup(dir: &Path) -> (AuditOptions, VerifyingKey) {
    let key_path = dir.join("state/audit.key");
    let public = audit::generate_key_file(&key_path).unwrap();
    let opts = AuditOptions {
        path: dir.join("log/audit.jsonl"),
        key_path,
        rotate_bytes: 0,
        checkpoint_records: 10,
        checkpoint_interval: Duration::from_secs(3600),
        max_bytes: 0,
        agent_budget: 0,
    };
    (opts, public)
}

fn request(i: usize) -> AuditEvent {
    AuditEvent::new(EventKind::Request)
        .request_id(format!("req-{i}"))
        .agent_id(format!("agent-{}", i % 3))
        .pid(1000 + i as u32)
        .comm("curl")
        .policy_result(PolicyResult::Allow)
        .matched_rule("allow_all")
        .url_host("api.example.com")
        .method("GET")
        .url_path(format!("/v1/items/{i}"))
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn all_files(live: &Path) -> Vec<PathBuf> {
    let mut files = audit::rotated_files(live).unwrap();
    files.push(live.to_owned());
    files
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    // Only catches a hang.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn clean_log_has_checkpoints_every_n_records_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, public) = setup(dir.path());
    let path = opts.path.clone();
    let log = AuditLog::open(opts).unwrap();
    assert!(log.healthy());
    for i in 0..25 {
        log.record(request(i)).unwrap();
    }
    log.close();
    assert!(!log.healthy());

    let records = lines(&path);
    // 25 records, checkpoints after the 10th and 20th, and a final one at close.
    assert_eq!(records.len(), 28);
    let checkpoints: Vec<u64> = records
        .iter()
        .filter(|r| r["event"] == "checkpoint")
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(checkpoints, [11, 22, 28]);
    assert_eq!(records[0]["seq"], 1);
    assert_eq!(records[0]["prev_hash"], audit::GENESIS_HASH);
    let ts = records[0]["timestamp"].as_str().unwrap();
    assert!(ts.ends_with('Z') && ts.len() == 24, "{ts}");

    let summary = audit::verify(std::slice::from_ref(&path), &public).unwrap();
    assert_eq!(summary.records, 28);
    assert_eq!(summary.checkpoints, 3);
    assert_eq!(summary.last_sealed_seq, Some(28));
    assert_eq!(summary.unsealed_tail, 0);
    assert!(summary.starts_at_genesis);

    let stats = log.stats();
    assert_eq!(stats.records_written, 28);
    assert_eq!(stats.last_seq, 28);
    assert_eq!(stats.checkpoints, 3);
    assert_eq!(Some(stats.head_hash), summary.head_hash);
    assert!(!stats.failing);
}

#[test]
fn a_checkpoint_follows_within_the_interval_when_records_are_pending() {
    let dir = tempfile::tempdir().unwrap();
    let (mut opts, public) = setup(dir.path());
    opts.checkpoint_records = 0;
    opts.checkpoint_interval = Duration::from_millis(100);
    let path = opts.path.clone();
    let log = AuditLog::open(opts).unwrap();
    log.record(request(0)).unwrap();
    wait_for("a time-based checkpoint", || log.stats().checkpoints == 1);
    let summary = audit::verify(std::slice::from_ref(&path), &public).unwrap();
    assert_eq!(summary.last_sealed_seq, Some(2));
    assert_eq!(summary.unsealed_tail, 0);
    log.close();
    // Nothing pending at close: no extra checkpoint.
    assert_eq!(log.stats().checkpoints, 1);
}

#[test]
fn reopening_continues_the_chain_and_a_second_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, public) = setup(dir.path());
    let path = opts.path.clone();
    let log = AuditLog::open(opts.clone()).unwrap();
    log.record(request(0)).unwrap();
    let err = AuditLog::open(opts.clone()).unwrap_err();
    assert!(matches!(err, AuditError::Locked { .. }), "{err}");
    log.close();
    log.close(); // idempotent
    assert!(matches!(log.record(request(1)), Err(AuditError::Closed)));

    let log = AuditLog::open(opts).unwrap();
    assert_eq!(log.stats().last_seq, 2);
    log.record(request(2)).unwrap();
    log.close();
    let records = lines(&path);
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    audit::verify(&[path], &public).unwrap();
}

#[test]
fn the_chain_continues_across_rotated_files() {
    let dir = tempfile::tempdir().unwrap();
    let (mut opts, public) = setup(dir.path());
    opts.rotate_bytes = 4096;
    let path = opts.path.clone();
    let log = AuditLog::open(opts).unwrap();
    for i in 0..200 {
        log.record(request(i)).unwrap();
    }
    log.close();

    let rotated = audit::rotated_files(&path).unwrap();
    assert!(rotated.len() >= 5, "{rotated:?}");
    let mut expected_first = 1;
    for file in &rotated {
        let records = lines(file);
        // Named after its first seq, and ends with a checkpoint.
        let name = file.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, format!("audit.jsonl.{expected_first:020}"));
        assert_eq!(records[0]["seq"], expected_first);
        assert_eq!(records.last().unwrap()["event"], "checkpoint");
        assert!(std::fs::metadata(file).unwrap().len() >= 4096);
        expected_first = records.last().unwrap()["seq"].as_u64().unwrap() + 1;
    }
    let files = all_files(&path);
    let summary = audit::verify(&files, &public).unwrap();
    assert_eq!(summary.files, rotated.len() + 1);
    assert_eq!(summary.first_seq, Some(1));

    // The live file alone links to a file not given: refused unless --partial.
    let alone = audit::verify(std::slice::from_ref(&path), &public).unwrap_err();
    assert_eq!(alone.kind, FailureKind::Start, "{alone}");
    let options = VerifyOptions {
        allow_partial: true,
        anchor: None,
    };
    let partial = audit::verify_with(std::slice::from_ref(&path), &public, &options).unwrap();
    assert!(!partial.starts_at_genesis);

    // A rotated file missing from the middle breaks the chain.
    let mut gap = files.clone();
    gap.remove(2);
    let err = audit::verify(&gap, &public).unwrap_err();
    assert_eq!(err.kind, FailureKind::Sequence, "{err}");
    assert_eq!(err.file, files[3]);
    assert_eq!(err.line, 1);
}

#[test]
fn an_empty_live_file_after_rotation_continues_from_the_newest_rotated_file() {
    let dir = tempfile::tempdir().unwrap();
    let (mut opts, public) = setup(dir.path());
    // Every record rotates: each closed file holds one record and its checkpoint, and the
    // live file is left empty.
    opts.rotate_bytes = 1;
    let path = opts.path.clone();
    let log = AuditLog::open(opts.clone()).unwrap();
    for i in 0..3 {
        log.record(request(i)).unwrap();
    }
    log.close();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    assert_eq!(audit::rotated_files(&path).unwrap().len(), 3);

    let log = AuditLog::open(opts).unwrap();
    assert_eq!(log.stats().last_seq, 6);
    log.record(request(3)).unwrap();
    log.close();
    let summary = audit::verify(&all_files(&path), &public).unwrap();
    assert_eq!(summary.last_seq, Some(8));
}

#[test]
fn a_torn_final_record_is_sealed_off_at_open_and_the_log_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, public) = setup(dir.path());
    let path = opts.path.clone();
    let log = AuditLog::open(opts.clone()).unwrap();
    for i in 0..4 {
        log.record(request(i)).unwrap();
    }
    log.close();
    let intact_len = std::fs::metadata(&path).unwrap().len();

    // A crash mid-write: part of a record, no newline.
    let torn = br#"{"seq":6,"timestamp":"2026-03-14T02:14:37.512Z","event":"requ"#;
    append(&path, torn);
    let err = audit::verify(std::slice::from_ref(&path), &public).unwrap_err();
    assert_eq!(err.kind, FailureKind::Truncated, "{err}");

    let log = AuditLog::open(opts.clone()).unwrap();
    log.close();
    // The torn bytes are kept as evidence, byte for byte, and cut from the live file.
    let evidence = torn_files(&path);
    assert_eq!(evidence.len(), 1);
    assert_eq!(std::fs::read(&evidence[0]).unwrap(), torn);
    let records = lines(&path);
    let sealed = &records[5];
    assert_eq!(sealed["seq"], 6);
    assert_eq!(sealed["event"], "daemon");
    assert_eq!(sealed["action"], "sealed");
    let reason = sealed["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("{} bytes", torn.len())),
        "{reason}"
    );
    assert!(reason.contains("after seq 5"), "{reason}");
    assert!(reason.contains(evidence[0].to_str().unwrap()), "{reason}");
    assert!(std::fs::metadata(&path).unwrap().len() > intact_len);
    let summary = audit::verify(std::slice::from_ref(&path), &public).unwrap();
    assert_eq!(summary.unsealed_tail, 0);

    // A zero-filled tail (what a crash can leave on ext4) is sealed the same way, even when
    // it spans what look like lines.
    let mut zeros = vec![0u8; 4096];
    zeros[100] = b'\n';
    append(&path, &zeros);
    let log = AuditLog::open(opts).unwrap();
    log.record(request(9)).unwrap();
    log.close();
    assert_eq!(torn_files(&path).len(), 2);
    audit::verify(&[path], &public).unwrap();
}

fn append(path: &Path, bytes: &[u8]) {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(bytes).unwrap();
}

fn torn_files(live: &Path) -> Vec<PathBuf> {
    let prefix = audit::torn_file_prefix(live);
    let prefix = prefix.file_name().unwrap().to_str().unwrap().to_owned();
    let mut found: Vec<_> = std::fs::read_dir(live.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(&prefix)
        })
        .collect();
    found.sort();
    found
}

#[test]
fn a_key_readable_by_others_or_missing_is_refused_with_an_actionable_message() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, _) = setup(dir.path());
    std::fs::set_permissions(&opts.key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = AuditLog::open(opts.clone()).unwrap_err();
    assert!(
        matches!(err, AuditError::KeyPermissions { mode: 0o644, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("chmod 600"), "{err}");
    std::fs::set_permissions(&opts.key_path, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(matches!(
        AuditLog::open(opts.clone()),
        Err(AuditError::KeyPermissions { .. })
    ));

    std::fs::remove_file(&opts.key_path).unwrap();
    let err = AuditLog::open(opts.clone()).unwrap_err();
    assert!(matches!(err, AuditError::KeyMissing { .. }), "{err}");
    assert!(err.to_string().contains("enforcer keygen"), "{err}");
    // Nothing was created for a daemon that could not start.
    assert!(!opts.path.exists());
}

#[test]
fn many_threads_recording_get_contiguous_seqs_and_an_intact_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (mut opts, public) = setup(dir.path());
    opts.checkpoint_records = 97;
    opts.rotate_bytes = 256 * 1024;
    let path = opts.path.clone();
    let log = AuditLog::open(opts).unwrap();
    const THREADS: usize = 8;
    const EACH: usize = 1000;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let log = log.clone();
            s.spawn(move || {
                for i in 0..EACH {
                    let ev = AuditEvent::new(EventKind::Request)
                        .agent_id(format!("thread-{t}"))
                        .request_id(format!("{t}-{i}"))
                        .count(i as u64);
                    // The queue holds more than all of them: none may be refused.
                    log.record(ev).unwrap();
                }
            });
        }
    });
    log.close();
    let files = all_files(&path);
    let summary = audit::verify(&files, &public).unwrap();
    assert_eq!(summary.unsealed_tail, 0);
    let mut per_thread = vec![Vec::new(); THREADS];
    let mut seqs = Vec::new();
    for file in &files {
        for r in lines(file) {
            seqs.push(r["seq"].as_u64().unwrap());
            if r["event"] == "request" {
                let agent = r["agent_id"].as_str().unwrap();
                let t: usize = agent.strip_prefix("thread-").unwrap().parse().unwrap();
                per_thread[t].push(r["count"].as_u64().unwrap());
            }
        }
    }
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    for (t, counts) in per_thread.iter().enumerate() {
        // Every record of every thread, in the order that thread recorded them.
        assert_eq!(counts, &(0..EACH as u64).collect::<Vec<_>>(), "thread {t}");
    }
    assert_eq!(log.stats().refused, 0);
}

#[test]
fn query_strings_and_credentials_never_reach_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, _) = setup(dir.path());
    let path = opts.path.clone();
    let log = AuditLog::open(opts).unwrap();
    log.record(
        AuditEvent::new(EventKind::Request)
            .url_host("alice:s3cr3t-password@api.example.com")
            .url_path("/v1/search?api_key=SECRET-TOKEN&q=x#frag-SECRET"),
    )
    .unwrap();
    log.record(
        AuditEvent::new(EventKind::Request)
            .url_path("https://bob:pw-SECRET@h.example/p?token=SECRET"),
    )
    .unwrap();
    log.close();
    let text = std::fs::read_to_string(&path).unwrap();
    for secret in ["SECRET", "s3cr3t", "api_key", "alice", "bob", "?", "#frag"] {
        assert!(!text.contains(secret), "{secret} leaked into {text}");
    }
    let records = lines(&path);
    assert_eq!(records[0]["url_path"], "/v1/search");
    assert_eq!(records[0]["url_host"], "api.example.com");
    assert_eq!(records[1]["url_path"], "/p");
}

#[test]
fn callers_cannot_write_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, _) = setup(dir.path());
    let log = AuditLog::open(opts).unwrap();
    let err = log
        .record(AuditEvent::new(EventKind::Checkpoint))
        .unwrap_err();
    assert!(matches!(err, AuditError::Reserved), "{err}");
    log.close();
}

#[test]
fn a_storm_of_kernel_refusals_becomes_one_record_per_agent_and_destination() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, public) = setup(dir.path());
    let path = opts.path.clone();
    let log = AuditLog::open(opts).unwrap();
    let dest: SocketAddr = "198.51.100.7:443".parse().unwrap();
    for _ in 0..5000 {
        log.kernel_deny("demo", 4242, "python3", dest, "not_allowed");
    }
    log.kernel_deny("other", 1, "nc", dest, "not_allowed");
    log.flush().unwrap();
    log.close();
    let denies: Vec<Value> = lines(&path)
        .into_iter()
        .filter(|r| r["event"] == "kernel_deny")
        .collect();
    assert_eq!(denies.len(), 2, "{denies:?}");
    assert_eq!(denies[0]["agent_id"], "demo");
    assert_eq!(denies[0]["dest"], "198.51.100.7:443");
    assert_eq!(denies[0]["count"], 5000);
    assert_eq!(denies[0]["pid"], 4242);
    assert_eq!(denies[0]["comm"], "python3");
    assert_eq!(denies[0]["policy_result"], "deny");
    assert_eq!(denies[1]["count"], 1);
    audit::verify(&[path], &public).unwrap();
}

#[test]
fn every_event_kind_serializes_with_checkrd_field_names() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, public) = setup(dir.path());
    let path = opts.path.clone();
    let log = AuditLog::open(opts).unwrap();
    log.record(
        AuditEvent::new(EventKind::Completion)
            .request_id("r1")
            .status_code(200)
            .latency_ms(412)
            .bytes_up(10)
            .bytes_down(2048),
    )
    .unwrap();
    log.record(
        AuditEvent::new(EventKind::KillSwitch)
            .action(Action::Engaged)
            .scope(audit::Scope::Agent)
            .agent_id("demo"),
    )
    .unwrap();
    log.record(
        AuditEvent::new(EventKind::Policy)
            .action(Action::Rejected)
            .policy_sha256("ab".repeat(32))
            .reason("line 3: unknown key"),
    )
    .unwrap();
    log.record(
        AuditEvent::new(EventKind::Dns)
            .dns_name("evil.example")
            .policy_result(PolicyResult::Deny),
    )
    .unwrap();
    log.close();
    let r = lines(&path);
    assert_eq!(r[0]["event"], "completion");
    assert_eq!(r[0]["latency_ms"], 412);
    assert_eq!(r[0]["bytes_down"], 2048);
    assert_eq!(r[1]["event"], "kill_switch");
    assert_eq!(r[1]["action"], "engaged");
    assert_eq!(r[1]["scope"], "agent");
    assert_eq!(r[2]["action"], "rejected");
    assert_eq!(r[3]["event"], "dns");
    assert_eq!(r[3]["dns_name"], "evil.example");
    // Absent fields are absent, not null.
    assert!(r[3].get("url_host").is_none());
    audit::verify(&[path], &public).unwrap();
}

#[test]
fn checkpoint_signatures_verify_with_openssl() {
    // An independent Ed25519 implementation (OpenSSL 3) checks our checkpoints, reading the
    // key file we wrote, so the formats interoperate.
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("SKIPPED: the openssl command is not installed; cannot cross-check signatures");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (opts, public) = setup(dir.path());
    let path = opts.path.clone();
    let key_path = opts.key_path.clone();
    let log = AuditLog::open(opts).unwrap();
    for i in 0..25 {
        log.record(request(i)).unwrap();
    }
    log.close();

    let pub_pem = dir.path().join("pub.pem");
    openssl(&["pkey", "-in", p(&key_path), "-pubout", "-out", p(&pub_pem)]);
    let der = openssl(&["pkey", "-in", p(&key_path), "-pubout", "-outform", "DER"]);
    assert_eq!(
        &der[der.len() - 32..],
        public.as_bytes(),
        "openssl reads another public key"
    );

    let mut checked = 0;
    for record in lines(&path) {
        if record["event"] != "checkpoint" {
            continue;
        }
        let seq = record["seq"].as_u64().unwrap();
        let head = record["head_hash"].as_str().unwrap();
        let msg = dir.path().join("msg");
        let sig = dir.path().join("sig");
        std::fs::write(&msg, format!("enforcer-audit-v1:{seq}:{head}")).unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(record["signature"].as_str().unwrap())
            .unwrap();
        std::fs::write(&sig, raw).unwrap();
        let verify = |msg: &Path| {
            Command::new("openssl")
                .args([
                    "pkeyutl",
                    "-verify",
                    "-pubin",
                    "-inkey",
                    p(&pub_pem),
                    "-rawin",
                ])
                .args(["-in", p(msg), "-sigfile", p(&sig)])
                .output()
                .unwrap()
        };
        let out = verify(&msg);
        assert!(
            out.status.success(),
            "openssl rejects checkpoint {seq}: {}",
            String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr)
        );
        // And it does reject a signature over another message.
        std::fs::write(&msg, format!("enforcer-audit-v1:{}:{head}", seq + 1)).unwrap();
        assert!(!verify(&msg).status.success());
        checked += 1;
    }
    assert_eq!(checked, 3);
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn a_live_file_deleted_or_replaced_under_traffic_is_recreated_with_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, public) = setup(dir.path());
    let path = opts.path.clone();
    let log = AuditLog::open(opts).unwrap();
    for i in 0..5 {
        log.record(request(i)).unwrap();
    }
    log.flush().unwrap();

    // Deleted: records keep coming, the writer notices within a check interval, and the
    // file at the path holds every record again, then says what happened.
    std::fs::remove_file(&path).unwrap();
    for i in 5..8 {
        log.record(request(i)).unwrap();
    }
    wait_for("the deleted live file to be recreated", || path.exists());
    log.flush().unwrap();
    let records = lines(&path);
    assert_eq!(
        records[0]["seq"], 1,
        "the recreated file starts at the first record"
    );
    let reopened: Vec<_> = records
        .iter()
        .filter(|r| r["action"] == "reopened")
        .collect();
    assert_eq!(reopened.len(), 1, "{records:?}");
    assert!(
        reopened[0]["reason"]
            .as_str()
            .unwrap()
            .contains("was deleted"),
        "{:?}",
        reopened[0]
    );
    assert!(log.healthy());

    // Replaced by another file: that file is kept aside as evidence, not adopted.
    let other = path.with_extension("new");
    std::fs::write(&other, b"{\"seq\":1}\n").unwrap();
    std::fs::rename(&other, &path).unwrap();
    log.record(request(8)).unwrap();
    wait_for("the replaced live file to be restored", || {
        lines(&path).iter().any(|r| {
            r["reason"]
                .as_str()
                .is_some_and(|t| t.contains("was replaced"))
        })
    });
    let aside: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_str().unwrap().contains("-replaced-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read(&aside[0]).unwrap(), b"{\"seq\":1}\n");

    // Cannot be recreated (its directory is now a file): writes are refused, so strict mode
    // denies, until it can be again.
    let log_dir = path.parent().unwrap().to_owned();
    std::fs::remove_dir_all(&log_dir).unwrap();
    std::fs::write(&log_dir, b"not a directory").unwrap();
    wait_for("the log to fail", || !log.healthy());
    assert!(log.record(request(9)).is_err());
    std::fs::remove_file(&log_dir).unwrap();
    wait_for("the log to recover", || log.healthy());
    log.record(request(10)).unwrap();
    log.close();
    let summary = audit::verify(std::slice::from_ref(&path), &public).unwrap();
    assert_eq!(summary.unsealed_tail, 0);
    let requests: Vec<_> = lines(&path)
        .into_iter()
        .filter(|r| r["event"] == "request")
        .map(|r| r["request_id"].as_str().unwrap().to_owned())
        .collect();
    let expected: Vec<_> = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10]
        .iter()
        .map(|i| format!("req-{i}"))
        .collect();
    assert_eq!(requests, expected);
}

#[test]
fn rotated_files_stay_within_audit_max_bytes_and_a_record_says_what_was_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut opts, public) = setup(dir.path());
    opts.rotate_bytes = 4096;
    opts.max_bytes = 16 * 1024;
    let path = opts.path.clone();
    let log = AuditLog::open(opts).unwrap();
    for i in 0..1000 {
        log.record(request(i)).unwrap();
    }
    log.close();
    let rotated = audit::rotated_files(&path).unwrap();
    let total: u64 = rotated
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    // Within the budget (rotation overshoots the size by at most one batch per file).
    assert!(total <= 16 * 1024 + 4096, "{total} bytes in {rotated:?}");
    let pruned: Vec<_> = all_files(&path)
        .iter()
        .flat_map(|f| lines(f))
        .filter(|r| r["action"] == "pruned")
        .collect();
    assert!(!pruned.is_empty());
    assert!(
        pruned[0]["reason"]
            .as_str()
            .unwrap()
            .contains("audit_max_bytes"),
        "{:?}",
        pruned[0]
    );
    // What is left is one intact chain, that starts later.
    let options = VerifyOptions {
        allow_partial: true,
        anchor: None,
    };
    let summary = audit::verify_with(&all_files(&path), &public, &options).unwrap();
    assert!(!summary.starts_at_genesis);
    assert_eq!(summary.last_seq, log.stats().last_seq.into());
}
