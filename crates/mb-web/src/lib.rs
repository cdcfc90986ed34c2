//! mb-web: the HTTPS face of the gateway. It serves the REST API under `/api/v1/` (with
//! its OpenAPI document), `/metrics` and `/health`, over HTTPS on
//! `network.https.listen:port` (rustls; plain HTTP on `network.http.port` redirects
//! there) and over HTTP/1.1 on its Unix socket `mb-web.sock`, for an nginx in front. The
//! socket also serves gRPC's `Control`, like every daemon's, so `mb-status` shows it.
//!
//! mb-web holds no database credentials and touches no spool or quarantine file: every
//! answer comes from the daemons' gRPC services on their Unix sockets (`state::AppState`),
//! so a compromised mb-web can do no more than an administrator's API calls.

pub mod access;
pub mod accounts_cli;
pub mod api;
pub mod auth;
pub mod export;
pub mod health;
pub mod layers;
pub mod metrics;
pub mod peer;
pub mod problem;
pub mod ratelimit;
pub mod rspamd_proxy;
pub mod server;
pub mod state;
pub mod tls;
pub mod ui;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware::{from_fn, from_fn_with_state};
use mb_core::Config;
use mb_proto::v1::{ReloadResponse, StatusRequest, StatusResponse};
use mb_runtime::control::DaemonHooks;
use mb_runtime::daemon::{Context, Daemon, Identity, Serving, StartError};
use mb_runtime::follow::Follower;
use mb_runtime::lifecycle::Shutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::Status;

use crate::ratelimit::Limiter;
use crate::server::{Limits, Mode};
use crate::state::AppState;

pub const DAEMON: &str = "mb-web";

/// How long requests in progress may take to finish after SIGTERM.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// The web daemon, as `mb_runtime::daemon` runs it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Web;

/// What is bound before privileges are dropped: the TCP ports and the certificate.
pub struct Listeners {
    pub https: Vec<TcpListener>,
    pub http: Vec<TcpListener>,
    pub tls: Option<tls::Current>,
}

/// The whole web application, every route and layer, over `state`.
pub fn app(state: AppState) -> Router {
    let limiter = Arc::new(Limiter::default());
    api::routes()
        .split_for_parts()
        .0
        // The web interface's HTML pages (`/` and `/ui/...`), behind the same layers.
        .merge(ui::routes())
        .fallback(layers::not_found)
        // Innermost first: the routes see a principal, a peer, a bounded body.
        .layer(from_fn(access::local_admin))
        // Outside the local administrator rule, so it runs first: a request that brings
        // credentials is judged by them.
        .layer(from_fn_with_state(state.clone(), auth::authenticate))
        .layer(DefaultBodyLimit::max(server::MAX_BODY_BYTES))
        .layer(from_fn(layers::deadline))
        .layer(from_fn(layers::problem_bodies))
        .layer(from_fn_with_state(
            (state.clone(), limiter),
            layers::rate_limit,
        ))
        .layer(from_fn(layers::security_headers))
        .layer(from_fn(peer::from_socket))
        .layer(from_fn_with_state(state.clone(), layers::count))
        .with_state(state)
}

/// `Control.Status` (requests, connections, rate limiting, certificate reloads) and
/// reload (the configuration file and the certificate).
pub struct Hooks {
    state: AppState,
    follower: Follower,
    config: Option<PathBuf>,
    tls: Option<tls::Current>,
}

#[tonic::async_trait]
impl DaemonHooks for Hooks {
    async fn status(&self, _req: &StatusRequest, resp: &mut StatusResponse) {
        for (name, v) in self.state.counters().snapshot() {
            resp.counters.insert(name.into(), v);
        }
        resp.detail = match &self.tls {
            Some(_) => "HTTPS and mb-web.sock".into(),
            None => "mb-web.sock only (network.https.enabled = false)".into(),
        };
    }

    async fn reload(&self) -> Result<ReloadResponse, Status> {
        mb_runtime::reread(&self.follower, self.config.as_deref())
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(true) => {
                    self.state
                        .counters()
                        .certificate_reloads
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!("reloaded the HTTPS certificate");
                }
                Ok(false) => {}
                Err(e) => {
                    return Err(Status::failed_precondition(format!(
                        "{e}; keeping the running certificate"
                    )));
                }
            }
        }
        Ok(ReloadResponse {
            reloaded: true,
            ..Default::default()
        })
    }
}

/// The HTTPS and HTTP addresses the configuration asks for.
fn addresses(cfg: &Config, port_key: &str) -> Vec<SocketAddr> {
    let mut ips = cfg.ips("network.https.listen");
    if cfg.bool("network.ipv6.enabled") {
        ips.extend(cfg.ips("network.https.listen_ipv6"));
    }
    let port = cfg.port(port_key);
    ips.into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
}

/// Binds one TCP port; IPv6 sockets take IPv6 only, so `::` and `0.0.0.0` can both be
/// bound on one port.
fn bind_tcp(addr: SocketAddr, what: &'static str) -> Result<TcpListener, StartError> {
    let listen = |cause| StartError::Listen {
        addr,
        what: Some(what),
        cause,
    };
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))
        .map_err(listen)?;
    if matches!(addr.ip(), IpAddr::V6(_)) {
        socket.set_only_v6(true).map_err(listen)?;
    }
    socket.set_reuse_address(true).map_err(listen)?;
    socket.set_nonblocking(true).map_err(listen)?;
    socket.bind(&addr.into()).map_err(listen)?;
    socket.listen(1024).map_err(listen)?;
    TcpListener::from_std(socket.into()).map_err(listen)
}

impl Daemon for Web {
    type Source = Follower;
    type Listeners = Listeners;
    type Hooks = Hooks;

    const DRAIN_DEADLINE: Duration = DRAIN_DEADLINE;
    const CUT_SHORT: Option<&'static str> =
        Some("HTTP requests were still in progress at the drain deadline");

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
        let mut out = Listeners {
            https: Vec::new(),
            http: Vec::new(),
            tls: None,
        };
        if !cfg.bool("network.https.enabled") {
            return Ok(out);
        }
        // The certificate is read while still privileged: its key may be root's only.
        let source = tls::Source::from_config(cfg).map_err(StartError::config)?;
        let config = source.load().map_err(StartError::config)?;
        out.tls = Some(tls::Current::new(source, config));
        for addr in addresses(cfg, "network.https.port") {
            out.https
                .push(bind_tcp(addr, "network.https.listen/network.https.port")?);
        }
        if cfg.bool("network.http.enabled") {
            for addr in addresses(cfg, "network.http.port") {
                out.http
                    .push(bind_tcp(addr, "network.https.listen/network.http.port")?);
            }
        }
        Ok(out)
    }

    fn writable(&self, _cfg: &Config) -> Option<Vec<PathBuf>> {
        // mb-web writes nothing but its socket.
        Some(Vec::new())
    }

    fn socket_group(&self, cfg: &Config) -> Option<String> {
        // nginx's group speaks HTTP on the socket (and is authenticated like any
        // client); gRPC's Control there still admits root and mailborder only.
        Some(cfg.text("web.socket_group")).filter(|g| !g.is_empty())
    }

    async fn start(
        self,
        listeners: Listeners,
        ctx: &Context<Follower>,
    ) -> Result<Serving<Hooks>, StartError> {
        let cfg = &ctx.cfg;
        let state = AppState::new(ctx.source.clone());
        let app = app(state.clone());
        let limits = Limits {
            connections: Arc::new(Semaphore::new(
                usize::try_from(cfg.int("network.https.max_connections")).unwrap_or(512),
            )),
            timeout: cfg.duration("network.https.timeout"),
        };
        let mut tasks = tokio::task::JoinSet::new();
        let mut urls = Vec::new();
        if let Some(tls) = &listeners.tls {
            for l in listeners.https {
                if let Ok(addr) = l.local_addr() {
                    ctx.info.add_listener(format!("https:{addr}"));
                    urls.push(format!("https://{addr}/"));
                }
                tasks.spawn(server::serve(
                    l,
                    Mode::Https(tls.clone()),
                    app.clone(),
                    state.clone(),
                    limits.clone(),
                    ctx.shutdown.clone(),
                ));
            }
        }
        let http_mode = if cfg.bool("network.http.redirect_to_https") {
            Mode::Redirect {
                https_port: cfg.port("network.https.port"),
            }
        } else {
            Mode::Plain
        };
        for l in listeners.http {
            if let Ok(addr) = l.local_addr() {
                ctx.info.add_listener(format!("http:{addr}"));
            }
            tasks.spawn(server::serve(
                l,
                http_mode.clone(),
                app.clone(),
                state.clone(),
                limits.clone(),
                ctx.shutdown.clone(),
            ));
        }
        let hooks = Arc::new(Hooks {
            state: state.clone(),
            follower: ctx.source.clone(),
            config: ctx.config.clone(),
            tls: listeners.tls,
        });
        let counters_state = state.clone();
        let work = async move {
            tasks.join_all().await;
            // Connections in progress finish their request (or the deadline drops them).
            while counters_state
                .counters()
                .connections_active
                .load(Ordering::Relaxed)
                > 0
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(())
        };
        tracing::info!(
            socket = %ctx.socket.display(),
            https = %urls.join(" "),
            "mb-web started"
        );
        Ok(Serving::new(hooks, work)
            .with_services(tonic::service::Routes::from(app))
            .with_http1())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// mb-web holds no database credentials: it depends on no SQL crate and no line of
    /// its source reads a `database.*` key or the database URL.
    #[test]
    fn mb_web_never_reaches_for_the_database() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        for dep in ["sqlx", "mb-rpcd", "redis"] {
            assert!(
                !manifest.lines().any(|l| l.trim_start().starts_with(dep)),
                "mb-web depends on {dep}"
            );
        }
        let mut stack = vec![root.join("src")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                // Built here so that this test's own source does not match.
                for needle in [format!("\"{}.", "database"), format!("{}_url", "database")] {
                    assert!(
                        !text.contains(&needle),
                        "{} names {needle}: mb-web must not read the database's settings",
                        path.display()
                    );
                }
            }
        }
    }
}
