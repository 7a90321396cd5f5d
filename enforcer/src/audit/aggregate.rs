//! Folding kernel connect refusals into one `kernel_deny` record per agent, destination and
//! reason per window, so a storm of refused connects cannot flood the log; and accounting for
//! refusals the kernel could not report (its event ring was full), so the records' counts add
//! up to the kernel's.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Mutex, PoisonError},
};

use super::event::{Action, AuditEvent, EventKind, PolicyResult};

/// Distinct destinations tracked per agent and window; its refusals to further destinations
/// are counted in one record per reason without `dest`, so a port scan costs bounded memory
/// and log space, and one agent's scan never takes another's detail.
pub const MAX_DESTINATIONS_PER_WINDOW: usize = 256;

#[derive(Debug)]
struct Bucket {
    pid: u32,
    comm: String,
    count: u64,
    /// Order of first sighting, so records come out in the order the refusals began.
    order: u64,
}

/// Counts kernel refusals per (agent, destination) until [`drain`](Self::drain) turns them
/// into records. [`AuditLog`](super::AuditLog) owns one and drains it every second; use
/// [`AuditLog::kernel_deny`](super::AuditLog::kernel_deny) to feed it.
#[derive(Debug, Default)]
pub struct KernelDenyAggregator {
    buckets: Mutex<Window>,
}

/// Agent, destination (`None` past [`MAX_DESTINATIONS_PER_WINDOW`]) and reason.
type Key = (String, Option<SocketAddr>, &'static str);

#[derive(Debug, Default)]
struct Window {
    by_dest: HashMap<Key, Bucket>,
    /// Refusals the kernel counted but could not report, per agent.
    lost: HashMap<String, u64>,
    /// Distinct destinations tracked per agent.
    tracked: HashMap<String, usize>,
    next_order: u64,
}

impl KernelDenyAggregator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes one refused connect or send. The first refusal's `pid` and `comm` represent the
    /// window.
    pub fn note(
        &self,
        agent_id: &str,
        pid: u32,
        comm: &str,
        dest: SocketAddr,
        reason: &'static str,
    ) {
        let mut window = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (agent_id.to_owned(), Some(dest), reason);
        let key = if window.by_dest.contains_key(&key) {
            key
        } else {
            let tracked = window.tracked.entry(agent_id.to_owned()).or_default();
            if *tracked < MAX_DESTINATIONS_PER_WINDOW {
                *tracked += 1;
                key
            } else {
                (agent_id.to_owned(), None, reason)
            }
        };
        let order = window.next_order;
        let bucket = window.by_dest.entry(key).or_insert_with(|| Bucket {
            pid,
            comm: comm.to_owned(),
            count: 0,
            order,
        });
        bucket.count += 1;
        if bucket.order == order {
            window.next_order += 1;
        }
    }

    /// Notes `count` refusals of one agent that the kernel counted but could not report.
    pub fn lost(&self, agent_id: &str, count: u64) {
        if count == 0 {
            return;
        }
        let mut window = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        *window.lost.entry(agent_id.to_owned()).or_default() += count;
    }

    /// One `kernel_deny` event per (agent, destination, reason) noted since the last drain,
    /// with its `count`, in order of first refusal, then one per agent with refusals lost
    /// (`action: lost`, no destination); the window starts afresh.
    pub fn drain(&self) -> Vec<AuditEvent> {
        let window =
            std::mem::take(&mut *self.buckets.lock().unwrap_or_else(PoisonError::into_inner));
        let mut buckets: Vec<_> = window.by_dest.into_iter().collect();
        buckets.sort_by_key(|(_, b)| b.order);
        let mut lost: Vec<_> = window.lost.into_iter().collect();
        lost.sort();
        buckets
            .into_iter()
            .map(|((agent, dest, reason), b)| {
                let ev = AuditEvent::new(EventKind::KernelDeny)
                    .agent_id(agent)
                    .pid(b.pid)
                    .comm(b.comm)
                    .policy_result(PolicyResult::Deny)
                    .reason(reason)
                    .count(b.count);
                match dest {
                    Some(dest) => ev.dest(dest.to_string()),
                    None => ev.detail(format!(
                        "refusals to destinations beyond the first \
                         {MAX_DESTINATIONS_PER_WINDOW} in this second"
                    )),
                }
            })
            .chain(lost.into_iter().map(|(agent, count)| {
                AuditEvent::new(EventKind::KernelDeny)
                    .agent_id(agent)
                    .policy_result(PolicyResult::Deny)
                    .action(Action::Lost)
                    .count(count)
                    .detail(
                        "refusals the kernel counted while its event ring was full: their \
                         destinations and processes were not reported",
                    )
            }))
            .collect()
    }

    /// Whether any refusal is waiting to be drained.
    pub fn is_empty(&self) -> bool {
        self.buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_dest
            .is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_becomes_one_record_per_agent_and_destination() {
        let agg = KernelDenyAggregator::new();
        let a: SocketAddr = "192.0.2.1:443".parse().unwrap();
        let b: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        for _ in 0..10_000 {
            agg.note("demo", 42, "curl", a, "not_allowed");
        }
        agg.note("demo", 43, "wget", b, "not_allowed");
        agg.note("demo", 43, "wget", b, "killed");
        agg.note("other", 7, "nc", a, "not_allowed");
        agg.lost("demo", 5);
        let events = agg.drain();
        assert_eq!(events.len(), 5);
        assert_eq!(events[0].dest.as_deref(), Some("192.0.2.1:443"));
        assert_eq!(events[0].count, Some(10_000));
        assert_eq!(events[0].pid, Some(42));
        assert_eq!(events[1].dest.as_deref(), Some("[2001:db8::1]:80"));
        assert_eq!(events[2].reason.as_deref(), Some("killed"));
        assert_eq!(events[3].agent_id.as_deref(), Some("other"));
        assert_eq!(
            (events[4].action, events[4].count),
            (Some(Action::Lost), Some(5))
        );
        assert_eq!(events[4].dest, None);
        assert!(agg.is_empty());
        assert!(agg.drain().is_empty());
    }

    #[test]
    fn a_port_scan_is_bounded() {
        let agg = KernelDenyAggregator::new();
        for port in 1..=5000u16 {
            agg.note(
                "demo",
                1,
                "nmap",
                SocketAddr::from(([192, 0, 2, 1], port)),
                "not_allowed",
            );
        }
        let events = agg.drain();
        assert_eq!(events.len(), MAX_DESTINATIONS_PER_WINDOW + 1);
        let overflow = events.iter().find(|e| e.dest.is_none()).unwrap();
        assert_eq!(
            overflow.count,
            Some(5000 - MAX_DESTINATIONS_PER_WINDOW as u64)
        );
        let total: u64 = events.iter().filter_map(|e| e.count).sum();
        assert_eq!(total, 5000);
    }
}
