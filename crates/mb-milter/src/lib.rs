//! mb-milter: a milter server (Sendmail/Postfix protocol version 6) on
//! `milter.listen:milter.port` (127.0.0.1:10032) for sites that keep Postfix
//! (`smtpd_milters = inet:127.0.0.1:10032`). Each message is reassembled from the milter
//! callbacks and scanned by an mb-filter worker (least loaded, with failover); the
//! verdict comes back as milter replies: headers added and removed, 550/451 replies,
//! quarantine (Postfix's hold queue) or discard. Policy blocks answer at MAIL/RCPT.

pub mod proto;
pub mod session;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mb_core::Config;
use mb_proto::v1::{ReloadResponse, StatusRequest, StatusResponse};
use mb_runtime::control::DaemonHooks;
use mb_runtime::daemon::{Context, Daemon, Identity, Serving, StartError};
use mb_runtime::follow::Follower;
use mb_runtime::lifecycle::Shutdown;
use mb_runtime::policies::PolicySet;
use mb_scan::{Scanner, Workers};
use tokio::net::TcpListener;
use tonic::Status;

pub const DAEMON: &str = "mb-milter";

/// How long milter sessions may finish their message after SIGTERM.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// The milter server, as `mb_runtime::daemon` runs it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Milter;

#[derive(Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub active: AtomicU64,
    pub messages: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub tempfailed: AtomicU64,
    pub quarantined: AtomicU64,
    pub discarded: AtomicU64,
    pub unscanned: AtomicU64,
    pub malformed: AtomicU64,
    /// Connections refused (not in `milter.allowed_clients`) or cut off (a session
    /// bound in `session::Limits` passed, or silent past `milter.timeout`).
    pub refused: AtomicU64,
    /// Total time spent waiting for verdicts.
    pub latency_micros: AtomicU64,
}

/// What every connection uses.
pub struct Shared {
    pub follower: Follower,
    pub policies: Arc<PolicySet>,
    pub scanner: Box<dyn Scanner>,
    pub stats: Stats,
    /// How often a PROGRESS packet tells the MTA a long scan is still running (so its
    /// milter timeouts do not fire first).
    pub progress_every: Duration,
}

/// `Control.Status` (sessions, verdicts, scan latency) and reload.
pub struct Hooks {
    shared: Arc<Shared>,
    config: Option<PathBuf>,
}

#[tonic::async_trait]
impl DaemonHooks for Hooks {
    async fn status(&self, _req: &StatusRequest, resp: &mut StatusResponse) {
        let s = &self.shared.stats;
        for (name, v) in [
            ("connections", &s.connections),
            ("active", &s.active),
            ("messages", &s.messages),
            ("accepted", &s.accepted),
            ("rejected", &s.rejected),
            ("tempfailed", &s.tempfailed),
            ("quarantined", &s.quarantined),
            ("discarded", &s.discarded),
            ("unscanned", &s.unscanned),
            ("malformed", &s.malformed),
            ("refused", &s.refused),
        ] {
            resp.counters.insert(name.into(), v.load(Ordering::Relaxed));
        }
        let n = s.messages.load(Ordering::Relaxed).max(1);
        resp.counters.insert(
            "scan_latency_avg_micros".into(),
            s.latency_micros.load(Ordering::Relaxed) / n,
        );
    }

    async fn reload(&self) -> Result<ReloadResponse, Status> {
        mb_runtime::reread(&self.shared.follower, self.config.as_deref())
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(ReloadResponse {
            reloaded: true,
            ..Default::default()
        })
    }
}

impl Daemon for Milter {
    type Source = Follower;
    /// The milter port (`milter.listen:milter.port`).
    type Listeners = TcpListener;
    type Hooks = Hooks;

    const DRAIN_DEADLINE: Duration = DRAIN_DEADLINE;
    const CUT_SHORT: Option<&'static str> =
        Some("milter sessions were still open at the drain deadline");

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

    async fn bind(&self, cfg: &Config) -> Result<TcpListener, StartError> {
        let addr = std::net::SocketAddr::new(cfg.ip("milter.listen"), cfg.port("milter.port"));
        TcpListener::bind(addr)
            .await
            .map_err(|cause| StartError::Listen {
                addr,
                what: Some("milter.listen/milter.port"),
                cause,
            })
    }

    fn writable(&self, _cfg: &Config) -> Option<Vec<PathBuf>> {
        Some(Vec::new())
    }

    async fn start(
        self,
        listener: TcpListener,
        ctx: &Context<Follower>,
    ) -> Result<Serving<Hooks>, StartError> {
        let cfg = &ctx.cfg;
        let listen = std::net::SocketAddr::new(cfg.ip("milter.listen"), cfg.port("milter.port"));
        let policies = PolicySet::load(
            cfg.path("paths.data_dir")
                .join("cache/policies-milter.json"),
        );
        policies.spawn_refresh(cfg.socket("mb-rpcd"), ctx.shutdown.clone());
        let workers = usize::try_from(cfg.int("filter.workers")).unwrap_or(1);
        let shared = Arc::new(Shared {
            follower: ctx.source.clone(),
            policies,
            scanner: Box::new({
                let follower = ctx.source.clone();
                Workers::new(
                    cfg.path("paths.run_dir"),
                    workers,
                    cfg.duration("filter.scan_timeout"),
                )
                .live_timeout(move || follower.current().duration("filter.scan_timeout"))
            }),
            stats: Stats::default(),
            progress_every: Duration::from_secs(30),
        });
        ctx.info.add_listener(format!("milter inet:{listen}"));
        let hooks = Arc::new(Hooks {
            shared: shared.clone(),
            config: ctx.config.clone(),
        });
        let acceptor = tokio::spawn(accept(listener, shared.clone(), ctx.shutdown.clone()));
        let work = async move {
            let _ = acceptor.await;
            // Sessions in progress finish their message (or time out).
            while shared.stats.active.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(())
        };
        tracing::info!(listen = %listen, socket = %ctx.socket.display(), "mb-milter started");
        Ok(Serving::new(hooks, work))
    }
}

/// Accepts milter connections until shutdown; each session runs on its own task.
async fn accept(listener: TcpListener, shared: Arc<Shared>, shutdown: Shutdown) {
    loop {
        let (mut stream, peer) = tokio::select! {
            () = shutdown.requested() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(cause = %e, "milter accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Only the MTAs named in `milter.allowed_clients` (read live) may talk to us:
        // anyone else could have messages scanned, or hold memory, on our account.
        let peer_ip = peer.ip().to_canonical();
        let allowed = shared
            .follower
            .current()
            .nets("milter.allowed_clients")
            .iter()
            .any(|n| n.contains(&peer_ip));
        if !allowed {
            tracing::warn!(client = %peer_ip, "milter connection refused: client not in milter.allowed_clients");
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            shared.stats.connections.fetch_add(1, Ordering::Relaxed);
            shared.stats.active.fetch_add(1, Ordering::Relaxed);
            session::run(&mut stream, shared.clone(), peer.ip()).await;
            shared.stats.active.fetch_sub(1, Ordering::Relaxed);
        });
    }
}
