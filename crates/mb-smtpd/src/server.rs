//! Listeners: admission (connection limits and rates), TLS set-up, and one task per session.
//!
//! Admission runs cheapest-to-refuse first, so that no client can spend what others need:
//! a banned or untrusted client (`protect`), then a client over its own limits
//! (concurrency and rate, counted per client: an IPv4 address or an IPv6 network), is
//! refused before it touches anything shared. Only then come the listener's own pool of
//! slots and its rate, which therefore count admitted connections only. Each listener
//! has its own pool, so a flood on port 25 cannot starve submission, SMTPS or
//! reinjection, and reinjection from loopback is never refused for a global reason.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use mb_core::{Config, EnhancedStatus};
use mb_runtime::control::DaemonInfo;
use mb_runtime::follow::Follower;
use mb_runtime::lifecycle::Shutdown;
use mb_smtp::Reply;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::protect::{Mode, Policy, Refusal};
use crate::session::{AuthError, Client, Listener, Session, Settings, TlsMode};
use crate::spool::Spool;

/// The limits one connection is admitted against (from the configuration at connect time).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Slots of the connection's listener.
    pub pool: usize,
    /// New connections admitted per second on the connection's listener.
    pub rate: u32,
    pub max_per_source: usize,
    pub rate_per_source: u32,
    pub ipv6_prefix: u8,
    /// mynetworks, trusted networks and reinjection: no per-client limits.
    pub exempt: bool,
}

impl Limits {
    pub fn new(cfg: &Config, ip: IpAddr, listener: Listener) -> Limits {
        let int = |key: &str| cfg.int(key);
        let pool = match listener {
            Listener::Smtp => "network.smtp.max_connections",
            Listener::Submission => "network.submission.max_connections",
            Listener::Smtps => "network.smtps.max_connections",
            Listener::Reinject => "network.reinject.max_connections",
        };
        Limits {
            pool: usize::try_from(int(pool)).unwrap_or(usize::MAX),
            rate: u32::try_from(int("network.smtp.connection_rate")).unwrap_or(u32::MAX),
            max_per_source: usize::try_from(int("network.smtp.max_per_source"))
                .unwrap_or(usize::MAX),
            rate_per_source: u32::try_from(int("network.smtp.rate_per_source")).unwrap_or(u32::MAX),
            ipv6_prefix: ipv6_prefix(cfg),
            exempt: listener == Listener::Reinject
                || cfg.nets("smtp.mynetworks").iter().any(|n| n.contains(&ip))
                || cfg
                    .nets("network.protection.trusted_networks")
                    .iter()
                    .any(|n| n.contains(&ip)),
        }
    }
}

/// Why `Admission::admit` refused a connection, with the 421 to send.
#[derive(Debug)]
pub enum Busy {
    /// The client is over its own limits (`max_per_source`, `rate_per_source`): on port
    /// 25 this counts toward an autoban.
    Client(Reply),
    /// The listener is full or over its rate: no fault of this client's.
    Listener(Reply),
}

impl Busy {
    pub fn reply(&self) -> &Reply {
        match self {
            Busy::Client(r) | Busy::Listener(r) => r,
        }
    }
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.reply().fmt(f)
    }
}

/// Connection counts and per-second rates, by client and by listener. A plain state
/// machine with the time passed in, so its decisions are tested without sockets or sleeps.
#[derive(Debug, Default)]
pub struct Admission {
    per_source: HashMap<IpNet, usize>,
    /// Start of the current one-second rate window.
    window: Option<Instant>,
    source_rate: HashMap<IpNet, u32>,
    /// Admitted connections in the current window, by listener.
    rate: [u32; 4],
    /// Connections in progress, by listener.
    active: [usize; 4],
}

/// A listener's index in `Admission`'s per-listener arrays.
fn slot_index(l: Listener) -> usize {
    match l {
        Listener::Smtp => 0,
        Listener::Submission => 1,
        Listener::Smtps => 2,
        Listener::Reinject => 3,
    }
}

impl Admission {
    /// Decides whether a connection from `ip` on `listener` may start at `now`; `Ok` is
    /// the client it was counted for (hand it back to `release`), `Err` the 421 to send.
    pub fn admit(
        &mut self,
        l: &Limits,
        ip: IpAddr,
        listener: Listener,
        now: Instant,
    ) -> Result<IpNet, Busy> {
        let key = crate::protect::source(ip, l.ipv6_prefix);
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.rate = [0; 4];
            self.source_rate.clear();
        }
        // The client's own budget first: what it spends here is its own.
        if !l.exempt {
            let shown = crate::protect::net_text(&key);
            if self.per_source.get(&key).copied().unwrap_or(0) >= l.max_per_source {
                return Err(Busy::Client(busy(format!(
                    "Error: too many connections from {shown}"
                ))));
            }
            let rate = self.source_rate.entry(key).or_default();
            *rate = rate.saturating_add(1);
            if *rate > l.rate_per_source {
                return Err(Busy::Client(busy(format!(
                    "Error: too many connections per second from {shown}"
                ))));
            }
        }
        let i = slot_index(listener);
        if self.active[i] >= l.pool {
            return Err(Busy::Listener(busy(
                "Error: too many connections, try again later".into(),
            )));
        }
        // Reinjection carries mail the gateway already took responsibility for (quarantine
        // releases, content-filter returns): only its own pool bounds it.
        if listener != Listener::Reinject {
            if self.rate[i] >= l.rate {
                return Err(Busy::Listener(busy(
                    "Error: too many connections per second, try again later".into(),
                )));
            }
            self.rate[i] += 1;
        }
        self.active[i] += 1;
        *self.per_source.entry(key).or_default() += 1;
        Ok(key)
    }

    /// A connection admitted for `key` on `listener` has ended.
    pub fn release(&mut self, key: IpNet, listener: Listener) {
        let i = slot_index(listener);
        self.active[i] = self.active[i].saturating_sub(1);
        if let Some(n) = self.per_source.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_source.remove(&key);
            }
        }
    }

    /// Connections in progress on `listener`.
    pub fn active(&self, listener: Listener) -> usize {
        self.active[slot_index(listener)]
    }
}

pub struct Server {
    /// Sessions by phase, for `Control.Status`.
    pub phases: Arc<crate::session::Phases>,
    /// Redis, when `redis.url` is set and reachable.
    pub shared: RwLock<Option<crate::shared::Shared>>,
    pub events: Option<mb_runtime::events::EventSink>,
    /// The mb-filter workers, when filtering is enabled.
    pub scanner: Option<Arc<dyn mb_scan::Scanner>>,
    /// Greylisting's store, policies and resolver (used while `greylist.enabled`).
    pub greylist: Option<Arc<crate::greylist::Greylist>>,
    /// Recipient verification's list, callout caches and directory.
    pub verifier: Option<Arc<crate::recipients::Verifier>>,
    pub protection: Arc<Mutex<crate::protect::Protection>>,
    pub follower: Follower,
    pub spool: Arc<Spool>,
    pub tls: RwLock<Option<TlsAcceptor>>,
    pub info: Arc<DaemonInfo>,
    admission: Mutex<Admission>,
    active: AtomicUsize,
    /// Free space of the spool's filesystem, for `queue.min_free_space`.
    disk: Arc<mb_runtime::diskfree::DiskGuard>,
    /// This process's hourly counts of AUTH accounts (when Redis does not count them).
    account_counts: Arc<crate::account_limits::LocalCounts>,
    /// The settings sessions start with, by listener: one copy shared by every session
    /// (not one each, with its own hostname, domain list and networks).
    settings_cache: Mutex<[Option<CachedSettings>; 4]>,
}

/// A listener's `Settings`, valid while the configuration snapshot, the TLS acceptor
/// and the presence of Redis they were made from are the current ones.
struct CachedSettings {
    cfg: Arc<Config>,
    tls: Option<Arc<rustls::ServerConfig>>,
    redis: bool,
    settings: Arc<Settings>,
}

/// Releases a connection's slot when the session ends.
struct Slot<'a> {
    server: &'a Server,
    key: IpNet,
    listener: Listener,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.server.active.fetch_sub(1, Ordering::SeqCst);
        if let Ok(mut a) = self.server.admission.lock() {
            a.release(self.key, self.listener);
        }
    }
}

impl Server {
    pub fn new(
        follower: Follower,
        spool: Arc<Spool>,
        tls: Option<TlsAcceptor>,
        info: Arc<DaemonInfo>,
    ) -> Server {
        let disk = Arc::new(mb_runtime::diskfree::DiskGuard::new(spool.root()));
        Server {
            phases: Arc::default(),
            shared: RwLock::new(None),
            events: None,
            scanner: None,
            greylist: None,
            verifier: None,
            protection: Arc::default(),
            follower,
            spool,
            tls: RwLock::new(tls),
            info,
            admission: Mutex::new(Admission::default()),
            active: AtomicUsize::new(0),
            disk,
            account_counts: Arc::default(),
            settings_cache: Mutex::default(),
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Counts a connection against its client's limits, then its listener's pool and
    /// rate; `Err` is the 421 to send. Runs after the ban and trust checks.
    fn admit(&self, cfg: &Config, ip: IpAddr, listener: Listener) -> Result<Slot<'_>, Busy> {
        let limits = Limits::new(cfg, ip, listener);
        let key = self
            .admission
            .lock()
            .map_err(|_| {
                Busy::Listener(Reply::new(
                    421,
                    EnhancedStatus::SYSTEM_TEMPORARY,
                    "Internal error",
                ))
            })?
            .admit(&limits, ip, listener, Instant::now())?;
        self.active.fetch_add(1, Ordering::SeqCst);
        Ok(Slot {
            server: self,
            key,
            listener,
        })
    }

    /// The settings for a session on `listener` under `cfg`: the cached ones while
    /// nothing they were made from has changed, else new ones (cached in turn).
    fn shared_settings(&self, cfg: &Arc<Config>, listener: Listener) -> Arc<Settings> {
        let tls = self
            .tls
            .read()
            .ok()
            .and_then(|t| t.as_ref().map(|a| a.config().clone()));
        let redis = self.shared.read().is_ok_and(|s| s.is_some());
        let fresh = |c: &CachedSettings| {
            Arc::ptr_eq(&c.cfg, cfg)
                && c.redis == redis
                && match (&c.tls, &tls) {
                    (None, None) => true,
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                }
        };
        let i = slot_index(listener);
        if let Ok(cache) = self.settings_cache.lock()
            && let Some(c) = cache[i].as_ref().filter(|c| fresh(c))
        {
            return c.settings.clone();
        }
        let settings = Arc::new(self.settings(cfg, listener));
        if let Ok(mut cache) = self.settings_cache.lock() {
            cache[i] = Some(CachedSettings {
                cfg: cfg.clone(),
                tls,
                redis,
                settings: settings.clone(),
            });
        }
        settings
    }

    fn settings(&self, cfg: &Config, listener: Listener) -> Settings {
        let tls_mode = match cfg.text("network.smtp.tls.inbound").as_str() {
            "none" => TlsMode::None,
            "mandatory" if listener != Listener::Reinject => TlsMode::Mandatory,
            _ => TlsMode::Enabled,
        };
        let submission = matches!(listener, Listener::Submission | Listener::Smtps);
        Settings {
            hostname: hostname(cfg),
            domains: cfg.list("smtp.domains"),
            mynetworks: cfg.nets("smtp.mynetworks"),
            max_size: cfg.size("smtp.message_size_limit"),
            max_recipients: usize::try_from(cfg.int("smtp.max_recipients")).unwrap_or(100),
            max_errors: u32::try_from(cfg.int("smtp.max_errors")).unwrap_or(10),
            timeout: cfg.duration("network.smtp.timeout"),
            tls_handshake_timeout: cfg.duration("network.smtp.tls_handshake_timeout"),
            disk: Some((self.disk.clone(), cfg.size("queue.min_free_space"))),
            session_lifetime: cfg.duration("network.smtp.session_lifetime"),
            data_deadline: cfg.duration("smtp.data_deadline"),
            // Reinjection is local and was paced on its way in.
            data_rate: (listener != Listener::Reinject && cfg.size("smtp.data_rate_limit") > 0)
                .then(|| crate::session::DataRate {
                    rate: cfg.size("smtp.data_rate_limit"),
                    allowance: cfg.size("smtp.data_rate_allowance"),
                    exempt: cfg.nets("network.protection.trusted_networks"),
                }),
            tls_mode,
            tls: self.tls.read().ok().and_then(|t| t.clone()),
            require_auth: submission && cfg.bool("network.submission.require_auth"),
            require_tls: listener == Listener::Submission
                && cfg.bool("network.submission.require_tls"),
            helo_required: cfg.bool("smtp.helo_required"),
            vrfy: cfg.bool("smtp.vrfy_enabled"),
            events: self.events.clone(),
            phases: Some(self.phases.clone()),
            // Reinjected mail (quarantine releases, content-filter returns) was scanned.
            scanner: if cfg.bool("filter.enabled") && listener != Listener::Reinject {
                self.scanner.clone()
            } else {
                None
            },
            accept_unscanned: cfg.text("filter.unavailable_action") == "accept",
            auth: submission.then(|| {
                Arc::new(RpcdAuth {
                    socket: cfg.socket("mb-rpcd"),
                    protection: self.protection.clone(),
                    ipv6_prefix: ipv6_prefix(cfg),
                }) as Arc<dyn crate::session::Authenticator>
            }),
            // Recipient verification (session/verify.rs): fields below this line.
            recipient_verification: crate::recipients::Mode::from_config(cfg),
            recipient_delimiter: cfg.text("smtp.recipient_delimiter"),
            verifier: self.verifier.clone(),
            // Sender binding and per-account limits (session/limits.rs): fields below this line.
            sender_binding: cfg.bool("smtp.auth.sender_binding"),
            account_limits: Some(crate::account_limits::AccountLimits {
                local: self.account_counts.clone(),
                redis: self
                    .shared
                    .read()
                    .ok()
                    .and_then(|s| s.as_ref().map(crate::shared::Shared::connection)),
                messages_per_hour: u32::try_from(cfg.int("smtp.auth.messages_per_hour"))
                    .unwrap_or(500),
                recipients_per_hour: u32::try_from(cfg.int("smtp.auth.recipients_per_hour"))
                    .unwrap_or(2000),
            }),
            // Greylisting (session/greylist.rs): fields below this line.
            greylist: match &self.greylist {
                Some(g) if cfg.bool("greylist.enabled") && listener != Listener::Reinject => {
                    Some(crate::greylist::Settings {
                        timing: mb_core::greylist::Timing::from_config(cfg),
                        ipv6_prefix: ipv6_prefix(cfg),
                        delimiter: cfg.text("smtp.recipient_delimiter"),
                        greylist: g.clone(),
                    })
                }
                _ => None,
            },
        }
    }

    /// Accepts connections until shutdown, then waits for the sessions to end.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, kind: Listener, shutdown: Shutdown) {
        // Accepted connections inherit TCP_NODELAY from the listener (Linux): one
        // setsockopt here instead of one per session.
        use nix::sys::socket::{setsockopt, sockopt::TcpNoDelay};
        if let Err(e) = setsockopt(&listener, TcpNoDelay, &true) {
            tracing::warn!(cause = %e, "cannot set TCP_NODELAY on the listener");
        }
        let mut sessions = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                () = shutdown.requested() => break,
                a = listener.accept() => a,
                Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: pause instead of spinning.
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let server = self.clone();
            let shutdown = shutdown.clone();
            sessions.spawn(async move { server.session(stream, peer, kind, shutdown).await });
        }
        while sessions.join_next().await.is_some() {}
    }

    /// The reply to a connection the protection mode refused (banned, banned just now,
    /// or untrusted on a submission port).
    async fn refuse_protected(
        &self,
        stream: &mut TcpStream,
        cfg: &Config,
        ip: IpAddr,
        kind: Listener,
        refusal: Refusal,
    ) {
        let name = hostname(cfg);
        let shown = crate::protect::net_text(&crate::protect::source(ip, ipv6_prefix(cfg)));
        let reply = match refusal {
            Refusal::Untrusted => format!(
                "554 5.7.1 {name} {} is only open to trusted networks",
                kind.name()
            ),
            Refusal::NewBan => {
                self.info.counters.add("bans", 1);
                let period = mb_core::value::format_duration(
                    cfg.duration("network.protection.autoban.period"),
                );
                let what = if crate::protect::counts_every_connection(kind) {
                    "too many connections"
                } else {
                    "too many connections over its limits"
                };
                tracing::warn!(client = %ip, "banned for {period}: {what}");
                format!("421 4.7.0 {name} Error: {shown} is banned, try again later")
            }
            Refusal::Banned => {
                format!("421 4.7.0 {name} Error: {shown} is banned, try again later")
            }
        };
        self.refuse(stream, ip, kind, &format!("{reply}\r\n")).await;
    }

    /// Counts a port-25 connection the per-client limits refused toward the ban: in
    /// Redis when it is shared, else here.
    async fn over_limit(
        &self,
        policy: &Policy,
        ip: IpAddr,
        group: IpAddr,
        shared: Option<crate::shared::Shared>,
    ) -> Result<(), Refusal> {
        if let Some(shared) = shared {
            match shared.admit(policy, group).await {
                Ok(None) => return Ok(()),
                Ok(Some(refusal)) => {
                    if let Ok(mut p) = self.protection.lock() {
                        p.banned_by_shared(policy, ip);
                    }
                    return Err(refusal);
                }
                Err(e) => {
                    self.info.counters.add("redis_errors", 1);
                    tracing::warn!(cause = %e, "Redis unreachable; counting this connection locally");
                }
            }
        }
        match self.protection.lock() {
            Ok(mut p) => p.over_limit(policy, ip, true),
            Err(_) => Ok(()),
        }
    }

    async fn session(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        kind: Listener,
        shutdown: Shutdown,
    ) {
        let ip = normalize(peer.ip());
        self.info.counters.add("connections", 1);
        // Admission runs in a future of its own: what it holds (the configuration, the
        // protection policy, a Redis handle) is gone once the session starts, instead of
        // being kept, and its space in the task reserved, for as long as the session lives.
        let Some((slot, settings)) = self.admit_connection(&mut stream, ip, kind).await else {
            return;
        };
        let client = Client {
            ip,
            port: peer.port(),
        };
        tracing::debug!(client = %ip, listener = kind.name(), "connect");
        let io: Box<dyn mb_smtp::conn::Io> = if kind == Listener::Smtps {
            let Some(acceptor) = settings.tls.clone() else {
                return;
            };
            // Boxed: a TLS handshake in progress is large, and only SMTPS sessions make one.
            let handshake = Box::pin(acceptor.accept(stream));
            match tokio::time::timeout(settings.tls_handshake_timeout, handshake).await {
                Ok(Ok(tls)) => Box::new(tls),
                _ => {
                    tracing::info!(client = %ip, "TLS handshake failed on the SMTPS port");
                    return;
                }
            }
        } else {
            Box::new(stream)
        };
        let mut session = Session::new(io, &settings, &self.spool, client, kind);
        if kind == Listener::Smtps {
            session = session.with_tls("TLS (implicit)".into());
        }
        let summary = session.run(shutdown).await;
        drop(slot);
        let c = &self.info.counters;
        c.add("messages_accepted", summary.accepted.len() as u64);
        c.add("bytes_accepted", summary.bytes);
        c.add("relay_denied", u64::from(summary.relay_denied));
        c.add("session_errors", u64::from(summary.errors));
        c.add("auth_failed", u64::from(summary.auth_failed));
        if summary.tls {
            c.add("tls_sessions", 1);
        }
        // Sessions that ended on a refusal, by reason.
        let reason = match summary.end {
            "smuggling attempt" | "bare LF" => Some("ended_smuggling"),
            "early talker" => Some("ended_early_talker"),
            "improper pipelining" => Some("ended_pipelining"),
            "too many errors" => Some("ended_errors"),
            "too many auth failures" => Some("ended_auth_failures"),
            "timeout" | "timeout in DATA" | "DATA deadline" => Some("ended_timeout"),
            _ => None,
        };
        if let Some(r) = reason {
            c.add(r, 1);
        }
        tracing::info!(
            "disconnect from unknown[{ip}] {} client={ip} end=\"{}\"",
            summary.counts(),
            if summary.end.is_empty() {
                "quit"
            } else {
                summary.end
            }
        );
    }

    /// The checks a connection passes before its session starts: reinjection from
    /// loopback only, bans, trust and the connection limits. `None` when it was refused
    /// (and told so).
    async fn admit_connection(
        &self,
        stream: &mut TcpStream,
        ip: IpAddr,
        kind: Listener,
    ) -> Option<(Slot<'_>, Arc<Settings>)> {
        let cfg = self.follower.current();
        if kind == Listener::Reinject && !ip.is_loopback() {
            let reply = Reply::new(
                554,
                EnhancedStatus::POLICY_REJECT,
                "Reinjection is for local clients only",
            );
            self.refuse(stream, ip, kind, &reply.to_wire()).await;
            return None;
        }
        let policy = policy(&cfg);
        let group = crate::protect::source(ip, policy.ipv6_prefix).addr();
        let shared = self.shared.read().ok().and_then(|s| s.clone());
        let (mut verdict, exempt) = match self.protection.lock() {
            Ok(mut p) => (
                p.admit(&policy, ip, kind, shared.is_none()),
                p.exempt(&policy, ip, kind),
            ),
            Err(_) => (Ok(()), true),
        };
        // With Redis, the rate is counted there, together with every other process.
        let counted = crate::protect::counts_every_connection(kind);
        if let (Ok(()), Some(shared), false, false) = (&verdict, &shared, exempt, counted) {
            // Port 25: only a ban made elsewhere is looked up. The Redis futures here
            // and below are boxed: inline, every session's task would be as large as
            // the largest of them for as long as it lives.
            match Box::pin(shared.banned(group)).await {
                Ok(false) => {}
                Ok(true) => {
                    if let Ok(mut p) = self.protection.lock() {
                        p.banned_by_shared(&policy, ip);
                    }
                    verdict = Err(Refusal::Banned);
                }
                Err(e) => {
                    self.info.counters.add("redis_errors", 1);
                    tracing::warn!(cause = %e, "Redis unreachable; its bans are not checked for this connection");
                }
            }
        }
        if let (Ok(()), Some(shared), false, true) = (&verdict, &shared, exempt, counted) {
            match Box::pin(shared.admit(&policy, group)).await {
                Ok(None) => {}
                Ok(Some(refusal)) => {
                    if let Ok(mut p) = self.protection.lock() {
                        p.banned_by_shared(&policy, ip);
                    }
                    verdict = Err(refusal);
                }
                Err(e) => {
                    self.info.counters.add("redis_errors", 1);
                    tracing::warn!(cause = %e, "Redis unreachable; counting this connection locally");
                    if let Ok(mut p) = self.protection.lock() {
                        verdict = p.admit(&policy, ip, kind, true);
                    }
                }
            }
        }
        let slot = match verdict {
            Ok(()) => self.admit(&cfg, ip, kind),
            Err(refusal) => {
                self.refuse_protected(stream, &cfg, ip, kind, refusal).await;
                return None;
            }
        };
        let slot = match slot {
            Ok(slot) => slot,
            Err(busy) => {
                // On port 25, a client that keeps knocking after its own limits refused
                // it counts toward a ban (connections within them never do).
                if let (Busy::Client(_), Listener::Smtp, false) = (&busy, kind, exempt)
                    && let Err(refusal) =
                        Box::pin(self.over_limit(&policy, ip, group, shared)).await
                {
                    self.refuse_protected(stream, &cfg, ip, kind, refusal).await;
                    return None;
                }
                self.refuse(stream, ip, kind, &busy.reply().to_wire()).await;
                return None;
            }
        };
        Some((slot, self.shared_settings(&cfg, kind)))
    }
}

impl Server {
    /// Answers a refused connection with `wire` (one reply line) and counts it.
    async fn refuse(&self, stream: &mut TcpStream, ip: IpAddr, kind: Listener, wire: &str) {
        self.info.counters.add("connections_refused", 1);
        tracing::info!(client = %ip, listener = kind.name(), "connection refused: {}", wire.trim_end());
        let _ =
            tokio::time::timeout(Duration::from_secs(5), stream.write_all(wire.as_bytes())).await;
    }
}

/// Passwords are checked by mb-rpcd (`Users.Verify`), which holds the hashes.
struct RpcdAuth {
    socket: std::path::PathBuf,
    protection: Arc<Mutex<crate::protect::Protection>>,
    ipv6_prefix: u8,
}

impl crate::session::Authenticator for RpcdAuth {
    fn verify<'a>(
        &'a self,
        user: &'a str,
        password: &'a str,
        client: IpAddr,
    ) -> crate::session::Verifying<'a> {
        Box::pin(async move {
            let channel = mb_runtime::uds::connect(&self.socket, "mb-rpcd")
                .await
                .map_err(|e| AuthError::Unreachable(e.to_string()))?;
            let r = mb_proto::v1::users_client::UsersClient::new(channel)
                .verify(mb_proto::v1::VerifyRequest {
                    username: user.to_string(),
                    password: password.to_string(),
                    client_ip: client.to_string(),
                })
                .await
                .map_err(|s| AuthError::Check(s.message().to_string()))?;
            let r = r.into_inner();
            if r.ok
                && let Ok(mut p) = self.protection.lock()
            {
                p.authenticated(client, self.ipv6_prefix);
            }
            Ok(r.ok.then_some(r.addresses))
        })
    }

    fn owner<'a>(&'a self, address: &'a str) -> crate::session::Owning<'a> {
        Box::pin(async move {
            let channel = mb_runtime::uds::connect(&self.socket, "mb-rpcd")
                .await
                .map_err(|e| AuthError::Unreachable(e.to_string()))?;
            let r = mb_proto::v1::users_client::UsersClient::new(channel)
                .owner(mb_proto::v1::OwnerRequest {
                    address: address.to_string(),
                })
                .await
                .map_err(|s| AuthError::Check(s.message().to_string()))?
                .into_inner();
            Ok(Some(r.username).filter(|u| !u.is_empty()))
        })
    }
}

/// The protection policy of the configuration.
fn policy(cfg: &Config) -> Policy {
    let rate = cfg.rate("network.protection.autoban.rate");
    Policy {
        mode: Mode::parse(&cfg.text("network.protection.mode")),
        rate: rate.map_or(10, |r| r.count),
        window: rate.map_or(Duration::from_secs(60), |r| r.per),
        ban_for: cfg.duration("network.protection.autoban.period"),
        trusted_networks: cfg.nets("network.protection.trusted_networks"),
        ipv6_prefix: ipv6_prefix(cfg),
    }
}

/// `network.smtp.ipv6_prefix`: the IPv6 network counted as one client.
fn ipv6_prefix(cfg: &Config) -> u8 {
    u8::try_from(cfg.int("network.smtp.ipv6_prefix").clamp(32, 128)).unwrap_or(64)
}

/// Every few seconds: stores this process's bans and trusts in mb-rpcd, and re-reads the
/// list (so `mb-ban` changes and other processes' decisions take effect here).
pub async fn sync_access(server: Arc<Server>, shutdown: Shutdown) {
    use mb_proto::v1::access_client::AccessClient;
    use mb_proto::v1::{AccessEntry, ListAccessRequest};
    loop {
        let socket = server.follower.current().socket("mb-rpcd");
        if let Ok(channel) = mb_runtime::uds::connect(&socket, "mb-rpcd").await {
            let mut client = AccessClient::new(channel);
            let pending: Vec<_> = server
                .protection
                .lock()
                .map(|p| p.pending.clone())
                .unwrap_or_default();
            let mut stored = 0;
            for d in &pending {
                let entry = AccessEntry {
                    ip: crate::protect::net_text(&d.ip),
                    kind: if d.trust { "trust" } else { "ban" }.into(),
                    seconds: d.for_secs,
                    reason: d.reason.clone(),
                    added_by: "mb-smtpd".into(),
                    ..Default::default()
                };
                if client.add(entry).await.is_err() {
                    break;
                }
                stored += 1;
            }
            if let Ok(mut p) = server.protection.lock() {
                let n = stored.min(p.pending.len());
                p.pending.drain(..n);
            }
            if let Ok(list) = client.list(ListAccessRequest::default()).await {
                let entries: Vec<(IpNet, bool, u64)> = list
                    .into_inner()
                    .entries
                    .iter()
                    .filter_map(|e| {
                        let net =
                            e.ip.parse::<IpNet>()
                                .or_else(|_| e.ip.parse::<IpAddr>().map(IpNet::from))
                                .ok()?;
                        Some((net, e.kind == "trust", e.seconds))
                    })
                    .collect();
                let policy = policy(&server.follower.current());
                if let Ok(mut p) = server.protection.lock() {
                    p.load(&entries, &policy);
                }
            }
        }
        tokio::select! {
            () = shutdown.requested() => return,
            () = tokio::time::sleep(ACCESS_SYNC) => {}
        }
    }
}

/// How often bans and trusts are exchanged with mb-rpcd.
const ACCESS_SYNC: Duration = Duration::from_secs(3);

/// IPv4-mapped IPv6 addresses are IPv4 clients.
fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// `smtp.hostname`, or the system's host name.
pub fn hostname(cfg: &Config) -> String {
    let h = cfg.text("smtp.hostname");
    if !h.is_empty() {
        return h;
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Why the TLS settings cannot be used (a bad file at start is exit 64; on reload the
/// running settings are kept).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "network.tls.ciphers {0:?} names no TLS 1.2 suite this server implements \
         (ECDHE-ECDSA/RSA with AES128-GCM-SHA256, AES256-GCM-SHA384 or CHACHA20-POLY1305)"
    )]
    NoCipher(String),
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    #[error("cannot {doing} {}: {cause}", path.display())]
    File {
        doing: &'static str,
        path: std::path::PathBuf,
        cause: String,
    },
    #[error("no certificate in {}", .0.display())]
    NoCertificate(std::path::PathBuf),
    #[error("the key in {} does not belong to the certificate in {}", key.display(), cert.display())]
    KeyMismatch {
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
    },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

impl TlsError {
    fn file(
        doing: &'static str,
        path: &std::path::Path,
        cause: impl std::fmt::Display,
    ) -> TlsError {
        TlsError::File {
            doing,
            path: path.to_path_buf(),
            cause: cause.to_string(),
        }
    }
}

/// The 421 that refuses a connection over a limit.
fn busy(text: String) -> Reply {
    Reply::new(421, EnhancedStatus::new(4, 7, 0), text)
}

/// The TLS suites allowed by `network.tls.ciphers`, an OpenSSL-style list that restricts
/// TLS 1.2 (TLS 1.3 suites are always offered, as with OpenSSL). Names the TLS stack does
/// not implement (CBC, DHE) are skipped; a list that leaves no TLS 1.2 suite is an error.
pub fn cipher_suites(list: &str) -> Result<Vec<rustls::SupportedCipherSuite>, TlsError> {
    use rustls::CipherSuite as C;
    let all = rustls::crypto::aws_lc_rs::DEFAULT_CIPHER_SUITES;
    if list.trim().is_empty() {
        return Ok(all.to_vec());
    }
    let wanted: Vec<C> = list
        .split([':', ',', ' '])
        .filter_map(|name| match name.trim() {
            "ECDHE-ECDSA-AES128-GCM-SHA256" => Some(C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
            "ECDHE-ECDSA-AES256-GCM-SHA384" => Some(C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384),
            "ECDHE-ECDSA-CHACHA20-POLY1305" => {
                Some(C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256)
            }
            "ECDHE-RSA-AES128-GCM-SHA256" => Some(C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256),
            "ECDHE-RSA-AES256-GCM-SHA384" => Some(C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384),
            "ECDHE-RSA-CHACHA20-POLY1305" => Some(C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256),
            _ => None,
        })
        .collect();
    if wanted.is_empty() {
        return Err(TlsError::NoCipher(list.to_string()));
    }
    Ok(all
        .iter()
        .filter(|s| s.tls13().is_some() || wanted.contains(&s.suite()))
        .copied()
        .collect())
}

/// The TLS versions `network.tls.versions` and `network.tls.min_version` allow.
pub fn tls_versions(cfg: &Config) -> Vec<&'static rustls::SupportedProtocolVersion> {
    let min = cfg.text("network.tls.min_version");
    let offered = cfg.list("network.tls.versions");
    let mut v = Vec::new();
    if offered.iter().any(|x| x == "1.3") {
        v.push(&rustls::version::TLS13);
    }
    if min == "1.2" && offered.iter().any(|x| x == "1.2") {
        v.push(&rustls::version::TLS12);
    }
    v
}

/// The TLS acceptor from `network.smtp.tls.{cert,key}`; when neither file exists, a
/// self-signed certificate is generated under `paths.data_dir/tls/` (with a warning).
pub fn tls_acceptor(cfg: &Config) -> Result<Option<TlsAcceptor>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    if cfg.text("network.smtp.tls.inbound") == "none" && !cfg.bool("network.smtps.enabled") {
        return Ok(None);
    }
    let (mut cert, mut key) = (
        cfg.path("network.smtp.tls.cert"),
        cfg.path("network.smtp.tls.key"),
    );
    if !cert.exists() && !key.exists() {
        let dir = cfg.path("paths.data_dir").join("tls");
        let (c, k) = (dir.join("selfsigned.crt"), dir.join("selfsigned.key"));
        if !c.exists() || !k.exists() {
            let name = hostname(cfg);
            let generated = rcgen::generate_simple_self_signed(vec![name.clone()])
                .map_err(|e| TlsError::Generate(e.to_string()))?;
            std::fs::create_dir_all(&dir).map_err(|e| TlsError::file("create", &dir, e))?;
            std::fs::write(&c, generated.cert.pem()).map_err(|e| TlsError::file("write", &c, e))?;
            std::fs::write(&k, generated.signing_key.serialize_pem())
                .map_err(|e| TlsError::file("write", &k, e))?;
        }
        tracing::warn!(
            cert = %c.display(),
            "network.smtp.tls.cert does not exist: using a self-signed certificate; install a real one"
        );
        (cert, key) = (c, k);
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .map_err(|e| TlsError::file("read", &cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::file("parse the certificates in", &cert, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert));
    }
    let key_path = key;
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| TlsError::file("read the key", &key_path, e))?;
    let versions = tls_versions(cfg);
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = cipher_suites(&cfg.text("network.tls.ciphers"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&versions)
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| match e {
            // A certificate replaced without its key (or the reverse): say which files.
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                cert: cert.clone(),
                key: key_path.clone(),
            },
            e => TlsError::Config(e),
        })?;
    config.ignore_client_order = cfg.bool("network.tls.prefer_server_ciphers");
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(pool: usize) -> Limits {
        Limits {
            pool,
            rate: 20,
            max_per_source: 3,
            rate_per_source: 5,
            ipv6_prefix: 64,
            exempt: false,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_clients_are_grouped_by_prefix() {
        let mut a = Admission::default();
        let now = Instant::now();
        let l = limits(100);
        // Three addresses of one /64 fill its three concurrent slots: the fourth address
        // of that /64 is refused; another /64 of the same /48 is another client.
        for i in 1..=3 {
            let key = a
                .admit(&l, ip(&format!("2001:db8:0:1::{i}")), Listener::Smtp, now)
                .unwrap();
            assert_eq!(key, "2001:db8:0:1::/64".parse::<IpNet>().unwrap());
        }
        let r = a
            .admit(&l, ip("2001:db8:0:1:abcd::9"), Listener::Smtp, now)
            .unwrap_err();
        assert!(
            r.to_string()
                .contains("too many connections from 2001:db8:0:1::/64"),
            "{r}"
        );
        assert!(
            a.admit(&l, ip("2001:db8:0:2::1"), Listener::Smtp, now)
                .is_ok()
        );
        // A wider prefix makes the neighbouring /64 the same client.
        let wide = Limits {
            ipv6_prefix: 48,
            ..limits(100)
        };
        let mut b = Admission::default();
        for i in 1..=3 {
            b.admit(
                &wide,
                ip(&format!("2001:db8:0:{i}::1")),
                Listener::Smtp,
                now,
            )
            .unwrap();
        }
        assert!(
            b.admit(&wide, ip("2001:db8:0:ffff::1"), Listener::Smtp, now)
                .is_err()
        );
        // /128 counts each address alone.
        let narrow = Limits {
            ipv6_prefix: 128,
            ..limits(100)
        };
        let mut c = Admission::default();
        for i in 1..=10 {
            c.admit(&narrow, ip(&format!("2001:db8::{i}")), Listener::Smtp, now)
                .unwrap();
        }
        // The per-second rate groups the same way: six new connections from one /64
        // within a second, each closed at once, meet rate_per_source = 5.
        let mut d = Admission::default();
        for i in 1..=5 {
            let key = d
                .admit(&l, ip(&format!("2001:db8:9:9::{i}")), Listener::Smtp, now)
                .unwrap();
            d.release(key, Listener::Smtp);
        }
        let r = d
            .admit(&l, ip("2001:db8:9:9::6"), Listener::Smtp, now)
            .unwrap_err();
        assert!(
            r.to_string().contains("per second from 2001:db8:9:9::/64"),
            "{r}"
        );
        // A second later the window is new.
        assert!(
            d.admit(
                &l,
                ip("2001:db8:9:9::6"),
                Listener::Smtp,
                now + Duration::from_secs(1)
            )
            .is_ok()
        );
    }

    #[test]
    fn refused_clients_do_not_spend_the_listener_rate() {
        let mut a = Admission::default();
        let now = Instant::now();
        let l = limits(100);
        let flooder = ip("198.51.100.2");
        let mut refused = 0;
        for _ in 0..1000 {
            match a.admit(&l, flooder, Listener::Smtp, now) {
                Ok(key) => a.release(key, Listener::Smtp),
                Err(_) => refused += 1,
            }
        }
        assert_eq!(refused, 995, "rate_per_source is 5");
        // 20 admitted per second on the listener: the flooder used 5 of them, so 15
        // other clients still get in within the same second.
        for i in 1..=15 {
            assert!(
                a.admit(&l, ip(&format!("203.0.113.{i}")), Listener::Smtp, now)
                    .is_ok(),
                "client {i} refused"
            );
        }
        let r = a
            .admit(&l, ip("203.0.113.200"), Listener::Smtp, now)
            .unwrap_err();
        assert!(
            r.to_string().contains("too many connections per second,"),
            "{r}"
        );
    }

    #[test]
    fn each_listener_has_its_own_pool_and_reinjection_no_rate() {
        let mut a = Admission::default();
        let now = Instant::now();
        let l = Limits {
            max_per_source: 1000,
            rate_per_source: 1000,
            ..limits(2)
        };
        for i in 1..=2 {
            a.admit(&l, ip(&format!("203.0.113.{i}")), Listener::Smtp, now)
                .unwrap();
        }
        let r = a
            .admit(&l, ip("203.0.113.3"), Listener::Smtp, now)
            .unwrap_err();
        assert!(
            r.to_string().contains("too many connections, try again"),
            "{r}"
        );
        assert_eq!(a.active(Listener::Smtp), 2);
        for kind in [Listener::Submission, Listener::Smtps] {
            assert!(
                a.admit(&l, ip("203.0.113.3"), kind, now).is_ok(),
                "{kind:?}"
            );
        }
        // The port-25 rate is spent too: reinjection does not care.
        let busy_rate = Limits {
            rate: 1,
            exempt: true,
            ..limits(50)
        };
        let mut b = Admission::default();
        b.admit(&busy_rate, ip("203.0.113.1"), Listener::Smtp, now)
            .unwrap();
        assert!(
            b.admit(&busy_rate, ip("203.0.113.2"), Listener::Smtp, now)
                .is_err()
        );
        for _ in 0..50 {
            b.admit(&busy_rate, ip("127.0.0.1"), Listener::Reinject, now)
                .unwrap();
        }
        // Only its own pool bounds it.
        assert!(
            b.admit(&busy_rate, ip("127.0.0.1"), Listener::Reinject, now)
                .is_err()
        );
        assert_eq!(b.active(Listener::Reinject), 50);
    }

    /// Runs a session on a pipe with `lifetime` and a 50 s idle timeout; returns the
    /// client's end and the session task.
    fn lifetime_session(
        lifetime: Duration,
    ) -> (
        tokio::io::BufReader<tokio::io::DuplexStream>,
        tokio::task::JoinHandle<crate::session::Summary>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let mut settings = crate::tests::settings();
        settings.session_lifetime = lifetime;
        settings.timeout = Duration::from_secs(50);
        let (client, server) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(async move {
            let (_trigger, shutdown) = mb_runtime::lifecycle::shutdown_pair();
            let client = Client {
                ip: ip("198.51.100.7"),
                port: 1234,
            };
            Session::new(Box::new(server), &settings, &spool, client, Listener::Smtp)
                .run(shutdown)
                .await
        });
        (tokio::io::BufReader::new(client), task, dir)
    }

    /// Reads one reply, all its lines.
    async fn line(r: &mut tokio::io::BufReader<tokio::io::DuplexStream>) -> String {
        use tokio::io::AsyncBufReadExt;
        let mut all = String::new();
        loop {
            let mut l = String::new();
            if r.read_line(&mut l).await.unwrap() == 0 {
                return all;
            }
            all.push_str(&l);
            if l.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_ends_at_its_lifetime_busy_or_idle() {
        use tokio::io::AsyncWriteExt;
        // Busy: a NOOP every 40 s never meets the 50 s idle timeout, but the session is
        // closed when it reaches 100 s.
        let (mut c, task, _dir) = lifetime_session(Duration::from_secs(100));
        assert!(line(&mut c).await.starts_with("220"));
        let start = tokio::time::Instant::now();
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_secs(40)).await;
            c.get_mut().write_all(b"NOOP\r\n").await.unwrap();
            assert!(line(&mut c).await.starts_with("250"));
        }
        let r = line(&mut c).await;
        assert!(
            r.starts_with("421 4.4.2") && r.contains("session lifetime"),
            "{r}"
        );
        assert_eq!(start.elapsed(), Duration::from_secs(100));
        assert_eq!(task.await.unwrap().end, "session lifetime");
        // A message that is still arriving when the lifetime passes is taken; the next
        // command gets the 421.
        let (mut c, task, _dir) = lifetime_session(Duration::from_secs(30));
        assert!(line(&mut c).await.starts_with("220"));
        for (cmd, code) in [
            ("EHLO client.example", "250"),
            ("MAIL FROM:<a@sender.example>", "250"),
            ("RCPT TO:<b@served.example>", "250"),
            ("DATA", "354"),
        ] {
            c.get_mut()
                .write_all(format!("{cmd}\r\n").as_bytes())
                .await
                .unwrap();
            let r = line(&mut c).await;
            assert!(r.starts_with(code), "{cmd}: {r}");
        }
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            c.get_mut().write_all(b"Subject: slow\r\n").await.unwrap();
        }
        c.get_mut().write_all(b"\r\nbody\r\n.\r\n").await.unwrap();
        let r = line(&mut c).await;
        assert!(r.starts_with("250"), "{r}");
        // The session may have closed before this command arrives: either way the
        // client's next read is the 421.
        let _ = c.get_mut().write_all(b"NOOP\r\n").await;
        let r = line(&mut c).await;
        assert!(r.starts_with("421 4.4.2"), "{r}");
        assert_eq!(task.await.unwrap().end, "session lifetime");
        // Idle: closed at the lifetime (30 s), before the 50 s idle timeout.
        let (mut c, task, _dir) = lifetime_session(Duration::from_secs(30));
        assert!(line(&mut c).await.starts_with("220"));
        let start = tokio::time::Instant::now();
        let r = line(&mut c).await;
        assert!(r.starts_with("421 4.4.2"), "{r}");
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        assert_eq!(task.await.unwrap().end, "session lifetime");
    }
}

/// Session settings are made once per listener and shared, and made again when what
/// they come from changes.
#[cfg(test)]
mod settings_tests {
    use super::*;

    fn config(dir: &std::path::Path, hostname: &str) -> Config {
        let text = format!(
            "[paths]\nrun_dir = \"{d}/run\"\nspool_dir = \"{d}/spool\"\ndata_dir = \"{d}/data\"\n\
             [smtp]\nhostname = \"{hostname}\"\ndomains = \"served.example\"\n",
            d = dir.display()
        );
        Config::from_toml_str(&text, "test").unwrap()
    }

    #[tokio::test]
    async fn sessions_share_settings_until_config_or_certificate_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (_trigger, shutdown) = mb_runtime::lifecycle::shutdown_pair();
        let follower = Follower::start("mb-smtpd", config(dir.path(), "one.test"), shutdown);
        let (spool, _) = Spool::open(&dir.path().join("spool")).unwrap();
        let server = Server::new(follower, Arc::new(spool), None, DaemonInfo::new("mb-smtpd"));
        let settings = |l| server.shared_settings(&server.follower.current(), l);

        let first = settings(Listener::Smtp);
        assert!(Arc::ptr_eq(&first, &settings(Listener::Smtp)));
        assert_eq!(first.hostname, "one.test");
        let submission = settings(Listener::Submission);
        assert!(submission.auth.is_some() && first.auth.is_none());
        assert!(Arc::ptr_eq(&submission, &settings(Listener::Submission)));

        server.follower.reload_file(config(dir.path(), "two.test"));
        let reloaded = settings(Listener::Smtp);
        assert_eq!(reloaded.hostname, "two.test");
        assert!(Arc::ptr_eq(&reloaded, &settings(Listener::Smtp)));

        assert!(reloaded.tls.is_none());
        *server.tls.write().unwrap() = Some(crate::tests::tls_pair().0);
        let with_tls = settings(Listener::Smtp);
        assert!(with_tls.tls.is_some());
        assert!(!Arc::ptr_eq(&reloaded, &with_tls));
        assert!(Arc::ptr_eq(&with_tls, &settings(Listener::Smtp)));
    }

    /// An idle session costs mostly its task, sized for the largest state the
    /// connection's future can be in; admission (configuration, protection policy, Redis
    /// look-ups) runs in a future of its own, so the session's state does not add to it.
    #[tokio::test]
    async fn a_connection_task_is_little_more_than_its_session() {
        let dir = tempfile::tempdir().unwrap();
        let (_trigger, shutdown) = mb_runtime::lifecycle::shutdown_pair();
        let follower =
            Follower::start("mb-smtpd", config(dir.path(), "one.test"), shutdown.clone());
        let (spool, _) = Spool::open(&dir.path().join("spool")).unwrap();
        let server = Arc::new(Server::new(
            follower,
            Arc::new(spool),
            None,
            DaemonInfo::new("mb-smtpd"),
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let settings = server.shared_settings(&server.follower.current(), Listener::Smtp);
        let (io, _) = tokio::io::duplex(64);
        let client = Client {
            ip: peer.ip(),
            port: peer.port(),
        };
        let run = Session::new(
            Box::new(io),
            &settings,
            &server.spool,
            client,
            Listener::Smtp,
        )
        .run(shutdown.clone());
        let session = std::mem::size_of_val(&run);
        let mut other = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let admission =
            std::mem::size_of_val(&server.admit_connection(&mut other, peer.ip(), Listener::Smtp));
        let task = server
            .clone()
            .session(stream, peer, Listener::Smtp, shutdown);
        let whole = std::mem::size_of_val(&task);
        // Admission's state (688 bytes in a debug build) is not kept beside the session's.
        assert!(
            whole < session + admission / 2,
            "the connection's future is {whole} bytes, its session's {session}, admission's {admission}"
        );
    }
}
