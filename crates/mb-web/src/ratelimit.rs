//! Per-client rate limit (`network.https.rate_limit` requests a minute, plus
//! `network.https.rate_burst` at once): one token bucket per address (IPv6 by /64, what
//! one subscriber usually holds), in a map of bounded size so a flood from many
//! addresses cannot grow it without end.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use tokio::time::Instant;

/// The most addresses tracked at once.
pub const MAX_CLIENTS: usize = 65_536;

/// The token buckets.
pub struct Limiter {
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    max: usize,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// What the limiter says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refused; a token is back after this many seconds.
    Limit {
        retry_after: u64,
    },
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::new(MAX_CLIENTS)
    }
}

impl Limiter {
    pub fn new(max: usize) -> Limiter {
        Limiter {
            buckets: Mutex::new(HashMap::new()),
            max: max.max(1),
        }
    }

    /// Takes a token for `ip` at `per_minute` with `burst` above it.
    pub fn check(&self, ip: IpAddr, per_minute: u64, burst: u64) -> Decision {
        let now = Instant::now();
        let rate = per_minute.max(1) as f64 / 60.0;
        let capacity = (burst + 1) as f64;
        let key = bucket_key(ip);
        let mut map = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !map.contains_key(&key) && map.len() >= self.max {
            // Forget the clients whose bucket has refilled: they are as if new.
            map.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < capacity);
            if map.len() >= self.max {
                tracing::warn!(
                    clients = map.len(),
                    "rate limit table full: starting it afresh"
                );
                map.clear();
            }
        }
        let b = map.entry(key).or_insert(Bucket {
            tokens: capacity,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(capacity);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Decision::Allow
        } else {
            let wait = ((1.0 - b.tokens) / rate).ceil();
            Decision::Limit {
                retry_after: (wait as u64).max(1),
            }
        }
    }

    /// How many addresses are tracked.
    pub fn len(&self) -> usize {
        self.buckets.lock().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// IPv4 by address, IPv6 by its /64.
fn bucket_key(ip: IpAddr) -> IpAddr {
    match crate::peer::canonical(ip) {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_rate_per_address() {
        let l = Limiter::default();
        let a = ip("192.0.2.1");
        // 60 a minute with 2 above: three at once, then one a second.
        for _ in 0..3 {
            assert_eq!(l.check(a, 60, 2), Decision::Allow);
        }
        assert_eq!(l.check(a, 60, 2), Decision::Limit { retry_after: 1 });
        // Another address is not affected.
        assert_eq!(l.check(ip("192.0.2.2"), 60, 2), Decision::Allow);
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert_eq!(l.check(a, 60, 2), Decision::Allow);
        assert_eq!(l.check(a, 60, 2), Decision::Limit { retry_after: 1 });
        // A slow rate says how long to wait.
        let b = ip("192.0.2.3");
        assert_eq!(l.check(b, 2, 0), Decision::Allow);
        assert_eq!(l.check(b, 2, 0), Decision::Limit { retry_after: 30 });
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_is_limited_by_64_and_mapped_ipv4_is_ipv4() {
        let l = Limiter::default();
        assert_eq!(l.check(ip("2001:db8:1:2::1"), 60, 0), Decision::Allow);
        assert!(matches!(
            l.check(ip("2001:db8:1:2::ffff"), 60, 0),
            Decision::Limit { .. }
        ));
        assert_eq!(l.check(ip("2001:db8:1:3::1"), 60, 0), Decision::Allow);
        assert_eq!(l.check(ip("192.0.2.9"), 60, 0), Decision::Allow);
        assert!(matches!(
            l.check(ip("::ffff:192.0.2.9"), 60, 0),
            Decision::Limit { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_stays_bounded() {
        let l = Limiter::new(100);
        for i in 0..1000u32 {
            l.check(IpAddr::from(i.to_be_bytes()), 60, 0);
            assert!(l.len() <= 100, "{}", l.len());
        }
        // A client in the middle of its limit is kept while idle ones make room.
        let l = Limiter::new(2);
        l.check(ip("198.51.100.2"), 60, 0);
        tokio::time::advance(Duration::from_millis(1500)).await;
        let busy = ip("198.51.100.1");
        assert_eq!(l.check(busy, 60, 0), Decision::Allow);
        assert_eq!(l.check(ip("198.51.100.3"), 60, 0), Decision::Allow);
        assert_eq!(l.len(), 2);
        assert!(matches!(l.check(busy, 60, 0), Decision::Limit { .. }));
    }
}
