//! Open proxied connections of one agent, so the kill switch can cut them mid-stream, and
//! the agent's share of the proxy: how many it may hold open, and how many may be in their
//! opening (first bytes, TLS handshake, first request head) at once.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use tokio::sync::watch;

use crate::sys::sockdiag::SocketRef;

/// Tracks open connections; each one watches a kill signal.
#[derive(Default)]
pub struct ConnTracker {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Open>>,
    /// Connections in their opening (shared with their [`Pending`]s, which may outlive a
    /// borrow of the tracker).
    opening: Arc<AtomicUsize>,
}

/// A connection in its opening. Dropping it (at the first request, at a splice, or when
/// the connection ends) ends the opening.
pub struct Pending {
    count: Arc<AtomicUsize>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why [`ConnTracker::admit`] refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `max_connections_per_agent` connections are open.
    Open(usize),
    /// `max_pending_per_agent` connections are in their opening.
    Pending(usize),
}

impl Full {
    /// The audit reason.
    pub fn describe(self, agent: &str) -> String {
        match self {
            Full::Open(cap) => format!(
                "agent '{agent}' has {cap} proxied connections open (max_connections_per_agent); \
                 close idle connections, or raise the cap"
            ),
            Full::Pending(cap) => format!(
                "agent '{agent}' has {cap} connections that have not sent a first request yet \
                 (max_pending_per_agent: TLS handshakes and request heads in progress)"
            ),
        }
    }
}

struct Open {
    kill: watch::Sender<bool>,
    socket: Option<SocketRef>,
    /// Set once the connection is spliced on a host-level decision.
    splice: Option<Splice>,
}

/// What a spliced connection was allowed on: judged again when the policy changes, since no
/// request on it ever will be.
#[derive(Debug, Clone)]
pub struct Splice {
    /// TLS spliced on its server name (`Https`), or `tcp:` (`None`).
    pub scheme: Option<crate::policy::Scheme>,
    /// The host decided on (the SNI), and for `tcp:` the address too.
    pub hosts: Vec<String>,
    pub port: u16,
    pub exe: Option<crate::sys::FileId>,
    /// For the record: the destination and the decision's request id.
    pub dest: String,
    pub request_id: String,
}

impl Splice {
    /// Why `policy` no longer gives this decision, if it does not.
    pub fn refused_by(&self, policy: &crate::policy::Policy) -> Option<String> {
        use crate::policy::Scheme;
        let now = jiff::Timestamp::now();
        let decision = match self.scheme {
            Some(Scheme::Https) => {
                policy.host_decision(Scheme::Https, &self.hosts[0], self.port, now, self.exe)
            }
            Some(Scheme::Http) => return None,
            None => policy
                .tcp_decision(&self.hosts, self.port, self.exe)
                .unwrap_or_else(|| {
                    policy.refusal(format!(
                        "no tcp rule allows {}:{} any more",
                        self.hosts[0], self.port
                    ))
                }),
        };
        (!decision.forward()).then(|| format!("revoked by a policy reload: {}", decision.reason))
    }
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
        self.open.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            Open {
                kill,
                socket,
                splice: None,
            },
        );
        ConnGuard {
            tracker: self,
            id,
            killed: rx,
        }
    }

    /// Registers a connection in its opening, unless the agent already holds `max_open`
    /// connections or `max_opening` openings (0: no cap).
    pub fn admit(
        &self,
        socket: Option<SocketRef>,
        max_open: usize,
        max_opening: usize,
    ) -> Result<(ConnGuard<'_>, Pending), Full> {
        if max_opening > 0 && self.opening.fetch_add(1, Ordering::AcqRel) >= max_opening {
            self.opening.fetch_sub(1, Ordering::AcqRel);
            return Err(Full::Pending(max_opening));
        }
        if max_opening == 0 {
            self.opening.fetch_add(1, Ordering::AcqRel);
        }
        let opening = Pending {
            count: Arc::clone(&self.opening),
        };
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (kill, rx) = watch::channel(false);
        {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            if max_open > 0 && open.len() >= max_open {
                return Err(Full::Open(max_open));
            }
            open.insert(
                id,
                Open {
                    kill,
                    socket,
                    splice: None,
                },
            );
        }
        Ok((
            ConnGuard {
                tracker: self,
                id,
                killed: rx,
            },
            opening,
        ))
    }

    /// Connections in their opening.
    pub fn opening(&self) -> usize {
        self.opening.load(Ordering::Acquire)
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

    /// Cuts every spliced connection whose decision `still` no longer upholds (`Some(reason)`
    /// says why); returns them with the reasons.
    pub fn revoke(&self, still: impl Fn(&Splice) -> Option<String>) -> Vec<(Splice, String)> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for o in open.values() {
            if let Some(s) = &o.splice
                && let Some(reason) = still(s)
            {
                let _ = o.kill.send(true);
                out.push((s.clone(), reason));
            }
        }
        out
    }

    pub fn count(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl ConnGuard<'_> {
    /// The connection is now spliced on this decision.
    pub fn mark_splice(&self, splice: Splice) {
        if let Some(o) = self
            .tracker
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&self.id)
        {
            o.splice = Some(splice);
        }
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

    #[test]
    fn an_agent_past_its_caps_is_refused_until_it_frees_a_place() {
        let t = ConnTracker::default();
        let (a, opening_a) = t.admit(None, 2, 1).unwrap();
        // One opening at a time.
        assert_eq!(t.admit(None, 2, 1).err(), Some(Full::Pending(1)));
        drop(opening_a);
        let (_b, opening_b) = t.admit(None, 2, 1).unwrap();
        drop(opening_b);
        // Two open at most.
        assert_eq!(t.admit(None, 2, 1).err(), Some(Full::Open(2)));
        assert_eq!(t.opening(), 0, "a refusal holds no opening");
        drop(a);
        assert!(t.admit(None, 2, 1).is_ok());
    }
}
