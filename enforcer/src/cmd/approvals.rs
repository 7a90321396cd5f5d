//! `enforcer approvals`, `enforcer approve` and `enforcer reject`: requests held by `ask`
//! rules, answered over the admin socket (root and `admin_group` members; never from inside an
//! enrolled cgroup).

use std::process::ExitCode;

use crate::{
    admin::{
        AdminError, Client,
        api::{ApprovalAnswer, ApprovalsReport},
    },
    config::Config,
};

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Keep listing, once a second.
    #[arg(long)]
    pub follow: bool,
    /// JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ApproveArgs {
    /// The approval id (`enforcer approvals`, or the denial's `approval_id`).
    pub id: String,
    /// This request only (the default); answered after its timeout, one retry.
    #[arg(long, conflicts_with = "for_")]
    pub once: bool,
    /// Also let requests of the same rule, method and host through for this long: `10m`,
    /// `90s`, `1h`.
    #[arg(long = "for", value_name = "DURATION")]
    pub for_: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct RejectArgs {
    pub id: String,
    /// What the agent reads in the 403.
    #[arg(long)]
    pub reason: Option<String>,
}

fn call<T>(
    config: &Config,
    f: impl AsyncFnOnce(&Client) -> Result<T, AdminError>,
) -> Result<T, ExitCode> {
    let client = Client::new(config);
    let result = match super::runtime() {
        Ok(rt) => rt.block_on(f(&client)),
        Err(e) => Err(AdminError::Transport(e.to_string())),
    };
    result.map_err(|e| {
        eprintln!("enforcer: {e}");
        match e {
            AdminError::NotRunning { .. } => ExitCode::from(super::status::NOT_RUNNING),
            _ => ExitCode::FAILURE,
        }
    })
}

/// `10m`, `90s`, `1h`, `2d` as seconds.
fn seconds(text: &str) -> Option<u64> {
    let t = text.trim();
    let (n, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return None,
    })
}

pub fn list(args: ListArgs, config: &Config) -> ExitCode {
    loop {
        let report = match call(config, async |c| {
            c.get::<ApprovalsReport>("/v1/approvals").await
        }) {
            Ok(r) => r,
            Err(code) => return code,
        };
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
        } else if report.approvals.is_empty() {
            println!("no requests waiting for approval");
        } else {
            for a in &report.approvals {
                let fields: Vec<String> =
                    a.fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!(
                    "{}  {}  {} {}  agent {} pid {} {}{}  rule {}  {}s{}",
                    a.id,
                    a.state,
                    a.method,
                    a.url,
                    a.agent,
                    a.pid,
                    a.comm,
                    a.exe
                        .as_deref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default(),
                    a.rule,
                    a.age_secs,
                    if fields.is_empty() {
                        String::new()
                    } else {
                        format!("  {}", fields.join(" "))
                    }
                );
            }
        }
        if !args.follow {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

pub fn approve(args: ApproveArgs, config: &Config) -> ExitCode {
    let for_secs = match &args.for_ {
        None => None,
        Some(t) => match seconds(t) {
            Some(s) if s > 0 => Some(s),
            _ => {
                eprintln!(
                    "enforcer approve: --for '{t}' is not a duration; write it like 10m or 90s"
                );
                return ExitCode::from(2);
            }
        },
    };
    let answer = ApprovalAnswer {
        id: args.id.clone(),
        approve: true,
        for_secs,
        reason: None,
    };
    match call(config, async |c| {
        c.post::<_, serde_json::Value>("/v1/approvals/answer", &answer)
            .await
    }) {
        Ok(_) => {
            eprintln!("approved {}", args.id);
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

pub fn reject(args: RejectArgs, config: &Config) -> ExitCode {
    let answer = ApprovalAnswer {
        id: args.id.clone(),
        approve: false,
        for_secs: None,
        reason: args.reason,
    };
    match call(config, async |c| {
        c.post::<_, serde_json::Value>("/v1/approvals/answer", &answer)
            .await
    }) {
        Ok(_) => {
            eprintln!("rejected {}", args.id);
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}
