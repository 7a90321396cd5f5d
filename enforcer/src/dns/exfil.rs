//! Limits on names allowed only through a wildcard, where the agent chooses the labels and so
//! could carry data to whoever runs the zone's servers: which query types are answered, what
//! a label may look like, and how many distinct names a minute each agent may ask under each
//! wildcard. Names a rule writes exactly are never limited here.

use std::{
    collections::{HashMap, HashSet},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use hickory_proto::rr::RecordType;

/// Longest label accepted under a wildcard (the DNS limit is 63).
pub const MAX_LABEL: usize = 40;
/// The window of the distinct-name budget.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(60);
/// Strings shorter than this carry too little to judge as encoded.
const MIN_JUDGED: usize = 16;
/// Shannon entropy (bits per character) at or above which a string of at least
/// [`ENTROPY_JUDGED`] characters reads as encoded data: random base32/base36 of 32 characters
/// is about 4.3, host names of words and regions stay below 4.1. (Shorter strings cannot
/// reach it: n characters have at most log2(n) bits each.)
const ENCODED_ENTROPY: f64 = 4.2;
const ENTROPY_JUDGED: usize = 24;
/// Letter-digit alternations within a run of letters and digits, at or above which a string
/// reads as encoded (`a3f9k2...`); names mix them rarely (`ec2`, `s3`, `eu-west-1`).
const ENCODED_ALTERNATIONS: usize = 4;

/// Why a wildcard-matched query is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A query type other than A, AAAA and CNAME.
    Type(RecordType),
    /// A label longer than [`MAX_LABEL`].
    LongLabel(usize),
    /// Labels that read as encoded data.
    Encoded(String),
    /// Past the agent's distinct-name budget under this wildcard.
    Budget { pattern: String, limit: usize },
}

impl Refusal {
    /// The metric label: `type`, `label` or `budget`.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Type(_) => "type",
            Refusal::LongLabel(_) | Refusal::Encoded(_) => "label",
            Refusal::Budget { .. } => "budget",
        }
    }

    /// The audit reason; it says what the operator can do.
    pub fn describe(&self, pattern: &str) -> String {
        match self {
            Refusal::Type(t) => format!(
                "{t} queries are not answered for names allowed only by the wildcard {pattern} \
                 (A, AAAA and CNAME are): name the host exactly in a rule to get other types"
            ),
            Refusal::LongLabel(n) => format!(
                "a label of {n} characters (more than {MAX_LABEL}) under the wildcard {pattern}: \
                 names chosen under a wildcard can carry data; name the host exactly, or add \
                 `dns_labels: any` to the rule"
            ),
            Refusal::Encoded(what) => format!(
                "'{what}' under the wildcard {pattern} reads as encoded data: names chosen under \
                 a wildcard can carry data; name the host exactly, or add `dns_labels: any` to \
                 the rule"
            ),
            Refusal::Budget { pattern, limit } => format!(
                "more than {limit} distinct names a minute under the wildcard {pattern}: names \
                 chosen under a wildcard can carry data; name the hosts exactly, or raise \
                 dns.wildcard_names_per_minute"
            ),
        }
    }
}

/// Types answered for wildcard-matched names (HTTPS and SVCB get an empty answer before this).
pub fn type_allowed(qtype: RecordType) -> bool {
    matches!(qtype, RecordType::A | RecordType::AAAA | RecordType::CNAME)
}

/// The labels an agent chose (`chosen`: the name minus the wildcard's suffix) judged as a
/// name: no label longer than [`MAX_LABEL`], and neither any label nor all of them together
/// (data split over short labels) reading as encoded.
pub fn label_refusal(chosen: &str) -> Option<Refusal> {
    if let Some(long) = chosen.split('.').map(str::len).find(|&n| n > MAX_LABEL) {
        return Some(Refusal::LongLabel(long));
    }
    for label in chosen.split('.') {
        if looks_encoded(label) {
            return Some(Refusal::Encoded(label.to_owned()));
        }
    }
    let joined: String = chosen.split('.').collect::<Vec<_>>().join("-");
    if chosen.contains('.') && looks_encoded_joined(&joined) {
        return Some(Refusal::Encoded(chosen.to_owned()));
    }
    None
}

/// One label: hex of 16+ characters, frequent letter-digit alternation, or high entropy.
fn looks_encoded(label: &str) -> bool {
    let compact: Vec<u8> = label.bytes().filter(|&b| b != b'-').collect();
    if compact.len() < MIN_JUDGED {
        return false;
    }
    let digits = compact.iter().filter(|b| b.is_ascii_digit()).count();
    let hex = compact
        .iter()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if hex && digits >= 4 && compact.len() - digits >= 2 {
        return true;
    }
    alternations(label) >= ENCODED_ALTERNATIONS || high_entropy(&compact)
}

fn high_entropy(compact: &[u8]) -> bool {
    compact.len() >= ENTROPY_JUDGED && entropy(compact) >= ENCODED_ENTROPY
}

/// Several short labels joined: judged by alternation and entropy only (a hex id split into
/// labels is caught by those as well).
fn looks_encoded_joined(joined: &str) -> bool {
    let compact: Vec<u8> = joined.bytes().filter(|&b| b != b'-').collect();
    compact.len() >= MIN_JUDGED
        && (alternations(joined) >= ENCODED_ALTERNATIONS || high_entropy(&compact))
}

/// Changes between a letter and a digit at adjacent positions.
fn alternations(s: &str) -> usize {
    s.as_bytes()
        .windows(2)
        .filter(|w| {
            w[0].is_ascii_alphanumeric()
                && w[1].is_ascii_alphanumeric()
                && w[0].is_ascii_digit() != w[1].is_ascii_digit()
        })
        .count()
}

/// Shannon entropy of the byte distribution, in bits per byte.
fn entropy(bytes: &[u8]) -> f64 {
    let mut counts = [0u32; 256];
    for &b in bytes {
        counts[usize::from(b)] += 1;
    }
    #[expect(clippy::cast_precision_loss, reason = "lengths of DNS names")]
    let n = bytes.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

/// Distinct names per agent per wildcard per minute.
#[derive(Debug)]
pub struct NameBudget {
    limit: usize,
    windows: Mutex<HashMap<(u32, String), Window>>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    names: HashSet<String>,
}

impl NameBudget {
    /// `limit` distinct names per minute; 0 lifts the budget.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Counts `name` for `agent` under `pattern`; a refusal past the budget. A name asked
    /// again within the window costs nothing.
    pub fn spend(&self, agent: u32, pattern: &str, name: &str, now: Instant) -> Option<Refusal> {
        if self.limit == 0 {
            return None;
        }
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        // Bounded by agents × wildcard patterns; windows that ended are dropped now and then.
        if windows.len() > 4096 {
            windows.retain(|_, w| now.duration_since(w.started) < BUDGET_WINDOW);
        }
        let window = windows
            .entry((agent, pattern.to_owned()))
            .or_insert_with(|| Window {
                started: now,
                names: HashSet::new(),
            });
        if now.duration_since(window.started) >= BUDGET_WINDOW {
            window.started = now;
            window.names.clear();
        }
        if window.names.contains(name) {
            return None;
        }
        if window.names.len() >= self.limit {
            return Some(Refusal::Budget {
                pattern: pattern.to_owned(),
                limit: self.limit,
            });
        }
        window.names.insert(name.to_owned());
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_as_names_and_data_reads_as_data() {
        for name in [
            "api",
            "storage-eu-west-1",
            "my-app-git-feature-login-team",
            "ec2-54-23-1-2.compute-1",
            "d111111abcdef8",
            "us-east-1-prod-lb-12345678",
            "kubernetes-dashboard-default",
            "bedrock-runtime.us-west-2",
            "production-database-replica2",
            "x86-64-builds-linux-gnu",
            "www",
        ] {
            assert_eq!(label_refusal(name), None, "{name}");
        }
        for data in [
            // hex, base32, base36
            "4a6f686e20536d697468",
            "mfrggzdfmztwq2lknnwg23tpobyxe43u",
            "k3j5h2l9x8c7v6b5n4m3",
            // the same split over short labels
            "mfrggzdf.mztwq2lk.nnwg23tp.obyxe43u",
        ] {
            assert!(
                matches!(label_refusal(data), Some(Refusal::Encoded(_))),
                "{data}"
            );
        }
        assert_eq!(label_refusal(&"a".repeat(41)), Some(Refusal::LongLabel(41)));
        assert_eq!(label_refusal(&"a".repeat(40)), None);
    }

    #[test]
    fn the_budget_counts_distinct_names_per_agent_and_wildcard_per_minute() {
        let b = NameBudget::new(3);
        let t = Instant::now();
        for n in ["a", "b", "c", "a", "b"] {
            assert_eq!(b.spend(1, "*.example.com", n, t), None);
        }
        assert!(b.spend(1, "*.example.com", "d", t).is_some());
        // Another agent, another wildcard: their own budgets.
        assert_eq!(b.spend(2, "*.example.com", "d", t), None);
        assert_eq!(b.spend(1, "*.example.org", "d", t), None);
        // A minute later the budget is whole again.
        assert_eq!(b.spend(1, "*.example.com", "d", t + BUDGET_WINDOW), None);
    }

    #[test]
    fn only_address_types_are_answered() {
        assert!(type_allowed(RecordType::A));
        assert!(type_allowed(RecordType::AAAA));
        assert!(type_allowed(RecordType::CNAME));
        for t in [
            RecordType::TXT,
            RecordType::NULL,
            RecordType::MX,
            RecordType::ANY,
        ] {
            assert!(!type_allowed(t), "{t}");
        }
    }
}
