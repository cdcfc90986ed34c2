//! `/api/v1/bans` and `/api/v1/trusts`: what `mb-ban` does (list, add/trust,
//! del/untrust), through the same `Access` RPCs of mb-rpcd. Administrators only; an
//! entry added here names `web:NAME` as who added it.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use mb_proto::v1::access_client::AccessClient;
use mb_proto::v1::{AccessEntry, ListAccessRequest, RemoveAccessRequest};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::acting;
use crate::access::Admin;
use crate::auth::Principal;
use crate::problem::Problem;
use crate::state::AppState;

const RPCD: &str = "mb-rpcd";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_bans, ban))
        .routes(routes!(unban))
        .routes(routes!(list_trusts, trust))
        .routes(routes!(untrust))
}

/// A banned or trusted address or network, as `mb-ban list --json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Entry {
    /// An address or a network (`192.0.2.0/24`).
    pub ip: String,
    /// `ban` or `trust`.
    pub kind: String,
    pub seconds_left: u64,
    pub reason: String,
    /// Who added it: `mb-smtpd` (autoban, trust after AUTH), a local user, `web:NAME`.
    pub added_by: String,
    pub created_at: i64,
}

/// A ban to add (or extend).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct BanBody {
    /// An address or a network; an IPv6 address bans its `network.smtp.ipv6_prefix`.
    pub ip: String,
    /// How long, e.g. `1h`, `2d` (default `1h`, as `mb-ban add`).
    #[serde(default, rename = "for")]
    pub duration: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

/// A trust to add (or extend).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct TrustBody {
    pub ip: String,
    /// How long (default `1d`, as `mb-ban trust`).
    #[serde(default, rename = "for")]
    pub duration: Option<String>,
}

fn view(e: AccessEntry) -> Entry {
    Entry {
        ip: e.ip,
        kind: e.kind,
        seconds_left: e.seconds,
        reason: e.reason,
        added_by: e.added_by,
        created_at: e.created_at_unix,
    }
}

/// `mb-ban`'s `--for`, with its wording.
fn seconds(text: &str) -> Result<u64, Problem> {
    mb_core::value::parse_duration(text)
        .map(|d| d.as_secs())
        .map_err(|e| Problem::bad_request(format!("--for: {e}")))
}

async fn list(state: &AppState, p: &Principal, kind: &str) -> Result<Vec<Entry>, Problem> {
    let asked = acting(p, ListAccessRequest { kind: kind.into() });
    Ok(state
        .call(
            RPCD,
            |ch| async move { AccessClient::new(ch).list(asked).await },
        )
        .await?
        .entries
        .into_iter()
        .filter(|e| e.kind == kind)
        .map(view)
        .collect())
}

async fn add(state: &AppState, p: &Principal, entry: AccessEntry) -> Result<Entry, Problem> {
    let asked = acting(p, entry);
    Ok(view(
        state
            .call(
                RPCD,
                |ch| async move { AccessClient::new(ch).add(asked).await },
            )
            .await?,
    ))
}

async fn remove(state: &AppState, p: &Principal, ip: String, kind: &str) -> Result<(), Problem> {
    let asked = acting(
        p,
        RemoveAccessRequest {
            ip: ip.clone(),
            kind: kind.into(),
        },
    );
    let removed = state
        .call(RPCD, |ch| async move {
            AccessClient::new(ch).remove(asked).await
        })
        .await?
        .removed;
    if removed {
        Ok(())
    } else {
        Err(Problem::not_found(format!(
            "{ip} is not in the {kind} list; see `mb-ban list`"
        )))
    }
}

/// Banned addresses and networks with the time left.
#[utoipa::path(
    get,
    path = "/api/v1/bans",
    tag = "access",
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The bans", body = Vec<Entry>),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn list_bans(
    Admin(p): Admin,
    State(state): State<AppState>,
) -> Result<Json<Vec<Entry>>, Problem> {
    Ok(Json(list(&state, &p, "ban").await?))
}

/// Bans an address or a network from every mail port, as `mb-ban add`.
#[utoipa::path(
    post,
    path = "/api/v1/bans",
    tag = "access",
    request_body = BanBody,
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 201, description = "Banned (or the ban extended)", body = Entry),
        (status = 400, description = "A bad address or duration", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator, or no CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A body without an address", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn ban(
    Admin(p): Admin,
    State(state): State<AppState>,
    Json(body): Json<BanBody>,
) -> Result<(StatusCode, Json<Entry>), Problem> {
    let secs = seconds(body.duration.as_deref().unwrap_or("1h"))?;
    let entry = AccessEntry {
        ip: body.ip,
        kind: "ban".into(),
        seconds: secs,
        reason: body
            .reason
            .unwrap_or_else(|| "banned by an administrator".into()),
        ..Default::default()
    };
    Ok((StatusCode::CREATED, Json(add(&state, &p, entry).await?)))
}

/// Lifts a ban, as `mb-ban del` (a network as listed, its `/` written `%2F`).
#[utoipa::path(
    delete,
    path = "/api/v1/bans/{ip}",
    tag = "access",
    params(("ip" = String, Path, description = "The address or network as listed")),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 204, description = "Lifted"),
        (status = 400, description = "Not an address or network", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator, or no CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not in the ban list", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn unban(
    Admin(p): Admin,
    State(state): State<AppState>,
    Path(ip): Path<String>,
) -> Result<StatusCode, Problem> {
    remove(&state, &p, ip, "ban").await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Trusted addresses and networks with the time left.
#[utoipa::path(
    get,
    path = "/api/v1/trusts",
    tag = "access",
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The trusts", body = Vec<Entry>),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn list_trusts(
    Admin(p): Admin,
    State(state): State<AppState>,
) -> Result<Json<Vec<Entry>>, Problem> {
    Ok(Json(list(&state, &p, "trust").await?))
}

/// Trusts an address or a network, as `mb-ban trust`.
#[utoipa::path(
    post,
    path = "/api/v1/trusts",
    tag = "access",
    request_body = TrustBody,
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 201, description = "Trusted (or the trust extended)", body = Entry),
        (status = 400, description = "A bad address or duration", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator, or no CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A body without an address", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn trust(
    Admin(p): Admin,
    State(state): State<AppState>,
    Json(body): Json<TrustBody>,
) -> Result<(StatusCode, Json<Entry>), Problem> {
    let secs = seconds(body.duration.as_deref().unwrap_or("1d"))?;
    let entry = AccessEntry {
        ip: body.ip,
        kind: "trust".into(),
        seconds: secs,
        reason: "trusted by an administrator".into(),
        ..Default::default()
    };
    Ok((StatusCode::CREATED, Json(add(&state, &p, entry).await?)))
}

/// Stops trusting an address or network, as `mb-ban untrust`.
#[utoipa::path(
    delete,
    path = "/api/v1/trusts/{ip}",
    tag = "access",
    params(("ip" = String, Path, description = "The address or network as listed")),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 204, description = "No longer trusted"),
        (status = 400, description = "Not an address or network", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator, or no CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not in the trust list", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn untrust(
    Admin(p): Admin,
    State(state): State<AppState>,
    Path(ip): Path<String>,
) -> Result<StatusCode, Problem> {
    remove(&state, &p, ip, "trust").await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_refused_in_mb_bans_words() {
        assert_eq!(seconds("2d").unwrap(), 172_800);
        let p = seconds("forever").unwrap_err();
        assert_eq!(p.status, 400);
        assert!(p.detail.unwrap().starts_with("--for: "));
    }
}
