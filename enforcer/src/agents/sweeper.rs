//! The learned-name sweep: once a second, addresses whose TTL ran out leave the kernel
//! allowlist and the agents' name tables (open connections are unaffected; new connects to
//! those addresses are refused), and the learned names are saved so that a restarted daemon
//! keeps honouring what the kernel still allows.

use std::{path::PathBuf, sync::Arc, time::Duration};

use super::{LearnedFile, Registry};
use crate::bpf::Kernel;

/// How often expired entries are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Sweeps until the daemon stops.
pub async fn run(kernel: Arc<Kernel>, registry: Arc<Registry>, state_dir: PathBuf) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    let mut last_saved = None;
    loop {
        tick.tick().await;
        let now = crate::bpf::boot_ns();
        let removed = kernel.sweep_expired(now);
        let mut file = LearnedFile {
            boot_id: LearnedFile::current_boot_id(),
            ..LearnedFile::default()
        };
        for agent in registry.all() {
            agent.sweep(now);
            let mut learned = agent.learned();
            learned.sort_by(|a, b| (&a.name, a.ip).cmp(&(&b.name, b.ip)));
            if !learned.is_empty() {
                file.agents.insert(agent.name.clone(), learned);
            }
        }
        if !removed.is_empty() {
            tracing::debug!(count = removed.len(), "expired learned addresses removed");
        }
        let snapshot = serde_json::to_string(&file.agents).unwrap_or_default();
        if last_saved.as_ref() != Some(&snapshot) {
            if let Err(e) = file.save(&state_dir) {
                tracing::warn!("cannot save learned names: {e}");
            }
            last_saved = Some(snapshot);
        }
    }
}
