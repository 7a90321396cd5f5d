//! `enforcer daemon`.

use std::process::ExitCode;

use crate::config::Config;

pub fn run(config: Config, config_path: Option<std::path::PathBuf>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("enforcer: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(crate::daemon::run(config, config_path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("enforcer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
