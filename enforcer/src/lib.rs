//! `enforcer`: a host egress enforcer for AI agents.
//!
//! eBPF programs attached to an agent's cgroup send its outbound TCP to a local proxy and its
//! DNS to a local resolver, and refuse everything else in the kernel. The daemon judges what
//! reaches it against the agent's YAML policy, and writes every decision to a signed,
//! hash-chained audit log.
//!
//! # Layout
//! - [`config`]: the daemon's YAML configuration.
//! - [`policy`]: the policy language: parsing, compilation and evaluation.
//! - [`audit`]: the hash-chained, Ed25519-signed audit log and its verifier.
//! - [`proxy`]: the transparent proxy: classification, splicing, and L7 enforcement of
//!   HTTP/1.x and HTTP/2 (plain or intercepted TLS).
//! - [`ca`]: the local CA whose leaf certificates the proxy shows when it intercepts TLS.
//! - [`cmd`]: the CLI subcommands; `main.rs` only parses arguments and dispatches.
pub mod admin;
pub mod agents;
pub mod audit;
pub mod bpf;
pub mod ca;
pub mod cgroup;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dns;
pub mod enrol;
pub mod metrics;
pub mod policy;
pub mod proxy;
