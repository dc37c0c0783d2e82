//! Token-bucket rate limits keyed by caller: login attempts per client
//! address, failed logins per address and per (user name, address),
//! enrollments per address and per product, device requests per device.
//! Refusals are 429 with `Retry-After`. Idle buckets are dropped, and each
//! limiter holds at most [`MAX_KEYS`] of them, so memory stays bounded
//! whatever keys callers make up. The buckets live in each server process:
//! behind a balancer that spreads a caller over N servers, the caller gets
//! up to N times each limit; the per-address limits key on the address the
//! server sees, which behind a balancer is the balancer's unless it passes
//! the client's on in `X-Forwarded-For` and is named in
//! `SLUICE_TRUSTED_PROXIES` (see `api::auth::client_ip`).

use crate::error::Error;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

const SHARDS: usize = 16;

/// Most buckets one limiter holds. Past this, after dropping the refilled
/// ones, an arbitrary bucket (hash order, random per process) is forgotten
/// to make room: it starts full again. Reaching this takes as many distinct
/// keys, which the per-address limits bound.
pub const MAX_KEYS: usize = 1 << 18;

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
        if shard.buckets.len() >= MAX_KEYS / SHARDS
            && !shard.buckets.contains_key(key)
            && let Some(victim) = shard.buckets.keys().next().cloned()
        {
            shard.buckets.remove(&victim);
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

    /// Gives back the token a [`check`](Self::check) took: the attempt did
    /// not count (a login that succeeded).
    pub fn refund(&self, key: &K) {
        let shard = &self.shards[self.hasher.hash_one(key) as usize % SHARDS];
        let mut shard = shard.lock().expect("rate limit lock");
        if let Some(b) = shard.buckets.get_mut(key) {
            b.tokens = (b.tokens + 1.0).min(self.burst);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap().buckets.len())
            .sum()
    }
}

/// The limits the server applies.
pub struct Limits {
    /// Login attempts per client address.
    pub login_addr: RateLimiter<IpAddr>,
    /// Failed logins per client address.
    pub login_fail_addr: RateLimiter<IpAddr>,
    /// Failed logins per (user name, client address): someone guessing a
    /// user's password from one place never locks that user out elsewhere.
    pub login_fail_user: RateLimiter<(String, IpAddr)>,
    /// Requests per device.
    pub device: RateLimiter<uuid::Uuid>,
    /// Enrollments per client address.
    pub enroll_addr: RateLimiter<IpAddr>,
    /// Enrollments per product (counted once the secret is right).
    pub enroll_product: RateLimiter<uuid::Uuid>,
}

/// How many requests a limit allows at once, and how fast it grows back.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    /// At once.
    pub burst: u32,
    /// Per second after that.
    pub per_second: f64,
}

impl Rate {
    fn limiter<K: Hash + Eq + Clone>(self, what: &'static str) -> RateLimiter<K> {
        RateLimiter::new(self.burst.max(1), self.per_second.max(0.001), what)
    }
}

impl Default for Limits {
    fn default() -> Self {
        // Devices poll every few minutes and report a handful of events per upgrade.
        Limits::new(
            Rate {
                burst: 60,
                per_second: 1.0,
            },
            Rate {
                burst: 20,
                per_second: 0.2,
            },
            Rate {
                burst: 100,
                per_second: 1.0,
            },
        )
    }
}

impl Limits {
    /// The login limits; `device` requests per device (`SLUICE_DEVICE_BURST`,
    /// `SLUICE_DEVICE_RATE`); enrollments per address and per product
    /// (`SLUICE_ENROLL_BURST`/`_RATE`, `SLUICE_ENROLL_PRODUCT_BURST`/`_RATE`).
    pub fn new(device: Rate, enroll_addr: Rate, enroll_product: Rate) -> Self {
        Limits {
            login_addr: RateLimiter::new(100, 2.0, "login attempts from this address"),
            login_fail_addr: RateLimiter::new(30, 1.0 / 10.0, "failed logins from this address"),
            // A person mistyping gets 10 tries, then one every 6 s.
            login_fail_user: RateLimiter::new(
                10,
                1.0 / 6.0,
                "failed logins for this user from this address",
            ),
            device: device.limiter("requests from this device"),
            enroll_addr: enroll_addr.limiter("enrollments from this address"),
            enroll_product: enroll_product.limiter("enrollments for this product"),
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

    /// Keys nobody refills (all made within one instant) cannot grow a
    /// limiter past its cap.
    #[test]
    fn the_number_of_keys_is_capped() {
        let l = RateLimiter::new(5, 0.001, "requests");
        let t0 = Instant::now();
        for i in 0..(MAX_KEYS as u32 + 50_000) {
            l.check_at(&i, t0).unwrap();
        }
        assert!(l.len() <= MAX_KEYS, "{} buckets", l.len());
    }

    #[test]
    fn a_refund_gives_the_attempt_back() {
        let l = RateLimiter::new(2, 0.001, "requests");
        let t0 = Instant::now();
        l.check_at(&"k", t0).unwrap();
        l.check_at(&"k", t0).unwrap();
        l.refund(&"k");
        l.check_at(&"k", t0).unwrap();
        assert!(l.check_at(&"k", t0).is_err());
        // Never above the burst.
        l.refund(&"k");
        l.refund(&"k");
        l.refund(&"k");
        l.check_at(&"k", t0).unwrap();
        l.check_at(&"k", t0).unwrap();
        assert!(l.check_at(&"k", t0).is_err());
    }
}
