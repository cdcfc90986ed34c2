//! Message tracking: the message log search of `mb-log` (`api::log::search`, scoped to
//! the principal's domains as the API scopes it) by sender, recipient, subject, client
//! address, Message-ID, queue id, verdict and time, one row per message; and one
//! message's timeline (received, scanned with symbols and score, delivered, deferred or
//! bounced per recipient) across the cluster's nodes.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::get;
use maud::{Markup, html};
use serde::Deserialize;

use super::{Nav, Staff};
use crate::access::Signed;
use crate::api::log::{Event, LogQuery};
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui/tracking", get(search))
        .route("/ui/tracking/message", get(message))
}

/// The search form's fields (empty ones are not filters).
#[derive(Debug, Default, Clone, Deserialize)]
pub struct Search {
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: String,
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub client: String,
    #[serde(default)]
    pub message_id: String,
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub verdict: String,
    #[serde(default)]
    pub since: String,
    #[serde(default)]
    pub until: String,
}

fn some(s: &str) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_string())
}

impl Search {
    fn query(&self) -> LogQuery {
        LogQuery {
            from: some(&self.from),
            to: some(&self.to),
            since: some(&self.since),
            until: some(&self.until),
            verdict: some(&self.verdict),
            id: some(&self.id),
            subject: some(&self.subject),
            client: some(&self.client),
            message_id: some(&self.message_id),
            limit: Some(5000),
            ..Default::default()
        }
    }
}

/// One message of the results: its events merged.
struct Row<'a> {
    first: &'a Event,
    last_at: i64,
    verdict: &'a str,
    score: Option<f64>,
    stages: Vec<&'a str>,
}

/// Events grouped by queue id (a message without one stands alone), newest first.
fn rows(events: &[Event]) -> Vec<Row<'_>> {
    let mut by_id: BTreeMap<String, Row<'_>> = BTreeMap::new();
    for (n, e) in events.iter().enumerate() {
        let key = if e.queue_id.is_empty() {
            format!("#{n}")
        } else {
            e.queue_id.clone()
        };
        let row = by_id.entry(key).or_insert(Row {
            first: e,
            last_at: e.at_unix_ms,
            verdict: "",
            score: None,
            stages: Vec::new(),
        });
        row.last_at = row.last_at.max(e.at_unix_ms);
        if !e.verdict.is_empty() {
            row.verdict = &e.verdict;
            row.score = Some(e.score);
        }
        if !row.stages.contains(&e.stage.as_str()) {
            row.stages.push(&e.stage);
        }
        // The subject and sender come from the event that has them.
        if row.first.subject.is_empty() && !e.subject.is_empty() {
            row.first = e;
        }
    }
    let mut out: Vec<Row<'_>> = by_id.into_values().collect();
    out.sort_by_key(|r| std::cmp::Reverse(r.last_at));
    out
}

fn field(label: &str, name: &str, value: &str, placeholder: &str) -> Markup {
    html! { label { (label) input type="text" name=(name) value=(value) placeholder=(placeholder); } }
}

async fn search(
    Staff(ui): Staff,
    State(state): State<AppState>,
    Query(s): Query<Search>,
) -> Response {
    let found = crate::api::log::search(
        Signed(ui.who.clone()),
        State(state.clone()),
        Query(s.query()),
    )
    .await;
    let body = html! {
        form.search method="get" action="/ui/tracking" {
            (field("Sender", "from", &s.from, "alice@example.org"))
            (field("Recipient", "to", &s.to, "bob@example.com"))
            (field("Subject contains", "subject", &s.subject, ""))
            (field("Client address", "client", &s.client, "192.0.2.1"))
            (field("Message-ID", "message_id", &s.message_id, ""))
            (field("Queue id", "id", &s.id, ""))
            label { "Verdict" select name="verdict" {
                option value="" { "any" }
                @for v in ["accept", "tag", "quarantine", "reject", "tempfail", "discard"] {
                    option value=(v) selected[s.verdict == v] { (v) }
                }
            } }
            (field("Since", "since", &s.since, "1d, 2h, 2026-11-22 08:00"))
            (field("Until", "until", &s.until, ""))
            button type="submit" { "Search" }
        }
        @match &found {
            Err(p) => p.error { (p.detail.as_deref().unwrap_or(&p.title)) }
            Ok(events) => {
                @let list = rows(&events.0);
                p.muted { (list.len()) " messages (" (events.0.len()) " events)" }
                table.results {
                    thead { tr { th { "Time (UTC)" } th { "Queue id" } th { "From" } th { "To" } th { "Subject" } th { "Client" } th { "Verdict" } th.num { "Score" } th { "Stages" } } }
                    tbody {
                        @for r in &list {
                            tr {
                                td { (super::time(r.first.at_unix_ms / 1000)) }
                                td { @if r.first.queue_id.is_empty() { "-" } @else {
                                    a href={ "/ui/tracking/message?id=" (super::percent(&r.first.queue_id)) } { (r.first.queue_id) }
                                } }
                                td.wrap { (r.first.sender) }
                                td.wrap { (r.first.recipients.join(", ")) }
                                td.subject { (r.first.subject) }
                                td { (r.first.client_ip) }
                                td { (r.verdict) }
                                td.num { (r.score.map(|s| format!("{s:.2}")).unwrap_or_default()) }
                                td { (r.stages.join(", ")) }
                            }
                        }
                    }
                }
            }
        }
    };
    ui.page("Message tracking", Nav::Tracking, body)
}

#[derive(Debug, Default, Deserialize)]
pub struct MessageQuery {
    pub id: String,
}

/// One message's events: by queue id, and by its Message-ID (the same message under
/// another queue id, on another node or after reinjection).
async fn message(
    Staff(ui): Staff,
    State(state): State<AppState>,
    Query(q): Query<MessageQuery>,
) -> Response {
    let ask = |query: LogQuery| {
        crate::api::log::search(Signed(ui.who.clone()), State(state.clone()), Query(query))
    };
    let mut events = match ask(LogQuery {
        id: Some(q.id.clone()),
        ..Default::default()
    })
    .await
    {
        Ok(e) => e.0,
        Err(p) => return ui.problem(&p),
    };
    let message_id = events
        .iter()
        .find(|e| !e.message_id.is_empty())
        .map(|e| e.message_id.clone());
    if let Some(mid) = &message_id
        && let Ok(more) = ask(LogQuery {
            message_id: Some(mid.clone()),
            ..Default::default()
        })
        .await
    {
        for e in more.0 {
            let dup = events.iter().any(|x| {
                x.at_unix_ms == e.at_unix_ms
                    && x.queue_id == e.queue_id
                    && x.stage == e.stage
                    && x.node == e.node
            });
            if !dup {
                events.push(e);
            }
        }
        events.sort_by_key(|e| e.at_unix_ms);
    }
    if events.is_empty() {
        let p = crate::problem::Problem::not_found(format!(
            "no message {} in the message log (or not one of your domains')",
            q.id
        ));
        return ui.problem(&p);
    }
    let first = events
        .iter()
        .find(|e| !e.subject.is_empty())
        .unwrap_or(&events[0]);
    let body = html! {
        dl.meta {
            dt { "Queue id" } dd { (q.id) }
            dt { "Message-ID" } dd.wrap { (message_id.clone().unwrap_or_default()) }
            dt { "From" } dd { (first.sender) }
            dt { "To" } dd { (first.recipients.join(", ")) }
            dt { "Subject" } dd.subject { (first.subject) }
            dt { "Client" } dd { (first.client_ip) " (HELO " (first.helo) ")" }
            dt { "Size" } dd { (super::size(first.size)) }
        }
        h2 { "Timeline" }
        table.timeline {
            thead { tr { th { "Time (UTC)" } th { "Node" } th { "Daemon" } th { "Queue id" } th { "Stage" } th { "Recipients" } th { "Verdict" } th.num { "Score" } th { "Symbols" } th { "Detail" } } }
            tbody {
                @for e in &events {
                    tr {
                        td { (super::time(e.at_unix_ms / 1000)) }
                        td { (e.node) }
                        td { (e.daemon) }
                        td { (e.queue_id) }
                        td { strong { (e.stage) } }
                        td.wrap { (e.recipients.join(", ")) }
                        td { (e.verdict) }
                        td.num { @if !e.verdict.is_empty() { (format!("{:.2}", e.score)) } }
                        td.wrap.small { (e.symbols.join(" ")) }
                        td.wrap { (e.detail) }
                    }
                }
            }
        }
        p { a href="/ui/tracking" { "New search" } }
    };
    ui.page("Message timeline", Nav::Tracking, body)
}
