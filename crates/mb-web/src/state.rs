//! What every request handler shares: the configuration as mb-web runs it, channels to
//! the daemons' Unix sockets (connected on first use and reconnected after a daemon
//! restarts) and mb-web's own counters. mb-web has no other way to the gateway's state:
//! no database, no spool, only the daemons' gRPC services.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mb_core::Config;
use mb_runtime::follow::Follower;
use tonic::transport::Channel;

use crate::problem::Problem;

/// How long a call to a daemon may take before the request gives up (503/504).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The shared state of the routes (cheap to clone).
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    config: Box<dyn Fn() -> Arc<Config> + Send + Sync>,
    channels: Mutex<HashMap<String, Channel>>,
    counters: Counters,
}

/// mb-web's own figures (`Control.Status`, and `/metrics` as `mailborder_web_*`).
#[derive(Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub responses_2xx: AtomicU64,
    pub responses_3xx: AtomicU64,
    pub responses_4xx: AtomicU64,
    pub responses_5xx: AtomicU64,
    /// Requests answered 429 by the per-address rate limit.
    pub rate_limited: AtomicU64,
    /// TCP connections accepted, and those open now.
    pub connections: AtomicU64,
    pub connections_active: AtomicU64,
    /// Connections closed at once because `network.https.max_connections` were open.
    pub connections_refused: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    /// Successful certificate reloads (SIGHUP).
    pub certificate_reloads: AtomicU64,
}

impl Counters {
    /// Every counter by the name `Control.Status` gives it.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        [
            ("requests", &self.requests),
            ("responses_2xx", &self.responses_2xx),
            ("responses_3xx", &self.responses_3xx),
            ("responses_4xx", &self.responses_4xx),
            ("responses_5xx", &self.responses_5xx),
            ("rate_limited", &self.rate_limited),
            ("connections", &self.connections),
            ("connections_active", &self.connections_active),
            ("connections_refused", &self.connections_refused),
            ("tls_handshake_failures", &self.tls_handshake_failures),
            ("certificate_reloads", &self.certificate_reloads),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.load(Ordering::Relaxed)))
        .collect()
    }

    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl AppState {
    /// State following mb-rpcd's configuration feed.
    pub fn new(follower: Follower) -> AppState {
        AppState::with_config(move || follower.current())
    }

    /// State over any configuration source (tests use a fixed one).
    pub fn with_config(config: impl Fn() -> Arc<Config> + Send + Sync + 'static) -> AppState {
        AppState {
            inner: Arc::new(Inner {
                config: Box::new(config),
                channels: Mutex::new(HashMap::new()),
                counters: Counters::default(),
            }),
        }
    }

    /// The effective configuration now.
    pub fn config(&self) -> Arc<Config> {
        (self.inner.config)()
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// `paths.run_dir`, where the daemons' sockets are.
    pub fn run_dir(&self) -> PathBuf {
        self.config().path("paths.run_dir")
    }

    /// The socket of `daemon` as tools name it (`mb-rpcd`, `mb-filter@2`).
    pub fn socket(&self, daemon: &str) -> PathBuf {
        self.run_dir().join(mb_runtime::probe::socket_name(daemon))
    }

    /// A channel to `daemon`'s socket. The first use connects (so a daemon that is not
    /// running is reported at once, in the CLIs' words); later uses share the channel.
    pub async fn channel(&self, daemon: &str) -> Result<Channel, Problem> {
        if let Some(ch) = self.lock().get(daemon) {
            return Ok(ch.clone());
        }
        let ch = mb_runtime::uds::connect(&self.socket(daemon), daemon).await?;
        self.lock().insert(daemon.to_string(), ch.clone());
        Ok(ch)
    }

    /// Calls `daemon` through `call` with [`CALL_TIMEOUT`]; a gRPC error becomes a
    /// problem worded as the CLIs word it, and a daemon that went away is reconnected on
    /// the next request.
    ///
    /// ```text
    /// let status = state.call("mb-rpcd", |ch| async move {
    ///     ControlClient::new(ch).status(StatusRequest::default()).await
    /// }).await?;
    /// ```
    pub async fn call<T, F, Fut>(&self, daemon: &str, call: F) -> Result<T, Problem>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let ch = self.channel(daemon).await?;
        match tokio::time::timeout(CALL_TIMEOUT, call(ch)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => {
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown
                ) {
                    self.forget(daemon);
                }
                Err(Problem::grpc(daemon, &status))
            }
            Err(_) => {
                self.forget(daemon);
                Err(Problem::new(
                    axum::http::StatusCode::GATEWAY_TIMEOUT,
                    format!("{daemon} did not answer within {}s", CALL_TIMEOUT.as_secs()),
                ))
            }
        }
    }

    /// Drops the channel to `daemon`, so the next request connects afresh.
    pub fn forget(&self, daemon: &str) {
        self.lock().remove(daemon);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        // A panic while holding this lock leaves only a map of channels behind.
        self.inner
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
