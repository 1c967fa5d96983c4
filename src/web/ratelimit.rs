//! A per-IP token bucket for the link pages and sign-ups, so that no one client can
//! flood the consent history, try tokens by the thousand or mail-bomb a stranger.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Past this many clients tracked at once, new ones pass unmetered: at that scale a
/// per-IP limit no longer protects anything, and refusing everyone would be worse.
const MAX_TRACKED: usize = 65_536;

/// How often idle buckets are dropped when the table is not full.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How often pruning may run when the table is full (it walks every entry).
const PRUNE_WHEN_FULL_EVERY: Duration = Duration::from_secs(1);

pub struct RateLimiter {
    /// Bucket size, refilled in full over `period`.
    limit: u32,
    period: Duration,
    state: Mutex<Buckets>,
}

struct Buckets {
    map: HashMap<IpAddr, Bucket>,
    last_prune: Instant,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    pub fn new(per_minute: u32, now: Instant) -> RateLimiter {
        RateLimiter::per_period(per_minute, Duration::from_secs(60), now)
    }

    /// `limit` requests per `period` (a burst of `limit`, then a steady trickle).
    pub fn per_period(limit: u32, period: Duration, now: Instant) -> RateLimiter {
        RateLimiter {
            limit: limit.max(1),
            period: period.max(Duration::from_secs(1)),
            state: Mutex::new(Buckets {
                map: HashMap::new(),
                last_prune: now,
            }),
        }
    }

    /// Takes one request from `ip`'s bucket, or says how many whole seconds until
    /// one is available (for Retry-After).
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), u64> {
        let capacity = f64::from(self.limit);
        let per_second = capacity / self.period.as_secs_f64();
        // Nothing in the table can be left half-updated, so a poisoned lock is usable.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let since_prune = now.saturating_duration_since(state.last_prune);
        if since_prune >= PRUNE_EVERY
            || (state.map.len() >= MAX_TRACKED && since_prune >= PRUNE_WHEN_FULL_EVERY)
        {
            // A bucket that has refilled is the same as no bucket at all.
            state.map.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * per_second
                    < capacity
            });
            state.last_prune = now;
            if state.map.len() >= MAX_TRACKED {
                tracing::warn!(
                    tracked = state.map.len(),
                    "rate limiter full: new clients pass unmetered"
                );
            }
        }
        let key = client_key(ip);
        if !state.map.contains_key(&key) && state.map.len() >= MAX_TRACKED {
            return Ok(());
        }
        let bucket = state.map.entry(key).or_insert(Bucket {
            tokens: capacity,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_second).min(capacity);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            // Saturating float-to-int cast; at least 1 so clients do wait.
            Err((((1.0 - bucket.tokens) / per_second).ceil() as u64).max(1))
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.state.lock().map(|s| s.map.len()).unwrap_or(0)
    }
}

/// One client: an IPv4 address (also when it reaches a dual-stack socket as
/// `::ffff:a.b.c.d`), or an IPv6 /64, since one host commonly holds a whole /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match canonical_ip(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// IPv4 clients reaching a dual-stack socket appear as `::ffff:a.b.c.d`.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_is_allowed_then_refused_until_the_bucket_refills() {
        let t0 = Instant::now();
        let limiter = RateLimiter::new(3, t0);
        for _ in 0..3 {
            assert_eq!(limiter.check(ip("192.0.2.1"), t0), Ok(()));
        }
        assert_eq!(limiter.check(ip("192.0.2.1"), t0), Err(20));
        assert_eq!(
            limiter.check(ip("192.0.2.2"), t0),
            Ok(()),
            "others unaffected"
        );
        assert_eq!(
            limiter.check(ip("::ffff:192.0.2.1"), t0),
            Err(20),
            "mapped IPv4 is the same client"
        );
        assert_eq!(
            limiter.check(ip("192.0.2.1"), t0 + Duration::from_secs(20)),
            Ok(())
        );
    }

    #[test]
    fn an_ipv6_64_is_one_client() {
        let t0 = Instant::now();
        let limiter = RateLimiter::new(1, t0);
        assert_eq!(limiter.check(ip("2001:db8::1"), t0), Ok(()));
        assert!(limiter.check(ip("2001:db8::2"), t0).is_err());
        assert_eq!(limiter.check(ip("2001:db8:0:1::1"), t0), Ok(()));
    }

    #[test]
    fn idle_clients_are_forgotten() {
        let t0 = Instant::now();
        let limiter = RateLimiter::new(60, t0);
        for i in 0..100u8 {
            limiter.check(IpAddr::from([10, 0, 0, i]), t0).unwrap();
        }
        assert_eq!(limiter.tracked(), 100);
        // After a minute every bucket has refilled; the next call prunes them.
        limiter
            .check(ip("10.0.1.1"), t0 + Duration::from_secs(61))
            .unwrap();
        assert_eq!(limiter.tracked(), 1);
    }

    #[test]
    fn an_hourly_limit_refills_over_the_hour() {
        let t0 = Instant::now();
        let limiter = RateLimiter::per_period(2, Duration::from_secs(3600), t0);
        assert_eq!(limiter.check(ip("192.0.2.1"), t0), Ok(()));
        assert_eq!(limiter.check(ip("192.0.2.1"), t0), Ok(()));
        assert_eq!(limiter.check(ip("192.0.2.1"), t0), Err(1800));
        assert_eq!(
            limiter.check(ip("192.0.2.1"), t0 + Duration::from_secs(1800)),
            Ok(())
        );
    }
}
