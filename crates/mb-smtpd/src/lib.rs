//! mb-smtpd: the gateway's SMTP server. It speaks ESMTP on port 25 (mail from the
//! internet), 587 (submission), 465 (SMTPS) and the local reinjection port, refuses
//! relaying, abuse and malformed input, and writes every accepted message durably to
//! the spool before it answers 250.

#[cfg(test)]
mod client_tests;
pub mod dns;
pub mod dsn;
pub mod protect;
pub mod qmgr;
pub mod queue;
pub mod server;
pub mod session;
pub mod shared;
pub mod spool;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mb_proto::v1::control_server::ControlServer;
use mb_proto::v1::queue_server::QueueServer;
use mb_proto::v1::{ReloadResponse, StatusRequest, StatusResponse};
use mb_runtime::control::{ControlService, DaemonHooks, DaemonInfo};
use mb_runtime::lifecycle;
use mb_runtime::uds::Guard;
use tokio::net::TcpListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server as GrpcServer;

use crate::server::Server;
use crate::session::Listener;
use crate::spool::Spool;

pub const DAEMON: &str = "mb-smtpd";

/// How long sessions may finish their transaction after SIGTERM.
const DRAIN_DEADLINE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Default)]
pub struct Options {
    pub config: Option<PathBuf>,
    pub log_format: Option<String>,
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

struct Hooks {
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
        ] {
            resp.counters.insert(name.into(), v.load(Relaxed));
        }
        resp.detail = "receiving and delivering".into();
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
    let tls = server::tls_acceptor(&file)?;
    server.follower.reload_file(file);
    if let Ok(mut t) = server.tls.write() {
        *t = tls;
    }
    tracing::info!("configuration and certificates reloaded");
    Ok(())
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
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
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
    let tls = match server::tls_acceptor(&cfg) {
        Ok(t) => t,
        Err(e) => return fail(mb_runtime::EX_USAGE, e.to_string()),
    };
    let spool_dir = cfg.path("paths.spool_dir");
    let spool = match Spool::open(&spool_dir) {
        Ok((s, rec)) => {
            tracing::info!(complete = rec.complete, torn = rec.torn, unfinished = rec.unfinished, spool = %spool_dir.display(), "spool opened");
            Arc::new(s)
        }
        Err(e) => {
            return fail(
                mb_runtime::EX_CANTCREAT,
                format!("cannot open the spool {}: {e}", spool_dir.display()),
            );
        }
    };
    let mut listeners = Vec::new();
    for (addr, kind) in listen_addrs(&cfg) {
        match TcpListener::bind(addr).await {
            Ok(l) => listeners.push((l, kind)),
            Err(e) => {
                return fail(
                    mb_runtime::EX_CANTCREAT,
                    format!("cannot listen on {addr} ({}): {e}", kind.name()),
                );
            }
        }
    }
    // Everything privileged is bound: switch to the unprivileged user when started as root.
    let data_dir = cfg.path("paths.data_dir");
    let run_dir = cfg.path("paths.run_dir");
    // The control socket is bound after the switch, in a run directory the user owns.
    let _ = std::fs::create_dir_all(&run_dir);
    let writable: Vec<&std::path::Path> =
        vec![spool_dir.as_path(), data_dir.as_path(), run_dir.as_path()];
    match mb_runtime::drop_privileges(&cfg.text("process.user"), &writable) {
        Ok(Some(user)) => tracing::info!(user = %user, "switched to an unprivileged user"),
        Ok(None) => {}
        Err(e) => return fail(mb_runtime::EX_SOFTWARE, e.to_string()),
    }
    let socket = cfg.socket(DAEMON);
    let control = match mb_runtime::uds::bind(&socket) {
        Ok(l) => l,
        Err(e) => return fail(mb_runtime::EX_CANTCREAT, e.to_string()),
    };
    let info = DaemonInfo::new(DAEMON);
    info.add_listener(format!("unix:{}", socket.display()));
    for (l, kind) in &listeners {
        if let Ok(a) = l.local_addr() {
            info.add_listener(format!("{}:{a}", kind.name()));
        }
    }
    let events =
        mb_runtime::events::EventSink::start(DAEMON, cfg.socket("mb-rpcd"), shutdown.clone());
    let mut server = Server::new(follower, spool, tls, info.clone());
    server.events = Some(events);
    if cfg.bool("filter.enabled") {
        server.scanner = Some(Arc::new(mb_scan::Workers::new(
            run_dir.clone(),
            usize::try_from(cfg.int("filter.workers")).unwrap_or(1),
            cfg.duration("filter.scan_timeout"),
        )));
    }
    let redis_url = cfg.text("redis.url");
    if !redis_url.is_empty() {
        match shared::Shared::connect(&redis_url).await {
            Ok(r) => {
                tracing::info!(redis = %mb_core::config::redact_url(&redis_url), "sharing rate counters and bans through Redis");
                server.shared = std::sync::RwLock::new(Some(r));
            }
            // Mail flows without Redis: each process then counts on its own.
            Err(e) => {
                tracing::warn!(redis = %mb_core::config::redact_url(&redis_url), cause = %e, "Redis unreachable; counting locally")
            }
        }
    }
    let server = Arc::new(server);
    let dns = match dns::Dns::from_config(&cfg) {
        Ok(d) => d,
        Err(e) => return fail(mb_runtime::EX_USAGE, e.to_string()),
    };
    let mut manager = qmgr::Manager::new(
        server.spool.clone(),
        server.follower.clone(),
        dns,
        qmgr::Clock::new(),
    );
    if let Some(m) = Arc::get_mut(&mut manager) {
        m.events = server.events.clone();
    }
    let hooks = Arc::new(Hooks {
        manager: manager.clone(),
        server: server.clone(),
        config: opts.config.clone(),
    });
    let grpc = GrpcServer::builder()
        .add_service(ControlServer::with_interceptor(
            ControlService::new(info.clone(), hooks),
            Guard::peer(),
        ))
        .add_service(QueueServer::with_interceptor(
            queue::QueueService {
                spool: server.spool.clone(),
                manager: Some(manager.clone()),
            },
            Guard::peer(),
        ))
        .serve_with_incoming_shutdown(UnixListenerStream::new(control), {
            let s = shutdown.clone();
            async move { s.requested().await }
        });
    let reloader = {
        let server = server.clone();
        let config = opts.config.clone();
        mb_runtime::spawn_reloader(reload_rx, move || reload(&server, config.as_deref()))
    };
    let mut tasks = tokio::task::JoinSet::new();
    let access = tokio::spawn(server::sync_access(server.clone(), shutdown.clone()));
    let delivery = tokio::spawn(manager.clone().run(shutdown.clone()));
    for (l, kind) in listeners {
        tasks.spawn(server.clone().serve(l, kind, shutdown.clone()));
    }
    tracing::info!(listening = %info.base_status().listening.join(" "), "mb-smtpd started");
    lifecycle::notify_ready();
    let drained = lifecycle::drain(&shutdown, DRAIN_DEADLINE, async move {
        let _ = grpc.await;
        while tasks.join_next().await.is_some() {}
    })
    .await;
    reloader.abort();
    access.abort();
    delivery.abort();
    let _ = std::fs::remove_file(&socket);
    if drained.is_none() {
        tracing::warn!("sessions were still open at the drain deadline");
    }
    tracing::info!("mb-smtpd stopped");
    0
}
