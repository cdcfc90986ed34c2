//! The mail queue as `mb-queue` shows and changes it (administrators): list by queue,
//! one message's envelope, headers and delivery history, and hold, release, requeue,
//! delete and flush, each through the same `api::queue` handler as the REST API.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::{get, post};
use maud::{Markup, html};

use super::{AdminUi, Nav, Ui, done, failed};
use crate::access::Admin;
use crate::api::queue::{self as api, FlushQuery, Which};
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui/queue", get(list))
        .route("/ui/queue/flush", post(flush))
        .route("/ui/queue/{id}", get(show))
        .route("/ui/queue/{id}/{action}", post(act))
}

fn page_of(id: &str) -> String {
    format!("/ui/queue/{}", super::percent(id))
}

/// The buttons for one message (each a form with the CSRF token).
fn actions(ui: &Ui, id: &str, queue: &str) -> Markup {
    let base = page_of(id);
    html! {
        @let verbs: &[(&str, &str)] = if queue == "hold" {
            &[("release", "Release")]
        } else {
            &[("hold", "Hold"), ("requeue", "Retry now")]
        };
        @for (verb, label) in verbs {
            form.inline method="post" action={ (base) "/" (verb) } {
                (ui.csrf_field())
                button.plain type="submit" name="do" value=(verb) { (label) }
            }
            " "
        }
        form.inline method="post" action={ (base) "/delete" } {
            (ui.csrf_field())
            button.danger type="submit" { "Delete" }
        }
    }
}

async fn list(
    AdminUi(ui): AdminUi,
    State(state): State<AppState>,
    Query(w): Query<Which>,
) -> Response {
    let which = w.queue.clone().unwrap_or_default();
    let found = api::list(Admin(ui.who.clone()), State(state), Query(w)).await;
    let body = html! {
        p {
            "Queue: "
            @for q in ["", "incoming", "deferred", "hold"] {
                @let label = if q.is_empty() { "all" } else { q };
                @if which == q { strong { (label) } } @else { a href={ "/ui/queue?queue=" (q) } { (label) } }
                " "
            }
        }
        form.inline method="post" action="/ui/queue/flush" {
            (ui.csrf_field())
            button type="submit" { "Flush: retry every deferred message now" }
        }
        @match &found {
            Err(p) => p.error { (p.detail.as_deref().unwrap_or(&p.title)) }
            Ok(entries) => {
                p.muted { (entries.0.len()) " messages" }
                table.queue {
                    thead { tr { th { "Queue id" } th { "Queue" } th { "Arrival (UTC)" } th { "From" } th { "To" } th.num { "Size" } th.num { "Attempts" } th { "Next attempt" } th { "Actions" } } }
                    tbody {
                        @for e in &entries.0 {
                            tr data-id=(e.id) {
                                td { a href=(page_of(&e.id)) { (e.id) } }
                                td.queue-name { (e.queue) }
                                td { (super::time(e.arrival)) }
                                td.wrap { (e.sender) }
                                td.wrap {
                                    @for r in &e.recipients {
                                        div { (r.address) " " span.muted { (r.state) } @if !r.last_error.is_empty() { div.small { (r.last_error) } } }
                                    }
                                }
                                td.num { (super::size(e.size)) }
                                td.num { (e.attempts) }
                                td { (super::time(e.next_attempt)) }
                                td { (actions(&ui, &e.id, &e.queue)) }
                            }
                        }
                    }
                }
            }
        }
    };
    ui.page("Mail queue", Nav::Queue, body)
}

async fn show(
    AdminUi(ui): AdminUi,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Response {
    let d = match api::show(Admin(ui.who.clone()), State(state), Path(id)).await {
        Ok(d) => d.0,
        Err(p) => return ui.problem(&p),
    };
    let e = &d.entry;
    let body = html! {
        dl.meta {
            dt { "Queue id" } dd { (e.id) }
            dt { "Queue" } dd.queue-name { (e.queue) }
            dt { "Arrival" } dd { (super::time(e.arrival)) }
            dt { "From" } dd { (e.sender) }
            dt { "Client" } dd { (e.client_ip) " (HELO " (d.helo) ", " (e.protocol) ")" }
            dt { "TLS" } dd { (d.tls) }
            dt { "Authenticated as" } dd { (d.auth_user) }
            dt { "Size" } dd { (super::size(e.size)) }
            dt { "Attempts" } dd { (e.attempts) ", next " (super::time(e.next_attempt)) }
        }
        p { (actions(&ui, &e.id, &e.queue)) " " a href={ "/ui/tracking/message?id=" (super::percent(&e.id)) } { "Message log" } }
        h2 { "Recipients" }
        table {
            thead { tr { th { "Address" } th { "State" } th { "Last error" } th { "Server" } } }
            tbody {
                @for r in &e.recipients {
                    tr { td { (r.address) } td { (r.state) } td.wrap { (r.last_error) } td { (r.remote) } }
                }
            }
        }
        h2 { "Delivery history" }
        pre { (d.history.join("\n")) }
        h2 { "Headers" }
        pre { (d.headers) }
    };
    ui.page(&format!("Queued message {}", e.id), Nav::Queue, body)
}

/// Hold, release, requeue or delete one message.
async fn act(
    AdminUi(ui): AdminUi,
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let who = || Admin(ui.who.clone());
    let st = || State(state.clone());
    let back = "/ui/queue";
    let r = match action.as_str() {
        "hold" => api::hold(who(), st(), Path(id.clone()))
            .await
            .map(|c| format!("{} is now in the {} queue", c.0.id, c.0.queue)),
        "release" => api::release(who(), st(), Path(id.clone()))
            .await
            .map(|c| format!("{} released: now in the {} queue", c.0.id, c.0.queue)),
        "requeue" => api::requeue(who(), st(), Path(id.clone()))
            .await
            .map(|c| format!("{} will be retried now", c.0.id)),
        "delete" => api::delete(who(), st(), Path(id.clone()))
            .await
            .map(|d| format!("{id}: {} message deleted", d.0.deleted)),
        _ => {
            return ui.problem(&crate::problem::Problem::not_found(format!(
                "no queue action {action}"
            )));
        }
    };
    match r {
        Ok(text) => done(back, text),
        Err(p) => failed(back, &p),
    }
}

async fn flush(AdminUi(ui): AdminUi, State(state): State<AppState>) -> Response {
    match api::flush(
        Admin(ui.who.clone()),
        State(state),
        Query(FlushQuery::default()),
    )
    .await
    {
        Ok(f) => done(
            "/ui/queue",
            format!("{} deferred messages scheduled now", f.0.flushed),
        ),
        Err(p) => failed("/ui/queue", &p),
    }
}
