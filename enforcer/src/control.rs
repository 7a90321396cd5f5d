//! Controls an operator reaches without the admin API: the kill-switch files, policy files
//! and the config's agent list, watched with inotify (notify) and stat'ed every 500 ms in case
//! an event is missed; SIGHUP reloads too.
//!
//! # Layout
//! - [`killfiles`]: the kill-switch files (engaged, created, removed; failing closed).
//! - [`killswitch`]: the service that applies a change of those files.
//! - this module: the watch loop that drives both and the reloads.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify::Watcher as _;
use tokio::sync::mpsc;

pub mod killfiles;
pub mod killswitch;

use crate::{agents::lifecycle::Lifecycle, enrol::Enroller};
use killswitch::KillSwitch;

/// How often the kill-switch files are stat'ed besides inotify.
pub const KILL_POLL: Duration = Duration::from_millis(500);
/// How often enrolled cgroups are checked for removal or re-creation behind the daemon.
pub const RECONCILE_POLL: Duration = Duration::from_secs(1);
/// How often policy files are re-hashed besides inotify.
pub const POLICY_POLL: Duration = Duration::from_secs(5);
/// Quiet time after a policy file event before reloading (editors write in several steps).
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(150);

/// What a file event may concern.
#[derive(Debug)]
enum Trigger {
    Event(Vec<PathBuf>),
}

/// What the watch loop drives: the kill switch, and the reloads.
#[derive(Clone)]
pub struct Controls {
    pub kill_switch: Arc<KillSwitch>,
    pub lifecycle: Arc<Lifecycle>,
    pub enroller: Arc<Enroller>,
}

impl Controls {
    /// Directories to watch: the kill-switch files', the config's and every configured
    /// policy's.
    fn watched_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = self.kill_switch.files().dirs();
        dirs.extend(self.lifecycle.watched_dirs());
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// Is `path` a file the loop reads: a kill-switch file, the config file or a configured
    /// policy file?
    fn is_watched_file(&self, path: &Path) -> bool {
        let files = self.kill_switch.files();
        path == files.global
            || path.parent() == Some(files.agent_dir.as_path())
            || self.lifecycle.is_watched_config(path)
    }
}

/// Watches and applies until the daemon stops.
pub async fn run(controls: Controls) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Trigger>();
    let _watcher = watch(&controls, tx);
    let Controls {
        kill_switch,
        lifecycle,
        enroller,
    } = controls;
    let mut reconcile_tick = tokio::time::interval(RECONCILE_POLL);
    // Reloads run in a task of their own: a policy that takes long to load (or a config
    // reload under way) must never hold up the kill switch, which this loop serves first.
    let (reload_tx, mut reload_rx) = mpsc::unbounded_channel::<&'static str>();
    let reloader = lifecycle.clone();
    tokio::spawn(async move {
        while let Some(why) = reload_rx.recv().await {
            // Requests that piled up while a reload ran are served by one more.
            while reload_rx.try_recv().is_ok() {}
            reloader.reload(why).await;
        }
    });
    let periodic = lifecycle.clone();
    let periodic_tx = reload_tx.clone();
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot handle SIGHUP ({e}); policy files are still watched");
            None
        }
    };
    let mut kill_tick = tokio::time::interval(KILL_POLL);
    let mut policy_tick = tokio::time::interval(POLICY_POLL);
    let reload_at = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(reload_at);
    let mut reload_pending = false;
    loop {
        tokio::select! {
            Some(Trigger::Event(paths)) = rx.recv() => {
                // Kill files first and at once: this is the latency that matters.
                kill_switch.check().await;
                if paths.iter().any(|p| lifecycle.is_watched_config(p)) {
                    reload_pending = true;
                    reload_at.as_mut().reset(tokio::time::Instant::now() + RELOAD_DEBOUNCE);
                }
            }
            _ = kill_tick.tick() => kill_switch.check().await,
            _ = policy_tick.tick() => {
                let (periodic, tx) = (periodic.clone(), periodic_tx.clone());
                tokio::task::spawn_blocking(move || {
                    if periodic.changed() {
                        let _ = tx.send("periodic check");
                    }
                });
            }
            _ = reconcile_tick.tick() => {
                for done in enroller.reconcile() {
                    tracing::warn!("{done}");
                }
            }
            () = &mut reload_at, if reload_pending => {
                reload_pending = false;
                let _ = reload_tx.send("file change");
            }
            Some(()) = recv_hup(&mut hup) => {
                tracing::info!("SIGHUP: reloading");
                let _ = reload_tx.send("SIGHUP");
            }
        }
    }
}

async fn recv_hup(hup: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match hup {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Starts an inotify watcher on every directory that holds a file we care about. Events are
/// forwarded to the control loop, which decides what they mean.
fn watch(
    controls: &Controls,
    tx: mpsc::UnboundedSender<Trigger>,
) -> Option<notify::RecommendedWatcher> {
    let filter = controls.clone();
    // Only events on the files we read are forwarded: the state directory also holds files
    // the daemon rewrites itself (learned names, agent ids), and waking the control loop
    // for those would cost a stat of every kill file each time.
    let handler = move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res
            && (event.need_rescan() || event.paths.iter().any(|p| filter.is_watched_file(p)))
        {
            let _ = tx.send(Trigger::Event(event.paths));
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(
                "inotify unavailable ({e}); falling back to polling every {KILL_POLL:?}"
            );
            return None;
        }
    };
    for dir in controls.watched_dirs() {
        if let Err(e) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), "cannot watch ({e}); polling covers it");
        }
    }
    Some(watcher)
}
