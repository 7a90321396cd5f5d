//! Open proxied connections of one agent, so the kill switch can cut them mid-stream.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::watch;

/// Tracks open connections; each one watches a kill signal.
#[derive(Default)]
pub struct ConnTracker {
    next: AtomicU64,
    open: Mutex<HashMap<u64, watch::Sender<bool>>>,
}

/// A registered connection. Dropping it unregisters the connection.
pub struct ConnGuard<'a> {
    tracker: &'a ConnTracker,
    id: u64,
    /// Becomes `true` when the connection must be cut.
    pub killed: watch::Receiver<bool>,
}

impl ConnTracker {
    pub fn register(&self) -> ConnGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(false);
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        ConnGuard {
            tracker: self,
            id,
            killed: rx,
        }
    }

    /// Signals every open connection to cut itself; returns how many were signalled.
    pub fn kill_all(&self) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        for tx in open.values() {
            let _ = tx.send(true);
        }
        open.len()
    }

    pub fn count(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.tracker
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_reaches_registered_connections_and_guards_unregister() {
        let t = ConnTracker::default();
        let a = t.register();
        let b = t.register();
        assert_eq!(t.count(), 2);
        drop(b);
        assert_eq!(t.count(), 1);
        assert_eq!(t.kill_all(), 1);
        assert!(*a.killed.borrow());
        drop(a);
        assert_eq!(t.count(), 0);
    }
}
