//! mb-rpcd, the hub of a node: owns the database, serves the `Config` store with its
//! change feed, the `Events` message log and `Control`, and aggregates the status of
//! every daemon it can reach.

pub mod access;
pub mod backup;
pub mod db;
pub mod digest;
pub mod dkim;
pub mod greylist;
pub mod grpc;
pub mod message_log;
pub mod policies;
pub mod portal_login;
pub mod quarantine;
pub mod recipients;
pub mod replica;
pub mod secrets;
pub mod stats;
pub mod store;
pub mod users;
pub mod web_accounts;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mb_core::Config;
use mb_proto::v1::access_server::AccessServer;
use mb_proto::v1::config_server::ConfigServer;
use mb_proto::v1::control_server::ControlServer;
use mb_proto::v1::events_server::EventsServer;
use mb_proto::v1::greylist_server::GreylistServer;
use mb_proto::v1::policies_server::PoliciesServer;
use mb_proto::v1::quarantine_server::QuarantineServer;
use mb_proto::v1::recipients_server::RecipientsServer;
use mb_proto::v1::stats_server::StatsServer;
use mb_proto::v1::users_server::UsersServer;
use mb_runtime::control::ControlService;
use mb_runtime::daemon::{Context, Daemon, Identity, Serving, Source, StartError};
use mb_runtime::lifecycle::Shutdown;
use mb_runtime::uds::Guard;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;
use tonic::transport::{Server, ServerTlsConfig};

use crate::access::AccessService;
use crate::db::Db;
use crate::grpc::Rpcd;
use crate::store::Store;
use crate::users::UsersService;

pub const DAEMON: &str = "mb-rpcd";

/// How long in-flight requests may run after SIGTERM.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// The control daemon, as `mb_runtime::daemon` runs it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hub {
    /// Check the configuration and the database, then exit (`--check`).
    pub check: bool,
}

/// What mb-rpcd opens before it serves: the optional TCP listener and its TLS files.
pub struct Listeners {
    pub tcp: Option<TcpListener>,
    pub tls: Option<ServerTlsConfig>,
}

/// mb-rpcd's configuration is the one in its database: it follows nobody.
impl Source for Store {
    fn current(&self) -> Arc<Config> {
        Arc::new(self.effective())
    }

    fn generation(&self) -> u64 {
        Store::generation(self)
    }
}

impl Daemon for Hub {
    type Source = Arc<Store>;
    type Listeners = Listeners;
    type Hooks = Rpcd;

    const DRAIN_DEADLINE: Duration = DRAIN_DEADLINE;

    fn identity(&self) -> Identity {
        Identity::single(DAEMON)
    }

    /// Opens and migrates the database, which holds the overrides of the file.
    async fn configure(
        &self,
        file: Config,
        config: Option<&Path>,
        _shutdown: &Shutdown,
    ) -> Result<Arc<Store>, StartError> {
        let url = file.database_url();
        let max = u32::try_from(file.int("database.max_connections")).unwrap_or(10);
        let db = Db::open(&url, max).await.map_err(StartError::unavailable)?;
        // Migration 0008 made sender allow policies authenticated-only; the administrator
        // hears of each one once, at the first start after it.
        for name in db
            .take_policy_upgrades()
            .await
            .map_err(StartError::unavailable)?
        {
            tracing::warn!(policy = %name, "policy {name} now applies only to authenticated senders; add --unauthenticated to keep the old behaviour (mb-policy del {name}, then add it again with --unauthenticated)");
        }
        let (config_path, _) = mb_runtime::config_path(config);
        let config_path = config_path.exists().then_some(config_path);
        let store = Store::open(db, file, config_path)
            .await
            .map_err(StartError::unavailable)?;
        Ok(Arc::new(store))
    }

    fn checked(&self, store: &Arc<Store>) -> Option<String> {
        self.check.then(|| {
            format!(
                "{DAEMON}: configuration and database {} are fine",
                store.db.url
            )
        })
    }

    async fn bind(&self, cfg: &Config) -> Result<Listeners, StartError> {
        let tcp = if cfg.bool("network.rpcd.tcp.enabled") {
            let addr = std::net::SocketAddr::new(
                cfg.ip("network.rpcd.tcp.bind"),
                cfg.port("network.rpcd.tcp.port"),
            );
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|cause| StartError::Listen {
                    addr,
                    what: None,
                    cause,
                })?;
            Some(listener)
        } else {
            None
        };
        let tls = tcp_tls(cfg).map_err(StartError::config)?;
        Ok(Listeners { tcp, tls })
    }

    /// mb-rpcd runs as it was started: as `process.user` under systemd.
    fn writable(&self, _cfg: &Config) -> Option<Vec<PathBuf>> {
        None
    }

    /// Serves the configuration store, the message log, accounts, access lists,
    /// quarantine index, policies and replication on the socket, and `Config`, `Events`
    /// and `Control` on the TCP listener when there is one; SIGHUP re-reads the file.
    async fn start(
        self,
        listeners: Listeners,
        ctx: &Context<Arc<Store>>,
    ) -> Result<Serving<Rpcd>, StartError> {
        let store = ctx.source.clone();
        let info = ctx.info.clone();
        let shutdown = ctx.shutdown.clone();
        let cfg = &ctx.cfg;
        let rpcd = Rpcd {
            store: store.clone(),
            info: info.clone(),
            shutdown: shutdown.clone(),
        };
        let hooks = Arc::new(rpcd.clone());

        let peer = Guard::peer();
        let services = Routes::new(ConfigServer::with_interceptor(rpcd.clone(), peer.clone()))
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
            // Greylisting's store (without Redis): checked by mb-smtpd at RCPT.
            .add_service(GreylistServer::with_interceptor(
                greylist::GreylistService {
                    store: store.clone(),
                },
                peer.clone(),
            ))
            // Valid recipients (list mode of recipient verification), read by mb-smtpd.
            .add_service(RecipientsServer::with_interceptor(
                recipients::RecipientsService {
                    store: store.clone(),
                },
                peer.clone(),
            ))
            // Statistics rollups (mb-stats, mb-web's /api/v1/stats).
            .add_service(StatsServer::with_interceptor(
                stats::StatsService {
                    store: store.clone(),
                },
                peer.clone(),
            ))
            // Backups (mb-backup): root and mb-rpcd's own user only, checked inside.
            .add_service(backup::server(store.clone(), peer.clone()))
            // The DKIM key and its record: asked by mb-web, which writes no file.
            .add_service(dkim::server(store.clone(), peer.clone()))
            // Web accounts, sessions and API keys: asked by mb-web on the local socket.
            .add_service(web_accounts::server(
                store.clone(),
                info.clone(),
                peer.clone(),
            ))
            // Quarantine digests, their links and the portal's other logins (mb-web).
            .add_service(digest::server(store.clone(), info.clone(), peer.clone()))
            .add_service(replica::server(store.clone(), peer));

        let software = |e: tonic::transport::Error| {
            StartError::software(format!("{:#}", anyhow::Error::from(e)))
        };
        let tcp = match listeners.tcp {
            Some(listener) => {
                let addr = listener
                    .local_addr()
                    .map_err(|e| StartError::software(e.to_string()))?;
                let key = cfg.text("network.rpcd.tcp.api_key");
                let need_key =
                    cfg.bool("network.rpcd.tcp.require_auth") || !addr.ip().is_loopback();
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
                    builder = builder.tls_config(tls).map_err(software)?;
                }
                let s = shutdown.clone();
                Some(
                    builder
                        .add_service(ControlServer::with_interceptor(
                            ControlService::new(info.clone(), hooks.clone()),
                            guard.clone(),
                        ))
                        .add_service(ConfigServer::with_interceptor(rpcd.clone(), guard.clone()))
                        .add_service(EventsServer::with_interceptor(rpcd, guard))
                        .serve_with_incoming_shutdown(
                            TcpListenerStream::new(listener),
                            async move { s.requested().await },
                        ),
                )
            }
            None => None,
        };

        quarantine::spawn_retention(store.clone(), shutdown.clone());
        digest::spawn_scheduler(store.clone(), info.clone(), shutdown.clone());
        greylist::spawn_retention(store.clone(), shutdown.clone());
        stats::spawn_maintenance(store.clone(), shutdown.clone());
        message_log::spawn_retention(store.clone(), shutdown);
        tracing::info!(
            socket = %ctx.socket.display(),
            database = %store.db.url,
            generation = store.generation(),
            "mb-rpcd started"
        );
        let work = async move {
            if let Some(tcp) = tcp {
                tcp.await?;
            }
            Ok(())
        };
        Ok(Serving::new(hooks, work).with_services(services))
    }
}

/// A TLS file of the TCP listener that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {}: {cause}", path.display())]
struct TlsFileError {
    path: PathBuf,
    cause: std::io::Error,
}

fn tcp_tls(cfg: &Config) -> Result<Option<ServerTlsConfig>, TlsFileError> {
    let (cert, key) = (
        cfg.path("network.rpcd.tcp.tls.cert"),
        cfg.path("network.rpcd.tcp.tls.key"),
    );
    if !cfg.bool("network.rpcd.tcp.enabled") || cert.as_os_str().is_empty() {
        return Ok(None);
    }
    let read = |p: &Path| {
        std::fs::read(p).map_err(|cause| TlsFileError {
            path: p.to_path_buf(),
            cause,
        })
    };
    let identity = tonic::transport::Identity::from_pem(read(&cert)?, read(&key)?);
    Ok(Some(ServerTlsConfig::new().identity(identity)))
}
