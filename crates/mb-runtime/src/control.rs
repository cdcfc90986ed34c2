//! The `Control` service every daemon serves on its socket: health, status, reload,
//! version, and the configuration it runs with.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use mb_core::Config;
use mb_core::registry::{Apply, KEYS};
use mb_proto::v1::control_server::Control;
use mb_proto::v1::{
    HealthRequest, HealthResponse, ReloadRequest, ReloadResponse, RunningConfigRequest,
    RunningConfigResponse, RunningValue, ServingState, StatusRequest, StatusResponse,
    VersionRequest, VersionResponse,
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

/// What `Control.RunningConfig` reports from: the configuration a daemon started with
/// (restart-only keys keep those values until a restart) and the one it has now.
pub struct Running {
    /// Whose keys: the registry's `daemons` of each key name programs (`mb-filter`).
    pub program: &'static str,
    pub started: Arc<Config>,
    /// The configuration now, the generation of mb-rpcd's overrides in it, and whether
    /// mb-rpcd confirmed it (false while running on the cache).
    pub now: Box<dyn Fn() -> (Arc<Config>, u64, bool) + Send + Sync>,
}

impl Running {
    /// The keys `program` reads under `prefix` (a section, or empty for all), each as the
    /// daemon runs it.
    pub fn report(&self, daemon: &str, prefix: &str) -> RunningConfigResponse {
        let (now, generation, confirmed) = (self.now)();
        let under = |key: &str| {
            prefix.is_empty()
                || key == prefix
                || key
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('.'))
        };
        let shown = |def: &mb_core::KeyDef, cfg: &Config| {
            let text = cfg.get(def.key).to_string();
            if def.secret && !text.is_empty() {
                mb_core::config::REDACTED.to_string()
            } else {
                text
            }
        };
        let values = KEYS
            .iter()
            .filter(|def| def.daemons.contains(&self.program) && under(def.key))
            .map(|def| {
                let restart = def.apply == Apply::Restart;
                let running = if restart { &self.started } else { &now };
                let value = shown(def, running);
                let later = shown(def, &now);
                RunningValue {
                    key: def.key.to_string(),
                    source: running
                        .entry(def.key)
                        .map(|e| e.source.to_string())
                        .unwrap_or_default(),
                    restart,
                    pending: (restart && later != value).then_some(later),
                    secret: def.secret,
                    value,
                }
            })
            .collect();
        RunningConfigResponse {
            daemon: daemon.to_string(),
            generation,
            confirmed,
            values,
        }
    }
}

pub struct ControlService<H> {
    info: Arc<DaemonInfo>,
    hooks: Arc<H>,
    running: Option<Running>,
}

impl<H> ControlService<H> {
    pub fn new(info: Arc<DaemonInfo>, hooks: Arc<H>) -> Self {
        ControlService {
            info,
            hooks,
            running: None,
        }
    }

    /// Answers `Control.RunningConfig` from `running`.
    pub fn with_running(mut self, running: Running) -> Self {
        self.running = Some(running);
        self
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

    async fn running_config(
        &self,
        req: Request<RunningConfigRequest>,
    ) -> Result<Response<RunningConfigResponse>, Status> {
        match &self.running {
            Some(r) => Ok(Response::new(
                r.report(&self.info.name, &req.get_ref().prefix),
            )),
            None => Err(Status::unimplemented(
                "this daemon does not report its configuration",
            )),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(overrides: &[(&str, &str)]) -> Arc<Config> {
        let mut c = Config::default();
        assert!(c.apply_overrides(overrides.iter().copied()).is_empty());
        Arc::new(c)
    }

    /// Restart-only keys report their start value and what a restart applies; live keys
    /// their value now; secrets are masked; only the program's keys under the prefix.
    #[test]
    fn running_config_reports_what_the_daemon_runs_with() {
        let started = cfg(&[("relay.auth.password", "hunter2")]);
        let now = cfg(&[
            ("relay.auth.password", "hunter2"),
            ("network.smtp.port", "2525"),
            ("smtp.max_recipients", "7"),
        ]);
        let running = Running {
            program: "mb-smtpd",
            started,
            now: Box::new(move || (now.clone(), 9, false)),
        };
        let r = running.report("mb-smtpd", "");
        assert_eq!(
            (r.daemon.as_str(), r.generation, r.confirmed),
            ("mb-smtpd", 9, false)
        );
        let get = |key: &str| r.values.iter().find(|v| v.key == key).cloned();
        let port = get("network.smtp.port").unwrap();
        assert_eq!(
            (
                port.value.as_str(),
                port.source.as_str(),
                port.restart,
                port.pending.as_deref()
            ),
            ("25", "default", true, Some("2525"))
        );
        let max = get("smtp.max_recipients").unwrap();
        assert_eq!(
            (max.value.as_str(), max.source.as_str(), max.pending),
            ("7", "database", None)
        );
        let password = get("relay.auth.password").unwrap();
        assert_eq!(
            (password.value.as_str(), password.secret),
            (mb_core::config::REDACTED, true)
        );
        assert!(get("filter.port").is_none(), "not mb-smtpd's key");
        let smtp = running.report("mb-smtpd", "network.smtp");
        assert!(!smtp.values.is_empty());
        assert!(
            smtp.values
                .iter()
                .all(|v| v.key.starts_with("network.smtp."))
        );
        assert!(running.report("mb-smtpd", "network.smt").values.is_empty());
    }
}
