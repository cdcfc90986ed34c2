//! mb-milter: a milter server (Sendmail/Postfix protocol version 6) on
//! `milter.listen:milter.port` (127.0.0.1:10032) for sites that keep Postfix
//! (`smtpd_milters = inet:127.0.0.1:10032`). Each message is reassembled from the milter
//! callbacks and scanned by an mb-filter worker (least loaded, with failover); the
//! verdict comes back as milter replies: headers added and removed, 550/451 replies,
//! quarantine (Postfix's hold queue) or discard. Policy blocks answer at MAIL/RCPT.

pub mod proto;
pub mod session;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mb_proto::v1::control_server::ControlServer;
use mb_proto::v1::{ReloadResponse, StatusRequest, StatusResponse};
use mb_runtime::control::{ControlService, DaemonHooks, DaemonInfo};
use mb_runtime::follow::Follower;
use mb_runtime::lifecycle;
use mb_runtime::policies::PolicySet;
use mb_runtime::uds::Guard;
use mb_scan::{Scanner, Workers};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::Status;

pub const DAEMON: &str = "mb-milter";

#[derive(Debug, Clone, Default)]
pub struct Options {
    pub config: Option<PathBuf>,
    pub log_format: Option<String>,
}

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

struct Hooks {
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

pub async fn main(opts: Options) -> i32 {
    let file = match mb_runtime::start_daemon(
        DAEMON,
        opts.config.as_deref(),
        opts.log_format.as_deref(),
    ) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let fail = |code: i32, msg: String| mb_runtime::fail(DAEMON, code, &msg);
    let mb_runtime::Following {
        shutdown,
        reload: reload_rx,
        follower,
    } = match mb_runtime::follow_checked(DAEMON, DAEMON, file) {
        Ok(f) => f,
        Err(code) => return code,
    };
    let cfg = follower.current();
    let run_dir = cfg.path("paths.run_dir");
    let _ = std::fs::create_dir_all(&run_dir);
    let listen = std::net::SocketAddr::new(cfg.ip("milter.listen"), cfg.port("milter.port"));
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            return fail(
                mb_runtime::EX_CANTCREAT,
                format!("cannot listen on {listen} (milter.listen/milter.port): {e}"),
            );
        }
    };
    match mb_runtime::drop_privileges(&cfg.text("process.user"), &[run_dir.as_path()]) {
        Ok(Some(user)) => tracing::info!(user = %user, "switched to an unprivileged user"),
        Ok(None) => {}
        Err(e) => return fail(mb_runtime::EX_SOFTWARE, e.to_string()),
    }
    let socket = cfg.socket(DAEMON);
    let control = match mb_runtime::uds::bind(&socket) {
        Ok(l) => l,
        Err(e) => return fail(mb_runtime::EX_CANTCREAT, e.to_string()),
    };
    let policies = PolicySet::load(
        cfg.path("paths.data_dir")
            .join("cache/policies-milter.json"),
    );
    policies.spawn_refresh(cfg.socket("mb-rpcd"), shutdown.clone());
    let workers = usize::try_from(cfg.int("filter.workers")).unwrap_or(1);
    let shared = Arc::new(Shared {
        follower: follower.clone(),
        policies,
        scanner: Box::new(Workers::new(
            run_dir.clone(),
            workers,
            cfg.duration("filter.scan_timeout"),
        )),
        stats: Stats::default(),
        progress_every: Duration::from_secs(30),
    });
    let info = DaemonInfo::new(DAEMON);
    info.add_listener(format!("milter inet:{listen}"));
    info.add_listener(format!("unix:{}", socket.display()));
    let hooks = Arc::new(Hooks {
        shared: shared.clone(),
        config: opts.config.clone(),
    });
    let grpc = tonic::transport::Server::builder()
        .add_service(ControlServer::with_interceptor(
            ControlService::new(info, hooks),
            Guard::peer(),
        ))
        .serve_with_incoming_shutdown(UnixListenerStream::new(control), {
            let s = shutdown.clone();
            async move { s.requested().await }
        });
    let accept = {
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
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
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                tokio::spawn(async move {
                    shared.stats.connections.fetch_add(1, Ordering::Relaxed);
                    shared.stats.active.fetch_add(1, Ordering::Relaxed);
                    session::run(&mut stream, shared.clone(), peer.ip()).await;
                    shared.stats.active.fetch_sub(1, Ordering::Relaxed);
                });
            }
        })
    };
    let reloader = {
        let follower = follower.clone();
        let config = opts.config.clone();
        mb_runtime::spawn_reloader(reload_rx, move || {
            mb_runtime::reread(&follower, config.as_deref())
        })
    };
    tracing::info!(listen = %listen, socket = %socket.display(), "mb-milter started");
    lifecycle::notify_ready();
    let drained = lifecycle::drain(&shutdown, Duration::from_secs(30), async move {
        let _ = grpc.await;
        let _ = accept.await;
        while shared.stats.active.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    reloader.abort();
    let _ = std::fs::remove_file(&socket);
    if drained.is_none() {
        tracing::warn!("milter sessions were still open at the drain deadline");
    }
    tracing::info!("mb-milter stopped");
    0
}
