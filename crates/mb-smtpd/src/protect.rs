//! Protection modes (`network.protection.mode`), after the product's firewall modes:
//!
//! - `autoban` (default): a source that opens connections faster than
//!   `autoban.rate` is banned from every mail port for `autoban.period`.
//! - `protected`: as autoban, and submission/SMTPS accept only trusted networks and
//!   trusted addresses; a successful AUTH keeps its address trusted for a day.
//! - `private`: as autoban, and submission/SMTPS accept only trusted networks.
//! - `public`: no restriction beyond the connection limits.
//!
//! Port 25 stays open to everyone not banned: it is the MX. Bans and trusted addresses
//! are kept in mb-rpcd's database (listed and changed with `mb-ban`) and re-read
//! periodically, so they survive restarts and reach every process.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use tokio::time::Instant;

use crate::session::Listener;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Autoban,
    Protected,
    Private,
    Public,
}

impl Mode {
    pub fn parse(s: &str) -> Mode {
        match s {
            "protected" => Mode::Protected,
            "private" => Mode::Private,
            "public" => Mode::Public,
            _ => Mode::Autoban,
        }
    }
}

/// The settings the decisions depend on (from the configuration, per connection).
#[derive(Debug, Clone)]
pub struct Policy {
    pub mode: Mode,
    /// Connections allowed per `window` before a ban.
    pub rate: u32,
    pub window: Duration,
    pub ban_for: Duration,
    pub trusted_networks: Vec<IpNet>,
}

/// How long a successful AUTH keeps an address trusted in protected mode.
pub const TRUST_AFTER_AUTH: Duration = Duration::from_secs(86_400);

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Banned,
    /// Banned just now, by this connection.
    NewBan,
    Untrusted,
}

/// A ban or trust decided here, to be stored in mb-rpcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub ip: IpAddr,
    pub trust: bool,
    pub for_secs: u64,
    pub reason: String,
}

#[derive(Default)]
pub struct Protection {
    bans: HashMap<IpAddr, Instant>,
    trusted: HashMap<IpAddr, Instant>,
    recent: HashMap<IpAddr, VecDeque<Instant>>,
    /// Decisions not yet stored in mb-rpcd.
    pub pending: Vec<Decision>,
}

impl Protection {
    /// Decides whether a new connection may proceed. With `count_rate` false the rate is
    /// counted elsewhere (in Redis, shared by every process) and only the lists and
    /// modes are applied here.
    pub fn admit(
        &mut self,
        p: &Policy,
        ip: IpAddr,
        listener: Listener,
        count_rate: bool,
    ) -> Result<(), Refusal> {
        let now = Instant::now();
        if listener == Listener::Reinject || p.mode == Mode::Public {
            return Ok(());
        }
        let in_networks = p.trusted_networks.iter().any(|n| n.contains(&ip));
        if in_networks {
            return Ok(());
        }
        if self.bans.get(&ip).is_some_and(|until| *until > now) {
            return Err(Refusal::Banned);
        }
        let trusted = self.trusted.get(&ip).is_some_and(|until| *until > now);
        let submission = matches!(listener, Listener::Submission | Listener::Smtps);
        match p.mode {
            Mode::Private if submission => return Err(Refusal::Untrusted),
            Mode::Protected if submission && !trusted => return Err(Refusal::Untrusted),
            _ => {}
        }
        if trusted || !count_rate {
            return Ok(());
        }
        // Without mb-rpcd, `load` does not run: bound the map here too.
        if self.recent.len() > 50_000 {
            self.recent.retain(|_, t| {
                t.back()
                    .is_some_and(|last| now.duration_since(*last) < p.window)
            });
        }
        let times = self.recent.entry(ip).or_default();
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= p.window)
        {
            times.pop_front();
        }
        times.push_back(now);
        if times.len() > p.rate as usize {
            self.recent.remove(&ip);
            self.bans.insert(ip, now + p.ban_for);
            self.remember(Decision {
                ip,
                trust: false,
                for_secs: p.ban_for.as_secs(),
                reason: format!(
                    "more than {} connections in {}s",
                    p.rate,
                    p.window.as_secs()
                ),
            });
            return Err(Refusal::NewBan);
        }
        Ok(())
    }

    /// A ban decided elsewhere (Redis), kept here and stored in mb-rpcd like our own.
    pub fn banned_by_shared(&mut self, p: &Policy, ip: IpAddr) {
        self.bans.insert(ip, Instant::now() + p.ban_for);
        self.remember(Decision {
            ip,
            trust: false,
            for_secs: p.ban_for.as_secs(),
            reason: format!(
                "more than {} connections in {}s (shared)",
                p.rate,
                p.window.as_secs()
            ),
        });
    }

    /// Whether `admit` would skip rate counting for this connection anyway.
    pub fn exempt(&self, p: &Policy, ip: IpAddr, listener: Listener) -> bool {
        listener == Listener::Reinject
            || p.mode == Mode::Public
            || p.trusted_networks.iter().any(|n| n.contains(&ip))
            || self
                .trusted
                .get(&ip)
                .is_some_and(|until| *until > Instant::now())
    }

    /// A successful AUTH: the address is trusted for a day (protected mode opens
    /// submission to it).
    pub fn authenticated(&mut self, ip: IpAddr) {
        self.trusted.insert(ip, Instant::now() + TRUST_AFTER_AUTH);
        self.remember(Decision {
            ip,
            trust: true,
            for_secs: TRUST_AFTER_AUTH.as_secs(),
            reason: "authenticated".into(),
        });
    }

    /// Replaces the stored lists with what mb-rpcd holds: (ip, trust, seconds left).
    /// Decisions still pending are kept, so nothing decided here is forgotten; connection
    /// times older than `window` are dropped, so memory follows recent clients only.
    pub fn load(&mut self, entries: &[(IpAddr, bool, u64)], window: Duration) {
        let now = Instant::now();
        self.bans.clear();
        self.trusted.clear();
        for (ip, trust, left) in entries {
            let until = now + Duration::from_secs(*left);
            if *trust {
                self.trusted.insert(*ip, until);
            } else {
                self.bans.insert(*ip, until);
            }
        }
        for d in &self.pending {
            let until = now + Duration::from_secs(d.for_secs);
            if d.trust {
                self.trusted.insert(d.ip, until);
            } else {
                self.bans.insert(d.ip, until);
            }
        }
        self.recent.retain(|_, t| {
            t.back()
                .is_some_and(|last| now.duration_since(*last) < window)
        });
    }

    /// Decisions kept while mb-rpcd cannot be reached, at most (the oldest go first).
    const MAX_PENDING: usize = 10_000;

    fn remember(&mut self, d: Decision) {
        if self.pending.len() >= Self::MAX_PENDING {
            self.pending.remove(0);
        }
        self.pending.push(d);
    }

    pub fn banned(&self) -> usize {
        let now = Instant::now();
        self.bans.values().filter(|u| **u > now).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: Mode) -> Policy {
        Policy {
            mode,
            rate: 3,
            window: Duration::from_secs(60),
            ban_for: Duration::from_secs(3600),
            trusted_networks: vec!["192.0.2.0/24".parse().unwrap()],
        }
    }

    const BAD: &str = "198.51.100.9";

    #[tokio::test(start_paused = true)]
    async fn autoban_bans_and_unbans() {
        let mut p = Protection::default();
        let pol = policy(Mode::Autoban);
        let ip: IpAddr = BAD.parse().unwrap();
        for _ in 0..3 {
            assert_eq!(p.admit(&pol, ip, Listener::Smtp, true), Ok(()));
        }
        assert_eq!(
            p.admit(&pol, ip, Listener::Smtp, true),
            Err(Refusal::NewBan)
        );
        assert_eq!(
            p.admit(&pol, ip, Listener::Submission, true),
            Err(Refusal::Banned)
        );
        assert_eq!(p.pending.len(), 1);
        assert_eq!(p.banned(), 1);
        // Trusted networks are never banned, whatever their rate.
        let good: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..10 {
            assert_eq!(p.admit(&pol, good, Listener::Smtp, true), Ok(()));
        }
        tokio::time::advance(Duration::from_secs(3601)).await;
        assert_eq!(
            p.admit(&pol, ip, Listener::Smtp, true),
            Ok(()),
            "the ban should have expired"
        );
        assert_eq!(p.banned(), 0);
        // A slow sender is never banned: the window slides.
        let slow: IpAddr = "203.0.113.5".parse().unwrap();
        for _ in 0..10 {
            assert_eq!(p.admit(&pol, slow, Listener::Smtp, true), Ok(()));
            tokio::time::advance(Duration::from_secs(21)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn protected_opens_submission_after_auth() {
        let mut p = Protection::default();
        let pol = policy(Mode::Protected);
        let ip: IpAddr = BAD.parse().unwrap();
        assert_eq!(
            p.admit(&pol, ip, Listener::Submission, true),
            Err(Refusal::Untrusted)
        );
        assert_eq!(
            p.admit(&pol, ip, Listener::Smtp, true),
            Ok(()),
            "port 25 stays open"
        );
        p.authenticated(ip);
        assert_eq!(p.admit(&pol, ip, Listener::Submission, true), Ok(()));
        tokio::time::advance(TRUST_AFTER_AUTH + Duration::from_secs(1)).await;
        assert_eq!(
            p.admit(&pol, ip, Listener::Smtps, true),
            Err(Refusal::Untrusted)
        );
        assert_eq!(
            p.admit(
                &pol,
                "192.0.2.7".parse().unwrap(),
                Listener::Submission,
                true
            ),
            Ok(())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn private_and_public() {
        let mut p = Protection::default();
        let ip: IpAddr = BAD.parse().unwrap();
        p.authenticated(ip);
        assert_eq!(
            p.admit(&policy(Mode::Private), ip, Listener::Submission, true),
            Err(Refusal::Untrusted)
        );
        assert_eq!(
            p.admit(
                &policy(Mode::Private),
                "192.0.2.7".parse().unwrap(),
                Listener::Submission,
                true
            ),
            Ok(())
        );
        let public = policy(Mode::Public);
        for _ in 0..10 {
            assert_eq!(
                p.admit(
                    &public,
                    "203.0.113.77".parse().unwrap(),
                    Listener::Submission,
                    true
                ),
                Ok(())
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stored_lists_replace_memory_but_keep_pending_decisions() {
        let mut p = Protection::default();
        let pol = policy(Mode::Autoban);
        let stored: IpAddr = "203.0.113.1".parse().unwrap();
        p.load(&[(stored, false, 100)], pol.window);
        assert_eq!(
            p.admit(&pol, stored, Listener::Smtp, true),
            Err(Refusal::Banned)
        );
        let ip: IpAddr = BAD.parse().unwrap();
        for _ in 0..4 {
            let _ = p.admit(&pol, ip, Listener::Smtp, true);
        }
        // The stored list does not know this ban yet: it stays while pending.
        p.load(&[], pol.window);
        assert_eq!(
            p.admit(&pol, ip, Listener::Smtp, true),
            Err(Refusal::Banned)
        );
        assert_eq!(
            p.admit(&pol, stored, Listener::Smtp, true),
            Ok(()),
            "an unban from mb-ban takes effect"
        );
    }
}
