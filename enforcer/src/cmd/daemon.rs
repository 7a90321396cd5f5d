//! `enforcer daemon`.

use std::process::ExitCode;

use crate::config::Config;

pub fn run(config: Config, config_path: Option<std::path::PathBuf>) -> ExitCode {
    // SAFETY: still single-threaded: no runtime, no other thread reads the environment.
    let inherited = unsafe { crate::sys::listeners::Inherited::from_env() };
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
    match runtime.block_on(crate::daemon::run(config, config_path, inherited)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("enforcer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
