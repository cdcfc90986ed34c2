//! Pacing of a message's content (`smtp.data_rate_limit`, `smtp.data_rate_allowance`):
//! past its allowance, an unauthenticated client's message is read no faster than the
//! rate.
//!
//! Why: a few clients streaming 20 MB messages as fast as the network allows make the
//! spool write hundreds of MB a second, and on ext4 every other message's commit
//! (its fsync) waits for the journal to flush those dirty pages first: one sender of
//! huge mail slowed every small message down to a seventh of its speed. Reading the
//! large message more slowly bounds the dirty data it makes. The socket is simply not
//! read while the pacer sleeps, so TCP's own flow control holds the sender back: no
//! buffering, no busy loop, one timer at a time per session.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use tokio::time::Instant;

/// The pacing configuration of a listener (none: not paced, as reinjection).
#[derive(Debug, Clone)]
pub struct DataRate {
    /// Bytes per second of one message past its allowance.
    pub rate: u64,
    /// Bytes of each message read at full speed.
    pub allowance: u64,
    /// Clients never paced besides mynetworks (`network.protection.trusted_networks`).
    pub exempt: Vec<IpNet>,
}

impl DataRate {
    /// Whether a message from `ip` is paced: not from `mynetworks` or the exempt
    /// networks, and not `authenticated` (submission: the account holder's own mail).
    pub fn applies(&self, ip: IpAddr, authenticated: bool, mynetworks: &[IpNet]) -> bool {
        self.rate > 0
            && !authenticated
            && !mynetworks
                .iter()
                .chain(&self.exempt)
                .any(|n| n.contains(&ip))
    }
}

/// The pacing of one message.
#[derive(Debug)]
pub struct Pacer {
    rate: u64,
    allowance: u64,
    /// Bytes of the message read so far.
    read: u64,
    /// When the bytes read past the allowance were due at the rate (none: the allowance
    /// is not used up yet).
    due: Option<Instant>,
}

/// Ahead of schedule by less than this, the reader goes on: fewer wake-ups for a burst
/// of at most `rate` x this.
const SLACK: Duration = Duration::from_millis(20);

/// Most time a client slower than the rate may make up for: without it, a client that
/// trickled for a minute could then send a minute's worth at full speed.
const CREDIT: Duration = Duration::from_secs(1);

impl Pacer {
    /// A pacer for a message (none: `rate` is `None`, the client is not paced).
    pub fn new(rate: Option<&DataRate>) -> Option<Pacer> {
        rate.map(|r| Pacer {
            rate: r.rate.max(1),
            allowance: r.allowance,
            read: 0,
            due: None,
        })
    }

    /// Counts `n` more bytes read, and sleeps until reading them was due; returns the
    /// time slept, which the caller's deadlines must not count against the client.
    pub async fn pace(&mut self, n: u64) -> Duration {
        self.read = self.read.saturating_add(n);
        if self.read <= self.allowance {
            return Duration::ZERO;
        }
        let now = Instant::now();
        // The read that used up the allowance starts the clock (it is already here).
        let Some(due) = self.due else {
            self.due = Some(now);
            return Duration::ZERO;
        };
        let due = due.max(now.checked_sub(CREDIT).unwrap_or(now))
            + Duration::from_secs_f64(n as f64 / self.rate as f64);
        self.due = Some(due);
        if due <= now + SLACK {
            return Duration::ZERO;
        }
        tokio::time::sleep_until(due).await;
        now.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(rate: u64, allowance: u64) -> DataRate {
        DataRate {
            rate,
            allowance,
            exempt: vec!["192.0.2.0/24".parse().unwrap()],
        }
    }

    /// Reads `total` bytes in 64 KiB reads, returning the time they took and the time
    /// `pace` said it slept.
    async fn read(pacer: &mut Option<Pacer>, total: u64) -> (Duration, Duration) {
        let start = Instant::now();
        let mut slept = Duration::ZERO;
        let mut left = total;
        while left > 0 {
            let n = left.min(64 * 1024);
            if let Some(p) = pacer.as_mut() {
                slept += p.pace(n).await;
            }
            left -= n;
        }
        (start.elapsed(), slept)
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_past_the_allowance_take_their_share_of_the_rate() {
        let r = rate(1 << 20, 1 << 20);
        // Within the allowance: no wait at all.
        let mut p = Pacer::new(Some(&r));
        assert_eq!(read(&mut p, 1 << 20).await.0, Duration::ZERO);
        // 6 MiB past the allowance at 1 MiB/s: 6 s, less the read that crossed it
        // (64 KiB, 62.5 ms), which starts the clock.
        let mut p = Pacer::new(Some(&r));
        let (took, slept) = read(&mut p, 7 << 20).await;
        assert!(
            took >= Duration::from_millis(5_900) && took <= Duration::from_millis(6_000),
            "{took:?}"
        );
        assert_eq!(slept, took, "all the time was the pacer's sleep");
        // Twice the rate, half the time.
        let mut p = Pacer::new(Some(&rate(2 << 20, 1 << 20)));
        let (took, _) = read(&mut p, 7 << 20).await;
        assert!(
            took >= Duration::from_millis(2_900) && took <= Duration::from_millis(3_000),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_slower_than_the_rate_is_not_slowed_further() {
        let mut p = Pacer::new(Some(&rate(1 << 20, 0))).unwrap();
        let mut slept = Duration::ZERO;
        for _ in 0..10 {
            // 100 KiB every 200 ms: half the rate.
            tokio::time::sleep(Duration::from_millis(200)).await;
            slept += p.pace(100 * 1024).await;
        }
        assert_eq!(slept, Duration::ZERO);
        // Then at full speed: one second's credit, and the rate again after it.
        let mut p = Some(p);
        let (took, _) = read(&mut p, 3 << 20).await;
        assert!(
            took >= Duration::from_millis(1_900) && took <= Duration::from_millis(2_100),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn exempt_clients_are_not_paced() {
        let r = rate(1 << 20, 1 << 20);
        let mynetworks: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let outside: IpAddr = "198.51.100.7".parse().unwrap();
        assert!(r.applies(outside, false, &mynetworks));
        for (ip, auth) in [
            (outside, true),
            ("10.1.2.3".parse().unwrap(), false),
            ("192.0.2.9".parse().unwrap(), false),
        ] {
            assert!(!r.applies(ip, auth, &mynetworks), "{ip} auth {auth}");
        }
        assert!(!rate(0, 1 << 20).applies(outside, false, &mynetworks));
        // What the session does for an exempt client: no pacer, no wait.
        let mut p = Pacer::new(r.applies(outside, true, &mynetworks).then_some(&r));
        assert!(p.is_none());
        assert_eq!(read(&mut p, 20 << 20).await.0, Duration::ZERO);
    }
}
