//! The users' portal (`/ui/portal`): a `user` sees the mail quarantined for its own
//! addresses (a web account's, or an SMTP account's login and address aliases), previews,
//! releases and deletes it, with the same pages and API handlers as the staff's
//! quarantine (`ui::quarantine`), so the scope is the API's: another user's message is
//! 404, as one that does not exist.
//!
//! Ways in: the web login form (`ui::LOGIN`), the SMTP AUTH account's login and
//! password here (`/ui/portal/login`, checked by mb-rpcd's `Digest.PortalLogin`), the
//! same form with a directory login when `ldap.url` is set (mb-rpcd binds as the user:
//! mb-web never holds `ldap.bind_password`), or a digest's single-use portal link
//! (`ui::digest`). "Allow sender" and "Block sender"
//! add policies scoped to the user's own addresses (`ui::quarantine::sender_policy`).

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use maud::html;
use mb_proto::v1::digest_client::DigestClient;
use mb_proto::v1::{PortalLoginRequest, WebLoginOutcome};
use serde::Deserialize;

use super::quarantine::{self, Area, Filters};
use super::{Nav, PORTAL, Ui, see_other};
use crate::auth::{self, Conn, Role};
use crate::state::AppState;

/// The SMTP account login form.
pub const SMTP_LOGIN: &str = "/ui/portal/login";

const AREA: Area = Area {
    base: PORTAL,
    nav: Nav::Portal,
    title: "My quarantine",
};

pub fn routes() -> axum::Router<AppState> {
    Router::new()
        .route(PORTAL, get(list))
        .route(SMTP_LOGIN, get(login_form).post(login))
        .route("/ui/portal/{id}", get(show))
        .route("/ui/portal/{id}/{action}", post(act))
}

/// The staff's own quarantine pages show them more; the portal is for users.
fn staff_elsewhere(ui: &Ui) -> Option<Response> {
    (ui.who.role != Role::User).then(|| see_other(quarantine::STAFF.base))
}

async fn list(ui: Ui, State(state): State<AppState>, Query(f): Query<Filters>) -> Response {
    if let Some(r) = staff_elsewhere(&ui) {
        return r;
    }
    quarantine::list_page(ui, state, f, &AREA).await
}

async fn show(ui: Ui, State(state): State<AppState>, Path(id): Path<String>) -> Response {
    if let Some(r) = staff_elsewhere(&ui) {
        return r;
    }
    quarantine::show_page(ui, state, &id, &AREA).await
}

async fn act(
    ui: Ui,
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    if let Some(r) = staff_elsewhere(&ui) {
        return r;
    }
    quarantine::act_on(ui, state, &id, &action, &AREA).await
}

#[derive(Debug, Default, Deserialize)]
pub struct SmtpLoginForm {
    #[serde(default)]
    pub login: String,
    #[serde(default)]
    pub password: String,
}

fn login_page(status: StatusCode, login: &str, error: Option<&str>) -> Response {
    let markup = super::layout(
        "Sign in to your quarantine",
        html! {
            main.login {
                h1 { "Your quarantine" }
                @if let Some(e) = error {
                    p.flash.error role="alert" { (e) }
                }
                p { "Sign in with your e-mail account (the login and password your mail program uses) or your organisation's directory login." }
                form method="post" action=(SMTP_LOGIN) {
                    label { "Login" input type="text" name="login" value=(login) autocomplete="username" required autofocus; }
                    label { "Password" input type="password" name="password" autocomplete="current-password" required; }
                    button type="submit" { "Sign in" }
                }
                p.small { a href=(super::LOGIN) { "Sign in with a web account instead" } }
            }
        },
    );
    (status, super::html_response(markup)).into_response()
}

async fn login_form(who: Option<Ui>) -> Response {
    if who.is_some() {
        return see_other(PORTAL);
    }
    login_page(StatusCode::OK, "", None)
}

/// An SMTP AUTH account's or a directory user's login, checked by mb-rpcd (an SMTP
/// account first, the directory for any other login when `ldap.url` is set), for a
/// user session on its addresses (the same cookie as a web login).
async fn login(
    State(state): State<AppState>,
    conn: Conn,
    axum::Form(f): axum::Form<SmtpLoginForm>,
) -> Response {
    let ask = PortalLoginRequest {
        login: f.login.trim().to_string(),
        password: f.password,
        client_ip: conn.client_ip.clone(),
    };
    let r = match state
        .call("mb-rpcd", |ch| async move {
            DigestClient::new(ch).portal_login(ask).await
        })
        .await
    {
        Ok(r) => r,
        // mb-rpcd, or the directory it asks, cannot check the password now: the cause
        // is in mb-rpcd's log, the user is told to come back.
        Err(p) if p.status_code() == StatusCode::SERVICE_UNAVAILABLE => {
            return login_page(
                p.status_code(),
                &f.login,
                Some("Your password cannot be checked right now: try again in a few minutes."),
            );
        }
        Err(p) => {
            return login_page(
                p.status_code(),
                &f.login,
                Some(p.detail.as_deref().unwrap_or(&p.title)),
            );
        }
    };
    match WebLoginOutcome::try_from(r.outcome) {
        Ok(WebLoginOutcome::WebLoginOk) => {}
        Ok(WebLoginOutcome::WebLoginLockedOut) => {
            let mut resp = login_page(
                StatusCode::TOO_MANY_REQUESTS,
                &f.login,
                Some(&format!(
                    "too many failed logins: try again in {} minutes",
                    r.retry_after_seconds.div_ceil(60)
                )),
            );
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(r.retry_after_seconds),
            );
            return resp;
        }
        // Unknown login, wrong or empty password: never which.
        _ => {
            return login_page(
                StatusCode::UNAUTHORIZED,
                &f.login,
                Some("wrong login or password"),
            );
        }
    }
    session_redirect(&conn, &r.session_id, r.expires_at_unix, PORTAL)
}

/// A 303 to `to` that sets the session cookie of a new session.
pub(crate) fn session_redirect(
    conn: &Conn,
    session_id: &str,
    expires_at: i64,
    to: &str,
) -> Response {
    let name = if conn.https {
        auth::HOST_COOKIE
    } else {
        auth::COOKIE
    };
    let mut resp = see_other(to);
    resp.headers_mut().append(
        header::SET_COOKIE,
        auth::cookie(name, session_id, (expires_at - auth::now()).max(0)),
    );
    resp
}
