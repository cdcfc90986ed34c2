//! `GET /api/v1/log`: the message log search of `mb-log`, through mb-rpcd's
//! `Events.Query`, with its filters and defaults (the last day, or the whole log for a
//! message named by queue id or Message-ID), scoped as the quarantine is: a non-admin
//! sees the events of mail from or to its addresses or domains, and only those
//! recipients of it.

use axum::Json;
use axum::extract::{Query, State};
use mb_proto::v1::events_client::EventsClient;
use mb_proto::v1::{EventQuery, MessageEvent};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::Signed;
use crate::auth::{Principal, Role};
use crate::problem::Problem;
use crate::state::AppState;

const VERDICTS: &[&str] = &[
    "accept",
    "tag",
    "quarantine",
    "reject",
    "tempfail",
    "discard",
];

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(search))
}

/// The filters of `mb-log`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Only messages from this sender address
    pub from: Option<String>,
    /// Only messages to this recipient address
    pub to: Option<String>,
    /// Only since this age or UTC time (30m, 2h, 7d, 2026-11-22 08:00); default 1d
    pub since: Option<String>,
    /// Only before this age or UTC time
    pub until: Option<String>,
    /// Only scans with this verdict: accept, tag, quarantine, reject, tempfail, discard
    pub verdict: Option<String>,
    /// Only events at this stage: received, scanned, delivered, deferred, bounced, rejected
    pub stage: Option<String>,
    /// Only this queue id
    pub id: Option<String>,
    /// Only messages whose subject contains this text (ignoring case)
    pub subject: Option<String>,
    /// Only messages from this client address
    pub client: Option<String>,
    /// Only the message with this Message-ID (angle brackets optional)
    pub message_id: Option<String>,
    /// At most this many events, the newest (default 1000)
    pub limit: Option<u32>,
}

/// One event of the message log, as `mb-log --json` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub at_unix_ms: i64,
    pub node: String,
    pub daemon: String,
    pub queue_id: String,
    pub message_id: String,
    pub client_ip: String,
    pub helo: String,
    pub sender: String,
    pub recipients: Vec<String>,
    pub subject: String,
    pub size: u64,
    pub stage: String,
    pub verdict: String,
    pub score: f64,
    pub symbols: Vec<String>,
    pub detail: String,
}

/// Whether `p` may see an event: mail from or to one of its addresses.
pub fn visible(p: &Principal, e: &MessageEvent) -> bool {
    p.role == Role::Admin
        || (!e.sender.is_empty() && p.sees_address(&e.sender))
        || e.recipients.iter().any(|r| p.sees_address(r))
}

fn view(p: &Principal, e: MessageEvent) -> Event {
    // The sender sees where its mail went; a recipient sees only itself among the others.
    let recipients = if p.role == Role::Admin || (!e.sender.is_empty() && p.sees_address(&e.sender))
    {
        e.recipients
    } else {
        e.recipients
            .into_iter()
            .filter(|r| p.sees_address(r))
            .collect()
    };
    Event {
        at_unix_ms: e.at_unix_ms,
        node: e.node,
        daemon: e.daemon,
        queue_id: e.queue_id,
        message_id: e.message_id,
        client_ip: e.client_ip,
        helo: e.helo,
        sender: e.sender,
        recipients,
        subject: e.subject,
        size: e.size,
        stage: e.stage,
        verdict: e.verdict,
        score: e.score,
        symbols: e.symbols,
        detail: e.detail,
    }
}

/// Message log events the caller may see, in time order (`mb-log`).
#[utoipa::path(
    get,
    path = "/api/v1/log",
    tag = "log",
    params(LogQuery),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The matching events, oldest first", body = Vec<Event>),
        (status = 400, description = "A bad filter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not logged in", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "mb-rpcd is not running or not serving", body = Problem, content_type = "application/problem+json")
    )
)]
pub(crate) async fn search(
    Signed(p): Signed,
    State(state): State<AppState>,
    Query(q): Query<LogQuery>,
) -> Result<Json<Vec<Event>>, Problem> {
    if let Some(v) = &q.verdict
        && !VERDICTS.contains(&v.as_str())
    {
        return Err(Problem::bad_request(format!(
            "verdict must be one of {}",
            VERDICTS.join(", ")
        )));
    }
    if let Some(c) = &q.client
        && c.parse::<std::net::IpAddr>().is_err()
    {
        return Err(Problem::bad_request(format!(
            "client: {c:?} is not an IP address"
        )));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let time = |name: &str, v: &Option<String>, default: i64| -> Result<i64, Problem> {
        match v {
            Some(s) => mb_runtime::cli::parse_time(s, now)
                .map_err(|e| Problem::bad_request(format!("{name}: {e}"))),
            None => Ok(default),
        }
    };
    // As mb-log: a message named by its identity is searched for over the whole log.
    let named = q.id.is_some() || q.message_id.is_some();
    let since = if named && q.since.is_none() {
        0
    } else {
        time("since", &q.since, now - 86_400_000)?
    };
    let until = time("until", &q.until, 0)?;
    let limit = q.limit.unwrap_or(1000);
    let (domains, addresses) = super::scope_of(&p);
    let query = EventQuery {
        queue_id: q.id.unwrap_or_default(),
        sender: q.from.unwrap_or_default(),
        recipient: q.to.unwrap_or_default(),
        since_unix_ms: since,
        until_unix_ms: until,
        verdict: q.verdict.unwrap_or_default(),
        stage: q.stage.unwrap_or_default(),
        limit,
        newest_first: true,
        subject: q.subject.unwrap_or_default(),
        client_ip: q.client.unwrap_or_default(),
        message_id: q.message_id.unwrap_or_default(),
        // mb-rpcd restricts the query itself, so the limit counts the caller's events.
        scoped: p.role != Role::Admin,
        domains,
        addresses,
    };
    let found = state
        .call("mb-rpcd", |ch| async move {
            EventsClient::new(ch).query(query).await
        })
        .await?
        .events;
    // `visible` again: a second line of defence should mb-rpcd ever scope less.
    let mut out: Vec<Event> = found
        .into_iter()
        .filter(|e| visible(&p, e))
        .map(|e| view(&p, e))
        .collect();
    // Asked newest first (so the limit keeps the newest), given in time order.
    out.reverse();
    Ok(Json(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_sees_mail_from_or_to_itself_and_only_its_recipients() {
        let jane = Principal {
            name: "jane".into(),
            role: Role::User,
            domains: Vec::new(),
            addresses: vec!["jane@a.test".into()],
        };
        let ev = |sender: &str, rcpts: &[&str]| MessageEvent {
            sender: sender.into(),
            recipients: rcpts.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert!(visible(
            &jane,
            &ev("x@c.test", &["jane@a.test", "bob@b.test"])
        ));
        assert!(visible(&jane, &ev("Jane@a.test", &["bob@b.test"])));
        assert!(!visible(&jane, &ev("", &["bob@b.test"])));
        let v = view(&jane, ev("x@c.test", &["jane@a.test", "bob@b.test"]));
        assert_eq!(v.recipients, ["jane@a.test"]);
        let v = view(&jane, ev("jane@a.test", &["bob@b.test"]));
        assert_eq!(v.recipients, ["bob@b.test"]);
    }
}
