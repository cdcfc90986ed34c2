//! The web interface: server-rendered HTML pages (maud) under `/ui/`, for browsers.
//!
//! Every page calls the same code as the JSON API (`crate::api::*` handlers, or the
//! daemons' gRPC services through `AppState`), so a page can do nothing the API would
//! refuse the same principal. Every form works without JavaScript, and there is no
//! script at all: the CSP of `layers::security_headers` allows none inline, and the one
//! stylesheet is served from the binary ([`STYLE`]).
//!
//! Framework for the page modules (`dashboard`, `tracking`, `queue`, `config`, `admin`,
//! and the quarantine, portal and digest pages):
//! - take [`Ui`] (anyone logged in), [`Staff`] (admins and domain admins; a `user` is
//!   sent to the portal) or [`AdminUi`] (administrators) as a handler argument: without
//!   a login the browser is sent to the login form and back;
//! - render with [`Ui::page`] (layout, navigation, the flash message) and escape every
//!   value through maud's `(value)` (never `PreEscaped` on message data);
//! - put [`Ui::csrf_field`] in every state-changing form: [`csrf_guard`] refuses a POST
//!   of a session without it, before the handler runs;
//! - answer a POST with [`done`] / [`failed`] (a redirect with a flash message).

pub mod admin;
pub mod config;
pub mod dashboard;
pub mod digest;
pub mod directory;
pub mod portal;
pub mod quarantine;
pub mod queue;
pub mod tracking;

use std::fmt::Write as _;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{Next, from_fn};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, html};
use mb_proto::v1::web_accounts_client::WebAccountsClient;
use mb_proto::v1::{WebLoginOutcome, WebLoginRequest, WebLogoutRequest};
use serde::Deserialize;

use crate::auth::{self, Conn, Principal, Role, SessionToken};
use crate::problem::Problem;
use crate::state::AppState;

/// The login form's path.
pub const LOGIN: &str = "/ui/login";
/// The users' portal (a `user` sees nothing else).
pub const PORTAL: &str = "/ui/portal";
/// The form field that carries the session's CSRF token.
pub const CSRF_FIELD: &str = "csrf";
/// The one stylesheet.
pub const STYLE: &str = include_str!("static/mb.css");
const STYLE_PATH: &str = "/ui/static/mb.css";
/// The flash message of the next page, set by a POST's redirect.
const FLASH_COOKIE: &str = "mb_flash";
/// The largest form body [`csrf_guard`] reads.
const MAX_FORM_BYTES: usize = 256 * 1024;

/// Whether `path` is a page of the web interface (not the API).
pub fn is_page(path: &str) -> bool {
    path == "/" || path == "/ui" || path.starts_with("/ui/")
}

/// Every route of the web interface, for `lib.rs`'s `app`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { see_other("/ui/") }))
        .route("/ui", get(|| async { see_other("/ui/") }))
        .route(LOGIN, get(login_form).post(login))
        .route("/ui/logout", post(logout))
        .route(STYLE_PATH, get(style))
        .merge(dashboard::routes())
        .merge(tracking::routes())
        .merge(queue::routes())
        .merge(config::routes())
        .merge(admin::routes())
        .merge(quarantine::routes())
        .merge(portal::routes())
        .merge(digest::routes())
        .merge(directory::routes())
        .layer(from_fn(csrf_guard))
}

/// A 303 to `to` (after a POST the browser GETs it).
pub fn see_other(to: &str) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// The login form, coming back to `uri` afterwards.
pub fn to_login(uri: &Uri) -> Response {
    let back = uri.path_and_query().map_or("/ui/", |p| p.as_str());
    let mut resp = see_other(&format!("{LOGIN}?next={}", percent(back)));
    for c in [
        auth::clear_cookie(auth::HOST_COOKIE),
        auth::clear_cookie(auth::COOKIE),
    ] {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    resp
}

/// Percent-encodes everything but unreserved characters (for a query value).
pub fn percent(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A `next` target that stays on this site's pages (no open redirect).
fn local_target(next: Option<&str>) -> Option<&str> {
    next.filter(|n| n.starts_with("/ui/") && !n.starts_with("/ui//") && !n.contains('\\'))
}

/// Who is looking at a page: the principal, the session's CSRF token (empty for the
/// local administrator on the socket, who has no session to forge), and the flash
/// message a redirect left.
pub struct Ui {
    pub who: Principal,
    pub csrf: String,
    pub flash: Option<Flash>,
}

/// Administrators and domain admins (a `user` is sent to the portal).
pub struct Staff(pub Ui);

/// Administrators only (a domain admin sees a 403 page).
pub struct AdminUi(pub Ui);

/// A message for the next page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flash {
    pub ok: bool,
    pub text: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Ui {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Response> {
        let Some(who) = parts.extensions.get::<Principal>().cloned() else {
            return Err(to_login(&parts.uri));
        };
        Ok(Ui {
            who,
            csrf: parts
                .extensions
                .get::<SessionToken>()
                .map(|t| t.csrf.clone())
                .unwrap_or_default(),
            flash: read_flash(&parts.headers),
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Staff {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        let ui = Ui::from_request_parts(parts, state).await?;
        if ui.who.role == Role::User {
            return Err(see_other(PORTAL));
        }
        Ok(Staff(ui))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for AdminUi {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        let Staff(ui) = Staff::from_request_parts(parts, state).await?;
        if ui.who.role != Role::Admin {
            let p = Problem::forbidden(format!("{} is not an administrator", ui.who.name));
            return Err(ui.problem(&p));
        }
        Ok(AdminUi(ui))
    }
}

/// The sections of the navigation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Dashboard,
    Tracking,
    Quarantine,
    Queue,
    Config,
    Policies,
    Access,
    SmtpAccounts,
    WebAccounts,
    Recipients,
    Dkim,
    Cluster,
    Portal,
    None,
}

const NAV: &[(Nav, &str, &str, bool)] = &[
    // (section, label, path, administrators only)
    (Nav::Dashboard, "Dashboard", "/ui/", false),
    (Nav::Tracking, "Tracking", "/ui/tracking", false),
    (Nav::Quarantine, "Quarantine", "/ui/quarantine", false),
    (Nav::Queue, "Queue", "/ui/queue", true),
    (Nav::Config, "Configuration", "/ui/config", true),
    (Nav::Policies, "Policies", "/ui/policies", true),
    (Nav::Access, "Bans & trusts", "/ui/access", true),
    (
        Nav::SmtpAccounts,
        "SMTP accounts",
        "/ui/smtp-accounts",
        false,
    ),
    (Nav::WebAccounts, "Web accounts", "/ui/accounts", false),
    (Nav::Recipients, "Recipients", "/ui/recipients", true),
    (Nav::Dkim, "DKIM", "/ui/dkim", true),
    (Nav::Cluster, "Cluster", "/ui/cluster", true),
];

impl Ui {
    /// The hidden field every state-changing form carries.
    pub fn csrf_field(&self) -> Markup {
        html! { input type="hidden" name=(CSRF_FIELD) value=(self.csrf); }
    }

    /// A page in the layout: navigation for the principal's role, the flash message,
    /// `body`. A flash message shown is cleared.
    pub fn page(&self, title: &str, nav: Nav, body: Markup) -> Response {
        self.page_with(StatusCode::OK, title, nav, body)
    }

    /// [`Ui::page`] with another status (a form shown again with its error: 400).
    pub fn page_with(&self, status: StatusCode, title: &str, nav: Nav, body: Markup) -> Response {
        let user = self.who.role == Role::User;
        let admin = self.who.role == Role::Admin;
        let markup = layout(
            title,
            html! {
                header.top {
                    span.brand { "Mailborder" }
                    nav {
                        @if user {
                            a.active[nav == Nav::Portal] href=(PORTAL) { "My quarantine" }
                        } @else {
                            @for (section, label, path, admin_only) in NAV {
                                @if admin || !admin_only {
                                    a.active[nav == *section] href=(path) { (label) }
                                }
                            }
                        }
                    }
                    form.logout method="post" action="/ui/logout" {
                        (self.csrf_field())
                        span.who { (self.who.name) " (" (self.who.role.as_str()) ")" }
                        button type="submit" { "Log out" }
                    }
                }
                main {
                    @if let Some(f) = &self.flash {
                        p.flash.ok[f.ok].error[!f.ok] role="status" { (f.text) }
                    }
                    h1 { (title) }
                    (body)
                }
            },
        );
        let mut resp = (status, html_response(markup)).into_response();
        if self.flash.is_some() {
            resp.headers_mut()
                .append(header::SET_COOKIE, flash_cookie("", 0));
        }
        resp
    }

    /// A problem as a page: its status and the daemon's words.
    pub fn problem(&self, p: &Problem) -> Response {
        self.page_with(
            p.status_code(),
            &p.title,
            Nav::None,
            html! { p.error { (p.detail.as_deref().unwrap_or(&p.title)) } },
        )
    }
}

/// The whole document around `body`.
pub(crate) fn layout(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Mailborder" }
                link rel="stylesheet" href=(STYLE_PATH);
                // No favicon to fetch (a 404 would be a console error).
                link rel="icon" href="data:,";
            }
            body { (body) }
        }
    }
}

pub(crate) fn html_response(markup: Markup) -> Response {
    let mut resp = Response::new(Body::from(markup.into_string()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

/// A 303 back to `to` with a success message.
pub fn done(to: &str, text: impl Into<String>) -> Response {
    with_flash(to, true, &text.into())
}

/// A 303 back to `to` with the problem's words.
pub fn failed(to: &str, p: &Problem) -> Response {
    with_flash(to, false, p.detail.as_deref().unwrap_or(&p.title))
}

fn with_flash(to: &str, ok: bool, text: &str) -> Response {
    let mut resp = see_other(to);
    let value = format!("{}{}", if ok { "o" } else { "e" }, hex(text));
    resp.headers_mut()
        .append(header::SET_COOKIE, flash_cookie(&value, 60));
    resp
}

fn flash_cookie(value: &str, max_age: i64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{FLASH_COOKIE}={value}; Path=/ui; Max-Age={max_age}; HttpOnly; Secure; SameSite=Strict"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Hex, so any text survives a cookie (and cannot inject attributes into it).
fn hex(text: &str) -> String {
    // Long messages are cut: a cookie is no place for a page of text.
    let mut cut = text.len().min(1500);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text[..cut].bytes().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(text: &str) -> Option<String> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

fn read_flash(headers: &HeaderMap) -> Option<Flash> {
    for value in headers.get_all(header::COOKIE) {
        for pair in value.to_str().unwrap_or_default().split(';') {
            let Some((name, v)) = pair.trim().split_once('=') else {
                continue;
            };
            if name != FLASH_COOKIE || v.is_empty() {
                continue;
            }
            let (kind, rest) = v.split_at(1);
            return Some(Flash {
                ok: kind == "o",
                text: unhex(rest)?,
            });
        }
    }
    None
}

/// Middleware for the page routes: a state-changing request must come from a page of
/// this site (`Sec-Fetch-Site`, `Origin`), and a session's must carry the session's
/// CSRF token in the form field [`CSRF_FIELD`]. Runs before the handler, so no page
/// can forget it.
pub async fn csrf_guard(req: Request, next: Next) -> Response {
    if matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    ) {
        return next.run(req).await;
    }
    if let Err(why) = same_site(req.headers(), req.uri()) {
        return refused(&why.to_string());
    }
    let Some(token) = req.extensions().get::<SessionToken>().cloned() else {
        // No session cookie: nothing ambient for a forged form to use (the login
        // form, the local administrator on the socket).
        return next.run(req).await;
    };
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM_BYTES).await else {
        return refused("the form is too large");
    };
    let sent = form_field(&bytes, CSRF_FIELD).unwrap_or_default();
    if token.csrf.is_empty() || !auth::same(&sent, &token.csrf) {
        return refused(
            "the form did not carry this session's token (a stale page, or a form from another site): reload the page and try again",
        );
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// A state-changing request a browser sent from another site, and how it said so.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CrossSite(String);

/// Refuses a request whose browser says it came from another site.
fn same_site(headers: &HeaderMap, uri: &Uri) -> Result<(), CrossSite> {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return Err(CrossSite(format!("a form sent from another site ({site})")));
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| uri.authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let origin_host = origin.split_once("://").map_or("", |(_, h)| h);
        // Browsers send `Origin: null` for a form of a page with `Referrer-Policy:
        // no-referrer` (this site's): that says nothing, and Sec-Fetch-Site speaks.
        if origin != "null" && !origin_host.eq_ignore_ascii_case(&host) {
            return Err(CrossSite(format!(
                "a form sent from another origin ({origin})"
            )));
        }
    }
    Ok(())
}

fn refused(why: &str) -> Response {
    let markup = layout(
        "Refused",
        html! { main { h1 { "Refused" } p.error { (why) } p { a href="/ui/" { "Back" } } } },
    );
    (StatusCode::FORBIDDEN, html_response(markup)).into_response()
}

/// The first value of `name` in an `application/x-www-form-urlencoded` body.
pub fn form_field(body: &[u8], name: &str) -> Option<String> {
    body.split(|b| *b == b'&').find_map(|pair| {
        let mut it = pair.splitn(2, |b| *b == b'=');
        let k = decode(it.next()?);
        (k == name).then(|| decode(it.next().unwrap_or_default()))
    })
}

fn decode(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < raw.len() => {
                match std::str::from_utf8(&raw[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn style() -> Response {
    let mut resp = Response::new(Body::from(STYLE));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/css; charset=utf-8"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    resp
}

#[derive(Debug, Default, Deserialize)]
pub struct LoginQuery {
    pub next: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub password: String,
    #[serde(default)]
    pub totp: String,
    #[serde(default)]
    pub next: String,
}

/// What the login form says above its fields.
enum LoginNote {
    None,
    Error(String),
    Enrol { secret: String, uri: String },
}

fn login_page(status: StatusCode, name: &str, next: &str, note: &LoginNote) -> Response {
    let markup = layout(
        "Log in",
        html! {
            main.login {
                h1 { "Mailborder" }
                @match note {
                    LoginNote::None => {}
                    LoginNote::Error(text) => p.flash.error role="alert" { (text) }
                    LoginNote::Enrol { secret, uri } => {
                        p.flash.error role="alert" {
                            "This account must have a second factor. Add this secret to an authenticator app, then log in with a code from it."
                        }
                        p { "Secret: " code.secret { (secret) } }
                        p.small { code { (uri) } }
                    }
                }
                form method="post" action=(LOGIN) {
                    input type="hidden" name="next" value=(next);
                    label { "Name" input type="text" name="name" value=(name) autocomplete="username" required autofocus; }
                    label { "Password" input type="password" name="password" autocomplete="current-password" required; }
                    label { "Code (TOTP), when the account has one" input type="text" name="totp" inputmode="numeric" autocomplete="one-time-code" pattern="[0-9]{6}"; }
                    button type="submit" { "Log in" }
                }
            }
        },
    );
    (status, html_response(markup)).into_response()
}

async fn login_form(who: Option<Ui>, Query(q): Query<LoginQuery>) -> Response {
    // Already logged in: on to the pages.
    if let Some(ui) = who {
        return see_other(home(&ui.who, q.next.as_deref()));
    }
    login_page(
        StatusCode::OK,
        "",
        q.next.as_deref().unwrap_or_default(),
        &LoginNote::None,
    )
}

impl<S: Send + Sync> axum::extract::OptionalFromRequestParts<S> for Ui {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Option<Self>, Response> {
        Ok(
            <Ui as FromRequestParts<S>>::from_request_parts(parts, state)
                .await
                .ok(),
        )
    }
}

/// Where a principal goes after logging in.
fn home<'a>(p: &Principal, next: Option<&'a str>) -> &'a str {
    if p.role == Role::User {
        return PORTAL;
    }
    local_target(next).unwrap_or("/ui/")
}

/// Logs in through mb-rpcd's `WebAccounts.Login`, as `POST /api/v1/auth/login` does,
/// and sets the same session cookie.
async fn login(
    State(state): State<AppState>,
    conn: Conn,
    axum::Form(f): axum::Form<LoginForm>,
) -> Response {
    let asked = WebLoginRequest {
        name: f.name.clone(),
        password: f.password,
        totp: f.totp.trim().to_string(),
        client_ip: conn.client_ip,
    };
    let r = match state
        .call("mb-rpcd", |ch| async move {
            WebAccountsClient::new(ch).login(asked).await
        })
        .await
    {
        Ok(r) => r,
        Err(p) => {
            return login_page(
                p.status_code(),
                &f.name,
                &f.next,
                &LoginNote::Error(p.detail.unwrap_or(p.title)),
            );
        }
    };
    let refuse =
        |status, text: &str| login_page(status, &f.name, &f.next, &LoginNote::Error(text.into()));
    match WebLoginOutcome::try_from(r.outcome) {
        Ok(WebLoginOutcome::WebLoginOk) => {
            let principal = match r.principal.map(Principal::from_wire) {
                Some(Ok(p)) => p,
                _ => return refuse(StatusCode::BAD_GATEWAY, "mb-rpcd gave no principal"),
            };
            let max_age = (r.expires_at_unix - auth::now()).max(0);
            let name = if conn.https {
                auth::HOST_COOKIE
            } else {
                auth::COOKIE
            };
            let next = (!f.next.is_empty()).then_some(f.next.as_str());
            let mut resp = see_other(home(&principal, next));
            resp.headers_mut().append(
                header::SET_COOKIE,
                auth::cookie(name, &r.session_id, max_age),
            );
            resp
        }
        Ok(WebLoginOutcome::WebLoginTotpRequired) => refuse(
            StatusCode::UNAUTHORIZED,
            "this account needs its TOTP code: enter the code from the authenticator app",
        ),
        Ok(WebLoginOutcome::WebLoginTotpEnrol) => {
            let e = r.enrol.unwrap_or_default();
            login_page(
                StatusCode::UNAUTHORIZED,
                &f.name,
                &f.next,
                &LoginNote::Enrol {
                    secret: e.base32,
                    uri: e.uri,
                },
            )
        }
        Ok(WebLoginOutcome::WebLoginLockedOut) => refuse(
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "too many failed logins: the account is locked for {}s",
                r.retry_after_seconds
            ),
        ),
        _ => refuse(StatusCode::UNAUTHORIZED, "wrong name, password or code"),
    }
}

/// Ends the session (the form carries the CSRF token, checked by [`csrf_guard`]).
async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(id) = auth::session_cookie(&headers) {
        // A session mb-rpcd no longer knows is as good as ended.
        let _ = state
            .call("mb-rpcd", |ch| async move {
                WebAccountsClient::new(ch)
                    .logout(WebLogoutRequest { session_id: id })
                    .await
            })
            .await;
    }
    let mut resp = see_other(LOGIN);
    for c in [
        auth::clear_cookie(auth::HOST_COOKIE),
        auth::clear_cookie(auth::COOKIE),
    ] {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    resp
}

/// A Unix time in seconds as `YYYY-MM-DD HH:MM:SS` UTC (`-` for 0).
pub fn time(unix: i64) -> String {
    if unix <= 0 {
        return "-".into();
    }
    let (y, m, d) = mb_runtime::logging::civil_from_days(unix.div_euclid(86_400));
    let s = unix.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

/// Bytes for a human.
pub fn size(bytes: u64) -> String {
    const K: u64 = 1024;
    match bytes {
        b if b >= K * K => format!("{:.1} MiB", b as f64 / (K * K) as f64),
        b if b >= K => format!("{:.1} KiB", b as f64 / K as f64),
        b => format!("{b} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flash_messages_survive_the_cookie_and_forged_ones_do_not_parse() {
        let text = "saved <b>\"x\"</b>; restart mb-smtpd ✓";
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("a=b; {FLASH_COOKIE}=o{}", hex(text))
                .parse()
                .unwrap(),
        );
        assert_eq!(
            read_flash(&h),
            Some(Flash {
                ok: true,
                text: text.into()
            })
        );
        h.insert(
            header::COOKIE,
            format!("{FLASH_COOKIE}=ezz").parse().unwrap(),
        );
        assert_eq!(read_flash(&h), None);
    }

    #[test]
    fn form_fields_are_decoded() {
        let body = b"a=1&csrf=ab%2Bc+d&csrf=second&empty";
        assert_eq!(form_field(body, "csrf").as_deref(), Some("ab+c d"));
        assert_eq!(form_field(body, "empty").as_deref(), Some(""));
        assert_eq!(form_field(body, "none"), None);
        assert_eq!(form_field(b"x=%zz%4", "x").as_deref(), Some("%zz%4"));
    }

    #[test]
    fn only_local_pages_are_redirect_targets() {
        assert_eq!(local_target(Some("/ui/queue?x=1")), Some("/ui/queue?x=1"));
        for bad in [
            "https://evil.example/",
            "//evil.example/",
            "/ui//evil",
            "/api/v1/x",
            "/ui/\\evil",
        ] {
            assert_eq!(local_target(Some(bad)), None, "{bad}");
        }
    }

    #[test]
    fn forms_from_other_sites_are_refused() {
        let uri: Uri = "/ui/queue".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "gw.example:8443".parse().unwrap());
        assert!(same_site(&h, &uri).is_ok());
        h.insert(header::ORIGIN, "https://gw.example:8443".parse().unwrap());
        assert!(same_site(&h, &uri).is_ok());
        h.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(same_site(&h, &uri).is_err());
        h.insert(header::ORIGIN, "null".parse().unwrap());
        assert!(same_site(&h, &uri).is_ok());
        h.insert("sec-fetch-site", "same-origin".parse().unwrap());
        assert!(same_site(&h, &uri).is_ok());
        h.remove(header::ORIGIN);
        h.insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(same_site(&h, &uri).is_err());
    }

    #[test]
    fn values_are_escaped_in_pages() {
        let evil = "<script>alert(1)</script>";
        let m = html! { p { (evil) } };
        assert_eq!(
            m.into_string(),
            "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"
        );
    }
}
