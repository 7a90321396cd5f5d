//! `enforcer enrol` and `enforcer unenrol`.

use std::{path::PathBuf, process::ExitCode};

use crate::{
    admin::{
        Client,
        api::{EnrolRequest, EnrolResponse, Target, UnenrolRequest, UnenrolResponse},
    },
    config::Config,
};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["pid", "cgroup"])))]
pub struct EnrolArgs {
    /// Agent whose policy applies.
    #[arg(long)]
    pub agent: String,
    /// A running process; its threads and descendants are enrolled with it.
    #[arg(long)]
    pub pid: Option<u32>,
    /// An existing cgroup (a systemd service or slice), absolute or relative to the cgroup2
    /// mount.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["pid", "cgroup"])))]
pub struct UnenrolArgs {
    /// A process enrolled with `enrol --pid`; it goes back to its original cgroup.
    #[arg(long)]
    pub pid: Option<u32>,
    /// A cgroup enrolled with `enrol --cgroup`.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
}

fn target(pid: Option<u32>, cgroup: Option<PathBuf>) -> Target {
    match (pid, cgroup) {
        (Some(pid), _) => Target::Pid(pid),
        (None, Some(cg)) => Target::Cgroup(cg.display().to_string()),
        (None, None) => unreachable!("clap requires one"),
    }
}

pub fn enrol(args: EnrolArgs, config: &Config) -> ExitCode {
    let req = EnrolRequest {
        agent: args.agent,
        target: target(args.pid, args.cgroup),
        policy_yaml: None,
    };
    let client = Client::new(config);
    let result = super::runtime().map_err(|e| e.to_string()).and_then(|rt| {
        rt.block_on(client.post::<_, EnrolResponse>("/v1/enrol", &req))
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(resp) => {
            for w in &resp.warnings {
                eprintln!("warning: {w}");
            }
            println!("enrolled under agent '{}': {}", resp.agent, resp.cgroup);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("enforcer: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn unenrol(args: UnenrolArgs, config: &Config) -> ExitCode {
    let req = UnenrolRequest {
        target: target(args.pid, args.cgroup),
    };
    let client = Client::new(config);
    let result = super::runtime().map_err(|e| e.to_string()).and_then(|rt| {
        rt.block_on(client.post::<_, UnenrolResponse>("/v1/unenrol", &req))
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(resp) => {
            println!("unenrolled: {}", resp.cgroup);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("enforcer: {e}");
            ExitCode::FAILURE
        }
    }
}
