//! The `Control` service every daemon serves on its socket: health, status, reload, version.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use mb_proto::v1::control_server::Control;
use mb_proto::v1::{
    HealthRequest, HealthResponse, ReloadRequest, ReloadResponse, ServingState, StatusRequest,
    StatusResponse, VersionRequest, VersionResponse,
};
use tonic::{Request, Response, Status};

/// Named counters a daemon reports in `Control.Status`.
#[derive(Clone, Default)]
pub struct Counters(Arc<Mutex<BTreeMap<String, u64>>>);

impl Counters {
    pub fn add(&self, name: &str, n: u64) {
        if let Ok(mut map) = self.0.lock() {
            *map.entry(name.to_string()).or_default() += n;
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// What a daemon says about itself.
pub struct DaemonInfo {
    pub name: String,
    started: SystemTime,
    started_mono: Instant,
    listening: RwLock<Vec<String>>,
    state: AtomicI32,
    pub counters: Counters,
}

impl DaemonInfo {
    pub fn new(name: impl Into<String>) -> Arc<DaemonInfo> {
        Arc::new(DaemonInfo {
            name: name.into(),
            started: SystemTime::now(),
            started_mono: Instant::now(),
            listening: RwLock::new(Vec::new()),
            state: AtomicI32::new(ServingState::Serving as i32),
            counters: Counters::default(),
        })
    }

    pub fn add_listener(&self, what: String) {
        if let Ok(mut l) = self.listening.write() {
            l.push(what);
        }
    }

    pub fn set_state(&self, state: ServingState) {
        self.state.store(state as i32, Ordering::Relaxed);
    }

    pub fn state(&self) -> ServingState {
        ServingState::try_from(self.state.load(Ordering::Relaxed))
            .unwrap_or(ServingState::Unspecified)
    }

    /// The fields every daemon fills the same way.
    pub fn base_status(&self) -> StatusResponse {
        StatusResponse {
            daemon: self.name.clone(),
            version: mb_core::VERSION.to_string(),
            pid: std::process::id(),
            started_at_unix: self
                .started
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0)),
            uptime_seconds: self.started_mono.elapsed().as_secs(),
            state: self.state() as i32,
            listening: self.listening.read().map(|l| l.clone()).unwrap_or_default(),
            counters: self.counters.snapshot().into_iter().collect(),
            ..Default::default()
        }
    }
}

/// What differs between daemons: extra status and how they reload.
#[tonic::async_trait]
pub trait DaemonHooks: Send + Sync + 'static {
    /// Adds components, aggregated daemons and the config generation.
    async fn status(&self, _req: &StatusRequest, _resp: &mut StatusResponse) {}
    async fn reload(&self) -> Result<ReloadResponse, Status>;
}

pub struct ControlService<H> {
    info: Arc<DaemonInfo>,
    hooks: Arc<H>,
}

impl<H> ControlService<H> {
    pub fn new(info: Arc<DaemonInfo>, hooks: Arc<H>) -> Self {
        ControlService { info, hooks }
    }
}

#[tonic::async_trait]
impl<H: DaemonHooks> Control for ControlService<H> {
    async fn health(
        &self,
        _req: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse {
            state: self.info.state() as i32,
            detail: String::new(),
        }))
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let mut resp = self.info.base_status();
        self.hooks.status(req.get_ref(), &mut resp).await;
        Ok(Response::new(resp))
    }

    async fn reload(
        &self,
        _req: Request<ReloadRequest>,
    ) -> Result<Response<ReloadResponse>, Status> {
        crate::lifecycle::notify_reloading();
        let out = self.hooks.reload().await;
        crate::lifecycle::notify_reloaded();
        out.map(Response::new)
    }

    async fn version(
        &self,
        _req: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            daemon: self.info.name.clone(),
            version: mb_core::VERSION.to_string(),
            api: mb_proto::v1::API.to_string(),
        }))
    }
}
