//! Rate limits: token buckets in a bounded LRU table.

use std::{
    num::NonZeroUsize,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use jiff::Timestamp;
use lru::LruCache;

/// Most buckets a [`RateLimiter`] holds. Past it, the least recently used bucket is evicted
/// (and starts full when its key comes back). A bucket costs about 100 bytes plus its key,
/// and keys are cut to 256 bytes, so the table stays under about 6 MiB.
pub const MAX_RATE_LIMIT_BUCKETS: usize = 16_384;

/// Bucket keys (rule name, then the endpoint, body value or header value) are cut to this
/// many bytes; keys that share a long prefix then share a bucket, which only limits more.
pub(crate) const MAX_KEY_BYTES: usize = 256;

/// Rate-limit state of one agent: shared by all its connections (`Sync`) and kept across
/// policy reloads. Buckets are keyed by rule name and key, so a reloaded rule keeps its
/// buckets and a changed rate applies from the next request.
pub struct RateLimiter {
    buckets: Mutex<LruCache<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Timestamp,
}

/// A rate: `calls` per `window`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Rate {
    pub(crate) calls: u32,
    pub(crate) window: Duration,
}

impl Rate {
    fn capacity(self) -> f64 {
        f64::from(self.calls)
    }

    fn per_second(self) -> f64 {
        f64::from(self.calls) / self.window.as_secs_f64()
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = self.lock().len();
        f.debug_struct("RateLimiter")
            .field("buckets", &len)
            .finish()
    }
}

impl RateLimiter {
    /// A limiter holding at most [`MAX_RATE_LIMIT_BUCKETS`] buckets.
    pub fn new() -> Self {
        Self::with_capacity(MAX_RATE_LIMIT_BUCKETS)
    }

    /// A limiter holding at most `max_buckets` buckets (at least one).
    pub fn with_capacity(max_buckets: usize) -> Self {
        RateLimiter {
            buckets: Mutex::new(LruCache::new(
                NonZeroUsize::new(max_buckets).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    /// Number of buckets held now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<String, Bucket>> {
        // A panic elsewhere while holding the lock leaves only counters behind; keep going.
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes one token from every bucket, or from none: `Err((i, retry_after))` names the
    /// first bucket (by position in `keys`) without a token.
    pub(crate) fn acquire(
        &self,
        keys: &[(String, Rate)],
        now: Timestamp,
    ) -> Result<(), (usize, Duration)> {
        let mut table = self.lock();
        let mut refused: Option<(usize, Duration)> = None;
        for (i, (key, rate)) in keys.iter().enumerate() {
            let bucket = table.get_or_insert_mut_ref(key.as_str(), || Bucket {
                tokens: rate.capacity(),
                at: now,
            });
            refill(bucket, *rate, now);
            if bucket.tokens < 1.0 {
                let wait = Duration::from_secs_f64(
                    ((1.0 - bucket.tokens) / rate.per_second()).clamp(0.0, 86_400.0),
                );
                refused = Some(match refused {
                    Some((first, longest)) => (first, longest.max(wait)),
                    None => (i, wait),
                });
            }
        }
        if let Some(refused) = refused {
            return Err(refused);
        }
        for (key, _) in keys {
            if let Some(bucket) = table.get_mut(key.as_str()) {
                bucket.tokens -= 1.0;
            }
        }
        Ok(())
    }
}

fn refill(bucket: &mut Bucket, rate: Rate, now: Timestamp) {
    // A clock that steps back refills nothing rather than going negative.
    let elapsed = now.duration_since(bucket.at).as_secs_f64().max(0.0);
    bucket.tokens = (bucket.tokens + elapsed * rate.per_second()).min(rate.capacity());
    if now > bucket.at {
        bucket.at = now;
    }
}

/// Cuts a key to [`MAX_KEY_BYTES`] on a character boundary.
pub(crate) fn cut_key(mut key: String) -> String {
    if key.len() > MAX_KEY_BYTES {
        let mut end = MAX_KEY_BYTES;
        while !key.is_char_boundary(end) {
            end -= 1;
        }
        key.truncate(end);
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    #[test]
    fn bucket_refills_continuously() {
        let l = RateLimiter::new();
        let rate = Rate {
            calls: 2,
            window: Duration::from_secs(60),
        };
        let k = vec![("r\0a".to_owned(), rate)];
        assert!(l.acquire(&k, t(0)).is_ok());
        assert!(l.acquire(&k, t(0)).is_ok());
        let (i, wait) = l.acquire(&k, t(0)).unwrap_err();
        assert_eq!((i, wait), (0, Duration::from_secs(30)));
        assert!(l.acquire(&k, t(30)).is_ok());
        assert!(l.acquire(&k, t(30)).is_err());
        // Clock stepping back never adds tokens.
        assert!(l.acquire(&k, t(-100)).is_err());
    }

    #[test]
    fn all_or_nothing() {
        let l = RateLimiter::new();
        let one = Rate {
            calls: 1,
            window: Duration::from_secs(1),
        };
        let ten = Rate {
            calls: 10,
            window: Duration::from_secs(1),
        };
        assert!(l.acquire(&[("a".into(), one)], t(0)).is_ok());
        // "b" is not charged when "a" refuses.
        for _ in 0..5 {
            assert!(
                l.acquire(&[("b".into(), ten), ("a".into(), one)], t(0))
                    .is_err()
            );
        }
        for _ in 0..10 {
            assert!(l.acquire(&[("b".into(), ten)], t(0)).is_ok());
        }
    }

    #[test]
    fn lru_cap_evicts_least_recent() {
        let l = RateLimiter::with_capacity(2);
        let one = Rate {
            calls: 1,
            window: Duration::from_secs(3600),
        };
        assert!(l.acquire(&[("a".into(), one)], t(0)).is_ok());
        assert!(l.acquire(&[("b".into(), one)], t(0)).is_ok());
        assert!(l.acquire(&[("c".into(), one)], t(0)).is_ok());
        assert_eq!(l.len(), 2);
        // "a" was evicted and starts full again; "c" is still spent.
        assert!(l.acquire(&[("a".into(), one)], t(0)).is_ok());
        assert!(l.acquire(&[("c".into(), one)], t(0)).is_err());
    }

    #[test]
    fn keys_are_cut() {
        let k = cut_key("é".repeat(200));
        assert!(k.len() <= MAX_KEY_BYTES);
    }
}
