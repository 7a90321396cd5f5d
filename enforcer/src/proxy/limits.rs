//! The proxy's share of the daemon's resources: how many connections each agent may hold
//! open and in their opening, and how many the proxy may hold at all, so that the admin
//! socket, the audit log and the resolver always have file descriptors left.
//!
//! Past a cap a new connection is reset at once (the agent reads `ECONNRESET`) and recorded
//! as a refused `connection` (repeats are folded by the audit log). One agent's flood never
//! takes another agent's place: the per-agent caps stop it first, and the file-descriptor
//! budget is what is left after the reserve, for everyone.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

/// File descriptors kept out of the proxy's reach: the admin socket and its clients, the
/// audit log and its rotations, the resolver's sockets, policy reloads, the kernel's maps.
pub const FD_RESERVE: u64 = 1024;

/// What the proxy admits.
#[derive(Debug)]
pub struct Limits {
    /// `max_connections_per_agent`; 0: no cap.
    pub per_agent_open: usize,
    /// `max_pending_per_agent`; 0: no cap.
    pub per_agent_pending: usize,
    pub fds: FdBudget,
}

/// Proxied connections the file-descriptor limit leaves room for: each holds the agent's
/// socket and one upstream socket.
#[derive(Debug)]
pub struct FdBudget {
    max: usize,
    open: Arc<AtomicUsize>,
}

/// One connection's place in the budget; dropping it gives the place back.
#[derive(Debug)]
pub struct FdSlot {
    open: Arc<AtomicUsize>,
}

impl Drop for FdSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl FdBudget {
    /// Room for `max` connections.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Raises the soft `RLIMIT_NOFILE` to the hard one (the unit sets it high) and budgets
    /// what is left after [`FD_RESERVE`], two descriptors per connection.
    pub fn from_rlimit() -> Self {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
        let soft = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
            hard
        } else {
            soft
        };
        let room = soft.saturating_sub(FD_RESERVE) / 2;
        if room < 1024 {
            tracing::warn!(
                nofile = soft,
                "the file-descriptor limit leaves room for only {room} proxied connections; \
                 raise LimitNOFILE"
            );
        }
        Self::new(usize::try_from(room).unwrap_or(usize::MAX))
    }

    /// A place for one connection, if any is left.
    pub fn take(&self) -> Option<FdSlot> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(FdSlot {
            open: Arc::clone(&self.open),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_gives_places_back() {
        let b = FdBudget::new(2);
        let x = b.take().unwrap();
        let _y = b.take().unwrap();
        assert!(b.take().is_none());
        drop(x);
        assert!(b.take().is_some());
    }
}
