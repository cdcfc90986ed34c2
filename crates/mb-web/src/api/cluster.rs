//! `GET /api/v1/cluster`: the cluster as `mb-cluster status --json` shows it, from
//! mb-cluster's `Cluster.Status` on this node. Administrators only.

use axum::Json;
use axum::extract::State;
use mb_proto::v1::ClusterStatusRequest;
use mb_proto::v1::cluster_client::ClusterClient;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::Admin;
use crate::api::status::Node;
use crate::problem::Problem;
use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(cluster))
}

/// This node's view of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Cluster {
    /// Whether this node is in a cluster (`cluster.enabled` and joined).
    pub enabled: bool,
    /// `main` or `child`; empty outside a cluster.
    pub role: String,
    pub name: String,
    /// The main's name and address (on a child).
    pub main: String,
    /// `serving` (main), `connected`, `disconnected: WHY` (child), `not set up`.
    pub state: String,
    pub config_version: u64,
    /// Every node with its role and last contact (`last_seen_unix_ms`).
    pub nodes: Vec<Node>,
}

/// The cluster's nodes, roles and last contact (`mb-cluster status`).
#[utoipa::path(
    get,
    path = "/api/v1/cluster",
    tag = "cluster",
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The cluster as this node sees it", body = Cluster),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "mb-cluster is not running", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn cluster(
    _admin: Admin,
    State(state): State<AppState>,
) -> Result<Json<Cluster>, Problem> {
    let r = state
        .call("mb-cluster", |ch| async move {
            ClusterClient::new(ch).status(ClusterStatusRequest {}).await
        })
        .await?;
    Ok(Json(Cluster {
        enabled: r.enabled,
        role: r.role,
        name: r.name,
        main: r.main,
        state: r.state,
        config_version: r.config_version,
        nodes: r
            .nodes
            .into_iter()
            .map(|n| Node {
                name: n.name,
                address: n.address,
                role: n.role,
                state: n.state,
                config_version: n.config_version,
                uptime_secs: n.uptime_secs,
                load: n.load,
                queue_depth: n.queue_depth,
                last_seen_unix_ms: n.last_seen_unix_ms,
                fingerprint: n.fingerprint,
                software_version: n.software_version,
            })
            .collect(),
    }))
}
