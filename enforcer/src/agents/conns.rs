//! Open proxied connections of one agent, so the kill switch can cut them mid-stream.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::watch;

use crate::sys::sockdiag::SocketRef;

/// Tracks open connections; each one watches a kill signal.
#[derive(Default)]
pub struct ConnTracker {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Open>>,
}

struct Open {
    kill: watch::Sender<bool>,
    socket: Option<SocketRef>,
}

/// A registered connection. Dropping it unregisters the connection.
pub struct ConnGuard<'a> {
    tracker: &'a ConnTracker,
    id: u64,
    /// Becomes `true` when the connection must be cut.
    pub killed: watch::Receiver<bool>,
}

impl ConnTracker {
    /// Registers a connection; `socket` is our socket facing the agent, when there is one to
    /// destroy on a kill.
    pub fn register(&self, socket: Option<SocketRef>) -> ConnGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (kill, rx) = watch::channel(false);
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Open { kill, socket });
        ConnGuard {
            tracker: self,
            id,
            killed: rx,
        }
    }

    /// Our socket facing the agent, of every open connection.
    pub fn sockets(&self) -> Vec<SocketRef> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.values().filter_map(|o| o.socket).collect()
    }

    /// Signals every open connection to cut itself; returns how many were signalled.
    pub fn kill_all(&self) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        for o in open.values() {
            let _ = o.kill.send(true);
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
        let pair = SocketRef {
            local: "127.0.0.1:40000".parse().unwrap(),
            remote: "127.0.0.1:15001".parse().unwrap(),
            cookie: 7,
        };
        let a = t.register(Some(pair));
        let b = t.register(None);
        assert_eq!(t.sockets(), [pair]);
        assert_eq!(t.count(), 2);
        drop(b);
        assert_eq!(t.count(), 1);
        assert_eq!(t.kill_all(), 1);
        assert!(*a.killed.borrow());
        drop(a);
        assert_eq!(t.count(), 0);
    }
}
