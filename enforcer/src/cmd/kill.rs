//! `enforcer kill` and `enforcer revive`: create and remove the kill-switch files the daemon
//! watches. They work with the daemon down too: a file present at start holds from the first
//! instant.

use std::{path::PathBuf, process::ExitCode};

use crate::{
    config::{Config, validate_agent_name},
    control::killfiles,
};

#[derive(clap::Args, Debug)]
pub struct KillArgs {
    /// Only this agent; without it, every agent.
    #[arg(long)]
    pub agent: Option<String>,
}

fn path_for(args: &KillArgs, config: &Config) -> Result<PathBuf, String> {
    let Some(name) = &args.agent else {
        return Ok(config.kill_switch_path());
    };
    validate_agent_name(name)?;
    let adhoc = config.state_dir.join("agents").join(format!("{name}.yaml"));
    if config.agent(name).is_none() && !adhoc.exists() {
        let known: Vec<&str> = config.agents.iter().map(|a| a.name.as_str()).collect();
        return Err(format!(
            "no agent named '{name}'; configured agents: {}",
            if known.is_empty() {
                "(none)".into()
            } else {
                known.join(", ")
            }
        ));
    }
    Ok(config.agent_kill_path(name))
}

pub fn kill(args: KillArgs, config: &Config) -> ExitCode {
    let path = match path_for(&args, config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("enforcer: {e}");
            return ExitCode::FAILURE;
        }
    };
    match killfiles::create(&path) {
        Ok(()) => {
            let scope = args
                .agent
                .as_deref()
                .map_or("every agent".to_string(), |a| format!("agent '{a}'"));
            println!("kill switch engaged for {scope} ({})", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "enforcer: cannot create {}: {e}; run as root",
                path.display()
            );
            ExitCode::FAILURE
        }
    }
}

pub fn revive(args: KillArgs, config: &Config) -> ExitCode {
    let path = match path_for(&args, config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("enforcer: {e}");
            return ExitCode::FAILURE;
        }
    };
    match killfiles::remove(&path) {
        Ok(true) => {
            println!("kill switch lifted ({})", path.display());
            if args.agent.is_some() && killfiles::engaged(&config.kill_switch_path()) {
                println!(
                    "note: the global kill switch {} is still engaged",
                    config.kill_switch_path().display()
                );
            }
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("kill switch was not engaged ({})", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "enforcer: cannot remove {}: {e}; run as root",
                path.display()
            );
            ExitCode::FAILURE
        }
    }
}
