//! CLI subcommands. Each module owns its clap arguments and a `run` function returning the
//! process exit code.
pub mod audit;
pub mod policy;
