//! `enforcer policy check` and `enforcer policy explain`.

use std::{io::Write, path::PathBuf, process::ExitCode};

use http::{HeaderMap, HeaderName, HeaderValue, header::CONTENT_TYPE};
use serde::Serialize;

use crate::policy::{
    BODY_INSPECTION_LIMIT, Decision, DecisionKind, Policy, RateLimiter, Request, Scheme,
};

#[derive(clap::Subcommand, Debug)]
pub enum PolicyCommand {
    /// Load and check policy files; prints "ok: FILE (N rules, sha256 HEX)" for each.
    /// Exits 1 if any file has an error.
    Check(CheckArgs),
    /// Show the decision a policy gives one request (rate limits start empty). Exits 0
    /// whatever the decision, 2 on bad input.
    Explain(ExplainArgs),
    /// Write a policy (YAML, on stdout) that allows what an agent's audit records show it
    /// doing: allowed, would_deny and denied requests, connections, kernel refusals, DNS
    /// denials.
    Suggest(SuggestArgs),
    /// Judge every recorded request and connection again under a new policy and report what
    /// would change. Exits 0 when nothing changes, 1 when something does, 2 on error.
    Replay(ReplayArgs),
}

#[derive(clap::Args, Debug)]
pub struct SuggestArgs {
    /// The agent whose records are read.
    #[arg(long)]
    pub agent: String,
    /// Only records this recent: `24h`, `30m`, `7d`, or an RFC 3339 time.
    #[arg(long, value_name = "AGE")]
    pub since: Option<String>,
    /// Keep this policy's rules and add only what they do not allow, in a marked section.
    #[arg(long, value_name = "CURRENT.yaml")]
    pub base: Option<PathBuf>,
    /// Audit files (default: the configured `audit_log` and its rotated files).
    #[arg(value_name = "AUDIT")]
    pub files: Vec<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// The policy to judge the records under.
    #[arg(long, value_name = "NEW.yaml")]
    pub policy: PathBuf,
    /// Only this agent's records.
    #[arg(long)]
    pub agent: Option<String>,
    /// The report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Audit files (default: the configured `audit_log` and its rotated files).
    #[arg(value_name = "AUDIT")]
    pub files: Vec<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Policy files to check.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ExplainArgs {
    /// The policy file.
    #[arg(long, value_name = "FILE")]
    pub policy: PathBuf,
    /// The request method.
    #[arg(long, value_name = "M")]
    pub method: String,
    /// The request URL with its scheme, e.g. `https://api.stripe.com/v1/charges?x=1`.
    #[arg(long, value_name = "URL")]
    pub url: String,
    /// A request header, 'Name: value'; repeat for several.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// The request body. Content-Type defaults to application/json when a body is given.
    #[arg(long, value_name = "JSON", conflicts_with = "body_file")]
    pub body: Option<String>,
    /// Read the request body from a file.
    #[arg(long, value_name = "F")]
    pub body_file: Option<PathBuf>,
    /// When the request happens (RFC 3339, e.g. 2025-01-06T10:00:00Z). Default: now.
    #[arg(long, value_name = "RFC3339")]
    pub at: Option<String>,
    /// The executable that makes the request, for rules with `binaries:` (resolved to its
    /// device and inode on this machine). Default: unknown, which no `binaries:` allow
    /// matches and every `binaries:` deny does.
    #[arg(long, value_name = "PATH")]
    pub exe: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs a `policy` subcommand on the process's stdout and stderr. `config` is `--config`,
/// read only by the commands that need the audit log's place (and only when no file is
/// given).
pub fn run(cmd: PolicyCommand, config: Option<&std::path::Path>) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    match cmd {
        PolicyCommand::Suggest(args) => suggest(&args, config, &mut out, &mut err),
        PolicyCommand::Replay(args) => replay(&args, config, &mut out, &mut err),
        other => run_to(other, &mut out, &mut err),
    }
}

/// The files to read: those given, else the configured audit log's.
fn audit_files(
    given: &[PathBuf],
    config: Option<&std::path::Path>,
) -> Result<Vec<PathBuf>, String> {
    if !given.is_empty() {
        return Ok(given.to_vec());
    }
    let (config, _) = super::load_config(config).map_err(|e| e.to_string())?;
    let files = crate::traffic::default_files(&config.audit_log).map_err(|e| {
        format!(
            "cannot list the audit files of {}: {e}",
            config.audit_log.display()
        )
    })?;
    if files.is_empty() {
        return Err(format!(
            "no audit log at {}; pass the audit files to read",
            config.audit_log.display()
        ));
    }
    Ok(files)
}

/// `24h`, `30m`, `7d`, `90s`, or an RFC 3339 time.
fn since(text: &str) -> Result<jiff::Timestamp, String> {
    if let Ok(t) = text.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    let (n, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: i64 = n.parse().map_err(|_| {
        format!("--since '{text}': give an age like 24h, 30m, 7d, or an RFC 3339 time")
    })?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("--since '{text}': the unit is s, m, h or d")),
    };
    Ok(jiff::Timestamp::now() - jiff::SignedDuration::from_secs(secs))
}

fn suggest(
    args: &SuggestArgs,
    config: Option<&std::path::Path>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> ExitCode {
    let run = || -> Result<String, String> {
        let since = args.since.as_deref().map(since).transpose()?;
        let files = audit_files(&args.files, config)?;
        let records =
            crate::traffic::read(&files, Some(&args.agent), since).map_err(|e| e.to_string())?;
        if records.is_empty() {
            return Err(crate::traffic::TrafficError::NoRecords(args.agent.clone()).to_string());
        }
        let base = match &args.base {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read --base {}: {e}", path.display()))?;
                let policy = Policy::from_yaml(text.as_bytes(), &path.display().to_string())
                    .map_err(|e| e.to_string())?;
                Some((text, policy))
            }
            None => None,
        };
        crate::traffic::suggest::suggest(
            &args.agent,
            &records,
            base.as_ref().map(|(t, p)| (t.as_str(), p)),
        )
        .map_err(|e| e.to_string())
    };
    match run() {
        Ok(text) => {
            let _ = write!(out, "{text}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            let _ = writeln!(err, "error: {message}");
            ExitCode::from(2)
        }
    }
}

fn replay(
    args: &ReplayArgs,
    config: Option<&std::path::Path>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> ExitCode {
    let run = || -> Result<crate::traffic::replay::Report, String> {
        let policy = Policy::load(&args.policy).map_err(|e| e.to_string())?;
        let files = audit_files(&args.files, config)?;
        let records =
            crate::traffic::read(&files, args.agent.as_deref(), None).map_err(|e| e.to_string())?;
        Ok(crate::traffic::replay::replay(&policy, &records))
    };
    match run() {
        Ok(report) => {
            if args.json {
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                let _ = write!(out, "{}", crate::traffic::replay::render(&report));
            }
            if report.changed() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(message) => {
            let _ = writeln!(err, "error: {message}");
            ExitCode::from(2)
        }
    }
}

/// Runs a `policy` subcommand, writing to `out` and `err` (tests use this).
pub fn run_to(cmd: PolicyCommand, out: &mut dyn Write, err: &mut dyn Write) -> ExitCode {
    // Write errors on stdout/stderr (a closed pipe) have nowhere to be reported; the exit
    // code still tells.
    match cmd {
        PolicyCommand::Check(args) => check(&args, out, err),
        PolicyCommand::Suggest(args) => suggest(&args, None, out, err),
        PolicyCommand::Replay(args) => replay(&args, None, out, err),
        PolicyCommand::Explain(args) => match explain(&args) {
            Ok(decision) => {
                let _ = print_decision(&decision, args.json, out);
                ExitCode::SUCCESS
            }
            Err(message) => {
                let _ = writeln!(err, "error: {message}");
                ExitCode::from(2)
            }
        },
    }
}

fn check(args: &CheckArgs, out: &mut dyn Write, err: &mut dyn Write) -> ExitCode {
    let mut failed = false;
    for file in &args.files {
        match Policy::check(file) {
            Ok(policy) => {
                let n = policy.rule_count();
                let _ = writeln!(
                    out,
                    "ok: {} ({n} rule{}, sha256 {})",
                    file.display(),
                    if n == 1 { "" } else { "s" },
                    policy.sha256()
                );
            }
            Err(errors) => {
                failed = true;
                for e in errors {
                    let _ = writeln!(err, "error: {e}");
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn explain(args: &ExplainArgs) -> Result<Decision, String> {
    let policy = Policy::load(&args.policy).map_err(|e| e.to_string())?;
    let url = url::Url::parse(&args.url).map_err(|e| {
        format!(
            "--url '{}': {e} (give a full URL such as https://host/path)",
            args.url
        )
    })?;
    let scheme = match url.scheme() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => return Err(format!("--url: scheme '{other}' is not http or https")),
    };
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_owned(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err("--url has no host".to_owned()),
    };
    let port = url.port_or_known_default().unwrap_or(scheme.default_port());
    let target = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    if http::Method::from_bytes(args.method.as_bytes()).is_err() {
        return Err(format!(
            "--method '{}' is not an HTTP method token",
            args.method
        ));
    }

    let mut headers = HeaderMap::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| format!("--header '{h}' is not 'Name: value'"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("--header '{h}': invalid header name"))?;
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| format!("--header '{h}': invalid header value"))?;
        headers.append(name, value);
    }

    let body: Option<Vec<u8>> = match (&args.body, &args.body_file) {
        (Some(b), _) => Some(b.clone().into_bytes()),
        (None, Some(path)) => {
            Some(std::fs::read(path).map_err(|e| format!("--body-file {}: {e}", path.display()))?)
        }
        (None, None) => None,
    };
    if body.is_some() && !headers.contains_key(CONTENT_TYPE) {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    // Like the proxy: a body over the inspection limit is cut and flagged.
    let truncated = body
        .as_ref()
        .is_some_and(|b| b.len() > BODY_INSPECTION_LIMIT);
    let body_slice = body
        .as_deref()
        .map(|b| &b[..b.len().min(BODY_INSPECTION_LIMIT)]);

    let now = match &args.at {
        Some(at) => at
            .parse::<jiff::Timestamp>()
            .map_err(|e| format!("--at '{at}' is not an RFC 3339 time: {e}"))?,
        None => jiff::Timestamp::now(),
    };
    let exe = match &args.exe {
        Some(p) => Some(
            crate::sys::FileId::of_path(p).map_err(|e| format!("--exe {}: {e}", p.display()))?,
        ),
        None => None,
    };

    let request = Request {
        scheme,
        method: &args.method,
        host: &host,
        port,
        path_and_query: &target,
        headers: &headers,
        body: body_slice,
        body_truncated: truncated,
        now,
        exe,
    };
    Ok(policy.evaluate(&request, &RateLimiter::new()))
}

#[derive(Serialize)]
struct JsonDecision<'a> {
    decision: &'static str,
    kind: DecisionKind,
    rule: Option<&'a str>,
    reason: &'a str,
    dry_run: bool,
}

fn print_decision(d: &Decision, json: bool, out: &mut dyn Write) -> std::io::Result<()> {
    let verdict = match d.kind {
        _ if d.allowed => "allow",
        DecisionKind::Ask => "ask",
        _ => "deny",
    };
    if json {
        let line = serde_json::to_string(&JsonDecision {
            decision: verdict,
            kind: d.kind,
            rule: d.rule.as_deref(),
            reason: &d.reason,
            dry_run: d.dry_run,
        })
        .map_err(std::io::Error::other)?;
        return writeln!(out, "{line}");
    }
    let kind = match d.kind {
        DecisionKind::Allow => "allow",
        DecisionKind::Deny => "deny",
        DecisionKind::RateLimited => "rate_limited",
        DecisionKind::DefaultDeny => "default_deny",
        DecisionKind::Ask => "ask",
    };
    writeln!(out, "decision: {verdict}")?;
    writeln!(out, "kind:     {kind}")?;
    writeln!(out, "rule:     {}", d.rule.as_deref().unwrap_or("-"))?;
    writeln!(out, "reason:   {}", d.reason)?;
    if d.dry_run {
        writeln!(out, "mode:     dry_run (not enforced)")?;
    }
    Ok(())
}
