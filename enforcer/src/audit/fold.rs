//! Folding repeated denials (DNS names, HTTP requests, connections), so that a flooding agent writes a bounded number of records and
//! never displaces another agent's.
//!
//! Within each second, the first denial of a kind (agent, event, result, reason and what was
//! asked: the DNS name and type, or the host and destination of a connection) is written at
//! once; repeats are counted and written at the end of the second as one record with
//! `count`. A denied HTTP request always gets its own record while the budget lasts: the
//! agent was given its `request_id`. Each agent
//! may write `budget` denial records a minute one by one; past it, until its minute is over,
//! its denials are folded harder: into one record a second per event kind and result (with
//! the first one's reason) with `count`, the number of distinct names or paths, and a few of them as a sample.
//! Allowed requests and connections are never folded: they are what the agent did.

use std::{
    collections::{HashMap, HashSet},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use super::event::{AuditEvent, EventKind, PolicyResult};

/// The period of the per-agent budget.
const BUDGET_PERIOD: Duration = Duration::from_secs(60);
/// Names or paths kept as a sample in a record folded past the budget.
const SAMPLE: usize = 5;
/// Distinct names or paths counted exactly per agent and second past the budget; beyond it
/// the record says "at least".
const DISTINCT_CAP: usize = 10_000;

/// What makes two denials the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    agent: String,
    event: EventKind,
    result: Option<PolicyResult>,
    reason: Option<String>,
    /// `dns_name`/`dns_type`, or `method`/`url_host`/`url_path`.
    what: [Option<String>; 3],
}

/// Past the budget: per agent, event kind and result (reasons often name what was asked, so
/// they would split the record again).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CoarseKey {
    agent: String,
    event: EventKind,
    result: Option<PolicyResult>,
}

#[derive(Debug)]
struct Repeats {
    first: AuditEvent,
    count: u64,
}

#[derive(Debug)]
struct Coarse {
    first: AuditEvent,
    count: u64,
    distinct: HashSet<String>,
    sample: Vec<String>,
    order: u64,
}

#[derive(Debug, Default)]
struct Window {
    /// Denials written at once this second, by kind, with their repeats.
    seen: HashMap<Key, (u64, Repeats)>,
    coarse: HashMap<CoarseKey, Coarse>,
    next_order: u64,
}

/// Records an agent wrote one by one since `since`.
#[derive(Debug)]
struct Spent {
    since: Instant,
    records: u64,
}

/// What [`Folder::offer`] decided.
#[derive(Debug, PartialEq)]
pub enum Offer {
    /// Write this record now.
    Write(Box<AuditEvent>),
    /// Counted; it reaches the log at the end of the second.
    Folded,
}

/// See the module docs. [`AuditLog`](super::AuditLog) owns one and drains it every second.
#[derive(Debug)]
pub struct Folder {
    budget: u64,
    window: Mutex<Window>,
    spent: Mutex<HashMap<String, Spent>>,
}

impl Folder {
    /// `budget`: denial records per agent per minute written one by one; 0 lifts the budget
    /// (repeats are still folded).
    pub fn new(budget: u64) -> Self {
        Self {
            budget,
            window: Mutex::new(Window::default()),
            spent: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one record from the agent's budget; false when it is spent.
    fn spend(&self, agent: &str, now: Instant) -> bool {
        if self.budget == 0 {
            return true;
        }
        let mut spent = self.spent.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = spent.entry(agent.to_owned()).or_insert(Spent {
            since: now,
            records: 0,
        });
        if now.duration_since(entry.since) >= BUDGET_PERIOD {
            *entry = Spent {
                since: now,
                records: 0,
            };
        }
        if entry.records >= self.budget {
            return false;
        }
        entry.records += 1;
        true
    }

    /// Whether `event` is a denial this folds.
    pub fn folds(event: &AuditEvent) -> bool {
        matches!(
            event.event,
            EventKind::Dns | EventKind::Request | EventKind::Connection
        ) && matches!(
            event.policy_result,
            Some(PolicyResult::Deny | PolicyResult::WouldDeny | PolicyResult::RateLimited)
        ) && event.agent_id.is_some()
    }

    /// Takes a denial (see [`Folder::folds`]); says whether to write it now.
    pub fn offer(&self, event: AuditEvent) -> Offer {
        self.offer_at(event, Instant::now())
    }

    fn offer_at(&self, event: AuditEvent, now: Instant) -> Offer {
        let key = key_of(&event);
        let mut guard = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let window = &mut *guard;
        if let Some((_, repeats)) = window.seen.get_mut(&key) {
            repeats.count += 1;
            return Offer::Folded;
        }
        if self.spend(&key.agent, now) {
            // A denied request keeps its own record within the budget: the agent was handed
            // its request_id, and an operator looks it up.
            if key.event == EventKind::Request {
                return Offer::Write(Box::new(event));
            }
            let order = window.next_order;
            window.next_order += 1;
            window.seen.insert(
                key,
                (
                    order,
                    Repeats {
                        first: event.clone(),
                        count: 0,
                    },
                ),
            );
            return Offer::Write(Box::new(event));
        }
        let what = what_of(&event);
        let coarse_key = CoarseKey {
            agent: key.agent,
            event: key.event,
            result: key.result,
        };
        let order = window.next_order;
        let coarse = window.coarse.entry(coarse_key).or_insert_with(|| Coarse {
            first: event,
            count: 0,
            distinct: HashSet::new(),
            sample: Vec::new(),
            order,
        });
        if coarse.order == order {
            window.next_order += 1;
        }
        coarse.count += 1;
        if coarse.distinct.len() < DISTINCT_CAP
            && coarse.distinct.insert(what.clone())
            && coarse.sample.len() < SAMPLE
        {
            coarse.sample.push(what);
        }
        Offer::Folded
    }

    /// The second's folded records, in the order their first denial came; the window starts
    /// afresh.
    pub fn drain(&self) -> Vec<AuditEvent> {
        let window =
            std::mem::take(&mut *self.window.lock().unwrap_or_else(PoisonError::into_inner));
        {
            let now = Instant::now();
            let mut spent = self.spent.lock().unwrap_or_else(PoisonError::into_inner);
            spent.retain(|_, s| now.duration_since(s.since) < BUDGET_PERIOD);
        }
        let mut out: Vec<(u64, AuditEvent)> = Vec::new();
        for (order, repeats) in window.seen.into_values() {
            if repeats.count == 0 {
                continue;
            }
            let mut ev = repeats.first;
            ev.request_id = None;
            ev.count = Some(repeats.count);
            ev.detail = Some(format!(
                "{} more like the record written at its first occurrence, within a second",
                repeats.count
            ));
            out.push((order, ev));
        }
        for coarse in window.coarse.into_values() {
            let mut ev = coarse.first;
            ev.request_id = None;
            ev.dns_name = None;
            ev.url_path = None;
            ev.url_host = None;
            ev.count = Some(coarse.count);
            let at_least = if coarse.distinct.len() >= DISTINCT_CAP {
                "at least "
            } else {
                ""
            };
            ev.detail = Some(format!(
                "{} denials past the agent's audit budget in one second ({at_least}{} \
                 distinct; the reason is the first one's): {}{}",
                coarse.count,
                coarse.distinct.len(),
                coarse.sample.join(", "),
                if coarse.distinct.len() > coarse.sample.len() {
                    ", ..."
                } else {
                    ""
                }
            ));
            out.push((coarse.order, ev));
        }
        out.sort_by_key(|(order, _)| *order);
        out.into_iter().map(|(_, ev)| ev).collect()
    }
}

fn key_of(event: &AuditEvent) -> Key {
    let what = match event.event {
        EventKind::Dns => [event.dns_name.clone(), event.dns_type.clone(), None],
        EventKind::Connection => [event.url_host.clone(), event.dest.clone(), None],
        _ => [
            event.method.clone(),
            event.url_host.clone(),
            event.url_path.clone(),
        ],
    };
    Key {
        agent: event.agent_id.clone().unwrap_or_default(),
        event: event.event,
        result: event.policy_result,
        reason: event.reason.clone(),
        what,
    }
}

/// The name or `METHOD host/path` a coarse record samples.
fn what_of(event: &AuditEvent) -> String {
    match event.event {
        EventKind::Dns => event.dns_name.clone().unwrap_or_default(),
        EventKind::Connection => event
            .url_host
            .clone()
            .or_else(|| event.dest.clone())
            .unwrap_or_default(),
        _ => format!(
            "{} {}{}",
            event.method.as_deref().unwrap_or("-"),
            event.url_host.as_deref().unwrap_or(""),
            event.url_path.as_deref().unwrap_or("")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dns_deny(agent: &str, name: &str) -> AuditEvent {
        AuditEvent::new(EventKind::Dns)
            .agent_id(agent)
            .dns_name(name)
            .dns_type("A")
            .policy_result(PolicyResult::Deny)
            .reason("not in policy")
    }

    #[test]
    fn repeats_become_one_record_with_a_count() {
        let f = Folder::new(100);
        assert!(matches!(
            f.offer(dns_deny("a", "x.example")),
            Offer::Write(_)
        ));
        for _ in 0..999 {
            assert_eq!(f.offer(dns_deny("a", "x.example")), Offer::Folded);
        }
        let out = f.drain();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].count, Some(999));
        assert_eq!(out[0].dns_name.as_deref(), Some("x.example"));
        assert!(f.drain().is_empty());
        // A new second: the first is written again.
        assert!(matches!(
            f.offer(dns_deny("a", "x.example")),
            Offer::Write(_)
        ));
    }

    #[test]
    fn past_the_budget_an_agent_is_folded_harder_and_others_are_untouched() {
        let f = Folder::new(10);
        let mut written = 0;
        for i in 0..5000 {
            if matches!(
                f.offer(dns_deny("flood", &format!("n{i}.example"))),
                Offer::Write(_)
            ) {
                written += 1;
            }
        }
        assert_eq!(written, 10);
        // Another agent still gets its own records at once.
        assert!(matches!(
            f.offer(dns_deny("calm", "y.example")),
            Offer::Write(_)
        ));
        let out = f.drain();
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].count, Some(4990));
        // The next second the budget is still spent; the next minute it is whole again.
        assert_eq!(f.offer(dns_deny("flood", "later.example")), Offer::Folded);
        let later = Instant::now() + BUDGET_PERIOD;
        assert!(matches!(
            f.offer_at(dns_deny("flood", "later2.example"), later),
            Offer::Write(_)
        ));
        assert_eq!(out[0].dns_name, None);
        let detail = out[0].detail.as_deref().unwrap();
        assert!(detail.contains("(4990 distinct;"), "{detail}");
        assert!(detail.contains("n10.example"), "{detail}");
    }

    #[test]
    fn a_denied_request_keeps_its_own_record_within_the_budget() {
        let f = Folder::new(3);
        let deny = || {
            AuditEvent::new(EventKind::Request)
                .agent_id("a")
                .method("PUT")
                .url_path("/v1/items/1")
                .policy_result(PolicyResult::Deny)
                .reason("default deny")
        };
        for _ in 0..3 {
            assert!(matches!(f.offer(deny()), Offer::Write(_)));
        }
        assert_eq!(f.offer(deny()), Offer::Folded);
        let out = f.drain();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].count, Some(1));
    }

    #[test]
    fn allowed_requests_are_never_folded() {
        let allow = AuditEvent::new(EventKind::Request)
            .agent_id("a")
            .policy_result(PolicyResult::Allow);
        assert!(!Folder::folds(&allow));
        assert!(Folder::folds(&dns_deny("a", "x")));
    }
}
