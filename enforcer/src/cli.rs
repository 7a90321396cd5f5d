//! Command-line interface: the argument definitions. `main.rs` dispatches them to `cmd::*`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::cmd;

/// Host egress enforcer for AI agents: eBPF on the agent's cgroup sends its traffic through a
/// policy-judging proxy, refuses the rest in the kernel, and signs every decision into an
/// audit log.
#[derive(Parser, Debug)]
#[command(name = "enforcer", version, propagate_version = true)]
pub struct Cli {
    /// Configuration file [default: /etc/enforcer/enforcer.yaml, or built-in defaults when
    /// that file does not exist].
    #[arg(long, global = true, env = "ENFORCER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: load and attach the eBPF programs, serve the proxy and the admin API.
    Daemon,
    /// Run a command enrolled under an agent's policy (the whole process tree stays enrolled).
    #[command(after_long_help = cmd::exec::AFTER_HELP, after_help = cmd::exec::AFTER_HELP)]
    Exec(cmd::exec::ExecArgs),
    /// Enrol a running process (with its threads and descendants) or an existing cgroup.
    Enrol(cmd::enrol::EnrolArgs),
    /// Release a process or cgroup enrolled with `enforcer enrol`.
    Unenrol(cmd::enrol::UnenrolArgs),
    /// Show agents, cgroups, policy hashes, counters and the kill-switch state.
    Status(cmd::status::StatusArgs),
    /// Engage the kill switch (global, or one agent's): new connections are refused in the
    /// kernel and open streams are cut.
    Kill(cmd::kill::KillArgs),
    /// Lift the kill switch engaged by `enforcer kill`.
    Revive(cmd::kill::KillArgs),
    /// Remove every pinned eBPF link and map (for uninstall). Refuses while the daemon runs
    /// unless --force.
    Detach(cmd::detach::DetachArgs),
    /// Check policies and explain decisions.
    #[command(subcommand)]
    Policy(cmd::policy::PolicyCommand),
    /// Verify and read the audit log.
    #[command(subcommand)]
    Audit(cmd::audit::AuditCommand),
    /// Create the audit signing key (config `audit_key`) and print its public half.
    Keygen(cmd::audit::KeygenArgs),
    /// The local CA that signs intercepted TLS.
    #[command(subcommand)]
    Ca(cmd::ca::CaCommand),
    /// Requests held by `ask` rules, waiting for a human.
    Approvals(cmd::approvals::ListArgs),
    /// Let a held request through (and, with --for, the same rule, method and host for a
    /// while).
    Approve(cmd::approvals::ApproveArgs),
    /// Refuse a held request; the agent reads the reason.
    Reject(cmd::approvals::RejectArgs),
    /// Secrets the proxy injects for agents: list them, print an agent's placeholders.
    #[command(subcommand)]
    Credentials(cmd::credentials::CredentialsCommand),
}
