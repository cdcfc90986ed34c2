//! The quarantine pages of administrators and domain admins (`/ui/quarantine`), and the
//! list, preview and actions the users' portal (`ui::portal`) shows with them: a list
//! with filters (recipient, sender, reason, time), a message's preview (its text part,
//! and its HTML part sanitised with ammonia: no script, no URL of any kind, so nothing
//! remote is ever fetched), its header section and attachment names, and release and
//! delete through the same `api::quarantine` handlers as the REST API, so a page can
//! see and touch only what the API would let the same principal. Each action is also
//! written to mb-rpcd's audit trail (`Digest.Audit`).
//!
//! "Allow sender" and "Block sender" add a policy scoped to each recipient of the message
//! the principal may see (a user: its own addresses), so one person's choice never
//! decides for another recipient; an allow is an authenticated-sender allow (SPF or
//! aligned DKIM must pass), like every sender allow. "Release and allow" does both.
//!
//! "Learn as spam" and "Learn as ham" (on the list and on a message's page) teach
//! Rspamd through `api::learn`, shown to administrators and domain admins only and only
//! when Rspamd is configured (`api::learn::available`).

use std::collections::HashSet;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use maud::{Markup, PreEscaped, html};
use mb_proto::v1::digest_client::DigestClient;
use mb_proto::v1::policies_client::PoliciesClient;
use mb_proto::v1::{Policy, PortalAuditRequest};
use serde::Deserialize;

use super::{Nav, Staff, Ui, done, failed};
use crate::access::Signed;
use crate::api::learn;
use crate::api::quarantine::{self as api, ListQuery};
use crate::problem::Problem;
use crate::state::AppState;

/// Where a set of quarantine pages lives and how it is titled.
pub struct Area {
    pub base: &'static str,
    pub nav: Nav,
    pub title: &'static str,
}

/// The staff's pages.
pub const STAFF: Area = Area {
    base: "/ui/quarantine",
    nav: Nav::Quarantine,
    title: "Quarantine",
};

pub fn routes() -> axum::Router<AppState> {
    Router::new()
        .route("/ui/quarantine", get(list))
        .route("/ui/quarantine/{id}", get(show))
        .route("/ui/quarantine/{id}/{action}", post(act))
}

/// The list's filters, as the form sends them (an empty field is no filter).
#[derive(Debug, Default, Deserialize)]
pub struct Filters {
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: String,
    /// A part of the reason (`spam`, `virus`, a symbol).
    #[serde(default)]
    pub reason: String,
    /// An age or UTC time (2h, 7d, 2026-11-22 08:00).
    #[serde(default)]
    pub since: String,
    #[serde(default)]
    pub limit: Option<u32>,
}

fn set(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

async fn list(
    Staff(ui): Staff,
    State(state): State<AppState>,
    Query(f): Query<Filters>,
) -> Response {
    list_page(ui, state, f, &STAFF).await
}

async fn show(Staff(ui): Staff, State(state): State<AppState>, Path(id): Path<String>) -> Response {
    show_page(ui, state, &id, &STAFF).await
}

async fn act(
    Staff(ui): Staff,
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    act_on(ui, state, &id, &action, &STAFF).await
}

/// The list page of `area`, scoped to the principal by `api::quarantine::list`.
pub async fn list_page(ui: Ui, state: AppState, f: Filters, area: &Area) -> Response {
    let limit = f.limit.unwrap_or(200).clamp(1, 5000);
    let q = ListQuery {
        from: set(&f.from),
        to: set(&f.to),
        since: set(&f.since),
        limit: Some(limit),
        offset: None,
    };
    let learn = learning(&ui, &state);
    let found = match api::list(Signed(ui.who.clone()), State(state), Query(q)).await {
        Ok(Json(l)) => l,
        Err(p) => return ui.problem(&p),
    };
    let reason = f.reason.trim().to_ascii_lowercase();
    let entries: Vec<&api::Entry> = found
        .entries
        .iter()
        .filter(|e| {
            reason.is_empty()
                || e.reason.to_ascii_lowercase().contains(&reason)
                || e.symbols
                    .iter()
                    .any(|s| s.to_ascii_lowercase().contains(&reason))
        })
        .collect();
    let body = html! {
        form.filters method="get" action=(area.base) {
            label { "Sender " input type="text" name="from" value=(f.from) placeholder="someone@example.net"; }
            label { "Recipient " input type="text" name="to" value=(f.to) placeholder="you@example.org"; }
            label { "Reason " input type="text" name="reason" value=(f.reason) placeholder="spam, virus, symbol"; }
            label { "Since " input type="text" name="since" value=(f.since) placeholder="2h, 7d, 2026-11-22 08:00"; }
            button type="submit" { "Filter" }
        }
        p.small {
            (entries.len()) " shown; " (found.total) " messages ("
            (super::size(found.total_bytes)) ") in the quarantine you may see."
        }
        @if entries.is_empty() {
            p { "Nothing in the quarantine matches." }
        } @else {
            table.list {
                thead { tr { th { "Received (UTC)" } th { "From" } th { "To" } th { "Subject" } th { "Score" } th { "Reason" } th { "Size" } @if learn { th { "Learn" } } } }
                tbody {
                    @for e in &entries {
                        tr {
                            td { (super::time(e.at_unix_ms / 1000)) }
                            td { (sender(&e.sender)) }
                            td { (e.recipients.join(", ")) }
                            td { a href=(page_of(area, &e.id)) { (subject(&e.subject)) } }
                            td { (format!("{:.1}", e.score)) }
                            td { (e.reason) }
                            td { (super::size(e.size)) }
                            @if learn {
                                td { (learn_forms(&ui, &page_of(area, &e.id))) }
                            }
                        }
                    }
                }
            }
        }
    };
    ui.page(area.title, area.nav, body)
}

fn page_of(area: &Area, id: &str) -> String {
    format!("{}/{}", area.base, super::percent(id))
}

fn sender(s: &str) -> &str {
    if s.is_empty() { "<>" } else { s }
}

fn subject(s: &str) -> &str {
    if s.trim().is_empty() {
        "(no subject)"
    } else {
        s
    }
}

/// What a reader sees of a message: its text, its HTML sanitised, its attachments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preview {
    pub text: String,
    /// The HTML part after [`sanitize`]; `None` without one.
    pub html: Option<String>,
    pub attachments: Vec<String>,
}

/// The preview of a message as stored.
pub fn preview(message: &[u8]) -> Preview {
    let (text, attachments) = api::body_of(message);
    let html = mail_parser::MessageParser::default()
        .parse(message)
        .and_then(|m| {
            m.html_body
                .iter()
                .find_map(|i| match &m.parts.get(usize::try_from(*i).ok()?)?.body {
                    mail_parser::PartType::Html(h) => Some(sanitize(h)),
                    _ => None,
                })
        });
    Preview {
        text,
        html,
        attachments,
    }
}

/// HTML that runs nothing and fetches nothing: ammonia's safe subset (no script, style,
/// event handler or form), without images, and without any URL (no scheme is allowed
/// and relative URLs are dropped), so links, images and CSS cannot reach out.
pub fn sanitize(html: &str) -> String {
    let mut b = ammonia::Builder::default();
    b.rm_tags(["img"])
        .url_schemes(HashSet::new())
        .url_relative(ammonia::UrlRelative::Deny);
    b.clean(html).to_string()
}

/// One message's page.
pub async fn show_page(ui: Ui, state: AppState, id: &str, area: &Area) -> Response {
    let r = match api::fetch(&state, &ui.who, id, true).await {
        Ok(r) => r,
        Err(p) => return ui.problem(&p),
    };
    let e = api::view(&ui.who, r.entry.unwrap_or_default());
    let pv = preview(&r.message);
    let base = page_of(area, &e.id);
    let body = html! {
        table.kv {
            tr { th { "From" } td { (sender(&e.sender)) } }
            tr { th { "To" } td { (e.recipients.join(", ")) } }
            tr { th { "Subject" } td { (subject(&e.subject)) } }
            tr { th { "Received (UTC)" } td { (super::time(e.at_unix_ms / 1000)) } }
            tr { th { "Score" } td { (format!("{:.2}", e.score)) } }
            tr { th { "Reason" } td { (e.reason) } }
            @if !e.symbols.is_empty() {
                tr { th { "Symbols" } td { (e.symbols.join(", ")) } }
            }
            tr { th { "Client" } td { (e.client_ip) } }
            tr { th { "Size" } td { (super::size(e.size)) } }
            tr { th { "Attachments" } td {
                @if pv.attachments.is_empty() { "none" } @else { (pv.attachments.join(", ")) }
            } }
        }
        (actions(&ui, &base, learning(&ui, &state)))
        h2 { "Text" }
        pre.message { (pv.text) }
        @if let Some(h) = &pv.html {
            h2 { "HTML (sanitised: no scripts, no images, no links)" }
            // Sanitised by ammonia just above: the only markup of message data that is
            // not escaped, and it holds no script, handler or URL.
            div.preview { (PreEscaped(h)) }
        }
        h2 { "Header section" }
        pre.headers { (r.headers) }
    };
    ui.page(area.title, area.nav, body)
}

/// Whether the learn buttons are shown: to staff, with Rspamd configured.
fn learning(ui: &Ui, state: &AppState) -> bool {
    ui.who.role != crate::auth::Role::User && learn::available(&state.config())
}

/// "Learn as spam" and "Learn as ham", posting to the message at `base`.
fn learn_forms(ui: &Ui, base: &str) -> Markup {
    html! {
        @for (verb, label) in [("learn-spam", "Learn as spam"), ("learn-ham", "Learn as ham")] {
            form.inline method="post" action={ (base) "/" (verb) } {
                (ui.csrf_field())
                button type="submit" { (label) }
            }
            " "
        }
    }
}

fn actions(ui: &Ui, base: &str, learn: bool) -> Markup {
    let verbs: &[(&str, &str)] = &[
        ("release", "Release"),
        ("release-allow", "Release and allow sender"),
        ("allow", "Allow sender"),
        ("block", "Block sender"),
    ];
    html! {
        p.actions {
            @for (verb, label) in verbs {
                form.inline method="post" action={ (base) "/" (verb) } {
                    (ui.csrf_field())
                    button type="submit" { (label) }
                }
                " "
            }
            @if learn {
                (learn_forms(ui, base))
            }
            form.inline method="post" action={ (base) "/delete" } {
                (ui.csrf_field())
                button.danger type="submit" { "Delete" }
            }
        }
    }
}

/// Priorities of the scoped sender policies: a block before the administrators'
/// default (50), an allow after it, so a person's allow never overrides an
/// administrator's block or score.
const BLOCK_PRIORITY: i32 = 40;
const ALLOW_PRIORITY: i32 = 60;

/// Adds an `allow` or `block` policy for the message's sender, scoped to each of its
/// recipients the principal may see. Returns what was done, in words.
pub async fn sender_policy(
    state: &AppState,
    ui: &Ui,
    id: &str,
    action: &str,
) -> Result<String, Problem> {
    let e = api::visible_entry(state, &ui.who, id).await?;
    let sender = e.sender.trim().to_ascii_lowercase();
    if sender.is_empty() || !sender.contains('@') {
        return Err(Problem::bad_request(
            "the message has no sender address (a bounce): there is no sender to allow or block",
        ));
    }
    let recipients: Vec<String> = e
        .recipients
        .iter()
        .filter(|r| ui.who.sees_address(r))
        .map(|r| r.trim().to_ascii_lowercase())
        .collect();
    let mut added = Vec::new();
    for rcpt in &recipients {
        let mut name = format!("{action} {sender} for {rcpt}");
        let mut cut = name.len().min(100);
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
        let policy = Policy {
            name,
            priority: if action == "block" {
                BLOCK_PRIORITY
            } else {
                ALLOW_PRIORITY
            },
            object: "address".into(),
            pattern: sender.clone(),
            direction: "from".into(),
            action: action.into(),
            comment: format!("from the quarantine, by web:{}", ui.who.name),
            recipient: rcpt.clone(),
            ..Default::default()
        };
        let ask = crate::api::acting(&ui.who, policy);
        match state
            .call("mb-rpcd", |ch| async move {
                PoliciesClient::new(ch).add(ask).await
            })
            .await
        {
            Ok(_) => added.push(rcpt.clone()),
            // The same choice made before: it stands.
            Err(p) if p.status == 409 => added.push(rcpt.clone()),
            Err(p) => return Err(p),
        }
    }
    let verb = if action == "block" {
        "blocked"
    } else {
        "allowed"
    };
    Ok(format!("{sender} {verb} for {}", added.join(", ")))
}

/// Release or delete, through the API's handlers, then the audit line.
pub async fn act_on(ui: Ui, state: AppState, id: &str, action: &str, area: &Area) -> Response {
    let back = page_of(area, id);
    let who = Signed(ui.who.clone());
    let outcome: Result<String, Problem> = match action {
        "release" => api::release(who, State(state.clone()), Path(id.to_string()))
            .await
            .map(|Json(r)| format!("released to {}: {}", r.recipients.join(", "), r.reply)),
        "delete" => api::delete(who, State(state.clone()), Path(id.to_string()))
            .await
            .map(|_| format!("deleted {id}")),
        "allow" | "block" => sender_policy(&state, &ui, id, action).await,
        "learn-spam" | "learn-ham" => {
            let class = if action == "learn-spam" {
                learn::Class::Spam
            } else {
                learn::Class::Ham
            };
            learn::learn_message(&state, &ui.who, id, class)
                .await
                .map(|l| l.detail)
        }
        "release-allow" => match sender_policy(&state, &ui, id, "allow").await {
            Ok(allowed) => api::release(who, State(state.clone()), Path(id.to_string()))
                .await
                .map(|Json(r)| {
                    format!(
                        "{allowed}; released to {}: {}",
                        r.recipients.join(", "),
                        r.reply
                    )
                }),
            Err(p) => Err(p),
        },
        other => Err(Problem::not_found(format!(
            "no action {other:?} on a quarantined message"
        ))),
    };
    match outcome {
        Ok(text) => {
            audit(&state, &ui, &format!("quarantine:{id}"), action, &text).await;
            // Actions that leave the message in the quarantine come back to it.
            let to = if matches!(action, "allow" | "block" | "learn-spam" | "learn-ham") {
                back.as_str()
            } else {
                area.base
            };
            done(to, text)
        }
        Err(p) => failed(&back, &p),
    }
}

/// Writes an action to mb-rpcd's audit trail; a failure is logged, since the action
/// itself was done.
pub async fn audit(state: &AppState, ui: &Ui, key: &str, action: &str, detail: &str) {
    let ask = PortalAuditRequest {
        key: key.into(),
        action: action.into(),
        detail: detail.into(),
        actor: format!("web:{}", ui.who.name),
    };
    if let Err(p) = state
        .call("mb-rpcd", |ch| async move {
            DigestClient::new(ch).audit(ask).await
        })
        .await
    {
        tracing::warn!(cause = %p.detail.as_deref().unwrap_or(&p.title), key, action, "cannot write the audit line of a web action");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_html_is_left_without_script_or_url() {
        let hostile = r#"<p onclick="steal()">Hi <b>there</b></p>
            <script>alert(1)</script><img src="https://tracker.evil.test/p.gif">
            <a href="https://evil.test/login">log in</a><a href="javascript:alert(1)">x</a>
            <div style="background:url(https://evil.test/bg.png)">bg</div>
            <iframe src="https://evil.test/"></iframe><form action="https://evil.test/"><input></form>
            <svg><image href="https://evil.test/i.png"/></svg><style>@import url(https://evil.test/c.css);</style>
            <img src="cid:part1"><a href="/relative">rel</a><link rel="stylesheet" href="https://evil.test/s.css">"#;
        let clean = sanitize(hostile);
        for bad in [
            "<script",
            "onclick",
            "<img",
            "http",
            "javascript:",
            "style",
            "<iframe",
            "<form",
            "<svg",
            "cid:",
            "/relative",
            "<link",
        ] {
            assert!(
                !clean.to_ascii_lowercase().contains(bad),
                "{bad} in {clean}"
            );
        }
        assert!(
            clean.contains("<b>there</b>") && clean.contains("log in"),
            "{clean}"
        );
    }

    #[test]
    fn a_preview_gives_text_sanitised_html_and_attachment_names() {
        let msg = b"From: a@b.test\r\nSubject: s\r\nMIME-Version: 1.0\r\n\
            Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n\
            Content-Type: text/html\r\n\r\n<p>hello <script>alert(1)</script><img src=http://x.test/a>world</p>\r\n--XX\r\n\
            Content-Type: application/pdf; name=\"bill.pdf\"\r\n\
            Content-Disposition: attachment; filename=\"bill.pdf\"\r\n\r\nJVBERi0=\r\n--XX--\r\n";
        let p = preview(msg);
        assert!(p.text.contains("hello"), "{p:?}");
        let html = p.html.unwrap();
        assert!(
            html.contains("hello") && !html.contains("script") && !html.contains("x.test"),
            "{html}"
        );
        assert_eq!(p.attachments, ["bill.pdf"]);
        let plain = preview(b"Subject: s\r\n\r\njust text\r\n");
        assert_eq!(plain.html, None);
    }
}
