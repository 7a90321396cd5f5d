//! `enforcer status`.

use std::process::ExitCode;

use crate::{
    admin::{AdminError, Client},
    agents::Origin,
    config::{Config, SecurityMode},
    enrol::Source,
    policy::Mode,
    status::{HealthState, Status},
};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Print the raw JSON status.
    #[arg(long)]
    pub json: bool,
}

/// Exit code when no daemon is running.
pub const NOT_RUNNING: u8 = 3;
/// Exit code when the daemon runs but reports problems (`/healthz` says degraded).
pub const DEGRADED: u8 = 4;

pub fn run(args: StatusArgs, config: &Config) -> ExitCode {
    let client = Client::new(config);
    let result = match super::runtime() {
        Ok(rt) => rt.block_on(client.get::<Status>("/v1/status")),
        Err(e) => Err(AdminError::Transport(e.to_string())),
    };
    let status = match result {
        Ok(s) => s,
        Err(e @ AdminError::NotRunning { .. }) => {
            eprintln!("enforcer: {e}");
            return ExitCode::from(NOT_RUNNING);
        }
        Err(e) => {
            eprintln!("enforcer: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
    } else {
        print!("{}", render(&status));
    }
    if status.health == HealthState::Degraded {
        ExitCode::from(DEGRADED)
    } else {
        ExitCode::SUCCESS
    }
}

/// Human-readable status.
pub fn render(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let d = &s.daemon;
    let killed: Vec<&str> = s
        .agents
        .iter()
        .filter(|a| a.killed)
        .map(|a| a.name.as_str())
        .collect();
    let _ = writeln!(
        out,
        "enforcer {} (pid {}), started {}, proxy port {}, {} mode, {}{}",
        d.version,
        d.pid,
        d.started,
        d.proxy_port,
        match d.security_mode {
            SecurityMode::Strict => "strict",
            SecurityMode::Permissive => "permissive",
        },
        match s.health {
            HealthState::Healthy => "healthy",
            HealthState::Degraded => "DEGRADED",
            HealthState::Disabled => "no agents",
        },
        if killed.is_empty() {
            String::new()
        } else {
            format!(", KILLED: {}", killed.join(", "))
        },
    );
    for p in &s.problems {
        let _ = writeln!(out, "problem: {p}");
    }
    let _ = writeln!(
        out,
        "kill switch: {}",
        if s.kill_switch.global {
            "ENGAGED (global)"
        } else {
            "off"
        }
    );
    let a = &s.audit;
    let _ = writeln!(
        out,
        "audit: {} records, head {}{}",
        a.records_written,
        a.head_hash,
        if a.healthy { "" } else { ", FAILING" }
    );
    for agent in &s.agents {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "agent {} ({}){}",
            agent.name,
            match agent.origin {
                Origin::Configured => "configured",
                Origin::AdHoc => "ad-hoc",
            },
            if agent.killed { "  KILLED" } else { "" }
        );
        let _ = writeln!(
            out,
            "  policy   {} ({} rules, {}, sha256 {})",
            agent.policy.display(),
            agent.rules,
            match agent.mode {
                Mode::Enforce => "enforce",
                Mode::DryRun => "dry_run",
            },
            agent.policy_sha256,
        );
        let r = &agent.last_reload;
        let _ = writeln!(
            out,
            "  reload   {} at {}: {}",
            if r.ok { "ok" } else { "FAILED" },
            r.at,
            r.message,
        );
        let c = &agent.counters;
        let _ = writeln!(
            out,
            "  kernel   redirected {}, refused {}, dropped packets {}; open connections {}",
            c.redirected, c.refused, c.dropped_packets, agent.open_connections
        );
        for cg in &agent.cgroups {
            let _ = writeln!(
                out,
                "  cgroup   {} ({})",
                cg.path.display(),
                match cg.source {
                    Source::Exec => "exec",
                    Source::Config => "config",
                    Source::Enrolled => "enrolled",
                }
            );
        }
    }
    out
}
