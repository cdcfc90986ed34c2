//! The REST API under `/api/v1/` and its OpenAPI 3 document, generated from the same
//! code: every route is registered through utoipa-axum's `routes!` from its handler's
//! `#[utoipa::path]`, so a route cannot exist without its entry in
//! `/api/v1/openapi.json` (`tests::every_route_is_registered_with_its_document` keeps
//! plain axum `.route(...)` calls out of this crate).
//!
//! One file per area (`status.rs`, ...), each with `pub fn routes() ->
//! OpenApiRouter<AppState>`, merged in [`routes`]. Handlers take `access::Admin` or
//! `access::Signed` to require a login, answer JSON, and fail with
//! `problem::Problem` (RFC 9457), carrying the daemons' own words.

pub mod access;
pub mod cluster;
pub mod config;
pub mod dkim;
pub mod learn;
pub mod log;
pub mod policies;
pub mod quarantine;
pub mod queue;
pub mod recipients;
pub mod smtp_accounts;
pub mod stats;
pub mod status;

use std::sync::OnceLock;

use axum::{Json, Router};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::problem::Problem;
use crate::state::AppState;

/// The document's fixed parts; the paths come from the routes.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Mailborder API",
        description = "The gateway's REST API: what the command-line tools do, as JSON over HTTPS \
                       (or mb-web.sock). Errors are RFC 9457 problem documents \
                       (application/problem+json) with the tools' wording.",
        license(name = "AGPL-3.0-or-later", identifier = "AGPL-3.0-or-later")
    ),
    components(schemas(Problem)),
    modifiers(&Security),
    tags(
        (name = "auth", description = "Logins, web accounts and API keys"),
        (name = "status", description = "Daemons, database, Redis, scanners and cluster nodes"),
        (name = "quarantine", description = "Messages the filter held back, scoped to the caller's addresses or domains"),
        (name = "log", description = "The message log search of mb-log, scoped as the quarantine"),
        (name = "queue", description = "mb-smtpd's mail queue, for administrators"),
        (name = "cluster", description = "The cluster's nodes, roles and last contact, for administrators"),
        (name = "config", description = "The configuration, as mb-config (administrators)"),
        (name = "access", description = "Banned and trusted client addresses, as mb-ban (administrators)"),
        (name = "policies", description = "Allow, block and score policies, as mb-policy (administrators; domain admins read their domains')"),
        (name = "dkim", description = "The DKIM signing key's DNS record and new keys, as mb-dkim (administrators; domain admins read their domains' record)"),
        (name = "recipients", description = "Valid recipients of recipient verification in list mode, as mb-recipient (administrators; domain admins for their domains)"),
        (name = "smtp-accounts", description = "SMTP AUTH accounts and their aliases, as mb-user (administrators; domain admins for their domains)"),
        (name = "stats", description = "Message statistics per hour or day, as mb-stats (administrators; domain admins their domains')"),
        (name = "rspamd", description = "Rspamd's controller (web interface and API) under /rspamd/, for administrators, with its password added by mb-web"),
        (name = "operations", description = "Health, metrics and this document")
    )
)]
struct ApiDoc;

/// How a caller authenticates: an API key as a bearer token, or a session cookie.
struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key from `mb-web key create`"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new("mb_session"))),
        );
    }
}

/// `msg` as a gRPC request made for `p`: mb-rpcd's audit trails name `web:NAME`, not
/// mb-web's own user (`mb_runtime::uds::ACTOR_HEADER`).
pub fn acting<T>(p: &crate::auth::Principal, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Ok(v) = format!("web:{}", p.name).parse() {
        req.metadata_mut().insert(mb_runtime::uds::ACTOR_HEADER, v);
    }
    req
}

/// The (domains, addresses) mb-rpcd restricts a non-admin's quarantine list and log
/// search to: a domain admin's domains, a user's addresses (`Principal::sees_address`).
pub fn scope_of(p: &crate::auth::Principal) -> (Vec<String>, Vec<String>) {
    use crate::auth::Role;
    match p.role {
        Role::Admin => (Vec::new(), Vec::new()),
        Role::DomainAdmin => (p.domains.clone(), Vec::new()),
        Role::User => (Vec::new(), p.addresses.clone()),
    }
}

/// Every documented route of mb-web, the API's areas and the operational endpoints.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(openapi_json))
        .merge(crate::auth::routes())
        .merge(status::routes())
        .merge(quarantine::routes())
        .merge(learn::routes())
        .merge(log::routes())
        .merge(queue::routes())
        .merge(cluster::routes())
        .merge(config::routes())
        .merge(policies::routes())
        .merge(access::routes())
        .merge(smtp_accounts::routes())
        .merge(recipients::routes())
        .merge(dkim::routes())
        .merge(stats::routes())
        .merge(crate::health::routes())
        .merge(crate::metrics::routes())
        .merge(crate::rspamd_proxy::routes())
}

/// The routes as an axum router.
pub fn router() -> Router<AppState> {
    routes().split_for_parts().0
}

/// The OpenAPI document, built once.
pub fn openapi() -> &'static utoipa::openapi::OpenApi {
    static DOC: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    DOC.get_or_init(|| routes().into_openapi())
}

/// The OpenAPI 3 document of this API.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json"))
)]
async fn openapi_json() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(openapi())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The paths and methods in the document.
    fn documented() -> Vec<(String, String)> {
        let doc = serde_json::to_value(openapi()).unwrap();
        let mut out = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                out.push((method.to_uppercase(), path.clone()));
            }
        }
        out
    }

    #[test]
    fn the_document_names_the_operational_routes() {
        let doc = documented();
        for (m, p) in [
            ("GET", "/api/v1/openapi.json"),
            ("GET", "/api/v1/status"),
            ("GET", "/health"),
            ("GET", "/metrics"),
        ] {
            assert!(
                doc.contains(&(m.into(), p.into())),
                "{m} {p} not in {doc:?}"
            );
        }
    }

    /// utoipa-axum keeps `routes!` and the document together; what it cannot stop is a
    /// plain `.route(...)`, `.route_service(...)` or `.nest_service(...)`, which would
    /// add a path the document does not have. None may appear in the crate's source.
    #[test]
    fn every_route_is_registered_with_its_document() {
        let mut offenders = Vec::new();
        let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                // src/ui/ holds the web interface's HTML pages: routes of a browser,
                // not of the API, so they have no place in the OpenAPI document.
                if path.is_dir() && path.file_name().is_some_and(|n| n == "ui") {
                    continue;
                }
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                for (n, line) in text.lines().enumerate() {
                    let code = line.trim_start();
                    if code.starts_with("//") {
                        continue;
                    }
                    // Built here so that this test's own source does not match.
                    let calls = ["route(", "route_service(", "nest_service(", "nest("]
                        .map(|c| format!(".{c}"));
                    let plain_router = code
                        .match_indices(&format!("{}::new()", "Router"))
                        .any(|(at, _)| !code[..at].ends_with("OpenApi"));
                    if plain_router || calls.iter().any(|c| code.contains(c.as_str())) {
                        offenders.push(format!("{}:{}: {}", path.display(), n + 1, code));
                    }
                }
            }
        }
        assert!(
            offenders.is_empty(),
            "register routes with utoipa-axum's routes!(handler) so they are documented:\n{}",
            offenders.join("\n")
        );
    }
}
