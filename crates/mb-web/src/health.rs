//! `GET /health`, for load balancers and Kubernetes probes: 200 when the mail path
//! works, 503 with the reason otherwise, no authentication. The mail path works when the
//! daemon that takes mail in serves (mb-smtpd standalone, mb-milter behind Postfix), at
//! least one filter worker serves, and mb-rpcd reaches the database.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use mb_runtime::probe::{Expected, expected_daemons, probe};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::status::{PROBE_TIMEOUT, serving};
use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(health))
}

/// Whether the node takes and scans mail.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` or `failing`.
    pub status: String,
    /// Why the mail path does not work, one reason per failed check; absent when ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub checks: Vec<Check>,
}

/// One part of the mail path.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Check {
    /// `intake` (mb-smtpd or mb-milter), `filter` (the workers) or `database`.
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// Whether the mail path works: 200 or 503.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses(
        (status = 200, description = "Mail is taken in, scanned and logged", body = Health),
        (status = 503, description = "Some part of the mail path does not work: see `reason`", body = Health)
    )
)]
async fn health(State(state): State<AppState>) -> Response {
    let h = check(&state).await;
    let code = if h.reason.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // A probe must never see a cached answer.
    let mut resp = (code, Json(h)).into_response();
    resp.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    resp
}

/// Asks only the daemons on the mail path, at once.
pub async fn check(state: &AppState) -> Health {
    let cfg = state.config();
    let expected = expected_daemons(&cfg);
    let find = |name: &str| expected.iter().find(|e| e.name == name).cloned();
    let intake: Option<Expected> = if cfg.bool("smtp.enabled") {
        find("mb-smtpd")
    } else if cfg.bool("milter.enabled") {
        find("mb-milter")
    } else {
        None
    };
    let workers: Vec<Expected> = expected
        .iter()
        .filter(|e| e.name.starts_with("mb-filter@"))
        .cloned()
        .collect();
    let rpcd = find("mb-rpcd");
    let (intake_s, worker_s, rpcd_s) = tokio::join!(
        async {
            match &intake {
                Some(e) => Some(probe(e, PROBE_TIMEOUT).await),
                None => None,
            }
        },
        futures_join(workers),
        async {
            match &rpcd {
                Some(e) => Some(probe(e, PROBE_TIMEOUT).await),
                None => None,
            }
        },
    );
    let mut checks = Vec::new();
    checks.push(match (&intake, intake_s) {
        (Some(e), Some(d)) if serving(&d) => Check {
            name: "intake".into(),
            ok: true,
            detail: format!("{} serves", e.name),
        },
        (Some(e), Some(d)) => Check {
            name: "intake".into(),
            ok: false,
            detail: if d.error.is_empty() {
                format!("{} does not serve", e.name)
            } else {
                d.error
            },
        },
        _ => Check {
            name: "intake".into(),
            ok: false,
            detail: "neither smtp.enabled nor milter.enabled: nothing takes mail in".into(),
        },
    });
    let up = worker_s.iter().filter(|d| serving(d)).count();
    checks.push(Check {
        name: "filter".into(),
        ok: up > 0,
        detail: if up > 0 {
            format!("{up} of {} filter workers serve", worker_s.len())
        } else if worker_s.is_empty() {
            "no filter worker is configured (filter.enabled, filter.workers)".into()
        } else {
            format!("none of the {} filter workers serves", worker_s.len())
        },
    });
    let db = rpcd_s.as_ref().and_then(|d| {
        d.status
            .as_ref()
            .and_then(|s| s.components.iter().find(|c| c.name == "database"))
    });
    checks.push(match (db, &rpcd_s) {
        (Some(c), _) if c.state == "ok" => Check {
            name: "database".into(),
            ok: true,
            detail: "mb-rpcd reaches the database".into(),
        },
        (Some(c), _) => Check {
            name: "database".into(),
            ok: false,
            detail: format!("the database is {}: {}", c.state, c.detail),
        },
        (None, Some(d)) if !d.error.is_empty() => Check {
            name: "database".into(),
            ok: false,
            detail: d.error.clone(),
        },
        (None, _) => Check {
            name: "database".into(),
            ok: false,
            detail: "mb-rpcd did not report the database".into(),
        },
    });
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    Health {
        status: if failed.is_empty() { "ok" } else { "failing" }.into(),
        reason: (!failed.is_empty()).then(|| failed.join("; ")),
        checks,
    }
}

async fn futures_join(workers: Vec<Expected>) -> Vec<mb_proto::v1::DaemonStatus> {
    let mut set = tokio::task::JoinSet::new();
    for e in workers {
        set.spawn(async move { probe(&e, PROBE_TIMEOUT).await });
    }
    set.join_all().await
}
