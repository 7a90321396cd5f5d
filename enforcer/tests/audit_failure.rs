//! A failing audit log: writes fail for real (RLIMIT_FSIZE makes the kernel refuse to grow
//! the file; /dev/full refuses every write), the log turns unhealthy and refuses records, and
//! recovers when writes succeed again. Unprivileged.
//!
//! RLIMIT_FSIZE is per process, so this file is its own test binary, and its tests take a
//! lock so they never overlap.

use std::{
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

use enforcer::audit::{
    self, AuditError, AuditEvent, AuditLog, AuditOptions, EventKind, PolicyResult,
};
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

fn request(i: usize) -> AuditEvent {
    AuditEvent::new(EventKind::Request)
        .request_id(format!("req-{i}"))
        .agent_id("demo")
        .policy_result(PolicyResult::Allow)
        .url_host("api.example.com")
        .url_path(format!("/v1/items/{i}"))
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    // Only catches a hang.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn set_file_size_limit(soft: libc::rlim_t) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim), 0);
        lim.rlim_cur = soft.min(lim.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
    }
}

#[test]
fn a_log_that_cannot_grow_refuses_records_and_recovers_when_it_can() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Growing past the limit raises SIGXFSZ, which would kill the process; ignored, the write
    // fails with EFBIG instead, as a full disk fails with ENOSPC.
    // SAFETY: setting a signal to SIG_IGN has no handler to be unsafe about.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("audit.key");
    let public = audit::generate_key_file(&key_path).unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(AuditOptions {
        path: path.clone(),
        key_path,
        rotate_bytes: 0,
        checkpoint_records: 1000,
        checkpoint_interval: Duration::from_secs(3600),
        max_bytes: 0,
        agent_budget: 0,
    })
    .unwrap();
    let mut accepted = 0;
    for i in 0..5 {
        log.record(request(i)).unwrap();
        accepted += 1;
    }
    log.flush().unwrap();
    let size = std::fs::metadata(&path).unwrap().len();

    // Room for about one more record: the next ones fail, one of them mid-line.
    set_file_size_limit(size + 150);
    let mut refused = 0;
    for i in 5..50 {
        match log.record(request(i)) {
            Ok(()) => accepted += 1,
            Err(AuditError::Failing { reason }) => {
                assert!(reason.contains("audit.jsonl"), "{reason}");
                refused += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    let err = log.flush().unwrap_err();
    assert!(matches!(err, AuditError::Failing { .. }), "{err}");
    assert!(!log.healthy());
    assert!(log.stats().failing);
    assert!(matches!(
        log.record(request(99)),
        Err(AuditError::Failing { .. })
    ));
    refused += 1;
    // The partial record was cut off: the file still ends on a whole line.
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.last(), Some(&b'\n'));
    audit::verify(std::slice::from_ref(&path), &public).unwrap();

    // Room again: the writer retries on its own.
    set_file_size_limit(libc::RLIM_INFINITY);
    wait_for("the log to recover", || log.healthy());
    log.record(request(100)).unwrap();
    accepted += 1;
    log.close();

    let records: Vec<Value> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Every accepted record is there, once, in order; none of the refused ones.
    let ids: Vec<&str> = records
        .iter()
        .filter(|r| r["event"] == "request")
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), accepted, "{ids:?}");
    assert!(!ids.contains(&"req-99"));
    let resumed = records
        .iter()
        .find(|r| r["action"] == "resumed")
        .expect("a resumed record");
    assert_eq!(resumed["event"], "daemon");
    let reason = resumed["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("{refused} records were refused")),
        "{reason}"
    );
    assert_eq!(log.stats().refused, refused as u64);
    let summary = audit::verify(&[path], &public).unwrap();
    assert_eq!(summary.unsealed_tail, 0);
}

#[test]
fn a_log_on_dev_full_is_unhealthy_and_refuses_records() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !Path::new("/dev/full").exists() {
        eprintln!("SKIPPED: no /dev/full on this system");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("audit.key");
    audit::generate_key_file(&key_path).unwrap();
    let log = AuditLog::open(AuditOptions {
        path: "/dev/full".into(),
        key_path,
        rotate_bytes: 0,
        checkpoint_records: 1000,
        checkpoint_interval: Duration::from_secs(3600),
        max_bytes: 0,
        agent_budget: 0,
    })
    .unwrap();
    assert!(log.healthy());
    log.record(request(0)).unwrap();
    wait_for("the log to notice", || !log.healthy());
    match log.record(request(1)) {
        Err(AuditError::Failing { reason }) => {
            assert!(reason.contains("No space left"), "{reason}")
        }
        other => panic!("expected Failing, got {other:?}"),
    }
    assert!(log.flush().is_err());
    log.close();
}
