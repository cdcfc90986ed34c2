//! mb-rpcd, the hub of a node: owns the database, serves the `Config` store with its
//! change feed, the `Events` message log and `Control`, and aggregates the status of
//! every daemon it can reach.

pub mod access;
pub mod db;
pub mod grpc;
pub mod policies;
pub mod quarantine;
pub mod replica;
pub mod store;
pub mod users;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mb_proto::v1::access_server::AccessServer;
use mb_proto::v1::config_server::ConfigServer;
use mb_proto::v1::control_server::ControlServer;
use mb_proto::v1::events_server::EventsServer;
use mb_proto::v1::policies_server::PoliciesServer;
use mb_proto::v1::quarantine_server::QuarantineServer;
use mb_proto::v1::replica_server::ReplicaServer;
use mb_proto::v1::users_server::UsersServer;
use mb_runtime::control::{ControlService, DaemonInfo};
use mb_runtime::lifecycle::{self, Shutdown};
use mb_runtime::uds::Guard;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::access::AccessService;
use crate::db::Db;
use crate::grpc::Rpcd;
use crate::store::Store;
use crate::users::UsersService;

pub const DAEMON: &str = "mb-rpcd";

/// How long in-flight requests may run after SIGTERM.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Command-line options of the daemon.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub config: Option<PathBuf>,
    pub log_format: Option<String>,
    /// Check the configuration and the database, then exit.
    pub check: bool,
}

/// Runs the daemon to completion and returns the process exit status.
pub async fn main(opts: Options) -> i32 {
    let file_cfg = match mb_runtime::start_daemon(
        DAEMON,
        opts.config.as_deref(),
        opts.log_format.as_deref(),
    ) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let fail = |code: i32, msg: String| mb_runtime::fail(DAEMON, code, &msg);

    let url = file_cfg.database_url();
    let max = u32::try_from(file_cfg.int("database.max_connections")).unwrap_or(10);
    let db = match Db::open(&url, max).await {
        Ok(db) => db,
        Err(e) => return fail(mb_runtime::EX_UNAVAILABLE, e.to_string()),
    };
    let (config_path, _) = mb_runtime::config_path(opts.config.as_deref());
    let config_path = config_path.exists().then_some(config_path);
    let store = match Store::open(db, file_cfg, config_path).await {
        Ok(s) => Arc::new(s),
        Err(e) => return fail(mb_runtime::EX_UNAVAILABLE, e.to_string()),
    };
    let cfg = store.effective();
    let problems = cfg.check();
    if !problems.is_empty() {
        for p in &problems {
            fail(mb_runtime::EX_USAGE, format!("configuration: {p}"));
        }
        return mb_runtime::EX_USAGE;
    }
    if opts.check {
        println!(
            "{DAEMON}: configuration and database {} are fine",
            store.db.url
        );
        return 0;
    }

    let (shutdown, reload_rx) = match lifecycle::install_signal_handlers() {
        Ok(s) => s,
        Err(e) => {
            return fail(
                mb_runtime::EX_SOFTWARE,
                format!("cannot install signal handlers: {e}"),
            );
        }
    };
    let tcp = if cfg.bool("network.rpcd.tcp.enabled") {
        let addr = std::net::SocketAddr::new(
            cfg.ip("network.rpcd.tcp.bind"),
            cfg.port("network.rpcd.tcp.port"),
        );
        match TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                return fail(
                    mb_runtime::EX_CANTCREAT,
                    format!("cannot listen on {addr}: {e}"),
                );
            }
        }
    } else {
        None
    };
    // The Unix socket last: once it exists, every listener is ready.
    let socket = cfg.socket(DAEMON);
    let unix = match mb_runtime::uds::bind(&socket) {
        Ok(l) => l,
        Err(e) => return fail(mb_runtime::EX_CANTCREAT, e.to_string()),
    };
    let tls = match tcp_tls(&cfg) {
        Ok(t) => t,
        Err(e) => return fail(mb_runtime::EX_USAGE, e.to_string()),
    };
    let listeners = Listeners {
        unix,
        socket: socket.clone(),
        tcp,
        tls,
    };
    let result = run(store, listeners, shutdown, reload_rx).await;
    let _ = std::fs::remove_file(&socket);
    match result {
        Ok(()) => 0,
        Err(e) => fail(mb_runtime::EX_SOFTWARE, format!("{e:#}")),
    }
}

/// A TLS file of the TCP listener that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {}: {cause}", path.display())]
struct TlsFileError {
    path: PathBuf,
    cause: std::io::Error,
}

fn tcp_tls(cfg: &mb_core::Config) -> Result<Option<ServerTlsConfig>, TlsFileError> {
    let (cert, key) = (
        cfg.path("network.rpcd.tcp.tls.cert"),
        cfg.path("network.rpcd.tcp.tls.key"),
    );
    if !cfg.bool("network.rpcd.tcp.enabled") || cert.as_os_str().is_empty() {
        return Ok(None);
    }
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|cause| TlsFileError {
            path: p.to_path_buf(),
            cause,
        })
    };
    let identity = Identity::from_pem(read(&cert)?, read(&key)?);
    Ok(Some(ServerTlsConfig::new().identity(identity)))
}

/// What the daemon serves on.
pub struct Listeners {
    pub unix: UnixListener,
    pub socket: PathBuf,
    pub tcp: Option<TcpListener>,
    pub tls: Option<ServerTlsConfig>,
}

/// Serves until `shutdown`, then drains with a deadline. SIGHUP (on `reload`) re-reads
/// the configuration file.
pub async fn run(
    store: Arc<Store>,
    listeners: Listeners,
    shutdown: Shutdown,
    mut reload: tokio::sync::mpsc::Receiver<()>,
) -> anyhow::Result<()> {
    let info = DaemonInfo::new(DAEMON);
    let cfg = store.effective();
    let rpcd = Rpcd {
        store: store.clone(),
        info: info.clone(),
        shutdown: shutdown.clone(),
    };
    let hooks = Arc::new(rpcd.clone());
    info.add_listener(format!("unix:{}", listeners.socket.display()));

    let peer = Guard::peer();
    let unix = Server::builder()
        .add_service(ControlServer::with_interceptor(
            ControlService::new(info.clone(), hooks.clone()),
            peer.clone(),
        ))
        .add_service(ConfigServer::with_interceptor(rpcd.clone(), peer.clone()))
        .add_service(EventsServer::with_interceptor(rpcd.clone(), peer.clone()))
        // Accounts are managed and checked on the local socket only.
        .add_service(UsersServer::with_interceptor(
            UsersService {
                store: store.clone(),
                info: info.clone(),
            },
            peer.clone(),
        ))
        .add_service(AccessServer::with_interceptor(
            AccessService {
                store: store.clone(),
            },
            peer.clone(),
        ))
        .add_service(QuarantineServer::with_interceptor(
            quarantine::QuarantineService {
                store: store.clone(),
            },
            peer.clone(),
        ))
        .add_service(PoliciesServer::with_interceptor(
            policies::PoliciesService {
                store: store.clone(),
            },
            peer.clone(),
        ))
        .add_service(ReplicaServer::with_interceptor(
            replica::ReplicaService {
                store: store.clone(),
            },
            peer,
        ))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listeners.unix), {
            let s = shutdown.clone();
            async move { s.requested().await }
        });

    let tcp = match listeners.tcp {
        Some(listener) => {
            let addr = listener.local_addr()?;
            let key = cfg.text("network.rpcd.tcp.api_key");
            let need_key = cfg.bool("network.rpcd.tcp.require_auth") || !addr.ip().is_loopback();
            let guard = Guard::ApiKey {
                key: need_key.then(|| Arc::from(key.as_str())),
                daemon: DAEMON,
            };
            let scheme = if listeners.tls.is_some() {
                "tls"
            } else {
                "tcp"
            };
            info.add_listener(format!("{scheme}:{addr}"));
            let mut builder = Server::builder();
            if let Some(tls) = listeners.tls {
                builder = builder.tls_config(tls)?;
            }
            let s = shutdown.clone();
            Some(
                builder
                    .add_service(ControlServer::with_interceptor(
                        ControlService::new(info.clone(), hooks.clone()),
                        guard.clone(),
                    ))
                    .add_service(ConfigServer::with_interceptor(rpcd.clone(), guard.clone()))
                    .add_service(EventsServer::with_interceptor(rpcd.clone(), guard))
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                        s.requested().await
                    }),
            )
        }
        None => None,
    };

    let reloader = {
        let store = store.clone();
        tokio::spawn(async move {
            while reload.recv().await.is_some() {
                lifecycle::notify_reloading();
                match store.reload(DAEMON).await {
                    Ok(restart) if !restart.is_empty() => {
                        tracing::warn!(keys = %restart.join(","), "restart mb-rpcd to apply these keys");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(cause = %e, "reload failed, keeping the running configuration")
                    }
                }
                lifecycle::notify_reloaded();
            }
        })
    };

    quarantine::spawn_retention(store.clone(), shutdown.clone());
    tracing::info!(
        socket = %listeners.socket.display(),
        database = %store.db.url,
        generation = store.generation(),
        "mb-rpcd started"
    );
    lifecycle::notify_ready();
    let served = lifecycle::drain(&shutdown, DRAIN_DEADLINE, async move {
        match tcp {
            Some(tcp) => {
                let (a, b) = tokio::join!(unix, tcp);
                a.and(b)
            }
            None => unix.await,
        }
    })
    .await;
    reloader.abort();
    if let Some(r) = served {
        r?;
    }
    tracing::info!("mb-rpcd stopped");
    Ok(())
}
