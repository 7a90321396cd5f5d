//! `binaries:` on rules: an allow for one executable does not serve another, a deny for one
//! executable stops only it, a `sha256:` that does not match the file matches nothing, and an
//! unknown executable fails closed (no allow, every deny). Real files of this machine: `sh`
//! and `true` from coreutils.

mod common;

use common::{kind_rule, policy, req};
use enforcer::{
    policy::{DecisionKind, Policy, Scheme},
    sys::FileId,
};

fn sha256_hex(path: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// Canonical paths: the kernel names the file, never a symlink to it.
fn real(path: &str) -> String {
    std::fs::canonicalize(path)
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned()
}

fn gh_policy() -> Policy {
    let (sh, tru) = (real("/bin/sh"), real("/bin/true"));
    policy(&format!(
        r#"
default: deny
rules:
  - name: tool-may-push
    allow: {{ method: POST, url: "api.github.test/repos/**" }}
    binaries: [{sh}]
  - name: everyone-reads
    allow: {{ method: GET, url: "api.github.test/**" }}
  - name: not-from-true
    deny: {{ url: "api.github.test/admin/**" }}
    binaries: [{{ path: {tru}, sha256: {} }}]
  - name: wrong-hash
    allow: {{ method: PUT, url: "api.github.test/**" }}
    binaries: [{{ path: {sh}, sha256: "{}" }}]
  - name: ssh
    allow: {{ tcp: "git.github.test:22" }}
    binaries: [{sh}]
"#,
        sha256_hex(&tru),
        "00".repeat(32)
    ))
}

#[test]
fn an_allow_for_one_executable_serves_only_it() {
    let p = gh_policy();
    let push = req("POST", "https://api.github.test/repos/o/r/git/refs");
    assert_eq!(
        kind_rule(&push.clone().exe(&real("/bin/sh")).check(&p)),
        (DecisionKind::Allow, Some("tool-may-push"))
    );
    let d = push.clone().exe(&real("/bin/true")).check(&p);
    assert_eq!(d.kind, DecisionKind::DefaultDeny);
    assert!(
        d.reason.contains("applies only to connections made by"),
        "{}",
        d.reason
    );
    // Unknown: no allow with binaries.
    assert_eq!(push.check(&p).kind, DecisionKind::DefaultDeny);
    // A rule without binaries serves every executable.
    let read = req("GET", "https://api.github.test/repos/o/r");
    assert_eq!(
        kind_rule(&read.exe(&real("/bin/true")).check(&p)),
        (DecisionKind::Allow, Some("everyone-reads"))
    );
}

#[test]
fn a_deny_for_one_executable_stops_it_and_an_unknown_one() {
    let p = gh_policy();
    let admin = req("GET", "https://api.github.test/admin/keys");
    assert_eq!(
        kind_rule(&admin.clone().exe(&real("/bin/true")).check(&p)),
        (DecisionKind::Deny, Some("not-from-true"))
    );
    assert_eq!(
        kind_rule(&admin.clone().exe(&real("/bin/sh")).check(&p)),
        (DecisionKind::Allow, Some("everyone-reads"))
    );
    assert_eq!(admin.check(&p).kind, DecisionKind::Deny);
}

#[test]
fn a_hash_that_does_not_match_the_file_matches_nothing() {
    let p = gh_policy();
    let put = req("PUT", "https://api.github.test/repos/o/r");
    assert_eq!(
        put.exe(&real("/bin/sh")).check(&p).kind,
        DecisionKind::DefaultDeny
    );
}

#[test]
fn host_level_and_tcp_decisions_follow_binaries_too() {
    let p = gh_policy();
    let sh = FileId::of_path(std::path::Path::new(&real("/bin/sh"))).ok();
    let tru = FileId::of_path(std::path::Path::new(&real("/bin/true"))).ok();
    assert_eq!(p.tcp_allowed("git.github.test", 22, sh), Some("ssh"));
    assert_eq!(p.tcp_allowed("git.github.test", 22, tru), None);
    assert_eq!(p.tcp_allowed("git.github.test", 22, None), None);
    let now = jiff::Timestamp::now();
    assert!(
        p.host_decision(Scheme::Https, "api.github.test", 443, now, tru)
            .allowed
    );
}

#[test]
fn bad_binaries_are_refused_at_load_with_the_fix() {
    for (entry, want) in [
        ("[usr/bin/gh]", "not an absolute path"),
        ("[{ path: /usr/bin/gh, sha256: abc }]", "64 hex digits"),
        ("[]", "binaries is empty"),
    ] {
        let yaml = format!(
            "rules:\n  - name: r\n    allow: {{ url: \"x.test\" }}\n    binaries: {entry}\n"
        );
        let e = Policy::from_yaml(yaml.as_bytes(), "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{entry}: {e}");
    }
}
