//! `/api/v1/policies`: what `mb-policy` does (list, add, del, test), through the same
//! `Policies` RPCs of mb-rpcd, plus read one and replace one. Administrators change
//! them; a domain admin reads the address and domain policies of its domains (the
//! pattern names the domain, so the filter is exact); users see none.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use mb_proto::v1::policies_client::PoliciesClient;
use mb_proto::v1::{
    ListPoliciesRequest, Policy, PolicyRef, ReplacePolicyRequest, TestPolicyRequest,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::acting;
use crate::access::{Admin, Signed};
use crate::auth::{Principal, Role};
use crate::problem::Problem;
use crate::state::AppState;

const RPCD: &str = "mb-rpcd";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, add))
        .routes(routes!(test))
        .routes(routes!(show, replace, delete))
}

/// A policy as `mb-policy list --json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PolicyView {
    pub id: i64,
    pub name: String,
    /// Lower wins.
    pub priority: i32,
    /// `address`, `network`, `domain` or `default`.
    pub object: String,
    pub pattern: String,
    /// `from`, `to` or `from-or-to`.
    pub direction: String,
    /// `allow`, `block` or `score`.
    pub action: String,
    pub tag: Option<f64>,
    pub quarantine: Option<f64>,
    pub reject: Option<f64>,
    pub comment: String,
    /// A sender allow that applies to unauthenticated senders too.
    pub unauthenticated: bool,
    pub created_at: i64,
}

/// A new policy, as `mb-policy add` takes it.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct PolicyBody {
    pub name: String,
    /// `allow`, `block` or `score`.
    pub action: String,
    /// An address (`*@partner.example`), a domain (`example.org`, `*.example.org`), a
    /// client network (`192.0.2.0/24`), or empty for every message.
    #[serde(default)]
    pub pattern: String,
    /// `from` (default), `to` or `from-or-to`; a network is always `from`.
    #[serde(default)]
    pub direction: Option<String>,
    /// `address`, `domain`, `network` or `default`; guessed from the pattern when absent.
    #[serde(default)]
    pub object: Option<String>,
    #[serde(default = "default_priority")]
    pub priority: i32,
    pub tag: Option<f64>,
    pub quarantine: Option<f64>,
    pub reject: Option<f64>,
    #[serde(default)]
    pub unauthenticated: bool,
    #[serde(default)]
    pub comment: String,
}

fn default_priority() -> i32 {
    50
}

/// A message to try the policies on, as `mb-policy test` takes it.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct TestBody {
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: Vec<String>,
    /// The client address.
    pub ip: Option<String>,
}

/// Which policy such a message gets, and why.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TestResult {
    pub matched: bool,
    pub policy: Option<PolicyView>,
    /// The lines `mb-policy test` prints.
    pub explanation: Vec<String>,
}

fn view(p: &Policy) -> PolicyView {
    PolicyView {
        id: p.id,
        name: p.name.clone(),
        priority: p.priority,
        object: p.object.clone(),
        pattern: p.pattern.clone(),
        direction: p.direction.clone(),
        action: p.action.clone(),
        tag: p.tag,
        quarantine: p.quarantine,
        reject: p.reject,
        comment: p.comment.clone(),
        unauthenticated: p.unauthenticated,
        created_at: p.created_at_unix,
    }
}

impl PolicyBody {
    fn wire(self) -> Policy {
        let pattern = self.pattern.trim().to_string();
        let object = self.object.unwrap_or_else(|| {
            if pattern.is_empty() {
                "default"
            } else if pattern.parse::<std::net::IpAddr>().is_ok()
                || pattern
                    .split_once('/')
                    .is_some_and(|(a, _)| a.parse::<std::net::IpAddr>().is_ok())
            {
                "network"
            } else if pattern.contains('@') {
                "address"
            } else {
                "domain"
            }
            .into()
        });
        let direction = self.direction.unwrap_or_else(|| {
            match object.as_str() {
                "default" => "from-or-to",
                _ => "from",
            }
            .into()
        });
        Policy {
            name: self.name,
            priority: self.priority,
            object,
            pattern,
            direction,
            action: self.action,
            tag: self.tag,
            quarantine: self.quarantine,
            reject: self.reject,
            comment: self.comment,
            unauthenticated: self.unauthenticated,
            ..Default::default()
        }
    }
}

/// The domain an address or domain policy is about (`*@a.test`, `a.test`, `*.a.test`).
fn policy_domain(p: &Policy) -> Option<String> {
    let d = match p.object.as_str() {
        "address" => p.pattern.rsplit_once('@')?.1,
        "domain" => p.pattern.strip_prefix("*.").unwrap_or(&p.pattern),
        _ => return None,
    };
    (!d.contains(['*', '?'])).then(|| d.to_ascii_lowercase())
}

/// Whether `who` may read `p`.
fn readable(who: &Principal, p: &Policy) -> bool {
    match who.role {
        Role::Admin => true,
        Role::DomainAdmin => policy_domain(p).is_some_and(|d| who.sees_domain(&d)),
        Role::User => false,
    }
}

fn reference(policy: &str) -> PolicyRef {
    match policy.parse::<i64>() {
        Ok(id) => PolicyRef {
            id,
            name: String::new(),
        },
        Err(_) => PolicyRef {
            id: 0,
            name: policy.to_string(),
        },
    }
}

async fn all(state: &AppState, p: &Principal) -> Result<Vec<Policy>, Problem> {
    let asked = acting(p, ListPoliciesRequest {});
    Ok(state
        .call(RPCD, |ch| async move {
            PoliciesClient::new(ch).list(asked).await
        })
        .await?
        .policies)
}

/// The policy named or numbered `policy`, when `who` may read it; 404 (in mb-rpcd's
/// words) otherwise, so a domain admin learns nothing of other domains' policies.
async fn find(state: &AppState, who: &Principal, policy: &str) -> Result<Policy, Problem> {
    let r = reference(policy);
    all(state, who)
        .await?
        .into_iter()
        .find(|p| {
            if r.id != 0 {
                p.id == r.id
            } else {
                p.name == r.name
            }
        })
        .filter(|p| readable(who, p))
        .ok_or_else(|| {
            Problem::not_found(format!(
                "no policy {} (mb-policy list shows them)",
                if r.id != 0 {
                    r.id.to_string()
                } else {
                    format!("{:?}", r.name)
                }
            ))
        })
}

/// Every policy the caller may read, lowest priority first as mb-rpcd lists them.
#[utoipa::path(
    get,
    path = "/api/v1/policies",
    tag = "policies",
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The policies (a domain admin: those of its domains)", body = Vec<PolicyView>),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A user", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn list(
    Signed(p): Signed,
    State(state): State<AppState>,
) -> Result<Json<Vec<PolicyView>>, Problem> {
    if p.role == Role::User {
        return Err(Problem::forbidden(format!(
            "{} may not read policies",
            p.name
        )));
    }
    Ok(Json(
        all(&state, &p)
            .await?
            .iter()
            .filter(|x| readable(&p, x))
            .map(view)
            .collect(),
    ))
}

/// One policy, by id or name.
#[utoipa::path(
    get,
    path = "/api/v1/policies/{policy}",
    tag = "policies",
    params(("policy" = String, Path, description = "The policy's id or name")),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The policy", body = PolicyView),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such policy (or not one of the caller's domains)", body = Problem, content_type = "application/problem+json")
    )
)]
async fn show(
    Signed(p): Signed,
    State(state): State<AppState>,
    Path(policy): Path<String>,
) -> Result<Json<PolicyView>, Problem> {
    Ok(Json(view(&find(&state, &p, &policy).await?)))
}

/// Adds a policy, as `mb-policy add`.
#[utoipa::path(
    post,
    path = "/api/v1/policies",
    tag = "policies",
    request_body = PolicyBody,
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 201, description = "Added", body = PolicyView),
        (status = 400, description = "A bad pattern, action or threshold", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator, or no CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The name is taken, or this node is a cluster child", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A body without a name or action", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn add(
    Admin(p): Admin,
    State(state): State<AppState>,
    Json(body): Json<PolicyBody>,
) -> Result<(StatusCode, Json<PolicyView>), Problem> {
    let asked = acting(&p, body.wire());
    let added = state
        .call(RPCD, |ch| async move {
            PoliciesClient::new(ch).add(asked).await
        })
        .await?;
    Ok((StatusCode::CREATED, Json(view(&added))))
}

/// Replaces a policy by a new one (the name may change; the id stays), in one transaction
/// of mb-rpcd's `Replace`: a refused replacement, a crash or a lost connection leaves the
/// old policy as it was.
#[utoipa::path(
    put,
    path = "/api/v1/policies/{policy}",
    tag = "policies",
    params(("policy" = String, Path, description = "The policy's id or name")),
    request_body = PolicyBody,
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "Replaced", body = PolicyView),
        (status = 400, description = "A bad pattern, action or threshold (the old policy stays)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator, or no CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such policy", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The new name is taken, or this node is a cluster child", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A body without a name or action", body = Problem, content_type = "application/problem+json")
    )
)]
async fn replace(
    Admin(p): Admin,
    State(state): State<AppState>,
    Path(policy): Path<String>,
    Json(body): Json<PolicyBody>,
) -> Result<Json<PolicyView>, Problem> {
    let old = find(&state, &p, &policy).await?;
    let asked = acting(
        &p,
        ReplacePolicyRequest {
            old: Some(PolicyRef {
                id: old.id,
                name: String::new(),
            }),
            new: Some(body.wire()),
        },
    );
    let new = state
        .call(RPCD, |ch| async move {
            PoliciesClient::new(ch).replace(asked).await
        })
        .await?;
    Ok(Json(view(&new)))
}

/// Removes a policy, as `mb-policy del`.
#[utoipa::path(
    delete,
    path = "/api/v1/policies/{policy}",
    tag = "policies",
    params(("policy" = String, Path, description = "The policy's id or name")),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator, or no CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such policy", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "This node is a cluster child", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn delete(
    Admin(p): Admin,
    State(state): State<AppState>,
    Path(policy): Path<String>,
) -> Result<StatusCode, Problem> {
    let asked = acting(&p, reference(&policy));
    state
        .call(RPCD, |ch| async move {
            PoliciesClient::new(ch).delete(asked).await
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Which policy a message would get, and why, as `mb-policy test`.
#[utoipa::path(
    post,
    path = "/api/v1/policies/test",
    tag = "policies",
    request_body = TestBody,
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The verdict", body = TestResult),
        (status = 400, description = "A client address that is not an IP address", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator, or no CSRF token", body = Problem, content_type = "application/problem+json")
    )
)]
async fn test(
    Admin(p): Admin,
    State(state): State<AppState>,
    Json(body): Json<TestBody>,
) -> Result<Json<TestResult>, Problem> {
    if let Some(ip) = &body.ip
        && ip.parse::<std::net::IpAddr>().is_err()
    {
        return Err(Problem::bad_request(format!(
            "--ip {ip:?} is not an IP address"
        )));
    }
    let asked = acting(
        &p,
        TestPolicyRequest {
            sender: body.from,
            recipients: body.to,
            client_ip: body.ip.unwrap_or_default(),
        },
    );
    let r = state
        .call(RPCD, |ch| async move {
            PoliciesClient::new(ch).test(asked).await
        })
        .await?;
    Ok(Json(TestResult {
        matched: r.matched,
        policy: r.policy.as_ref().map(view),
        explanation: r.explanation,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(pattern: &str) -> PolicyBody {
        serde_json::from_value(
            serde_json::json!({"name": "n", "action": "allow", "pattern": pattern}),
        )
        .unwrap()
    }

    #[test]
    fn the_object_is_guessed_as_mb_policy_does() {
        let w = body("*@partner.example").wire();
        assert_eq!(
            (w.object.as_str(), w.direction.as_str()),
            ("address", "from")
        );
        assert_eq!(w.priority, 50);
        assert_eq!(body("partner.example").wire().object, "domain");
        assert_eq!(body("192.0.2.0/24").wire().object, "network");
        let d = body("").wire();
        assert_eq!(
            (d.object.as_str(), d.direction.as_str()),
            ("default", "from-or-to")
        );
    }

    #[test]
    fn a_domain_admin_reads_only_its_domains_policies() {
        let dora = Principal {
            name: "dora".into(),
            role: Role::DomainAdmin,
            domains: vec!["a.test".into()],
            addresses: Vec::new(),
        };
        let mine = body("*@a.test").wire();
        let sub = body("*.a.test").wire();
        let theirs = body("b.test").wire();
        let net = body("192.0.2.0/24").wire();
        let wild = body("*@*.test").wire();
        assert!(readable(&dora, &mine));
        assert!(readable(&dora, &sub));
        assert!(!readable(&dora, &theirs));
        assert!(!readable(&dora, &net));
        assert!(!readable(&dora, &wild));
        let jane = Principal {
            role: Role::User,
            ..dora
        };
        assert!(!readable(&jane, &mine));
    }
}
