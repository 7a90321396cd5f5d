//! `enforcer credentials list` and `enforcer credentials env`: what the daemon injects, never
//! a secret.

use std::process::ExitCode;

use crate::{
    admin::{AdminError, Client, api::CredentialsReport},
    config::Config,
};

#[derive(clap::Subcommand, Debug)]
pub enum CredentialsCommand {
    /// Names, variables, hosts, binaries, whether the secret file is usable, last use.
    List {
        /// Only this agent's.
        #[arg(long)]
        agent: Option<String>,
        /// JSON (placeholders left out, as in the table).
        #[arg(long)]
        json: bool,
    },
    /// `VAR=placeholder` lines for an agent enrolled as a service (`EnvironmentFile=`).
    Env {
        #[arg(long)]
        agent: String,
    },
}

pub fn run(cmd: CredentialsCommand, config: &Config) -> ExitCode {
    let client = Client::new(config);
    let result = match super::runtime() {
        Ok(rt) => rt.block_on(client.get::<CredentialsReport>("/v1/credentials")),
        Err(e) => Err(AdminError::Transport(e.to_string())),
    };
    let mut report = match result {
        Ok(r) => r,
        Err(e @ AdminError::NotRunning { .. }) => {
            eprintln!("enforcer credentials: {e}");
            return ExitCode::from(super::status::NOT_RUNNING);
        }
        Err(e) => {
            eprintln!("enforcer credentials: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cmd {
        CredentialsCommand::Env { agent } => {
            if config.agent(&agent).is_none()
                && !report.credentials.iter().any(|c| c.agent == agent)
            {
                eprintln!(
                    "enforcer credentials env: no agent named '{agent}' has credentials; check \
                     `credentials:` under the agent in the config"
                );
                return ExitCode::FAILURE;
            }
            for c in report.credentials.iter().filter(|c| c.agent == agent) {
                println!("{}={}", c.env, c.placeholder);
            }
            ExitCode::SUCCESS
        }
        CredentialsCommand::List { agent, json } => {
            report
                .credentials
                .retain(|c| agent.as_deref().is_none_or(|a| a == c.agent));
            for c in &mut report.credentials {
                c.placeholder.clear();
            }
            if json {
                let views: Vec<serde_json::Value> = report
                    .credentials
                    .iter()
                    .map(|c| {
                        let mut v = serde_json::to_value(c).unwrap_or_default();
                        if let Some(o) = v.as_object_mut() {
                            o.remove("placeholder");
                        }
                        v
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "credentials": views }))
                        .unwrap_or_default()
                );
                return ExitCode::SUCCESS;
            }
            if report.credentials.is_empty() {
                println!("no credentials configured");
            }
            for c in &report.credentials {
                println!("{}/{}  env {}", c.agent, c.name, c.env);
                println!("  hosts     {}", c.hosts.join(", "));
                if !c.binaries.is_empty() {
                    println!("  binaries  {}", c.binaries.join(", "));
                }
                match &c.reason {
                    None => println!("  secret    {} (ok)", c.source),
                    Some(why) => println!("  secret    UNAVAILABLE: {why}"),
                }
                println!(
                    "  last use  {}",
                    c.last_used
                        .as_deref()
                        .unwrap_or("never (since the daemon started)")
                );
            }
            ExitCode::SUCCESS
        }
    }
}
