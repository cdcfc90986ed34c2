//! `/api/v1/config`: what `mb-config` does, through the same `Config` RPCs of mb-rpcd:
//! every key with its metadata, get, set, unset, a value checked without storing it,
//! and the audit trail. Administrators only. Changes are made for the web principal
//! (`api::acting`), so `mb-config history` names `web:NAME` as who made them.

use axum::Json;
use axum::extract::{Path, Query, State};
use mb_proto::v1::config_client::ConfigClient;
use mb_proto::v1::{
    self, GetRequest, HistoryRequest, ListRequest, SetRequest, UnsetRequest, Value,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::acting;
use crate::access::Admin;
use crate::problem::Problem;
use crate::state::AppState;

const RPCD: &str = "mb-rpcd";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(history))
        .routes(routes!(get, set, unset))
        .routes(routes!(validate))
}

/// One key: its effective value, where it comes from, and what the registry says of it
/// (what `mb-config show` and `mb-config list` print together).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConfigValue {
    pub key: String,
    /// The canonical value; a secret that is set shows as `********`.
    pub value: String,
    /// `default`, `file` or `database`.
    pub source: String,
    /// `bool`, `integer`, `size`, `duration`, `ip-list`, `enum`, ...
    #[serde(rename = "type")]
    pub kind: String,
    pub default: String,
    pub description: String,
    /// `1..65535`, `none|enabled|mandatory`, ...; empty when unbounded.
    pub range: String,
    /// `live` (the daemons follow a change) or `restart`.
    pub apply: String,
    /// The daemons that read the key.
    pub daemons: Vec<String>,
    pub secret: bool,
    /// Kept on each cluster node (listen addresses, paths, `cluster.*`).
    pub node_local: bool,
}

/// A list of keys and the configuration generation they belong to.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConfigList {
    pub generation: u64,
    pub values: Vec<ConfigValue>,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ListQuery {
    /// Only keys under this section, e.g. `network.smtp`.
    #[serde(default)]
    pub prefix: String,
}

/// The value to store or check.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ValueBody {
    /// In the text form `mb-config set` takes (`true`, `10m`, `"a,b"`).
    pub value: String,
}

/// What `mb-config set --json` prints.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SetResult {
    pub key: String,
    pub value: String,
    pub previous: Option<String>,
    pub generation: u64,
    pub restart_required: bool,
    /// The units to restart when `restart_required`.
    pub restart: Vec<String>,
    /// Problems across keys that the new value causes.
    pub warnings: Vec<String>,
}

/// What `mb-config unset --json` prints.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UnsetResult {
    pub key: String,
    /// The value in force now.
    pub value: String,
    pub source: String,
    /// False when the key had no stored value.
    pub removed: bool,
    pub restart_required: bool,
    pub generation: u64,
}

/// Whether a value would be accepted, without storing it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Validation {
    pub key: String,
    pub valid: bool,
    /// The canonical form it would be stored as.
    pub canonical: Option<String>,
    /// Why it would be refused, in `mb-config set`'s words.
    pub error: Option<String>,
}

/// One change in the audit trail.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HistoryEntry {
    pub id: i64,
    pub key: String,
    /// `set` or `unset`.
    pub action: String,
    pub old: String,
    pub new: String,
    pub uid: u32,
    /// Who: a local user (`root`), or `web:NAME` for a change made through this API.
    pub user: String,
    pub at: i64,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct HistoryQuery {
    /// Only this key's changes.
    #[serde(default)]
    pub key: String,
    /// At most this many, newest first (default 20, as `mb-config history`).
    pub limit: Option<u32>,
}

fn source_name(s: i32) -> &'static str {
    match v1::Source::try_from(s) {
        Ok(v1::Source::Default) => "default",
        Ok(v1::Source::File) => "file",
        Ok(v1::Source::Database) => "database",
        _ => "unknown",
    }
}

/// The value as shown: a set secret is masked, as `mb-config show` masks it.
fn shown(v: &Value) -> String {
    if v.info.as_ref().is_some_and(|i| i.secret) && !v.value.is_empty() {
        mb_core::config::REDACTED.to_string()
    } else {
        v.value.clone()
    }
}

fn view(v: &Value) -> ConfigValue {
    let info = v.info.clone().unwrap_or_default();
    ConfigValue {
        key: v.key.clone(),
        value: shown(v),
        source: source_name(v.source).into(),
        kind: info.r#type,
        default: info.default_value,
        description: info.description,
        range: info.range,
        apply: if info.apply == v1::Apply::Restart as i32 {
            "restart"
        } else {
            "live"
        }
        .into(),
        daemons: info.daemons,
        secret: info.secret,
        node_local: info.node_local,
    }
}

/// The systemd units to restart for a key (mb-filter is a template: all its instances).
fn restart_units(v: &Value) -> Vec<String> {
    v.info
        .as_ref()
        .map(|i| {
            i.daemons
                .iter()
                .map(|d| {
                    if d == "mb-filter" {
                        "mb-filter@*".to_string()
                    } else {
                        d.clone()
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every key (or those under `prefix`) with value, source and metadata.
#[utoipa::path(
    get,
    path = "/api/v1/config",
    tag = "config",
    params(ListQuery),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The keys", body = ConfigList),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn list(
    Admin(p): Admin,
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<ConfigList>, Problem> {
    let r = state
        .call(RPCD, |ch| async move {
            ConfigClient::new(ch)
                .list(acting(&p, ListRequest { prefix: q.prefix }))
                .await
        })
        .await?;
    Ok(Json(ConfigList {
        generation: r.generation,
        values: r.values.iter().map(view).collect(),
    }))
}

/// One key's effective value and metadata.
#[utoipa::path(
    get,
    path = "/api/v1/config/{key}",
    tag = "config",
    params(("key" = String, Path, description = "A configuration key, e.g. network.smtp.port")),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The key", body = ConfigValue),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such key", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn get(
    Admin(p): Admin,
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<ConfigValue>, Problem> {
    let r = state
        .call(RPCD, |ch| async move {
            ConfigClient::new(ch)
                .get(acting(&p, GetRequest { key }))
                .await
        })
        .await?;
    Ok(Json(view(&r.value.unwrap_or_default())))
}

/// Stores a value (overriding the file), as `mb-config set`.
#[utoipa::path(
    put,
    path = "/api/v1/config/{key}",
    tag = "config",
    params(("key" = String, Path, description = "A configuration key")),
    request_body = ValueBody,
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "Stored", body = SetResult),
        (status = 400, description = "A value the key does not take", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator, or no CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such key", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A file-only key, or a cluster-wide key on a child node", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A body without a value", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn set(
    Admin(p): Admin,
    State(state): State<AppState>,
    Path(key): Path<String>,
    Json(body): Json<ValueBody>,
) -> Result<Json<SetResult>, Problem> {
    let r = state
        .call(RPCD, |ch| async move {
            ConfigClient::new(ch)
                .set(acting(
                    &p,
                    SetRequest {
                        key,
                        value: body.value,
                    },
                ))
                .await
        })
        .await?;
    let v = r.value.unwrap_or_default();
    Ok(Json(SetResult {
        key: v.key.clone(),
        value: shown(&v),
        previous: r.previous.as_ref().map(shown),
        generation: r.generation,
        restart_required: r.restart_required,
        restart: restart_units(&v),
        warnings: r.warnings,
    }))
}

/// Removes a stored value: the file's value or the default applies again.
#[utoipa::path(
    delete,
    path = "/api/v1/config/{key}",
    tag = "config",
    params(("key" = String, Path, description = "A configuration key")),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "Removed (see `removed`)", body = UnsetResult),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator, or no CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such key", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A file-only key, or a cluster-wide key on a child node", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn unset(
    Admin(p): Admin,
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<UnsetResult>, Problem> {
    let r = state
        .call(RPCD, |ch| async move {
            ConfigClient::new(ch)
                .unset(acting(&p, UnsetRequest { key }))
                .await
        })
        .await?;
    let v = r.value.unwrap_or_default();
    Ok(Json(UnsetResult {
        key: v.key.clone(),
        value: shown(&v),
        source: source_name(v.source).into(),
        removed: r.removed,
        restart_required: r.restart_required,
        generation: r.generation,
    }))
}

/// Whether `set` would take a value, checked by the same parser mb-rpcd uses, without
/// storing anything. An unknown key is 404; a value it refuses is `valid: false`.
#[utoipa::path(
    post,
    path = "/api/v1/config/{key}/validate",
    tag = "config",
    params(("key" = String, Path, description = "A configuration key")),
    request_body = ValueBody,
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The verdict", body = Validation),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator, or no CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such key", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A body without a value", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn validate(
    _admin: Admin,
    Path(key): Path<String>,
    Json(body): Json<ValueBody>,
) -> Result<Json<Validation>, Problem> {
    // The registry is compiled into mb-web as into mb-rpcd: checking needs no daemon.
    mb_core::config::lookup(&key).map_err(|e| Problem::not_found(e.to_string()))?;
    Ok(Json(
        match mb_core::config::parse_key_value(&key, &body.value) {
            Ok((_, v)) => Validation {
                key,
                valid: true,
                canonical: Some(v.to_string()),
                error: None,
            },
            Err(e) => Validation {
                key,
                valid: false,
                canonical: None,
                error: Some(e.to_string()),
            },
        },
    ))
}

/// Who changed what, when: the audit trail `mb-config history` prints.
#[utoipa::path(
    get,
    path = "/api/v1/config/history",
    tag = "config",
    params(HistoryQuery),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The changes, newest first", body = Vec<HistoryEntry>),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such key", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn history(
    Admin(p): Admin,
    State(state): State<AppState>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<Vec<HistoryEntry>>, Problem> {
    let r = state
        .call(RPCD, |ch| async move {
            ConfigClient::new(ch)
                .history(acting(
                    &p,
                    HistoryRequest {
                        key: q.key,
                        limit: q.limit.unwrap_or(20),
                    },
                ))
                .await
        })
        .await?;
    Ok(Json(
        r.entries
            .into_iter()
            .map(|e| HistoryEntry {
                id: e.id,
                key: e.key,
                action: e.action,
                old: e.old_value,
                new: e.new_value,
                uid: e.uid,
                user: e.user,
                at: e.at_unix,
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_and_apply_is_named() {
        let info = v1::KeyInfo {
            secret: true,
            apply: v1::Apply::Restart as i32,
            daemons: vec!["mb-filter".into()],
            ..Default::default()
        };
        let v = Value {
            key: "rspamd.password".into(),
            value: "hunter2".into(),
            source: v1::Source::Database as i32,
            info: Some(info),
        };
        let shown = view(&v);
        assert_eq!(shown.value, mb_core::config::REDACTED);
        assert_eq!(shown.apply, "restart");
        assert_eq!(shown.source, "database");
        assert_eq!(restart_units(&v), ["mb-filter@*"]);
        // An empty secret stays empty: there is nothing to hide.
        let empty = Value {
            value: String::new(),
            ..v
        };
        assert_eq!(view(&empty).value, "");
    }
}
