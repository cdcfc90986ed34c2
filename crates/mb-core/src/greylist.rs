//! Greylisting decisions (`greylist.*`), as pure functions of what is stored and the
//! time: a triplet (client network, sender, recipient) seen for the first time is
//! deferred; a retry after `delay` and within `retry_window` of the first attempt
//! passes, and the triplet is then remembered for `lifetime` after its last use; a client
//! network whose triplets passed `auto_whitelist` times is not greylisted any more (as
//! postgrey's `--auto-whitelist-clients`). mb-smtpd applies them to Redis, mb-rpcd to its
//! database, so both stores decide alike, and the tests pass the time in.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::Config;

/// The `greylist.*` settings, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub delay: i64,
    pub retry_window: i64,
    pub lifetime: i64,
    /// 0: never whitelist a client.
    pub auto_whitelist: u32,
}

fn secs(cfg: &Config, key: &str) -> i64 {
    i64::try_from(cfg.duration(key).as_secs()).unwrap_or(i64::MAX / 4)
}

impl Timing {
    pub fn from_config(cfg: &Config) -> Timing {
        Timing {
            delay: secs(cfg, "greylist.delay"),
            retry_window: secs(cfg, "greylist.retry_window"),
            lifetime: secs(cfg, "greylist.lifetime"),
            auto_whitelist: u32::try_from(cfg.int("greylist.auto_whitelist")).unwrap_or(0),
        }
    }

    /// Why these timings cannot work (for `Config::check`): a retry must come after
    /// `delay` and within `retry_window`, so a window no longer than the delay expires
    /// every triplet before it can pass.
    pub fn problem(&self) -> Option<String> {
        (self.retry_window <= self.delay).then(|| {
            format!(
                "greylist.retry_window ({}s) must be longer than greylist.delay ({}s): otherwise no retry can pass",
                self.retry_window, self.delay
            )
        })
    }
}

/// The network a client is greylisted as: its IPv4 /24 (a sending farm retries from a
/// neighbouring address, as Postfix's postscreen and postgrey assume) or its IPv6
/// network of `ipv6_prefix` bits. An IPv4-mapped IPv6 address is its IPv4 address.
pub fn client_network(ip: IpAddr, ipv6_prefix: u8) -> IpNet {
    let ip = ip.to_canonical();
    let len = if ip.is_ipv4() {
        24
    } else {
        ipv6_prefix.min(128)
    };
    IpNet::new(ip, len).map_or_else(|_| IpNet::from(ip), |n| n.trunc())
}

/// What one RCPT is greylisted by, in the form it is stored in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Triplet {
    /// The client network (`192.0.2.0/24`, `2001:db8::/64`).
    pub network: String,
    /// Lower-cased; empty for the null sender.
    pub sender: String,
    /// Lower-cased.
    pub recipient: String,
}

impl Triplet {
    pub fn new(client: IpAddr, ipv6_prefix: u8, sender: &str, recipient: &str) -> Triplet {
        Triplet {
            network: client_network(client, ipv6_prefix).to_string(),
            sender: sender.to_lowercase(),
            recipient: recipient.to_lowercase(),
        }
    }
}

/// Redis keys of the greylist start with this (`mb-greylist flush --all` removes them).
pub const REDIS_PREFIX: &str = "mb:grey:";

impl Triplet {
    /// The Redis key of the triplet: the sender's length makes it unambiguous, since a
    /// quoted local part may hold any separator.
    pub fn redis_key(&self) -> String {
        format!(
            "{REDIS_PREFIX}t:{}|{}:{}|{}",
            self.network,
            self.sender.len(),
            self.sender,
            self.recipient
        )
    }
}

/// The Redis key of a client network's record.
pub fn redis_client_key(network: &str) -> String {
    format!("{REDIS_PREFIX}c:{network}")
}

/// A triplet's Redis value: the entry with the triplet it is for, so a listing needs no
/// parsing of keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredTriplet {
    pub network: String,
    pub sender: String,
    pub recipient: String,
    #[serde(flatten)]
    pub entry: Entry,
}

/// A client network's Redis value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredClient {
    pub network: String,
    #[serde(flatten)]
    pub client: Client,
}

/// A stored triplet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Unix seconds of the first attempt (of this round: an entry whose retry window
    /// ran out starts over).
    pub first_seen: i64,
    pub last_seen: i64,
    /// The triplet was retried in time and passes until it has not been used for
    /// `lifetime`.
    pub passed: bool,
    /// Attempts while deferred, and passes once passed.
    pub count: u32,
}

impl Entry {
    /// When the entry may be forgotten: a deferred one when its retry window closes, a
    /// passed one `lifetime` after its last use.
    pub fn expires_at(&self, t: &Timing) -> i64 {
        if self.passed {
            self.last_seen.saturating_add(t.lifetime)
        } else {
            self.first_seen.saturating_add(t.retry_window)
        }
    }
}

/// A client network's passed triplets, for auto-whitelisting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Client {
    pub passes: u32,
    pub last_seen: i64,
}

impl Client {
    pub fn expires_at(&self, t: &Timing) -> i64 {
        self.last_seen.saturating_add(t.lifetime)
    }

    /// Whether the client is auto-whitelisted at `now`.
    pub fn whitelisted(&self, t: &Timing, now: i64) -> bool {
        t.auto_whitelist > 0 && self.passes >= t.auto_whitelist && now <= self.expires_at(t)
    }
}

/// What greylisting answers for one RCPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The triplet passed (now or before).
    Pass,
    /// 451 4.7.1: try again in this many seconds (at least 1).
    Defer { retry_in: i64 },
    /// The client network is auto-whitelisted: the triplet was not looked at.
    Whitelisted,
}

/// The decision for a triplet and what to store for it afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    pub decision: Decision,
    pub entry: Entry,
    /// This attempt is the retry that passed: the client's count goes up by one.
    pub newly_passed: bool,
}

/// Decides for a triplet whose stored entry is `stored` (none: never seen, or forgotten)
/// at `now` (Unix seconds).
pub fn check(t: &Timing, stored: Option<Entry>, now: i64) -> Checked {
    let fresh = || Checked {
        decision: Decision::Defer {
            retry_in: t.delay.max(1),
        },
        entry: Entry {
            first_seen: now,
            last_seen: now,
            passed: false,
            count: 1,
        },
        newly_passed: false,
    };
    let Some(e) = stored.filter(|e| now <= e.expires_at(t)) else {
        return fresh();
    };
    if e.passed {
        return Checked {
            decision: Decision::Pass,
            entry: Entry {
                last_seen: now,
                count: e.count.saturating_add(1),
                ..e
            },
            newly_passed: false,
        };
    }
    let waited = now - e.first_seen;
    if waited < t.delay {
        return Checked {
            decision: Decision::Defer {
                retry_in: (t.delay - waited).max(1),
            },
            entry: Entry {
                last_seen: now,
                count: e.count.saturating_add(1),
                ..e
            },
            newly_passed: false,
        };
    }
    Checked {
        decision: Decision::Pass,
        entry: Entry {
            last_seen: now,
            passed: true,
            count: 1,
            ..e
        },
        newly_passed: true,
    }
}

/// The client's record after one of its triplets passed at `now`.
pub fn client_passed(t: &Timing, stored: Option<Client>, now: i64) -> Client {
    let passes = stored
        .filter(|c| now <= c.expires_at(t))
        .map_or(0, |c| c.passes);
    Client {
        passes: passes.saturating_add(1),
        last_seen: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_window_no_longer_than_the_delay_is_refused_by_the_config_check() {
        let load = |toml: &str| crate::Config::from_toml_str(toml, "t.toml").expect("config");
        assert!(load("").check().is_empty());
        for bad in [
            "[greylist]\ndelay = \"10m\"\nretry_window = \"5m\"\n",
            "[greylist]\ndelay = \"5m\"\nretry_window = \"5m\"\n",
        ] {
            let problems = load(bad).check();
            assert!(
                problems.iter().any(|p| p.contains("greylist.retry_window")),
                "{bad}: {problems:?}"
            );
        }
        let ok = load("[greylist]\ndelay = \"5m\"\nretry_window = \"6m\"\n");
        assert!(ok.check().is_empty(), "{:?}", ok.check());
    }

    const T: Timing = Timing {
        delay: 300,
        retry_window: 4 * 3600,
        lifetime: 35 * 86_400,
        auto_whitelist: 3,
    };

    fn net(ip: &str, prefix: u8) -> String {
        client_network(ip.parse().expect("an address"), prefix).to_string()
    }

    #[test]
    fn clients_are_grouped_by_network() {
        for (ip, prefix, expected) in [
            ("192.0.2.77", 64, "192.0.2.0/24"),
            ("192.0.2.1", 48, "192.0.2.0/24"),
            ("127.0.1.2", 64, "127.0.1.0/24"),
            ("127.0.0.2", 64, "127.0.0.0/24"),
            ("::ffff:192.0.2.9", 64, "192.0.2.0/24"),
            ("2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::/64"),
            ("2001:db8:1:2:3:4:5:6", 48, "2001:db8:1::/48"),
            ("2001:db8::1", 128, "2001:db8::1/128"),
        ] {
            assert_eq!(net(ip, prefix), expected, "{ip} with /{prefix}");
        }
        let a = Triplet::new("192.0.2.1".parse().expect("ip"), 64, "A@X.test", "B@Y.test");
        let b = Triplet::new(
            "192.0.2.200".parse().expect("ip"),
            64,
            "a@x.test",
            "b@y.TEST",
        );
        assert_eq!(a, b);
        assert_eq!(a.sender, "a@x.test");
        let null = Triplet::new("192.0.2.1".parse().expect("ip"), 64, "", "b@y.test");
        assert_eq!(null.sender, "");
        assert_ne!(
            a,
            Triplet::new("192.0.3.1".parse().expect("ip"), 64, "a@x.test", "b@y.test")
        );
    }

    #[test]
    fn a_retry_passes_only_after_the_delay_and_within_the_window() {
        let t0 = 1_000_000;
        let first = check(&T, None, t0);
        assert_eq!(first.decision, Decision::Defer { retry_in: 300 });
        assert!(!first.newly_passed);

        let early = check(&T, Some(first.entry), t0 + 60);
        assert_eq!(early.decision, Decision::Defer { retry_in: 240 });
        // An early retry does not restart the delay.
        assert_eq!(early.entry.first_seen, t0);

        let on_time = check(&T, Some(early.entry), t0 + 300);
        assert_eq!(on_time.decision, Decision::Pass);
        assert!(on_time.newly_passed);
        assert!(on_time.entry.passed);

        // Remembered for its lifetime after the last use, which each use extends.
        let later = check(&T, Some(on_time.entry), t0 + 300 + T.lifetime);
        assert_eq!(later.decision, Decision::Pass);
        assert!(!later.newly_passed);
        let much_later = t0 + 300 + 2 * T.lifetime;
        assert_eq!(
            check(&T, Some(later.entry), much_later).decision,
            Decision::Pass
        );
        let forgotten = check(&T, Some(later.entry), much_later + 1);
        assert_eq!(forgotten.decision, Decision::Defer { retry_in: 300 });
        assert_eq!(forgotten.entry.first_seen, much_later + 1);
    }

    #[test]
    fn a_retry_after_the_window_starts_over() {
        let t0 = 5_000;
        let first = check(&T, None, t0);
        let last_in_window = check(&T, Some(first.entry), t0 + T.retry_window);
        assert_eq!(last_in_window.decision, Decision::Pass);
        let too_late = check(&T, Some(first.entry), t0 + T.retry_window + 1);
        assert_eq!(too_late.decision, Decision::Defer { retry_in: 300 });
        assert_eq!(too_late.entry.first_seen, t0 + T.retry_window + 1);
    }

    #[test]
    fn a_zero_delay_still_defers_the_first_attempt() {
        let t = Timing { delay: 0, ..T };
        let first = check(&t, None, 10);
        assert_eq!(first.decision, Decision::Defer { retry_in: 1 });
        assert_eq!(check(&t, Some(first.entry), 10).decision, Decision::Pass);
    }

    #[test]
    fn a_client_is_whitelisted_after_enough_passes_while_remembered() {
        let mut client = None;
        for n in 1..=3 {
            let c = client_passed(&T, client, 100 * n);
            assert_eq!(c.passes, u32::try_from(n).expect("small"));
            assert_eq!(c.whitelisted(&T, 100 * n), n == 3, "after {n} passes");
            client = Some(c);
        }
        let c = client.expect("a client");
        assert!(c.whitelisted(&T, 300 + T.lifetime));
        assert!(!c.whitelisted(&T, 300 + T.lifetime + 1));
        // A forgotten client counts from zero again.
        assert_eq!(client_passed(&T, client, 300 + T.lifetime + 1).passes, 1);
        // 0 never whitelists.
        let never = Timing {
            auto_whitelist: 0,
            ..T
        };
        assert!(
            !Client {
                passes: 1000,
                last_seen: 0
            }
            .whitelisted(&never, 0)
        );
    }
}
