//! Protection modes (`network.protection.mode`), after the product's firewall modes:
//!
//! - `autoban` (default): a source that opens submission or SMTPS connections faster
//!   than `autoban.rate`, or keeps knocking on port 25 after the per-client limits
//!   refused it (`network.smtp.max_per_source`, `rate_per_source`) more often than
//!   `autoban.rate`, is banned from every mail port for `autoban.period`. Connections
//!   to port 25 within the per-client limits never count: a busy honest MTA opens many
//!   connections a minute to an MX (Postfix up to 20 at once to one destination), and
//!   the product documents rate-limit the submission ports only.
//! - `protected`: as autoban, and submission/SMTPS accept only trusted networks and
//!   trusted addresses; a successful AUTH keeps its address trusted for a day.
//! - `private`: as autoban, and submission/SMTPS accept only trusted networks.
//! - `public`: no restriction beyond the connection limits.
//!
//! Port 25 stays open to everyone not banned: it is the MX. Bans and trusted addresses
//! are kept in mb-rpcd's database (listed and changed with `mb-ban`) and re-read
//! periodically, so they survive restarts and reach every process.
//!
//! A client is an IPv4 address or an IPv6 network of `network.smtp.ipv6_prefix` bits
//! (one host usually holds a whole /64, so counting single IPv6 addresses would let it
//! pose as unlimited clients). Bans may also name wider networks (`mb-ban add
//! 192.0.2.0/24`), which refuse every address inside them.

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
    /// `network.smtp.ipv6_prefix`: the IPv6 network counted as one client.
    pub ipv6_prefix: u8,
}

/// Whether every connection on `listener` counts toward the ban (submission and SMTPS);
/// on port 25 only connections the per-client limits refused count (`over_limit`).
pub fn counts_every_connection(listener: Listener) -> bool {
    matches!(listener, Listener::Submission | Listener::Smtps)
}

/// The client `ip` counts as: the address itself for IPv4, its network of
/// `ipv6_prefix` bits for IPv6.
pub fn source(ip: IpAddr, ipv6_prefix: u8) -> IpNet {
    let len = if ip.is_ipv4() {
        32
    } else {
        ipv6_prefix.min(128)
    };
    IpNet::new(ip, len).map_or_else(|_| IpNet::from(ip), |n| n.trunc())
}

/// A network as stored in mb-rpcd: a single address without its `/32` or `/128`.
pub fn net_text(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.trunc().to_string()
    }
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
    pub ip: IpNet,
    pub trust: bool,
    pub for_secs: u64,
    pub reason: String,
}

#[derive(Default)]
pub struct Protection {
    /// Bans and trusts by client (`source`), looked up in one step.
    bans: HashMap<IpNet, Instant>,
    trusted: HashMap<IpNet, Instant>,
    /// Entries wider than one client (`mb-ban add 192.0.2.0/24`): (network, trust, until).
    wide: Vec<(IpNet, bool, Instant)>,
    recent: HashMap<IpNet, VecDeque<Instant>>,
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
        let key = source(ip, p.ipv6_prefix);
        if self.listed(false, key, ip, now) {
            return Err(Refusal::Banned);
        }
        let trusted = self.listed(true, key, ip, now);
        let submission = matches!(listener, Listener::Submission | Listener::Smtps);
        match p.mode {
            Mode::Private if submission => return Err(Refusal::Untrusted),
            Mode::Protected if submission && !trusted => return Err(Refusal::Untrusted),
            _ => {}
        }
        if trusted || !count_rate || !counts_every_connection(listener) {
            return Ok(());
        }
        self.count(p, key, now, "connections")
    }

    /// A port-25 connection the per-client limits refused: counted toward the ban
    /// (`autoban.rate`) unless `ip` is exempt or the count is kept in Redis
    /// (`count_rate` false).
    pub fn over_limit(&mut self, p: &Policy, ip: IpAddr, count_rate: bool) -> Result<(), Refusal> {
        if !count_rate || p.mode == Mode::Public || self.exempt(p, ip, Listener::Smtp) {
            return Ok(());
        }
        self.count(
            p,
            source(ip, p.ipv6_prefix),
            Instant::now(),
            "refused connections",
        )
    }

    /// Counts one event for client `key`; more than `p.rate` within `p.window` bans it.
    fn count(&mut self, p: &Policy, key: IpNet, now: Instant, what: &str) -> Result<(), Refusal> {
        // Without mb-rpcd, `load` does not run: bound the map here too.
        if self.recent.len() > 50_000 {
            self.recent.retain(|_, t| {
                t.back()
                    .is_some_and(|last| now.duration_since(*last) < p.window)
            });
        }
        let times = self.recent.entry(key).or_default();
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= p.window)
        {
            times.pop_front();
        }
        times.push_back(now);
        if times.len() > p.rate as usize {
            self.recent.remove(&key);
            self.bans.insert(key, now + p.ban_for);
            self.remember(Decision {
                ip: key,
                trust: false,
                for_secs: p.ban_for.as_secs(),
                reason: format!("more than {} {what} in {}s", p.rate, p.window.as_secs()),
            });
            return Err(Refusal::NewBan);
        }
        Ok(())
    }

    /// A ban decided elsewhere (Redis), kept here and stored in mb-rpcd like our own.
    pub fn banned_by_shared(&mut self, p: &Policy, ip: IpAddr) {
        let key = source(ip, p.ipv6_prefix);
        self.bans.insert(key, Instant::now() + p.ban_for);
        self.remember(Decision {
            ip: key,
            trust: false,
            for_secs: p.ban_for.as_secs(),
            reason: format!(
                "more than {} connections in {}s (shared)",
                p.rate,
                p.window.as_secs()
            ),
        });
    }

    /// Whether this connection is never counted toward a ban (it may still be refused by
    /// the lists and modes).
    pub fn exempt(&self, p: &Policy, ip: IpAddr, listener: Listener) -> bool {
        listener == Listener::Reinject
            || p.mode == Mode::Public
            || p.trusted_networks.iter().any(|n| n.contains(&ip))
            || self.listed(true, source(ip, p.ipv6_prefix), ip, Instant::now())
    }

    /// Whether `ip` (client `key`) is banned (`trust` false) or trusted at `now`.
    fn listed(&self, trust: bool, key: IpNet, ip: IpAddr, now: Instant) -> bool {
        let map = if trust { &self.trusted } else { &self.bans };
        map.get(&key).is_some_and(|until| *until > now)
            || self
                .wide
                .iter()
                .any(|(net, t, until)| *t == trust && *until > now && net.contains(&ip))
    }

    /// A successful AUTH: the client (`source(ip, ipv6_prefix)`) is trusted for a day
    /// (protected mode opens submission to it).
    pub fn authenticated(&mut self, ip: IpAddr, ipv6_prefix: u8) {
        let key = source(ip, ipv6_prefix);
        self.trusted.insert(key, Instant::now() + TRUST_AFTER_AUTH);
        self.remember(Decision {
            ip: key,
            trust: true,
            for_secs: TRUST_AFTER_AUTH.as_secs(),
            reason: "authenticated".into(),
        });
    }

    /// Replaces the stored lists with what mb-rpcd holds: (network, trust, seconds left).
    /// An entry as narrow as one client or narrower (an IPv6 address) applies to its whole
    /// client network, as everything else here does. Decisions still pending are kept, so
    /// nothing decided here is forgotten; connection times older than the window are
    /// dropped, so memory follows recent clients only.
    pub fn load(&mut self, entries: &[(IpNet, bool, u64)], p: &Policy) {
        let now = Instant::now();
        self.bans.clear();
        self.trusted.clear();
        self.wide.clear();
        let pending: Vec<_> = self
            .pending
            .iter()
            .map(|d| (d.ip, d.trust, d.for_secs))
            .collect();
        for (net, trust, left) in entries.iter().chain(&pending) {
            let until = now + Duration::from_secs(*left);
            let client = source(net.addr(), p.ipv6_prefix);
            if net.prefix_len() >= client.prefix_len() {
                let map = if *trust {
                    &mut self.trusted
                } else {
                    &mut self.bans
                };
                map.insert(client, until);
            } else {
                self.wide.push((net.trunc(), *trust, until));
            }
        }
        self.recent.retain(|_, t| {
            t.back()
                .is_some_and(|last| now.duration_since(*last) < p.window)
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
            + self
                .wide
                .iter()
                .filter(|(_, trust, u)| !*trust && *u > now)
                .count()
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
            ipv6_prefix: 64,
        }
    }

    const BAD: &str = "198.51.100.9";

    #[tokio::test(start_paused = true)]
    async fn autoban_bans_and_unbans() {
        let mut p = Protection::default();
        let pol = policy(Mode::Autoban);
        let ip: IpAddr = BAD.parse().unwrap();
        for _ in 0..3 {
            assert_eq!(p.admit(&pol, ip, Listener::Submission, true), Ok(()));
        }
        assert_eq!(
            p.admit(&pol, ip, Listener::Submission, true),
            Err(Refusal::NewBan)
        );
        // Banned from every mail port, port 25 included.
        assert_eq!(
            p.admit(&pol, ip, Listener::Smtp, true),
            Err(Refusal::Banned)
        );
        assert_eq!(p.pending.len(), 1);
        assert_eq!(p.banned(), 1);
        // Trusted networks are never banned, whatever their rate.
        let good: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..10 {
            assert_eq!(p.admit(&pol, good, Listener::Submission, true), Ok(()));
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
            assert_eq!(p.admit(&pol, slow, Listener::Submission, true), Ok(()));
            tokio::time::advance(Duration::from_secs(21)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn port_25_counts_only_connections_over_the_client_limits() {
        let mut p = Protection::default();
        let pol = policy(Mode::Autoban);
        // A busy honest MTA: a hundred connections within its limits, never banned.
        let mta: IpAddr = "203.0.113.25".parse().unwrap();
        for _ in 0..100 {
            assert_eq!(p.admit(&pol, mta, Listener::Smtp, true), Ok(()));
        }
        assert_eq!(p.banned(), 0);
        // A client that keeps knocking after the per-client limits refused it: the
        // refusals count, and the fourth in the window bans it.
        let ip: IpAddr = BAD.parse().unwrap();
        for _ in 0..3 {
            assert_eq!(p.over_limit(&pol, ip, true), Ok(()));
        }
        assert_eq!(p.over_limit(&pol, ip, true), Err(Refusal::NewBan));
        assert_eq!(
            p.admit(&pol, ip, Listener::Smtp, true),
            Err(Refusal::Banned)
        );
        assert!(
            p.pending[0].reason.contains("refused connections"),
            "{:?}",
            p.pending
        );
        // Trusted networks, public mode and counting kept in Redis never ban here.
        let good: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "198.51.100.10".parse().unwrap();
        for _ in 0..10 {
            assert_eq!(p.over_limit(&pol, good, true), Ok(()));
            assert_eq!(p.over_limit(&policy(Mode::Public), other, true), Ok(()));
            assert_eq!(p.over_limit(&pol, other, false), Ok(()));
        }
        assert_eq!(p.banned(), 1);
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
        p.authenticated(ip, 64);
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
        p.authenticated(ip, 64);
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
        p.load(&[(stored.into(), false, 100)], &pol);
        assert_eq!(
            p.admit(&pol, stored, Listener::Smtp, true),
            Err(Refusal::Banned)
        );
        let ip: IpAddr = BAD.parse().unwrap();
        for _ in 0..4 {
            let _ = p.admit(&pol, ip, Listener::Submission, true);
        }
        // The stored list does not know this ban yet: it stays while pending.
        p.load(&[], &pol);
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

    #[tokio::test(start_paused = true)]
    async fn ipv6_clients_are_networks_and_bans_may_name_prefixes() {
        let mut p = Protection::default();
        let pol = policy(Mode::Autoban);
        // Four addresses of one /64 are one client: the fourth connection bans the /64.
        for i in 1..=3 {
            let ip: IpAddr = format!("2001:db8:1:1::{i}").parse().unwrap();
            assert_eq!(p.admit(&pol, ip, Listener::Submission, true), Ok(()));
        }
        let fourth: IpAddr = "2001:db8:1:1::4".parse().unwrap();
        assert_eq!(
            p.admit(&pol, fourth, Listener::Submission, true),
            Err(Refusal::NewBan)
        );
        let same_net: IpAddr = "2001:db8:1:1:ffff::9".parse().unwrap();
        assert_eq!(
            p.admit(&pol, same_net, Listener::Smtp, true),
            Err(Refusal::Banned)
        );
        assert_eq!(
            p.pending[0].ip,
            "2001:db8:1:1::/64".parse::<IpNet>().unwrap()
        );
        assert_eq!(net_text(&p.pending[0].ip), "2001:db8:1:1::/64");
        let next_net: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        assert_eq!(p.admit(&pol, next_net, Listener::Submission, true), Ok(()));
        // With /128, every address is a client of its own.
        let mut q = Protection::default();
        let narrow = Policy {
            ipv6_prefix: 128,
            ..pol.clone()
        };
        for i in 1..=10 {
            let ip: IpAddr = format!("2001:db8:1:1::{i}").parse().unwrap();
            assert_eq!(q.admit(&narrow, ip, Listener::Submission, true), Ok(()));
        }
        // Stored bans: an IPv4 /24, an IPv6 /48, and an IPv6 address (its whole /64).
        let mut r = Protection::default();
        let entries: Vec<(IpNet, bool, u64)> = vec![
            ("198.51.100.0/24".parse().unwrap(), false, 600),
            ("2001:db8:aaaa::/48".parse().unwrap(), false, 600),
            ("2001:db8:bbbb:1::5/128".parse().unwrap(), false, 600),
        ];
        r.load(&entries, &pol);
        for (ip, refused) in [
            ("198.51.100.77", true),
            ("198.51.101.1", false),
            ("2001:db8:aaaa:ffff::1", true),
            ("2001:db8:aaab::1", false),
            ("2001:db8:bbbb:1::6", true),
            ("2001:db8:bbbb:2::5", false),
        ] {
            let got = r.admit(&pol, ip.parse().unwrap(), Listener::Smtp, false);
            assert_eq!(got.is_err(), refused, "{ip}: {got:?}");
        }
        assert_eq!(r.banned(), 3);
    }
}
