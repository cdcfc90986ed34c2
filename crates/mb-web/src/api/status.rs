//! `GET /api/v1/status`: what `mb-status --json` shows, from the same sources: each
//! daemon's `Control.Status` on its socket, the database and Redis as mb-rpcd reaches
//! them, the scanners as the first serving filter worker reaches them, and the cluster's
//! nodes from mb-cluster.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use mb_proto::v1::{
    ClusterStatusRequest, ComponentStatus, DaemonStatus, NodeStatus, ServingState, StatusResponse,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::Admin;
use crate::problem::Problem;
use crate::state::AppState;

/// How long each daemon may take to answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(status))
}

/// The node's health, as `mb-status --json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Status {
    /// Every enabled daemon serves, the database, Redis and the scanners answer (or are
    /// disabled), and every cluster node is online: `mb-status` exits 0.
    pub healthy: bool,
    pub daemons: Vec<Daemon>,
    pub components: Vec<Component>,
    /// The cluster as this node's mb-cluster sees it; absent outside a cluster.
    pub cluster: Option<Cluster>,
}

/// One daemon of this node.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Daemon {
    /// `mb-rpcd`, `mb-filter@2`, ...
    pub name: String,
    /// Whether the configuration asks for it (a disabled daemon that runs is shown).
    pub enabled: bool,
    /// `running`, `degraded`, `draining`, `not-serving`, `down` (enabled, not answering)
    /// or `stopped` (disabled, not answering).
    pub state: String,
    pub socket: String,
    pub pid: Option<u32>,
    pub uptime_seconds: Option<u64>,
    pub version: Option<String>,
    pub listening: Vec<String>,
    pub counters: BTreeMap<String, u64>,
    pub config_generation: Option<u64>,
    /// Why it could not be asked, in mb-status's words.
    pub error: Option<String>,
}

/// Something the daemons depend on: `database`, `redis`, `clamav`, `rspamd`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Component {
    pub name: String,
    /// `ok`, `down`, `disabled` or `unknown`.
    pub state: String,
    /// Where it is, any password removed.
    pub address: String,
    pub detail: String,
    pub latency_ms: f64,
}

/// The cluster, as `mb-cluster status --json` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Cluster {
    pub role: String,
    pub name: String,
    pub main: String,
    pub state: String,
    pub config_version: u64,
    pub nodes: Vec<Node>,
}

/// One cluster node.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Node {
    pub name: String,
    pub address: String,
    /// `main` or `child`.
    pub role: String,
    /// `online`, `offline` or `never seen`.
    pub state: String,
    pub config_version: u64,
    pub uptime_secs: u64,
    pub load: f64,
    pub queue_depth: u64,
    pub last_seen_unix_ms: i64,
    pub fingerprint: String,
    pub software_version: String,
}

/// The status of this node's daemons, database, Redis, scanners and cluster.
#[utoipa::path(
    get,
    path = "/api/v1/status",
    tag = "status",
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The node's status (also when something is down: see `healthy`)", body = Status),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json")
    )
)]
async fn status(_admin: Admin, State(state): State<AppState>) -> Result<Json<Status>, Problem> {
    Ok(Json(gather(&state).await.view()))
}

/// What the probes found, before it is shown: kept whole for `/health` and `/metrics`.
pub struct Snapshot {
    /// Each expected daemon with whether the configuration enables it, and its answer.
    pub daemons: Vec<(bool, DaemonStatus)>,
    pub components: Vec<ComponentStatus>,
    pub cluster: Option<mb_proto::v1::ClusterStatusResponse>,
}

/// Asks every daemon of this node, at once.
pub async fn gather(state: &AppState) -> Snapshot {
    let cfg = state.config();
    let expected = mb_runtime::probe::expected_daemons(&cfg);
    let probes = mb_runtime::probe::probe_all(&cfg, PROBE_TIMEOUT).await;
    let daemons: Vec<(bool, DaemonStatus)> =
        expected.iter().map(|e| e.enabled).zip(probes).collect();
    // The database is reached through mb-rpcd, which owns it, and so is Redis: mb-web
    // holds neither's credentials.
    let rpcd = daemons
        .iter()
        .find(|(_, d)| d.name == "mb-rpcd")
        .and_then(|(_, d)| d.status.as_ref());
    let mut components: Vec<ComponentStatus> = Vec::new();
    for name in ["database", "redis"] {
        let seen = rpcd.and_then(|s| s.components.iter().find(|c| c.name == name).cloned());
        components.push(seen.unwrap_or_else(|| ComponentStatus {
            name: name.into(),
            state: "unknown".into(),
            detail: format!("mb-rpcd is down; it is the daemon that reaches the {name}"),
            ..Default::default()
        }));
    }
    let worker = daemons
        .iter()
        .filter(|(_, d)| d.name.starts_with("mb-filter@"))
        .find_map(|(_, d)| d.status.as_ref());
    for scanner in ["clamav", "rspamd"] {
        let enabled = cfg.bool(&format!("{scanner}.enabled"));
        let seen = worker.and_then(|w| w.components.iter().find(|c| c.name == scanner).cloned());
        components.push(seen.unwrap_or_else(|| ComponentStatus {
            name: scanner.into(),
            state: if enabled { "unknown" } else { "disabled" }.into(),
            detail: if enabled {
                "no mb-filter worker is up to check it".into()
            } else {
                String::new()
            },
            ..Default::default()
        }));
    }
    let cluster = cluster(state).await;
    Snapshot {
        daemons,
        components,
        cluster,
    }
}

/// The cluster as mb-cluster sees it; `None` when it does not run here or the node is
/// in no cluster.
async fn cluster(state: &AppState) -> Option<mb_proto::v1::ClusterStatusResponse> {
    if !state.socket("mb-cluster").exists() {
        return None;
    }
    let r = tokio::time::timeout(
        PROBE_TIMEOUT,
        state.call("mb-cluster", |ch| async move {
            mb_proto::v1::cluster_client::ClusterClient::new(ch)
                .status(ClusterStatusRequest {})
                .await
        }),
    )
    .await
    .ok()?
    .ok()?;
    (r.enabled && !r.role.is_empty()).then_some(r)
}

/// Whether a probed daemon answers and serves.
pub fn serving(d: &DaemonStatus) -> bool {
    d.reachable
        && d.status
            .as_ref()
            .is_some_and(|s| s.state == ServingState::Serving as i32)
}

impl Snapshot {
    /// mb-status's verdict: exit 0 or 1.
    pub fn healthy(&self) -> bool {
        self.daemons
            .iter()
            .all(|(enabled, d)| !enabled || serving(d))
            && self
                .components
                .iter()
                .all(|c| c.state == "ok" || c.state == "disabled")
            && self
                .cluster
                .as_ref()
                .is_none_or(|c| c.nodes.iter().all(|n| n.state == "online"))
    }

    /// The answer of `daemon`, when it answered.
    pub fn status_of(&self, daemon: &str) -> Option<&StatusResponse> {
        self.daemons
            .iter()
            .find(|(_, d)| d.name == daemon)
            .and_then(|(_, d)| d.status.as_ref())
    }

    pub fn view(&self) -> Status {
        Status {
            healthy: self.healthy(),
            daemons: self
                .daemons
                .iter()
                .map(|(enabled, d)| daemon_view(*enabled, d))
                .collect(),
            components: self
                .components
                .iter()
                .map(|c| Component {
                    name: c.name.clone(),
                    state: c.state.clone(),
                    address: c.address.clone(),
                    detail: c.detail.clone(),
                    latency_ms: c.latency_micros as f64 / 1000.0,
                })
                .collect(),
            cluster: self.cluster.as_ref().map(|c| Cluster {
                role: c.role.clone(),
                name: c.name.clone(),
                main: c.main.clone(),
                state: c.state.clone(),
                config_version: c.config_version,
                nodes: c.nodes.iter().map(node_view).collect(),
            }),
        }
    }
}

fn daemon_view(enabled: bool, d: &DaemonStatus) -> Daemon {
    let s = d.status.as_ref();
    let state = match s {
        None if enabled => "down",
        None => "stopped",
        Some(s) => match ServingState::try_from(s.state) {
            Ok(ServingState::Serving) => "running",
            Ok(ServingState::Degraded) => "degraded",
            Ok(ServingState::Draining) => "draining",
            _ => "not-serving",
        },
    };
    Daemon {
        name: d.name.clone(),
        enabled,
        state: state.into(),
        socket: d.socket.clone(),
        pid: s.map(|s| s.pid),
        uptime_seconds: s.map(|s| s.uptime_seconds),
        version: s.map(|s| s.version.clone()),
        listening: s.map(|s| s.listening.clone()).unwrap_or_default(),
        counters: s
            .map(|s| s.counters.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default(),
        config_generation: s.map(|s| s.config_generation),
        error: (!d.error.is_empty()).then(|| d.error.clone()),
    }
}

fn node_view(n: &NodeStatus) -> Node {
    Node {
        name: n.name.clone(),
        address: n.address.clone(),
        role: n.role.clone(),
        state: n.state.clone(),
        config_version: n.config_version,
        uptime_secs: n.uptime_secs,
        load: n.load,
        queue_depth: n.queue_depth,
        last_seen_unix_ms: n.last_seen_unix_ms,
        fingerprint: n.fingerprint.clone(),
        software_version: n.software_version.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probed(name: &str, state: Option<ServingState>) -> DaemonStatus {
        DaemonStatus {
            name: name.into(),
            socket: format!("/run/{name}.sock"),
            reachable: state.is_some(),
            error: if state.is_none() {
                format!("{name} is not running")
            } else {
                String::new()
            },
            status: state.map(|s| StatusResponse {
                state: s as i32,
                pid: 7,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn health_follows_mb_status_rules() {
        let ok = |name: &str| ComponentStatus {
            name: name.into(),
            state: "ok".into(),
            ..Default::default()
        };
        let mut snap = Snapshot {
            daemons: vec![
                (true, probed("mb-rpcd", Some(ServingState::Serving))),
                // Disabled and stopped: does not count.
                (false, probed("mb-milter", None)),
            ],
            components: vec![ok("database"), ok("redis")],
            cluster: None,
        };
        assert!(snap.healthy());
        let view = snap.view();
        assert_eq!(view.daemons[0].state, "running");
        assert_eq!(view.daemons[1].state, "stopped");
        assert_eq!(
            view.daemons[1].error.as_deref(),
            Some("mb-milter is not running")
        );
        snap.daemons.push((true, probed("mb-smtpd", None)));
        assert!(!snap.healthy());
        assert_eq!(snap.view().daemons[2].state, "down");
        snap.daemons.pop();
        snap.components[1].state = "down".into();
        assert!(!snap.healthy());
    }
}
