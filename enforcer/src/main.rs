//! `enforcer` binary: parses the command line and dispatches. See `enforcer --help`.

use std::process::ExitCode;

use clap::Parser as _;
use enforcer::{
    cli::{Cli, Command},
    cmd,
};

/// mimalloc: the proxy allocates per request on every worker thread (see `Cargo.toml`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Daemon => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    // Policy commands need no configuration at all.
    if let Command::Policy(c) = cli.command {
        return cmd::policy::run(c, cli.config.as_deref());
    }
    let (config, config_path) = match cmd::load_config(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("enforcer: {e}");
            // `exec` reports its own failures with 125, like env(1).
            return if matches!(cli.command, Command::Exec(_)) {
                ExitCode::from(125)
            } else {
                ExitCode::FAILURE
            };
        }
    };
    match cli.command {
        Command::Daemon => cmd::daemon::run(config, config_path),
        Command::Kill(args) => cmd::kill::kill(args, &config),
        Command::Detach(args) => cmd::detach::run(args, &config),
        Command::Revive(args) => cmd::kill::revive(args, &config),
        Command::Exec(args) => cmd::exec::run(args, &config),
        Command::Enrol(args) => cmd::enrol::enrol(args, &config),
        Command::Unenrol(args) => cmd::enrol::unenrol(args, &config),
        Command::Status(args) => cmd::status::run(args, &config),
        Command::Audit(c) => cmd::audit::run(c, &config),
        Command::Keygen(args) => cmd::audit::keygen(args, &config),
        Command::Ca(c) => cmd::ca::run(c, &config),
        Command::Credentials(c) => cmd::credentials::run(c, &config),
        Command::Approvals(a) => cmd::approvals::list(a, &config),
        Command::Approve(a) => cmd::approvals::approve(a, &config),
        Command::Reject(a) => cmd::approvals::reject(a, &config),
        Command::Policy(_) => unreachable!("handled above"),
    }
}
