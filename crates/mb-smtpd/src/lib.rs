//! mb-smtpd: the gateway's SMTP server. It speaks ESMTP on port 25 (mail from the
//! internet), 587 (submission), 465 (SMTPS) and the local reinjection port, refuses
//! relaying, abuse and malformed input, and writes every accepted message durably to
//! the spool before it answers 250.

pub mod account_limits;
#[cfg(test)]
mod client_tests;
pub mod dns;
pub mod dsn;
pub mod greylist;
pub mod protect;
pub mod qmgr;
pub mod queue;
pub mod recipients;
pub mod server;
pub mod session;
pub mod shared;
pub mod spool;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mb_core::Config;
use mb_proto::v1::queue_server::QueueServer;
use mb_proto::v1::{ReloadResponse, StatusRequest, StatusResponse};
use mb_runtime::control::DaemonHooks;
use mb_runtime::daemon::{Context, Daemon, Identity, Serving, StartError};
use mb_runtime::follow::Follower;
use mb_runtime::lifecycle::Shutdown;
use mb_runtime::uds::Guard;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tonic::service::Routes;

use crate::server::Server;
use crate::session::Listener;
use crate::spool::Spool;

pub const DAEMON: &str = "mb-smtpd";

/// How long sessions may finish their transaction after SIGTERM.
const DRAIN_DEADLINE: Duration = Duration::from_secs(20);

/// The SMTP server, as `mb_runtime::daemon` runs it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Smtpd;

/// What mb-smtpd opens before it drops privileges: the certificate, the spool, the
/// resolver and every SMTP port.
pub struct Listeners {
    tls: Option<TlsAcceptor>,
    spool: Arc<Spool>,
    dns: dns::Dns,
    tcp: Vec<(TcpListener, Listener)>,
}

/// The addresses to listen on, from the configuration.
pub fn listen_addrs(cfg: &mb_core::Config) -> Vec<(SocketAddr, Listener)> {
    let mut out = Vec::new();
    let mut ips = cfg.ips("network.smtp.listen");
    if cfg.bool("network.ipv6.enabled") {
        ips.extend(cfg.ips("network.smtp.listen_ipv6"));
    }
    for ip in &ips {
        out.push((
            SocketAddr::new(*ip, cfg.port("network.smtp.port")),
            Listener::Smtp,
        ));
        if cfg.bool("network.submission.enabled") {
            out.push((
                SocketAddr::new(*ip, cfg.port("network.submission.port")),
                Listener::Submission,
            ));
        }
        if cfg.bool("network.smtps.enabled") {
            out.push((
                SocketAddr::new(*ip, cfg.port("network.smtps.port")),
                Listener::Smtps,
            ));
        }
    }
    out.push((
        SocketAddr::new(
            cfg.ip("network.reinject.listen"),
            cfg.port("network.reinject.port"),
        ),
        Listener::Reinject,
    ));
    out
}

/// `Control.Status` (sessions, queue, delivery counters) and reload (file and certificate).
pub struct Hooks {
    server: Arc<Server>,
    manager: Arc<qmgr::Manager>,
    config: Option<PathBuf>,
}

#[tonic::async_trait]
impl DaemonHooks for Hooks {
    async fn status(&self, _req: &StatusRequest, resp: &mut StatusResponse) {
        resp.counters
            .insert("connections_active".into(), self.server.active() as u64);
        for (phase, name) in session::Phase::ALL {
            let n = u64::try_from(self.server.phases.get(phase)).unwrap_or(0);
            resp.counters.insert(name.into(), n);
        }
        let ([incoming, deferred, hold], oldest) = self.server.spool.counts();
        resp.counters
            .insert("queue_incoming".into(), incoming as u64);
        resp.counters
            .insert("queue_deferred".into(), deferred as u64);
        resp.counters.insert("queue_hold".into(), hold as u64);
        resp.counters
            .insert("queue_oldest_age_seconds".into(), oldest);
        let banned = self.server.protection.lock().map_or(0, |p| p.banned());
        resp.counters.insert("banned_now".into(), banned as u64);
        if let Some(v) = &self.server.verifier {
            let (listed, probes) = v.counts();
            resp.counters.insert("recipients_listed".into(), listed);
            resp.counters.insert("recipient_callouts".into(), probes);
        }
        if let Some(ev) = &self.server.events {
            use std::sync::atomic::Ordering;
            resp.counters
                .insert("events_sent".into(), ev.sent.load(Ordering::Relaxed));
            resp.counters
                .insert("events_dropped".into(), ev.dropped.load(Ordering::Relaxed));
        }
        let c = &self.manager.counters;
        use std::sync::atomic::Ordering::Relaxed;
        for (name, v) in [
            ("delivered", &c.delivered),
            ("deferred", &c.deferred),
            ("bounced", &c.bounced),
            ("notices_sent", &c.notices),
            ("outbound_connections", &c.connections),
            ("outbound_reused", &c.reused),
            ("outbound_reused_ended", &c.ended),
        ] {
            resp.counters.insert(name.into(), v.load(Relaxed));
        }
        // The log itself: its files, its syncs, and zero-filled spares the preparer
        // could not write (a full disk, say: the spool then appends, which is slower).
        let st = self.server.spool.stats();
        for (name, v) in [
            ("spool_segments", st.segments as u64),
            ("spool_segment_bytes", st.segment_bytes),
            ("spool_live_bytes", st.live_bytes),
            ("spool_body_files", st.body_files as u64),
            ("spool_spare_segments", st.spare_segments as u64),
            ("spool_syncs", st.syncs),
            ("spool_spares_failed", st.spares_failed),
        ] {
            resp.counters.insert(name.into(), v);
        }
        let poisoned = self.server.spool.is_poisoned();
        resp.counters
            .insert("spool_poisoned".into(), u64::from(poisoned));
        resp.detail = if poisoned {
            "spool poisoned (a write or fsync failed): refusing mail with 451, delivery \
             stopped; free the disk or fix the device, then restart mb-smtpd"
                .into()
        } else {
            "receiving and delivering".into()
        };
    }

    async fn reload(&self) -> Result<ReloadResponse, tonic::Status> {
        reload(&self.server, self.config.as_deref())
            .map_err(|e| tonic::Status::failed_precondition(e.to_string()))?;
        Ok(ReloadResponse {
            reloaded: true,
            ..Default::default()
        })
    }
}

/// Why a reload was refused (the running configuration and certificate are kept).
#[derive(Debug, thiserror::Error)]
enum ReloadError {
    #[error(transparent)]
    Config(#[from] mb_runtime::ConfigError),
    #[error(transparent)]
    Tls(#[from] server::TlsError),
}

/// Re-reads the file and the TLS certificate; on error the running ones are kept.
fn reload(server: &Server, config: Option<&std::path::Path>) -> Result<(), ReloadError> {
    let file = mb_runtime::load_config(config)?;
    // The certificate named by the file as the database's overrides leave it: one set
    // with `mb-config set` stays in force across SIGHUP, which logrotate sends daily.
    let mut effective = file.clone();
    for (def, entry) in server.follower.current().entries() {
        if entry.source == mb_core::Source::Database {
            effective.set_override(def, entry.value.clone());
        }
    }
    let tls = server::tls_acceptor(&effective)?;
    server.follower.reload_file(file);
    if let Ok(mut t) = server.tls.write() {
        *t = tls;
    }
    tracing::info!("configuration and certificates reloaded");
    Ok(())
}

/// The keys `server::tls_acceptor` builds from.
const TLS_KEYS: &[&str] = &[
    "network.smtp.tls.inbound",
    "network.smtp.tls.cert",
    "network.smtp.tls.key",
    "network.smtps.enabled",
    "network.tls.min_version",
    "network.tls.versions",
    "network.tls.ciphers",
    "network.tls.prefer_server_ciphers",
];

/// The values of `TLS_KEYS`, as one comparable line.
fn tls_settings(cfg: &Config) -> String {
    TLS_KEYS
        .iter()
        .map(|k| format!("{k}={}", cfg.get(k)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Builds a new TLS acceptor when its keys change on the configuration feed (`mb-config
/// set network.smtp.tls.cert ...`), so that the next STARTTLS and SMTPS sessions present
/// the new certificate. Settings that cannot be used (a missing file, a key that does
/// not belong to the certificate) keep the running acceptor, with a warning saying why;
/// they are tried again at the next change, so a fixed file is picked up then (or on
/// SIGHUP).
fn follow_tls(server: Arc<Server>, started: &Config, shutdown: Shutdown) {
    let mut running = tls_settings(started);
    let mut changes = server.follower.subscribe();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.requested() => return,
                r = changes.changed() => if r.is_err() { return },
            }
            let cfg = changes.borrow_and_update().clone();
            let wanted = tls_settings(&cfg);
            if wanted == running {
                continue;
            }
            match server::tls_acceptor(&cfg) {
                Ok(tls) => {
                    if let Ok(mut t) = server.tls.write() {
                        *t = tls;
                    }
                    tracing::info!(settings = %wanted, "TLS settings changed: new sessions use a new certificate");
                    running = wanted;
                }
                Err(e) => {
                    tracing::warn!(cause = %e, settings = %wanted, "TLS settings changed but cannot be used; keeping the running certificate");
                }
            }
        }
    });
}

impl Daemon for Smtpd {
    type Source = Follower;
    type Listeners = Listeners;
    type Hooks = Hooks;

    const DRAIN_DEADLINE: Duration = DRAIN_DEADLINE;
    const CUT_SHORT: Option<&'static str> = Some("sessions were still open at the drain deadline");

    fn identity(&self) -> Identity {
        Identity::single(DAEMON)
    }

    async fn configure(
        &self,
        file: Config,
        _config: Option<&Path>,
        shutdown: &Shutdown,
    ) -> Result<Follower, StartError> {
        Ok(Follower::start(DAEMON, file, shutdown.clone()))
    }

    async fn bind(&self, cfg: &Config) -> Result<Listeners, StartError> {
        let tls = server::tls_acceptor(cfg).map_err(StartError::config)?;
        let spool_dir = cfg.path("paths.spool_dir");
        // Opening reads every segment and may import the old layout (waiting for its
        // commits): blocking work, off the async threads.
        let dir = spool_dir.clone();
        let opened = tokio::task::spawn_blocking(move || Spool::open(&dir))
            .await
            .map_err(|e| StartError::cant_create(format!("cannot open the spool: {e}")))?;
        let spool = match opened {
            Ok((s, rec)) => {
                let log = &rec.log;
                tracing::info!(
                    messages = log.messages,
                    segments = log.segments,
                    torn_tails = log.torn_tails,
                    corrupt_records = log.corrupt_records,
                    missing_bodies = log.missing_bodies.len(),
                    imported = rec.imported,
                    torn = rec.torn,
                    unfinished = rec.unfinished,
                    elapsed_ms = log.elapsed.as_millis() as u64,
                    spool = %spool_dir.display(),
                    "spool opened"
                );
                if !log.missing_bodies.is_empty() || log.corrupt_records > 0 {
                    tracing::error!(
                        missing_bodies = ?log.missing_bodies,
                        corrupt_records = log.corrupt_records,
                        "the spool was damaged: these messages are lost"
                    );
                }
                Arc::new(s)
            }
            Err(e) => {
                return Err(StartError::cant_create(format!(
                    "cannot open the spool {}: {e}",
                    spool_dir.display()
                )));
            }
        };
        let mut tcp = Vec::new();
        for (addr, kind) in listen_addrs(cfg) {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|cause| StartError::Listen {
                    addr,
                    what: Some(kind.name()),
                    cause,
                })?;
            tcp.push((listener, kind));
        }
        let dns = dns::Dns::from_config(cfg).map_err(StartError::config)?;
        Ok(Listeners {
            tls,
            spool,
            dns,
            tcp,
        })
    }

    fn writable(&self, cfg: &Config) -> Option<Vec<PathBuf>> {
        Some(vec![
            cfg.path("paths.spool_dir"),
            cfg.path("paths.data_dir"),
        ])
    }

    async fn start(
        self,
        listeners: Listeners,
        ctx: &Context<Follower>,
    ) -> Result<Serving<Hooks>, StartError> {
        let cfg = &ctx.cfg;
        let shutdown = &ctx.shutdown;
        for (l, kind) in &listeners.tcp {
            if let Ok(a) = l.local_addr() {
                ctx.info.add_listener(format!("{}:{a}", kind.name()));
            }
        }
        let events =
            mb_runtime::events::EventSink::start(DAEMON, cfg.socket("mb-rpcd"), shutdown.clone());
        let mut server = Server::new(
            ctx.source.clone(),
            listeners.spool,
            listeners.tls,
            ctx.info.clone(),
        );
        server.events = Some(events);
        if cfg.bool("filter.enabled") {
            let follower = ctx.source.clone();
            server.scanner = Some(Arc::new(
                mb_scan::Workers::new(
                    cfg.path("paths.run_dir"),
                    usize::try_from(cfg.int("filter.workers")).unwrap_or(1),
                    cfg.duration("filter.scan_timeout"),
                )
                .live_timeout(move || follower.current().duration("filter.scan_timeout")),
            ));
        }
        let redis_url = cfg.text("redis.url");
        let mut redis_later = false;
        if !redis_url.is_empty() {
            match shared::Shared::connect(&redis_url).await {
                Ok(r) => {
                    tracing::info!(redis = %mb_core::config::redact_url(&redis_url), "sharing rate counters and bans through Redis");
                    server.shared = std::sync::RwLock::new(Some(r));
                }
                // Mail flows without Redis: each process then counts on its own until
                // shared::connect_later finds it.
                Err(e) => {
                    redis_later = true;
                    tracing::warn!(redis = %mb_core::config::redact_url(&redis_url), cause = %e, "Redis unreachable; counting locally until it answers")
                }
            }
        }
        server.greylist = Some(Arc::new(
            greylist::Greylist::start(cfg, listeners.dns.live(), shutdown.clone()).await,
        ));
        let verifier = Arc::new(recipients::Verifier::new(
            ctx.source.clone(),
            cfg.path("paths.data_dir").join("recipients.json"),
            server
                .shared
                .read()
                .ok()
                .and_then(|s| s.as_ref().map(shared::Shared::connection)),
            listeners.dns.live().map(dns::Dns::Real),
        ));
        verifier.spawn_refresh(shutdown.clone());
        server.verifier = Some(verifier);
        let server = Arc::new(server);
        if let Some(live) = listeners.dns.live() {
            dns::follow(live, &ctx.source, shutdown.clone());
        }
        follow_tls(server.clone(), cfg, shutdown.clone());
        let mut manager = qmgr::Manager::new(
            server.spool.clone(),
            server.follower.clone(),
            listeners.dns,
            qmgr::Clock::new(),
        );
        if let Some(m) = Arc::get_mut(&mut manager) {
            m.events = server.events.clone();
        }
        let hooks = Arc::new(Hooks {
            manager: manager.clone(),
            server: server.clone(),
            config: ctx.config.clone(),
        });
        let queue = QueueServer::with_interceptor(
            queue::QueueService {
                spool: server.spool.clone(),
                manager: Some(manager.clone()),
            },
            Guard::peer(),
        );
        let mut background = JoinSet::new();
        background.spawn(server::sync_access(server.clone(), shutdown.clone()));
        if redis_later {
            background.spawn(shared::connect_later(
                server.clone(),
                redis_url.clone(),
                shutdown.clone(),
            ));
        }
        background.spawn(manager.run(shutdown.clone()));
        background.spawn(compact(server.spool.clone(), shutdown.clone()));
        let mut sessions = JoinSet::new();
        for (l, kind) in listeners.tcp {
            sessions.spawn(server.clone().serve(l, kind, shutdown.clone()));
        }
        tracing::info!(listening = %ctx.info.base_status().listening.join(" "), "mb-smtpd started");
        let work = async move {
            while sessions.join_next().await.is_some() {}
            Ok(())
        };
        Ok(Serving::new(hooks, work)
            .with_services(Routes::new(queue))
            .with_background(background))
    }
}

/// How often the spool's sparse segments are compacted.
const COMPACT_EVERY: Duration = Duration::from_secs(300);

/// Every `COMPACT_EVERY`, copies the live messages of segments under a quarter live
/// forward so that those segments can be deleted (off the async threads: it reads and
/// waits for fsyncs).
async fn compact(spool: Arc<Spool>, shutdown: Shutdown) {
    compact_every(spool, shutdown, COMPACT_EVERY).await;
}

/// `compact`'s loop, every `every` (tests run it often).
async fn compact_every(spool: Arc<Spool>, shutdown: Shutdown, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.requested() => return,
        }
        if spool.is_poisoned() {
            continue;
        }
        let s = spool.clone();
        match tokio::task::spawn_blocking(move || s.compact()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(records)) => {
                let stats = spool.stats();
                tracing::info!(
                    records,
                    segments = stats.segments,
                    segment_bytes = stats.segment_bytes,
                    "spool compacted"
                );
            }
            Ok(Err(e)) => tracing::error!(cause = %e, "spool compaction failed"),
            Err(e) => tracing::error!(cause = %e, "spool compaction stopped"),
        }
    }
}
