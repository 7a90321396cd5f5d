//! `enforcer detach --all`: removes every pinned link and map, for uninstall. Enrolled cgroups
//! are no longer enforced afterwards, so it refuses while the daemon runs unless `--force`.

use std::process::ExitCode;

use crate::{admin::Client, config::Config};

#[derive(clap::Args, Debug)]
pub struct DetachArgs {
    /// Detach every program from every cgroup and remove every pinned map.
    #[arg(long, required = true)]
    pub all: bool,
    /// Even while the daemon runs (enforcement stops at once; the daemon's next restart
    /// attaches everything again).
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: DetachArgs, config: &Config) -> ExitCode {
    debug_assert!(args.all);
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "enforcer: detach needs root (it removes pins under {})",
            config.bpffs_dir.display()
        );
        return ExitCode::FAILURE;
    }
    let running = super::runtime()
        .ok()
        .map(|rt| {
            rt.block_on(Client::new(config).get::<serde_json::Value>("/v1/status"))
                .is_ok()
        })
        .unwrap_or(false);
    if running && !args.force {
        eprintln!(
            "enforcer: the daemon is running; stop it first (systemctl stop enforcer), or pass \
             --force to detach anyway (enrolled cgroups stop being enforced at once)"
        );
        return ExitCode::FAILURE;
    }
    let dir = &config.bpffs_dir;
    if !dir.exists() {
        println!("nothing pinned under {}", dir.display());
        return ExitCode::SUCCESS;
    }
    let links = std::fs::read_dir(dir.join("links"))
        .map(|d| d.count())
        .unwrap_or(0);
    // Removing a link's pin drops the last reference and detaches it; removing a map's pin
    // frees the map once no program uses it.
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {
            println!(
                "detached every program from {links} cgroup(s) and removed the pinned maps under {}",
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("enforcer: cannot remove {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
