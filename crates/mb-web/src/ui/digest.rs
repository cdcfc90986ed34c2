//! The pages a quarantine digest's links lead to (`/ui/digest/TOKEN`). Opening a link
//! (GET) only shows what it would do and a button: a mail client or a link scanner that
//! fetches every URL of a message releases nothing. The button POSTs the token back;
//! mb-rpcd checks it (signature, expiry, single use) and does the release, or opens a
//! portal session for the link's recipient. No login is needed: the token is the
//! credential, bound to one action on one message for one recipient, and good once, so
//! a forged cross-site form could only do what the link's own holder asked for (and
//! `ui::csrf_guard` refuses forms from other sites anyway).

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use maud::{Markup, html};
use mb_proto::v1::DigestLinkRequest;
use mb_proto::v1::digest_client::DigestClient;

use super::portal::session_redirect;
use super::{PORTAL, Ui};
use crate::auth::Conn;
use crate::problem::Problem;
use crate::state::AppState;

const RPCD: &str = "mb-rpcd";

pub fn routes() -> axum::Router<AppState> {
    Router::new().route("/ui/digest/{token}", get(confirm).post(use_link))
}

/// A page outside the logged-in layout.
fn page(status: StatusCode, title: &str, body: Markup) -> Response {
    let markup = super::layout(title, html! { main.login { h1 { (title) } (body) } });
    let mut resp = (status, super::html_response(markup)).into_response();
    // The token is in the URL: keep it out of caches and Referer headers.
    resp.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    resp.headers_mut().insert(
        axum::http::header::REFERRER_POLICY,
        axum::http::HeaderValue::from_static("no-referrer"),
    );
    resp
}

fn invalid(p: &Problem) -> Response {
    page(
        p.status_code(),
        "This link does not work",
        html! {
            p.error { (p.detail.as_deref().unwrap_or(&p.title)) }
            p { a href=(PORTAL) { "Open your quarantine" } }
        },
    )
}

/// The token as the path gives it: only the characters a token has, so nothing else
/// reaches mb-rpcd or a form's action.
fn clean(token: &str) -> Option<&str> {
    (token.len() <= 200
        && !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_hexdigit() || b == b'.'))
    .then_some(token)
}

fn bad_token() -> Problem {
    Problem::not_found("this link is not valid: it may have expired or been used already")
}

/// GET: what the link would do, and the button that does it.
async fn confirm(
    who: Option<Ui>,
    State(state): State<AppState>,
    conn: Conn,
    Path(token): Path<String>,
) -> Response {
    let Some(token) = clean(&token) else {
        return invalid(&bad_token());
    };
    let ask = DigestLinkRequest {
        token: token.to_string(),
        client_ip: conn.client_ip,
    };
    let link = match state
        .call(RPCD, |ch| async move {
            DigestClient::new(ch).peek_link(ask).await
        })
        .await
    {
        Ok(l) => l,
        Err(p) => return invalid(&p),
    };
    // A browser with a session must send its token with any form (ui::csrf_guard).
    let csrf = who.map(|ui| ui.csrf_field());
    let action = format!("/ui/digest/{token}");
    let expires = super::time(link.expires_at_unix);
    if link.action == "portal" {
        return page(
            StatusCode::OK,
            "Open your quarantine",
            html! {
                p { "This link signs you in once to the quarantine of " strong { (link.recipient) } "." }
                form method="post" action=(action) {
                    @if let Some(c) = &csrf { (c) }
                    button type="submit" { "Open my quarantine" }
                }
                p.small { "The link works once, until " (expires) " UTC." }
            },
        );
    }
    let e = link.entry.unwrap_or_default();
    page(
        StatusCode::OK,
        "Release this message?",
        html! {
            table.kv {
                tr { th { "To" } td { (link.recipient) } }
                tr { th { "From" } td { @if e.sender.is_empty() { "<>" } @else { (e.sender) } } }
                tr { th { "Subject" } td { (e.subject) } }
                tr { th { "Received (UTC)" } td { (super::time(e.at_unix_ms / 1000)) } }
                tr { th { "Score" } td { (format!("{:.1}", e.score)) } }
                tr { th { "Reason" } td { (e.reason) } }
            }
            p { "Releasing delivers the message to its recipients as it is. Release it only if you expected it." }
            form method="post" action=(action) {
                @if let Some(c) = &csrf { (c) }
                button type="submit" { "Release the message" }
            }
            p.small { "The link works once, until " (expires) " UTC." }
        },
    )
}

/// POST: uses the link (once).
async fn use_link(
    State(state): State<AppState>,
    conn: Conn,
    Path(token): Path<String>,
) -> Response {
    let Some(token) = clean(&token) else {
        return invalid(&bad_token());
    };
    let ask = DigestLinkRequest {
        token: token.to_string(),
        client_ip: conn.client_ip.clone(),
    };
    let used = match state
        .call(RPCD, |ch| async move {
            DigestClient::new(ch).use_link(ask).await
        })
        .await
    {
        Ok(u) => u,
        Err(p) => return invalid(&p),
    };
    if used.action == "portal" {
        return session_redirect(&conn, &used.session_id, used.expires_at_unix, PORTAL);
    }
    page(
        StatusCode::OK,
        "Released",
        html! {
            p { "The message was released to " (used.recipient) "." }
            p.small { "The next hop said: " (used.reply) }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_token_characters_pass() {
        assert!(clean("0123abcdef.99ff").is_some());
        for bad in ["", "a/b", "a\"b", "<x>", "a b", &"a".repeat(201)] {
            assert!(clean(bad).is_none(), "{bad}");
        }
    }
}
