//! `enforcer status`.

use std::process::ExitCode;

use crate::{
    admin::{AdminError, Client},
    config::Config,
};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Print the raw JSON status.
    #[arg(long)]
    pub json: bool,
}

/// Exit code when no daemon is running.
pub const NOT_RUNNING: u8 = 3;

pub fn run(args: StatusArgs, config: &Config) -> ExitCode {
    let client = Client::new(config.admin_socket_path());
    let result = match super::runtime() {
        Ok(rt) => rt.block_on(client.get::<serde_json::Value>("/v1/status")),
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
    ExitCode::SUCCESS
}

/// Human-readable status.
pub fn render(s: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let d = &s["daemon"];
    let _ = writeln!(
        out,
        "enforcer {} (pid {}), started {}, proxy port {}, {} mode",
        d["version"].as_str().unwrap_or("?"),
        d["pid"],
        d["started"].as_str().unwrap_or("?"),
        d["proxy_port"],
        d["security_mode"].as_str().unwrap_or("?"),
    );
    let global = s["kill_switch"]["global"].as_bool().unwrap_or(false);
    let _ = writeln!(
        out,
        "kill switch: {}",
        if global { "ENGAGED (global)" } else { "off" }
    );
    let a = &s["audit"];
    let _ = writeln!(
        out,
        "audit: {} records, head {}{}",
        a["records_written"],
        a["head_hash"].as_str().unwrap_or("-"),
        if a["healthy"].as_bool() == Some(false) {
            ", FAILING"
        } else {
            ""
        }
    );
    for agent in s["agents"].as_array().into_iter().flatten() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "agent {} ({}){}",
            agent["name"].as_str().unwrap_or("?"),
            agent["origin"].as_str().unwrap_or("?"),
            if agent["killed"].as_bool() == Some(true) {
                "  KILLED"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "  policy   {} ({} rules, {}, sha256 {})",
            agent["policy"].as_str().unwrap_or("?"),
            agent["rules"],
            agent["mode"].as_str().unwrap_or("?"),
            agent["policy_sha256"].as_str().unwrap_or("?"),
        );
        let r = &agent["last_reload"];
        let _ = writeln!(
            out,
            "  reload   {} at {}: {}",
            if r["ok"].as_bool() == Some(true) {
                "ok"
            } else {
                "FAILED"
            },
            r["at"].as_str().unwrap_or("?"),
            r["message"].as_str().unwrap_or(""),
        );
        let c = &agent["counters"];
        let _ = writeln!(
            out,
            "  kernel   redirected {}, refused {}, dropped packets {}; open connections {}",
            c["redirected"], c["refused"], c["dropped_packets"], agent["open_connections"]
        );
        for cg in agent["cgroups"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  cgroup   {} ({})",
                cg["path"].as_str().unwrap_or("?"),
                cg["source"].as_str().unwrap_or("?")
            );
        }
    }
    out
}
