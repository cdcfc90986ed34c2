//! `/api/v1/smtp-accounts`: the SMTP AUTH accounts of `mb-user` (list, add, del,
//! passwd, aliases), through the same `Users` RPCs of mb-rpcd. These are not web
//! accounts (`/api/v1/accounts`). An administrator manages all; a domain admin those
//! whose login is an address of its domains, and only aliases in its domains; a user
//! none.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use mb_proto::v1::users_client::UsersClient;
use mb_proto::v1::{
    AddUserRequest, AliasRequest, ListAliasesRequest, ListUsersRequest, RemoveUserRequest,
    SetPasswordRequest,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::acting;
use crate::access::Signed;
use crate::auth::{Principal, Role, require_domain};
use crate::problem::Problem;
use crate::state::AppState;

const RPCD: &str = "mb-rpcd";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, add))
        .routes(routes!(remove))
        .routes(routes!(passwd))
        .routes(routes!(aliases, add_alias))
        .routes(routes!(remove_alias))
}

/// An SMTP account, as `mb-user list --json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SmtpAccount {
    pub name: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A new account.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct AccountBody {
    pub name: String,
    pub password: String,
}

/// A new password.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct PasswordBody {
    pub password: String,
}

/// An address an account may send as (`@example.org`: every address of the domain).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AliasBody {
    pub address: String,
}

/// An alias, as `mb-user alias list --json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Alias {
    pub login: String,
    pub address: String,
    pub created_at: i64,
}

/// What an alias change did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AliasChange {
    pub login: String,
    pub address: String,
    /// False when there was nothing to change (already granted).
    pub changed: bool,
}

/// The domain of a login or alias address (`bob@a.test`, `@a.test`).
fn domain_of(address: &str) -> Option<&str> {
    address.trim().rsplit_once('@').map(|(_, d)| d)
}

/// 403 unless `p` may manage `login` (an address of its domains, for a domain admin).
fn may_manage(p: &Principal, login: &str) -> Result<(), Problem> {
    match (p.role, domain_of(login)) {
        (Role::Admin, _) => Ok(()),
        (Role::DomainAdmin, Some(d)) => require_domain(p, d),
        _ => Err(Problem::forbidden(format!(
            "{} may not manage the SMTP account {}",
            p.name,
            login.trim()
        ))),
    }
}

/// Every account the caller may manage.
#[utoipa::path(
    get,
    path = "/api/v1/smtp-accounts",
    tag = "smtp-accounts",
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The accounts (a domain admin: those of its domains)", body = Vec<SmtpAccount>),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A user", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn list(
    Signed(p): Signed,
    State(state): State<AppState>,
) -> Result<Json<Vec<SmtpAccount>>, Problem> {
    if p.role == Role::User {
        return Err(Problem::forbidden(format!(
            "{} may not manage SMTP accounts",
            p.name
        )));
    }
    let asked = acting(&p, ListUsersRequest {});
    let users = state
        .call(
            RPCD,
            |ch| async move { UsersClient::new(ch).list(asked).await },
        )
        .await?
        .users;
    Ok(Json(
        users
            .into_iter()
            .filter(|u| may_manage(&p, &u.username).is_ok())
            .map(|u| SmtpAccount {
                name: u.username,
                created_at: u.created_at_unix,
                updated_at: u.updated_at_unix,
            })
            .collect(),
    ))
}

/// Adds an account, as `mb-user add`.
#[utoipa::path(
    post,
    path = "/api/v1/smtp-accounts",
    tag = "smtp-accounts",
    request_body = AccountBody,
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 201, description = "Added", body = SmtpAccount),
        (status = 400, description = "A bad name or a weak password", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not for this caller, or no CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The account exists", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A body without a name or password", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn add(
    Signed(p): Signed,
    State(state): State<AppState>,
    Json(body): Json<AccountBody>,
) -> Result<(StatusCode, Json<SmtpAccount>), Problem> {
    may_manage(&p, &body.name)?;
    let asked = acting(
        &p,
        AddUserRequest {
            username: body.name,
            password: body.password,
        },
    );
    let u = state
        .call(
            RPCD,
            |ch| async move { UsersClient::new(ch).add(asked).await },
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(SmtpAccount {
            name: u.username,
            created_at: u.created_at_unix,
            updated_at: u.updated_at_unix,
        }),
    ))
}

/// Removes an account, as `mb-user del`.
#[utoipa::path(
    delete,
    path = "/api/v1/smtp-accounts/{name}",
    tag = "smtp-accounts",
    params(("name" = String, Path, description = "The account's login")),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not for this caller, or no CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such account", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn remove(
    Signed(p): Signed,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, Problem> {
    may_manage(&p, &name)?;
    let asked = acting(&p, RemoveUserRequest { username: name });
    state
        .call(RPCD, |ch| async move {
            UsersClient::new(ch).remove(asked).await
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sets an account's password, as `mb-user passwd`.
#[utoipa::path(
    put,
    path = "/api/v1/smtp-accounts/{name}/password",
    tag = "smtp-accounts",
    params(("name" = String, Path, description = "The account's login")),
    request_body = PasswordBody,
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 204, description = "Changed"),
        (status = 400, description = "A weak password", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not for this caller, or no CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such account", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A body without a password", body = Problem, content_type = "application/problem+json")
    )
)]
async fn passwd(
    Signed(p): Signed,
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(body): Json<PasswordBody>,
) -> Result<StatusCode, Problem> {
    may_manage(&p, &name)?;
    let asked = acting(
        &p,
        SetPasswordRequest {
            username: name,
            password: body.password,
        },
    );
    state
        .call(RPCD, |ch| async move {
            UsersClient::new(ch).set_password(asked).await
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The addresses an account may send as, as `mb-user alias list LOGIN`.
#[utoipa::path(
    get,
    path = "/api/v1/smtp-accounts/{name}/aliases",
    tag = "smtp-accounts",
    params(("name" = String, Path, description = "The account's login")),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The aliases", body = Vec<Alias>),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not for this caller", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such account", body = Problem, content_type = "application/problem+json")
    )
)]
async fn aliases(
    Signed(p): Signed,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Alias>>, Problem> {
    may_manage(&p, &name)?;
    let asked = acting(&p, ListAliasesRequest { username: name });
    let r = state
        .call(RPCD, |ch| async move {
            UsersClient::new(ch).list_aliases(asked).await
        })
        .await?;
    Ok(Json(
        r.aliases
            .into_iter()
            .map(|a| Alias {
                login: a.username,
                address: a.address,
                created_at: a.created_at_unix,
            })
            .collect(),
    ))
}

/// Lets an account send as an address, as `mb-user alias add`; a domain admin only
/// within its domains.
#[utoipa::path(
    post,
    path = "/api/v1/smtp-accounts/{name}/aliases",
    tag = "smtp-accounts",
    params(("name" = String, Path, description = "The account's login")),
    request_body = AliasBody,
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "Granted (see `changed`)", body = AliasChange),
        (status = 400, description = "Not an address or @domain", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not for this caller, or no CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such account", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A body without an address", body = Problem, content_type = "application/problem+json")
    )
)]
async fn add_alias(
    Signed(p): Signed,
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(body): Json<AliasBody>,
) -> Result<Json<AliasChange>, Problem> {
    alias(p, state, name, body.address, true).await.map(Json)
}

/// Stops an account sending as an address, as `mb-user alias del`.
#[utoipa::path(
    delete,
    path = "/api/v1/smtp-accounts/{name}/aliases/{address}",
    tag = "smtp-accounts",
    params(
        ("name" = String, Path, description = "The account's login"),
        ("address" = String, Path, description = "The alias as listed")
    ),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not for this caller, or no CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such account or alias", body = Problem, content_type = "application/problem+json")
    )
)]
async fn remove_alias(
    Signed(p): Signed,
    State(state): State<AppState>,
    Path((name, address)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    alias(p, state, name, address, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn alias(
    p: Principal,
    state: AppState,
    login: String,
    address: String,
    add: bool,
) -> Result<AliasChange, Problem> {
    may_manage(&p, &login)?;
    if p.role != Role::Admin {
        let d = domain_of(&address).unwrap_or(address.trim());
        require_domain(&p, d)?;
    }
    let asked = acting(
        &p,
        AliasRequest {
            username: login.clone(),
            address,
        },
    );
    let r = state
        .call(RPCD, |ch| async move {
            let mut c = UsersClient::new(ch);
            if add {
                c.add_alias(asked).await
            } else {
                c.remove_alias(asked).await
            }
        })
        .await?;
    Ok(AliasChange {
        login,
        address: r.address,
        changed: r.changed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_domain_admin_manages_its_domains_logins_only() {
        let dora = Principal {
            name: "dora".into(),
            role: Role::DomainAdmin,
            domains: vec!["a.test".into()],
            addresses: Vec::new(),
        };
        assert!(may_manage(&dora, "bob@a.test").is_ok());
        assert_eq!(may_manage(&dora, "bob@b.test").unwrap_err().status, 403);
        // A login that is no address belongs to no domain: administrators only.
        assert_eq!(may_manage(&dora, "relayhost").unwrap_err().status, 403);
        let admin = Principal {
            role: Role::Admin,
            ..dora.clone()
        };
        assert!(may_manage(&admin, "relayhost").is_ok());
        let jane = Principal {
            role: Role::User,
            ..dora
        };
        assert!(may_manage(&jane, "bob@a.test").is_err());
    }
}
