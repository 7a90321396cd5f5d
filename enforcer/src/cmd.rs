//! CLI subcommands. Each module owns its clap arguments and a `run` function returning the
//! process exit code.

use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};

pub mod approvals;
pub mod audit;
pub mod ca;
pub mod credentials;
pub mod daemon;
pub mod detach;
pub mod enrol;
pub mod exec;
pub mod kill;
pub mod policy;
pub mod status;

/// `--config FILE` (or `ENFORCER_CONFIG`) when given; else `/etc/enforcer/enforcer.yaml` when
/// it exists; else the built-in defaults. Also returns the file it read, if any.
pub fn load_config(path: Option<&Path>) -> Result<(Config, Option<PathBuf>), ConfigError> {
    let file = match path {
        Some(p) => Some(p.to_owned()),
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => Some(PathBuf::from(DEFAULT_CONFIG_PATH)),
        None => None,
    };
    match file {
        Some(f) => {
            // Absolute, so the daemon can watch it whatever its working directory.
            let f = std::path::absolute(&f).unwrap_or(f);
            Ok((Config::load(&f)?, Some(f)))
        }
        None => Ok((Config::default(), None)),
    }
}

/// A runtime for CLI commands that talk to the daemon: current-thread, so that dropping it
/// leaves no thread (and no descriptor) behind, which `enforcer exec` relies on.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
