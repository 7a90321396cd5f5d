//! `enforcer`: a host egress enforcer for AI agents.
//!
//! eBPF programs attached to an agent's cgroup send its outbound TCP to a local proxy and its
//! DNS to a local resolver, and refuse everything else in the kernel. The daemon judges what
//! reaches it against the agent's YAML policy, and writes every decision to a signed,
//! hash-chained audit log.
//!
//! # Layout
//! - [`daemon`]: the composition root of `enforcer daemon`: builds the parts and waits.
//! - [`config`]: the daemon's YAML configuration.
//! - [`addr`]: canonical address forms.
//! - [`policy`]: the policy language: parsing, compilation and evaluation.
//! - [`agents`]: agents at run time (policy, learned names, open connections), their
//!   lifecycle (add, reload, remove, ad hoc) and the learned-name sweep.
//! - [`enrol`]: which cgroups are enforced, for which agent.
//! - [`cgroup`]: the cgroup2 mount, cgroup ids, moving processes.
//! - [`bpf`]: loading and attaching the kernel programs, their maps, and the kernel's rings.
//! - [`proxy`]: the transparent proxy: classification, splicing, and L7 enforcement of
//!   HTTP/1.x and HTTP/2 (plain or intercepted TLS).
//! - [`ca`]: the local CA whose leaf certificates the proxy shows when it intercepts TLS.
//! - [`credentials`]: secrets the agent never holds: placeholders, substitution toward bound
//!   hosts, leak refusal, masking.
//! - [`approvals`]: requests held by `ask` rules until a human answers.
//! - [`traffic`]: the audit log's traffic read back: `policy replay` and `policy suggest`.
//! - [`dns`]: the resolver enrolled processes talk to, and its upstream client.
//! - [`audit`]: the hash-chained, Ed25519-signed audit log and its verifier.
//! - [`control`]: the kill switch and the watch loop over kill, config and policy files.
//! - [`admin`]: the HTTP/JSON admin API on a Unix socket, and what each request does.
//! - [`status`]: the daemon's typed report on itself (`/v1/status`, `/healthz`).
//! - [`metrics`]: `/metrics` (Prometheus) and `/healthz`.
//! - [`sys`]: operating-system primitives (listeners, sock_diag, scheduling, systemd).
//! - [`cli`] and [`cmd`]: the command line; `main.rs` only parses arguments and dispatches.
pub mod addr;
pub mod admin;
pub mod agents;
pub mod approvals;
pub mod audit;
pub mod bpf;
pub mod ca;
pub mod cgroup;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod control;
pub mod credentials;
pub mod daemon;
pub mod dns;
pub mod enrol;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod status;
pub mod sys;
pub mod traffic;
