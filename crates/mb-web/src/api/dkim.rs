//! `/api/v1/dkim`: what `mb-dkim` does (the DNS record of the signing key, a new key),
//! through mb-rpcd's `Dkim` service: mb-web writes no file and never sees the private
//! key. Administrators make keys; a domain admin reads the record for its own domains
//! (it publishes them in its zone); a user neither.

use axum::Json;
use axum::extract::{Query, State};
use mb_proto::v1::dkim_client::DkimClient;
use mb_proto::v1::{DkimKey, DkimKeygenRequest, DkimRecordRequest};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::acting;
use crate::access::{Admin, Signed};
use crate::auth::{Role, require_domain};
use crate::problem::Problem;
use crate::state::AppState;

const RPCD: &str = "mb-rpcd";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(record))
        .routes(routes!(keygen))
}

/// The key and the TXT record that publishes it, as `mb-dkim --json record` prints it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DkimRecord {
    /// `SELECTOR._domainkey.DOMAIN`, without the trailing dot.
    pub name: String,
    /// Always `TXT`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `v=DKIM1; k=rsa; p=...`, one string (DNS providers split it themselves).
    pub value: String,
    /// The zone-file line, the value in strings of at most 255 bytes.
    pub zone_line: String,
    /// `dkim.selector`.
    pub selector: String,
    /// `dkim.key`, the key file on the gateway.
    pub key: String,
    /// `rsa`: mb-filter signs rsa-sha256.
    pub algorithm: String,
    pub bits: u32,
    /// `SHA256:...` of the public key, as the audit trail names it.
    pub fingerprint: String,
    /// `dkim.sign`: whether outbound mail is signed with this key now.
    pub signing: bool,
    /// After a key generation: an existing key was replaced.
    pub replaced: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct RecordQuery {
    /// The signing domain, e.g. `example.org`.
    pub domain: String,
}

/// A key to make, as `mb-dkim keygen` takes it.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct KeygenBody {
    /// The signing domain the record is returned for.
    pub domain: String,
    /// 2048 (default), 3072 or 4096.
    #[serde(default)]
    pub bits: Option<u32>,
    /// Replace an existing key (mail signed with the old one stops verifying once its
    /// record is gone).
    #[serde(default)]
    pub force: bool,
}

fn view(k: DkimKey) -> DkimRecord {
    DkimRecord {
        name: k.name,
        kind: "TXT".into(),
        value: k.value,
        zone_line: k.zone_line,
        selector: k.selector,
        key: k.key_path,
        algorithm: k.algorithm,
        bits: k.bits,
        fingerprint: k.fingerprint,
        signing: k.signing,
        replaced: k.replaced,
    }
}

/// The DNS record to publish for the signing key in `domain`.
#[utoipa::path(
    get,
    path = "/api/v1/dkim/record",
    tag = "dkim",
    params(RecordQuery),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The key and its record", body = DkimRecord),
        (status = 400, description = "Not a domain name", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A user, or a domain admin of other domains", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No key yet (POST /api/v1/dkim/keygen makes one)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The key file is not an RSA key, or dkim.selector is not a DNS label", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn record(
    Signed(p): Signed,
    State(state): State<AppState>,
    Query(q): Query<RecordQuery>,
) -> Result<Json<DkimRecord>, Problem> {
    if p.role != Role::Admin {
        require_domain(&p, &q.domain)?;
    }
    let asked = acting(&p, DkimRecordRequest { domain: q.domain });
    let key = state
        .call(
            RPCD,
            |ch| async move { DkimClient::new(ch).record(asked).await },
        )
        .await?;
    Ok(Json(view(key)))
}

/// Makes a new RSA signing key at `dkim.key` (mode 0640, the daemons' group), as
/// `mb-dkim keygen`, and returns its record; recorded in the audit trail.
#[utoipa::path(
    post,
    path = "/api/v1/dkim/keygen",
    tag = "dkim",
    request_body = KeygenBody,
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The new key and its record", body = DkimRecord),
        (status = 400, description = "Not a domain name, or a key size other than 2048, 3072 or 4096", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator, or no CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A key exists and force is not set, or this node is a cluster child", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A body without a domain", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn keygen(
    Admin(p): Admin,
    State(state): State<AppState>,
    Json(body): Json<KeygenBody>,
) -> Result<Json<DkimRecord>, Problem> {
    let asked = acting(
        &p,
        DkimKeygenRequest {
            domain: body.domain,
            bits: body.bits.unwrap_or(0),
            force: body.force,
        },
    );
    let key = state
        .call(
            RPCD,
            |ch| async move { DkimClient::new(ch).keygen(asked).await },
        )
        .await?;
    Ok(Json(view(key)))
}
