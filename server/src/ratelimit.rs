//! Per-user rate limits: a token bucket per user, shared by all of the
//! user's connections on this node. The node keeps one limiter for sends,
//! one for group leaves, one for control requests, one for MarkSeen, one
//! for heartbeats and one for delivery acks beyond what was delivered.
//!
//! A bucket holds up to `burst` tokens and refills at `rate` per second; a
//! send (a leave, a request) takes one. Buckets exist only for users who sent recently: a
//! bucket that has refilled completely is the same as no bucket, so the
//! sweeper drops it.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::store::UserId;

/// How often full buckets are dropped.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Group leaves a user may make per second, sustained: far more than a
/// person leaves, so it limits only a flood (each leave is a transaction
/// on the send committer, in line with everyone's sends).
pub const LEAVE_RATE: u32 = 10;
/// Leaves a user may make at once above [`LEAVE_RATE`]: a user leaving
/// every group they are in at once stays under it.
pub const LEAVE_BURST: u32 = 500;

/// Sessions one connection may log out a second (RevokeSession), sustained,
/// and at once: a person logs out a few devices; a flood of ids that name
/// nothing is a store write each.
pub const REVOKE_RATE: u32 = 1;
/// See [`REVOKE_RATE`].
pub const REVOKE_BURST: u32 = 10;

/// A user's heartbeat bucket: `max_sessions` devices beating every
/// `interval` (what the node announces; clients never beat more often
/// than once a second) fit in it twice over, so only a flood is ignored.
pub fn heartbeat_limiter(max_sessions: usize, interval: Duration) -> RateLimiter {
    let devices = u32::try_from(max_sessions).unwrap_or(u32::MAX).max(1);
    let per_second = f64::from(devices) / interval.as_secs_f64().max(1.0);
    let rate = (2.0 * per_second).ceil() as u32;
    RateLimiter::new(rate.max(1), devices.saturating_mul(2))
}

/// One of the node's limiters: per user (sends, group leaves, control
/// requests, heartbeats) or per source address (registrations).
pub struct RateLimiter<K = UserId> {
    /// Tokens per second; 0 disables the limit.
    rate: f64,
    burst: f64,
    buckets: DashMap<K, Bucket>,
}

impl RateLimiter {
    /// `rate` sends per second with bursts of `burst`; `rate == 0` never
    /// limits.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self::with_rate(f64::from(rate), burst)
    }
}

impl<K: Eq + std::hash::Hash> RateLimiter<K> {
    /// `per_hour` at once, refilled over the hour (registrations per
    /// source address, uploads per user); 0 never limits.
    pub fn per_hour(per_hour: u32) -> Self {
        Self::with_rate(f64::from(per_hour) / 3600.0, per_hour)
    }

    /// `rate` tokens a second (fractions welcome), `burst` at once.
    pub fn with_rate(rate: f64, burst: u32) -> Self {
        RateLimiter {
            rate,
            burst: f64::from(burst.max(1)),
            buckets: DashMap::new(),
        }
    }

    /// Takes a token for one send (leave, request) by `user`, or says how
    /// long until one is available.
    pub fn check(&self, user: K, now: Instant) -> Result<(), Duration> {
        if self.rate == 0.0 {
            return Ok(());
        }
        let mut bucket = self.buckets.entry(user).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        // Never backwards: two connections of a user may come with their
        // instants in either order, and going back would credit the gap
        // twice.
        bucket.updated = bucket.updated.max(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / self.rate;
            // Round up to whole milliseconds so a client that waits exactly
            // this long finds its token.
            Err(Duration::from_millis((wait * 1000.0).ceil() as u64))
        }
    }

    /// Returns a token taken for something that did not happen (up to
    /// the burst).
    pub fn give_back(&self, user: K) {
        if let Some(mut bucket) = self.buckets.get_mut(&user) {
            bucket.tokens = (bucket.tokens + 1.0).min(self.burst);
        }
    }

    /// Drops buckets that have refilled completely.
    pub fn sweep(&self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        self.buckets.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
            b.tokens + elapsed * rate < burst
        });
    }

    /// Users with a bucket (for tests and debugging).
    pub fn tracked_users(&self) -> usize {
        self.buckets.len()
    }
}

/// Connections from each address that have not authenticated yet, each
/// up to a maximum: established connections get `max-connections` places
/// before they log in, so without it one host completing handshakes could
/// take them all for `auth-timeout` at a time, over and over. Legitimate
/// clients log in within a round trip or two of the handshake, so even
/// many behind one carrier NAT seldom wait at once.
pub struct Unauthenticated {
    max: usize,
    counts: DashMap<IpAddr, usize>,
}

impl Unauthenticated {
    /// At most `max` waiting per address; 0: no limit.
    pub fn new(max: usize) -> Self {
        Unauthenticated {
            max,
            counts: DashMap::new(),
        }
    }

    /// Counts a connection from `address` as waiting, unless `max` are.
    pub fn try_take(&self, address: IpAddr) -> bool {
        if self.max == 0 {
            return true;
        }
        let mut count = self.counts.entry(address).or_insert(0);
        if *count >= self.max {
            return false;
        }
        *count += 1;
        true
    }

    /// A connection counted by [`try_take`](Self::try_take) authenticated
    /// or ended.
    pub fn give_back(&self, address: IpAddr) {
        if self.max == 0 {
            return;
        }
        self.counts.remove_if_mut(&address, |_, count| {
            *count = count.saturating_sub(1);
            *count == 0
        });
    }

    /// Addresses with a connection waiting (for tests and metrics).
    pub fn addresses(&self) -> usize {
        self.counts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let limiter = RateLimiter::new(10, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.check(1, t0).unwrap();
        }
        let wait = limiter.check(1, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // Another user has their own bucket.
        limiter.check(2, t0).unwrap();
        // After the wait, exactly one token is back.
        limiter.check(1, t0 + wait).unwrap();
        assert!(limiter.check(1, t0 + wait).is_err());
        // Refill never exceeds the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            limiter.check(1, later).unwrap();
        }
        assert!(limiter.check(1, later).is_err());
    }

    #[test]
    fn registrations_per_address_refill_over_the_hour() {
        let limiter = RateLimiter::per_hour(60);
        let (here, there): (IpAddr, IpAddr) =
            ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..60 {
            limiter.check(here, t0).unwrap();
        }
        let wait = limiter.check(here, t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(60), "one a minute");
        limiter.check(there, t0).unwrap();
        limiter.check(here, t0 + wait).unwrap();
        assert!(limiter.check(here, t0 + wait).is_err());
        // One that made no account is given back.
        limiter.give_back(here);
        limiter.check(here, t0 + wait).unwrap();
        assert!(limiter.check(here, t0 + wait).is_err());
        assert!(
            RateLimiter::per_hour(0).check(here, t0).is_ok(),
            "0: no limit"
        );
    }

    #[test]
    fn every_device_beating_at_the_interval_fits_in_the_heartbeat_bucket() {
        // 16 devices every 15 s: 3 a second sustained (2.1 twice over,
        // rounded up), 32 at once.
        let limiter = heartbeat_limiter(16, Duration::from_secs(15));
        let t0 = Instant::now();
        for round in 0..10u32 {
            let at = t0 + Duration::from_secs(15) * round;
            for _ in 0..16 {
                limiter.check(1, at).unwrap();
            }
        }
        // Full again after the last round: 32 at once, not 33.
        let later = t0 + Duration::from_secs(150);
        for _ in 0..32 {
            limiter.check(1, later).unwrap();
        }
        assert!(limiter.check(1, later).is_err());
        // A one-second interval (the least clients use) still fits.
        let fast = heartbeat_limiter(4, Duration::from_secs(1));
        for second in 0..20u32 {
            for _ in 0..4 {
                fast.check(1, t0 + Duration::from_secs(1) * second).unwrap();
            }
        }
    }

    #[test]
    fn an_earlier_instant_does_not_credit_a_gap_twice() {
        // Two connections of one user: the later instant is checked first.
        let limiter = RateLimiter::new(10, 1);
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(100);
        limiter.check(1, t0).unwrap();
        limiter.check(1, t1).unwrap(); // refilled by t1
        assert!(limiter.check(1, t0).is_err());
        // The next token is 100 ms after t1, not after t0.
        assert!(limiter.check(1, t1 + Duration::from_millis(50)).is_err());
        limiter.check(1, t1 + Duration::from_millis(100)).unwrap();
    }

    #[test]
    fn zero_rate_never_limits_and_sweep_forgets_full_buckets() {
        let off = RateLimiter::new(0, 0);
        let now = Instant::now();
        for _ in 0..10_000 {
            off.check(1, now).unwrap();
        }
        assert_eq!(off.tracked_users(), 0);

        let limiter = RateLimiter::new(10, 5);
        limiter.check(1, now).unwrap();
        limiter.check(2, now).unwrap();
        limiter.sweep(now);
        assert_eq!(limiter.tracked_users(), 2, "not refilled yet");
        limiter.sweep(now + Duration::from_secs(1));
        assert_eq!(limiter.tracked_users(), 0);
    }

    #[test]
    fn addresses_wait_up_to_their_share_and_are_forgotten_when_none_do() {
        let waiting = Unauthenticated::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert!(waiting.try_take(a) && waiting.try_take(a));
        assert!(!waiting.try_take(a), "a third from one address");
        assert!(waiting.try_take(b), "another address has its own share");
        waiting.give_back(a);
        assert!(waiting.try_take(a), "a place given back");
        for address in [a, a, b] {
            waiting.give_back(address);
        }
        assert_eq!(
            waiting.addresses(),
            0,
            "nothing kept for addresses none wait from"
        );
        let unlimited = Unauthenticated::new(0);
        assert!((0..1_000).all(|_| unlimited.try_take(a)));
        assert_eq!(unlimited.addresses(), 0);
    }
}
