//! CLI subcommands. Each module owns its clap arguments and a `run` function returning the
//! process exit code.

use std::path::Path;

use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};

pub mod audit;
pub mod ca;
pub mod daemon;
pub mod enrol;
pub mod exec;
pub mod policy;
pub mod status;

/// `--config FILE` (or `ENFORCER_CONFIG`) when given; else `/etc/enforcer/enforcer.yaml` when
/// it exists; else the built-in defaults.
pub fn load_config(path: Option<&Path>) -> Result<Config, ConfigError> {
    match path {
        Some(p) => Config::load(p),
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
            Config::load(Path::new(DEFAULT_CONFIG_PATH))
        }
        None => Ok(Config::default()),
    }
}

/// A runtime for CLI commands that talk to the daemon: current-thread, so that dropping it
/// leaves no thread (and no descriptor) behind, which `enforcer exec` relies on.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
