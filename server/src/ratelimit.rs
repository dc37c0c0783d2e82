//! Token-bucket rate limits keyed by caller: logins per user name and per
//! client address, device requests per device. Refusals are 429 with
//! `Retry-After`. Idle buckets are dropped, so memory follows the active set.

use crate::error::Error;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Mutex;
use std::time::Instant;

const SHARDS: usize = 16;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Shard<K> {
    buckets: HashMap<K, Bucket>,
    /// Prune when the map grows past this; it doubles with what survives a prune.
    high_water: usize,
}

/// One limit: `burst` requests at once, refilled at `per_second`.
pub struct RateLimiter<K> {
    shards: Vec<Mutex<Shard<K>>>,
    hasher: std::collections::hash_map::RandomState,
    burst: f64,
    per_second: f64,
    what: &'static str,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// A limiter allowing `burst` at once and `per_second` after that.
    pub fn new(burst: u32, per_second: f64, what: &'static str) -> Self {
        RateLimiter {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        buckets: HashMap::new(),
                        high_water: 1024,
                    })
                })
                .collect(),
            hasher: Default::default(),
            burst: burst as f64,
            per_second,
            what,
        }
    }

    /// Takes one token for `key`, or says how many seconds to wait.
    pub fn check(&self, key: &K) -> Result<(), Error> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: &K, now: Instant) -> Result<(), Error> {
        let shard = &self.shards[self.hasher.hash_one(key) as usize % SHARDS];
        let mut shard = shard.lock().expect("rate limit lock");
        // Drop buckets that have refilled: they are the same as absent ones.
        if shard.buckets.len() > shard.high_water {
            let full_after = self.burst / self.per_second;
            shard
                .buckets
                .retain(|_, b| now.duration_since(b.at).as_secs_f64() < full_after);
            shard.high_water = (shard.buckets.len() * 2).max(1024);
        }
        let b = shard.buckets.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.per_second).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            let wait = ((1.0 - b.tokens) / self.per_second).ceil().max(1.0) as u64;
            Err(Error::TooManyRequests(
                format!("too many {}; retry in {wait} s", self.what),
                wait,
            ))
        }
    }
}

/// The limits the server applies.
pub struct Limits {
    /// Login attempts per user name.
    pub login_user: RateLimiter<String>,
    /// Login attempts per client address.
    pub login_addr: RateLimiter<std::net::IpAddr>,
    /// Requests per device.
    pub device: RateLimiter<uuid::Uuid>,
}

impl Default for Limits {
    fn default() -> Self {
        // Devices poll every few minutes and report a handful of events per upgrade.
        Limits::with_device(60, 1.0)
    }
}

impl Limits {
    /// The login limits, and `burst` requests per device growing back by
    /// `per_second` (`SLUICE_DEVICE_BURST`, `SLUICE_DEVICE_RATE`).
    pub fn with_device(burst: u32, per_second: f64) -> Self {
        Limits {
            // A person mistyping gets 10 tries, then one every 6 s.
            login_user: RateLimiter::new(10, 1.0 / 6.0, "login attempts for this user"),
            login_addr: RateLimiter::new(100, 2.0, "login attempts from this address"),
            device: RateLimiter::new(burst, per_second, "requests from this device"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_refill_rate() {
        let l = RateLimiter::new(3, 1.0, "requests");
        let t0 = Instant::now();
        for _ in 0..3 {
            l.check_at(&"k", t0).unwrap();
        }
        match l.check_at(&"k", t0) {
            Err(Error::TooManyRequests(msg, 1)) => assert!(msg.contains("retry in 1 s")),
            other => panic!("expected 429, got {other:?}"),
        }
        l.check_at(&"other", t0).unwrap();
        l.check_at(&"k", t0 + Duration::from_millis(1000)).unwrap();
        assert!(l.check_at(&"k", t0 + Duration::from_millis(1500)).is_err());
    }

    #[test]
    fn idle_buckets_are_dropped() {
        let l = RateLimiter::new(2, 1.0, "requests");
        let t0 = Instant::now();
        for i in 0..20_000u32 {
            l.check_at(&i, t0).unwrap();
        }
        let later = t0 + Duration::from_secs(10);
        for i in 20_000..40_000u32 {
            l.check_at(&i, later).unwrap();
        }
        let kept: usize = l
            .shards
            .iter()
            .map(|s| s.lock().unwrap().buckets.len())
            .sum();
        assert!(
            kept < 30_000,
            "refilled buckets must be dropped, {kept} kept"
        );
    }
}
