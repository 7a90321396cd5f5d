//! The example policies in `policies/`, each with explain cases run through the CLI code
//! (`enforcer policy check` and `enforcer policy explain`).

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use enforcer::cmd::policy::{PolicyCommand, run_to};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: PolicyCommand,
}

fn policies_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

/// Runs `enforcer policy ARGS...`; returns exit code, stdout, stderr.
fn run(args: &[&str]) -> (ExitCode, String, String) {
    let cli = Cli::try_parse_from(std::iter::once("policy").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run_to(cli.cmd, &mut out, &mut err);
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

/// `explain --json` on a policy of `policies/`; returns (decision, kind, rule, reason).
fn explain(
    policy: &str,
    method: &str,
    url: &str,
    extra: &[&str],
) -> (String, String, String, String) {
    let path = policies_dir().join(policy);
    let mut args = vec![
        "explain",
        "--policy",
        path.to_str().unwrap(),
        "--method",
        method,
        "--url",
        url,
        "--json",
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = run(&args);
    assert_eq!(code, ExitCode::SUCCESS, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let s = |k: &str| match &v[k] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    (s("decision"), s("kind"), s("rule"), s("reason"))
}

/// Table of (method, url, extra args, decision, rule).
type Case<'a> = (&'a str, &'a str, &'a [&'a str], &'a str, &'a str);

fn check_cases(policy: &str, cases: &[Case<'_>]) {
    for (method, url, extra, decision, rule) in cases {
        let got = explain(policy, method, url, extra);
        assert_eq!(
            (got.0.as_str(), got.2.as_str()),
            (*decision, *rule),
            "{policy}: {method} {url} {extra:?}: {}",
            got.3
        );
    }
}

const WEEKDAY_10: &str = "2025-01-06T10:00:00Z";

#[test]
fn cli_definition_is_consistent() {
    use clap::CommandFactory;
    Cli::command().debug_assert();
    // --body and --body-file exclude each other.
    let both = Cli::try_parse_from([
        "policy",
        "explain",
        "--policy",
        "p",
        "--method",
        "GET",
        "--url",
        "http://a/",
        "--body",
        "{}",
        "--body-file",
        "f",
    ]);
    assert!(both.is_err());
}

#[test]
fn every_policy_file_checks() {
    let mut files: Vec<String> = std::fs::read_dir(policies_dir())
        .unwrap()
        .map(|e| e.unwrap().path().to_str().unwrap().to_owned())
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "{files:?}");
    let mut args = vec!["check"];
    args.extend(files.iter().map(String::as_str));
    let (code, out, err) = run(&args);
    assert_eq!(code, ExitCode::SUCCESS, "{err}");
    for (line, file) in out.lines().zip(&files) {
        assert!(line.starts_with(&format!("ok: {file} (")), "{line}");
        let sha = line.rsplit("sha256 ").next().unwrap().trim_end_matches(')');
        assert_eq!(sha.len(), 64);
    }
}

#[test]
fn check_reports_errors_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "rules:\n  - name: x\n    allow: { method: [GRT] }\n").unwrap();
    let good = policies_dir().join("deny-all.yaml");
    let (code, out, err) = run(&["check", good.to_str().unwrap(), bad.to_str().unwrap()]);
    assert_eq!(code, ExitCode::FAILURE);
    assert!(
        out.starts_with("ok: ") && out.contains("(0 rules, sha256 "),
        "{out}"
    );
    assert_eq!(
        err,
        format!(
            "error: {}:3:23: rule 'x': unknown method 'GRT' (expected one of GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, CONNECT, TRACE)\n",
            bad.display()
        )
    );
}

#[test]
fn checkrd_sales_agent_means_what_checkrd_says() {
    let at = ["--at", WEEKDAY_10];
    let json =
        |body: &'static str| -> Vec<&'static str> { vec!["--at", WEEKDAY_10, "--body", body] };
    let small = json(r#"{"amount": 100}"#);
    let large = json(r#"{"amount": 60000}"#);
    let form = [
        "--at",
        WEEKDAY_10,
        "--header",
        "Content-Type: application/x-www-form-urlencoded",
        "--body",
        "amount=2000&currency=usd",
    ];
    check_cases(
        "checkrd-sales-agent.yaml",
        &[
            (
                "GET",
                "https://api.salesforce.com/v59/sobjects/Contact/003xx",
                &at,
                "allow",
                "read-contacts",
            ),
            (
                "POST",
                "https://api.salesforce.com/v59/sobjects/Contact/003xx",
                &at,
                "deny",
                "-",
            ),
            (
                "POST",
                "https://api.stripe.com/v1/charges",
                &small,
                "allow",
                "create-small-charges",
            ),
            (
                "POST",
                "https://api.stripe.com/v1/charges",
                &large,
                "deny",
                "create-small-charges",
            ),
            (
                "POST",
                "https://api.stripe.com/v1/charges",
                &form,
                "allow",
                "create-small-charges",
            ),
            (
                "DELETE",
                "https://api.stripe.com/v1/charges/ch_1",
                &at,
                "deny",
                "block-all-deletes",
            ),
            (
                "DELETE",
                "https://api.salesforce.com/v59/sobjects/Contact/1",
                &at,
                "deny",
                "block-all-deletes",
            ),
            (
                "GET",
                "https://api.salesforce.com/v59/sobjects/Contact/003xx",
                &["--at", "2025-01-06T20:00:00Z"],
                "deny",
                "business-hours-only",
            ),
        ],
    );
    let (_, kind, _, reason) = explain(
        "checkrd-sales-agent.yaml",
        "POST",
        "https://api.stripe.com/v1/charges",
        &large,
    );
    assert_eq!(kind, "default_deny");
    assert_eq!(
        reason,
        "rule 'create-small-charges' requires $.amount <= 50000, got 60000"
    );
    let (_, kind, _, reason) = explain(
        "checkrd-sales-agent.yaml",
        "DELETE",
        "https://api.stripe.com/v1/charges",
        &at,
    );
    assert_eq!(
        (kind.as_str(), reason.as_str()),
        ("deny", "denied by rule 'block-all-deletes'")
    );
}

#[test]
fn checkrd_openai_allows_listed_models_only() {
    let model = |m: &'static str| -> [&'static str; 2] {
        [
            "--body",
            if m == "gpt-4o" {
                r#"{"model":"gpt-4o","messages":[]}"#
            } else {
                r#"{"model":"gpt-5","messages":[]}"#
            },
        ]
    };
    let chat = "https://api.openai.com/v1/chat/completions";
    check_cases(
        "checkrd-openai.yaml",
        &[
            ("POST", chat, &model("gpt-4o"), "allow", "allow_openai_chat"),
            ("POST", chat, &model("gpt-5"), "deny", "allow_openai_chat"),
            ("GET", "https://api.openai.com/v1/models", &[], "deny", "-"),
            (
                "POST",
                chat,
                &["--body", "not json"],
                "deny",
                "allow_openai_chat",
            ),
        ],
    );
    let (_, _, _, reason) = explain("checkrd-openai.yaml", "POST", chat, &["--body", "not json"]);
    assert_eq!(
        reason,
        "rule 'allow_openai_chat' requires $.model in [\"gpt-4o\", \"gpt-4o-mini\"], but the body could not be inspected: not JSON"
    );
}

#[test]
fn openai_policy() {
    let chat = "https://api.openai.com/v1/chat/completions";
    check_cases(
        "openai.yaml",
        &[
            (
                "POST",
                chat,
                &["--body", r#"{"model":"gpt-4o-mini"}"#],
                "allow",
                "openai-chat",
            ),
            (
                "POST",
                "https://api.openai.com/v1/responses",
                &["--body", r#"{"model":"gpt-4.1"}"#],
                "allow",
                "openai-chat",
            ),
            (
                "POST",
                chat,
                &["--body", r#"{"model":"o3-pro"}"#],
                "deny",
                "openai-chat",
            ),
            (
                "GET",
                "https://api.openai.com/v1/models",
                &[],
                "allow",
                "openai-list-models",
            ),
            (
                "GET",
                "https://api.openai.com/v1/models/gpt-4o",
                &[],
                "allow",
                "openai-list-models",
            ),
            ("POST", "https://api.openai.com/v1/files", &[], "deny", "-"),
            (
                "POST",
                "https://api.openai.com.evil.net/v1/chat/completions",
                &["--body", r#"{"model":"gpt-4o"}"#],
                "deny",
                "-",
            ),
        ],
    );
}

#[test]
fn anthropic_policy() {
    let messages = "https://api.anthropic.com/v1/messages";
    let version = "anthropic-version: 2023-06-01";
    let ok = [
        "--header",
        version,
        "--body",
        r#"{"model":"claude-sonnet-4-5","max_tokens":1024}"#,
    ];
    let big = [
        "--header",
        version,
        "--body",
        r#"{"model":"claude-sonnet-4-5","max_tokens":100000}"#,
    ];
    let other = [
        "--header",
        version,
        "--body",
        r#"{"model":"claude-2","max_tokens":10}"#,
    ];
    let no_version = [
        "--body",
        r#"{"model":"claude-sonnet-4-5","max_tokens":1024}"#,
    ];
    check_cases(
        "anthropic.yaml",
        &[
            ("POST", messages, &ok, "allow", "anthropic-messages"),
            ("POST", messages, &big, "deny", "anthropic-messages"),
            ("POST", messages, &other, "deny", "anthropic-messages"),
            ("POST", messages, &no_version, "deny", "-"),
            (
                "POST",
                "https://api.anthropic.com/v1/messages/count_tokens",
                &[],
                "allow",
                "anthropic-count-tokens",
            ),
            (
                "GET",
                "https://api.anthropic.com/v1/models",
                &[],
                "allow",
                "anthropic-list-models",
            ),
            (
                "DELETE",
                "https://api.anthropic.com/v1/files/f",
                &[],
                "deny",
                "-",
            ),
        ],
    );
}

#[test]
fn github_readonly_policy() {
    check_cases(
        "github-readonly.yaml",
        &[
            (
                "GET",
                "https://api.github.com/repos/rust-lang/rust",
                &[],
                "allow",
                "github-read",
            ),
            (
                "HEAD",
                "https://github.com/rust-lang/rust",
                &[],
                "allow",
                "github-read",
            ),
            (
                "GET",
                "https://github.com/rust-lang/rust.git/info/refs?service=git-upload-pack",
                &[],
                "allow",
                "github-read",
            ),
            (
                "POST",
                "https://github.com/rust-lang/rust.git/git-upload-pack",
                &["--exe", "/usr/lib/git-core/git-remote-https"],
                "allow",
                "git-fetch",
            ),
            // The same POST from anything but git's transport (or from an executable not
            // named): refused.
            (
                "POST",
                "https://github.com/rust-lang/rust.git/git-upload-pack",
                &["--exe", "/usr/bin/curl"],
                "deny",
                "git-fetch",
            ),
            (
                "POST",
                "https://github.com/rust-lang/rust.git/git-upload-pack",
                &[],
                "deny",
                "git-fetch",
            ),
            (
                "POST",
                "https://github.com/rust-lang/rust.git/git-receive-pack",
                &[],
                "deny",
                "no-push",
            ),
            (
                "POST",
                "https://api.github.com/repos/o/r/issues",
                &[],
                "deny",
                "-",
            ),
            (
                "PATCH",
                "https://api.github.com/repos/o/r",
                &[],
                "deny",
                "-",
            ),
            (
                "DELETE",
                "https://api.github.com/repos/o/r",
                &[],
                "deny",
                "-",
            ),
            (
                "GET",
                "https://raw.githubusercontent.com/o/r/main/README.md",
                &[],
                "allow",
                "github-read",
            ),
            ("GET", "https://gist.github.com/", &[], "deny", "-"),
        ],
    );
}

#[test]
fn package_registries_policy() {
    check_cases(
        "package-registries.yaml",
        &[
            (
                "GET",
                "https://pypi.org/simple/requests/",
                &[],
                "allow",
                "python-packages",
            ),
            (
                "GET",
                "https://files.pythonhosted.org/packages/ab/cd/requests-2.32.tar.gz",
                &[],
                "allow",
                "python-packages",
            ),
            (
                "POST",
                "https://upload.pypi.org/legacy/",
                &[],
                "deny",
                "no-publishing",
            ),
            (
                "GET",
                "https://index.crates.io/se/rd/serde",
                &[],
                "allow",
                "rust-crates",
            ),
            (
                "GET",
                "https://static.crates.io/crates/serde/serde-1.0.0.crate",
                &[],
                "allow",
                "rust-crates",
            ),
            (
                "PUT",
                "https://crates.io/api/v1/crates/new",
                &[],
                "deny",
                "no-publishing",
            ),
            (
                "GET",
                "https://registry.npmjs.org/left-pad",
                &[],
                "allow",
                "npm-packages",
            ),
            (
                "PUT",
                "https://registry.npmjs.org/left-pad",
                &[],
                "deny",
                "no-publishing",
            ),
            (
                "GET",
                "https://evil.example/simple/requests/",
                &[],
                "deny",
                "-",
            ),
        ],
    );
}

#[test]
fn deny_all_and_demo_policies() {
    check_cases(
        "deny-all.yaml",
        &[
            ("GET", "https://example.com/", &[], "deny", "-"),
            ("GET", "http://10.0.0.1:8080/", &[], "deny", "-"),
        ],
    );
    check_cases(
        "demo.yaml",
        &[
            ("GET", "https://example.com/", &[], "allow", "example-read"),
            (
                "HEAD",
                "http://www.example.com/index.html",
                &[],
                "allow",
                "example-read",
            ),
            ("POST", "https://example.com/", &[], "deny", "-"),
            (
                "GET",
                "https://httpbin.org/get?x=1",
                &[],
                "allow",
                "httpbin-get",
            ),
            ("GET", "https://httpbin.org/post", &[], "deny", "-"),
            ("GET", "https://example.org/", &[], "deny", "-"),
        ],
    );
}

#[test]
fn explain_human_output_and_bad_input() {
    let policy = policies_dir().join("checkrd-sales-agent.yaml");
    let p = policy.to_str().unwrap();
    let (code, out, _) = run(&[
        "explain",
        "--policy",
        p,
        "--method",
        "DELETE",
        "--url",
        "https://api.stripe.com/v1/charges/ch_1",
        "--at",
        WEEKDAY_10,
    ]);
    assert_eq!(code, ExitCode::SUCCESS);
    assert_eq!(
        out,
        "decision: deny\nkind:     deny\nrule:     block-all-deletes\nreason:   denied by rule 'block-all-deletes'\n"
    );
    let (_, out, _) = run(&[
        "explain",
        "--policy",
        p,
        "--method",
        "GET",
        "--url",
        "https://api.salesforce.com/v1/sobjects/Contact/1",
        "--at",
        WEEKDAY_10,
        "--json",
    ]);
    assert_eq!(
        out,
        "{\"decision\":\"allow\",\"kind\":\"allow\",\"rule\":\"read-contacts\",\"reason\":\"allowed by rule 'read-contacts'\",\"dry_run\":false}\n"
    );

    for args in [
        &["--url", "api.stripe.com/v1/charges"][..],
        &["--url", "ftp://api.stripe.com/"],
        &["--url", "https://api.stripe.com/", "--at", "yesterday"],
        &["--url", "https://api.stripe.com/", "--header", "no colon"],
        &[
            "--url",
            "https://api.stripe.com/",
            "--body-file",
            "/nonexistent/body.json",
        ],
    ] {
        let mut full = vec!["explain", "--policy", p, "--method", "GET"];
        full.extend_from_slice(args);
        let (code, out, err) = run(&full);
        assert_eq!(code, ExitCode::from(2), "{args:?}");
        assert!(
            out.is_empty() && err.starts_with("error: --"),
            "{args:?}: {err}"
        );
    }
    let (code, _, err) = run(&[
        "explain",
        "--policy",
        "/nonexistent.yaml",
        "--method",
        "GET",
        "--url",
        "https://a.com/",
    ]);
    assert_eq!(code, ExitCode::from(2));
    assert!(
        err.starts_with("error: cannot read policy /nonexistent.yaml"),
        "{err}"
    );
}

#[test]
fn explain_flags_dry_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dry.yaml");
    std::fs::write(&path, "mode: dry_run\ndefault: deny\n").unwrap();
    let (code, out, _) = run(&[
        "explain",
        "--policy",
        path.to_str().unwrap(),
        "--method",
        "GET",
        "--url",
        "http://example.com:8080/a?b",
        "--header",
        "X-A: 1",
    ]);
    assert_eq!(code, ExitCode::SUCCESS);
    assert_eq!(
        out,
        "decision: deny\nkind:     default_deny\nrule:     -\nreason:   no rule allows GET example.com:8080/a (default deny)\nmode:     dry_run (not enforced)\n"
    );
}

#[test]
fn explain_reads_body_files_and_flags_oversized_ones() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.json");
    std::fs::write(&small, r#"{"amount": 100}"#).unwrap();
    let big = dir.path().join("big.json");
    std::fs::write(&big, vec![b' '; (1 << 20) + 1]).unwrap();
    let url = "https://api.stripe.com/v1/charges";
    let (d, _, _, _) = explain(
        "checkrd-sales-agent.yaml",
        "POST",
        url,
        &["--at", WEEKDAY_10, "--body-file", small.to_str().unwrap()],
    );
    assert_eq!(d, "allow");
    let (d, _, _, reason) = explain(
        "checkrd-sales-agent.yaml",
        "POST",
        url,
        &["--at", WEEKDAY_10, "--body-file", big.to_str().unwrap()],
    );
    assert_eq!(d, "deny");
    assert!(
        reason.ends_with("body could not be inspected: body exceeds the 1 MiB inspection limit"),
        "{reason}"
    );
}
