//! Controls an operator reaches without the admin API: the kill-switch files, policy files
//! and the config's agent list, watched with inotify (notify) and stat'ed every 500 ms in case
//! an event is missed; SIGHUP reloads too.

use std::{path::PathBuf, sync::Arc, time::Duration};

use notify::Watcher as _;
use tokio::sync::mpsc;

pub mod killswitch;
pub mod sched;
pub mod sockdiag;

use crate::daemon::Daemon;

/// How often the kill-switch files are stat'ed besides inotify.
pub const KILL_POLL: Duration = Duration::from_millis(500);
/// How often policy files are re-hashed besides inotify.
pub const POLICY_POLL: Duration = Duration::from_secs(5);
/// Quiet time after a policy file event before reloading (editors write in several steps).
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(150);

/// What a file event may concern.
#[derive(Debug)]
enum Trigger {
    Event(Vec<PathBuf>),
}

/// Watches and applies until the daemon stops.
pub async fn run(daemon: Arc<Daemon>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Trigger>();
    let _watcher = watch(&daemon, tx);
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
                daemon.check_kill_switch().await;
                if paths.iter().any(|p| daemon.is_watched_config(p)) {
                    reload_pending = true;
                    reload_at.as_mut().reset(tokio::time::Instant::now() + RELOAD_DEBOUNCE);
                }
            }
            _ = kill_tick.tick() => daemon.check_kill_switch().await,
            _ = policy_tick.tick() => daemon.reload_if_changed().await,
            () = &mut reload_at, if reload_pending => {
                reload_pending = false;
                daemon.reload("file change").await;
            }
            Some(()) = recv_hup(&mut hup) => {
                tracing::info!("SIGHUP: reloading");
                daemon.reload("SIGHUP").await;
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
    daemon: &Arc<Daemon>,
    tx: mpsc::UnboundedSender<Trigger>,
) -> Option<notify::RecommendedWatcher> {
    let filter = Arc::clone(daemon);
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
    for dir in daemon.watched_dirs() {
        if let Err(e) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), "cannot watch ({e}); polling covers it");
        }
    }
    Some(watcher)
}
