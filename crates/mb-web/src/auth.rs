//! Who a request acts as: web logins (session cookies with a CSRF token), API keys
//! (`Authorization: Bearer`), both checked by mb-rpcd's `WebAccounts` service, and the
//! routes that log in and out and manage accounts and keys.
//!
//! For `lib.rs`/`api/mod.rs` (C1): merge [`routes`] (an `OpenApiRouter<AppState>` with
//! absolute `/api/v1/...` paths, like `status::routes`) into `api::routes()`, and layer
//! [`authenticate`] with `from_fn_with_state(state.clone(), auth::authenticate)` just
//! outside `access::local_admin` (so it runs first: a request that brings credentials is
//! never taken for the local administrator).
//!
//! For the API areas: [`require_admin`], [`require_domain`] and [`require_address`] say
//! whether a principal may touch something; [`Principal::sees_address`] filters lists.

use std::net::IpAddr;

use axum::Json;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use mb_proto::v1::web_accounts_client::WebAccountsClient;
use mb_proto::v1::{
    WebAccount, WebAccountCreateRequest, WebAccountDeleteRequest, WebAccountListRequest, WebApiKey,
    WebAuthenticateRequest, WebKeyCreateRequest, WebKeyListRequest, WebKeyRevokeRequest,
    WebLoginOutcome, WebLoginRequest, WebLogoutRequest, WebPrincipal, WebRole,
    WebSetPasswordRequest, WebSetRoleRequest, WebTotpRequest, web_authenticate_request::Credential,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::Signed;
use crate::peer::Peer;
use crate::problem::{CONTENT_TYPE, Problem};
use crate::state::AppState;

/// The session cookie on HTTPS: `__Host-` makes browsers refuse it from plain HTTP, for
/// another path or with a Domain, so a sibling host cannot plant one.
pub const HOST_COOKIE: &str = "__Host-mb_session";
/// The session cookie elsewhere (the socket without `X-Forwarded-Proto: https`).
pub const COOKIE: &str = "mb_session";
/// The header every state-changing request of a session must carry.
pub const CSRF_HEADER: &str = "x-csrf-token";

const LOGIN_PATH: &str = "/api/v1/auth/login";
const RPCD: &str = "mb-rpcd";

/// Who a request acts as, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Principal {
    /// The account's name, `key:ID` for an API key, `local:USER` for root or mb-web's
    /// own user on the socket.
    pub name: String,
    pub role: Role,
    /// A domain admin's domains (lowercase).
    pub domains: Vec<String>,
    /// A user's quarantine addresses (lowercase).
    pub addresses: Vec<String>,
}

/// What a principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Everything about its domains: their quarantine, log and user accounts.
    DomainAdmin,
    /// Its own quarantine.
    User,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::DomainAdmin => "domain-admin",
            Role::User => "user",
        }
    }

    fn from_wire(n: i32) -> Option<Role> {
        match WebRole::try_from(n) {
            Ok(WebRole::Admin) => Some(Role::Admin),
            Ok(WebRole::DomainAdmin) => Some(Role::DomainAdmin),
            Ok(WebRole::User) => Some(Role::User),
            _ => None,
        }
    }

    fn wire(self) -> i32 {
        match self {
            Role::Admin => WebRole::Admin as i32,
            Role::DomainAdmin => WebRole::DomainAdmin as i32,
            Role::User => WebRole::User as i32,
        }
    }
}

impl Principal {
    pub(crate) fn from_wire(p: WebPrincipal) -> Result<Principal, Problem> {
        Ok(Principal {
            role: Role::from_wire(p.role)
                .ok_or_else(|| Problem::internal("mb-rpcd gave a principal without a role"))?,
            name: p.name,
            domains: p.domains,
            addresses: p.addresses,
        })
    }

    /// Whether the principal may see mail to or from `address`: an admin all, a domain
    /// admin its domains' addresses, a user its own.
    pub fn sees_address(&self, address: &str) -> bool {
        let a = address.trim().to_ascii_lowercase();
        match self.role {
            Role::Admin => true,
            Role::DomainAdmin => a
                .rsplit_once('@')
                .is_some_and(|(_, d)| self.domains.iter().any(|x| *x == d)),
            Role::User => self.addresses.contains(&a),
        }
    }

    /// Whether the principal may act on a whole domain.
    pub fn sees_domain(&self, domain: &str) -> bool {
        let d = domain.trim().trim_end_matches('.').to_ascii_lowercase();
        match self.role {
            Role::Admin => true,
            Role::DomainAdmin => self.domains.contains(&d),
            Role::User => false,
        }
    }
}

/// 403 unless `p` is an administrator.
pub fn require_admin(p: &Principal) -> Result<(), Problem> {
    if p.role == Role::Admin {
        Ok(())
    } else {
        Err(Problem::forbidden(format!(
            "{} is not an administrator",
            p.name
        )))
    }
}

/// 403 unless `p` may act on `domain` (an admin, or a domain admin of it).
pub fn require_domain(p: &Principal, domain: &str) -> Result<(), Problem> {
    if p.sees_domain(domain) {
        Ok(())
    } else {
        Err(Problem::forbidden(format!(
            "{} may not act on the domain {}",
            p.name,
            domain.trim()
        )))
    }
}

/// 403 unless `p` may act on mail of `address` (see [`Principal::sees_address`]).
pub fn require_address(p: &Principal, address: &str) -> Result<(), Problem> {
    if p.sees_address(address) {
        Ok(())
    } else {
        Err(Problem::forbidden(format!(
            "{} may not act on mail of {}",
            p.name,
            address.trim()
        )))
    }
}

/// A session's CSRF token, beside the principal in the request's extensions.
#[derive(Debug, Clone)]
pub struct SessionToken {
    pub csrf: String,
}

/// Middleware: a bearer key or a session cookie becomes a [`Principal`] in the
/// request's extensions; a credential that is not good is 401 at once, and a session's
/// state-changing request without its CSRF token is 403. A request with no credential
/// goes on without a principal (public routes; the local administrator rule).
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let headers = req.headers();
    let client_ip = req
        .extensions()
        .get::<Peer>()
        .and_then(Peer::client_ip)
        .map(|ip: IpAddr| ip.to_string())
        .unwrap_or_default();
    let credential = match bearer(headers) {
        Some(Ok(key)) => Some(Credential::ApiKey(key)),
        Some(Err(p)) => return p.into_response(),
        // Logging in with a stale cookie must work: the login path ignores it.
        None if req.uri().path() == LOGIN_PATH || req.uri().path() == crate::ui::LOGIN => None,
        None => session_cookie(headers).map(Credential::SessionId),
    };
    let Some(credential) = credential else {
        return next.run(req).await;
    };
    let is_session = matches!(credential, Credential::SessionId(_));
    let asked = WebAuthenticateRequest {
        credential: Some(credential),
        client_ip,
    };
    let answer = state
        .call(RPCD, |ch| async move {
            WebAccountsClient::new(ch).authenticate(asked).await
        })
        .await;
    let answer = match answer {
        Ok(a) => a,
        Err(p) if p.status == 401 && is_session => {
            // Tell the browser to forget the dead session (a page of the web interface
            // sends it to the login form instead of showing a problem document).
            let mut resp = if crate::ui::is_page(req.uri().path()) {
                crate::ui::to_login(req.uri())
            } else {
                p.into_response()
            };
            for c in [clear_cookie(HOST_COOKIE), clear_cookie(COOKIE)] {
                resp.headers_mut().append(header::SET_COOKIE, c);
            }
            return resp;
        }
        Err(p) => return p.into_response(),
    };
    let principal = match answer.principal.map(Principal::from_wire) {
        Some(Ok(p)) => p,
        Some(Err(p)) => return p.into_response(),
        None => return Problem::internal("mb-rpcd gave no principal").into_response(),
    };
    if is_session {
        let safe = matches!(
            *req.method(),
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        );
        let sent = req
            .headers()
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        // The web interface's forms carry the token in a form field, which
        // `ui::csrf_guard` checks for every page route (an HTML form cannot send a
        // header).
        let form = crate::ui::is_page(req.uri().path());
        if !safe && !form && (answer.csrf_token.is_empty() || !same(sent, &answer.csrf_token)) {
            return Problem::forbidden(format!(
                "a state-changing request of a session needs the session's CSRF token in the {CSRF_HEADER} header (from the login answer or GET /api/v1/auth/me)"
            ))
            .into_response();
        }
        req.extensions_mut().insert(SessionToken {
            csrf: answer.csrf_token,
        });
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// The bearer token of `Authorization`, if any; another scheme is refused rather than
/// ignored, so a client that meant to authenticate hears why it did not.
fn bearer(headers: &HeaderMap) -> Option<Result<String, Problem>> {
    let value = headers.get(header::AUTHORIZATION)?;
    let text = value.to_str().unwrap_or_default().trim();
    let parsed = text
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim().to_string())
        .filter(|k| !k.is_empty());
    Some(
        parsed.ok_or_else(|| {
            Problem::unauthorized("send an API key as \"Authorization: Bearer KEY\"")
        }),
    )
}

/// The session cookie's value (the `__Host-` one first).
pub(crate) fn session_cookie(headers: &HeaderMap) -> Option<String> {
    let mut plain = None;
    for value in headers.get_all(header::COOKIE) {
        for pair in value.to_str().unwrap_or_default().split(';') {
            let Some((name, v)) = pair.trim().split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"');
            if v.is_empty() {
                continue;
            }
            if name == HOST_COOKIE {
                return Some(v.to_string());
            }
            if name == COOKIE {
                plain = Some(v.to_string());
            }
        }
    }
    plain
}

pub(crate) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

pub(crate) fn cookie(name: &str, value: &str, max_age: i64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; Secure; SameSite=Strict"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

pub(crate) fn clear_cookie(name: &str) -> HeaderValue {
    cookie(name, "", 0)
}

/// The connection as the login route needs it: whether the browser came over HTTPS
/// (directly, or through nginx saying so), and the client's address.
pub(crate) struct Conn {
    pub(crate) https: bool,
    pub(crate) client_ip: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Conn {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Problem> {
        let peer = parts.extensions.get::<Peer>();
        let https = match peer {
            Some(Peer::Remote { tls, .. }) => *tls,
            Some(Peer::Local { .. }) => parts
                .headers
                .get("x-forwarded-proto")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https")),
            None => false,
        };
        Ok(Conn {
            https,
            client_ip: peer
                .and_then(Peer::client_ip)
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
        })
    }
}

/// The routes of this module, for `api::routes()`.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(logout))
        .routes(routes!(me))
        .routes(routes!(list_accounts, create_account))
        .routes(routes!(delete_account))
        .routes(routes!(set_password))
        .routes(routes!(set_role))
        .routes(routes!(set_totp))
        .routes(routes!(list_keys, create_key))
        .routes(routes!(revoke_key))
}

/// A login.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct LoginBody {
    pub name: String,
    pub password: String,
    /// The six-digit TOTP code, when the account has (or is enrolling) a second factor.
    #[serde(default)]
    pub totp: String,
}

/// A session: the cookie carries its id; `csrf_token` goes in `X-CSRF-Token` on every
/// POST, PUT, PATCH and DELETE.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    pub principal: Principal,
    /// Empty for an API key or the local administrator.
    pub csrf_token: String,
    /// Unix seconds; 0 when it does not expire.
    pub expires_at: i64,
}

/// A refused login: a problem document with, for a first login that must enrol a
/// second factor, the secret to add to an authenticator app.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LoginRefusal {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// `urn:mailborder:totp-enrol` only: the secret (base32) and its otpauth:// URI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totp_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otpauth_uri: Option<String>,
}

fn refusal(
    status: StatusCode,
    kind: &str,
    detail: &str,
    enrol: Option<(String, String)>,
    retry_after: Option<u64>,
) -> Response {
    let (totp_secret, otpauth_uri) = enrol.unzip();
    let body = LoginRefusal {
        kind: kind.into(),
        title: status.canonical_reason().unwrap_or("Error").into(),
        status: status.as_u16(),
        detail: detail.into(),
        totp_secret,
        otpauth_uri,
    };
    let mut resp = (status, Json(body)).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// Logs in with a password (and a TOTP code): a session cookie
/// (`HttpOnly; Secure; SameSite=Strict`, `__Host-mb_session` over HTTPS) and its CSRF
/// token.
#[utoipa::path(
    post,
    path = "/api/v1/auth/login",
    tag = "auth",
    request_body = LoginBody,
    responses(
        (status = 200, description = "Logged in; the session cookie is set", body = SessionView),
        (status = 401, description = "Wrong name, password or code (`about:blank`), a code is needed (`urn:mailborder:totp-required`), or a second factor must be enrolled first (`urn:mailborder:totp-enrol`, with the secret)", body = LoginRefusal, content_type = "application/problem+json"),
        (status = 429, description = "The account is locked after too many failures (`urn:mailborder:locked-out`, with Retry-After)", body = LoginRefusal, content_type = "application/problem+json")
    )
)]
async fn login(State(state): State<AppState>, conn: Conn, Json(body): Json<LoginBody>) -> Response {
    let asked = WebLoginRequest {
        name: body.name,
        password: body.password,
        totp: body.totp,
        client_ip: conn.client_ip,
    };
    let r = match state
        .call(RPCD, |ch| async move {
            WebAccountsClient::new(ch).login(asked).await
        })
        .await
    {
        Ok(r) => r,
        Err(p) => return p.into_response(),
    };
    match WebLoginOutcome::try_from(r.outcome) {
        Ok(WebLoginOutcome::WebLoginOk) => {
            let principal = match r.principal.map(Principal::from_wire) {
                Some(Ok(p)) => p,
                Some(Err(p)) => return p.into_response(),
                None => return Problem::internal("mb-rpcd gave no principal").into_response(),
            };
            let max_age = (r.expires_at_unix - now()).max(0);
            let name = if conn.https { HOST_COOKIE } else { COOKIE };
            let mut resp = Json(SessionView {
                principal,
                csrf_token: r.csrf_token,
                expires_at: r.expires_at_unix,
            })
            .into_response();
            resp.headers_mut()
                .append(header::SET_COOKIE, cookie(name, &r.session_id, max_age));
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Ok(WebLoginOutcome::WebLoginTotpRequired) => refusal(
            StatusCode::UNAUTHORIZED,
            "urn:mailborder:totp-required",
            "a TOTP code is required: send it as \"totp\" with the name and password",
            None,
            None,
        ),
        Ok(WebLoginOutcome::WebLoginTotpEnrol) => {
            let e = r.enrol.unwrap_or_default();
            refusal(
                StatusCode::UNAUTHORIZED,
                "urn:mailborder:totp-enrol",
                "this account must have a second factor: add the secret to an authenticator app, then log in again with a code from it as \"totp\"",
                Some((e.base32, e.uri)),
                None,
            )
        }
        Ok(WebLoginOutcome::WebLoginLockedOut) => refusal(
            StatusCode::TOO_MANY_REQUESTS,
            "urn:mailborder:locked-out",
            &format!(
                "too many failed logins: the account is locked for {}s",
                r.retry_after_seconds
            ),
            None,
            Some(r.retry_after_seconds),
        ),
        _ => refusal(
            StatusCode::UNAUTHORIZED,
            "about:blank",
            "wrong name, password or code",
            None,
            None,
        ),
    }
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

/// Ends the session of the cookie and clears the cookie.
#[utoipa::path(
    post,
    path = "/api/v1/auth/logout",
    tag = "auth",
    security(("session" = [])),
    responses(
        (status = 204, description = "Logged out; the cookie is cleared"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Without the session's X-CSRF-Token", body = Problem, content_type = "application/problem+json")
    )
)]
async fn logout(
    State(state): State<AppState>,
    _who: Signed,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    if let Some(id) = session_cookie(&headers) {
        state
            .call(RPCD, |ch| async move {
                WebAccountsClient::new(ch)
                    .logout(WebLogoutRequest { session_id: id })
                    .await
            })
            .await?;
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    for c in [clear_cookie(HOST_COOKIE), clear_cookie(COOKIE)] {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    Ok(resp)
}

/// Who the request acts as, with the session's CSRF token (after a page reload).
#[utoipa::path(
    get,
    path = "/api/v1/auth/me",
    tag = "auth",
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The caller", body = SessionView),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json")
    )
)]
async fn me(Signed(p): Signed, parts: Token) -> Json<SessionView> {
    Json(SessionView {
        principal: p,
        csrf_token: parts.0.map(|t| t.csrf).unwrap_or_default(),
        expires_at: 0,
    })
}

/// The session's token, when the request came with a session.
struct Token(Option<SessionToken>);

impl<S: Send + Sync> FromRequestParts<S> for Token {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Problem> {
        Ok(Token(parts.extensions.get::<SessionToken>().cloned()))
    }
}

/// A web account as the API shows it (never its password or TOTP secret).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AccountView {
    pub name: String,
    pub role: Role,
    pub domains: Vec<String>,
    pub addresses: Vec<String>,
    /// The SMTP account whose login and aliases are a user's addresses too.
    pub smtp_user: String,
    pub totp_enrolled: bool,
    /// Unix seconds; 0 when not locked.
    pub locked_until: i64,
    pub created_at: i64,
    pub created_by: String,
    pub updated_at: i64,
    /// 0: never.
    pub last_login: i64,
}

impl AccountView {
    fn from_wire(a: WebAccount) -> Option<AccountView> {
        Some(AccountView {
            role: Role::from_wire(a.role)?,
            name: a.name,
            domains: a.domains,
            addresses: a.addresses,
            smtp_user: a.smtp_user,
            totp_enrolled: a.totp_enrolled,
            locked_until: a.locked_until_unix,
            created_at: a.created_at_unix,
            created_by: a.created_by,
            updated_at: a.updated_at_unix,
            last_login: a.last_login_unix,
        })
    }

    /// Whether `p` may see and manage this account: an admin every one, a domain admin
    /// itself and the users whose addresses are all in its domains, a user itself.
    fn managed_by(&self, p: &Principal) -> bool {
        match p.role {
            Role::Admin => true,
            _ if self.name == p.name => true,
            Role::DomainAdmin => {
                self.role == Role::User
                    && self.smtp_user.is_empty()
                    && !self.addresses.is_empty()
                    && self.addresses.iter().all(|a| p.sees_address(a))
            }
            Role::User => false,
        }
    }
}

/// A new web account.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct AccountBody {
    pub name: String,
    pub password: String,
    pub role: Role,
    /// A domain admin's domains.
    #[serde(default)]
    pub domains: Vec<String>,
    /// A user's addresses.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// A user's SMTP account (its login and aliases become the user's addresses).
    #[serde(default)]
    pub smtp_user: String,
    /// Enrol a TOTP secret now (shown once in the answer).
    #[serde(default)]
    pub totp: bool,
}

/// A created account, with its TOTP secret when one was enrolled.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedAccount {
    pub account: AccountView,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totp: Option<TotpView>,
}

/// A TOTP secret, shown once.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TotpView {
    /// Base32, for typing into an authenticator app.
    pub secret: String,
    /// The otpauth:// URI (a QR code of it is what apps scan).
    pub uri: String,
}

async fn all_accounts(state: &AppState) -> Result<Vec<AccountView>, Problem> {
    let r = state
        .call(RPCD, |ch| async move {
            WebAccountsClient::new(ch)
                .list(WebAccountListRequest {})
                .await
        })
        .await?;
    Ok(r.accounts
        .into_iter()
        .filter_map(AccountView::from_wire)
        .collect())
}

/// An account `p` manages, or 404 (another domain's accounts do not exist for it).
async fn managed(state: &AppState, p: &Principal, name: &str) -> Result<AccountView, Problem> {
    let name = name.trim().to_ascii_lowercase();
    all_accounts(state)
        .await?
        .into_iter()
        .find(|a| a.name == name && a.managed_by(p))
        .ok_or_else(|| Problem::not_found(format!("no web account {name}")))
}

/// The web accounts the caller manages: every one for an admin, the users of its
/// domains for a domain admin.
#[utoipa::path(
    get,
    path = "/api/v1/accounts",
    tag = "auth",
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The accounts, by name", body = Vec<AccountView>),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A user", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn list_accounts(
    State(state): State<AppState>,
    Signed(p): Signed,
) -> Result<Json<Vec<AccountView>>, Problem> {
    if p.role == Role::User {
        return Err(Problem::forbidden(format!(
            "{} may not manage web accounts",
            p.name
        )));
    }
    let mut list = all_accounts(&state).await?;
    list.retain(|a| a.managed_by(&p));
    Ok(Json(list))
}

/// Creates a web account. A domain admin may create users of its domains only.
#[utoipa::path(
    post,
    path = "/api/v1/accounts",
    tag = "auth",
    security(("api_key" = []), ("session" = [])),
    request_body = AccountBody,
    responses(
        (status = 201, description = "Created", body = CreatedAccount),
        (status = 400, description = "A bad name, password, role or scope", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not allowed to create this account", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The name is taken", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn create_account(
    State(state): State<AppState>,
    Signed(p): Signed,
    Json(body): Json<AccountBody>,
) -> Result<(StatusCode, Json<CreatedAccount>), Problem> {
    match p.role {
        Role::Admin => {}
        Role::DomainAdmin => {
            if body.role != Role::User || !body.smtp_user.is_empty() || body.addresses.is_empty() {
                return Err(Problem::forbidden(
                    "a domain admin may create only users with addresses of its domains",
                ));
            }
            for a in &body.addresses {
                require_address(&p, a)?;
            }
        }
        Role::User => {
            return Err(Problem::forbidden(format!(
                "{} may not manage web accounts",
                p.name
            )));
        }
    }
    let asked = WebAccountCreateRequest {
        name: body.name,
        password: body.password,
        role: body.role.wire(),
        domains: body.domains,
        addresses: body.addresses,
        smtp_user: body.smtp_user,
        totp: body.totp,
        actor: p.name.clone(),
    };
    let r = state
        .call(RPCD, |ch| async move {
            WebAccountsClient::new(ch).create(asked).await
        })
        .await?;
    let account = r
        .account
        .and_then(AccountView::from_wire)
        .ok_or_else(|| Problem::internal("mb-rpcd gave no account"))?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedAccount {
            account,
            totp: r.totp.map(|t| TotpView {
                secret: t.base32,
                uri: t.uri,
            }),
        }),
    ))
}

/// Deletes a web account and ends its sessions.
#[utoipa::path(
    delete,
    path = "/api/v1/accounts/{name}",
    tag = "auth",
    security(("api_key" = []), ("session" = [])),
    params(("name" = String, Path, description = "The account's name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A user", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such account (among those the caller manages)", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn delete_account(
    State(state): State<AppState>,
    Signed(p): Signed,
    Path(name): Path<String>,
) -> Result<StatusCode, Problem> {
    if p.role == Role::User {
        return Err(Problem::forbidden(format!(
            "{} may not manage web accounts",
            p.name
        )));
    }
    let a = managed(&state, &p, &name).await?;
    let asked = WebAccountDeleteRequest {
        name: a.name,
        actor: p.name.clone(),
    };
    state
        .call(RPCD, |ch| async move {
            WebAccountsClient::new(ch).delete(asked).await
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A new password.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct PasswordBody {
    pub password: String,
}

/// Sets an account's password (its own for anyone; others' for those who manage them);
/// ends its sessions and clears a lockout.
#[utoipa::path(
    post,
    path = "/api/v1/accounts/{name}/password",
    tag = "auth",
    security(("api_key" = []), ("session" = [])),
    params(("name" = String, Path, description = "The account's name")),
    request_body = PasswordBody,
    responses(
        (status = 200, description = "Changed", body = AccountView),
        (status = 400, description = "A weak password", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such account (among those the caller manages)", body = Problem, content_type = "application/problem+json")
    )
)]
async fn set_password(
    State(state): State<AppState>,
    Signed(p): Signed,
    Path(name): Path<String>,
    Json(body): Json<PasswordBody>,
) -> Result<Json<AccountView>, Problem> {
    let a = managed(&state, &p, &name).await?;
    let asked = WebSetPasswordRequest {
        name: a.name,
        password: body.password,
        actor: p.name.clone(),
    };
    let r = state
        .call(RPCD, |ch| async move {
            WebAccountsClient::new(ch).set_password(asked).await
        })
        .await?;
    AccountView::from_wire(r)
        .map(Json)
        .ok_or_else(|| Problem::internal("mb-rpcd gave no account"))
}

/// A role and its scope.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct RoleBody {
    pub role: Role,
    #[serde(default)]
    pub domains: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub smtp_user: String,
}

/// Changes an account's role and scope (administrators only); running sessions take
/// the new role at their next request.
#[utoipa::path(
    put,
    path = "/api/v1/accounts/{name}/role",
    tag = "auth",
    security(("api_key" = []), ("session" = [])),
    params(("name" = String, Path, description = "The account's name")),
    request_body = RoleBody,
    responses(
        (status = 200, description = "Changed", body = AccountView),
        (status = 400, description = "A role without a fitting scope", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such account", body = Problem, content_type = "application/problem+json")
    )
)]
async fn set_role(
    State(state): State<AppState>,
    Signed(p): Signed,
    Path(name): Path<String>,
    Json(body): Json<RoleBody>,
) -> Result<Json<AccountView>, Problem> {
    require_admin(&p)?;
    let asked = WebSetRoleRequest {
        name,
        role: body.role.wire(),
        domains: body.domains,
        addresses: body.addresses,
        smtp_user: body.smtp_user,
        actor: p.name.clone(),
    };
    let r = state
        .call(RPCD, |ch| async move {
            WebAccountsClient::new(ch).set_role(asked).await
        })
        .await?;
    AccountView::from_wire(r)
        .map(Json)
        .ok_or_else(|| Problem::internal("mb-rpcd gave no account"))
}

/// Enrol a new TOTP secret, or remove the second factor.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct TotpBody {
    #[serde(default)]
    pub remove: bool,
}

/// A TOTP change: the account, and the new secret (shown once) unless removed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TotpChange {
    pub account: AccountView,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totp: Option<TotpView>,
}

/// Enrols a new TOTP secret for an account (its own, or one the caller manages), or
/// removes its second factor.
#[utoipa::path(
    post,
    path = "/api/v1/accounts/{name}/totp",
    tag = "auth",
    security(("api_key" = []), ("session" = [])),
    params(("name" = String, Path, description = "The account's name")),
    request_body = TotpBody,
    responses(
        (status = 200, description = "Changed", body = TotpChange),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such account (among those the caller manages)", body = Problem, content_type = "application/problem+json")
    )
)]
async fn set_totp(
    State(state): State<AppState>,
    Signed(p): Signed,
    Path(name): Path<String>,
    Json(body): Json<TotpBody>,
) -> Result<Json<TotpChange>, Problem> {
    let a = managed(&state, &p, &name).await?;
    let asked = WebTotpRequest {
        name: a.name,
        remove: body.remove,
        actor: p.name.clone(),
    };
    let r = state
        .call(RPCD, |ch| async move {
            WebAccountsClient::new(ch).enrol_totp(asked).await
        })
        .await?;
    Ok(Json(TotpChange {
        account: r
            .account
            .and_then(AccountView::from_wire)
            .ok_or_else(|| Problem::internal("mb-rpcd gave no account"))?,
        totp: r.secret.map(|t| TotpView {
            secret: t.base32,
            uri: t.uri,
        }),
    }))
}

/// An API key as the API shows it (never its secret, except once at creation).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeyView {
    pub id: String,
    pub role: Role,
    pub domains: Vec<String>,
    pub addresses: Vec<String>,
    pub description: String,
    pub created_at: i64,
    pub created_by: String,
    /// Unix seconds; 0: never.
    pub expires_at: i64,
    /// 0: not revoked.
    pub revoked_at: i64,
    /// 0: never used.
    pub last_used: i64,
}

impl KeyView {
    fn from_wire(k: WebApiKey) -> Option<KeyView> {
        Some(KeyView {
            role: Role::from_wire(k.role)?,
            id: k.id,
            domains: k.domains,
            addresses: k.addresses,
            description: k.description,
            created_at: k.created_at_unix,
            created_by: k.created_by,
            expires_at: k.expires_at_unix,
            revoked_at: k.revoked_at_unix,
            last_used: k.last_used_unix,
        })
    }
}

/// A new API key.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct KeyBody {
    pub role: Role,
    #[serde(default)]
    pub domains: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    /// How long it lasts (`90d`, `12h`), or `never`.
    pub expires: String,
    #[serde(default)]
    pub description: String,
}

/// A created key with its secret, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedKey {
    pub key: KeyView,
    /// `mbk_ID_SECRET`, for `Authorization: Bearer`.
    pub secret: String,
}

/// Creates an API key (administrators only).
#[utoipa::path(
    post,
    path = "/api/v1/keys",
    tag = "auth",
    security(("api_key" = []), ("session" = [])),
    request_body = KeyBody,
    responses(
        (status = 201, description = "Created; the secret is shown this once", body = CreatedKey),
        (status = 400, description = "A bad role, scope or expiry", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json")
    )
)]
async fn create_key(
    State(state): State<AppState>,
    Signed(p): Signed,
    Json(body): Json<KeyBody>,
) -> Result<(StatusCode, Json<CreatedKey>), Problem> {
    require_admin(&p)?;
    let expires_at = expiry(&body.expires, now())?;
    let asked = WebKeyCreateRequest {
        role: body.role.wire(),
        domains: body.domains,
        addresses: body.addresses,
        expires_at_unix: expires_at,
        description: body.description,
        actor: p.name.clone(),
    };
    let r = state
        .call(RPCD, |ch| async move {
            WebAccountsClient::new(ch).create_key(asked).await
        })
        .await?;
    let key = r
        .key
        .and_then(KeyView::from_wire)
        .ok_or_else(|| Problem::internal("mb-rpcd gave no key"))?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            key,
            secret: r.secret,
        }),
    ))
}

/// `90d` from `now`, or 0 for `never`.
pub fn expiry(text: &str, now: i64) -> Result<i64, Problem> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("never") {
        return Ok(0);
    }
    let d = mb_core::value::parse_duration(t).map_err(|e| {
        Problem::bad_request(format!(
            "invalid expiry {t:?} ({e}): give a duration such as 90d or 12h, or never"
        ))
    })?;
    if d.is_zero() {
        return Err(Problem::bad_request(
            "the expiry must be in the future: give a duration such as 90d, or never",
        ));
    }
    Ok(now.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)))
}

/// The API keys (administrators only), revoked ones included.
#[utoipa::path(
    get,
    path = "/api/v1/keys",
    tag = "auth",
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The keys, oldest first", body = Vec<KeyView>),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json")
    )
)]
async fn list_keys(
    State(state): State<AppState>,
    Signed(p): Signed,
) -> Result<Json<Vec<KeyView>>, Problem> {
    require_admin(&p)?;
    let r = state
        .call(RPCD, |ch| async move {
            WebAccountsClient::new(ch)
                .list_keys(WebKeyListRequest {})
                .await
        })
        .await?;
    Ok(Json(
        r.keys.into_iter().filter_map(KeyView::from_wire).collect(),
    ))
}

/// Revokes an API key (administrators only); it stops working at once.
#[utoipa::path(
    delete,
    path = "/api/v1/keys/{id}",
    tag = "auth",
    security(("api_key" = []), ("session" = [])),
    params(("id" = String, Path, description = "The key's id (the part after mbk_)")),
    responses(
        (status = 200, description = "Revoked", body = KeyView),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such key", body = Problem, content_type = "application/problem+json")
    )
)]
async fn revoke_key(
    State(state): State<AppState>,
    Signed(p): Signed,
    Path(id): Path<String>,
) -> Result<Json<KeyView>, Problem> {
    require_admin(&p)?;
    let asked = WebKeyRevokeRequest {
        id,
        actor: p.name.clone(),
    };
    let r = state
        .call(RPCD, |ch| async move {
            WebAccountsClient::new(ch).revoke_key(asked).await
        })
        .await?;
    KeyView::from_wire(r)
        .map(Json)
        .ok_or_else(|| Problem::internal("mb-rpcd gave no key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(role: Role, scope: &[&str]) -> Principal {
        let list: Vec<String> = scope.iter().map(|s| s.to_string()).collect();
        Principal {
            name: "p".into(),
            role,
            domains: if role == Role::DomainAdmin {
                list.clone()
            } else {
                Vec::new()
            },
            addresses: if role == Role::User { list } else { Vec::new() },
        }
    }

    #[test]
    fn each_role_sees_its_own_scope() {
        let admin = principal(Role::Admin, &[]);
        let dom = principal(Role::DomainAdmin, &["a.test"]);
        let user = principal(Role::User, &["jane@a.test"]);
        for (p, address, domain, sees) in [
            (&admin, "x@b.test", "b.test", (true, true)),
            (&dom, "Jane@A.test", "A.test.", (true, true)),
            (&dom, "x@b.test", "b.test", (false, false)),
            // A subdomain is another domain.
            (&dom, "x@sub.a.test", "sub.a.test", (false, false)),
            (&user, "jane@a.test", "a.test", (true, false)),
            (&user, "john@a.test", "a.test", (false, false)),
        ] {
            assert_eq!(
                (p.sees_address(address), p.sees_domain(domain)),
                sees,
                "{p:?} {address} {domain}"
            );
        }
        assert_eq!(require_domain(&dom, "b.test").unwrap_err().status, 403);
        assert!(require_domain(&dom, "a.test").is_ok());
        assert_eq!(require_admin(&dom).unwrap_err().status, 403);
        assert_eq!(
            require_address(&user, "john@a.test").unwrap_err().status,
            403
        );
    }

    #[test]
    fn credentials_are_read_from_bearer_and_cookies() {
        let mut h = HeaderMap::new();
        assert!(bearer(&h).is_none());
        h.insert(header::AUTHORIZATION, "Bearer mbk_1_2".parse().unwrap());
        assert_eq!(bearer(&h).unwrap().unwrap(), "mbk_1_2");
        h.insert(header::AUTHORIZATION, "Basic YTpi".parse().unwrap());
        assert_eq!(bearer(&h).unwrap().unwrap_err().status, 401);
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            "theme=dark; mb_session=plain".parse().unwrap(),
        );
        assert_eq!(session_cookie(&h).as_deref(), Some("plain"));
        h.append(header::COOKIE, "__Host-mb_session=hosted".parse().unwrap());
        assert_eq!(session_cookie(&h).as_deref(), Some("hosted"));
        let c = cookie(HOST_COOKIE, "abc", 60);
        assert_eq!(
            c.to_str().unwrap(),
            "__Host-mb_session=abc; Path=/; Max-Age=60; HttpOnly; Secure; SameSite=Strict"
        );
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }

    #[test]
    fn key_expiry_is_a_duration_or_never() {
        assert_eq!(expiry("90d", 1000).unwrap(), 1000 + 90 * 86_400);
        assert_eq!(expiry("never", 1000).unwrap(), 0);
        assert_eq!(expiry("soon", 1000).unwrap_err().status, 400);
        assert_eq!(expiry("0s", 1000).unwrap_err().status, 400);
    }

    #[test]
    fn a_domain_admin_manages_the_users_of_its_domains_only() {
        let dom = principal(Role::DomainAdmin, &["a.test"]);
        let account = |name: &str, role: Role, addresses: &[&str]| AccountView {
            name: name.into(),
            role,
            domains: Vec::new(),
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            smtp_user: String::new(),
            totp_enrolled: false,
            locked_until: 0,
            created_at: 0,
            created_by: String::new(),
            updated_at: 0,
            last_login: 0,
        };
        assert!(account("jane", Role::User, &["jane@a.test"]).managed_by(&dom));
        assert!(!account("mixed", Role::User, &["m@a.test", "m@b.test"]).managed_by(&dom));
        assert!(!account("bob", Role::User, &["bob@b.test"]).managed_by(&dom));
        assert!(!account("boss", Role::Admin, &[]).managed_by(&dom));
        assert!(account("p", Role::DomainAdmin, &[]).managed_by(&dom));
    }
}
